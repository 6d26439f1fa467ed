"""core.operating_points: the card's operating-point record, its rates, lookup and slider label."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from IWSegmentationLib.core.errors import CheckpointError, InputError
from IWSegmentationLib.core.operating_points import (
    OperatingPoints,
    format_rate,
    parse_operating_point,
)

#: A hand-made section: thresholds fall as the rate rises (more false positives allowed).
SECTION = {
    "points": [
        {"fp_per_scan": 0.125, "logit_threshold": 4.5, "recall": 0.25, "achieved_fp_per_scan": 0.0},
        {"fp_per_scan": 0.5, "logit_threshold": 2.5, "recall": 0.5, "achieved_fp_per_scan": 0.5},
        {"fp_per_scan": 1.0, "logit_threshold": 2.5, "recall": 0.5, "achieved_fp_per_scan": 0.5},
        {"fp_per_scan": 2.0, "logit_threshold": 0.0, "recall": 0.75, "achieved_fp_per_scan": 2.0},
    ],
    "hit_rule": "paper", "score": "logit", "n_images": 2, "n_lesions": 4, "epoch": 3,
}


@pytest.mark.parametrize(("text", "rate"), [("1fp", 1.0), ("0.5fp", 0.5), ("1/8fp", 0.125), ("1/8", 0.125),
                                            ("8FP", 8.0), (" 1 / 4 fp ", 0.25)])
def test_rates_parse_as_written(text, rate):
    assert parse_operating_point(text) == rate


@pytest.mark.parametrize("text", ["", "fp", "one", "-1fp", "1/0fp", "0fp"])
def test_a_bad_rate_names_the_flag(text):
    with pytest.raises(InputError, match="--operating-point"):
        parse_operating_point(text)


@given(st.sampled_from([0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]))
def test_a_formatted_rate_parses_back(rate):
    assert parse_operating_point(format_rate(rate) + "fp") == rate


def test_the_section_round_trips_and_looks_points_up():
    points = OperatingPoints.from_dict(SECTION)
    assert OperatingPoints.from_dict(points.as_dict()) == points
    assert points.names == ["1/8fp", "1/2fp", "1fp", "2fp"]
    assert points.lookup("0.5fp").logit_threshold == 2.5
    assert points.lookup("1/8fp").recall == 0.25
    assert points.default().fp_per_scan == 1.0
    with pytest.raises(InputError) as caught:
        points.lookup("4fp", where="the model card of m.safetensors")
    assert str(caught.value) == ("--operating-point 4fp: the model card of m.safetensors has no operating point at "
                                 "4 FP/scan; it has 1/8fp, 1/2fp, 1fp, 2fp")


def test_an_old_card_has_none_and_a_bad_section_names_the_field():
    assert OperatingPoints.of_card({"threshold": 0.5}) is None
    bad = {**SECTION, "points": [{**SECTION["points"][0], "logit_threshold": math.nan}]}
    with pytest.raises(CheckpointError, match="'operating_points' logit_threshold must be a finite number"):
        OperatingPoints.from_dict(bad, "checkpoint m.safetensors: model card")
    with pytest.raises(CheckpointError, match="non-empty list 'points'"):
        OperatingPoints.from_dict({**SECTION, "points": []})


def test_the_slider_label_interpolates_between_the_nearest_points():
    points = OperatingPoints.from_dict(SECTION)
    # logit 3.5 lies halfway between 2.5 (0.5 FP/scan, recall 0.5) and 4.5 (0 FP/scan, recall 0.25):
    # FP/scan 0.5 * 0.5 + 0.5 * 0 = 0.25, recall 0.5 * 0.5 + 0.5 * 0.25 = 0.375
    label = points.at_logit(3.5)
    assert label.fp_per_scan == pytest.approx(0.25) and label.recall == pytest.approx(0.375)
    # 1.0 lies between 0.0 (2 FP/scan, 0.75) and 2.5 (0.5, 0.5), w = 0.4: 1.2 * 1 + ... = 0.6*2 + 0.4*0.5 = 1.4
    label = points.at_logit(1.0)
    assert label.fp_per_scan == pytest.approx(1.4) and label.recall == pytest.approx(0.6 * 0.75 + 0.4 * 0.5)
    assert label.nearest.logit_threshold == 0.0
    # beyond the ends: clamped
    assert points.at_logit(-3.0).fp_per_scan == 2.0 and points.at_logit(9.0).recall == 0.25
    # 2.0: w = 0.8 between 0.0 and 2.5 -> 0.2 * 2 + 0.8 * 0.5 = 0.8 FP/scan, recall 0.2*0.75 + 0.8*0.5 = 55%
    assert points.at_logit(2.0).text == "≈ 0.8 FP/scan, recall 55% (validation; nearest: 1/2fp)"
