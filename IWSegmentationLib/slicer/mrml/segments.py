"""Lesion segments: one segment per lesion, coloured by size group, tagged with its numbers; their rows.

:func:`segment_rows` reads the segments back as lesion-table rows; the rows that know about a
match against a reference (:func:`~IWSegmentationLib.slicer.mrml.matching.lesion_rows`) are built
in :mod:`.matching`, which imports this module (never the other way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ...core.errors import GeometryMismatchError, InputError
from ...core.lesions import (
    LESION_TERMINOLOGY,
    SIZE_GROUP_COLORS,
    SizeThresholds,
    analyze_lesions,
    parse_size_thresholds,
    segment_name,
)
from ..lesion_row import LesionRow
from ..panel import DEFAULT_SEGMENT_BUDGET
from .geometry import centroid_ras, check_volume_node, to_vtk_matrix, volume_geometry, volume_ijk_to_ras
from .scene import ensure_converter_rules, slicer_module

#: Segment tags written by :func:`lesion_segmentation` (values are strings, as MRML stores them).
TAG_PREFIX = "IWSegmentation."


TAGS = {
    "number": TAG_PREFIX + "LesionNumber",  # 1 = largest lesion (lesions.number_lesions)
    "component": TAG_PREFIX + "ComponentId",  # the lesion's id in the backend's lesion JSON (the same number)
    "voxels": TAG_PREFIX + "Voxels",
    "volume_mm3": TAG_PREFIX + "VolumeMm3",
    "diameter_mm": TAG_PREFIX + "DiameterMm",
    "size_group": TAG_PREFIX + "SizeGroup",
    "confidence": TAG_PREFIX + "Confidence",  # the maximum logit; absent when no logit map was given
    "center_ras": TAG_PREFIX + "CenterRAS",  # "r,a,s" mm, the centroid of the voxels
}


#: Segmentation-node attributes.
ATTR_LESION_COUNT = TAG_PREFIX + "LesionCount"


ATTR_SIZE_THRESHOLDS = TAG_PREFIX + "SizeThresholdsMm"  # "small;large"


ATTR_CONFIDENCE_THRESHOLD = TAG_PREFIX + "ConfidenceThreshold"


ATTR_NOT_SHOWN = TAG_PREFIX + "LesionsNotShown"  # lesions counted but not (yet) made segments




LABELMAP = "Binary labelmap"


CLOSED_SURFACE = "Closed surface"


def _check_mask_arrays(volume_node, lesion_mask, logits) -> None:
    shape = volume_geometry(volume_node).shape_zyx
    name = volume_node.GetName()
    if not isinstance(lesion_mask, np.ndarray) or lesion_mask.ndim != 3:
        raise InputError(f"lesion_mask must be a 3D [z, y, x] array, got {getattr(lesion_mask, 'shape', type(lesion_mask))}")
    if lesion_mask.shape != shape:
        raise GeometryMismatchError(
            f"lesion_mask has shape {lesion_mask.shape} but volume {name!r} has {shape} voxels [z, y, x]; "
            "read the backend's output onto the volume's grid first"
        )
    if logits is None:
        return
    if not isinstance(logits, np.ndarray) or logits.shape != shape:
        raise GeometryMismatchError(
            f"logits have shape {getattr(logits, 'shape', None)} but volume {name!r} has {shape}"
        )
    lo, hi = float(np.min(logits)), float(np.max(logits))
    if math.isnan(lo) or math.isnan(hi) or hi == math.inf:
        raise InputError(f"logits must be numbers below +inf, got range [{lo:g}, {hi:g}]")


def _smallest_uint(k: int):
    return np.uint8 if k < 2**8 else np.uint16 if k < 2**16 else np.uint32


def lesion_segmentation(
    scene,
    volume_node,
    lesion_mask: np.ndarray,
    *,
    logits: np.ndarray | None = None,
    size_thresholds_mm: Sequence[float] | SizeThresholds | str | None = None,
    name: str | None = None,
    connectivity: int = 26,
    closed_surface: bool = True,
):
    """Build a segmentation node with one segment per lesion of ``lesion_mask`` (every lesion; the
    module's results use :func:`budgeted_lesion_segmentation`).

    Args:
        scene: the MRML scene (``slicer.mrmlScene`` inside Slicer).
        volume_node: the scalar volume the mask was computed on; its grid (``IJKToRAS``,
            oblique and anisotropic included) becomes the segmentation's reference geometry,
            and its parent transform the segmentation's.
        lesion_mask: ``[z, y, x]`` array on the volume's IJK grid; nonzero = lesion.
        logits: optional ``[z, y, x]`` logit map on the same grid (``iwseg predict --logits``);
            a lesion's confidence is its maximum logit (as ``lesions.lesion_table`` and the
            backend's lesion JSON): a probability would round to 1.0 above logit 17.
        size_thresholds_mm: ``(small, large)`` diameter cut-offs in mm, a
            :class:`SizeThresholds`, a preset name, or None for the default preset.
        name: node name (default ``"<volume name> lesions"``).
        connectivity: 6, 18 or 26, for the connected components.
        closed_surface: also make the closed-surface representation (what the 3D view shows).

    Returns the new ``vtkMRMLSegmentationNode``, with segments numbered as every lesion output
    (:func:`IWSegmentationLib.core.lesions.number_lesions`: largest first) and the
    attribute ``IWSegmentation.LesionCount`` (0 for an empty mask: the node is still made, so
    the caller can say "no lesions found").
    """
    node, _ = budgeted_lesion_segmentation(
        scene, volume_node, lesion_mask, logits=logits, size_thresholds_mm=size_thresholds_mm, name=name,
        connectivity=connectivity, closed_surface=closed_surface, budget=None)
    return node


@dataclass
class NotShownLesions:
    """The lesions of a result that are counted but not segments yet (display budget): what
    :func:`show_more_lesions` needs to add them later without analysing the mask again.
    ``lesions`` are most confident first; each keeps its lesion number (1 = largest of all)."""

    labels: np.ndarray
    lesions: list[tuple[int, Any]] = field(default_factory=list)  # (lesion number, lesions.Lesion)
    ijk_to_ras: np.ndarray | None = None
    width: int = 2
    closed_surface: bool = True

    def __len__(self) -> int:
        return len(self.lesions)

    def rows(self) -> list[LesionRow]:
        """The lesions not shown as lesion-table rows (``row="not shown"``, no segment), most confident first."""
        return [LesionRow(row="not shown", segment_id=None, name=segment_name(n, les.diameter_mm, les.size_group,
                                                                              self.width),
                          id=n, component_id=int(les.id), voxels=int(les.voxels), volume_mm3=float(les.volume_mm3),
                          diameter_mm=float(les.diameter_mm), size_group=les.size_group,
                          confidence=None if les.confidence is None else float(les.confidence),
                          center_ras=tuple(centroid_ras(self.ijk_to_ras, les.centroid)), visible=False)
                for n, les in self.lesions]


def confidence_order(found: Sequence) -> list:
    """Lesions most confident first (maximum logit; without one, the largest first); ties: the larger, then scan order."""
    return sorted(found, key=lambda les: (-(les.confidence if les.confidence is not None else -math.inf),
                                          -les.voxels, les.id))


def budgeted_lesion_segmentation(
    scene,
    volume_node,
    lesion_mask: np.ndarray,
    *,
    logits: np.ndarray | None = None,
    size_thresholds_mm: Sequence[float] | SizeThresholds | str | None = None,
    name: str | None = None,
    connectivity: int = 26,
    closed_surface: bool = True,
    budget: int | None = DEFAULT_SEGMENT_BUDGET,
) -> tuple[Any, NotShownLesions]:
    """:func:`lesion_segmentation` with a display budget: only the ``budget`` most confident lesions
    (:func:`confidence_order`) become segments (None: all). Every lesion keeps its number (1 = the
    largest of all), so a segment's name does not change when more are shown. The node's
    ``IWSegmentation.LesionCount`` counts all lesions and ``IWSegmentation.LesionsNotShown`` the
    others; they are returned as :class:`NotShownLesions` (:func:`show_more_lesions` adds them).
    """
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
        raise InputError(f"segment budget must be a whole number >= 0 or None, got {budget!r}")
    check_volume_node(volume_node, "volume_node")
    _check_mask_arrays(volume_node, lesion_mask, logits)
    thresholds = parse_size_thresholds(size_thresholds_mm)
    geometry = volume_geometry(volume_node)
    labels, found = analyze_lesions(
        lesion_mask, geometry.spacing_zyx, connectivity=connectivity, thresholds=thresholds,
        scores=logits,
    )
    # numbered by lesions.number_lesions (largest first), as iwseg predict's lesion JSON and DICOM SEG
    numbered = [(les.id, les) for les in found]
    ijk_to_ras = volume_ijk_to_ras(volume_node)
    width = max(2, len(str(len(found))))
    rank = {id(les): i for i, les in enumerate(confidence_order(found))}
    chosen = numbered if budget is None else [(n, les) for n, les in numbered if rank[id(les)] < budget]
    rest = [] if budget is None else sorted(((n, les) for n, les in numbered if rank[id(les)] >= budget),
                                            key=lambda item: rank[id(item[1])])

    node = _empty_segmentation(scene, volume_node, name, len(found), thresholds)
    node.SetAttribute(ATTR_NOT_SHOWN, str(len(rest)))
    pending = NotShownLesions(labels if rest else np.zeros((0, 0, 0), np.uint8), rest, ijk_to_ras, width,
                              closed_surface)
    if chosen:
        _add_segments(node, labels, chosen, ijk_to_ras, width, closed_surface)
    return node, pending


def show_more_lesions(segmentation_node, pending: NotShownLesions, count: int = DEFAULT_SEGMENT_BUDGET) -> int:
    """Make segments of the next ``count`` most confident lesions of ``pending`` (taken from it) and
    update ``IWSegmentation.LesionsNotShown``; returns how many were added."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise InputError(f"count must be a whole number >= 0, got {count!r}")
    batch, pending.lesions = pending.lesions[:count], pending.lesions[count:]
    if batch:
        _add_segments(segmentation_node, pending.labels, sorted(batch, key=lambda item: item[0]),
                      pending.ijk_to_ras, pending.width, pending.closed_surface)
    if not pending.lesions:
        pending.labels = np.zeros((0, 0, 0), np.uint8)  # nothing left to add: free the label volume
    segmentation_node.SetAttribute(ATTR_NOT_SHOWN, str(len(pending.lesions)))
    return len(batch)


def _add_segments(node, labels: np.ndarray, numbered: Sequence, ijk_to_ras: np.ndarray, width: int,
                  closed_surface: bool) -> None:
    """Add one segment per ``(number, lesion)``, sharing one labelmap (value = lesion number)."""
    image = _shared_labelmap(labels, numbered, ijk_to_ras)
    segmentation = node.GetSegmentation()
    was_modifying = node.StartModify()
    try:
        for number, les in numbered:
            segmentation.AddSegment(_lesion_segment(number, les, image, ijk_to_ras, width),
                                    f"lesion_{number:0{width}d}")
    finally:
        node.EndModify(was_modifying)
    if closed_surface:
        node.CreateClosedSurfaceRepresentation()


def _empty_segmentation(scene, volume_node, name: str | None, count: int, thresholds: SizeThresholds):
    """A new segmentation node on the volume's grid (and transform), with the lesion count and size groups."""
    slicer = slicer_module()
    ensure_converter_rules()
    node = slicer.vtkMRMLSegmentationNode()
    node.SetName(name or f"{volume_node.GetName()} lesions")
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    if volume_node.GetTransformNodeID():
        node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    node.SetAttribute(ATTR_LESION_COUNT, str(count))
    node.SetAttribute(ATTR_SIZE_THRESHOLDS, thresholds.attribute)
    return node


def _shared_labelmap(labels: np.ndarray, numbered: Sequence, ijk_to_ras: np.ndarray):
    """One labelmap for the segments ``(number, lesion)`` (value = lesion number; the other lesions 0),
    cropped to the union of their boxes."""
    slicer = slicer_module()
    from vtkmodules.util import numpy_support  # lazy: Slicer's own; importable without it

    lut = np.zeros(int(labels.max()) + 1, dtype=_smallest_uint(max(n for n, _ in numbered) + 1))
    for number, les in numbered:
        lut[les.id] = number
    lo = np.min([les.bbox[:3] for _, les in numbered], axis=0)
    hi = np.max([les.bbox[3:] for _, les in numbered], axis=0)
    crop = lut[labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]]
    image = slicer.vtkOrientedImageData()
    image.SetExtent(int(lo[2]), int(hi[2]) - 1, int(lo[1]), int(hi[1]) - 1, int(lo[0]), int(hi[0]) - 1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(crop).ravel(), deep=True))
    image.SetImageToWorldMatrix(to_vtk_matrix(ijk_to_ras))
    return image


