"""Hit rules: when a predicted component counts as a detection of a reference lesion (the presets, the parser, :class:`HitRule`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.errors import InputError

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
