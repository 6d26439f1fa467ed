"""Slicer scene building without Qt: lesion segments, object Dice tables, volume <-> numpy.

This is the only module of :mod:`IWSegmentationLib` that talks to Slicer. It uses nothing but
Slicer's MRML classes, its segmentation and terminology logic, ``vtk`` and numpy, all imported
*inside* the functions, so ``import IWSegmentationLib.mrml`` works anywhere and the functions run
both inside 3D Slicer and with the ``slicer-core`` wheel from PyPI (Slicer's real MRML, without
Qt), where the tests exercise them.

Conventions
    numpy arrays are ``[z, y, x]`` on the volume node's IJK grid (``array[k, j, i]``), as
    :mod:`IWSegmentationLib.imageio` reads files. A volume node's geometry is its
    ``IJKToRAS`` matrix (RAS millimetres); :class:`~IWSegmentationLib.imageio.Geometry` is ITK's
    (LPS millimetres). ``ras = diag(-1, -1, 1) · lps``, so
    ``IJKToRAS = diag(-1, -1, 1, 1) · [[D · diag(spacing), origin], [0, 1]]`` with ``D`` the
    direction matrix. Oblique and anisotropic grids go through unchanged.

Segments (:func:`lesion_segmentation`)
    One segment per connected component of the mask (:func:`IWSegmentationLib.lesions.analyze_lesions`),
    **largest first** (segment 1 is the largest lesion, as ``lesions.relabel_by_size`` numbers
    them), named ``Lesion 07 · 4.2 mm · small``, coloured by size group
    (:data:`~IWSegmentationLib.lesions.SIZE_GROUP_COLORS`, the legend's colours), tagged with the
    DICOM terminology *Morphologically Altered Structure / Lesion* and with the numbers in
    :data:`TAGS`. All segments share one labelmap layer (label value = lesion number) cropped to
    the lesions' bounding box, so a case with hundreds of lesions costs one small image.

Object Dice (:func:`object_dice_table`)
    The segments and the reference are exported onto the volume's grid by Slicer's
    segmentation logic (which resamples a reference drawn on another grid), and matched by
    :func:`IWSegmentationLib.metrics.match_case` — the same definitions and numbers as
    ``iwseg evaluate``. Each detection's confidence is its segment's confidence tag.

The lesion table (:func:`lesion_rows`)
    Built here and only here, from the segments' tags and the match: the module shows these rows
    (:func:`IWSegmentationLib.panel.lesion_cells` formats them), the table node holds them, and
    each row's ``center_ras`` — the lesion's own centroid, also for a missed reference lesion
    whose reference segment holds several — is where :func:`center_slice_views` takes the views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .errors import GeometryMismatchError, InputError
from .imageio import Geometry
from .lesions import (
    DEFAULT_SIZE_PRESET,
    SIZE_GROUP_COLORS,
    SIZE_PRESETS,
    SizeThresholds,
    analyze_lesions,
    size_thresholds,
)

#: RAS <-> LPS: flip the first two axes (homogeneous 4x4).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Segment tags written by :func:`lesion_segmentation` (values are strings, as MRML stores them).
TAG_PREFIX = "IWSegmentation."
TAGS = {
    "number": TAG_PREFIX + "LesionNumber",  # 1 = largest lesion
    "component": TAG_PREFIX + "ComponentId",  # id in scan order, as the backend's lesion JSON
    "voxels": TAG_PREFIX + "Voxels",
    "volume_mm3": TAG_PREFIX + "VolumeMm3",
    "diameter_mm": TAG_PREFIX + "DiameterMm",
    "size_group": TAG_PREFIX + "SizeGroup",
    "confidence": TAG_PREFIX + "Confidence",  # absent when no probability map was given
    "center_ras": TAG_PREFIX + "CenterRAS",  # "r,a,s" mm, the centroid of the voxels
}
#: Segmentation-node attributes.
ATTR_LESION_COUNT = TAG_PREFIX + "LesionCount"
ATTR_SIZE_THRESHOLDS = TAG_PREFIX + "SizeThresholdsMm"  # "small;large"
ATTR_CONFIDENCE_THRESHOLD = TAG_PREFIX + "ConfidenceThreshold"

#: Terminology of every lesion segment: DICOM master list, category SCT 49755003
#: "Morphologically Altered Structure", type SCT 52988006 "Lesion" (the serialised form that
#: ``vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry`` writes).
LESION_TERMINOLOGY = (
    "Segmentation category and type - DICOM master list"
    "~SCT^49755003^Morphologically Altered Structure~SCT^52988006^Lesion~^^~~^^~^^"
)

#: Columns of :func:`dice_table_node`: (row key, column title, unit).
DICE_TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("name", "Lesion", ""),
    ("status", "Status", ""),
    ("diameter_mm", "Diameter", "mm"),
    ("volume_mm3", "Volume", "mm3"),
    ("size_group", "Size group", ""),
    ("confidence", "Confidence", ""),
    ("dice", "Dice", ""),
    ("reference_id", "Reference lesion", ""),
    ("segment_id", "Segment ID", ""),
)

LABELMAP = "Binary labelmap"
CLOSED_SURFACE = "Closed surface"


def _slicer():
    try:
        import slicer
    except ImportError as exc:  # pragma: no cover - exercised only without slicer-core
        raise ImportError(
            "IWSegmentationLib.mrml needs 3D Slicer or the slicer-core wheel (pip install 'slicer-core==5.13.*')"
        ) from exc
    return slicer


# ============================================================================ geometry


def ijk_to_ras_matrix(geometry: Geometry) -> np.ndarray:
    """The 4x4 ``IJKToRAS`` matrix of an ITK (LPS) :class:`Geometry`."""
    m = np.eye(4)
    m[:3, :3] = geometry.direction_matrix * np.asarray(geometry.spacing, dtype=float)[None, :]
    m[:3, 3] = geometry.origin
    return LPS_TO_RAS @ m


def geometry_from_ijk_to_ras(ijk_to_ras: Any, shape_zyx: Sequence[int]) -> Geometry:
    """The ITK (LPS) :class:`Geometry` of a grid of ``shape_zyx`` voxels with this ``IJKToRAS``.

    ``ijk_to_ras`` is a 4x4 numpy array or a ``vtkMatrix4x4``. Spacing is the length of each
    column; a zero-length column (a degenerate matrix) is refused.
    """
    m = _as_numpy_matrix(ijk_to_ras)
    lps = LPS_TO_RAS @ m
    columns = lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(m)):
        raise InputError(f"IJKToRAS matrix is degenerate: {m.tolist()}")
    direction = columns / spacing[None, :]
    return Geometry(
        size=tuple(int(v) for v in tuple(shape_zyx)[::-1]),
        spacing=tuple(float(v) for v in spacing),
        origin=tuple(float(v) for v in lps[:3, 3]),
        direction=tuple(float(v) for v in direction.ravel()),
    )


def _as_numpy_matrix(matrix: Any) -> np.ndarray:
    if isinstance(matrix, np.ndarray):
        m = np.asarray(matrix, dtype=float)
    else:  # vtkMatrix4x4
        m = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)
    if m.shape != (4, 4):
        raise InputError(f"expected a 4x4 matrix, got shape {m.shape}")
    return m


def _vtk_matrix(m: np.ndarray):
    import vtk

    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def centroid_ras(ijk_to_ras: np.ndarray, centroid_zyx: Sequence[float]) -> tuple[float, float, float]:
    """The RAS point (mm) of a ``[z, y, x]`` (continuous) voxel index on a grid with this ``IJKToRAS``."""
    ijk = np.asarray(centroid_zyx, dtype=float)[::-1]
    return tuple(float(v) for v in (ijk_to_ras @ np.r_[ijk, 1.0])[:3])


def volume_ijk_to_ras(volume_node) -> np.ndarray:
    """The volume node's ``IJKToRAS`` as a 4x4 numpy array (its parent transform is not applied)."""
    import vtk

    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return _as_numpy_matrix(m)