def _lesion_segment(number: int, les, image, ijk_to_ras: np.ndarray, width: int):
    """The segment of lesion ``number``: name, size-group colour, terminology and the numbers as tags."""
    segment = slicer_module().vtkSegment()
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
    return segment


def list_segment_ids(segmentation_node) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def get_tag(segment, tag: str) -> str | None:
    """A segment tag's value, or None when the segment does not have it."""
    from vtkmodules.vtkCommonCore import reference  # lazy: Slicer's own; importable without it

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


def segment_rows(segmentation_node) -> list[LesionRow]:
    """The segments' lesions as lesion-table rows, read back from their tags, in segment order.

    One :class:`~IWSegmentationLib.slicer.lesion_row.LesionRow` per segment, ``row`` = ``"detection"``:
    ``segment_id, name, id`` (the lesion number), ``component_id, voxels, volume_mm3, diameter_mm,
    size_group, confidence, center_ras, visible`` (numbers missing from the tags of a segment drawn
    by hand are None); ``status, dice, hit_dice, reference_id`` are None (no match: see
    :func:`~IWSegmentationLib.slicer.mrml.matching.lesion_rows`).
    """
    rows = []
    display = segmentation_node.GetDisplayNode()
    segmentation = segmentation_node.GetSegmentation()
    for index, segment_id in enumerate(list_segment_ids(segmentation_node), start=1):
        segment = segmentation.GetSegment(segment_id)
        number = _float_tag(segment, "number")
        component = _float_tag(segment, "component")
        voxels = _float_tag(segment, "voxels")
        center = get_tag(segment, TAGS["center_ras"])
        rows.append(LesionRow(
            row="detection",
            segment_id=segment_id,
            name=segment.GetName(),
            id=int(number) if number is not None else index,
            component_id=int(component) if component is not None else None,
            voxels=int(voxels) if voxels is not None else None,
            volume_mm3=_float_tag(segment, "volume_mm3"),
            diameter_mm=_float_tag(segment, "diameter_mm"),
            size_group=get_tag(segment, TAGS["size_group"]),
            confidence=_float_tag(segment, "confidence"),
            center_ras=tuple(float(v) for v in center.split(",")) if center else None,
            visible=bool(display.GetSegmentVisibility(segment_id)) if display else True,
        ))
    return rows


