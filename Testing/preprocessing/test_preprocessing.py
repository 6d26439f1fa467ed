"""Intensity presets and resampling: hand-made arrays, geometry round trips, a real chest CT."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from IWSegmentationLib.core.errors import InputError
from IWSegmentationLib.core.imageio import Geometry, read_image
from IWSegmentationLib.preprocessing.foreground import foreground_mask, lung_field
from IWSegmentationLib.preprocessing.intensity import preprocess
from IWSegmentationLib.preprocessing.presets import PARAM_KEYS, PRESETS, get_preset, validate_params
from IWSegmentationLib.preprocessing.resampling import (
    prepare_case,
    resample_to_geometry,
    resample_to_spacing,
    resampled_geometry,
)


def _vol(values, dtype=np.float32):
    return np.asarray(values, dtype=dtype).reshape(1, 1, -1)


def test_ct_lung_window_by_hand():
    # (x - (-1000)) / 1300 after clipping to [-1000, 300]: -350 -> 650/1300 = 0.5, 0 -> 1000/1300
    image = _vol([-3024, -1000, -350, 0, 300, 2000], np.int16)
    out = preprocess(image, get_preset("ct-lung"))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), [0.0, 0.0, 0.5, 1000 / 1300, 1.0, 1.0], atol=1e-7)
    assert image.ravel()[0] == -3024  # input untouched


def test_ct_liver_window_and_mask_by_hand():
    # (x + 300) / 600 after clipping to [-300, 300]: 0 -> 0.5, 150 -> 0.75
    image = _vol([-1000, -300, 0, 150, 300, 900])
    np.testing.assert_allclose(preprocess(image, get_preset("ct-liver")).ravel(), [0, 0, 0.5, 0.75, 1, 1], atol=1e-7)
    mask = _vol([1, 1, 0, 1, 0, 1], np.uint8)
    # outside the liver -> the window minimum -300 HU -> 0
    np.testing.assert_allclose(
        preprocess(image, get_preset("ct-liver"), mask=mask).ravel(), [0, 0, 0, 0.75, 0, 1], atol=1e-7
    )


def test_lung_mask_sets_outside_to_minimum():
    image = _vol([-800, 100, 40, -1000])
    mask = _vol([True, False, True, True], bool)
    np.testing.assert_allclose(
        preprocess(image, get_preset("ct-lung"), mask=mask).ravel(), [200 / 1300, 0.0, 1040 / 1300, 0.0], atol=1e-7
    )


def test_mr_percentile_scaling_by_hand():
    # 0..999: numpy's linear percentiles are at positions q/100 * 999:
    #   p0.5 = 4.995, p99.5 = 994.005; 500 -> (500 - 4.995) / 989.01 = 0.50050555
    image = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    out = preprocess(image, get_preset("mr"))
    assert out.min() == 0.0 and out.max() == 1.0  # 0..4 and 995..999 clip
    assert out.ravel()[500] == pytest.approx(495.005 / 989.01, abs=1e-6)
    assert np.count_nonzero(out == 0.0) == 5 and np.count_nonzero(out == 1.0) == 5


def test_mr_zscore_by_hand():
    # [1, 2, 3, 4]: mean 2.5, population std sqrt(1.25) = 1.118034
    out = preprocess(_vol([1, 2, 3, 4]), get_preset("mr", scaling="zscore"))
    np.testing.assert_allclose(out.ravel(), np.array([-1.5, -0.5, 0.5, 1.5]) / math.sqrt(1.25), atol=1e-6)


def test_mr_ignores_a_mask_and_constant_image_is_safe():
    image = _vol([3, 3, 3, 3])
    out = preprocess(image, get_preset("mr"), mask=_vol([0, 0, 1, 1], np.uint8))
    np.testing.assert_array_equal(out, 0.0)


@settings(max_examples=30, deadline=None)
@given(arrays(np.int16, st.integers(1, 40), elements=st.integers(-4000, 4000)))
def test_window_scaling_is_monotone_and_in_unit_range(values):
    image = np.sort(values).reshape(1, 1, -1)
    out = preprocess(image, get_preset("ct-lung")).ravel()
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.all(np.diff(out) >= 0)


def test_bad_images_are_clear_errors():
    with pytest.raises(InputError, match="2 NaN or infinite"):
        preprocess(_vol([0.0, np.nan, 1.0, np.inf]), get_preset("ct-lung"))
    with pytest.raises(InputError, match="3D array"):
        preprocess(np.zeros((4, 4), np.float32), get_preset("ct-lung"))
    with pytest.raises(InputError, match="mask shape"):
        preprocess(_vol([0, 1]), get_preset("ct-lung"), mask=np.ones((1, 1, 3)))
    with pytest.raises(InputError, match="real numbers"):
        preprocess(np.zeros((2, 2, 2), np.complex64), get_preset("mr"))


def test_presets_validation_and_json_round_trip():
    assert set(PRESETS) == {"ct-lung", "ct-liver", "mr"}
    for name in PRESETS:
        params = get_preset(name)
        assert tuple(sorted(params)) == tuple(sorted(PARAM_KEYS))
        assert validate_params(json.loads(json.dumps(params))) == params  # as read from a checkpoint
    assert get_preset("ct-lung", target_spacing=[1.25, None, 0.7])["target_spacing"] == [1.25, None, 0.7]
    with pytest.raises(InputError, match=r"unknown preprocessing key.*'window'.*valid keys: name"):
        get_preset("ct-lung", window=[0, 1])
    with pytest.raises(InputError, match="unknown preprocessing preset 'ct-brain'"):
        get_preset("ct-brain")
    with pytest.raises(InputError, match="lo < hi"):
        get_preset("ct-lung", clip=[300, -1000])
    with pytest.raises(InputError, match="needs a 'clip'"):
        get_preset("ct-lung", clip=None)
    with pytest.raises(InputError, match="target_spacing"):
        get_preset("mr", target_spacing=[1, 1])
    with pytest.raises(InputError, match="percentiles"):
        get_preset("mr", percentiles=[99, 1])


def test_foreground_mask():
    image = _vol([-1000, -950, -850, 40])
    np.testing.assert_array_equal(foreground_mask(image, get_preset("ct-lung")).ravel(), [0, 0, 1, 1])
    np.testing.assert_array_equal(
        foreground_mask(image, get_preset("ct-lung"), mask=_vol([1, 0, 0, 0], np.uint8)).ravel(), [1, 0, 0, 0]
    )
    assert foreground_mask(image, get_preset("mr")) is None


def _chest(shape=(24, 160, 160)) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A chest-like HU volume: outside air -1000, an elliptic body 40 HU, two lungs -850 HU,
    a nodule inside the left lung and a mass on the right lung's outer wall, half of it
    outside the aerated lung (in the chest wall); regions returned for the checks."""
    d, h, w = shape
    z, y, x = np.ogrid[:d, :h, :w]
    body = ((y - h / 2) / (0.40 * h)) ** 2 + ((x - w / 2) / (0.45 * w)) ** 2 <= 1
    lungs = [((y - h / 2) / (0.25 * h)) ** 2 + ((x - w / 2 - s * 0.2 * w) / (0.12 * w)) ** 2 <= 1 for s in (-1, 1)]
    lung = (lungs[0] | lungs[1]) & (z >= 3) & (z < d - 3)
    image = np.full(shape, -1000, np.int16)
    image[np.broadcast_to(body, shape)] = 40
    image[lung] = -850
    nodule = (z - 12) ** 2 + (y - h / 2) ** 2 + (x - (w / 2 - 0.2 * w)) ** 2 <= 9
    # the right lung ends at x = w/2 + 0.32 w = 131.2; the mass (radius 6) reaches 134: 3 voxels in the wall
    mass = (z - 12) ** 2 + (y - h / 2) ** 2 + (x - (w / 2 + 0.30 * w)) ** 2 <= 36
    image[nodule | mass] = 30
    return image, {"body": np.broadcast_to(body, shape), "lung": lung, "nodule": nodule, "mass": mass}


