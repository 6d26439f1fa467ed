"""Training speed: CPU iterations/s of the demo configuration, the share of the step spent
waiting for data, and what the paper's full run (100 x 100 iterations, 128³ patches, batch 2)
costs on a GPU.

    python -m scripts.bench.training --quick                 # a smoke run (a minute)
    python -m scripts.bench training                         # into docs/benchmarks.md

What is measured (CPU):

* ``train()`` on synthetic data with the demo's network, patch and batch (scripts/demo.py),
  through :func:`scripts.bench.train_runs.measure_cpu`,
  once with background DataLoader workers (the default) and once with ``num_workers=0``
  (patches sampled in the training process), to show what background loading buys;
* each run trains ``warmup`` epochs first (oneDNN builds its kernels on the first steps, the
  workers start) and reports the median over the ``epochs`` timed epochs after them of
  iterations/s and of the data-wait fraction (time blocked on the next batch / step time;
  goal < 5%).

The GPU cost is an *estimate from FLOP counts*, not a measurement (no GPU was available when
this was written): convolution FLOPs per voxel from :func:`IWSegmentationLib.nn.unet.flops_per_voxel`
(the paper's U-Net: 0.399 MFLOP per voxel forward), a training step taken as 3x the forward
(backward = 2x forward), and a range of achieved fractions of each GPU's dense peak. Activation
memory is counted from a forward pass with hooks (every module output kept for backward).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from scripts import demo
from scripts.bench import report, timing
from scripts.bench.train_runs import measure_cpu

#: Dense peak TFLOP/s (vendor data sheets) of GPUs people train on: (name, mixed-precision peak,
#: fp32 peak). Mixed precision means bf16/fp16 tensor cores without sparsity.
GPUS = (
    ("NVIDIA Tesla M40 (the paper's)", None, 7.0),
    ("NVIDIA V100", 125.0, 15.7),
    ("NVIDIA A100", 312.0, 19.5),
    ("NVIDIA H100 SXM", 989.0, 67.0),
)
#: Fractions of the dense peak assumed for a 3D U-Net step (a pessimistic and an optimistic end).
#: Anchor: the paper's own figure, 26 h for this run on a Tesla M40 (with validation and data
#: loading), is 7.6% of that GPU's fp32 peak; 3D convolutions with 16-64 channels keep tensor
#: cores far from their peak.
UTILISATION = (0.05, 0.15)
PAPER_HOURS_M40 = 26.0


def activation_bytes_per_voxel(config: dict) -> float:
    """Bytes of module outputs kept for backward per input voxel (fp32), from a 32³ forward."""
    import torch

    from IWSegmentationLib.nn.unet import build_model

    model = build_model(config)
    total = [0]

    def hook(module, _inputs, output):
        if isinstance(output, torch.Tensor) and not getattr(module, "inplace", False):
            total[0] += output.numel() * 4

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    with torch.no_grad():
        model(torch.zeros(1, 1, 32, 32, 32))
    for h in handles:
        h.remove()
    return total[0] / 32**3


def gpu_estimate(epochs: int = 100, iters: int = 100, patch: int = 128, batch: int = 2) -> dict:
    from IWSegmentationLib.nn.unet import build_model, count_parameters, default_config, flops_per_voxel

    config = default_config("paper")
    voxels = batch * patch**3
    step_flops = 3.0 * flops_per_voxel(config) * voxels
    total = step_flops * epochs * iters
    rows = []
    for name, mixed, fp32 in GPUS:
        peak = (mixed or fp32) * 1e12
        slow, fast = (total / (peak * u) for u in UTILISATION)
        rows.append({"gpu": name, "precision": "bf16/fp16" if mixed else "fp32", "peak_tflops": peak / 1e12,
                     "hours_pessimistic": slow / 3600, "hours_optimistic": fast / 3600,
                     "step_ms": (step_flops / (peak * UTILISATION[0]) * 1e3, step_flops / (peak * UTILISATION[1]) * 1e3)})
    act = activation_bytes_per_voxel(config)
    return {
        "params": count_parameters(build_model(config)),
        "flops_per_voxel": flops_per_voxel(config),
        "step_tflop": step_flops / 1e12,
        "total_pflop": total / 1e15,
        "steps": epochs * iters,
        "activation_gib_fp32": act * voxels / 2**30,
        "rows": rows,
    }


def markdown(cpu: list[tuple[str, dict]], demo_settings: dict, gpu: dict) -> str:
    lines = [timing.machine_line(("torch",)), ""]
    if cpu:
        s = demo_settings
        lines += [
            f"CPU, demo configuration: `{s['model_size']}` U-Net, patch {s['patch_size']}, batch {s['batch_size']}, "
            f"loss {s['loss']}; torch threads {__import__('torch').get_num_threads()}.",
            "",
            "| data loading | iterations/s | data wait (share of step time) | timed |",
            "|---|---:|---:|---|",
        ]
        for label, r in cpu:
            lines.append(f"| {label} | {r['iters_per_s']:.2f} | {100 * r['data_wait']:.1f}% | "
                         f"median of {r['epochs']} epochs x {r['iters']} it |")
        lines.append("")
    lines += [
        "### GPU cost of the paper's run (estimate from FLOP counts)",
        "",
        f"The paper's U-Net ({gpu['params'] / 1e6:.2f} M parameters, {gpu['flops_per_voxel'] / 1e6:.3f} MFLOP of "
        f"convolution per voxel forward), 128³ patches, batch 2: one training step is about "
        f"{gpu['step_tflop']:.1f} TFLOP (3x the forward), the {gpu['steps']:,}-step run {gpu['total_pflop']:.0f} PFLOP. "
        f"Activations kept for backward: about {gpu['activation_gib_fp32']:.1f} GiB in fp32 "
        f"(half in bf16/fp16) plus the model and optimizer (< 0.2 GiB).",
        "",
        f"| GPU | precision | dense peak TFLOP/s | step at {int(UTILISATION[0] * 100)}-{int(UTILISATION[1] * 100)}% of peak | "
        "100 x 100 iterations |",
        "|---|---|---:|---:|---:|",
    ]
    for r in gpu["rows"]:
        lines.append(f"| {r['gpu']} | {r['precision']} | {r['peak_tflops']:g} | "
                     f"{r['step_ms'][1]:.0f}-{r['step_ms'][0]:.0f} ms | "
                     f"{_hours(r['hours_optimistic'])}-{_hours(r['hours_pessimistic'])} |")
    lines += [
        "",
        "These are estimates, not measurements (no GPU was available): 3D convolutions with 16-64 channels run "
        f"far from their tensor-core peak, so {int(UTILISATION[0] * 100)}-{int(UTILISATION[1] * 100)}% of the "
        f"dense peak is assumed. Anchor: the paper reports {PAPER_HOURS_M40:g} hours for this run on a Tesla "
        f"M40 (with validation and data loading), which is "
        f"{100 * gpu['total_pflop'] * 1e15 / (PAPER_HOURS_M40 * 3600 * 7.0e12):.1f}% of that GPU's fp32 peak. "
        "Measure it on your GPU with `iwseg train` (the CSV log has iterations/s per epoch). Validation "
        "(sliding-window prediction of whole cases every `val_every` epochs) comes on top.",
        "",
    ]
    return "\n".join(lines)


def _hours(h: float) -> str:
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few iterations (a smoke run, about a minute)")
    parser.add_argument("--no-cpu", action="store_true", help="only the GPU estimate")
    report.add_report_argument(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    settings = dict(demo.TRAIN_SETTINGS)
    cpu: list[tuple[str, dict]] = []
    if not args.no_cpu:
        from IWSegmentationLib.data.synth import write_dataset

        iters, epochs, warmup = (4, 1, 1) if args.quick else (20, 3, 1)
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data"
            write_dataset(data, 6 if args.quick else 12, 0, demo.SYNTH_PRESET, shape=demo.SYNTH_SHAPE)
            n = settings["num_workers"]
            for label, workers in ((f"{n} background worker{'s' if n != 1 else ''} (the demo's setting)", n),
                                   ("in the training process (num_workers=0)", 0)):
                t = time.perf_counter()
                r = measure_cpu(data, settings, num_workers=workers, iters=iters, epochs=epochs, warmup=warmup)
                print(f"{label}: {r['iters_per_s']:.2f} it/s, data wait {100 * r['data_wait']:.1f}% "
                      f"({time.perf_counter() - t:.0f} s)", file=sys.stderr)
                cpu.append((label, r))
    gpu = gpu_estimate()
    report.publish("training", markdown(cpu, settings, gpu), args.report, argv, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
