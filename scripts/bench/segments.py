"""Time of building the Slicer scene of a result with many lesions: every lesion a segment (the
code before the display budget) against the budget (the most confident 200 as segments).

A 64 x 256 x 256 volume holds N lesions of 2 x 2 x 2 voxels that never touch, with distinct
maximum logits (a random permutation, seed 0); :func:`IWSegmentationLib.slicer.mrml.load_prediction`
builds the segments (with their closed surfaces, as the module does) and the lesion table in a
fresh headless scene (``slicer-core``), ``--repeats`` times; the median is reported. No torch.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \\
        python -m scripts.bench.segments [--counts 5000 20000] [--repeats 3] [--quick] [--report FILE]

``--quick`` (200 lesions, budget 50, one build) only checks that the script works.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys

import numpy as np

from IWSegmentationLib.core import imageio
from IWSegmentationLib.slicer import mrml, panel
from scripts.bench import report, timing

SHAPE = (64, 256, 256)


def many_lesions(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` 2x2x2 lesions on a 3-voxel lattice (a gap of one voxel: never touching) with
    distinct maximum logits 1.00, 1.01, ... in random order."""
    corners = np.stack(np.meshgrid(*(np.arange(0, s - 1, 3) for s in SHAPE), indexing="ij"), -1).reshape(-1, 3)
    if count > len(corners):
        raise SystemExit(f"at most {len(corners)} lesions fit in {SHAPE}")
    corners = corners[:count]
    confidence = (1.0 + 0.01 * np.random.default_rng(seed).permutation(count)).astype(np.float32)
    mask = np.zeros(SHAPE, np.uint8)
    logits = np.full(SHAPE, -8.0, np.float32)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                index = tuple((corners + (dz, dy, dx)).T)
                mask[index] = 1
                logits[index] = confidence
    return mask, logits


def build_seconds(mask: np.ndarray, logits: np.ndarray, budget: int | None) -> float:
    """Seconds of one :func:`load_prediction` in a fresh scene (segments, surfaces, table)."""
    import time

    scene, app_logic = mrml.headless_scene()
    volume = mrml.add_volume_from_array(scene, mask.astype(np.int16), imageio.Geometry.identity(SHAPE, (1, 1, 1)),
                                        "bench")
    t0 = time.perf_counter()
    results = mrml.load_prediction(scene, volume, mask, logits, budget=budget)
    seconds = time.perf_counter() - t0
    assert results.segmentation.GetSegmentation().GetNumberOfSegments() == min(budget or 10**9, int(
        results.segmentation.GetAttribute(mrml.ATTR_LESION_COUNT)))
    scene.Clear(1)
    del app_logic
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[5000, 20000], help="lesions per result")
    parser.add_argument("--repeats", type=int, default=3, help="builds timed per cell (median; default 3)")
    parser.add_argument("--quick", action="store_true", help="200 lesions, budget 50, one build")
    report.add_report_argument(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    counts, repeats, budget = ([200], 1, 50) if args.quick else (args.counts, args.repeats, panel.DEFAULT_SEGMENT_BUDGET)
    lines = [timing.machine_line(("numpy",)) + f" slicer-core {importlib.metadata.version('slicer-core')}.", "",
             f"| lesions | every lesion a segment (before; median of {repeats}) | budget {budget} "
             f"(after; median of {repeats}) |", "|---|---|---|"]
    for count in counts:
        mask, logits = many_lesions(count)
        before = float(np.median([build_seconds(mask, logits, None) for _ in range(repeats)]))
        after = float(np.median([build_seconds(mask, logits, budget) for _ in range(repeats)]))
        lines.append(f"| {count:,} | {before:.1f} s | {after:.2f} s |")
        print(lines[-1], file=sys.stderr, flush=True)
    report.publish("segments", "\n".join(lines), args.report, argv, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
