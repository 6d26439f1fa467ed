"""Lesions: connected components of a mask, their sizes and size groups.

A *lesion* is one connected component of a binary mask (26-connectivity by default, as
the inverse-weighting paper labels its ground truth). Its size is reported as a voxel
count, a volume in mm³ and the *equivalent diameter* ``d = (6 V / π)^(1/3)`` mm, the
diameter of the sphere of the same volume. Size groups use two diameter thresholds
``s < m``: *small* if ``d < s``, *medium* if ``s <= d < m``, *large* if ``d >= m``.

How a lesion is shown is defined here too, once for every output that names one: the size
group's colour (:data:`SIZE_GROUP_COLORS`), the lesion's name (:func:`segment_name`) and its
terminology code (:data:`LESION_TERMINOLOGY`), used alike by the Slicer segments
(:mod:`IWSegmentationLib.slicer.mrml`) and the DICOM SEG (:mod:`IWSegmentationLib.core.dicom_seg`).

Arrays are ``[z, y, x]``; ``spacing`` is in the same order ``(sz, sy, sx)`` (see
:mod:`IWSegmentationLib.core.imageio`).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import InputError

CONNECTIVITIES = (6, 18, 26)
SIZE_GROUPS = ("small", "medium", "large")

#: The size-group colours, from the Okabe-Ito colour-blind-safe palette. The same values are
#: used for the Slicer segments, the legend (Resources/) and the docs: small lesions get the
#: most salient colour so they are not lost among large ones.
SIZE_GROUP_COLORS: dict[str, tuple[int, int, int]] = {
    "small": (213, 94, 0),  # vermillion  #D55E00
    "medium": (240, 228, 66),  # yellow  #F0E442
    "large": (0, 114, 178),  # blue  #0072B2
}

#: Terminology of every lesion segment (Slicer's and the DICOM SEG's): DICOM master list, category
#: SCT 49755003 "Morphologically Altered Structure", type SCT 52988006 "Lesion" (the serialised form
#: that Slicer's ``vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry`` writes).
LESION_TERMINOLOGY = (
    "Segmentation category and type - DICOM master list"
    "~SCT^49755003^Morphologically Altered Structure~SCT^52988006^Lesion~^^~~^^~^^"
)


def segment_name(number: int, diameter_mm: float, size_group: str, width: int = 2) -> str:
    """``Lesion 07 · 4.2 mm · small``: the name of lesion ``number`` (1 = the largest), zero-padded to ``width``."""
    return f"Lesion {number:0{width}d} · {diameter_mm:.1f} mm · {size_group}"


@dataclass(frozen=True)
class SizeThresholds:
    """Equivalent-diameter cut-offs in mm: small if ``d < small_mm``, large if ``d >= large_mm``."""

    small_mm: float
    large_mm: float

    def __post_init__(self):
        if not (0 < self.small_mm < self.large_mm):
            raise InputError(
                f"size thresholds must satisfy 0 < small < large, got small={self.small_mm} large={self.large_mm}"
            )

    @property
    def attribute(self) -> str:
        """``"S;L"``: how a Slicer segmentation node stores them (read back by :func:`parse_size_thresholds`)."""
        return f"{self.small_mm:g};{self.large_mm:g}"

    def group(self, diameter_mm: float) -> str:
        if diameter_mm < self.small_mm:
            return "small"
        if diameter_mm < self.large_mm:
            return "medium"
        return "large"


#: Clinical "small" cut-offs quoted by the paper (Fig. 2): lung nodules < 10 mm (Fleischner),
#: brain metastases < 5 mm, liver tumours < 12 mm. The paper does not publish the
#: medium/large cut-off; we use twice the small cut-off.
SIZE_PRESETS: dict[str, SizeThresholds] = {
    "lung": SizeThresholds(10.0, 20.0),
    "metastases": SizeThresholds(5.0, 10.0),
    "liver": SizeThresholds(12.0, 24.0),
}
DEFAULT_SIZE_PRESET = "lung"


def size_thresholds(preset: str | None = None, thresholds: Sequence[float] | None = None) -> SizeThresholds:
    """Resolve ``--size-preset`` / ``--size-thresholds S M`` into :class:`SizeThresholds`."""
    if thresholds is not None:
        if len(thresholds) != 2:
            raise InputError(f"size thresholds need two values S M in mm, got {list(thresholds)}")
        return SizeThresholds(float(thresholds[0]), float(thresholds[1]))
    preset = preset or DEFAULT_SIZE_PRESET
    if preset not in SIZE_PRESETS:
        raise InputError(f"unknown size preset {preset!r}; choose one of {', '.join(SIZE_PRESETS)}")
    return SIZE_PRESETS[preset]


def parse_size_thresholds(value: Any) -> SizeThresholds:
    """The size groups from any shape they are stored or given in, read in this one place.

    Args:
        value: None (the default preset, ``lung``); a :class:`SizeThresholds`; a preset name
            (``"liver"``); ``"S;L"`` (a segmentation node's attribute, :attr:`SizeThresholds.attribute`);
            ``(S, L)`` in mm; or a model card's ``{"small_mm": S, "large_mm": L, ...}``.

    Raises:
        InputError: any other value, or cut-offs that break ``0 < small < large``.
    """
    if value is None or isinstance(value, SizeThresholds):
        return value if value is not None else size_thresholds()
    if isinstance(value, str):
        if ";" not in value:
            return size_thresholds(value)
        value = value.split(";")
    if isinstance(value, Mapping) and {"small_mm", "large_mm"} <= set(value):
        value = (value["small_mm"], value["large_mm"])
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        try:
            return size_thresholds(None, [float(v) for v in value])
        except (TypeError, ValueError):
            pass
    raise InputError(f"size thresholds must be a preset name, (small_mm, large_mm) or 'small;large', got {value!r}")


def _check_volume(array: np.ndarray, name: str) -> None:
    if not isinstance(array, np.ndarray):
        raise InputError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.ndim != 3:
        raise InputError(f"{name} must be a 3D array [z, y, x], got shape {array.shape}")


def check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    """A voxel spacing ``(sz, sy, sx)`` in mm as three floats; :class:`InputError` unless three
    finite positive numbers (the one check for every array function that takes a spacing)."""
    try:
        sp = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        raise InputError(f"spacing must be three positive numbers sz sy sx (mm), got {spacing!r}") from None
    if len(sp) != 3 or not all(math.isfinite(v) and v > 0 for v in sp):
        raise InputError(f"spacing must be three positive numbers sz sy sx (mm), got {tuple(spacing)}")
    return sp  # type: ignore[return-value]


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


def analyze_lesions(
    mask: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    connectivity: int = 26,
    thresholds: SizeThresholds | None = None,
    scores: np.ndarray | None = None,
) -> tuple[np.ndarray, list[Lesion]]:
    """Label ``mask`` and describe its lesions: returns ``(labels, lesions)``; a lesion's
    confidence is the maximum of ``scores`` (the logit map) inside it."""
    labels, k = label_components(mask, connectivity)
    return labels, lesion_table(labels, spacing, thresholds=thresholds, scores=scores, k=k)


def relabel_by_size(labels: np.ndarray, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Renumber components so that 1 is the largest, 2 the next, ... (ties keep scan order).

    Returns ``(new_labels, order)`` where ``order[i]`` is the old id of new id ``i + 1``.
    """
    counts = component_sizes(labels, k)
    old_ids = np.arange(1, counts.size)
    order = old_ids[np.argsort(-counts[1:], kind="stable")]
    lut = np.zeros(counts.size, dtype=np.int32)
    lut[order] = np.arange(1, order.size + 1, dtype=np.int32)
    return lut[labels], order


# --------------------------------------------------------------------------------------
# Minimum predicted-lesion size
# --------------------------------------------------------------------------------------

MIN_SIZE_UNITS = ("voxels", "mm3")
_UNIT_ALIASES = {"vox": "voxels", "voxel": "voxels", "voxels": "voxels", "mm3": "mm3", "mm^3": "mm3", "mm³": "mm3"}


@dataclass(frozen=True)
class MinLesionSize:
    """Smallest predicted lesion kept: ``value`` voxels, or ``value`` mm³ (compared with the
    component's volume, voxels x voxel volume). Predicted components below it are dropped
    before lesions are counted: one- to three-voxel specks are noise, not lesions."""

    value: float
    unit: str = "voxels"

    def __post_init__(self):
        if self.unit not in MIN_SIZE_UNITS:
            raise InputError(f"minimum lesion size unit must be one of {', '.join(MIN_SIZE_UNITS)}, got {self.unit!r}")
        if not (math.isfinite(float(self.value)) and float(self.value) > 0):
            raise InputError(f"minimum lesion size must be a positive number, got {self.value!r}")

    def min_voxels(self, spacing: Sequence[float]) -> int:
        """The smallest voxel count that reaches this size on a grid of ``spacing`` (sz, sy, sx) mm."""
        if self.unit == "voxels":
            return int(math.ceil(float(self.value)))
        voxel_mm3 = float(np.prod(check_spacing(spacing)))
        return int(math.ceil(float(self.value) / voxel_mm3 - 1e-9))

    def as_dict(self) -> dict:
        """The model-card form ``{"value": float, "unit": "voxels" | "mm3"}``."""
        return {"value": float(self.value), "unit": self.unit}

    def __str__(self) -> str:
        return f"{self.value:g} {'voxel(s)' if self.unit == 'voxels' else 'mm³'}"


def parse_min_lesion_size(spec) -> MinLesionSize | None:
    """``"10vox"``, ``"10 voxels"``, ``"5mm3"``, a bare number (voxels), a card dict
    ``{"value", "unit"}``, a :class:`MinLesionSize` or None (no minimum) -> :class:`MinLesionSize`."""
    if spec is None or isinstance(spec, MinLesionSize):
        return spec
    if isinstance(spec, dict):
        if set(spec) != {"value", "unit"}:
            raise InputError(f"min_lesion_size must be {{'value': number, 'unit': 'voxels'|'mm3'}}, got {spec!r}")
        return MinLesionSize(float(spec["value"]), str(spec["unit"]))
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return MinLesionSize(float(spec), "voxels")
    found = re.fullmatch(r"([0-9.eE+-]+)\s*([a-z^³0-9]*)", str(spec).strip().lower())
    unit = (found.group(2) or "vox") if found else ""
    try:
        value = float(found.group(1)) if found else None
    except ValueError:
        value = None
    if value is None or unit not in _UNIT_ALIASES:
        raise InputError(f"minimum lesion size {spec!r}: write a number and a unit, e.g. 10vox or 5mm3")
    return MinLesionSize(value, _UNIT_ALIASES[unit])


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
