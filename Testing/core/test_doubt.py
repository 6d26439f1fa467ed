"""Per-lesion doubt and the second-look list (:mod:`IWSegmentationLib.core.doubt`) on hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from IWSegmentationLib.core.doubt import (
    DOUBT_SD_LOGIT,
    SECOND_LOOK_LIMIT,
    is_doubtful,
    lesion_doubt,
    second_look,
)
from IWSegmentationLib.core.errors import InputError


def test_lesion_doubt_by_hand():
    # two lesions on a 1 x 1 x 6 row: lesion 1 = voxels 0-1, lesion 2 = voxel 4; three members, threshold 0
    labels = np.array([[[1, 1, 0, 0, 2, 0]]], dtype=np.int32)
    members = np.array([
        [[[3.0, 1.0, 9.0, 9.0, 0.5, 9.0]]],   # lesion 1 max 3, lesion 2 max 0.5 (found)
        [[[2.0, 2.5, 9.0, 9.0, -1.0, 9.0]]],  # lesion 1 max 2.5, lesion 2 max -1 (not found)
        [[[1.0, 2.0, 9.0, 9.0, 0.0, 9.0]]],   # lesion 1 max 2, lesion 2 max 0 (not found: not above 0)
    ], dtype=np.float16)
    one, two = lesion_doubt(labels, 2, members, 0.0)
    # lesion 1: maxima 3, 2.5, 2: mean 2.5, sd = sqrt((0.25 + 0 + 0.25) / 3) = 0.408248; found by all 3
    assert (one.members, one.found_by, one.fraction, one.doubtful) == (3, 3, 1.0, False)
    assert one.confidence_sd == pytest.approx(0.408248, abs=1e-6)
    assert (one.confidence_min, one.confidence_max) == (2.0, 3.0)
    # lesion 2: maxima 0.5, -1, 0: found by 1 of 3 -> doubtful; mean -1/6, sd = sqrt((4/9 + 25/36 + 1/36) / 3) = 0.623610
    assert (two.found_by, two.fraction, two.doubtful) == (1, pytest.approx(1 / 3), True)
    assert two.confidence_sd == pytest.approx(0.623610, abs=1e-6)
    assert two.as_dict()["fraction"] == 0.333333


def test_doubtful_is_defined_once():
    assert is_doubtful(1, 2, 0.0) and not is_doubtful(2, 2, DOUBT_SD_LOGIT)
    assert is_doubtful(2, 2, DOUBT_SD_LOGIT + 1e-9)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-20, 20, allow_nan=False, width=16), min_size=1, max_size=8), st.floats(-5, 5))
def test_doubt_invariants(maxima, threshold):
    # one 1-voxel lesion; each member's value is its maximum there
    members = np.array(maxima, dtype=np.float16).reshape(-1, 1, 1, 1)
    (d,) = lesion_doubt(np.ones((1, 1, 1), np.int32), 1, members, threshold)
    assert d.confidence_min <= d.confidence_max and d.confidence_sd <= (d.confidence_max - d.confidence_min) / 2 + 1e-9
    assert d.found_by == sum(float(v) > threshold for v in members.ravel())
    assert d.doubtful == (d.found_by < d.members or d.confidence_sd > DOUBT_SD_LOGIT)


def test_member_maps_must_match_the_labels():
    with pytest.raises(InputError, match="do not match"):
        lesion_doubt(np.ones((1, 2, 2), np.int32), 1, np.zeros((2, 1, 2, 3), np.float16), 0.0)


def test_second_look_lists_components_just_below_the_threshold_only():
    # threshold logit 0, margin 1: a component whose maximum is in (-1, 0] is listed
    logits = np.full((1, 3, 12), -5.0, np.float32)
    logits[0, 1, 0:2] = [-0.2, -0.9]    # listed: maximum -0.2
    logits[0, 1, 4] = -0.5              # listed: maximum -0.5 (one voxel)
    logits[0, 1, 7:9] = [-0.5, 2.0]     # a lesion's margin: its component's maximum 2 is above 0, not listed
    logits[0, 1, 11] = -1.0             # not above threshold - margin: not a component
    listed, count = second_look(logits, 0.0, (1.0, 1.0, 1.0))
    assert count == 2
    assert [les.confidence for les in listed] == pytest.approx([-0.2, -0.5])  # most confident first
    assert [les.id for les in listed] == [1, 2] and [les.voxels for les in listed] == [2, 1]
    assert second_look(np.full((2, 2, 2), -3.0, np.float32), 0.0, (1, 1, 1)) == ([], 0)
    with pytest.raises(InputError, match="margin"):
        second_look(logits, 0.0, (1, 1, 1), margin=0)


def test_second_look_is_capped():
    logits = np.full((1, 1, 2 * (SECOND_LOOK_LIMIT + 5)), -5.0, np.float32)
    logits[0, 0, ::2] = -0.5  # isolated voxels
    listed, count = second_look(logits, 0.0, (1, 1, 1))
    assert (len(listed), count) == (SECOND_LOOK_LIMIT, SECOND_LOOK_LIMIT + 5)
