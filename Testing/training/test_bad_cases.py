"""A case whose preprocessing fails stops training (and ``iwseg predict``) with one line that
names the case, whichever path prepares it: up front in the training process
(``cache_size: null``), lazily in the training process, or lazily in a DataLoader worker.

The bad case is real data with a wrong header: its image, label and mask say the voxels are
60 times larger on every axis (a mm/µm mix-up), so resampling it to ``target_spacing`` 1 mm
would make (16 x 1.25 x 60) x (32 x 0.7 x 60)² = 1200 x 1344 x 1344 = 2.17e9 voxels, more than
``MAX_RESAMPLED_VOXELS`` (2³¹ = 2.147e9):
:func:`preprocessing.resampled_geometry` refuses it. The other cases resample normally.

On the code before this test, the worker path raised torch's re-raise of the worker's error,
whose message was the worker's whole traceback ("Caught InputError in DataLoader worker
process 0. Original Traceback ...") instead of one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import SimpleITK as sitk

from IWSegmentationLib.cli.main import main as cli_main
from IWSegmentationLib.core.errors import InputError
from IWSegmentationLib.data import load_dataset
from IWSegmentationLib.data.synth import write_dataset
from IWSegmentationLib.training import TrainConfig, train

SHAPE = (16, 32, 32)
SPACING_FACTOR = 60.0


def _stretch(path: Path, factor: float) -> None:
    """Rewrite ``path`` with its voxel spacing multiplied by ``factor`` (same voxels)."""
    image = sitk.ReadImage(str(path))
    image.SetSpacing([s * factor for s in image.GetSpacing()])
    sitk.WriteImage(image, str(path))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, str]:
    """Three synthetic lung cases; the second has the 60x spacing. Returns (root, bad id)."""
    root = tmp_path_factory.mktemp("badcase") / "data"
    write_dataset(root, 3, 5, "ct-lung", shape=SHAPE)
    bad = load_dataset(root).cases[1]
    for path in (bad.image, bad.label, bad.mask):
        _stretch(Path(path), SPACING_FACTOR)
    return root, bad.id


def _settings(root: Path, out: Path, **overrides) -> dict:
    return {
        "data": str(root), "out": str(out), "model_size": "tiny", "patch_size": [8, 16, 16],
        "batch_size": 2, "epochs": 1, "iters_per_epoch": 12, "val_fraction": 0.0, "val_every": 0,
        "preprocessing": "ct-lung", "target_spacing": [1.0, 1.0, 1.0],
        "tensorboard": False, "progress": False, "seed": 3, **overrides,
    }


def _assert_names_case(message: str, case_id: str) -> None:
    assert f"case {case_id}" in message, message
    assert "resampling" in message, message  # the preprocessing step that failed
    assert "\n" not in message and "Traceback" not in message, message


@pytest.mark.parametrize("cache_size, workers", [(None, 0), (None, 1), (1, 0), (1, 1)])
def test_training_names_the_case_whose_preprocessing_fails(data, tmp_path, cache_size, workers):
    root, bad = data
    config = TrainConfig.from_dict(_settings(root, tmp_path / "run", cache_size=cache_size, num_workers=workers))
    with pytest.raises(InputError) as err:
        train(config, verbose=False)
    _assert_names_case(str(err.value), bad)


def test_iwseg_train_prints_one_line_naming_the_case(data, tmp_path, capsys):
    """The hardest path through the command line: lazily loaded, in a worker process."""
    root, bad = data
    sets = [f"{k}={v}" for k, v in _settings(root, tmp_path / "run", cache_size=1, num_workers=1).items()
            if k not in ("target_spacing", "patch_size")]
    argv = ["train", "--set", "patch_size=[8,16,16]", "--set", "target_spacing=[1,1,1]"]
    for item in sets:
        argv += ["--set", item]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    _assert_names_case(err[0], bad)


def test_iwseg_predict_names_the_case_whose_preprocessing_fails(data, tmp_path, capsys):
    """A model trained with ``target_spacing`` 1 mm (on the two good cases) refuses the bad
    case at prediction: a folder run skips it by name and fails naming it."""
    root, bad = data
    good = [c.id for c in load_dataset(root).cases if c.id != bad]
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": good}), encoding="utf-8")
    result = train(TrainConfig.from_dict(_settings(root, tmp_path / "run", iters_per_epoch=1, num_workers=0,
                                                   splits=str(splits))), verbose=False)
    out = tmp_path / "pred"
    code = cli_main(["predict", "--model", str(result.best_checkpoint), "--input", str(root / "imagesTr"),
                     "--output", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert f"1 of 3 case(s) failed: {bad}" in err, err
    assert "resampling" in err, err
