"""evaluation.froc.operating_points: the thresholds and recalls of 1/8 ... 8 FP/scan on a FROC."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from IWSegmentationLib.evaluation import CPM_FP_RATES, froc, operating_points


def test_a_hand_worked_froc_gives_the_stored_thresholds_and_recalls():
    # 4 lesions (one missed), 4 false positives, 2 scans; confidences are maximum logits.
    # The FROC (kept points, highest recall per FP count, with the highest tau giving it):
    #   tau 5: 1 TP, 0 FP -> (0 FP/scan, recall 0.25)
    #   tau 3: 2 TP, 1 FP -> (0.5, 0.5)
    #   tau 1: 3 TP, 3 FP -> (1.5, 0.75)
    #   tau 0.5: 3 TP, 4 FP -> (2, 0.75)
    # A point's voxel threshold lies halfway to the next lower confidence: 5 -> (5+4)/2 = 4.5,
    # 3 -> (3+2)/2 = 2.5; tau 0.5 has none below, so it is the floor (logit of 0.5 = 0).
    points = operating_points([5.0, 3.0, 1.0, math.nan], [4.0, 2.0, 2.0, 0.5], 2, floor_logit=0.0)
    got = [(p.fp_per_scan, p.logit_threshold, p.recall, p.achieved_fp_per_scan) for p in points]
    assert got == [
        (0.125, 4.5, 0.25, 0.0), (0.25, 4.5, 0.25, 0.0), (0.5, 2.5, 0.5, 0.5), (1.0, 2.5, 0.5, 0.5),
        (2.0, 0.0, 0.75, 2.0), (4.0, 0.0, 0.75, 2.0), (8.0, 0.0, 0.75, 2.0),
    ]


def test_when_the_most_confident_component_is_false_no_component_is_kept():
    # 1 scan: a false positive at 3 above the only hit at 1. At 1/8 FP/scan only (0, 0) fits: the
    # threshold is the highest confidence (a component is kept when its confidence is above it).
    points = operating_points([1.0], [3.0], 1, floor_logit=-1.0)
    assert (points[0].logit_threshold, points[0].recall, points[0].achieved_fp_per_scan) == (3.0, 0.0, 0.0)
    assert (points[3].fp_per_scan, points[3].logit_threshold, points[3].recall) == (1.0, -1.0, 1.0)


def test_a_threshold_exists_between_adjacent_floats():
    # 10.0 and the float just below it: their midpoint rounds to 10.0, which would drop the hit at
    # 10.0 (kept for confidence > t); the cut is then the lower value itself, so the hit is kept
    # and the false positive just below it is not
    below = float(np.nextafter(10.0, 0.0))
    (point,) = operating_points([10.0], [below], 1, floor_logit=-0.5, rates=(0.125,))
    assert (point.logit_threshold, point.recall, point.achieved_fp_per_scan) == (below, 1.0, 0.0)


@given(st.lists(st.floats(0.0, 10.0), min_size=1, max_size=20),
       st.lists(st.floats(0.0, 10.0), max_size=30), st.integers(1, 5))
def test_keeping_components_above_the_threshold_gives_the_stored_recall_and_fp(hits, fps, n_images):
    """Invariant: counting the components whose confidence is above a point's threshold gives its
    recall and FP/scan, which lie on the FROC, within the rate."""
    points = operating_points(hits, fps, n_images, floor_logit=-0.5)
    curve = froc(hits, fps, n_images)
    for point, rate in zip(points, CPM_FP_RATES):
        tp = int(np.sum(np.asarray(hits) > point.logit_threshold))
        fp = int(np.sum(np.asarray(fps) > point.logit_threshold))
        assert fp / n_images == point.achieved_fp_per_scan <= rate
        assert tp / len(hits) == point.recall
        assert point.recall == float(np.max(curve.recall[curve.fp_per_image <= rate]))
