"""The seam between training and inference: the network is fed the same numbers in both.

A trained network only works on inputs like the ones it was trained on. These tests record,
with a network that stores its inputs, what :func:`inference.predict_volume` feeds it for a
case read from disk (as ``iwseg predict`` reads it), and compare every training patch the
trainer's patch stream yields for that case with the same crop of it. They cover the three
intensity presets, both cache modes (cases prepared up front, or loaded lazily in the
patch dataset), DataLoader workers or none, a custom ``target_spacing`` and organ masks, the
crop to the organ's bounding box (``crop_to_organ``), the validation path, and a two-channel
(multi-sequence MR) dataset, whose every channel must be the same crop. On the code before the fix, the default in-memory path prepared each
case twice and these comparisons failed for ct-lung and ct-liver (re-windowing values already
in [0, 1]); the mr preset's percentile scaling is nearly idempotent, so there it changed little.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from IWSegmentationLib.core.imageio import read_channels, read_image
from IWSegmentationLib.data import Case, CaseVolume, load_case, load_dataset, prepare_volume
from IWSegmentationLib.data.loader import make_loader
from IWSegmentationLib.data.synth import write_dataset
from IWSegmentationLib.inference import predict_volume
from IWSegmentationLib.training import (
    TrainConfig,
    load_training_data,
    make_patch_dataset,
    model_card,
    validate,
)

SHAPE = (16, 32, 32)
PATCH = [8, 16, 16]


class InputRecorder(nn.Module):
    """A stand-in network that keeps every input it is given and predicts background."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))  # predict_volume moves "the model" to a device
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().to(torch.float32).clone())
        return torch.full((x.shape[0], 1, *x.shape[2:]), -10.0) + self.bias


@pytest.fixture(scope="module", params=[("ct-lung", 1), ("ct-liver", 1), ("mr", 1), ("mr", 2)],
                ids=["ct-lung", "ct-liver", "mr", "mr-2-channels"])
def dataset(request, tmp_path_factory) -> tuple[str, Path]:
    preset, channels = request.param
    root = tmp_path_factory.mktemp(f"seam-{preset}-{channels}") / "data"
    write_dataset(root, 3, 7, preset, shape=SHAPE, channels=channels)
    return preset, root


def _config(root: Path, preset: str, **overrides) -> TrainConfig:
    values = {
        "data": str(root), "out": str(root.parent / "run"), "model_size": "tiny", "patch_size": PATCH,
        "preprocessing": preset, "epochs": 1, "iters_per_epoch": 4, "num_workers": 0, "val_fraction": 0.0,
        "batch_size": 3, "lesion_probability": 0.5, "augment": False, "tensorboard": False,
        "progress": False, "seed": 11, "empty_cases": "warn",
    }
    values.update(overrides)
    return TrainConfig.from_dict(values)


def _records(root: Path) -> dict[str, Case]:
    """The case files (image, label, organ mask), by id."""
    records = {case.id: case for case in load_dataset(root)}
    assert all(case.mask is not None for case in records.values())  # organ masks are exercised
    return records


def _inference_input(record: Case, card: dict) -> np.ndarray:
    """What predict_volume feeds the network for ``record``, as one ``[C, z, y, x]`` array on the
    working grid (C image channels, read as ``iwseg predict`` reads them).

    The card's window is set to the case's whole working grid, so one window holds all of it
    (predict_volume pads only when the window is larger than the image)."""
    image, geometry = read_channels(record.image_files)
    organ, _ = read_image(record.mask)
    grid = prepare_volume(load_case(record), card["preprocessing"],  # only for the grid's shape
                          card.get("crop_to_organ")).image.shape[-3:]
    card = json.loads(json.dumps(card))  # the card as a checkpoint stores it
    card["inference"] = {"patch_size": list(grid), "overlap": 0.0, "blend": "constant"}
    recorder = InputRecorder()
    predict_volume(recorder, image, card, geometry=geometry, organ_mask=organ, device="cpu", engine="eager",
                   skip_background=False, channels_last=False, batch_size=1)
    whole = [x for x in recorder.inputs if tuple(x.shape[2:]) == grid]
    assert whole, f"no recorded window covers the working grid {grid}"
    assert whole[-1].shape[1] == record.channels
    return whole[-1][0].numpy()


