"""The tiny training set-up shared by the trainer's tests: four synthetic 16x32x32 liver-CT cases
and a ``TrainConfig`` for the ``tiny`` U-Net (86 k parameters, 16^3 patches, a few steps per
epoch), so that a real run takes about a second on two CPU cores."""

from __future__ import annotations

from pathlib import Path

from IWSegmentationLib.data.synth import write_dataset
from IWSegmentationLib.training import TrainConfig


def write_tiny_dataset(root: Path) -> Path:
    """Four synthetic liver-CT cases of 16x32x32 voxels (8, 6, 3 and 3 lesions, seed 0) in ``root``."""
    write_dataset(root, 4, 0, "ct-liver", shape=(16, 32, 32))
    return root


def tiny_config(data: Path, out: Path, **overrides) -> TrainConfig:
    """A validated ``TrainConfig`` for the tiny U-Net on ``data`` writing to ``out``; ``overrides`` win."""
    values = {
        "data": str(data), "out": str(out), "model_size": "tiny", "patch_size": [16, 16, 16],
        "epochs": 2, "iters_per_epoch": 4, "num_workers": 0, "val_every": 0, "val_fraction": 0.25,
        "tensorboard": False, "progress": False, "seed": 3,
    }
    values.update(overrides)
    return TrainConfig.from_dict(values)
