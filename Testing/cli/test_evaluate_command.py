"""``iwseg evaluate`` end to end, in a real subprocess, on files written with SimpleITK."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from _hand_cases import hand_case_arrays
from _threshold_model import ct_volume, threshold_model

from IWSegmentationLib.core.confidence import SKIPPED_LOGIT
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
    """The three-image hand case of Testing/_hand_cases.py (A: 2 lesions, B: 1 missed, C: empty) as NIfTI/NRRD/MHA."""
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
    assert list(report) == ["n_images", "n_lesions", "recall", "object_dice", "cpm", "avg_recall_0_5", "froc",
                            "bootstrap", "hit_rule", "score", "by_size", "cases", "hit_rule_comparison", "warnings"]  # #22 added the last two
    assert report["recall"] == pytest.approx(2 / 3) and report["hit_rule"] == "paper"
    assert report["score"] == "probability"  # --pred: ranked by maximum probability
    # values worked out in evaluation/test_metrics.py: test_froc_cpm_avg_recall_object_dice_by_hand
    assert report["n_images"] == 3 and report["n_lesions"] == 3
    assert report["cpm"] == pytest.approx((0.125 + 0.25 + 0.5 + 4 * 2 / 3) / 7)
    assert report["avg_recall_0_5"] == pytest.approx((22.11 + 434 * 2 / 3) / 501)
    assert report["object_dice"] == pytest.approx({"mean": 0.625, "std": 0.125, "n": 2})
    assert report["froc"]["recall"] == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3])
    assert set(report["bootstrap"]) == {"cpm", "avg_recall_0_5", "n", "mode", "seed"} and report["bootstrap"]["n"] == 100
    assert set(report["by_size"]) == {"small", "medium", "large"}
    assert report["by_size"]["small"]["cpm"] == pytest.approx(4.5 / 7) and report["by_size"]["large"]["cpm"] is None
    cases = {c["case"]: c for c in report["cases"]}
    assert sorted(cases) == ["A", "B", "C"]
    assert set(cases["A"]["lesions"][0]) == {"id", "volume_mm3", "diameter_mm", "size_group", "hit_dice", "confidence"}
    assert set(cases["A"]["components"][0]) == {"id", "volume_mm3", "diameter_mm", "confidence", "hit_dice"}
    assert cases["B"]["lesions"][0]["confidence"] is None and cases["C"] == {"case": "C", "lesions": [], "components": []}

    rows = list(csv.DictReader((out / "lesions.csv").open()))
    # lesions, then the false positives of each image (A: c4 at 0.7; B: 0.95 and 0.55), C an image row
    assert [(r["case"], r["kind"], r["lesion_id"], r["detected"], r["confidence"]) for r in rows] == [
        ("A", "lesion", "1", "1", "0.9"), ("A", "lesion", "2", "1", "0.6"), ("A", "false_positive", "", "", "0.7"),
        ("B", "lesion", "1", "0", ""), ("B", "false_positive", "", "", "0.95"), ("B", "false_positive", "", "", "0.55"),
        ("C", "image", "", "", "")]
    assert float(rows[0]["hit_dice"]) == pytest.approx(0.75) and float(rows[0]["confidence"]) == pytest.approx(0.9)
    # A1 is voxels z 1-2, y 1-2, x 1-5 on a 1 mm grid at the origin: centroid (x, y, z) = (3, 1.5, 1.5) mm
    assert [float(rows[0][f"centroid_{a}_mm"]) for a in "xyz"] == pytest.approx([3.0, 1.5, 1.5])
    assert rows[3]["confidence"] == "" and rows[3]["matched_component"] == ""
    assert {r["score"] for r in rows} == {"probability"}

    png = (out / "froc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    shutil.copy(out / "froc.png", output_dir / "evaluate_froc_hand_case.png")
    assert not list(out.glob(".*partial*"))  # atomic writes leave no temporaries


def _hand_logits(prob: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """The hand case as logits: ``scale * log(p / (1 - p))`` per voxel, -1e4 where p = 0 (no window)."""
    logits = np.full(prob.shape, SKIPPED_LOGIT, np.float32)
    inside = prob > 0
    logits[inside] = scale * np.log(prob[inside] / (1 - prob[inside]))
    return logits


@pytest.fixture
def logit_dirs(hand_dirs, tmp_path):
    """The hand case's maps as logits, as is and scaled by 40 (every probability would be 1.0 then)."""
    _, ref = hand_dirs
    for scale in (1, 40):
        for name, (prob, _) in hand_case_arrays().items():
            write(tmp_path / f"logits{scale}" / f"{name}.nii.gz", _hand_logits(prob, scale))
    return tmp_path / "logits1", tmp_path / "logits40", ref


