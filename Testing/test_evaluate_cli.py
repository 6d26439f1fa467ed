"""``iwseg evaluate`` end to end, in a real subprocess, on files written with SimpleITK."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_metrics import hand_case_arrays  # Testing/ is on sys.path (pytest rootdir, no __init__.py)

from IWSegmentationLib.core.imageio import read_image, write_image


def write(path: Path, array: np.ndarray, spacing_xyz=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing_xyz)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path


def iwseg(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "IWSegmentationLib", "evaluate", *map(str, args)],
        capture_output=True, text=True, timeout=120,
    )


@pytest.fixture
def hand_dirs(tmp_path):
    """The three-image hand case of test_metrics (A: 2 lesions, B: 1 missed, C: empty) as NIfTI/NRRD/MHA."""
    suffix = {"A": ".nii.gz", "B": ".nrrd", "C": ".mha"}
    for name, (prob, ref) in hand_case_arrays().items():
        write(tmp_path / "pred" / f"{name}{suffix[name]}", prob)
        write(tmp_path / "ref" / f"{name}.nii.gz", ref)
    return tmp_path / "pred", tmp_path / "ref"


def test_evaluate_writes_report_csv_and_plot(hand_dirs, tmp_path, output_dir):
    pred, ref = hand_dirs
    out = tmp_path / "out"
    out.mkdir()
    proc = iwseg("--pred", pred, "--ref", ref, "--size-thresholds", "2", "4",
                 "--json", out / "report.json", "--csv", out / "lesions.csv", "--froc-png", out / "froc.png")
    assert proc.returncode == 0, proc.stderr
    # summary table on stdout: the "all" row has 3 lesions, 2 hit, CPM 0.506
    all_row = next(line for line in proc.stdout.splitlines() if line.startswith("all "))
    assert all_row.split()[1:4] == ["3", "2", "0.667"] and "0.506" in all_row
    report = json.loads((out / "report.json").read_text())
    assert list(report) == ["n_images", "n_lesions", "object_dice", "cpm", "avg_recall_0_5", "froc",
                            "bootstrap", "by_size", "cases"]
    # values worked out in test_metrics.test_froc_cpm_avg_recall_object_dice_by_hand
    assert report["n_images"] == 3 and report["n_lesions"] == 3
    assert report["cpm"] == pytest.approx((0.125 + 0.25 + 0.5 + 4 * 2 / 3) / 7)
    assert report["avg_recall_0_5"] == pytest.approx((22.11 + 434 * 2 / 3) / 501)
    assert report["object_dice"] == pytest.approx({"mean": 0.625, "std": 0.125, "n": 2})
    assert report["froc"]["recall"] == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3])
    assert set(report["bootstrap"]) == {"cpm", "avg_recall_0_5", "n"} and report["bootstrap"]["n"] == 100
    assert set(report["by_size"]) == {"small", "medium", "large"}
    assert report["by_size"]["small"]["cpm"] == pytest.approx(4.5 / 7) and report["by_size"]["large"]["cpm"] is None
    cases = {c["case"]: c for c in report["cases"]}
    assert sorted(cases) == ["A", "B", "C"]
    assert set(cases["A"]["lesions"][0]) == {"id", "volume_mm3", "diameter_mm", "size_group", "hit_dice", "confidence"}
    assert set(cases["A"]["components"][0]) == {"id", "volume_mm3", "diameter_mm", "confidence", "hit_dice"}
    assert cases["B"]["lesions"][0]["confidence"] is None and cases["C"] == {"case": "C", "lesions": [], "components": []}

    rows = list(csv.DictReader((out / "lesions.csv").open()))
    assert [(r["case"], r["lesion_id"], r["detected"]) for r in rows] == [("A", "1", "1"), ("A", "2", "1"), ("B", "1", "0")]
    assert float(rows[0]["hit_dice"]) == pytest.approx(0.75) and float(rows[0]["confidence"]) == pytest.approx(0.9)
    # A1 is voxels z 1-2, y 1-2, x 1-5 on a 1 mm grid at the origin: centroid (x, y, z) = (3, 1.5, 1.5) mm
    assert [float(rows[0][f"centroid_{a}_mm"]) for a in "xyz"] == pytest.approx([3.0, 1.5, 1.5])
    assert rows[2]["confidence"] == "" and rows[2]["matched_component"] == ""

    png = (out / "froc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    shutil.copy(out / "froc.png", output_dir / "evaluate_froc_hand_case.png")
    assert not list(out.glob(".*partial*"))  # atomic writes leave no temporaries


def test_missing_partner_is_exit_2(hand_dirs):
    pred, ref = hand_dirs
    (pred / "B.nrrd").unlink()
    proc = iwseg("--pred", pred, "--ref", ref)
    assert proc.returncode == 2
    assert "no prediction" in proc.stderr and "B" in proc.stderr and "Traceback" not in proc.stderr


def test_geometry_mismatch_is_exit_2(hand_dirs):
    pred, ref = hand_dirs
    prob, _ = hand_case_arrays()["A"]
    write(pred / "A.nii.gz", prob, spacing_xyz=(1.0, 1.0, 2.5))
    proc = iwseg("--pred", pred, "--ref", ref)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "A.nii.gz" in proc.stderr and "not on the same voxel grid" in proc.stderr and "spacing" in proc.stderr


def test_bad_probabilities_and_reference_are_exit_2(hand_dirs):
    pred, ref = hand_dirs
    prob, mask = hand_case_arrays()["B"]
    bad = prob.copy()
    bad[0, 0, 0] = np.nan
    write(pred / "B.nrrd", bad)
    proc = iwseg("--pred", pred, "--ref", ref)
    assert proc.returncode == 2 and "B.nrrd" in proc.stderr and "NaN" in proc.stderr
    write(pred / "B.nrrd", prob)
    write(ref / "B.nii.gz", (mask * 2).astype(np.uint8))
    proc = iwseg("--pred", pred, "--ref", ref)
    assert proc.returncode == 2 and "B.nii.gz" in proc.stderr and "not a binary mask" in proc.stderr


def test_bad_arguments_are_exit_2(hand_dirs, tmp_path):
    pred, ref = hand_dirs
    proc = iwseg("--pred", pred, "--ref", ref, "--json", tmp_path / "missing" / "r.json")
    assert proc.returncode == 2 and "output folder does not exist" in proc.stderr
    proc = iwseg("--pred", pred, "--ref", ref, "--size-thresholds", "10", "5")
    assert proc.returncode == 2 and "small < large" in proc.stderr
    proc = iwseg("--pred", pred, "--ref", ref, "--threshold", "1.5")
    assert proc.returncode == 2 and "--threshold" in proc.stderr


@pytest.mark.realdata
def test_clinical_masks(clinical_data, tmp_path):
    # lung1: the reference itself as prediction (a 0/1 mask -> confidence 1): 1 lesion hit with Dice 1.
    # brain1: an empty prediction: its 2 lesions are missed. No FP anywhere, so the FROC is the
    # single point (0, 1/3): recall 1/3 at every FP/image, CPM 1/3. Lung preset (10 / 20 mm):
    # lung1 nodule 13.8 mm medium, brain1 lesions 16.7 mm medium and 29.9 mm large.
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir(), ref.mkdir()
    shutil.copy(clinical_data / "lung1_label.nrrd", ref / "lung1.nrrd")
    shutil.copy(clinical_data / "lung1_label.nrrd", pred / "lung1.nrrd")
    shutil.copy(clinical_data / "brain1_label.nrrd", ref / "brain1.nrrd")
    mask, geom = read_image(clinical_data / "brain1_label.nrrd")
    write_image(pred / "brain1.nrrd", np.zeros_like(mask), geom)
    proc = iwseg("--pred", pred, "--ref", ref, "--size-preset", "lung", "--json", tmp_path / "r.json",
                 "--no-progress")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n_lesions"] == 3 and report["cpm"] == pytest.approx(1 / 3)
    assert report["object_dice"] == {"mean": 1.0, "std": 0.0, "n": 1}
    assert report["by_size"]["medium"]["cpm"] == pytest.approx(0.5) and report["by_size"]["large"]["cpm"] == 0.0
    lung = next(c for c in report["cases"] if c["case"] == "lung1")
    assert lung["lesions"][0]["hit_dice"] == 1.0 and lung["lesions"][0]["confidence"] == 1.0
