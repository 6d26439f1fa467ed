"""Lesion-wise evaluation: per-case lesion matching, FROC, CPM, average recall, object Dice.

These are the detection and delineation metrics of the inverse-weighting paper
(Shirokikh et al., MICCAI 2020, section 3.3), with the exact definitions below; the same
text, with worked examples, is in ``docs/metrics.md``.

Per case (:func:`match_case`)
    *Reference lesions* are the connected components of the reference mask; *predicted
    components* those of ``prob > t_seg`` (default 0.5); both labelled with the same
    connectivity (26 by default). The *confidence* of a component is the maximum
    probability inside it. With ``Dice(g, c) = 2|g ∩ c| / (|g| + |c|)``:

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
      without a size, see :mod:`IWSegmentationLib.records`, count only in the totals).

Undefined values are ``NaN`` in Python and ``null`` in the report: recall, ``cpm`` and
``avg_recall_0_5`` when there are no reference lesions (in all images, in a size group, or
in a bootstrap resample, which is then left out of the bootstrap mean), ``object_dice``
mean/std when no lesion is hit, ``voxel_dice`` when both masks are empty.

All pairwise lesion/component overlaps of a case are counted in one pass over the
predicted voxels (a ``np.unique`` over (lesion id, component id) codes); nothing loops over
voxels, and no loop is O(lesions x components).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from .errors import InputError
from .lesions import (
    CONNECTIVITIES,
    DEFAULT_SIZE_PRESET,
    SIZE_GROUPS,
    SIZE_PRESETS,
    Lesion,
    MinLesionSize,
    SizeThresholds,
    label_components,
    lesion_table,
    parse_min_lesion_size,
)

#: FP/image rates of the LUNA16 competition performance metric (CPM).
CPM_FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: FP/image grid of ``avg_recall_0_5``: 501 points from 0 to 5 (not the paper's "avg Recall",
#: which is the CPM; see docs/metrics.md).
AVG_RECALL_FP_RATES: np.ndarray = np.linspace(0.0, 5.0, 501)
N_BOOTSTRAP = 100
BOOTSTRAP_FRACTION = 0.8
#: Bootstrap variants: ``ours`` (FP/image over the resample's images) and ``paper`` (the
#: authors' notebook: images without any lesion or component are left out of the draw, and
#: FP/image divides by the full image count; seed 42 reproduces Table 2).
BOOTSTRAP_MODES = ("ours", "paper")
PAPER_BOOTSTRAP_SEED = 42


# --------------------------------------------------------------------------------------
# Hit rules
# --------------------------------------------------------------------------------------

#: How lesions and components are paired: ``many`` (the paper: each lesion takes its best
#: component, and one component may serve several lesions), ``greedy`` (one-to-one, pairs
#: taken by decreasing Dice) or ``hungarian`` (one-to-one, maximum total Dice, SciPy's
#: ``linear_sum_assignment``).
MATCHINGS = ("many", "greedy", "hungarian")
#: Named hit rules (``--hit-rule NAME``); see docs/metrics.md for their sources.
HIT_RULE_PRESETS = {"paper": "many", "one-to-one": "greedy", "panoptica": "hungarian,iou>0.5"}


@dataclass(frozen=True)
class HitRule:
    """When a predicted component counts as a hit for a reference lesion.

    A (lesion, component) pair can match only if it overlaps in at least ``min_voxels``
    voxels, covers at least ``min_fraction`` of the lesion's voxels, and has IoU > ``min_iou``
    and Dice > ``min_dice`` (0: no condition). ``matching`` then pairs them (:data:`MATCHINGS`).
    The default, ``HitRule()``, is the paper's rule: any overlap, many-to-one.

    Under ``many`` a component that overlaps a lesion through a qualifying pair but is not its
    best match (a second fragment) is neither a TP nor an FP, as in the paper. Under the
    one-to-one matchings every component left unpaired is a false positive, as in panoptica.
    """

    matching: str = "many"
    min_voxels: int = 1
    min_fraction: float = 0.0
    min_iou: float = 0.0
    min_dice: float = 0.0

    def __post_init__(self):
        if self.matching not in MATCHINGS:
            raise InputError(f"hit rule: matching must be one of {', '.join(MATCHINGS)}, got {self.matching!r}")
        if int(self.min_voxels) < 1:
            raise InputError(f"hit rule: voxels>=N needs N >= 1, got {self.min_voxels}")
        for name in ("min_fraction", "min_iou", "min_dice"):
            value = float(getattr(self, name))
            if not 0.0 <= value < 1.0 and not (name == "min_fraction" and value == 1.0):
                raise InputError(f"hit rule: {name} must be in [0, 1), got {value}")

    def accepts(self, overlap: np.ndarray, ref_size: np.ndarray, pred_size: np.ndarray,
                dice: np.ndarray) -> np.ndarray:
        """Which overlap pairs may match (a boolean array over the pairs)."""
        ok = overlap >= int(self.min_voxels)
        if self.min_fraction > 0:
            ok &= overlap >= self.min_fraction * ref_size
        if self.min_iou > 0:
            ok &= overlap / (ref_size + pred_size - overlap) > self.min_iou
        if self.min_dice > 0:
            ok &= dice > self.min_dice
        return ok

    def __str__(self) -> str:
        terms = [self.matching]
        if self.min_voxels > 1:
            terms.append(f"voxels>={int(self.min_voxels)}")
        for label, value, op in (("fraction", self.min_fraction, ">="), ("iou", self.min_iou, ">"),
                                 ("dice", self.min_dice, ">")):
            if value > 0:
                terms.append(f"{label}{op}{value:g}")
        text = ",".join(terms)
        return next((name for name, spec in HIT_RULE_PRESETS.items() if spec == text), text)


def parse_hit_rule(spec: str | HitRule | None) -> HitRule:
    """A :class:`HitRule` from its text form (``--hit-rule``, the ``val_hit_rule`` config key).

    The text is a preset name (:data:`HIT_RULE_PRESETS`: ``paper``, ``one-to-one``,
    ``panoptica``) or comma-separated terms, in any order: a matching (``many``, ``greedy``,
    ``hungarian``, or a preset name) and conditions ``voxels>=N``, ``fraction>=F``, ``iou>T``,
    ``dice>T``; a later term overrides an earlier one.
    Example: ``hungarian,iou>0.5``; ``many,voxels>=10``. None or ``""`` is the paper's rule.
    """
    if isinstance(spec, HitRule):
        return spec
    text = (spec or "paper").strip().lower().replace(" ", "")
    terms = [t for term in text.split(",") for t in HIT_RULE_PRESETS.get(term, term).split(",") if t]
    fields: dict = {}
    conditions = {"voxels>=": ("min_voxels", int), "fraction>=": ("min_fraction", float),
                  "iou>": ("min_iou", float), "dice>": ("min_dice", float)}
    for term in terms:
        if term in MATCHINGS:
            fields["matching"] = term
            continue
        prefix = next((p for p in conditions if term.startswith(p)), None)
        if prefix is None:
            raise InputError(
                f"hit rule {spec!r}: unknown term {term!r}; use {', '.join(HIT_RULE_PRESETS)}, or terms "
                f"{'/'.join(MATCHINGS)}, voxels>=N, fraction>=F, iou>T, dice>T separated by commas")
        name, kind = conditions[prefix]
        try:
            fields[name] = kind(term[len(prefix):])
        except ValueError:
            raise InputError(f"hit rule {spec!r}: {term!r} needs a number after {prefix!r}") from None
    return HitRule(**fields)


# --------------------------------------------------------------------------------------
# Per-case results
# --------------------------------------------------------------------------------------


@dataclass
class LesionResult(Lesion):
    """One reference lesion (a :class:`~IWSegmentationLib.lesions.Lesion`) and its best-matching
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
            "volume_mm3": _json_float(self.volume_mm3),
            "diameter_mm": _json_float(self.diameter_mm),
            "size_group": self.size_group,
            "hit_dice": self.hit_dice,
            "confidence": None if self.confidence is None else _json_float(self.confidence),
        }


