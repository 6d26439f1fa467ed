"""Lesion-wise evaluation: per-case lesion matching, FROC, CPM, average recall, object Dice.

These are the detection and delineation metrics of the inverse-weighting paper
(Shirokikh et al., MICCAI 2020, section 3.3), with the exact definitions below; the same
text, with worked examples, is in ``docs/metrics.md``.

Per case (:func:`match_case`)
    *Reference lesions* are the connected components of the reference mask; *predicted
    components* those of ``prob > t_seg`` (default 0.5), or for logits of
    ``logit > log(t_seg / (1 - t_seg))``; both labelled with the same connectivity (26 by
    default). The *confidence* of a component is the maximum score inside
    it: the maximum **logit** when the scores are logits (``score="logit"``: what ``iwseg
    predict`` blends, ``iwseg evaluate --logits`` and training validation), else the maximum
    probability (``score="probability"``, the default, for probability maps and masks from
    other tools). Logits, because a float32 sigmoid rounds to exactly 1.0 above about 17, so
    confident components would all tie at 1.0 and the FROC could not order them; the
    threshold is applied in logit space (:func:`~IWSegmentationLib.core.confidence.probability_to_logit`),
    so a positive scaling of the logits changes no mask and no ranking.
    With ``Dice(g, c) = 2|g ∩ c| / (|g| + |c|)``:

    * each lesion ``g`` is matched to the overlapping component with the highest Dice
      (ties: the higher confidence, then the lower id); ``hit_dice(g)`` is that Dice (0 when
      no component overlaps ``g``) and ``hit_conf(g)`` that component's confidence;
    * each component ``c`` has ``hit_dice(c)`` = the highest Dice over the lesions it
      overlaps (0 if none). A component with ``hit_dice = 0`` is a false positive.

    That is the paper's hit rule, the default. :class:`HitRule` adds the conditions and the
    one-to-one matchings of other lesion-wise evaluations (``hit_rule=``), and predicted
    components under a minimum size can be dropped first (``min_lesion_size=``).

Over images (:func:`evaluate_cases`)
    At a confidence threshold τ: TP = lesions with ``hit_dice > 0`` and ``hit_conf ≥ τ``;
    FP = components with ``hit_dice = 0`` and confidence ≥ τ; recall = TP / #lesions;
    FP/image = FP / #images (every image counts, also images without lesions or
    components). τ runs over every distinct component confidence, the point (0, 0) is
    added, and where several τ give the same FP/image the highest recall is kept. Recall at
    any FP/image is then read by linear interpolation (``np.interp``, clamped at the ends).

    * ``cpm``: mean recall at 1/8, 1/4, 1/2, 1, 2, 4, 8 FP/image (LUNA16); the paper's
      Table 2 "avg Recall" is this number (its bootstrap mean with ``bootstrap_mode="paper"``).
    * ``avg_recall_0_5``: mean recall over ``linspace(0, 5, 501)`` FP/image (a secondary
      figure; not the paper's "avg Recall").
    * ``recall``: hit lesions / lesions at the segmentation threshold.
    * ``object_dice``: mean and std (ddof 0) of ``hit_dice`` over lesions with ``hit_dice > 0``.
    * ``bootstrap``: 100 resamples of 80% of the images without replacement (seeded); in
      each, FP/image divides by the resample size (``mode="paper"``: the authors' variant, see
      :func:`bootstrap`); mean and std (ddof 0) of ``cpm`` and
      ``avg_recall_0_5`` over the resamples.
    * ``by_size``: the same per size group; the group's lesions are the denominator, and an
      unmatched component is an FP of the group its own equivalent diameter falls in (records
      without a size, see :mod:`IWSegmentationLib.evaluation.records`, count only in the totals).

Undefined values are ``NaN`` in Python and ``null`` in the report: recall, ``cpm`` and
``avg_recall_0_5`` when there are no reference lesions (in all images, in a size group, or
in a bootstrap resample, which is then left out of the bootstrap mean), ``object_dice``
mean/std when no lesion is hit, ``voxel_dice`` when both masks are empty.

All pairwise lesion/component overlaps of a case are counted in one pass over the
predicted voxels (a ``np.unique`` over (lesion id, component id) codes); nothing loops over
voxels, and no loop is O(lesions x components). That voxel work does not depend on the hit
rule: :func:`case_overlaps` does it once per case, and :meth:`CaseOverlaps.match` derives each
rule's matching from the overlap pairs (:func:`match_case` is the two in a row), so matching a
case under several rules (``iwseg evaluate``'s side-by-side comparison) labels it only once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from ..core.confidence import probability_to_logit
from ..core.errors import InputError
from ..core.lesions import (
    CONNECTIVITIES,
    DEFAULT_SIZE_PRESET,
    SIZE_PRESETS,
    Lesion,
    MinLesionSize,
    SizeThresholds,
    label_components,
    lesion_table,
    parse_min_lesion_size,
)
from .froc import json_float
from .hit_rules import parse_hit_rule

if TYPE_CHECKING:
    from .hit_rules import HitRule

#: What a prediction map holds, and so what a component's confidence is (its maximum of it):
#: ``logit`` (the network's blended output; ``iwseg predict --logits``) or ``probability``
#: (a probability map in [0, 1] or a 0/1 mask, e.g. from another tool).
SCORES = ("logit", "probability")


@dataclass
class LesionResult(Lesion):
    """One reference lesion (a :class:`~IWSegmentationLib.core.lesions.Lesion`) and its best-matching
    predicted component.

    ``component`` is the id of the matched component in the prediction's label map (None when
    missed) and ``confidence`` its confidence (``hit_conf``).
    """

    hit_dice: float = 0.0
    component: int | None = None

    @property
    def detected(self) -> bool:
        """Hit by a component at the segmentation threshold (``hit_dice > 0``)."""
        return self.hit_dice > 0

    def as_dict(self) -> dict:
        """The report's per-lesion entry: ``id, volume_mm3, diameter_mm, size_group, hit_dice, confidence``."""
        return {
            "id": self.id,
            "volume_mm3": json_float(self.volume_mm3),
            "diameter_mm": json_float(self.diameter_mm),
            "size_group": self.size_group,
            "hit_dice": self.hit_dice,
            "confidence": None if self.confidence is None else json_float(self.confidence),
        }


