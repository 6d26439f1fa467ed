"""PredictParameters (IWSegmentationLib.backend.parameters): the checks and the ``iwseg predict`` options."""

from __future__ import annotations

import pytest

from IWSegmentationLib.backend.parameters import PredictParameters
from IWSegmentationLib.core.errors import InputError


def test_predict_arguments_are_the_cli_contract(tmp_path, fake_checkpoint):
    params = PredictParameters(fake_checkpoint, device="cuda", overlap=0.25, threshold=0.4)
    outputs = {"mask": tmp_path / "m.nrrd", "probabilities": tmp_path / "p.nrrd", "lesions": tmp_path / "l.json"}
    assert params.arguments(tmp_path / "in.nrrd", outputs, tmp_path / "organ.nrrd") == [
        "predict", "--model", str(fake_checkpoint.resolve()), "--input", str(tmp_path / "in.nrrd"),
        "--output", str(tmp_path / "m.nrrd"), "--device", "cuda", "--progress-format", "jsonl",
        "--overwrite", "--probabilities", str(tmp_path / "p.nrrd"), "--lesions", str(tmp_path / "l.json"),
        "--organ-mask", str(tmp_path / "organ.nrrd"), "--overlap", "0.25", "--threshold", "0.4",
    ]
    # no overlap/threshold: the checkpoint's own are used, so the options are left out
    args = PredictParameters(fake_checkpoint).arguments(tmp_path / "in.nrrd", {"mask": tmp_path / "m.nrrd"})
    assert args == ["predict", "--model", str(fake_checkpoint.resolve()), "--input", str(tmp_path / "in.nrrd"),
                    "--output", str(tmp_path / "m.nrrd"), "--device", "auto", "--progress-format", "jsonl",
                    "--overwrite"]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"device": "tpu"}, "device"),
        ({"overlap": 1.0}, "overlap"),
        ({"overlap": -0.1}, "overlap"),
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
    ],
)
def test_predict_parameters_name_the_bad_parameter(fake_checkpoint, change, needle):
    params = PredictParameters(fake_checkpoint, **change)
    with pytest.raises(InputError, match=needle):
        params.validate()

