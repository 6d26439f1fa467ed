"""The lesions-by-size picture (:func:`IWSegmentationLib.slicer.views.render_lesions_png`), on real files.

A synthetic case is written with SimpleITK: a 1 mm isotropic grid (identity direction, so
LPS x grows towards the patient's left) holding a large sphere (radius 12 mm, equivalent
diameter ~24 mm >= 20 mm: *large* in the lung preset) at x = 26 and a small one (radius 3 mm,
~6 mm < 10 mm: *small*) at x = 72, both centred on slice z = 24, row y = 32. Hand reasoning:

* both lesions lie on the axial slice through either centroid, so the picture's slices go
  through the larger one (ties go to the larger lesion);
* the axial view is radiological (patient right on the screen's left) and low LPS x is the
  patient's right, so the large lesion's blue is left of the small lesion's vermillion;
* the coronal slice (y = 32) crosses both; the sagittal slice (x = 26) only the large one;
* an empty mask gives a picture with no coloured pixel in any view (grey image, white text).

The rendering tests skip, saying why, without slicer-core or offscreen OpenGL; the input
checks run everywhere.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from IWSegmentationLib.core import errors, imageio
from IWSegmentationLib.core.lesions import SIZE_GROUP_COLORS
from IWSegmentationLib.slicer import views

SHAPE = (48, 64, 96)  # z, y, x voxels of 1 mm
VIEW = (200, 200)
LARGE_CENTER, LARGE_RADIUS = (24, 32, 26), 12.0
SMALL_CENTER, SMALL_RADIUS = (24, 32, 72), 3.0


def _sphere(center, radius) -> np.ndarray:
    z, y, x = np.ogrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    return (z - center[0]) ** 2 + (y - center[1]) ** 2 + (x - center[2]) ** 2 <= radius**2


def _write_case(folder, mask: np.ndarray, geometry: imageio.Geometry | None = None):
    geometry = geometry or imageio.Geometry.identity(SHAPE)
    z, y, x = np.indices(SHAPE)
    image = (-200.0 + 2.0 * x + 40.0 * mask).astype(np.float32)  # a grey ramp, lesions brighter
    image_path = imageio.write_image(folder / "case_001.nii.gz", image, imageio.Geometry.identity(SHAPE))
    mask_path = imageio.write_image(folder / "case_001_mask.nii.gz", mask.astype(np.uint8), geometry)
    return image_path, mask_path


@pytest.fixture(scope="module")
def renderer_ready():
    try:
        views.probe_offscreen()
    except views.OffscreenRenderingError as exc:
        pytest.skip(str(exc))


def _panel(picture: views.LesionPicture, rgb: np.ndarray, name: str) -> np.ndarray:
    left, top, right, bottom = picture.panels[name]
    return rgb[top:bottom, left:right].astype(int)


def _pure(panel: np.ndarray, group: str) -> np.ndarray:
    """Pixels drawn in exactly the group's colour (the segment outline, opacity 1), within 3 levels."""
    return np.abs(panel - np.array(SIZE_GROUP_COLORS[group])).max(axis=-1) <= 3


@pytest.mark.slicer
def test_picture_shows_lesions_in_their_size_colours(renderer_ready, tmp_path, output_dir):
    from PIL import Image

    mask = _sphere(LARGE_CENTER, LARGE_RADIUS) | _sphere(SMALL_CENTER, SMALL_RADIUS)
    image_path, mask_path = _write_case(tmp_path, mask)
    out = tmp_path / "lesions.png"
    picture = views.render_lesions_png(image_path, mask_path, out, "lung", view_size=VIEW)

    rgb = np.asarray(Image.open(out).convert("RGB"))
    # 4 views of 200 px, 3 gaps of 6 px, margins of 12 px: 24 + 800 + 18 = 842 wide;
    # header 78 + views 200 + legend 16 + 2 lines x 22 + 12 = 350 high (at this width the note
    # goes on a second line under the swatches).
    assert rgb.shape == (350, 842, 3) and picture.size == (842, 350)
    assert picture.counts == {"small": 1, "medium": 0, "large": 1}
    assert picture.focus["size_group"] == "large"
    assert not list(tmp_path.glob(".*partial*")), "temporary file left behind"

    axial = _panel(picture, rgb, "axial")
    blue, red = _pure(axial, "large"), _pure(axial, "small")
    assert blue.sum() > 20 and red.sum() > 5, (blue.sum(), red.sum())
    assert not _pure(axial, "medium").any()
    cols = np.indices(blue.shape)[1]
    assert cols[blue].mean() < VIEW[0] / 2 < cols[red].mean(), "large lesion must be on the patient's right (left)"
    coronal, sagittal = _panel(picture, rgb, "coronal"), _panel(picture, rgb, "sagittal")
    assert _pure(coronal, "large").any() and _pure(coronal, "small").any()
    assert _pure(sagittal, "large").any() and not _pure(sagittal, "small").any()
    # 3D: shaded surfaces, so only the hue: blue-dominant and red-dominant pixels both present.
    three_d = _panel(picture, rgb, "3d")
    assert ((three_d[..., 2] - three_d[..., 0]) > 60).sum() > 50
    assert ((three_d[..., 0] - three_d[..., 2]) > 60).sum() > 5
    shutil.copyfile(out, output_dir / "lesions_by_size_synthetic.png")