def test_logits_rank_as_the_probabilities_and_survive_scaling(logit_dirs, hand_dirs, tmp_path):
    """--logits ranks components by their maximum logit. The logit is monotone in the probability,
    so the hand case gives the numbers of --pred (CPM (0.125 + 0.25 + 0.5 + 4 * 2/3) / 7, worked
    out in evaluation/test_metrics.py); scaled by 40, every probability above 0.5 would round to 1.0 in float32
    (the confident components tie), but no logit ranking or 0.5 decision changes: the same CPM."""
    logits1, logits40, ref = logit_dirs
    reports = {}
    for key, args in (("pred", ("--pred", hand_dirs[0])), ("l1", ("--logits", logits1)), ("l40", ("--logits", logits40))):
        proc = iwseg(*args, "--ref", ref, "--size-thresholds", "2", "4", "--no-progress", "--json", tmp_path / f"{key}.json",
                     "--csv", tmp_path / f"{key}.csv")
        assert proc.returncode == 0, proc.stderr
        assert "warning: --logits" not in proc.stderr  # (the hit rules disagree here: #22 warns on that)
        reports[key] = json.loads((tmp_path / f"{key}.json").read_text())
    expected = (0.125 + 0.25 + 0.5 + 4 * 2 / 3) / 7
    for key, report in reports.items():
        assert report["cpm"] == pytest.approx(expected), key
        assert report["froc"]["recall"] == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3]), key
    assert reports["l1"]["score"] == reports["l40"]["score"] == "logit"
    # the confidences are the maximum logits: A's lesion 1 is hit by the component of max p 0.9, logit 2.197
    a1 = reports["l1"]["cases"][0]["lesions"][0]
    assert a1["confidence"] == pytest.approx(math.log(0.9 / 0.1), abs=1e-5)
    assert reports["l40"]["cases"][0]["lesions"][0]["confidence"] == pytest.approx(40 * math.log(9), abs=1e-3)
    rows = list(csv.DictReader((tmp_path / "l40.csv").open()))
    assert {r["score"] for r in rows} == {"logit"}
    # the CSV read back as --records keeps the logit ranking
    proc = iwseg("--records", tmp_path / "l40.csv", "--size-thresholds", "2", "4", "--json", tmp_path / "again.json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "again.json").read_text())["cpm"] == pytest.approx(expected)


def test_logits_bad_input(logit_dirs, hand_dirs, tmp_path):
    """--logits given a probability map warns naming the file; --pred given logits is an error
    that says to use --logits; both flags at once are refused; NaN logits name the file."""
    logits1, _, ref = logit_dirs
    pred = hand_dirs[0]
    proc = iwseg("--logits", pred, "--ref", ref, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if line.startswith("warning: --logits")]
    # A and B hold probabilities in [0, 1]; C is all 0 (in [0, 1] too): three warnings, each naming its file
    assert len(warned) == 3 and "A.nii.gz" in warned[0] and "looks like a probability map" in warned[0]
    proc = iwseg("--pred", logits1, "--ref", ref, "--no-progress")
    assert proc.returncode == 2 and "A.nii.gz" in proc.stderr and "--logits" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = iwseg("--pred", pred, "--logits", logits1, "--ref", ref)
    assert proc.returncode == 2 and "not both" in proc.stderr
    bad = _hand_logits(hand_case_arrays()["A"][0])
    bad[0, 0, 0] = np.nan
    write(logits1 / "A.nii.gz", bad)
    proc = iwseg("--logits", logits1, "--ref", ref, "--no-progress")
    assert proc.returncode == 2 and "A.nii.gz" in proc.stderr and "NaN" in proc.stderr


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


def test_records_round_trip_gives_the_same_numbers(hand_dirs, tmp_path):
    """Our JSON report and our CSV, read back with --records, give the FROC numbers of the images."""
    pred, ref = hand_dirs
    proc = iwseg("--pred", pred, "--ref", ref, "--size-thresholds", "2", "4", "--no-progress",
                 "--json", tmp_path / "r.json", "--csv", tmp_path / "l.csv")
    assert proc.returncode == 0, proc.stderr
    first = json.loads((tmp_path / "r.json").read_text())
    for source in ("r.json", "l.csv"):
        proc = iwseg("--records", tmp_path / source, "--size-thresholds", "2", "4", "--json", tmp_path / "again.json")
        assert proc.returncode == 0, proc.stderr
        again = json.loads((tmp_path / "again.json").read_text())
        for key in ("n_images", "n_lesions", "recall", "cpm", "avg_recall_0_5", "object_dice"):
            assert again[key] == pytest.approx(first[key]), (source, key)
        for key in ("fp_per_image", "recall"):
            assert again["froc"][key] == pytest.approx(first["froc"][key]), (source, key)
        assert again["bootstrap"]["cpm"] == pytest.approx(first["bootstrap"]["cpm"]), source
        assert again["by_size"]["small"]["cpm"] == pytest.approx(first["by_size"]["small"]["cpm"])
        assert "per-lesion records" in proc.stdout


def test_authors_records_and_paper_bootstrap(tmp_path):
    """The synthetic saturated records in the authors' format (worked out in evaluation/test_metrics.py'
    test_saturated_records_rank_by_logit_not_by_probability): CPM 4.40625/7 ranked by logit,
    3.984375/7 by the probability; the paper's bootstrap always draws both images with records
    over all 3 images, so its mean is the CPM."""
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "prc_records_synthetic_saturated.json"
    for score, expected in (("logit", 4.40625 / 7), ("stat", 3.984375 / 7)):
        proc = iwseg("--records", fixture, "--records-score", score, "--bootstrap", "paper", "--size-preset", "liver",
                     "--json", tmp_path / "r.json")
        assert proc.returncode == 0, proc.stderr
        report = json.loads((tmp_path / "r.json").read_text())
        assert report["bootstrap"]["mode"] == "paper" and report["bootstrap"]["seed"] == 42
        assert report["cpm"] == pytest.approx(expected) and report["bootstrap"]["cpm"]["mean"] == pytest.approx(expected)
        assert report["by_size"]["small"]["cpm"] == pytest.approx(0.4375)
        assert "bootstrap paper (seed 42)" in proc.stdout and "Table 2" in proc.stdout


def test_hit_rule_and_min_size_flags(tmp_path):
    """One 56-voxel blob over three 8-voxel lesions plus a 1-voxel speck (see evaluation/test_metrics.py)."""
    ref = np.zeros((4, 4, 20), np.uint8)
    for x0 in (1, 6, 11):
        ref[1:3, 1:3, x0:x0 + 2] = 1
    prob = np.zeros(ref.shape, np.float32)
    prob[1:3, 1:3, 1:15] = 0.9
    prob[0, 0, 18] = 0.8  # a 1-voxel false positive
    write(tmp_path / "pred" / "a.nii.gz", prob)
    write(tmp_path / "ref" / "a.nii.gz", ref)
    args = ("--pred", tmp_path / "pred", "--ref", tmp_path / "ref", "--no-progress", "--json", tmp_path / "r.json")

    def run(*extra):
        proc = iwseg(*args, *extra)
        assert proc.returncode == 0, proc.stderr
        return json.loads((tmp_path / "r.json").read_text())

    paper = run()
    assert paper["recall"] == 1.0 and paper["hit_rule"] == "paper"
    assert len(paper["cases"][0]["components"]) == 2
    strict = run("--hit-rule", "one-to-one", "--min-lesion-size", "2vox")
    assert strict["recall"] == pytest.approx(1 / 3) and strict["hit_rule"] == "one-to-one"
    assert len(strict["cases"][0]["components"]) == 1  # the speck is gone
    for bad, message in ((("--hit-rule", "diagonal"), "unknown term"), (("--min-lesion-size", "5cm"), "10vox"),
                         (("--bootstrap", "theirs"), "invalid choice")):
        proc = iwseg(*args, *bad)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_records_bad_input_is_exit_2(tmp_path):
    (tmp_path / "bad.json").write_text('{"a": [{"obj": "tum_1"}]}')
    proc = iwseg("--records", tmp_path / "bad.json")
    assert proc.returncode == 2 and "bad.json" in proc.stderr and "image 'a', object 0" in proc.stderr
    (tmp_path / "old.csv").write_text("case,lesion_id,hit_dice\nA,1,0.5\n")
    proc = iwseg("--records", tmp_path / "old.csv")
    assert proc.returncode == 2 and "old.csv" in proc.stderr and "kind" in proc.stderr
    proc = iwseg("--records", tmp_path / "bad.json", "--pred", tmp_path)
    assert proc.returncode == 2 and "not both" in proc.stderr
    proc = iwseg("--json", tmp_path / "r.json")
    assert proc.returncode == 2 and "--records" in proc.stderr


def test_predict_min_lesion_size_from_flag_and_card(tmp_path):
    """The hand-set threshold network of Testing/_threshold_model.py finds exactly the three lesions of its CT
    (96, 8 and 1 voxels, 1 mm grid). The card's min_lesion_size (2 voxels) drops the 1-voxel one;
    --min-lesion-size overrides the card (10vox keeps only the 96-voxel lesion, 'none' keeps all)."""
    from IWSegmentationLib.nn.checkpoint import save_checkpoint
    from IWSegmentationLib.preprocessing.presets import get_preset

    ckpt = tmp_path / "model.safetensors"
    save_checkpoint(ckpt, threshold_model(), {
        "patch_size": [16, 16, 16], "preprocessing": get_preset("ct-lung"), "threshold": 0.5,
        "min_lesion_size": {"value": 2.0, "unit": "voxels"}, "description": "threshold at -350 HU (tests)",
        "organ_mask": {"organ": "lung", "required": False, "automatic": True, "source": "none"}})
    image, lesions = ct_volume()
    write(tmp_path / "ct.nii.gz", image)
    write(tmp_path / "ref" / "ct.nii.gz", lesions.astype(np.uint8))

    def predict(*extra):
        proc = subprocess.run([sys.executable, "-m", "IWSegmentationLib", "predict", "--model", ckpt,
                               "--input", tmp_path / "ct.nii.gz", "--output", tmp_path / "pred" / "ct.nii.gz",
                               "--lesions", tmp_path / "lesions.json", "--overwrite", *extra], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        return sorted(les["voxels"] for les in json.loads((tmp_path / "lesions.json").read_text())["lesions"])

    (tmp_path / "pred").mkdir()
    assert predict() == [8, 96]
    assert predict("--min-lesion-size", "none") == [1, 8, 96]
    assert predict("--min-lesion-size", "9mm3") == [96]  # 1 mm³ voxels: 9 voxels needed
    mask, _ = read_image(tmp_path / "pred" / "ct.nii.gz")
    assert int(mask.sum()) == 96
    # evaluating that mask against the three reference lesions: 1 of 3 hit
    proc = iwseg("--pred", tmp_path / "pred", "--ref", tmp_path / "ref", "--json", tmp_path / "r.json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "r.json").read_text())["recall"] == pytest.approx(1 / 3)
    proc = subprocess.run([sys.executable, "-m", "IWSegmentationLib", "predict", "--model", ckpt, "--input",
                           tmp_path / "ct.nii.gz", "--output", tmp_path / "x.nii.gz", "--min-lesion-size", "3 cm"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--min-lesion-size" in proc.stderr and "Traceback" not in proc.stderr
