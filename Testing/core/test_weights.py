"""Voxel weights: inverse (lesion-size) weights, class balancing, DBCE dilated weights.

Hand-made masks with the expected weights worked out in comments, and hypothesis property
tests for the invariants (exact weights sum to N, clip bounds, one weight per component).
"""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from IWSegmentationLib.core.errors import InputError
from IWSegmentationLib.core.lesions import label_components
from IWSegmentationLib.core.weights import (
    class_balance_weights,
    component_weights,
    dilate_ball,
    dilated_balance_weights,
    gdl_class_weights,
    inverse_weights,
    positive_class_weight,
)

N = 512  # voxels of the 8³ hand-made patches


def projection_touching_pair() -> np.ndarray:
    """8³ patch: a 1-voxel lesion and a 9-voxel lesion that touch only at a corner *in the axial
    projection* (as a radiologist sees them on a maximum-intensity projection down z), but are
    one empty slice apart in 3D, so they are 2 components even under 26-connectivity.

    1-voxel lesion at (z, y, x) = (1, 2, 2); 3x3 plate at z = 3, y, x in 3..5. Seen down z,
    pixel (2, 2) meets the plate's pixel (3, 3) at a corner; in 3D the nearest plate voxel,
    (3, 3, 3), is at offset (2, 1, 1): not in the 3x3x3 neighbourhood.
    """
    mask = np.zeros((8, 8, 8), np.uint8)
    mask[1, 2, 2] = 1
    mask[3, 3:6, 3:6] = 1
    return mask


def corner_touching_pair() -> np.ndarray:
    """8³ patch: a 1-voxel lesion at (0, 0, 0) and a 9-voxel plate at z = 1, y, x in 1..3 that
    share only the 3D corner between (0, 0, 0) and (1, 1, 1): one component under
    26-connectivity, two under 6- and 18-connectivity."""
    mask = np.zeros((8, 8, 8), np.uint8)
    mask[0, 0, 0] = 1
    mask[1, 1:4, 1:4] = 1
    return mask


# --------------------------------------------------------------------------- hand-computed


def test_two_lesions_exact_weights_26_connectivity():
    mask = projection_touching_pair()
    assert label_components(mask, 26)[1] == 2
    w = inverse_weights(mask, mode="exact")
    # K = 2 lesions + background = 3 components, N = 512:
    #   1-voxel lesion  : 512 / (3 * 1)   = 170.667
    #   9-voxel lesion  : 512 / (3 * 9)   = 18.963
    #   background (502): 512 / (3 * 502) = 0.33997
    assert w.dtype == np.float32 and w.shape == mask.shape
    assert w[1, 2, 2] == pytest.approx(512 / 3, rel=1e-6)
    assert np.allclose(w[3, 3:6, 3:6], 512 / 27, rtol=1e-6)
    assert np.allclose(w[mask == 0], 512 / (3 * 502), rtol=1e-6)
    # each component carries N/(K+1) = 512/3 in total, so the weights sum to N
    assert w.sum() == pytest.approx(512, rel=1e-6)


def test_corner_touching_lesions_merge_under_26_but_not_6_connectivity():
    mask = corner_touching_pair()
    w26 = inverse_weights(mask, mode="exact", connectivity=26)
    # one 10-voxel lesion + background: 512 / (2 * 10) = 25.6 ; background 512 / (2 * 502)
    assert np.allclose(w26[mask > 0], 25.6, rtol=1e-6)
    assert np.allclose(w26[mask == 0], 512 / 1004, rtol=1e-6)
    for conn in (6, 18):
        w = inverse_weights(mask, mode="exact", connectivity=conn)
        # two lesions: 512 / (3 * 1) and 512 / (3 * 9)
        assert w[0, 0, 0] == pytest.approx(512 / 3, rel=1e-6)
        assert np.allclose(w[1, 1:4, 1:4], 512 / 27, rtol=1e-6)


