"""The module's logic without Qt (IWSegmentationLib.slicer.logic) on Slicer's real MRML (slicer-core),
with the real backend process: the path the Apply button takes, minus the widgets.

The known answer comes from IWSegmentationLib.testing.phantom: a pointwise hand-wired checkpoint that
returns the phantom's reference mask exactly, so segments, colours, Dice and the confidence
slider all have hand-computable expected values.
"""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("slicer-core (Slicer's MRML) is not installed", allow_module_level=True)

from IWSegmentationLib.backend.interpreter import backend_environment  # noqa: E402
from IWSegmentationLib.backend.job import Outcome, RunResult, SegmentationJob, Signal  # noqa: E402
from IWSegmentationLib.backend.local_run import LocalJobFactory  # noqa: E402
from IWSegmentationLib.backend.process_tree import pid_alive  # noqa: E402
from IWSegmentationLib.core import imageio  # noqa: E402
from IWSegmentationLib.core.errors import InputError  # noqa: E402
from IWSegmentationLib.core.lesions import SIZE_GROUP_COLORS  # noqa: E402
from IWSegmentationLib.core.progress import parse_progress_line  # noqa: E402
from IWSegmentationLib.predict.options import PredictOptions  # noqa: E402
from IWSegmentationLib.slicer import mrml, panel  # noqa: E402
from IWSegmentationLib.slicer.logic import LesionSegmentationLogic, scene_rollback  # noqa: E402
from IWSegmentationLib.slicer.parameter_node import apply_model_card  # noqa: E402
from IWSegmentationLib.testing import phantom  # noqa: E402

pytestmark = pytest.mark.slicer


