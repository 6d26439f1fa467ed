"""Screenshots rendered by Slicer's own displayable managers (slicer-core, offscreen), checked.

The scene is built by :mod:`IWSegmentationLib.mrml` from a synthetic CT case (oblique,
anisotropic grid, lesions of all three size groups). Axial and coronal slice views and a 3D view
are rendered offscreen (EGL) by Slicer's slice logic and its segmentation displayable managers,
the same code that draws Slicer's views, and saved to ``Testing/_output/screenshots/`` for a
person to look at. Then, on the pixels:

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
``IWSEG_UPDATE_BASELINES=1 .venv/bin/pytest Testing/test_screenshots.py`` (then look at them).
The tests skip, saying why, when slicer-core is missing or offscreen OpenGL cannot start.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from IWSegmentationLib import imageio, lesions, mrml

ROOT = Path(__file__).resolve().parents[1]
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

_PROBE = """
import vtk
w = vtk.vtkRenderWindow(); w.SetOffScreenRendering(1); w.SetSize(8, 8)
r = vtk.vtkRenderer(); r.SetBackground(1, 0, 0); w.AddRenderer(r); w.Render()
f = vtk.vtkWindowToImageFilter(); f.SetInput(w); f.Update()
print(w.GetClassName(), f.GetOutput().GetScalarComponentAsDouble(4, 4, 0, 0))
"""


def _use_egl_without_display() -> None:
    # Without an X display VTK falls back to EGL after a warning; ask for EGL directly.
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


@pytest.fixture(scope="module")
def offscreen():
    """Skip (with the reason) unless slicer-core imports and an offscreen OpenGL window renders.

    The probe runs in a subprocess: a missing libEGL/libGL can abort the process, not raise.
    """
    pytest.importorskip("slicer", reason="slicer-core is not installed (pip install 'slicer-core==5.13.*')")
    _use_egl_without_display()
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120,
                             env=dict(os.environ))
    except subprocess.TimeoutExpired:
        pytest.skip("offscreen OpenGL probe timed out")
    words = out.stdout.split()
    if out.returncode != 0 or len(words) != 2 or float(words[1]) != 255.0:
        text = re.sub(r"\x1b\[[0-9;]*m", "", out.stderr or out.stdout).strip().splitlines()
        pytest.skip(
            "offscreen OpenGL rendering is not available (it needs EGL and Mesa's software renderer: "
            f"Debian/Ubuntu packages libegl1 libegl-mesa0 libgl1-mesa-dri): exit {out.returncode}: "
            + " | ".join(line.split("| ", 1)[-1] for line in text[-2:])
        )
    return words[0]


# ---------------------------------------------------------------------------- views


def _grab(render_window) -> np.ndarray:
    """The window's pixels as a top-down ``(H, W, 3)`` uint8 array."""
    import vtk
    from vtkmodules.util import numpy_support

    render_window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(render_window)
    grab.ReadFrontBufferOff()
    grab.Update()
    image = grab.GetOutput()
    w, h, _ = image.GetDimensions()
    rgb = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)[:, :, :3]
    return rgb[::-1].copy()