@dataclass
class ComponentResult(Lesion):
    """One predicted component (a :class:`~IWSegmentationLib.core.lesions.Lesion` whose
    ``confidence`` is its maximum score: logit or probability, as :attr:`CaseResult.score` says).
    ``lesion`` is the id of the reference lesion it overlaps with the highest Dice (None for a
    false positive); ``hit_dice`` that Dice (0 if none)."""

    hit_dice: float = 0.0
    lesion: int | None = None

    @property
    def false_positive(self) -> bool:
        return self.hit_dice == 0

    def as_dict(self) -> dict:
        """The report's per-component entry: ``id, volume_mm3, diameter_mm, confidence, hit_dice``."""
        return {
            "id": self.id,
            "volume_mm3": json_float(self.volume_mm3),
            "diameter_mm": json_float(self.diameter_mm),
            "confidence": json_float(self.confidence),
            "hit_dice": self.hit_dice,
        }


@dataclass
class CaseResult:
    """Matching of one image: its reference lesions and predicted components.

    ``ref_labels`` / ``pred_labels`` (the int32 component label maps whose ids the lesions
    and components carry) are kept only when :func:`match_case` was asked to keep them.
    ``score`` is what the confidences are (one of :data:`SCORES`); ``threshold`` is always a
    probability.
    """

    case: str
    lesions: list[LesionResult]
    components: list[ComponentResult]
    threshold: float
    spacing: tuple[float, float, float]
    ref_voxels: int
    pred_voxels: int
    overlap_voxels: int
    ref_labels: np.ndarray | None = field(default=None, repr=False)
    pred_labels: np.ndarray | None = field(default=None, repr=False)
    hit_rule: str = "paper"
    score: str = "probability"

    @property
    def voxel_dice(self) -> float:
        """Plain voxel-level Dice of ``prob > threshold`` vs the reference (NaN if both are empty)."""
        return dice_from_counts(self.overlap_voxels, self.ref_voxels, self.pred_voxels)

    @property
    def n_false_positives(self) -> int:
        return sum(1 for c in self.components if c.false_positive)

    def as_dict(self) -> dict:
        """The report's per-case entry: ``case, lesions[...], components[...]``."""
        return {
            "case": self.case,
            "lesions": [les.as_dict() for les in self.lesions],
            "components": [comp.as_dict() for comp in self.components],
        }


