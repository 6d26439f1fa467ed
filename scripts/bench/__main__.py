"""Run the benchmark suite: ``python -m scripts.bench [--quick] [--report FILE] [NAME ...]``.

Every benchmark (default: all of :data:`BENCHMARKS`, in that order) runs in a fresh process
(``python -m scripts.bench.NAME``) with the allocator settings of :func:`timing.quiet_env`, so
that one benchmark's memory cannot slow the next. A full run writes each benchmark's tables into
its block of docs/benchmarks.md; ``--quick`` runs every benchmark in its smallest mode (to check
that the suite works; the numbers mean nothing) and writes a report only where ``--report FILE``
says. A benchmark that fails is reported and the others still run; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from scripts.bench import report, timing

REPO = Path(__file__).resolve().parents[2]
#: What ``precision`` needs: the checkpoint and held-out data ``make demo`` leaves.
DEMO_OUTPUT = REPO / "demo_output"

#: The suite: name -> what it measures (the module is ``scripts.bench.<name>``).
BENCHMARKS = {
    "weights": "inverse weights: speed, and against a per-component loop",
    "evaluate": "lesion-wise evaluation of one 512x512x300 case",
    "inference": "sliding-window inference against MONAI; the paper net per window; a CT end to end",
    "training": "training iterations/s and data wait; the GPU cost of the paper's run (estimate)",
    "precision": "fp32 against bf16 autocast on the demo's trained checkpoint (needs make demo)",
    "server": "iwseg serve's overhead over a local iwseg predict",
    "dicom_seg": "writing a DICOM SEG for a CT-sized lesion mask",
    "dicom_sr": "writing the DICOM SEG and the DICOM SR (TID 1500) of 100 lesions (target: under 5 s together)",
    "lung_mask": "the automatic CT lung mask on a 512x512x300 CT and on lung1",
    "multichannel": "what a second input channel costs at inference, and what it buys",
    "startup": "iwseg train's start-up to the first step (--old REF: against an older commit)",
    "entry_points": "start-up of the Slicer side's import, iwseg --help and a phantom iwseg predict (--old REF)",
    "segments": "building the Slicer scene of 5,000 and 20,000 lesions: all as segments vs the display budget",
    "resampling": "resampling to the model's voxel spacing and back: lung1 and a 512x512x300 CT",
    "doubt": "iwseg predict --tta with and without the per-lesion doubt: time and peak memory",
}


def benchmark_args(name: str) -> list[str] | None:
    """The options a benchmark runs with in the suite (beyond ``--quick``/``--report``); None
    means it cannot run here (what it needs is missing: said on stderr)."""
    if name == "precision":
        held = DEMO_OUTPUT / "data" / "heldout"
        model = DEMO_OUTPUT / "model.safetensors"
        if not model.is_file():
            print(f"   skipped: run 'make demo' first (it needs {model.relative_to(REPO)})", file=sys.stderr)
            return None
        return ["--model", str(model), "--input", str(held / "imagesTr"), "--organ-mask", str(held / "masksTr"),
                "--labels", str(held / "labelsTr")]
    return []


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__.split("\n\n")[0],
                                     epilog="benchmarks: " + "; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()))
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="each benchmark's smallest mode: checks the suite works")
    parser.add_argument("--report", type=Path, metavar="FILE",
                        help="the report to write into (default: docs/benchmarks.md for a full run, none for --quick)")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    target = args.report if args.report is not None else (None if args.quick else report.DEFAULT_REPORT)
    if target is not None and Path(target).exists():
        try:
            report.check_blocks(Path(target).read_text(encoding="utf-8"))
        except ValueError as exc:
            parser.error(f"--report {target}: {exc}")
    failed = []
    for name in args.names or list(BENCHMARKS):
        print(f"== {name}: {BENCHMARKS[name]}", file=sys.stderr, flush=True)
        extra = benchmark_args(name)
        if extra is None:
            continue
        cmd = [sys.executable, "-m", f"scripts.bench.{name}", *extra, *(["--quick"] if args.quick else []),
               *(["--report", str(Path(target).resolve())] if target is not None else [])]
        start = time.perf_counter()
        code = subprocess.run(cmd, cwd=REPO, env=timing.quiet_env()).returncode
        print(f"   {name}: {'done' if code == 0 else f'FAILED (exit code {code})'} in "
              f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    if target is not None:
        print(f"report: {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
