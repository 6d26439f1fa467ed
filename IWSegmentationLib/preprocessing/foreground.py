"""Foreground masks: the body (intensity threshold, :func:`body_mask`) and the lung field (air inside the body)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ..core.errors import InputError
from ..core.lesions import component_sizes
from .intensity import check_mask
from .presets import validate_params


def foreground_mask(image: np.ndarray, params: dict[str, Any], mask: np.ndarray | None = None,
                    on_warning=None, spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray | None:
    """Where the network has something to segment, for skipping empty sliding windows.

    In this order: the organ mask when the preset uses one and it is given; for a CT preset whose
    organ is the lung, the automatic :func:`lung_field` (lung nodules lie in the lungs, and a
    chest CT's lungs fill a fraction of the scan); raw voxels above the preset's
    ``body_threshold`` (CT: air is about -1000 HU, so ``-900`` keeps the lungs for ``ct-lung``);
    else ``None`` (no skipping). ``image`` is the raw image (same grid as ``mask``).
    ``on_warning(message)`` hears when no lung field is found and the body threshold is used;
    ``spacing_zyx`` (mm) scales the lung field's margin.
    """
    params = validate_params(params)
    if mask is not None and params["mask"] is not None:
        return check_mask(mask, image.shape)
    if params["mask"] == "lung" and params["modality"] == "CT":
        field = lung_field(image, spacing_zyx)
        if field is not None:
            return field
        if on_warning is not None:
            on_warning("no lung field found in the image (no air inside the body?); "
                       "skipping windows by the body threshold instead")
    return body_mask(image, params)


def body_mask(image: np.ndarray, params: dict[str, Any]) -> np.ndarray | None:
    """The body: raw voxels above the preset's ``body_threshold`` (CT: -900 HU keeps the lungs), or
    None when the preset has none (MR). Cheap on purpose: for skipping empty windows and for the
    share of the body a predicted lesion covers (:mod:`IWSegmentationLib.core.lesion_guards`)."""
    params = validate_params(params)
    if params["body_threshold"] is None:
        return None
    return np.asarray(image) > params["body_threshold"]

def enclosed_air(air: np.ndarray, min_fraction: float) -> np.ndarray | None:
    """The air inside the body: the 6-connected components of ``air`` (uint8 ``[z, y, x]``, 1 =
    air-like) that touch no in-plane side of the scan (the air around the patient does) and hold
    at least ``min_fraction`` of its voxels (bowel gas does not). A bool mask of ``air``'s shape,
    or None when there is none. The start of both :func:`lung_field` and the automatic lung mask
    (:func:`IWSegmentationLib.preprocessing.lung_mask.lung_mask`)."""
    import cc3d  # lazy: `iwseg` starts without loading cc3d

    labels = cc3d.connected_components(air, connectivity=6)
    if int(labels.max()) == 0:
        return None
    outside = np.unique(np.concatenate([labels[:, 0].ravel(), labels[:, -1].ravel(),
                                        labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]))
    keep = component_sizes(labels) >= min_fraction * labels.size
    keep[outside] = False
    keep[0] = False
    if not keep.any():
        return None
    return keep[labels]


def lung_field(image: np.ndarray, spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0), *, air_below: float = -400.0,
               margin_mm: float = 15.0, min_fraction: float = 0.002) -> np.ndarray | None:
    """The lungs of a raw chest CT (HU), generously: for skipping windows, not for measuring.

    Air-like voxels (``< air_below`` HU) that are not connected to the in-plane border of the
    scan — the air around the patient is — and form components of at least ``min_fraction`` of
    the volume; holes filled slice by slice (nodules, vessels, airway walls inside the lungs);
    then grown by ``margin_mm`` in every direction, for masses on the pleura that bulge out of
    the aerated lung (the largest tumour of the pyradiomics chest CTs reaches 9.8 mm beyond it).
    Works on an in-plane subsampled grid of at most about 128 voxels a side (about 0.5 s for
    512x512x300). Bowel or tracheal air may be kept: that only costs windows.

    Returns a bool mask on the image's grid, or None when no such air is found (an image that is
    not a chest CT) — the caller then falls back to the body threshold.
    """
    from scipy import ndimage  # lazy: scipy takes ~1.5 s to load, and only the lung field needs it

    image = np.asarray(image)
    if image.ndim != 3:
        raise InputError(f"lung_field needs a 3D image, got shape {image.shape}")
    depth, height, width = image.shape
    step = max(1, min(height, width) // 128)
    field = enclosed_air(np.ascontiguousarray(image[:, ::step, ::step] < air_below).view(np.uint8), min_fraction)
    if field is None:
        return None
    for z in range(depth):
        if field[z].any():
            ndimage.binary_fill_holes(field[z], output=field[z])
    if margin_mm > 0:
        grid_mm = (float(spacing_zyx[0]), float(spacing_zyx[1]) * step, float(spacing_zyx[2]) * step)
        # a window of 2n - 1 voxels already spans an axis of n from every voxel: a larger one gives
        # the same result and only costs time (a 1e-6 mm spacing asked for 30,000,001 voxels)
        size = tuple(min(2 * math.ceil(margin_mm / max(s, 1e-6)) + 1, 2 * n - 1) for s, n in zip(grid_mm, field.shape))
        field = ndimage.maximum_filter(field, size=size)
    if step > 1:
        field = np.repeat(np.repeat(field, step, axis=1), step, axis=2)[:, :height, :width]
    return np.ascontiguousarray(field)
