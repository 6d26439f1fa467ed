"""``iwseg predict`` and organ masks (issue 22): the automatic lung mask, ``--allow-unmasked``,
probability 0 outside the organ, and bad masks (another grid, empty, a scan given as the mask).

The checkpoint is :func:`IWSegmentationLib.testing.phantom.threshold_model`: a voxel is lesion when
its preprocessed value is above 0.5, i.e. for ``ct-lung`` (``x = (HU + 1000) / 1300``) when HU > -350.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from IWSegmentationLib.cli.main import main
from IWSegmentationLib.core.imageio import Geometry, read_image, write_image
from IWSegmentationLib.core.progress import parse_progress_line
from IWSegmentationLib.nn.checkpoint import save_checkpoint
from IWSegmentationLib.nn.model_card import organ_mask_need
from IWSegmentationLib.preprocessing.lung_mask import lung_mask
from IWSegmentationLib.preprocessing.presets import get_preset
from IWSegmentationLib.testing.phantom import threshold_model

SHAPE = (24, 64, 64)
SPACING = (2.5, 2.0, 2.0)


@pytest.fixture(scope="module")
def lung_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ck") / "lung.safetensors"
    save_checkpoint(path, threshold_model(), {"patch_size": [16, 16, 16], "preprocessing": get_preset("ct-lung"),
                                              "threshold": 0.5, "description": "threshold model, ct-lung (tests)"})
    return path


def chest() -> np.ndarray:
    """Air around an elliptic body (40 HU) with two lungs (-850 HU) and a 40 HU nodule in the left one."""
    d, h, w = SHAPE
    image = np.full(SHAPE, -1000, np.int16)
    y, x = np.ogrid[:h, :w]
    image[:, ((y - h / 2) / (0.42 * h)) ** 2 + ((x - w / 2) / (0.47 * w)) ** 2 <= 1] = 40
    image[2:22, 18:46, 10:27] = -850
    image[2:22, 18:46, 37:54] = -850
    image[10:13, 30:33, 15:18] = 40  # the nodule: 27 voxels
    return image


def events(stdout: str) -> list:
    return [e for e in (parse_progress_line(line) for line in stdout.splitlines() if line.strip()) if e is not None]


def predict(*argv) -> int:
    return main(["predict", "--device", "cpu", *map(str, argv)])


def test_old_cards_take_the_need_from_the_preset():
    # a card written before organ_mask: ct-lung needs a lung mask and has an automatic one
    lung = organ_mask_need({"preprocessing": get_preset("ct-lung")})
    assert (lung.organ, lung.required, lung.automatic, lung.source) == ("lung", True, True, "preset")
    liver = organ_mask_need({"preprocessing": get_preset("ct-liver")})
    assert (liver.organ, liver.required, liver.automatic) == ("liver", True, False)
    assert not organ_mask_need({"preprocessing": get_preset("mr")}).required
    written = organ_mask_need({"preprocessing": get_preset("ct-lung"),
                               "organ_mask": {"organ": "lung", "required": False, "automatic": True, "source": "none"}})
    assert not written.required


def test_ct_lung_without_a_mask_uses_the_automatic_lung_mask_and_zero_outside(tmp_path, lung_ckpt, capsys):
    image = chest()
    geometry = Geometry.identity(SHAPE, SPACING)
    src = tmp_path / "ct.nii.gz"
    write_image(src, image, geometry)
    out, probs = tmp_path / "m.nii.gz", tmp_path / "p.nii.gz"
    assert predict("--model", lung_ckpt, "--input", src, "--output", out, "--probabilities", probs,
                   "--progress-format", "jsonl") == 0
    messages = [e.get("message") or "" for e in events(capsys.readouterr().out)]
    assert sum("automatic lung mask" in m for m in messages) == 2  # the run's line and the case's share
    assert not any("WARNING" in m for m in messages)
    organ = lung_mask(image, geometry)
    p, _ = read_image(probs)
    mask, _ = read_image(out)
    # outside the lung mask: probability exactly 0 (the body at 40 HU would be p = 1 without it)
    assert float(p[~organ].max()) == 0.0
    assert mask[10:13, 30:33, 15:18].all()  # the nodule (40 HU > -350 HU) inside the left lung
    assert not mask[~organ].any()


def test_allow_unmasked_segments_the_whole_volume_with_a_loud_warning(tmp_path, lung_ckpt, capsys):
    image = chest()
    src = tmp_path / "ct.nii.gz"
    write_image(src, image, Geometry.identity(SHAPE, SPACING))
    out = tmp_path / "m.nii.gz"
    assert predict("--model", lung_ckpt, "--input", src, "--output", out, "--allow-unmasked", "--no-skip",
                   "--progress-format", "jsonl") == 0
    warnings = [e.get("message") for e in events(capsys.readouterr().out) if e.stage == "warning"]
    assert any(w.startswith("WARNING: --allow-unmasked") for w in warnings)
    mask, _ = read_image(out)
    np.testing.assert_array_equal(mask != 0, image > -350)  # unmasked: every voxel above -350 HU


def test_a_given_organ_mask_zeroes_the_probability_outside_it(tmp_path, lung_ckpt):
    image = chest()
    geometry = Geometry.identity(SHAPE, SPACING)
    organ = np.zeros(SHAPE, np.uint8)
    organ[:, :, :32] = 1  # the left half only
    src, organ_path, probs = tmp_path / "ct.nii.gz", tmp_path / "organ.nii.gz", tmp_path / "p.nii.gz"
    write_image(src, image, geometry)
    write_image(organ_path, organ, geometry)
    assert predict("--model", lung_ckpt, "--input", src, "--output", tmp_path / "m.nii.gz", "--organ-mask", organ_path,
                   "--probabilities", probs, "--no-skip") == 0
    p, _ = read_image(probs)
    assert float(p[:, :, 32:].max()) == 0.0  # the right half: body at 40 HU, but outside the organ
    assert float(p[10:13, 30:33, 15:18].min()) > 0.5  # the nodule, inside


@pytest.mark.parametrize("problem", ["grid", "empty", "scan", "negative"])
def test_bad_organ_masks_are_refused_naming_the_files(tmp_path, lung_ckpt, capsys, problem):
    image = chest()
    geometry = Geometry.identity(SHAPE, SPACING)
    src, organ_path = tmp_path / "ct.nii.gz", tmp_path / "organ.nii.gz"
    write_image(src, image, geometry)
    organ, organ_geometry = np.ones(SHAPE, np.uint8), geometry
    if problem == "grid":
        organ_geometry = Geometry.identity(SHAPE, (2.5, 2.0, 1.0))
    elif problem == "empty":
        organ[:] = 0
    elif problem == "scan":
        organ = (image + np.arange(SHAPE[2], dtype=np.int16)).astype(np.int16)  # a CT: many distinct values
    elif problem == "negative":
        organ = np.where(image > 0, 1, -1).astype(np.int16)
    write_image(organ_path, organ, organ_geometry)
    out = tmp_path / "m.nii.gz"
    assert predict("--model", lung_ckpt, "--input", src, "--output", out, "--organ-mask", organ_path) == 2
    err = capsys.readouterr().err
    assert str(organ_path) in err and str(src) in err
    assert {"grid": "is not on the grid of", "empty": "is empty", "scan": "is not a label map",
            "negative": "negative values"}[problem] in err
    assert not out.exists()
