"""Start-up of the entry points people wait on, for this tree and, with ``--old REF``, an older
commit, interleaved:

* ``slicer.logic``: ``import IWSegmentationLib.slicer.logic``, what the Slicer module's GUI process
  imports when the module opens (no torch: the backend is a child process);
* ``predict --help`` and ``iwseg --help``: reading a command line;
* ``predict``: a whole ``iwseg predict`` of the phantom (``IWSegmentationLib.testing.phantom``, a
  32 x 48 x 48 volume and its known-answer checkpoint, CPU, JSON-lines progress): the process the
  module starts for every run, torch import and the first window included.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \\
        python -m scripts.bench.entry_points [--old REF] [--rounds 15] [--quick] [--report FILE]

Every measurement is the wall time of a fresh interpreter (``python -c`` or ``python -m
IWSegmentationLib``, ``PYTHONPATH=<tree>``, run in an empty folder so that no other checkout is on
its path), from just before the child starts to its exit. Trees run in turns, ``--rounds`` rounds
after ``--warmup`` rounds that are not counted (:func:`scripts.bench.timing.interleaved`); the table
gives medians and the median of each round's ratio of this tree's time to the old one's (below 1:
this tree is faster). The phantom checkpoint is written by the last tree given (the oldest), so
that every tree can read it. ``--quick`` (two rounds, no warm-up) only checks that it works.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from IWSegmentationLib.core.imageio import Geometry, write_image
from IWSegmentationLib.testing import phantom
from scripts.bench import report, timing
from scripts.bench.startup import checkout, git

REPO = Path(__file__).resolve().parents[2]
#: What is timed: name -> (what it is, the child's arguments after the interpreter).
ENTRIES = {
    "slicer.logic": ("import of the Slicer side", ["-c", "import IWSegmentationLib.slicer.logic"]),
    "predict --help": ("`iwseg predict --help`", ["-m", "IWSegmentationLib", "predict", "--help"]),
    "iwseg --help": ("`iwseg --help`", ["-m", "IWSegmentationLib", "--help"]),
    "predict": ("`iwseg predict` of the phantom", ["-m", "IWSegmentationLib", "predict"]),
}


def phantom_files(folder: Path, writer: Path) -> list[str]:
    """The phantom's image (written here) and checkpoint (written by tree ``writer``); returns the
    ``iwseg predict`` arguments that read them."""
    case = phantom.phantom_case()
    image = folder / "phantom.nii.gz"
    write_image(image, case.image.astype(np.float32), Geometry.identity(case.image.shape, case.spacing))
    model = folder / "phantom.safetensors"
    code = "import sys; from IWSegmentationLib.testing import phantom; phantom.threshold_checkpoint(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, str(model)], cwd=folder, capture_output=True, text=True,
                          env={**timing.quiet_env(), "PYTHONPATH": str(writer)})
    if done.returncode != 0:
        raise SystemExit(f"entry_points: writing the phantom checkpoint with {writer} failed: {done.stderr.strip()}")
    return ["--model", str(model), "--input", str(image), "--output", str(folder / "out.nii.gz"), "--overwrite",
            "--progress-format", "jsonl", "--device", "cpu"]


def time_child(tree: Path, args: list[str], cwd: Path) -> float:
    """Wall seconds of ``python ARGS`` with ``PYTHONPATH=tree``, in ``cwd``; a failure stops the run."""
    env = {**timing.quiet_env(), "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"entry_points: {' '.join(args)} failed in {tree}: {done.stderr.strip()[-500:]}")
    return seconds


def markdown(trees: list[tuple[str, Path, str]], runs: dict[str, list[dict]], rounds: int) -> str:
    names = [name for name, _, _ in trees]
    med = {name: timing.medians(runs[name]) for name in names}
    head = "| entry point | " + " | ".join(f"{n} ({c}) s" for n, _, c in trees)
    head += "".join(f" | {names[0]} / {n}" for n in names[1:]) + " |"
    rows = [head, "|---|" + "---:|" * (len(names) * 2 - 1)]
    for key, (what, _) in ENTRIES.items():
        # the ratio round by round (the two ran back to back), then its median: robust to drift
        ratios = [statistics.median(a[key] / b[key] for a, b in zip(runs[names[0]], runs[n])) for n in names[1:]]
        cells = [f"{med[n][key]:.3f}" for n in names] + [f"{r:.2f}" for r in ratios]
        rows.append(f"| {what} | " + " | ".join(cells) + " |")
    return "\n".join([
        f"Medians of {rounds} interleaved rounds; wall seconds of a fresh interpreter each, start to exit. "
        "The ratio is the median of the rounds' ratios (each round ran the trees back to back).",
        "", *rows, "", timing.machine_line(),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench.entry_points", description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", metavar="REF", help="also time this commit (or branch, tag), after this tree")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument("--quick", action="store_true", help="two rounds, no warm-up: only checks that it works")
    report.add_report_argument(parser)
    args = parser.parse_args(argv)
    rounds, warmup = (2, 0) if args.quick else (args.rounds, args.warmup)
    head = git("rev-parse", "--short", "HEAD").stdout.strip() or "?"
    dirty = "+changes" if git("status", "--porcelain", "--untracked-files=no").stdout.strip() else ""
    with tempfile.TemporaryDirectory(prefix="iwseg-entry-") as tmp_name:
        tmp = Path(tmp_name)
        trees = [("new", REPO, head + dirty)]
        if args.old:
            folder, commit = checkout(args.old, tmp / "old")
            trees.append(("old", folder, commit))
        work = tmp / "work"
        work.mkdir()
        predict_args = phantom_files(work, trees[-1][1])

        def job(tree: Path):
            def run() -> dict:
                return {key: time_child(tree, args + (predict_args if key == "predict" else []), work)
                        for key, (_, args) in ENTRIES.items()}
            return run

        def show(label: str, name: str, r: dict) -> None:
            print(f"  {label} {name}: " + ", ".join(f"{k} {v:.3f} s" for k, v in r.items()), file=sys.stderr)

        runs = timing.interleaved({name: job(tree) for name, tree, _ in trees}, rounds, warmup, on_result=show)
    report.publish("entry_points", markdown(trees, runs, rounds), args.report, argv or sys.argv[1:], quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
