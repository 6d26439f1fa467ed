"""core.modality: the one CT-or-MR heuristic of the command line and the Slicer panel."""

from __future__ import annotations

import pytest

from IWSegmentationLib.core.modality import guess_modality, modality_mismatch


@pytest.mark.parametrize(
    ("low", "high", "dicom", "expected"),
    [(-1024, 3000, None, "CT"), (0, 900, None, "MR"), (-50, 200, None, None), (0, 900, "CT", "CT"),
     (-1024, 900, " mr ", "MR"), (0, 255, "US", None),
     (-200, 100, None, None)],  # -200 is not below the CT bound (-200): unsure
)
def test_guess_modality(low, high, dicom, expected):
    assert guess_modality(low, high, dicom) == expected


def test_modality_mismatch_says_why_or_nothing():
    # a CT model on a volume without negative values (MR-like)
    assert modality_mismatch("CT", 0, 800) == ("the volume has no negative values (range 0 … 800), "
                                              "unusual for CT in Hounsfield units")
    # an MR model on HU values
    assert modality_mismatch("mr", -1024, 2000) == "the volume has values down to -1024, like CT in Hounsfield units"
    assert modality_mismatch("CT", -1000, 800, "MR") == "the volume's DICOM modality is MR"
    # matching, unsure, or a model of another modality: nothing to say
    assert modality_mismatch("CT", -1024, 2000) is None
    assert modality_mismatch("CT", -100, 200) is None
    assert modality_mismatch("other", 0, 800) is None
    assert modality_mismatch(None, 0, 800) is None