def test_clip_mode_bounds_like_the_authors_code():
    mask = projection_touching_pair()
    w = inverse_weights(mask)  # default: clip to [1, 2e5]
    # background 512/1506 = 0.34 is clipped up to 1; lesion weights are inside the bounds
    assert np.all(w[mask == 0] == 1.0)
    assert w[1, 2, 2] == pytest.approx(512 / 3, rel=1e-6)
    assert np.allclose(w[3, 3:6, 3:6], 512 / 27, rtol=1e-6)
    w = inverse_weights(mask, w_min=0.5, w_max=100.0)
    assert w[1, 2, 2] == 100.0  # 170.7 clipped down
    assert np.allclose(w[3, 3:6, 3:6], 512 / 27, rtol=1e-6)
    assert np.all(w[mask == 0] == 0.5)  # 0.34 clipped up


def test_empty_and_full_patches_get_weight_one():
    # no lesion: one component (background) of N voxels -> N / (1 * N) = 1
    assert np.all(inverse_weights(np.zeros((4, 5, 6), np.uint8), mode="exact") == 1.0)
    # all lesion: one component (the lesion), no background component -> 1
    assert np.all(inverse_weights(np.ones((4, 5, 6), np.uint8), mode="exact") == 1.0)


def test_component_weights_on_label_map_with_gaps_in_ids():
    labels = np.zeros((8, 8, 8), np.int32)
    labels[0, 0, 0] = 7  # ids 7 and 300: not contiguous, K = 2
    labels[4:6, 4:6, 4:6] = 300
    w = component_weights(labels, mode="exact")
    # 512/(3*1), 512/(3*8), background 512/(3*503)
    assert w[0, 0, 0] == pytest.approx(512 / 3, rel=1e-6)
    assert np.allclose(w[4:6, 4:6, 4:6], 512 / 24, rtol=1e-6)
    assert np.allclose(w[labels == 0], 512 / 1509, rtol=1e-6)


def test_sparse_huge_ids_use_the_same_formula():
    labels = np.zeros((6, 6, 6), np.int64)
    labels[0, 0, 0] = 2**40  # far above N: renumbered instead of a 2**40-long bincount
    labels[3:5, 3:5, 3:5] = 2**33
    dense = np.zeros_like(labels)
    dense[0, 0, 0], dense[3:5, 3:5, 3:5] = 1, 2
    np.testing.assert_array_equal(component_weights(labels, mode="exact"), component_weights(dense, mode="exact"))


def test_weights_of_cropped_whole_image_labels():
    """The paper labels lesions on the whole image and weighs each patch with in-patch counts."""
    mask = np.zeros((20, 20, 20), np.uint8)
    mask[2:5, 2:5, 2:5] = 1  # lesion A (27 voxels), outside the crop below
    mask[10, 10:18, 10] = 1  # lesion B, an L: 8 voxels along y ...
    mask[10, 17, 10:18] = 1  # ... and 8 along x; the crop keeps 8 + 3 = 11 of its 15 voxels
    mask[12:14, 12:14, 12:14] = 1  # lesion C, 8 voxels, inside the crop
    mask[16, 10, 10:16] = 1  # lesion D, a U: arm at y = 10 ...
    mask[16, 13, 10:16] = 1  # ... arm at y = 13 ...
    mask[16, 10:14, 15] = 1  # ... joined at x = 15, which the crop removes: D falls in two pieces
    labels, k = label_components(mask)
    assert k == 4
    crop = (slice(8, 20), slice(8, 20), slice(8, 14))  # 12 x 12 x 6 = 864 voxels
    sub = labels[crop]
    w = component_weights(sub, mode="exact")
    # In-crop counts: background 864 - 11 - 8 - 8 = 837, B 11, C 8, D 8 (two arms of 4, one id);
    # A is absent, so C = 4 components (K = 3): w = 864 / (4 * count).
    b_id, c_id, d_id = labels[10, 10, 10], labels[12, 12, 12], labels[16, 10, 10]
    assert w[sub == b_id] == pytest.approx(864 / 44)
    assert w[sub == c_id] == pytest.approx(864 / 32)
    assert w[sub == d_id] == pytest.approx(864 / 32)
    assert w[sub == 0] == pytest.approx(864 / (4 * 837))
    assert w.sum() == pytest.approx(864, rel=1e-5)
    # Relabelling the cropped mask instead splits D into two lesions of 4 voxels (K = 4),
    # which is not what the authors trained with.
    relabelled = inverse_weights(mask[crop], mode="exact")
    assert relabelled[8, 2, 2] == pytest.approx(864 / (5 * 4))  # (16, 10, 10) in crop coordinates
    assert not np.allclose(relabelled, w)


