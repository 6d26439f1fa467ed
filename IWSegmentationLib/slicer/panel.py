"""What the Slicer panel shows, computed without Qt or Slicer (so it is tested in plain Python).

The scripted module (``IWSegmentation/IWSegmentation.py``) stays thin: it asks this module
for the texts, rows and warnings and only puts them into widgets.

* :class:`ProgressState` turns the backend's JSON-lines events into a percentage and a
  status line with the stage and the ETA;
* :func:`model_card_rows` summarises a checkpoint's model card (modality, preset, patch
  size, loss, threshold, validation metrics);
* :func:`check_volume_shape` refuses 2D and multi-component volumes;
  :func:`compatibility_warnings` says when a checkpoint does not fit the volume (modality,
  organ-mask preset) so the user can confirm or stop;
* :func:`describe_devices` words the device probe's answer, with a low-memory warning;
* :func:`lesion_cells` formats a lesion-table row (the rows themselves come from
  :func:`IWSegmentationLib.slicer.mrml.lesion_rows`); :func:`detection_counts` makes the
  recall / false-positive line of the confidence slider; :func:`result_texts` says what a run
  found, "no lesions found" included, with the backend's summary and its guards' warnings;
* :func:`confidence_slider_text` labels the confidence slider in expected false positives per
  scan and recall (the card's operating points), :func:`default_confidence` is where it starts;
  :func:`not_shown_text` says how many lesions the display budget left out, :func:`show_more_button`
  is the button that shows them; :func:`fill_lesion_table` puts the rows into the table widget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence, Sized

from ..core.confidence import probability_to_logit
from ..core.errors import InputError
from ..core.lesion_guards import LesionSummary
from ..core.lesion_sizes import SIZE_GROUP_COLORS, parse_size_thresholds
from ..core.modality import guess_modality, modality_mismatch
from ..core.operating_points import OperatingPoints
from ..core.organs import totalsegmentator_roi
from ..core.progress import ProgressEvent
from ..nn.model_card import card_modality, card_spacing, license_summary, organ_mask_need
from .lesion_row import LesionRow

#: Free GPU memory (MiB) under which the panel warns: the paper network at a 128³ patch needs
#: about 2 GiB with batch 1 in fp32; the backend retries smaller batches and falls back to CPU.
LOW_GPU_MEMORY_MB = 2048
#: Device choices shown in the panel -> ``iwseg predict --device`` values (a subset of ``core.devices.DEVICES``).
DEVICE_CHOICES = {"Auto": "auto", "CUDA": "cuda", "CPU": "cpu"}

# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------

STAGE_LABELS = {
    "start": "Starting",
    "load": "Loading",
    "preprocess": "Preprocessing",
    "inference": "Running the network",
    "postprocess": "Finding lesions",
    "write": "Writing results",
    "case_done": "Reading results",
    "done": "Reading results",
    "error": "Failed",
}

#: Percent of the whole run at which each stage starts and ends (inference is most of it).
STAGE_SPANS = {
    "start": (0, 2),
    "load": (2, 8),
    "preprocess": (8, 12),
    "inference": (12, 90),
    "postprocess": (90, 95),
    "write": (95, 98),
    "case_done": (98, 99),
    "done": (99, 99),
}


def format_eta(seconds: float | None) -> str:
    """``"ETA 1 min 05 s"``, ``"ETA 12 s"``, ``"ETA 2 h 03 min"``; empty when unknown."""
    if seconds is None or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        return ""
    s = int(round(seconds))
    if s < 60:
        return f"ETA {s} s"
    if s < 3600:
        return f"ETA {s // 60} min {s % 60:02d} s"
    return f"ETA {s // 3600} h {(s % 3600) // 60:02d} min"


@dataclass
class ProgressState:
    """Percent and status text of a run, updated from each :class:`ProgressEvent`.

    The percentage never goes back (a late ``load`` event after ``inference`` does not move the
    bar backwards); warnings are collected for the log.
    """

    percent: int = 0
    text: str = "Starting"
    warnings: list[str] = field(default_factory=list)
    device: str | None = None
    #: the last ``case_done`` event's ``summary`` (:class:`~IWSegmentationLib.core.lesion_guards.LesionSummary`), if any
    summary: LesionSummary | None = None

    def update(self, event: ProgressEvent) -> None:
        stage = event.stage
        if stage == "case_done" and isinstance(event.get("summary"), Mapping):
            try:
                self.summary = LesionSummary.from_dict(event.get("summary"))
            except (KeyError, TypeError):
                self.summary = None  # a backend that words it otherwise: the plain texts then
        if stage == "warning":
            message = str(event.get("message") or "warning")
            self.warnings.append(message)
            self.text = f"Warning: {message}"
            return
        if stage == "start" and event.get("device"):
            self.device = str(event.get("device"))
        label = STAGE_LABELS.get(stage, stage.capitalize())
        span = STAGE_SPANS.get(stage)
        if span is not None:
            lo, hi = span
            fraction = event.fraction if stage == "inference" else None
            self.percent = max(self.percent, int(lo + (hi - lo) * fraction) if fraction is not None else lo)
        if stage == "inference" and event.get("total"):
            eta = format_eta(event.get("eta_s"))
            label = f"{label}: window {event.get('done')} of {event.get('total')}" + (f" · {eta}" if eta else "")
        elif stage == "load" and event.get("message"):
            label = f"{label} {event.get('message')}"
        elif stage == "error":
            label = f"Failed: {event.get('message') or 'error'}"
        if self.device and stage in ("start", "load", "preprocess", "inference"):
            label = f"{label} (on {self.device})"
        self.text = label


# --------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------


def _fmt_number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 10:
        return str(int(value))
    return f"{value:.3g}"


def _metric_items(metrics: Any, limit: int = 6) -> list[str]:
    """Flatten ``{name: number}`` (one level of nesting, e.g. per size group) into ``name value``."""
    if not isinstance(metrics, Mapping):
        return []
    items = []
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            items.append(f"{key} {_fmt_number(value)}")
        elif isinstance(value, Mapping):
            items.extend(f"{key}/{k} {_fmt_number(v)}" for k, v in value.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool))
    return items[:limit]


def model_card_rows(card: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(label, value)`` rows summarising a checkpoint's model card for the panel."""
    if not isinstance(card, Mapping):
        raise InputError(f"model card must be a mapping, got {type(card).__name__}")
    pre = card.get("preprocessing") if isinstance(card.get("preprocessing"), Mapping) else {}
    rows: list[tuple[str, str]] = []
    rows.append(("Modality", card_modality(card) or "unknown"))
    preset = str(pre.get("name") or card.get("preset") or "unknown")
    if pre.get("mask"):
        preset += f" (organ mask: {pre['mask']})"
    rows.append(("Preset", preset))
    patch = card.get("patch_size")
    if isinstance(patch, Sequence) and not isinstance(patch, str):
        rows.append(("Patch size", " × ".join(str(p) for p in patch)))
    elif patch is not None:
        rows.append(("Patch size", str(patch)))
    spacing = card_spacing(card)  # z, y, x; shown x × y × z, as Slicer lists a volume's spacing
    rows.append(("Spacing", "input's own (not recorded)" if spacing is None else
                 " × ".join("input's" if s is None else f"{s:.3g}" for s in spacing[::-1]) + " mm (input resampled to it)"))
    loss = card.get("loss")
    if isinstance(loss, Mapping):
        loss = loss.get("name") or ", ".join(f"{k}={v}" for k, v in loss.items())
    rows.append(("Training loss", str(loss or "unknown")))
    if card.get("threshold") is not None:
        rows.append(("Threshold", _fmt_number(card.get("threshold"))))
    sizes = card_size_thresholds(card)
    if sizes is not None:
        rows.append(("Size groups", f"small < {sizes[0]:g} mm ≤ medium < {sizes[1]:g} mm ≤ large"))
    metrics = _metric_items(card.get("validation_metrics"))
    rows.append(("Validation", ", ".join(metrics) if metrics else "no metrics recorded"))
    rows.append(("Licence", license_summary(card)))  # "not stated" for a card that states none
    for key, label in (("library_version", "Library"), ("created", "Created")):
        if card.get(key):
            rows.append((label, str(card[key])))
    return rows


