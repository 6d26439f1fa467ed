"""Screenshots rendered by Slicer's own displayable managers (slicer-core, offscreen), checked.

The scene is built by :mod:`IWSegmentationLib.slicer.mrml` from a synthetic CT case (oblique,
anisotropic grid, lesions of all three size groups). Axial and coronal slice views and a 3D view
are rendered offscreen (EGL, :mod:`IWSegmentationLib.slicer.views`) by Slicer's slice logic and its
segmentation displayable managers, the same code that draws Slicer's views, and saved to
``Testing/_output/screenshots/`` for a person to look at. Then, on the pixels:

* slice views — every pixel is predicted from the mask: where the nearest voxel is lesion
  ``n`` (at least 2 pixels inside), the pixel is Slicer's 2D fill, ``B + α (c_n − B)`` with
  ``B`` the same view rendered with the segments hidden, ``α`` the display node's fill
  opacity and ``c_n`` the segment's colour; at least 2 pixels away from every lesion the pixel
  is exactly ``B``. Each lesion is probed on a slice through its centroid (via the view's
  XY -> RAS matrix);
* 3D view — no lesion colour outside the lesions' projections, and each unoccluded lesion's
  centroid pixel is, of the palette and the background, closest in chromaticity to its own
  size-group colour;
* the size legend (``Resources/Icons/SizeLegend.png``) has exactly the colours recovered from
  the rendered fill;
* each screenshot matches its baseline in ``Testing/Baseline/`` within a tolerance.

Regenerate the baselines after an intended change of the look:
``IWSEG_UPDATE_BASELINES=1 .venv/bin/pytest Testing/slicer/test_screenshots.py`` (then look at them).
The tests skip, saying why, when slicer-core is missing or offscreen OpenGL cannot start.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from IWSegmentationLib.core import imageio, lesions
from IWSegmentationLib.slicer import mrml, views

ROOT = Path(__file__).resolve().parents[2]
BASELINE_DIR = ROOT / "Testing" / "Baseline"
LEGEND = ROOT / "Resources" / "Icons" / "SizeLegend.png"
UPDATE_BASELINES = os.environ.get("IWSEG_UPDATE_BASELINES", "") not in ("", "0")
VIEW_SIZE = (320, 320)  # width, height in pixels

#: Baseline tolerance: a pixel "differs" when a channel is off by more than PIXEL_TOL; at most
#: this fraction of pixels may differ (3D shading varies a little between OpenGL drivers).
PIXEL_TOL = 24
MAX_DIFFERING = {"axial": 0.005, "coronal": 0.005, "3d": 0.03}

pytestmark = pytest.mark.slicer

# ---------------------------------------------------------------------------- offscreen OpenGL


@pytest.fixture(scope="module")
def offscreen():
    """Skip (with the reason) unless slicer-core imports and an offscreen OpenGL window renders
    (:func:`IWSegmentationLib.slicer.views.probe_offscreen`, which probes in a subprocess)."""
    try:
        return views.probe_offscreen()
    except views.OffscreenRenderingError as exc:
        pytest.skip(str(exc))


# ---------------------------------------------------------------------------- the scene


def _oblique_geometry(shape_zyx, spacing_zyx) -> imageio.Geometry:
    # 12 degrees about the S axis: axial views show the grid rotated, coronal views oblique.
    a = math.radians(12.0)
    direction = np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    return imageio.Geometry(size=tuple(shape_zyx[::-1]), spacing=tuple(spacing_zyx[::-1]),
                            origin=(-50.0, -60.0, -40.0), direction=tuple(direction.ravel()))


@pytest.fixture(scope="module")
def case(offscreen):
    """The scene: a synthetic liver CT (seed 5: 6 lesions, all size groups) and its segments."""
    from IWSegmentationLib.data import synth

    data = synth.synth_case(5, (40, 128, 128), "ct-liver", mean_lesions=6, diameter_range=(4, 30))
    geometry = _oblique_geometry(data.image.shape, data.spacing)
    scene, app_logic = mrml.headless_scene()
    volume = mrml.add_volume_from_array(scene, data.image, geometry, "Synthetic CT")
    display = volume.GetDisplayNode()
    display.SetAutoWindowLevel(0)
    display.SetWindowLevel(400, 40)
    segmentation = mrml.lesion_segmentation(scene, volume, data.label, size_thresholds_mm=(10.0, 20.0))
    rows = mrml.lesion_rows(segmentation)
    # Lesion number per voxel, computed here from the mask (scipy, not mrml): 26-connected
    # components numbered by decreasing size, the order mrml documents.
    from scipy import ndimage

    components, k = ndimage.label(data.label, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(components.ravel())[1:]
    assert len(set(sizes.tolist())) == k == len(rows), "lesion sizes must be distinct to number them"
    lut = np.zeros(k + 1, np.int32)
    lut[1 + np.argsort(-sizes)] = np.arange(1, k + 1)
    labels = lut[components]
    assert [r["voxels"] for r in rows] == sorted(sizes.tolist(), reverse=True)
    seg = segmentation.GetSegmentation()
    assert {r["size_group"] for r in rows} == set(lesions.SIZE_GROUPS)
    colors = {row["id"]: np.round(np.array(seg.GetSegment(row["segment_id"]).GetColor()) * 255) for row in rows}
    return {"scene": scene, "app": app_logic, "volume": volume, "segmentation": segmentation, "rows": rows,
            "labels": labels, "geometry": geometry, "colors": colors}


def _probe_voxel(labels: np.ndarray, number: int) -> np.ndarray:
    """The lesion's centroid voxel, or its deepest voxel when the centroid is outside it."""
    from scipy import ndimage

    inside = labels == number
    centroid = np.round(np.argwhere(inside).mean(axis=0)).astype(int)
    if inside[tuple(centroid)]:
        return centroid
    depth = ndimage.distance_transform_edt(inside)
    return np.array(np.unravel_index(np.argmax(depth), depth.shape))