def set_confidence_threshold(segmentation_node, threshold: float) -> dict:
    """Show the segments whose confidence (maximum logit) is ``>= threshold`` and hide the others.

    The confidence slider of the module, in logit units (0 is probability 0.5): no inference is
    rerun, only segment visibility changes (in one display-node modification, so views redraw
    once). Segments without a confidence tag stay visible. Returns ``{"threshold", "shown",
    "hidden", "total"}``; the threshold is also kept as the node attribute
    ``IWSegmentation.ConfidenceThreshold``.
    """
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise InputError(f"confidence threshold must be a finite logit, got {threshold}")
    display = segmentation_node.GetDisplayNode()
    if display is None:
        segmentation_node.CreateDefaultDisplayNodes()
        display = segmentation_node.GetDisplayNode()
    segmentation = segmentation_node.GetSegmentation()
    shown = hidden = 0
    was_modifying = display.StartModify()
    try:
        for segment_id in list_segment_ids(segmentation_node):
            confidence = _float_tag(segmentation.GetSegment(segment_id), "confidence")
            visible = confidence is None or confidence >= threshold
            display.SetSegmentVisibility(segment_id, visible)
            shown += visible
            hidden += not visible
    finally:
        display.EndModify(was_modifying)
    segmentation_node.SetAttribute(ATTR_CONFIDENCE_THRESHOLD, repr(threshold))
    return {"threshold": threshold, "shown": shown, "hidden": hidden, "total": shown + hidden}