@dataclass(frozen=True)
class OrganMaskHint:
    """What the organ-mask selector says for a model card (:func:`organ_mask_hint`): its
    ``label``, the text of its empty choice (``none_display``), its ``tooltip``; ``required``:
    the model was trained on organ-masked input; ``automatic``: an empty choice runs with the
    automatic mask the backend makes (``preprocessing.automatic_organ_mask``, the CT lungs)."""

    label: str
    none_display: str
    tooltip: str
    required: bool = False
    automatic: bool = False

    def show(self, label: Any, selector: Any) -> None:
        """Put the texts on the module's label and node selector (any objects with these attributes)."""
        label.text, selector.noneDisplay = self.label, self.none_display
        label.toolTip = selector.toolTip = self.tooltip


def organ_mask_hint(card: Mapping[str, Any] | None) -> OrganMaskHint:
    """The organ-mask selector's texts for ``card`` (None or {}: no checkpoint yet).

    A model that needs no mask: optional. One that needs a mask with an automatic one (ct-lung):
    the empty choice is the automatic mask, made by the backend (the module sends no mask).
    One that needs a mask without an automatic one: the empty choice says to choose it, and the
    tooltip names TotalSegmentator's structure (its 3D Slicer extension makes it) and "Allow
    unmasked" (``--allow-unmasked``, not as trained)."""
    generic = ("A segmentation of the organ (its segments are merged; voxels outside it are background). "
               "Models trained on organ-masked input need it.")
    if not card:
        return OrganMaskHint("Organ mask (optional):", "None", generic)
    need = organ_mask_need(card)
    organ = need.organ or "organ"
    if not need.required:
        return OrganMaskHint("Organ mask (optional):", "None (the model needs no organ mask)",
                             generic.replace("Models trained on organ-masked input need it.",
                                             "This model was not trained on organ-masked input; a mask only "
                                             "limits where it looks."))
    get_it = (f"TotalSegmentator's {totalsegmentator_roi(need.organ)} (its 3D Slicer extension makes it from the CT), "
              f"or any segmentation of the {organ}")
    if need.automatic:
        return OrganMaskHint(
            f"Organ mask ({organ}):", f"Automatic {organ} mask",
            f"The model was trained on {organ}-masked input (model card organ_mask). Leave 'Automatic {organ} mask' "
            f"and the backend makes it from the CT (the mask iwseg train used), or choose your own: {get_it}.",
            required=True, automatic=True)
    return OrganMaskHint(
        f"Organ mask ({organ}, required):", f"None: choose the {organ} mask",
        f"The model was trained on {organ}-masked input (model card organ_mask) and there is no automatic {organ} "
        f"mask: choose a segmentation of the {organ}, e.g. {get_it}. 'Allow unmasked' runs without one (not as "
        "trained: expect many false positives).", required=True)


