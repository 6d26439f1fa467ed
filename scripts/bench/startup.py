#!/usr/bin/env python
"""Training start-up: seconds from launching ``iwseg train`` to the end of its first training
step, on the demo's data (scripts/demo.py: 24 synthetic lung-CT-like cases of 48 x 96 x 96
voxels) with the demo's settings, for one or more source trees, interleaved.

    python scripts/bench_startup.py --tree new=. --tree old=/path/to/old/checkout --repeats 3

Why: start-up is where preprocessing costs show (every training case is loaded, prepared,
labelled and padded before the first step with ``cache_size: null``), and the comparison must
be able to run an older checkout unchanged, so nothing here imports the project in this
process except to write the data; each measurement is a fresh interpreter with
``PYTHONPATH=<tree>``.

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

The run is stopped at that first step (an exception the child catches), so no epoch, checkpoint
or validation follows. Trees run in the order given, ``--repeats`` rounds after one warm-up
round that is not counted, so machine drift hits every tree alike; the table gives medians and
each tree's ratio to the first.
"""

from __future__ import annotations

import time

T_CHILD = time.time()  # the child's first statement: before any heavy import

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

PHASES = ("total", "trainer", "load_training_data", "preload", "start_report", "val_check")


class _FirstStep(BaseException):
    """Raised by the optimiser hook to stop the run after its first step (a BaseException, so
    neither the trainer nor the CLI turns it into an error message)."""


