"""An organ mask given with a scan (``--organ-mask``, a server job's ``organ_mask`` part, the
module's segmentation): read and checked once, with the messages that say how to get one.

``iwseg predict`` reads a case's mask with :func:`read_organ_mask`; ``iwseg serve`` runs the same
function on an uploaded mask before it queues the job, so a bad mask is the same message (a 400
there, exit 2 here). How to get a mask is said by :mod:`IWSegmentationLib.core.organs`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import InputError
from .imageio import Geometry, read_image
from .label_maps import LABEL_MAP_MAX_VALUES, label_map_values


def check_organ_mask(organ: np.ndarray, path: str | os.PathLike, image: str | os.PathLike) -> None:
    """Refuse an organ mask that cannot be one: empty (no non-zero voxel), or not a label map (a
    scan given by mistake: negative values, or more than :data:`LABEL_MAP_MAX_VALUES` distinct
    values, or non-integer values). The message names the mask and the image."""
    if not organ.any():
        raise InputError(f"organ mask {path} (for {image}) is empty: it has no non-zero voxel, so there is no organ "
                         "to segment in; give the organ's mask (non-zero inside the organ)")
    values = label_map_values(organ)
    if values is None or float(values.min()) < 0:
        low, high = float(organ.min()), float(organ.max())
        shown = "negative values" if low < 0 else f"more than {LABEL_MAP_MAX_VALUES} distinct or fractional values"
        raise InputError(f"organ mask {path} (for {image}) is not a label map: it has {shown} (range {low:g} … "
                         f"{high:g}), as a scan has; give the organ's mask (non-zero inside the organ), not the scan")


def read_organ_mask(path: str | os.PathLike, image: str | os.PathLike, geometry: Geometry) -> np.ndarray:
    """The organ mask in ``path`` for the scan ``image`` whose grid is ``geometry``, checked: on
    the scan's grid (:class:`InputError` naming both files and the differences), not empty, a
    label map (:func:`check_organ_mask`)."""
    organ, organ_geometry = read_image(Path(path), what="organ mask")
    diffs = geometry.differences(organ_geometry)
    if diffs:
        raise InputError(f"organ mask {path} is not on the grid of {image}: {'; '.join(diffs)}")
    check_organ_mask(organ, path, image)
    return organ
