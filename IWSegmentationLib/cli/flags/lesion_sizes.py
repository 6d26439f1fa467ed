"""The lesion-size flags ``iwseg predict`` and ``iwseg evaluate`` share: the size groups (a preset or
two cut-offs, one or the other) and the connectivity that makes lesions of voxels."""

from __future__ import annotations

import argparse

from ...core.lesion_sizes import CONNECTIVITIES, SIZE_PRESETS


def add_lesion_size_flags(parser: argparse.ArgumentParser, *, size_preset_help: str, connectivity_help: str) -> None:
    """``--size-preset`` or ``--size-thresholds S M``, and ``--connectivity`` (default 26); the help
    texts that differ between the commands (their defaults) are given."""
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--size-preset", choices=sorted(SIZE_PRESETS), default=None, help=size_preset_help)
    sizes.add_argument("--size-thresholds", type=float, nargs=2, metavar=("S", "M"), default=None,
                       help="size-group cut-offs in mm: small if d < S, medium if S <= d < M, large if d >= M")
    parser.add_argument("--connectivity", type=int, choices=CONNECTIVITIES, default=26, help=connectivity_help)