def _check_volume_node(volume_node, what: str = "volume") -> None:
    slicer = _slicer()
    if volume_node is None or not isinstance(volume_node, slicer.vtkMRMLVolumeNode):
        raise InputError(f"{what} must be a volume node, got {type(volume_node).__name__}")
    image = volume_node.GetImageData()
    name = volume_node.GetName()
    if image is None:
        raise InputError(f"{what} {name!r} has no image data")
    dims = image.GetDimensions()
    if min(dims) < 1 or image.GetNumberOfPoints() == 0:
        raise InputError(f"{what} {name!r} is empty ({dims})")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(
            f"{what} {name!r} has {image.GetNumberOfScalarComponents()} components per voxel; "
            "a single-component (scalar) volume is needed"
        )


def volume_geometry(volume_node) -> Geometry:
    """The ITK (LPS) :class:`Geometry` of a volume node's voxel grid."""
    _check_volume_node(volume_node)
    dims = volume_node.GetImageData().GetDimensions()
    return geometry_from_ijk_to_ras(volume_ijk_to_ras(volume_node), dims[::-1])


def array_from_volume(volume_node) -> tuple[np.ndarray, Geometry]:
    """A copy of the volume's voxels as a ``[z, y, x]`` array, and its :class:`Geometry`.

    With :func:`IWSegmentationLib.imageio.write_image` this writes the volume to a file the
    backend reads (NRRD, NIfTI) on exactly the volume's grid.
    """
    from vtkmodules.util import numpy_support

    _check_volume_node(volume_node)
    image = volume_node.GetImageData()
    dims = image.GetDimensions()
    flat = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return flat.reshape(dims[::-1]).copy(), volume_geometry(volume_node)


def check_on_volume_grid(geometry: Geometry, volume_node, what: str = "image") -> None:
    """Raise :class:`GeometryMismatchError` when ``geometry`` is not the volume node's grid."""
    diffs = volume_geometry(volume_node).differences(geometry)
    if diffs:
        raise GeometryMismatchError(
            f"{what} is not on the voxel grid of volume {volume_node.GetName()!r}: " + "; ".join(diffs)
        )


def add_volume_from_array(scene, array: np.ndarray, geometry: Geometry, name: str = "Volume", *,
                          labelmap: bool = False):
    """Add a scalar (or labelmap) volume node holding a ``[z, y, x]`` array on ``geometry``."""
    import vtk
    from vtkmodules.util import numpy_support

    slicer = _slicer()
    if not isinstance(array, np.ndarray) or array.ndim != 3:
        raise InputError(f"{name}: a 3D [z, y, x] array is needed, got {getattr(array, 'shape', type(array))}")
    if tuple(array.shape) != geometry.shape_zyx:
        raise InputError(f"{name}: array of shape {array.shape} does not fit a grid of shape {geometry.shape_zyx}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    node = slicer.vtkMRMLLabelMapVolumeNode() if labelmap else slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    scene.AddNode(node)
    image = vtk.vtkImageData()
    image.SetDimensions(*array.shape[::-1])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True))
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras_matrix(geometry)))
    node.CreateDefaultDisplayNodes()
    return node


# ============================================================================ lesion segments


