"""What resampling to the model's voxel spacing costs ``iwseg predict`` (issue 22, "Speed").

    python -m scripts.bench.resampling [--quick] [--repeats 3] [--threads 2] [--lung1 FILE] [--report FILE]

``iwseg predict`` resamples the input to the model card's ``spacing`` (linear), the foreground
mask with it (nearest) and the blended logits back onto the input grid (linear), with the
functions of ``preprocessing.resampling``. This times those three steps, medians of
``--repeats`` runs after one warm-up, on the real chest CT lung1 (pyradiomics sample,
512 x 512 x 48 voxels of 0.57 x 0.57 x 5 mm; ``--lung1``, default the test data cache
``Testing/.data/pyradiomics``) and on a synthetic 512 x 512 x 300 CT of 0.7 x 0.7 x 2 mm, each to
0.8 x 0.8 x 1.25 mm (x, y, z). SimpleITK runs on ``--threads`` threads. ``--quick``: a
128 x 128 x 40 synthetic CT and one repeat, to check that the script works.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from IWSegmentationLib.core.imageio import Geometry, read_image
from IWSegmentationLib.preprocessing.resampling import resample_to_geometry, resampled_geometry
from scripts.bench import report, timing

REPO = Path(__file__).resolve().parents[2]
#: The model spacing every case is resampled to, (z, y, x) mm.
MODEL_SPACING = (1.25, 0.8, 0.8)


def synthetic_ct(shape_zyx, spacing_zyx) -> tuple[np.ndarray, Geometry]:
    """Air, an elliptic body of soft tissue with noise (int16 HU), on an axis-aligned grid."""
    d, h, w = shape_zyx
    rng = np.random.default_rng(0)
    y, x = np.ogrid[:h, :w]
    image = np.full(shape_zyx, -1000, np.int16)
    body = ((y - h / 2) / (0.45 * h)) ** 2 + ((x - w / 2) / (0.4 * w)) ** 2 <= 1
    image[:, body] = 40
    image += rng.normal(0, 20, shape_zyx).astype(np.int16)
    return image, Geometry.identity(shape_zyx, spacing_zyx)


def time_case(image: np.ndarray, geometry: Geometry, repeats: int) -> dict:
    """Median seconds of the three resampling steps of one prediction, and the grids."""
    target = resampled_geometry(geometry, MODEL_SPACING)
    foreground = (image > -500).view(np.uint8)
    t_image, resampled = timing.median_time(lambda: resample_to_geometry(image, geometry, target), repeats)
    t_mask, _ = timing.median_time(
        lambda: resample_to_geometry(foreground, geometry, target, is_mask=True), repeats)
    logits = resampled * np.float32(0.01)  # a float32 volume on the model's grid
    t_back, _ = timing.median_time(lambda: resample_to_geometry(logits, target, geometry), repeats)
    return {"input": geometry, "target": target, "image": t_image, "mask": t_mask, "back": t_back}


def grid(geometry: Geometry) -> str:
    return (f"{'×'.join(str(v) for v in geometry.size)} of "
            f"{'×'.join(f'{s:.3g}' for s in geometry.spacing)} mm")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small synthetic CT, one repeat: a smoke test")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per step (default 3; quick 1)")
    parser.add_argument("--threads", type=int, default=2, help="SimpleITK threads (default 2)")
    parser.add_argument("--lung1", type=Path, default=REPO / "Testing" / ".data" / "pyradiomics" / "lung1_image.nrrd",
                        help="the pyradiomics lung1 CT (skipped when missing)")
    report.add_report_argument(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    repeats = args.repeats or (1 if args.quick else 3)

    cases = []
    if not args.quick and args.lung1.is_file():
        cases.append(("lung1 (real chest CT)", *read_image(args.lung1)))
    shape, spacing = ((40, 128, 128), (2.0, 0.7, 0.7)) if args.quick else ((300, 512, 512), (2.0, 0.7, 0.7))
    cases.append((f"synthetic CT {shape[2]}×{shape[1]}×{shape[0]}", *synthetic_ct(shape, spacing)))

    lines = [
        f"Resampling to the model's spacing {'×'.join(f'{s:g}' for s in MODEL_SPACING[::-1])} mm (x × y × z) "
        f"and back, medians of {repeats} runs after one warm-up. "
        f"{timing.machine_line(('numpy', 'SimpleITK'), threads=args.threads)}",
        "",
        "| case | input grid | model's grid | image, linear (s) | foreground, nearest (s) | logits back, linear (s) "
        "| total (s) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for name, image, geometry in cases:
        r = time_case(image, geometry, repeats)
        total = r["image"] + r["mask"] + r["back"]
        lines.append(f"| {name} | {grid(r['input'])} | {grid(r['target'])} | {r['image']:.2f} | {r['mask']:.2f} "
                     f"| {r['back']:.2f} | {total:.2f} |")
    if not args.quick and not args.lung1.is_file():
        lines.append(f"\nlung1 skipped: {args.lung1} not found (run the tests that use clinical_data once, or "
                     "give --lung1).")
    report.publish("resampling", "\n".join(lines), args.report, argv, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
