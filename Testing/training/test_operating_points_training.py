"""Operating points end to end: a real tiny training run stores them in best.safetensors's card, and
``iwseg predict --operating-point`` applies the stored logit threshold (the same mask as
``--threshold sigmoid(logit)``); an old card without them is refused by name."""

from __future__ import annotations

import json
import math

import numpy as np
from _tiny_training import tiny_config

from IWSegmentationLib.cli import main as cli_main
from IWSegmentationLib.core.imageio import read_image
from IWSegmentationLib.core.operating_points import OPERATING_POINT_FP_RATES, OperatingPoints
from IWSegmentationLib.nn.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from IWSegmentationLib.training import train


def test_training_stores_operating_points_and_predict_uses_them(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_config(dataset, out, epochs=2, iters_per_epoch=4, val_every=1, lr=0.03), verbose=False)
    best = out / "best.safetensors"
    card = read_metadata(best)
    points = OperatingPoints.of_card(card)
    assert points is not None, "best.safetensors has no operating points"
    assert [p.fp_per_scan for p in points.points] == list(OPERATING_POINT_FP_RATES)
    val = card["validation_metrics"]
    # measured on the same validation as the card's metrics, with its hit rule, on its one scan
    assert (points.epoch, points.hit_rule, points.n_images) == (val["epoch"], val["hit_rule"], val["n_images"])
    assert points.n_lesions == val["n_lesions"] and points.score == "logit"
    for p in points.points:  # a step FROC: never more FPs than asked, thresholds fall as the rate rises
        assert p.achieved_fp_per_scan <= p.fp_per_scan and p.logit_threshold >= 0.0  # logit(card threshold 0.5)
    thresholds = [p.logit_threshold for p in points.points]
    assert thresholds == sorted(thresholds, reverse=True)

    image = dataset / "imagesTr" / "synth_000.nii.gz"
    organ = ["--organ-mask", str(dataset / "masksTr" / "synth_000.nii.gz")]  # the model was trained liver-masked
    point = points.lookup("1fp")
    probability = 1.0 / (1.0 + math.exp(-point.logit_threshold))
    by_point, by_threshold = tmp_path / "op.nii.gz", tmp_path / "t.nii.gz"
    lesions = tmp_path / "op.json"
    assert cli_main(["predict", "--model", str(best), "--input", str(image), "--output", str(by_point),
                     "--lesions", str(lesions), "--operating-point", "1fp", "--device", "cpu", *organ]) == 0
    assert cli_main(["predict", "--model", str(best), "--input", str(image), "--output", str(by_threshold),
                     "--threshold", repr(probability), "--device", "cpu", *organ]) == 0
    assert np.array_equal(read_image(by_point)[0], read_image(by_threshold)[0])
    assert json.loads(lesions.read_text())["threshold"] == np.float32(probability).item()

    # a rate the card lacks: the card's points are listed
    code = cli_main(["predict", "--model", str(best), "--input", str(image), "--output", str(tmp_path / "x.nii.gz"),
                     "--operating-point", "3fp", "--device", "cpu", *organ])
    assert code == 2
    assert f"the model card of {best} has no operating point at 3 FP/scan; it has 1/8fp, 1/4fp, 1/2fp, 1fp, 2fp, 4fp, 8fp" \
        in capsys.readouterr().err

    # an old card (no operating points): --operating-point is refused naming it; without it the
    # card's threshold applies and the run says so once
    model, old_card = load_checkpoint(best)
    del old_card["operating_points"]
    old = tmp_path / "old.safetensors"
    save_checkpoint(old, model, old_card)
    code = cli_main(["predict", "--model", str(old), "--input", str(image), "--output", str(tmp_path / "y.nii.gz"),
                     "--operating-point", "1fp", "--device", "cpu", *organ])
    assert code == 2
    assert f"--operating-point 1fp: the model card of {old} has no operating points" in capsys.readouterr().err
    assert cli_main(["predict", "--model", str(old), "--input", str(image), "--output", str(tmp_path / "z.nii.gz"),
                     "--device", "cpu", "--progress-format", "jsonl", *organ]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    notes = [e["message"] for e in lines if "no operating points" in str(e.get("message", ""))]
    assert notes == [f"the model card of {old} has no operating points (written before they were stored): "
                     "threshold 0.5, the card's"]