def oblique_geometry(case) -> imageio.Geometry:
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    return imageio.Geometry(size=case.image.shape[::-1], spacing=case.spacing[::-1], origin=(10.0, -5.0, 3.0),
                            direction=(c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture
def phantom_scene(scene):
    case = phantom.phantom_case(spacing=(1.5, 0.9, 0.8))
    geometry = oblique_geometry(case)
    volume = mrml.add_volume_from_array(scene, case.image, geometry, "Phantom")
    reference = mrml.lesion_segmentation(scene, volume, case.reference, name="Reference")
    return case, volume, reference


def node_ids(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def make_logic(scene, tmp_path) -> LesionSegmentationLogic:
    return LesionSegmentationLogic(scene, python=sys.executable, env=backend_environment(),
                                   workdir_parent=tmp_path)


@pytest.mark.slow
def test_known_answer_through_the_real_backend(phantom_scene, scene, tmp_path):
    case, volume, reference = phantom_scene
    organ = mrml.lesion_segmentation(scene, volume, (case.image > 0).astype(np.uint8), name="Body")
    checkpoint = phantom.threshold_checkpoint(tmp_path / "threshold.safetensors")
    logic = make_logic(scene, tmp_path)
    stages = []
    results = logic.start(volume, PredictOptions(models=(checkpoint,), device="cpu"), reference=reference, organ_mask=organ,
                          on_progress=lambda e: stages.append(e.stage)).wait(timeout=300).loaded_or_raise()
    assert stages[0] == "start" and stages[-1] == "done"
    assert results is logic.results

    segmentation = results.segmentation.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 3
    # largest first; phantom radii 7, 4, 2 mm -> diameters about 14, 8, 4 mm with cut-offs (5, 10) mm
    assert [row["size_group"] for row in results.lesions] == ["large", "medium", "small"]
    for row in results.lesions:
        color = segmentation.GetSegment(row["segment_id"]).GetColor()
        assert np.allclose(color, np.array(SIZE_GROUP_COLORS[row["size_group"]]) / 255.0, atol=1e-6)
        assert row["hit_dice"] == pytest.approx(1.0)  # the prediction is the reference, voxel for voxel
    # confidences: maximum logits 20 (v/100 - 0.5) = 10, 7, 4 for intensities 100, 85, 70
    expected_conf = sorted(case.confidences(), reverse=True)
    assert expected_conf == pytest.approx([10.0, 7.0, 4.0])
    assert [row["confidence"] for row in results.lesions] == pytest.approx(expected_conf, abs=1e-3)

    assert [r["status"] for r in results.rows] == ["TP", "TP", "TP"]
    assert [panel.lesion_cells(r)[5] for r in results.rows] == ["1.00", "1.00", "1.00"]
    assert results.table.GetNumberOfRows() == 3
    prob_geometry = mrml.volume_geometry(results.probabilities)
    assert prob_geometry.differences(mrml.volume_geometry(volume)) == []
    # the backend wrote the logit map only; the probability volume is its sigmoid: 1 / (1 + e^-10) at most
    assert mrml.array_from_volume(results.probabilities)[0].max() == pytest.approx(1 / (1 + math.exp(-10)), abs=1e-6)

    # The slider at logit 5 hides the least confident lesion (4), keeps recall 2/3 and no FP.
    counts = logic.set_confidence_threshold(results, 5.0)
    assert (counts.shown, counts.hidden, counts.detected, counts.false_positives) == (2, 1, 2, 0)
    display = results.segmentation.GetDisplayNode()
    visible = [row["size_group"] for row in results.lesions if display.GetSegmentVisibility(row["segment_id"])]
    assert visible == ["large", "medium"]
    assert logic.set_confidence_threshold(results, -5.0).shown == 3


def test_cancel_leaves_the_scene_unchanged(phantom_scene, scene, tmp_path):
    _, volume, reference = phantom_scene
    checkpoint = phantom.threshold_checkpoint(tmp_path / "threshold.safetensors")
    before = node_ids(scene)
    logic = make_logic(scene, tmp_path)
    run = logic.start(volume, PredictOptions(models=(checkpoint,), device="cpu"), reference=reference)
    workdir = run.workdir
    run.cancel()  # at once: the backend is still importing torch
    result = run.wait(timeout=60)
    assert result.outcome is Outcome.CANCELLED
    assert node_ids(scene) == before and logic.results is None
    assert not workdir.exists()
    assert not pid_alive(run.backend.pid)


def test_failed_loading_rolls_the_scene_back(phantom_scene, scene, tmp_path, monkeypatch):
    case, volume, reference = phantom_scene
    geometry = mrml.volume_geometry(volume)
    outputs = {"mask": imageio.write_image(tmp_path / "mask.nrrd", case.reference, geometry),
               "logits": imageio.write_image(tmp_path / "logits.nrrd", case.reference.astype(np.float32), geometry)}
    before = node_ids(scene)

    def broken_table(*args, **kwargs):
        raise RuntimeError("disk full while building the table")

    monkeypatch.setattr(mrml.loading, "dice_table_node", broken_table)  # fails after the segments were added
    logic = make_logic(scene, tmp_path)
    with pytest.raises(RuntimeError, match="disk full"):
        logic.load_results(outputs, volume, reference)
    assert node_ids(scene) == before


def write_outputs(folder, mask, logits, mask_geometry, logits_geometry=None) -> dict:
    """The files the backend writes for the module (mask and logit map), on the given grids."""
    return {"mask": imageio.write_image(folder / "mask.nrrd", mask, mask_geometry),
            "logits": imageio.write_image(folder / "logits.nrrd", logits.astype(np.float32),
                                          logits_geometry or mask_geometry)}


def test_outputs_on_another_grid_are_refused(phantom_scene, scene, tmp_path):
    # The mask has the volume's shape but an axis-aligned grid (the volume is oblique): without
    # the geometry read with it, it would be silently put on the volume's grid.
    case, volume, _ = phantom_scene
    right = mrml.volume_geometry(volume)
    wrong = imageio.Geometry.identity(case.image.shape, case.spacing)
    before = node_ids(scene)
    logic = make_logic(scene, tmp_path)
    outputs = write_outputs(tmp_path, case.reference, case.reference, wrong, right)
    with pytest.raises(InputError, match="lesion mask is not on the voxel grid of volume 'Phantom'.*direction"):
        logic.load_results(outputs, volume)
    outputs = write_outputs(tmp_path, case.reference, case.reference, right, wrong)
    with pytest.raises(InputError, match="logit map is not on the voxel grid"):
        logic.load_results(outputs, volume)
    assert node_ids(scene) == before and logic.results is None


def test_an_empty_result_says_no_lesions_found(phantom_scene, scene, tmp_path):
    case, volume, reference = phantom_scene
    nothing = np.zeros(case.image.shape, np.uint8)
    logic = make_logic(scene, tmp_path)
    outputs = write_outputs(tmp_path, nothing, nothing, mrml.volume_geometry(volume))
    results = logic.load_results(outputs, volume)
    assert results.segmentation.GetSegmentation().GetNumberOfSegments() == 0 and results.rows == []
    assert "no lesions found" in panel.result_texts(len(results.lesions), 4.0)[0]
    assert "No lesions found" in panel.result_texts(len(results.lesions), 4.0)[1]
    # With a reference the table is not empty either: the 3 missed reference lesions are listed.
    results = logic.load_results(outputs, volume, reference)
    assert results.lesions == [] and [r["status"] for r in results.rows] == ["FN", "FN", "FN"]
    assert "no lesions found" in panel.result_texts(len(results.lesions), 4.0)[0]
    counts = logic.set_confidence_threshold(results, 0.5)
    assert counts.text() == ("0 lesions shown, 0 hidden · recall 0% (0 of 3 reference lesions) · "
                             "0 false positives")


def test_clicking_a_row_centres_the_slice_views(phantom_scene, scene, tmp_path):
    case, volume, reference = phantom_scene
    geometry = mrml.volume_geometry(volume)
    found = case.reference.copy()
    found[mrml.labelmap_on_volume_grid(reference, volume, ["lesion_03"]) > 0] = 0  # miss the smallest
    logic = make_logic(scene, tmp_path)
    results = logic.load_results(write_outputs(tmp_path, found, found, geometry), volume, reference)
    assert [r["status"] for r in results.rows] == ["TP", "TP", "FN"]
    red = scene.CreateNodeByClass("vtkMRMLSliceNode")
    red.SetLayoutName("Red")
    scene.AddNode(red)
    for row in results.rows:
        # The row's centre is the lesion's centroid on the oblique grid: its voxel is in the lesion.
        ijk = np.linalg.inv(mrml.volume_ijk_to_ras(volume)) @ np.r_[row["center_ras"], 1.0]
        assert case.reference[tuple(np.round(ijk[2::-1]).astype(int))] == 1
        assert logic.center_views_on(row) == pytest.approx(row["center_ras"])
        m = red.GetSliceToRAS()
        assert [m.GetElement(r, 3) for r in range(3)] == pytest.approx(row["center_ras"])
    assert logic.center_views_on({"center_ras": None}) is None


def test_scene_rollback_keeps_what_existed(scene):
    kept = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "kept")
    with pytest.raises(ValueError), scene_rollback(scene):
        scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "added")
        raise ValueError("boom")
    assert node_ids(scene) == [kept.GetID()]
    with scene_rollback(scene):
        added = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "added")
    assert node_ids(scene) == [kept.GetID(), added.GetID()]


