"""Scoring and tables of ``scripts/compare_losses.py``: what the kept logits say.

Every run kept float32 held-out logits at each scored epoch. Components are those of
``logit > 0`` (probability 0.5) and rank by their maximum logit (see
``IWSegmentationLib/core/confidence.py``: a float32 probability ties every confident component at
1.0). The tables, from the last epoch's checkpoint (the authors test the last one):

* **CPM** (the paper's "avg Recall"), overall and per size group, under the paper's hit rule
  (any overlap, many-to-one) and a one-to-one rule (Hungarian matching, IoU > 0.1 is not used:
  the ``one-to-one`` preset of ``iwseg evaluate``);
* **paired iw-minus-plain differences** per seed, their mean, and a 95% bootstrap interval over
  held-out images (the same resampled images for both arms of a pair);
* **FP per image at matched recall** (the FROC read at a recall both arms reach) and the
  0.5-threshold counts;
* **curves**: the CPM and the FP/image at 0.5 of every scored epoch, mean over seeds, as a table
  and a picture, to show whether training flattened.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from IWSegmentationLib.core.lesions import SIZE_GROUPS, size_thresholds
from IWSegmentationLib.data import load_case, load_dataset
from IWSegmentationLib.evaluation import cpm, froc_of_cases, match_case
from IWSegmentationLib.evaluation.bootstrap import CasePool
from scripts.bench.report import write_report as write_markdown
from scripts.bench.timing import cpu_name, visible_cores

HIT_RULES = ("paper", "one-to-one")
N_PAIRED_RESAMPLES = 1000
RECALL_LEVELS = (0.5, 0.7)


def match_logits(logits: np.ndarray, ref: np.ndarray, spacing, thresholds, hit_rule: str, case: str):
    """One held-out case matched with components ranked by their maximum logit."""
    return match_case(logits, ref, spacing, threshold=0.5, thresholds=thresholds, case=case, hit_rule=hit_rule,
                      score="logit")


def score_epoch(work: Path, rid: str, epoch: int, heldout: dict, thresholds) -> dict[str, list]:
    """The matched held-out cases of one run's checkpoint, per hit rule."""
    out: dict[str, list] = {rule: [] for rule in HIT_RULES}
    with np.load(work / "logits" / rid / f"e{epoch:03d}.npz") as kept:
        for case_id, volume in heldout.items():
            logits = kept[case_id]
            for rule in HIT_RULES:
                out[rule].append(match_logits(logits, volume.lesion, volume.geometry.spacing_zyx, thresholds, rule,
                                              case_id))
    return out


def cpm_of(cases: Sequence, group: str | None = None) -> float:
    curve = froc_of_cases(cases, group)
    return cpm(curve)


def fp_at_recall(cases: Sequence, recall: float) -> float | None:
    """FP/image at which the FROC first reaches ``recall`` (None if it never does)."""
    curve = froc_of_cases(cases)
    reached = np.flatnonzero(curve.recall >= recall - 1e-12)
    return float(curve.fp_per_image[reached[0]]) if reached.size else None


def summary(cases: Sequence) -> dict:
    lesions = [les for c in cases for les in c.lesions]
    hit = [les.hit_dice for les in lesions if les.hit_dice > 0]
    out = {
        "cpm": cpm_of(cases),
        "object_dice": float(np.mean(hit)) if hit else None,
        "detected": len(hit),
        "n_lesions": len(lesions),
        "fp_per_image": float(np.mean([c.n_false_positives for c in cases])),
        "pred_to_ref": float(sum(c.pred_voxels for c in cases) / max(1, sum(c.ref_voxels for c in cases))),
        "by_size": {},
        "fp_at_recall": {str(r): fp_at_recall(cases, r) for r in RECALL_LEVELS},
    }
    for g in SIZE_GROUPS:
        group = [les for les in lesions if les.size_group == g]
        if group:
            gh = [les.hit_dice for les in group if les.hit_dice > 0]
            out["by_size"][g] = {"n_lesions": len(group), "cpm": cpm_of(cases, g),
                                 "object_dice": float(np.mean(gh)) if gh else None}
    return out


