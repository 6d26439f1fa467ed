"""Time of writing a DICOM SEG (``dicom_seg.write_lesion_seg``) for a CT-sized lesion mask.

A 512 x 512 x 120 CT series (0.7 x 0.7 x 2.5 mm) is written with pydicom
(:func:`IWSegmentationLib.testing.dicom_series.write_ct_series`, the tests' series writer), 40
ellipsoidal lesions of 1.4 to 11 mm radius are drawn at random (seed 0; those that touch merge),
and the SEG is written ``--repeats`` times; the median is reported with the time of reading and
matching the series' headers and the file size. No torch.

    OMP_NUM_THREADS=1 python -m scripts.bench.dicom_seg [--repeats 3] [--quick] [--report FILE]

``--quick`` (a 128 x 128 x 20 series, 5 lesions, one write) only checks that the script works.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from IWSegmentationLib.core import dicom_seg, imageio, lesions
from IWSegmentationLib.testing.dicom_series import write_ct_series
from scripts.bench import report, timing

SHAPE = (120, 512, 512)
QUICK_SHAPE = (20, 128, 128)
SPACING_XYZ = (0.7, 0.7, 2.5)


def lesion_mask(shape: tuple[int, int, int] = SHAPE, seed: int = 0, count: int = 40) -> np.ndarray:
    """``count`` random ellipsoids (balls in mm) of 1.4-11 mm radius inside ``shape`` (``[z, y, x]``)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, np.uint8)
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    scale = np.array(shape) / np.array(SHAPE)  # centres kept off the edges alike at any size
    lo, hi = np.array((10, 60, 60)) * scale, np.array((110, 450, 450)) * scale
    for _ in range(count):
        cz, cy, cx = rng.uniform(lo, hi)
        radius = rng.uniform(1.4, 11.0)  # mm
        inside = (((zz - cz) * SPACING_XYZ[2]) ** 2 + ((yy - cy) * SPACING_XYZ[1]) ** 2
                  + ((xx - cx) * SPACING_XYZ[0]) ** 2) <= radius**2
        mask[inside] = 1
    return mask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="SEG writes timed (median; default 3)")
    parser.add_argument("--quick", action="store_true", help="a small series, 5 lesions, one write")
    report.add_report_argument(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    shape, count, repeats = (QUICK_SHAPE, 5, 1) if args.quick else (SHAPE, 40, args.repeats)
    geometry = imageio.Geometry(size=shape[::-1], spacing=SPACING_XYZ, origin=(-180.0, -180.0, 0.0))
    folder = Path(tempfile.mkdtemp(prefix="bench-dicom-seg-"))
    try:
        write_ct_series(folder / "ct", np.zeros(shape, np.int16), geometry)
        t0 = time.perf_counter()
        source = dicom_seg.source_series(folder / "ct", geometry)
        read_s = time.perf_counter() - t0
        labels, found = lesions.analyze_lesions(lesion_mask(shape, count=count), geometry.spacing_zyx)
        rows = [les.as_dict() for les in found]
        write_s, _ = timing.median_time(lambda: dicom_seg.write_lesion_seg(folder / "seg.dcm", labels, rows, source),
                                        repeats, warmup=0)
        size = (folder / "seg.dcm").stat().st_size
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    lines = [timing.machine_line(("numpy", "pydicom", "highdicom")), "",
             f"| volume | lesions | read + match {len(source)} headers | write SEG (median of {repeats}) | SEG size |",
             "|---|---|---|---|---|",
             f"| {shape[2]} x {shape[1]} x {shape[0]} | {len(rows)} | {read_s:.2f} s | {write_s:.2f} s | "
             f"{size / 2**20:.1f} MiB |"]
    report.publish("dicom_seg", "\n".join(lines), args.report, argv, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