def _ras_of(geometry: imageio.Geometry, zyx) -> np.ndarray:
    return (mrml.ijk_to_ras_matrix(geometry) @ np.r_[np.asarray(zyx, float)[::-1], 1.0])[:3]


def _expected_labels(case, view: views.SliceView) -> np.ndarray:
    """Lesion number shown at each pixel: that of the voxel nearest the pixel's RAS point."""
    return view.sample(case["labels"], mrml.ijk_to_ras_matrix(case["geometry"]))


def _render_pair(view, segmentation):
    """(with segments, without segments) captures of the same view."""
    display = segmentation.GetDisplayNode()
    shown = view.capture()
    display.SetVisibility(0)
    hidden = view.capture()
    display.SetVisibility(1)
    return shown, hidden


def _save_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)


def _check_baseline(name: str, rgb: np.ndarray) -> None:
    from PIL import Image

    path = BASELINE_DIR / f"{name}.png"
    if UPDATE_BASELINES:
        _save_png(path, rgb)
        return
    assert path.exists(), f"no baseline {path}; create it with IWSEG_UPDATE_BASELINES=1 and look at it"
    baseline = np.asarray(Image.open(path).convert("RGB"))
    assert baseline.shape == rgb.shape, f"{name}: size {rgb.shape} differs from the baseline's {baseline.shape}"
    differing = np.mean(np.abs(baseline.astype(int) - rgb.astype(int)).max(axis=-1) > PIXEL_TOL)
    assert differing <= MAX_DIFFERING[name], (
        f"{name}: {differing:.2%} of pixels differ from {path} (allowed {MAX_DIFFERING[name]:.1%}); if the change "
        "is intended, regenerate with IWSEG_UPDATE_BASELINES=1 and look at the new image"
    )


# ---------------------------------------------------------------------------- tests


def _check_slice_pixels(case, view, shown, hidden, alpha):
    from scipy import ndimage

    expected = _expected_labels(case, view)
    lesion = expected > 0
    far = ~ndimage.binary_dilation(lesion, iterations=2)
    diff = np.abs(shown.astype(int) - hidden.astype(int)).max(axis=-1)
    assert diff[far].max() <= 2, "lesion colour drawn where there is no lesion"
    deep = ndimage.binary_erosion(lesion, iterations=2)
    if deep.any():
        colors = np.zeros(shown.shape, float)
        for number, color in case["colors"].items():
            colors[expected == number] = color
        predicted = hidden + alpha * (colors - hidden)
        err = np.abs(shown.astype(float) - predicted).max(axis=-1)
        assert err[deep].max() <= 3.0, f"fill colour off by {err[deep].max():.1f} inside a lesion"
    return expected


