"""Multi-channel input (multi-sequence MR): MSD ``_0000``/``_0001`` files, one grid, per-channel
preprocessing, ``in_channels`` from the data into the trainer and the model card, and refusals
where the channel count does not fit (``iwseg predict``, the Slicer logic).

Real files through SimpleITK, a real tiny training run and ``iwseg predict`` in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _subprocess import run_in_group

from IWSegmentationLib.core.errors import GeometryMismatchError, InputError
from IWSegmentationLib.core.files import group_channels, list_images
from IWSegmentationLib.core.imageio import Geometry, read_channels, read_image, write_image
from IWSegmentationLib.data import load_case, load_dataset
from IWSegmentationLib.data.synth import write_dataset
from IWSegmentationLib.inference import predict_volume
from IWSegmentationLib.nn.architecture import default_config
from IWSegmentationLib.nn.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from IWSegmentationLib.nn.model_card import ModelCard, card_in_channels
from IWSegmentationLib.nn.unet import build_model
from IWSegmentationLib.preprocessing.presets import get_preset
from IWSegmentationLib.preprocessing.resampling import prepare_case
from IWSegmentationLib.training import TrainConfig, train


def run_iwseg(*args) -> subprocess.CompletedProcess:
    """``python -m IWSegmentationLib ARGS`` in a real subprocess (killed whole on a timeout)."""
    return run_in_group([sys.executable, "-m", "IWSegmentationLib", *map(str, args)], timeout=300)

SHAPE = (16, 32, 32)


def _write(path: Path, array: np.ndarray, spacing=(1.5, 1.0, 1.0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, array, Geometry.identity(array.shape, spacing))
    return path


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, SHAPE).astype(np.int16)


def _label() -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[4:8, 10:14, 10:14] = 1  # 4 * 4 * 4 = 64 lesion voxels
    return label


# --------------------------------------------------------------------------- reading


def test_msd_channel_files_form_one_case_of_two_channels(tmp_path):
    """imagesTr/case_0000 + case_0001 -> one case; the array's channel c is file c."""
    for name in ("b_2", "b_10"):
        _write(tmp_path / "imagesTr" / f"{name}_0000.nii.gz", _image(0))
        _write(tmp_path / "imagesTr" / f"{name}_0001.nii.gz", _image(1))
        _write(tmp_path / "labelsTr" / f"{name}.nii.gz", _label())
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "lesion": 1},
                                                       "channel_names": {"0": "T1", "1": "FLAIR"}}))
    ds = load_dataset(tmp_path)
    assert ds.ids == ["b_2", "b_10"] and ds.channels == 2
    case = ds.cases[0]
    assert [p.name for p in case.image_files] == ["b_2_0000.nii.gz", "b_2_0001.nii.gz"]
    volume = load_case(case)
    assert volume.image.shape == (2, *SHAPE) and volume.lesion.sum() == 64
    np.testing.assert_array_equal(volume.image[0], _image(0))
    np.testing.assert_array_equal(volume.image[1], _image(1))


def test_msd_training_list_without_suffix_finds_the_channels(tmp_path):
    """dataset.json lists ./imagesTr/x.nii.gz (MSD); the files are x_0000, x_0001, x_0002."""
    for c in range(3):
        _write(tmp_path / "imagesTr" / f"x_{c:04d}.nii.gz", _image(c))
    _write(tmp_path / "labelsTr" / "x.nii.gz", _label())
    (tmp_path / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "tumour"},
        "training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]}))
    ds = load_dataset(tmp_path)
    assert ds.channels == 3 and load_case(ds.cases[0]).image.shape == (3, *SHAPE)


