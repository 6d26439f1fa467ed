"""Reliability of reading and writing (issues 14, 16 and 11): nothing good is destroyed, nothing
broken is read as if it were whole, and every command follows one exit-code contract.

Real files through SimpleITK, real subprocesses of ``python -m IWSegmentationLib``. A full disk is
simulated with ``RLIMIT_FSIZE`` in the child (writes past the limit fail with EFBIG, as they fail
with ENOSPC on a full disk; SimpleITK's NIfTI writer does not notice either) and, when the tests
run as root, with a real 1 MiB tmpfs.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import locale
import os
import resource
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from _subprocess import run_in_group

from IWSegmentationLib.cli.main import main
from IWSegmentationLib.core import imageio, outputs
from IWSegmentationLib.core.errors import CheckpointError, InputError
from IWSegmentationLib.core.imageio import Geometry, read_image, write_image
from IWSegmentationLib.core.prediction_maps import (
    PROBABILITY_UINT8_NOTE,
    prediction_probabilities,
    probabilities_to_uint8,
)
from IWSegmentationLib.nn.checkpoint import MAX_HEADER_BYTES, load_checkpoint, read_header, save_checkpoint
from IWSegmentationLib.preprocessing.presets import get_preset
from IWSegmentationLib.testing.phantom import phantom_case, threshold_checkpoint, threshold_model

ROOT = Path(__file__).resolve().parents[2]


def iwseg(*args, limit_bytes: int | None = None, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    """``python -m IWSegmentationLib ARGS`` in its own process group; ``limit_bytes`` caps the size
    of any file it writes (SIGXFSZ ignored, so a write past it fails like one on a full disk)."""
    def cap():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("IWSEG_DEBUG", None)
    return run_in_group([sys.executable, "-m", "IWSegmentationLib", *map(str, args)], timeout=timeout, env=env,
                        preexec_fn=cap if limit_bytes else None, **kwargs)


def one_line_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert proc.returncode == code, f"exit {proc.returncode}, stderr: {proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ": error: " in ln]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return threshold_checkpoint(tmp_path_factory.mktemp("model") / "threshold.safetensors", patch_size=(16, 16, 16))


@pytest.fixture
def phantom(tmp_path) -> Path:
    case = phantom_case((16, 24, 24), lesions=[(8, 12, 12, 4.0, 100.0)])
    path = tmp_path / "case.nii.gz"
    write_image(path, case.image, Geometry.identity(case.image.shape))
    return path


def predict_args(model: Path, image: Path, out: Path, *extra) -> list:
    return [str(a) for a in ("predict", "--model", model, "--input", image, "--output", out, "--device", "cpu", *extra)]


# --------------------------------------------------------------------------- full disk (14.1, 14.7)


def test_nifti_short_write_keeps_the_previous_file(tmp_path):
    # SimpleITK's NIfTI writer prints "NWAD: wrote only ... bytes" and returns normally: without the
    # read-back the empty/short temp file was renamed over the good one.
    good = tmp_path / "mask.nii.gz"
    write_image(good, np.zeros((8, 8, 8), np.uint8), Geometry.identity((8, 8, 8)))
    before = good.read_bytes()
    script = (
        "import numpy as np, resource, signal\n"
        "from IWSegmentationLib.core.imageio import Geometry, write_image\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))\n"
        "a = np.random.default_rng(0).normal(size=(40, 50, 60)).astype(np.float32)\n"
        f"write_image({str(good)!r}, a, Geometry.identity(a.shape))\n"
    )
    proc = run_in_group([sys.executable, "-c", script], timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1 and "OutputError: cannot write" in proc.stderr, proc.stderr
    assert good.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"]  # no .partial left


def test_predict_on_a_full_disk_exits_4_and_keeps_the_old_mask(tmp_path, model, phantom):
    mask = tmp_path / "mask.nii.gz"
    mask.write_bytes(b"previous result")
    overwrite = ["--overwrite"] if "--overwrite" in _predict_flags() else []  # predict may refuse to overwrite
    proc = iwseg(*predict_args(model, phantom, mask, "--probabilities", tmp_path / "p.nii.gz", *overwrite),
                 limit_bytes=100)
    one_line_error(proc, 4, "cannot write")
    assert mask.read_bytes() == b"previous result"
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def _predict_flags() -> set[str]:
    import argparse

    from IWSegmentationLib.cli.flags import predict

    parser = predict.register(argparse.ArgumentParser().add_subparsers())
    return {flag for action in parser._actions for flag in action.option_strings}


def test_synth_on_a_full_disk_exits_4_and_leaves_no_empty_case(tmp_path):
    out = tmp_path / "data"
    proc = iwseg("synth", "--out", out, "--cases", "2", "--size", "16", "32", "32", "--quiet", limit_bytes=4000)
    one_line_error(proc, 4, "cannot write")
    written = [p for p in out.rglob("*") if p.is_file()]
    assert all(p.stat().st_size > 0 for p in written), written
    assert not [p for p in written if ".partial-" in p.name]
    for p in written:  # every case that is there is whole
        if p.name.endswith(".nii.gz"):
            read_image(p)


def test_checkpoint_on_a_full_disk_is_an_output_error(tmp_path):
    path = tmp_path / "m.safetensors"
    script = (
        "import resource, signal\n"
        "from IWSegmentationLib.testing.phantom import threshold_checkpoint\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (5000, 5000))\n"
        f"threshold_checkpoint({str(path)!r})\n"
    )
    proc = run_in_group([sys.executable, "-c", script], timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    # safetensors raises SafetensorError (not an OSError); it must arrive as OutputError, exit code 4
    assert "OutputError: cannot write checkpoint" in proc.stderr, proc.stderr
    assert not path.exists() and not list(tmp_path.iterdir())


@contextlib.contextmanager
def tiny_tmpfs(folder: Path, size: str = "1m", options: str = ""):
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (the RLIMIT_FSIZE tests cover the same path)")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_real_full_tmpfs_predict_exits_4(tmp_path, model, phantom):
    with tiny_tmpfs(tmp_path / "small") as small:
        with contextlib.suppress(OSError), open(small / "filler", "wb") as fh:  # fill it to the last byte
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
        mask = small / "mask.nii.gz"
        proc = iwseg(*predict_args(model, phantom, mask, "--probabilities", small / "p.nii.gz"))
        one_line_error(proc, 4, "cannot write")
        assert sorted(p.name for p in small.iterdir()) == ["filler"]


def test_read_only_output_folder_is_refused_before_inference(tmp_path, model, phantom):
    with tiny_tmpfs(tmp_path / "ro", options=",ro") as ro:
        proc = iwseg(*predict_args(model, phantom, ro / "mask.nii.gz"), "--progress-format", "jsonl")
    one_line_error(proc, 4, "cannot write in", "Read-only file system")
    stages = [json.loads(line)["stage"] for line in proc.stdout.splitlines()]
    assert "inference" not in stages and stages[-1] == "error", stages  # no work before the refusal


# --------------------------------------------------------------------------- permissions (11.2)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_outputs_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        image = write_image(tmp_path / "m.nrrd", np.zeros((4, 4, 4), np.uint8), Geometry.identity((4, 4, 4)))
        with outputs.atomic_output(tmp_path / "r.json") as tmp:
            tmp.write_text("{}\n")
    finally:
        os.umask(old)
    # mkstemp creates 0600 whatever the umask; 0666 & ~umask is what open() would give
    assert oct(image.stat().st_mode & 0o777) == oct(mode)
    assert oct((tmp_path / "r.json").stat().st_mode & 0o777) == oct(mode)


def test_replacing_a_file_keeps_its_mode(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("old\n")
    path.chmod(0o640)
    with outputs.atomic_output(path) as tmp:
        tmp.write_text("new\n")
    assert path.read_text() == "new\n" and path.stat().st_mode & 0o777 == 0o640


def test_synth_and_predict_outputs_are_0644_under_umask_022(tmp_path, model, phantom):
    out = tmp_path / "data"
    cmd = (f"umask 022 && {sys.executable} -m IWSegmentationLib synth --out {out} --cases 1 --size 16 16 16 --quiet && "
           f"{sys.executable} -m IWSegmentationLib predict --model {model} --input {phantom} "
           f"--output {tmp_path / 'mask.nii.gz'} --lesions {tmp_path / 'l.json'} --device cpu")
    done = run_in_group(["sh", "-c", cmd], timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    files = [p for p in out.rglob("*") if p.is_file()] + [tmp_path / "mask.nii.gz", tmp_path / "l.json"]
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}, files


# --------------------------------------------------------------------------- outputs that are inputs (14.2)


def test_predict_refuses_to_overwrite_the_organ_mask_or_the_model(tmp_path, model, phantom):
    organ = tmp_path / "organ.nii.gz"
    write_image(organ, np.ones((16, 24, 24), np.uint8), Geometry.identity((16, 24, 24)))
    organ_before, model_before = organ.read_bytes(), model.read_bytes()
    code = main(predict_args(model, phantom, organ, "--organ-mask", organ))
    assert code == 2
    code = main(predict_args(model, phantom, tmp_path / "m.nii.gz", "--lesions", model))
    assert code == 2
    assert organ.read_bytes() == organ_before and model.read_bytes() == model_before


def test_predict_messages_name_both_flags(tmp_path, model, phantom, capsys):
    main(predict_args(model, phantom, tmp_path / "m.nii.gz", "--lesions", model))
    err = capsys.readouterr().err
    assert "--lesions" in err and "--model" in err and "overwrite the input" in err


@pytest.fixture
def eval_folders(tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    mask = np.zeros((8, 16, 16), np.uint8)
    mask[2:5, 4:8, 4:8] = 1
    g = Geometry.identity(mask.shape)
    write_image(ref / "a.nii.gz", mask, g)
    write_image(pred / "a.nii.gz", (mask * 0.9).astype(np.float32), g)
    return pred, ref


def test_evaluate_refuses_one_path_for_two_reports(tmp_path, eval_folders, capsys):
    pred, ref = eval_folders
    out = tmp_path / "report.out"
    code = main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--no-progress", "--json", str(out),
                 "--csv", str(out)])
    assert code == 2 and "--json and --csv are the same file" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("which", ["ref", "pred"])
def test_evaluate_refuses_to_overwrite_an_input_file(eval_folders, capsys, which):
    pred, ref = eval_folders
    target = (ref if which == "ref" else pred) / "a.nii.gz"
    before = target.read_bytes()
    code = main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--no-progress", "--csv", str(target)])
    assert code == 2 and f"--{which}" in capsys.readouterr().err
    assert target.read_bytes() == before


# --------------------------------------------------------------------------- broken inputs (14.3, 14.8, 16.1)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_nan_and_inf_in_nifti_are_refused(tmp_path, suffix):
    a = np.zeros((4, 5, 6), np.float32)
    a[1, 2, 3], a[0, 0, 0] = np.nan, np.inf
    path = tmp_path / f"nan{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(a), str(path))
    # ITK reads both as 0; NRRD and MHA keep them (and are refused downstream)
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).all()
    with pytest.raises(InputError, match=r"holds 2 NaN or infinite"):
        read_image(path)


def test_finite_float_nifti_is_read_unchanged(tmp_path):
    a = np.random.default_rng(1).normal(size=(7, 9, 11)).astype(np.float32)
    path = write_image(tmp_path / "f.nii.gz", a, Geometry.identity(a.shape))
    assert np.array_equal(read_image(path)[0], a)


@pytest.mark.parametrize(("suffix", "dtype"), [(".nii.gz", np.float32), (".nii.gz", np.int16), (".nii", np.int16)])
def test_truncated_nifti_is_refused(tmp_path, suffix, dtype):
    a = (np.random.default_rng(0).normal(size=(20, 30, 40)) * 100).astype(dtype)
    whole = write_image(tmp_path / f"whole{suffix}", a, Geometry.identity(a.shape))
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(cut))).shape == a.shape  # ITK: no error, zeros
    with pytest.raises(InputError, match="truncated"):
        read_image(cut)


def test_predict_on_a_truncated_nifti_exits_2(tmp_path, model, phantom, capsys):
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(phantom.read_bytes()[: phantom.stat().st_size // 2])
    code = main(predict_args(model, cut, tmp_path / "m.nii.gz"))
    assert code == 2 and not (tmp_path / "m.nii.gz").exists()
    assert f"image {cut} is truncated" in capsys.readouterr().err


def test_gzip_nifti_with_several_members_is_not_called_truncated(tmp_path):
    # the size trailer of a multi-member gzip is the last member's: the full pass decides
    a = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    whole = write_image(tmp_path / "w.nii", a, Geometry.identity(a.shape), compress=False)
    raw = whole.read_bytes()
    two = tmp_path / "two.nii.gz"
    two.write_bytes(gzip.compress(raw[:200]) + gzip.compress(raw[200:]))
    assert np.array_equal(read_image(two)[0], a)


def test_fifo_input_is_refused_not_waited_on(tmp_path, model):
    fifo = tmp_path / "pipe.nii.gz"
    os.mkfifo(fifo)
    proc = iwseg(*predict_args(model, fifo, tmp_path / "m.nii.gz"), timeout=60)
    one_line_error(proc, 2, "not a regular file", str(fifo))
    ck = tmp_path / "pipe.safetensors"
    os.mkfifo(ck)
    one_line_error(iwseg("inspect", ck, timeout=60), 2, "not a regular file")


def write_dicom_series(folder: Path, volume: np.ndarray, spacing_xyz=(0.8, 0.8, 2.5), skip=()) -> Path:
    """One CT slice per file with the tags GDCM sorts by (positions along z).

    GDCM's writer sets the process locale to "C" and leaves it so (subprocess output of later
    tests would then decode as ASCII): the locale is restored afterwards."""
    saved = locale.setlocale(locale.LC_ALL, None)
    try:
        return _write_dicom_series(folder, volume, spacing_xyz, skip)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_series(folder: Path, volume: np.ndarray, spacing_xyz, skip) -> Path:
    folder.mkdir()
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(spacing_xyz)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.1.42"
    for k in range(volume.shape[0]):
        if k in skip:
            continue
        sl = image[:, :, k]
        position = "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k))))
        for tag, value in (("0008|0060", "CT"), ("0020|000d", uid + ".1"), ("0020|000e", uid + ".2"),
                           ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0020|0013", str(k + 1)),
                           ("0020|0032", position), ("0008|0018", f"{uid}.3.{k}")):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(sl)
    return folder


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path):
    vol = (np.arange(6 * 10 * 12).reshape(6, 10, 12) % 300).astype(np.int16)
    full = write_dicom_series(tmp_path / "full", vol)
    array, geometry = read_image(full)
    assert array.shape == (6, 10, 12) and geometry.spacing == pytest.approx((0.8, 0.8, 2.5))
    gap = write_dicom_series(tmp_path / "gap", vol, skip=(3,))
    # slices at z = 0, 2.5, 5, [7.5 missing], 10, 12.5: step 5 mm between the 3rd and 4th file read
    with pytest.raises(InputError, match=r"slices 3 and 4 \(of 5\) are 5 mm apart, the usual step is 2.5 mm "
                                         r"\(about 1 slice\(s\) missing\)"):
        read_image(gap)


def test_slice_positions_check_by_hand():
    identity = (1, 0, 0, 0, 1, 0, 0, 0, 1)
    imageio.check_slice_positions([[0, 0, z] for z in (0, 2, 4, 6)], identity, "s")  # even: fine
    with pytest.raises(InputError, match="duplicated or missing"):
        imageio.check_slice_positions([[0, 0, z] for z in (0, 2, 2, 4, 6)], identity, "s")
    with pytest.raises(InputError, match="about 2 slice"):  # 0 2 [4 6] 8 10: a 6 mm step, 2 missing
        imageio.check_slice_positions([[0, 0, z] for z in (0, 2, 8, 10)], identity, "s")


# --------------------------------------------------------------------------- non-finite weights (14.4)


def test_nan_weights_are_refused_at_load(tmp_path):
    import torch

    net = threshold_model()
    with torch.no_grad():
        net.head[1][2].bias.fill_(float("nan"))
    path = tmp_path / "nan.safetensors"
    save_checkpoint(path, net, {"patch_size": [16, 16, 16], "preprocessing": get_preset("mr")})
    with pytest.raises(CheckpointError, match=r"NaN or infinite weights in 1 tensor\(s\) \(head\.1\.2\.bias\)"):
        load_checkpoint(path)


def test_nan_logits_are_refused_not_written_as_no_lesions(tmp_path):
    from IWSegmentationLib.core.confidence import SKIPPED_LOGIT
    from IWSegmentationLib.predict.cases import PredictJob as Case
    from IWSegmentationLib.predict.outputs import check_finite

    logits = np.full((4, 4, 4), SKIPPED_LOGIT, np.float32)  # skipped voxels are finite: accepted
    check_finite(logits, Case("a", tmp_path / "a.nii.gz", tmp_path / "m.nii.gz"), Path("m.safetensors"))
    logits[1, 1, 1] = np.nan
    logits[2, 2, 2] = np.inf  # an fp16 overflow: a probability of 1.0 would hide it
    with pytest.raises(InputError, match=r"NaN or infinite logits for 2 voxel\(s\)"):
        check_finite(logits, Case("a", tmp_path / "a.nii.gz", tmp_path / "m.nii.gz"), Path("m.safetensors"))


# --------------------------------------------------------------------------- detached formats (16.2)


@pytest.mark.parametrize(("name", "single"), [("m.mhd", ".mha"), ("m.nhdr", ".nrrd")])
def test_detached_header_outputs_are_refused(tmp_path, name, single):
    with pytest.raises(InputError, match=f"write \\{single} instead"):
        write_image(tmp_path / name, np.zeros((4, 4, 4), np.uint8), Geometry.identity((4, 4, 4)))
    assert list(tmp_path.iterdir()) == []


def test_predict_refuses_mhd_output_before_inference_and_maps_mhd_inputs_to_mha(tmp_path, model, capsys):
    case = phantom_case((16, 24, 24), lesions=[(8, 12, 12, 4.0, 100.0)])
    cases = tmp_path / "cases"
    cases.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(case.image), str(cases / "c1.mhd"))  # reading .mhd is fine
    assert main(predict_args(model, cases / "c1.mhd", tmp_path / "m.mhd")) == 2
    assert "write .mha instead" in capsys.readouterr().err
    out = tmp_path / "out"
    out.mkdir()
    assert main(predict_args(model, cases, out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["c1.mha"]
    assert np.array_equal(read_image(out / "c1.mha")[0], case.reference)


# --------------------------------------------------------------------------- messages (14 "Also", 16.4a)


def test_itk_read_error_keeps_the_reason_not_the_source_location(tmp_path):
    junk = tmp_path / "junk.nrrd"
    junk.write_text("NRRD0004\nnot really\n")
    with pytest.raises(InputError) as info:
        read_image(junk)
    message = str(info.value)
    assert ".cxx" not in message and "Exception thrown in" not in message
    assert str(junk) in message and len(message.splitlines()) == 1 and len(message) > len(f"cannot read image {junk}: ")


def test_geometry_messages_print_plain_numbers():
    a = Geometry((4, 4, 4), (1.0, 1.0, 2.5), (0.0, 0.0, 0.0))
    b = Geometry((4, 4, 4), (1.0, 1.0, 3.0), (0.0, 0.0, 0.0))
    assert a.differences(b) == ["spacing (1, 1, 2.5) vs (1, 1, 3)"]


def test_a_huge_checkpoint_header_is_called_too_large_not_truncated(tmp_path):
    path = tmp_path / "huge.safetensors"
    n = 120_000_000
    assert n > MAX_HEADER_BYTES
    with open(path, "wb") as fh:  # a sparse file: the header length says 120 MB, and the file is that long
        fh.write(struct.pack("<Q", n) + b"{")
        fh.truncate(8 + n + 16)
    with pytest.raises(CheckpointError, match=r"header is too large \(120000000 bytes; at most 100000000"):
        read_header(path)


def test_evaluate_accepts_predicts_uint8_probabilities(tmp_path, model, phantom):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    assert main(predict_args(model, phantom, tmp_path / "m.nii.gz", "--probabilities", pred / "case.nii.gz",
                             "--probabilities-uint8")) == 0
    stored, _ = read_image(pred / "case.nii.gz")
    assert stored.dtype == np.uint8 and stored.max() > 1
    write_image(ref / "case.nii.gz", read_image(tmp_path / "m.nii.gz")[0], Geometry.from_sitk(sitk.ReadImage(str(phantom))))
    report = tmp_path / "r.json"
    assert main(["evaluate", "--pred", str(pred), "--ref", str(ref), "--no-progress", "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["n_lesions"] == 1 and data["froc"]["recall"][-1] == 1.0


def test_probabilities_uint8_round_trip():
    p = np.array([0.0, 0.002, 0.5, 0.8, 1.0], np.float32)
    stored = probabilities_to_uint8(p)
    assert stored.tolist() == [0, 1, 128, 204, 255]  # rint(255 p): 0.51 -> 1, 127.5 -> 128, 204.0, 255
    assert np.allclose(prediction_probabilities(stored, PROBABILITY_UINT8_NOTE, "p.nii.gz"), p, atol=0.5 / 255)
    binary = np.array([0, 1, 1], np.uint8)
    assert prediction_probabilities(binary, "", "m.nii.gz") is binary  # a 0/1 mask stays a mask


# --------------------------------------------------------------------------- limits (14.10)


def test_threads_beyond_the_cpus_is_a_clear_error(tmp_path, model, phantom):
    proc = iwseg(*predict_args(model, phantom, tmp_path / "m.nii.gz", "--threads", "100000"))
    one_line_error(proc, 2, "--threads must be between 1 and", "100000")


def test_synth_size_beyond_memory_is_a_clear_error(tmp_path):
    proc = iwseg("synth", "--out", tmp_path / "d", "--size", "100000", "100000", "100000")
    one_line_error(proc, 2, "size 100000 x 100000 x 100000 needs about", "GiB")
    from IWSegmentationLib.data.synth import check_memory

    # by hand: 64*128*128 voxels * 40 bytes = 41,943,040 bytes = 0.039 GiB
    check_memory((64, 128, 128), available=41_943_040)
    with pytest.raises(InputError, match="0.0391 GiB"):
        check_memory((64, 128, 128), available=41_943_039)


# --------------------------------------------------------------------------- pipes and signals (16.4b, 14)


def test_inspect_into_a_closed_pipe_ends_quietly(model):
    proc = subprocess.Popen([sys.executable, "-m", "IWSegmentationLib", "inspect", str(model)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    proc.stdout.close()  # the reader is gone before the first byte (what `| head -0` does)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141, err
    assert b"Traceback" not in err and b"BrokenPipe" not in err and b"Exception ignored" not in err, err


def test_predict_jsonl_into_a_closed_pipe_ends_quietly(tmp_path, model, phantom):
    cmd = [sys.executable, "-m", "IWSegmentationLib", *map(str, predict_args(model, phantom, tmp_path / "m.nii.gz")),
           "--progress-format", "jsonl"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err
    assert [p.name for p in tmp_path.iterdir()] == [phantom.name]  # no mask, no partial file


def test_sigterm_cancels_synth_with_exit_3_and_no_partial_files(tmp_path):
    out = tmp_path / "d"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "IWSegmentationLib", "synth", "--out", str(out), "--cases", "50",
                             "--size", "32", "64", "64"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        # synth writes into a staging folder next to ``out`` (``.d.partial-*``) and moves it in when complete
        while time.monotonic() < deadline and not list(tmp_path.glob(".d.partial-*/imagesTr/*.nii.gz")):
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err
    assert "cancelled" in err and "Traceback" not in err
    assert not [p for p in tmp_path.rglob("*") if ".partial-" in p.name]  # neither the staging folder nor a file
    assert not out.exists() or not any(out.iterdir())  # no partial dataset


# --------------------------------------------------------------------------- a result set under a lock (16.6)


def test_folder_lock_serialises_writers(tmp_path):
    order = []
    held = threading.Event()

    def first():
        with outputs.folder_lock(tmp_path):
            held.set()
            time.sleep(0.3)
            order.append("first released")

    t = threading.Thread(target=first)
    t.start()
    held.wait(5)
    with outputs.folder_lock(tmp_path):
        order.append("second acquired")
    t.join()
    assert order == ["first released", "second acquired"]
    assert list(tmp_path.iterdir()) == []  # the lock creates no file


def test_predict_commits_its_result_set_under_the_folder_lock(tmp_path, model, phantom):
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "IWSegmentationLib",
           *map(str, predict_args(model, phantom, out / "m.nii.gz", "--probabilities", out / "p.nii.gz",
                                  "--lesions", out / "l.json")), "--progress-format", "jsonl"]
    with outputs.folder_lock(out):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
        writes = 0
        for line in proc.stdout:
            writes += '"stage": "write"' in line
            if writes == 3:
                break
        time.sleep(1.0)  # it has written its three temporary files and now waits for the lock
        assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == []
    proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert sorted(p.name for p in out.iterdir()) == ["l.json", "m.nii.gz", "p.nii.gz"]


# --------------------------------------------------------------------------- one contract for every command


@pytest.mark.parametrize(("argv", "needle"), [
    (["inspect", "missing.safetensors"], "not found"),
    (["predict", "--model", "missing.safetensors", "--input", "x.nii.gz", "--output", "m.nii.gz"], "not found"),
    (["evaluate", "--pred", "nope", "--ref", "nope"], "not a folder"),
    (["synth", "--out", "d", "--cases", "0"], "--cases"),
    (["train", "--config", "missing.yaml"], "missing.yaml"),
])
def test_every_command_reports_bad_input_as_one_line_and_exit_2(tmp_path, argv, needle):
    one_line_error(iwseg(*argv, cwd=tmp_path), 2, needle)


def test_every_writing_command_reports_a_full_disk_as_exit_4(tmp_path, eval_folders):
    pred, ref = eval_folders
    proc = iwseg("evaluate", "--pred", pred, "--ref", ref, "--no-progress", "--json", tmp_path / "r.json",
                 limit_bytes=200)
    one_line_error(proc, 4, "cannot write", str(tmp_path / "r.json"))
    assert not (tmp_path / "r.json").exists()


def test_the_documented_contract_matches_the_code():
    import importlib

    cli = importlib.import_module("IWSegmentationLib.cli.main")  # the module (the package's `main` is the function)
    from IWSegmentationLib.core import errors

    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    for code in (errors.EXIT_OK, errors.EXIT_FAILURE, errors.EXIT_BAD_INPUT, errors.EXIT_CANCELLED,
                 errors.EXIT_OUTPUT, errors.EXIT_BROKEN_PIPE):
        assert f"| {code} |" in text, code
        assert f"* {code} " in cli.__doc__, code
