"""``iwseg evaluate --pred`` reads what a uint8 prediction means (predict's note, a label map) and
refuses what it cannot tell (#23 item 1), in a real subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from IWSegmentationLib.core.imageio import Geometry, write_image
from IWSegmentationLib.core.prediction_maps import PROBABILITY_UINT8_NOTE

SHAPE = (8, 8, 8)


def evaluate(pred: Path, ref: Path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "IWSegmentationLib", "evaluate", "--pred", str(pred), "--ref",
                           str(ref), "--no-progress", *map(str, extra)], capture_output=True, text=True, timeout=120)


def all_row(stdout: str) -> list[str]:
    """lesions, hit, recall, FP/img of the summary's "all" row."""
    return next(line for line in stdout.splitlines() if line.startswith("all "))[3:].split()[:4]


def case(tmp_path: Path, pred: np.ndarray, notes: str | None = None) -> tuple[Path, Path]:
    """One case: a 2x2x2 reference lesion at [1:3, 1:3, 1:3] and the prediction given."""
    ref = np.zeros(SHAPE, np.uint8)
    ref[1:3, 1:3, 1:3] = 1
    geometry = Geometry.identity(SHAPE)
    (tmp_path / "ref").mkdir()
    write_image(tmp_path / "ref" / "a.nii.gz", ref, geometry)
    (tmp_path / "pred").mkdir()
    write_image(tmp_path / "pred" / "a.nii.gz", pred, geometry, notes=notes)
    return tmp_path / "pred", tmp_path / "ref"


def test_a_uint8_map_with_maximum_1_is_p_0_004(tmp_path):
    """predict --probabilities-uint8 writes round(255 p) and its note: a blob of value 1 away from
    the lesion is p = 1/255 = 0.004 < 0.5, no component: 0 hits and 0.00 FP/image (before: read as
    p = 1, one false positive, 1.00 FP/image)."""
    pred = np.zeros(SHAPE, np.uint8)
    pred[5:7, 5:7, 5:7] = 1
    proc = evaluate(*case(tmp_path, pred, PROBABILITY_UINT8_NOTE))
    assert proc.returncode == 0, proc.stderr
    assert all_row(proc.stdout) == ["1", "0", "0.000", "0.00"]


def test_a_label_map_with_lesion_value_2_is_a_label_map(tmp_path):
    """nnU-Net / LiTS: the lesion is label 2. Without a note, values {0, 2} are a label map: the
    predicted lesion covers the reference one, recall 1 and no false positive (before: p = 2/255,
    recall 0.000)."""
    pred = np.zeros(SHAPE, np.uint8)
    pred[1:3, 1:3, 1:3] = 2
    proc = evaluate(*case(tmp_path, pred))
    assert proc.returncode == 0, proc.stderr
    assert all_row(proc.stdout) == ["1", "1", "1.000", "0.00"]


def test_an_ambiguous_uint8_map_is_refused_and_the_flag_decides(tmp_path):
    """0 background, 1 liver, 2 tumour (or p <= 2/255): refused, exit 2, naming the file and the
    flag; --pred-values label=2 reads it as the label map (recall 1), --pred-values uint8 as
    round(255 p) (nothing above 0.5: recall 0)."""
    pred = np.zeros(SHAPE, np.uint8)
    pred[0:4, 0:4, 0:4] = 1
    pred[1:3, 1:3, 1:3] = 2
    folder, ref = case(tmp_path, pred)
    proc = evaluate(folder, ref)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "a.nii.gz" in proc.stderr and "--pred-values" in proc.stderr and "3 values (0, 1, 2)" in proc.stderr
    assert all_row(evaluate(folder, ref, "--pred-values", "label=2").stdout) == ["1", "1", "1.000", "0.00"]
    assert all_row(evaluate(folder, ref, "--pred-values", "uint8").stdout) == ["1", "0", "0.000", "0.00"]


def test_bad_numbers_are_one_line_exit_2(tmp_path):
    folder, ref = case(tmp_path, np.zeros(SHAPE, np.uint8))
    for extra in (("--seed", "-5"), ("--seed", str(2**32)), ("--pred-values", "label=0")):
        proc = evaluate(folder, ref, *extra)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and extra[0] in proc.stderr, (extra, proc.stderr)
