"""Object Dice in the scene: segments and reference exported onto the volume grid and matched by the
evaluation code; the lesion table's rows with their match (:func:`lesion_rows`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ...core.confidence import SKIPPED_LOGIT
from ...core.errors import GeometryMismatchError, InputError
from ...core.lesions import (
    SizeThresholds,
    parse_size_thresholds,
)
from ...evaluation.matching import match_case
from ..lesion_row import LesionRow
from .geometry import as_numpy_matrix, centroid_ras, check_volume_node, volume_geometry, volume_ijk_to_ras
from .scene import slicer_module
from .segments import (
    ATTR_SIZE_THRESHOLDS,
    LABELMAP,
    list_segment_ids,
    segment_rows,
)


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
    slicer = slicer_module()
    import vtk  # lazy: Slicer's own; importable without it
    from vtkmodules.util import numpy_support  # lazy: Slicer's own; importable without it

    check_volume_node(volume_node, "volume_node")
    ids = list(list_segment_ids(segmentation_node) if segment_ids is None else segment_ids)
    shape = volume_geometry(volume_node).shape_zyx
    known = set(list_segment_ids(segmentation_node))
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
    import vtk  # lazy: Slicer's own; importable without it
    from vtkmodules.util import numpy_support  # lazy: Slicer's own; importable without it

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
        if not np.allclose(as_numpy_matrix(matrix), grid, rtol=1e-6, atol=1e-6):
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
    ``case``: the :class:`~IWSegmentationLib.evaluation.CaseResult` they come from.
    """

    detections: list[LesionRow]
    references: list[LesionRow]
    case: Any = field(repr=False, default=None)

    @property
    def rows(self) -> list[LesionRow]:
        """The Dice table: the detections, then the missed reference lesions (FN)."""
        return _with_missed(self.detections, self.references)


def lesion_rows(segmentation_node, match: DiceMatch | None = None) -> list[LesionRow]:
    """The rows of the lesion table: the segments' lesions (:func:`~.segments.segment_rows`, read back
    from their tags) and, given the ``match`` of :func:`match_segmentations`, their status and Dice,
    then the missed reference lesions.

    The one place that builds the table: the module shows these rows (formatted by
    :func:`IWSegmentationLib.slicer.panel.lesion_cells`), the table node (:func:`dice_table_node`)
    holds them, and a click on one centres the views on its ``center_ras``
    (:func:`center_slice_views`).

    One :class:`~IWSegmentationLib.slicer.lesion_row.LesionRow` per segment in segment order, ``row`` = ``"detection"``: ``segment_id, name, id``
    (the lesion number), ``component_id, voxels, volume_mm3, diameter_mm, size_group,
    confidence, center_ras, visible`` (numbers missing from the tags of a segment drawn by hand
    are None) and ``status, dice, hit_dice, reference_id`` (None without a ``match``; ``TP``/``FP``
    with one). With a ``match``, then one row per missed reference lesion (``row`` =
    ``"reference"``, ``status`` ``FN``; its ``segment_id`` is the *reference* segment holding it,
    which may hold other lesions too, and its ``center_ras`` that lesion's own centroid).
    """
    rows = segment_rows(segmentation_node)
    if match is None:
        return rows
    by_segment = {d.segment_id: d for d in match.detections}
    rows = [row.replace(**{key: getattr(by_segment[row.segment_id], key) if row.segment_id in by_segment else None
                           for key in ("status", "dice", "hit_dice", "reference_id")}) for row in rows]
    return _with_missed(rows, match.references)


def _with_missed(detections: list[LesionRow], references: Sequence[LesionRow]) -> list[LesionRow]:
    """The table order: the detections, then the reference lesions no detection overlaps (FN)."""
    return detections + [r for r in references if r.status == "FN"]