def test_lung_field_keeps_lungs_and_lesions_and_drops_outside_air():
    image, parts = _chest()
    field = lung_field(image, (2.0, 1.0, 1.0))
    assert field.shape == image.shape and field.dtype == bool
    # the mass's aerated side ends at x = 128 - 6 = 122 and its wall side reaches 134: 12 mm at
    # 1 mm voxels, inside the default 15 mm margin (and not enclosed by air, so no hole filling)
    for name in ("lung", "nodule", "mass"):
        assert field[parts[name]].all(), name
    assert not field[:, :5, :5].any()  # the air around the patient (touching the border) is not lung
    # the 15 mm margin is a box: nothing farther than 15·√3 mm (+ a voxel) from the lungs is in the field
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(~(parts["lung"] | parts["mass"]), sampling=(2.0, 1.0, 1.0))
    assert not field[distance > 15 * math.sqrt(3) + 2].any()
    assert field.mean() < parts["body"].mean()
    small_margin = lung_field(image, (2.0, 1.0, 1.0), margin_mm=4.0)
    assert not small_margin[parts["mass"]].all()  # a 4 mm margin loses the outer part of the mass


def test_lung_field_margin_is_bounded_by_the_image():
    """A 1e-6 mm spacing asked maximum_filter for a 30,000,001-voxel window (15 mm margin): it hung.
    A window of 2n - 1 voxels already reaches the whole axis from every voxel, so the margin is
    capped there: the same answer at once. Hand-worked: one enclosed air box in a 20 x 40 x 40
    volume, grown by more than the image on every axis, fills the whole volume; at 1 mm it grows
    by 15 voxels only, so the corner voxel (0, 39, 39), 24 voxels in-plane from the box, stays out."""
    import time

    image = np.zeros((20, 40, 40), np.float32)
    image[:, 0, :] = -1000  # air touching the border: not lung
    image[5:15, 10:20, 10:20] = -900
    start = time.monotonic()
    field = lung_field(image, (1e-6, 1e-6, 1e-6))
    assert time.monotonic() - start < 5.0
    assert field.all()
    one_mm = lung_field(image, (1.0, 1.0, 1.0))
    assert one_mm[10, 15, 15] and not one_mm[0, 39, 39]