def test_grouping_rules(tmp_path):
    files = {n: tmp_path / f"{n}.nii.gz" for n in ("a_0000", "a_0001", "scan_0001", "scan_0002", "plain")}
    groups = group_channels(files, where=tmp_path)
    # numbered names without a _0000 are case names, not channels
    assert {k: len(v) for k, v in groups.items()} == {"a": 2, "scan_0001": 1, "scan_0002": 1, "plain": 1}
    with pytest.raises(InputError, match=r"case 'a' has channel files up to _0002 but no a_0001"):
        group_channels({n: tmp_path / f"{n}.nii.gz" for n in ("a_0000", "a_0002")}, where=tmp_path)
    with pytest.raises(InputError, match=r"holds case 'a' both as a.nii.gz"):
        group_channels({n: tmp_path / f"{n}.nii.gz" for n in ("a", "a_0000")}, where=tmp_path)


def test_cases_with_different_channel_counts_are_refused(tmp_path):
    for name, channels in (("a", 2), ("b", 1)):
        for c in range(channels):
            _write(tmp_path / "imagesTr" / f"{name}_{c:04d}.nii.gz", _image(c))
        _write(tmp_path / "labelsTr" / f"{name}.nii.gz", _label())
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "lesion"}}))
    with pytest.raises(InputError, match=r"different numbers of image channels \(1 in case b, 2 in case a\)"):
        _ = load_dataset(tmp_path).channels


def test_channels_on_different_grids_name_both_files(tmp_path):
    first = _write(tmp_path / "t1.nii.gz", _image(0), spacing=(1.5, 1.0, 1.0))
    second = _write(tmp_path / "flair.nii.gz", _image(1), spacing=(3.0, 1.0, 1.0))
    with pytest.raises(GeometryMismatchError) as info:
        read_channels([first, second])
    message = str(info.value)
    assert str(first) in message and str(second) in message and "spacing" in message
    # the same through a dataset case (the trainer's path)
    _write(tmp_path / "ds" / "imagesTr" / "c_0000.nii.gz", _image(0))
    _write(tmp_path / "ds" / "imagesTr" / "c_0001.nii.gz", _image(1)[:, :, :31])  # one voxel narrower
    _write(tmp_path / "ds" / "labelsTr" / "c.nii.gz", _label())
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "lesion"}}))
    with pytest.raises(GeometryMismatchError, match=r"c_0000.nii.gz and channel 1 .*c_0001.nii.gz.*size"):
        load_case(load_dataset(tmp_path / "ds").cases[0])


def test_synth_two_channels_keeps_channel_zero_and_replaces_a_one_channel_set(tmp_path):
    write_dataset(tmp_path, 2, 5, "mr", shape=SHAPE)
    one = read_image(tmp_path / "imagesTr" / "synth_000.nii.gz")[0]
    write_dataset(tmp_path, 2, 5, "mr", shape=SHAPE, channels=2, overwrite=True)
    names = sorted(p.name for p in (tmp_path / "imagesTr").iterdir())
    assert names == [f"synth_00{i}_000{c}.nii.gz" for i in range(2) for c in range(2)]  # old names removed
    ds = load_dataset(tmp_path)
    assert ds.channels == 2 and json.loads((tmp_path / "dataset.json").read_text())["iwseg"]["channels"] == 2
    volume = load_case(ds.cases[0])
    np.testing.assert_array_equal(volume.image[0], one)  # the same first sequence as the 1-channel set
    # the second sequence shows every lesion brighter than its surroundings: mean inside > mean
    # of the 1-voxel shell around it by several noise SDs (5 SD contrast, softened by the edge blur)
    from scipy import ndimage

    lesion = volume.lesion.astype(bool)
    shell = ndimage.binary_dilation(lesion, iterations=2) & ~ndimage.binary_dilation(lesion)
    assert volume.image[1][lesion].mean() - volume.image[1][shell].mean() > 20  # > 2 noise SDs of 10


# --------------------------------------------------------------------------- preprocessing


