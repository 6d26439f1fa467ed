"""The model card: a checkpoint's JSON description, as one typed, versioned, validated record.

A checkpoint (:mod:`IWSegmentationLib.nn.checkpoint`) stores its model card as a JSON string in
the safetensors header. :class:`ModelCard` is the one place that says what a card may hold:
``ModelCard.from_dict(d, source=path)`` checks the **whole** card once -- every field typed,
every number finite and bounded, free-form sections nested at most :data:`MAX_DEPTH` deep --
and raises :class:`~IWSegmentationLib.core.errors.CheckpointError` naming the checkpoint and the
field. ``to_dict()`` gives back the plain JSON dict, in the on-disk format (unchanged), so
callers that take a dict keep working. Field meanings: ``docs/checkpoints.md``.

Why limits: a card is data from a file that anyone can edit, and its numbers size real
allocations (the sliding window, resampling, the network). Without bounds a crafted
``patch_size`` of ``[10**6] * 3`` or a ``target_spacing`` of ``1e-9`` mm asks for terabytes,
and a card nested 100 000 levels deep overflows the parser's stack. The bounds below are far
above any real model (the paper: 128^3 patches, 0.7-5 mm spacing) and are documented.

No torch here: the Slicer GUI reads cards without importing it.
"""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..core.errors import CheckpointError, InputError
from ..core.lesion_sizes import MIN_SIZE_UNITS, SIZE_PRESETS, MinLesionSize, parse_size_thresholds
from ..core.operating_points import OperatingPoints
from ..preprocessing.presets import MAX_CROP_MARGIN, PRESETS, automatic_mask_available, validate_params
from .architecture import validate_config

FORMAT = "iwsegmentation.checkpoint"
#: Bumped only when a reader of the previous version would misread a new file; adding an
#: optional model-card field does not bump it. Readers accept versions <= their own.
FORMAT_VERSION = 1

#: Model-card fields the caller must give (the rest have defaults or are filled in).
REQUIRED_FIELDS = ("patch_size", "preprocessing")
#: Fields :func:`~IWSegmentationLib.nn.checkpoint.save_checkpoint` fills in itself; a caller's
#: values for them are replaced.
AUTOMATIC_FIELDS = (
    "format", "format_version", "architecture", "library_version", "torch_version",
    "created", "num_parameters", "weights_sha256",
)
#: Optional fields and their defaults (always present in a written card).
OPTIONAL_FIELDS: dict[str, Any] = {
    "threshold": 0.5,
    "loss": None,
    "size_thresholds": None,
    "training_data": None,
    "validation_metrics": None,
    "description": "",
    "license": "not stated",
}
#: Optional fields written only when set: the sliding-window defaults, the training settings,
#: the smallest lesion kept at inference and the organ crop (a margin in voxels).
SECTION_FIELDS = ("inference", "training", "min_lesion_size", "crop_to_organ", "organ_mask")
#: Optional field written only when known: the training voxel spacing ``[sz, sy, sx]`` mm (the
#: median over the training cases after any ``preprocessing.target_spacing``), which inference
#: resamples its input to (:func:`card_spacing`). A card without it keeps the input's grid.
SPACING_FIELD = "spacing"

# ---------------------------------------------------------------------------------- limits
#: Largest side of ``patch_size`` (and of ``inference.patch_size``) in voxels.
MAX_PATCH_SIDE = 512
#: Smallest side of ``patch_size`` in voxels: a 1^3 patch made 131,072 windows of one voxel (a 9-day ETA).
MIN_PATCH_SIDE = 8
#: Largest number of voxels of one window: 256^3 (the paper's 128^3 is 8 times less).
MAX_PATCH_VOXELS = 256 ** 3
#: Allowed range of each ``preprocessing.target_spacing`` entry, in mm.
SPACING_RANGE_MM = (0.01, 100.0)
#: Largest size-group cut-off (equivalent diameter), in mm.
MAX_SIZE_THRESHOLD_MM = 1000.0
#: Deepest nesting of a free-form section (``training_data``, ``validation_metrics``, ...).
MAX_DEPTH = 32
#: Largest ``min_lesion_size`` value (voxels or mm^3): 1e9.
MAX_MIN_LESION_SIZE = 1e9