def test_lung_field_absent_falls_back_to_the_body_threshold():
    """An image without enclosed air (a body in air, no lungs): no lung field, and the ct-lung
    foreground falls back to the body threshold, saying so."""
    image, parts = _chest()
    image[parts["lung"]] = 40
    assert lung_field(image) is None
    said = []
    fg = foreground_mask(image, get_preset("ct-lung"), on_warning=said.append)
    np.testing.assert_array_equal(fg, image > -900)
    assert len(said) == 1 and "body threshold" in said[0]
    image, parts = _chest()
    fg = foreground_mask(image, get_preset("ct-lung"), spacing_zyx=(2.0, 1.0, 1.0))
    assert fg[parts["lung"]].all() and fg.sum() < (image > -900).sum()


def test_lung_field_of_real_chest_cts_holds_every_tumour_voxel(clinical_data):
    """The pyradiomics chest CTs (5 mm slices): every voxel of the reference tumour masks lies in
    the lung field (lung2's tumour sits on the posterior chest wall), and the field is smaller
    than the body."""
    for case in ("lung1", "lung2"):
        image, geometry = read_image(clinical_data / f"{case}_image.nrrd")
        label, _ = read_image(clinical_data / f"{case}_label.nrrd")
        field = lung_field(image, geometry.spacing_zyx)
        assert field is not None and field[label > 0].all(), case
        assert field.mean() < 0.7 * (image > -900).mean(), case


# ----------------------------------------------------------------------------- resampling


def _oblique_geometry(shape_zyx=(9, 20, 17), spacing_zyx=(4.0, 0.8, 0.9)) -> Geometry:
    a = math.radians(30)
    direction = (math.cos(a), -math.sin(a), 0.0, math.sin(a), math.cos(a), 0.0, 0.0, 0.0, 1.0)
    return Geometry(size=tuple(shape_zyx[::-1]), spacing=tuple(spacing_zyx[::-1]),
                    origin=(-12.5, 40.0, 7.25), direction=direction)


def _corner(g: Geometry) -> np.ndarray:
    """Physical position of the outer corner of voxel 0 (its centre minus half a voxel)."""
    return np.asarray(g.index_to_physical((-0.5, -0.5, -0.5)))


def test_resampled_geometry_by_hand():
    # z: 9 slices of 4 mm -> 36 mm -> 1.25 mm gives round(28.8) = 29 slices;
    # y: 20 x 0.8 = 16 mm / 1.25 = 12.8 -> 13; x kept (None): 17 x 0.9
    g = _oblique_geometry()
    new = resampled_geometry(g, [1.25, 1.25, None])
    assert new.shape_zyx == (29, 13, 17)
    assert new.spacing == (0.9, 1.25, 1.25)
    assert new.direction == g.direction
    np.testing.assert_allclose(_corner(new), _corner(g), atol=1e-9)  # voxel edges aligned
    assert resampled_geometry(g, [None, None, None]) == g