def ensure_converter_rules() -> None:
    """Register Slicer's labelmap <-> closed-surface conversion rules if nobody has.

    Inside Slicer the Segmentations module does this at start-up; with slicer-core nobody does,
    and without the rules a segmentation cannot make the surfaces the 3D view shows. A
    segmentation copies the rules when it is created, so call this before creating one.
    """
    slicer = _slicer()
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    have = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for cls in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        if cls.__name__ not in have:
            factory.RegisterConverterRule(cls())


def headless_scene():
    """A new scene and application logic set up the way Slicer sets up its own, for use outside
    Slicer (``slicer-core``): default colour tables (labelmaps look them up), slice orientation
    presets (slice views need them), empty slice/view logic collections (views register there)
    and the segmentation conversion rules. Returns ``(scene, app_logic)``.

    Keep ``app_logic`` alive as long as the scene is used (labelmap display nodes look their
    colour table up through it). Inside Slicer use ``slicer.mrmlScene`` and
    ``slicer.app.applicationLogic()`` instead.
    """
    import vtk

    slicer = _slicer()
    ensure_converter_rules()
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.GetColorLogic().AddDefaultColorNodes()
    app_logic.SetSliceLogics(vtk.vtkCollection())
    app_logic.SetViewLogics(vtk.vtkCollection())
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)
    return scene, app_logic


def _resolve_thresholds(size_thresholds_mm) -> SizeThresholds:
    if size_thresholds_mm is None:
        return SIZE_PRESETS[DEFAULT_SIZE_PRESET]
    if isinstance(size_thresholds_mm, SizeThresholds):
        return size_thresholds_mm
    if isinstance(size_thresholds_mm, str):
        return size_thresholds(size_thresholds_mm)
    return size_thresholds(None, list(size_thresholds_mm))


def _check_mask_arrays(volume_node, lesion_mask, probabilities) -> None:
    shape = volume_geometry(volume_node).shape_zyx
    name = volume_node.GetName()
    if not isinstance(lesion_mask, np.ndarray) or lesion_mask.ndim != 3:
        raise InputError(f"lesion_mask must be a 3D [z, y, x] array, got {getattr(lesion_mask, 'shape', type(lesion_mask))}")
    if lesion_mask.shape != shape:
        raise GeometryMismatchError(
            f"lesion_mask has shape {lesion_mask.shape} but volume {name!r} has {shape} voxels [z, y, x]; "
            "read the backend's output onto the volume's grid first"
        )
    if probabilities is None:
        return
    if not isinstance(probabilities, np.ndarray) or probabilities.shape != shape:
        raise GeometryMismatchError(
            f"probabilities have shape {getattr(probabilities, 'shape', None)} but volume {name!r} has {shape}"
        )
    lo, hi = float(np.min(probabilities)), float(np.max(probabilities))
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or hi > 1:
        raise InputError(f"probabilities must be finite values in [0, 1], got range [{lo:g}, {hi:g}]")


def segment_name(number: int, diameter_mm: float, size_group: str, width: int = 2) -> str:
    """``Lesion 07 · 4.2 mm · small``."""
    return f"Lesion {number:0{width}d} · {diameter_mm:.1f} mm · {size_group}"


def _smallest_uint(k: int):
    return np.uint8 if k < 2**8 else np.uint16 if k < 2**16 else np.uint32


def lesion_segmentation(
    scene,
    volume_node,
    lesion_mask: np.ndarray,
    *,
    probabilities: np.ndarray | None = None,
    size_thresholds_mm: Sequence[float] | SizeThresholds | str | None = None,
    name: str | None = None,
    connectivity: int = 26,
    closed_surface: bool = True,
):
    """Build a segmentation node with one segment per lesion of ``lesion_mask``.

    Args:
        scene: the MRML scene (``slicer.mrmlScene`` inside Slicer).
        volume_node: the scalar volume the mask was computed on; its grid (``IJKToRAS``,
            oblique and anisotropic included) becomes the segmentation's reference geometry,
            and its parent transform the segmentation's.
        lesion_mask: ``[z, y, x]`` array on the volume's IJK grid; nonzero = lesion.
        probabilities: optional ``[z, y, x]`` probability map on the same grid; a lesion's
            confidence is its maximum inside the lesion (as ``lesions.lesion_table``).
        size_thresholds_mm: ``(small, large)`` diameter cut-offs in mm, a
            :class:`SizeThresholds`, a preset name, or None for the default preset.
        name: node name (default ``"<volume name> lesions"``).
        connectivity: 6, 18 or 26, for the connected components.
        closed_surface: also make the closed-surface representation (what the 3D view shows).

    Returns the new ``vtkMRMLSegmentationNode``, with segments ordered largest first and the
    attribute ``IWSegmentation.LesionCount`` (0 for an empty mask: the node is still made, so
    the caller can say "no lesions found").
    """
    slicer = _slicer()
    from vtkmodules.util import numpy_support

    _check_volume_node(volume_node, "volume_node")
    _check_mask_arrays(volume_node, lesion_mask, probabilities)
    thresholds = _resolve_thresholds(size_thresholds_mm)
    geometry = volume_geometry(volume_node)
    labels, found = analyze_lesions(
        lesion_mask, geometry.spacing_zyx, connectivity=connectivity, thresholds=thresholds,
        probabilities=probabilities,
    )
    # Largest first; ties keep scan order (stable sort), as lesions.relabel_by_size.
    found = sorted(found, key=lambda les: -les.voxels)
    ijk_to_ras = volume_ijk_to_ras(volume_node)

    ensure_converter_rules()
    node = slicer.vtkMRMLSegmentationNode()
    node.SetName(name or f"{volume_node.GetName()} lesions")
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    if volume_node.GetTransformNodeID():
        node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    node.SetAttribute(ATTR_LESION_COUNT, str(len(found)))
    node.SetAttribute(ATTR_SIZE_THRESHOLDS, f"{thresholds.small_mm:g};{thresholds.large_mm:g}")
    if not found:
        return node

    # One shared labelmap (value = lesion number) cropped to the union of the lesions' boxes.
    k = len(found)
    lut = np.zeros(int(labels.max()) + 1, dtype=_smallest_uint(k))
    for number, les in enumerate(found, start=1):
        lut[les.id] = number
    lo = np.min([les.bbox[:3] for les in found], axis=0)
    hi = np.max([les.bbox[3:] for les in found], axis=0)
    crop = lut[labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]]
    image = slicer.vtkOrientedImageData()
    image.SetExtent(int(lo[2]), int(hi[2]) - 1, int(lo[1]), int(hi[1]) - 1, int(lo[0]), int(hi[0]) - 1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(crop).ravel(), deep=True))
    image.SetImageToWorldMatrix(_vtk_matrix(ijk_to_ras))

    width = max(2, len(str(k)))
    segmentation = node.GetSegmentation()
    was_modifying = node.StartModify()
    try:
        for number, les in enumerate(found, start=1):
            segment = slicer.vtkSegment()
            segment.SetName(segment_name(number, les.diameter_mm, les.size_group, width))
            segment.SetColor(*(c / 255.0 for c in SIZE_GROUP_COLORS[les.size_group]))
            segment.SetLabelValue(number)
            segment.AddRepresentation(LABELMAP, image)
            segment.SetTerminology(LESION_TERMINOLOGY)
            tags = {
                "number": str(number),
                "component": str(les.id),
                "voxels": str(les.voxels),
                "volume_mm3": repr(float(les.volume_mm3)),
                "diameter_mm": repr(float(les.diameter_mm)),
                "size_group": les.size_group,
                "center_ras": ",".join(repr(v) for v in centroid_ras(ijk_to_ras, les.centroid)),
            }
            if les.confidence is not None:
                tags["confidence"] = repr(float(les.confidence))
            for key, value in tags.items():
                segment.SetTag(TAGS[key], value)
            segmentation.AddSegment(segment, f"lesion_{number:0{width}d}")
    finally:
        node.EndModify(was_modifying)
    if closed_surface:
        node.CreateClosedSurfaceRepresentation()
    return node