def test_each_channel_is_scaled_on_its_own():
    """mr preset: (x - p0.5) / (p99.5 - p0.5) per channel. Channel 1 = 10 * channel 0 + 500 has
    the same percentiles transformed alike, so both prepared channels are equal; scaled jointly
    (one pair of percentiles) channel 0 would be squashed near 0 and differ."""
    raw0 = _image(3).astype(np.float32)
    image = np.stack([raw0, 10 * raw0 + 500])
    params = get_preset("mr")
    geometry = Geometry.identity(SHAPE)
    prepared, _, _ = prepare_case(image, geometry, params)
    single, _, _ = prepare_case(raw0, geometry, params)
    assert prepared.shape == (2, *SHAPE)
    np.testing.assert_allclose(prepared[0], single, atol=1e-6)
    np.testing.assert_allclose(prepared[1], single, atol=1e-5)
    # resampling: every channel lands on the same grid
    resampled, grid, _ = prepare_case(image, geometry, get_preset("mr", target_spacing=[2.0, 2.0, 2.0]))
    assert resampled.shape == (2, *grid.shape_zyx) and grid.shape_zyx == (8, 16, 16)


# --------------------------------------------------------------------------- the model card


def _card(in_channels: int) -> dict:
    return {"patch_size": [16, 16, 16], "preprocessing": get_preset("mr"),
            "architecture": default_config("tiny", in_channels=in_channels)}


def test_card_round_trip_keeps_in_channels_and_old_cards_mean_one(tmp_path):
    model = build_model(default_config("tiny", in_channels=2))
    path = tmp_path / "two.safetensors"
    save_checkpoint(path, model, _card(2))
    card = read_metadata(path)
    assert card["architecture"]["in_channels"] == 2 and card_in_channels(card) == 2
    assert ModelCard.from_dict(card, source=path).in_channels == 2
    loaded, _ = load_checkpoint(path)
    assert loaded.config["in_channels"] == 2
    # a card written before multi-channel input has no in_channels key: one channel
    old = dict(card, architecture={k: v for k, v in card["architecture"].items() if k != "in_channels"})
    assert ModelCard.from_dict(old).in_channels == 1 and card_in_channels({"patch_size": 8}) == 1


def test_predict_volume_refuses_a_channel_count_the_card_does_not_take():
    model = build_model(default_config("tiny", in_channels=2))
    with pytest.raises(InputError, match=r"the image has 1 image channel\(s\) but the model takes 2"):
        predict_volume(model, _image(0).astype(np.float32), _card(2), device="cpu")


def test_tta_with_two_channels_is_the_mean_of_the_flipped_runs():
    """One window covers the image (patch = image, overlap 0), so mirroring the input is
    mirroring the output: TTA = mean over the 8 flips f of f(predict(f(image))), in logits (what
    mirroring averages, as nnU-Net does)."""
    torch.manual_seed(0)
    model = build_model(default_config("tiny", in_channels=2, norm="instance"))
    card = dict(_card(2), inference={"patch_size": list(SHAPE), "overlap": 0.0, "blend": "constant"})
    image = np.stack([_image(4), _image(5)]).astype(np.float32)
    options = dict(device="cpu", engine="eager", skip_background=False, channels_last=False)
    tta = predict_volume(model, image, card, tta=True, **options).logits
    flips = [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    runs = []
    for axes in flips:
        flipped = np.flip(image, tuple(a + 1 for a in axes)) if axes else image
        out = predict_volume(model, np.ascontiguousarray(flipped), card, **options).logits
        runs.append(np.flip(out, axes) if axes else out)
    np.testing.assert_allclose(tta, np.mean(runs, axis=0), atol=1e-5)
    assert not np.allclose(tta, runs[0], atol=1e-4)  # mirroring changed something


# --------------------------------------------------------------------------- train, then predict


@pytest.fixture(scope="module")
def two_channel_run(tmp_path_factory) -> tuple[Path, Path]:
    """A real tiny training run (6 steps) on `iwseg synth --channels 2` data."""
    root = tmp_path_factory.mktemp("multichannel")
    data = root / "data"
    write_dataset(data, 4, 3, "mr", shape=SHAPE, channels=2)
    config = TrainConfig.from_dict({
        "data": str(data), "out": str(root / "run"), "model_size": "tiny", "patch_size": [16, 16, 16],
        "preprocessing": "mr", "epochs": 2, "iters_per_epoch": 3, "num_workers": 0, "val_fraction": 0.25,
        "batch_size": 2, "tensorboard": False, "progress": False, "empty_cases": "warn", "seed": 1,
    })
    train(config, verbose=False)
    return data, root / "run" / "last.safetensors"


def test_trainer_takes_in_channels_from_the_data(two_channel_run, tmp_path):
    data, checkpoint = two_channel_run
    card = read_metadata(checkpoint)
    assert card["architecture"]["in_channels"] == 2 and card["training_data"]["channels"] == 2
    model, _ = load_checkpoint(checkpoint)
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv3d))
    assert first_conv.in_channels == 2
    # a config that says otherwise is refused, naming the key
    config = TrainConfig.from_dict({"data": str(data), "out": str(tmp_path / "run"), "model_size": "tiny",
                                    "patch_size": [16, 16, 16], "model": {"in_channels": 1}})
    with pytest.raises(InputError, match=r"'model.in_channels' is 1 but the dataset's images have 2 channel"):
        train(config, verbose=False)


