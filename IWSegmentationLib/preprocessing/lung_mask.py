"""The automatic CT lung mask, and the finder of each organ that has an automatic mask.

A ``ct-lung`` model is trained on lungs masked out of the chest (voxels outside set to -1000 HU),
so at inference it needs the same mask. Chest CT lungs are the one organ a few lines of
classical image processing find reliably: air-like voxels inside the body, the airway taken
off, the two lungs kept, and a closing that puts nodules and masses on the pleura back inside.
:func:`lung_mask` is that function; training (``data.cases.prepare_volume``, with the config key
``auto_organ_mask``) and inference (``iwseg predict`` without ``--organ-mask``) both call it
through :func:`automatic_organ_mask`, so the mask a model was trained with is the mask it is
given. Other organs (the liver) have no automatic mask here: TotalSegmentator's organ masks
are the standard way to get one.

Why this module and not ``foreground.lung_field``: the lung field is a generous region for
skipping sliding windows (grown by 15 mm, airway and all); this is the organ mask the network's
input is masked with, so it follows the lungs' outline.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np

from ..core.errors import InputError
from ..core.imageio import Geometry
from ..core.lesions import component_sizes
from .foreground import enclosed_air

#: HU below which a voxel is air-like (aerated lung is about -850, soft tissue about +40).
AIR_BELOW_HU = -400.0
#: Side of the working grid in mm: the mask is found on a grid of about this spacing (strided,
#: at least 1 voxel), then brought back by repetition, which keeps it under 2 s for 512x512x300.
GRID_MM = 2.5
#: Radius of the closing, in mm: concavities narrower than twice this (a nodule or mass on the
#: pleura, vessels at the hilum) are filled.
CLOSING_MM = 15.0
#: Margin the closed mask is grown by, in mm, as lung-nodule pipelines do (the DSB 2017 winners
#: dilated their lung masks by about 10 mm): a mass that the aerated lung only half surrounds
#: lies inside. The 45.2 mm mass of the pyradiomics lung2 CT, on the posterior pleura next to
#: the spine, is 3% inside the plain lungs, 97% with a 15 mm closing and a 5 mm margin, 100%
#: with 15 mm and 10 mm (Testing/preprocessing/test_lung_mask.py).
MARGIN_MM = 10.0
#: Fewest voxels a side of the working grid: a small image is not strided so far that a thin
#: chest wall opens and joins the lungs to the air outside (96 voxels a side: no stride).
MIN_GRID_SIDE = 64
#: Spacing (mm) of the coarser grid the closing, the margin and the hole filling run on.
CLOSING_GRID_MM = 5.0
#: Largest cross-section of the trachea or a main bronchus (mm^2): a 30 mm wide trachea is 707.
AIRWAY_MAX_AREA_MM2 = 800.0
#: The trachea is sought within this fraction of the body's width around its centre.
AIRWAY_CENTRE_FRACTION = 0.2
#: A component smaller than this fraction of the volume is not a lung (bowel gas, noise).
MIN_LUNG_FRACTION = 0.002


def lung_mask(image: np.ndarray, geometry: Geometry | None = None, *, air_below: float = AIR_BELOW_HU,
              closing_mm: float = CLOSING_MM, margin_mm: float = MARGIN_MM) -> np.ndarray | None:
    """The lungs of a raw chest CT (HU): a bool mask on the image's grid, or None when there are none.

    Steps, on a strided grid of about :data:`GRID_MM` mm:

    1. air-like voxels (``< air_below`` HU);
    2. the air around the patient taken off: air components that touch the in-plane border;
    3. components under :data:`MIN_LUNG_FRACTION` of the volume dropped (bowel gas);
    4. the trachea and main bronchi taken off: from the most superior slice with air (by
       ``geometry.direction``; index order when the scan is not axial), the small central
       component is followed downwards, slice by slice, while it stays under
       :data:`AIRWAY_MAX_AREA_MM2`; where it joins a lung, the following stops;
    5. the two largest components kept (the lungs; one when they touch);
    6. a closing by a ball of ``closing_mm`` (in mm, spacing-aware, through distance
       transforms), then holes filled slice by slice: nodules, masses on the pleura and vessels
       lie inside.

    ``geometry`` gives the spacing and the head-foot direction (default: 1 mm, index z
    increasing towards the head, as ITK's LPS). None is returned for an image without air
    inside the body (not a chest CT): the caller says so.
    """

    image = np.asarray(image)
    if image.ndim != 3 or image.size == 0:
        raise InputError(f"the lung mask needs a 3D image [z, y, x], got shape {image.shape}")
    geometry = geometry or Geometry.identity(image.shape)
    spacing = np.asarray(geometry.spacing_zyx, dtype=float)
    # no coarser than about GRID_MM, and at least MIN_GRID_SIDE voxels a side (a thin chest wall stays closed)
    steps = tuple(max(1, min(int(round(GRID_MM / s)), n // MIN_GRID_SIDE)) for s, n in zip(spacing, image.shape))
    grid_mm = spacing * np.asarray(steps)
    small = image[::steps[0], ::steps[1], ::steps[2]]
    candidate = enclosed_air(np.ascontiguousarray(small < air_below).view(np.uint8), MIN_LUNG_FRACTION)
    if candidate is None:
        return None

    candidate &= ~airway(candidate, small, tuple(grid_mm), superior_last(geometry))
    lungs = two_largest(candidate, MIN_LUNG_FRACTION * candidate.size)
    if lungs is None:
        return None
    # the closing, margin and filling reach 15-25 mm: a grid of about 5 mm is fine enough, and 8 times cheaper
    factor = tuple(max(1, int(round(CLOSING_GRID_MM / g))) for g in grid_mm)
    coarse = pool_any(lungs, factor)
    coarse = closing(coarse, tuple(grid_mm * np.asarray(factor)), closing_mm, margin_mm)
    fill_slices(coarse)
    return upsample(coarse, tuple(s * f for s, f in zip(steps, factor)), image.shape)


def pool_any(mask: np.ndarray, factor: tuple[int, int, int]) -> np.ndarray:
    """``mask`` on a grid ``factor`` times coarser: a coarse voxel is set when any of its voxels is."""
    if factor == (1, 1, 1):
        return mask
    padded = np.pad(mask, [(0, -n % f) for n, f in zip(mask.shape, factor)])
    (a, b, c), (fa, fb, fc) = [n // f for n, f in zip(padded.shape, factor)], factor
    return padded.reshape(a, fa, b, fb, c, fc).any(axis=(1, 3, 5))


def superior_last(geometry: Geometry) -> bool:
    """True when the last slice (largest z index) is the most superior one: the z axis's
    physical direction points to the head (+S in ITK's LPS). A scan whose z axis is not
    head-foot (sagittal, coronal) gives the index order (last = superior)."""
    s_component = geometry.direction_matrix[2, 2]
    return not s_component < -0.5


def airway(candidate: np.ndarray, image: np.ndarray, grid_mm: tuple[float, float, float],
           last_is_superior: bool) -> np.ndarray:
    """The trachea and main bronchi of ``candidate`` (air inside the body, on the working grid):
    the small central 2D component of the most superior slice with air, followed towards the feet
    while each part stays a small component (see :func:`lung_mask`, step 4). Empty when the
    top slice has no such component (the scan starts below the carina)."""
    from scipy import ndimage  # lazy: scipy takes ~1.5 s to load

    found = np.zeros_like(candidate)
    order = range(candidate.shape[0] - 1, -1, -1) if last_is_superior else range(candidate.shape[0])
    max_pixels = AIRWAY_MAX_AREA_MM2 / (grid_mm[1] * grid_mm[2])
    track = None
    for z in order:
        plane = candidate[z]
        if track is None and not plane.any():
            continue
        labels, n = ndimage.label(plane)
        areas = np.bincount(labels.ravel(), minlength=n + 1)
        if track is None:  # the most superior slice with air: seed on the small central component
            body = image[z] > AIR_BELOW_HU
            columns = np.flatnonzero(body.any(axis=0))
            if columns.size == 0:
                return found
            centre, width = (columns[0] + columns[-1]) / 2, columns[-1] - columns[0] + 1
            seeds = []
            for label in range(1, n + 1):
                xs = np.nonzero(labels == label)[1]
                if areas[label] <= max_pixels and abs(xs.mean() - centre) <= AIRWAY_CENTRE_FRACTION * width:
                    seeds.append(label)
            if not seeds:
                return found
        else:
            near = ndimage.binary_dilation(track)
            seeds = [int(v) for v in np.unique(labels[near & plane]) if v and areas[v] <= max_pixels]
            if not seeds:
                break  # joined a lung (a large component) or ended
        track = np.isin(labels, seeds)
        found[z] = track
    return found


def two_largest(mask: np.ndarray, min_voxels: float) -> np.ndarray | None:
    """The two largest 26-connected components of ``mask`` of at least ``min_voxels`` (the two
    lungs, or one when they touch); None when there is none."""
    import cc3d  # lazy: `iwseg` starts without loading cc3d

    labels = cc3d.connected_components(np.ascontiguousarray(mask).view(np.uint8), connectivity=26)
    sizes = component_sizes(labels)
    sizes[0] = 0
    order = np.argsort(sizes)[::-1][:2]
    keep = np.zeros(sizes.size, bool)
    keep[[i for i in order if sizes[i] >= min_voxels and sizes[i] > 0]] = True
    return keep[labels] if keep.any() else None


def closing(mask: np.ndarray, grid_mm: tuple[float, float, float], radius_mm: float,
            margin_mm: float = 0.0) -> np.ndarray:
    """Morphological closing of ``mask`` by a ball of ``radius_mm``, then grown by ``margin_mm``
    (in mm on a grid of spacing ``grid_mm``): a dilation by ``radius_mm + margin_mm`` and an
    erosion by ``radius_mm``, through two Euclidean distance transforms (their cost does not grow
    with the radius, unlike a structuring element's), in the mask's bounding box plus the reach."""
    from scipy import ndimage  # lazy: scipy takes ~1.5 s to load

    if radius_mm <= 0 and margin_mm <= 0:
        return mask
    reach = radius_mm + margin_mm
    pad = [math.ceil(reach / g) + 1 for g in grid_mm]
    where = np.nonzero(mask.any(axis=(1, 2)))[0], np.nonzero(mask.any(axis=(0, 2)))[0], np.nonzero(mask.any(axis=(0, 1)))[0]
    box = tuple(slice(max(0, int(w[0]) - p), min(n, int(w[-1]) + 1 + p)) for w, p, n in zip(where, pad, mask.shape))
    part = np.pad(mask[box], [(p, p) for p in pad])  # room to dilate, so the erosion does not see the edge
    dilated = ndimage.distance_transform_edt(~part, sampling=grid_mm) <= reach
    closed = ndimage.distance_transform_edt(dilated, sampling=grid_mm) > radius_mm
    out = mask.copy()
    out[box] |= closed[tuple(slice(p, -p) for p in pad)]
    return out


def fill_slices(mask: np.ndarray) -> None:
    """Fill the holes of every axial slice of ``mask`` in place (nodules and vessels inside the lung)."""
    from scipy import ndimage  # lazy: scipy takes ~1.5 s to load

    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        ndimage.binary_fill_holes(mask[z], output=mask[z])


def upsample(mask: np.ndarray, steps: tuple[int, int, int], shape: tuple[int, ...]) -> np.ndarray:
    """The coarse mask back on the image's grid of ``shape`` (each voxel repeated ``steps`` times),
    written once through a broadcast view (no intermediate copies)."""
    a, b, c = mask.shape
    sa, sb, sc = steps
    out = np.empty((a, sa, b, sb, c, sc), dtype=bool)
    out[...] = mask[:, None, :, None, :, None]
    out = out.reshape(a * sa, b * sb, c * sc)
    return np.ascontiguousarray(out[: shape[0], : shape[1], : shape[2]])


#: The function that finds each organ of :data:`~IWSegmentationLib.preprocessing.presets.AUTOMATIC_MASK_ORGANS`
#: in the image, by (modality, organ).
AUTOMATIC_MASKS: dict[tuple[str, str], Callable[..., np.ndarray | None]] = {("CT", "lung"): lung_mask}


def automatic_organ_mask(image: np.ndarray, params: Mapping[str, Any], geometry: Geometry | None = None) -> np.ndarray | None:
    """The automatic organ mask of the preset's organ (the CT lungs: :func:`lung_mask`), as
    uint8 {0, 1} on the image's grid; channel 0 of a ``[C, z, y, x]`` image. None when the organ
    has no automatic mask or none is found in the image. The one function training and
    inference call, so both mask alike."""
    finder = AUTOMATIC_MASKS.get((params.get("modality"), params.get("mask")))
    if finder is None:
        return None
    image = np.asarray(image)
    found = finder(image[0] if image.ndim == 4 else image, geometry)
    return None if found is None else found.view(np.uint8)