def _segment_ids(segmentation_node) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def get_tag(segment, tag: str) -> str | None:
    """A segment tag's value, or None when the segment does not have it."""
    from vtkmodules.vtkCommonCore import reference

    value = reference("")
    return str(value) if segment.GetTag(tag, value) else None


def _float_tag(segment, key: str) -> float | None:
    value = get_tag(segment, TAGS[key])
    if value in (None, ""):
        return None
    try:
        return float(value)
    except ValueError:
        return None


def lesion_rows(segmentation_node, match: DiceMatch | None = None) -> list[dict]:
    """The rows of the lesion table: the segments' lesions (read back from their tags) and, given
    the ``match`` of :func:`match_segmentations`, their status and Dice, then the missed
    reference lesions.

    The one place that builds the table: the module shows these rows (formatted by
    :func:`IWSegmentationLib.panel.lesion_cells`), the table node (:func:`dice_table_node`)
    holds them, and a click on one centres the views on its ``center_ras``
    (:func:`center_slice_views`).

    One dict per segment in segment order, ``row`` = ``"detection"``: ``segment_id, name, id``
    (the lesion number), ``component_id, voxels, volume_mm3, diameter_mm, size_group,
    confidence, center_ras, visible`` (numbers missing from the tags of a segment drawn by hand
    are None) and ``status, dice, hit_dice, reference_id`` (None without a ``match``; ``TP``/``FP``
    with one). With a ``match``, then one row per missed reference lesion (``row`` =
    ``"reference"``, ``status`` ``FN``; its ``segment_id`` is the *reference* segment holding it,
    which may hold other lesions too, and its ``center_ras`` that lesion's own centroid).
    """
    rows = []
    display = segmentation_node.GetDisplayNode()
    segmentation = segmentation_node.GetSegmentation()
    for index, segment_id in enumerate(_segment_ids(segmentation_node), start=1):
        segment = segmentation.GetSegment(segment_id)
        number = _float_tag(segment, "number")
        component = _float_tag(segment, "component")
        voxels = _float_tag(segment, "voxels")
        center = get_tag(segment, TAGS["center_ras"])
        rows.append({
            "row": "detection",
            "segment_id": segment_id,
            "name": segment.GetName(),
            "id": int(number) if number is not None else index,
            "component_id": int(component) if component is not None else None,
            "voxels": int(voxels) if voxels is not None else None,
            "volume_mm3": _float_tag(segment, "volume_mm3"),
            "diameter_mm": _float_tag(segment, "diameter_mm"),
            "size_group": get_tag(segment, TAGS["size_group"]),
            "confidence": _float_tag(segment, "confidence"),
            "center_ras": tuple(float(v) for v in center.split(",")) if center else None,
            "visible": bool(display.GetSegmentVisibility(segment_id)) if display else True,
            "status": None, "dice": None, "hit_dice": None, "reference_id": None,
        })
    if match is None:
        return rows
    by_segment = {d["segment_id"]: d for d in match.detections}
    for row in rows:
        detection = by_segment.get(row["segment_id"], {})
        row.update({key: detection.get(key) for key in ("status", "dice", "hit_dice", "reference_id")})
    return _with_missed(rows, match.references)


