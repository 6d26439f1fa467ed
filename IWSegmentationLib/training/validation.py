"""Validation during training: whole cases through the inference code path, lesion-wise metrics."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..core.confidence import probability_to_logit
from ..data.cases import load_case, with_automatic_organ
from ..evaluation.matching import match_case
from ..evaluation.report import evaluate_cases, operating_points_of_cases
from .config import MERGE_WARNING_DICE, MERGE_WARNING_RECALL

if TYPE_CHECKING:
    from .config import TrainConfig


def validate(model, cases: Sequence, config: TrainConfig, card: Mapping[str, Any], *, device=None,
             cache: dict | None = None, verbose: bool = True) -> dict:
    """Lesion-wise evaluation of ``model`` on whole validation cases.

    Each case is predicted with :func:`inference.predict_volume` (the checkpoint's own
    preprocessing, sliding window of ``val_patch_size`` with ``val_overlap``), matched with
    :func:`metrics.match_case` ranking each component by its maximum logit (as ``iwseg predict``
    and ``iwseg evaluate --logits`` do, so the best checkpoint is chosen on the same CPM), and
    the report built by :func:`metrics.evaluate_cases`.
    ``cache`` (a dict) keeps loaded cases between validations. Returns the report (see
    :func:`metrics.evaluate_cases`) with ``operating_points`` (the card's section,
    :func:`~IWSegmentationLib.evaluation.report.operating_points_of_cases`: the logit thresholds of
    1/8 ... 8 FP/scan on this validation); the model is left in eval mode.
    """
    from tqdm import tqdm  # lazy: `iwseg` starts without tqdm (~0.25 s)

    from ..inference.predict import predict_volume  # lazy: imports torch

    thresholds = config.size_groups()
    hit_rule, min_size = config.detection_rule()
    results = []
    bar = tqdm(cases, desc="validating", unit="case", leave=False, disable=not (verbose and config.progress))
    for record in bar:
        volume = cache.get(record.id) if cache is not None else None
        if volume is None:
            volume = load_case(record)
            if config.auto_organ_mask:  # as training prepared it, as predict masks it
                volume = with_automatic_organ(volume, card["preprocessing"])
            if cache is not None:
                cache[record.id] = volume
        pred = predict_volume(model, volume.image, card, geometry=volume.geometry, organ_mask=volume.organ,
                              device=device or "cpu", overlap=config.val_overlap, channels_last=False)
        results.append(match_case(pred.logits, volume.lesion, volume.geometry.spacing_zyx,
                                  threshold=config.threshold, thresholds=thresholds,
                                  connectivity=config.connectivity, case=record.id,
                                  hit_rule=hit_rule, min_lesion_size=min_size, score="logit"))
    bar.close()
    report = evaluate_cases(results, seed=config.seed)
    if results:
        report["operating_points"] = operating_points_of_cases(
            results, floor_logit=probability_to_logit(config.threshold)).as_dict()
    return report


def metric_row(report: Mapping[str, Any] | None) -> dict[str, float | None]:
    """The flat ``val_*`` numbers of a validation report (CSV columns, TensorBoard, best metric)."""
    if not report:
        return {}
    row = {
        "val_cpm": report.get("cpm"),
        "val_avg_recall_0_5": report.get("avg_recall_0_5"),
        "val_object_dice": (report.get("object_dice") or {}).get("mean"),
        "val_recall": report.get("recall"),
    }
    # no lesion hit: object Dice is undefined, but the detection it should temper is 0 as well
    dice = row["val_object_dice"] if row["val_object_dice"] is not None or row["val_cpm"] is None else 0.0
    row["val_cpm_object_dice"] = harmonic_mean(row["val_cpm"], dice)
    for group, sub in (report.get("by_size") or {}).items():
        row[f"val_{group}_avg_recall_0_5"] = sub.get("avg_recall_0_5")
        row[f"val_{group}_cpm"] = sub.get("cpm")
        row[f"val_{group}_object_dice"] = (sub.get("object_dice") or {}).get("mean")
    return row


def compact_metrics(report: Mapping[str, Any] | None, epoch: int) -> dict | None:
    """The validation numbers stored in the model card (no per-case lists, no curves);
    ``epoch`` is the 1-based number of the epoch they were measured after, ``score`` what ranked
    the components (``logit``: their maximum logit)."""
    if not report:
        return None

    def part(sub: Mapping[str, Any]) -> dict:
        od = sub.get("object_dice") or {}
        boot = sub.get("bootstrap") or {}
        return {
            "n_lesions": sub.get("n_lesions"),
            "recall": sub.get("recall"),
            "cpm": sub.get("cpm"),
            "cpm_std": (boot.get("cpm") or {}).get("std"),
            "avg_recall_0_5": sub.get("avg_recall_0_5"),
            "avg_recall_0_5_std": (boot.get("avg_recall_0_5") or {}).get("std"),
            "object_dice": od.get("mean"),
            "object_dice_std": od.get("std"),
        }

    out = {"epoch": epoch, "n_images": report.get("n_images"), "hit_rule": report.get("hit_rule"),
           "score": report.get("score"), **part(report)}
    out["by_size"] = {g: part(sub) for g, sub in (report.get("by_size") or {}).items()}
    return out


def harmonic_mean(a: float | None, b: float | None) -> float | None:
    """``2ab / (a + b)`` of two scores in [0, 1] (0 when both are 0; None when either is undefined)."""
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return None
    return 2.0 * a * b / (a + b) if a + b > 0 else 0.0


def merging_warning(report: Mapping[str, Any] | None) -> str | None:
    """A warning when validation recall is high but object Dice is below 0.1: the model likely
    paints blobs that cover several lesions at once (the paper's hit rule counts one such blob
    as a hit for each of them). None otherwise."""
    row = metric_row(report)
    recall, dice = row.get("val_recall"), row.get("val_object_dice")
    if recall is None or dice is None or recall < MERGE_WARNING_RECALL or dice >= MERGE_WARNING_DICE:
        return None
    return (f"warning: validation recall {recall:.2f} with object Dice {dice:.3f} (< {MERGE_WARNING_DICE:g}): "
            "predicted components probably merge several lesions; check with val_hit_rule=one-to-one "
            "(docs/metrics.md, hit rules)")


def metric_value(report: Mapping[str, Any] | None, name: str) -> float | None:
    """Validation metric ``name`` (``cpm``, ``dice``, ...) of an evaluation ``report`` as a float, or
    None when there is no report or the value is undefined (NaN, no lesions): what picks the best epoch."""
    value = metric_row(report).get(f"val_{name}")
    return None if value is None or not math.isfinite(float(value)) else float(value)
