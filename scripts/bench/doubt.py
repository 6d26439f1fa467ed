"""Per-lesion doubt: what it adds to ``iwseg predict --tta`` (issue 24: "TTA doubt costs what TTA costs").

    nice -n 5 python -m scripts.bench doubt                  # into docs/benchmarks.md
    nice -n 5 python -m scripts.bench.doubt [--repeats 3] [--threads 2] [--quick]

One ``iwseg synth``-style MR case (:func:`IWSegmentationLib.data.synth.synth_case`), a U-Net with
seeded random weights saved as a real checkpoint (``mr`` preset, 64^3 windows), and the real
command ``iwseg predict --tta --lesions`` run as a child process, with and without ``--no-doubt``,
alternated (:func:`scripts.bench.timing.interleaved`, a warm-up round dropped), under the suite's
allocator settings (:data:`scripts.bench.timing.MALLOC_ENV`). Reported: the median wall time of
each and the peak resident memory of each child (``wait4``'s ``ru_maxrss``). With doubt the 8 flips
are blended as 8 channels of one pass (:class:`IWSegmentationLib.inference.predictors.MemberPredictor`)
and kept as float16 maps (:func:`IWSegmentationLib.inference.predict.member_logit_maps`), so the
forward passes are the same; what differs is the blend of 8 channels and the memory.
The full run: a ``tiny`` U-Net on 48 x 128 x 128; ``--quick``: 32 x 64 x 64, one round.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.bench import report, timing


def _child(cmd: list[str]) -> dict[str, float]:
    """Run ``cmd``; its wall seconds and peak resident memory (MiB), from ``wait4``."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=timing.quiet_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return {"seconds": seconds, "peak_mib": usage.ru_maxrss / 1024.0}


def measure(repeats: int, threads: int, shape: tuple[int, int, int], net: str) -> str:
    import numpy as np
    import torch

    from IWSegmentationLib.core.imageio import Geometry, write_image
    from IWSegmentationLib.data.synth import synth_case
    from IWSegmentationLib.nn.architecture import default_config
    from IWSegmentationLib.nn.checkpoint import save_checkpoint
    from IWSegmentationLib.nn.unet import build_model
    from IWSegmentationLib.preprocessing.presets import get_preset

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        case = synth_case((0, 0), shape, "mr")
        image = tmp / "case.nrrd"
        write_image(image, case.image.astype(np.float32), Geometry.identity(case.image.shape, case.spacing))
        torch.manual_seed(0)
        model = build_model(default_config(net))
        checkpoint = tmp / "model.safetensors"
        save_checkpoint(checkpoint, model.eval(), {"patch_size": [64, 64, 64], "preprocessing": get_preset("mr"),
                                                   "threshold": 0.5, "architecture": model.config})
        base = [sys.executable, "-m", "IWSegmentationLib", "predict", "--model", str(checkpoint), "--input",
                str(image), "--output", str(tmp / "mask.nrrd"), "--lesions", str(tmp / "lesions.json"),
                "--device", "cpu", "--threads", str(threads), "--tta", "--overwrite", "--progress-format", "jsonl"]
        jobs = {"--tta (with doubt)": lambda: _child(base), "--tta --no-doubt": lambda: _child([*base, "--no-doubt"])}
        times = timing.interleaved(jobs, repeats, warmup=1,
                                   on_result=lambda label, name, r: print(f"  {label} {name}: {r['seconds']:.2f} s, "
                                                                          f"{r['peak_mib']:.0f} MiB", file=sys.stderr))
    command = f"{timing.malloc_prefix()}python -m IWSegmentationLib predict --model M --input I --output O " \
              f"--lesions L --device cpu --threads {threads} --tta [--no-doubt]"
    lines = [f"Timed: `{command}`. MR case {shape} (z, y, x), random-weight `{net}` U-Net, 64^3 windows, "
             f"overlap 0.25; runs alternated, median of {repeats} each after a warm-up round. "
             + timing.machine_line(("torch",), threads=threads), "",
             "| run | wall s (median) | peak memory MiB (median) |", "|---|---:|---:|"]
    for name, rows in times.items():
        med = timing.medians(rows)
        lines.append(f"| `{name}` | {med['seconds']:.2f} | {med['peak_mib']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    report.add_report_argument(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.quick:
        text = measure(1, 1, (32, 64, 64), "tiny")
    else:
        text = measure(args.repeats, args.threads, (48, 128, 128), "tiny")
    report.publish("doubt", text, args.report, argv, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