def test_torch_batch_is_weighted_per_sample():
    a = projection_touching_pair()
    b = np.zeros_like(a)
    b[2:6, 2:6, 2:6] = 1  # one 64-voxel lesion: 512/(2*64) = 4, background 512/(2*448)
    batch = torch.from_numpy(np.stack([a, b])[:, None]).float()
    w = inverse_weights(batch, mode="exact")
    assert isinstance(w, torch.Tensor) and w.dtype == torch.float32 and w.shape == batch.shape
    np.testing.assert_array_equal(w[0, 0].numpy(), inverse_weights(a, mode="exact"))
    np.testing.assert_array_equal(w[1, 0].numpy(), inverse_weights(b, mode="exact"))
    assert float(w[1, 0, 3, 3, 3]) == pytest.approx(4.0)
    # weights sum to N in each sample, not over the batch
    np.testing.assert_allclose(w.sum(dim=(1, 2, 3, 4)).numpy(), [512, 512], rtol=1e-5)
    # bool, uint8 and bfloat16 targets give the same weights
    for dtype in (torch.bool, torch.uint8, torch.bfloat16):
        assert torch.equal(inverse_weights(batch.to(dtype), mode="exact"), w)
    # component_weights on a tensor label map
    labels = torch.from_numpy(np.stack([label_components(a)[0], label_components(b)[0]])[:, None]).long()
    assert torch.equal(component_weights(labels, mode="exact"), w)


# --------------------------------------------------------------------------- properties


label_maps = arrays(np.int32, st.tuples(*[st.integers(1, 6)] * 3), elements=st.integers(0, 5))


@settings(max_examples=60, deadline=None)
@given(label_maps)
def test_exact_weights_sum_to_n_and_are_constant_per_component(labels):
    w = component_weights(labels, mode="exact").astype(np.float64)
    assert w.sum() == pytest.approx(labels.size, rel=1e-5)
    ids, counts = np.unique(labels, return_counts=True)
    for i, c in zip(ids, counts):
        sel = w[labels == i]
        assert np.allclose(sel, labels.size / (len(ids) * c), rtol=1e-6)
        # every component carries the same total weight N / (K+1)
        assert sel.sum() == pytest.approx(labels.size / len(ids), rel=1e-5)


@settings(max_examples=60, deadline=None)
@given(arrays(np.uint8, st.tuples(*[st.integers(1, 7)] * 3), elements=st.integers(0, 1)),
       st.floats(0.01, 5.0), st.floats(1.0, 1e3))
def test_clip_weights_within_bounds_and_monotone_in_size(mask, w_min, span):
    w_max = w_min * span
    w = inverse_weights(mask, w_min=w_min, w_max=w_max)
    assert np.all(w >= np.float32(w_min)) and np.all(w <= np.float32(w_max))
    exact = inverse_weights(mask, mode="exact")
    assert exact.sum() == pytest.approx(mask.size, rel=1e-5)
    np.testing.assert_allclose(w, np.clip(exact, w_min, w_max), rtol=1e-6)
    # a smaller component never gets a smaller weight
    labels, _ = label_components(mask)
    sizes = np.bincount(labels.ravel())[labels]
    order = np.argsort(sizes.ravel(), kind="stable")
    assert np.all(np.diff(exact.ravel()[order]) <= 1e-6 * exact.max())


