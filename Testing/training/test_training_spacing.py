"""The trainer records the training voxel spacing in the model card (issue 22, item 1): per axis,
the median over the training cases after the preset's ``target_spacing``, for cases held in
memory and for cases loaded lazily (``cache_size``: read from the image headers)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _tiny_training import tiny_config, write_tiny_dataset

from IWSegmentationLib.core.imageio import Geometry, read_image, write_image
from IWSegmentationLib.nn.checkpoint import read_metadata
from IWSegmentationLib.nn.model_card import card_spacing
from IWSegmentationLib.training import train

#: (z, y, x) mm of the four cases, anisotropic and all different
SPACINGS = [(2.5, 0.8, 0.8), (5.0, 0.7, 0.7), (1.25, 0.9, 0.6), (3.0, 1.0, 1.0)]


def anisotropic_dataset(root: Path) -> Path:
    """The tiny synthetic dataset with case i's image, label and mask re-headed to ``SPACINGS[i]``."""
    write_tiny_dataset(root)
    for i, spacing in enumerate(SPACINGS):
        for folder in ("imagesTr", "labelsTr", "masksTr"):
            path = root / folder / f"synth_{i:03d}.nii.gz"
            array, geometry = read_image(path)
            write_image(path, array, Geometry(geometry.size, tuple(spacing[::-1]), geometry.origin,
                                              geometry.direction))
    return root


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        # all four cases train (no validation split); the median of four is the mean of the middle two:
        # z 1.25 2.5 | 3.0 5.0 -> 2.75; y 0.7 0.8 | 0.9 1.0 -> 0.85; x 0.6 0.7 | 0.8 1.0 -> 0.75
        ({}, [2.75, 0.85, 0.75]),
        # the same cases loaded lazily: their spacing is read from the image headers
        ({"cache_size": 1}, [2.75, 0.85, 0.75]),
        # every case resampled to target_spacing: the network saw only that spacing
        ({"target_spacing": [2.0, 0.75, 0.75]}, [2.0, 0.75, 0.75]),
    ],
)
def test_the_card_records_the_median_training_spacing(tmp_path, overrides, expected):
    data = anisotropic_dataset(tmp_path / "data")
    config = tiny_config(data, tmp_path / "run", epochs=1, iters_per_epoch=1, val_fraction=0.0, **overrides)
    train(config, verbose=False)
    card = read_metadata(tmp_path / "run" / "last.safetensors")
    assert card["spacing"] == pytest.approx(expected, abs=1e-6)
    assert card_spacing(card) == pytest.approx(tuple(expected), abs=1e-6)
    assert card["preprocessing"]["modality"] == "CT"
