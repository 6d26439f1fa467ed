"""The module's parameter node as a prediction: :func:`predict_options`.

The scripted module (``IWSegmentation/IWSegmentation.py``, class ``IWSegmentationParameterNode``)
keeps what the user chose in a parameter node. Every field of it is either a prediction parameter,
which becomes an ``iwseg predict`` option (:data:`PREDICTION_FIELDS`), or something else, said in
:data:`OTHER_FIELDS`; a test reads the node's fields from the module's source and checks that
each is in exactly one of the two, and that each prediction field reaches the command line.
:func:`apply_model_card` sets the fields a chosen checkpoint's card decides. Qt-free and torch-free.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..predict.options import PredictOptions
from . import panel

#: parameter-node field -> the ``iwseg predict`` flag it becomes. The volume and the organ mask
#: are written into the job's folder (``--input``, ``--organ-mask``); the rest are options.
PREDICTION_FIELDS = {
    "checkpointPath": "--model",
    "device": "--device",
    "overlap": "--overlap",
    "threshold": "--threshold",
    "inputVolume": "--input",
    "organMask": "--organ-mask",
    "operatingPoint": "--operating-point",
    "keepSpacing": "--keep-spacing",
    "allowUnmasked": "--allow-unmasked",
    "tta": "--tta",
}

#: parameter-node fields that are not prediction parameters, and what each is for.
OTHER_FIELDS = {
    "referenceSegmentation": "compared with the result after loading (object Dice), not sent to the backend",
    "confidenceThreshold": "display only: hides the lesions whose confidence is below it, after the run",
    "runOn": "where the job runs (this computer or a server), not what it does",
    "serverUrl": "where the job runs",
    "serverTokenFile": "how the module proves itself to the server",
    "outputSegmentation": "the result the run makes",
    "segmentBudget": "display only: how many of the most confident lesions become segments (the rest are counted)",
}


def predict_options(node: Any, *, allow_modality_mismatch: bool = False) -> PredictOptions:
    """The :class:`PredictOptions` of a parameter node (any object with its fields): the checkpoint,
    the device (its label mapped by :data:`panel.DEVICE_CHOICES`), the overlap, the threshold,
    whether to keep the volume's own voxel spacing, and test-time mirroring (``tta``: 8 flips
    averaged, about 8x the time; it also gives each lesion its doubt, the panel's Doubt column).
    The outputs are what the module loads: the mask, the logit map (confidences are maximum
    logits, the probability volume its sigmoid) and the lesion table. An ``operatingPoint``
    (``1fp``; empty: none) replaces the threshold: the card's logit threshold at that rate.

    ``allow_modality_mismatch``: the user saw :func:`panel.compatibility_warnings` say that the
    volume does not look like the model's modality and chose to run anyway (the module asks
    before it starts, with the DICOM tag the backend cannot see); ``iwseg predict`` would
    otherwise refuse such a volume."""
    checkpoint = str(node.checkpointPath or "").strip()
    operating_point = str(getattr(node, "operatingPoint", "") or "").strip() or None
    return PredictOptions(models=(checkpoint,) if checkpoint else (), device=panel.DEVICE_CHOICES[node.device],
                          overlap=float(node.overlap),
                          threshold=None if operating_point else float(node.threshold),
                          operating_point=operating_point,
                          probabilities=False, logits=True, lesions=True,
                          keep_spacing=bool(node.keepSpacing), allow_modality_mismatch=allow_modality_mismatch,
                          allow_unmasked=bool(getattr(node, "allowUnmasked", False)),
                          tta=bool(getattr(node, "tta", False)))


def apply_model_card(node: Any, card: Mapping[str, Any]) -> None:
    """A checkpoint was chosen: start the node's ``threshold`` at the card's (0.5 without one), within
    the slider's range 0.05 to 0.95, and its ``confidenceThreshold`` at :func:`panel.default_confidence`
    (the card's 1 false positive per scan, else its threshold as a logit)."""
    node.threshold = min(max(float(card.get("threshold", 0.5)), 0.05), 0.95)
    node.confidenceThreshold = panel.default_confidence(card)