def model_card_text(card: Mapping[str, Any]) -> str:
    """The rows of :func:`model_card_rows` as ``Label: value`` lines."""
    return "\n".join(f"{label}: {value}" for label, value in model_card_rows(card))


def card_size_thresholds(card: Mapping[str, Any]) -> tuple[float, float] | None:
    """The checkpoint's ``(small_mm, large_mm)`` size cut-offs, if it records them."""
    sizes = card.get("size_thresholds") if isinstance(card, Mapping) else None
    if sizes is None:
        return None
    try:
        thresholds = parse_size_thresholds(sizes)
    except InputError:
        return None  # a card the panel cannot read is shown without its size groups, not refused
    return thresholds.small_mm, thresholds.large_mm


# --------------------------------------------------------------------------------------------
# The input volume
# --------------------------------------------------------------------------------------------


def check_volume_shape(dimensions_xyz: Sequence[int], components: int, name: str = "input volume") -> None:
    """Refuse what the 3D network cannot take: a missing image, 2D slices, vector/RGB voxels."""
    if dimensions_xyz is None or len(dimensions_xyz) != 3 or any(int(d) <= 0 for d in dimensions_xyz):
        raise InputError(f"{name} has no image data")
    if any(int(d) == 1 for d in dimensions_xyz):
        raise InputError(
            f"{name} is 2D ({' × '.join(str(int(d)) for d in dimensions_xyz)} voxels); a 3D volume is needed"
        )
    if int(components) != 1:
        raise InputError(
            f"{name} has {int(components)} components per voxel (vector or colour image); "
            "a single-component (scalar) volume is needed"
        )


