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
from .froc import AVG_RECALL_FP_RATES, CPM_FP_RATES, _json_float, avg_recall, cpm, froc
from .matching import CaseResult

if TYPE_CHECKING:
    from .froc import Froc


N_BOOTSTRAP = 100


BOOTSTRAP_FRACTION = 0.8


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
        les = [(i, group_code[x.size_group], x.hit_dice, math.nan if x.confidence is None or x.hit_dice <= 0
                else x.confidence) for i, c in enumerate(cases) for x in c.lesions]
        comp = [(i, group_code[x.size_group], x.confidence, x.hit_dice == 0)
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

    def select(self, group: str | None = None, images: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
        """(hit_conf of the selected lesions, confidences of the selected FPs, n_images)."""
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
        return self.les_conf[les_ok], self.comp_conf[fp_ok], n_images

    def froc(self, group: str | None = None, images: np.ndarray | None = None) -> Froc:
        hit_conf, fp_conf, n_images = self.select(group, images)
        return froc(hit_conf, fp_conf, n_images)

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


def _resamples(n_images: int, n_resamples: int, fraction: float, seed: int) -> list[np.ndarray]:
    if not (0 < fraction <= 1):
        raise InputError(f"bootstrap fraction must be in (0, 1], got {fraction}")
    if n_resamples < 1:
        raise InputError(f"bootstrap needs at least one resample, got {n_resamples}")
    size = max(1, int(math.floor(fraction * n_images + 0.5)))
    rng = np.random.default_rng(seed)
    return [rng.choice(n_images, size=size, replace=False) for _ in range(n_resamples)]


def bootstrap_recall_curves(
    cases: Sequence[CaseResult],
    fp_per_image: Sequence[float],
    *,
    size_group: str | None = None,
    n_resamples: int = N_BOOTSTRAP,
    fraction: float = BOOTSTRAP_FRACTION,
    seed: int = 0,
) -> np.ndarray:
    """Recall at ``fp_per_image`` for each bootstrap resample: shape ``(n_resamples, len(fp))``.

    Rows of resamples without any lesion of the group are NaN. The FROC plot draws its
    ±1 std band from these.
    """
    pool = _Pool.from_cases(_check_cases(cases))
    return _bootstrap_curves(pool, np.asarray(fp_per_image, float), size_group, n_resamples, fraction, seed)


def _bootstrap_curves(pool: _Pool, grid: np.ndarray, group, n_resamples, fraction, seed) -> np.ndarray:
    out = np.full((n_resamples, grid.size), np.nan)
    for b, images in enumerate(_resamples(pool.n_images, n_resamples, fraction, seed)):
        curve = pool.froc(group, images)
        if curve.n_lesions:
            out[b] = curve.recall_at(grid)
    return out


def _bootstrap(pool: _Pool, group, n_resamples, fraction, seed) -> dict:
    n_cpm = len(CPM_FP_RATES)
    grid = np.r_[np.asarray(CPM_FP_RATES), AVG_RECALL_FP_RATES]
    curves = _bootstrap_curves(pool, grid, group, n_resamples, fraction, seed)
    ok = np.isfinite(curves[:, 0])
    cpms = curves[ok, :n_cpm].mean(axis=1)
    avgs = curves[ok, n_cpm:].mean(axis=1)

    def summary(values: np.ndarray) -> dict:
        if values.size == 0:
            return {"mean": None, "std": None}
        return {"mean": float(values.mean()), "std": float(values.std(ddof=0))}

    return {"cpm": summary(cpms), "avg_recall_0_5": summary(avgs), "n": int(ok.sum())}


def bootstrap(
    cases: Sequence[CaseResult],
    *,
    size_group: str | None = None,
    n_resamples: int = N_BOOTSTRAP,
    fraction: float = BOOTSTRAP_FRACTION,
    seed: int = 0,
) -> dict:
    """Bootstrap of ``cpm`` and ``avg_recall_0_5`` over image subsets.

    ``n_resamples`` draws of ``fraction · #images`` (rounded half up, at least 1) images without
    replacement, from ``numpy.random.default_rng(seed)``, images ordered by case name;
    FP/image divides by the subset size. Returns ``{"cpm": {"mean", "std"},
    "avg_recall_0_5": {"mean", "std"}, "n"}`` where ``n`` counts the resamples that hold at
    least one lesion (the others have no recall and are left out); std has ddof 0.
    """
    pool = _Pool.from_cases(_check_cases(cases))
    return _bootstrap(pool, size_group, n_resamples, fraction, seed)


def _summary(pool: _Pool, group, n_resamples, fraction, seed) -> dict:
    curve = pool.froc(group)
    return {
        "n_images": pool.n_images,
        "n_lesions": curve.n_lesions,
        "object_dice": pool.object_dice(group),
        "cpm": _json_float(cpm(curve)),
        "avg_recall_0_5": _json_float(avg_recall(curve)),
        "froc": curve.as_dict(),
        "bootstrap": _bootstrap(pool, group, n_resamples, fraction, seed),
    }
