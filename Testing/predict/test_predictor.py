"""The prediction use case across its front ends (issue 21 deliverable 1, issue 23's predict part):

* every field of the module's parameter node is a prediction parameter that reaches the backend's
  command line, or is listed as something else (read from the module's source: no Qt here);
* a range check gives one message, naming the flag, from the CLI, the server's job manager (its
  HTTP 400 body; the HTTP round trip itself is in serve/test_server.py) and the module's logic;
* outputs that are FIFOs or devices are refused before the network runs, and stale partial files
  of a killed run are removed after the overwrite checks, before inference.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from IWSegmentationLib.backend.job import Signal
from IWSegmentationLib.backend.local_run import InferenceRun
from IWSegmentationLib.cli.main import main
from IWSegmentationLib.core.errors import InputError
from IWSegmentationLib.core.imageio import Geometry, write_image
from IWSegmentationLib.slicer.logic import LesionSegmentationLogic
from IWSegmentationLib.slicer.parameter_node import OTHER_FIELDS, PREDICTION_FIELDS, predict_options
from IWSegmentationLib.testing.phantom import phantom_case, threshold_checkpoint

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "IWSegmentation" / "IWSegmentation.py"


def parameter_node_fields() -> list[str]:
    """The annotated fields of ``IWSegmentationParameterNode`` in the module's source."""
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "IWSegmentationParameterNode")
    return [item.target.id for item in node.body if isinstance(item, ast.AnnAssign)]


def test_every_parameter_node_field_is_a_prediction_field_or_said_to_be_something_else():
    found = parameter_node_fields()
    assert len(found) == 17  # 17 fields today: a new one must be placed in one of the two tables
    assert set(found) == set(PREDICTION_FIELDS) | set(OTHER_FIELDS)
    assert not set(PREDICTION_FIELDS) & set(OTHER_FIELDS)


def test_the_module_starts_its_logic_with_the_node_as_predict_options():
    """The module's ``start`` hands its node to ``LesionSegmentationLogic.start_node``, which builds
    the options with :func:`predict_options` and hands the volume and the organ mask (the two fields
    that are files) to ``start``, which writes them (run for real in Testing/slicer/test_slicer_logic.py)."""
    source = MODULE.read_text(encoding="utf-8")
    start = source[source.index("    def start(self, parameters"):source.index("    def process(self")]
    assert "self.lesionLogic.start_node(" in start and "confirmed=confirmed" in start
    start_node = inspect.getsource(LesionSegmentationLogic.start_node)
    assert "parameter_node.predict_options(node, allow_modality_mismatch=confirmed)" in start_node
    assert "node.inputVolume, options, organ_mask=node.organMask" in start_node


