"""The ``iwseg`` dispatcher: sub-commands are listed, user errors exit 2 with one clear line."""

import json
import subprocess
import sys

from IWSegmentationLib.nn.checkpoint import save_checkpoint
from IWSegmentationLib.nn.unet import build_model, default_config
from IWSegmentationLib.preprocessing.presets import get_preset


def iwseg(*args, **kw):
    return subprocess.run([sys.executable, "-m", "IWSegmentationLib", *args], capture_output=True, text=True,
                          timeout=120, **kw)


def test_help_lists_every_command():
    out = iwseg("--help")
    assert out.returncode == 0
    for command in ("evaluate", "predict", "train", "synth", "inspect"):
        assert command in out.stdout


def test_inspect_prints_the_model_card(tmp_path):
    path = tmp_path / "tiny.safetensors"
    model = build_model(default_config("tiny"))
    save_checkpoint(path, model, {"patch_size": [16, 32, 32], "preprocessing": get_preset("ct-liver"),
                                  "loss": {"name": "iw-dice"}})
    out = iwseg("inspect", str(path), "--verify")
    assert out.returncode == 0, out.stderr
    card = json.loads(out.stdout)
    assert card["patch_size"] == [16, 32, 32]
    assert card["preprocessing"]["name"] == "ct-liver" and card["preprocessing"]["clip"] == [-300.0, 300.0]
    assert card["loss"] == {"name": "iw-dice"}
    assert card["num_parameters"] == sum(p.numel() for p in model.parameters())


def test_inspect_of_a_missing_file_is_a_clear_bad_input_error(tmp_path):
    out = iwseg("inspect", str(tmp_path / "nope.safetensors"))
    assert out.returncode == 2
    assert "nope.safetensors" in out.stderr and "Traceback" not in out.stderr
