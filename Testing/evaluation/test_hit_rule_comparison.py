"""The hit rules side by side and the low-Dice-hit rule (issue 22, item 3), on hand-made masks."""

import json

import numpy as np
import pytest
from _hand_cases import blob_case

from IWSegmentationLib.cli.main import main
from IWSegmentationLib.core.imageio import Geometry, write_image
from IWSegmentationLib.evaluation.matching import match_case
from IWSegmentationLib.evaluation.report import LOW_HIT_DICE, compare_hit_rules


def _by_rule(pred, ref):
    return {rule: [match_case(pred, ref, hit_rule=rule, case="chest")] for rule in ("paper", "one-to-one")}


def test_known_bad_blob_disagrees():
    # Dice of each lesion with the blob: 2 * 8 / (8 + 1000) = 0.0159 < 0.05 -> 3 low-Dice hits (paper)
    # paper (many-to-one): all 3 lesions hit, 0 FP, recall 1, CPM 1, object Dice 0.0159
    # one-to-one: the blob pairs with one lesion: recall 1/3, 0 FP, CPM 1/3 (recall 1/3 at every FP rate)
    comparison = compare_hit_rules(_by_rule(*blob_case()))
    paper, one = comparison["rules"]
    assert paper["hit_rule"] == "paper" and one["hit_rule"] == "one-to-one"
    assert paper["recall"] == 1.0 and paper["cpm"] == 1.0 and paper["fp_per_image"] == 0.0
    assert paper["object_dice"] == pytest.approx(16 / 1008) and paper["low_dice_hits"] == 3
    assert one["recall"] == pytest.approx(1 / 3) and one["cpm"] == pytest.approx(1 / 3) and one["low_dice_hits"] == 1
    assert comparison["disagree"]
    cpm_reason, recall_reason, low_paper, low_one = comparison["reasons"]
    assert cpm_reason.startswith("CPM differs by more than 0.1") and "1.000 (paper), 0.333 (one-to-one)" in cpm_reason
    assert recall_reason.startswith("recall differs")
    assert low_paper.startswith(f"3 hit(s) under hit rule paper have Dice < {LOW_HIT_DICE:g}")
    assert low_one.startswith("1 hit(s) under hit rule one-to-one")


def test_known_good_perfect_prediction_agrees():
    _, ref = blob_case()
    comparison = compare_hit_rules(_by_rule(ref.astype(np.float32), ref))
    assert comparison == {"rules": [
        {"hit_rule": "paper", "recall": 1.0, "fp_per_image": 0.0, "cpm": 1.0, "object_dice": 1.0, "low_dice_hits": 0},
        {"hit_rule": "one-to-one", "recall": 1.0, "fp_per_image": 0.0, "cpm": 1.0, "object_dice": 1.0,
         "low_dice_hits": 0},
    ], "disagree": False, "reasons": []}


def test_evaluate_command_says_loudly_when_the_rules_disagree(tmp_path, capsys):
    blob, ref = blob_case()
    for name, pred in (("bad", blob), ("good", ref.astype(np.float32))):
        (tmp_path / name / "pred").mkdir(parents=True)
        (tmp_path / name / "ref").mkdir()
        write_image(tmp_path / name / "pred" / "chest.nrrd", pred, Geometry.identity(ref.shape))
        write_image(tmp_path / name / "ref" / "chest.nrrd", ref, Geometry.identity(ref.shape))
        assert main(["evaluate", "--pred", str(tmp_path / name / "pred"), "--ref", str(tmp_path / name / "ref"),
                     "--json", str(tmp_path / name / "report.json"), "--no-progress"]) == 0
        out, err = capsys.readouterr()
        report = json.loads((tmp_path / name / "report.json").read_text())
        assert report["hit_rule"] == "paper" and report["cpm"] == 1.0  # the old keys are unchanged
        if name == "bad":
            assert "THE HIT RULES DISAGREE" in out
            assert "warning: 3 hit(s) under hit rule paper have Dice < 0.05" in err
            assert report["hit_rule_comparison"]["disagree"] and len(report["warnings"]) == 4
        else:
            assert "DISAGREE" not in out and "warning:" not in err
            assert report["warnings"] == [] and not report["hit_rule_comparison"]["disagree"]
        assert [r["hit_rule"] for r in report["hit_rule_comparison"]["rules"]] == ["paper", "one-to-one"]
