"""Intensity presets and resampling, shared by training and inference.

A *preset* is a plain JSON-able dict (stored in every checkpoint's model card) that says how
raw voxels become network input. The paper's presets (Shirokikh et al. 2020, section 4.1 and
the authors' preprocessing notebooks):

============ ======== ============== ============== =============================================
name         modality clip (raw)     scaling        organ mask
============ ======== ============== ============== =============================================
``ct-lung``  CT       -1000 … 300 HU window → [0,1] lung: voxels outside set to -1000 HU (→ 0)
``ct-liver`` CT       -300 … 300 HU  window → [0,1] liver: voxels outside set to -300 HU (→ 0)
``mr``       MR       none           percentile     none
============ ======== ============== ============== =============================================

Scalings (``params["scaling"]``):

* ``window``: ``(clip(x, lo, hi) - lo) / (hi - lo)``, so the clip window maps onto [0, 1];
* ``percentile``: ``clip((x - p_lo) / (p_hi - p_lo), 0, 1)`` with ``p_lo, p_hi`` the
  ``percentiles`` (default 0.5 and 99.5) of the image — of the voxels inside the mask when the
  preset uses one and a mask is given. Robust to a few hot voxels, unlike min-max;
* ``zscore``: ``(x - mean) / std`` (std floored at 1e-8), over the mask when one is used;
* ``none``: the clipped (or raw) values as float32.

With an organ mask, voxels outside it become the scaled value of the window minimum (``0`` for
``window`` and ``percentile``, the minimum inside the mask for ``zscore`` and ``none``), as
the authors set them to the minimum. A preset that names a mask still works without one (the
mask step is skipped): the checkpoint's ``preprocessing.mask`` tells the user to supply it.

Resampling (``params["target_spacing"]``, ``[sz, sy, sx]`` mm, an entry may be ``None`` to
keep that axis): linear interpolation for images, nearest neighbour for masks, onto a grid
with the same direction whose voxel *edges* align with the original's (the physical extent is
kept; ``size = floor(n * s / s_new + 0.5)``). :func:`resample_to_geometry` brings outputs back onto
the original grid exactly.

Memory: :func:`preprocess` makes one float32 copy of the image and works on it in place; it
never makes full-size float64 arrays.
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import Any, Mapping

from ..core.errors import InputError

SCALINGS = ("window", "percentile", "zscore", "none")

#: The largest organ-crop margin in voxels (a model card's and a training config's ``crop_to_organ``):
#: far above the authors' 5, it only bounds what a crafted card can ask for.
MAX_CROP_MARGIN = 512

#: The (modality, organ) pairs that have an automatic organ mask, found in the image itself
#: (:data:`IWSegmentationLib.preprocessing.lung_mask.AUTOMATIC_MASKS` holds their finders).
AUTOMATIC_MASK_ORGANS = frozenset({("CT", "lung")})


def automatic_mask_available(params: Mapping[str, Any]) -> bool:
    """Whether the preset's organ (``params['mask']``) has an automatic mask for its modality."""
    return (params.get("modality"), params.get("mask")) in AUTOMATIC_MASK_ORGANS


MODALITIES = ("CT", "MR", "other")


#: Every preset has exactly these keys (``get_preset`` rejects others).
PARAM_KEYS = (
    "name",             # preset name, for people and logs
    "modality",         # "CT", "MR" or "other"
    "clip",             # [lo, hi] in raw units (HU for CT) or None
    "scaling",          # one of SCALINGS
    "percentiles",      # [p_lo, p_hi] for scaling="percentile"
    "mask",             # organ mask the preset applies ("lung", "liver", ...) or None
    "target_spacing",   # [sz, sy, sx] mm (entries may be None) or None: no resampling
    "body_threshold",   # raw value above which a voxel is body (for skipping empty windows) or None
)


