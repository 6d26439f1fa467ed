"""Offscreen Slicer views without Qt, and the lesions-by-size picture (:func:`render_lesions_png`).

The views are drawn by Slicer's own code from the ``slicer-core`` wheel (or inside 3D Slicer):

* a **slice view** (:class:`SliceView`) is a ``vtkMRMLSliceLogic`` (which reslices the volume
  into an RGBA image) plus a displayable-manager group with
  ``vtkMRMLSegmentationsDisplayableManager2D``. As in Slicer (CTK's lightbox renderer manager)
  the slice image is drawn in the bottom renderer layer and the displayable managers in the
  layer above, so the segments' 2D fill blends over the image;
* a **3D view** (:class:`ThreeDView`) is a ``vtkMRMLViewLogic`` with the camera, view and
  ``vtkMRMLSegmentationsDisplayableManager3D`` displayable managers.

Both render into offscreen VTK windows. Without an X display VTK is asked for its EGL window
(:func:`use_egl_without_display`; Mesa's software renderer on a machine without a GPU), and
:func:`probe_offscreen` checks, in a subprocess (a missing libEGL can abort a process rather
than raise), that such a window really renders. ``slicer`` and ``vtk`` are imported inside the
functions, so ``import IWSegmentationLib.slicer.views`` works without them.

Pixels are returned as top-down ``(H, W, 3)`` uint8 arrays; view sizes are ``(width, height)``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core import files, imageio, outputs
from ..core.errors import InputError, IWSegError
from ..core.lesions import SIZE_GROUP_COLORS, SIZE_GROUPS, size_thresholds
from . import mrml
from .lesion_row import LesionRow
from .mrml.geometry import as_numpy_matrix

#: Default size of one view, ``(width, height)`` pixels.
VIEW_SIZE = (320, 320)

#: The lesion picture's look: a dark background (a reading room's), white text.
PICTURE_BACKGROUND = (17, 17, 17)
PICTURE_TEXT = (235, 235, 235)
PICTURE_MUTED = (160, 160, 160)
#: The 3D view's background in the lesion picture (uniform, so lesion colours stand out).
THREE_D_BACKGROUND = (0.0, 0.0, 0.0)
#: How many of the largest lesions are tried as the point the slice views go through.
FOCUS_CANDIDATES = 32
#: Review colours, when a reference is given (Okabe-Ito, distinct from the size colours and
#: from each other for colour-blind readers): a predicted lesion that overlaps no reference
#: lesion (false positive), and a reference lesion no prediction hit (missed, outline only).
REVIEW_COLORS: dict[str, tuple[int, int, int]] = {
    "FP": (204, 121, 167),  # reddish purple  #CC79A7
    "FN": (86, 180, 233),  # sky blue  #56B4E9
}
REVIEW_LABELS = {"FP": "false positive", "FN": "missed reference lesion"}


class OffscreenRenderingError(IWSegError, RuntimeError):
    """Offscreen OpenGL rendering (or slicer-core) is not available on this machine."""


# ============================================================================ offscreen OpenGL

_PROBE = """
import vtk
w = vtk.vtkRenderWindow(); w.SetOffScreenRendering(1); w.SetSize(8, 8)
r = vtk.vtkRenderer(); r.SetBackground(1, 0, 0); w.AddRenderer(r); w.Render()
f = vtk.vtkWindowToImageFilter(); f.SetInput(w); f.Update()
print(w.GetClassName(), f.GetOutput().GetScalarComponentAsDouble(4, 4, 0, 0))
"""

_INSTALL_HINT = ("it needs EGL and Mesa's software renderer: Debian/Ubuntu packages "
                 "libegl1 libegl-mesa0 libgl1-mesa-dri")


def use_egl_without_display() -> None:
    """Without an X display VTK falls back to EGL after a warning; ask for EGL directly."""
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


@functools.lru_cache(maxsize=1)
def probe_offscreen(timeout: float = 120.0) -> str:
    """The class name of the offscreen render window VTK opens here (e.g. ``vtkEGLRenderWindow``).

    Raises :class:`OffscreenRenderingError`, saying why, when slicer-core is not installed or
    an 8 x 8 red offscreen window does not render red. The window is tried in a subprocess; a
    success is remembered for the process.
    """
    try:
        import slicer  # noqa: F401  (lazy: only whether Slicer is there)
    except ImportError:
        raise OffscreenRenderingError(
            "slicer-core is not installed (pip install 'slicer-core==5.13.*')") from None
    use_egl_without_display()
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=timeout,
                             env=dict(os.environ))
    except subprocess.TimeoutExpired:
        raise OffscreenRenderingError(f"the offscreen OpenGL probe timed out after {timeout:g} s") from None
    words = out.stdout.split()
    if out.returncode != 0 or len(words) != 2 or float(words[1]) != 255.0:
        text = re.sub(r"\x1b\[[0-9;]*m", "", out.stderr or out.stdout).strip().splitlines()
        raise OffscreenRenderingError(
            f"offscreen OpenGL rendering is not available ({_INSTALL_HINT}): exit {out.returncode}: "
            + " | ".join(line.split("| ", 1)[-1] for line in text[-2:])
        )
    return words[0]


def grab(render_window) -> np.ndarray:
    """Render the window and return its pixels as a top-down ``(H, W, 3)`` uint8 array."""
    import vtk  # lazy: Slicer's own; importable without it
    from vtkmodules.util import numpy_support  # lazy: Slicer's own; importable without it

    render_window.Render()
    grabber = vtk.vtkWindowToImageFilter()
    grabber.SetInput(render_window)
    grabber.ReadFrontBufferOff()
    grabber.Update()
    image = grabber.GetOutput()
    w, h, _ = image.GetDimensions()
    rgb = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)[:, :, :3]
    return rgb[::-1].copy()


def offscreen_window(size: Sequence[int] = VIEW_SIZE, layers: int = 1):
    """An offscreen ``vtkRenderWindow`` of ``size`` (width, height) with ``layers`` renderer layers."""
    import vtk  # lazy: Slicer's own; importable without it

    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetMultiSamples(0)
    window.SetSize(int(size[0]), int(size[1]))
    window.SetNumberOfLayers(layers)
    return window


def displayable_managers(factory, app_logic, renderer, names: Sequence[str]):
    """A displayable manager group drawing into ``renderer``, with ``names`` registered in ``factory``
    (Slicer's slice- or 3D-view factory), as Slicer's views set theirs up."""
    import slicer  # lazy: Slicer's own; importable without it

    factory.SetMRMLApplicationLogic(app_logic)
    for manager in names:
        if not factory.IsDisplayableManagerRegistered(manager):
            factory.RegisterDisplayableManager(manager)
    managers = slicer.vtkMRMLDisplayableManagerGroup()
    managers.Initialize(factory, renderer)
    return managers


# ============================================================================ views


class SliceView:
    """A Slicer slice view without Qt: slice logic + the slice displayable managers.

    ``name`` is the slice node's layout name (``Red``, ``Green``, ``Yellow``), ``orientation``
    a preset (``Axial``, ``Coronal``, ``Sagittal``); ``size`` is ``(width, height)`` pixels.
    """

    def __init__(self, scene, app_logic, name: str, orientation: str, size: Sequence[int] = VIEW_SIZE):
        import slicer  # lazy: Slicer's own; importable without it
        import vtk  # lazy: Slicer's own; importable without it

        self.size = (int(size[0]), int(size[1]))
        self.window = offscreen_window(self.size, layers=2)
        self.image_renderer = vtk.vtkRenderer()
        self.image_renderer.SetLayer(0)
        self.renderer = vtk.vtkRenderer()
        self.renderer.SetLayer(1)
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.window.AddRenderer(self.image_renderer)
        self.window.AddRenderer(self.renderer)
        self.interactor = vtk.vtkRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.window)

        self.managers = displayable_managers(
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
        """Show ``volume_node`` as the background, the whole volume fitted to the view."""
        self.logic.GetSliceCompositeNode().SetBackgroundVolumeID(volume_node.GetID())
        self.logic.ResizeSliceNode(*self.size)
        self.logic.FitSliceToBackground()
        self.image_actor.GetMapper().SetInputConnection(self.logic.GetImageDataConnection())

    def through(self, ras) -> None:
        """Move the slice plane (not the field of view) to pass through the RAS point."""
        self.node.JumpSliceByOffsetting(*[float(v) for v in ras])

    def capture(self) -> np.ndarray:
        return grab(self.window)

    def xy_to_ras(self) -> np.ndarray:
        """The slice node's 4x4 ``XYToRAS`` matrix (pixel x, y from the bottom left -> RAS mm)."""
        return as_numpy_matrix(self.node.GetXYToRAS())

    def pixel_ras(self) -> np.ndarray:
        """RAS of every pixel centre, ``(H, W, 3)``, top-down like :meth:`capture`."""
        w, h = self.size
        x, y = np.meshgrid(np.arange(w, dtype=float), np.arange(h, dtype=float)[::-1])
        xy = np.stack([x, y, np.zeros_like(x), np.ones_like(x)], axis=-1)
        return (xy @ self.xy_to_ras().T)[..., :3]

    def ras_to_pixel(self, ras) -> tuple[int, int]:
        """(row, column) of the pixel showing a RAS point on the current slice."""
        x, y = (np.linalg.inv(self.xy_to_ras()) @ np.r_[np.asarray(ras, float), 1.0])[:2]
        return self.size[1] - 1 - int(round(y)), int(round(x))

    def sample(self, array: np.ndarray, ijk_to_ras: np.ndarray) -> np.ndarray:
        """The value of the voxel of ``array`` (``[z, y, x]`` on a grid with this ``IJKToRAS``)
        nearest each pixel's RAS point, ``(H, W)`` top-down; 0 outside the grid."""
        ras = self.pixel_ras().reshape(-1, 3)
        ijk = np.rint((np.linalg.inv(ijk_to_ras) @ np.c_[ras, np.ones(len(ras))].T)[:3].T).astype(int)
        inside = np.all((ijk >= 0) & (ijk < np.array(array.shape[::-1])), axis=1)
        out = np.zeros(len(ras), array.dtype)
        out[inside] = array[ijk[inside, 2], ijk[inside, 1], ijk[inside, 0]]
        return out.reshape(self.size[1], self.size[0])

    def edge_letters(self) -> dict[str, str]:
        """Patient-direction letters (R/L, A/P, S/I) at the view's ``left, right, top, bottom`` edges."""
        m = self.xy_to_ras()

        def letter(v):
            axis = int(np.argmax(np.abs(v)))
            return ("LR", "PA", "IS")[axis][int(v[axis] > 0)]

        right, up = m[:3, 0], m[:3, 1]
        return {"left": letter(-right), "right": letter(right), "top": letter(up), "bottom": letter(-up)}


class ThreeDView:
    """A Slicer 3D view without Qt: view logic + the 3D displayable managers (camera, view,
    segmentations). ``size`` is ``(width, height)`` pixels."""

    def __init__(self, scene, app_logic, name: str = "1", size: Sequence[int] = VIEW_SIZE):
        import slicer  # lazy: Slicer's own; importable without it
        import vtk  # lazy: Slicer's own; importable without it

        self.size = (int(size[0]), int(size[1]))
        self.window = offscreen_window(self.size)
        self.renderer = vtk.vtkRenderer()
        self.window.AddRenderer(self.renderer)
        self.interactor = vtk.vtkRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.window)
        self.managers = displayable_managers(
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
        """Point the camera from the patient's front at everything shown."""
        import slicer  # lazy: Slicer's own; importable without it

        camera = self.managers.GetDisplayableManagerByClassName("vtkMRMLCameraDisplayableManager").GetCameraNode()
        self.renderer.ResetCamera()
        camera.RotateTo(slicer.vtkMRMLCameraNode.Anterior)
        self.renderer.ResetCamera()
        self.renderer.ResetCameraClippingRange()

    def capture(self) -> np.ndarray:
        return grab(self.window)

    def project(self, ras) -> tuple[float, float, float]:
        """(row, column, depth) of a RAS point in the captured image."""
        self.renderer.SetWorldPoint(*[float(v) for v in ras], 1.0)
        self.renderer.WorldToDisplay()
        x, y, z = self.renderer.GetDisplayPoint()
        return self.size[1] - 1 - y, x, z


# ============================================================================ the lesion picture


@dataclass
class LesionPicture:
    """What :func:`render_lesions_png` drew.

    ``panels``: ``{"axial" | "coronal" | "sagittal" | "3d": (left, top, right, bottom)}`` pixel
    boxes of the views in the PNG (right/bottom exclusive); ``counts``: lesions per size group;
    ``focus``: the lesion row (:func:`IWSegmentationLib.slicer.mrml.lesion_rows`) the slice views go
    through, or None for an empty mask (then they go through the volume's centre);
    ``focus_ras``: that point (RAS mm); ``review``: with a reference, the detection counts
    ``{"TP", "FP", "FN"}`` (TP and FP count predicted lesions, FN reference lesions), else None.
    """

    path: Path
    size: tuple[int, int]
    panels: dict[str, tuple[int, int, int, int]]
    counts: dict[str, int]
    focus: dict | None
    focus_ras: tuple[float, float, float]
    rows: list[LesionRow] = field(default_factory=list, repr=False)
    review: dict[str, int] | None = None


def _read_mask(path, geometry, image, what: str) -> np.ndarray:
    """A binary mask on the image's grid; InputError naming the file when it is unusable."""
    labels, mask_geometry = imageio.read_image(path, what=what)
    imageio.check_same_grid(geometry, mask_geometry, f"image {image}", f"{what} {path}")
    if not np.all(np.isfinite(labels)):
        raise InputError(f"{what} {path} holds NaN or infinite values")
    return labels != 0


def _read_case(image, mask):
    """The image, the mask and their geometry; InputError naming the file when one is unusable."""
    volume, geometry = imageio.read_image(image, what="image")
    return volume, _read_mask(mask, geometry, image, "lesion mask"), geometry


def _show_review(scene, volume_node, segmentation, reference_mask, thresholds) -> tuple[dict, list[LesionRow]]:
    """Colour the predicted lesions that hit no reference lesion as false positives, and add the
    reference lesions no prediction hit as outlined segments (the matching of
    :func:`mrml.match_segmentations`, the paper's rule). Returns the counts and the missed rows."""
    reference = mrml.lesion_segmentation(scene, volume_node, reference_mask, size_thresholds_mm=thresholds,
                                         name="Reference lesions")
    match = mrml.match_segmentations(segmentation, reference, volume_node=volume_node, size_thresholds_mm=thresholds)
    segments = segmentation.GetSegmentation()
    fp = {d["segment_id"] for d in match.detections if d["status"] == "FP"}
    for segment_id in fp:
        segments.GetSegment(segment_id).SetColor(*(c / 255 for c in REVIEW_COLORS["FP"]))
    missed = [r for r in match.references if r["status"] == "FN"]
    missed_ids = {r["segment_id"] for r in missed}
    display = reference.GetDisplayNode()
    display.SetOpacity2DFill(0.0)  # outline only: a miss is drawn around, not over, the tissue
    display.SetOpacity3D(0.6)
    for segment_id in mrml.list_segment_ids(reference):
        display.SetSegmentVisibility(segment_id, segment_id in missed_ids)
        reference.GetSegmentation().GetSegment(segment_id).SetColor(*(c / 255 for c in REVIEW_COLORS["FN"]))
    counts = {"TP": len({d["segment_id"] for d in match.detections} - fp), "FP": len(fp), "FN": len(missed)}
    return counts, missed


def _choose_focus(view: SliceView, rows: list[LesionRow], labels: np.ndarray, ijk_to_ras: np.ndarray) -> LesionRow | None:
    """Of the largest lesions, the one whose axial slice through its centroid shows most lesions
    (ties: the larger lesion). None when there is no lesion."""
    best, best_key = None, None
    for row in rows[:FOCUS_CANDIDATES]:
        view.through(row["center_ras"])
        shown = np.unique(view.sample(labels, ijk_to_ras))
        key = (int(np.count_nonzero(shown)), row["voxels"] or 0)
        if best_key is None or key > best_key:
            best, best_key = row, key
    return best


def render_lesions_png(
    image: str | os.PathLike,
    mask: str | os.PathLike,
    output: str | os.PathLike,
    size_preset: str = "lung",
    *,
    size_thresholds_mm: Sequence[float] | None = None,
    view_size: Sequence[int] = (360, 360),
    window_level: tuple[float, float] | None = None,
    title: str | None = None,
    reference: str | os.PathLike | None = None,
) -> LesionPicture:
    """Render an image and its predicted lesion mask, lesions coloured by size group, to one PNG.

    The case is loaded into a real MRML scene by :mod:`IWSegmentationLib.slicer.mrml` (one segment per
    connected component, largest first, coloured by size group from
    :data:`~IWSegmentationLib.core.lesions.SIZE_GROUP_COLORS`) and drawn offscreen by Slicer's own
    slice logic and segmentation displayable managers. The picture, left to right: axial,
    coronal and sagittal slices (segments as a 50% fill with a full-opacity outline, Slicer's
    default) through the centroid of the lesion whose axial slice shows most lesions, and the
    lesions' 3D surfaces seen from the front; a title with the lesion counts above, and the
    size legend (with the thresholds used and the count per group) below.

    With a ``reference`` mask the picture is a review: predicted lesions that overlap no
    reference lesion are drawn in the false-positive colour, reference lesions that no
    prediction hit are outlined in the "missed" colour (:data:`REVIEW_COLORS`), the title
    gives the TP/FP/missed counts and the legend names both colours.

    Args:
        image: the scalar volume (NIfTI, NRRD, ...).
        mask: the lesion mask on the image's voxel grid; nonzero = lesion.
        output: the ``.png`` to write (atomically: a temporary file renamed on success).
        size_preset: size-group preset (``lesions.SIZE_PRESETS``), unless ``size_thresholds_mm``
            ``(small, large)`` is given.
        view_size: ``(width, height)`` of each of the four views, pixels.
        window_level: display window and level of the image; None = Slicer's automatic one.
        title: the title line (default: the image's case name).
        reference: an optional reference lesion mask on the image's grid; nonzero = lesion.

    Raises :class:`~IWSegmentationLib.core.errors.InputError` naming the file for a missing or
    unreadable input, or a mask on another grid, and :class:`OffscreenRenderingError` when
    slicer-core or offscreen OpenGL is unavailable.
    """
    output = Path(output)
    if output.suffix.lower() != ".png":
        raise InputError(f"output must be a .png file, got {output}")
    if not output.parent.is_dir():
        raise InputError(f"output folder does not exist: {output.parent} (for {output.name})")
    size = tuple(int(v) for v in view_size)
    if len(size) != 2 or min(size) < 64 or max(size) > 4096:
        raise InputError(f"view_size must be (width, height) between 64 and 4096 pixels, got {tuple(view_size)}")
    thresholds = size_thresholds(None if size_thresholds_mm else size_preset, size_thresholds_mm)
    volume, lesion_mask, geometry = _read_case(image, mask)
    reference_mask = None if reference is None else _read_mask(reference, geometry, image, "reference mask")
    probe_offscreen()

    scene, app_logic = mrml.headless_scene()
    volume_node = mrml.add_volume_from_array(scene, volume, geometry, files.case_name(image))
    display = volume_node.GetDisplayNode()
    if window_level is not None:
        display.SetAutoWindowLevel(0)
        display.SetWindowLevel(float(window_level[0]), float(window_level[1]))
    segmentation = mrml.lesion_segmentation(scene, volume_node, lesion_mask, size_thresholds_mm=thresholds)
    rows = mrml.lesion_rows(segmentation)
    review, missed = (None, []) if reference_mask is None else _show_review(
        scene, volume_node, segmentation, reference_mask, thresholds)
    labels = mrml.labelmap_on_volume_grid(segmentation, volume_node)
    ijk_to_ras = mrml.ijk_to_ras_matrix(geometry)

    slices = {name: SliceView(scene, app_logic, layout, name.capitalize(), size)
              for name, layout in (("axial", "Red"), ("coronal", "Green"), ("sagittal", "Yellow"))}
    for view in slices.values():
        view.show(volume_node)
    focus = _choose_focus(slices["axial"], rows, labels, ijk_to_ras) or (missed[0] if missed else None)
    center_ijk = (np.array(geometry.shape_zyx[::-1], float) - 1) / 2
    focus_ras = tuple(focus["center_ras"]) if focus else tuple((ijk_to_ras @ np.r_[center_ijk, 1.0])[:3])
    shots = {}
    for name, view in slices.items():
        view.through(focus_ras)
        shots[name] = (view.capture(), view.edge_letters())

    three_d = ThreeDView(scene, app_logic, "1", size)
    three_d.node.SetBackgroundColor(*THREE_D_BACKGROUND)
    three_d.node.SetBackgroundColor2(*THREE_D_BACKGROUND)
    three_d.look_from_anterior()
    shots["3d"] = (three_d.capture(), {"left": "R", "right": "L", "top": "S", "bottom": "I"})

    counts = {group: sum(1 for row in rows if row["size_group"] == group) for group in SIZE_GROUPS}
    picture, panels = _compose(shots, counts, thresholds, size_preset if not size_thresholds_mm else None,
                               title or files.case_name(image), focus, review)
    with outputs.atomic_output(output) as tmp:
        picture.save(tmp, format="PNG")
    return LesionPicture(output, picture.size, panels, counts, focus, tuple(float(v) for v in focus_ras), rows,
                         review)


# ---------------------------------------------------------------------------- composing the PNG

_PANEL_TITLES = {"axial": "Axial", "coronal": "Coronal", "sagittal": "Sagittal", "3d": "3D · lesion surfaces"}


def _font(size: int):
    """DejaVu Sans (it has ≤ and ≥; matplotlib ships it, Pillow finds a system copy), else
    Pillow's built-in font."""
    from PIL import ImageFont  # lazy: only the picture needs Pillow

    spec = importlib.util.find_spec("matplotlib")
    candidates = ["DejaVuSans.ttf"]
    if spec and spec.origin:
        candidates.insert(0, str(Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"))
    for candidate in candidates:
        try:
            return ImageFont.truetype(candidate, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def _compose(shots, counts, thresholds, preset, title, focus, review=None):
    """Lay the views out in a row under a title, over the legend. Returns (PIL image, panel boxes).

    Header: the title, the lesion counts (and, with a ``review``, the TP/FP/missed counts), the
    slices' lesion, then each view's name above it; footer: the legend swatches (with the
    thresholds and counts, then the review colours), then a note (on the same line when it
    fits, else on the next).
    """
    from PIL import Image, ImageDraw  # lazy: only the picture needs Pillow

    gap, margin, header, line = 6, 12, 78, 22
    w, h = next(iter(shots.values()))[0].shape[1::-1]
    width = 2 * margin + len(shots) * w + (len(shots) - 1) * gap
    big, small = _font(18), _font(13)

    ranges = {"small": f"d < {thresholds.small_mm:g} mm",
              "medium": f"{thresholds.small_mm:g} ≤ d < {thresholds.large_mm:g} mm",
              "large": f"d ≥ {thresholds.large_mm:g} mm"}
    legend = [(SIZE_GROUP_COLORS[group], f"{group}  {ranges[group]}  ({counts[group]})") for group in SIZE_GROUPS]
    if review is not None:
        legend += [(REVIEW_COLORS[k], f"{REVIEW_LABELS[k]} ({review[k]})") for k in ("FP", "FN")]
    note = ("d: equivalent diameter" + (f", {preset} preset" if preset else "")
            + " · rendered by 3D Slicer (slicer-core)")
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # swatches fill lines left to right; the note goes at the end of the last one when it fits
    places, x, row = [], margin, 0
    for colour, text in legend:
        item = 56 + int(measure.textlength(text, font=small))
        if x > margin and x + item - 28 > width - margin:
            x, row = margin, row + 1
        places.append((x, row, colour, text))
        x += item
    note_width = int(measure.textlength(note, font=small))
    one_line = x + note_width <= width - margin
    lines = row + 1 + (0 if one_line else 1)
    height = header + h + 16 + line * lines + 12

    picture = Image.new("RGB", (width, height), PICTURE_BACKGROUND)
    draw = ImageDraw.Draw(picture)
    total = sum(counts.values())
    summary = (f"{total} lesion{'s' if total != 1 else ''}: "
               + " · ".join(f"{counts[g]} {g}" for g in SIZE_GROUPS) if total else "no lesions found")
    if review is not None:
        summary += f"  ·  vs reference: {review['TP']} TP, {review['FP']} FP, {review['FN']} missed"
    if focus is not None:
        summary += f"  —  slices through {focus['name']}"
    draw.text((margin, 8), title, fill=PICTURE_TEXT, font=big)
    draw.text((margin, 33), summary, fill=PICTURE_MUTED, font=small)

    panels = {}
    label = {"font": small, "stroke_width": 2, "stroke_fill": (0, 0, 0)}  # legible on bright tissue
    for i, (name, (rgb, letters)) in enumerate(shots.items()):
        x0 = margin + i * (w + gap)
        picture.paste(Image.fromarray(rgb), (x0, header))
        panels[name] = (x0, header, x0 + w, header + h)
        draw.text((x0, header - 20), _PANEL_TITLES[name], fill=PICTURE_TEXT, font=small)
        draw.text((x0 + 5, header + h // 2), letters["left"], fill=PICTURE_TEXT, anchor="lm", **label)
        draw.text((x0 + w - 5, header + h // 2), letters["right"], fill=PICTURE_TEXT, anchor="rm", **label)
        draw.text((x0 + w // 2, header + 5), letters["top"], fill=PICTURE_TEXT, anchor="mt", **label)
        draw.text((x0 + w // 2, header + h - 5), letters["bottom"], fill=PICTURE_TEXT, anchor="mb", **label)

    top = header + h + 16
    for x, row, colour, text in places:
        y = top + row * line
        draw.rectangle((x, y, x + 20, y + 16), fill=colour)
        draw.text((x + 28, y), text, fill=PICTURE_TEXT, font=small)
    last = top + (lines - 1) * line
    note_xy = (width - margin - note_width, last + 1) if one_line else (margin, last + 1)
    draw.text(note_xy, note, fill=PICTURE_MUTED, font=small)
    return picture, panels
