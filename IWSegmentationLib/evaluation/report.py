"""The evaluation report of a set of cases (what ``iwseg evaluate`` and validation write)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from ..core.errors import InputError
from ..core.lesions import (
    SIZE_GROUPS,
)
from ..core.operating_points import OperatingPoints
from .bootstrap import (
    BOOTSTRAP_FRACTION,
    N_BOOTSTRAP,
    CasePool,
    check_bootstrap_mode,
    check_cases,
    pooled_summary,
)
from .froc import operating_points

if TYPE_CHECKING:
    from .froc import Froc
    from .matching import CaseResult


def evaluate_cases(
    cases: Sequence[CaseResult],
    *,
    n_resamples: int = N_BOOTSTRAP,
    fraction: float = BOOTSTRAP_FRACTION,
    seed: int = 0,
    bootstrap_mode: str = "ours",
) -> dict:
    """The evaluation report over images, JSON-ready (undefined values are None).

    Keys: ``n_images, n_lesions, recall, object_dice{mean,std,n}, cpm, avg_recall_0_5,
    froc{fp_per_image,recall,threshold}, bootstrap{cpm{mean,std}, avg_recall_0_5{mean,std}, n,
    mode, seed}, hit_rule, score`` (what the confidences and FROC thresholds are: ``logit`` or
    ``probability``, :data:`~IWSegmentationLib.evaluation.matching.SCORES`), ``by_size{small,medium,large -> the same fields}, cases[...]`` (in input
    order, see :meth:`CaseResult.as_dict`). ``recall`` is at the segmentation threshold (every
    component counts). A FROC threshold of None is the added (0, 0) point (τ = ∞).
    ``bootstrap_mode`` is one of :data:`BOOTSTRAP_MODES` (see :func:`bootstrap`).
    """
    ordered = check_cases(cases)
    check_bootstrap_mode(bootstrap_mode)
    rules = sorted({c.hit_rule for c in ordered})
    if len(rules) > 1:
        raise InputError(f"cases were matched with different hit rules ({', '.join(rules)}); pool one rule at a time")
    scores = sorted({c.score for c in ordered})
    if len(scores) > 1:
        raise InputError(f"cases rank their components by different scores ({', '.join(scores)}); a logit and a "
                         "probability are not comparable: pool one kind at a time")
    pool = CasePool.from_cases(ordered)
    report = pooled_summary(pool, None, n_resamples, fraction, seed, bootstrap_mode)
    report["hit_rule"] = rules[0]
    report["score"] = scores[0]
    report["by_size"] = {g: pooled_summary(pool, g, n_resamples, fraction, seed, bootstrap_mode) for g in SIZE_GROUPS}
    report["cases"] = [c.as_dict() for c in cases]
    return report


def froc_of_cases(cases: Sequence[CaseResult], size_group: str | None = None) -> Froc:
    """The pooled FROC curve of a list of cases (all lesions, or one size group)."""
    return CasePool.from_cases(check_cases(cases)).froc(size_group)


def operating_points_of_cases(cases: Sequence[CaseResult], *, floor_logit: float,
                              epoch: int | None = None) -> OperatingPoints:
    """The operating points (:func:`~IWSegmentationLib.evaluation.froc.operating_points`) of the
    pooled FROC of ``cases``, whose components must be ranked by their maximum logit
    (``score="logit"``: a stored threshold is a logit); ``floor_logit`` is the logit of the
    threshold the components were found at, ``epoch`` the validation's (1-based)."""
    ordered = check_cases(cases)
    if any(c.score != "logit" for c in ordered):
        raise InputError("operating points need components ranked by their maximum logit (score='logit')")
    rules = sorted({c.hit_rule for c in ordered})
    if len(rules) > 1:
        raise InputError(f"cases were matched with different hit rules ({', '.join(rules)}); pool one rule at a time")
    hit_conf, fp_conf, n_images = CasePool.from_cases(ordered).select()
    points = operating_points(hit_conf, fp_conf, n_images, floor_logit=floor_logit)
    return OperatingPoints(points=tuple(points), hit_rule=rules[0], n_images=int(n_images),
                           n_lesions=int(len(hit_conf)), epoch=epoch)