def test_check_inputs(scene, tmp_path):
    logic = make_logic(scene, tmp_path)
    flat = mrml.add_volume_from_array(scene, np.zeros((1, 20, 20), np.float32),
                                      imageio.Geometry.identity((1, 20, 20)), "Slice")
    with pytest.raises(InputError, match="Slice is 2D"):
        logic.check_inputs(flat, {"preprocessing": {"modality": "MR"}})
    with pytest.raises(InputError, match="Select an input volume"):
        logic.check_inputs(None, {})
    ct = mrml.add_volume_from_array(scene, np.full((8, 8, 8), -1000.0, np.float32),
                                    imageio.Geometry.identity((8, 8, 8)), "CT")
    with pytest.raises(InputError, match="checkpoint"):
        logic.check_inputs(ct, None)
    (warning,) = logic.check_inputs(ct, {"preprocessing": {"name": "mr", "modality": "MR"}})
    assert "trained on MR" in warning
    assert logic.check_inputs(ct, {"preprocessing": {"name": "ct-liver", "modality": "CT"}}) == []


def test_bad_checkpoint_is_refused_before_anything_runs(phantom_scene, scene, tmp_path):
    _, volume, _ = phantom_scene
    before = node_ids(scene)
    with pytest.raises(InputError, match="checkpoint not found"):
        make_logic(scene, tmp_path).start(volume, PredictOptions(models=(tmp_path / "missing.safetensors",)))
    assert node_ids(scene) == before and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- the injected job factory


