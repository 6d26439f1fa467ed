"""Train/val/test splits by case id: made reproducibly, checked, read and written as JSON."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..core.errors import InputError
from ..core.files import natural_key, preview_names
from ..core.outputs import atomic_output
from .datasets import SPLIT_NAMES, read_json


def _split_counts(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder rounding of ``n * fraction`` so the counts add up to ``n``."""
    raw = {k: n * f for k, f in fractions.items()}
    counts = {k: int(math.floor(v)) for k, v in raw.items()}
    left = n - sum(counts.values())
    for k in sorted(raw, key=lambda k: -(raw[k] - counts[k]))[:left]:
        counts[k] += 1
    return counts


def make_splits(
    case_ids: Sequence[str],
    fractions: Sequence[float] | Mapping[str, float] = (0.8, 0.2),
    seed: int = 0,
) -> dict[str, list[str]]:
    """Seeded random split of ``case_ids`` by fractions.

    ``fractions`` is ``(train, val)``, ``(train, val, test)`` or a mapping with keys from
    :data:`SPLIT_NAMES`; the fractions must be positive and add up to 1. Counts use
    largest-remainder rounding; a split that would be empty is an error. The result depends
    only on the *set* of ids and the seed (not their order); ids are sorted within a split.
    """
    ids = [str(i) for i in case_ids]
    dup = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dup:
        raise InputError(f"duplicate case id(s) {preview_names(dup)}")
    if isinstance(fractions, Mapping):
        frac = {str(k): fractions[k] for k in fractions}
    else:
        fractions = list(fractions)
        if len(fractions) not in (2, 3):
            raise InputError(f"fractions must be (train, val) or (train, val, test), got {fractions}")
        frac = dict(zip(SPLIT_NAMES, fractions))
    unknown = [k for k in frac if k not in SPLIT_NAMES]
    if unknown or "train" not in frac:
        raise InputError(f"split names must include 'train' and come from {', '.join(SPLIT_NAMES)}, got {list(frac)}")
    try:
        frac = {k: float(v) for k, v in frac.items()}
    except (TypeError, ValueError):
        raise InputError(f"fractions must be numbers, got {frac}") from None
    if any(not (v > 0) for v in frac.values()) or abs(sum(frac.values()) - 1.0) > 1e-6:
        raise InputError(f"split fractions must be positive and add up to 1, got {frac}")
    counts = _split_counts(len(ids), frac)
    empty = [k for k, c in counts.items() if c == 0]
    if empty:
        raise InputError(f"split(s) {', '.join(empty)} would be empty: {len(ids)} case(s) cannot be split as {frac}")
    order = np.random.default_rng(seed).permutation(len(ids))
    pool = [sorted(ids, key=natural_key)[i] for i in order]
    out, at = {}, 0
    for k in frac:
        out[k] = sorted(pool[at:at + counts[k]], key=natural_key)
        at += counts[k]
    return out


def check_splits(
    splits: Any, case_ids: Sequence[str] | None = None, *, source: str = "splits"
) -> dict[str, list[str]]:
    """Validate a split mapping: keys from :data:`SPLIT_NAMES` with ``train`` present, each a
    non-empty list of distinct string ids, no id in two splits and (if ``case_ids`` is given)
    no unknown id. Returns a clean ``{name: [ids]}``; errors name ``source``."""
    if not isinstance(splits, Mapping):
        raise InputError(f"{source} must be a JSON object {{\"train\": [...], \"val\": [...]}}, got {type(splits).__name__}")
    bad_keys = [k for k in splits if k not in SPLIT_NAMES]
    if bad_keys:
        raise InputError(f"{source}: unknown split name(s) {preview_names(bad_keys)}; valid names are {', '.join(SPLIT_NAMES)}")
    if "train" not in splits:
        raise InputError(f"{source} has no 'train' split")
    out: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for name, ids in splits.items():
        if not isinstance(ids, (list, tuple)) or not all(isinstance(i, str) for i in ids):
            raise InputError(f"{source}: split {name!r} must be a list of case-id strings")
        if not ids:
            raise InputError(f"{source}: split {name!r} is empty")
        for i in ids:
            if i in owner:
                where = "twice in" if owner[i] == name else f"in both {owner[i]!r} and"
                raise InputError(f"{source}: case {i!r} is {where} split {name!r}; a case may be in one split only")
            owner[i] = name
        out[name] = list(ids)
    if case_ids is not None:
        known = set(case_ids)
        unknown = [i for i in owner if i not in known]
        if unknown:
            raise InputError(f"{source}: case id(s) {preview_names(unknown)} are not in the dataset; "
                             f"known ids: {preview_names(sorted(known, key=natural_key))}")
    return out


def read_splits(
    path: str | os.PathLike, case_ids: Sequence[str] | None = None, *, fold: int = 0
) -> dict[str, list[str]]:
    """Read a split file ``{"train": [...], "val": [...], "test": [...]}`` and validate it with
    :func:`check_splits`. An nnU-Net ``splits_final.json`` (a list of such objects, one per
    fold) is accepted too: ``fold`` picks one."""
    path = Path(path)
    data = read_json(path, what="split file", missing=f"split file not found: {path}")
    if isinstance(data, list):
        if not (0 <= fold < len(data)):
            raise InputError(f"split file {path} has {len(data)} fold(s); fold {fold} does not exist")
        data = data[fold]
    return check_splits(data, case_ids, source=f"split file {path}")


def write_splits(path: str | os.PathLike, splits: Mapping[str, Sequence[str]]) -> Path:
    """Write a (validated) split mapping as JSON, atomically."""
    clean = check_splits(dict(splits))
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(clean, indent=2) + "\n")
    return Path(path)
