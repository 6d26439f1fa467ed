"""Lesions: connected components of a mask, their sizes and size groups.

A *lesion* is one connected component of a binary mask (26-connectivity by default, as
the inverse-weighting paper labels its ground truth). Its size is reported as a voxel
count, a volume in mm³ and the *equivalent diameter* ``d = (6 V / π)^(1/3)`` mm, the
diameter of the sphere of the same volume. Size groups use two diameter thresholds
``s < m``: *small* if ``d < s``, *medium* if ``s <= d < m``, *large* if ``d >= m``.

The size groups, the minimum lesion size and how a lesion is shown (the size group's colour
:data:`SIZE_GROUP_COLORS`, the lesion's name :func:`segment_name`, its terminology code
:data:`LESION_TERMINOLOGY`, used alike by the Slicer segments and the DICOM SEG) are defined once,
without numpy, in :mod:`IWSegmentationLib.core.lesion_sizes`, and imported here.

Arrays are ``[z, y, x]``; ``spacing`` is in the same order ``(sz, sy, sx)`` (see
:mod:`IWSegmentationLib.core.imageio`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import numpy as np

from .errors import InputError
from .lesion_sizes import (  # noqa: F401  (the numpy-free part of this module's names, re-exported)
    CONNECTIVITIES,
    DEFAULT_SIZE_PRESET,
    LESION_TERMINOLOGY,
    MIN_SIZE_UNITS,
    SIZE_GROUP_COLORS,
    SIZE_GROUPS,
    SIZE_PRESETS,
    MinLesionSize,
    SizeThresholds,
    check_spacing,
    parse_min_lesion_size,
    parse_size_thresholds,
    segment_name,
    size_thresholds,
)


def _check_volume(array: np.ndarray, name: str) -> None:
    if not isinstance(array, np.ndarray):
        raise InputError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.ndim != 3:
        raise InputError(f"{name} must be a 3D array [z, y, x], got shape {array.shape}")


def label_components(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Label the connected components of a binary mask.

    Returns ``(labels, K)``: an int32 array with 0 for background and 1..K for the
    components, numbered in scan order. ``connectivity`` is 6, 18 or 26.
    """
    import cc3d  # lazy: installed on first Apply in Slicer (slicer/deps.py)

    _check_volume(mask, "mask")
    if connectivity not in CONNECTIVITIES:
        raise InputError(f"connectivity must be one of {CONNECTIVITIES}, got {connectivity}")
    # uint8 input, not cc3d's binary_image mode: that mode under-allocates its union-find
    # table on tiny volumes (e.g. [1, 0, 1, 0, 1] raises) in cc3d 4.1.
    binary = np.ascontiguousarray(mask != 0, dtype=np.uint8)
    labels, k = cc3d.connected_components(binary, connectivity=connectivity, return_N=True, out_dtype=np.uint32)
    # uint32 -> int32 reinterpretation is free (no copy); ids never exceed 2**31 for a 3D volume.
    return labels.view(np.int32), int(k)


def equivalent_diameter(volume_mm3):
    """Diameter in mm of the sphere of volume ``volume_mm3``: ``(6 V / π)^(1/3)``. Works on arrays."""
    return np.cbrt(6.0 * np.asarray(volume_mm3, dtype=float) / math.pi)


@dataclass
class Lesion:
    """One connected component. ``centroid`` and ``bbox`` are voxel indices in ``[z, y, x]`` order;
    ``bbox`` is ``(z0, y0, x0, z1, y1, x1)`` with exclusive ends. ``confidence`` is the maximum
    of the score map inside the lesion when one was given: the **maximum logit** for ``iwseg
    predict`` (a float32 sigmoid rounds to 1.0 above about 17, so confident lesions would tie;
    see :mod:`IWSegmentationLib.core.confidence`)."""

    id: int
    voxels: int
    volume_mm3: float
    diameter_mm: float
    size_group: str
    centroid: tuple[float, float, float]
    bbox: tuple[int, int, int, int, int, int]
    confidence: float | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