def _thresholds_of(segmentation_node, size_thresholds_mm) -> SizeThresholds:
    if size_thresholds_mm is not None:
        return parse_size_thresholds(size_thresholds_mm)
    try:
        return parse_size_thresholds(segmentation_node.GetAttribute(ATTR_SIZE_THRESHOLDS) or None)
    except InputError:
        return parse_size_thresholds(None)  # an attribute edited by hand: the default groups


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
    :func:`IWSegmentationLib.evaluation.match_case`, with each detection's confidence (its maximum
    logit) taken from its segment's confidence tag (:data:`UNTAGGED_LOGIT` when absent).
    """
    volume_node = _matching_volume(segmentation_node, reference_segmentation_node, volume_node)
    geometry = volume_geometry(volume_node)
    thresholds = _thresholds_of(segmentation_node, size_thresholds_mm)

    seg_ids = list_segment_ids(segmentation_node)
    seg_labels = labelmap_on_volume_grid(segmentation_node, volume_node, seg_ids)
    ref_ids = list(list_segment_ids(reference_segmentation_node) if reference_segment_ids is None
                   else reference_segment_ids)
    ref_labels = labelmap_on_volume_grid(reference_segmentation_node, volume_node, ref_ids)
    rows = {row.segment_id: row for row in segment_rows(segmentation_node)}

    # Match inside the bounding box of everything (same components, same numbers, less memory).
    box = _bounding_box((seg_labels > 0) | (ref_labels > 0))
    seg_labels, ref_labels = seg_labels[box], ref_labels[box]
    offset = np.array([sl.start for sl in box], dtype=float)
    case = match_case(
        _segment_confidences(seg_ids, rows)[seg_labels], (ref_labels > 0).astype(np.uint8), geometry.spacing_zyx,
        threshold=0.0, score="logit", thresholds=thresholds, connectivity=connectivity, case=segmentation_node.GetName(),
        pred_name=f"segmentation {segmentation_node.GetName()!r}",
        ref_name=f"reference {reference_segmentation_node.GetName()!r}", keep_labels=True,
    )
    ijk_to_ras = volume_ijk_to_ras(volume_node)

    def center(centroid_zyx) -> tuple[float, float, float]:
        return centroid_ras(ijk_to_ras, np.asarray(centroid_zyx, dtype=float) + offset)

    # the segment (1-based index into seg_ids / ref_ids) each component and reference lesion lies in
    comp_segment = _owner(seg_labels, case.pred_labels, len(case.components) and int(case.pred_labels.max()))
    les_segment = _owner(ref_labels, case.ref_labels, len(case.lesions) and int(case.ref_labels.max()))
    detections = _detection_rows(case, [rows[seg_ids[comp_segment[c.id] - 1]] for c in case.components], center)
    order = {segment_id: i for i, segment_id in enumerate(seg_ids)}
    detections.sort(key=lambda d: (order[d.segment_id], d.component_id))
    segment_of_component = {c.id: rows[seg_ids[comp_segment[c.id] - 1]] for c in case.components}
    references = [
        _reference_row(les, reference_segmentation_node, ref_ids, les_segment[les.id],
                       segment_of_component.get(les.component) if les.component is not None else None, center)
        for les in sorted(case.lesions, key=lambda x: (-x.voxels, x.id))
    ]
    return DiceMatch(detections, references, case)


def _matching_volume(segmentation_node, reference_segmentation_node, volume_node):
    """The volume whose grid the matching uses: ``volume_node``, else the segmentation's reference volume."""
    if volume_node is None:
        volume_node = reference_volume_node(segmentation_node)
    if volume_node is None:
        raise InputError(
            f"segmentation {segmentation_node.GetName()!r} records no reference volume; pass volume_node"
        )
    if reference_segmentation_node is None:
        raise InputError("a reference segmentation is needed for the Dice table")
    return volume_node


#: The logit a segment without a confidence tag (drawn by hand) is matched with: above any
#: network's, so it ranks first among ties (the confidence only breaks Dice ties here).
UNTAGGED_LOGIT = 1.0e4


