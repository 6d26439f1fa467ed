"""Lesion sizes and names without numpy: connectivities, size groups and their cut-offs, the
voxel-spacing check, the minimum lesion size, and how a lesion is named and coloured.

Kept apart from :mod:`IWSegmentationLib.core.lesions` (which labels arrays and needs numpy) so that
what only *describes* lesions -- the prediction options (:mod:`IWSegmentationLib.predict.options`),
the job contract the Slicer module and the inference server's client share -- loads nothing but
the standard library. :mod:`~IWSegmentationLib.core.lesions` imports every name here, so either
module may be imported for them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

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
        voxel_mm3 = math.prod(check_spacing(spacing))
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
