"""Results out of Slicer: the lesion table as CSV and the lesion segments as a DICOM SEG.

The module's *Export* button is a file dialog and one call to :func:`export_in_slicer`; everything
else is here, without Qt, and runs under the ``slicer-core`` wheel in the tests.

* :func:`write_lesion_csv` writes the lesion table rows that :func:`IWSegmentationLib.slicer.mrml.lesion_rows`
  builds (the rows the panel shows, missed reference lesions included) with the columns of
  :data:`CSV_COLUMNS`: id, name, equivalent diameter, volume, size group, confidence (the
  lesion's maximum logit, as in ``iwseg predict``'s lesion JSON), Dice, status
  (TP/FP/FN), the centroid in LPS millimetres (DICOM's patient coordinates; the rows hold RAS,
  Slicer's, and ``L = -R``, ``P = -A``) and, with TTA or an ensemble, the lesion's doubt
  (:mod:`IWSegmentationLib.core.doubt`: how many members found it, of how many, their spread, doubtful). Numbers are rounded as in ``iwseg predict``'s lesion JSON.
* :func:`export_results` writes that CSV and, when the volume was loaded from Slicer's DICOM
  database, the segmentation as a DICOM SEG (:mod:`IWSegmentationLib.core.dicom_seg`) referencing the
  volume's own DICOM files (:func:`instance_files`).

Both files are written to temporary names and renamed (``core.outputs.atomic_output``): an existing
file is replaced only by a complete one.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..core import dicom_seg, dicom_sr
from ..core.errors import InputError
from ..core.outputs import atomic_output
from ..core.provenance import CSV_COLUMNS as PROVENANCE_COLUMNS
from ..core.provenance import Provenance
from . import deps as slicer_deps
from . import mrml
from .lesion_row import with_doubt
from .mrml.geometry import LPS_TO_RAS

#: ``(CSV column, row key, decimals)``; ``centroid_lps`` is computed from the row's ``center_ras``.
CSV_COLUMNS: tuple[tuple[str, str, int | None], ...] = (
    ("id", "id", None),
    ("name", "name", None),
    ("diameter_mm", "diameter_mm", 4),
    ("volume_mm3", "volume_mm3", 4),
    ("size_group", "size_group", None),
    ("confidence", "confidence", 6),
    ("dice", "dice", 6),
    ("status", "status", None),
    ("centroid_L_mm", "centroid_lps.0", 4),
    ("centroid_P_mm", "centroid_lps.1", 4),
    ("centroid_S_mm", "centroid_lps.2", 4),
    # per-lesion doubt (TTA or an ensemble; empty without): core.doubt, the lesion JSON's "doubt"
    ("found_by", "doubt.found_by", None),
    ("members", "doubt.members", None),
    ("confidence_sd", "doubt.confidence_sd", 6),
    ("doubtful", "doubt.doubtful", None),
    ("verdict", "verdict", None),  # the reader's verdict (accepted, rejected, edited; docs/verdicts.md), "" if none
)
#: Volume-node attribute that Slicer's DICOM plugins set: the SOP instance UIDs of its files.
DICOM_INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"


def centroid_lps(center_ras: Sequence[float] | None) -> tuple[float, float, float] | None:
    """A RAS point as LPS (``diag(-1, -1, 1)``, its own inverse); None stays None."""
    if center_ras is None:
        return None
    return tuple(float(v) for v in LPS_TO_RAS[:3, :3] @ np.asarray(center_ras, dtype=float))


def _cell(value: Any, decimals: int | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if decimals is not None:
        return repr(round(float(value), decimals))
    return str(value)


def lesion_csv_rows(rows: Sequence[Mapping[str, Any]], verdicts: Mapping[int, str] | None = None
                    ) -> list[dict[str, str]]:
    """The CSV cells (strings, ``""`` for a missing value) of lesion-table rows, per :data:`CSV_COLUMNS`;
    ``verdicts`` (``{lesion number: verdict}``, :meth:`~IWSegmentationLib.slicer.review.LesionReview.by_lesion`)
    fill the detections' ``verdict``."""
    out = []
    for row in rows:
        values = dict(row)
        if verdicts and row.get("row", "detection") != "reference":
            values["verdict"] = verdicts.get(row.get("id"))
        lps = centroid_lps(row.get("center_ras"))
        for axis in range(3):
            values[f"centroid_lps.{axis}"] = None if lps is None else lps[axis]
        for key, value in (row.get("doubt") or {}).items():
            values[f"doubt.{key}"] = value
        out.append({column: _cell(values.get(key), decimals) for column, key, decimals in CSV_COLUMNS})
    return out


def write_lesion_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
                     verdicts: Mapping[int, str] | None = None, *, provenance: Provenance | None = None) -> Path:
    """Write the lesion table (rows of :func:`IWSegmentationLib.slicer.mrml.lesion_rows`) as UTF-8 CSV, atomically;
    with ``provenance``, its columns (:data:`IWSegmentationLib.core.provenance.CSV_COLUMNS`) follow, the same in every row."""
    extra = {} if provenance is None else provenance.csv_cells()
    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=[column for column, _, _ in CSV_COLUMNS]
                                + (list(PROVENANCE_COLUMNS) if extra else []))
        writer.writeheader()
        writer.writerows({**cells, **extra} for cells in lesion_csv_rows(rows, verdicts))
    return Path(path)