def _segment_confidences(seg_ids: Sequence[str], rows: dict[str, LesionRow]) -> np.ndarray:
    """Label value -> its segment's confidence, a logit (:data:`UNTAGGED_LOGIT` without a tag;
    :data:`~IWSegmentationLib.core.confidence.SKIPPED_LOGIT` for the background)."""
    seg_conf = np.full(len(seg_ids) + 1, UNTAGGED_LOGIT, dtype=np.float32)
    seg_conf[0] = SKIPPED_LOGIT
    # match_case at threshold 0 keeps logit > SKIPPED_LOGIT: a segment's own confidence must stay above it
    floor = np.nextafter(np.float32(SKIPPED_LOGIT), np.float32(0.0))
    for n, segment_id in enumerate(seg_ids, start=1):
        if rows[segment_id].confidence is not None:
            seg_conf[n] = max(float(rows[segment_id].confidence), float(floor))
    return seg_conf


def _owner(label_map: np.ndarray, component_labels: np.ndarray, k: int) -> np.ndarray:
    """For each component 1..k, the (largest) segment label found inside it, in one pass."""
    out = np.zeros(k + 1, dtype=np.int64)
    inside = component_labels > 0
    np.maximum.at(out, component_labels[inside], label_map[inside].astype(np.int64))
    return out


def _detection_rows(case, owner_rows: Sequence[LesionRow], center) -> list[LesionRow]:
    """One row per predicted component (``owner_rows``: the row of the segment each lies in), TP or FP."""
    lesion_by_id = {les.id: les for les in case.lesions}
    rows = []
    for comp, row in zip(case.components, owner_rows):
        matched = lesion_by_id.get(comp.lesion) if comp.lesion is not None else None
        rows.append(LesionRow(
            row="detection",
            segment_id=row.segment_id,
            name=row.name,
            id=row.id,
            component_id=comp.id,
            voxels=comp.voxels,
            volume_mm3=comp.volume_mm3,
            diameter_mm=comp.diameter_mm,
            size_group=comp.size_group,
            confidence=row.confidence,
            hit_dice=comp.hit_dice,
            dice=comp.hit_dice,
            status="TP" if comp.hit_dice > 0 else "FP",
            reference_id=comp.lesion,
            reference_diameter_mm=matched.diameter_mm if matched else None,
            center_ras=center(comp.centroid),
        ))
    return rows


def _reference_row(les, reference_node, ref_ids: Sequence[str], n: int, matched: LesionRow | None,
                   center) -> LesionRow:
    """The row of one reference lesion (in reference segment ``n``, 0 = none), TP or FN; ``matched``
    is the segment row of its best-matching component."""
    source = f" ({reference_node.GetSegmentation().GetSegment(ref_ids[n - 1]).GetName()})" if n > 0 else ""
    return LesionRow(
        row="reference",
        segment_id=ref_ids[n - 1] if n > 0 else None,
        reference_segmentation=reference_node.GetID(),
        name=f"Reference {les.id:02d} · {les.diameter_mm:.1f} mm · {les.size_group}{source}",
        id=les.id,
        reference_id=les.id,
        voxels=les.voxels,
        volume_mm3=les.volume_mm3,
        diameter_mm=les.diameter_mm,
        size_group=les.size_group,
        hit_dice=les.hit_dice,
        dice=les.hit_dice,
        # hit_conf, read from the matched segment's tag (the float32 map only ranks them)
        confidence=matched.confidence if matched is not None else None,
        status="TP" if les.hit_dice > 0 else "FN",
        matched_segment_id=matched.segment_id if matched is not None else None,
        center_ras=center(les.centroid),
    )


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
) -> list[LesionRow]:
    """Object Dice of every detected lesion against a reference, and the missed reference lesions.

    Rows (dicts): one per detected lesion, in segment order, with ``status`` ``TP`` (overlaps a
    reference lesion; ``dice`` = its best Dice, ``reference_id`` that lesion) or ``FP``
    (``dice`` 0); then one ``FN`` row per reference lesion no detection overlaps. Every row has
    ``name, status, segment_id, diameter_mm, volume_mm3, size_group, confidence, dice,
    reference_id, center_ras``. See :func:`match_segmentations` for the definitions; the
    numbers are those of :func:`IWSegmentationLib.evaluation.match_case` on the volume's grid.
    """
    return match_segmentations(
        segmentation_node, reference_segmentation_node, reference_segment_ids, volume_node,
        size_thresholds_mm=size_thresholds_mm, connectivity=connectivity,
    ).rows