def _with_missed(detections: list[dict], references: Sequence[dict]) -> list[dict]:
    """The table order: the detections, then the reference lesions no detection overlaps (FN)."""
    return detections + [r for r in references if r["status"] == "FN"]


def center_slice_views(scene, center_ras: Sequence[float], volume_node=None) -> tuple[float, float, float]:
    """Centre every slice view of ``scene`` on a point: what a click on a lesion-table row does.

    ``center_ras`` is a row's ``center_ras`` (mm, in the volume's RAS frame, as every row's is);
    when ``volume_node`` sits under a transform the point is moved to world coordinates first.
    Each slice plane goes through the point and the point is put at the view's centre
    (``vtkMRMLSliceNode.JumpAllSlices`` in centred mode — no Qt, no Markups module). Returns the
    world point.
    """
    slicer = _slicer()
    import vtk

    if center_ras is None or len(center_ras) != 3 or not all(math.isfinite(float(v)) for v in center_ras):
        raise InputError(f"a lesion centre needs three finite RAS coordinates, got {center_ras!r}")
    point = [float(v) for v in center_ras]
    parent = volume_node.GetParentTransformNode() if volume_node is not None else None
    if parent is not None:
        to_world = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(parent, None, to_world)
        point = list(to_world.TransformPoint(point))
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, *point, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
    return tuple(point)


def set_confidence_threshold(segmentation_node, threshold: float) -> dict:
    """Show the segments whose confidence is ``>= threshold`` and hide the others.

    The confidence slider of the module: no inference is rerun, only segment visibility
    changes (in one display-node modification, so views redraw once). Segments without a
    confidence tag stay visible. Returns ``{"threshold", "shown", "hidden", "total"}``; the
    threshold is also kept as the node attribute ``IWSegmentation.ConfidenceThreshold``.
    """
    threshold = float(threshold)
    if not math.isfinite(threshold) or not 0.0 <= threshold <= 1.0:
        raise InputError(f"confidence threshold must be in [0, 1], got {threshold}")
    display = segmentation_node.GetDisplayNode()
    if display is None:
        segmentation_node.CreateDefaultDisplayNodes()
        display = segmentation_node.GetDisplayNode()
    segmentation = segmentation_node.GetSegmentation()
    shown = hidden = 0
    was_modifying = display.StartModify()
    try:
        for segment_id in _segment_ids(segmentation_node):
            confidence = _float_tag(segmentation.GetSegment(segment_id), "confidence")
            visible = confidence is None or confidence >= threshold
            display.SetSegmentVisibility(segment_id, visible)
            shown += visible
            hidden += not visible
    finally:
        display.EndModify(was_modifying)
    segmentation_node.SetAttribute(ATTR_CONFIDENCE_THRESHOLD, repr(threshold))
    return {"threshold": threshold, "shown": shown, "hidden": hidden, "total": shown + hidden}


# ============================================================================ object Dice


def reference_volume_node(segmentation_node):
    """The volume whose grid is the segmentation's reference geometry (None if not recorded)."""
    role = segmentation_node.GetReferenceImageGeometryReferenceRole()
    return segmentation_node.GetNodeReference(role)


def labelmap_on_volume_grid(segmentation_node, volume_node, segment_ids: Sequence[str] | None = None) -> np.ndarray:
    """Export segments onto the volume's voxel grid: ``[z, y, x]`` int array, 0 = background and
    ``n + 1`` where the ``n``-th of ``segment_ids`` (default: all, in order) is.

    Slicer's segmentation logic does the resampling, so a segmentation drawn on another grid
    (another volume, another resolution, oblique, under a transform) lands on this one. Where
    segments overlap, the later one wins. No node is left in the scene.

    Fast path: segments whose labelmap layers already lie on the volume's grid (what
    :func:`lesion_segmentation` makes) are read directly, one pass per layer; Slicer's export
    merges segment by segment over the whole grid, which costs seconds for hundreds of lesions.
    """
    slicer = _slicer()
    import vtk
    from vtkmodules.util import numpy_support

    _check_volume_node(volume_node, "volume_node")
    ids = list(_segment_ids(segmentation_node) if segment_ids is None else segment_ids)
    shape = volume_geometry(volume_node).shape_zyx
    known = set(_segment_ids(segmentation_node))
    missing = [s for s in ids if s not in known]
    if missing:
        raise InputError(f"segmentation {segmentation_node.GetName()!r} has no segment(s) {', '.join(missing)}")
    if not ids:
        return np.zeros(shape, dtype=np.int16)
    direct = _layers_on_volume_grid(segmentation_node, volume_node, ids)
    if direct is not None:
        return direct
    scene = segmentation_node.GetScene() or volume_node.GetScene()
    if scene is None:
        raise InputError(f"segmentation {segmentation_node.GetName()!r} is not in a scene")
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    scene.AddNode(labelmap)
    try:
        id_array = vtk.vtkStringArray()
        for segment_id in ids:
            id_array.InsertNextValue(segment_id)
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, id_array, labelmap, volume_node,
        )
        image = labelmap.GetImageData()
        if not ok or image is None:
            raise InputError(
                f"could not export segmentation {segmentation_node.GetName()!r} onto the grid of {volume_node.GetName()!r}"
            )
        dims = image.GetDimensions()
        out = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1]).copy()
        if out.shape != shape or not np.allclose(volume_ijk_to_ras(labelmap), volume_ijk_to_ras(volume_node), atol=1e-6):
            raise GeometryMismatchError(  # pragma: no cover - Slicer's contract
                f"exported labelmap of {segmentation_node.GetName()!r} is not on the grid of {volume_node.GetName()!r}"
            )
        # Label values follow the order of ids (Slicer writes 1..n unless told otherwise).
        return out
    finally:
        for i in reversed(range(scene.GetNumberOfNodes())):
            added = scene.GetNthNode(i)
            if added is not None and added.GetID() not in before:
                scene.RemoveNode(added)