def dice_from_counts(overlap: int, size_a: int, size_b: int) -> float:
    """``2 |A ∩ B| / (|A| + |B|)``; NaN when both sets are empty."""
    total = size_a + size_b
    return float(2.0 * overlap / total) if total > 0 else math.nan


def voxel_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Voxel-level Dice of two masks (nonzero = foreground); NaN when both are empty."""
    if pred.shape != ref.shape:
        raise InputError(f"voxel_dice: shapes differ, {pred.shape} vs {ref.shape}")
    a, b = pred != 0, ref != 0
    return dice_from_counts(int(np.count_nonzero(a & b)), int(np.count_nonzero(b)), int(np.count_nonzero(a)))


def _check_prediction(pred: np.ndarray, name: str) -> tuple:
    """A 3D, non-empty, numeric (or bool) prediction; returns its ``(min, max)`` (None for bool)."""
    if not isinstance(pred, np.ndarray) or pred.ndim != 3:
        shape = getattr(pred, "shape", type(pred).__name__)
        raise InputError(f"prediction {name} must be a 3D volume [z, y, x], got {shape}")
    if pred.dtype == bool:
        return None, None
    if not (np.issubdtype(pred.dtype, np.number) and not np.issubdtype(pred.dtype, np.complexfloating)):
        raise InputError(f"prediction {name} has non-numeric voxel type {pred.dtype}")
    if pred.size == 0:
        raise InputError(f"prediction {name} is empty (shape {pred.shape})")
    return pred.min(), pred.max()  # NaN propagates through min/max: one check covers it


def _looks_like_probabilities(lo, hi) -> bool:
    """A map whose values all lie in [0, 1] (none negative): a probability map or a mask (bool)."""
    return lo is None or (lo >= 0 and hi <= 1)


def _check_logits(logits: np.ndarray, name: str, on_warning: Callable[[str], object] | None) -> None:
    """Logits: any finite real values (``-inf``, probability 0, is allowed; NaN and ``+inf`` are
    not). A map with every value in [0, 1] is almost surely a probability map or a mask: it is
    accepted, but ``on_warning`` hears about it, naming the file."""
    lo, hi = _check_prediction(logits, name)
    if on_warning is not None and _looks_like_probabilities(lo, hi):
        on_warning(f"prediction {name} is read as logits but every value lies in [0, 1] (none negative): it looks "
                   "like a probability map or a mask; read as logits, every voxel above 0 is above the 0.5 "
                   "threshold (logit 0) and ranks wrongly; give probability maps with iwseg evaluate --pred")
    if lo is None or not np.issubdtype(logits.dtype, np.floating):
        return
    if not (np.isnan(lo) or np.isnan(hi) or hi == np.inf):  # NaN propagates through min/max; -inf is fine
        return
    n_nan = int(np.count_nonzero(np.isnan(logits)))
    if n_nan:
        raise InputError(f"prediction {name} holds {n_nan} NaN voxel(s); logits must be numbers")
    n_inf = int(np.count_nonzero(np.isposinf(logits)))
    if n_inf:
        raise InputError(f"prediction {name} holds {n_inf} voxel(s) of logit +inf; logits must be finite "
                         "(a voxel of -inf reads as probability 0)")


def _check_probabilities(prob: np.ndarray, name: str) -> None:
    lo, hi = _check_prediction(prob, name)
    if _looks_like_probabilities(lo, hi):
        return
    if np.issubdtype(prob.dtype, np.floating):
        n_nan = int(np.count_nonzero(np.isnan(prob)))
        if n_nan:
            raise InputError(f"prediction {name} holds {n_nan} NaN voxel(s); probabilities must be finite")
        n_inf = int(np.count_nonzero(np.isinf(prob)))
        if n_inf:
            raise InputError(f"prediction {name} holds {n_inf} infinite voxel(s); probabilities must be finite")
    hint = " (a 0/255 mask? store it as 0/1)" if hi == 255 and lo >= 0 else ""
    hint = hint or (" (logits? evaluate them as logits: iwseg evaluate --logits, match_case(score='logit'))"
                    if lo < 0 else "")
    raise InputError(
        f"prediction {name} has values in [{float(lo):g}, {float(hi):g}]; "
        f"probabilities or a binary mask in [0, 1] are needed{hint}"
    )


def _check_reference(ref: np.ndarray, name: str) -> None:
    if not isinstance(ref, np.ndarray) or ref.ndim != 3:
        shape = getattr(ref, "shape", type(ref).__name__)
        raise InputError(f"reference {name} must be a 3D volume [z, y, x], got {shape}")
    if ref.dtype == bool:
        return
    if not np.issubdtype(ref.dtype, np.number) or np.issubdtype(ref.dtype, np.complexfloating):
        raise InputError(f"reference {name} has non-numeric voxel type {ref.dtype}")
    lo, hi = ref.min(), ref.max()
    if np.issubdtype(ref.dtype, np.floating) and not (np.isfinite(lo) and np.isfinite(hi)):
        raise InputError(f"reference {name} holds NaN or infinite values; a 0/1 lesion mask is needed")
    binary = lo >= 0 and hi <= 1
    if binary and np.issubdtype(ref.dtype, np.floating):
        binary = not np.any((ref > 0) & (ref < 1))
    if binary:
        return
    values = np.unique(ref[np.isfinite(ref)] if np.issubdtype(ref.dtype, np.floating) else ref)
    shown = ", ".join(f"{v:g}" for v in values[:8]) + (", ..." if values.size > 8 else "")
    raise InputError(
        f"reference {name} is not a binary mask (values {shown}); a 0/1 lesion mask is needed"
        " (for a multi-label map, extract the lesion label first)"
    )


def match_case(
    prob: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    threshold: float = 0.5,
    thresholds: SizeThresholds | None = None,
    connectivity: int = 26,
    case: str = "case",
    pred_name: str | None = None,
    ref_name: str | None = None,
    keep_labels: bool = False,
    hit_rule: HitRule | str | None = None,
    min_lesion_size: MinLesionSize | str | None = None,
    score: str = "probability",
    on_warning: Callable[[str], object] | None = None,
) -> CaseResult:
    """Match the predicted components of one image to its reference lesions.

    Args:
        prob: ``[z, y, x]`` scores: logits (``score="logit"``, any finite values) or
            probabilities in [0, 1] (or a 0/1 mask; its components then all have confidence 1).
        ref: ``[z, y, x]`` binary reference mask (0/1 or bool), same shape.
        spacing: voxel size ``(sz, sy, sx)`` in mm, for volumes and diameters.
        threshold: ``t_seg``, a probability; predicted components are those of
            ``prob > threshold``, or for logits ``prob > log(t / (1 - t))``.
        thresholds: size-group diameter cut-offs (default: the lung preset).
        connectivity: 6, 18 or 26, used for both reference and prediction.
        case: case id reported in the results.
        pred_name, ref_name: how error messages name the inputs (file paths), default ``case``.
        keep_labels: keep the two label maps in the result (for building segmentations).
        hit_rule: when a component hits a lesion (:class:`HitRule` or its text form);
            default the paper's rule (any overlap, best Dice, many-to-one).
        min_lesion_size: predicted components smaller than this are dropped before matching
            (:class:`~IWSegmentationLib.core.lesions.MinLesionSize` or ``"10vox"`` / ``"5mm3"``).
        score: what ``prob`` holds (:data:`SCORES`): ``"logit"`` ranks components by their
            maximum logit, ``"probability"`` (default) by their maximum probability.
        on_warning: called with a message naming ``pred_name`` when logits look like a
            probability map (every value in [0, 1]); found in the pass that checks them.

    Returns a :class:`CaseResult`: :func:`case_overlaps`, then :meth:`CaseOverlaps.match`
    under ``hit_rule``. To match one case under several hit rules, call those two yourself: the
    labelling and overlap counting are then done once. Raises :class:`InputError` naming the
    input on bad data.
    """
    rule = parse_hit_rule(hit_rule)  # a bad rule fails before the labelling
    overlaps = case_overlaps(
        prob, ref, spacing, threshold=threshold, thresholds=thresholds, connectivity=connectivity, case=case,
        pred_name=pred_name, ref_name=ref_name, min_lesion_size=min_lesion_size, score=score, on_warning=on_warning,
    )
    return overlaps.match(rule, keep_labels=keep_labels)


@dataclass
class CaseOverlaps:
    """Everything about one case that does not depend on the hit rule: its two label maps and
    lesion tables, each component's confidence and every (lesion, component) overlap.

    Made by :func:`case_overlaps` (two labellings, two lesion tables, one pass over the
    predicted voxels); :meth:`match` then pairs lesions and components under a hit rule from
    the overlap pairs alone, so one case costs one labelling per volume however many rules it is
    matched under (``iwseg evaluate`` compares several). Arrays are indexed by component or
    lesion id (0 = background); ``pair_*`` hold one entry per overlapping (lesion, component).
    """

    case: str
    threshold: float
    spacing: tuple[float, float, float]
    score: str
    ref_table: list[Lesion]
    pred_table: list[Lesion]
    ref_sizes: np.ndarray
    pred_sizes: np.ndarray
    confidence: np.ndarray
    pair_lesion: np.ndarray
    pair_comp: np.ndarray
    pair_overlap: np.ndarray
    pair_dice: np.ndarray
    ref_labels: np.ndarray = field(repr=False)
    pred_labels: np.ndarray = field(repr=False)

    def match(self, hit_rule: HitRule | str | None = None, *, keep_labels: bool = False) -> CaseResult:
        """The :class:`CaseResult` of this case under ``hit_rule`` (default the paper's rule).

        Costs O(pairs log pairs) plus the two tables; no voxel is read. With ``keep_labels``
        the result holds this object's label maps (shared, not copied, between the results of
        several rules: do not edit them in place).
        """
        rule = parse_hit_rule(hit_rule)
        ok = rule.accepts(self.pair_overlap, self.ref_sizes[self.pair_lesion], self.pred_sizes[self.pair_comp],
                          self.pair_dice)
        lesion_best, comp_best = _match_pairs(self.pair_lesion[ok], self.pair_comp[ok], self.pair_dice[ok],
                                              self.confidence, rule.matching)
        confidence = self.confidence
        lesions = []
        for les in self.ref_table:
            hit = lesion_best.get(les.id)
            lesions.append(
                LesionResult(
                    **_lesion_fields(les),
                    hit_dice=hit[1] if hit else 0.0,
                    component=hit[0] if hit else None,
                    confidence=float(confidence[hit[0]]) if hit else None,
                )
            )
        components = []
        for comp in self.pred_table:
            hit = comp_best.get(comp.id)
            components.append(
                ComponentResult(
                    **_lesion_fields(comp),
                    confidence=float(confidence[comp.id]),
                    hit_dice=hit[1] if hit else 0.0,
                    lesion=hit[0] if hit else None,
                )
            )
        return CaseResult(
            case=self.case, lesions=lesions, components=components, threshold=self.threshold, spacing=self.spacing,
            ref_voxels=int(self.ref_sizes.sum()), pred_voxels=int(self.pred_sizes.sum()),
            overlap_voxels=int(self.pair_overlap.sum()),
            ref_labels=self.ref_labels if keep_labels else None, pred_labels=self.pred_labels if keep_labels else None,
            hit_rule=str(rule), score=self.score,
        )


def case_overlaps(
    prob: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    threshold: float = 0.5,
    thresholds: SizeThresholds | None = None,
    connectivity: int = 26,
    case: str = "case",
    pred_name: str | None = None,
    ref_name: str | None = None,
    min_lesion_size: MinLesionSize | str | None = None,
    score: str = "probability",
    on_warning: Callable[[str], object] | None = None,
) -> CaseOverlaps:
    """The hit-rule-independent part of :func:`match_case` (the same arguments, less
    ``hit_rule`` and ``keep_labels``): checks the inputs, thresholds, labels both volumes, builds
    the two lesion tables (after dropping components under ``min_lesion_size``) and counts each
    component's confidence and all overlaps in one pass over the predicted voxels.

    Costs two labellings, two lesion tables and that pass; raises :class:`InputError` naming
    the input on bad data. Match the result under each hit rule with :meth:`CaseOverlaps.match`.
    """
    pred_name = pred_name or case
    ref_name = ref_name or case
    if score not in SCORES:
        raise InputError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    if score == "logit":
        _check_logits(prob, pred_name, on_warning)
    else:
        _check_probabilities(prob, pred_name)
    _check_reference(ref, ref_name)
    if prob.shape != ref.shape:
        raise InputError(f"prediction {pred_name} has shape {prob.shape} but reference {ref_name} has {ref.shape}")
    logit_cut = probability_to_logit(threshold, "segmentation threshold")  # also checks 0 <= t < 1
    cut = logit_cut if score == "logit" else float(threshold)
    if connectivity not in CONNECTIVITIES:
        raise InputError(f"connectivity must be one of {CONNECTIVITIES}, got {connectivity}")
    thresholds = thresholds or SIZE_PRESETS[DEFAULT_SIZE_PRESET]
    spacing = tuple(float(s) for s in spacing)
    min_size = parse_min_lesion_size(min_lesion_size)

    pred_mask = prob > cut
    ref_labels, n_ref = label_components(ref, connectivity)
    pred_labels, n_pred = label_components(pred_mask, connectivity)
    ref_table = lesion_table(ref_labels, spacing, thresholds=thresholds, k=n_ref)
    pred_table = lesion_table(pred_labels, spacing, thresholds=thresholds, k=n_pred)
    if min_size is not None:
        pred_table, pred_mask = _drop_small(pred_table, pred_labels, pred_mask, min_size.min_voxels(spacing))
    ref_sizes = _sizes_by_id(ref_table, n_ref)
    pred_sizes = _sizes_by_id(pred_table, n_pred)

    # One pass over the predicted voxels gives both the confidences and all overlaps.
    idx = np.flatnonzero(pred_mask)
    comp_of_voxel = pred_labels.reshape(-1)[idx]
    confidence = np.full(n_pred + 1, -np.inf)  # logits of a component may all be negative
    np.maximum.at(confidence, comp_of_voxel, prob.reshape(-1)[idx].astype(np.float64))
    lesion_of_voxel = ref_labels.reshape(-1)[idx]
    both = lesion_of_voxel > 0
    code = lesion_of_voxel[both].astype(np.int64) * (n_pred + 1) + comp_of_voxel[both]
    pair_code, pair_overlap = np.unique(code, return_counts=True)
    pair_lesion, pair_comp = np.divmod(pair_code, n_pred + 1)
    pair_dice = 2.0 * pair_overlap / (ref_sizes[pair_lesion] + pred_sizes[pair_comp])
    return CaseOverlaps(
        case=case, threshold=float(threshold), spacing=spacing, score=score, ref_table=ref_table,
        pred_table=pred_table, ref_sizes=ref_sizes, pred_sizes=pred_sizes, confidence=confidence,
        pair_lesion=pair_lesion, pair_comp=pair_comp, pair_overlap=pair_overlap, pair_dice=pair_dice,
        ref_labels=ref_labels, pred_labels=pred_labels,
    )


def _drop_small(pred_table: list, pred_labels: np.ndarray, pred_mask: np.ndarray, min_voxels: int):
    """Remove components under ``min_voxels`` from the table, the label map (in place) and the mask."""
    small = [c.id for c in pred_table if c.voxels < min_voxels]
    if not small:
        return pred_table, pred_mask
    drop = np.zeros(int(pred_labels.max()) + 1, dtype=bool)
    drop[small] = True
    gone = drop[pred_labels]
    pred_labels[gone] = 0
    return [c for c in pred_table if c.voxels >= min_voxels], pred_mask & ~gone


def _match_pairs(lesion: np.ndarray, comp: np.ndarray, dice: np.ndarray, confidence: np.ndarray,
                 matching: str) -> tuple[dict, dict]:
    """Pair lesions and components from their qualifying overlap pairs.

    Returns ``({lesion: (component, dice)}, {component: (lesion, dice)})``. ``many``: each
    lesion's best component and each component's best lesion, independently (the paper).
    ``greedy`` / ``hungarian``: a one-to-one assignment, the same pairs in both dicts.
    """
    if matching == "many":
        return (_best_partner(lesion, comp, dice, tie=-confidence[comp]),
                _best_partner(comp, lesion, dice, tie=np.zeros_like(dice)))
    pairs = _greedy_pairs(lesion, comp, dice, confidence) if matching == "greedy" else _hungarian_pairs(lesion, comp, dice)
    by_lesion = {int(le): (int(c), float(d)) for le, c, d in pairs}
    return by_lesion, {c: (le, d) for le, (c, d) in by_lesion.items()}


def _greedy_pairs(lesion, comp, dice, confidence) -> list[tuple[int, int, float]]:
    """One-to-one pairs taken by decreasing Dice (ties: the more confident component, lower ids)."""
    order = np.lexsort((comp, lesion, -confidence[comp], -dice))
    used_l, used_c, out = set(), set(), []
    for i in order:
        le, c = int(lesion[i]), int(comp[i])
        if le not in used_l and c not in used_c:
            used_l.add(le)
            used_c.add(c)
            out.append((le, c, float(dice[i])))
    return out


def _hungarian_pairs(lesion, comp, dice) -> list[tuple[int, int, float]]:
    """One-to-one pairs of maximum total Dice (``scipy.optimize.linear_sum_assignment``)."""
    from scipy.optimize import linear_sum_assignment  # lazy: slow; Slicer installs it

    if lesion.size == 0:
        return []
    les_ids, li = np.unique(lesion, return_inverse=True)
    comp_ids, ci = np.unique(comp, return_inverse=True)
    weight = np.zeros((les_ids.size, comp_ids.size))
    weight[li, ci] = dice
    rows, cols = linear_sum_assignment(weight, maximize=True)
    return [(int(les_ids[r]), int(comp_ids[c]), float(weight[r, c])) for r, c in zip(rows, cols) if weight[r, c] > 0]


def _lesion_fields(lesion: Lesion) -> dict:
    """The geometric fields of a lesion-table row (everything but confidence and extras)."""
    return {
        "id": lesion.id, "voxels": lesion.voxels, "volume_mm3": lesion.volume_mm3,
        "diameter_mm": lesion.diameter_mm, "size_group": lesion.size_group,
        "centroid": lesion.centroid, "bbox": lesion.bbox,
    }


def _sizes_by_id(table, k: int) -> np.ndarray:
    sizes = np.zeros(k + 1, dtype=np.int64)
    for les in table:
        sizes[les.id] = les.voxels
    return sizes


def _best_partner(owner: np.ndarray, partner: np.ndarray, dice: np.ndarray, tie: np.ndarray) -> dict:
    """For each owner id, its partner with the highest Dice (then lowest ``tie``, then lowest id).

    Returns ``{owner: (partner, dice)}`` from the sparse overlap pairs, in O(P log P).
    """
    if owner.size == 0:
        return {}
    order = np.lexsort((partner, tie, -dice, owner))
    first = np.r_[True, owner[order][1:] != owner[order][:-1]]
    pick = order[first]
    return {int(o): (int(p), float(d)) for o, p, d in zip(owner[pick], partner[pick], dice[pick])}
