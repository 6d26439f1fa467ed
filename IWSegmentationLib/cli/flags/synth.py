"""The flags of ``iwseg synth``: its parser, help texts, choices and defaults; what the command does
with them is :mod:`IWSegmentationLib.cli.commands.synth`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ...data.synth import DEFAULT_SHAPE, PRESETS


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "synth",
        help="generate a synthetic multi-lesion CT/MR-like dataset (MSD layout)",
        description=(
            "Write N synthetic cases (body, organ, texture, noise, on average 5.5 lesions per case with "
            "equivalent diameters of about 2-40 voxels, many small) as a Medical Segmentation Decathlon "
            "dataset: dataset.json, imagesTr/, labelsTr/ (1 = lesion), masksTr/ (organ) and lesions.csv. "
            "The same --seed gives the same data. See docs/data.md."
        ),
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder (created; must be empty)")
    p.add_argument("--cases", type=int, default=10, metavar="N", help="number of cases (default 10)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--size", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("D", "H", "W"),
                   help="volume size in voxels, z y x (default %(default)s)")
    p.add_argument("--preset", choices=PRESETS, default="ct-liver",
                   help="kind of data: liver CT, lung CT or brain MR (default ct-liver)")
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("SZ", "SY", "SX"),
                   help="voxel spacing in mm, z y x (default per preset: ct-liver 2.0 0.8 0.8, ct-lung 1.25 0.7 0.7, "
                        "mr 1.5 1.0 1.0)")
    p.add_argument("--body-fraction", type=float, default=None, metavar="F",
                   help="fraction of the field of view inside the body/head (default 0.4 CT, 0.3 MR)")
    p.add_argument("--mean-lesions", type=float, default=5.5, metavar="M",
                   help="mean lesion count per case (Poisson; default 5.5)")
    p.add_argument("--channels", type=int, choices=(1, 2), default=1,
                   help="2: also write a second sequence per case (MSD naming case_0000/case_0001), in which every "
                        "lesion is hyperintense, for multi-channel training (default 1)")
    p.add_argument("--histogram", type=Path, default=None, metavar="PNG",
                   help="also write a histogram of lesion diameters and counts per case")
    p.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p