def _layers_on_volume_grid(segmentation_node, volume_node, ids: list[str]) -> np.ndarray | None:
    """:func:`labelmap_on_volume_grid` read straight from the layers, or None when a segment has
    no labelmap on exactly the volume's grid (then Slicer resamples)."""
    import vtk
    from vtkmodules.util import numpy_support

    if segmentation_node.GetTransformNodeID() != volume_node.GetTransformNodeID():
        return None
    segmentation = segmentation_node.GetSegmentation()
    grid = volume_ijk_to_ras(volume_node)
    shape = volume_geometry(volume_node).shape_zyx
    layers: dict[int, list[tuple[int, int]]] = {}  # layer -> [(label value, output value)]
    for n, segment_id in enumerate(ids, start=1):
        segment = segmentation.GetSegment(segment_id)
        if segment.GetRepresentation(LABELMAP) is None:
            return None
        layers.setdefault(segmentation.GetLayerIndex(segment_id), []).append((segment.GetLabelValue(), n))
    out = np.zeros(shape, dtype=np.int16 if len(ids) < 2**15 else np.int32)
    for layer, pairs in layers.items():
        image = segmentation.GetLayerDataObject(layer)
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        if image.GetPointData().GetScalars() is None or image.GetNumberOfScalarComponents() != 1:
            return None
        if not np.allclose(_as_numpy_matrix(matrix), grid, rtol=1e-6, atol=1e-6):
            return None
        e = image.GetExtent()
        if e[1] < e[0] or e[3] < e[2] or e[5] < e[4]:
            continue  # an empty layer
        values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(
            e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
        lo = np.array([e[4], e[2], e[0]])
        hi = np.array([e[5], e[3], e[1]]) + 1
        a, b = np.maximum(lo, 0), np.minimum(hi, shape)
        if np.any(b <= a):
            continue
        values = values[a[0] - lo[0]:b[0] - lo[0], a[1] - lo[1]:b[1] - lo[1], a[2] - lo[2]:b[2] - lo[2]]
        labels = [v for v, _ in pairs]
        if min(labels) < 0 or max(labels) > 2**20:
            return None
        lut = np.zeros(max(max(labels), int(values.max(initial=0))) + 1, dtype=out.dtype)
        for value, n in pairs:
            lut[value] = max(lut[value], n)
        window = out[a[0]:b[0], a[1]:b[1], a[2]:b[2]]
        np.maximum(window, lut[np.clip(values, 0, None)], out=window)  # later segments win
    return out


@dataclass
class DiceMatch:
    """The matching of one segmentation against a reference, in table-ready rows.

    ``detections``: one row per detected lesion (component of the segments, in segment order)
    with ``status`` TP/FP; ``references``: one row per reference lesion with ``status`` TP/FN;
    ``case``: the :class:`~IWSegmentationLib.metrics.CaseResult` they come from.
    """

    detections: list[dict]
    references: list[dict]
    case: Any = field(repr=False, default=None)

    @property
    def rows(self) -> list[dict]:
        """The Dice table: the detections, then the missed reference lesions (FN)."""
        return _with_missed(self.detections, self.references)


def _thresholds_of(segmentation_node, size_thresholds_mm) -> SizeThresholds:
    if size_thresholds_mm is not None:
        return _resolve_thresholds(size_thresholds_mm)
    stored = segmentation_node.GetAttribute(ATTR_SIZE_THRESHOLDS)
    if stored:
        try:
            small, large = (float(v) for v in stored.split(";"))
            return SizeThresholds(small, large)
        except ValueError:
            pass
    return SIZE_PRESETS[DEFAULT_SIZE_PRESET]


def match_segmentations(
    segmentation_node,
    reference_segmentation_node,
    reference_segment_ids: Sequence[str] | None = None,
    volume_node=None,
    *,
    size_thresholds_mm: Sequence[float] | SizeThresholds | str | None = None,
    connectivity: int = 26,
) -> DiceMatch:
    """Match the lesions of ``segmentation_node`` to those of a reference, on the volume's grid.

    Detections are the connected components of all the segments (for a segmentation made by
    :func:`lesion_segmentation`, exactly its segments); reference lesions are the connected
    components of the union of ``reference_segment_ids`` (default: all). Both are put on
    ``volume_node``'s grid (default: the segmentation's reference volume) and matched by
    :func:`IWSegmentationLib.metrics.match_case`, with each detection's confidence taken from
    its segment's confidence tag (1.0 when absent).
    """
    from . import metrics

    if volume_node is None:
        volume_node = reference_volume_node(segmentation_node)
    if volume_node is None:
        raise InputError(
            f"segmentation {segmentation_node.GetName()!r} records no reference volume; pass volume_node"
        )
    if reference_segmentation_node is None:
        raise InputError("a reference segmentation is needed for the Dice table")
    geometry = volume_geometry(volume_node)
    thresholds = _thresholds_of(segmentation_node, size_thresholds_mm)

    seg_ids = _segment_ids(segmentation_node)
    seg_labels = labelmap_on_volume_grid(segmentation_node, volume_node, seg_ids)
    ref_ids = list(_segment_ids(reference_segmentation_node) if reference_segment_ids is None
                   else reference_segment_ids)
    ref_labels = labelmap_on_volume_grid(reference_segmentation_node, volume_node, ref_ids)

    rows = {row["segment_id"]: row for row in lesion_rows(segmentation_node)}
    seg_conf = np.ones(len(seg_ids) + 1, dtype=np.float32)
    seg_conf[0] = 0.0
    for n, segment_id in enumerate(seg_ids, start=1):
        if rows[segment_id]["confidence"] is not None:
            # match_case keeps prob > 0: a confidence of exactly 0 would drop the lesion.
            seg_conf[n] = max(float(rows[segment_id]["confidence"]), np.finfo(np.float32).tiny)

    # Match inside the bounding box of everything (same components, same numbers, less memory).
    box = _bounding_box((seg_labels > 0) | (ref_labels > 0))
    seg_labels, ref_labels = seg_labels[box], ref_labels[box]
    offset = np.array([sl.start for sl in box], dtype=float)
    case = metrics.match_case(
        seg_conf[seg_labels], (ref_labels > 0).astype(np.uint8), geometry.spacing_zyx, threshold=0.0,
        thresholds=thresholds, connectivity=connectivity, case=segmentation_node.GetName(),
        pred_name=f"segmentation {segmentation_node.GetName()!r}",
        ref_name=f"reference {reference_segmentation_node.GetName()!r}", keep_labels=True,
    )

    ijk_to_ras = volume_ijk_to_ras(volume_node)

    def center(centroid_zyx) -> tuple[float, float, float]:
        return centroid_ras(ijk_to_ras, np.asarray(centroid_zyx, dtype=float) + offset)

    def owner(label_map: np.ndarray, component_labels: np.ndarray, k: int) -> np.ndarray:
        """For each component 1..k, the (largest) segment label found inside it, in one pass."""
        out = np.zeros(k + 1, dtype=np.int64)
        inside = component_labels > 0
        np.maximum.at(out, component_labels[inside], label_map[inside].astype(np.int64))
        return out

    comp_segment = owner(seg_labels, case.pred_labels, len(case.components) and int(case.pred_labels.max()))
    les_segment = owner(ref_labels, case.ref_labels, len(case.lesions) and int(case.ref_labels.max()))
    lesion_by_id = {les.id: les for les in case.lesions}
    comp_by_id = {comp.id: comp for comp in case.components}
    ref_names = [reference_segmentation_node.GetSegmentation().GetSegment(s).GetName() for s in ref_ids]

    detections = []
    for comp in case.components:
        segment_id = seg_ids[comp_segment[comp.id] - 1]
        row = rows[segment_id]
        status = "TP" if comp.hit_dice > 0 else "FP"
        matched = lesion_by_id.get(comp.lesion) if comp.lesion is not None else None
        detections.append({
            "row": "detection",
            "segment_id": segment_id,
            "name": row["name"],
            "id": row["id"],
            "component": comp.id,
            "voxels": comp.voxels,
            "volume_mm3": comp.volume_mm3,
            "diameter_mm": comp.diameter_mm,
            "size_group": comp.size_group,
            "confidence": row["confidence"],
            "hit_dice": comp.hit_dice,
            "dice": comp.hit_dice,
            "status": status,
            "reference_id": comp.lesion,
            "reference_diameter_mm": matched.diameter_mm if matched else None,
            "center_ras": center(comp.centroid),
        })
    order = {segment_id: i for i, segment_id in enumerate(seg_ids)}
    detections.sort(key=lambda d: (order[d["segment_id"]], d["component"]))

    references = []
    for les in sorted(case.lesions, key=lambda x: (-x.voxels, x.id)):
        n = les_segment[les.id]
        segment_id = ref_ids[n - 1] if n > 0 else None
        comp = comp_by_id.get(les.component) if les.component is not None else None
        status = "TP" if les.hit_dice > 0 else "FN"
        source = f" ({ref_names[n - 1]})" if n > 0 else ""
        references.append({
            "row": "reference",
            "segment_id": segment_id,
            "reference_segmentation": reference_segmentation_node.GetID(),
            "name": f"Reference {les.id:02d} · {les.diameter_mm:.1f} mm · {les.size_group}{source}",
            "id": les.id,
            "reference_id": les.id,
            "voxels": les.voxels,
            "volume_mm3": les.volume_mm3,
            "diameter_mm": les.diameter_mm,
            "size_group": les.size_group,
            "hit_dice": les.hit_dice,
            "dice": les.hit_dice,
            # hit_conf, read from the matched segment's tag (the float32 map only ranks them)
            "confidence": rows[seg_ids[comp_segment[comp.id] - 1]]["confidence"] if comp is not None else None,
            "status": status,
            "matched_segment_id": (seg_ids[comp_segment[comp.id] - 1] if comp is not None else None),
            "center_ras": center(les.centroid),
        })
    return DiceMatch(detections, references, case)


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice]:
    """Slices of the smallest box holding every nonzero voxel (a 1-voxel box when there is none)."""
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        out.append(slice(int(hits[0]), int(hits[-1]) + 1) if hits.size else slice(0, 1))
    return tuple(out)


