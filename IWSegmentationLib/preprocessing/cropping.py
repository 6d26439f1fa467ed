"""Cropping a case to its organ's bounding box: one box, computed the same way for training and inference.

The authors prepared LiTS by cropping every volume to the liver's bounding box grown by 5 voxels,
so their network was trained, and tested, on the organ and a thin rim around it. With the
training key ``crop_to_organ: MARGIN`` (stored in the model card) this package does the same,
and both sides call :func:`organ_box` on the organ mask *of the network's grid* (after
:func:`~IWSegmentationLib.preprocessing.resampling.prepare_case`, so after any resampling to the
target spacing): the trainer crops each prepared case with it (``data.cases.prepare_volume``),
and ``inference.predict_volume`` crops the network input with it and pastes the prediction back
into the whole grid (:meth:`OrganBox.paste`; outside the box: no lesion).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.errors import InputError
from ..core.imageio import Geometry
from .presets import MAX_CROP_MARGIN


@dataclass(frozen=True)
class OrganBox:
    """A box ``[start, stop)`` (z, y, x voxel indices) inside a grid of shape ``grid``."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    grid: tuple[int, int, int]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(b - a for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    def crop(self, array: np.ndarray) -> np.ndarray:
        """The box of a ``[..., z, y, x]`` array on the grid (a contiguous copy; leading axes,
        such as image channels, are kept)."""
        if tuple(array.shape[-3:]) != self.grid:
            raise InputError(f"cannot crop an array of shape {array.shape} with a box of the grid {self.grid}")
        return np.ascontiguousarray(array[(..., *self.slices)])

    def paste(self, array: np.ndarray, fill: float) -> np.ndarray:
        """``array`` (``[..., z, y, x]``, the shape of the box) put back at its place in the
        whole grid; every voxel outside the box gets ``fill``."""
        if tuple(array.shape[-3:]) != self.shape:
            raise InputError(f"cannot paste an array of shape {array.shape} into a box of shape {self.shape}")
        out = np.full((*array.shape[:-3], *self.grid), fill, dtype=array.dtype)
        out[(..., *self.slices)] = array
        return out

    def geometry(self, geometry: Geometry) -> Geometry:
        """The grid of the box: ``geometry``'s spacing and direction, its origin moved to the
        box's first voxel (so a cropped image written to disk lies where it was)."""
        if geometry.shape_zyx != self.grid:
            raise InputError(f"geometry of shape {geometry.shape_zyx} is not the box's grid {self.grid}")
        return Geometry(size=tuple(self.shape[::-1]), spacing=geometry.spacing,  # type: ignore[arg-type]
                        origin=geometry.index_to_physical(self.start), direction=geometry.direction)


def organ_box(organ: np.ndarray, margin: int) -> OrganBox | None:
    """The bounding box of the organ mask's non-zero voxels grown by ``margin`` voxels on every
    side and clipped to the grid; None when the mask is empty (there is nothing to crop to)."""
    if isinstance(margin, bool) or not isinstance(margin, (int, np.integer)) or not 0 <= margin <= MAX_CROP_MARGIN:
        raise InputError(f"crop_to_organ margin must be an integer from 0 to {MAX_CROP_MARGIN} voxels, got {margin!r}")
    organ = np.asarray(organ)
    if organ.ndim != 3:
        raise InputError(f"organ mask must be a 3D array [z, y, x], got shape {organ.shape}")
    inside = organ != 0
    start, stop = [], []
    for axis in range(3):
        present = np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))
        if present.size == 0:
            return None
        start.append(max(0, int(present[0]) - int(margin)))
        stop.append(min(organ.shape[axis], int(present[-1]) + 1 + int(margin)))
    return OrganBox(tuple(start), tuple(stop), tuple(int(s) for s in organ.shape))  # type: ignore[arg-type]
