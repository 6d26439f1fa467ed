"""One lesion numbering across the outputs (issue 22, item 4): a real ``iwseg predict`` on a DICOM CT
series writes the lesion JSON and a DICOM SEG; the Slicer scene (``slicer-core``) builds the
segments from the same mask and exports its CSV and its own DICOM SEG. Lesion 2 must be the same
lesion in all of them (same voxel count, same centroid), numbered by
:func:`IWSegmentationLib.core.lesions.number_lesions`: largest first.

The phantom's three lesions (``testing.phantom.DEFAULT_LESIONS``) are chosen so that scan order
and size order differ: by the first voxel in ``[z, y, x]`` order the medium sphere (centre z 12,
radius 4 mm: first slice z 8) comes before the large one (centre z 22, radius 7 mm: z 15) and the
small one (centre z 20, radius 2 mm: z 18). Largest first, lesion 2 is the medium sphere; in scan
order it would have been the large one (the bug of the issue: "Lesion 002" was 17.8 mm in one
output and 2.3 mm in another).
"""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")
slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install 'slicer-core==5.13.*')")

from _dicom import segments_from_seg, write_ct_series  # noqa: E402
from _subprocess import run_in_group  # noqa: E402

from IWSegmentationLib.core import imageio  # noqa: E402
from IWSegmentationLib.slicer import export, mrml  # noqa: E402
from IWSegmentationLib.testing import phantom  # noqa: E402


def test_lesion_2_is_the_same_lesion_in_every_output(tmp_path):
    case = phantom.phantom_case(spacing=(1.5, 0.9, 0.8))
    shape = case.image.shape
    geometry = imageio.Geometry(size=tuple(shape[::-1]), spacing=case.spacing[::-1], origin=(-20.0, 35.5, 110.25),
                                direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    files = write_ct_series(tmp_path / "CT", case.image.astype(np.int16), geometry)
    checkpoint = phantom.threshold_checkpoint(tmp_path / "threshold.safetensors",
                                              size_thresholds=phantom.DEFAULT_SIZE_THRESHOLDS)
    out = tmp_path / "out"
    out.mkdir()
    proc = run_in_group([sys.executable, "-m", "IWSegmentationLib", "predict", "--device", "cpu", "--force",
                         "--model", str(checkpoint), "--input", str(tmp_path / "CT"), "--output", str(out / "mask.nrrd"),
                         "--logits", str(out / "logits.nrrd"), "--lesions", str(out / "lesions.json"),
                         "--dicom-seg", str(out / "lesions.dcm")], timeout=300)
    assert proc.returncode == 0, proc.stderr
    mask, mask_geometry = imageio.read_image(out / "mask.nrrd")
    assert np.array_equal(mask, case.reference)  # the known answer: the three spheres

    # the expected lesion 2, by hand: the medium sphere (second largest), found in the reference itself
    from scipy import ndimage

    labels, _ = ndimage.label(case.reference, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(labels.ravel())[1:]
    assert len(sizes) == 3 and len(set(sizes)) == 3
    medium = int(np.argsort(-sizes)[1]) + 1  # ndimage numbers in scan order too: the medium sphere is its 1
    assert medium == 1, "the phantom no longer tells scan order from size order"
    expected_voxels = int(sizes[medium - 1])
    expected_zyx = np.array(ndimage.center_of_mass(labels == medium))
    expected_lps = np.array(geometry.index_to_physical(expected_zyx))

    # 1. the lesion JSON
    report = json.loads((out / "lesions.json").read_text())
    assert [row["id"] for row in report["lesions"]] == [1, 2, 3]
    assert [row["voxels"] for row in report["lesions"]] == sorted(sizes.tolist(), reverse=True)
    lesion2 = report["lesions"][1]
    assert lesion2["voxels"] == expected_voxels
    np.testing.assert_allclose(lesion2["centroid_lps_mm"], expected_lps, atol=1e-3)

    # 2. predict's DICOM SEG: segment 2 is those voxels, labelled "Lesion 02"
    seg = pydicom.dcmread(out / "lesions.dcm")
    segments = segments_from_seg(seg, files, shape)
    assert np.array_equal(segments[2], labels == medium)
    assert seg.SegmentSequence[1].SegmentNumber == 2
    assert seg.SegmentSequence[1].SegmentLabel.startswith("Lesion 02 ")

    # 3. the Slicer segments, built in a slicer-core scene from the same outputs
    scene, app_logic = mrml.headless_scene()
    volume = mrml.add_volume_from_array(scene, case.image, geometry, name="CT")
    logits, logits_geometry = imageio.read_image(out / "logits.nrrd")
    results = mrml.load_prediction(scene, volume, mask, logits, size_thresholds_mm=phantom.DEFAULT_SIZE_THRESHOLDS,
                                   geometry=mask_geometry, logits_geometry=logits_geometry, closed_surface=False)
    rows = {row.id: row for row in results.lesions}
    assert rows[2].voxels == expected_voxels and rows[2].component_id == 2
    assert rows[2].name.startswith("Lesion 02 ")
    ras = np.array(rows[2].center_ras)
    np.testing.assert_allclose([-ras[0], -ras[1], ras[2]], expected_lps, atol=1e-3)  # RAS -> LPS
    segment_labels = mrml.labelmap_on_volume_grid(results.segmentation, volume,
                                                  [rows[n].segment_id for n in (1, 2, 3)])
    assert np.array_equal(segment_labels == 2, labels == medium)

    # 4. the module's export: the CSV row with id 2, and its own DICOM SEG's segment 2
    written = export.export_results(results, tmp_path / "exported", [str(f) for f in files])
    with open(written.csv, newline="", encoding="utf-8") as handle:
        table = {row["id"]: row for row in csv.DictReader(handle)}
    assert table["2"]["name"].startswith("Lesion 02 ")
    np.testing.assert_allclose([float(table["2"][f"centroid_{a}_mm"]) for a in "LPS"], expected_lps, atol=1e-3)
    exported = segments_from_seg(pydicom.dcmread(written.dicom_seg), files, shape)
    assert np.array_equal(exported[2], labels == medium)
    del app_logic
