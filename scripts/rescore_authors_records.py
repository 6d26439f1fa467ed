#!/usr/bin/env python
"""Rescore the inverse-weighting authors' released per-lesion records, by logit and by probability.

The authors (Shirokikh et al., MICCAI 2020; public repository ``neuro-ml/inverse_weighting``)
released, for each dataset (LiTS, LUNA16, their private brain Metastases) and each loss, the
matched lesions and components of their hold-out predictions:
``froc_data/<dataset>/<loss>/experiment_0/test_metrics/prc_records.json``. Each detection carries
two scores: its maximum logit and its maximum probability, stored as float16, which rounds to
exactly 1.0 above a logit of about 8. This script scores every file both ways with
``IWSegmentationLib.evaluation`` (:func:`load_records`, :func:`evaluate_cases`): the 7-point CPM
(the paper's Table 2 "avg Recall") over all lesions and over the small ones, in a single pass and
with the paper's bootstrap (``bootstrap_mode="paper"``: 100 draws of 80% of the images that hold
records, seed 42, FP/image over all images), and the object Dice; it writes a markdown table and
prints it.

    python -m scripts.rescore_authors_records --repo PATH/TO/inverse_weighting
    python -m scripts.rescore_authors_records --repo PATH/froc_data --markdown /tmp/t.md

``--repo`` is a checkout of the authors' repository, its ``froc_data`` folder, or a bare git
directory of it (read with ``git show``). Nothing is downloaded, and nothing is copied from the
repository (it has no licence): the records are read where they are. A missing path exits 2.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from IWSegmentationLib.core.errors import InputError
from IWSegmentationLib.core.lesions import SIZE_PRESETS
from IWSegmentationLib.evaluation import PAPER_BOOTSTRAP_SEED, evaluate_cases
from IWSegmentationLib.evaluation.records import RECORD_SCORES, load_records
from scripts.bench.report import write_report
from scripts.bench.timing import machine_line
from scripts.compare_losses import PAPER

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MARKDOWN = REPO / "docs" / "results" / "authors_records.md"
#: The environment variable that may name the authors' repository instead of ``--repo``.
REPO_ENV = "IWSEG_AUTHORS_REPO"
#: Where each file lies inside the authors' repository.
RECORDS_PATH = "froc_data/{dataset}/{loss}/experiment_0/test_metrics/prc_records.json"

#: The authors' dataset folders: (the paper's name, our size preset). The presets are the
#: paper's clinical "small" cut-offs (Fig. 2): lung nodules < 10 mm, liver tumours < 12 mm,
#: brain metastases < 5 mm.
DATASETS = {"lits": ("LiTS", "liver"), "luna": ("LUNA16", "lung"), "met": ("Metastases", "metastases")}
#: The authors' loss folders -> our loss names, in the paper's Table 2 order (plain, then iw).
LOSSES = {"bce": "bce", "iwbce": "iw-bce", "fl": "focal", "iwfl": "iw-focal", "dl": "dice", "iwdl": "iw-dice",
          "asl": "asl", "iwasl": "iw-asl", "wce": "wce", "gdl": "gdl"}
#: The plain losses that have an inverse-weighted twin.
PAIRS = (("bce", "iw-bce"), ("focal", "iw-focal"), ("dice", "iw-dice"), ("asl", "iw-asl"))
SCORE_NAMES = {"logit": "logit", "stat": "probability"}


def records_file(repo: Path, dataset: str, loss: str, dest: Path) -> Path | None:
    """The path of one dataset x loss records file in ``repo``, or None where the file is absent.

    ``repo`` is a checkout (holding ``froc_data/``), the ``froc_data`` folder itself, or a bare
    git directory, whose file is written under ``dest`` with ``git show HEAD:<path>``.
    Raises InputError when ``repo`` does not exist.
    """
    repo = Path(repo)
    if not repo.exists():
        raise InputError(f"the authors' repository was not found at {repo}: give --repo a checkout of "
                         "neuro-ml/inverse_weighting (or its froc_data folder); nothing is downloaded")
    rel = RECORDS_PATH.format(dataset=dataset, loss=loss)
    if (repo / "HEAD").is_file() and (repo / "objects").is_dir():
        return _from_git(repo, rel, dest)
    path = (repo.parent if repo.name == "froc_data" else repo) / rel
    return path if path.is_file() else None


def records_files(repo: Path, dest: Path) -> dict[tuple[str, str], Path | None]:
    """:func:`records_file` for every dataset x loss; InputError when ``repo`` holds none of them."""
    found = {(d, loss): records_file(repo, d, loss, dest) for d in DATASETS for loss in LOSSES}
    if not any(found.values()):
        raise InputError(f"{repo} holds none of the authors' records ({RECORDS_PATH.format(dataset='*', loss='*')})")
    return found


def _from_git(git_dir: Path, rel: str, dest: Path) -> Path | None:
    """``git show HEAD:rel`` into ``dest/rel``; None when the snapshot lacks that file."""
    try:
        proc = subprocess.run(["git", "--git-dir", str(git_dir), "show", f"HEAD:{rel}"], capture_output=True)
    except OSError as exc:
        raise InputError(f"{git_dir} is a git directory, and reading it needs git: {exc}") from None
    if proc.returncode != 0:
        return None
    out = dest / rel
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(proc.stdout)
    return out


def repo_commit(repo: Path) -> str | None:
    """The commit the records were read from (``git rev-parse HEAD``), or None outside git."""
    repo = Path(repo)
    where = ["--git-dir", str(repo)] if (repo / "HEAD").is_file() else ["-C", str(repo)]
    try:
        proc = subprocess.run(["git", *where, "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        return None
    return proc.stdout.strip()[:12] if proc.returncode == 0 else None


def score_records(path: Path, size_preset: str, score: str) -> dict:
    """Score one records file ranked by ``score`` (``logit`` or ``stat``).

    Returns the single-pass figures (``cpm``, ``cpm_small``), the paper's bootstrap
    (``boot_cpm``, ``boot_cpm_small``: (mean, std)), ``object_dice``, the counts (``n_images``,
    ``n_lesions``, ``n_small``, ``hit``, ``fp_per_image``) and how many hit lesions and false
    positives share the top score (``tied_hits``, ``tied_fps``: ties at 1.0 when ranked by the
    float16 probability; that value is ``top``). Undefined values are NaN.
    """
    cases = load_records(path, SIZE_PRESETS[size_preset], score=score)
    report = evaluate_cases(cases, seed=PAPER_BOOTSTRAP_SEED, bootstrap_mode="paper")
    small = report["by_size"]["small"]
    hit_conf = [x.confidence for c in cases for x in c.lesions if x.hit_dice > 0]
    fp_conf = [x.confidence for c in cases for x in c.components if x.hit_dice == 0]
    top = max(hit_conf + fp_conf, default=math.nan)  # 1.0 for the float16 probabilities of a confident model
    return {
        "cpm": _nan(report["cpm"]), "cpm_small": _nan(small["cpm"]),
        "boot_cpm": _mean_std(report["bootstrap"]["cpm"]), "boot_cpm_small": _mean_std(small["bootstrap"]["cpm"]),
        "object_dice": _nan(report["object_dice"]["mean"]),
        "n_images": report["n_images"], "n_lesions": report["n_lesions"], "n_small": small["n_lesions"],
        "hit": report["object_dice"]["n"], "fp_per_image": len(fp_conf) / report["n_images"],
        "top": top, "tied_hits": sum(v == top for v in hit_conf), "tied_fps": sum(v == top for v in fp_conf),
    }


def _nan(value) -> float:
    return math.nan if value is None else float(value)


def _mean_std(summary: dict) -> tuple[float, float]:
    return _nan(summary["mean"]), _nan(summary["std"])


def rescore(files: dict[tuple[str, str], Path | None]) -> dict[tuple[str, str], dict[str, dict] | None]:
    """Score every file by each of :data:`RECORD_SCORES` (None for a missing file)."""
    return {key: None if path is None else {s: score_records(path, DATASETS[key[0]][1], s) for s in RECORD_SCORES}
            for key, path in files.items()}


# --------------------------------------------------------------------------------------
# The markdown
# --------------------------------------------------------------------------------------


def _v(value: float, digits: int = 3) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def _ms(pair: tuple[float, float]) -> str:
    return "n/a" if not math.isfinite(pair[0]) else f"{pair[0]:.3f} ± {pair[1]:.3f}"


def _paper(dataset: str, loss: str) -> str:
    values = PAPER.get(LOSSES[loss], {}).get(DATASETS[dataset][0])
    return " / ".join(f"{v:.2f}" for v in values) if values else "—"


def _dataset_tables(dataset: str, scores: dict) -> list[str]:
    name, preset = DATASETS[dataset]
    cut = SIZE_PRESETS[preset].small_mm
    lines = [f"### {name} (size preset `{preset}`: small < {cut:g} mm)", "",
             "| loss | paper avg Recall / obj DSC | CPM logit | CPM prob. | small CPM logit | small CPM prob. "
             "| boot. CPM logit | boot. CPM prob. | boot. small logit | boot. small prob. | object Dice "
             "| images | lesions (small) | hit | FP/img | hits / FPs at the top prob. |",
             "|---|---|" + "---:|" * 14]
    for loss, ours in LOSSES.items():
        s = scores[dataset, loss]
        if s is None:
            lines.append(f"| `{ours}` | {_paper(dataset, loss)} | missing from the snapshot |" + " |" * 13)
            continue
        lg, st = s["logit"], s["stat"]
        tied = f"{st['tied_hits']} / {st['tied_fps']} at {st['top']:.4f}"
        lines.append("| " + " | ".join([
            f"`{ours}`", _paper(dataset, loss), _v(lg["cpm"]), _v(st["cpm"]), _v(lg["cpm_small"]), _v(st["cpm_small"]),
            _ms(lg["boot_cpm"]), _ms(st["boot_cpm"]), _ms(lg["boot_cpm_small"]), _ms(st["boot_cpm_small"]),
            _v(lg["object_dice"]), str(lg["n_images"]), f"{lg['n_lesions']} ({lg['n_small']})", str(lg["hit"]),
            _v(lg["fp_per_image"], 2), tied]) + " |")
    return lines + [""]


def _pairs_table(scores: dict) -> list[str]:
    """iw minus plain, per dataset and score, for the paper-bootstrap CPM (all and small)."""
    head = "| pair | " + " | ".join(f"{DATASETS[d][0]} {SCORE_NAMES[s]}" for d in DATASETS for s in RECORD_SCORES) + " |"
    lines = [head, "|---|" + "---:|" * (len(DATASETS) * len(RECORD_SCORES))]
    by_name = {LOSSES[loss]: loss for loss in LOSSES}
    for plain, iw in PAIRS:
        for key, label in (("boot_cpm", "all"), ("boot_cpm_small", "small")):
            cells = []
            for d in DATASETS:
                a, b = scores[d, by_name[plain]], scores[d, by_name[iw]]
                for s in RECORD_SCORES:
                    cells.append("n/a" if a is None or b is None else f"{b[s][key][0] - a[s][key][0]:+.3f}")
            lines.append(f"| `{iw}` − `{plain}` ({label}) | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(scores: dict, command: str, seconds: float, source: str = "") -> str:
    """The page: what was scored, how, the per-dataset tables and the iw-minus-plain table."""
    missing = [RECORDS_PATH.format(dataset=d, loss=loss) for (d, loss), s in scores.items() if s is None]
    lines = [
        "# The authors' released records, rescored by logit and by probability",
        "",
        "Generated by `python -m scripts.rescore_authors_records`; do not edit by hand. Command:",
        "",
        "```bash",
        command,
        "```",
        "",
        f"{source} {machine_line()} Wall time {seconds:.0f} s.".lstrip(),
        "",
        "The inverse-weighting authors (Shirokikh et al., MICCAI 2020) released, per dataset and loss, the "
        "matched lesions and components of their hold-out predictions (`froc_data/<dataset>/<loss>/"
        "experiment_0/test_metrics/prc_records.json` in the public repository `neuro-ml/inverse_weighting`, "
        "which has no licence: the records are read from a local copy and are not part of this project). "
        "Every detection carries its maximum **logit** and its maximum **probability**, the latter stored "
        "as float16, which rounds to exactly 1.0 above a logit of about 8. Each file is scored both ways "
        "with `IWSegmentationLib.evaluation` (`load_records(..., score='logit'|'stat')`, `evaluate_cases`):",
        "",
        "* **CPM**: mean recall at 1/8 ... 8 FP/image, the paper's Table 2 \"avg Recall\"; *small*: the "
        "lesions below the dataset's clinical cut-off, with the false positives of that size group;",
        "* **single pass** (`CPM`): all images once, FP/image over all images;",
        f"* **boot.**: the paper's bootstrap (`bootstrap_mode=\"paper\"`: 100 draws of 80% of the images "
        f"that hold any record, seed {PAPER_BOOTSTRAP_SEED}, FP/image over all images), mean ± std. This is "
        "the figure to set beside Table 2;",
        "* **object Dice**: mean best-match Dice of the hit lesions (the same for both scores);",
        "* **hits / FPs at the top prob.**: the hit lesions and false positives whose probability equals the "
        "highest one (1.0 where it saturates); ranked by probability they enter the FROC together, in one step;",
        "* **paper**: Table 2 (avg Recall / object Dice) as printed.",
        "",
        "## Per dataset",
        "",
    ]
    for dataset in DATASETS:
        lines += _dataset_tables(dataset, scores)
    lines += ["## Inverse weighting minus plain (paper-bootstrap CPM)", "",
              "Positive: the iw loss detects better. `all`: every lesion; `small`: the small group.", ""]
    lines += _pairs_table(scores)
    if missing:
        lines += ["Missing from the repository snapshot that was read (their git blobs were absent), so not "
                  "scored: " + ", ".join(f"`{m}`" for m in missing) + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=os.environ.get(REPO_ENV),
                        help=f"the authors' checkout, its froc_data folder, or a bare git dir (default ${REPO_ENV})")
    parser.add_argument("--markdown", type=Path, default=DEFAULT_MARKDOWN,
                        help="where to write the table (default docs/results/authors_records.md)")
    args = parser.parse_args(argv)
    if args.repo is None:
        print(f"rescore_authors_records: skipped: give --repo (or set ${REPO_ENV}) to a checkout of "
              "neuro-ml/inverse_weighting; nothing is downloaded", file=sys.stderr)
        return 2
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="authors_records_") as tmp:
        try:
            files = records_files(args.repo, Path(tmp))
            commit = repo_commit(args.repo)
            scores = rescore(files)
        except InputError as exc:
            print(f"rescore_authors_records: skipped: {exc}", file=sys.stderr)
            return 2
    command = "python -m scripts.rescore_authors_records --repo PATH/TO/inverse_weighting"
    if args.markdown != DEFAULT_MARKDOWN:
        command += " --markdown " + shlex.quote(str(args.markdown))
    source = f"Records read from commit `{commit}` of `neuro-ml/inverse_weighting`." if commit else ""
    write_report(args.markdown, markdown(scores, command, time.perf_counter() - start, source))
    return 0


if __name__ == "__main__":
    sys.exit(main())