def dicom_modality(instance_uids: str | None, database: Any) -> str | None:
    """The DICOM Modality (0008,0060) of a volume's first instance, read from Slicer's DICOM
    database (``slicer.dicomDatabase``), or None for a volume not loaded from DICOM."""
    uids = (instance_uids or "").split()
    if not uids or database is None:
        return None
    return database.fileValue(database.fileForInstance(uids[0]), "0008,0060") or None


def compatibility_warnings(
    card: Mapping[str, Any], *, minimum: float, maximum: float, dicom_modality: str | None = None,
) -> list[str]:
    """Reasons to doubt that the checkpoint fits this volume; empty when nothing is suspicious."""
    pre = card.get("preprocessing") if isinstance(card.get("preprocessing"), Mapping) else {}
    expected = card_modality(card)
    warnings = []
    guess = guess_modality(minimum, maximum, dicom_modality)
    why = modality_mismatch(expected, minimum, maximum, dicom_modality)
    if why:
        warnings.append(f"The model was trained on {expected} ({pre.get('name', 'its preset')}) but {why}.")
    clip = pre.get("clip")
    if expected == "CT" and isinstance(clip, Sequence) and len(clip) == 2 and guess == "CT" and maximum < clip[0]:
        warnings.append(f"The volume lies entirely below the preset's window {clip[0]:g} … {clip[1]:g}.")
    if pre.get("mask"):
        warnings.append(
            f"The model's preset ({pre.get('name')}) was trained with a {pre['mask']} mask applied; without "
            f"it, findings outside the {pre['mask']} are more likely to be false positives."
        )
    return warnings


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------


def describe_devices(info: Mapping[str, Any] | None, choice: str = "auto",
                     low_mb: int = LOW_GPU_MEMORY_MB) -> tuple[str, str | None]:
    """``(text, warning)`` for the device row, from :class:`~IWSegmentationLib.backend.device_probe.DeviceProbe`'s answer."""
    if info is None:
        return "Checking devices…", None
    if not info.get("torch"):
        reason = info.get("error") or "PyTorch is not installed"
        return "PyTorch not available yet", f"{reason}. It will be installed when you press Apply."
    gpus = list(info.get("cuda") or [])
    if not gpus:
        text = "Apple GPU (MPS) available" if info.get("mps") else "No CUDA GPU: inference runs on the CPU"
        warning = "CUDA was chosen but no CUDA GPU is available." if choice == "cuda" else None
        return text, warning
    gpu = gpus[0]
    free, total = gpu.get("free_mb"), gpu.get("total_mb")
    text = f"{gpu.get('name', 'GPU')}: {free / 1024:.1f} of {total / 1024:.1f} GiB free"
    if len(gpus) > 1:
        text += f" (+{len(gpus) - 1} more)"
    warning = None
    if choice != "cpu" and isinstance(free, (int, float)) and free < low_mb:
        warning = (f"Low GPU memory ({free} MiB free): inference retries with smaller batches and falls back to "
                   "the CPU if needed. Close other GPU programs to keep it fast.")
    return text, warning


# --------------------------------------------------------------------------------------------
# Lesion table and detection counts
# --------------------------------------------------------------------------------------------

#: "Run on" choices: the backend on this computer, or an ``iwseg serve`` server (docs/server.md).
RUN_ON = ("this computer", "server")
#: The "Run on" widgets of the module's .ui and the signal after which the model card is read again.
RUN_ON_SIGNALS = {"runOnComboBox": "currentIndexChanged(int)", "serverUrlLineEdit": "editingFinished()",
                  "serverTokenFileLineEdit": "editingFinished()"}

LESION_COLUMNS = ("Lesion", "Diameter (mm)", "Volume (mm³)", "Size", "Max logit", "Dice", "Status", "Doubt")


