"""The module's entry point into the scene: load one prediction (mask, logits, reference) as nodes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ...core.imageio import Geometry
from ...core.lesions import (
    SizeThresholds,
)
from ...core.prediction_maps import sigmoid
from ..lesion_row import LesionRow, with_doubt
from .geometry import (
    add_volume_from_array,
    centroid_ras,
    check_on_volume_grid,
    volume_geometry,
    volume_ijk_to_ras,
)
from .matching import lesion_rows, match_segmentations, reference_volume_node
from .segments import DEFAULT_SEGMENT_BUDGET, NotShownLesions, budgeted_lesion_segmentation, show_more_lesions
from .tables import dice_table_node


@dataclass
class PredictionResults:
    """What :func:`load_prediction` put into the scene, and the rows the panel shows.

    ``rows``: the lesion table (:func:`lesion_rows`): one row per detected lesion (segment
    order, largest first) and, with a reference, one per missed reference lesion (FN).
    ``matches``: one dict per reference lesion (``status`` TP/FN, ``dice``/``hit_dice``,
    ``confidence`` of its match, ``segment_id`` in ``reference``, ``center_ras``), or None
    without a reference. ``table``: the table node holding ``rows``. ``probabilities``: the
    probability volume node, ``sigmoid(logits)`` (when kept). ``not_shown``: the lesions the
    display budget left out (counted, not segments; :func:`show_more_results` adds the next ones);
    the rows and the reference match cover the segments only. ``doubt``: the lesion JSON's per-lesion
    doubt by lesion number, as ``(voxels, doubt entry)`` (empty without TTA or an ensemble), which
    the detection rows carry; ``second_look``: the JSON's second-look components as rows
    (``row="second look"``, no segment, hidden), most confident first (:func:`lesion_report_extras`).
    """

    segmentation: Any
    rows: list[LesionRow]
    matches: list[LesionRow] | None = None
    reference: Any = None
    table: Any = None
    probabilities: Any = None
    not_shown: NotShownLesions | None = None
    connectivity: int = 26
    doubt: dict[int, tuple[int, dict]] = field(default_factory=dict)
    second_look: list[LesionRow] = field(default_factory=list)
    #: what made the lesions (the run's lesion JSON ``provenance``; :mod:`IWSegmentationLib.core.provenance`),
    #: None for a result not read from an ``iwseg predict`` run: the export's CSV columns and DICOM SR
    provenance: Any = None

    @property
    def lesions(self) -> list[LesionRow]:
        """The detected lesions: the rows that are segments of :attr:`segmentation` (no FN rows)."""
        return [row for row in self.rows if row["row"] == "detection"]


def load_prediction(
    scene,
    volume_node,
    lesion_mask: np.ndarray,
    logits: np.ndarray | None = None,
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
    logits_geometry: Geometry | None = None,
    budget: int | None = DEFAULT_SEGMENT_BUDGET,
    lesion_report: Mapping[str, Any] | None = None,
) -> PredictionResults:
    """Turn the backend's outputs (read onto the volume's grid) into segments and table rows.

    Calls :func:`lesion_segmentation` (each lesion's confidence is its maximum of ``logits``,
    the backend's ``--logits`` map) and, given a ``reference`` segmentation node,
    :func:`match_segmentations`; the rows are :func:`lesion_rows`. Optionally adds the
    probability map ``sigmoid(logits)`` as a volume node (``keep_probabilities``; computed
    here, so the backend writes one map, not two) and the table node (``make_table``). Pass
    the ``geometry`` (and ``logits_geometry``) that :func:`IWSegmentationLib.core.imageio.read_image`
    returned with the mask (and the logit map): a file on another grid is refused with
    :class:`GeometryMismatchError` naming what differs, before anything is added to the scene
    — the arrays alone cannot tell. ``budget``: how many lesions become segments, the most
    confident (:func:`~IWSegmentationLib.slicer.mrml.segments.budgeted_lesion_segmentation`;
    None: all); the rest are ``not_shown``. ``lesion_report``: the backend's lesion JSON, for the
    per-lesion doubt and the second-look list (:func:`lesion_report_extras`).
    """
    if geometry is not None:
        check_on_volume_grid(geometry, volume_node, "the backend's lesion mask")
    if logits_geometry is not None:
        check_on_volume_grid(logits_geometry, volume_node, "the backend's logit map")
    segmentation, not_shown = budgeted_lesion_segmentation(
        scene, volume_node, lesion_mask, logits=logits, size_thresholds_mm=size_thresholds_mm,
        name=name, connectivity=connectivity, closed_surface=closed_surface, budget=budget,
    )
    match = None
    if reference is not None:
        match = match_segmentations(segmentation, reference, reference_segment_ids, volume_node,
                                    connectivity=connectivity)
    doubt, second_look = lesion_report_extras(lesion_report, volume_ijk_to_ras(volume_node))
    rows = with_doubt(lesion_rows(segmentation, match), doubt)
    table = dice_table_node(scene, rows, f"{segmentation.GetName()} table") if make_table else None
    probability_node = None
    if keep_probabilities and logits is not None:
        probability_node = add_volume_from_array(
            scene, sigmoid(logits), volume_geometry(volume_node), f"{segmentation.GetName()} probabilities",
        )
        if volume_node.GetTransformNodeID():
            probability_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    return PredictionResults(segmentation, rows, match.references if match else None, reference, table,
                             probability_node, not_shown, connectivity, doubt, second_look)


def lesion_report_extras(report: Mapping[str, Any] | None, ijk_to_ras) -> tuple[dict[int, tuple[int, dict]],
                                                                                list[LesionRow]]:
    """From ``iwseg predict``'s lesion JSON: each lesion's ``doubt`` by lesion number, as ``(voxels,
    entry)`` (for :func:`~IWSegmentationLib.slicer.lesion_row.with_doubt`), and the ``second_look``
    components as hidden rows (``row="second look"``), centred by their voxel centroid on the grid
    ``ijk_to_ras``. Both empty without a report (or one written before they existed)."""
    if not report:
        return {}, []
    doubt = {int(row["id"]): (int(row["voxels"]), dict(row["doubt"]))
             for row in report.get("lesions") or () if row.get("doubt")}
    second = [LesionRow(row="second look", segment_id=None, name=f"Second look {int(r['id']):02d}", id=int(r["id"]),
                        voxels=int(r["voxels"]), volume_mm3=float(r["volume_mm3"]),
                        diameter_mm=float(r["diameter_mm"]), size_group=r.get("size_group"),
                        confidence=r.get("confidence"), center_ras=centroid_ras(ijk_to_ras, r["centroid_zyx"]),
                        visible=False)
              for r in report.get("second_look") or ()]
    return doubt, second


def show_more_results(scene, results: PredictionResults, count: int = DEFAULT_SEGMENT_BUDGET) -> int:
    """Make segments of the next ``count`` most confident lesions the budget left out, and bring the
    rows, the reference match and the table node up to date; returns how many were added."""
    if results.not_shown is None or not len(results.not_shown):
        return 0
    added = show_more_lesions(results.segmentation, results.not_shown, count)
    match = None
    if results.reference is not None:
        match = match_segmentations(results.segmentation, results.reference, None, reference_volume_node(
            results.segmentation), connectivity=results.connectivity)
    results.rows = with_doubt(lesion_rows(results.segmentation, match), results.doubt)
    results.matches = match.references if match else None
    if results.table is not None:
        name = results.table.GetName()
        scene.RemoveNode(results.table)
        results.table = dice_table_node(scene, results.rows, name)
    return added