# --------------------------------------------------------------------------- class balancing


def test_positive_class_weight_and_class_balance_map():
    t = np.zeros((4, 4, 4), np.uint8)
    t[0, 0, :4] = 1  # 4 of 64 voxels: w+ = (64 - 4) / 4 = 15
    assert positive_class_weight(t) == pytest.approx(15.0)
    w = class_balance_weights(t)
    assert np.all(w[t == 1] == 15.0) and np.all(w[t == 0] == 1.0) and w.dtype == np.float32
    # an empty target: the sum is floored at min_sum = 1 voxel -> w+ = 64 - 0 = 64
    assert positive_class_weight(np.zeros((4, 4, 4))) == pytest.approx(64.0)
    # torch, per sample and over the whole batch (n = numel, as the authors' WCE)
    tt = torch.from_numpy(np.stack([t, 1 - t])[:, None]).float()
    np.testing.assert_allclose(positive_class_weight(tt).numpy(), [15.0, 4 / 60])
    # whole batch: 64 positives of 128 -> (128 - 64) / 64 = 1
    assert float(positive_class_weight(tt, per_sample=False)) == pytest.approx(1.0)
    cw = class_balance_weights(tt)
    assert cw.shape == tt.shape and float(cw[0, 0, 0, 0, 0]) == 15.0 and float(cw[1, 0, 0, 0, 0]) == 1.0


def test_gdl_class_weights():
    t = np.zeros((4, 4, 4), np.uint8)
    t[0, 0, :3] = 1  # lesion 3 voxels, background 61: 1/(1+9) and 1/(1+3721)
    np.testing.assert_allclose(gdl_class_weights(t), [0.1, 1 / 3722])
    tt = torch.from_numpy(t)[None, None]
    np.testing.assert_allclose(gdl_class_weights(tt).numpy(), [[0.1, 1 / 3722]], rtol=1e-6)


# --------------------------------------------------------------------------- DBCE


def _brute_force_ball_dilation(mask: np.ndarray, radius: float) -> np.ndarray:
    """Reference: OR of the mask shifted by every offset with |offset| <= radius."""
    r = int(np.floor(radius))
    out = np.zeros(mask.shape, bool)
    src = mask.astype(bool)
    for dz, dy, dx in itertools.product(range(-r, r + 1), repeat=3):
        if dz * dz + dy * dy + dx * dx > radius * radius:
            continue
        if any(abs(d) >= n for d, n in zip((dz, dy, dx), src.shape)):
            continue  # shifted entirely out of the volume
        shifted = np.zeros_like(src)
        zs = slice(max(dz, 0), src.shape[0] + min(dz, 0))
        ys = slice(max(dy, 0), src.shape[1] + min(dy, 0))
        xs = slice(max(dx, 0), src.shape[2] + min(dx, 0))
        zd = slice(max(-dz, 0), src.shape[0] + min(-dz, 0))
        yd = slice(max(-dy, 0), src.shape[1] + min(-dy, 0))
        xd = slice(max(-dx, 0), src.shape[2] + min(-dx, 0))
        shifted[zs, ys, xs] = src[zd, yd, xd]
        out |= shifted
    return out


@settings(max_examples=30, deadline=None)
@given(arrays(np.uint8, st.tuples(*[st.integers(1, 9)] * 3), elements=st.integers(0, 1)).map(
    lambda m: m * (np.random.default_rng(m.size).random(m.shape) < 0.1)),
       st.sampled_from([0, 1, 1.5, 2, 2.5, 3]))
def test_dilate_ball_matches_brute_force(mask, radius):
    np.testing.assert_array_equal(dilate_ball(mask, radius), _brute_force_ball_dilation(mask, radius))