def doubt_cell(doubt: Mapping[str, Any] | None) -> str:
    """The lesion table's *Doubt* cell: ``⚠ 1/2`` (doubtful: found by 1 of 2 members, or a spread
    above ``core.doubt.DOUBT_SD_LOGIT``), ``8/8`` (not doubtful), ``–`` (no TTA or ensemble)."""
    if not doubt:
        return "–"
    found = f"{doubt.get('found_by')}/{doubt.get('members')}"
    return f"⚠ {found}" if doubt.get("doubtful") else found


def _fmt(value: Any, digits: int) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{float(value):.{digits}f}"


def _shown(lesion: LesionRow, threshold: float) -> bool:
    confidence = lesion.get("confidence")
    return confidence is None or float(confidence) >= threshold


def lesion_cells(row: LesionRow) -> list[str]:
    """The texts of one lesion-table row, one per :data:`LESION_COLUMNS`.

    ``row`` is a row of :func:`IWSegmentationLib.slicer.mrml.lesion_rows` (built there from the scene
    and the reference match; this only formats it): name, diameter (mm, 1 decimal), volume
    (mm³, whole), size group, confidence (the maximum logit, 2 decimals), Dice (2 decimals) and
    status (``TP``, ``FP``, ``FN``) and doubt (:func:`doubt_cell`). What a row does not have (no
    reference, no logit map, no TTA or ensemble) shows as ``–``.
    """
    return [
        str(row.get("name") or f"Lesion {row.get('id')}"), _fmt(row.get("diameter_mm"), 1),
        _fmt(row.get("volume_mm3"), 0), str(row.get("size_group") or "–"), _fmt(row.get("confidence"), 2),
        _fmt(row.get("dice"), 2), str(row.get("status") or "–"), doubt_cell(row.get("doubt")),
    ]


@dataclass(frozen=True)
class DetectionCounts:
    """What a confidence cut-off keeps: lesions shown/hidden and, with a reference, TP/FP/recall."""

    shown: int
    hidden: int
    detected: int | None = None
    false_positives: int | None = None
    reference_lesions: int | None = None

    @property
    def recall(self) -> float | None:
        if not self.reference_lesions:
            return None
        return self.detected / self.reference_lesions

    def text(self) -> str:
        base = f"{self.shown} lesion{'s' if self.shown != 1 else ''} shown, {self.hidden} hidden"
        if self.reference_lesions is None:
            return base
        recall = "–" if self.recall is None else f"{self.recall:.0%}"
        fp = self.false_positives
        return (f"{base} · recall {recall} ({self.detected} of {self.reference_lesions} reference lesions)"
                f" · {fp} false positive{'s' if fp != 1 else ''}")


def detection_counts(
    components: Iterable[LesionRow], threshold: float,
    references: Iterable[LesionRow] | None = None,
) -> DetectionCounts:
    """Counts at confidence cut-off ``threshold`` (a logit: confidences are maximum logits),
    with the definitions of :mod:`IWSegmentationLib.evaluation`.

    A detected lesion is shown when its ``confidence >= threshold`` (always, without a
    confidence). With ``references``: a reference lesion is *detected* when ``hit_dice > 0``
    and its ``confidence`` (that of its best-matching detection) is ``>= threshold``; a false
    positive is a shown detection with ``hit_dice == 0``. These are the TP and FP of one
    point of the FROC curve, so moving the slider walks along it.
    """
    components = list(components)
    shown = sum(_shown(c, threshold) for c in components)
    if references is None:
        return DetectionCounts(shown, len(components) - shown)
    references = list(references)
    detected = sum((r.get("hit_dice") or 0) > 0 and r.get("confidence") is not None
                   and float(r["confidence"]) >= threshold for r in references)
    false_positives = sum(_shown(c, threshold) and not (c.get("hit_dice") or 0) > 0 for c in components)
    return DetectionCounts(shown, len(components) - shown, detected, false_positives, len(references))


