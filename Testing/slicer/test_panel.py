"""What the Slicer panel shows (IWSegmentationLib.slicer.panel) and the dependency policy
(IWSegmentationLib.slicer.deps), tested without Slicer: hand-written expected texts and numbers."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from IWSegmentationLib.core.errors import InputError
from IWSegmentationLib.core.lesion_guards import LesionSummary
from IWSegmentationLib.core.progress import ProgressEvent, parse_progress_line
from IWSegmentationLib.slicer import deps, panel

# ---------------------------------------------------------------------------- progress


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "ETA 0 s"), (12.4, "ETA 12 s"), (65, "ETA 1 min 05 s"), (3599, "ETA 59 min 59 s"),
     (7380, "ETA 2 h 03 min"), (None, ""), (-1, ""), (math.nan, ""), ("soon", "")],
)
def test_format_eta(seconds, text):
    assert panel.format_eta(seconds) == text


def test_progress_state_follows_the_protocol():
    state = panel.ProgressState()
    seen = []
    lines = [
        '{"stage": "start", "version": "0.1.0", "cases": 1, "device": "cpu"}',
        '{"stage": "load", "case": null, "message": "checkpoint model.safetensors"}',
        'a stray library line',
        '{"stage": "inference", "case": "input", "done": 1, "total": 4, "eta_s": null}',
        '{"stage": "inference", "case": "input", "done": 2, "total": 4, "eta_s": 30.2}',
        '{"stage": "load", "case": "input", "message": "late"}',
        '{"stage": "warning", "message": "CUDA out of memory, retrying with batch size 1"}',
        '{"stage": "postprocess", "case": "input"}',
        '{"stage": "done", "seconds": 3.2, "cases": 1}',
    ]
    for line in lines:
        event = parse_progress_line(line)
        if event is not None:
            state.update(event)
            seen.append((state.percent, state.text))
    # inference spans 12..90 %: 1/4 -> 12 + 78/4 = 31.5 -> 31; 2/4 -> 12 + 39 = 51
    assert [p for p, _ in seen] == [0, 2, 31, 51, 51, 51, 90, 99]
    assert seen[1][1] == "Loading checkpoint model.safetensors (on cpu)"
    assert seen[2][1] == "Running the network: window 1 of 4 (on cpu)"
    assert seen[3][1] == "Running the network: window 2 of 4 · ETA 30 s (on cpu)"
    assert seen[5][1] == "Warning: CUDA out of memory, retrying with batch size 1"
    assert state.warnings == ["CUDA out of memory, retrying with batch size 1"]
    assert seen[-1][1] == "Reading results"


def test_progress_state_shows_errors():
    state = panel.ProgressState()
    state.update(ProgressEvent("error", {"message": "input is 2D", "exit_code": 2}))
    assert state.text == "Failed: input is 2D"


@given(st.lists(st.sampled_from(["start", "load", "preprocess", "inference", "postprocess", "write", "case_done",
                                 "done", "warning", "error", "unknown"]), max_size=30),
       st.integers(0, 50), st.integers(1, 50))
def test_progress_percent_never_goes_back_and_stays_in_range(stages, done, total):
    state = panel.ProgressState()
    last = 0
    for stage in stages:
        state.update(ProgressEvent(stage, {"done": min(done, total), "total": total}))
        assert last <= state.percent <= 99
        last = state.percent


# ---------------------------------------------------------------------------- model card

CT_LUNG_CARD = {
    "preprocessing": {"name": "ct-lung", "modality": "CT", "clip": [-1000.0, 300.0], "mask": "lung",
                      "target_spacing": [1.25, None, None]},
    "patch_size": [128, 128, 128],
    "loss": "iw-dice",
    "threshold": 0.4,
    "size_thresholds": [10.0, 20.0],
    "validation_metrics": {"avg_recall_0_5": 0.7341, "cpm": 0.61, "object_dice": {"mean": 0.77, "std": 0.1},
                           "note": "text is skipped"},
    "library_version": "0.1.0",
}


def test_model_card_rows_summarise_the_card():
    assert panel.model_card_rows(CT_LUNG_CARD) == [
        ("Modality", "CT"),
        ("Preset", "ct-lung (organ mask: lung)"),
        ("Patch size", "128 × 128 × 128"),
        ("Spacing", "input's × input's × 1.25 mm (input resampled to it)"),  # x × y × z
        ("Training loss", "iw-dice"),
        ("Threshold", "0.4"),
        ("Size groups", "small < 10 mm ≤ medium < 20 mm ≤ large"),
        ("Validation", "avg_recall_0_5 0.734, cpm 0.61, object_dice/mean 0.77, object_dice/std 0.1"),
        ("Licence", "not stated"),  # the card has no license field: written before it existed
        ("Library", "0.1.0"),
    ]
    licensed = {**CT_LUNG_CARD, "license": "Apache-2.0", "license_url": "https://example.org/LICENSE"}
    assert dict(panel.model_card_rows(licensed))["Licence"] == "Apache-2.0 (https://example.org/LICENSE)"
    assert panel.card_size_thresholds(CT_LUNG_CARD) == (10.0, 20.0)
    assert panel.card_size_thresholds({"size_thresholds": {"small_mm": 5, "large_mm": 10}}) == (5.0, 10.0)
    assert panel.card_size_thresholds({}) is None


def test_model_card_of_a_real_checkpoint(tmp_path):
    pytest.importorskip("torch")
    from IWSegmentationLib.nn import checkpoint
    from IWSegmentationLib.testing import phantom

    card = checkpoint.read_metadata(phantom.threshold_checkpoint(tmp_path / "t.safetensors"))
    rows = dict(panel.model_card_rows(card))
    assert rows["Modality"] == "MR" and rows["Preset"] == "mr"
    assert rows["Patch size"] == "32 × 32 × 32" and rows["Threshold"] == "0.5"
    assert rows["Training loss"] == "none (hand-wired test model)"
    assert rows["Size groups"] == "small < 5 mm ≤ medium < 10 mm ≤ large"
    assert rows["Validation"] == "no metrics recorded"
    assert rows["Licence"] == "not stated"  # threshold_checkpoint states no licence
    assert panel.model_card_text(card).startswith("Modality: MR\nPreset: mr\n")


def test_model_card_of_a_sparse_card_says_unknown():
    assert panel.model_card_rows({}) == [
        ("Modality", "unknown"), ("Preset", "unknown"), ("Spacing", "input's own (not recorded)"),
        ("Training loss", "unknown"), ("Validation", "no metrics recorded"), ("Licence", "not stated"),
    ]
    with pytest.raises(InputError, match="model card"):
        panel.model_card_rows(["not", "a", "card"])


# ---------------------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    ("dims", "components", "needle"),
    [((20, 20, 1), 1, "is 2D (20 × 20 × 1 voxels)"), ((1, 30, 30), 1, "is 2D"),
     ((20, 20, 20), 3, "has 3 components per voxel"), ((0, 0, 0), 1, "has no image data"), (None, 1, "no image data")],
)
def test_check_volume_shape_refuses_what_the_network_cannot_take(dims, components, needle):
    with pytest.raises(InputError) as info:
        panel.check_volume_shape(dims, components, "CT chest")
    assert needle in str(info.value) and str(info.value).startswith("CT chest")


def test_check_volume_shape_accepts_a_3d_scalar_volume():
    panel.check_volume_shape((512, 512, 300), 1)


def test_compatibility_warnings():
    mr_card = {"preprocessing": {"name": "mr", "modality": "MR", "mask": None}}
    ct_card = {"preprocessing": {"name": "ct-liver", "modality": "CT", "clip": [-300.0, 300.0], "mask": None}}
    assert panel.compatibility_warnings(mr_card, minimum=0, maximum=1200) == []
    assert panel.compatibility_warnings(ct_card, minimum=-1024, maximum=2000) == []
    assert panel.compatibility_warnings(mr_card, minimum=-1024, maximum=2000) == [
        "The model was trained on MR (mr) but the volume has values down to -1024, like CT in Hounsfield units."]
    (ct_on_mr,) = panel.compatibility_warnings(ct_card, minimum=0, maximum=800)
    assert "trained on CT (ct-liver)" in ct_on_mr and "no negative values (range 0 … 800)" in ct_on_mr
    (by_tag,) = panel.compatibility_warnings(ct_card, minimum=-1000, maximum=800, dicom_modality="MR")
    assert "DICOM modality is MR" in by_tag
    below = panel.compatibility_warnings(ct_card, minimum=-1024, maximum=-500)
    assert below == ["The volume lies entirely below the preset's window -300 … 300."]
    (organ,) = panel.compatibility_warnings(CT_LUNG_CARD, minimum=-1024, maximum=2000)
    assert "trained with a lung mask applied" in organ


# ---------------------------------------------------------------------------- devices


def test_describe_devices():
    assert panel.describe_devices(None) == ("Checking devices…", None)
    text, warning = panel.describe_devices({"torch": None, "error": "No module named 'torch'"})
    assert text == "PyTorch not available yet" and "installed when you press Apply" in warning
    assert panel.describe_devices({"torch": "2.5", "cuda": [], "mps": False}) == (
        "No CUDA GPU: inference runs on the CPU", None)
    assert panel.describe_devices({"torch": "2.5", "cuda": [], "mps": False}, "cuda")[1] == (
        "CUDA was chosen but no CUDA GPU is available.")
    gpu = {"index": 0, "name": "Fake GPU", "free_mb": 3072, "total_mb": 8192}
    assert panel.describe_devices({"torch": "2.5", "cuda": [gpu]}) == ("Fake GPU: 3.0 of 8.0 GiB free", None)
    busy = dict(gpu, free_mb=1500)
    text, warning = panel.describe_devices({"torch": "2.5", "cuda": [busy, gpu]})
    assert text == "Fake GPU: 1.5 of 8.0 GiB free (+1 more)" and "Low GPU memory (1500 MiB free)" in warning
    assert panel.describe_devices({"torch": "2.5", "cuda": [busy]}, "cpu")[1] is None


# ---------------------------------------------------------------------------- lesion table and counts

# Three detections and three reference lesions, as evaluation.match_case would describe them:
# detection 1 matches reference 1 (Dice 0.8), detection 2 overlaps nothing (FP),
# detection 3 matches reference 2 (Dice 0.5); reference 3 is missed.
COMPONENTS = [
    {"id": 1, "segment_id": "s1", "name": "Lesion 01 · 14.0 mm · large", "diameter_mm": 14.0, "volume_mm3": 1436.8,
     "size_group": "large", "confidence": 0.99, "hit_dice": 0.8},
    {"id": 2, "segment_id": "s2", "diameter_mm": 6.2, "volume_mm3": 124.6, "size_group": "medium",
     "confidence": 0.62, "hit_dice": 0.0},
    {"id": 3, "segment_id": "s3", "diameter_mm": 3.9, "volume_mm3": 31.0, "size_group": "small",
     "confidence": 0.91, "hit_dice": 0.5},
]
REFERENCES = [
    {"id": 1, "hit_dice": 0.8, "confidence": 0.99, "diameter_mm": 14.2, "volume_mm3": 1500.0, "size_group": "large"},
    {"id": 2, "hit_dice": 0.5, "confidence": 0.91, "diameter_mm": 4.4, "volume_mm3": 44.6, "size_group": "small"},
    {"id": 3, "segment_id": "r3", "hit_dice": 0.0, "confidence": None, "diameter_mm": 2.5, "volume_mm3": 8.2,
     "size_group": "small"},
]


def test_lesion_cells_format_the_rows_mrml_builds():
    # Rows as mrml.lesion_rows gives them: a TP, an FP, a missed reference lesion (FN), and a
    # lesion found without a reference or probability map (no status, Dice or confidence).
    rows = [
        {"row": "detection", "id": 1, "name": "Lesion 01 · 14.0 mm · large", "diameter_mm": 14.0,
         "volume_mm3": 1436.8, "size_group": "large", "confidence": 46.123, "dice": 0.8, "status": "TP"},
        {"row": "detection", "id": 2, "name": None, "diameter_mm": 6.24, "volume_mm3": 124.6,
         "size_group": "medium", "confidence": 0.6249, "dice": 0.0, "status": "FP"},
        {"row": "reference", "id": 3, "name": "Reference 03 · 2.5 mm · small (Segment_1)", "diameter_mm": 2.5,
         "volume_mm3": 8.2, "size_group": "small", "confidence": None, "dice": 0.0, "status": "FN"},
        {"row": "detection", "id": 4, "name": "Lesion 04 · 3.9 mm · small", "diameter_mm": 3.9,
         "volume_mm3": 31.0, "size_group": "small", "confidence": None, "dice": None, "status": None},
    ]
    assert [panel.lesion_cells(r) for r in rows] == [
        # the confidence column is the maximum logit, 2 decimals
        ["Lesion 01 · 14.0 mm · large", "14.0", "1437", "large", "46.12", "0.80", "TP", "–"],
        ["Lesion 2", "6.2", "125", "medium", "0.62", "0.00", "FP", "–"],
        ["Reference 03 · 2.5 mm · small (Segment_1)", "2.5", "8", "small", "–", "0.00", "FN", "–"],
        ["Lesion 04 · 3.9 mm · small", "3.9", "31", "small", "–", "–", "–", "–"],
    ]
    assert all(len(panel.lesion_cells(r)) == len(panel.LESION_COLUMNS) for r in rows)
    assert panel.lesion_cells({"id": 7, "diameter_mm": float("nan")})[:2] == ["Lesion 7", "–"]


def test_the_doubt_column_marks_doubtful_lesions():
    # found by 1 of 2 networks: doubtful; 8 of 8 flips with a small spread: not; no TTA/ensemble: a dash
    assert panel.LESION_COLUMNS[-1] == "Doubt"
    assert panel.lesion_cells({"id": 1, "doubt": {"members": 2, "found_by": 1, "doubtful": True}})[-1] == "⚠ 1/2"
    assert panel.lesion_cells({"id": 1, "doubt": {"members": 8, "found_by": 8, "doubtful": False}})[-1] == "8/8"
    assert panel.lesion_cells({"id": 1, "doubt": {"members": 8, "found_by": 8, "doubtful": True}})[-1] == "⚠ 8/8"
    assert panel.lesion_cells({"id": 1})[-1] == "–"


def test_result_texts_say_no_lesions_found():
    status, summary = panel.result_texts(0, 12.4)
    assert status == "Done in 12 s: no lesions found." and "no lesions found" in summary.lower()
    assert panel.result_texts(1, 3.0) == ("Done in 3 s.", "1 lesion found (one segment each)")
    assert panel.result_texts(5, 3.0)[1] == "5 lesions found (one segment each)"


def test_status_carries_the_backends_summary_and_its_guards():
    # the case_done event of a chest-wide blob: a 200 mm ball, 4/3 pi 100^3 = 4188790 voxels of 1 mm³
    # (4188.8 mL, d = (6 V / pi)^(1/3) = 200.0 mm) in an 8e6-voxel body: 52.36% > 5%
    blob = LesionSummary.of([4_188_790], 1.0, body_voxels=8_000_000)
    state = panel.ProgressState()
    state.update(ProgressEvent("case_done", {"case": "chest", "lesions": 1, "summary": blob.as_dict()}))
    assert state.summary == LesionSummary.from_dict(blob.as_dict())
    status, summary = panel.result_texts(1, 3.0, state.summary)
    assert status.startswith("Done in 3 s. Warning: The largest lesion covers 52.4% of the body (4188.8 mL;")
    assert summary == "1 lesion; largest 4188.8 mL (200.0 mm); lesions cover 52.36% of the body (largest 52.36%) " \
                      "(one segment each)"
    # a plausible result: no warning in the status
    good = LesionSummary.of([96, 8], 1.0, body_voxels=8_000_000)
    assert panel.result_texts(2, 3.0, good)[0] == "Done in 3 s."
    # an event without a summary (an older backend) keeps the plain texts
    state = panel.ProgressState()
    state.update(ProgressEvent("case_done", {"case": "chest", "lesions": 2}))
    assert panel.result_texts(2, 3.0, state.summary) == ("Done in 3 s.", "2 lesions found (one segment each)")


@pytest.mark.parametrize(
    ("threshold", "shown", "detected", "fp"),
    [
        (0.0, 3, 2, 1),   # everything shown: refs 1 and 2 detected, detection 2 is a FP
        (0.7, 2, 2, 0),   # detection 2 (0.62) hidden: the FP goes, recall stays 2/3
        (0.95, 1, 1, 0),  # detection 3 (0.91) hidden: reference 2 no longer detected
        (1.0, 0, 0, 0),
    ],
)
def test_detection_counts_walk_along_the_froc_curve(threshold, shown, detected, fp):
    counts = panel.detection_counts(COMPONENTS, threshold, REFERENCES)
    assert (counts.shown, counts.hidden, counts.detected, counts.false_positives) == (shown, 3 - shown, detected, fp)
    assert counts.recall == pytest.approx(detected / 3)


def test_detection_counts_text():
    assert panel.detection_counts(COMPONENTS, 0.7, REFERENCES).text() == (
        "2 lesions shown, 1 hidden · recall 67% (2 of 3 reference lesions) · 0 false positives")
    assert panel.detection_counts(COMPONENTS, 0.0).text() == "3 lesions shown, 0 hidden"
    assert panel.detection_counts([], 0.5, []).text() == (
        "0 lesions shown, 0 hidden · recall – (0 of 0 reference lesions) · 0 false positives")


def test_detection_counts_agree_with_the_metrics_module():
    """The slider's TP/FP at a threshold (a logit) are the metrics' FROC counts (evaluation.evaluate_cases)."""
    np = pytest.importorskip("numpy")
    from IWSegmentationLib import evaluation

    logits = np.full((12, 24, 24), -6.0, dtype=np.float32)
    ref = np.zeros(logits.shape, dtype=np.uint8)
    logits[2:5, 2:5, 2:5] = 25.0      # hits reference lesion A (probability exactly 1.0 in float32)
    ref[2:5, 2:6, 2:5] = 1
    logits[6:8, 10:12, 10:12] = 18.0  # a false positive (probability 1.0 too: only the logit ranks it below A)
    logits[8:11, 18:21, 18:21] = 1.1  # hits reference lesion B
    ref[8:11, 18:22, 18:22] = 1
    ref[2:4, 18:20, 2:4] = 1          # reference lesion C, missed
    case = evaluation.match_case(logits, ref, score="logit")
    components = [{"id": c.id, "confidence": c.confidence, "hit_dice": c.hit_dice} for c in case.components]
    references = [{"id": g.id, "confidence": g.confidence, "hit_dice": g.hit_dice} for g in case.lesions]
    for threshold in (-5.0, 1.0, 1.2, 18.0, 20.0, 26.0):
        counts = panel.detection_counts(components, threshold, references)
        tp = sum(g.hit_dice > 0 and g.confidence is not None and g.confidence >= threshold for g in case.lesions)
        fp = sum(c.hit_dice == 0 and c.confidence >= threshold for c in case.components)
        assert (counts.detected, counts.false_positives) == (tp, fp)
    assert panel.detection_counts(components, 1.0, references).detected == 2  # A (25) and B (1.1)
    assert panel.detection_counts(components, 20.0, references).false_positives == 0  # the FP (18) is hidden
    assert panel.detection_counts(components, 20.0, references).detected == 1


# ---------------------------------------------------------------------------- dependencies


def fake_versions(**installed):
    return lambda name: installed.get(name)


def test_missing_requirements():
    version_of = fake_versions(scipy="1.13.0", safetensors="0.3.1", tqdm="4.66.0", pyyaml="6.0.1")
    assert deps.missing_requirements(version_of=version_of) == [
        "connected-components-3d>=3.12",  # not installed
        "safetensors>=0.4",               # too old
    ]
    everything = fake_versions(**{"scipy": "1.10", "connected-components-3d": "3.12.4", "safetensors": "0.4.5",
                                  "tqdm": "4.60", "pyyaml": "6.0"})
    assert deps.missing_requirements(version_of=everything) == []
    with pytest.raises(deps.DependencyError, match="invalid requirement"):
        deps.missing_requirements(["scipy>>1"], version_of=everything)


def test_constraints_pin_what_slicer_owns(tmp_path):
    version_of = fake_versions(numpy="1.26.4", SimpleITK="2.4.0", torch="2.5.1+cu121")
    assert deps.constraints_lines(version_of=version_of) == [
        "numpy==1.26.4", "SimpleITK==2.4.0", "torch==2.5.1+cu121"]
    assert deps.constraints_lines(version_of=fake_versions(numpy="2.0.0")) == ["numpy==2.0.0"]
    path = deps.write_constraints(tmp_path / "c.txt", version_of=version_of)
    assert path.read_text() == "numpy==1.26.4\nSimpleITK==2.4.0\ntorch==2.5.1+cu121\n"


def _fake_wheel(folder, name, version):
    """A minimal pure-Python wheel (metadata only), enough for pip to resolve it."""
    import zipfile

    dist = f"{name}-{version}.dist-info"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        whl.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        whl.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{dist}/RECORD", "")
    return path


@pytest.mark.slow
def test_constraints_really_stop_pip_from_replacing_numpy(tmp_path):
    """A control experiment with pip itself (offline, --dry-run: nothing is installed).

    A local index holds numpy 99.0.0. Asked for ``numpy>=99``, pip would upgrade numpy; with our
    constraints file it must refuse, naming numpy.
    """
    import subprocess
    import sys

    index = tmp_path / "index"
    index.mkdir()
    _fake_wheel(index, "numpy", "99.0.0")
    base = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--find-links", str(index),
            "--disable-pip-version-check", "numpy>=99"]
    free = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert free.returncode == 0 and "numpy-99.0.0" in free.stdout, free.stdout + free.stderr
    constraints = deps.write_constraints(tmp_path / "constraints.txt")
    pinned = subprocess.run(base + ["-c", str(constraints)], capture_output=True, text=True, timeout=120)
    assert pinned.returncode != 0
    assert f"numpy=={deps.installed_version('numpy')}" in pinned.stdout + pinned.stderr


def test_protected_packages_are_not_backend_requirements():
    names = {deps._requirement(spec).name.lower() for spec in deps.BACKEND_REQUIREMENTS}
    assert not names & {p.lower() for p in deps.PROTECTED_PACKAGES}


@pytest.mark.parametrize(
    ("version", "problem"),
    [(None, "PyTorch is not installed"), ("1.13.1", "PyTorch 1.13.1 is too old"), ("2.1.0", None),
     ("2.5.1+cu121", None), ("2.13.0.dev20250101", None), ("garbage", "unreadable version")],
)
def test_torch_problem(version, problem):
    found = deps.torch_problem(fake_versions(torch=version) if version else fake_versions())
    if problem is None:
        assert found is None
    else:
        assert problem in found


class _FakePyTorchUtils:
    """Stands in for the PyTorch extension's module: ``installTorch`` does what it is told."""

    def __init__(self, outcome):
        self.outcome = outcome

    def PyTorchUtilsLogic(self):  # noqa: N802 (the extension's name)
        fake = self

        class Logic:
            def installTorch(self, askConfirmation, torchVersionRequirement):  # noqa: N802
                assert askConfirmation is True and torchVersionRequirement == f">={deps.MINIMUM_TORCH}"
                if isinstance(fake.outcome, BaseException):
                    raise fake.outcome
                return fake.outcome

        return Logic()


