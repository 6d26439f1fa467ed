"""PredictOptions (IWSegmentationLib.predict.options): the one place a prediction parameter is
checked, the backend's command line it becomes, and the server request it is read from."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from IWSegmentationLib.cli.commands import predict as predict_command
from IWSegmentationLib.cli.flags import predict as predict_flags
from IWSegmentationLib.core.devices import DEVICES, ENGINES, PRECISIONS
from IWSegmentationLib.core.errors import InputError
from IWSegmentationLib.core.lesions import CONNECTIVITIES, SIZE_PRESETS
from IWSegmentationLib.predict.options import PredictOptions


def test_predict_arguments_are_the_cli_contract(tmp_path, fake_checkpoint):
    options = PredictOptions(models=(fake_checkpoint,), device="cuda", overlap=0.25, threshold=0.4)
    outputs = {"mask": tmp_path / "m.nrrd", "probabilities": tmp_path / "p.nrrd", "lesions": tmp_path / "l.json"}
    assert options.to_arguments(tmp_path / "in.nrrd", outputs, tmp_path / "organ.nrrd") == [
        "predict", "--model", str(fake_checkpoint.resolve()), "--input", str(tmp_path / "in.nrrd"),
        "--output", str(tmp_path / "m.nrrd"), "--device", "cuda", "--progress-format", "jsonl",
        "--overwrite", "--probabilities", str(tmp_path / "p.nrrd"), "--lesions", str(tmp_path / "l.json"),
        "--organ-mask", str(tmp_path / "organ.nrrd"), "--overlap", "0.25", "--threshold", "0.4",
    ]
    # no overlap/threshold: the checkpoint's own are used, so the options are left out
    args = PredictOptions(models=(fake_checkpoint,)).to_arguments(tmp_path / "in.nrrd", {"mask": tmp_path / "m.nrrd"})
    assert args == ["predict", "--model", str(fake_checkpoint.resolve()), "--input", str(tmp_path / "in.nrrd"),
                    "--output", str(tmp_path / "m.nrrd"), "--device", "auto", "--progress-format", "jsonl",
                    "--overwrite"]


#: (options, the one message) for every range check; the message names the iwseg predict flag.
BAD = [
    ({"device": "tpu"}, "--device must be one of auto, cpu, cuda, mps, got 'tpu'"),
    ({"overlap": 1.5}, "--overlap must be in [0, 0.9], got 1.5"),
    ({"overlap": 0.999}, "--overlap must be in [0, 0.9], got 0.999"),  # issue 23: refused from a client too
    ({"overlap": -0.1}, "--overlap must be in [0, 0.9], got -0.1"),
    ({"threshold": 1.0}, "--threshold must be in [0, 1), got 1.0"),
    ({"threshold": -0.5}, "--threshold must be in [0, 1), got -0.5"),
    ({"batch_size": 0}, "--batch-size must be >= 1, got 0"),
    ({"precision": "--model=/etc/passwd"}, "--precision must be one of auto, fp32, fp16, bf16, got '--model=/etc/passwd'"),
    ({"engine": "jit"}, "--engine must be one of auto, eager, frozen, got 'jit'"),
    ({"connectivity": 8}, "--connectivity must be one of 6, 18, 26, got 8"),
    ({"size_thresholds": (20.0, 10.0)}, "--size-thresholds needs 0 < S < M, got 20 10"),
    ({"min_lesion_size": "ten"}, "--min-lesion-size: minimum lesion size 'ten': write a number and a unit, e.g. 10vox or 5mm3"),
    ({"operating_point": "1fp", "threshold": 0.5}, "--operating-point and --threshold cannot both be given"),
    ({"operating_point": "often"},
     "--operating-point must be a false-positive rate per scan such as 1fp, 0.5fp or 1/8fp, got 'often'"),
    ({"operating_point": "0fp"}, "--operating-point must be a positive false-positive rate per scan, got '0fp'"),
]


@pytest.mark.parametrize(("change", "message"), BAD)
def test_each_range_check_gives_one_message_naming_the_flag(change, message):
    with pytest.raises(InputError) as caught:
        PredictOptions(**change)
    assert str(caught.value) == message


def test_threshold_zero_is_allowed_as_probability_to_logit_allows_it():
    """One range, [0, 1), here and in core.confidence.probability_to_logit (0: every covered voxel)."""
    from IWSegmentationLib.core.confidence import SKIPPED_LOGIT, probability_to_logit

    assert PredictOptions(threshold=0.0).threshold == 0.0
    assert probability_to_logit(0.0) == SKIPPED_LOGIT
    for bad in (1.0, -0.1):
        with pytest.raises(InputError, match=r"must be in \[0, 1\)"):
            probability_to_logit(bad)


def test_a_request_with_an_unknown_key_or_a_server_choice_is_refused():
    with pytest.raises(InputError, match="unknown option.s. colour"):
        PredictOptions.from_request({"colour": "red"})
    with pytest.raises(InputError, match="--device: the server chooses this"):
        PredictOptions.from_request({"device": "cuda"})
    options = PredictOptions.from_request({"overlap": 0.5, "tta": True, "batch_size": None}, device="cpu")
    assert (options.overlap, options.tta, options.batch_size, options.device) == (0.5, True, None, "cpu")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    predict_flags.register(parser.add_subparsers())
    return parser


_sizes = st.one_of(
    st.just({}),
    st.sampled_from(sorted(SIZE_PRESETS)).map(lambda preset: {"size_preset": preset}),
    st.tuples(st.floats(0.5, 10.0), st.floats(10.5, 50.0)).map(lambda sm: {"size_thresholds": sm}),
)
# a probability threshold or an operating point of the card (never both)
_thresholds = st.one_of(
    (st.none() | st.floats(0.0, 1.0, exclude_max=True)).map(lambda t: {"threshold": t}),
    st.sampled_from(["1fp", "1/8fp", "0.5fp", "8fp"]).map(lambda o: {"operating_point": o}),
)
options_strategy = st.tuples(st.fixed_dictionaries(dict(
    models=st.lists(st.sampled_from(["a.safetensors", "b.safetensors", "c.safetensors"]), min_size=1, max_size=3,
                    unique=True).map(lambda names: tuple(Path("/ckpt") / n for n in names)),
    device=st.sampled_from(DEVICES), precision=st.sampled_from(PRECISIONS), engine=st.sampled_from(ENGINES),
    overlap=st.none() | st.floats(0.0, 0.9),
    batch_size=st.none() | st.integers(1, 64), tta=st.booleans(), no_skip=st.booleans(), force=st.booleans(),
    threads=st.none() | st.just(1), probabilities=st.booleans(), probabilities_uint8=st.booleans(),
    logits=st.booleans(), lesions=st.booleans(), connectivity=st.sampled_from(CONNECTIVITIES),
    min_lesion_size=st.none() | st.sampled_from(["10vox", "5mm3", "none", "3"]),
)), _sizes, _thresholds).map(lambda parts: PredictOptions(**parts[0], **parts[1], **parts[2]))


@settings(max_examples=150, deadline=None)
@given(options_strategy)
def test_options_to_arguments_to_argparse_to_options_round_trips(options):
    outputs = {"mask": Path("/out/m.nrrd")}
    for name in ("probabilities", "logits", "lesions"):
        if getattr(options, name):
            outputs[name] = Path(f"/out/{name}.nrrd")
    argv = options.to_arguments(Path("/in/x.nrrd"), outputs)
    args = _parser().parse_args(argv)
    assert predict_command.options_from_arguments(args) == options
    assert predict_command.targets_from_arguments(args).mask == outputs["mask"]


@settings(max_examples=60, deadline=None)
@given(options_strategy)
def test_a_request_round_trips(options):
    """What a client sends (to_request) is read back by the server as the same options."""
    back = PredictOptions.from_request(options.to_request(), models=options.models, device=options.device,
                                       threads=options.threads)
    assert back == options


def test_a_switch_must_be_a_bool_whoever_sends_it():
    """A server's undeclared query parameter arrives as the string "false", which Python reads as
    true: PredictOptions refuses any switch that is not a bool, naming its flag."""
    with pytest.raises(InputError, match=r"--no-doubt is a switch \(true or false\), got 'false'"):
        PredictOptions(models=("m.safetensors",), no_doubt="false")
    with pytest.raises(InputError, match="--tta is a switch"):
        PredictOptions.from_request({"tta": 1}, models=("m.safetensors",))
    assert PredictOptions(models=("m.safetensors",), tta=True).tta is True