# ---------------------------------------------------------------------------------- licence
#: ``license`` of a card that states none: the default of ``iwseg train`` and of every card
#: written before the field existed (a model's licence is its owner's to state, not ours to guess).
LICENSE_NOT_STATED = OPTIONAL_FIELDS["license"]
#: Longest ``license`` expression and ``license_url``, and longest ``license_text`` (characters;
#: the Apache-2.0 text is about 11 000).
MAX_LICENSE_CHARS, MAX_LICENSE_URL_CHARS, MAX_LICENSE_TEXT_CHARS = 200, 2048, 200_000
#: One licence id of an SPDX expression: ``Apache-2.0``, ``GPL-2.0+``, ``LicenseRef-my-terms``,
#: ``DocumentRef-spdx-doc:LicenseRef-x``; joined by ``AND``/``OR``/``WITH`` and parentheses.
_SPDX_OPERATORS = ("AND", "OR", "WITH")
_SPDX_ID = re.compile(r"^(DocumentRef-[A-Za-z0-9.\-]+:)?[A-Za-z0-9][A-Za-z0-9.\-]*\+?$")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _where(source: str | os.PathLike) -> str:
    """Message prefix: ``checkpoint PATH: model card`` for a file, else ``source`` itself."""
    if isinstance(source, os.PathLike):
        return f"checkpoint {os.fspath(source)}: model card"
    return str(source)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Checker:
    """Builds the error messages of one card: every one names the source and the field."""

    def __init__(self, source: str | os.PathLike):
        self.where = _where(source)

    def fail(self, key: str, what: str, value: Any) -> CheckpointError:
        return CheckpointError(f"{self.where} field {key!r} {what}, got {_show(value)}")

    def number(self, value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(key, "must be a finite number", value)
        return float(value)

    def integer(self, value: Any, key: str, low: int, high: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            span = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise self.fail(key, f"must be an integer {span}", value)
        return int(value)

    def text(self, value: Any, key: str, *, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise self.fail(key, "must be a string", value)
        return value

    def patch(self, value: Any, key: str) -> tuple[int, int, int]:
        """Three window sides (an int ``n`` means ``n^3``) within the limits."""
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value] * 3
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            raise self.fail(key, "must be 3 positive ints (z, y, x)", value)
        sides = tuple(self.integer(v, key, MIN_PATCH_SIDE, MAX_PATCH_SIDE) for v in value)
        if math.prod(sides) > MAX_PATCH_VOXELS:
            raise self.fail(key, f"must hold at most {MAX_PATCH_VOXELS} voxels (256^3)", value)
        return sides  # type: ignore[return-value]

    def free_form(self, value: Any, key: str) -> Any:
        """A strict-JSON value (dicts with string keys, lists, strings, finite numbers, booleans,
        null) nested at most :data:`MAX_DEPTH` deep; returned as a deep copy. Iterative, so a
        crafted deep value cannot overflow the stack."""
        stack = [(value, 1, key)]
        while stack:
            item, depth, where = stack.pop()
            if depth > MAX_DEPTH:
                raise self.fail(key, f"is nested more than {MAX_DEPTH} levels deep (at {where})", "...")
            if isinstance(item, Mapping):
                for k, v in item.items():
                    if not isinstance(k, str):
                        raise self.fail(key, f"must have string keys (at {where})", k)
                    stack.append((v, depth + 1, f"{where}.{k}"))
            elif isinstance(item, (list, tuple)):
                stack.extend((v, depth + 1, f"{where}[{i}]") for i, v in enumerate(item))
            elif isinstance(item, float) and not math.isfinite(item):
                raise self.fail(key, f"must be strict JSON, without NaN or infinity (at {where})", item)
            elif item is not None and not isinstance(item, (str, int, float, bool)):
                raise self.fail(key, f"must be plain JSON (at {where})", item)
        return copy.deepcopy(value)

    def section(self, value: Any, key: str) -> dict | None:
        """An optional free-form JSON object."""
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise self.fail(key, "must be a JSON object or null", value)
        return dict(self.free_form(value, key))


@dataclass(frozen=True)
class ModelCard:
    """A checkpoint's model card, validated (build it with :meth:`from_dict`).

    The fields are those of ``docs/checkpoints.md``; ``extra`` holds keys this version does
    not know (kept, so a card written by a newer minor version survives a re-save).
    """

    architecture: dict[str, Any]
    patch_size: tuple[int, int, int]
    preprocessing: dict[str, Any]
    threshold: float = 0.5
    loss: str | dict[str, Any] | None = None
    #: As written: a size-preset name, ``[small_mm, large_mm]`` or
    #: ``{"small_mm", "large_mm", "preset"?}`` (see :meth:`size_groups`).
    size_thresholds: str | list[float] | dict[str, Any] | None = None
    min_lesion_size: MinLesionSize | None = None
    inference: dict[str, Any] | None = None
    training_data: dict[str, Any] | None = None
    validation_metrics: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    #: Margin (voxels of the network's grid) of the organ box inference crops to when given an
    #: organ mask, as the network was trained (``crop_to_organ``); None: the whole volume.
    crop_to_organ: int | None = None
    #: Whether inference needs an organ mask, and which organ: ``{"organ", "required", "automatic",
    #: "source"}`` (:func:`organ_mask_need`; None in a card written before it: read from the preset).
    organ_mask: dict[str, Any] | None = None
    #: The validation's operating points (``core.operating_points.OperatingPoints.as_dict``): the
    #: logit threshold and recall at 1/8 ... 8 FP/scan; None in a card written before them.
    operating_points: dict[str, Any] | None = None
    #: The training voxel spacing ``(sz, sy, sx)`` in mm (``spacing``; see :func:`card_spacing`).
    spacing: tuple[float, float, float] | None = None
    description: str = ""
    #: The model's licence: an SPDX expression (``Apache-2.0``, ``CC-BY-NC-4.0``,
    #: ``LicenseRef-...``) or ``"not stated"``; a URL and the full text are optional.
    license: str = LICENSE_NOT_STATED
    license_url: str | None = None
    license_text: str | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    library_version: str | None = None
    torch_version: str | None = None
    created: str | None = None
    num_parameters: int | None = None
    weights_sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, card: Mapping[str, Any], *, source: str | os.PathLike = "checkpoint metadata") -> ModelCard:
        """Validate a card dict and return the record.

        ``source`` names the card in messages: a path (``checkpoint PATH: model card ...``) or
        a description (default ``checkpoint metadata``, for a card about to be saved). Every
        problem raises :class:`CheckpointError` (an :class:`InputError`, exit code 2).
        """
        check = _Checker(source)
        if not isinstance(card, Mapping):
            raise CheckpointError(f"{check.where} must be a JSON object, got {type(card).__name__}")
        missing = [k for k in ("architecture", *REQUIRED_FIELDS) if card.get(k) is None]
        if missing:
            raise CheckpointError(
                f"{check.where} lacks {', '.join(missing)}: a checkpoint must say how to reproduce a "
                "prediction (see docs/checkpoints.md)"
            )
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        extra = {k: check.free_form(v, k) for k, v in card.items() if k not in known}
        return cls(
            architecture=_architecture(card["architecture"], check),
            patch_size=check.patch(card["patch_size"], "patch_size"),
            preprocessing=_preprocessing(card["preprocessing"], check),
            threshold=_threshold(card.get("threshold", OPTIONAL_FIELDS["threshold"]), check),
            loss=_loss(card.get("loss"), check),
            size_thresholds=_size_thresholds(card.get("size_thresholds"), check),
            min_lesion_size=_min_lesion_size(card.get("min_lesion_size"), check),
            inference=_inference(card.get("inference"), check),
            training_data=check.section(card.get("training_data"), "training_data"),
            validation_metrics=check.section(card.get("validation_metrics"), "validation_metrics"),
            training=check.section(card.get("training"), "training"),
            crop_to_organ=(None if card.get("crop_to_organ") is None
                           else check.integer(card["crop_to_organ"], "crop_to_organ", 0, MAX_CROP_MARGIN)),
            organ_mask=_organ_mask(card.get("organ_mask"), check),
            operating_points=_operating_points(card.get("operating_points"), check),
            spacing=_spacing(card.get(SPACING_FIELD), check),
            description=check.text(card.get("description", ""), "description") or "",
            license=_license(card.get("license", LICENSE_NOT_STATED), check),
            license_url=_license_url(card.get("license_url"), check),
            license_text=_license_text(card.get("license_text"), check),
            format=_format(card.get("format", FORMAT), check),
            format_version=check.integer(card.get("format_version", FORMAT_VERSION), "format_version", 1,
                                         FORMAT_VERSION),
            library_version=check.text(card.get("library_version"), "library_version", optional=True),
            torch_version=check.text(card.get("torch_version"), "torch_version", optional=True),
            created=check.text(card.get("created"), "created", optional=True),
            num_parameters=(None if card.get("num_parameters") is None
                            else check.integer(card["num_parameters"], "num_parameters", 0)),
            weights_sha256=_sha256(card.get("weights_sha256"), check),
            extra=extra,
        )

    def to_dict(self) -> dict[str, Any]:
        """The card as the JSON dict stored in a checkpoint (a fresh copy)."""
        out: dict[str, Any] = {
            "format": self.format,
            "format_version": self.format_version,
            "architecture": self.architecture,
            "patch_size": list(self.patch_size),
            "preprocessing": self.preprocessing,
            "threshold": self.threshold,
            "loss": self.loss,
            "size_thresholds": self.size_thresholds,
            "training_data": self.training_data,
            "validation_metrics": self.validation_metrics,
            "description": self.description,
            "license": self.license,
        }
        for key in ("license_url", "license_text"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        for key in ("library_version", "torch_version", "created", "num_parameters", "weights_sha256"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        for key in SECTION_FIELDS:
            value = getattr(self, key)
            if value is not None:
                out[key] = value.as_dict() if isinstance(value, MinLesionSize) else value
        if self.operating_points is not None:  # written only when measured
            out["operating_points"] = self.operating_points
        if self.spacing is not None:
            out[SPACING_FIELD] = list(self.spacing)
        out.update(self.extra)
        return copy.deepcopy(out)

    # ------------------------------------------------------------------------------ views
    @property
    def in_channels(self) -> int:
        """Image channels the network takes (``architecture.in_channels``; see :func:`card_in_channels`)."""
        return card_in_channels(self.to_dict())

    @property
    def modality(self) -> str | None:
        """The modality the model was trained on (see :func:`card_modality`)."""
        return card_modality(self.to_dict())

    def size_groups(self):
        """The card's size groups as :class:`~IWSegmentationLib.core.lesions.SizeThresholds`, or None
        when it records none (each of the three written shapes is understood)."""
        return None if self.size_thresholds is None else parse_size_thresholds(self.size_thresholds)


def check_license(license: Any, license_url: Any = None, *, source: str = "model card") -> None:
    """Refuse a ``license`` that is not an SPDX expression (or ``"not stated"``) or a
    ``license_url`` that is not an http(s) URL, as a card would (:class:`CheckpointError`, an
    :class:`InputError`, naming ``source`` and the field); ``iwseg train`` checks its config
    with it before training rather than at the first checkpoint."""
    check = _Checker(source)
    _license(LICENSE_NOT_STATED if license is None else license, check)
    _license_url(license_url, check)


def license_summary(card: Mapping[str, Any]) -> str:
    """One line saying a card's licence, for ``iwseg inspect`` and the module's card summary:
    ``Apache-2.0 (https://...)``, ``... (full text in the card)``, or ``not stated`` for a card
    that states none (every card written before the field existed)."""
    value = card.get("license") if isinstance(card, Mapping) else None
    text = value if isinstance(value, str) and value.strip() else LICENSE_NOT_STATED
    url = card.get("license_url") if isinstance(card, Mapping) else None
    if isinstance(url, str) and url:
        text += f" ({url})"
    if isinstance(card, Mapping) and isinstance(card.get("license_text"), str) and card["license_text"]:
        text += " (full text in the card: license_text)"
    return text


def _operating_points(value: Any, check: _Checker) -> dict[str, Any] | None:
    """The ``operating_points`` section, validated by :class:`OperatingPoints` (None: not stored)."""
    return None if value is None else OperatingPoints.from_dict(value, check.where).as_dict()


def card_modality(card: Mapping[str, Any]) -> str | None:
    """The modality a model was trained on, ``"CT"``, ``"MR"`` or ``"other"``: the card's
    ``preprocessing.modality`` (every preset has one), the one place it is read from; None for a
    card without it (not a card of this package)."""
    pre = card.get("preprocessing") if isinstance(card, Mapping) else None
    value = pre.get("modality") if isinstance(pre, Mapping) else None
    return value.strip().upper() if isinstance(value, str) and value.strip() else None


def card_spacing(card: Mapping[str, Any]) -> tuple[float | None, float | None, float | None] | None:
    """The voxel spacing ``(sz, sy, sx)`` mm inference resamples its input to, or None (keep the
    input's grid). In order: the card's ``spacing`` (what ``iwseg train`` records: the median
    training spacing after ``target_spacing``); for a card written before that field, the same
    median as older versions kept it (``training_data.median_spacing_zyx``), else
    ``preprocessing.target_spacing`` (its ``None`` entries keep that axis of the input)."""
    if not isinstance(card, Mapping):
        return None
    candidates = [card.get(SPACING_FIELD)]
    data = card.get("training_data")
    if isinstance(data, Mapping):
        candidates.append(data.get("median_spacing_zyx"))
    pre = card.get("preprocessing")
    if isinstance(pre, Mapping):
        candidates.append(pre.get("target_spacing"))
    low, high = SPACING_RANGE_MM
    for value in candidates:
        if (isinstance(value, (list, tuple)) and len(value) == 3
                and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and low <= v <= high)
                        for v in value)
                and any(v is not None for v in value)):
            return tuple(None if v is None else float(v) for v in value)  # type: ignore[return-value]
    return None


def card_in_channels(card: Mapping[str, Any]) -> int:
    """How many image channels a model card's network takes: ``architecture.in_channels``. A card
    written before multi-channel input (no such key) means 1, which is what those networks took:
    :func:`~IWSegmentationLib.nn.architecture.validate_config` fills the key in with 1 when it is
    missing, so an old card needs no new format version."""
    arch = card.get("architecture") if isinstance(card, Mapping) else None
    value = arch.get("in_channels", 1) if isinstance(arch, Mapping) else 1
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else 1


def check_in_channels(card: Mapping[str, Any], channels: int, what: str) -> None:
    """Refuse an input of ``channels`` image channels for a model that takes another number,
    saying what the model expects (:class:`InputError` naming ``what``, the input)."""
    expected = card_in_channels(card)
    if channels != expected:
        names = "one image file" if expected == 1 else f"{expected} channel files (case_0000, case_0001, ...)"
        raise InputError(
            f"{what} has {channels} image channel(s) but the model takes {expected} "
            f"(model card architecture.in_channels = {expected}); give {names} per case, in the channel "
            "order it was trained on"
        )


@dataclass(frozen=True)
class OrganMaskNeed:
    """What a model needs as its organ mask: the ``organ`` its inputs were masked to (None: no
    mask), whether inference ``required`` one (the network never saw unmasked input), whether
    an ``automatic`` mask exists for it (``preprocessing.automatic_organ_mask``: the CT lungs),
    and where training's masks came from (``source``: ``dataset``, ``automatic``,
    ``dataset+automatic``, ``none``; ``preset`` for a card written before the field)."""

    organ: str | None
    required: bool
    automatic: bool
    source: str

    def as_dict(self) -> dict[str, Any]:
        return {"organ": self.organ, "required": self.required, "automatic": self.automatic, "source": self.source}


#: Where a model's training organ masks came from (``organ_mask.source``).
ORGAN_MASK_SOURCES = ("dataset", "automatic", "dataset+automatic", "none", "preset")


def organ_mask_need(card: Mapping[str, Any]) -> OrganMaskNeed:
    """The card's ``organ_mask`` (written by ``iwseg train``), or for a card written before the
    field, what its preset says: a preset that names an organ (``ct-lung``: lung, ``ct-liver``:
    liver) masks every case that has a mask, so the model is taken to need one (``source:
    preset``); an automatic mask exists for the CT lungs."""
    preprocessing = card.get("preprocessing") if isinstance(card, Mapping) else None
    preprocessing = preprocessing if isinstance(preprocessing, Mapping) else {}
    written = card.get("organ_mask") if isinstance(card, Mapping) else None
    if isinstance(written, Mapping):
        return OrganMaskNeed(written.get("organ"), bool(written.get("required")), bool(written.get("automatic")),
                             str(written.get("source", "preset")))
    organ = preprocessing.get("mask")
    return OrganMaskNeed(organ, organ is not None, organ is not None and automatic_mask_available(preprocessing),
                         "preset")


# ---------------------------------------------------------------------------------- fields


def _architecture(value: Any, check: _Checker) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise check.fail("architecture", "must be a JSON object", value)
    try:
        return validate_config(dict(check.free_form(value, "architecture")))
    except CheckpointError:
        raise
    except InputError as exc:
        raise CheckpointError(f"{check.where} field 'architecture': {exc}") from None


def _preprocessing(value: Any, check: _Checker) -> dict[str, Any]:
    """A full preset dict (``preprocessing.validate_params``) of a known preset name, with a
    target spacing inside :data:`SPACING_RANGE_MM`."""
    if not isinstance(value, Mapping):
        raise check.fail("preprocessing", "must be a preset object (preprocessing.get_preset)", value)
    try:
        params = validate_params(dict(check.free_form(value, "preprocessing")))
    except CheckpointError:
        raise
    except InputError as exc:
        raise CheckpointError(f"{check.where} field 'preprocessing': {exc}") from None
    if params["name"] not in PRESETS:
        raise check.fail("preprocessing.name", f"must be a known preset ({', '.join(PRESETS)})", params["name"])
    low, high = SPACING_RANGE_MM
    for v in params["target_spacing"] or ():
        if v is not None and not low <= v <= high:
            raise check.fail("preprocessing.target_spacing", f"entries must be in [{low:g}, {high:g}] mm",
                             params["target_spacing"])
    return params


def _organ_mask(value: Any, check: _Checker) -> dict[str, Any] | None:
    """``{"organ": name or null, "required": bool, "automatic": bool, "source": one of
    ORGAN_MASK_SOURCES}`` or null."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) != {"organ", "required", "automatic", "source"}:
        raise check.fail("organ_mask", "must be {organ, required, automatic, source} or null", value)
    if value["organ"] is not None and not isinstance(value["organ"], str):
        raise check.fail("organ_mask.organ", "must be an organ name or null", value["organ"])
    for key in ("required", "automatic"):
        if not isinstance(value[key], bool):
            raise check.fail(f"organ_mask.{key}", "must be true or false", value[key])
    if value["source"] not in ORGAN_MASK_SOURCES:
        raise check.fail("organ_mask.source", f"must be one of {', '.join(ORGAN_MASK_SOURCES)}", value["source"])
    return dict(value)


def _spacing(value: Any, check: _Checker) -> tuple[float, float, float] | None:
    """Three spacings in mm (z, y, x), each within :data:`SPACING_RANGE_MM`, or None."""
    if value is None:
        return None
    low, high = SPACING_RANGE_MM
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise check.fail(SPACING_FIELD, "must be 3 spacings in mm (z, y, x)", value)
    out = tuple(check.number(v, SPACING_FIELD) for v in value)
    if not all(low <= v <= high for v in out):
        raise check.fail(SPACING_FIELD, f"entries must be in [{low:g}, {high:g}] mm", value)
    return out  # type: ignore[return-value]


def _threshold(value: Any, check: _Checker) -> float:
    t = check.number(value, "threshold")
    if not 0.0 < t < 1.0:
        raise check.fail("threshold", "must be a probability in (0, 1), 0 and 1 excluded", value)
    return t


def _loss(value: Any, check: _Checker) -> str | dict | None:
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, Mapping):
        raise check.fail("loss", "must be a loss name, {name, params} or null", value)
    return dict(check.free_form(value, "loss"))


def _size_thresholds(value: Any, check: _Checker) -> str | list[float] | dict | None:
    """One of the three written shapes, checked: a preset name, ``[small, large]`` or
    ``{small_mm, large_mm, preset?}``, with ``0 < small < large <= MAX_SIZE_THRESHOLD_MM``."""
    key = "size_thresholds"

    def preset(name: Any, where: str) -> str | None:
        if name is not None and name not in SIZE_PRESETS:
            raise check.fail(where, f"must be a size preset ({', '.join(SIZE_PRESETS)}) or null", name)
        return name

    def pair(small: Any, large: Any) -> list[float]:
        s, m = check.number(small, key), check.number(large, key)
        if not 0 < s < m <= MAX_SIZE_THRESHOLD_MM:
            raise check.fail(key, f"must be mm cut-offs with 0 < small < large <= {MAX_SIZE_THRESHOLD_MM:g}",
                             [small, large])
        return [s, m]

    if value is None:
        return None
    if isinstance(value, str):
        return preset(value, key)
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise check.fail(key, "must be [small_mm, large_mm]", value)
        return pair(*value)
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"small_mm", "large_mm", "preset"})
        if unknown or not {"small_mm", "large_mm"} <= set(value):
            raise check.fail(key, "must be {small_mm, large_mm} with an optional preset", value)
        out: dict[str, Any] = dict(zip(("small_mm", "large_mm"), pair(value["small_mm"], value["large_mm"])))
        if "preset" in value:
            out["preset"] = preset(value["preset"], "size_thresholds.preset")
        return out
    raise check.fail(key, "must be a size preset name, [small_mm, large_mm], {small_mm, large_mm} or null",
                     value)


def _min_lesion_size(value: Any, check: _Checker) -> MinLesionSize | None:
    key = "min_lesion_size"
    if value is None:
        return None
    if not isinstance(value, Mapping) or set(value) != {"value", "unit"}:
        raise check.fail(key, 'must be {"value": number > 0, "unit": "voxels" or "mm3"} or null', value)
    size = check.number(value["value"], f"{key}.value")
    if not 0 < size <= MAX_MIN_LESION_SIZE:
        raise check.fail(f"{key}.value", f"must be in (0, {MAX_MIN_LESION_SIZE:g}]", value["value"])
    if value["unit"] not in MIN_SIZE_UNITS:
        raise check.fail(f"{key}.unit", f"must be one of {', '.join(MIN_SIZE_UNITS)}", value["unit"])
    return MinLesionSize(size, value["unit"])


def _inference(value: Any, check: _Checker) -> dict | None:
    """The sliding-window defaults: ``patch_size`` (limits as ``patch_size``), ``overlap`` in
    [0, 1) and ``blend`` (a name; inference checks it); other keys are free-form."""
    out = check.section(value, "inference")
    if out is None:
        return None
    if "patch_size" in out:
        out["patch_size"] = list(check.patch(out["patch_size"], "inference.patch_size"))
    if "overlap" in out:
        overlap = check.number(out["overlap"], "inference.overlap")
        if not 0.0 <= overlap < 1.0:
            raise check.fail("inference.overlap", "must be in [0, 1)", out["overlap"])
    if "blend" in out:
        check.text(out["blend"], "inference.blend")
    return out


def _license(value: Any, check: _Checker) -> str:
    """An SPDX licence expression or :data:`LICENSE_NOT_STATED`. The ids are checked for SPDX's
    syntax, not against its list (which changes; ``LicenseRef-`` ids are anyone's)."""
    text = check.text(value, "license")
    if text == LICENSE_NOT_STATED:
        return text
    if len(text) > MAX_LICENSE_CHARS or not _is_spdx_expression(text):
        raise check.fail("license", f"must be an SPDX licence expression (e.g. 'Apache-2.0', 'CC-BY-NC-4.0', "
                         f"'LicenseRef-mine') of at most {MAX_LICENSE_CHARS} characters, or "
                         f"{LICENSE_NOT_STATED!r}", value)
    return text


def _is_spdx_expression(text: str) -> bool:
    """Whether ``text`` is ids joined by ``AND``/``OR``/``WITH`` with balanced parentheses
    (``Apache 2.0`` is not: two ids without an operator)."""
    want_operand, depth = True, 0
    for token in re.findall(r"\(|\)|[^\s()]+", text):
        if want_operand and token == "(":
            depth += 1
        elif want_operand:
            if token in _SPDX_OPERATORS or not _SPDX_ID.match(token):
                return False
            want_operand = False
        elif token == ")":
            depth -= 1
            if depth < 0:
                return False
        elif token in _SPDX_OPERATORS:
            want_operand = True
        else:
            return False
    return not want_operand and depth == 0


def _license_url(value: Any, check: _Checker) -> str | None:
    url = check.text(value, "license_url", optional=True)
    if url is not None and (not re.match(r"^https?://\S+$", url) or len(url) > MAX_LICENSE_URL_CHARS):
        raise check.fail("license_url", f"must be an http(s) URL of at most {MAX_LICENSE_URL_CHARS} characters",
                         value)
    return url


def _license_text(value: Any, check: _Checker) -> str | None:
    text = check.text(value, "license_text", optional=True)
    if text is not None and len(text) > MAX_LICENSE_TEXT_CHARS:
        raise check.fail("license_text", f"must be at most {MAX_LICENSE_TEXT_CHARS} characters", f"{len(text)} characters")
    return text


def _format(value: Any, check: _Checker) -> str:
    if value != FORMAT:
        raise check.fail("format", f"must be {FORMAT!r}", value)
    return value


def _sha256(value: Any, check: _Checker) -> str | None:
    if value is not None and not (isinstance(value, str) and _SHA256.match(value)):
        raise check.fail("weights_sha256", "must be 64 lowercase hex digits", value)
    return value
