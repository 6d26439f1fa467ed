"""``iwseg predict --dicom-seg`` and IWSegmentationLib.core.dicom_seg, on a real DICOM series.

The series is written with pydicom from the known-answer phantom (``Testing/_dicom.py``: one CT
file per slice, files named in shuffled order, an oblique anisotropic grid); ``iwseg predict`` runs
in a real subprocess with the hand-wired threshold checkpoint (IWSegmentationLib/testing/phantom.py), whose
mask is exactly the phantom's reference. The SEG is read back with pydicom, not with the writer,
and checked against the source files and an independent labelling (``scipy.ndimage.label``):

* it references the source series and every one of its images, with the source's patient, study
  and frame of reference;
* every frame names, in its DerivationImageSequence, a source image whose ImagePositionPatient is
  the frame's own, and its pixels are that slice of the segment's lesion;
* each segment is exactly one lesion of the mask: the same voxels, hence the same voxel count;
* the segments carry the lesion terminology of the Slicer segments and the size group and
  diameter of the lesion JSON.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")

from _dicom import segments_from_seg, write_ct_series  # noqa: E402
from _subprocess import run_in_group  # noqa: E402
from scipy import ndimage  # noqa: E402

from IWSegmentationLib.cli.main import main  # noqa: E402
from IWSegmentationLib.core import dicom_seg, imageio  # noqa: E402
from IWSegmentationLib.core.errors import InputError  # noqa: E402
from IWSegmentationLib.slicer import mrml  # noqa: E402
from IWSegmentationLib.testing import phantom  # noqa: E402


def _rotation(angle_z: float, angle_x: float) -> np.ndarray:
    cz, sz, cx, sx = math.cos(angle_z), math.sin(angle_z), math.cos(angle_x), math.sin(angle_x)
    return np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """The phantom (3 lesions: small, medium, large) as a CT series on an oblique anisotropic grid."""
    case = phantom.phantom_case(spacing=(1.5, 0.9, 0.8))
    shape = case.image.shape
    geometry = imageio.Geometry(size=tuple(shape[::-1]), spacing=case.spacing[::-1], origin=(-20.0, 35.5, 110.25),
                                direction=tuple(_rotation(0.4, 0.25).ravel()))
    folder = tmp_path_factory.mktemp("dicom") / "CT"
    files = write_ct_series(folder, case.image.astype(np.int16), geometry)
    return case, geometry, folder, files


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return phantom.threshold_checkpoint(tmp_path_factory.mktemp("ckpt") / "threshold.safetensors",
                                        size_thresholds=phantom.DEFAULT_SIZE_THRESHOLDS)


def _predict(*args) -> object:
    return run_in_group([sys.executable, "-m", "IWSegmentationLib", "predict", "--device", "cpu", "--force", *map(str, args)],
                        timeout=300)


def test_series_fixture_reads_back_as_the_volume(series):
    # the test's own premise: SimpleITK reads the shuffled files as the phantom on the same grid
    case, geometry, folder, _ = series
    image, read_geometry = imageio.read_image(folder)
    assert np.array_equal(image, case.image.astype(np.int16))
    assert read_geometry.differences(geometry) == []


def test_predict_dicom_seg_frames_land_on_their_source_slices(tmp_path, series, checkpoint):
    case, geometry, folder, files = series
    out, table, seg_path = tmp_path / "mask.nrrd", tmp_path / "lesions.json", tmp_path / "lesions.dcm"
    proc = _predict("--model", checkpoint, "--input", folder, "--output", out, "--lesions", table,
                    "--dicom-seg", seg_path)
    assert proc.returncode == 0, proc.stderr
    mask, _ = imageio.read_image(out)
    assert np.array_equal(mask, case.reference)  # the known answer, so the SEG must hold exactly these lesions
    report = json.loads(table.read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lesions.dcm", "lesions.json", "mask.nrrd"]  # no temp left

    seg = pydicom.dcmread(seg_path)
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]  # files[k] is slice k
    slice_of = {ds.SOPInstanceUID: k for k, ds in enumerate(sources)}
    first = sources[0]
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    assert seg.Modality == "SEG"
    for key in ("PatientID", "StudyInstanceUID", "FrameOfReferenceUID"):
        assert seg[key].value == first[key].value, key
    assert seg.SeriesInstanceUID != first.SeriesInstanceUID
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == first.SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == set(slice_of)

    # every frame: its source image (by UID) is at the frame's position, and holds that slice
    n = len(seg.SegmentSequence)
    assert n == len(report["lesions"]) == 3
    rebuilt = segments_from_seg(seg, files, case.reference.shape)
    for groups in seg.PerFrameFunctionalGroupsSequence:  # and on the grid: slice k of the volume
        (source_item,) = groups.DerivationImageSequence[0].SourceImageSequence
        position = [float(v) for v in groups.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, geometry.index_to_physical((slice_of[source_item.ReferencedSOPInstanceUID], 0, 0)),
                                   atol=1e-4)

    # each segment is one connected lesion of the mask (independent labelling), voxel for voxel
    components, k_found = ndimage.label(case.reference, structure=np.ones((3, 3, 3)))
    assert k_found == n
    by_id = {row["id"]: row for row in report["lesions"]}
    for number in range(1, n + 1):
        inside = components[rebuilt[number]]
        assert inside.size and np.all(inside == inside[0]), f"segment {number} is not one lesion"
        assert np.array_equal(rebuilt[number], components == inside[0]), f"segment {number}: voxels differ"
        assert int(rebuilt[number].sum()) == by_id[number]["voxels"]  # segment n = JSON lesion id n

    # the segments' terminology (as the Slicer segments) and descriptions (as the lesion JSON)
    for item in seg.SegmentSequence:
        row = by_id[item.SegmentNumber]
        category, kind = item.SegmentedPropertyCategoryCodeSequence[0], item.SegmentedPropertyTypeCodeSequence[0]
        assert (category.CodingSchemeDesignator, category.CodeValue) == ("SCT", "49755003")
        assert (kind.CodingSchemeDesignator, kind.CodeValue, kind.CodeMeaning) == ("SCT", "52988006", "Lesion")
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentDescription.startswith(f"{row['size_group']} lesion, equivalent diameter "
                                                  f"{row['diameter_mm']:.1f} mm")
        # the confidence is the lesion's maximum logit, as in the lesion JSON
        assert item.SegmentDescription.endswith(f", max logit {row['confidence']:.2f}")
        assert item.SegmentLabel == f"Lesion {row['id']:02d} - {row['diameter_mm']:.1f} mm - {row['size_group']}"
    assert sorted(by_id[i.SegmentNumber]["size_group"] for i in seg.SegmentSequence) == ["large", "medium", "small"]


def test_dicom_seg_needs_a_dicom_series(tmp_path, series, checkpoint, capsys):
    case, geometry, folder, _ = series
    nrrd = tmp_path / "phantom.nrrd"
    imageio.write_image(nrrd, case.image, geometry)
    out = tmp_path / "out"
    out.mkdir()
    cases = {
        "an image file": (nrrd, out / "seg.dcm", "--dicom-seg needs DICOM series as --input"),
        "into the source series": (folder, folder / "seg.dcm", "inside a source DICOM series folder"),
        "a folder as the file": (folder, out, "is a folder"),
    }
    for name, (src, target, expected) in cases.items():
        code = main(["predict", "--force", "--model", str(checkpoint), "--input", str(src), "--output", str(out / "m.nrrd"),
                     "--dicom-seg", str(target), "--device", "cpu"])
        err = capsys.readouterr().err
        assert code == 2, f"{name}: {err}"
        assert expected in err and "Traceback" not in err, f"{name}: {err}"
        assert str(src if name == "an image file" else target) in err, name
        assert list(out.iterdir()) == [], name
    assert sorted(p.suffix for p in folder.iterdir()) == [".dcm"] * case.image.shape[0]  # nothing added


def test_order_by_slice_refuses_a_grid_the_series_does_not_tile(series):
    case, geometry, folder, files = series
    headers = dicom_seg.read_headers(files[::-1])
    ordered = dicom_seg.order_by_slice(headers, geometry)
    assert [ds.SOPInstanceUID for ds in ordered] == [
        pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    half_voxel = imageio.Geometry(geometry.size, geometry.spacing,
                                  tuple(np.add(geometry.origin, 0.5 * geometry.direction_matrix[:, 2] * geometry.spacing[2])),
                                  geometry.direction)
    with pytest.raises(InputError, match="not a slice of the volume's grid"):
        dicom_seg.order_by_slice(headers, half_voxel)
    with pytest.raises(InputError, match=r"no image for slice\(s\) \[5\]"):
        dicom_seg.order_by_slice(headers[:-6] + headers[-5:], geometry)  # headers are reversed: -6 is slice 5
    flipped = imageio.Geometry(geometry.size, geometry.spacing, geometry.origin,
                               tuple((geometry.direction_matrix @ np.diag([-1.0, -1.0, 1.0])).ravel()))
    with pytest.raises(InputError, match="ImageOrientationPatient"):
        dicom_seg.order_by_slice(headers, flipped)
    empty = folder.parent / "empty"
    empty.mkdir(exist_ok=True)
    (empty / "notes.txt").write_text("not DICOM")
    with pytest.raises(InputError, match="no DICOM images"):
        dicom_seg.source_series(empty, geometry)


def test_terminology_codes_are_the_slicer_segments():
    # the SEG's codes come from the serialised entry the Slicer segments carry (mrml.LESION_TERMINOLOGY)
    assert dicom_seg.terminology_codes(mrml.LESION_TERMINOLOGY) == (
        ("SCT", "49755003", "Morphologically Altered Structure"), ("SCT", "52988006", "Lesion"))
    with pytest.raises(InputError):
        dicom_seg.terminology_codes("no codes here")


def test_cohort_of_series_gets_one_seg_per_case_and_no_lesions_no_seg(tmp_path, series, checkpoint, capsys):
    case, geometry, _, _ = series
    cohort = tmp_path / "cohort"
    files = {name: write_ct_series(cohort / name, case.image.astype(np.int16), geometry, seed=i)
             for i, name in enumerate(("a", "b"))}
    masks, segs = tmp_path / "masks", tmp_path / "segs"
    masks.mkdir()
    segs.mkdir()
    code = main(["predict", "--force", "--model", str(checkpoint), "--input", str(cohort), "--output", str(masks),
                 "--dicom-seg", str(segs), "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in segs.iterdir()) == ["a.dcm", "b.dcm"]
    for name, paths in files.items():  # each SEG references its own series, and holds the 3 lesions
        seg = pydicom.dcmread(segs / f"{name}.dcm")
        own = pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == own
        assert len(seg.SegmentSequence) == 3
    capsys.readouterr()

    # threshold above the model's top probability sigmoid(20 * 0.5) = 0.99995: no lesion, so no SEG
    # (a SEG needs a segment), a warning saying so, and the mask still written
    alone = tmp_path / "alone"
    alone.mkdir()
    code = main(["predict", "--force", "--model", str(checkpoint), "--input", str(cohort / "a"), "--output",
                 str(alone / "mask.nrrd"), "--dicom-seg", str(alone / "seg.dcm"), "--threshold", "0.99999",
                 "--device", "cpu", "--progress-format", "jsonl"])
    out = capsys.readouterr().out
    assert code == 0
    warnings = [json.loads(line)["message"] for line in out.splitlines() if '"warning"' in line]
    assert any("no lesions found: no DICOM SEG written" in w for w in warnings), warnings
    assert sorted(p.name for p in alone.iterdir()) == ["mask.nrrd"]


def test_without_highdicom_predict_says_how_to_install_it_before_inference(tmp_path, series, checkpoint):
    _, _, folder, _ = series
    code = ("import sys; sys.modules['highdicom'] = None; from IWSegmentationLib.cli import main; "
            f"sys.exit(main(['predict', '--model', {str(checkpoint)!r}, '--input', {str(folder)!r}, "
            f"'--output', {str(tmp_path / 'm.nrrd')!r}, '--dicom-seg', {str(tmp_path / 's.dcm')!r}, "
            "'--device', 'cpu', '--progress-format', 'jsonl']))")
    proc = run_in_group([sys.executable, "-c", code], timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "needs highdicom: pip install 'highdicom>=0.22'" in proc.stderr
    stages = [json.loads(line)["stage"] for line in proc.stdout.splitlines() if line.strip()]
    assert stages == ["error"]  # refused before the checkpoint was even loaded
    assert list(tmp_path.iterdir()) == []


def test_a_series_without_frame_of_reference_is_refused_before_inference(tmp_path, series, checkpoint, capsys):
    """#23 item 7: a source series without FrameOfReferenceUID ran the whole inference, then highdicom
    raised (exit 1). Now: exit 2 before the image is preprocessed, naming the series and the attribute."""
    import pydicom

    _, _, folder, files = series
    stripped = tmp_path / "CT"
    stripped.mkdir()
    for f in files:
        ds = pydicom.dcmread(f)
        del ds.FrameOfReferenceUID
        ds.save_as(stripped / f.name)
    out = tmp_path / "out"
    out.mkdir()
    code = main(["predict", "--force", "--model", str(checkpoint), "--input", str(stripped), "--output",
                 str(out / "m.nrrd"), "--dicom-seg", str(out / "s.dcm"), "--device", "cpu", "--progress-format", "jsonl"])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert f"DICOM series {stripped}" in captured.err and "has no FrameOfReferenceUID" in captured.err
    stages = [json.loads(line)["stage"] for line in captured.out.splitlines() if line.strip()]
    assert "preprocess" not in stages and "inference" not in stages, stages
    assert list(out.iterdir()) == []


def test_check_references_fills_type_2_attributes_and_refuses_two_frames(series):
    _, geometry, _, files = series
    headers = dicom_seg.read_headers(files)
    del headers[0].PatientName, headers[0].StudyID  # anonymised: type 2, may be empty
    dicom_seg.check_references(headers, what="series X")
    assert "PatientName" in headers[0] and not headers[0].PatientName and not headers[0].StudyID  # present, empty
    headers[1].FrameOfReferenceUID = "1.2.3"
    with pytest.raises(InputError, match=r"series X: its images lie in 2 frames of reference"):
        dicom_seg.check_references(headers, what="series X")
    del headers[2].PixelSpacing
    with pytest.raises(InputError, match=r"series X: image .* has no PixelSpacing"):
        dicom_seg.check_references(headers, what="series X")


def test_a_segment_description_carries_the_lesions_doubt():
    # the lesion JSON's row of a lesion found by 1 of 2 networks (sd 3): the description says so
    lesion = {"size_group": "small", "diameter_mm": 4.16, "volume_mm3": 37.7, "confidence": 1.0,
              "doubt": {"members": 2, "found_by": 1, "fraction": 0.5, "confidence_sd": 3.0, "confidence_min": -2.0,
                        "confidence_max": 4.0, "doubtful": True}}
    assert dicom_seg.segment_description(lesion) == ("small lesion, equivalent diameter 4.2 mm, volume 37.7 mm3, "
                                                     "max logit 1.00, found by 1/2, sd 3.00, doubtful")
    lesion["doubt"] = {**lesion["doubt"], "found_by": 2, "confidence_sd": 0.25, "doubtful": False}
    assert dicom_seg.segment_description(lesion).endswith("max logit 1.00, found by 2/2, sd 0.25")
    del lesion["doubt"]  # no TTA or ensemble
    assert dicom_seg.segment_description(lesion).endswith("max logit 1.00")
