"""Safe checkpoints: round trips, every corruption case, pickles refused, resume state."""

from __future__ import annotations

import collections
import datetime
import json
import pickle
import random
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from IWSegmentationLib import __version__
from IWSegmentationLib.core.errors import CheckpointError, InputError, OutputError
from IWSegmentationLib.core.lesions import SIZE_PRESETS
from IWSegmentationLib.nn.checkpoint import load_checkpoint, read_metadata, save_checkpoint, weights_sha256
from IWSegmentationLib.nn.model_card import FORMAT_VERSION
from IWSegmentationLib.nn.training_state import (
    capture_rng_state,
    load_training_state,
    restore_rng_state,
    save_training_state,
)
from IWSegmentationLib.nn.unet import SMALL_CONFIG, TINY_CONFIG, build_model
from IWSegmentationLib.preprocessing.presets import get_preset


def _metadata(**extra):
    return {
        "patch_size": [32, 32, 32],
        "preprocessing": get_preset("ct-lung"),
        "threshold": 0.4,
        "loss": {"name": "iw-dice", "params": {"w_max": 2e5}},
        "size_thresholds": SIZE_PRESETS["lung"],
        "training_data": {"dataset": "synthetic", "cases": 12, "seed": 7},
        "validation_metrics": {"avg_recall": 0.71, "object_dice": np.float32(0.5), "cpm": float("nan")},
        **extra,
    }


def _trained_tiny(seed: int = 0) -> torch.nn.Module:
    """A tiny net after one SGD step, so weights and BN running stats are not the defaults."""
    torch.manual_seed(seed)
    model = build_model(TINY_CONFIG).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 1, 16, 16, 16)).mean().backward()
    opt.step()
    return model.eval()


@pytest.fixture
def saved(tmp_path):
    model = _trained_tiny()
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, _metadata())
    return path, model


def test_round_trip_gives_identical_outputs(saved):
    path, model = saved
    loaded, card = load_checkpoint(path)
    assert not loaded.training
    x = torch.randn(1, 1, 19, 16, 11)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_metadata_round_trip(saved):
    path, model = saved
    card = read_metadata(path)
    assert card["format"] == "iwsegmentation.checkpoint"
    assert card["format_version"] == FORMAT_VERSION
    assert card["architecture"] == TINY_CONFIG
    assert card["patch_size"] == [32, 32, 32]
    assert card["preprocessing"] == get_preset("ct-lung")
    assert card["threshold"] == 0.4
    assert card["loss"] == {"name": "iw-dice", "params": {"w_max": 2e5}}
    assert card["size_thresholds"] == {"small_mm": 10.0, "large_mm": 20.0}
    assert card["training_data"]["cases"] == 12
    # numpy scalars become numbers; NaN becomes null (strict JSON)
    assert card["validation_metrics"] == {"avg_recall": 0.71, "object_dice": 0.5, "cpm": None}
    assert card["library_version"] == __version__
    assert card["num_parameters"] == sum(p.numel() for p in model.parameters())
    assert card["weights_sha256"] == weights_sha256(model.state_dict())
    created = datetime.datetime.fromisoformat(card["created"])
    assert abs((datetime.datetime.now(datetime.timezone.utc) - created).total_seconds()) < 600
    # the header is plain safetensors: any safetensors reader sees the weights and the card
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        assert set(fh.keys()) == set(model.state_dict())
        assert json.loads(fh.metadata()["model_card"]) == card