class KnownAnswerJob:
    """A :class:`~IWSegmentationLib.backend.job.SegmentationJob` without a process: on its first poll it
    "segments" by writing the given mask, as a server or a fake would; it records what it was given."""

    def __init__(self, parameters, loader, folder, mask, geometry):
        self.parameters, self.loader, self.folder, self.mask, self.geometry = parameters, loader, folder, mask, geometry
        self.progress, self.log, self.finished = Signal(), Signal(), Signal()
        self.result = self.input = None
        self.started = self.closed = False

    @property
    def running(self):
        return self.started and self.result is None

    def start(self, write_input=None, write_organ_mask=None):
        write_input(self.folder / "input.nrrd")
        self.input, _ = imageio.read_image(self.folder / "input.nrrd")
        self.started = True

    def poll(self):
        if self.result is None:
            self.progress.emit(parse_progress_line('{"stage": "inference", "done": 1, "total": 1}'))
            outputs = write_outputs(self.folder, self.mask, self.mask, self.geometry)
            self.result = RunResult(Outcome.OK, 0, "done", loaded=self.loader(outputs))
            self.finished.emit(self.result)
        return False

    def cancel(self):
        pass

    def wait(self, timeout=None):
        self.poll()
        return self.result

    def close(self):
        self.closed = True


def test_an_injected_job_factory_replaces_the_process(phantom_scene, scene, tmp_path):
    case, volume, reference = phantom_scene
    checkpoint = phantom.threshold_checkpoint(tmp_path / "threshold.safetensors")
    jobs = []

    class Factory:  # a JobFactory without a process: the card here, the job a fake
        def model_card(self, parameters):
            return LocalJobFactory().model_card(parameters)

        def __call__(self, parameters, *, loader):
            jobs.append(KnownAnswerJob(parameters, loader, tmp_path, case.reference, mrml.volume_geometry(volume)))
            return jobs[-1]

    logic = LesionSegmentationLogic(scene, job_factory=Factory())
    assert isinstance(KnownAnswerJob(None, None, tmp_path, None, None), SegmentationJob)
    stages, finished = [], []
    job = logic.start(volume, PredictOptions(models=(checkpoint,), device="cpu", threshold=0.4), reference=reference,
                      on_progress=lambda e: stages.append(e.stage), on_finished=finished.append)
    assert job is jobs[-1] and job.running
    assert (job.parameters.device, job.parameters.threshold) == ("cpu", 0.4)
    np.testing.assert_array_equal(job.input, case.image)  # the volume, written for the job
    result = job.wait()
    assert finished == [result] and stages == ["inference"]
    assert result.loaded is logic.results
    assert logic.results.segmentation.GetSegmentation().GetNumberOfSegments() == 3  # the phantom's 3 lesions
    assert [r["status"] for r in logic.results.rows] == ["TP", "TP", "TP"]


def test_the_default_factory_runs_the_backend_with_the_given_interpreter(scene, tmp_path):
    logic = LesionSegmentationLogic(scene, python="/opt/Slicer/bin/PythonSlicer", env={"A": "1"}, workdir_parent=tmp_path)
    assert logic.job_factory == LocalJobFactory("/opt/Slicer/bin/PythonSlicer", {"A": "1"}, tmp_path)


# ---------------------------------------------------------------------------- scene close


def test_closing_the_scene_clears_the_results(phantom_scene, scene, tmp_path):
    case, volume, reference = phantom_scene
    geometry = mrml.volume_geometry(volume)
    logic = make_logic(scene, tmp_path)
    logic.load_results(write_outputs(tmp_path, case.reference, case.reference, geometry), volume, reference)
    assert logic.results is not None
    scene.Clear(0)  # File > Close Scene
    assert logic.results is None, "the results still point at nodes of the closed scene"

    logic.close()  # no longer observing: a later close leaves it alone
    volume = mrml.add_volume_from_array(scene, case.image, geometry, "Phantom")
    logic.load_results(write_outputs(tmp_path, case.reference, case.reference, geometry), volume)
    scene.Clear(0)
    assert logic.results is not None


