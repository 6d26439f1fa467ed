"""IWSegmentationLib.slicer.export: the lesion table as CSV and the module's Export (CSV + DICOM SEG).

The CSV is checked against values worked out by hand on a tiny case built in Slicer's real MRML
(slicer-core): the rows are the ones ``mrml.lesion_rows`` builds for the panel. The Export is
checked end to end: a real DICOM series (pydicom, ``Testing/_dicom.py``) -> volume node -> lesion
segments -> ``export_results`` -> SEG read back with pydicom, frames on their source slices and
each segment exactly its lesion.
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from IWSegmentationLib.core import imageio
from IWSegmentationLib.core.errors import InputError
from IWSegmentationLib.slicer import export, mrml

needs_slicer = pytest.mark.slicer



def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_csv_cells_without_slicer(tmp_path):
    # a row as lesion_rows makes it without a reference: no Dice, no status; RAS (1, -2, 3) is LPS (-1, 2, 3)
    rows = [{"id": 3, "name": "Lesion 03 · 2.5 mm · small", "diameter_mm": 2.48140474, "volume_mm3": 8.0,
             "size_group": "small", "confidence": 0.123456789, "dice": None, "status": None,
             "center_ras": (1.0, -2.0, 3.0),
             "doubt": {"members": 2, "found_by": 1, "fraction": 0.5, "confidence_sd": 3.0, "confidence_min": -2.0,
                       "confidence_max": 4.0, "doubtful": True}},
            {"id": 4, "name": "drawn by hand", "center_ras": None, "diameter_mm": math.nan}]
    path = export.write_lesion_csv(tmp_path / "table.csv", rows)
    got = _read_csv(path)
    assert list(got[0]) == [c for c, _, _ in export.CSV_COLUMNS]
    assert got[0] == {"id": "3", "name": "Lesion 03 · 2.5 mm · small", "diameter_mm": "2.4814", "volume_mm3": "8.0",
                      "size_group": "small", "confidence": "0.123457", "dice": "", "status": "",
                      "centroid_L_mm": "-1.0", "centroid_P_mm": "2.0", "centroid_S_mm": "3.0",
                      "found_by": "1", "members": "2", "confidence_sd": "3.0", "doubtful": "True", "verdict": ""}
    assert got[1]["id"] == "4" and got[1]["diameter_mm"] == "" and got[1]["centroid_S_mm"] == ""
    assert (got[1]["found_by"], got[1]["doubtful"]) == ("", "")  # no TTA or ensemble: no doubt
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]  # no temporary file left


def test_csv_records_the_provenance_in_every_row(tmp_path):
    from IWSegmentationLib.core.provenance import CSV_COLUMNS, Provenance

    provenance = Provenance("lung-model", "ab" * 32, 0.5, 0.0, operating_point="1fp", engine_version="9.9")
    rows = [{"id": 1, "name": "a", "center_ras": None}, {"id": 2, "name": "b", "center_ras": None}]
    got = _read_csv(export.write_lesion_csv(tmp_path / "t.csv", rows, provenance=provenance))
    assert list(got[0]) == [c for c, _, _ in export.CSV_COLUMNS] + list(CSV_COLUMNS)
    for row in got:  # the same record in each row, as the lesion JSON's provenance
        assert {k: row[k] for k in CSV_COLUMNS} == {"model": "lung-model", "weights_sha256": "ab" * 32,
                                                    "threshold": "0.5", "logit_threshold": "0.0",
                                                    "operating_point": "1fp", "engine_version": "9.9"}


@needs_slicer
def test_csv_of_the_panel_rows_by_hand(scene, tmp_path):
    # Grid: spacing (sz, sy, sx) = (2, 1, 0.5) mm -> 1 mm^3 per voxel; origin LPS (10, 20, 30); axis-aligned.
    g = imageio.Geometry(size=(12, 10, 8), spacing=(0.5, 1.0, 2.0), origin=(10.0, 20.0, 30.0))
    mask = np.zeros(g.shape_zyx, np.uint8)
    mask[2:4, 3:5, 4:6] = 1  # the detection: 2 x 2 x 2 = 8 voxels
    reference = mask.copy()
    reference[6, 6, 6] = 1  # a reference lesion the detection misses (FN)
    logits = np.where(mask > 0, np.float32(2.2), np.float32(-8.0))
    volume = mrml.add_volume_from_array(scene, (mask * 100).astype(np.int16), g, "Tiny")
    ref_node = mrml.lesion_segmentation(scene, volume, reference, name="Reference", closed_surface=False)
    # the backend's lesion JSON: lesion 1 (8 voxels) found by 7 of 8 flips; one second-look component
    doubt = {"members": 8, "found_by": 7, "fraction": 0.875, "confidence_sd": 0.5, "confidence_min": -0.1,
             "confidence_max": 2.9, "doubtful": True}
    report = {"lesions": [{"id": 1, "voxels": 8, "doubt": doubt}],
              "second_look": [{"id": 1, "voxels": 1, "volume_mm3": 1.0, "diameter_mm": 1.2407, "size_group": "small",
                               "confidence": -0.4, "centroid_zyx": [7.0, 2.0, 1.0]}]}
    results = mrml.load_prediction(scene, volume, mask, logits, reference=ref_node, size_thresholds_mm=(5, 10),
                                   make_table=False, closed_surface=False, lesion_report=report)
    assert results.rows[0].doubt == doubt and results.rows[1].doubt is None  # the FN row has none
    # the second look: a hidden row, no segment; voxel (x, y, z) = (1, 2, 7) -> LPS (10.5, 22, 44) -> RAS (-10.5, -22, 44)
    (second,) = results.second_look
    assert (second.row, second.segment_id, second.visible, second.confidence) == ("second look", None, False, -0.4)
    assert second.center_ras == pytest.approx((-10.5, -22.0, 44.0))
    assert results.segmentation.GetSegmentation().GetNumberOfSegments() == 1  # not a segment
    path = export.write_lesion_csv(tmp_path / "lesions.csv", results.rows)
    detection, missed = _read_csv(path)
    # detection: V = 8 mm^3, d = (6 V / pi)^(1/3) = (15.279)^(1/3) = 2.4814 mm < 5 -> small; confidence
    # (the maximum logit) float32(2.2) -> 2.2 at 6 decimals; Dice 1 (the reference lesion is the same 8 voxels);
    # centroid index (x, y, z) = (4.5, 3.5, 2.5) -> LPS (10 + 4.5 * 0.5, 20 + 3.5 * 1, 30 + 2.5 * 2)
    assert detection == {"id": "1", "name": "Lesion 01 · 2.5 mm · small", "diameter_mm": "2.4814",
                         "volume_mm3": "8.0", "size_group": "small", "confidence": "2.2", "dice": "1.0",
                         "status": "TP", "centroid_L_mm": "12.25", "centroid_P_mm": "23.5", "centroid_S_mm": "35.0",
                         "found_by": "7", "members": "8", "confidence_sd": "0.5", "doubtful": "True", "verdict": ""}
    # missed: reference lesion 2 (scan order), 1 voxel: d = (6 / pi)^(1/3) = 1.2407 mm, no confidence,
    # Dice 0; voxel (x, y, z) = (6, 6, 6) -> LPS (10 + 3, 20 + 6, 30 + 12)
    assert missed["id"] == "2" and missed["status"] == "FN" and missed["name"].startswith("Reference 02 · 1.2 mm")
    assert (missed["diameter_mm"], missed["volume_mm3"], missed["size_group"]) == ("1.2407", "1.0", "small")
    assert (missed["confidence"], missed["dice"]) == ("", "0.0")
    assert (missed["centroid_L_mm"], missed["centroid_P_mm"], missed["centroid_S_mm"]) == ("13.0", "26.0", "42.0")


class _Database:
    """Stands in for ``slicer.dicomDatabase`` (a Qt object, absent from slicer-core): UID -> file."""

    def __init__(self, files):
        import pydicom

        self.files = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: str(f) for f in files}

    def fileForInstance(self, uid):  # noqa: N802 - ctkDICOMDatabase's name
        return self.files.get(uid, "")


@needs_slicer
def test_export_writes_csv_and_a_seg_on_the_source_slices(scene, tmp_path):
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("highdicom")
    from _dicom import segments_from_seg, write_ct_series

    from IWSegmentationLib.testing import phantom

    case = phantom.phantom_case(shape=(16, 40, 40), spacing=(2.0, 0.8, 0.7),
                                lesions=((8.0, 12.0, 12.0, 2.0, 70.0), (8.0, 26.0, 26.0, 5.0, 100.0)))
    g = imageio.Geometry(size=(40, 40, 16), spacing=(0.7, 0.8, 2.0), origin=(5.0, -7.5, 60.0),
                         direction=(0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))  # rows and columns swapped
    files = write_ct_series(tmp_path / "CT", case.image.astype(np.int16), g)
    image, geometry = imageio.read_image(tmp_path / "CT")
    volume = mrml.add_volume_from_array(scene, image, geometry, "CT")
    results = mrml.load_prediction(scene, volume, case.reference, make_table=False, closed_surface=False)
    assert [les["voxels"] for les in results.lesions][0] > results.lesions[1]["voxels"]  # largest first

    # not from DICOM: only the CSV, and the result says why
    (tmp_path / "out").mkdir()
    alone = export.export_in_slicer(results, tmp_path / "out" / "lesions", _Database(files))
    assert alone.dicom_seg is None and "not loaded from DICOM" in alone.message
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lesions.csv"]

    # from DICOM: the volume's instance UIDs, looked up in the database, are the SEG's sources
    volume.SetAttribute(export.DICOM_INSTANCE_UIDS_ATTRIBUTE, " ".join(
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files))
    done = export.export_in_slicer(results, tmp_path / "out" / "lesions.dcm", _Database(files))  # the button's call
    assert done.dicom_seg == tmp_path / "out" / "lesions.dcm" and done.csv == tmp_path / "out" / "lesions.csv"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lesions.csv", "lesions.dcm"]
    assert done.dicom_sr is None and "No DICOM SR" in done.message  # no provenance: not from iwseg predict

    # with the run's provenance (logic.load_results reads it from the lesion JSON): the SR too, over the SEG
    from IWSegmentationLib.core.provenance import Provenance

    results.provenance = Provenance("m", "c" * 64, 0.5, 0.0)
    done = export.export_in_slicer(results, tmp_path / "out" / "lesions.dcm", _Database(files))
    assert done.dicom_sr == tmp_path / "out" / "lesions_sr.dcm"
    sr, seg_now = pydicom.dcmread(done.dicom_sr), pydicom.dcmread(done.dicom_seg)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert [item.ReferencedSOPInstanceUID for item in evidence] == [seg_now.SOPInstanceUID]
    assert "weights_sha256=" + "c" * 64 in seg_now.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]\
        .AlgorithmParameters
    seg = pydicom.dcmread(done.dicom_seg)
    rebuilt = segments_from_seg(seg, files, case.reference.shape)
    # segment n is the n-th segment of the panel (largest first), voxel for voxel
    labels = mrml.labelmap_on_volume_grid(results.segmentation, volume)
    for n, lesion in enumerate(results.lesions, start=1):
        assert np.array_equal(rebuilt[n], labels == n)
        assert int(rebuilt[n].sum()) == lesion["voxels"]
        assert seg.SegmentSequence[n - 1].SegmentLabel == lesion["name"].replace("·", "-")
    assert np.array_equal(rebuilt[1] | rebuilt[2], case.reference > 0)
    rows = _read_csv(done.csv)
    assert [r["id"] for r in rows] == ["1", "2"] and rows[0]["volume_mm3"] == repr(round(results.lesions[0]["volume_mm3"], 4))

    # a database that lost a file is an error naming the volume
    with pytest.raises(InputError, match="no file for 1 instance.*'CT'"):
        export.instance_files(volume, _Database(files[1:]))


@needs_slicer
def test_saved_segmentation_keeps_the_lesion_table(scene, tmp_path):
    # docs/module.md says Save Data keeps the table: the .seg.nrrd Slicer writes holds the segment tags
    import slicer

    g = imageio.Geometry.identity((10, 12, 14), (2.0, 1.0, 0.5))
    mask = np.zeros(g.shape_zyx, np.uint8)
    mask[2:4, 2:5, 3:9] = 1
    mask[7, 9, 11] = 1
    volume = mrml.add_volume_from_array(scene, mask, g, "v")
    segmentation = mrml.lesion_segmentation(scene, volume, mask, logits=mask * np.float32(33.5),
                                            closed_surface=False)
    path = str(tmp_path / "lesions.seg.nrrd")
    writer = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(writer)
    writer.SetFileName(path)
    assert writer.WriteData(segmentation)
    loaded = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(loaded)
    reader = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(reader)
    reader.SetFileName(path)
    assert reader.ReadData(loaded)
    assert export.lesion_csv_rows(mrml.lesion_rows(loaded)) == export.lesion_csv_rows(mrml.lesion_rows(segmentation))
    assert [r["voxels"] for r in mrml.lesion_rows(loaded)] == [36, 1]