def object_dice_table(
    segmentation_node,
    reference_segmentation_node,
    reference_segment_ids: Sequence[str] | None = None,
    volume_node=None,
    *,
    size_thresholds_mm: Sequence[float] | SizeThresholds | str | None = None,
    connectivity: int = 26,
) -> list[dict]:
    """Object Dice of every detected lesion against a reference, and the missed reference lesions.

    Rows (dicts): one per detected lesion, in segment order, with ``status`` ``TP`` (overlaps a
    reference lesion; ``dice`` = its best Dice, ``reference_id`` that lesion) or ``FP``
    (``dice`` 0); then one ``FN`` row per reference lesion no detection overlaps. Every row has
    ``name, status, segment_id, diameter_mm, volume_mm3, size_group, confidence, dice,
    reference_id, center_ras``. See :func:`match_segmentations` for the definitions; the
    numbers are those of :func:`IWSegmentationLib.metrics.match_case` on the volume's grid.
    """
    return match_segmentations(
        segmentation_node, reference_segmentation_node, reference_segment_ids, volume_node,
        size_thresholds_mm=size_thresholds_mm, connectivity=connectivity,
    ).rows


def table_node_from_rows(scene, rows: Sequence[dict], name: str = "Table",
                         columns: Sequence[tuple[str, str, str]] | None = None):
    """A ``vtkMRMLTableNode`` with one row per dict and one column per ``(key, title, unit)``.

    Column types follow the values: integers -> int, other numbers -> double (missing = NaN),
    anything else -> string (missing = empty). Default columns: the keys of the first row.
    """
    import vtk

    slicer = _slicer()
    rows = list(rows)
    if columns is None:
        columns = [(key, key, "") for key in (rows[0] if rows else {})]
    node = slicer.vtkMRMLTableNode()
    node.SetName(name)
    scene.AddNode(node)
    was_modifying = node.StartModify()
    try:
        for key, title, unit in columns:
            values = [row.get(key) for row in rows]
            present = [v for v in values if v is not None]
            if present and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in present) \
                    and len(present) == len(values):
                array = vtk.vtkIntArray()
                for v in values:
                    array.InsertNextValue(int(v))
            elif present and all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in present):
                array = vtk.vtkDoubleArray()
                for v in values:
                    array.InsertNextValue(math.nan if v is None else float(v))
            else:
                array = vtk.vtkStringArray()
                for v in values:
                    array.InsertNextValue("" if v is None else _cell_text(v))
            array.SetName(title)
            node.AddColumn(array)
            if unit:
                node.SetColumnUnitLabel(title, unit)
    finally:
        node.EndModify(was_modifying)
    return node


