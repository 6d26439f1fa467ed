"""A row of the lesion table: the one record the scene builder writes and the panel reads.

:func:`IWSegmentationLib.slicer.mrml.lesion_rows` and :func:`~IWSegmentationLib.slicer.mrml.match_segmentations`
build them, :func:`IWSegmentationLib.slicer.panel.lesion_cells` / :func:`~IWSegmentationLib.slicer.panel.detection_counts`
read them, the Dice table node stores them. A row is frozen (a changed row is a new one:
:meth:`LesionRow.replace`) and, being a read-only :class:`~collections.abc.Mapping` of its fields
too, reads as ``row.diameter_mm`` or ``row["diameter_mm"]``, so table code can iterate its columns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterator, Sequence


@dataclass(frozen=True)
class LesionRow(Mapping):
    """One lesion of the table: a detection (a segment, or a component of one) or a reference lesion.

    ``row`` is ``"detection"`` or ``"reference"``. Numbers a hand-drawn segment's tags lack are
    None; ``status``/``dice``/``hit_dice``/``reference_id`` are None without a reference match
    (``TP``/``FP`` for a detection, ``TP``/``FN`` for a reference lesion with one). ``center_ras``
    is the lesion's own centroid (RAS mm), where a click on the row takes the views.
    """

    row: str
    segment_id: str | None
    name: str
    id: int
    voxels: int | None = None
    volume_mm3: float | None = None
    diameter_mm: float | None = None
    size_group: str | None = None
    confidence: float | None = None
    center_ras: tuple[float, float, float] | None = None
    component_id: int | None = None
    visible: bool = True
    status: str | None = None
    dice: float | None = None
    hit_dice: float | None = None
    reference_id: int | None = None
    #: a matched detection: the diameter of the reference lesion it hits
    reference_diameter_mm: float | None = None
    #: a reference lesion: its reference segmentation node and the segment of its best detection
    reference_segmentation: str | None = None
    matched_segment_id: str | None = None
    #: with TTA or an ensemble: the lesion JSON's ``doubt`` entry (``members, found_by, fraction,
    #: confidence_sd, confidence_min, confidence_max, doubtful``; :mod:`IWSegmentationLib.core.doubt`)
    doubt: Mapping[str, Any] | None = None

    def replace(self, **changes: Any) -> LesionRow:
        """A copy with ``changes`` (unknown field names raise ``TypeError``)."""
        return dataclasses.replace(self, **changes)

    def __getitem__(self, key: str) -> Any:
        if key not in _FIELD_NAMES:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_FIELD_NAMES)

    def __len__(self) -> int:
        return len(_FIELD_NAMES)


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(LesionRow))


def with_doubt(rows: Sequence[LesionRow], doubt: Mapping[int, Mapping[str, Any]] | None) -> list[LesionRow]:
    """``rows`` with each detection's ``doubt`` from the lesion JSON, keyed by the lesion number
    (the JSON's ``id``, the row's ``id``: both number lesions by ``core.lesions.number_lesions``).
    ``doubt`` maps the number to ``(voxels, doubt entry)``; a row whose voxel count differs (a segment
    the reader edited, another connectivity) gets none rather than another lesion's."""
    if not doubt:
        return list(rows)
    out = []
    for row in rows:
        voxels, entry = doubt.get(row.id, (None, None)) if row.row == "detection" else (None, None)
        same = entry is not None and (row.voxels is None or row.voxels == voxels)
        out.append(row.replace(doubt=dict(entry)) if same else row)
    return out