PRESETS: dict[str, dict[str, Any]] = {
    "ct-lung": {
        "name": "ct-lung", "modality": "CT", "clip": [-1000.0, 300.0], "scaling": "window",
        "percentiles": [0.5, 99.5], "mask": "lung", "target_spacing": None, "body_threshold": -900.0,
    },
    "ct-liver": {
        "name": "ct-liver", "modality": "CT", "clip": [-300.0, 300.0], "scaling": "window",
        "percentiles": [0.5, 99.5], "mask": "liver", "target_spacing": None, "body_threshold": -500.0,
    },
    "mr": {
        "name": "mr", "modality": "MR", "clip": None, "scaling": "percentile",
        "percentiles": [0.5, 99.5], "mask": None, "target_spacing": None, "body_threshold": None,
    },
}


def get_preset(name: str, **overrides: Any) -> dict[str, Any]:
    """A validated copy of preset ``name`` with ``overrides`` applied, e.g.
    ``get_preset("ct-lung", target_spacing=[1.25, 0.7, 0.7])``."""
    if name not in PRESETS:
        raise InputError(f"unknown preprocessing preset {name!r}; choose one of {', '.join(PRESETS)}")
    params = copy.deepcopy(PRESETS[name])
    params.update(copy.deepcopy(overrides))
    return validate_params(params)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value):
        raise InputError(f"preprocessing {what} must be a finite number, got {value!r}")
    return float(value)


def validate_params(params: dict[str, Any]) -> dict[str, Any]:
    """Check preset parameters (e.g. read back from a checkpoint) and return a normalised copy.

    Unknown keys and bad values raise :class:`InputError` naming the key.
    """
    if not isinstance(params, dict):
        raise InputError(f"preprocessing parameters must be a dict, got {type(params).__name__}")
    unknown = sorted(set(params) - set(PARAM_KEYS))
    missing = sorted(set(PARAM_KEYS) - set(params))
    if unknown:
        raise InputError(
            f"unknown preprocessing key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(PARAM_KEYS)}"
        )
    if missing:
        raise InputError(f"preprocessing parameters lack {', '.join(missing)} (start from get_preset(...))")
    out = copy.deepcopy(params)
    if out["modality"] not in MODALITIES:
        raise InputError(f"preprocessing 'modality' must be one of {', '.join(MODALITIES)}, got {out['modality']!r}")
    if out["scaling"] not in SCALINGS:
        raise InputError(f"preprocessing 'scaling' must be one of {', '.join(SCALINGS)}, got {out['scaling']!r}")
    if out["clip"] is not None:
        if not isinstance(out["clip"], (list, tuple)) or len(out["clip"]) != 2:
            raise InputError(f"preprocessing 'clip' must be [lo, hi] or None, got {out['clip']!r}")
        lo, hi = (_number(v, "'clip'") for v in out["clip"])
        if not lo < hi:
            raise InputError(f"preprocessing 'clip' needs lo < hi, got {out['clip']!r}")
        out["clip"] = [lo, hi]
    elif out["scaling"] == "window":
        raise InputError("preprocessing scaling 'window' needs a 'clip' window [lo, hi]")
    pct = out["percentiles"]
    if not isinstance(pct, (list, tuple)) or len(pct) != 2:
        raise InputError(f"preprocessing 'percentiles' must be [p_lo, p_hi], got {pct!r}")
    p_lo, p_hi = (_number(v, "'percentiles'") for v in pct)
    if not 0.0 <= p_lo < p_hi <= 100.0:
        raise InputError(f"preprocessing 'percentiles' need 0 <= p_lo < p_hi <= 100, got {pct!r}")
    out["percentiles"] = [p_lo, p_hi]
    if out["mask"] is not None and not isinstance(out["mask"], str):
        raise InputError(f"preprocessing 'mask' must be an organ name or None, got {out['mask']!r}")
    if out["target_spacing"] is not None:
        ts = out["target_spacing"]
        if not isinstance(ts, (list, tuple)) or len(ts) != 3:
            raise InputError(f"preprocessing 'target_spacing' must be [sz, sy, sx] mm or None, got {ts!r}")
        norm = []
        for v in ts:
            if v is None:
                norm.append(None)
                continue
            v = _number(v, "'target_spacing'")
            if v <= 0:
                raise InputError(f"preprocessing 'target_spacing' entries must be > 0, got {ts!r}")
            norm.append(v)
        out["target_spacing"] = norm
    if out["body_threshold"] is not None:
        out["body_threshold"] = _number(out["body_threshold"], "'body_threshold'")
    return out
