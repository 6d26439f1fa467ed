"""The module's entry point into the scene: load one prediction (mask, logits, reference) as nodes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from ...core.confidence import sigmoid
from ...core.imageio import Geometry
from ...core.lesions import (
    SizeThresholds,
)
from ..lesion_row import LesionRow
from .geometry import add_volume_from_array, check_on_volume_grid, volume_geometry
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
    the rows and the reference match cover the segments only.
    """

    segmentation: Any
    rows: list[LesionRow]
    matches: list[LesionRow] | None = None
    reference: Any = None
    table: Any = None
    probabilities: Any = None
    not_shown: NotShownLesions | None = None
    connectivity: int = 26
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
    None: all); the rest are ``not_shown``.
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
    rows = lesion_rows(segmentation, match)
    table = dice_table_node(scene, rows, f"{segmentation.GetName()} table") if make_table else None
    probability_node = None
    if keep_probabilities and logits is not None:
        probability_node = add_volume_from_array(
            scene, sigmoid(logits), volume_geometry(volume_node), f"{segmentation.GetName()} probabilities",
        )
        if volume_node.GetTransformNodeID():
            probability_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    return PredictionResults(segmentation, rows, match.references if match else None, reference, table,
                             probability_node, not_shown, connectivity)


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
    results.rows = lesion_rows(results.segmentation, match)
    results.matches = match.references if match else None
    if results.table is not None:
        name = results.table.GetName()
        scene.RemoveNode(results.table)
        results.table = dice_table_node(scene, results.rows, name)
    return added
