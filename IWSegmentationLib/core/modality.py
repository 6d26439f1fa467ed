"""Does a volume look like the modality a model was trained on? One heuristic, shared by the
command line (``iwseg predict`` refuses a mismatch) and the Slicer panel (which warns and asks).

CT is stored in Hounsfield units, where air is about -1000: a volume whose minimum is below
:data:`CT_MINIMUM_BELOW` is CT. MR intensities are arbitrary but non-negative, so a minimum
>= 0 *suggests* MR -- or a CT stored without its HU rescale, which a CT model cannot read
either. Between the two nothing is said. A DICOM Modality tag, when known, decides instead.
Plain numbers in, no numpy: the panel calls it with a volume's scalar range.
"""

from __future__ import annotations

#: A minimum below this (HU) means CT: nothing but air and lung reach it, and MR never does.
CT_MINIMUM_BELOW = -200.0
#: The modalities the heuristic can tell apart (a card's ``preprocessing.modality`` may also be "other").
KNOWN_MODALITIES = ("CT", "MR")


def guess_modality(minimum: float, maximum: float, dicom_modality: str | None = None) -> str | None:
    """``"CT"``, ``"MR"`` or None (unsure), from the DICOM tag when known, else from intensities.

    CT in Hounsfield units reaches air at about -1000, so a minimum below -200 means CT. MR
    intensities are arbitrary but non-negative: a minimum >= 0 *suggests* MR (or an unrescaled
    CT). ``maximum`` is unused by the rule; it is taken so that a caller passes the whole range
    and messages can show it.
    """
    if dicom_modality:
        tag = dicom_modality.strip().upper()
        return tag if tag in KNOWN_MODALITIES else None
    if minimum < CT_MINIMUM_BELOW:
        return "CT"
    if minimum >= 0:
        return "MR"
    return None


def modality_mismatch(expected: str | None, minimum: float, maximum: float,
                      dicom_modality: str | None = None) -> str | None:
    """Why a volume of intensity range ``minimum … maximum`` does not look like ``expected``
    (the model card's modality), as the end of a sentence ("the volume has ..."), or None when
    it does, when the guess is unsure, or when ``expected`` is neither CT nor MR."""
    expected = (expected or "").strip().upper() or None
    guess = guess_modality(minimum, maximum, dicom_modality)
    if expected not in KNOWN_MODALITIES or guess is None or guess == expected:
        return None
    if dicom_modality:
        return f"the volume's DICOM modality is {dicom_modality.strip().upper()}"
    if guess == "CT":
        return f"the volume has values down to {minimum:g}, like CT in Hounsfield units"
    return (f"the volume has no negative values (range {minimum:g} … {maximum:g}), "
            "unusual for CT in Hounsfield units")
