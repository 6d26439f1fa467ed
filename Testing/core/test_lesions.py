"""Lesion labelling, sizes and size groups on hand-made masks."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from IWSegmentationLib.core.errors import InputError
from IWSegmentationLib.core.lesions import (
    SIZE_PRESETS,
    SizeThresholds,
    analyze_lesions,
    component_sizes,
    equivalent_diameter,
    label_components,
    lesion_table,
    number_lesions,
    size_thresholds,
)


def test_corner_touching_lesions_depend_on_connectivity():
    mask = np.zeros((8, 8, 8), np.uint8)
    mask[0, 0, 0] = 1  # 1-voxel lesion
    mask[1:4, 1:4, 1] = 1  # 9-voxel lesion; touches (0,0,0) only at the corner (1,1,1)
    # (1,1,1) is a diagonal neighbour of (0,0,0) in all three axes: 26-connectivity joins them
    assert label_components(mask, 26)[1] == 1
    assert label_components(mask, 6)[1] == 2
    assert label_components(mask, 18)[1] == 2  # 18-connectivity excludes the pure 3D corner


def test_lesion_table_volumes_diameters_groups():
    mask = np.zeros((20, 20, 20), np.uint8)
    mask[2:4, 2:4, 2:4] = 1  # 8 voxels
    mask[10:18, 10:18, 10:18] = 1  # 512 voxels
    spacing = (2.0, 0.5, 0.5)  # 0.5 mm³ per voxel
    labels, lesions = analyze_lesions(mask, spacing, thresholds=SizeThresholds(3.0, 8.0))
    # numbered largest first (lesions.number_lesions): the 512-voxel cube is lesion 1
    assert [les.voxels for les in lesions] == [512, 8] and [les.id for les in lesions] == [1, 2]
    assert lesions[1].volume_mm3 == pytest.approx(4.0)  # 8 * 0.5
    # d = (6*4/pi)^(1/3) = 1.969 mm -> small ; (6*256/pi)^(1/3) = 7.878 mm -> medium
    assert lesions[1].diameter_mm == pytest.approx((24 / math.pi) ** (1 / 3))
    assert [les.size_group for les in lesions] == ["medium", "small"]
    assert lesions[0].centroid == pytest.approx((13.5, 13.5, 13.5))
    assert lesions[0].bbox == (10, 10, 10, 18, 18, 18)
    assert labels.max() == 2 and labels[12, 12, 12] == 1 and labels[2, 2, 2] == 2


def test_confidence_is_max_score_inside():
    mask = np.zeros((6, 6, 6), np.uint8)
    mask[1:3, 1:3, 1:3] = 1
    logits = np.full(mask.shape, -3.0, np.float32)
    logits[1, 1, 1], logits[2, 2, 2] = 0.7, 25.0  # 25: sigmoid rounds to 1.0 in float32, the logit does not
    logits[5, 5, 5] = 40.0  # outside the lesion, must not count
    _, lesions = analyze_lesions(mask, scores=logits)
    assert lesions[0].confidence == 25.0


def test_presets_and_threshold_resolution():
    assert SIZE_PRESETS["lung"].small_mm == 10 and SIZE_PRESETS["metastases"].small_mm == 5
    assert SIZE_PRESETS["liver"].small_mm == 12
    assert size_thresholds(thresholds=[4, 9]) == SizeThresholds(4, 9)
    with pytest.raises(InputError, match="unknown size preset"):
        size_thresholds("kidney")
    with pytest.raises(InputError, match="small < large"):
        SizeThresholds(10, 5)


def test_bad_input_is_named():
    with pytest.raises(InputError, match="3D"):
        label_components(np.zeros((4, 4)))
    with pytest.raises(InputError, match="connectivity"):
        label_components(np.zeros((4, 4, 4)), connectivity=8)
    with pytest.raises(InputError, match="spacing"):
        analyze_lesions(np.ones((2, 2, 2)), spacing=(1, 0, 1))


def test_empty_mask_has_no_lesions():
    labels, lesions = analyze_lesions(np.zeros((5, 5, 5)))
    assert lesions == [] and labels.max() == 0


def test_number_lesions_orders_largest_first_then_by_first_voxel():
    labels = np.zeros((2, 1, 10), np.int32)
    labels[1, 0, :2] = 1  # size 2, first voxel (1, 0, 0) = flat index 10
    labels[0, 0, 3:8] = 2  # size 5, the largest
    labels[0, 0, 9] = 3  # size 1
    labels[1, 0, 5:7] = 4  # size 2, first voxel (1, 0, 5) = flat 15: after id 1 (flat 10)
    labels[0, 0, 0:2] = 5  # size 2, first voxel (0, 0, 0) = flat 0: first of the three ties
    new, numbered = number_lesions(labels, lesion_table(labels))
    # by hand: sizes {1: 2, 2: 5, 3: 1, 4: 2, 5: 2} -> 2 (5 voxels), then the 2-voxel ties by first
    # voxel 5 (flat 0), 1 (flat 10), 4 (flat 15), then 3 (1 voxel)
    assert [les.voxels for les in numbered] == [5, 2, 2, 2, 1]
    assert [les.id for les in numbered] == [1, 2, 3, 4, 5]
    assert [les.bbox[:3] for les in numbered] == [(0, 0, 3), (0, 0, 0), (1, 0, 0), (1, 0, 5), (0, 0, 9)]
    assert list(new[0, 0]) == [2, 2, 0, 1, 1, 1, 1, 1, 0, 5]
    assert list(new[1, 0]) == [3, 3, 0, 0, 0, 4, 4, 0, 0, 0]


@settings(max_examples=40, deadline=None)
@given(arrays(np.uint8, st.tuples(*[st.integers(1, 7)] * 3), elements=st.integers(0, 1)))
def test_numbering_is_by_size_then_scan_order(mask):
    labels, lesions = analyze_lesions(mask)
    keys = [(-les.voxels, int(np.flatnonzero(labels.ravel() == les.id)[0])) for les in lesions]
    assert keys == sorted(keys) and [les.id for les in lesions] == list(range(1, len(lesions) + 1))
    assert all(int((labels == les.id).sum()) == les.voxels for les in lesions)


@settings(max_examples=40, deadline=None)
@given(arrays(np.uint8, st.tuples(*[st.integers(1, 7)] * 3), elements=st.integers(0, 1)))
def test_component_voxels_partition_the_mask(mask):
    labels, lesions = analyze_lesions(mask)
    assert sum(les.voxels for les in lesions) == int(mask.sum())
    assert np.array_equal(labels > 0, mask > 0)
    # fewer components with more connectivity
    assert label_components(mask, 26)[1] <= label_components(mask, 18)[1] <= label_components(mask, 6)[1]


def test_equivalent_diameter_of_unit_sphere():
    assert equivalent_diameter(4 / 3 * math.pi) == pytest.approx(2.0)


def test_sizes_and_table_of_a_crop_with_large_ids():
    # a 1x1x4 crop of a whole-image labelling keeps ids 0, 2, 2, 5 (5 > the 4 voxels of the crop)
    labels = np.array([[[0, 2, 2, 5]]], np.int64)
    assert list(component_sizes(labels)) == [1, 0, 2, 0, 0, 1]
    assert list(component_sizes(labels, k=2)) == [1, 0, 2]
    table = lesion_table(labels)
    assert [(les.id, les.voxels, les.centroid, les.bbox) for les in table] == [
        (2, 2, (0.0, 0.0, 1.5), (0, 0, 1, 1, 1, 3)),
        (5, 1, (0.0, 0.0, 3.0), (0, 0, 3, 1, 1, 4)),
    ]


@pytest.mark.parametrize("connectivity", [6, 18, 26])
def test_tiny_alternating_mask_labels_without_error(connectivity):
    # three isolated voxels on a 1x1x5 line: 3 components under any connectivity
    mask = np.array([1, 0, 1, 0, 1], np.uint8).reshape(1, 1, 5)
    labels, k = label_components(mask, connectivity)
    assert k == 3 and list(labels.ravel()) == [1, 0, 2, 0, 3]
