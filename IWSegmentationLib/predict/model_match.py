"""Does an input fit the model: its voxel spacing (resampled to the model's, said in one line)
and its modality (a CT model refuses what looks like MR, and the reverse).

Torch-free: the :class:`~IWSegmentationLib.predict.predictor.Predictor` asks these before a case
runs; :func:`inference.predict_volume` does the resampling itself (``keep_spacing``).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..core.errors import InputError
from ..core.imageio import Geometry
from ..core.modality import modality_mismatch
from ..nn.model_card import card_modality, card_spacing
from ..preprocessing.resampling import resampled_geometry


def spacing_text(spacing_xyz) -> str:
    """``0.70x0.70x5.00 mm``: a spacing in x, y, z order (as viewers list it), for the one line."""
    return "x".join(f"{float(v):.2f}" for v in spacing_xyz) + " mm"


def no_spacing_note(card: Mapping[str, Any], keep_spacing: bool) -> str | None:
    """The note, said once per run, that the model does not know its voxel spacing, or None."""
    if keep_spacing or card_spacing(card) is not None:
        return None
    return ("the model card records no voxel spacing, so every input is segmented on its own grid, whatever its "
            "voxel size (results on a spacing unlike the training data's can be poor)")


def spacing_note(card: Mapping[str, Any], geometry: Geometry, keep_spacing: bool) -> str | None:
    """The one line saying that this input is resampled to the model's spacing (and how to skip
    it), or None when nothing is resampled: ``--keep-spacing``, no spacing in the card, or an
    input already on it."""
    spacing = None if keep_spacing else card_spacing(card)
    if spacing is None:
        return None
    target = resampled_geometry(geometry, spacing)
    if target == geometry:
        return None
    return (f"resampling {spacing_text(geometry.spacing)} -> {spacing_text(target.spacing)} (model's spacing) and "
            "the result back; --keep-spacing to skip")


def check_modality(card: Mapping[str, Any], image: np.ndarray, where: str, allow: bool) -> str | None:
    """Refuse (:class:`InputError` naming ``where``) an image that does not look like the card's
    modality (:func:`core.modality.modality_mismatch`: a CT model on MR, or the reverse). With
    ``allow`` (``--allow-modality-mismatch``) the reason is returned, for a warning, instead."""
    expected = card_modality(card)
    if expected not in ("CT", "MR") or image.size == 0:
        return None
    minimum, maximum = float(np.min(image)), float(np.max(image))
    why = modality_mismatch(expected, minimum, maximum)
    if why is None:
        return None
    preset = (card.get("preprocessing") or {}).get("name", "its preset")
    message = (f"the model was trained on {expected} (model card preprocessing.modality, preset {preset}) but {why}; "
               f"a {expected} model gives meaningless results on other images")
    if allow:
        return f"{message} (--allow-modality-mismatch: running anyway)"
    raise InputError(f"{where}: {message}. Give a {expected} image, or --allow-modality-mismatch to run anyway")