def _label_statistics(labels: np.ndarray) -> dict:
    """Voxel counts, bounding boxes and centroids of every label id in one C++ pass (cc3d)."""
    import cc3d  # lazy: installed on first Apply in Slicer (slicer/deps.py)

    labels = np.ascontiguousarray(labels)
    if labels.dtype.kind == "i":  # cc3d wants unsigned ids; ours are never negative
        labels = labels.view(labels.dtype.str.replace("i", "u"))
    elif labels.dtype.kind != "u":
        raise InputError(f"labels must be an integer array, got {labels.dtype}")
    top = int(labels.max()) if labels.size else 0
    if top < labels.size:
        return cc3d.statistics(labels)
    # ids larger than the voxel count (a small crop of a whole-image labelling): compact the
    # ids for cc3d, then spread the results back to the original ids.
    ids, compact = np.unique(labels, return_inverse=True)
    stats = cc3d.statistics(compact.reshape(labels.shape).astype(np.uint32))
    counts = np.zeros(top + 1, dtype=stats["voxel_counts"].dtype)
    counts[ids] = stats["voxel_counts"]
    centroids = np.full((top + 1, 3), np.nan)
    centroids[ids] = stats["centroids"]
    boxes: list = [None] * (top + 1)
    for new_id, old_id in enumerate(ids):
        boxes[old_id] = stats["bounding_boxes"][new_id]
    return {"voxel_counts": counts, "bounding_boxes": boxes, "centroids": centroids}


def component_sizes(labels: np.ndarray, k: int | None = None) -> np.ndarray:
    """Voxel count of every label 0..K (index 0 is the background) in one pass."""
    counts = _label_statistics(labels)["voxel_counts"]
    k = len(counts) - 1 if k is None else k
    out = np.zeros(k + 1, dtype=np.int64)
    n = min(len(counts), k + 1)
    out[:n] = counts[:n]
    return out


def component_max(labels: np.ndarray, values: np.ndarray, k: int) -> np.ndarray:
    """Maximum of ``values`` inside each label 1..K (``-inf`` where a label is absent), in one pass.

    Index 0 (background) is left at ``-inf``: only lesion voxels are visited."""
    out = np.full(k + 1, -np.inf, dtype=np.float64)
    inside = labels > 0  # only lesion voxels: no full-size float64 copy of a whole CT
    np.maximum.at(out, labels[inside], values[inside].astype(np.float64))
    return out


def lesion_table(
    labels: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    thresholds: SizeThresholds | None = None,
    scores: np.ndarray | None = None,
    k: int | None = None,
) -> list[Lesion]:
    """Describe every component of a label map (from :func:`label_components`).

    ``spacing`` is ``(sz, sy, sx)`` in mm. Voxel counts, bounding boxes and centroids come
    from one pass of ``cc3d.statistics``; confidences (the maximum of ``scores``, the logit
    map, inside each lesion) from one pass over lesion voxels only. Ids absent from
    ``labels`` (e.g. after cropping) are skipped.
    """
    _check_volume(labels, "labels")
    sp = np.asarray(check_spacing(spacing))
    thresholds = thresholds or SIZE_PRESETS[DEFAULT_SIZE_PRESET]
    if k is None:
        k = int(labels.max()) if labels.size else 0
    if k == 0:
        return []
    if scores is not None and scores.shape != labels.shape:
        raise InputError(f"scores shape {scores.shape} differs from labels shape {labels.shape}")
    stats = _label_statistics(labels)
    counts, boxes, centroids = stats["voxel_counts"], stats["bounding_boxes"], stats["centroids"]
    conf = component_max(labels, scores, k) if scores is not None else None
    voxel_mm3 = float(np.prod(sp))
    out = []
    for j in range(1, min(k, len(counts) - 1) + 1):
        if counts[j] == 0:
            continue
        box = boxes[j]
        volume = int(counts[j]) * voxel_mm3
        diameter = float(equivalent_diameter(volume))
        out.append(
            Lesion(
                id=j,
                voxels=int(counts[j]),
                volume_mm3=float(volume),
                diameter_mm=diameter,
                size_group=thresholds.group(diameter),
                centroid=tuple(float(c) for c in centroids[j]),
                bbox=(box[0].start, box[1].start, box[2].start, box[0].stop, box[1].stop, box[2].stop),
                confidence=None if conf is None else float(conf[j]),
            )
        )
    return out