# ---------------------------------------------------------------------------- the module's parameter node
# The module's IWSegmentationLogic hands its parameter node to these methods; a SimpleNamespace
# with the node's fields stands in for it (the fields are read by name, as the wrapper gives them).


def parameter_node(**fields) -> SimpleNamespace:
    defaults = dict(runOn=panel.RUN_ON[0], serverUrl="", serverTokenFile="", checkpointPath="", device="Auto",
                    overlap=0.25, threshold=0.5, operatingPoint="", keepSpacing=False, allowUnmasked=False,
                    inputVolume=None, organMask=None, referenceSegmentation=None, confidenceThreshold=-5.0,
                    segmentBudget=panel.DEFAULT_SEGMENT_BUDGET)
    return SimpleNamespace(**{**defaults, **fields})


class KnownAnswerFactory:
    """A JobFactory without a process: the card read here, each job a :class:`KnownAnswerJob`."""

    def __init__(self, folder, mask, geometry):
        self.folder, self.mask, self.geometry, self.jobs = folder, mask, geometry, []

    def model_card(self, parameters):
        return LocalJobFactory().model_card(parameters)

    def __call__(self, parameters, *, loader):
        self.jobs.append(KnownAnswerJob(parameters, loader, self.folder, self.mask, self.geometry))
        return self.jobs[-1]


def test_start_node_runs_what_the_parameter_node_says(phantom_scene, scene, tmp_path):
    case, volume, reference = phantom_scene
    checkpoint = phantom.threshold_checkpoint(tmp_path / "threshold.safetensors")
    factory = KnownAnswerFactory(tmp_path, case.reference, mrml.volume_geometry(volume))
    logic = LesionSegmentationLogic(scene, job_factory=factory)
    node = parameter_node(checkpointPath=str(checkpoint), device="CPU", overlap=0.5, threshold=0.4,
                          inputVolume=volume, referenceSegmentation=reference, segmentBudget=2)
    installs, finished = [], []
    job = logic.start_node(node, confirmed=True, install=lambda: installs.append("torch"),
                           on_finished=finished.append)
    assert installs == ["torch"], "a job on this computer installs its dependencies first"
    options = job.parameters
    assert (options.device, options.overlap, options.threshold) == ("cpu", 0.5, 0.4)
    assert options.allow_modality_mismatch is True  # the user confirmed the warnings
    result = job.wait()
    assert finished == [result] and result.loaded is logic.results
    # the phantom's 3 lesions, a display budget of 2: the 2 most confident are segments, 1 is counted
    assert logic.segment_budget == 2
    assert logic.results.segmentation.GetSegmentation().GetNumberOfSegments() == 2
    assert len(logic.results.not_shown) == 1


def test_start_node_refuses_a_missing_checkpoint_before_installing(phantom_scene, scene, tmp_path):
    _, volume, _ = phantom_scene
    logic = make_logic(scene, tmp_path)
    installs, before = [], node_ids(scene)
    for path in ("", str(tmp_path / "missing.safetensors")):
        with pytest.raises(InputError):
            logic.start_node(parameter_node(checkpointPath=path, inputVolume=volume),
                             install=lambda: installs.append("torch"))
    assert installs == [] and node_ids(scene) == before


