"""The typed model card: every crafted value is refused once, on read, naming the checkpoint
and the field; valid cards round-trip unchanged; a card that claims a huge network allocates
nothing (issue 14 item 9, issue 16 item 5, issue 10 item 3)."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from IWSegmentationLib.cli.main import main as cli_main
from IWSegmentationLib.core.errors import CheckpointError, InputError
from IWSegmentationLib.core.lesions import SIZE_PRESETS, SizeThresholds
from IWSegmentationLib.nn.checkpoint import load_checkpoint, read_header, read_metadata, save_checkpoint
from IWSegmentationLib.nn.model_card import (
    MAX_DEPTH,
    MAX_PATCH_SIDE,
    MAX_PATCH_VOXELS,
    MIN_PATCH_SIDE,
    MinLesionSize,
    ModelCard,
    check_license,
    license_summary,
)
from IWSegmentationLib.nn.unet import TINY_CONFIG, build_model
from IWSegmentationLib.preprocessing.presets import get_preset


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("card") / "model.safetensors"
    save_checkpoint(path, build_model(TINY_CONFIG), {
        "patch_size": [32, 32, 32],
        "preprocessing": get_preset("ct-lung"),
        "threshold": 0.4,
        "size_thresholds": {"small_mm": 10.0, "large_mm": 20.0, "preset": "lung"},
        "inference": {"patch_size": [32, 32, 32], "overlap": 0.25, "blend": "gaussian"},
        "min_lesion_size": {"value": 8, "unit": "voxels"},
        "training_data": {"dataset": "synthetic", "cases": 4},
    })
    return path


def _crafted(saved: Path, tmp_path: Path, edit, raw: dict[str, str] | None = None) -> Path:
    """A copy of ``saved`` whose model card went through ``edit(card)`` (weights untouched);
    ``raw`` replaces quoted placeholder strings by raw JSON text afterwards."""
    meta = read_header(saved)["__metadata__"]
    card = json.loads(meta["model_card"])
    edit(card)
    meta["model_card"] = json.dumps(card)
    for placeholder, text in (raw or {}).items():
        meta["model_card"] = meta["model_card"].replace(json.dumps(placeholder), text)
    path = tmp_path / "crafted.safetensors"
    save_file(load_file(str(saved)), str(path), metadata=meta)
    return path


def _set(key: str, value):
    """An edit that sets a (dotted) card key."""
    def edit(card):
        *head, last = key.split(".")
        target = card
        for part in head:
            target = target[part]
        target[last] = value
    return edit


def _nested(depth: int):
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


# Each crafted value, the field the message must name, and a fragment of the reason. On the
# old main every one of these was accepted by read_metadata (the card was checked only for
# its preprocessing and the presence of four keys), and most then crashed or allocated later.
CRAFTED = [
    ("architecture.channels", [10**7, 10**7], "'channels' must be an integer in [1, 4096]"),
    ("architecture.channels", "wide", "'channels' must be a list"),
    ("architecture.blocks_per_level", 10**6, "'blocks_per_level' must be an integer in [1, 16]"),
    ("patch_size", [10**6, 10**6, 10**6], "field 'patch_size' must be an integer in [8, 512]"),
    ("patch_size", [1, 1, 1], "field 'patch_size' must be an integer in [8, 512]"),
    ("patch_size", [512, 512, 512], f"at most {MAX_PATCH_VOXELS} voxels"),
    ("patch_size", [32, 32, 32.5], "field 'patch_size'"),
    ("inference.patch_size", [10**6, 1, 1], "field 'inference.patch_size'"),
    ("inference.overlap", 1.5, "field 'inference.overlap' must be in [0, 1)"),
    ("preprocessing.target_spacing", [1e-9, 1.0, 1.0], "'preprocessing.target_spacing' entries must be in [0.01, 100] mm"),
    ("preprocessing.target_spacing", [-1.0, 1.0, 1.0], "'target_spacing' entries must be > 0"),
    ("preprocessing.name", "ct-brain", "field 'preprocessing.name' must be a known preset"),
    ("threshold", 0, "field 'threshold' must be a probability in (0, 1)"),
    ("threshold", 1, "field 'threshold' must be a probability in (0, 1)"),
    ("threshold", "0.5", "field 'threshold' must be a finite number"),
    ("threshold", float("nan"), "field 'threshold' must be a finite number"),
    ("size_thresholds", [-1, "a"], "field 'size_thresholds' must be a finite number"),
    ("size_thresholds", [30.0, 10.0], "0 < small < large"),
    ("size_thresholds", {"small_mm": 1e300, "large_mm": float("inf")}, "field 'size_thresholds'"),
    ("size_thresholds", "kidney", "must be a size preset (lung, metastases, liver)"),
    ("size_thresholds.preset", "kidney", "field 'size_thresholds.preset' must be a size preset"),
    ("min_lesion_size", {"value": 0, "unit": "voxels"}, "field 'min_lesion_size.value' must be in (0, "),
    ("min_lesion_size", {"value": 5, "unit": "cm3"}, "field 'min_lesion_size.unit' must be one of voxels, mm3"),
    ("min_lesion_size", 5, "field 'min_lesion_size' must be"),
    ("validation_metrics", {"a": _nested(MAX_DEPTH + 5)}, f"nested more than {MAX_DEPTH} levels"),
    ("training_data", {"x": float("inf")}, "without NaN or infinity (at training_data.x)"),
    ("weights_sha256", "0" * 10, "field 'weights_sha256' must be 64 lowercase hex digits"),
    ("format_version", 7, "field 'format_version' must be an integer in [1, 1]"),
    ("crop_to_organ", -1, "field 'crop_to_organ' must be an integer in [0, 512]"),
    ("crop_to_organ", 10**9, "field 'crop_to_organ' must be an integer in [0, 512]"),
    ("crop_to_organ", 2.5, "field 'crop_to_organ' must be an integer"),
    ("architecture.head_norm", "yes", "'head_norm' must be true or false"),
]


@pytest.mark.parametrize(("key", "value", "fragment"), CRAFTED, ids=[f"{k}={str(v)[:20]}" for k, v, _ in CRAFTED])
def test_crafted_card_value_is_refused_naming_the_checkpoint_and_field(saved, tmp_path, key, value, fragment):
    path = _crafted(saved, tmp_path, _set(key, value))
    for read in (read_metadata, load_checkpoint):
        with pytest.raises(CheckpointError) as info:
            read(path)
        message = str(info.value)
        assert f"checkpoint {path}: model card" in message
        assert fragment in message, message


def test_card_nested_past_the_parser_stack_is_a_clean_error(saved, tmp_path):
    # 100 000 nested lists: json.loads raised RecursionError (a traceback, exit 1) on the old main
    n = 100_000
    path = _crafted(saved, tmp_path, _set("training_data", {"deep": "DEEP"}), raw={"DEEP": "[" * n + "]" * n})
    with pytest.raises(CheckpointError, match="nested too deeply") as info:
        read_metadata(path)
    assert str(path) in str(info.value)


def test_inspect_of_a_crafted_card_exits_2_with_one_line(saved, tmp_path, capsys):
    path = _crafted(saved, tmp_path, _set("patch_size", [10**9, 1, 1]))
    assert cli_main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "'patch_size'" in err[0]


def test_a_card_claiming_a_huge_network_allocates_nothing(saved, tmp_path):
    # 8 levels of 4096 channels, 16 blocks (all within the per-key limits): about 2.2e11
    # weights, 0.9 TB of float32. The network is built on the meta device first, its shapes
    # differ from the file's tiny tensors, and the load stops before any real allocation.
    path = _crafted(saved, tmp_path, _set("architecture", {**TINY_CONFIG, "channels": [4096] * 8,
                                                           "blocks_per_level": 16}))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match="weights do not fit its architecture"):
        load_checkpoint(path)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # ru_maxrss is in KiB
    assert grown_mb < 200 and time.perf_counter() - t0 < 30


def test_valid_card_round_trips_through_the_record(saved):
    card = read_metadata(saved)
    record = ModelCard.from_dict(card, source=saved)
    assert record.to_dict() == card
    assert ModelCard.from_dict(record.to_dict()) == record
    # the stored JSON is exactly the card (the on-disk format is unchanged)
    assert json.loads(read_header(saved)["__metadata__"]["model_card"]) == card
    assert record.patch_size == (32, 32, 32) and record.threshold == 0.4
    assert record.min_lesion_size == MinLesionSize(8.0, "voxels")
    assert card["min_lesion_size"] == {"value": 8.0, "unit": "voxels"}
    assert record.size_groups() == SizeThresholds(10.0, 20.0)


@pytest.mark.parametrize(("written", "groups"), [
    (None, None),
    ("liver", SIZE_PRESETS["liver"]),
    ([5, 10], SizeThresholds(5.0, 10.0)),
    ({"small_mm": 12, "large_mm": 24, "preset": None}, SizeThresholds(12.0, 24.0)),
])
def test_each_written_size_threshold_shape_is_understood(saved, tmp_path, written, groups):
    path = _crafted(saved, tmp_path, _set("size_thresholds", written))
    record = ModelCard.from_dict(read_metadata(path), source=path)
    assert record.size_groups() == groups


def test_min_lesion_size_null_and_mm3_are_accepted(saved, tmp_path):
    path = _crafted(saved, tmp_path, _set("min_lesion_size", None))
    assert "min_lesion_size" not in read_metadata(path)  # null: not written back
    path = _crafted(saved, tmp_path, _set("min_lesion_size", {"value": 2.5, "unit": "mm3"}))
    assert load_checkpoint(path)[1]["min_lesion_size"] == {"value": 2.5, "unit": "mm3"}


def test_organ_crop_and_head_norm_fields_round_trip_and_old_cards_mean_neither(saved, tmp_path):
    """Issue 20's card fields: ``crop_to_organ`` (a margin in voxels, written only when set) and
    ``architecture.head_norm``; a card written before them (the fixture's, with the key removed)
    reads as no crop and today's head."""
    path = _crafted(saved, tmp_path, _set("crop_to_organ", 5))
    assert read_metadata(path)["crop_to_organ"] == 5
    card = read_metadata(saved)
    assert "crop_to_organ" not in card and card["architecture"]["head_norm"] is False

    def drop_head_norm(card):
        del card["architecture"]["head_norm"]

    model, card = load_checkpoint(_crafted(saved, tmp_path, drop_head_norm))
    assert card["architecture"]["head_norm"] is False and model.head[1][2].bias is not None


def test_unknown_keys_of_a_newer_writer_are_kept(saved, tmp_path):
    path = _crafted(saved, tmp_path, _set("future_field", {"x": [1, 2]}))
    assert read_metadata(path)["future_field"] == {"x": [1, 2]}


def test_saving_validates_with_the_same_rules(tmp_path):
    model = build_model(TINY_CONFIG)
    base = {"patch_size": [16, 16, 16], "preprocessing": get_preset("mr")}
    for bad, fragment in (({"threshold": 0.0}, "'threshold'"), ({"patch_size": [4096, 1, 1]}, "'patch_size'"),
                          ({"size_thresholds": "kidney"}, "'size_thresholds'"),
                          ({"min_lesion_size": {"value": -1, "unit": "mm3"}}, "'min_lesion_size.value'")):
        with pytest.raises(InputError, match=fragment) as info:
            save_checkpoint(tmp_path / "m.safetensors", model, {**base, **bad})
        assert str(info.value).startswith("checkpoint metadata")
    assert list(tmp_path.iterdir()) == []


@settings(max_examples=60, deadline=None)
@given(t=st.floats(allow_nan=True, allow_infinity=True), side=st.integers(-5, 2000) | st.sampled_from([7, 8, 512, 513]))
def test_threshold_and_patch_are_accepted_exactly_inside_their_bounds(t, side):
    card = {"architecture": dict(TINY_CONFIG), "patch_size": [side, 16, 16], "preprocessing": get_preset("mr"),
            "threshold": t}
    ok = (0.0 < t < 1.0) and MIN_PATCH_SIDE <= side <= MAX_PATCH_SIDE  # 8 and 512
    if ok:
        record = ModelCard.from_dict(card)
        assert record.threshold == t and record.patch_size == (side, 16, 16)
        assert ModelCard.from_dict(record.to_dict()) == record
    else:
        with pytest.raises(CheckpointError):
            ModelCard.from_dict(card)


def test_a_target_spacing_within_the_card_limits_still_cannot_ask_for_terabytes(saved, tmp_path):
    # 0.01 mm is a valid card value (micro-CT), but a 64^3 scan at 1 mm would become
    # (64 * 100)^3 = 2.6e11 voxels (1 TB as float32): resampling refuses before allocating
    from IWSegmentationLib.core.imageio import Geometry
    from IWSegmentationLib.inference import predict_volume

    path = _crafted(saved, tmp_path, _set("preprocessing.target_spacing", [0.01, 0.01, 0.01]))
    model, card = load_checkpoint(path)
    image = np.full((64, 64, 64), -500.0, np.float32)
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=r"64x64x64 voxels of 1x1x1 mm.*would make 2\.62e\+11 voxels \(6400x6400x6400\), more than 2147483648"):
        predict_volume(model, image, card, geometry=Geometry.identity(image.shape), device="cpu")
    assert time.perf_counter() - t0 < 5