def paired_difference(plain: list[list], iw: list[list], group: str | None, seed: int = 0) -> dict:
    """Mean over seeds of CPM(iw) - CPM(plain), per seed, and a 95% percentile bootstrap interval:
    images drawn with replacement, the same draw for both arms and every seed."""
    a = [CasePool.from_cases(cases) for cases in plain]
    b = [CasePool.from_cases(cases) for cases in iw]
    per_seed = [cpm(y.froc(group)) - cpm(x.froc(group)) for x, y in zip(a, b)]
    n = len(plain[0])
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(N_PAIRED_RESAMPLES):
        idx = rng.integers(0, n, n)  # with replacement: an image drawn twice counts twice
        diffs = [cpm(y.froc(group, idx)) - cpm(x.froc(group, idx)) for x, y in zip(a, b)]
        diffs = [d for d in diffs if math.isfinite(d)]
        if diffs:
            means.append(float(np.mean(diffs)))
    lo, hi = (np.percentile(means, [2.5, 97.5]) if means else (math.nan, math.nan))
    return {"per_seed": per_seed, "mean": float(np.mean(per_seed)), "ci": [float(lo), float(hi)]}


def _mean_std(values) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "—"
    return f"{np.mean(values):.2f} ± {np.std(values):.2f}"


def _v(value, digits: int = 2) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def dataset_statistics(train_dir: Path, heldout_dir: Path, thresholds) -> dict:
    """Lesions per case and the size histogram (size groups and volume ratios) of both sets."""
    out = {}
    for name, folder in (("train", train_dir), ("heldout", heldout_dir)):
        summary_ = json.loads((folder / "dataset.json").read_text())["iwseg"]
        rows = [ln.split(",") for ln in (folder / "lesions.csv").read_text().splitlines()[1:]]
        spacing = np.asarray(summary_["spacing"], float)
        voxels = np.asarray([int(r[2]) for r in rows], float)
        diam_mm = np.cbrt(6.0 * voxels * spacing.prod() / np.pi)
        by_case: dict[str, list[float]] = {}
        for r, v in zip(rows, voxels):
            by_case.setdefault(r[0], []).append(v)
        ratios = [max(v) / min(v) for v in by_case.values() if len(v) > 1]
        out[name] = {
            "cases": len(summary_["lesions_per_case"]),
            "lesions": int(voxels.size),
            "per_case": float(np.mean(summary_["lesions_per_case"])),
            "groups": {"small": int(np.sum(diam_mm < thresholds.small_mm)),
                       "medium": int(np.sum((diam_mm >= thresholds.small_mm) & (diam_mm < thresholds.large_mm))),
                       "large": int(np.sum(diam_mm >= thresholds.large_mm))},
            "diameter_mm": [float(np.min(diam_mm)), float(np.median(diam_mm)), float(np.max(diam_mm))],
            "volume_ratio_median": float(np.median(ratios)) if ratios else None,
        }
    return out


