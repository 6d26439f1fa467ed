"""The evaluation's hand-worked case: three 10^3 images whose matches, FROC, CPM and object Dice
are worked out by hand in Testing/evaluation/test_metrics.py and reused by the ``iwseg evaluate`` tests;
and the blob case the hit rules disagree on (Testing/evaluation/test_hit_rule_comparison.py)."""

from __future__ import annotations

import numpy as np

from IWSegmentationLib.core.lesions import SizeThresholds

# Size cut-offs for the hand case (1 mm voxels): small if d < 2 mm, large if d >= 4 mm.
# d = (6 V / pi)^(1/3): 1 voxel 1.241 (small), 4 voxels 1.970 (small), 8 voxels 2.481
# (medium), 12 voxels 2.840 (medium), 20 voxels 3.368 (medium).
HAND_SIZES = SizeThresholds(2.0, 4.0)


def hand_case_arrays():
    """Three 10³ images, 1 mm voxels; ``{name: (prob, ref)}``. The working is in the tests."""
    shape = (10, 10, 10)
    # Image A: lesion A1 (20 voxels), A2 (4 voxels), one false positive.
    ref_a, prob_a = np.zeros(shape, np.uint8), np.zeros(shape, np.float32)
    ref_a[1:3, 1:3, 1:6] = 1  # A1: 2x2x5 = 20 voxels, x = 1..5
    prob_a[1:3, 1:3, 1:4] = 0.6  # component c1: 12 voxels inside A1 (x = 1..3) ...
    prob_a[2, 2, 3] = 0.9  # ... whose max, hence confidence, is 0.9
    prob_a[1, 1, 5] = 0.99  # c2: 1 voxel inside A1 (x = 5), not touching c1 (x = 3): a weaker match
    ref_a[6, 6, 2:6] = 1  # A2: 4 voxels, x = 2..5
    prob_a[6, 6, 4:8] = 0.6  # c3: 4 voxels, x = 4..7, overlaps A2 in 2 voxels
    prob_a[8, 1, 8] = 0.7  # c4: false positive, 1 voxel
    # Image B: lesion B1 (8 voxels) missed; two false positives.
    ref_b, prob_b = np.zeros(shape, np.uint8), np.zeros(shape, np.float32)
    ref_b[5:7, 5:7, 5:7] = 1
    prob_b[5:7, 5:7, 5:7] = 0.4  # below t_seg = 0.5: no component
    prob_b[1, 1, 1] = 0.95
    prob_b[1, 8, 8] = 0.55
    # Image C: nothing at all (still counts as an image in FP/image).
    ref_c, prob_c = np.zeros(shape, np.uint8), np.zeros(shape, np.float32)
    return {"A": (prob_a, ref_a), "B": (prob_b, ref_b), "C": (prob_c, ref_c)}


def blob_case():
    """Three 2x2x2 lesions (8 voxels each) under one 10x10x10 blob (1000 voxels) of probability
    0.9: the paper's rule counts 3 hits, one-to-one 1 (worked in test_hit_rule_comparison.py)."""
    ref = np.zeros((12, 12, 12), np.uint8)
    for z in (1, 5, 8):
        ref[z:z + 2, 2:4, 2:4] = 1
    blob = np.zeros(ref.shape, np.float32)
    blob[1:11, 1:11, 1:11] = 0.9
    return blob, ref
