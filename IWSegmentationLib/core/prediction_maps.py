"""What a prediction map's voxel values mean: the probabilities of a logit map (:func:`sigmoid`), a
stored probability, a uint8-scaled probability or a label.

``iwseg predict --probabilities-uint8`` stores ``round(255 p)`` and records it in the file's notes
(:data:`PROBABILITY_UINT8_NOTE`, ITK's ``ITK_FileNotes``: the NIfTI ``descrip`` field, a
``key:=value`` line of NRRD, a field of MetaImage). A uint8 map without that note is ambiguous:
a uint8 probability map whose maximum is 1 (p = 0.004) and a 0/1 mask look alike, and so do a
label map with lesion value 2 (nnU-Net / LiTS style) and a probability map of p <= 2/255.
:func:`prediction_probabilities` reads the note and the values and refuses what it cannot tell,
so that ``iwseg evaluate`` never scores a misread map. No torch, no SimpleITK.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import InputError

#: The note predict writes into a ``--probabilities-uint8`` file (at most 80 characters: NIfTI's descrip).
PROBABILITY_UINT8_NOTE = "iwseg probabilities uint8: p = value / 255"
#: ``iwseg evaluate --pred-values``: how to read a prediction's values (``label=K`` also accepted).
PREDICTION_VALUES = ("auto", "probability", "uint8")
#: The flag that says it, named in the refusal.
PREDICTION_VALUES_FLAG = "--pred-values"


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Float32 probabilities ``1 / (1 + exp(-x))`` of a logit array, without overflow warnings."""
    x = np.asarray(logits, dtype=np.float32)
    out = np.empty_like(x)
    np.negative(x, out=out)
    with np.errstate(over="ignore"):  # exp overflows to inf below about -88: sigmoid is then exactly 0
        np.exp(out, out=out)
    out += 1.0
    np.reciprocal(out, out=out)
    return out


def probabilities_to_uint8(probabilities: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] as ``round(255 p)`` (predict's ``--probabilities-uint8``; the file
    written also gets :data:`PROBABILITY_UINT8_NOTE`)."""
    return np.rint(probabilities * np.float32(255.0)).astype(np.uint8)


def parse_prediction_values(text: str) -> str | int:
    """``auto``, ``probability``, ``uint8`` or ``label=K`` (returned as the integer K >= 1)."""
    text = str(text).strip().lower()
    if text in PREDICTION_VALUES:
        return text
    if text.startswith("label="):
        try:
            label = int(text.split("=", 1)[1])
        except ValueError:
            label = 0
        if label >= 1:
            return label
    raise InputError(f"{PREDICTION_VALUES_FLAG} must be auto, probability, uint8 or label=K (K >= 1), got {text!r}")


def _integer_values(array: np.ndarray) -> np.ndarray:
    """The distinct values of an integer array (a histogram for uint8: no sort of the volume)."""
    if array.dtype == np.uint8:
        return np.flatnonzero(np.bincount(array.ravel(), minlength=256))
    return np.unique(array)


def prediction_probabilities(array: np.ndarray, notes: str, path: str | os.PathLike,
                             values: str | int = "auto") -> np.ndarray:
    """A stored prediction as probabilities in [0, 1] (or a 0/1 mask), or :class:`InputError`
    naming ``path`` when its values cannot be told apart.

    ``values`` ``auto``: a float map is a probability map; a uint8 map with
    :data:`PROBABILITY_UINT8_NOTE` in ``notes`` is ``v / 255``; an integer map whose values are
    only ``{0, k}`` is a label map (voxels of ``k`` are lesion, e.g. nnU-Net's lesion label 2);
    an integer map with more values is refused. ``probability``: as stored; ``uint8``: ``v / 255``
    (a uint8 file without the note); an integer ``K`` (``label=K``): voxels of value ``K``.
    """
    array = np.asarray(array)
    integer = array.dtype.kind in "iu"
    if isinstance(values, int) and not isinstance(values, bool):
        if not integer:
            raise InputError(f"prediction {path}: {PREDICTION_VALUES_FLAG} label={values} needs an integer label map, "
                             f"the file holds {array.dtype}")
        return (array == values).view(np.uint8)
    if values == "uint8" or (values == "auto" and array.dtype == np.uint8 and PROBABILITY_UINT8_NOTE in (notes or "")):
        if array.dtype != np.uint8:
            raise InputError(f"prediction {path}: {PREDICTION_VALUES_FLAG} uint8 needs a uint8 map, the file holds "
                             f"{array.dtype}")
        return array.astype(np.float32) / np.float32(255.0)
    if values == "probability" or not integer:
        return array
    found = _integer_values(array)
    nonzero = found[found != 0]
    if nonzero.size <= 1:
        return array if not nonzero.size or int(nonzero[0]) == 1 else (array == nonzero[0]).view(np.uint8)
    shown = ", ".join(str(int(v)) for v in found[:6]) + (", ..." if found.size > 6 else "")
    raise InputError(
        f"prediction {path}: an integer map with {found.size} values ({shown}) and no note saying what they are: "
        "a probability map scaled to 0..255 and a label map look alike. Give "
        f"{PREDICTION_VALUES_FLAG} uint8 (p = value / 255; iwseg predict --probabilities-uint8 now records it "
        f"in the file) or {PREDICTION_VALUES_FLAG} label=K (voxels of value K are lesion)"
    )