def test_a_failing_torch_install_is_a_dependency_error(monkeypatch):
    failure = subprocess.CalledProcessError(1, ["pip", "install", "torch"])
    monkeypatch.setitem(sys.modules, "PyTorchUtils", _FakePyTorchUtils(failure))
    with pytest.raises(deps.DependencyError, match="installing it through the PyTorch extension failed"):
        deps._ensure_torch_in_slicer(fake_versions())  # torch absent


def test_a_declined_torch_install_is_a_dependency_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "PyTorchUtils", _FakePyTorchUtils(None))
    with pytest.raises(deps.DependencyError, match="it was not installed"):
        deps._ensure_torch_in_slicer(fake_versions())


def test_a_usable_torch_asks_the_extension_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "PyTorchUtils", _FakePyTorchUtils(AssertionError("called")))
    deps._ensure_torch_in_slicer(fake_versions(torch="2.5.1+cu121"))


def test_the_docs_say_pip_ensure_needs_slicer_5_12():
    """pip_ensure (and its restart prompt) came with Slicer 5.12, not 5.10."""
    root = Path(__file__).resolve().parents[2]
    for path in (root / "IWSegmentationLib" / "slicer" / "deps.py", root / "docs" / "module.md"):
        text = " ".join(path.read_text().split())
        assert not re.search(r"(>=|≥|newer than|from)\s*(Slicer\s*)?5\.10", text), path.name
        spans = [text[max(m.start() - 150, 0):m.end() + 150] for m in re.finditer("pip_ensure", text)]
        assert any("5.12" in span for span in spans), path.name  # said where it is explained


