"""Confidence in logit space (issue 20): the threshold <-> logit mapping, and the invariant that
a positive scaling of the network's output head changes neither the 0.5 mask nor the CPM, end to
end through :func:`predict_volume` and the evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from IWSegmentationLib.core.confidence import SKIPPED_LOGIT, probability_to_logit
from IWSegmentationLib.core.errors import InputError
from IWSegmentationLib.core.prediction_maps import sigmoid
from IWSegmentationLib.evaluation import evaluate_cases, match_case
from IWSegmentationLib.inference import predict_volume
from IWSegmentationLib.preprocessing.presets import get_preset
from IWSegmentationLib.testing import phantom


def test_probability_to_logit_and_sigmoid_by_hand():
    # log(t / (1 - t)): 0.5 -> 0, 0.9 -> log 9 = 2.1972, 0.1 -> -2.1972; 0 -> SKIPPED_LOGIT
    assert probability_to_logit(0.5) == 0.0
    assert probability_to_logit(0.9) == pytest.approx(math.log(9))
    assert probability_to_logit(0.1) == pytest.approx(-math.log(9))
    assert probability_to_logit(0.0) == SKIPPED_LOGIT
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(InputError, match="threshold"):
            probability_to_logit(bad)
    # sigmoid in float32: exactly 1.0 from about logit 17 on (the saturation), exactly 0 at SKIPPED_LOGIT
    p = sigmoid(np.array([0.0, math.log(9), 16.0, 18.0, 46.0, SKIPPED_LOGIT], np.float32))
    assert p.dtype == np.float32
    assert p[0] == 0.5 and p[1] == pytest.approx(0.9) and p[2] < 1.0 and p[3] == p[4] == 1.0 and p[5] == 0.0


#: The phantom's three lesions (intensities 70, 85, 100) and a fourth blob of intensity 75 that
#: is not in the reference: a false positive between the hits. (centre z, y, x; radius mm; intensity)
FALSE_POSITIVE = (8.0, 14.0, 12.0, 2.0, 75.0)


def _scaled_head(model: torch.nn.Module, factor: float) -> torch.nn.Module:
    """The model with its output head's weight and bias multiplied by ``factor``: every logit is
    ``factor`` times what it was."""
    with torch.no_grad():
        head = model.head[1][2]
        head.weight.mul_(factor)
        head.bias.mul_(factor)
    return model


@pytest.mark.parametrize("tta", [False, True])
def test_scaling_the_output_head_changes_neither_the_mask_nor_the_cpm(tta):
    """The threshold model gives logit 20 (x - 0.5) for x = intensity / 100: the hits 4, 7, 10 and
    the false positive 5. Ranked by logit (10, 7 hits; 5 FP; 4 hit) the FROC is (0, 2/3), (1, 1):
    recall at 1/8, 1/4, 1/2 FP/image is 2/3 + f/3 = 0.7083, 0.75, 0.8333, then 1 at 1, 2, 4, 8:
    CPM 6.2917 / 7 = 0.8988. Multiplying the head by 40 multiplies every logit by 40 (160 ... 400):
    no 0.5 decision (logit > 0) and no ranking changes, so the mask and the CPM must not either.
    Ranked by float32 probability, as before issue 20, all four would be exactly 1.0 and tie:
    FROC (0, 0), (1, 1), CPM (0.125 + 0.25 + 0.5 + 4) / 7 = 0.6964."""
    case = phantom.phantom_case(lesions=(*phantom.DEFAULT_LESIONS, FALSE_POSITIVE))
    reference = case.reference.copy()
    cz, cy, cx, radius, _ = FALSE_POSITIVE  # 1 mm voxels
    zz, yy, xx = np.indices(reference.shape)
    reference[(zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2] = 0
    card = {"patch_size": [32, 32, 32], "preprocessing": get_preset("mr"), "threshold": 0.5}
    results = {}
    for factor in (1.0, 40.0):
        model = _scaled_head(phantom.threshold_model(), factor)
        pred = predict_volume(model, case.image, card, device="cpu", tta=tta)
        matched = match_case(pred.logits, reference, case.spacing, case="phantom", score="logit")
        results[factor] = (pred.mask, evaluate_cases([matched], n_resamples=1)["cpm"],
                           sorted(c.confidence for c in matched.components))
    (mask1, cpm1, conf1), (mask40, cpm40, conf40) = results[1.0], results[40.0]
    assert np.array_equal(mask1, case.reference)  # three lesions and the false positive, exactly
    assert np.array_equal(mask40, mask1)
    assert conf1 == pytest.approx([4.0, 5.0, 7.0, 10.0], abs=1e-3)
    assert conf40 == pytest.approx([160.0, 200.0, 280.0, 400.0], rel=1e-4)
    assert cpm1 == pytest.approx((2 / 3 + 1 / 24 + 0.75 + 5 / 6 + 4) / 7)
    assert cpm40 == cpm1
