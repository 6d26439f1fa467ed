"""The automatic organ mask is the same for training and inference (issue 22).

A ``ct-lung`` dataset without organ masks, trained with ``auto_organ_mask: true``: the organ mask
the trainer's loader gives each case must be the mask ``iwseg predict`` makes for the same image
file without ``--organ-mask`` (``Predictor.read_organ_mask``), voxel for voxel, and the card a real
tiny run writes must say the model needs a lung mask and that its masks were automatic.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
from _tiny_training import tiny_config

from IWSegmentationLib.core.imageio import read_image
from IWSegmentationLib.core.progress import ProgressReporter
from IWSegmentationLib.data import load_dataset
from IWSegmentationLib.data.cases import load_prepared_case
from IWSegmentationLib.data.synth import write_dataset
from IWSegmentationLib.nn.checkpoint import read_metadata
from IWSegmentationLib.predict.cases import PredictJob
from IWSegmentationLib.predict.options import PredictOptions
from IWSegmentationLib.predict.predictor import Predictor
from IWSegmentationLib.training import train


def test_trainer_and_predict_use_the_same_automatic_lung_mask(tmp_path):
    root = tmp_path / "data"
    write_dataset(root, 4, 0, "ct-lung", shape=(16, 32, 32))
    shutil.rmtree(root / "masksTr")  # no dataset organ masks: the automatic one must fill in
    meta = json.loads((root / "dataset.json").read_text())
    for item in meta["training"]:
        item.pop("mask", None)
    (root / "dataset.json").write_text(json.dumps(meta))
    config = tiny_config(root, tmp_path / "run", preprocessing="ct-lung", auto_organ_mask=True)
    params = config.preprocessing_params()
    predictor = Predictor(PredictOptions(models=(tmp_path / "unused.safetensors",)), ProgressReporter("jsonl"))
    predictor.organ_plan = "automatic"  # what the run decides for a card that needs a lung mask and has none given
    cases = load_dataset(root).cases
    assert cases and all(c.mask is None for c in cases)
    for case in cases:
        trained = load_prepared_case(case, params, None, auto_organ_mask=True)
        image, geometry = read_image(case.image)
        job = PredictJob(case.id, case.image, tmp_path / "out.nii.gz")
        predicted = predictor.read_organ_mask(job, image, geometry, {"preprocessing": params})
        assert trained.organ is not None and predicted is not None
        np.testing.assert_array_equal(trained.organ, predicted)  # no target_spacing: the same grid

    train(config, verbose=False)
    card = read_metadata(next((tmp_path / "run").glob("*.safetensors")))
    assert card["organ_mask"] == {"organ": "lung", "required": True, "automatic": True, "source": "automatic"}
