"""Training start-up: seconds from launching ``iwseg train`` to the end of its first training
step, on the demo's data (scripts/demo.py: 24 synthetic lung-CT-like cases of 48 x 96 x 96
voxels) with the demo's settings, for this tree and, with ``--old REF``, an older commit,
interleaved.

    python -m scripts.bench startup                                   # this tree, into docs/benchmarks.md
    python -m scripts.bench.startup --old de48e32 --repeats 3 --speed 10 3
    python -m scripts.bench.startup --tree a=/some/checkout --tree b=/another --repeats 3

Why: start-up is where preprocessing costs show (every training case is loaded, prepared,
labelled and padded before the first step with ``cache_size: null``), and the comparison must
run an older checkout unchanged. ``--old REF`` extracts the commit with ``git archive`` into a
temporary folder; every measurement is a fresh interpreter running
``scripts/bench/train_runs.py`` (this tree's harness) with ``PYTHONPATH=<tree>`` (that tree's
library). Both trees get this tree's demo settings, without ``val_metric`` and ``license``
(:data:`scripts.bench.train_runs.NOT_TIMED`: the run never validates, and older trees know fewer
keys).

What is measured, per run (one child process each):

* ``total``: from just before the child process is started to the first optimiser step of the
  run (a global optimiser step hook; the start-up report's probe steps use no optimiser), so it
  includes the interpreter, the imports, reading and preprocessing the cases and the first
  forward/backward;
* ``trainer``: the same end, from the entry of ``training.train``;
* ``load_training_data`` and ``PatchDataset.preload``: the seconds spent in each (wrapped);
* ``start_report`` (``train_report.log_start_report``, which times probe steps) and
  ``val_check`` (the trainer reading the validation cases up front): steps newer trees take
  before the first step, 0 where a tree has none.

The run is stopped at that first step, so no epoch, checkpoint or validation follows. Trees run
in the order given, ``--repeats`` rounds after one warm-up round that is not counted
(:func:`scripts.bench.timing.interleaved`), so machine drift hits every tree alike; the table
gives medians and each tree's ratio to the first. ``--speed ITERS EPOCHS`` also measures each
tree's training speed (:func:`scripts.bench.train_runs.measure_cpu`, one background worker).
``--quick`` (6 cases, one round, no warm-up) only checks that it works.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

from IWSegmentationLib.data.synth import write_dataset
from scripts import demo
from scripts.bench import report, timing, train_runs

REPO = Path(__file__).resolve().parents[2]
#: The child process's entry, run as a file so that the tree on PYTHONPATH supplies the library.
CHILD = Path(train_runs.__file__).resolve()
PHASES = ("total", "trainer", "load_training_data", "preload", "start_report", "val_check")
SPEED_CASES = 12  # the data of the training benchmark (scripts/bench/training.py)


def git(*args: str) -> subprocess.CompletedProcess:
    """``git -C REPO ARGS``, output captured."""
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)


def checkout(ref: str, dest: Path) -> tuple[Path, str]:
    """Extract commit ``ref`` of this repository into ``dest`` (``git archive``: no worktree, the
    repository is left as it is); returns the folder and the commit's short hash."""
    found = git("rev-parse", "--verify", "--quiet", "--short", f"{ref}^{{commit}}")
    if found.returncode != 0:
        raise SystemExit(f"startup: --old {ref}: not a commit of {REPO}")
    tar = dest.with_suffix(".tar")
    archived = git("archive", "--format=tar", "-o", str(tar), ref)
    if archived.returncode != 0:
        raise SystemExit(f"startup: git archive {ref} failed: {archived.stderr.strip()}")
    dest.mkdir(parents=True)
    with tarfile.open(tar) as archive:
        archive.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    tar.unlink()
    return dest, found.stdout.strip()


def this_tree() -> str:
    """``HEAD abc1234`` of this checkout, ``+ uncommitted changes`` if it has any."""
    head = git("rev-parse", "--short", "HEAD").stdout.strip() or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return f"this tree, HEAD {head}" + (" + uncommitted changes" if dirty else "")


def child(tree: Path, args: list[str]) -> None:
    """Run the harness in a fresh interpreter with ``tree``'s library; stop on failure."""
    proc = subprocess.run([sys.executable, str(CHILD), *args], env=timing.quiet_env() | {"PYTHONPATH": str(tree)},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"startup: the run from {tree} failed:\n{proc.stderr[-3000:]}")


def measure(tree: Path, data: Path, work: Path) -> dict:
    """One start-up of ``iwseg train`` from ``tree`` on ``data``: the phases in seconds."""
    settings = {**train_runs.run_settings(demo.TRAIN_SETTINGS), "data": str(data), "out": str(work / "run")}
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    result = work / "marks.json"
    t0 = time.time()
    child(tree, ["first-step", str(config), str(result)])
    m = json.loads(result.read_text(encoding="utf-8"))
    if not Path(m["module"]).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"startup: the run imported {m['module']}, not the tree {tree}")
    return {"total": m["first_step"] - t0, "trainer": m["first_step"] - m["train_entry"],
            **{k: m.get(k, 0.0) for k in PHASES[2:]}}