@dataclass
class ComponentResult(Lesion):
    """One predicted component (a :class:`~IWSegmentationLib.lesions.Lesion` whose ``confidence``
    is its maximum probability). ``lesion`` is the id of the reference lesion it overlaps with
    the highest Dice (None for a false positive); ``hit_dice`` that Dice (0 if none)."""

    hit_dice: float = 0.0
    lesion: int | None = None

    @property
    def false_positive(self) -> bool:
        return self.hit_dice == 0

    def as_dict(self) -> dict:
        """The report's per-component entry: ``id, volume_mm3, diameter_mm, confidence, hit_dice``."""
        return {
            "id": self.id,
            "volume_mm3": _json_float(self.volume_mm3),
            "diameter_mm": _json_float(self.diameter_mm),
            "confidence": _json_float(self.confidence),
            "hit_dice": self.hit_dice,
        }


@dataclass
class CaseResult:
    """Matching of one image: its reference lesions and predicted components.

    ``ref_labels`` / ``pred_labels`` (the int32 component label maps whose ids the lesions
    and components carry) are kept only when :func:`match_case` was asked to keep them.
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


# --------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------


def _check_probabilities(prob: np.ndarray, name: str) -> None:
    if not isinstance(prob, np.ndarray) or prob.ndim != 3:
        shape = getattr(prob, "shape", type(prob).__name__)
        raise InputError(f"prediction {name} must be a 3D volume [z, y, x], got {shape}")
    if prob.dtype == bool:
        return
    if not (np.issubdtype(prob.dtype, np.number) and not np.issubdtype(prob.dtype, np.complexfloating)):
        raise InputError(f"prediction {name} has non-numeric voxel type {prob.dtype}")
    if prob.size == 0:
        raise InputError(f"prediction {name} is empty (shape {prob.shape})")
    lo, hi = prob.min(), prob.max()  # NaN propagates through min/max: one check covers it
    if lo >= 0 and hi <= 1:
        return
    if np.issubdtype(prob.dtype, np.floating):
        n_nan = int(np.count_nonzero(np.isnan(prob)))
        if n_nan:
            raise InputError(f"prediction {name} holds {n_nan} NaN voxel(s); probabilities must be finite")
        n_inf = int(np.count_nonzero(np.isinf(prob)))
        if n_inf:
            raise InputError(f"prediction {name} holds {n_inf} infinite voxel(s); probabilities must be finite")
    hint = " (a 0/255 mask? store it as 0/1)" if hi == 255 and lo >= 0 else ""
    hint = hint or (" (logits? apply a sigmoid first)" if lo < 0 else "")
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


# --------------------------------------------------------------------------------------
# Matching one case
# --------------------------------------------------------------------------------------


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
) -> CaseResult:
    """Match the predicted components of one image to its reference lesions.

    Args:
        prob: ``[z, y, x]`` probabilities in [0, 1] (or a 0/1 mask; its components then all
            have confidence 1).
        ref: ``[z, y, x]`` binary reference mask (0/1 or bool), same shape.
        spacing: voxel size ``(sz, sy, sx)`` in mm, for volumes and diameters.
        threshold: ``t_seg``; predicted components are those of ``prob > threshold``.
        thresholds: size-group diameter cut-offs (default: the lung preset).
        connectivity: 6, 18 or 26, used for both reference and prediction.
        case: case id reported in the results.
        pred_name, ref_name: how error messages name the inputs (file paths), default ``case``.
        keep_labels: keep the two label maps in the result (for building segmentations).
        hit_rule: when a component hits a lesion (:class:`HitRule` or its text form);
            default the paper's rule (any overlap, best Dice, many-to-one).
        min_lesion_size: predicted components smaller than this are dropped before matching
            (:class:`~IWSegmentationLib.lesions.MinLesionSize` or ``"10vox"`` / ``"5mm3"``).

    Returns a :class:`CaseResult`. Costs two labellings, two lesion tables and one pass
    over the predicted voxels; raises :class:`InputError` naming the input on bad data.
    """
    pred_name = pred_name or case
    ref_name = ref_name or case
    _check_probabilities(prob, pred_name)
    _check_reference(ref, ref_name)
    if prob.shape != ref.shape:
        raise InputError(f"prediction {pred_name} has shape {prob.shape} but reference {ref_name} has {ref.shape}")
    if not (0.0 <= float(threshold) < 1.0):
        raise InputError(f"segmentation threshold must be in [0, 1), got {threshold}")
    if connectivity not in CONNECTIVITIES:
        raise InputError(f"connectivity must be one of {CONNECTIVITIES}, got {connectivity}")
    thresholds = thresholds or SIZE_PRESETS[DEFAULT_SIZE_PRESET]
    spacing = tuple(float(s) for s in spacing)
    rule = parse_hit_rule(hit_rule)
    min_size = parse_min_lesion_size(min_lesion_size)

    pred_mask = prob > threshold
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
    confidence = np.zeros(n_pred + 1, dtype=np.float64)
    np.maximum.at(confidence, comp_of_voxel, prob.reshape(-1)[idx].astype(np.float64))
    lesion_of_voxel = ref_labels.reshape(-1)[idx]
    both = lesion_of_voxel > 0
    code = lesion_of_voxel[both].astype(np.int64) * (n_pred + 1) + comp_of_voxel[both]
    pair_code, pair_overlap = np.unique(code, return_counts=True)
    pair_lesion, pair_comp = np.divmod(pair_code, n_pred + 1)
    pair_dice = 2.0 * pair_overlap / (ref_sizes[pair_lesion] + pred_sizes[pair_comp])
    ok = rule.accepts(pair_overlap, ref_sizes[pair_lesion], pred_sizes[pair_comp], pair_dice)
    lesion_best, comp_best = _match_pairs(pair_lesion[ok], pair_comp[ok], pair_dice[ok], confidence, rule.matching)

    lesions = []
    for les in ref_table:
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
    for comp in pred_table:
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
        case=case, lesions=lesions, components=components, threshold=float(threshold), spacing=spacing,
        ref_voxels=int(ref_sizes.sum()), pred_voxels=int(pred_sizes.sum()), overlap_voxels=int(pair_overlap.sum()),
        ref_labels=ref_labels if keep_labels else None, pred_labels=pred_labels if keep_labels else None,
        hit_rule=str(rule),
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
    from scipy.optimize import linear_sum_assignment

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


# --------------------------------------------------------------------------------------
# FROC and its summaries
# --------------------------------------------------------------------------------------


@dataclass
class Froc:
    """A FROC curve: points sorted by FP/image, with the highest τ that gives each point.

    ``threshold[0]`` is ``inf`` when the first point is the added (0, 0). ``recall`` is all
    NaN when there are no lesions.
    """

    fp_per_image: np.ndarray
    recall: np.ndarray
    threshold: np.ndarray
    n_lesions: int
    n_images: int

    def recall_at(self, fp_per_image) -> np.ndarray:
        """Recall at the given FP/image rates: linear interpolation, clamped at the ends."""
        return np.interp(np.asarray(fp_per_image, dtype=float), self.fp_per_image, self.recall)

    def as_dict(self) -> dict:
        return {
            "fp_per_image": [float(v) for v in self.fp_per_image],
            "recall": [_json_float(v) for v in self.recall],
            "threshold": [_json_float(v) for v in self.threshold],
        }


def froc(
    hit_conf: Sequence[float],
    fp_conf: Sequence[float],
    n_images: int,
    *,
    thresholds: Iterable[float] | None = None,
) -> Froc:
    """FROC curve from the lesions' ``hit_conf`` and the false positives' confidences.

    Args:
        hit_conf: one value per reference lesion: the confidence of its matched component,
            NaN for a missed lesion (``hit_dice = 0``). Its length is the recall denominator.
        fp_conf: confidence of every false-positive component (``hit_dice = 0``).
        n_images: FP/image denominator (every image counts).
        thresholds: the candidate τ (the issue's "all distinct component confidences").
            Default: the distinct values of ``hit_conf`` and ``fp_conf``, where the counts
            change; any superset gives the same curve.

    For each τ: TP = #(hit_conf ≥ τ), FP = #(fp_conf ≥ τ). The point (0, 0) is added with
    τ = inf; per FP count the highest recall is kept, reported with the highest τ giving it.
    """
    if int(n_images) < 1:
        raise InputError(f"FROC needs at least one image, got n_images={n_images}")
    hit_conf = np.asarray(hit_conf, dtype=float).ravel()
    fp_conf = np.asarray(fp_conf, dtype=float).ravel()
    tp_sorted = np.sort(hit_conf[np.isfinite(hit_conf)])
    fp_sorted = np.sort(fp_conf)
    if thresholds is None:
        taus = np.unique(np.concatenate([tp_sorted, fp_sorted]))
    else:
        taus = np.unique(np.asarray(list(thresholds), dtype=float))
    taus = np.r_[np.inf, taus[::-1]]  # descending, led by the added (0, 0) point
    tp = tp_sorted.size - np.searchsorted(tp_sorted, taus, side="left")  # count >= tau
    fp = fp_sorted.size - np.searchsorted(fp_sorted, taus, side="left")
    # TP and FP are non-decreasing along the descending taus. Per FP count keep the last
    # point (highest TP) and report the first tau of its (FP, TP) run (the highest tau).
    run_start = np.r_[True, (fp[1:] != fp[:-1]) | (tp[1:] != tp[:-1])]
    run_id = np.cumsum(run_start) - 1
    group_end = np.flatnonzero(np.r_[fp[1:] != fp[:-1], True])
    keep = np.flatnonzero(run_start)[run_id[group_end]]
    n_lesions = hit_conf.size
    recall = tp[keep] / n_lesions if n_lesions else np.full(keep.size, np.nan)
    return Froc(
        fp_per_image=fp[keep] / float(n_images),
        recall=recall.astype(float),
        threshold=taus[keep],
        n_lesions=int(n_lesions),
        n_images=int(n_images),
    )


def cpm(curve: Froc) -> float:
    """LUNA16 competition performance metric: mean recall at 1/8 ... 8 FP/image (NaN without lesions)."""
    if curve.n_lesions == 0:
        return math.nan
    return float(np.mean(curve.recall_at(CPM_FP_RATES)))


def avg_recall(curve: Froc, max_fp: float = 5.0, n_points: int = 501) -> float:
    """Mean recall over ``linspace(0, max_fp, n_points)`` FP/image. Not the paper's Table 2
    "avg Recall", which is :func:`cpm`; it matches only a printout of the authors' notebook."""
    if curve.n_lesions == 0:
        return math.nan
    return float(np.mean(curve.recall_at(np.linspace(0.0, max_fp, n_points))))


# --------------------------------------------------------------------------------------
# Pooling over images, bootstrap, report
# --------------------------------------------------------------------------------------


@dataclass
class _Pool:
    """Flat arrays over all lesions and components of a list of cases (image-indexed)."""

    n_images: int
    les_image: np.ndarray
    les_group: np.ndarray
    les_dice: np.ndarray
    les_conf: np.ndarray  # hit_conf, NaN if missed
    comp_image: np.ndarray
    comp_group: np.ndarray
    comp_conf: np.ndarray
    comp_fp: np.ndarray

    @classmethod
    def from_cases(cls, cases: Sequence[CaseResult]) -> _Pool:
        group_code = {g: i for i, g in enumerate(SIZE_GROUPS)}
        les = [(i, group_code.get(x.size_group, -1), x.hit_dice, math.nan if x.confidence is None or x.hit_dice <= 0
                else x.confidence) for i, c in enumerate(cases) for x in c.lesions]
        comp = [(i, group_code.get(x.size_group, -1), x.confidence, x.hit_dice == 0)
                for i, c in enumerate(cases) for x in c.components]
        les_a = np.array(les, dtype=float).reshape(-1, 4)
        comp_a = np.array(comp, dtype=float).reshape(-1, 4)
        return cls(
            n_images=len(cases),
            les_image=les_a[:, 0].astype(np.int64), les_group=les_a[:, 1].astype(np.int64),
            les_dice=les_a[:, 2], les_conf=les_a[:, 3],
            comp_image=comp_a[:, 0].astype(np.int64), comp_group=comp_a[:, 1].astype(np.int64),
            comp_conf=comp_a[:, 2], comp_fp=comp_a[:, 3].astype(bool),
        )

    def with_records(self) -> np.ndarray:
        """Indices of the images that hold at least one lesion or component (sorted)."""
        return np.union1d(self.les_image, self.comp_image).astype(np.int64)

    def select(self, group: str | None = None, images: np.ndarray | None = None,
               fp_denominator: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """(hit_conf of the selected lesions, confidences of the selected FPs, FP/image denominator).

        The denominator is the number of selected images unless ``fp_denominator`` is given."""
        les_ok = np.ones(self.les_conf.size, bool)
        fp_ok = self.comp_fp.copy()
        n_images = self.n_images
        if group is not None:
            code = SIZE_GROUPS.index(group)
            les_ok &= self.les_group == code
            fp_ok &= self.comp_group == code
        if images is not None:
            chosen = np.zeros(self.n_images, bool)
            chosen[images] = True
            les_ok &= chosen[self.les_image]
            fp_ok &= chosen[self.comp_image]
            n_images = int(np.count_nonzero(chosen))
        return self.les_conf[les_ok], self.comp_conf[fp_ok], fp_denominator or n_images

    def froc(self, group: str | None = None, images: np.ndarray | None = None,
             fp_denominator: int | None = None) -> Froc:
        hit_conf, fp_conf, n_images = self.select(group, images, fp_denominator)
        return froc(hit_conf, fp_conf, n_images)

    def recall(self, group: str | None = None) -> float:
        """Recall at the segmentation threshold: hit lesions / lesions (NaN without lesions)."""
        ok = np.ones(self.les_dice.size, bool) if group is None else self.les_group == SIZE_GROUPS.index(group)
        return float(np.mean(self.les_dice[ok] > 0)) if ok.any() else math.nan

    def object_dice(self, group: str | None = None) -> dict:
        ok = self.les_dice > 0
        if group is not None:
            ok &= self.les_group == SIZE_GROUPS.index(group)
        d = self.les_dice[ok]
        if d.size == 0:
            return {"mean": None, "std": None, "n": 0}
        return {"mean": float(d.mean()), "std": float(d.std(ddof=0)), "n": int(d.size)}


def _check_cases(cases: Sequence[CaseResult]) -> list[CaseResult]:
    cases = list(cases)
    if not cases:
        raise InputError("no cases to evaluate")
    for c in cases:
        if not isinstance(c, CaseResult):
            raise InputError(f"evaluate_cases takes CaseResult objects (from match_case), got {type(c).__name__}")
    # A fixed image order (by case name) makes the seeded bootstrap independent of input order.
    return sorted(cases, key=lambda c: c.case)


def _resamples(candidates: np.ndarray, n_resamples: int, fraction: float, seed: int) -> list[np.ndarray]:
    """``n_resamples`` draws of ``fraction`` of the candidate image indices, without replacement."""
    if not (0 < fraction <= 1):
        raise InputError(f"bootstrap fraction must be in (0, 1], got {fraction}")
    if n_resamples < 1:
        raise InputError(f"bootstrap needs at least one resample, got {n_resamples}")
    if candidates.size == 0:
        return []
    size = max(1, int(math.floor(fraction * candidates.size + 0.5)))
    rng = np.random.default_rng(seed)
    return [candidates[rng.choice(candidates.size, size=size, replace=False)] for _ in range(n_resamples)]


def _check_mode(mode: str) -> str:
    if mode not in BOOTSTRAP_MODES:
        raise InputError(f"bootstrap mode must be one of {', '.join(BOOTSTRAP_MODES)}, got {mode!r}")
    return mode


def bootstrap_recall_curves(
    cases: Sequence[CaseResult],
    fp_per_image: Sequence[float],
    *,
    size_group: str | None = None,
    n_resamples: int = N_BOOTSTRAP,
    fraction: float = BOOTSTRAP_FRACTION,
    seed: int = 0,
    mode: str = "ours",
) -> np.ndarray:
    """Recall at ``fp_per_image`` for each bootstrap resample: shape ``(n_resamples, len(fp))``.

    Rows of resamples without any lesion of the group are NaN. The FROC plot draws its
    ±1 std band from these. ``mode`` is one of :data:`BOOTSTRAP_MODES`.
    """
    pool = _Pool.from_cases(_check_cases(cases))
    return _bootstrap_curves(pool, np.asarray(fp_per_image, float), size_group, n_resamples, fraction, seed,
                             _check_mode(mode))


def _bootstrap_curves(pool: _Pool, grid: np.ndarray, group, n_resamples, fraction, seed, mode="ours") -> np.ndarray:
    paper = mode == "paper"
    candidates = pool.with_records() if paper else np.arange(pool.n_images)
    denominator = pool.n_images if paper else None
    out = np.full((n_resamples, grid.size), np.nan)
    for b, images in enumerate(_resamples(candidates, n_resamples, fraction, seed)):
        curve = pool.froc(group, images, denominator)
        if curve.n_lesions:
            out[b] = curve.recall_at(grid)
    return out


def _bootstrap(pool: _Pool, group, n_resamples, fraction, seed, mode="ours") -> dict:
    n_cpm = len(CPM_FP_RATES)
    grid = np.r_[np.asarray(CPM_FP_RATES), AVG_RECALL_FP_RATES]
    curves = _bootstrap_curves(pool, grid, group, n_resamples, fraction, seed, mode)
    ok = np.isfinite(curves[:, 0])
    cpms = curves[ok, :n_cpm].mean(axis=1)
    avgs = curves[ok, n_cpm:].mean(axis=1)

    def summary(values: np.ndarray) -> dict:
        if values.size == 0:
            return {"mean": None, "std": None}
        return {"mean": float(values.mean()), "std": float(values.std(ddof=0))}

    return {"cpm": summary(cpms), "avg_recall_0_5": summary(avgs), "n": int(ok.sum()), "mode": mode, "seed": seed}


def bootstrap(
    cases: Sequence[CaseResult],
    *,
    size_group: str | None = None,
    n_resamples: int = N_BOOTSTRAP,
    fraction: float = BOOTSTRAP_FRACTION,
    seed: int = 0,
    mode: str = "ours",
) -> dict:
    """Bootstrap of ``cpm`` and ``avg_recall_0_5`` over image subsets.

    ``n_resamples`` draws of ``fraction · #images`` (rounded half up, at least 1) images without
    replacement, from ``numpy.random.default_rng(seed)``, images ordered by case name;
    FP/image divides by the subset size. ``mode="paper"`` copies the authors' notebook
    instead: the draws are from the images that hold a lesion or a component only, and
    FP/image divides by the full image count (a quirk: it lowers FP/image by about 20%).
    Returns ``{"cpm": {"mean", "std"}, "avg_recall_0_5": {"mean", "std"}, "n", "mode",
    "seed"}`` where ``n`` counts the resamples that hold at least one lesion (the others have
    no recall and are left out); std has ddof 0.
    """
    pool = _Pool.from_cases(_check_cases(cases))
    return _bootstrap(pool, size_group, n_resamples, fraction, seed, _check_mode(mode))


def _summary(pool: _Pool, group, n_resamples, fraction, seed, mode="ours") -> dict:
    curve = pool.froc(group)
    return {
        "n_images": pool.n_images,
        "n_lesions": curve.n_lesions,
        "recall": _json_float(pool.recall(group)),
        "object_dice": pool.object_dice(group),
        "cpm": _json_float(cpm(curve)),
        "avg_recall_0_5": _json_float(avg_recall(curve)),
        "froc": curve.as_dict(),
        "bootstrap": _bootstrap(pool, group, n_resamples, fraction, seed, mode),
    }


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
    mode, seed}, hit_rule, by_size{small,medium,large -> the same fields}, cases[...]`` (in input
    order, see :meth:`CaseResult.as_dict`). ``recall`` is at the segmentation threshold (every
    component counts). A FROC threshold of None is the added (0, 0) point (τ = ∞).
    ``bootstrap_mode`` is one of :data:`BOOTSTRAP_MODES` (see :func:`bootstrap`).
    """
    ordered = _check_cases(cases)
    _check_mode(bootstrap_mode)
    rules = sorted({c.hit_rule for c in ordered})
    if len(rules) > 1:
        raise InputError(f"cases were matched with different hit rules ({', '.join(rules)}); pool one rule at a time")
    pool = _Pool.from_cases(ordered)
    report = _summary(pool, None, n_resamples, fraction, seed, bootstrap_mode)
    report["hit_rule"] = rules[0]
    report["by_size"] = {g: _summary(pool, g, n_resamples, fraction, seed, bootstrap_mode) for g in SIZE_GROUPS}
    report["cases"] = [c.as_dict() for c in cases]
    return report


def froc_of_cases(cases: Sequence[CaseResult], size_group: str | None = None) -> Froc:
    """The pooled FROC curve of a list of cases (all lesions, or one size group)."""
    return _Pool.from_cases(_check_cases(cases)).froc(size_group)


def _json_float(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None