def load_demo(tree: Path):
    """The ``scripts/demo.py`` module of ``tree`` (its data sizes and training settings)."""
    spec = importlib.util.spec_from_file_location(f"iwseg_demo_{abs(hash(tree))}", tree / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timed(marks: dict, name: str, func):
    """``func`` wrapped so that the seconds of its first call land in ``marks[name]``."""
    def wrapper(*args, **kwargs):
        t = time.time()
        try:
            return func(*args, **kwargs)
        finally:
            marks.setdefault(name, time.time() - t)
    return wrapper


def child(config: Path, result: Path) -> int:
    """Run ``iwseg train --config CONFIG`` in this process until its first optimiser step and
    write the time marks to ``result`` (JSON)."""
    marks: dict = {"child_start": T_CHILD}
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from IWSegmentationLib import data, training
    from IWSegmentationLib.cli import main as cli

    def entered(func):
        def wrapper(*args, **kwargs):
            marks.setdefault("train_entry", time.time())
            return func(*args, **kwargs)
        return wrapper

    def first_step(_optimizer, _args, _kwargs):
        marks["first_step"] = time.time()
        raise _FirstStep

    training.train = entered(training.train)
    training.load_training_data = _timed(marks, "load_training_data", training.load_training_data)
    data.PatchDataset.preload = _timed(marks, "preload", data.PatchDataset.preload)
    # steps newer trees take before the first step (0 s where a tree lacks them)
    try:
        from IWSegmentationLib.training import report as train_report
        train_report.log_start_report = _timed(marks, "start_report", train_report.log_start_report)
    except ImportError:
        pass
    run_class = getattr(training, "_Run", None)
    if run_class is not None and hasattr(run_class, "_check_validation_cases"):
        run_class._check_validation_cases = _timed(marks, "val_check", run_class._check_validation_cases)
    register_optimizer_step_pre_hook(first_step)
    try:
        rc = cli.main(["train", "--config", str(config)])
    except _FirstStep:
        rc = 0
    if "first_step" not in marks:
        print(f"bench_startup: the run ended (exit code {rc}) before a training step", file=sys.stderr)
        return 1
    marks["module"] = training.__file__
    result.write_text(json.dumps(marks), encoding="utf-8")
    return 0


def speed_child(tree: Path, data: Path, result: Path, iters: int, epochs: int) -> int:
    """``measure_cpu`` of ``tree``'s own scripts/bench_training.py (the demo's settings, one
    background worker, one warm-up epoch) on ``data``, written to ``result`` (JSON)."""
    spec = importlib.util.spec_from_file_location("iwseg_bench_training", tree / "scripts" / "bench_training.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    settings = dict(bench.load_demo().TRAIN_SETTINGS)
    r = bench.measure_cpu(data, settings, num_workers=settings["num_workers"], iters=iters, epochs=epochs, warmup=1)
    result.write_text(json.dumps(r), encoding="utf-8")
    return 0


def measure_speed(tree: Path, data: Path, python: str, work: Path, env: dict, iters: int, epochs: int) -> dict:
    """Iterations/s and data-wait fraction of ``tree`` (a fresh interpreter, ``PYTHONPATH=tree``)."""
    result = work / "speed.json"
    proc = subprocess.run([python, str(Path(__file__).resolve()), "--speed-child", str(tree), str(data),
                           str(result), str(iters), str(epochs)],
                          env={**env, "PYTHONPATH": str(tree)}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_startup: the speed run from {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text(encoding="utf-8"))


def measure(tree: Path, data: Path, python: str, work: Path, env: dict) -> dict:
    """One start-up of ``iwseg train`` from ``tree`` on ``data``: the phases in seconds."""
    import yaml

    settings = {**load_demo(tree).TRAIN_SETTINGS, "data": str(data), "out": str(work / "run")}
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    result = work / "marks.json"
    t0 = time.time()
    proc = subprocess.run([python, str(Path(__file__).resolve()), "--child", str(config), str(result)],
                          env={**env, "PYTHONPATH": str(tree)}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_startup: the run from {tree} failed:\n{proc.stderr[-3000:]}")
    m = json.loads(result.read_text(encoding="utf-8"))
    if not Path(m["module"]).is_relative_to(tree):
        raise SystemExit(f"bench_startup: the run imported {m['module']}, not the tree {tree}")
    return {"total": m["first_step"] - t0, "trainer": m["first_step"] - m["train_entry"],
            **{k: m.get(k, 0.0) for k in PHASES[2:]}}


def markdown(trees: list[tuple[str, Path]], runs: dict[str, list[dict]], command: str) -> str:
    """Medians per tree and phase, and each tree's ratio to the first tree."""
    first = trees[0][0]
    med = {name: {k: statistics.median(r[k] for r in runs[name]) for k in PHASES} for name, _ in trees}
    lines = [f"Command: `{command}`", "",
             "| tree | " + " | ".join(f"{k} (s)" for k in PHASES) + " | total / " + first + " |",
             "|---|" + "---:|" * (len(PHASES) + 1)]
    for name, tree in trees:
        cells = " | ".join(f"{med[name][k]:.2f}" for k in PHASES)
        lines.append(f"| {name} (`{tree}`) | {cells} | {med[name]['total'] / med[first]['total']:.3f} |")
    lines += ["", "Every run (total s): " + "; ".join(
        f"{name}: " + ", ".join(f"{r['total']:.2f}" for r in runs[name]) for name, _ in trees)]
    return "\n".join(lines)


def speed_markdown(trees: list[tuple[str, Path]], speeds: dict[str, list[dict]]) -> str:
    """Median iterations/s and data wait per tree (each run's value is itself the median of
    its timed epochs), and the it/s ratio to the first tree."""
    first = trees[0][0]
    med = {name: {k: statistics.median(r[k] for r in speeds[name]) for k in ("iters_per_s", "data_wait")}
           for name, _ in trees}
    lines = ["", "| tree | iterations/s | data wait | it/s / " + first + " |", "|---|---:|---:|---:|"]
    for name, _ in trees:
        lines.append(f"| {name} | {med[name]['iters_per_s']:.3f} | {100 * med[name]['data_wait']:.2f}% | "
                     f"{med[name]['iters_per_s'] / med[first]['iters_per_s']:.3f} |")
    lines += ["", "Every run (it/s): " + "; ".join(
        f"{name}: " + ", ".join(f"{r['iters_per_s']:.3f}" for r in speeds[name]) for name, _ in trees)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(Path(argv[1]), Path(argv[2]))
    if argv[:1] == ["--speed-child"]:
        return speed_child(Path(argv[1]), Path(argv[2]), Path(argv[3]), int(argv[4]), int(argv[5]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=PATH",
                        help="a source tree to start from (repeatable; the first is the reference of the ratios)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up round (>= 1)")
    parser.add_argument("--speed", type=int, nargs=2, metavar=("ITERS", "EPOCHS"),
                        help="also measure each tree's scripts/bench_training.py training speed (its "
                        "measure_cpu, one worker) with ITERS iterations x EPOCHS timed epochs after a warm-up epoch")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the child runs")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    trees = [(spec.split("=", 1)[0], Path(spec.split("=", 1)[1]).resolve()) for spec in args.tree]

    from IWSegmentationLib.data.synth import write_dataset

    demo = load_demo(trees[0][1])
    env = dict(os.environ)
    runs: dict[str, list[dict]] = {name: [] for name, _ in trees}
    speeds: dict[str, list[dict]] = {name: [] for name, _ in trees}
    with tempfile.TemporaryDirectory() as tmp:
        data, speed_data = Path(tmp) / "data", Path(tmp) / "speed_data"
        write_dataset(data, demo.N_TRAIN, demo.SYNTH_SEED, demo.SYNTH_PRESET, shape=demo.SYNTH_SHAPE)
        if args.speed:  # the data of scripts/bench_training.py: 12 cases
            write_dataset(speed_data, 12, 0, demo.SYNTH_PRESET, shape=demo.SYNTH_SHAPE)
        for round_ in range(args.repeats + 1):
            label = "warm-up" if round_ == 0 else f"round {round_}"
            for name, tree in trees:
                with tempfile.TemporaryDirectory(dir=tmp) as work:
                    r = measure(tree, data, args.python, Path(work), env)
                    s = measure_speed(tree, speed_data, args.python, Path(work), env, *args.speed) \
                        if args.speed else None
                print(f"{label} {name}: " + ", ".join(f"{k} {r[k]:.2f} s" for k in PHASES)
                      + (f"; {s['iters_per_s']:.3f} it/s, data wait {100 * s['data_wait']:.2f}%" if s else ""),
                      file=sys.stderr, flush=True)
                if round_:
                    runs[name].append(r)
                    if s:
                        speeds[name].append(s)
    command = "python scripts/bench_startup.py " + " ".join(f"--tree {n}={p}" for n, p in trees) + \
        f" --repeats {args.repeats}" + (f" --speed {args.speed[0]} {args.speed[1]}" if args.speed else "")
    print(markdown(trees, runs, command))
    if args.speed:
        print(speed_markdown(trees, speeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