def measure_speed(tree: Path, data: Path, work: Path, iters: int, epochs: int) -> dict:
    """Iterations/s and data-wait fraction of ``tree`` (a fresh interpreter)."""
    settings, result = work / "settings.json", work / "speed.json"
    settings.write_text(json.dumps(demo.TRAIN_SETTINGS), encoding="utf-8")
    child(tree, ["speed", str(data), str(settings), str(result), str(iters), str(epochs)])
    return json.loads(result.read_text(encoding="utf-8"))


def markdown(trees: list[tuple[str, Path, str]], runs: dict[str, list[dict]], cases: int) -> str:
    """Medians per tree and phase, and each tree's ratio to the first tree."""
    first = trees[0][0]
    med = {name: timing.medians([r["startup"] for r in runs[name]], PHASES) for name, _, _ in trees}
    lines = [f"`iwseg train` on the demo's data ({cases} cases of {' x '.join(map(str, demo.SYNTH_SHAPE))}) "
             f"with the demo's settings, to the end of the first optimiser step; medians of "
             f"{len(runs[first])} round(s). " + timing.machine_line(("torch",)), "",
             "| tree | " + " | ".join(f"{k} (s)" for k in PHASES) + " | total / " + first + " |",
             "|---|" + "---:|" * (len(PHASES) + 1)]
    for name, _, source in trees:
        cells = " | ".join(f"{med[name][k]:.2f}" for k in PHASES)
        lines.append(f"| {name} ({source}) | {cells} | {med[name]['total'] / med[first]['total']:.3f} |")
    lines += ["", "Every run (total s): " + "; ".join(
        f"{name}: " + ", ".join(f"{r['startup']['total']:.2f}" for r in runs[name]) for name, _, _ in trees)]
    if runs[first][0]["speed"] is None:
        return "\n".join(lines)
    speed = {name: timing.medians([r["speed"] for r in runs[name]], ("iters_per_s", "data_wait"))
             for name, _, _ in trees}
    lines += ["", "| tree | iterations/s | data wait | it/s / " + first + " |", "|---|---:|---:|---:|"]
    for name, _, _ in trees:
        lines.append(f"| {name} | {speed[name]['iters_per_s']:.3f} | {100 * speed[name]['data_wait']:.2f}% | "
                     f"{speed[name]['iters_per_s'] / speed[first]['iters_per_s']:.3f} |")
    lines += ["", "Every run (it/s): " + "; ".join(
        f"{name}: " + ", ".join(f"{r['speed']['iters_per_s']:.3f}" for r in runs[name]) for name, _, _ in trees)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", metavar="REF", help="also time this commit (or branch, tag), after this tree")
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                        help="a source tree to start from instead of this one (repeatable; the first is the "
                        "reference of the ratios)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up round (>= 1)")
    parser.add_argument("--speed", type=int, nargs=2, metavar=("ITERS", "EPOCHS"),
                        help="also measure each tree's training speed with ITERS iterations x EPOCHS timed "
                        "epochs after a warm-up epoch")
    parser.add_argument("--quick", action="store_true", help="6 cases, one round, no warm-up round")
    report.add_report_argument(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    bad = [spec for spec in args.tree if "=" not in spec]
    if bad:
        parser.error(f"--tree {bad[0]}: expected NAME=PATH")
    trees = [(name, Path(path).resolve(), f"`{path}`") for name, path in (s.split("=", 1) for s in args.tree)]
    trees = trees or [("new", REPO, this_tree())]
    if args.old and any(name == "old" for name, _, _ in trees):
        parser.error("--old names its tree 'old': give the --tree another name")
    if len({name for name, _, _ in trees}) < len(trees):
        parser.error("--tree: every tree needs its own NAME")
    rounds, warmup, cases = (1, 0, 6) if args.quick else (args.repeats, 1, demo.N_TRAIN)

    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        tmp = Path(tmp)
        if args.old:
            folder, commit = checkout(args.old, tmp / "old")
            trees.append(("old", folder, f"commit {commit}"))
        data, speed_data = tmp / "data", tmp / "speed_data"
        write_dataset(data, cases, demo.SYNTH_SEED, demo.SYNTH_PRESET, shape=demo.SYNTH_SHAPE)
        if args.speed:
            write_dataset(speed_data, SPEED_CASES, 0, demo.SYNTH_PRESET, shape=demo.SYNTH_SHAPE)

        def job(tree: Path):
            def run() -> dict:
                with tempfile.TemporaryDirectory(dir=tmp) as work:
                    return {"startup": measure(tree, data, Path(work)),
                            "speed": measure_speed(tree, speed_data, Path(work), *args.speed) if args.speed else None}
            return run

        def show(label: str, name: str, r: dict) -> None:
            s = r["speed"]
            print(f"{label} {name}: " + ", ".join(f"{k} {r['startup'][k]:.2f} s" for k in PHASES)
                  + (f"; {s['iters_per_s']:.3f} it/s, data wait {100 * s['data_wait']:.2f}%" if s else ""),
                  file=sys.stderr, flush=True)

        runs = timing.interleaved({name: job(tree) for name, tree, _ in trees}, rounds, warmup, on_result=show)
    report.publish("startup", markdown(trees, runs, cases), args.report, argv, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
