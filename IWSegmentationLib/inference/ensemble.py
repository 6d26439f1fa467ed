"""Ensembles of checkpoints: the check that several model cards agree on what inference needs."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..core.errors import InputError
from ..preprocessing.presets import validate_params
from .predict import inference_settings


def _card_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """What two model cards disagree on among the settings an ensemble must share: the
    preprocessing (how the input is prepared) and organ crop, the sliding window (patch size, overlap, blend),
    the threshold and the network's input and output channels."""
    diffs = []
    pa, pb = validate_params(dict(a["preprocessing"])), validate_params(dict(b["preprocessing"]))
    diffs += [f"preprocessing {k}: {pa.get(k)!r} vs {pb.get(k)!r}" for k in sorted(set(pa) | set(pb))
              if pa.get(k) != pb.get(k)]
    sa, sb = inference_settings(a), inference_settings(b)
    diffs += [f"{k}: {sa[k]!r} vs {sb[k]!r}" for k in sa if sa[k] != sb[k]]
    if a.get("crop_to_organ") != b.get("crop_to_organ"):
        diffs.append(f"crop_to_organ: {a.get('crop_to_organ')!r} vs {b.get('crop_to_organ')!r}")
    ta, tb = float(a.get("threshold", 0.5)), float(b.get("threshold", 0.5))
    if ta != tb:
        diffs.append(f"threshold: {ta:g} vs {tb:g}")
    for key in ("in_channels", "out_channels"):
        ca, cb = (dict(c.get("architecture") or {}).get(key) for c in (a, b))
        if ca != cb:
            diffs.append(f"{key}: {ca!r} vs {cb!r}")
    return diffs


def check_ensemble(cards: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
    """Raise :class:`InputError` naming both files when two members of an ensemble (``(name,
    card)`` pairs, the first is the reference) differ in preprocessing, sliding window,
    threshold or channels; the size groups and the rest of the card are taken from the first."""
    if not cards:
        raise InputError("an ensemble needs at least one model")
    first_name, first = cards[0]
    for name, card in cards[1:]:
        diffs = _card_differences(first, card)
        if diffs:
            raise InputError(
                f"models {first_name} and {name} cannot be ensembled: their cards differ in "
                f"{'; '.join(diffs)}; ensemble checkpoints trained with the same settings"
            )