def first_voxel(labels: np.ndarray, lesion: Lesion) -> int:
    """The flat C-order index (``[z, y, x]`` scan order) of ``lesion``'s first voxel in ``labels``.

    Only the first slice of the lesion's bounding box is read: the first voxel in scan order lies there."""
    z0, y0, x0, _, y1, x1 = lesion.bbox
    plane = labels[z0, y0:y1, x0:x1] == lesion.id
    y, x = divmod(int(np.argmax(plane)), x1 - x0)
    return int(np.ravel_multi_index((z0, y0 + y, x0 + x), labels.shape))


def number_lesions(labels: np.ndarray, lesions: Sequence[Lesion]) -> tuple[np.ndarray, list[Lesion]]:
    """The one lesion numbering: lesion 1 is the largest (most voxels), ties broken by the scan
    order (``[z, y, x]``, C order) of each lesion's first voxel.

    Every output that numbers lesions uses it, so "Lesion 002" is the same lesion everywhere: the
    lesion JSON and the DICOM SEG of ``iwseg predict``, the Slicer segments and the module's CSV
    and DICOM SEG export. Largest first because a reader looks at the biggest findings first and
    the number then does not depend on where the scan starts; the first voxel makes it total.

    Returns ``(labels, lesions)`` renumbered: label value ``n`` is lesion ``n`` (``lesions[n - 1]``,
    whose ``id`` is ``n``); ``labels`` is returned as is when the order already holds.
    """
    ordered = sorted(lesions, key=lambda les: (-les.voxels, first_voxel(labels, les)))
    numbered = [replace(les, id=n) for n, les in enumerate(ordered, start=1)]
    if all(les.id == n for n, les in enumerate(ordered, start=1)) and int(labels.max(initial=0)) == len(ordered):
        return labels, numbered
    lut = np.zeros(int(labels.max(initial=0)) + 1, dtype=np.int32)
    for n, les in enumerate(ordered, start=1):
        lut[les.id] = n
    return lut[labels], numbered


def analyze_lesions(
    mask: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    connectivity: int = 26,
    thresholds: SizeThresholds | None = None,
    scores: np.ndarray | None = None,
) -> tuple[np.ndarray, list[Lesion]]:
    """Label ``mask`` and describe its lesions, numbered by :func:`number_lesions` (1 = the
    largest): returns ``(labels, lesions)`` with label value ``n`` = ``lesions[n - 1]``, whose
    ``id`` is ``n``; a lesion's confidence is the maximum of ``scores`` (the logit map) inside it."""
    labels, k = label_components(mask, connectivity)
    return number_lesions(labels, lesion_table(labels, spacing, thresholds=thresholds, scores=scores, k=k))


def remove_small_components(mask: np.ndarray, spacing: Sequence[float], min_size: MinLesionSize | None,
                            connectivity: int = 26) -> np.ndarray:
    """``mask`` without its connected components smaller than ``min_size`` (a new bool array;
    the same values when ``min_size`` is None)."""
    keep = np.asarray(mask) != 0
    if min_size is None:
        return keep
    labels, k = label_components(keep, connectivity)
    small = component_sizes(labels, k) < min_size.min_voxels(spacing)
    small[0] = False
    return keep & ~small[labels] if small.any() else keep
