"""Bootstrap confidence of the detection summaries (resampling images, as the paper does)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ..core.errors import InputError
from ..core.lesions import (
    SIZE_GROUPS,
)
from .froc import AVG_RECALL_FP_RATES, CPM_FP_RATES, avg_recall, cpm, froc, json_float
from .matching import CaseResult

if TYPE_CHECKING:
    from .froc import Froc


N_BOOTSTRAP = 100


BOOTSTRAP_FRACTION = 0.8


#: Bootstrap variants: ``ours`` (FP/image over the resample's images) and ``paper`` (the
#: authors' notebook: images without any lesion or component are left out of the draw, and
#: FP/image divides by the full image count; seed 42 reproduces Table 2).
BOOTSTRAP_MODES = ("ours", "paper")


PAPER_BOOTSTRAP_SEED = 42


@dataclass
class CasePool:
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
    def from_cases(cls, cases: Sequence[CaseResult]) -> CasePool:
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

        ``images`` are image indices; an image listed k times counts k times (its lesions and false
        positives repeated), as a draw with replacement needs. The denominator is the number of
        selected images, repeats included, unless ``fp_denominator`` is given."""
        les_ok = np.ones(self.les_conf.size, bool)
        fp_ok = self.comp_fp.copy()
        n_images = self.n_images
        if group is not None:
            code = SIZE_GROUPS.index(group)
            les_ok &= self.les_group == code
            fp_ok &= self.comp_group == code
        if images is None:
            return self.les_conf[les_ok], self.comp_conf[fp_ok], fp_denominator or n_images
        times = np.bincount(np.asarray(images, dtype=np.int64), minlength=self.n_images)
        les_times = np.where(les_ok, times[self.les_image], 0)
        fp_times = np.where(fp_ok, times[self.comp_image], 0)
        return (np.repeat(self.les_conf, les_times), np.repeat(self.comp_conf, fp_times),
                fp_denominator or int(times.sum()))

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


def check_cases(cases: Sequence[CaseResult]) -> list[CaseResult]:
    """``cases`` sorted by case name, after refusing (:class:`InputError`) an empty list or anything
    that is not a :class:`CaseResult`; the fixed order makes a seeded bootstrap input-order free."""
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


def check_bootstrap_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`BOOTSTRAP_MODES`, else :class:`InputError`."""
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
    pool = CasePool.from_cases(check_cases(cases))
    return _bootstrap_curves(pool, np.asarray(fp_per_image, float), size_group, n_resamples, fraction, seed,
                             check_bootstrap_mode(mode))


def _bootstrap_curves(pool: CasePool, grid: np.ndarray, group, n_resamples, fraction, seed, mode="ours") -> np.ndarray:
    paper = mode == "paper"
    candidates = pool.with_records() if paper else np.arange(pool.n_images)
    denominator = pool.n_images if paper else None
    out = np.full((n_resamples, grid.size), np.nan)
    for b, images in enumerate(_resamples(candidates, n_resamples, fraction, seed)):
        curve = pool.froc(group, images, denominator)
        if curve.n_lesions:
            out[b] = curve.recall_at(grid)
    return out


def _bootstrap(pool: CasePool, group, n_resamples, fraction, seed, mode="ours") -> dict:
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
    pool = CasePool.from_cases(check_cases(cases))
    return _bootstrap(pool, size_group, n_resamples, fraction, seed, check_bootstrap_mode(mode))


def pooled_summary(pool: CasePool, group, n_resamples, fraction, seed, mode="ours") -> dict:
    """The report fields of one size ``group`` (None: all lesions) of ``pool``: counts, recall,
    object Dice, CPM, average recall to 0.5 FP/image, the FROC curve and its bootstrap."""
    curve = pool.froc(group)
    return {
        "n_images": pool.n_images,
        "n_lesions": curve.n_lesions,
        "recall": json_float(pool.recall(group)),
        "object_dice": pool.object_dice(group),
        "cpm": json_float(cpm(curve)),
        "avg_recall_0_5": json_float(avg_recall(curve)),
        "froc": curve.as_dict(),
        "bootstrap": _bootstrap(pool, group, n_resamples, fraction, seed, mode),
    }