class CapturedBackend:
    """A backend that records its command line and never runs."""

    commands: list[list[str]] = []

    def __init__(self, command, **_kwargs):
        CapturedBackend.commands.append(list(command))
        self.event, self.log, self.finished = Signal(), Signal(), Signal()
        self.done = False

    def start(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.parametrize("operating_point", ["", "1/8fp"])
def test_every_prediction_field_of_the_parameter_node_reaches_the_command_line(tmp_path, fake_checkpoint,
                                                                               operating_point):
    """Run twice: the threshold and the operating point exclude each other, so each reaches the
    command line in its own run (and the other is then absent)."""
    # values that differ from every default, so a field that is dropped cannot pass by luck
    node = SimpleNamespace(checkpointPath=str(fake_checkpoint), device="CPU", overlap=0.5, threshold=0.3,
                           inputVolume=object(), organMask=object(), referenceSegmentation=None,
                           confidenceThreshold=2.0, runOn="this computer", serverUrl="", serverTokenFile="",
                           outputSegmentation=None, operatingPoint=operating_point, segmentBudget=7,
                           keepSpacing=True, allowUnmasked=True, tta=True)
    CapturedBackend.commands.clear()
    run = InferenceRun(predict_options(node), workdir_parent=tmp_path, backend_factory=CapturedBackend)
    run.start(write_input=lambda p: p.write_bytes(b"volume"), write_organ_mask=lambda p: p.write_bytes(b"organ"))
    try:
        (argv,) = CapturedBackend.commands
        expected = {"checkpointPath": str(fake_checkpoint.resolve()), "device": "cpu", "overlap": "0.5",
                    "threshold": "0.3", "inputVolume": str(run.input_path), "organMask": str(run.organ_mask_path),
                    "operatingPoint": "1/8fp", "keepSpacing": None,  # None: a switch, present without a value
                    "allowUnmasked": None, "tta": None}
        assert set(expected) == set(PREDICTION_FIELDS)
        exclusive = {"threshold", "operatingPoint"}
        present = {"operatingPoint"} if operating_point else {"threshold"}
        for name, flag in PREDICTION_FIELDS.items():
            if name in exclusive - present:
                assert flag not in argv, (name, argv)
                continue
            assert flag in argv, (name, flag, argv)
            if expected[name] is not None:
                assert argv[argv.index(flag) + 1] == expected[name], (name, flag, argv)
        assert "--logits" in argv and "--probabilities" not in argv  # what the module loads
    finally:
        run.close()


# ------------------------------------------------------------------- one message, three front ends


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return threshold_checkpoint(tmp_path_factory.mktemp("model") / "threshold.safetensors", patch_size=(16, 16, 16))


@pytest.fixture
def scan(tmp_path) -> Path:
    case = phantom_case((16, 24, 24), lesions=[(8, 12, 12, 4.0, 100.0)])
    return write_image(tmp_path / "case.nii.gz", case.image, Geometry.identity(case.image.shape))


#: (the CLI flag and value, the parameter-node field and value, the one message)
RANGE_ERRORS = [
    ("--overlap", "1.5", "overlap", 1.5, "--overlap must be in [0, 0.9], got 1.5"),
    ("--overlap", "0.999", "overlap", 0.999, "--overlap must be in [0, 0.9], got 0.999"),
    ("--threshold", "1.0", "threshold", 1.0, "--threshold must be in [0, 1), got 1.0"),
]


@pytest.mark.parametrize(("flag", "text", "field", "value", "message"), RANGE_ERRORS)
def test_a_range_check_says_the_same_from_the_cli_the_server_and_the_module(
        tmp_path, model, scan, capsys, flag, text, field, value, message):
    from IWSegmentationLib.serve.jobs import ApiError, JobManager

    # the command line: exit 2 and the message on its one error line
    assert main(["predict", "--model", str(model), "--input", str(scan), "--output", str(tmp_path / "m.nii.gz"),
                 flag, text]) == 2
    assert f"error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "m.nii.gz").exists()
    # the server: 400 with the message as the body's detail (app.py answers {"detail": message})
    manager = JobManager(models={"m": model}, root=tmp_path, command_prefix=["true"], env={})
    with pytest.raises(ApiError) as refused:
        manager.new_job("owner", "m", "scan.nii.gz", {field: value})
    assert (refused.value.status, refused.value.message) == (400, message)
    assert manager.uploading() == 0  # the refused request gave its slot back
    # the module: its parameter node through the logic's mapping
    node = SimpleNamespace(checkpointPath=str(model), device="Auto", overlap=0.25, threshold=0.5, keepSpacing=False)
    setattr(node, field, value)
    with pytest.raises(InputError) as caught:
        predict_options(node)
    assert str(caught.value) == message


def test_the_server_refuses_an_option_it_does_not_know_or_chooses_itself(tmp_path, model):
    from IWSegmentationLib.serve.jobs import ApiError, JobManager

    manager = JobManager(models={"m": model}, root=tmp_path, command_prefix=["true"], env={})
    for request, needle in (({"colour": "red"}, "unknown option(s) colour"),
                            ({"device": "cuda"}, "--device: the server chooses this"),
                            ({"threads": 64}, "--threads: the server chooses this")):
        with pytest.raises(ApiError) as refused:
            manager.new_job("owner", "m", "scan.nii.gz", request)
        assert refused.value.status == 400 and needle in refused.value.message


# ------------------------------------------------------------------ outputs (issue 23, items 6 and 1)


def _events(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("special", ["fifo", "devnull"])
def test_a_fifo_or_device_output_is_refused_before_the_network_runs(tmp_path, model, scan, capsys, special):
    if special == "fifo":
        target = tmp_path / "lesions.json"
        os.mkfifo(target)
        kind = "is a FIFO"
    else:
        target = Path("/dev/null")
        kind = "is a device"
    code = main(["predict", "--model", str(model), "--input", str(scan), "--output", str(tmp_path / "m.nii.gz"),
                 "--lesions", str(target), "--overwrite", "--progress-format", "jsonl"])
    out = capsys.readouterr().out
    assert code == 2
    stages = [e["stage"] for e in _events(out)]
    assert stages == ["error"], stages  # refused before "start": no checkpoint loaded, no window run
    assert _events(out)[0]["message"].startswith(f"--lesions {target} {kind}")
    assert not (tmp_path / "m.nii.gz").exists()
    if special == "fifo":
        assert target.is_fifo()
    else:
        assert target.is_char_device()


def _stale_partial(folder: Path, name: str) -> Path:
    """A temporary file as a killed run's atomic_output leaves it, last written an hour ago."""
    suffix = ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix
    path = folder / f".{name}.partial-abcd1234{suffix}"
    path.write_bytes(b"half a file")
    old = time.time() - 3600
    os.utime(path, (old, old))
    return path


def test_stale_partials_are_removed_after_the_overwrite_checks_and_before_inference(tmp_path, model, scan):
    out = tmp_path / "out"
    out.mkdir()
    mask = out / "m.nii.gz"
    mask.write_bytes(b"an earlier result")
    stale = [_stale_partial(out, "m.nii.gz"), _stale_partial(out, "l.json")]
    other = _stale_partial(out, "someone-else.nii.gz")  # not an output of this run: kept
    argv = ["predict", "--model", str(model), "--input", str(scan), "--output", str(mask), "--lesions",
            str(out / "l.json"), "--device", "cpu"]
    # refused by the overwrite check: nothing is touched, the partials included
    assert main(argv) == 2
    assert all(p.exists() for p in stale) and mask.read_bytes() == b"an earlier result"
    assert main([*argv, "--overwrite"]) == 0
    assert not any(p.exists() for p in stale) and other.exists()
    assert mask.read_bytes() != b"an earlier result" and (out / "l.json").is_file()


def test_the_predictor_refuses_targets_that_disagree_with_the_options(tmp_path, model):
    from IWSegmentationLib.predict.cases import OutputTargets
    from IWSegmentationLib.predict.options import PredictOptions
    from IWSegmentationLib.predict.predictor import Predictor

    predictor = Predictor(PredictOptions(models=(model,), probabilities=True))
    with pytest.raises(ValueError, match="ask for probabilities"):
        predictor.run([tmp_path / "x.nii.gz"], OutputTargets(mask=tmp_path / "m.nii.gz"))
    assert not np.any([p.name == "m.nii.gz" for p in tmp_path.iterdir()])