def test_inspect_command_prints_card_and_fails_cleanly(saved, tmp_path):
    path, _ = saved
    cmd = [sys.executable, "-m", "IWSegmentationLib", "inspect"]
    done = subprocess.run([*cmd, str(path), "--verify"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["architecture"]["channels"] == [4, 8, 16, 32]
    # reading a model card needs neither torch nor the weights (the Slicer GUI shows it)
    probe = ("import sys, IWSegmentationLib.nn.checkpoint as c; "
             f"c.read_metadata({str(path)!r}); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False", done.stderr
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage!" * 3)
    done = subprocess.run([*cmd, str(bad)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert str(bad) in done.stderr and "Traceback" not in done.stderr


def test_sha_matches_a_hand_made_state():
    # one F32 tensor "a" = [1.0] and a 0-d I64 "b" = 3: the hash input is, name by name,
    # b"a\0F32\0" b"1\0" + float32 LE bytes, then b"b\0I64\0" b"\0" + int64 LE bytes
    import hashlib

    expected = hashlib.sha256(
        b"a\0F32\0" + b"1\0" + struct.pack("<f", 1.0) + b"b\0I64\0" + b"\0" + struct.pack("<q", 3)
    ).hexdigest()
    assert weights_sha256({"b": torch.tensor(3), "a": torch.tensor([1.0])}) == expected


# ----------------------------------------------------------------------------- corruption


def _expect_error(path, match):
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    return info


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.safetensors", "not found")


def test_truncated_file(saved):
    path, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _expect_error(path, "truncated")
    path.write_bytes(data[:5])
    _expect_error(path, "truncated")


def test_corrupt_header(saved):
    path, _ = saved
    data = bytearray(path.read_bytes())
    data[8:20] = b"\xff" * 12  # breaks the JSON header
    path.write_bytes(bytes(data))
    _expect_error(path, "corrupt")


def test_flipped_weight_byte_fails_the_sha256(saved):
    path, _ = saved
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    _expect_error(path, "sha256")
    read_metadata(path)  # the header itself is fine


def test_safetensors_without_model_card(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(build_model(TINY_CONFIG).state_dict(), str(path))
    _expect_error(path, "no model card")
    with pytest.raises(CheckpointError, match="no model card"):
        read_metadata(path)


def _rewrite_header(path: Path, edit) -> None:
    """Rewrite a safetensors file with ``edit(metadata_dict)`` applied to its ``__metadata__``."""
    from safetensors.torch import load_file

    from IWSegmentationLib.nn.checkpoint import read_header

    meta = read_header(path)["__metadata__"]
    tensors = load_file(str(path))
    edit(meta)
    save_file(tensors, str(path), metadata=meta)


def test_newer_format_version_is_refused(saved):
    path, _ = saved

    def bump(meta):
        meta["format_version"] = str(FORMAT_VERSION + 1)

    _rewrite_header(path, bump)
    info = _expect_error(path, f"format version {FORMAT_VERSION + 1}, newer than this library")
    assert "upgrade" in str(info.value)


def test_card_without_required_field(saved):
    path, _ = saved

    def drop(meta):
        card = json.loads(meta["model_card"])
        del card["architecture"]
        meta["model_card"] = json.dumps(card)

    _rewrite_header(path, drop)
    _expect_error(path, "lacks architecture")


def test_weights_of_another_architecture(saved):
    path, _ = saved

    def claim_small(meta):
        card = json.loads(meta["model_card"])
        card["architecture"] = SMALL_CONFIG
        meta["model_card"] = json.dumps(card)

    _rewrite_header(path, claim_small)
    _expect_error(path, "do not fit its architecture")


# ----------------------------------------------------------------------------- pickles


class _Payload:
    """Unpickling this creates ``marker``: what an attacker's code execution would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch.save", "pickle", "pickle-renamed"])
def test_malicious_pickle_is_never_executed(tmp_path, how):
    marker = tmp_path / "pwned"
    name = "evil.safetensors" if how == "pickle-renamed" else "evil.pt"
    path = tmp_path / name
    payload = {"state_dict": {"w": torch.zeros(1)}, "x": _Payload(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))

    # the payload is live: plain unpickling of a copy really runs it
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()

    with pytest.raises(CheckpointError, match="pickled PyTorch file") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError, match="pickled"):
        read_metadata(path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(path, allow_torch_load=True, metadata=_metadata(architecture=TINY_CONFIG))
    assert not marker.exists()


def test_trusted_state_dict_pt_loads_with_weights_only(tmp_path):
    model = _trained_tiny(3)
    path = tmp_path / "trusted.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    with pytest.raises(CheckpointError, match="without a model card"):
        load_checkpoint(path, allow_torch_load=True)
    loaded, card = load_checkpoint(path, allow_torch_load=True, metadata=_metadata(architecture=TINY_CONFIG))
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))
    # convert to a safe checkpoint
    save_checkpoint(tmp_path / "converted.safetensors", loaded, card)
    assert read_metadata(tmp_path / "converted.safetensors")["weights_sha256"] == card["weights_sha256"]


# ----------------------------------------------------------------------------- saving


def test_bad_metadata_is_refused(tmp_path):
    model = build_model(TINY_CONFIG)
    path = tmp_path / "m.safetensors"
    with pytest.raises(InputError, match="lacks patch_size"):
        save_checkpoint(path, model, {"preprocessing": get_preset("mr")})
    with pytest.raises(InputError, match=r"metadata\.training_data\.when: object"):
        save_checkpoint(path, model, _metadata(training_data={"when": object()}))
    with pytest.raises(InputError, match="preprocessing parameters lack body_threshold, clip"):
        save_checkpoint(path, model, _metadata(preprocessing={"name": "ct-lung"}))
    with pytest.raises(InputError, match="threshold"):
        save_checkpoint(path, model, _metadata(threshold=1.5))
    with pytest.raises(InputError, match="patch_size"):
        save_checkpoint(path, model, _metadata(patch_size=[32, 32]))
    with pytest.raises(InputError, match="output folder does not exist"):
        save_checkpoint(tmp_path / "missing" / "m.safetensors", model, _metadata())
    with pytest.raises(InputError, match="pickled formats"):
        save_checkpoint(tmp_path / "m.pt", model, _metadata())
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_previous_checkpoint(saved, monkeypatch):
    path, _ = saved
    before = path.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OutputError, match="No space"):
        save_checkpoint(path, _trained_tiny(5), _metadata())
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


# ----------------------------------------------------------------------------- resume state


def _steps(model, opt, sched, n):
    for _ in range(n):
        x = torch.randn(2, 1, 8, 8, 8)  # from the global torch RNG, which resume must restore
        noise = float(np.random.rand()) + random.random()
        opt.zero_grad()
        (model(x).square().mean() + 0.0 * noise).backward()
        opt.step()
        sched.step()


def _trainer(seed=0):
    torch.manual_seed(seed)
    model = build_model(TINY_CONFIG).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3], gamma=0.1)
    return model, opt, sched


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    torch.manual_seed(11)
    np.random.seed(11)
    random.seed(11)
    model, opt, sched = _trainer()
    _steps(model, opt, sched, 2)
    state_path = tmp_path / "last.state.safetensors"
    save_training_state(state_path, {
        "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "rng": capture_rng_state(), "epoch": 2,
    })
    _steps(model, opt, sched, 3)  # crosses the lr milestone
    uninterrupted = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(999)  # a fresh process would have other RNG states
    np.random.seed(999)
    fresh, fresh_opt, fresh_sched = _trainer(seed=5)
    state = load_training_state(state_path)
    assert state["epoch"] == 2
    assert state["scheduler"]["milestones"] == collections.Counter({3: 1})
    fresh.load_state_dict(state["model"])
    fresh_opt.load_state_dict(state["optimizer"])
    fresh_sched.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"])
    _steps(fresh, fresh_opt, fresh_sched, 3)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, uninterrupted[name]), name
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_training_state_round_trips_structures(tmp_path):
    gen = np.random.default_rng(3)
    state = {
        "tuple": (1, 2.5, "x", None, True),
        "int_keys": {0: torch.arange(3), 7: [np.arange(4, dtype=np.uint32)]},
        "numpy_rng": gen.bit_generator.state,  # holds 128-bit ints
        "counter": collections.Counter({80: 1}),
        "nan": float("nan"),
        "bf16": torch.ones(2, dtype=torch.bfloat16),
        "dunder": {"__tensor__": "not a reference"},
    }
    path = tmp_path / "s.safetensors"
    save_training_state(path, state)
    back = load_training_state(path)
    assert back["tuple"] == (1, 2.5, "x", None, True)
    assert torch.equal(back["int_keys"][0], torch.arange(3))
    assert back["int_keys"][7][0].dtype == np.uint32
    np.testing.assert_array_equal(back["int_keys"][7][0], np.arange(4))
    assert back["numpy_rng"] == gen.bit_generator.state
    assert back["counter"] == collections.Counter({80: 1})
    assert np.isnan(back["nan"])
    assert back["bf16"].dtype == torch.bfloat16
    assert back["dunder"] == {"__tensor__": "not a reference"}
    with pytest.raises(InputError, match=r"state\.bad: object cannot be stored without pickle"):
        save_training_state(tmp_path / "t.safetensors", {"bad": object()})
    with pytest.raises(CheckpointError, match="not an IWSegmentation training state"):
        load_training_state(saved_card_file(tmp_path))
    assert not (tmp_path / "t.safetensors").exists()


def saved_card_file(tmp_path: Path) -> Path:
    path = tmp_path / "card.safetensors"
    save_checkpoint(path, build_model(TINY_CONFIG), _metadata())
    return path


def test_torch_load_is_only_called_with_weights_only(tmp_path, monkeypatch):
    model = _trained_tiny(4)
    path = tmp_path / "trusted.pt"
    torch.save(model.state_dict(), path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert calls == []  # refused before anything reads the pickle
    load_checkpoint(path, allow_torch_load=True, metadata=_metadata(architecture=TINY_CONFIG))
    assert calls == [True]


def test_header_length_starting_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    # A safetensors header of 0x80 + 256*k bytes starts with the byte a pickle starts with.
    model = build_model(TINY_CONFIG)
    for pad in range(300):
        path = tmp_path / "m.safetensors"
        save_checkpoint(path, model, _metadata(description="x" * pad))
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no header length ending in 0x80 found")
    assert read_metadata(path)["description"] == "x" * pad
    load_checkpoint(path)


def test_wrapped_model_is_saved_without_wrapper_prefix(tmp_path):
    model = _trained_tiny(6)
    path = tmp_path / "dp.safetensors"
    save_checkpoint(path, torch.nn.DataParallel(model), _metadata())
    loaded, card = load_checkpoint(path)
    assert card["architecture"] == TINY_CONFIG
    assert set(loaded.state_dict()) == set(model.state_dict())
    # a DDP-style "module." state dict in a trusted .pt loads too
    pt = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, pt)
    loaded, _ = load_checkpoint(pt, allow_torch_load=True, metadata=_metadata(architecture=TINY_CONFIG))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=5),
    st.integers(0, 5).map(lambda n: torch.arange(n, dtype=torch.float32)),
    st.integers(0, 5).map(lambda n: np.arange(n, dtype=np.int16)),
)
_states = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.one_of(st.text(max_size=4), st.integers(-3, 3)), inner, max_size=3),
    ),
    max_leaves=12,
)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@settings(max_examples=40, deadline=None)
@given(_states)
def test_training_state_round_trip_property(value):
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "s.safetensors"
        save_training_state(path, {"value": value})
        assert _same(load_training_state(path)["value"], value)


def test_head_norm_network_trains_saves_and_loads_to_the_same_outputs(tmp_path):
    """The seam of the authors' head (issue 20): a network with ``head_norm`` trained two steps
    (so its head BatchNorm has running statistics of its own), saved and loaded through the
    normal checkpoint loader, which builds the network from the card, gives the same eval-mode
    outputs; the CPU-compiled engine (which folds that BatchNorm into the conv) agrees too."""
    from IWSegmentationLib.inference import freeze_for_cpu
    from IWSegmentationLib.nn.losses import get_loss
    from IWSegmentationLib.nn.unet import default_config

    torch.manual_seed(0)
    model = build_model(default_config("tiny", head_norm=True)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    loss_fn = get_loss("iw-dice")
    for _ in range(2):
        x = torch.randn(2, 1, 16, 16, 16)
        target = (torch.rand(2, 1, 16, 16, 16) > 0.9).float()
        opt.zero_grad()
        loss_fn(model(x), target).backward()
        opt.step()
    model.eval()
    head_bn = model.head[-1]
    assert isinstance(head_bn, torch.nn.BatchNorm3d) and int(head_bn.num_batches_tracked) == 2
    assert float(head_bn.running_mean.abs().max()) > 0  # statistics of its own, not the initial 0

    path = tmp_path / "authors-head.safetensors"
    save_checkpoint(path, model, _metadata())
    loaded, card = load_checkpoint(path)
    assert card["architecture"]["head_norm"] is True
    assert not loaded.training and isinstance(loaded.head[-1], torch.nn.BatchNorm3d)
    x = torch.randn(1, 1, 24, 16, 16)
    with torch.inference_mode():
        expected = model(x)
        assert torch.equal(loaded(x), expected)
        assert torch.allclose(freeze_for_cpu(loaded)(x), expected, atol=1e-4)