def test_a_two_channel_run_resumes(two_channel_run, tmp_path):
    """The resume check compares architectures before the data is read: the saved in_channels
    (2, from the data) must not be taken for a config change (the default would be 1)."""
    data, _ = two_channel_run
    config = TrainConfig.from_dict({
        "data": str(data), "out": str(tmp_path / "run"), "model_size": "tiny", "patch_size": [16, 16, 16],
        "preprocessing": "mr", "epochs": 2, "iters_per_epoch": 2, "num_workers": 0, "val_every": 0,
        "batch_size": 2, "tensorboard": False, "progress": False, "empty_cases": "warn",
    })

    class Killed(Exception):
        pass

    def kill(epoch, step, loss):
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        train(config, verbose=False, on_step=kill)
    resumed = train(config, resume=True, verbose=False)
    assert [r["epoch"] for r in resumed.history] == [2]
    assert read_metadata(tmp_path / "run" / "last.safetensors")["architecture"]["in_channels"] == 2


def test_iwseg_predict_on_channel_files_in_a_subprocess(two_channel_run, tmp_path):
    data, checkpoint = two_channel_run
    files = [data / "imagesTr" / f"synth_000_{c:04d}.nii.gz" for c in range(2)]
    out, prob = tmp_path / "mask.nii.gz", tmp_path / "prob.nii.gz"
    proc = run_iwseg("predict", "--model", checkpoint, "--input", *files, "--output", out,
                     "--probabilities", prob, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    mask, geometry = read_image(out)
    _, source = read_image(files[0])
    assert mask.shape == SHAPE and geometry == source
    # the subprocess wrote what predict_volume gives in this process for the same two files
    model, card = load_checkpoint(checkpoint)
    image, grid = read_channels(files)
    expected = predict_volume(model, image, card, geometry=grid, device="cpu").probabilities
    np.testing.assert_allclose(read_image(prob)[0], expected, atol=1e-5)

    # a folder of MSD-named files: one output per case, named without the channel suffix
    folder = tmp_path / "out"
    proc = run_iwseg("predict", "--model", checkpoint, "--input", data / "imagesTr", "--output", folder,
                     "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert sorted(list_images(folder)) == ["synth_000", "synth_001", "synth_002", "synth_003"]


def test_several_inputs_must_be_existing_image_files(tmp_path):
    from IWSegmentationLib.predict.cases import split_channel_inputs

    a = _write(tmp_path / "t1.nii.gz", _image(0))
    assert split_channel_inputs([tmp_path]) == (tmp_path, ())  # one path: any input (here a folder)
    with pytest.raises(InputError, match=r"input not found: .*flair.nii.gz"):
        split_channel_inputs([a, tmp_path / "flair.nii.gz"])
    with pytest.raises(InputError, match=r"are the channels of one case and must each be an image file"):
        split_channel_inputs([a, tmp_path])
    with pytest.raises(InputError, match=r"names the same file twice"):
        split_channel_inputs([a, a])


def test_iwseg_predict_refuses_one_channel_for_a_two_channel_model(two_channel_run, tmp_path):
    data, checkpoint = two_channel_run
    proc = run_iwseg("predict", "--model", checkpoint, "--input", data / "imagesTr" / "synth_000_0000.nii.gz",
                     "--output", tmp_path / "mask.nii.gz", "--device", "cpu")
    assert proc.returncode == 2
    assert "has 1 image channel(s) but the model takes 2" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "mask.nii.gz").exists()


def test_an_ensemble_must_agree_on_in_channels(two_channel_run, tmp_path):
    _, checkpoint = two_channel_run
    one = tmp_path / "one.safetensors"
    save_checkpoint(one, build_model(default_config("tiny")), dict(read_metadata(checkpoint)))
    _write(tmp_path / "x.nii.gz", _image(0))
    proc = run_iwseg("predict", "--model", checkpoint, one, "--input", tmp_path / "x.nii.gz",
                     "--output", tmp_path / "m.nii.gz", "--device", "cpu")
    assert proc.returncode == 2 and "in_channels: 2 vs 1" in proc.stderr


# --------------------------------------------------------------------------- the Slicer logic


def test_slicer_logic_refuses_a_multi_channel_model_before_starting(two_channel_run):
    slicer = pytest.importorskip("slicer")
    from IWSegmentationLib.backend.local_run import LocalJobFactory
    from IWSegmentationLib.predict.options import PredictOptions
    from IWSegmentationLib.slicer import mrml
    from IWSegmentationLib.slicer.logic import LesionSegmentationLogic

    _, checkpoint = two_channel_run
    scene = slicer.vtkMRMLScene()
    volume = mrml.add_volume_from_array(scene, _image(0), Geometry.identity(SHAPE), "T1")
    started = []

    class Factory:  # reads the card as the default factory does; never makes a job
        model_card = staticmethod(LocalJobFactory().model_card)

        def __call__(self, *args, **kwargs):
            started.append(args)

    logic = LesionSegmentationLogic(scene, job_factory=Factory())
    card = logic.read_model_card(checkpoint)
    with pytest.raises(InputError, match=r"takes 2 image channels.*iwseg predict --model CKPT --input "
                                         r"CHANNEL0.nii.gz CHANNEL1.nii.gz"):
        logic.check_inputs(volume, card)
    with pytest.raises(InputError, match=r"takes 2 image channels"):
        logic.start(volume, PredictOptions(models=(checkpoint,)))
    assert started == []


def test_a_one_channel_model_reads_numbered_files_as_cases(tmp_path):
    """``scan_0000``, ``scan_0001`` in a folder are two cases for a one-channel model (the
    phantom's), not two channels of one case: the card's ``in_channels`` decides, as read from
    the checkpoint's header before the folder is listed."""
    from IWSegmentationLib.testing import phantom

    checkpoint = phantom.threshold_checkpoint(tmp_path / "phantom.safetensors")
    case = phantom.phantom_case()
    (tmp_path / "in").mkdir()
    for i in range(2):
        write_image(tmp_path / "in" / f"scan_{i:04d}.nii.gz", case.image, Geometry.identity(case.image.shape))
    assert group_channels(list_images(tmp_path / "in"), channels=1) == {
        f"scan_{i:04d}": (tmp_path / "in" / f"scan_{i:04d}.nii.gz",) for i in range(2)}
    assert list(group_channels(list_images(tmp_path / "in"))) == ["scan"]  # no model: nnU-Net naming
    proc = run_iwseg("predict", "--model", checkpoint, "--input", tmp_path / "in", "--output", tmp_path / "out",
                     "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert sorted(list_images(tmp_path / "out")) == ["scan_0000", "scan_0001"]
    assert np.array_equal(read_image(tmp_path / "out" / "scan_0001.nii.gz")[0], case.reference)
