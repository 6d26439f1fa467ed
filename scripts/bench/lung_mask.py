"""Time of the automatic CT lung mask (``preprocessing.lung_mask``) on a 512 x 512 x 300 CT and on
the pyradiomics chest CT lung1.

The synthetic CT is the inference benchmark's phantom (:func:`scripts.bench.inference.ct_phantom`:
an elliptic body with two lungs, a spine and nodules, noise 20 HU) at 0.7 x 0.7 x 1.25 mm. lung1
(512 x 512 x 48, 0.57 x 0.57 x 5 mm) is read from ``Testing/.data/pyradiomics`` (the tests'
download; ``IWSEG_TEST_DATA`` names another folder) and skipped when absent. One untimed call,
then the median of ``--repeats``. Target: under 2 s for 512 x 512 x 300 on 2 cores (issue 22).

    python -m scripts.bench lung_mask
    python -m scripts.bench.lung_mask --repeats 5 [--quick] [--report FILE]

``--quick`` (a 128 x 128 x 40 phantom, one call) only checks that the script works.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from IWSegmentationLib.core.imageio import Geometry, read_image
from IWSegmentationLib.preprocessing.lung_mask import lung_mask
from scripts.bench import report, timing
from scripts.bench.inference import ct_phantom

REPO = Path(__file__).resolve().parents[2]
SHAPE = (300, 512, 512)
QUICK_SHAPE = (40, 128, 128)
SPACING_XYZ = (0.7, 0.7, 1.25)
TARGET_S = 2.0


def clinical_folder() -> Path:
    local = os.environ.get("IWSEG_TEST_DATA")
    return Path(local) if local else REPO / "Testing" / ".data" / "pyradiomics"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (median; default 5)")
    parser.add_argument("--quick", action="store_true", help="a small phantom, one call")
    report.add_report_argument(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    shape, repeats = (QUICK_SHAPE, 1) if args.quick else (SHAPE, args.repeats)
    rows = []
    image = ct_phantom(shape)
    geometry = Geometry(size=shape[::-1], spacing=SPACING_XYZ, origin=(0.0, 0.0, 0.0))
    seconds, mask = timing.median_time(lambda: lung_mask(image, geometry), repeats, warmup=0 if args.quick else 1)
    rows.append((f"phantom {shape[2]} x {shape[1]} x {shape[0]}, 0.7 x 0.7 x 1.25 mm", seconds, float(mask.mean()),
                 "" if args.quick else ("yes" if seconds < TARGET_S else "no")))
    lung1 = clinical_folder() / "lung1_image.nrrd"
    if lung1.is_file() and not args.quick:
        image, geometry = read_image(lung1)
        seconds, mask = timing.median_time(lambda: lung_mask(image, geometry), repeats)
        rows.append(("pyradiomics lung1, 512 x 512 x 48, 0.57 x 0.57 x 5 mm", seconds, float(mask.mean()), ""))
    lines = [timing.machine_line(("numpy", "scipy")), "",
             f"| volume | median s ({repeats} calls) | mask share of the volume | under {TARGET_S:g} s |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {s:.2f} | {share:.1%} | {met} |" for name, s, share, met in rows]
    report.publish("lung_mask", "\n".join(lines), args.report, argv, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