def _training_batches(config: TrainConfig, workers: int, steps: int = 4) -> list[dict]:
    data = load_training_data(config, verbose=False)
    ds = make_patch_dataset(config, data.train_cases, data.params, steps=steps)
    if workers:
        ds.preload() if config.cache_size is None else None
        return list(make_loader(ds, num_workers=workers))
    return [ds.batch(step) for step in range(steps)]


def _assert_patch_is_crop(patch: np.ndarray, origin: np.ndarray, whole: np.ndarray, where: str) -> None:
    """Each channel of ``patch`` ``[C, z, y, x]`` equals the same channel of ``whole[origin :
    origin + size]``; voxels outside ``whole`` hold its minimum (the value both the patch sampler
    and the sliding window pad with)."""
    assert patch.shape[0] == whole.shape[0], f"{where}: {patch.shape[0]} vs {whole.shape[0]} channels"
    for c in range(patch.shape[0]):
        _assert_channel_is_crop(patch[c], origin, whole[c], f"{where} channel {c}")


def _assert_channel_is_crop(patch: np.ndarray, origin: np.ndarray, whole: np.ndarray, where: str) -> None:
    expected = np.full(patch.shape, whole.min(), np.float32)
    src = tuple(slice(max(o, 0), min(o + p, s)) for o, p, s in zip(origin, patch.shape, whole.shape))
    dst = tuple(slice(a.start - o, a.stop - o) for a, o in zip(src, origin))
    expected[dst] = whole[src]
    np.testing.assert_allclose(patch, expected, rtol=0, atol=1e-5, err_msg=where)


@pytest.mark.parametrize("cache_size,workers", [(None, 0), (None, 1), (2, 0), (2, 1)],
                         ids=["in-memory", "in-memory+worker", "lazy", "lazy+worker"])
def test_training_patches_are_crops_of_what_inference_feeds(dataset, cache_size, workers):
    preset, root = dataset
    config = _config(root, preset, cache_size=cache_size)
    data = load_training_data(config, verbose=False)
    card = model_card(config, data, epoch=0, validation_metrics=None)
    records = _records(root)
    wholes: dict[str, np.ndarray] = {}
    seen = 0
    for batch in _training_batches(config, workers):
        for b, case_id in enumerate(batch["case"]):
            if case_id not in wholes:
                wholes[case_id] = _inference_input(records[case_id], card)
            patch = batch["image"][b].numpy()
            _assert_patch_is_crop(patch, batch["origin"][b].numpy(), wholes[case_id],
                                  f"{preset} cache_size={cache_size} workers={workers} case {case_id} patch {b}")
            seen += 1
    assert seen == 4 * config.batch_size
    # the check has teeth: inputs are not constant (a preset that erased the image would pass)
    assert all(float(w.max() - w.min()) > 0.1 for w in wholes.values())
    # and each channel is its own sequence (a stream that repeated channel 0 would fail the crops)
    assert all(not np.allclose(w[0], w[c]) for w in wholes.values() for c in range(1, w.shape[0]))


def test_custom_target_spacing_and_organ_mask_reach_both_sides_alike(dataset):
    preset, root = dataset
    config = _config(root, preset, target_spacing=[1.7, 1.3, 0.9])
    data = load_training_data(config, verbose=False)
    card = model_card(config, data, epoch=0, validation_metrics=None)
    assert card["preprocessing"]["target_spacing"] == [1.7, 1.3, 0.9]
    records = _records(root)
    for batch in _training_batches(config, 0, steps=2):
        for b, case_id in enumerate(batch["case"]):
            whole = _inference_input(records[case_id], card)
            assert whole.shape[1:] != SHAPE  # resampled
            _assert_patch_is_crop(batch["image"][b].numpy(), batch["origin"][b].numpy(), whole,
                                  f"{preset} resampled case {case_id}")