def test_resampling_round_trip_keeps_geometry_and_values():
    g = _oblique_geometry()
    zz, yy, xx = np.meshgrid(*(np.arange(n, dtype=float) for n in g.shape_zyx), indexing="ij")
    # an affine function of physical position, which trilinear interpolation reproduces exactly
    ijk = np.stack([xx, yy, zz], -1) * np.asarray(g.spacing)
    phys = ijk @ g.direction_matrix.T + np.asarray(g.origin)
    image = (phys @ np.array([0.3, -0.2, 0.5]) + 10.0).astype(np.float32)

    iso, g_iso = resample_to_spacing(image, g, [1.0, 1.0, 1.0])
    assert iso.dtype == np.float32 and iso.shape == g_iso.shape_zyx == (36, 16, 15)
    back = resample_to_geometry(iso, g_iso, g)
    assert back.shape == image.shape
    inner = (slice(1, -1),) * 3
    np.testing.assert_allclose(back[inner], image[inner], atol=2e-3)
    # borders: ITK extends edge voxels by half a voxel, so no zero band appears
    assert np.abs(back - image).max() < 1.5


def test_mask_resampling_is_nearest_and_keeps_labels():
    g = _oblique_geometry()
    mask = np.zeros(g.shape_zyx, np.uint8)
    mask[3:6, 5:15, 4:12] = 1
    mask[7, 2, 2] = 2
    out, g_iso = resample_to_spacing(mask, g, [1.0, 1.0, 1.0], is_mask=True)
    assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1, 2}
    # volume in mm^3 kept within a few percent: 3*10*8 voxels of 4*0.8*0.9 mm^3
    volume = np.count_nonzero(out == 1) * 1.0
    assert volume == pytest.approx(240 * 2.88, rel=0.1)


def test_prepare_case_resamples_image_and_mask_together():
    g = _oblique_geometry()
    image = np.full(g.shape_zyx, -1000, np.int16)
    image[2:7, 4:16, 3:14] = 40
    lung = (image == 40).astype(np.uint8)
    params = get_preset("ct-lung", target_spacing=[2.0, 1.6, 1.8])
    x, g2, m2 = prepare_case(image, g, params, mask=lung)
    assert x.dtype == np.float32 and x.shape == m2.shape == g2.shape_zyx == (18, 10, 9)
    assert set(np.unique(m2)) == {0, 1}
    assert np.all(x[m2 == 0] == 0.0) and x.max() == pytest.approx(1040 / 1300)
    with pytest.raises(InputError, match="does not match its geometry"):
        prepare_case(image[:-1], g, params)


# ----------------------------------------------------------------------------- real CT


@pytest.mark.realdata
def test_real_chest_ct_lung_preset_and_resampling(clinical_data):
    image, geometry = read_image(clinical_data / "lung1_image.nrrd")
    nodule, _ = read_image(clinical_data / "lung1_label.nrrd")
    assert geometry.spacing_zyx[0] == pytest.approx(5.0)  # 5 mm slices
    params = get_preset("ct-lung")
    out = preprocess(image, params)
    assert out.dtype == np.float32 and out.shape == image.shape
    assert out.min() == 0.0 and out.max() == 1.0  # the scan holds -1024 and 3071 HU
    # air (< -1000 HU after clipping) and the body both present
    assert 0.05 < np.mean(out == 0.0) < 0.9

    # 1.25 mm isotropic: z 48 * 5 / 1.25 = 192, y/x 512 * 0.5703125 / 1.25 = 233.6 -> 234
    params = get_preset("ct-lung", target_spacing=[1.25, 1.25, 1.25])
    x, g_iso, m_iso = prepare_case(image, geometry, params)
    assert x.shape == g_iso.shape_zyx == (192, 234, 234)
    assert x.min() >= 0.0 and x.max() <= 1.0
    np.testing.assert_allclose(_corner(g_iso), _corner(geometry), atol=1e-6)
    # the nodule keeps its physical volume within 10% through nearest-neighbour resampling
    n_iso, _ = resample_to_spacing((nodule > 0).astype(np.uint8), geometry, [1.25] * 3, is_mask=True)
    vol = np.count_nonzero(nodule) * np.prod(geometry.spacing)
    assert np.count_nonzero(n_iso) * 1.25**3 == pytest.approx(vol, rel=0.1)


@settings(max_examples=30, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 6)),
              elements=st.floats(-1e4, 1e4, width=32)))
def test_mr_scalings_are_bounded_and_order_preserving(image):
    out = preprocess(image, get_preset("mr"))
    assert out.dtype == np.float32 and out.shape == image.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    order = np.argsort(image, axis=None, kind="stable")
    assert np.all(np.diff(out.ravel()[order]) >= 0)  # a monotone map of the intensities
    z = preprocess(image, get_preset("mr", scaling="zscore"))
    assert abs(float(z.astype(np.float64).mean())) < 1e-3 * max(1.0, float(np.abs(z).max()))
