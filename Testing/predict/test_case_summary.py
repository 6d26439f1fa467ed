"""``iwseg predict``'s one-line summary per case and its guards (issue 22, item 3), on real runs of
the hand-set threshold model (a voxel is a lesion when its HU > -350; ``_threshold_model``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from _threshold_model import ct_volume, save_threshold_checkpoint

from IWSegmentationLib.cli.main import main
from IWSegmentationLib.core.imageio import Geometry, write_image
from IWSegmentationLib.core.lesion_guards import LARGE_LESION_PERCENT
from IWSegmentationLib.core.progress import parse_progress_line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "threshold.safetensors"
    return save_threshold_checkpoint(path)


def _predict(checkpoint, image, tmp_path, *extra):
    scan = tmp_path / "chest.nrrd"
    write_image(scan, image, Geometry.identity(image.shape))  # 1 mm³ voxels
    return main(["predict", "--model", str(checkpoint), "--input", str(scan), "--output", str(tmp_path / "m.nrrd"),
                 "--lesions", str(tmp_path / "lesions.json"), "--device", "cpu", *extra])


def test_known_good_prints_the_summary_and_no_warning(checkpoint, tmp_path, capsys):
    image, _ = ct_volume()  # three lesions of 96, 8 and 1 voxels in an elliptic body of -800 HU
    body = int(np.count_nonzero(image > -900))  # the ct-lung preset's body_threshold
    assert _predict(checkpoint, image, tmp_path) == 0
    err = capsys.readouterr().err
    # largest: 96 mm³, d = (6 * 96 / pi)^(1/3) = 5.68 mm; all lesions 105 voxels
    line = (f"[chest] summary: 3 lesions; largest 96.0 mm³ (5.7 mm); lesions cover {100 * 105 / body:.2f}% of the body "
            f"(largest {100 * 96 / body:.2f}%)")
    assert line in err.splitlines()
    assert "warning: [chest] the largest lesion" not in err and " lesions (at least" not in err
    report = json.loads((tmp_path / "lesions.json").read_text())
    assert report["warnings"] == [] and report["summary"]["body_voxels"] == body
    assert report["summary"]["largest_diameter_mm"] == pytest.approx((6 * 96 / math.pi) ** (1 / 3), abs=1e-4)


def test_known_bad_chest_wide_blob_warns_in_text_json_lines_and_the_lesion_json(checkpoint, tmp_path, capsys):
    image, lesions = ct_volume()
    image[image > -900] = 100  # the whole body over the lesions becomes one blob: 100% of the body
    body = int(np.count_nonzero(image > -900))
    assert body > 20 * lesions.sum()  # the blob is much more than the three lesions it swallows
    assert _predict(checkpoint, image, tmp_path) == 0
    err = capsys.readouterr().err
    warning = next(line for line in err.splitlines() if line.startswith("warning: [chest] the largest lesion"))
    assert "covers 100.0% of the body" in warning and f"more than {LARGE_LESION_PERCENT:g}%" in warning
    assert "[chest] summary: 1 lesion; " in err
    report = json.loads((tmp_path / "lesions.json").read_text())
    assert len(report["warnings"]) == 1 and report["warnings"][0] in warning
    assert report["summary"]["largest_voxels"] == body

    (tmp_path / "again").mkdir()
    assert _predict(checkpoint, image, tmp_path / "again", "--progress-format", "jsonl") == 0
    events = [e for e in map(parse_progress_line, capsys.readouterr().out.splitlines()) if e is not None]
    (done,) = [e for e in events if e.stage == "case_done"]
    assert done.get("summary")["warnings"] == report["warnings"]
    assert done.get("summary")["text"] == report["summary"]["text"]
    assert any(e.stage == "warning" and e.get("message") == report["warnings"][0] for e in events)