def plot_curves(curves: dict, epochs: list[int], iters: int, path: Path) -> None:
    """CPM and FP/image at 0.5 along training, mean over seeds, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    fig.suptitle("Solid: inverse-weighted; dashed: plain losses and the MONAI peer", fontsize=9)
    steps = [e * iters for e in epochs]
    colours = plt.get_cmap("tab20").colors  # 20 distinct colours: every arm its own
    for i, (arm, by_epoch) in enumerate(curves.items()):
        style = dict(linestyle="-" if arm.startswith("iw-") else "--", marker="o", ms=3, color=colours[i % 20])
        axes[0].plot(steps, [by_epoch[e]["cpm"] for e in epochs], label=arm, **style)
        axes[1].plot(steps, [by_epoch[e]["fp"] for e in epochs], label=arm, **style)
    axes[0].set(xlabel="training step", ylabel="held-out CPM (ranked by logit)", ylim=(0, 1))
    axes[1].set(xlabel="training step", ylabel="held-out FP/image at 0.5", yscale="symlog")
    axes[0].legend(fontsize=7, ncol=2)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_id(arm: str, seed: int) -> str:
    """The name of one run (its folders and record)."""
    return f"{arm}-s{seed}"


def write_report(work: Path, kept: list[tuple[str, int]], settings: dict, data: dict, regime: str, command: str,
                 markdown: Path, patch_stats: dict, *, pairs: Sequence[tuple[str, str]], paper: dict,
                 peer: str) -> None:
    """Score every kept run (every scored epoch, both hit rules) and write the markdown, the curves'
    picture and a JSON of the curves beside the markdown. ``pairs``: (plain, iw) arms to difference;
    ``paper``: the paper's Table 2 per arm; ``peer``: the peer arm's name."""
    from IWSegmentationLib.core.outputs import atomic_output

    thresholds = size_thresholds(settings["size_preset"])
    train_dir, heldout_dir = work / "data" / "train", work / "data" / "heldout"
    heldout = {r.id: load_case(r) for r in load_dataset(heldout_dir).cases}
    records = {run_id(a, s): json.loads((work / "reports" / f"{run_id(a, s)}.json").read_text()) for a, s in kept}
    arms = list(dict.fromkeys(a for a, _ in kept))
    seeds_of = {a: [s for b, s in kept if b == a] for a in arms}
    epochs = records[run_id(*kept[0])]["eval_epochs"]
    last = epochs[-1]
    final: dict[str, dict[str, list]] = {rule: {} for rule in HIT_RULES}  # rule -> arm -> [cases per seed]
    curves: dict[str, dict] = {}
    for arm in arms:
        curves[arm] = {}
        for e in epochs:
            cpms, fps = [], []
            for s in seeds_of[arm]:
                scored = score_epoch(work, run_id(arm, s), e, heldout, thresholds)
                cpms.append(cpm_of(scored["paper"]))
                fps.append(float(np.mean([c.n_false_positives for c in scored["paper"]])))
                if e == last:
                    for rule in HIT_RULES:
                        final[rule].setdefault(arm, []).append(scored[rule])
            curves[arm][e] = {"cpm": float(np.mean(cpms)), "fp": float(np.mean(fps))}
        print(f"  scored {arm}", flush=True)

    stats = dataset_statistics(train_dir, heldout_dir, thresholds)
    iters = settings["iters_per_epoch"]
    picture = markdown.parent / "images" / f"curves_{regime}.png"
    plot_curves(curves, epochs, iters, picture)
    wall_file = work / "wall_seconds.json"
    walls = json.loads(wall_file.read_text()) if wall_file.is_file() else []
    run_seconds = [r["seconds"] for r in records.values()]
    ours = next((r["parameters"] for r in records.values() if r["arm"] != peer), 0)
    peer_parameters = next((r["parameters"] for r in records.values() if r["arm"] == peer), 0)
    h, t = stats["heldout"], stats["train"]
    s = settings
    lines = [
        f"# Loss comparison, `{regime}` regime (the paper's Table 2 in shape, components ranked by logit)",
        "",
        "Generated by `python -m scripts.compare_losses` (scoring: `scripts/compare_losses_report.py`); the findings are "
        "discussed in [README.md](README.md).",
        "",
        f"**Command:** `{command}`. Wall time: "
        + (", ".join(f"{w['seconds'] / 60:.0f} min for {w['runs']} runs ({w['jobs']} side by side)" for w in walls)
           or "see the run records")
        + f"; {len(records)} runs, median {np.median(run_seconds):.0f} s each (training and {len(epochs)} scored "
        f"checkpoints) on {cpu_name()} ({visible_cores()} cores, shared with other work).",
        "",
        f"**Budget (every arm):** {s['epochs']} epochs x {iters} iterations = {s['epochs'] * iters} steps, batch "
        f"{s['batch_size']} of {'x'.join(map(str, s['patch_size']))} patches, lesion-centred sampling p = "
        f"{s['lesion_probability']}, no augmentation, SGD with Nesterov momentum {s['momentum']} (the paper's), lr "
        f"{s['lr']:g} -> {s['lr_final']:g} at {s['lr_decay_at']:.0%} of the epochs, `{s['model_size']}` U-Net "
        f"({ours:,} parameters), CPU fp32, 1 thread per run; seeds {', '.join(map(str, sorted(set(x for _, x in kept))))} "
        "(initialisation and patch stream). Every run is tested at its **last** checkpoint (as the authors did).",
        "",
        f"**Peer arm** `{peer}`: MONAI's `UNet` ({peer_parameters:,} parameters) + `monai.losses.DiceLoss(sigmoid=True)` on "
        "the same patch stream, optimiser and schedule.",
        "",
        f"**Data:** `iwseg synth --preset {data['preset']}`, {'x'.join(map(str, data['shape']))} voxels at "
        f"{' x '.join(f'{v:g}' for v in data['spacing'])} mm, options {json.dumps(data['options'])}. Training: "
        f"{t['cases']} cases, {t['lesions']} lesions ({t['per_case']:.1f} per case; small/medium/large "
        f"{t['groups']['small']}/{t['groups']['medium']}/{t['groups']['large']}). Held-out: {h['cases']} cases, "
        f"{h['lesions']} lesions ({h['per_case']:.1f} per case; small/medium/large {h['groups']['small']}/"
        f"{h['groups']['medium']}/{h['groups']['large']}), equivalent diameters {h['diameter_mm'][0]:.1f} / "
        f"{h['diameter_mm'][1]:.1f} / {h['diameter_mm'][2]:.1f} mm (min / median / max)"
        + (f", largest-to-smallest lesion volume in a case: median {h['volume_ratio_median']:.0f}x"
           if h["volume_ratio_median"] else "")
        + f". Size groups (`{s['size_preset']}`): small < {thresholds.small_mm:g} mm <= medium < "
        f"{thresholds.large_mm:g} mm <= large.",
        "",
        f"**Lesions per training patch** (the trainer's own stream, {patch_stats['patches']} patches): mean "
        f"{patch_stats['mean_lesions_per_patch']:.2f}; share with 0 / 1 / 2-3 / 4+ lesions: "
        + " / ".join(f"{patch_stats['share'][k]:.0%}" for k in ("0", "1", "2-3", "4+")) + ".",
        "",
        "**Metrics:** components of `logit > 0` (probability 0.5), each ranked by its maximum logit. CPM = mean "
        "recall at 1/8 ... 8 FP/image (the paper's \"avg Recall\"). Cells: mean ± std over seeds. `FP/img @recall R`: "
        "FP per image where the FROC first reaches recall R (— if never).",
        "",
    ]
    groups = [g for g in SIZE_GROUPS if h["groups"][g]]
    for rule in HIT_RULES:
        head = ["loss", "CPM"] + [f"{g} CPM" for g in groups] + ["object Dice", "detected @0.5", "FP/img @0.5",
                                                                 "pred/ref"] + [f"FP/img @recall {r}" for r in RECALL_LEVELS]
        if rule == "paper":
            head += ["paper LUNA16", "paper LiTS"]
        lines += [f"### Hit rule `{rule}`", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for arm in arms:
            sums = [summary(cases) for cases in final[rule][arm]]
            row = [f"`{arm}`", _mean_std([x["cpm"] for x in sums])]
            row += [_mean_std([x["by_size"].get(g, {}).get("cpm") for x in sums]) for g in groups]
            row += [_mean_std([x["object_dice"] for x in sums]),
                    f"{np.mean([x['detected'] for x in sums]):.0f}/{sums[0]['n_lesions']}",
                    _v(float(np.mean([x["fp_per_image"] for x in sums])), 1),
                    _v(float(np.mean([x["pred_to_ref"] for x in sums])), 1)]
            for r in RECALL_LEVELS:
                vals = [x["fp_at_recall"][str(r)] for x in sums]
                row.append("—" if any(v is None for v in vals) else _v(float(np.mean(vals)), 2))
            if rule == "paper":
                ref = paper.get(arm, {})
                row += [" / ".join(f"{v:.2f}" for v in ref[d]) if d in ref else "—" for d in ("LUNA16", "LiTS")]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")

    lines += ["### Paired differences, iw minus plain (CPM, last checkpoint)", "",
              f"Per seed, then the mean over seeds with a 95% bootstrap interval ({N_PAIRED_RESAMPLES} resamples of "
              "the held-out images with replacement, the same images for both arms).", "",
              "| pair | rule | group | per seed | mean [95% CI] |", "|---|---|---|---|---|"]
    for plain, iw in pairs:
        if plain not in arms or iw not in arms:
            continue
        common = [x for x in seeds_of[plain] if x in seeds_of[iw]]
        for rule in HIT_RULES:
            a = [final[rule][plain][seeds_of[plain].index(x)] for x in common]
            b = [final[rule][iw][seeds_of[iw].index(x)] for x in common]
            for group in [None] + groups:
                d = paired_difference(a, b, group)
                lines.append(f"| `{iw}` − `{plain}` | {rule} | {group or 'all'} | "
                             + ", ".join(f"{v:+.2f}" for v in d["per_seed"])
                             + f" | **{d['mean']:+.2f}** [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}] |")
    lines += ["", "### Training curves (held-out, paper rule, mean over seeds)", "",
              f"![CPM and FP/image along training](images/{picture.name})", "",
              "| loss | " + " | ".join(f"step {e * iters}: CPM / FP" for e in epochs) + " |",
              "|" + "---|" * (len(epochs) + 1)]
    for arm in arms:
        lines.append(f"| `{arm}` | " + " | ".join(f"{curves[arm][e]['cpm']:.2f} / {curves[arm][e]['fp']:.1f}"
                                                    for e in epochs) + " |")
    lines.append("")
    write_markdown(markdown, "\n".join(lines))
    with atomic_output(markdown.with_suffix(".json")) as tmp, open(tmp, "w") as fh:
        json.dump({"curves": curves, "stats": stats, "patch_stats": patch_stats}, fh, indent=1)
