"""Time of writing a DICOM SEG (``dicom_seg.write_lesion_seg``) for a CT-sized lesion mask.

A 512 x 512 x 120 CT series (0.7 x 0.7 x 2.5 mm) is written with pydicom (``Testing/_dicom.py``,
the tests' series writer), 40 ellipsoidal lesions of 1.4 to 11 mm radius are drawn at random
(seed 0; those that touch merge), and the SEG is written ``--repeats`` times; the median is
printed with the file size. No torch. Usage: ``python scripts/bench_dicom_seg.py [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "Testing")]

from _dicom import write_ct_series  # noqa: E402

from IWSegmentationLib.core import dicom_seg, imageio, lesions  # noqa: E402

SHAPE = (120, 512, 512)
SPACING_XYZ = (0.7, 0.7, 2.5)


def lesion_mask(seed: int = 0, count: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.zeros(SHAPE, np.uint8)
    zz, yy, xx = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    for _ in range(count):
        cz, cy, cx = rng.uniform((10, 60, 60), (110, 450, 450))
        radius = rng.uniform(1.4, 11.0)  # mm
        inside = (((zz - cz) * SPACING_XYZ[2]) ** 2 + ((yy - cy) * SPACING_XYZ[1]) ** 2
                  + ((xx - cx) * SPACING_XYZ[0]) ** 2) <= radius**2
        mask[inside] = 1
    return mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    geometry = imageio.Geometry(size=SHAPE[::-1], spacing=SPACING_XYZ, origin=(-180.0, -180.0, 0.0))
    folder = Path(tempfile.mkdtemp(prefix="bench-dicom-seg-"))
    try:
        write_ct_series(folder / "ct", np.zeros(SHAPE, np.int16), geometry)
        t0 = time.perf_counter()
        source = dicom_seg.source_series(folder / "ct", geometry)
        read_s = time.perf_counter() - t0
        labels, found = lesions.analyze_lesions(lesion_mask(), geometry.spacing_zyx)
        rows = [les.as_dict() for les in found]
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            dicom_seg.write_lesion_seg(folder / "seg.dcm", labels, rows, source)
            times.append(time.perf_counter() - t0)
        size = (folder / "seg.dcm").stat().st_size
        print(f"| volume | lesions | read + match {len(source)} headers | write SEG (median of {args.repeats}) | SEG size |")
        print("|---|---|---|---|---|")
        print(f"| {SHAPE[2]} x {SHAPE[1]} x {SHAPE[0]} | {len(rows)} | {read_s:.2f} s | "
              f"{statistics.median(times):.2f} s | {size / 2**20:.1f} MiB |")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