def result_texts(found: int, seconds: float, summary: LesionSummary | None = None) -> tuple[str, str]:
    """``(status line, summary line)`` after a successful run that found ``found`` lesions.

    Given the backend's ``summary`` (:attr:`ProgressState.summary`), the summary line is its one
    line (count, largest lesion, share of the organ or body), and the status line carries the
    guards' warnings (:mod:`IWSegmentationLib.core.lesion_guards`: a lesion over a few % of the
    body, hundreds of lesions), as ``iwseg predict`` prints them."""
    if not found:
        return f"Done in {seconds:.0f} s: no lesions found.", "No lesions found above the segmentation threshold."
    status = f"Done in {seconds:.0f} s."
    if summary is None:
        return status, f"{found} lesion{'s' if found != 1 else ''} found (one segment each)"
    warnings = summary.warnings()
    if warnings:
        status = f"{status} Warning: {' '.join(w[0].upper() + w[1:] + '.' for w in warnings)}"
    return status, f"{summary.line()} (one segment each)"


#: How many lesions become segments by default (the display budget): the most confident, by
#: maximum logit. Every segment costs scene time (5,000 took 17 s and 20,000 took 146 s, issue 23;
#: docs/benchmarks.md has the numbers of today's code), and a reader reviews the most confident first;
#: the rest are counted and one click away ("Show next", which adds this many at a time).
DEFAULT_SEGMENT_BUDGET = 200

#: The confidence slider's range (logits), as the module's parameter node declares it.
CONFIDENCE_RANGE = (-5.0, 50.0)


def _operating_points(card: Mapping[str, Any] | None) -> OperatingPoints | None:
    try:
        return OperatingPoints.of_card(card)
    except InputError:  # a broken section: the card view says so; the slider falls back to logits
        return None


def default_confidence(card: Mapping[str, Any] | None) -> float:
    """Where the confidence slider starts (a logit), documented in docs/module.md: the card's
    1 FP/scan operating point (:data:`~IWSegmentationLib.core.operating_points.DEFAULT_FP_PER_SCAN`;
    else its nearest stored rate), or, for a card without operating points, the logit of the
    card's threshold (0 for 0.5), which every lesion of the run lies above: all are shown.
    Clamped to the slider's range."""
    points = _operating_points(card)
    if points is not None:
        value = points.default().logit_threshold
    else:
        threshold = card.get("threshold", 0.5) if isinstance(card, Mapping) else 0.5
        try:
            value = probability_to_logit(float(threshold))
        except (InputError, TypeError, ValueError):
            value = 0.0
    low, high = CONFIDENCE_RANGE
    return min(max(float(value), low), high)


def confidence_slider_text(card: Mapping[str, Any] | None, logit: float) -> str:
    """The confidence slider's label: what hiding the lesions below ``logit`` means on the model's
    validation (:meth:`~IWSegmentationLib.core.operating_points.OperatingPoints.at_logit`: expected
    FP/scan and recall, interpolated between the nearest stored points), or, for a card without
    operating points, that it has none (said in this one line)."""
    points = _operating_points(card)
    if points is None:
        threshold = card.get("threshold", 0.5) if isinstance(card, Mapping) else 0.5
        return (f"max logit ≥ {logit:.2f}. This model's card has no operating points (written before they were "
                f"stored): the run uses its threshold {_fmt_number(threshold)}.")
    label = points.at_logit(logit)
    return f"max logit ≥ {logit:.2f}: {label.text}; hit rule {points.hit_rule}"


def not_shown_text(not_shown: int, budget: int) -> str:
    """The line under the lesion table when the display budget left lesions out ('' when none)."""
    if not_shown <= 0:
        return ""
    return (f"{not_shown} more lesion(s), less confident, are counted but not shown as segments "
            f"(the {budget} most confident are); “Show next {budget}” adds them.")


@dataclass(frozen=True)
class ShowMoreButton:
    """What the "Show next N lesions" button under the lesion table shows (:func:`show_more_button`)."""

    text: str
    tooltip: str
    visible: bool

    def show(self, button: Any) -> None:
        """Put the state on the module's button (any object with these attributes)."""
        button.text, button.toolTip, button.visible = self.text, self.tooltip, self.visible


def show_more_button(not_shown: Sized | None, budget: int) -> ShowMoreButton:
    """The button for a result whose display budget left ``not_shown`` lesions out (None: none):
    it offers the next ``budget`` and is visible only when some were left out."""
    count = len(not_shown) if not_shown is not None else 0
    return ShowMoreButton(f"Show next {budget} lesions", not_shown_text(count, budget), count > 0)