def _cell_text(value) -> str:
    if isinstance(value, (tuple, list)):
        return ", ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def dice_table_node(scene, rows: Sequence[dict], name: str = "Lesion Dice"):
    """The Dice table (:func:`object_dice_table` rows) as a ``vtkMRMLTableNode`` (:data:`DICE_TABLE_COLUMNS`)."""
    return table_node_from_rows(scene, rows, name, DICE_TABLE_COLUMNS)


# ============================================================================ the module's entry point


@dataclass
class PredictionResults:
    """What :func:`load_prediction` put into the scene, and the rows the panel shows.

    ``rows``: the lesion table (:func:`lesion_rows`): one row per detected lesion (segment
    order, largest first) and, with a reference, one per missed reference lesion (FN).
    ``matches``: one dict per reference lesion (``status`` TP/FN, ``dice``/``hit_dice``,
    ``confidence`` of its match, ``segment_id`` in ``reference``, ``center_ras``), or None
    without a reference. ``table``: the table node holding ``rows``. ``probabilities``: the
    probability volume node (when kept).
    """

    segmentation: Any
    rows: list[dict]
    matches: list[dict] | None = None
    reference: Any = None
    table: Any = None
    probabilities: Any = None

    @property
    def lesions(self) -> list[dict]:
        """The detected lesions: the rows that are segments of :attr:`segmentation` (no FN rows)."""
        return [row for row in self.rows if row["row"] == "detection"]


def load_prediction(
    scene,
    volume_node,
    lesion_mask: np.ndarray,
    probabilities: np.ndarray | None = None,
    *,
    reference=None,
    reference_segment_ids: Sequence[str] | None = None,
    size_thresholds_mm: Sequence[float] | SizeThresholds | str | None = None,
    name: str | None = None,
    connectivity: int = 26,
    keep_probabilities: bool = False,
    make_table: bool = True,
    closed_surface: bool = True,
    geometry: Geometry | None = None,
    probabilities_geometry: Geometry | None = None,
) -> PredictionResults:
    """Turn the backend's outputs (read onto the volume's grid) into segments and table rows.

    Calls :func:`lesion_segmentation` and, given a ``reference`` segmentation node,
    :func:`match_segmentations`; the rows are :func:`lesion_rows`. Optionally adds the
    probability map as a volume node (``keep_probabilities``) and the table node
    (``make_table``). Pass the ``geometry`` (and ``probabilities_geometry``) that
    :func:`IWSegmentationLib.imageio.read_image` returned with the mask (and the probability
    map): a file on another grid is refused with :class:`GeometryMismatchError` naming what
    differs, before anything is added to the scene — the arrays alone cannot tell.
    """
    if geometry is not None:
        check_on_volume_grid(geometry, volume_node, "the backend's lesion mask")
    if probabilities_geometry is not None:
        check_on_volume_grid(probabilities_geometry, volume_node, "the backend's probability map")
    segmentation = lesion_segmentation(
        scene, volume_node, lesion_mask, probabilities=probabilities, size_thresholds_mm=size_thresholds_mm,
        name=name, connectivity=connectivity, closed_surface=closed_surface,
    )
    match = None
    if reference is not None:
        match = match_segmentations(segmentation, reference, reference_segment_ids, volume_node,
                                    connectivity=connectivity)
    rows = lesion_rows(segmentation, match)
    table = dice_table_node(scene, rows, f"{segmentation.GetName()} table") if make_table else None
    probability_node = None
    if keep_probabilities and probabilities is not None:
        probability_node = add_volume_from_array(
            scene, probabilities.astype(np.float32, copy=False), volume_geometry(volume_node),
            f"{segmentation.GetName()} probabilities",
        )
        if volume_node.GetTransformNodeID():
            probability_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    return PredictionResults(segmentation, rows, match.references if match else None, reference, table,
                             probability_node)
