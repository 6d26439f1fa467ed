"""Per-lesion records: evaluate from matched lesions and components instead of images.

``iwseg evaluate --records FILE`` pools :class:`~IWSegmentationLib.evaluation.CaseResult` objects
read from a file rather than computed from masks. Three formats are read:

* **The inverse-weighting authors' ``prc_records.json``** (``froc_data/*/prc_records.json`` in
  the public repository ``neuro-ml/inverse_weighting``): a JSON object mapping each image id to
  a list of objects. An object with ``"is_tum": true`` is a reference lesion (``obj`` =
  ``"tum_<k>"``); one with ``"is_tum": false`` is a predicted component (``"pred_<k>"``). Both
  carry ``hit_dice`` (the best-match Dice, 0 if none) and ``hit_obj``. A lesion's confidence is
  the score of its matched component, ``hit_logit`` (or ``hit_stat``, its maximum probability);
  a component's own is ``self_logit`` (or ``self_stat``). ``diameter`` (mm) is optional. The
  file also holds ``Infinity`` / ``-Infinity``, which Python's ``json`` reads.
  **Scores:** the authors ranked by logits. Their probabilities are float16 and saturate at
  1.0 for most detections, and the order among those ties matters: on their LiTS Dice records,
  putting every tied lesion before (after) every tied false positive gives a bootstrap CPM of
  0.65 (0.51). ``score="logit"`` is the default; it reproduces Table 2 (0.616 vs .62).
* **Our JSON report** (``iwseg evaluate --json``): its ``cases`` list; its ``score`` says
  whether the confidences are logits or probabilities (probabilities when absent: reports
  written before confidences were logits).
* **Our per-lesion CSV** (``iwseg evaluate --csv``): rows of ``kind`` ``lesion`` and
  ``false_positive``; the ``score`` column as the report's (probabilities when absent).

Records carry no voxels, so the voxel Dice of such cases is undefined (NaN).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterable

from ..core.errors import InputError
from ..core.lesions import SizeThresholds
from .matching import SCORES, CaseResult, ComponentResult, LesionResult

RECORD_SCORES = ("logit", "stat")
#: What each of the authors' scores is, as :data:`~IWSegmentationLib.evaluation.matching.SCORES` names it.
_RECORD_SCORE_KIND = {"logit": "logit", "stat": "probability"}
_NO_BOX = (0, 0, 0, 0, 0, 0)
_NO_CENTROID = (math.nan, math.nan, math.nan)


def load_records(path: Path, thresholds: SizeThresholds, *, score: str = "logit") -> list[CaseResult]:
    """Read per-lesion records (any of the three formats above) as one CaseResult per image."""
    path = Path(path)
    if score not in RECORD_SCORES:
        raise InputError(f"records score must be one of {', '.join(RECORD_SCORES)}, got {score!r}")
    if not path.is_file():
        raise InputError(f"records file not found: {path}")
    if path.suffix.lower() == ".csv":
        return _from_csv(path, thresholds)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"records file {path} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("cases"), list):
        return _from_report(data["cases"], path, thresholds, _score_kind(data.get("score"), str(path)))
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        return _from_authors(data, path, thresholds, score)
    raise InputError(f"records file {path}: neither an iwseg evaluate report (a 'cases' list) nor the "
                     "authors' prc_records.json (image id -> list of objects)")


def _diameter_fields(diameter, volume, thresholds: SizeThresholds) -> dict:
    """Volume, diameter and size group from whichever of the two is known (group None if neither)."""
    d = _number(diameter)
    v = _number(volume)
    if d is None and v is not None:
        d = (6.0 * v / math.pi) ** (1.0 / 3.0)
    if v is None and d is not None:
        v = math.pi * d ** 3 / 6.0
    return {"volume_mm3": math.nan if v is None else v, "diameter_mm": math.nan if d is None else d,
            "size_group": None if d is None else thresholds.group(d)}


def _number(value) -> float | None:
    if value is None or value == "":
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _lesion(id: int, hit_dice: float, confidence, component, geometry: dict) -> LesionResult:
    hit = hit_dice > 0
    return LesionResult(id=id, voxels=0, centroid=_NO_CENTROID, bbox=_NO_BOX, **geometry, hit_dice=hit_dice,
                        component=component if hit else None, confidence=float(confidence) if hit else None)


def _component(id: int, hit_dice: float, confidence: float, lesion, geometry: dict) -> ComponentResult:
    return ComponentResult(id=id, voxels=0, centroid=_NO_CENTROID, bbox=_NO_BOX, **geometry,
                           confidence=float(confidence), hit_dice=hit_dice, lesion=lesion if hit_dice > 0 else None)


def _case(name: str, lesions: list, components: list, score: str) -> CaseResult:
    return CaseResult(case=name, lesions=lesions, components=components, threshold=math.nan,
                      spacing=(math.nan,) * 3, ref_voxels=0, pred_voxels=0, overlap_voxels=0, score=score)


def _score_kind(value, where: str) -> str:
    """A report's or CSV row's ``score`` (absent: ``probability``, as files written before logits)."""
    kind = value or "probability"
    if kind not in SCORES:
        raise InputError(f"{where}: score must be one of {', '.join(SCORES)}, got {value!r}")
    return kind


# --------------------------------------------------------------------------------------
# The authors' prc_records.json
# --------------------------------------------------------------------------------------


def _object_id(text: Any, prefix: str, where: str) -> int | None:
    """``"tum_3"`` -> 3, ``"pred_None"`` -> None."""
    text = str(text)
    if not text.startswith(prefix):
        raise InputError(f"{where}: expected an id like {prefix}<n>, got {text!r}")
    tail = text[len(prefix):]
    return None if tail == "None" else int(tail)


def _from_authors(data: dict, path: Path, thresholds: SizeThresholds, score: str) -> list[CaseResult]:
    cases = []
    for image, objects in data.items():
        lesions, components = [], []
        for i, obj in enumerate(objects):
            where = f"{path}: image {image!r}, object {i}"
            try:
                is_lesion = bool(obj["is_tum"])
                hit_dice = float(obj["hit_dice"])
                geometry = _diameter_fields(obj.get("diameter"), None, thresholds)
                if is_lesion:
                    conf = obj[f"hit_{score}"] if hit_dice > 0 else None
                    lesions.append(_lesion(_object_id(obj["obj"], "tum_", where), hit_dice, conf,
                                           _object_id(obj.get("hit_obj", "pred_None"), "pred_", where), geometry))
                else:
                    components.append(_component(_object_id(obj["obj"], "pred_", where), hit_dice,
                                                 float(obj[f"self_{score}"]),
                                                 _object_id(obj.get("hit_obj", "tum_None"), "tum_", where), geometry))
            except (KeyError, TypeError, ValueError) as exc:
                raise InputError(f"{where}: not a prc_records object ({type(exc).__name__}: {exc})") from None
        cases.append(_case(str(image), lesions, components, _RECORD_SCORE_KIND[score]))
    return cases


# --------------------------------------------------------------------------------------
# Our own report and CSV
# --------------------------------------------------------------------------------------


def _from_report(entries: Iterable, path: Path, thresholds: SizeThresholds, score: str) -> list[CaseResult]:
    cases = []
    for i, entry in enumerate(entries):
        try:
            lesions = [_lesion(int(x["id"]), float(x["hit_dice"]), x["confidence"], None,
                               _diameter_fields(x.get("diameter_mm"), x.get("volume_mm3"), thresholds))
                       for x in entry["lesions"]]
            components = [_component(int(x["id"]), float(x["hit_dice"]), float(x["confidence"]), None,
                                     _diameter_fields(x.get("diameter_mm"), x.get("volume_mm3"), thresholds))
                          for x in entry["components"]]
            cases.append(_case(str(entry["case"]), lesions, components, score))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{path}: case entry {i} is not an iwseg evaluate case "
                             f"({type(exc).__name__}: {exc})") from None
    return cases


def _from_csv(path: Path, thresholds: SizeThresholds) -> list[CaseResult]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"case", "kind", "hit_dice", "confidence", "diameter_mm"} - set(reader.fieldnames or ())
        if missing:
            raise InputError(f"{path}: not an iwseg evaluate CSV with false-positive rows (missing column(s) "
                             f"{', '.join(sorted(missing))}); write it again with iwseg evaluate --csv")
        rows = list(reader)
    by_case: dict[str, tuple[list, list]] = {}
    kinds: dict[str, str] = {}
    for line, row in enumerate(rows, start=2):
        lesions, components = by_case.setdefault(row["case"], ([], []))
        kinds.setdefault(row["case"], _score_kind(row.get("score"), f"{path}, line {line}"))
        try:
            geometry = _diameter_fields(row["diameter_mm"], row.get("volume_mm3"), thresholds)
            if row["kind"] == "lesion":
                lesions.append(_lesion(int(row["lesion_id"]), float(row["hit_dice"]), _number(row["confidence"]),
                                       None, geometry))
            elif row["kind"] == "false_positive":
                components.append(_component(int(row["matched_component"]), 0.0, float(row["confidence"]), None,
                                             geometry))
            elif row["kind"] != "image":
                raise ValueError(f"kind {row['kind']!r} is not lesion, false_positive or image")
        except (TypeError, ValueError) as exc:
            raise InputError(f"{path}, line {line}: {exc}") from None
    return [_case(name, les, comp, kinds[name]) for name, (les, comp) in by_case.items()]
