"""IWSegmentationLib.slicer.review on Slicer's real MRML (slicer-core): accept / reject per lesion, a segment
changed in its labelmap becomes *edited*, the verdict file and the CSV's verdict column, and a verdict
file for another model or lesion set refused.

The prediction is the phantom's (IWSegmentationLib.testing.phantom): three spheres, the mask the
known-answer checkpoint predicts voxel for voxel, and its logit map ``20 (v / 100 - 0.5)``.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core (Slicer's MRML) is not installed", allow_module_level=True)

from vtkmodules.util import numpy_support  # noqa: E402

from IWSegmentationLib.core import imageio  # noqa: E402
from IWSegmentationLib.core.verdicts import VerdictMismatchError, read_verdicts  # noqa: E402
from IWSegmentationLib.slicer import export, mrml  # noqa: E402
from IWSegmentationLib.slicer.review import LesionReview  # noqa: E402
from IWSegmentationLib.testing import phantom  # noqa: E402

pytestmark = pytest.mark.slicer
SHA = "ab" * 32


@pytest.fixture
def prediction():
    scene = slicer.vtkMRMLScene()
    case = phantom.phantom_case(spacing=(1.5, 0.9, 0.8))
    geometry = imageio.Geometry(size=case.image.shape[::-1], spacing=case.spacing[::-1], origin=(10.0, -5.0, 3.0))
    volume = mrml.add_volume_from_array(scene, case.image, geometry, "Phantom")
    logits = (20.0 * (case.image / 100.0 - 0.5)).astype(np.float32)
    results = mrml.load_prediction(scene, volume, case.reference, logits, make_table=False, closed_surface=False)
    return scene, case, results


def paint(results, lesion: int, voxel_zyx) -> None:
    """Set one voxel of lesion ``lesion``'s segment labelmap (the layer the segments share, value = lesion number)."""
    row = next(r for r in results.lesions if r["id"] == lesion)
    image = results.segmentation.GetSegmentation().GetSegment(row["segment_id"]).GetRepresentation("Binary labelmap")
    x0, _, y0, _, z0, _ = image.GetExtent()
    dims = image.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])
    z, y, x = voxel_zyx
    scalars[z - z0, y - y0, x - x0] = lesion
    image.Modified()


def test_accept_reject_edit_and_the_verdict_file(prediction, tmp_path):
    _, case, results = prediction
    review = LesionReview(results, case.reference, model_name="phantom", model_sha256=SHA, threshold=0.5)
    assert sorted(review.boxes) == [1, 2, 3] and review.edited_lesions() == set()
    review.set_verdict(1, "accepted", "dr a")
    review.set_verdict(3, "rejected", "dr a")
    # the reader paints one voxel next to lesion 2 (inside its bounding box's corner, outside the sphere)
    z0, y0, x0 = review.boxes[2][:3]
    assert review.labels[z0, y0, x0] == 0
    paint(results, 2, (z0, y0, x0))
    assert review.edited_lesions() == {2}
    path = review.save(tmp_path, reviewer="dr a")
    assert path.name == "Phantom.verdicts.json"
    data = json.loads(path.read_text())
    assert {n: e["verdict"] for n, e in data["lesions"].items()} == {"1": "accepted", "2": "edited", "3": "rejected"}
    assert data["lesions"]["2"]["reviewer"] == "dr a" and data["lesion_set"]["count"] == 3
    # the reviewed label map: lesion 2 is its predicted voxels plus the painted one
    reviewed, grid = imageio.read_image(tmp_path / "Phantom.verdicts.nii.gz")
    assert grid.differences(review.grid) == []
    assert np.count_nonzero(reviewed == 2) == np.count_nonzero(review.labels == 2) + 1
    assert reviewed[z0, y0, x0] == 2
    # accepting an edited lesion keeps it edited; a bad verdict or lesion number is refused
    review.set_verdict(2, "accepted")
    assert review.verdict_of(2) == "edited"
    with pytest.raises(Exception, match="verdict must be one of accepted, rejected"):
        review.set_verdict(1, "edited")
    with pytest.raises(Exception, match="no lesion 9"):
        review.set_verdict(9, "rejected")

    # the CSV's verdict column, keyed by the lesion number
    exported = export.export_results(results, tmp_path / "table", verdicts=review.by_lesion())
    with open(exported.csv, newline="", encoding="utf-8") as handle:
        assert [(r["id"], r["verdict"]) for r in csv.DictReader(handle)] == [("1", "accepted"), ("2", "edited"),
                                                                              ("3", "rejected")]

    # loading it back into a review of the same result restores the verdicts
    again = LesionReview(results, case.reference, model_name="phantom", model_sha256=SHA, threshold=0.5)
    assert again.load(tmp_path) and again.by_lesion() == {1: "accepted", 2: "edited", 3: "rejected"}


def test_a_verdict_file_for_another_model_or_lesion_set_is_refused(prediction, tmp_path):
    _, case, results = prediction
    review = LesionReview(results, case.reference, model_name="phantom", model_sha256=SHA, threshold=0.5)
    review.set_verdict(1, "rejected")
    review.save(tmp_path)
    other_model = LesionReview(results, case.reference, model_name="other", model_sha256="cd" * 32)
    with pytest.raises(VerdictMismatchError, match="model: the file is for 'phantom' .* sha256 ababababab"):
        other_model.load(tmp_path)
    fewer = case.reference.copy()
    fewer[review.labels == 3] = 0  # another prediction: lesion 3 is gone
    other_lesions = LesionReview(results, fewer, model_name="phantom", model_sha256=SHA)
    with pytest.raises(VerdictMismatchError, match=r"lesion set: the file is for 3 lesion\(s\).*has 2"):
        other_lesions.load(tmp_path)
    with pytest.raises(VerdictMismatchError, match="case: the file is for 'Phantom', this is 'other'"):
        read_verdicts(tmp_path / "Phantom.verdicts.json", case="other")
