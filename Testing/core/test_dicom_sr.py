"""``iwseg predict --dicom-sr`` and IWSegmentationLib.core.dicom_sr: a TID 1500 report read back.

A hand-known CT (``Testing/_threshold_model.py``: three +100 HU lesions of 96, 8 and 1 voxels in
-800 HU tissue) is written as a real DICOM CT series (``Testing/_dicom.py``) on a 0.7 x 0.9 x 2.5 mm
grid, and ``iwseg predict`` runs in a real subprocess with the hand-set threshold network (a voxel
is a lesion when HU > -350; its logit is ``GAIN (x - 0.5)``). The SR is read back with highdicom's
parser (``hd.sr.srread`` and the TID 1500 content classes), not with the writer, and checked against
the lesion JSON of the same run, the hand-computed values, the SEG it references and the source
series; the provenance is checked in the lesion JSON, the SEG and the SR.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

from _dicom import write_ct_series  # noqa: E402
from _subprocess import run_in_group  # noqa: E402
from _threshold_model import GAIN, ct_volume, save_threshold_checkpoint  # noqa: E402

from IWSegmentationLib import __version__  # noqa: E402
from IWSegmentationLib.core import dicom_seg, dicom_sr, imageio  # noqa: E402
from IWSegmentationLib.core.errors import InputError  # noqa: E402
from IWSegmentationLib.core.provenance import Provenance  # noqa: E402
from IWSegmentationLib.nn.checkpoint import read_metadata  # noqa: E402

SPACING_XYZ = (0.7, 0.9, 2.5)
VOXEL_MM3 = 0.7 * 0.9 * 2.5  # 1.575 mm3


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    image, _ = ct_volume()
    geometry = imageio.Geometry(size=tuple(image.shape[::-1]), spacing=SPACING_XYZ, origin=(-16.0, -18.0, 40.0))
    folder = tmp_path_factory.mktemp("dicom") / "CT"
    files = write_ct_series(folder, image.astype(np.int16), geometry)
    return image, geometry, folder, files


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "lung-threshold.safetensors"
    return save_threshold_checkpoint(path)


def _predict(*args):
    return run_in_group([sys.executable, "-m", "IWSegmentationLib", "predict", "--device", "cpu", "--force",
                         *map(str, args)], timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory, series, checkpoint):
    """One ``iwseg predict --dicom-seg --dicom-sr --lesions`` run: (lesion JSON, SEG, SR as highdicom reads it)."""
    _, _, folder, _ = series
    out = tmp_path_factory.mktemp("out")
    result = _predict("--model", checkpoint, "--input", folder, "--output", out / "mask.nrrd",
                      "--lesions", out / "lesions.json", "--dicom-seg", out / "seg.dcm", "--dicom-sr", out / "sr.dcm")
    assert result.returncode == 0, result.stderr
    table = json.loads((out / "lesions.json").read_text())
    return table, pydicom.dcmread(out / "seg.dcm"), hd.sr.srread(out / "sr.dcm"), out


def _groups(sr):
    return sr.content.get_volumetric_roi_measurement_groups()


def _measurements(group) -> dict[str, tuple[float, str]]:
    return {m.name.meaning: (m.value, m.unit.value) for m in group.get_measurements()}


def _evaluations(group) -> dict[str, str]:
    return {q.name.meaning: q.value.meaning for q in group.get_qualitative_evaluations()}


def test_one_group_per_lesion_with_the_lesion_json_values(run):
    table, _, sr, _ = run
    lesions = table["lesions"]
    groups = _groups(sr)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert len(lesions) == len(groups) == 3
    # hand-computed: voxels 96, 8, 1 (ct_volume) of 0.7 x 0.9 x 2.5 = 1.575 mm3; d = (6 V / pi)^(1/3);
    # max logit = GAIN (x - 0.5) with x = (100 + 1000) / 1300 (+100 HU in the ct-lung window) = 13.846
    logit = GAIN * ((100 + 1000) / 1300 - 0.5)
    for lesion, group, voxels in zip(lesions, groups, (96, 8, 1)):
        volume = voxels * VOXEL_MM3
        assert lesion["volume_mm3"] == pytest.approx(volume, abs=1e-4)
        measured = _measurements(group)
        assert measured["Volume"] == (pytest.approx(lesion["volume_mm3"], abs=1e-9), "mm3")
        assert measured["Volume"][0] == pytest.approx(volume, abs=1e-4)
        assert measured["Equivalent sphere diameter"] == (pytest.approx(lesion["diameter_mm"], abs=1e-9), "mm")
        assert measured["Equivalent sphere diameter"][0] == pytest.approx((6 * volume / math.pi) ** (1 / 3), abs=1e-4)
        assert measured["Maximum logit"] == (pytest.approx(lesion["confidence"], abs=1e-9), "1")
        assert measured["Maximum logit"][0] == pytest.approx(logit, abs=1e-3)
        # size groups [2.5, 5.0] mm: d = 8.31, 3.54, 1.44 mm -> large, medium, small
        assert _evaluations(group)["Lesion size group"] == lesion["size_group"]
        assert group.finding_type.value == "52988006"  # SCT Lesion, as the SEG's segments
        assert "Reviewer verdict" not in _evaluations(group)  # no verdicts in a predict run
    assert [lesion["size_group"] for lesion in lesions] == ["large", "medium", "small"]


def test_groups_reference_the_seg_segments_and_the_source_series(run, series):
    _, seg, sr, _ = run
    _, _, _, files = series
    source = pydicom.dcmread(files[0], stop_before_pixels=True)
    for number, (group, segment) in enumerate(zip(_groups(sr), seg.SegmentSequence), start=1):
        reference = group.referenced_segment
        assert reference.referenced_sop_class_uid == seg.SOPClassUID
        assert reference.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert reference.referenced_segment_numbers == [number] == [segment.SegmentNumber]
        assert reference.source_series_for_segmentation.value == source.SeriesInstanceUID
        # the tracking identifier and UID are the segment's: one lesion, one identity in both objects
        assert group.tracking_identifier == segment.SegmentLabel
        assert group.tracking_uid == segment.TrackingUID
    assert (sr.StudyInstanceUID, sr.PatientID) == (source.StudyInstanceUID, source.PatientID)
    evidence = {item.SeriesInstanceUID: {ref.ReferencedSOPInstanceUID for ref in item.ReferencedSOPSequence}
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for item in study.ReferencedSeriesSequence}
    # the evidence is what the content references: the SEG (the source series is named in each group,
    # and the SEG itself references every source image)
    assert evidence == {seg.SeriesInstanceUID: {seg.SOPInstanceUID}}
    assert {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} \
        == {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}


def test_provenance_is_the_same_in_the_json_the_seg_and_the_sr(run, checkpoint):
    table, seg, sr, _ = run
    sha = read_metadata(checkpoint)["weights_sha256"]
    # the card's threshold 0.5 is logit 0; no --operating-point
    assert table["provenance"] == {"model": "lung-threshold", "weights_sha256": sha, "threshold": 0.5,
                                   "logit_threshold": 0.0, "operating_point": None, "engine_version": __version__}
    expected = f"model=lung-threshold,weights_sha256={sha},threshold=0.5,logit_threshold=0,operating_point=none"
    for segment in seg.SegmentSequence:
        (algorithm,) = segment.SegmentationAlgorithmIdentificationSequence
        assert (algorithm.AlgorithmVersion, algorithm.AlgorithmParameters) == (__version__, expected)
    for group in _groups(sr):
        items = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in group[0].ContentSequence}
        assert items["Algorithm Name"].TextValue == "IWSegmentation"
        assert items["Algorithm Version"].TextValue == __version__
        params = [item.TextValue for item in group[0].ContentSequence
                  if item.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Parameters"]
        assert params == [expected]  # one item, as the SEG's AlgorithmParameters
    (device,) = sr.content.get_observer_contexts(observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"))
    assert device.observer_identifying_attributes.model_name == "lung-threshold"
    assert sr.SoftwareVersions == __version__


def test_sr_passes_highdicom_and_pydicom_checks(run):
    _, _, _, out = run
    raw = pydicom.dcmread(out / "sr.dcm")
    # pydicom: every element decodes with its VR, and the file meta is the dataset's
    for element in raw.iterall():
        _ = element.value
    assert raw.file_meta.MediaStorageSOPInstanceUID == raw.SOPInstanceUID
    assert raw.file_meta.MediaStorageSOPClassUID == raw.SOPClassUID
    # highdicom: the document parses as a Comprehensive 3D SR holding a TID 1500 report
    report = hd.sr.Comprehensive3DSR.from_dataset(raw).content
    assert isinstance(report, hd.sr.MeasurementReport)
    assert len(report.get_volumetric_roi_measurement_groups()) == 3
    assert raw.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == dicom_sr.SCHEME


def test_dicom_sr_without_dicom_seg_is_refused_before_inference(tmp_path, series, checkpoint):
    _, _, folder, _ = series
    result = _predict("--model", checkpoint, "--input", folder, "--output", tmp_path / "mask.nrrd",
                      "--dicom-sr", tmp_path / "sr.dcm")
    assert result.returncode == 2
    assert "--dicom-sr needs --dicom-seg" in result.stderr
    assert not (tmp_path / "mask.nrrd").exists()


def test_dicom_sr_must_not_be_the_seg_file(tmp_path, series, checkpoint):
    _, _, folder, _ = series
    result = _predict("--model", checkpoint, "--input", folder, "--output", tmp_path / "mask.nrrd",
                      "--dicom-seg", tmp_path / "x.dcm", "--dicom-sr", tmp_path / "x.dcm")
    assert result.returncode == 2
    assert "--dicom-sr" in result.stderr and "its own file" in result.stderr


def test_verdicts_become_qualitative_evaluations(run, series):
    # lesion_sr on the run's own SEG and lesion rows, with verdicts added as the review would
    table, seg, _, _ = run
    _, geometry, folder, _ = series
    source = dicom_seg.source_series(folder, geometry)
    rows = [dict(row) for row in table["lesions"]]
    rows[0]["verdict"], rows[2]["verdict"] = "accepted", "rejected"
    provenance = Provenance.from_dict(table["provenance"])
    sr = dicom_sr.lesion_sr(rows, seg, source, provenance)
    groups = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_volumetric_roi_measurement_groups()
    verdicts = [_evaluations(group).get("Reviewer verdict") for group in groups]
    assert verdicts == ["accepted", None, "rejected"]
    codes = [q.value.value for q in groups[0].get_qualitative_evaluations() if q.name.value == "VERDICT"]
    assert codes == ["ACCEPTED"]
    rows[1]["verdict"] = ""
    with pytest.raises(InputError, match="verdict"):
        dicom_sr.lesion_sr(rows, seg, source, provenance)


def test_lesions_must_match_the_seg_segments(run, series):
    table, seg, _, _ = run
    _, geometry, folder, _ = series
    source = dicom_seg.source_series(folder, geometry)
    provenance = Provenance.from_dict(table["provenance"])
    with pytest.raises(InputError, match="lesion n = segment n"):
        dicom_sr.lesion_sr(table["lesions"][:2], seg, source, provenance)
    with pytest.raises(InputError, match="no lesions"):
        dicom_sr.lesion_sr([], seg, source, provenance)


def test_provenance_from_dict_names_what_is_wrong():
    good = Provenance("m", "a" * 64, 0.5, 0.0).as_dict()
    assert Provenance.from_dict(good) == Provenance("m", "a" * 64, 0.5, 0.0)
    with pytest.raises(InputError, match="lesions.json: provenance has no weights_sha256"):
        Provenance.from_dict({k: v for k, v in good.items() if k != "weights_sha256"},
                             where="lesions.json: provenance")
    with pytest.raises(InputError, match="threshold must be a finite number"):
        Provenance.from_dict({**good, "threshold": float("nan")})
    # an ensemble: names and digests joined in model order
    both = Provenance.of_models(["/m/a.safetensors", "b.safetensors"],
                                [{"weights_sha256": "1" * 64}, {"weights_sha256": "2" * 64}],
                                threshold=0.5, logit_threshold=0.0)
    assert (both.model, both.weights_sha256) == ("a + b", "1" * 64 + " + " + "2" * 64)
