"""Confidence in logit space: the one definition of how a probability threshold maps to a logit.

Why logits: in float32, ``sigmoid(x)`` rounds to exactly 1.0 above about 17 (in float16 above
about 8), so ranking lesion components by their maximum *probability* ties every confident
component at 1.0 and the FROC cannot order them. Inverse-weighted losses make such confident
networks (the authors' iw-Dice hits on LiTS have a median maximum logit of about 46). The
authors rank components by their maximum logit; so does this project. A threshold is still
given as a probability (the card's ``threshold``, 0.5 by default) and applied in logit space:
``sigmoid(x) > t`` is ``x > log(t / (1 - t))``, which a positive scaling of the logits leaves
unchanged at ``t = 0.5``.

Standard library only (the Slicer panel checks thresholds with it); the array function
``sigmoid`` is :func:`IWSegmentationLib.core.prediction_maps.sigmoid`.
"""

from __future__ import annotations

import math

from .errors import InputError

__all__ = ["SKIPPED_LOGIT", "probability_to_logit"]

#: The logit given to voxels no sliding window covered (windows skipped outside the
#: foreground): ``sigmoid(-1e4)`` is exactly 0 in float32, so they read as probability 0, and
#: it lies below every threshold a user can give.
SKIPPED_LOGIT = -1.0e4


def probability_to_logit(threshold: float, name: str = "threshold") -> float:
    """``log(t / (1 - t))``: the logit at which ``sigmoid`` crosses ``threshold``.

    ``threshold`` must be in [0, 1); 0 maps to :data:`SKIPPED_LOGIT` (every covered voxel is
    above it, no skipped voxel is), so ``logits > probability_to_logit(t)`` is the mask
    ``probabilities > t`` without the float32 rounding of the sigmoid.
    """
    t = float(threshold)
    if not 0.0 <= t < 1.0 or math.isnan(t):
        raise InputError(f"{name} must be in [0, 1), got {threshold}")
    if t == 0.0:
        return SKIPPED_LOGIT
    return math.log(t) - math.log1p(-t)