# ---------------------------------------------------------------- the slider in FP/scan and recall

_CARD_WITH_POINTS = {"threshold": 0.5, "operating_points": {
    "points": [{"fp_per_scan": 0.5, "logit_threshold": 2.5, "recall": 0.5, "achieved_fp_per_scan": 0.5},
               {"fp_per_scan": 1.0, "logit_threshold": 2.0, "recall": 0.6, "achieved_fp_per_scan": 1.0},
               {"fp_per_scan": 2.0, "logit_threshold": 0.0, "recall": 0.75, "achieved_fp_per_scan": 2.0}],
    "hit_rule": "paper", "n_images": 2, "n_lesions": 4}}


def test_the_confidence_slider_starts_at_1_fp_per_scan_else_at_the_cards_threshold():
    assert panel.default_confidence(_CARD_WITH_POINTS) == 2.0  # the 1 FP/scan point's logit
    # no operating points: logit(0.5) = 0, logit(0.9) = log 9 = 2.197 (every lesion of the run is above it)
    assert panel.default_confidence({"threshold": 0.5}) == 0.0
    assert panel.default_confidence({"threshold": 0.9}) == pytest.approx(2.1972, abs=1e-4)


def test_the_confidence_slider_is_labelled_in_fp_per_scan_and_recall():
    # 1.0 lies halfway between logit 0 (2 FP/scan, recall 0.75) and 2.0 (1 FP/scan, 0.6):
    # 1.5 FP/scan, recall 67.5% -> "68%"; nearest: a tie between 2fp and 1fp, the stricter (1fp) wins
    assert panel.confidence_slider_text(_CARD_WITH_POINTS, 1.0) == (
        "max logit ≥ 1.00: ≈ 1.5 FP/scan, recall 68% (validation; nearest: 1fp); hit rule paper")
    assert panel.confidence_slider_text({"threshold": 0.5}, 0.0) == (
        "max logit ≥ 0.00. This model's card has no operating points (written before they were stored): "
        "the run uses its threshold 0.5.")


