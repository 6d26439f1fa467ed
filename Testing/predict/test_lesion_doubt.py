"""Per-lesion doubt and the second-look list in ``iwseg predict``'s lesion JSON (issue 24, item 2),
on the phantom with hand-wired checkpoints whose logits are known: ``logit = gain (x - level)``,
``x = v / 100`` (the ``mr`` preset maps the phantom's background 0 and brightest lesion 100 to 0 and 1).

Lesions of the default phantom (numbered largest first): lesion 1 has v = 100 (radius 7 mm),
lesion 2 v = 85 (4 mm), lesion 3 v = 70 (2 mm); the body is v = 40.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from IWSegmentationLib.cli.main import main
from IWSegmentationLib.core.doubt import DOUBT_SD_LOGIT, SECOND_LOOK_MARGIN_LOGIT
from IWSegmentationLib.core.imageio import Geometry, read_image, write_image
from IWSegmentationLib.testing.phantom import DEFAULT_LESIONS, phantom_case, threshold_checkpoint


def _doubt(members, found_by, sd, low, high, doubtful):
    """The expected ``doubt`` entry; the logits are float16 (3 significant digits: 0.008 at 10) and the
    ``mr`` scaling and BatchNorm's epsilon shift them by about 3e-4 relative, hence the tolerance."""
    return {"members": members, "found_by": found_by, "fraction": found_by / members,
            "confidence_sd": pytest.approx(sd, abs=0.01), "confidence_min": pytest.approx(low, abs=0.01),
            "confidence_max": pytest.approx(high, abs=0.01), "doubtful": doubtful}


def _predict(tmp_path, models, *extra, lesions=DEFAULT_LESIONS):
    case = phantom_case(lesions=lesions)
    image = tmp_path / "scan.nrrd"
    write_image(image, case.image, Geometry.identity(case.image.shape))
    out, table = tmp_path / "mask.nrrd", tmp_path / "lesions.json"
    assert main(["predict", "--model", *map(str, models), "--input", str(image), "--output", str(out),
                 "--lesions", str(table), "--device", "cpu", "--no-skip", "--overwrite", *extra]) == 0
    return json.loads(table.read_text()), read_image(out)[0], case


def test_an_ensemble_where_one_network_misses_the_faint_lesion(tmp_path):
    # member A: gain 20, level 0.5  -> v=100: 10, v=85: 7, v=70: 4, body: -2
    # member B: gain 40, level 0.75 -> v=100: 10, v=85: 4, v=70: -2, body: -14
    # mean (the mask's logits):        v=100: 10, v=85: 5.5, v=70: 1, body: -8 (threshold 0.5 = logit 0)
    a = threshold_checkpoint(tmp_path / "a.safetensors", gain=20.0, level=0.5)
    b = threshold_checkpoint(tmp_path / "b.safetensors", gain=40.0, level=0.75)
    report, mask, case = _predict(tmp_path, [a, b])
    np.testing.assert_array_equal(mask, case.reference)  # the mean finds all three
    rows = {row["id"]: row for row in report["lesions"]}
    assert [rows[n]["confidence"] for n in (1, 2, 3)] == pytest.approx([10.0, 5.5, 1.0], rel=1e-3)
    # lesion 1: both 10 -> sd 0, found by both: not doubtful
    assert rows[1]["doubt"] == _doubt(2, 2, 0.0, 10.0, 10.0, False)
    # lesion 2: 7 and 4 -> sd = |7 - 4| / 2 = 1.5 > DOUBT_SD_LOGIT (1): doubtful by its spread
    assert rows[2]["doubt"] == _doubt(2, 2, 1.5, 4.0, 7.0, True)
    # lesion 3: 4 and -2 -> B's logit is below 0 everywhere in it: found by 1 of 2; sd = 6 / 2 = 3
    assert rows[3]["doubt"] == _doubt(2, 1, 3.0, -2.0, 4.0, True)
    assert report["doubt"]["members"] == 2 and report["doubt"]["doubtful_sd_logit"] == DOUBT_SD_LOGIT
    assert report["second_look"] == [] and report["second_look_count"] == 0  # nothing in (-1, 0]


def test_tta_of_a_pointwise_network_on_the_phantom_finds_every_lesion_with_every_flip(tmp_path):
    # logit = 20 (x - 0.5) voxel by voxel: every flip gives the same map, so 8 of 8 members, sd 0
    a = threshold_checkpoint(tmp_path / "a.safetensors")
    report, mask, case = _predict(tmp_path, [a], "--tta")
    np.testing.assert_array_equal(mask, case.reference)
    expected = {1: 10.0, 2: 7.0, 3: 4.0}  # 20 (v / 100 - 0.5)
    for row in report["lesions"]:
        v = expected[row["id"]]
        assert row["doubt"] == _doubt(8, 8, 0.0, v, v, False)
    assert report["doubt"]["members"] == 8


def test_no_doubt_without_members_or_with_no_doubt(tmp_path):
    a = threshold_checkpoint(tmp_path / "a.safetensors")
    for extra in ((), ("--tta", "--no-doubt")):
        report, _, _ = _predict(tmp_path, [a], *extra)
        assert report["doubt"] is None and all("doubt" not in row for row in report["lesions"])


def test_a_lesion_just_below_the_threshold_is_in_the_second_look_list_only(tmp_path):
    # a fourth lesion of v = 46: logit 20 (0.46 - 0.5) = -0.8, in (0 - SECOND_LOOK_MARGIN_LOGIT, 0]; the body
    # (v = 40, logit -2) is below the margin, so the faint lesion is a component of its own
    assert SECOND_LOOK_MARGIN_LOGIT == 1.0
    faint = (8.0, 30.0, 14.0, 3.0, 46.0)
    a = threshold_checkpoint(tmp_path / "a.safetensors")
    report, mask, case = _predict(tmp_path, [a], lesions=(*DEFAULT_LESIONS, faint))
    faint_voxels = case.image == np.float32(46.0)
    assert not mask[faint_voxels].any()  # not in the mask
    assert len(report["lesions"]) == 3 and all(row["confidence"] > 0 for row in report["lesions"])
    assert report["second_look_count"] == 1
    (entry,) = report["second_look"]
    assert entry["confidence"] == pytest.approx(-0.8, abs=1e-3)
    assert entry["voxels"] == int(faint_voxels.sum())
    assert entry["centroid_zyx"] == pytest.approx([8.0, 30.0, 14.0])
