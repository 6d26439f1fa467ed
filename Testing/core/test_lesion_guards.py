"""The guards against absurd results (issue 22, item 3): hand-worked summaries and warnings."""

import math

import pytest

from IWSegmentationLib.core.lesion_guards import LARGE_LESION_PERCENT, MANY_LESIONS, LesionSummary


def test_known_bad_chest_wide_blob_warns():
    # the lung1: one 7.9 L blob. On 1 mm³ voxels: 7.9e6 voxels in a 20 L (2e7-voxel) body
    # = 39.5% of the body (> 5%); plus 847 specks of 10 voxels -> 848 lesions (>= 200)
    summary = LesionSummary.of([7_900_000] + [10] * 847, 1.0, body_voxels=20_000_000)
    assert summary.lesions == 848 and summary.largest_volume_mm3 == 7_900_000
    # d = (6 * 7.9e6 / pi)^(1/3) = 15088226^(1/3) = 247.1 mm
    assert summary.largest_diameter_mm == pytest.approx((6 * 7.9e6 / math.pi) ** (1 / 3)) == pytest.approx(247.1, abs=0.05)
    assert summary.largest_percent_of_body == pytest.approx(39.5)
    large, many = summary.warnings()
    assert "39.5% of the body" in large and "7900.0 mL" in large and f"more than {LARGE_LESION_PERCENT:g}%" in large
    assert many.startswith("848 lesions") and f"at least {MANY_LESIONS}" in many
    # all lesions: 7.9e6 + 8470 = 7908470 voxels = 39.54% of the body; largest 39.50%
    assert summary.line() == ("848 lesions; largest 7900.0 mL (247.1 mm); lesions cover 39.54% of the body "
                              "(largest 39.50%)")


def test_known_good_nodule_is_quiet_and_the_organ_is_the_region():
    # a 13.8 mm nodule on 0.5 x 0.7 x 0.7 mm voxels (0.245 mm³): 5.6e3 voxels = 1372 mm³, in a
    # 5 L lung mask (2.04e7 voxels) and a 20 L body (8.16e7 voxels)
    voxel = 0.5 * 0.7 * 0.7
    summary = LesionSummary.of([5600], voxel, body_voxels=81_600_000, organ_voxels=20_400_000)
    assert summary.warnings() == []
    assert summary.region == "organ mask" and summary.body == "body"
    # 5600 * 0.245 = 1372 mm³ -> 1.4 mL; d = (6 * 1372 / pi)^(1/3) = 13.78 mm; 5600 / 2.04e7 = 0.027%
    assert summary.line() == "1 lesion; largest 1.4 mL (13.8 mm); lesions cover 0.03% of the organ mask (largest 0.03%)"
    assert LesionSummary.from_dict(summary.as_dict()).as_dict() == summary.as_dict()  # a case_done event, read back


def test_thresholds_are_exclusive_and_inclusive_as_documented():
    # exactly 5% is not over 5%; 199 lesions are fewer than 200
    assert LesionSummary.of([5, 1], 1.0, body_voxels=100).warnings() == []
    assert len(LesionSummary.of([6], 1.0, body_voxels=100).warnings()) == 1
    assert LesionSummary.of([1] * (MANY_LESIONS - 1), 1.0, body_voxels=10**6).warnings() == []
    assert len(LesionSummary.of([1] * MANY_LESIONS, 1.0, body_voxels=10**6).warnings()) == 1
    assert LesionSummary.of([], 1.0, body_voxels=100).line() == "no lesions"
