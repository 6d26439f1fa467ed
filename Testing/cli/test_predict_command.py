"""``iwseg predict`` end to end: real checkpoints, real files, real subprocesses.

The network used here is the library's tiny residual U-Net with hand-set weights that make it
a voxel-wise threshold: every path is zero except stem -> skip 0 -> decoder 0 -> head, each
carrying channel 0 through an identity tap, and the head computes ``a (x - 0.5)``. With the
``ct-lung`` preset (``x = (clip(HU, -1000, 300) + 1000) / 1300``) a voxel is a lesion exactly
when its HU > -350, so the expected mask, lesion volumes and centroids are known by hand.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from _threshold_model import ct_volume, save_threshold_checkpoint, threshold_model

from IWSegmentationLib.cli import build_parser, main
from IWSegmentationLib.core.imageio import Geometry, read_image, write_image
from IWSegmentationLib.core.progress import parse_progress_line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "threshold.safetensors"
    # a model trained without organ masks: it needs none (the organ-mask runs: Testing/predict/test_organ_masks.py)
    return save_threshold_checkpoint(path)


def oblique_geometry(shape_zyx) -> Geometry:
    """Anisotropic spacing and a direction rotated 30 degrees about z, then 20 degrees about x."""
    a, b = np.radians(30), np.radians(20)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return Geometry(size=tuple(int(s) for s in shape_zyx[::-1]), spacing=(0.7, 0.9, 2.5),
                    origin=(-30.0, 12.5, 100.0), direction=tuple((rz @ rx).ravel()))


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "IWSegmentationLib", "predict", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def events(stdout: str):
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    parsed = [parse_progress_line(ln) for ln in lines]
    assert all(e is not None for e in parsed), f"non-protocol line on stdout: {lines}"
    return parsed


# --------------------------------------------------------------------------- end to end


def test_end_to_end_oblique_anisotropic_jsonl(tmp_path, checkpoint):
    image, lesions = ct_volume()
    geometry = oblique_geometry(image.shape)
    src = tmp_path / "case.nrrd"
    write_image(src, image, geometry)
    out, prob, table = tmp_path / "mask.nrrd", tmp_path / "prob.nii.gz", tmp_path / "lesions.json"
    logit_path = tmp_path / "logits.nrrd"
    proc = run_cli("--model", checkpoint, "--input", src, "--output", out, "--probabilities", prob,
                   "--lesions", table, "--logits", logit_path, "--progress-format", "jsonl", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr

    # the protocol: every stdout line is an event, stages in order, inference counts up to its total
    evs = events(proc.stdout)
    # two warnings: this flat synthetic CT has only 3 grey values (-1000, -800, 100: looks like a
    # label map, but with negative values, so only a warning); it has a body but no lungs, so
    # windows are skipped by the body threshold (the card says the model needs no organ mask)
    warned = [e.get("message") for e in evs if e.stage == "warning"]
    assert len(warned) == 2
    assert "looks like a label map" in warned[0] and "(-1000, -800, 100)" in warned[0]
    assert "no lung field" in warned[1] and "body threshold" in warned[1]
    evs = [e for e in evs if e.stage != "warning"]
    stages = [e.stage for e in evs]
    first_inf, last_inf = stages.index("inference"), len(stages) - 1 - stages[::-1].index("inference")
    # the checkpoint, the notes that its card records no voxel spacing (so no resampling) and no
    # operating points (so the card's threshold), the image
    assert stages[:first_inf] == ["start", "load", "load", "load", "load", "preprocess"]
    assert "records no voxel spacing" in evs[2].get("message")
    assert "has no operating points" in evs[3].get("message")
    assert set(stages[first_inf:last_inf + 1]) == {"inference"}
    assert stages[last_inf + 1:] == ["postprocess", "write", "write", "write", "write", "case_done", "done"]
    inference = [e for e in evs if e.stage == "inference"]
    done = [e.get("done") for e in inference]
    assert done == sorted(done) and done[-1] == inference[-1].get("total") and inference[-1].fraction == 1.0
    case_done = evs[stages.index("case_done")]
    assert case_done.get("lesions") == 3 and case_done.get("outputs")["mask"] == str(out)
    # 2 x 3 x 3 = 18 windows of 16^3 at overlap 0.25 (starts z 0 8; y 0 12 24; x 0 12 24 32 -> 4)
    assert case_done.get("windows_total") == 2 * 3 * 4
    assert evs[0].get("device") == "cpu" and evs[0].get("cases") == 1

    # the mask: exactly the lesions, on the input's exact grid
    mask, mask_geom = read_image(out)
    assert mask.dtype == np.uint8 and np.array_equal(mask, lesions.astype(np.uint8))
    assert mask_geom.size == geometry.size
    for key in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(getattr(mask_geom, key), getattr(geometry, key), atol=1e-9)
    probs, prob_geom = read_image(prob)
    assert probs.dtype == np.float32 and not prob_geom.differences(geometry)
    assert probs[lesions].min() > 0.99 and probs[~lesions].max() < 0.01
    # the logit map: float32 on the same grid, GAIN (x - 0.5) = +-13.8 at +100 / -800 HU (skipped air:
    # -1e4), and the probability map is its sigmoid
    logits, logit_geom = read_image(logit_path)
    assert logits.dtype == np.float32 and not logit_geom.differences(geometry)
    assert logits[lesions].min() == pytest.approx(13.8, abs=0.1) and logits[~lesions].max() < -13
    np.testing.assert_allclose(probs, 1 / (1 + np.exp(-logits.astype(np.float64))), atol=1e-6)

    # the lesion table: volumes from the anisotropic spacing, centroids in LPS via SimpleITK
    report = json.loads(table.read_text())
    voxel_mm3 = 0.7 * 0.9 * 2.5
    rows = sorted(report["lesions"], key=lambda r: -r["voxels"])
    assert [r["voxels"] for r in rows] == [96, 8, 1]
    assert rows[0]["volume_mm3"] == pytest.approx(96 * voxel_mm3, rel=1e-4)
    # diameters (6V/pi)^(1/3) with V = n * 1.575 mm^3: 96 voxels -> 6.61 mm (large, >= 5),
    # 8 -> 2.89 mm (medium, >= 2.5), 1 -> 1.44 mm (small)
    assert [r["size_group"] for r in rows] == ["large", "medium", "small"]
    reference = sitk.ReadImage(str(src))
    # lesion 1 centre in voxels (z, y, x) = (6.5, 13.5, 16.5) -> ITK index (x, y, z)
    expected = reference.TransformContinuousIndexToPhysicalPoint((16.5, 13.5, 6.5))
    np.testing.assert_allclose(rows[0]["centroid_lps_mm"], expected, atol=1e-3)
    assert rows[0]["bbox_zyx"] == [5, 12, 14, 9, 16, 20]
    # a lesion's confidence is its maximum logit (not its probability, which is 1.0 - 1e-6 here)
    assert rows[0]["confidence"] == pytest.approx(float(logits[5:9, 12:16, 14:20].max()), abs=1e-6)
    assert rows[0]["confidence"] == pytest.approx(13.8, abs=0.1) and "maximum blended logit" in report["confidence"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_leaves_no_output(tmp_path, checkpoint, sig):
    image = np.full((48, 96, 96), -800, np.int16)  # all body: every one of ~1000 windows runs
    src = tmp_path / "big.nrrd"
    write_image(src, image, Geometry.identity(image.shape))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    existing = out_dir / "mask.nrrd"
    existing.write_bytes(b"previous result")
    proc = subprocess.Popen(
        [sys.executable, "-m", "IWSegmentationLib", "predict", "--model", str(checkpoint), "--input", str(src),
         "--output", str(existing), "--probabilities", str(out_dir / "prob.nrrd"), "--lesions",
         str(out_dir / "l.json"), "--overlap", "0.75", "--progress-format", "jsonl", "--device", "cpu",
         "--overwrite"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        for line in proc.stdout:
            event = parse_progress_line(line)
            if event is not None and event.stage == "inference":
                proc.send_signal(sig)
                break
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err
    last = [e for e in map(parse_progress_line, rest.splitlines()) if e is not None][-1]
    assert last.stage == "error" and last.get("exit_code") == 3
    assert sorted(p.name for p in out_dir.iterdir()) == ["mask.nrrd"]  # no partial or temporary files
    assert existing.read_bytes() == b"previous result"


# --------------------------------------------------------------------------- in-process runs


def test_folder_input_shards_and_uint8_probabilities(tmp_path, checkpoint, capsys):
    src = tmp_path / "in"
    src.mkdir()
    image, lesions = ct_volume((8, 20, 20))
    names = ["a", "b", "c"]
    for name in names:
        write_image(src / f"{name}.nii.gz", image, oblique_geometry(image.shape))
    out, prob, table, logit_dir = (tmp_path / d for d in ("masks", "probs", "tables", "logits"))
    for d in (out, prob, table):
        d.mkdir()
    common = ["predict", "--model", str(checkpoint), "--input", str(src), "--output", str(out),
              "--probabilities", str(prob), "--lesions", str(table), "--probabilities-uint8", "--device", "cpu",
              "--logits", str(logit_dir)]
    assert main([*common, "--shard", "1/2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["b.nii.gz"]
    assert main([*common, "--shard", "0/2", "--progress-format", "jsonl"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    assert sorted(p.name for p in table.iterdir()) == ["a.json", "b.json", "c.json"]
    evs = events(capsys.readouterr().out)
    assert [e.get("case") for e in evs if e.stage == "case_done"] == ["a", "c"]
    mask, _ = read_image(out / "c.nii.gz")
    assert np.array_equal(mask, lesions.astype(np.uint8))
    p8, _ = read_image(prob / "a.nii.gz")
    assert p8.dtype == np.uint8 and p8[lesions].min() >= 253 and p8[~lesions].max() <= 2  # round(255 p)
    # --logits is a folder too (created), named like the cases; logits stay float32 with --probabilities-uint8
    assert sorted(p.name for p in logit_dir.iterdir()) == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    assert read_image(logit_dir / "a.nii.gz")[0].dtype == np.float32


def test_volume_smaller_than_patch_is_padded(tmp_path, checkpoint):
    image, lesions = ct_volume((6, 20, 9))  # patch 16^3: padded on z and x, cropped back
    src = tmp_path / "small.mha"
    write_image(src, image, oblique_geometry(image.shape))
    assert main(["predict", "--model", str(checkpoint), "--input", str(src), "--output",
                 str(tmp_path / "m.mha"), "--device", "cpu", "--no-skip"]) == 0
    mask, geometry = read_image(tmp_path / "m.mha")
    assert mask.shape == image.shape and np.array_equal(mask, lesions.astype(np.uint8))
    assert not geometry.differences(oblique_geometry(image.shape))


def _write_sitk(path: Path, array: np.ndarray) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=False), str(path))
    return path


def _bad_inputs(tmp: Path, checkpoint: Path):
    """(name, argv overrides, text expected in the message) for each kind of bad input."""
    good_image = tmp / "good.nrrd"
    image, _ = ct_volume((8, 20, 20))
    write_image(good_image, image, Geometry.identity(image.shape))
    corrupt = tmp / "corrupt.safetensors"
    corrupt.write_bytes(os.urandom(300))
    truncated = tmp / "truncated.safetensors"
    truncated.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    from safetensors.torch import save_file

    bare = tmp / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in threshold_model().state_dict().items()}, str(bare))
    nan_image = np.zeros((8, 20, 20), np.float32)
    nan_image[3, 4, 5] = np.nan
    garbage = tmp / "garbage.nrrd"
    garbage.write_bytes(b"NRRD0004\nthis is not an image\n")
    cases = [
        ("missing checkpoint", {"--model": tmp / "nope.safetensors"}, "not found"),
        ("corrupt checkpoint", {"--model": corrupt}, str(corrupt)),
        ("truncated checkpoint", {"--model": truncated}, "truncated"),
        ("checkpoint without metadata", {"--model": bare}, "model card"),
        ("2D image", {"--input": _write_sitk(tmp / "flat.nrrd", np.zeros((20, 20), np.int16))}, "2D"),
        ("4D image", {"--input": _write_sitk(tmp / "t.nrrd", np.zeros((4, 6, 6, 6), np.int16))}, "4D"),
        ("NaN voxels", {"--input": _write_sitk(tmp / "nan.nrrd", nan_image)}, "NaN"),
        ("unreadable image", {"--input": garbage}, str(garbage)),
        ("missing input", {"--input": tmp / "absent.nii.gz"}, "not found"),
        ("output folder is a file", {"--output": good_image.parent / "out" / "mask.nrrd" / "x.nrrd"}, "is a file"),
        ("output is the input", {"--output": good_image}, "overwrite the input"),
        ("logits are the mask", {"--logits": good_image.parent / "out" / "mask.nrrd"}, "--output and --logits"),
        ("logits not an image name", {"--logits": good_image.parent / "out" / "l.txt"}, "--logits"),
        ("bad shard", {"--shard": "3/2"}, "--shard"),
        ("bad overlap", {"--overlap": "1.5"}, "--overlap"),
    ]
    if not torch.cuda.is_available():
        cases.append(("cuda not available", {"--device": "cuda"}, "--device auto"))
    return good_image, cases


def test_bad_input_exit_code_2_and_nothing_overwritten(tmp_path, checkpoint, capsys):
    good_image, cases = _bad_inputs(tmp_path, checkpoint)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    mask = out_dir / "mask.nrrd"
    mask.write_bytes(b"keep me")
    for name, overrides, expected in cases:
        args = {"--model": checkpoint, "--input": good_image, "--output": mask,
                "--lesions": out_dir / "l.json", "--device": "cpu"}
        args.update(overrides)
        argv = ["predict", "--overwrite"] + [str(v) for kv in args.items() for v in kv]
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, f"{name}: exit {code}, stderr {err}"
        assert expected in err, f"{name}: {err!r}"
        assert "Traceback" not in err
        assert sorted(p.name for p in out_dir.iterdir()) == ["mask.nrrd"], name
        assert mask.read_bytes() == b"keep me", name


def test_bad_input_exit_code_in_a_real_process(tmp_path, checkpoint):
    proc = run_cli("--model", checkpoint, "--input", tmp_path / "absent.nrrd", "--output", tmp_path / "m.nrrd",
                   "--progress-format", "jsonl")
    assert proc.returncode == 2
    last = events(proc.stdout)[-1]
    assert last.stage == "error" and last.get("exit_code") == 2 and "absent.nrrd" in last.get("message")
    assert "absent.nrrd" in proc.stderr and "Traceback" not in proc.stderr


def test_device_precision_and_engine_names_have_one_definition():
    """The parser, the backend wrapper, the panel and the engine use core.devices' tuples, not copies."""
    from IWSegmentationLib.cli.flags import predict
    from IWSegmentationLib.core import devices
    from IWSegmentationLib.inference import devices as inference_devices
    from IWSegmentationLib.inference import engine
    from IWSegmentationLib.predict import options
    from IWSegmentationLib.slicer import panel

    assert predict.DEVICES is devices.DEVICES is options.DEVICES is inference_devices.DEVICES
    assert predict.PRECISIONS is devices.PRECISIONS is inference_devices.PRECISIONS
    assert predict.ENGINES is devices.ENGINES is engine.ENGINES
    assert set(panel.DEVICE_CHOICES.values()) <= set(devices.DEVICES)
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["predict"]
    choices = {a.dest: tuple(a.choices) for a in sub._actions if a.choices}
    assert choices["device"] == devices.DEVICES and choices["engine"] == devices.ENGINES