def _matrix(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _offscreen_window(layers: int = 1):
    import vtk

    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetMultiSamples(0)
    window.SetSize(*VIEW_SIZE)
    window.SetNumberOfLayers(layers)
    return window


def _displayable_managers(factory, app_logic, renderer, names: tuple[str, ...]):
    """A displayable manager group drawing into ``renderer``, with ``names`` registered in ``factory``
    (Slicer's slice- or 3D-view factory), as Slicer's views set theirs up."""
    import slicer

    factory.SetMRMLApplicationLogic(app_logic)
    for manager in names:
        if not factory.IsDisplayableManagerRegistered(manager):
            factory.RegisterDisplayableManager(manager)
    managers = slicer.vtkMRMLDisplayableManagerGroup()
    managers.Initialize(factory, renderer)
    return managers


class SliceView:
    """A Slicer slice view without Qt: slice logic + the slice displayable managers.

    As in Slicer (CTK's lightbox manager), the volume slice image (the slice logic's RGBA
    output) is drawn in its own bottom renderer layer and the displayable managers draw in the
    layer above, so the 2D segment fill blends over the image.
    """

    def __init__(self, scene, app_logic, name: str, orientation: str):
        import slicer
        import vtk

        self.window = _offscreen_window(layers=2)
        self.image_renderer = vtk.vtkRenderer()
        self.image_renderer.SetLayer(0)
        self.renderer = vtk.vtkRenderer()
        self.renderer.SetLayer(1)
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.window.AddRenderer(self.image_renderer)
        self.window.AddRenderer(self.renderer)
        self.interactor = vtk.vtkRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.window)

        self.managers = _displayable_managers(
            slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance(), app_logic, self.renderer,
            ("vtkMRMLSegmentationsDisplayableManager2D",))

        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(app_logic)
        app_logic.GetSliceLogics().AddItem(self.logic)
        self.logic.SetMRMLScene(scene)
        self.node = self.logic.AddSliceNode(name)
        self.managers.SetMRMLDisplayableNode(self.node)
        self.node.SetOrientation(orientation)

        mapper = vtk.vtkImageMapper()
        mapper.SetColorWindow(255)  # the slice logic already applied the volume's window/level
        mapper.SetColorLevel(127.5)
        self.image_actor = vtk.vtkActor2D()
        self.image_actor.SetMapper(mapper)
        self.image_renderer.AddViewProp(self.image_actor)

    def show(self, volume_node) -> None:
        self.logic.GetSliceCompositeNode().SetBackgroundVolumeID(volume_node.GetID())
        self.logic.ResizeSliceNode(*VIEW_SIZE)
        self.logic.FitSliceToBackground()
        self.image_actor.GetMapper().SetInputConnection(self.logic.GetImageDataConnection())

    def through(self, ras) -> None:
        """Move the slice plane (not the field of view) to pass through the RAS point."""
        self.node.JumpSliceByOffsetting(*[float(v) for v in ras])

    def capture(self) -> np.ndarray:
        return _grab(self.window)

    def pixel_ras(self) -> np.ndarray:
        """RAS of every pixel centre, ``(H, W, 3)``, top-down like :meth:`capture`."""
        w, h = VIEW_SIZE
        xy_to_ras = _matrix(self.node.GetXYToRAS())
        x, y = np.meshgrid(np.arange(w, dtype=float), np.arange(h, dtype=float)[::-1])
        xy = np.stack([x, y, np.zeros_like(x), np.ones_like(x)], axis=-1)
        return (xy @ xy_to_ras.T)[..., :3]

    def ras_to_pixel(self, ras) -> tuple[int, int]:
        """(row, column) of the pixel showing a RAS point on the current slice."""
        xy_to_ras = _matrix(self.node.GetXYToRAS())
        x, y = (np.linalg.inv(xy_to_ras) @ np.r_[np.asarray(ras, float), 1.0])[:2]
        return VIEW_SIZE[1] - 1 - int(round(y)), int(round(x))


class ThreeDView:
    """A Slicer 3D view without Qt: view logic + the 3D displayable managers (camera, view,
    segmentations)."""

    def __init__(self, scene, app_logic, name: str = "1"):
        import slicer
        import vtk

        self.window = _offscreen_window()
        self.renderer = vtk.vtkRenderer()
        self.window.AddRenderer(self.renderer)
        self.interactor = vtk.vtkRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.window)
        self.managers = _displayable_managers(
            slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance(), app_logic, self.renderer,
            ("vtkMRMLCameraDisplayableManager", "vtkMRMLViewDisplayableManager",
             "vtkMRMLSegmentationsDisplayableManager3D"))
        self.logic = slicer.vtkMRMLViewLogic()
        self.logic.SetMRMLApplicationLogic(app_logic)
        app_logic.GetViewLogics().AddItem(self.logic)
        self.logic.SetMRMLScene(scene)
        self.node = self.logic.AddViewNode(name)
        self.managers.SetMRMLDisplayableNode(self.node)
        self.node.SetBoxVisible(0)
        self.node.SetAxisLabelsVisible(0)

    def look_from_anterior(self) -> None:
        import slicer

        camera = self.managers.GetDisplayableManagerByClassName("vtkMRMLCameraDisplayableManager").GetCameraNode()
        self.renderer.ResetCamera()
        camera.RotateTo(slicer.vtkMRMLCameraNode.Anterior)
        self.renderer.ResetCamera()
        self.renderer.ResetCameraClippingRange()

    def capture(self) -> np.ndarray:
        return _grab(self.window)

    def project(self, ras) -> tuple[float, float, float]:
        """(row, column, depth) of a RAS point in the captured image."""
        self.renderer.SetWorldPoint(*[float(v) for v in ras], 1.0)
        self.renderer.WorldToDisplay()
        x, y, z = self.renderer.GetDisplayPoint()
        return VIEW_SIZE[1] - 1 - y, x, z


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
    from IWSegmentationLib import synth

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


def _expected_labels(case, view: SliceView) -> np.ndarray:
    """Lesion number shown at each pixel: that of the voxel nearest the pixel's RAS point."""
    ras = view.pixel_ras().reshape(-1, 3)
    ijk = (np.linalg.inv(mrml.ijk_to_ras_matrix(case["geometry"])) @ np.c_[ras, np.ones(len(ras))].T)[:3].T
    ijk = np.round(ijk).astype(int)
    shape = case["labels"].shape
    ok = np.all((ijk >= 0) & (ijk < np.array(shape[::-1])), axis=1)
    out = np.zeros(len(ras), np.int32)
    out[ok] = case["labels"][ijk[ok, 2], ijk[ok, 1], ijk[ok, 0]]
    return out.reshape(VIEW_SIZE[1], VIEW_SIZE[0])


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
    view = SliceView(case["scene"], case["app"], "Red" if orientation == "Axial" else "Green", orientation)
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

    view = ThreeDView(case["scene"], case["app"])
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