# ---------------------------------------------------------------------------- the organ-mask selector


def test_organ_mask_hint_says_when_the_model_needs_a_mask_and_offers_the_automatic_one():
    # ct-lung: a lung mask is needed and the backend makes the automatic one (the selector's empty choice)
    lung = panel.organ_mask_hint({"organ_mask": {"organ": "lung", "required": True, "automatic": True}})
    assert (lung.label, lung.none_display, lung.required, lung.automatic) == (
        "Organ mask (lung):", "Automatic lung mask", True, True)
    assert "TotalSegmentator's lung_upper_lobe_left" in lung.tooltip
    # a liver model: no automatic mask, so the user is told what to use, and about Allow unmasked
    liver = panel.organ_mask_hint({"preprocessing": {"name": "ct-liver", "mask": "liver"}})  # a card before organ_mask
    assert (liver.label, liver.none_display, liver.required, liver.automatic) == (
        "Organ mask (liver, required):", "None: choose the liver mask", True, False)
    assert "TotalSegmentator's liver (its 3D Slicer extension" in liver.tooltip and "'Allow unmasked'" in liver.tooltip
    # an mr model: optional; no checkpoint yet: optional, plain "None"
    mr = panel.organ_mask_hint({"preprocessing": {"name": "mr", "mask": None}})
    assert (mr.label, mr.none_display, mr.required) == ("Organ mask (optional):", "None (the model needs no organ mask)",
                                                         False)
    assert panel.organ_mask_hint(None).none_display == "None" == panel.organ_mask_hint({}).none_display
    label, selector = types.SimpleNamespace(), types.SimpleNamespace()
    lung.show(label, selector)
    assert (label.text, selector.noneDisplay, selector.toolTip) == (lung.label, lung.none_display, lung.tooltip)