@pytest.mark.parametrize("cache_size,workers", [(None, 0), (2, 1)], ids=["in-memory", "lazy+worker"])
def test_organ_crop_reaches_both_sides_alike(dataset, cache_size, workers):
    """With ``crop_to_organ`` (issue 20) every training patch is a crop of what predict_volume
    feeds the network, which is the organ box of the prepared case (one function,
    ``preprocessing.organ_box``, on both sides); the prediction is pasted back into the whole
    grid with no lesion outside the box; a card with the crop and no organ mask gets a warning."""
    preset, root = dataset
    config = _config(root, preset, crop_to_organ=1, cache_size=cache_size)
    data = load_training_data(config, verbose=False)
    card = model_card(config, data, epoch=0, validation_metrics=None)
    assert card["crop_to_organ"] == 1
    records = _records(root)
    wholes: dict[str, np.ndarray] = {}
    for batch in _training_batches(config, workers, steps=2):
        for b, case_id in enumerate(batch["case"]):
            if case_id not in wholes:
                wholes[case_id] = _inference_input(records[case_id], card)
                uncropped = prepare_volume(load_case(records[case_id]), card["preprocessing"]).image
                assert wholes[case_id].shape[1:] != uncropped.shape[-3:]  # the crop has teeth here
            _assert_patch_is_crop(batch["image"][b].numpy(), batch["origin"][b].numpy(), wholes[case_id],
                                  f"{preset} organ crop, case {case_id} patch {b}")
    record = records[next(iter(wholes))]
    image, geometry = read_channels(record.image_files)
    organ, _ = read_image(record.mask)
    pred = predict_volume(InputRecorder(), image, card, geometry=geometry, organ_mask=organ, device="cpu",
                          engine="eager", skip_background=False)
    inside = np.zeros(organ.shape, bool)
    hits = np.argwhere(organ != 0)
    inside[tuple(slice(max(a - 1, 0), b + 2) for a, b in zip(hits.min(axis=0), hits.max(axis=0)))] = True
    assert not inside.all()
    assert np.all(pred.probabilities[~inside] == 0.0)  # pasted back: nothing outside the box
    # inside the box, the organ's voxels get the network's output (the recorder's logit -10); a preset
    # that masks its organ (preprocessing "mask": ct-lung, ct-liver) gives the rest probability 0
    masks = card["preprocessing"].get("mask") is not None
    kept = inside & (organ != 0) if masks else inside
    np.testing.assert_allclose(pred.probabilities[kept], 1 / (1 + np.exp(10.0)), rtol=1e-4)
    assert not masks or np.all(pred.probabilities[inside & (organ == 0)] == 0.0)
    messages = []
    predict_volume(InputRecorder(), image, card, geometry=geometry, device="cpu", engine="eager",
                   on_warning=messages.append)
    assert any("crop_to_organ: 1 voxels" in m and "no organ mask was given" in m for m in messages)


def test_validation_feeds_what_predict_feeds(dataset):
    """validate() predicts the validation cases with the card the checkpoint will hold."""
    preset, root = dataset
    config = _config(root, preset, val_fraction=0.34, val_patch_size=list(SHAPE), val_overlap=0.0)
    data = load_training_data(config, verbose=False)
    card = model_card(config, data, epoch=0, validation_metrics=None)
    assert data.val_cases, "the split gave no validation case"
    recorder = InputRecorder()
    validate(recorder, data.val_cases, config, card, device="cpu", verbose=False)
    seen = [x[0].numpy() for x in recorder.inputs if tuple(x.shape[2:]) == SHAPE]
    assert len(seen) == len(data.val_cases)
    for record, fed in zip(data.val_cases, seen):
        expected = _inference_input(_records(root)[record.id], card)
        np.testing.assert_allclose(fed, expected, rtol=0, atol=1e-6, err_msg=f"{preset} validation {record.id}")


def test_a_case_is_prepared_exactly_once(dataset):
    preset, root = dataset
    config = _config(root, preset)
    data = load_training_data(config, verbose=False)
    prepared = data.train_cases[0]
    assert isinstance(prepared, CaseVolume) and prepared.preprocessing == data.params
    with pytest.raises(RuntimeError, match="already preprocessed"):
        prepare_volume(prepared, data.params)
    raw = load_case(_records(root)[prepared.id])
    with pytest.raises(RuntimeError, match="is raw"):
        make_patch_dataset(config, [raw], data.params)
    other = dict(data.params, clip=[-50.0, 50.0], scaling="window") if preset != "mr" else dict(data.params,
                                                                                                 percentiles=[1, 99])
    with pytest.raises(RuntimeError, match="other parameters"):
        make_patch_dataset(config, [prepare_volume(raw, other)], data.params)
