"""Operating points: a model's confidence thresholds named by the false positives per scan they cost.

A reader thinks in "false marks per scan", not in a probability. At the end of training the trainer
measures, on the validation FROC (components ranked by their maximum logit, as ``iwseg predict``
ranks them), which confidence threshold gives 1/8, 1/4, 1/2, 1, 2, 4 and 8 false positives per
scan and the recall there, and stores them in the model card (``operating_points``). This module
is the one definition of that record and of its lookup: :class:`OperatingPoints` (validated from a
card), :func:`parse_operating_point` (``1fp``, ``0.5fp``, ``1/8fp``), :meth:`OperatingPoints.lookup`
(``iwseg predict --operating-point``) and :meth:`OperatingPoints.at_logit` (the Slicer slider's
label). Pure Python (no numpy, no torch): the Slicer GUI reads it.

A point's ``logit_threshold`` is a voxel threshold in logit space: ``iwseg predict`` keeps the voxels
whose logit is above it, so a component survives exactly when its maximum logit (its confidence) is
above it. It lies strictly between the lowest confidence kept on the validation FROC and the next
lower one, never below the logit of the card's ``threshold`` (the validation components were found
there). Looking a point up costs nothing at inference: it is a threshold.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Mapping, Sequence

from .errors import CheckpointError, InputError

#: The false-positive rates (per scan) of the stored operating points: those of the LUNA16 CPM.
OPERATING_POINT_FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: What the module's confidence slider starts at when the card has operating points (1 FP/scan).
DEFAULT_FP_PER_SCAN = 1.0

_SPEC = re.compile(r"^\s*(\d+(?:\.\d+)?)(?:\s*/\s*(\d+(?:\.\d+)?))?\s*(?:fp)?\s*$", re.IGNORECASE)


def format_rate(rate: float) -> str:
    """A rate as a user writes it: ``1/8``, ``1/2``, ``1``, ``4`` (fractions below 1 as 1/n)."""
    frac = Fraction(rate).limit_denominator(64)
    if frac.denominator == 1:
        return str(frac.numerator)
    if math.isclose(float(frac), rate, rel_tol=1e-9):
        return f"{frac.numerator}/{frac.denominator}"
    return f"{rate:g}"


def parse_operating_point(text: str, name: str = "--operating-point") -> float:
    """False positives per scan from ``1fp``, ``0.5fp``, ``1/8fp`` (the ``fp`` is optional);
    :class:`InputError` naming ``name`` otherwise."""
    match = _SPEC.match(str(text))
    if not match:
        raise InputError(f"{name} must be a false-positive rate per scan such as 1fp, 0.5fp or 1/8fp, got {text!r}")
    denominator = float(match.group(2)) if match.group(2) else 1.0
    rate = float(match.group(1)) / denominator if denominator > 0 else math.nan
    if not math.isfinite(rate) or rate <= 0:
        raise InputError(f"{name} must be a positive false-positive rate per scan, got {text!r}")
    return rate


@dataclass(frozen=True)
class OperatingPoint:
    """One operating point: ``fp_per_scan`` (the rate asked for), the voxel ``logit_threshold`` that
    gives it on validation, the validation ``recall`` there (None without lesions) and the
    ``achieved_fp_per_scan`` (at most ``fp_per_scan``: the FROC is a step curve)."""

    fp_per_scan: float
    logit_threshold: float
    recall: float | None
    achieved_fp_per_scan: float

    @property
    def name(self) -> str:
        """The point as ``--operating-point`` takes it: ``1/8fp``, ``1fp``."""
        return f"{format_rate(self.fp_per_scan)}fp"

    @property
    def probability(self) -> float:
        """``sigmoid(logit_threshold)`` in float64 (rounds to 1.0 above a logit of about 37)."""
        return 1.0 / (1.0 + math.exp(-self.logit_threshold)) if self.logit_threshold > -700 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"fp_per_scan": self.fp_per_scan, "logit_threshold": self.logit_threshold,
                "recall": self.recall, "achieved_fp_per_scan": self.achieved_fp_per_scan}


@dataclass(frozen=True)
class SliderLabel:
    """What a confidence threshold means on the validation FROC: the expected false positives per
    scan and the recall (interpolated between the two nearest points, in logit), and the nearest
    stored point."""

    fp_per_scan: float
    recall: float | None
    nearest: OperatingPoint

    @property
    def text(self) -> str:
        recall = "" if self.recall is None else f", recall {100 * self.recall:.0f}%"
        return f"≈ {self.fp_per_scan:.2g} FP/scan{recall} (validation; nearest: {self.nearest.name})"


@dataclass(frozen=True)
class OperatingPoints:
    """The card's ``operating_points`` section: the points (sorted by rate) and how they were
    measured: ``hit_rule`` (the validation's), ``score`` (``logit``), ``n_images``, ``n_lesions``,
    ``epoch`` (1-based, of the checkpoint's validation)."""

    points: tuple[OperatingPoint, ...]
    hit_rule: str
    n_images: int
    n_lesions: int
    epoch: int | None = None
    score: str = "logit"

    @classmethod
    def from_dict(cls, value: Any, where: str = "model card") -> OperatingPoints:
        """Validate a card's section (:class:`CheckpointError` naming ``where`` and the field)."""
        key = "operating_points"

        def fail(what: str, got: Any) -> CheckpointError:
            return CheckpointError(f"{where} field {key!r} {what}, got {str(got)[:80]}")

        def number(v: Any, what: str, *, optional: bool = False) -> float | None:
            if v is None and optional:
                return None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise fail(f"{what} must be a finite number", v)
            return float(v)

        if not isinstance(value, Mapping):
            raise fail("must be a JSON object", value)
        points = value.get("points")
        if not isinstance(points, Sequence) or isinstance(points, str) or not points:
            raise fail("needs a non-empty list 'points'", points)
        parsed = []
        for p in points:
            if not isinstance(p, Mapping):
                raise fail("points must be objects", p)
            rate = number(p.get("fp_per_scan"), "fp_per_scan")
            recall = number(p.get("recall"), "recall", optional=True)
            achieved = number(p.get("achieved_fp_per_scan"), "achieved_fp_per_scan")
            if rate <= 0 or achieved < 0 or (recall is not None and not 0 <= recall <= 1):
                raise fail("points need fp_per_scan > 0, achieved_fp_per_scan >= 0 and recall in [0, 1]", p)
            parsed.append(OperatingPoint(rate, number(p.get("logit_threshold"), "logit_threshold"), recall, achieved))
        parsed.sort(key=lambda p: p.fp_per_scan)
        if len({p.fp_per_scan for p in parsed}) != len(parsed):
            raise fail("lists a rate twice", [p.fp_per_scan for p in parsed])
        for name in ("hit_rule", "score"):
            if not isinstance(value.get(name, "logit"), str):
                raise fail(f"{name} must be a string", value.get(name))
        counts = [value.get("n_images"), value.get("n_lesions")]
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            raise fail("needs whole numbers n_images and n_lesions", counts)
        epoch = value.get("epoch")
        if epoch is not None and (isinstance(epoch, bool) or not isinstance(epoch, int)):
            raise fail("epoch must be a whole number or null", epoch)
        return cls(tuple(parsed), str(value.get("hit_rule", "")), counts[0], counts[1], epoch,
                   str(value.get("score", "logit")))

    @classmethod
    def of_card(cls, card: Mapping[str, Any] | None, where: str = "model card") -> OperatingPoints | None:
        """The card's operating points, or None for a card written before they were stored."""
        section = card.get("operating_points") if isinstance(card, Mapping) else None
        return None if section is None else cls.from_dict(section, where)

    def as_dict(self) -> dict[str, Any]:
        """The card's JSON section."""
        return {"points": [p.as_dict() for p in self.points], "hit_rule": self.hit_rule, "score": self.score,
                "n_images": self.n_images, "n_lesions": self.n_lesions, "epoch": self.epoch}

    @property
    def names(self) -> list[str]:
        """The points as ``--operating-point`` takes them, lowest rate first."""
        return [p.name for p in self.points]

    def lookup(self, spec: str | float, where: str = "the model card") -> OperatingPoint:
        """The stored point of a rate (``1fp``, ``0.5fp``, ``1/8fp`` or a number); :class:`InputError`
        naming ``where`` and listing the stored points when there is none at that rate."""
        rate = parse_operating_point(spec) if isinstance(spec, str) else float(spec)
        for point in self.points:
            if math.isclose(point.fp_per_scan, rate, rel_tol=1e-9):
                return point
        raise InputError(f"--operating-point {spec}: {where} has no operating point at {format_rate(rate)} FP/scan; "
                         f"it has {', '.join(self.names)}")

    def default(self) -> OperatingPoint:
        """The point the module's slider starts at: 1 FP/scan if stored, else the nearest rate to it."""
        return min(self.points, key=lambda p: abs(math.log(p.fp_per_scan / DEFAULT_FP_PER_SCAN)))

    def at_logit(self, logit: float) -> SliderLabel:
        """What a confidence threshold ``logit`` means: FP/scan and recall interpolated linearly in
        logit between the stored points it lies between (clamped to the end points), and the point
        whose threshold is nearest (halfway: the stricter one). Thresholds fall as the rate rises."""
        pts = sorted(self.points, key=lambda p: p.logit_threshold)  # low logit = many FPs
        nearest = min(pts, key=lambda p: (abs(p.logit_threshold - logit), -p.logit_threshold))  # tie: the stricter
        if logit <= pts[0].logit_threshold:
            low = high = pts[0]
        elif logit >= pts[-1].logit_threshold:
            low = high = pts[-1]
        else:
            i = next(i for i, p in enumerate(pts) if p.logit_threshold >= logit)
            low, high = pts[i - 1], pts[i]
        span = high.logit_threshold - low.logit_threshold
        w = 0.0 if span <= 0 else (logit - low.logit_threshold) / span
        fp = (1 - w) * low.achieved_fp_per_scan + w * high.achieved_fp_per_scan
        recall = (None if low.recall is None or high.recall is None
                  else (1 - w) * low.recall + w * high.recall)
        return SliderLabel(fp, recall, nearest)