# ---------------------------------------------------------------------------- the results' widgets


class _RecordingTable:
    """A QTableWidget as the panel fills it: what was set, cell by cell."""

    def __init__(self):
        self.columns, self.headers, self.rows, self.cells, self.fitted = 0, [], 0, {}, 0

    def setColumnCount(self, n):  # noqa: N802 (Qt's names)
        self.columns = n

    def setHorizontalHeaderLabels(self, labels):  # noqa: N802
        self.headers = list(labels)

    def setRowCount(self, n):  # noqa: N802
        self.rows = n

    def setItem(self, row, column, item):  # noqa: N802
        self.cells[row, column] = item

    def resizeColumnsToContents(self):  # noqa: N802
        self.fitted += 1


def test_fill_lesion_table_puts_each_rows_cells_into_the_table():
    rows = [{"row": "detection", "id": 1, "name": "Lesion 1", "diameter_mm": 12.345, "volume_mm3": 985.0,
             "size_group": "large", "confidence": 6.2, "dice": 0.81, "status": "TP"},
            {"row": "reference", "id": 2, "name": "Reference 2", "diameter_mm": 2.5, "volume_mm3": 8.2,
             "size_group": "small", "confidence": None, "dice": 0.0, "status": "FN"}]
    table = _RecordingTable()
    panel.fill_lesion_table(table, rows, lambda text: ("item", text))
    assert table.headers == list(panel.LESION_COLUMNS) and table.columns == 8  # Lesion ... Doubt
    assert table.rows == 2 and table.fitted == 1
    assert len(table.cells) == 2 * 8  # every cell of both rows
    for r, row in enumerate(rows):
        assert [table.cells[r, c] for c in range(8)] == [("item", t) for t in panel.lesion_cells(row)]
    # by hand: 12.345 mm -> "12.3", 985 mm³ -> "985", max logit 2 decimals, Dice 2 decimals, no doubt: a dash
    assert [table.cells[0, c][1] for c in range(8)] == ["Lesion 1", "12.3", "985", "large", "6.20", "0.81", "TP", "–"]
    assert [table.cells[1, c][1] for c in range(8)] == ["Reference 2", "2.5", "8", "small", "–", "0.00", "FN", "–"]
    panel.fill_lesion_table(table, [], str)  # the module's setup: the headers, no rows
    assert table.rows == 0 and table.headers == list(panel.LESION_COLUMNS)


def test_the_show_next_button_appears_only_when_the_budget_left_lesions_out():
    button = types.SimpleNamespace(text="", toolTip="", visible=True)
    panel.show_more_button(None, 200).show(button)  # a result without a budget: nothing left out
    assert (button.text, button.toolTip, button.visible) == ("Show next 200 lesions", "", False)
    panel.show_more_button([], 50).show(button)
    assert button.visible is False
    panel.show_more_button(["a", "b", "c"], 50).show(button)
    assert button.text == "Show next 50 lesions" and button.visible is True
    assert button.toolTip == ("3 more lesion(s), less confident, are counted but not shown as segments "
                              "(the 50 most confident are); “Show next 50” adds them.")
