"""core.prediction_maps: a probability map, a uint8-scaled one and a label map told apart, and
what cannot be told refused; the note predict writes survives NIfTI, NRRD and MetaImage."""

from __future__ import annotations

import numpy as np
import pytest

from IWSegmentationLib.core.errors import InputError
from IWSegmentationLib.core.imageio import Geometry, read_image, read_image_notes, write_image
from IWSegmentationLib.core.prediction_maps import (
    PROBABILITY_UINT8_NOTE,
    parse_prediction_values,
    prediction_probabilities,
    probabilities_to_uint8,
)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_the_uint8_note_survives_every_single_file_format(tmp_path, suffix):
    path = tmp_path / f"p{suffix}"
    write_image(path, np.zeros((2, 3, 4), np.uint8), Geometry.identity((2, 3, 4)), notes=PROBABILITY_UINT8_NOTE)
    assert PROBABILITY_UINT8_NOTE in read_image_notes(path)
    plain = tmp_path / f"m{suffix}"
    write_image(plain, np.zeros((2, 3, 4), np.uint8), Geometry.identity((2, 3, 4)))
    assert PROBABILITY_UINT8_NOTE not in read_image_notes(plain)
    assert read_image_notes(tmp_path) == ""  # a folder (DICOM series) has no notes


def test_values_told_apart():
    one = np.array([0, 1, 1], np.uint8)
    # with predict's note, a maximum of 1 is p = 1/255 = 0.0039, not a mask
    np.testing.assert_allclose(prediction_probabilities(one, PROBABILITY_UINT8_NOTE, "p"), [0, 1 / 255, 1 / 255])
    assert prediction_probabilities(one, "", "m") is one  # without it: a 0/1 mask, as stored
    # nnU-Net / LiTS: lesion label 2 -> the voxels of 2 are lesion (1.0), not p = 2/255
    assert prediction_probabilities(np.array([0, 2, 2, 0], np.uint8), "", "l").tolist() == [0, 1, 1, 0]
    assert prediction_probabilities(np.array([0, 7], np.int16), "", "l").tolist() == [0, 1]
    probs = np.array([0.0, 0.3], np.float32)
    assert prediction_probabilities(probs, "", "f") is probs  # float: a probability map
    # {0, 1, 2} (liver and tumour, or p <= 2/255): cannot be told; refused naming the file and the flag
    with pytest.raises(InputError, match=r"prediction case\.nii\.gz: .*3 values \(0, 1, 2\).*--pred-values uint8"):
        prediction_probabilities(np.array([0, 1, 2], np.uint8), "", "case.nii.gz")
    # the flag says it: uint8 -> v / 255, label=K -> voxels of K
    np.testing.assert_allclose(prediction_probabilities(np.array([0, 51, 255], np.uint8), "", "p", "uint8"), [0, 0.2, 1])
    assert prediction_probabilities(np.array([0, 1, 2], np.uint8), "", "l", 2).tolist() == [0, 0, 1]
    with pytest.raises(InputError, match="needs a uint8 map"):
        prediction_probabilities(np.array([0.5], np.float32), "", "p", "uint8")


def test_parse_prediction_values():
    assert [parse_prediction_values(v) for v in ("auto", "Probability", "uint8", "label=2")] == \
        ["auto", "probability", "uint8", 2]
    for bad in ("label=0", "label=x", "labels", "", "label=-1"):
        with pytest.raises(InputError, match="--pred-values"):
            parse_prediction_values(bad)


def test_round_trip_through_a_file(tmp_path):
    p = np.array([0.0, 0.002, 0.5, 1.0], np.float32).reshape(1, 1, 4)
    path = write_image(tmp_path / "p.nrrd", probabilities_to_uint8(p), Geometry.identity((1, 1, 4)),
                       notes=PROBABILITY_UINT8_NOTE)
    stored, _ = read_image(path)
    np.testing.assert_allclose(prediction_probabilities(stored, read_image_notes(path), path), p, atol=0.5 / 255)
