"""Test-time mirroring and checkpoint ensembles (issue 11, item 5): the predictors of
:mod:`IWSegmentationLib.inference`, :func:`predict_volume` with them, and ``iwseg predict --tta``
/ ``--model A B`` on real checkpoints."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from IWSegmentationLib.cli.main import main
from IWSegmentationLib.core.errors import InputError
from IWSegmentationLib.core.imageio import Geometry, read_image, write_image
from IWSegmentationLib.inference import (
    EnsemblePredictor,
    MirroredPredictor,
    check_ensemble,
    predict_volume,
    sliding_window_inference,
)
from IWSegmentationLib.nn.checkpoint import save_checkpoint
from IWSegmentationLib.nn.unet import build_model, default_config
from IWSegmentationLib.preprocessing.presets import get_preset


class ZRamp(torch.nn.Module):
    """``x * z`` (z = 0, 1, ... along the window's first axis): not mirror-symmetric."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        z = torch.arange(x.shape[2], dtype=x.dtype).view(1, 1, -1, 1, 1)
        return x * z


def test_mirroring_averages_the_eight_flips_by_hand():
    # z ramp 0, 1, 2, 3: the 4 flips that include z see 3, 2, 1, 0, the 4 others 0, 1, 2, 3, so
    # every voxel gets x * (z + (3 - z)) / 2 = 1.5 x, whatever z is
    ramp = ZRamp()
    x = torch.rand(2, 1, 4, 5, 6)
    out = MirroredPredictor(ramp)(x)
    assert ramp.calls == 8
    torch.testing.assert_close(out, 1.5 * x)


def test_mirroring_keeps_a_mirror_symmetric_predictor():
    x = torch.randn(1, 1, 6, 7, 8)
    torch.testing.assert_close(MirroredPredictor(torch.nn.Sigmoid())(x), torch.sigmoid(x))


class Constant(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.full_like(x, self.value)


def test_ensemble_averages_members_through_the_sliding_window():
    # members 0.2 and 0.6: every blended voxel is (0.2 + 0.6) / 2 = 0.4
    image = np.random.default_rng(0).normal(size=(10, 12, 14)).astype(np.float32)
    out = sliding_window_inference(image, EnsemblePredictor([Constant(0.2), Constant(0.6)]), 8, overlap=0.5)
    np.testing.assert_allclose(out, 0.4, atol=1e-6)
    with pytest.raises(InputError, match="at least one model"):
        EnsemblePredictor([])


def _card(**changes):
    card = {"patch_size": [16, 16, 16], "preprocessing": get_preset("ct-lung"), "threshold": 0.5,
            "architecture": {"in_channels": 1, "out_channels": 1}}
    card.update(changes)
    return card


def test_check_ensemble_names_both_files_and_the_difference():
    check_ensemble([("a.safetensors", _card()), ("b.safetensors", _card())])
    cases = [
        (_card(threshold=0.3), "threshold: 0.5 vs 0.3"),
        (_card(patch_size=[32, 32, 32]), "patch_size: (16, 16, 16) vs (32, 32, 32)"),
        (_card(preprocessing=get_preset("ct-liver")), "preprocessing clip"),
        (_card(architecture={"in_channels": 2, "out_channels": 1}), "in_channels: 1 vs 2"),
        (_card(inference={"overlap": 0.5}), "overlap: 0.25 vs 0.5"),
        (_card(crop_to_organ=5), "crop_to_organ: None vs 5"),
    ]
    for other, needle in cases:
        with pytest.raises(InputError) as info:
            check_ensemble([("a.safetensors", _card()), ("b.safetensors", _card()), ("c.safetensors", other)])
        message = str(info.value)
        assert "a.safetensors and c.safetensors cannot be ensembled" in message and needle in message, message


def _random_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(default_config("tiny"))
    with torch.no_grad():  # make BatchNorm's running statistics non-trivial so eval mode is not identity
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


CARD = {"patch_size": [16, 16, 16], "preprocessing": get_preset("mr"), "threshold": 0.5}


@pytest.mark.parametrize("seed", [0, 1])
def test_predict_volume_tta_is_the_mean_of_flipped_predictions(seed):
    """With one window (image = patch) and no skipping, mirroring inside the window is the same
    as predicting each flipped image and flipping the result back: the mean of the 8 *logits*
    must match (logits are what is averaged, as nnU-Net does), and the probabilities are the
    sigmoid of that mean -- not the mean of the 8 sigmoids, which differs by up to about 1e-5
    here (sigmoid is not linear)."""
    image = np.random.default_rng(seed).normal(100, 20, (16, 16, 16)).astype(np.float32)
    model = _random_net(seed)
    kwargs = dict(device="cpu", skip_background=False, engine="eager")
    tta = predict_volume(model, image, CARD, tta=True, **kwargs)
    flips = [d for r in range(4) for d in itertools.combinations((0, 1, 2), r)]
    by_hand = np.mean([np.flip(predict_volume(model, np.flip(image, d).copy(), CARD, **kwargs).logits, d)
                       for d in flips], axis=0)
    np.testing.assert_allclose(tta.logits, by_hand, atol=1e-5)
    np.testing.assert_allclose(tta.probabilities, 1 / (1 + np.exp(-by_hand.astype(np.float64))), atol=1e-6)
    plain = predict_volume(model, image, CARD, **kwargs).logits
    assert np.abs(tta.logits - plain).max() > 1e-4  # a random net is not mirror-symmetric: TTA changed something


def test_predict_volume_ensemble_is_the_mean_of_members():
    """An ensemble averages its members' logits: (l_a + l_b) / 2 voxel for voxel."""
    image = np.random.default_rng(2).normal(100, 20, (20, 24, 18)).astype(np.float32)
    a, b = _random_net(3), _random_net(4)
    kwargs = dict(device="cpu", skip_background=False)
    both = predict_volume([a, b], image, CARD, **kwargs)
    mean = (predict_volume(a, image, CARD, **kwargs).logits + predict_volume(b, image, CARD, **kwargs).logits) / 2
    np.testing.assert_allclose(both.logits, mean, atol=1e-5)


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ens")
    paths = {}
    for name, seed, threshold in (("a", 5, 0.5), ("b", 6, 0.5), ("odd", 7, 0.4)):
        paths[name] = folder / f"{name}.safetensors"
        save_checkpoint(paths[name], _random_net(seed), {**CARD, "threshold": threshold,
                                                         "description": "random tiny net (tests)"})
    return paths


def test_cli_tta_and_ensemble(tmp_path, checkpoints, capsys):
    image = np.random.default_rng(8).normal(100, 20, (16, 20, 24)).astype(np.int16)
    src = tmp_path / "scan.nii.gz"
    write_image(src, image, Geometry.identity(image.shape))
    base = ["predict", "--input", str(src), "--device", "cpu", "--no-skip"]
    a, b = str(checkpoints["a"]), str(checkpoints["b"])
    for key, models in (("a", [a]), ("tta", [a, "--tta"]), ("b", [b]), ("ab", [a, b])):
        assert main([*base, "--model", *models, "--output", str(tmp_path / f"m_{key}.nii.gz"),
                     "--logits", str(tmp_path / f"l_{key}.nii.gz")]) == 0
    logit = {k: read_image(tmp_path / f"l_{k}.nii.gz")[0] for k in ("a", "b", "tta", "ab")}
    assert all(v.dtype == np.float32 for v in logit.values())
    # the ensemble's logit map is the mean of its members' (what the CLI writes is what it averaged)
    np.testing.assert_allclose(logit["ab"], (logit["a"] + logit["b"]) / 2, atol=1e-5)
    assert np.abs(logit["tta"] - logit["a"]).max() > 1e-4
    capsys.readouterr()

    code = main([*base, "--model", a, str(checkpoints["odd"]), "--output", str(tmp_path / "x.nii.gz")])
    err = capsys.readouterr().err
    assert code == 2 and "a.safetensors and" in err and "odd.safetensors cannot be ensembled" in err
    assert "threshold: 0.5 vs 0.4" in err and not (tmp_path / "x.nii.gz").exists()
    assert main([*base, "--model", a, a, "--output", str(tmp_path / "x.nii.gz")]) == 2
    assert "same checkpoint twice" in capsys.readouterr().err
