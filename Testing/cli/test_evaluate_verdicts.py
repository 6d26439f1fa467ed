"""``iwseg evaluate --verdicts``: the model alone and the model plus reader, worked by hand, in a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from IWSegmentationLib.core.imageio import Geometry, write_image
from IWSegmentationLib.core.verdicts import LesionSet, Verdict, VerdictFile

GRID = Geometry((20, 20, 10), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))  # x, y, z: arrays are [10, 20, 20]
# The three predicted components, numbered by hand as core.lesions.number_lesions numbers them:
# largest first (27 voxels), then the two of 8 voxels by their first voxel in [z, y, x] scan order:
# (2, 10, 10) comes before (6, 15, 2). (id, voxels, bbox_zyx with exclusive ends, logit inside.)
COMPONENTS = [
    (1, 27, (2, 2, 2, 5, 5, 5), 4.0),  # hits reference lesion A exactly
    (2, 8, (2, 10, 10, 4, 12, 12), 3.0),  # hits reference lesion B exactly
    (3, 8, (6, 15, 2, 8, 17, 4), 2.0),  # a false positive: no reference lesion there
]


def box(array, bbox, value):
    z0, y0, x0, z1, y1, x1 = bbox
    array[z0:z1, y0:y1, x0:x1] = value


@pytest.fixture
def case(tmp_path):
    """One case, ``c1``: a logit map of three components (background logit -5) and a reference of two lesions."""
    logits = np.full(GRID.shape_zyx, -5.0, np.float32)
    ref = np.zeros(GRID.shape_zyx, np.uint8)
    for _, _, bbox, logit in COMPONENTS:
        box(logits, bbox, logit)
    for _, _, bbox, _ in COMPONENTS[:2]:
        box(ref, bbox, 1)
    (tmp_path / "logits").mkdir()
    (tmp_path / "ref").mkdir()
    (tmp_path / "verdicts").mkdir()
    write_image(tmp_path / "logits" / "c1.nii.gz", logits, GRID)
    write_image(tmp_path / "ref" / "c1.nii.gz", ref, GRID)
    return tmp_path


def verdict_file(folder: Path, verdicts: dict, *, case="c1", grid=GRID, lesions=COMPONENTS, reviewed=None) -> Path:
    lesion_set = LesionSet.of([{"id": i, "voxels": v, "bbox": b} for i, v, b, _ in lesions], threshold=0.5)
    file = VerdictFile(case, f"{case}.nii.gz", grid, "tiny", "ab" * 32, lesion_set,
                       {n: Verdict(v, "dr test", "2025-01-01T00:00:00Z") for n, v in verdicts.items()},
                       reviewed_labels=reviewed)
    return file.write(folder / f"{case}.verdicts.json")


def evaluate(case: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "IWSegmentationLib", "evaluate", "--logits", case / "logits",
                           "--ref", case / "ref", "--no-progress", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def rows(stdout: str) -> dict[str, list[str]]:
    return {label: line[len(label):].split() for line in stdout.splitlines()
            for label in ("model alone", "model + reader") if line.startswith(label)}


def test_rejected_false_positive_drops_fp_per_image_by_one(case):
    # Model alone: 2 of 2 lesions hit (recall 1.0), 1 false positive on 1 image (FP/img 1.00).
    # The reader rejects lesion 3, the false positive: its voxels get the lowest logit, so the
    # component is gone: FP/img 1.00 -> 0.00, recall unchanged at 1.000; object Dice stays 1.000.
    verdict_file(case / "verdicts", {1: "accepted", 2: "accepted", 3: "rejected"})
    proc = evaluate(case, "--verdicts", case / "verdicts", "--json", case / "report.json")
    assert proc.returncode == 0, proc.stderr
    table = rows(proc.stdout)
    assert table["model alone"][:2] == ["1.000", "1.00"]
    assert table["model + reader"][:2] == ["1.000", "0.00"]
    assert table["model + reader"][3] == "1.000"
    assert "2 accepted, 1 rejected, 0 edited" in proc.stdout
    report = json.loads((case / "report.json").read_text())["model_plus_reader"]
    assert report["model_alone"]["fp_per_image"] == 1.0 and report["model_plus_reader"]["fp_per_image"] == 0.0
    assert report["verdicts"]["reviewed_cases"] == 1


def test_rejecting_a_true_lesion_loses_it_and_edits_use_the_reviewed_labels(case):
    # Lesion 2 (reference lesion B) rejected: recall 2/2 -> 1/2 = 0.500, FP/img stays 1.00.
    # Lesion 1 edited to its first two z-slices (18 of its 27 voxels), saved in the reviewed label
    # map: its object Dice is 2 * 18 / (18 + 27) = 0.8; the mean over the hit lesions (only A now) is 0.800.
    reviewed = np.zeros(GRID.shape_zyx, np.uint8)
    box(reviewed, (2, 2, 2, 4, 5, 5), 1)
    box(reviewed, COMPONENTS[1][2], 2)
    box(reviewed, COMPONENTS[2][2], 3)
    write_image(case / "verdicts" / "c1.verdicts.nii.gz", reviewed, GRID)
    verdict_file(case / "verdicts", {1: "edited", 2: "rejected"}, reviewed="c1.verdicts.nii.gz")
    proc = evaluate(case, "--verdicts", case / "verdicts" / "c1.verdicts.json")
    assert proc.returncode == 0, proc.stderr
    table = rows(proc.stdout)
    assert table["model alone"][:2] == ["1.000", "1.00"] and table["model alone"][3] == "1.000"
    assert table["model + reader"][:2] == ["0.500", "1.00"] and table["model + reader"][3] == "0.800"
    assert "1 edited (1 with the reviewed label map)" in proc.stdout


@pytest.mark.parametrize("change, named", [
    ({"case": "c2"}, "case: the file is for 'c2', this is 'c1'"),
    ({"grid": Geometry((20, 20, 10), (1.0, 1.0, 1.0), (5.0, 0.0, 0.0))}, "case grid: origin"),
    ({"lesions": COMPONENTS[:2]}, "lesion set: the file is for 2 lesion(s)"),
])
def test_a_verdict_file_for_another_case_or_lesion_set_is_refused(case, change, named):
    path = verdict_file(case / "verdicts", {1: "rejected"}, **change)
    proc = evaluate(case, "--verdicts", path)
    if change.get("case") == "c2":  # a file for a case not evaluated is a warning; the case itself is unreviewed
        assert proc.returncode == 0 and "not evaluated" in proc.stderr
        assert "0 of 1 case(s) reviewed" in proc.stdout
        (case / "logits" / "c2.nii.gz").write_bytes((case / "logits" / "c1.nii.gz").read_bytes())
        (case / "ref" / "c2.nii.gz").write_bytes((case / "ref" / "c1.nii.gz").read_bytes())
        path.rename(case / "verdicts" / "c1.verdicts.json")  # the name says c1, the content c2
        proc = evaluate(case, "--verdicts", case / "verdicts")
        assert proc.returncode == 0, proc.stderr  # the content decides: c2's file is applied to c2
        return
    assert proc.returncode == 2, proc.stderr
    assert named in proc.stderr and str(path) in proc.stderr


def test_bad_verdict_files_are_refused(case):
    path = case / "verdicts" / "c1.verdicts.json"
    path.write_text(json.dumps({"format": "iwseg-verdicts", "version": 99}))
    proc = evaluate(case, "--verdicts", path)
    assert proc.returncode == 2 and "'version' must be 1" in proc.stderr
    verdict_file(case / "verdicts", {3: "maybe"})
    proc = evaluate(case, "--verdicts", path)
    assert proc.returncode == 2 and "lesion 3's verdict must be one of accepted, rejected, edited" in proc.stderr
    proc = evaluate(case, "--verdicts", case / "nothing")
    assert proc.returncode == 2 and "--verdicts: no such file or folder" in proc.stderr