def test_check_node_inputs_reads_the_dicom_modality(scene, tmp_path):
    logic = make_logic(scene, tmp_path)
    mr_looking = mrml.add_volume_from_array(scene, np.full((8, 8, 8), 300.0, np.float32),
                                            imageio.Geometry.identity((8, 8, 8)), "Series")
    card = {"preprocessing": {"name": "ct-liver", "modality": "CT"}}
    with pytest.raises(InputError, match="Select an input volume"):
        logic.check_node_inputs(parameter_node(), card)

    class Database:  # slicer.dicomDatabase: the file of an instance, a tag of a file
        def fileForInstance(self, uid):  # noqa: N802
            return f"/dicom/{uid}.dcm"

        def fileValue(self, path, tag):  # noqa: N802
            return {("/dicom/1.2.3.dcm", "0008,0060"): "MR"}.get((path, tag), "")

    node = parameter_node(inputVolume=mr_looking)
    (warning,) = logic.check_node_inputs(node, card, Database())  # not from DICOM: the voxel values decide
    assert "has no negative values (range 300 … 300)" in warning
    mr_looking.SetAttribute("DICOM.instanceUIDs", "1.2.3 1.2.4")  # the first instance's Modality tag decides
    assert logic.check_node_inputs(node, card, Database()) == [
        "The model was trained on CT (ct-liver) but the volume's DICOM modality is MR."]


def test_describe_checkpoint_sets_the_node_from_the_card(scene, tmp_path):
    checkpoint = phantom.threshold_checkpoint(tmp_path / "threshold.safetensors")
    logic = make_logic(scene, tmp_path)
    assert logic.describe_checkpoint("") == (None, "No checkpoint selected.")
    card, text = logic.describe_checkpoint(tmp_path / "missing.safetensors")
    assert card is None and text.startswith("Cannot use this checkpoint: ") and "missing.safetensors" in text
    node = parameter_node(threshold=0.9, confidenceThreshold=30.0)
    card, text = logic.describe_checkpoint(str(checkpoint), node)
    assert card == logic.read_model_card(checkpoint) and text == panel.model_card_text(card)
    assert node.threshold == min(max(float(card.get("threshold", 0.5)), 0.05), 0.95)
    assert node.confidenceThreshold == panel.default_confidence(card)
    assert node.threshold != 0.9 or node.confidenceThreshold != 30.0, "the node was not set from the card"


def test_describe_checkpoint_without_pytorch_waits_for_apply(scene):
    class NoTorch:
        def model_card(self, options):
            raise ImportError("No module named 'torch'")

    node = parameter_node(threshold=0.3)
    logic = LesionSegmentationLogic(scene, job_factory=NoTorch())
    assert logic.describe_checkpoint("model.safetensors", node) == (
        {}, "The model card shows once Apply has installed PyTorch.")
    assert node.threshold == 0.3  # nothing read, nothing set


def test_apply_model_card_clamps_the_threshold_to_the_slider():
    node = parameter_node()
    apply_model_card(node, {"threshold": 0.99})
    assert node.threshold == 0.95 and node.confidenceThreshold == pytest.approx(math.log(0.99 / 0.01))  # 4.60
    apply_model_card(node, {"threshold": 0.4})
    assert node.threshold == 0.4 and node.confidenceThreshold == pytest.approx(math.log(0.4 / 0.6))  # -0.41
    apply_model_card(node, {})  # no threshold: 0.5, logit 0
    assert node.threshold == 0.5 and node.confidenceThreshold == 0.0


def test_run_on_node_follows_the_node(scene, tmp_path):
    logic = make_logic(scene, tmp_path)
    logic.run_on_node(parameter_node(runOn="server", serverUrl=" http://127.0.0.1:8000 "))
    assert not logic.runs_locally
    logic.run_on_node(parameter_node())
    assert logic.runs_locally and logic.job_factory == LocalJobFactory(sys.executable, backend_environment(), tmp_path)
    with pytest.raises(InputError, match="run on must be one of"):
        logic.run_on_node(parameter_node(runOn="the cloud"))


def test_export_needs_a_result_then_writes_the_table(phantom_scene, scene, tmp_path):
    case, volume, reference = phantom_scene
    logic = make_logic(scene, tmp_path)
    with pytest.raises(InputError, match="No result to export"):
        logic.export(tmp_path / "lesions.csv")
    logic.load_results(write_outputs(tmp_path, case.reference, case.reference, mrml.volume_geometry(volume)),
                       volume, reference)
    result = logic.export(tmp_path / "lesions.csv")  # not from DICOM: the CSV alone
    lines = result.csv.read_text().splitlines()
    assert len(lines) == 1 + 3  # the header and the phantom's 3 lesions
