"""The trainer's start-up report (issue 11, item 6), the CPU config beside the paper's, and one
epoch-numbering convention (item 7: epochs count from 1 in the bar, log.csv, the card and the
summary). Real training steps on the tiny U-Net."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from IWSegmentationLib.nn.checkpoint import read_metadata
from IWSegmentationLib.nn.unet import build_model, default_config
from IWSegmentationLib.training import TrainConfig, load_config, train
from IWSegmentationLib.training.report import (
    CPU_CONFIG,
    StartReport,
    format_duration,
    probe_patch,
    time_training_step,
)

REPO = Path(__file__).resolve().parents[2]


def test_probe_patch_shrinks_big_patches_to_stride_multiples():
    assert probe_patch((32, 48, 48), 8) == (32, 48, 48)  # 73,728 voxels <= 64^3: unchanged
    # 128^3 = 8 x 64^3: factor 0.5 -> 64^3
    assert probe_patch((128, 128, 128), 8) == (64, 64, 64)
    # 40 x 512 x 512 = 10,485,760 voxels: factor (262,144 / 10,485,760)^(1/3) = 0.2924;
    # 40 * 0.2924 = 11.7 -> 8, 512 * 0.2924 = 149.7 -> 144 (multiples of 8)
    assert probe_patch((40, 512, 512), 8) == (8, 144, 144)
    # 8 x 1024 x 1024: factor (262,144 / 8,388,608)^(1/3) = 0.315; z 8 * 0.315 = 2.5 -> one stride (8)
    # at least, 1024 * 0.315 = 322.5 -> 320 (the time is scaled by the true voxel ratio either way)
    assert probe_patch((8, 1024, 1024), 8) == (8, 320, 320)


def test_format_duration():
    assert [format_duration(s) for s in (42, 720, 3 * 3600 + 1440, 174 * 3600)] == ["42 s", "12 min", "3.4 h",
                                                                                      "7.2 days"]


def _report(device: str, seconds_per_step: float, steps: int) -> StartReport:
    return StartReport(device=device, parameters=86121, train_cases=20, val_cases=4, steps=steps,
                       seconds_per_step=seconds_per_step, probe_patch=(32, 48, 48))


def test_report_warns_only_for_a_cpu_run_over_an_hour():
    # 2,000 steps x 2.0 s = 4,000 s = 67 min > 1 h
    lines = _report("cpu", 2.0, 2000).lines()
    assert "device cpu | 86,121 parameters | 20 training / 4 validation case(s) | 2000 steps" in lines[0]
    assert "estimated 67 min" in lines[0]
    assert len(lines) == 2 and "67 min on the CPU" in lines[1] and CPU_CONFIG in lines[1]
    assert len(_report("cpu", 1.5, 2000).lines()) == 1  # 3,000 s: under an hour
    assert len(_report("cuda:0", 2.0, 2000).lines()) == 1  # a GPU run gets no CPU warning


def test_timing_probe_leaves_the_model_and_the_random_streams_alone():
    torch.manual_seed(0)
    model = build_model(default_config("tiny")).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    seconds, probe = time_training_step(model, (16, 32, 32), 2, torch.device("cpu"), stride=model.stride)
    assert seconds > 0 and probe == (16, 32, 32)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN statistics included
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())


def test_cpu_config_is_accepted_and_sized_for_a_cpu():
    cpu = load_config(REPO / CPU_CONFIG)
    paper = load_config(REPO / "Resources" / "Configs" / "example_train.yaml")
    assert cpu.model_size == "small" and cpu.loss == paper.loss == "iw-dice"
    voxels = lambda c: c.patch_size[0] * c.patch_size[1] * c.patch_size[2]  # noqa: E731
    assert voxels(paper) / voxels(cpu) == pytest.approx(28.44, abs=0.01)  # 128^3 / (32 x 48 x 48)
    assert cpu.epochs * cpu.iters_per_epoch == 1500 and paper.epochs * paper.iters_per_epoch == 10000


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from IWSegmentationLib.data.synth import write_dataset

    root = tmp_path_factory.mktemp("synth") / "data"
    write_dataset(root, 4, 0, "ct-liver", shape=(16, 32, 32))
    return root


def test_trainer_reports_at_start_and_counts_epochs_from_one(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    config = TrainConfig.from_dict({
        "data": str(dataset), "out": str(out), "model_size": "tiny", "patch_size": [16, 16, 16], "epochs": 2,
        "iters_per_epoch": 2, "num_workers": 0, "val_every": 1, "val_fraction": 0.25, "tensorboard": False,
        "progress": False, "seed": 3,
    })
    result = train(config, verbose=True)
    printed = capsys.readouterr().out
    start = next(line for line in printed.splitlines() if line.startswith("device "))
    # 4 cases, val_fraction 0.25 -> 3 training / 1 validation; 2 epochs x 2 iterations = 4 steps
    assert "device cpu | 86,121 parameters | 3 training / 1 validation case(s) | 4 steps" in start
    assert printed.index(start) < printed.index("epoch 1/2")
    # one convention: the log line "epoch 2/2", log.csv rows 1 and 2, the card's validation epoch 2
    with open(out / "log.csv", newline="") as fh:
        assert [row["epoch"] for row in csv.DictReader(fh)] == ["1", "2"]
    assert [row["epoch"] for row in result.history] == [1, 2]
    card = read_metadata(out / "last.safetensors")
    assert card["validation_metrics"]["epoch"] == 2 and card["training"]["epochs_done"] == 2
    assert result.best_epoch in (1, 2) and f"at epoch {result.best_epoch}" in result.summary()
    assert read_metadata(out / "best.safetensors")["validation_metrics"]["epoch"] == result.best_epoch