@pytest.mark.parametrize("radius", [1.8, 5, 7.5, 190])
def test_dilate_ball_matches_a_euclidean_distance_transform(rng, radius):
    from scipy import ndimage

    mask = rng.random((24, 20, 22)) < 0.003
    mask[3, 4, 5] = True
    expected = ndimage.distance_transform_edt(~mask) <= radius  # distance to the nearest lesion voxel
    np.testing.assert_array_equal(dilate_ball(mask, radius), expected)


def test_dilated_balance_weights_hand_case():
    mask = np.zeros((8, 8, 8), np.uint8)
    mask[4, 4, 4] = 1
    w = dilated_balance_weights(mask, radius=1)
    # the radius-1 ball is the voxel and its 6 face neighbours: |D| = 7
    # inside D: 512 / (2*7) = 36.571 ; outside: 512 / (2*505) = 0.50693
    assert np.count_nonzero(w > 1) == 7
    assert w[4, 4, 4] == pytest.approx(512 / 14) and w[4, 4, 5] == pytest.approx(512 / 14)
    assert w[4, 5, 5] == pytest.approx(512 / 1010)  # distance sqrt(2) > 1
    assert w.sum() == pytest.approx(512, rel=1e-5)
    # radius 0 is balanced CE: 512/(2*1) on the lesion, 512/(2*511) elsewhere
    w0 = dilated_balance_weights(mask, radius=0)
    assert w0[4, 4, 4] == pytest.approx(256) and w0[0, 0, 0] == pytest.approx(512 / 1022)
    # no lesion, or a dilation covering the whole patch: weight 1 everywhere
    assert np.all(dilated_balance_weights(np.zeros_like(mask), radius=2) == 1)
    assert np.all(dilated_balance_weights(mask, radius=20) == 1)
    # torch batch, per sample
    tt = torch.from_numpy(np.stack([mask, np.zeros_like(mask)])[:, None]).float()
    wt = dilated_balance_weights(tt, radius=1)
    np.testing.assert_array_equal(wt[0, 0].numpy(), w)
    assert torch.all(wt[1] == 1)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: inverse_weights(np.zeros((4, 4))), "3D array"),
        (lambda: inverse_weights(torch.zeros(2, 4, 4, 4)), r"\(B, 1, D, H, W\)"),
        (lambda: inverse_weights(torch.zeros(2, 2, 4, 4, 4)), r"\(B, 1, D, H, W\)"),
        (lambda: inverse_weights([[[0, 1]]]), "numpy array"),
        (lambda: inverse_weights(np.zeros((4, 4, 4)), connectivity=8), "connectivity"),
        (lambda: inverse_weights(np.zeros((4, 4, 4)), mode="soft"), "mode"),
        (lambda: inverse_weights(np.zeros((4, 4, 4)), w_min=3.0, w_max=2.0), "w_min"),
        (lambda: inverse_weights(np.zeros((4, 4, 4)), w_min=0.0), "w_min"),
        (lambda: component_weights(np.zeros((4, 4, 4), np.float32)), "integer"),
        (lambda: component_weights(np.zeros((4, 4, 4), bool)), "integer"),
        (lambda: component_weights(torch.zeros(1, 1, 4, 4, 4)), "integer"),
        (lambda: component_weights(-np.ones((4, 4, 4), np.int32)), ">= 0"),
        (lambda: dilated_balance_weights(np.zeros((4, 4, 4)), radius=-1), "radius"),
        (lambda: dilated_balance_weights(np.zeros((4, 4, 4)), radius=float("nan")), "radius"),
        (lambda: gdl_class_weights(np.zeros((4, 4, 4)), smooth=0), "smooth"),
        (lambda: class_balance_weights(np.zeros((4, 4, 4)), reference=np.zeros((4, 4, 5))), "shape"),
    ],
)
def test_bad_input_is_a_clear_input_error(call, message):
    with pytest.raises(InputError, match=message):
        call()