# ------------------------------------------------------------------------------ licence (issue 22 item 6)


def test_a_card_without_a_licence_says_not_stated(saved, tmp_path, capsys):
    # a card written before the field existed: no "license" key at all
    path = _crafted(saved, tmp_path, lambda card: card.pop("license", None))
    assert "license" not in json.loads(read_header(path)["__metadata__"]["model_card"])
    assert read_metadata(path)["license"] == "not stated"
    assert cli_main(["inspect", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["license"] == "not stated"
    # a newly saved card without one states it the same way, and has no URL or text
    card = read_metadata(saved)
    assert card["license"] == "not stated" and "license_url" not in card and "license_text" not in card


def test_a_stated_licence_round_trips_and_is_shown_by_inspect(saved, tmp_path, capsys):
    terms = "Permission is granted to use this model for research only."
    path = tmp_path / "licensed.safetensors"
    save_checkpoint(path, build_model(TINY_CONFIG), {
        "patch_size": [32, 32, 32], "preprocessing": get_preset("ct-lung"),
        "license": "(MIT OR Apache-2.0) AND LicenseRef-research-only",
        "license_url": "https://example.org/terms", "license_text": terms,
    })
    assert cli_main(["inspect", str(path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["license"] == "(MIT OR Apache-2.0) AND LicenseRef-research-only"
    assert (shown["license_url"], shown["license_text"]) == ("https://example.org/terms", terms)
    record = ModelCard.from_dict(shown)
    assert record.to_dict() == shown and record.license_text == terms
    assert license_summary(shown) == ("(MIT OR Apache-2.0) AND LicenseRef-research-only (https://example.org/terms)"
                                      " (full text in the card: license_text)")
    assert license_summary({}) == "not stated"


@pytest.mark.parametrize(("key", "value", "message"), [
    ("license", "Apache 2.0", "SPDX licence expression"),   # two ids without an operator
    ("license", "MIT OR", "SPDX licence expression"),        # an operator without its operand
    ("license", "(MIT", "SPDX licence expression"),          # unbalanced
    ("license", "", "SPDX licence expression"),
    ("license", 2.0, "must be a string"),
    ("license", "A" * 201, "at most 200 characters"),
    ("license_url", "file:///etc/passwd", "http\\(s\\) URL"),
    ("license_url", "https://a b", "http\\(s\\) URL"),
    ("license_text", ["x"], "must be a string"),
    ("license_text", "x" * 200_001, "at most 200000 characters"),
])
def test_a_bad_licence_is_refused_naming_the_field(saved, tmp_path, key, value, message):
    path = _crafted(saved, tmp_path, _set(key, value))
    with pytest.raises(CheckpointError, match=f"{path}: model card field '{key}' .*{message}"):
        read_metadata(path)


def test_check_license_accepts_spdx_expressions_and_names_the_source():
    for good in ("Apache-2.0", "GPL-2.0+ WITH Classpath-exception-2.0", "DocumentRef-d:LicenseRef-x",
                 "not stated", None):
        check_license(good, "https://example.org/l")
    with pytest.raises(InputError, match="training config field 'license'"):
        check_license("Apache License 2.0", source="training config")
