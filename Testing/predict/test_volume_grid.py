"""``iwseg predict`` refuses a volume the 3D network cannot mean anything on before it runs
(#23 item 10): a single slice (a 2D image stored as 3D), a single voxel, a micrometre spacing.
Before, all three ran to exit 0 (the single slice was padded into 4 windows)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from IWSegmentationLib.cli.main import main
from IWSegmentationLib.core.imageio import Geometry, write_image
from IWSegmentationLib.nn.checkpoint import save_checkpoint
from IWSegmentationLib.predict.cases import SPACING_RANGE_MM
from IWSegmentationLib.preprocessing.presets import get_preset
from IWSegmentationLib.testing.phantom import threshold_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ck") / "mr.safetensors"
    save_checkpoint(path, threshold_model(), {"patch_size": [16, 16, 16], "preprocessing": get_preset("mr"),
                                              "threshold": 0.5})
    return path


def _scan(shape) -> np.ndarray:
    return np.random.default_rng(0).normal(100.0, 30.0, shape).astype(np.float32)  # many values: not a label map


@pytest.mark.parametrize("shape, spacing_xyz, expected", [
    ((1, 40, 48), (1.0, 1.0, 1.0), r"shape \(1, 40, 48\) \(z, y, x\): one voxel along z;"),
    ((1, 1, 1), (1.0, 1.0, 1.0), r"shape \(1, 1, 1\) \(z, y, x\): one voxel along z, y, x;"),
    ((12, 40, 1), (1.0, 1.0, 1.0), r"one voxel along x;"),
    ((8, 8, 8), (1e-6, 1e-6, 1e-6), r"voxel spacing \(1e-06, 1e-06, 1e-06\) mm \(x, y, z\), outside \[0.01, 100\]"),
    ((8, 8, 8), (0.5, 0.5, 250.0), r"voxel spacing \(0.5, 0.5, 250\) mm"),
])
def test_a_flat_or_micrometre_volume_is_refused_naming_the_file(tmp_path, capsys, ckpt, shape, spacing_xyz, expected):
    image = tmp_path / "scan.nii.gz"
    write_image(image, _scan(shape), Geometry(size=shape[::-1], spacing=spacing_xyz, origin=(0.0, 0.0, 0.0)))
    out = tmp_path / "mask.nii.gz"
    code = main(["predict", "--model", str(ckpt), "--input", str(image), "--output", str(out), "--device", "cpu",
                 "--force", "--progress-format", "jsonl"])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert str(image) in err
    assert re.search(expected, err), err


def test_the_edges_of_the_range_are_accepted(tmp_path, ckpt):
    """Two slices and a spacing of exactly 0.01 or 100 mm run (the range is closed)."""
    low, high = SPACING_RANGE_MM
    image = tmp_path / "scan.nii.gz"
    write_image(image, _scan((2, 16, 16)), Geometry(size=(16, 16, 2), spacing=(low, low, high), origin=(0.0,) * 3))
    out = tmp_path / "mask.nii.gz"
    assert main(["predict", "--model", str(ckpt), "--input", str(image), "--output", str(out), "--device", "cpu",
                 "--progress-format", "jsonl"]) == 0
    assert out.exists()
