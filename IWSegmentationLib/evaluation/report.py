"""The evaluation report of a set of cases (what ``iwseg evaluate`` and validation write)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

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
from .froc import cpm, json_float, operating_points

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


#: A hit whose Dice is below this is a *low-Dice hit*: the rule counts the lesion as found though
#: the component barely delineates it (a chest-wide blob touching a nodule has Dice ~ 0.003).
LOW_HIT_DICE = 0.05

#: Two hit rules *disagree* when their CPMs (or recalls) differ by more than this.
RULE_DISAGREEMENT = 0.1


def low_dice_hits(cases: Sequence[CaseResult]) -> int:
    """Lesions hit (``hit_dice > 0``) with ``hit_dice <`` :data:`LOW_HIT_DICE`."""
    return sum(1 for c in cases for les in c.lesions if 0 < les.hit_dice < LOW_HIT_DICE)


def detection_summary(cases: Sequence[CaseResult]) -> dict:
    """The headline numbers of a set of cases, for a side-by-side row: ``recall`` (at the segmentation
    threshold), ``fp_per_image``, ``cpm``, mean ``object_dice`` and ``low_dice_hits``."""
    pool = CasePool.from_cases(check_cases(cases))
    return {"recall": json_float(pool.recall()), "fp_per_image": sum(c.n_false_positives for c in cases) / len(cases),
            "cpm": json_float(cpm(pool.froc())), "object_dice": pool.object_dice()["mean"],
            "low_dice_hits": low_dice_hits(cases)}


def compare_hit_rules(results: Mapping[str, Sequence[CaseResult]]) -> dict:
    """The same cases matched under several hit rules (``{rule: cases}``), side by side.

    Returns ``{"rules": [{hit_rule, recall, fp_per_image, cpm, object_dice, low_dice_hits}, ...],
    "disagree": bool, "reasons": [...]}``. The rules *disagree* when two CPMs or two recalls differ
    by more than :data:`RULE_DISAGREEMENT`, or when any rule counts a hit with Dice below
    :data:`LOW_HIT_DICE` (low-Dice hits): then the detection numbers depend on the rule, not on
    the model alone, and neither should be quoted without the other.
    """
    rows = [{"hit_rule": rule, **detection_summary(cases)} for rule, cases in results.items()]
    reasons = []
    for key, name in (("cpm", "CPM"), ("recall", "recall")):
        values = [r[key] for r in rows if r[key] is not None]
        if len(values) > 1 and max(values) - min(values) > RULE_DISAGREEMENT:
            spread = ", ".join(f"{r[key]:.3f} ({r['hit_rule']})" for r in rows if r[key] is not None)
            reasons.append(f"{name} differs by more than {RULE_DISAGREEMENT:g} between the hit rules: {spread}")
    for r in rows:
        if r["low_dice_hits"]:
            reasons.append(f"{r['low_dice_hits']} hit(s) under hit rule {r['hit_rule']} have Dice < {LOW_HIT_DICE:g} "
                           "(low-Dice hits: the lesion counts as found though the component barely overlaps it)")
    return {"rules": rows, "disagree": bool(reasons), "reasons": reasons}


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
