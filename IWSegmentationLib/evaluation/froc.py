"""FROC curves and their summaries: the LUNA16 CPM and the paper's avg Recall."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from ..core.errors import InputError
from ..core.operating_points import OPERATING_POINT_FP_RATES, OperatingPoint

#: FP/image rates of the LUNA16 competition performance metric (CPM): those of the operating points.
CPM_FP_RATES: tuple[float, ...] = OPERATING_POINT_FP_RATES


#: FP/image grid of ``avg_recall_0_5``: 501 points from 0 to 5 (not the paper's "avg Recall",
#: which is the CPM; see docs/metrics.md).
AVG_RECALL_FP_RATES: np.ndarray = np.linspace(0.0, 5.0, 501)


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
            "recall": [json_float(v) for v in self.recall],
            "threshold": [json_float(v) for v in self.threshold],
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


def operating_points(
    hit_conf: Sequence[float],
    fp_conf: Sequence[float],
    n_images: int,
    *,
    floor_logit: float,
    rates: Sequence[float] = OPERATING_POINT_FP_RATES,
) -> list[OperatingPoint]:
    """The operating points of a FROC (arguments as :func:`froc`; confidences are maximum logits).

    For each rate r: the point of the curve with the most FP/image not above r (the curve is a
    step function: a threshold must exist, so nothing is interpolated), its recall, and a voxel
    threshold t that keeps exactly that point's components when a component is kept for
    ``confidence > t`` (``iwseg predict`` keeps voxels with ``logit > t``): the midpoint between
    the point's τ and the next lower confidence, or ``floor_logit`` (the logit of the threshold the
    components were found at) when no confidence lies below τ. Where the curve's first point is
    the added (0, 0) (τ = ∞), t is the highest confidence (nothing is above it).
    """
    curve = froc(hit_conf, fp_conf, n_images)
    hits = np.asarray(hit_conf, dtype=float).ravel()
    conf = np.unique(np.concatenate([hits[np.isfinite(hits)], np.asarray(fp_conf, dtype=float).ravel()]))
    points = []
    for rate in rates:
        index = int(np.searchsorted(curve.fp_per_image, float(rate) * (1 + 1e-12), side="right")) - 1
        tau = float(curve.threshold[index])
        below = conf[conf < tau]
        if math.isinf(tau):
            cut = float(conf[-1]) if conf.size else float(floor_logit)
        elif below.size:
            # the midpoint, unless the two are adjacent floats and it rounds up to tau: then the
            # lower confidence itself (kept for ``> cut`` is then exactly the point's components)
            middle = 0.5 * (tau + float(below[-1]))
            cut = max(middle if middle < tau else float(below[-1]), float(floor_logit))
        else:
            cut = float(floor_logit)
        points.append(OperatingPoint(fp_per_scan=float(rate), logit_threshold=cut,
                                     recall=json_float(curve.recall[index]),
                                     achieved_fp_per_scan=float(curve.fp_per_image[index])))
    return points


def json_float(value) -> float | None:
    """``value`` as a float, or None where it is NaN or infinite: JSON has neither, and the
    reports write an undefined value (no lesions, no curve) as null."""
    value = float(value)
    return value if math.isfinite(value) else None