@pytest.mark.parametrize("orientation", ["Axial", "Coronal"])
def test_slice_view_colours_every_lesion(case, orientation, output_dir):
    view = views.SliceView(case["scene"], case["app"], "Red" if orientation == "Axial" else "Green", orientation,
                           VIEW_SIZE)
    view.show(case["volume"])
    display = case["segmentation"].GetDisplayNode()
    alpha = display.GetOpacity2DFill() * display.GetOpacity()
    recovered = {}
    for row in case["rows"]:
        voxel = _probe_voxel(case["labels"], row["id"])
        ras = _ras_of(case["geometry"], voxel)
        view.through(ras)
        shown, hidden = _render_pair(view, case["segmentation"])
        _check_slice_pixels(case, view, shown, hidden, alpha)
        r, c = view.ras_to_pixel(ras)
        assert _expected_labels(case, view)[r, c] == row["id"]
        p, b = shown[r, c].astype(float), hidden[r, c].astype(float)
        color = case["colors"][row["id"]]
        # The centroid pixel is the fill: the segment's colour blended over the image at α.
        np.testing.assert_allclose(p, b + alpha * (color - b), atol=3.0, err_msg=row["name"])
        recovered.setdefault(row["size_group"], []).append(b + (p - b) / alpha)
    # The legend's swatches are the colours the views draw (recovered from the blend, ±2/α).
    from PIL import Image

    legend = np.asarray(Image.open(LEGEND).convert("RGB")).reshape(-1, 3)
    for group, values in recovered.items():
        drawn = np.mean(values, axis=0)
        assert np.any(np.abs(legend.astype(float) - drawn).max(axis=1) <= 4.5), (group, drawn)
        np.testing.assert_allclose(drawn, lesions.SIZE_GROUP_COLORS[group], atol=4.5)

    # The screenshot: of the slices through the lesions' centroids, the one showing most lesions.
    def lesions_shown(row):
        view.through(_ras_of(case["geometry"], _probe_voxel(case["labels"], row["id"])))
        return len(np.unique(_expected_labels(case, view))) - 1, -row["id"]

    best = max(case["rows"], key=lesions_shown)
    view.through(_ras_of(case["geometry"], _probe_voxel(case["labels"], best["id"])))
    shot = view.capture()
    name = orientation.lower()
    _save_png(output_dir / "screenshots" / f"{name}.png", shot)
    _check_baseline(name, shot)


def test_three_d_view(case, output_dir):
    from scipy import ndimage

    view = views.ThreeDView(case["scene"], case["app"], size=VIEW_SIZE)
    view.look_from_anterior()
    display = case["segmentation"].GetDisplayNode()
    shown = view.capture()
    display.SetVisibility3D(0)
    hidden = view.capture()
    display.SetVisibility3D(1)
    _save_png(output_dir / "screenshots" / "3d.png", shown)

    discs = np.zeros(shown.shape[:2], bool)
    rows_, cols = np.indices(discs.shape)
    projected = []
    spacing = np.asarray(case["geometry"].spacing)
    for row in case["rows"]:
        voxels = np.argwhere(case["labels"] == row["id"])
        center = _ras_of(case["geometry"], voxels.mean(axis=0))
        radius_mm = np.max(np.linalg.norm((voxels - voxels.mean(axis=0))[:, ::-1] * spacing, axis=1)) + spacing.max()
        r0, c0, depth = view.project(center)
        camera = view.renderer.GetActiveCamera()
        up = np.asarray(camera.GetViewUp())
        r1, c1, _ = view.project(center + radius_mm * up)
        radius_px = math.hypot(r1 - r0, c1 - c0) + 2
        discs |= (rows_ - r0) ** 2 + (cols - c0) ** 2 <= radius_px**2
        projected.append((row, r0, c0, depth, radius_px))
    diff = np.abs(shown.astype(int) - hidden.astype(int)).max(axis=-1)
    assert diff[~ndimage.binary_dilation(discs, iterations=2)].max() <= 2, "lesion colour outside the lesions"

    palette = {g: np.array(c, float) for g, c in lesions.SIZE_GROUP_COLORS.items()}

    def chroma(rgb):
        rgb = np.asarray(rgb, float) + 1.0
        return rgb / rgb.sum()

    checked = 0
    for row, r0, c0, depth, _ in projected:
        occluded = any(other is not row and d < depth and (r - r0) ** 2 + (c - c0) ** 2 <= rad**2
                       for other, r, c, d, rad in projected)
        if occluded:
            continue
        pixel = shown[int(round(r0)), int(round(c0))]
        candidates = dict(palette, background=hidden[int(round(r0)), int(round(c0))])
        nearest = min(candidates, key=lambda k: np.abs(chroma(candidates[k]) - chroma(pixel)).sum())
        assert nearest == row["size_group"], (row["name"], pixel.tolist(), nearest)
        checked += 1
    assert checked >= 3
    _check_baseline("3d", shown)
    _montage(output_dir / "screenshots")


def _montage(folder: Path) -> None:
    """``views.png``: axial | coronal | 3D side by side over the size legend (for the docs)."""
    from PIL import Image

    names = ("axial", "coronal", "3d")
    if not all((folder / f"{n}.png").exists() for n in names):
        return
    shots = [Image.open(folder / f"{n}.png").convert("RGB") for n in names]
    legend = Image.open(LEGEND).convert("RGB")
    gap = 6
    width = sum(s.width for s in shots) + gap * (len(shots) - 1)
    out = Image.new("RGB", (width, shots[0].height + gap + legend.height), (255, 255, 255))
    x = 0
    for shot in shots:
        out.paste(shot, (x, 0))
        x += shot.width + gap
    out.paste(legend, (0, shots[0].height + gap))
    out.save(folder / "views.png")