def fill_lesion_table(table: Any, rows: Sequence[LesionRow], item: Callable[[str], Any]) -> None:
    """Put ``rows`` into the module's lesion table (a ``QTableWidget``): the :data:`LESION_COLUMNS`
    headers, one table row each, its :func:`lesion_cells` made into cells by ``item``
    (``qt.QTableWidgetItem``), then the columns fitted. No rows: the empty table with its headers."""
    table.setColumnCount(len(LESION_COLUMNS))
    table.setHorizontalHeaderLabels(list(LESION_COLUMNS))
    table.setRowCount(len(rows))
    for r, row in enumerate(rows):
        for c, text in enumerate(lesion_cells(row)):
            table.setItem(r, c, item(text))
    table.resizeColumnsToContents()


def legend_html(colors: Mapping[str, Sequence[int]] = SIZE_GROUP_COLORS) -> str:
    """The size-colour legend for a rich-text label: one coloured square per size group."""
    swatches = (f'<span style="background-color:#{r:02X}{g:02X}{b:02X}">&nbsp;&nbsp;&nbsp;&nbsp;</span>&nbsp;{group}'
                for group, (r, g, b) in colors.items())
    return "Size groups: " + " &nbsp; ".join(swatches)


# ---------------------------------------------------------------------------- widget state
# Decisions the module's widget applies to Qt; kept here so they are tested without Qt.


@dataclass(frozen=True)
class ApplyButtonState:
    """What the Apply/Cancel button shows."""

    text: str
    enabled: bool
    tooltip: str


def apply_button_state(*, running: bool, ready: bool, installing: bool = False) -> ApplyButtonState:
    """The Apply button for the current state.

    While Python packages are installed the button is disabled: ``pip_install`` processes GUI
    events, and a second click would start a second pip into the same site-packages.
    """
    if installing:
        return ApplyButtonState("Apply", False, "Installing Python packages (see the Python console)…")
    if running:
        return ApplyButtonState("Cancel", True, "Stop the backend; the scene is left unchanged")
    if ready:
        return ApplyButtonState("Apply", True, "Segment the lesions")
    return ApplyButtonState("Apply", False, "Select an input volume and a checkpoint")


def device_probe_is_stale(devices: Mapping[str, Any] | None) -> bool:
    """True when the device line was probed before torch was installed (probe again after Apply)."""
    return devices is not None and devices.get("torch") is None


class GuiBinding:
    """Connects the module's widgets to one parameter node, once per node.

    On Slicer 5.6 and 5.8 ``connectGui`` returns None instead of a tag (fixed in 5.10 by
    b5a65a49a0), so ``disconnectGui`` cannot undo it, and connecting again on each enter piles
    up connectors (re-entering the module reset Device to Auto). So: a node already connected
    is not connected again; :meth:`release` disconnects only what has a tag, and otherwise
    leaves the (harmless) connection in place and remembers it.
    """

    def __init__(self, gui: Any) -> None:
        self.gui = gui
        self._wrapper: Any = None
        self._tag: Any = None

    @staticmethod
    def _mrml_node(wrapper: Any) -> Any:
        return getattr(wrapper, "parameterNode", wrapper)

    def is_bound_to(self, wrapper: Any) -> bool:
        """True if the GUI is connected to ``wrapper``'s MRML node (wrappers are made afresh each time)."""
        return (wrapper is not None and self._wrapper is not None
                and self._mrml_node(wrapper) is self._mrml_node(self._wrapper))

    def bind(self, wrapper: Any) -> bool:
        """Connect the GUI to ``wrapper`` unless it already is; True if it connected now."""
        if wrapper is None or self.is_bound_to(wrapper):
            return False
        self.release()
        self._wrapper, self._tag = wrapper, wrapper.connectGui(self.gui)
        return True

    def release(self) -> None:
        """Disconnect the GUI where a tag allows it (Slicer >= 5.10); else keep the connection."""
        if self._wrapper is not None and self._tag is not None:
            self._wrapper.disconnectGui(self._tag)
            self._wrapper = self._tag = None

    def forget(self) -> None:
        """The bound node is gone (scene closed): the next node is connected even without a tag."""
        self.release()
        self._wrapper = self._tag = None