def instance_files(volume_node, database) -> list[str]:
    """The files of a volume loaded from Slicer's DICOM database (``slicer.dicomDatabase``), from the
    SOP instance UIDs Slicer records on the node; empty for a volume not loaded from DICOM."""
    uids = (volume_node.GetAttribute(DICOM_INSTANCE_UIDS_ATTRIBUTE) or "").split()
    if not uids or database is None:
        return []
    files = [database.fileForInstance(uid) for uid in uids]
    missing = [uid for uid, name in zip(uids, files) if not name]
    if missing:
        raise InputError(f"the DICOM database has no file for {len(missing)} instance(s) of volume "
                         f"{volume_node.GetName()!r} (e.g. {missing[0]}); re-import the series")
    return files


@dataclass
class ExportResult:
    """What :func:`export_results` wrote, and the sentence that says so."""

    csv: Path
    dicom_seg: Path | None = None
    notes: list[str] = field(default_factory=list)
    dicom_sr: Path | None = None

    @property
    def message(self) -> str:
        written = f"Wrote {self.csv}" + (f" and the DICOM SEG {self.dicom_seg}" if self.dicom_seg else "")
        written += f" and the DICOM SR {self.dicom_sr}" if self.dicom_sr else ""
        return ". ".join([written, *self.notes]) + "."


def export_results(results, path: str | os.PathLike, source_files: Sequence[str | os.PathLike] = (),
                   verdicts: Mapping[int, str] | None = None) -> ExportResult:
    """Write ``<path>.csv`` (the lesion table) and, given the volume's DICOM files, ``<path>.dcm``.

    ``results`` is the module's :class:`~IWSegmentationLib.slicer.mrml.PredictionResults`; the SEG holds
    every lesion segment (hidden ones too: the confidence, its maximum logit, is in each segment's
    description), numbered as the segments (1 = largest). ``source_files`` are the DICOM files of the input volume
    (:func:`instance_files`); without them only the CSV is written, and the result says why.
    """
    base = Path(path)
    if base.suffix.lower() in (".csv", ".dcm"):
        base = base.with_suffix("")
    provenance = getattr(results, "provenance", None)
    result = ExportResult(write_lesion_csv(base.parent / f"{base.name}.csv", results.rows, verdicts, provenance=provenance))
    segments = mrml.lesion_rows(results.segmentation)  # one row per segment, in segment order
    if not source_files:
        result.notes.append("No DICOM SEG: the input volume was not loaded from DICOM (load the series with the "
                            "DICOM module to export one)")
    elif not segments:
        result.notes.append("No DICOM SEG: no lesions (a DICOM SEG needs at least one segment)")
    else:
        volume = mrml.reference_volume_node(results.segmentation)
        if volume is None:
            raise InputError(f"segmentation {results.segmentation.GetName()!r} records no input volume")
        geometry = mrml.volume_geometry(volume)
        source = dicom_seg.order_by_slice(dicom_seg.read_headers(source_files), geometry,
                                          what=f"the DICOM series of volume {volume.GetName()!r}")
        segments = with_doubt(segments, results.doubt)  # into the segment descriptions
        labels = mrml.labelmap_on_volume_grid(results.segmentation, volume, [r["segment_id"] for r in segments])
        seg = dicom_seg.lesion_seg(labels, segments, source, provenance=provenance)
        result.dicom_seg = base.parent / f"{base.name}.dcm"
        dicom_seg.save_dataset(result.dicom_seg, seg)
        if provenance is None:
            result.notes.append("No DICOM SR: the result records no model and threshold (not from an iwseg predict run)")
        else:  # the TID 1500 report over the SEG's segments (core.dicom_sr), verdicts included when rows have them
            result.dicom_sr = base.parent / f"{base.name}_sr.dcm"
            dicom_seg.save_dataset(result.dicom_sr, dicom_sr.lesion_sr(segments, seg, source, provenance))
    return result


def export_in_slicer(results, path: str | os.PathLike, database, review=None) -> ExportResult:
    """The module's Export button: :func:`export_results` with the input volume's files from Slicer's
    DICOM database (``slicer.dicomDatabase``) and, given the ``review``
    (:class:`~IWSegmentationLib.slicer.review.LesionReview`), its verdicts in the CSV and its verdict file
    beside it; installing highdicom on first use (Slicer's own
    pydicom, numpy and SimpleITK are pinned, never replaced; see :mod:`IWSegmentationLib.slicer.deps`)."""
    volume = mrml.reference_volume_node(results.segmentation)
    sources = instance_files(volume, database) if volume is not None else []
    if sources:
        slicer_deps.ensure_in_slicer(requirements=(dicom_seg.HIGHDICOM_REQUIREMENT,), torch=False,
                                     protected=(*slicer_deps.PROTECTED_PACKAGES, "pydicom"))
    if review is None:
        return export_results(results, path, sources)
    review.detect_edits()  # the reader's verdicts in the CSV, and their verdict file beside it
    result = export_results(results, path, sources, review.by_lesion())
    result.notes.append(f"Verdicts: {review.save(result.csv.parent)}")
    return result
