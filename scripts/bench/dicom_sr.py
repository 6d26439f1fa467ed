"""Time of writing the DICOM SEG and the DICOM SR (TID 1500) of 100 lesions on a CT-sized series.

A 512 x 512 x 120 CT series (0.7 x 0.7 x 2.5 mm) is written with pydicom
(:func:`IWSegmentationLib.testing.dicom_series.write_ct_series`), 100 balls of 1.4 to 11 mm radius
are drawn on a 5 x 5 x 4 grid of centres far enough apart that none touch (so there are exactly
100 lesions), and what ``iwseg predict --dicom-seg --dicom-sr`` writes per case is timed
``--repeats`` times after one untimed warm-up call (the imports; median): the SEG (:func:`dicom_seg.lesion_seg`, saved), then the SR over that
SEG (:func:`dicom_sr.lesion_sr`, saved). The target (issue 24): both under 5 s. No torch. Both are
single-threaded Python, so the process's CPU time (``time.process_time``, also reported) is what the
wall time would be on an otherwise idle core: on a shared machine the wall time includes waiting.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \\
        python -m scripts.bench.dicom_sr [--repeats 3] [--quick] [--report FILE]

``--quick`` (a 128 x 128 x 20 series, 8 lesions, one write) only checks that the script works.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from IWSegmentationLib.core import dicom_seg, dicom_sr, imageio, lesions
from IWSegmentationLib.core.provenance import Provenance
from IWSegmentationLib.testing.dicom_series import write_ct_series
from scripts.bench import report, timing

SHAPE = (120, 512, 512)
QUICK_SHAPE = (20, 128, 128)
SPACING_XYZ = (0.7, 0.7, 2.5)
#: Seconds the SEG and the SR of 100 lesions may take together (issue 24).
TARGET_S = 5.0


def ball_mask(shape: tuple[int, int, int], grid: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """One ball (1.4-11 mm radius) per point of a ``grid`` (z, y, x counts) spread over ``shape``."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, np.uint8)
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    centres = [np.linspace(0, n, count + 2)[1:-1] for n, count in zip(shape, grid)]
    for cz, cy, cx in itertools.product(*centres):
        radius = min(rng.uniform(1.4, 11.0), 0.45 * min((shape[0] / (grid[0] + 1)) * SPACING_XYZ[2],
                                                        (shape[1] / (grid[1] + 1)) * SPACING_XYZ[1]))
        mask[(((zz - cz) * SPACING_XYZ[2]) ** 2 + ((yy - cy) * SPACING_XYZ[1]) ** 2
              + ((xx - cx) * SPACING_XYZ[0]) ** 2) <= radius**2] = 1
    return mask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="SEG + SR writes timed (median; default 3)")
    parser.add_argument("--quick", action="store_true", help="a small series, 8 lesions, one write")
    report.add_report_argument(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    shape, grid, repeats = (QUICK_SHAPE, (2, 2, 2), 1) if args.quick else (SHAPE, (5, 5, 4), args.repeats)
    geometry = imageio.Geometry(size=shape[::-1], spacing=SPACING_XYZ, origin=(-180.0, -180.0, 0.0))
    provenance = Provenance("bench-model", "0" * 64, 0.5, 0.0)
    folder = Path(tempfile.mkdtemp(prefix="bench-dicom-sr-"))
    try:
        write_ct_series(folder / "ct", np.zeros(shape, np.int16), geometry)
        t0 = time.perf_counter()
        source = dicom_seg.source_series(folder / "ct", geometry)
        read_s = time.perf_counter() - t0
        labels, found = lesions.analyze_lesions(ball_mask(shape, grid), geometry.spacing_zyx)
        rows = [les.as_dict() for les in found]
        if len(rows) != int(np.prod(grid)):
            raise SystemExit(f"expected {int(np.prod(grid))} separate lesions, got {len(rows)}")

        def write_both() -> tuple[float, float]:
            start = time.perf_counter()
            seg = dicom_seg.lesion_seg(labels, rows, source, provenance=provenance)
            dicom_seg.save_dataset(folder / "seg.dcm", seg)
            middle = time.perf_counter()
            dicom_seg.save_dataset(folder / "sr.dcm", dicom_sr.lesion_sr(rows, seg, source, provenance))
            return middle - start, time.perf_counter() - middle

        def cpu_of_both() -> float:
            start = time.process_time()
            write_both()
            return time.process_time() - start

        total_s, _ = timing.median_time(lambda: sum(write_both()), repeats, warmup=1)  # warm-up: the imports
        cpu_s = sorted(cpu_of_both() for _ in range(repeats))[repeats // 2]
        seg_s, sr_s = write_both()  # one more call for the split (the total above is the median)
        sizes = [(folder / name).stat().st_size for name in ("seg.dcm", "sr.dcm")]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    lines = [timing.machine_line(("numpy", "pydicom", "highdicom")), "",
             f"| volume | lesions | read + match {len(source)} headers | SEG + SR (median of {repeats}) | "
             f"SEG + SR, CPU time of the process (median of {repeats}) | of which SEG / SR (one more call) | "
             f"under {TARGET_S:g} s | SEG / SR size |",
             "|---|---|---|---|---|---|---|---|",
             f"| {shape[2]} x {shape[1]} x {shape[0]} | {len(rows)} | {read_s:.2f} s | {total_s:.2f} s | {cpu_s:.2f} s | "
             f"{seg_s:.2f} s / {sr_s:.2f} s | {'yes' if total_s < TARGET_S else 'NO'} | "
             f"{sizes[0] / 2**20:.1f} MiB / {sizes[1] / 2**10:.0f} KiB |"]
    report.publish("dicom_sr", "\n".join(lines), args.report, argv, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