def test_engines_agree_and_are_reported(tmp_path, checkpoint):
    """``--engine eager`` and the default (the frozen CPU engine for this narrow net) write the
    same probabilities, and ``case_done`` says which engine ran."""
    image, _ = ct_volume()
    src = tmp_path / "case.nrrd"
    write_image(src, image, oblique_geometry(image.shape))
    probs, engines = {}, {}
    for engine in ("auto", "eager"):
        out, prob = tmp_path / f"mask_{engine}.nrrd", tmp_path / f"prob_{engine}.nrrd"
        proc = run_cli("--model", checkpoint, "--input", src, "--output", out, "--probabilities", prob,
                       "--engine", engine, "--progress-format", "jsonl", "--device", "cpu")
        assert proc.returncode == 0, proc.stderr
        engines[engine] = next(e.get("engine") for e in events(proc.stdout) if e.stage == "case_done")
        probs[engine] = read_image(prob)[0]
    assert engines == {"auto": "frozen", "eager": "eager"}
    np.testing.assert_allclose(probs["auto"], probs["eager"], atol=1e-5)
    proc = run_cli("--model", checkpoint, "--input", src, "--output", tmp_path / "m.nrrd", "--engine", "frozen",
                   "--precision", "bf16", "--device", "cpu")
    assert proc.returncode == 2 and "engine 'frozen' runs fp32 on the CPU only" in proc.stderr
