"""Is bf16 on the CPU safe for a trained model? fp32 against bf16 autocast, case by case.

    python -m scripts.bench.precision --model demo_output/model.safetensors \\
        --input demo_output/data/heldout/imagesTr --organ-mask demo_output/data/heldout/masksTr \\
        --labels demo_output/data/heldout/labelsTr --report docs/benchmarks.md

(``python -m scripts.bench precision`` runs exactly this after ``make demo``, and skips the
benchmark without the demo's checkpoint.)

``--precision bf16`` is opt-in in ``iwseg predict`` (about 2x faster on CPUs with AVX-512 bf16
or AMX). This script measures what it costs in accuracy on a *trained* checkpoint — an
untrained network is no guide, its outputs hover around 0.5 where every rounding flips a
voxel. For every case it runs :func:`inference.predict_volume` twice (fp32 with the default
engine, then bf16 autocast with the eager engine) and reports the wall time of each, the largest
probability difference, the share of voxels whose mask value flips, the Dice between the two
masks and the lesion counts. With ``--labels`` it also scores both against the reference
lesion by lesion (:mod:`IWSegmentationLib.evaluation`): avg recall and object Dice, fp32 vs bf16.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from scripts.bench import report, timing


def _dice(a, b) -> float:
    """:func:`metrics.voxel_dice`, with two empty masks counted as identical (1, not NaN)."""
    import math

    from IWSegmentationLib.evaluation import voxel_dice

    dice = voxel_dice(a, b)
    return 1.0 if math.isnan(dice) else dice


def _run(model, card, image, geometry, organ, precision: str):
    from IWSegmentationLib.inference import predict_volume

    start = time.perf_counter()
    result = predict_volume(model, image, card, geometry=geometry, organ_mask=organ, device="cpu",
                            precision=precision, on_warning=lambda message: None)
    return result, time.perf_counter() - start


def measure(args) -> tuple[list[dict], dict | None]:
    import numpy as np
    import torch

    from IWSegmentationLib.core.files import list_images
    from IWSegmentationLib.core.imageio import read_image
    from IWSegmentationLib.core.lesions import label_components, size_thresholds
    from IWSegmentationLib.evaluation import evaluate_cases, match_case
    from IWSegmentationLib.nn.checkpoint import load_checkpoint

    torch.set_num_threads(args.threads)
    model, card = load_checkpoint(args.model)
    images = list_images(args.input, what="--input")
    if args.quick:
        images = dict(list(images.items())[:2])
    groups = size_thresholds((card.get("size_thresholds") or {}).get("preset") or "lung")
    rows, scored = [], {"fp32": [], "bf16": []}
    warm = next(iter(images.values()))
    image, geometry = read_image(warm)
    for precision in ("fp32", "bf16"):  # warm-up: oneDNN builds its kernels for both precisions
        _run(model, card, image, geometry, None, precision)
    for name, path in images.items():
        image, geometry = read_image(path)
        organ = read_image(args.organ_mask / path.name, what="organ mask")[0] if args.organ_mask else None
        fp32, t32 = _run(model, card, image, geometry, organ, "fp32")
        bf16, t16 = _run(model, card, image, geometry, organ, "bf16")
        a, b = fp32.mask.astype(bool), bf16.mask.astype(bool)
        spacing = geometry.spacing_zyx
        rows.append({
            "case": name, "fp32_s": t32, "bf16_s": t16,
            "max_diff": float(np.abs(fp32.probabilities - bf16.probabilities).max()),
            "flipped": float((a != b).mean()), "mask_dice": _dice(a, b),
            "lesions_fp32": label_components(fp32.mask, 26)[1],
            "lesions_bf16": label_components(bf16.mask, 26)[1],
        })
        print(f"  {name}: fp32 {t32:.1f} s, bf16 {t16:.1f} s, flipped {rows[-1]['flipped']:.2e}, "
              f"mask Dice {rows[-1]['mask_dice']:.4f}", file=sys.stderr, flush=True)
        if args.labels:
            ref = read_image(args.labels / path.name, what="label")[0] > 0
            for key, result in (("fp32", fp32), ("bf16", bf16)):
                scored[key].append(match_case(result.probabilities, ref, spacing, threshold=result.threshold,
                                              thresholds=groups, case=name))
    reports = {key: evaluate_cases(cases) for key, cases in scored.items()} if args.labels else None
    return rows, reports


def markdown(rows: list[dict], reports: dict | None, args) -> str:
    lines = ["One warm-up case per precision. " + timing.machine_line(("torch",), threads=args.threads), "",
             "| case | fp32 s | bf16 s | speed-up | max abs Δp | voxels flipped | Dice fp32 vs bf16 mask | "
             "lesions fp32 / bf16 |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['fp32_s']:.2f} | {r['bf16_s']:.2f} | {r['fp32_s'] / r['bf16_s']:.2f}x | "
                     f"{r['max_diff']:.3f} | {r['flipped']:.1e} | {r['mask_dice']:.4f} | "
                     f"{r['lesions_fp32']} / {r['lesions_bf16']} |")
    speed = statistics.median(r["fp32_s"] / r["bf16_s"] for r in rows)
    lines += ["", f"Median speed-up {speed:.2f}x; worst mask Dice {min(r['mask_dice'] for r in rows):.4f}; "
              f"most voxels flipped {max(r['flipped'] for r in rows):.1e}.", ""]
    if reports:
        lines += ["| precision | avg recall (0-5 FP/img) | CPM | object Dice |", "|---|---|---|---|"]
        for key, rep in reports.items():
            od = (rep.get("object_dice") or {}).get("mean")
            lines.append(f"| {key} | {rep['avg_recall_0_5']:.3f} | {rep['cpm']:.3f} | "
                         f"{'—' if od is None else f'{od:.3f}'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="trained checkpoint (.safetensors)")
    parser.add_argument("--input", type=Path, required=True, help="folder of images")
    parser.add_argument("--organ-mask", type=Path, help="folder of organ masks named like the images")
    parser.add_argument("--labels", type=Path, help="folder of reference lesion masks named like the images")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="only the first 2 images: checks the script works")
    report.add_report_argument(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    rows, reports = measure(args)
    report.publish("precision", markdown(rows, reports, args), args.report, argv, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