FP_CENTER, FP_RADIUS = (24, 32, 50), 3.0


@pytest.mark.slicer
def test_review_picture_shows_false_positives_and_misses(renderer_ready, tmp_path, output_dir):
    """Reference: the large and the small sphere. Prediction: the large sphere (a TP, kept in its
    size colour) and a sphere at x = 50 that no reference lesion overlaps (an FP). The small
    sphere is missed. All three lie on slice z = 24, so the axial view shows, left to right
    (radiological: low x on the left), the TP's blue, the FP's purple and the miss's sky-blue
    outline, and no vermillion (the small lesion was not predicted)."""
    from PIL import Image

    reference = _sphere(LARGE_CENTER, LARGE_RADIUS) | _sphere(SMALL_CENTER, SMALL_RADIUS)
    predicted = _sphere(LARGE_CENTER, LARGE_RADIUS) | _sphere(FP_CENTER, FP_RADIUS)
    image_path, mask_path = _write_case(tmp_path, predicted)
    ref_path = imageio.write_image(tmp_path / "case_001_ref.nii.gz", reference.astype(np.uint8),
                                   imageio.Geometry.identity(SHAPE))
    out = tmp_path / "review.png"
    picture = views.render_lesions_png(image_path, mask_path, out, "lung", view_size=VIEW, reference=ref_path)
    assert picture.review == {"TP": 1, "FP": 1, "FN": 1}
    assert picture.counts == {"small": 1, "medium": 0, "large": 1}  # the predicted lesions, by size
    rgb = np.asarray(Image.open(out).convert("RGB"))
    axial = _panel(picture, rgb, "axial")

    def pure(colour):
        return np.abs(axial - np.array(colour)).max(axis=-1) <= 3

    tp, fp, fn = pure(SIZE_GROUP_COLORS["large"]), pure(views.REVIEW_COLORS["FP"]), pure(views.REVIEW_COLORS["FN"])
    assert tp.sum() > 20 and fp.sum() > 5 and fn.sum() > 5, (tp.sum(), fp.sum(), fn.sum())
    assert not _pure(axial, "small").any()
    cols = np.indices(tp.shape)[1]
    assert cols[tp].mean() < cols[fp].mean() < cols[fn].mean()
    # the legend names both review colours: their swatches are drawn below the views
    below = rgb[picture.panels["axial"][3]:].astype(int)
    for colour in views.REVIEW_COLORS.values():
        assert (np.abs(below - np.array(colour)).max(axis=-1) == 0).sum() >= 20 * 16
    shutil.copyfile(out, output_dir / "lesions_review_synthetic.png")


@pytest.mark.slicer
def test_empty_mask_gives_a_picture_without_lesion_colour(renderer_ready, tmp_path):
    from PIL import Image

    image_path, mask_path = _write_case(tmp_path, np.zeros(SHAPE, bool))
    out = tmp_path / "empty.png"
    out.write_bytes(b"old")
    picture = views.render_lesions_png(image_path, mask_path, out, view_size=VIEW)
    assert picture.counts == {"small": 0, "medium": 0, "large": 0} and picture.focus is None
    rgb = np.asarray(Image.open(out).convert("RGB")).astype(int)
    for name in picture.panels:
        panel = _panel(picture, rgb, name)
        spread = panel.max(axis=-1) - panel.min(axis=-1)
        assert spread.max() <= 2, f"{name}: coloured pixels without lesions"


def test_bad_inputs_name_the_file(tmp_path):
    mask = _sphere(SMALL_CENTER, SMALL_RADIUS)
    image_path, mask_path = _write_case(tmp_path, mask)
    with pytest.raises(errors.InputError, match="missing_mask.nii.gz"):
        views.render_lesions_png(image_path, tmp_path / "missing_mask.nii.gz", tmp_path / "a.png")
    with pytest.raises(errors.InputError, match=r"\.png"):
        views.render_lesions_png(image_path, mask_path, tmp_path / "a.jpg")
    with pytest.raises(errors.InputError, match="unknown size preset"):
        views.render_lesions_png(image_path, mask_path, tmp_path / "a.png", "kidney")

    shifted = imageio.Geometry(size=SHAPE[::-1], spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 2.0),
                               direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    _, shifted_mask = _write_case(tmp_path, mask, shifted)
    with pytest.raises(errors.GeometryMismatchError, match="case_001_mask.nii.gz"):
        views.render_lesions_png(image_path, shifted_mask, tmp_path / "a.png")
    assert not list(tmp_path.glob("*.png")), "nothing written on bad input"
