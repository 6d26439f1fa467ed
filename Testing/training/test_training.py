"""The trainer: config schema, schedule, per-patch inverse weights, real tiny training runs on CPU,
exact resume, failing writes, bad input, and DDP with two gloo processes.

Every run here trains the ``tiny`` U-Net (86 k parameters) on 16x32x32 synthetic cases with
16^3 patches, a few steps per epoch, so a run takes about a second on two CPU cores.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _subprocess import run_in_group
from _tiny_training import tiny_config

from IWSegmentationLib.cli import main as cli_main
from IWSegmentationLib.core.errors import CheckpointError, GeometryMismatchError, InputError, OutputError
from IWSegmentationLib.core.imageio import read_image, write_image
from IWSegmentationLib.data import prepare_volume
from IWSegmentationLib.nn.checkpoint import load_checkpoint, read_metadata
from IWSegmentationLib.training import (
    LAST_CHECKPOINT,
    RESUME_STATE,
    TrainConfig,
    build_optimizer,
    build_scheduler,
    config_reference_markdown,
    load_config,
    load_training_data,
    lr_at_epoch,
    make_patch_dataset,
    train,
)

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- config


def test_unknown_config_key_is_rejected_with_the_valid_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: somewhere\nepochz: 3\n")
    with pytest.raises(InputError) as info:
        load_config(path)
    message = str(info.value)
    assert "'epochz'" in message and str(path) in message
    assert "Valid keys:" in message and "epochs" in message and "iters_per_epoch" in message
    with pytest.raises(InputError, match="unknown config key.*'lrate'"):
        load_config(None, ["lrate=0.1"])
    # the CLI maps it to exit code 2, one line on stderr
    assert cli_main(["train", "--config", str(path)]) == 2


def test_config_defaults_are_the_papers_and_overrides_parse(tmp_path):
    c = TrainConfig()
    assert (c.lr, c.lr_final, c.lr_decay_at, c.momentum, c.nesterov) == (1e-2, 1e-3, 0.8, 0.9, True)
    assert (c.epochs, c.iters_per_epoch, c.batch_size, c.patch_size) == (100, 100, 2, [128, 128, 128])
    assert (c.loss, c.lesion_probability, c.augment) == ("iw-dice", 0.5, False)
    path = tmp_path / "run.yaml"
    path.write_text("data: d\nloss: dice\nmodel: {blocks_per_level: 1}\n")
    # "1e-3" is a string to PyYAML (YAML 1.1 needs a dot); the float key still takes it
    c = load_config(path, ["lr=1e-3", "patch_size=64", "model.channels=[4,8,16,32]", "augment=yes"])
    assert c.lr == 0.001 and c.patch_size == [64, 64, 64] and c.augment is True
    assert c.model == {"blocks_per_level": 1, "channels": [4, 8, 16, 32]}  # dotted override merged
    assert c.model_config()["channels"] == [4, 8, 16, 32]
    with pytest.raises(InputError, match="'batch_size' must be an integer"):
        load_config(None, ["batch_size=2.5"])
    with pytest.raises(InputError, match="'lr_schedule' must be one of"):
        load_config(None, ["lr_schedule=linear"])
    with pytest.raises(InputError, match="config key 'loss': unknown loss 'iw-dise'"):
        load_config(None, ["loss=iw-dise"])


def test_config_reference_documents_every_key():
    table = config_reference_markdown()
    docs = (REPO / "docs" / "training.md").read_text()
    for key in TrainConfig.key_names():
        assert f"| `{key}` |" in table
        assert f"`{key}`" in docs, f"docs/training.md does not document config key {key}"


def test_step_schedule_drops_the_lr_at_80_percent():
    # paper: 1e-2 for epochs 0..79, 1e-3 from epoch 80 of 100; here 10 epochs -> drop at epoch 8
    config = TrainConfig(epochs=10)
    model = torch.nn.Linear(2, 1)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    seen = []
    for _ in range(config.epochs):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # (no gradients: a no-op that keeps the step order torch expects)
        scheduler.step()
    assert seen == pytest.approx([1e-2] * 8 + [1e-3] * 2)
    assert seen == pytest.approx([lr_at_epoch(config, e) for e in range(10)])
    assert optimizer.param_groups[0]["nesterov"] and optimizer.param_groups[0]["momentum"] == 0.9
    cosine = TrainConfig(epochs=4, lr_schedule="cosine")
    opt = build_optimizer(model, cosine)
    sched = build_scheduler(opt, cosine)
    got = []
    for _ in range(4):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # 1e-3 + 9e-3 * (1 + cos(pi e / 4)) / 2 for e = 0..3
    assert got == pytest.approx([1e-2, 1e-3 + 9e-3 * (1 + 2**-0.5) / 2, 5.5e-3, 1e-3 + 9e-3 * (1 - 2**-0.5) / 2])


# --------------------------------------------------------------------------- patches and weights


def _volume_with_lesions():
    """A 16x32x32 case: a 6x20x6 bar lesion, longer than the patch, a 2x2x2 lesion and a
    single-voxel lesion, far apart (3 components under 26-connectivity)."""
    from IWSegmentationLib.core.imageio import Geometry
    from IWSegmentationLib.data import CaseVolume

    lesion = np.zeros((16, 32, 32), np.uint8)
    lesion[5:11, 6:26, 13:19] = 1
    lesion[2:4, 25:27, 3:5] = 1
    lesion[13, 28, 28] = 1
    image = np.where(lesion > 0, 100.0, 20.0).astype(np.float32)
    return CaseVolume("hand", image, lesion, None, Geometry.identity(lesion.shape))


@pytest.mark.parametrize("mode", ["clip", "exact"])
def test_weights_per_patch_equal_component_weights_of_cropped_labels(tmp_path, mode):
    from IWSegmentationLib.core.lesions import label_components
    from IWSegmentationLib.core.weights import component_weights

    volume = _volume_with_lesions()
    whole, k = label_components(volume.lesion)
    assert k == 3
    whole_counts = np.bincount(whole.ravel())
    config = tiny_config(tmp_path / "data", tmp_path / "out", loss="iw-dice", loss_params={"mode": mode},
                         lesion_probability=1.0, batch_size=4)
    params = config.preprocessing_params()
    ds = make_patch_dataset(config, [prepare_volume(volume, params)], params, keep_labels=True)
    cut_seen = False
    for step in range(6):
        batch = ds.batch(step)
        assert batch["weight"].shape == batch["image"].shape == (4, 1, 16, 16, 16)
        for b in range(4):
            labels = batch["labels"][b, 0].numpy()
            weight = batch["weight"][b, 0].numpy()
            np.testing.assert_array_equal(batch["target"][b, 0].numpy(), labels > 0)
            # equation (1) with in-patch counts: N / (C |L_j|), C = components present (K + 1)
            ids, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
            w = labels.size / (len(ids) * counts.astype(np.float64))
            if mode == "clip":
                w = np.clip(w, 1.0, 2e5)
            else:
                assert weight.sum() == pytest.approx(labels.size, rel=1e-5)  # exact weights sum to N
            np.testing.assert_allclose(weight, w[inverse].reshape(labels.shape), rtol=1e-6)
            np.testing.assert_allclose(weight, component_weights(labels, mode=mode), rtol=1e-6)
            # whole-image ids survive the crop; a lesion cut by the patch border is weighted by
            # its in-patch count, not its whole-image size
            for j, n in zip(ids, counts):
                if j > 0 and n < whole_counts[j]:
                    cut_seen = True
    assert cut_seen, "no patch cut the straddling lesion; the test did not exercise cropped counts"


def test_each_rank_and_step_gets_its_own_patches(tmp_path):
    volume = _volume_with_lesions()
    config = tiny_config(tmp_path / "data", tmp_path / "out")
    params = config.preprocessing_params()
    volume = prepare_volume(volume, params)
    r0 = make_patch_dataset(config, [volume], params, rank=0, world_size=2)
    r1 = make_patch_dataset(config, [volume], params, rank=1, world_size=2)
    again = make_patch_dataset(config, [volume], params, rank=0, world_size=2)
    assert not torch.equal(r0.batch(0)["image"], r1.batch(0)["image"])
    assert not torch.equal(r0.batch(0)["image"], r0.batch(1)["image"])
    assert torch.equal(r0.batch(5)["image"], again.batch(5)["image"])  # a pure function of (seed, rank, step)
    assert "weight" in r0.batch(0) and "labels" not in r0.batch(0)  # labels dropped after weighting
    plain = make_patch_dataset(tiny_config(tmp_path / "data", tmp_path / "o", loss="dice"), [volume], params)
    assert "weight" not in plain.batch(0)  # non-iw losses get no inverse weights


# --------------------------------------------------------------------------- training runs


def test_two_epoch_tiny_run_decreases_the_loss_and_writes_everything(dataset, tmp_path):
    out = tmp_path / "run"
    # num_workers=1: patches come from a background worker process, as in real runs
    config = tiny_config(dataset, out, epochs=2, iters_per_epoch=6, num_workers=1, val_every=2,
                         tensorboard=True, lr=0.03)
    result = train(config, verbose=False)
    losses = [row["loss"] for row in result.history]
    assert len(losses) == 2 and losses[1] < losses[0], losses
    assert all(0 <= row["data_wait_fraction"] <= 1 for row in result.history)
    for name in ("last.safetensors", "best.safetensors", "resume.safetensors", "config.yaml", "splits.json",
                 "log.csv"):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    rows = (out / "log.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("epoch,lr,loss")
    model, card = load_checkpoint(out / "best.safetensors")
    assert card["loss"]["name"] == "iw-dice" and card["patch_size"] == [16, 16, 16]
    assert card["preprocessing"]["name"] == "ct-liver"
    assert card["size_thresholds"]["small_mm"] == 12.0  # liver preset
    assert card["training_data"]["cases"] == {"train": 3, "val": 1}
    val = card["validation_metrics"]
    assert val["epoch"] == 2 and set(val["by_size"]) == {"small", "medium", "large"}
    assert val["score"] == "logit"  # validation (and the best checkpoint) ranks components by their maximum logit
    assert model.config["channels"] == [4, 8, 16, 32]
    splits = json.loads((out / "splits.json").read_text())
    assert not set(splits["train"]) & set(splits["val"])


def test_resume_after_interruption_gives_the_same_weights(dataset, tmp_path):
    # num_workers=0 only to keep the test fast (no worker start-up); the batch stream does not
    # depend on the number of workers: batch s is drawn from a generator of (seed, rank, s).
    common = {"epochs": 2, "iters_per_epoch": 2, "num_workers": 0, "val_every": 0}
    straight = train(tiny_config(dataset, tmp_path / "straight", **common), verbose=False)

    class Killed(Exception):
        pass

    def kill(epoch, step, loss):
        if epoch == 1 and step == 1:  # in the middle of the second epoch
            raise Killed

    config = tiny_config(dataset, tmp_path / "killed", **common)
    with pytest.raises(Killed):
        train(config, verbose=False, on_step=kill)
    assert read_metadata(tmp_path / "killed" / LAST_CHECKPOINT)["training"]["epochs_done"] == 1
    with pytest.raises(InputError, match="already holds a training run"):
        train(config, verbose=False)  # a new run must not clobber it silently
    resumed = train(config, resume=True, verbose=False)
    assert [r["epoch"] for r in resumed.history] == [2]  # epochs count from 1

    a, _ = load_checkpoint(tmp_path / "straight" / LAST_CHECKPOINT)
    b, _ = load_checkpoint(tmp_path / "killed" / LAST_CHECKPOINT)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), f"{name} differs after resume (max |diff| {(ta - tb).abs().max()})"
    assert straight.history[-1]["loss"] == resumed.history[-1]["loss"]
    log = (tmp_path / "killed" / "log.csv").read_text().strip().splitlines()
    assert [line.split(",")[0] for line in log[1:]] == ["1", "2"]  # no duplicate rows

    # another architecture cannot resume this run
    other = tiny_config(dataset, tmp_path / "killed", **common, model={"channels": [4, 8, 16, 64]})
    with pytest.raises(CheckpointError, match="different architecture"):
        train(other, resume=True, verbose=False)
    with pytest.raises(InputError, match="different config.*iters_per_epoch"):
        train(tiny_config(dataset, tmp_path / "killed", **{**common, "iters_per_epoch": 5}), resume=True,
              verbose=False)
    # a finished run resumed again does nothing more
    assert train(config, resume=True, verbose=False).history == []


def test_disk_full_while_saving_keeps_the_previous_checkpoint(dataset, tmp_path, monkeypatch):
    import safetensors.torch

    out = tmp_path / "run"
    real_save = safetensors.torch.save_file
    full = {"on": False}

    def save_file(tensors, filename, metadata=None):
        if full["on"]:
            with open(filename, "wb") as fh:
                fh.write(b"\0" * 100)  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)

    def fill_disk(epoch, row):
        full["on"] = True

    # a full disk is an output error (exit 4, issue 23), not a bad checkpoint: the message keeps saying
    # that the previous checkpoint is intact and how to continue
    with pytest.raises(OutputError, match="No space left on device.*intact"):
        train(tiny_config(dataset, out, iters_per_epoch=2), verbose=False, on_epoch_end=fill_disk)
    _, card = load_checkpoint(out / LAST_CHECKPOINT)  # still complete, sha256 verified
    assert card["training"]["epochs_done"] == 1
    assert not [p.name for p in out.iterdir() if ".partial-" in p.name]
    full["on"] = False
    resumed = train(tiny_config(dataset, out, iters_per_epoch=2), resume=True, verbose=False)
    assert resumed.history[0]["epoch"] == 2


# --------------------------------------------------------------------------- bad input


def test_bad_data_gives_errors_naming_the_case_or_key(dataset, tmp_path):
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": ["synth_000"], "val": []}))
    with pytest.raises(InputError, match="split 'val' is empty"):
        load_training_data(tiny_config(dataset, tmp_path / "o", splits=str(splits)), verbose=False)
    with pytest.raises(InputError, match="config key 'data' is required"):
        train(TrainConfig.from_dict({"out": str(tmp_path / "o")}), verbose=False)

    # a label on another grid
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    label_path = broken / "labelsTr" / "synth_001.nii.gz"
    label, geometry = read_image(label_path)
    write_image(label_path, label[:, :, :-1], type(geometry).identity(label[:, :, :-1].shape, geometry.spacing_zyx))
    with pytest.raises(GeometryMismatchError, match="synth_001"):
        load_training_data(tiny_config(broken, tmp_path / "o", val_fraction=0.0), verbose=False)

    # cases without lesions
    empty = tmp_path / "empty"
    shutil.copytree(dataset, empty)
    for path in (empty / "labelsTr").iterdir():
        label, geometry = read_image(path)
        if path.name.startswith(("synth_000", "synth_002")):
            label[:] = 0
        write_image(path, label, geometry)
    with pytest.raises(InputError, match="without any lesion: synth_000, synth_002"):
        load_training_data(tiny_config(empty, tmp_path / "o", val_fraction=0.0, empty_cases="error"),
                           verbose=False)
    data = load_training_data(tiny_config(empty, tmp_path / "o", val_fraction=0.0, empty_cases="skip"),
                              verbose=False)
    assert [v.id for v in data.train_cases] == ["synth_001", "synth_003"]
    for path in (empty / "labelsTr").iterdir():
        label, geometry = read_image(path)
        write_image(path, np.zeros_like(label), geometry)
    with pytest.raises(InputError, match="no training case .* contains a lesion"):
        load_training_data(tiny_config(empty, tmp_path / "o", val_fraction=0.0), verbose=False)


# --------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_ddp_two_cpu_processes_train_and_only_rank0_writes(dataset, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "IWSegmentationLib", "train",
        "--set", f"data={dataset}", "--set", f"out={out}", "--set", "model_size=tiny",
        "--set", "patch_size=16", "--set", "epochs=2", "--set", "iters_per_epoch=2",
        "--set", "num_workers=0", "--set", "val_every=2", "--set", "val_fraction=0.25",
        "--set", "tensorboard=false", "--set", "progress=false", "--set", "device=cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_in_group(cmd, timeout=240, env=env)  # a timeout kills torchrun *and* its workers
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    card = read_metadata(out / LAST_CHECKPOINT)
    assert card["training"]["world_size"] == 2 and card["training"]["epochs_done"] == 2
    assert card["validation_metrics"]["epoch"] == 2
    rows = (out / "log.csv").read_text().strip().splitlines()
    assert len(rows) == 3  # header + 2 epochs: one writer
    assert proc.stdout.count("trained 2 epoch(s)") == 1  # only rank 0 reports
    assert (out / RESUME_STATE).is_file()


# --------------------------------------------------------------------------- the authors' choices (issue 20)


def test_every_shipped_config_is_accepted_and_the_paper_recipe_has_the_authors_choices():
    shipped = sorted((REPO / "Resources" / "Configs").glob("*.yaml"))
    assert {p.name for p in shipped} >= {"example_train.yaml", "cpu_train.yaml"}
    for path in shipped:
        load_config(path)  # every key known, every value valid (InputError otherwise)
    paper = load_config(REPO / "Resources" / "Configs" / "example_train.yaml")
    assert (paper.case_sampling, paper.checkpoint_choice, paper.crop_to_organ) == ("lesions", "last", 5)
    assert paper.model_config()["head_norm"] is True
    assert (paper.optimizer, paper.nesterov, paper.lr, paper.lr_final) == ("sgd", True, 1e-2, 1e-3)
    defaults = TrainConfig()  # the defaults stay ours
    assert (defaults.case_sampling, defaults.checkpoint_choice, defaults.crop_to_organ) == ("uniform", "best", None)
    assert defaults.model_config()["head_norm"] is False
    for bad, match in (("case_sampling=tumours", "'case_sampling' must be one of uniform, lesions"),
                       ("checkpoint_choice=first", "'checkpoint_choice' must be one of best, last"),
                       ("crop_to_organ=-1", "'crop_to_organ' must be a margin"),
                       ("model.head_norm=maybe", "'head_norm' must be true or false")):
        with pytest.raises(InputError, match=match):
            load_config(None, [bad])


@pytest.mark.parametrize("cache_size", [None, 1], ids=["in-memory", "lazy"])
def test_lesion_case_sampling_weights_each_training_case_by_its_lesions(dataset, tmp_path, cache_size):
    """``case_sampling: lesions`` gives each training case its lesion count as sampling weight,
    counted as the sampler labels it (prepared, 26-connected), whether the cases are loaded up
    front or lazily (then counted in one pass before training); ``uniform`` gives none."""
    from IWSegmentationLib.core.lesions import label_components
    from IWSegmentationLib.data import load_dataset, load_prepared_case

    config = tiny_config(dataset, tmp_path / "o", case_sampling="lesions", cache_size=cache_size)
    data = load_training_data(config, verbose=False)
    ds = make_patch_dataset(config, data.train_cases, data.params, lesion_counts=data.lesion_counts)
    records = {c.id: c for c in load_dataset(dataset)}
    ids = [c.id for c in data.train_cases]
    counts = np.array([label_components(load_prepared_case(records[i], data.params).lesion, 26)[1] for i in ids])
    assert counts.min() > 0 and len(set(counts.tolist())) > 1  # the weights are not uniform here
    assert np.allclose(ds.case_probabilities, counts / counts.sum())
    uniform = tiny_config(dataset, tmp_path / "u", cache_size=cache_size)
    assert make_patch_dataset(uniform, data.train_cases, data.params).case_probabilities is None
    with pytest.raises(RuntimeError, match="lesion count of every training case"):
        make_patch_dataset(config, data.train_cases, data.params)


def test_checkpoint_choice_names_the_runs_model_and_the_card_records_it(dataset, tmp_path, capsys):
    """A 2-epoch run with validation after each epoch: with ``checkpoint_choice: last`` the run's
    model is last.safetensors (epoch 2, whatever epoch was best) and both cards record the choice;
    the summary line names it. The default is the best checkpoint."""
    out = tmp_path / "run"
    code = cli_main(["train", "--set", f"data={dataset}", "--set", f"out={out}", "--set", "model_size=tiny",
                     "--set", "patch_size=16", "--set", "epochs=2", "--set", "iters_per_epoch=2",
                     "--set", "num_workers=0", "--set", "val_every=1", "--set", "val_fraction=0.25",
                     "--set", "tensorboard=false", "--set", "progress=false", "--set", "checkpoint_choice=last"])
    assert code == 0
    assert f"model: {out / 'last.safetensors'} (checkpoint_choice: last)" in capsys.readouterr().out
    last, best = read_metadata(out / "last.safetensors"), read_metadata(out / "best.safetensors")
    assert last["training"]["checkpoint_choice"] == best["training"]["checkpoint_choice"] == "last"
    assert last["training"]["epochs_done"] == 2
    from IWSegmentationLib.training import TrainResult

    result = TrainResult(out=out, last_checkpoint=out / "last.safetensors", best_checkpoint=out / "best.safetensors",
                         epochs_done=2)
    assert result.model_checkpoint == out / "best.safetensors"  # the default choice
    assert TrainResult(**{**result.__dict__, "checkpoint_choice": "last"}).model_checkpoint == out / "last.safetensors"


def test_crop_to_organ_crops_training_cases_to_the_organ_box(dataset, tmp_path):
    """With ``crop_to_organ: m`` every prepared training case is its organ mask's bounding box
    grown by m voxels (clipped to the grid), the same box for image, lesion and organ; the model
    card records the margin for inference; a case without an organ mask is refused by name."""
    from IWSegmentationLib.data import load_dataset, load_prepared_case
    from IWSegmentationLib.training import model_card

    config = tiny_config(dataset, tmp_path / "o", crop_to_organ=2)
    data = load_training_data(config, verbose=False)
    records = {c.id: c for c in load_dataset(dataset)}
    for volume in data.train_cases:
        whole = load_prepared_case(records[volume.id], data.params)
        inside = np.argwhere(whole.organ != 0)
        lo = np.maximum(inside.min(axis=0) - 2, 0)
        hi = np.minimum(inside.max(axis=0) + 1 + 2, whole.organ.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        assert volume.image.shape == tuple(hi - lo) and volume.organ_crop == 2
        assert tuple(hi - lo) != whole.image.shape  # the crop has teeth on these cases
        assert np.array_equal(volume.image, whole.image[box]) and np.array_equal(volume.lesion, whole.lesion[box])
        assert volume.geometry.origin == whole.geometry.index_to_physical(lo)
    card = model_card(config, data, epoch=0, validation_metrics=None)
    assert card["crop_to_organ"] == 2
    assert "crop_to_organ" not in model_card(tiny_config(dataset, tmp_path / "p"), data, epoch=0,
                                             validation_metrics=None)
    # volumes prepared without the crop do not pass for cropped ones
    with pytest.raises(RuntimeError, match="another organ crop \\(None vs crop_to_organ 2\\)"):
        make_patch_dataset(config, [load_prepared_case(records[data.train_cases[0].id], data.params)], data.params)
    no_mask = records[data.train_cases[0].id]
    no_mask = type(no_mask)(**{**no_mask.__dict__, "mask": None})
    with pytest.raises(InputError, match=f"case {no_mask.id} has no organ mask.*crop_to_organ"):
        load_prepared_case(no_mask, data.params, 2)


def test_the_config_licence_is_written_into_the_model_card(dataset, tmp_path):
    """``license``/``license_url`` go into the card as given; unset, the card has no licence
    and the saved checkpoint says "not stated"; a licence that is not SPDX is refused before
    training, naming the key (issue 22 item 6)."""
    from IWSegmentationLib.nn.checkpoint import read_metadata, save_checkpoint
    from IWSegmentationLib.nn.unet import build_model
    from IWSegmentationLib.training import model_card

    config = tiny_config(dataset, tmp_path / "o", license="CC-BY-4.0", license_url="https://example.org/cc")
    data = load_training_data(config, verbose=False)
    card = model_card(config, data, epoch=0, validation_metrics=None)
    assert (card["license"], card["license_url"]) == ("CC-BY-4.0", "https://example.org/cc")
    unstated = model_card(tiny_config(dataset, tmp_path / "p"), data, epoch=0, validation_metrics=None)
    assert "license" not in unstated and "license_url" not in unstated
    save_checkpoint(tmp_path / "m.safetensors", build_model(config.model_config(data.channels)), unstated)
    assert read_metadata(tmp_path / "m.safetensors")["license"] == "not stated"
    with pytest.raises(InputError, match="training config field 'license' must be an SPDX licence expression"):
        load_config(None, ["license=Apache License 2.0"])
