"""The local job (IWSegmentationLib.backend.local_run.InferenceRun), tested with real subprocesses.

Each test runs a small fake backend script (Testing/_fake_backend.py) that speaks the JSON-lines
protocol the way ``iwseg predict --progress-format jsonl`` does (events on stdout, logs on stderr,
exit code 0/2/3/other); one test runs the real ``iwseg predict`` on a known-answer checkpoint.
Nothing is mocked.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from _fake_backend import make_launched_run, make_run, posix_only, start_tree, write_dummy_input

from IWSegmentationLib.backend.job import BackendError, Outcome, SegmentationJob, describe_exit_code
from IWSegmentationLib.backend.local_run import InferenceRun, LocalJobFactory
from IWSegmentationLib.backend.process_tree import pid_alive
from IWSegmentationLib.core.errors import InputError
from IWSegmentationLib.predict.options import PredictOptions


def test_relative_paths_become_absolute_for_the_backend(fake_checkpoint, tmp_path, monkeypatch):
    # the backend runs inside its working folder, so a relative path would point elsewhere
    monkeypatch.chdir(fake_checkpoint.parent)
    run = InferenceRun(PredictOptions(models=(Path(fake_checkpoint.name),)), workdir_parent=".")
    try:
        command = run.command
        assert command[command.index("--model") + 1] == str(fake_checkpoint.resolve())
        assert run.workdir.is_absolute() and Path(command[command.index("--input") + 1]).is_absolute()
    finally:
        run.discard()


def test_missing_checkpoint_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(InputError, match="checkpoint not found"):
        InferenceRun(PredictOptions(models=(tmp_path / "missing.safetensors",)), workdir_parent=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no working folder was created


def test_inference_run_fulfils_the_job_protocol(fake_checkpoint, tmp_path):
    factory = LocalJobFactory(python="/opt/slicer/bin/PythonSlicer", env={"X": "1"}, workdir_parent=tmp_path)
    run = factory(PredictOptions(models=(fake_checkpoint,)), loader=lambda outputs: outputs)
    try:
        assert isinstance(run, SegmentationJob)
        assert run.command[:3] == ["/opt/slicer/bin/PythonSlicer", "-m", "IWSegmentationLib"]
        assert run.env == {"X": "1"} and run.workdir.parent == tmp_path.resolve()
    finally:
        run.close()
    assert not isinstance(object(), SegmentationJob)



# ---------------------------------------------------------------------------- real runs


def test_successful_run_delivers_events_in_order_and_removes_the_folder(fake_backend, fake_checkpoint, tmp_path):
    events, logs, finished = [], [], []
    seen_outputs = {}

    def loader(outputs):
        # the outputs still exist while the loader runs; what it returns is kept
        seen_outputs.update({k: p.read_text() for k, p in outputs.items()})
        return "loaded into the scene"

    run = make_run(fake_backend, fake_checkpoint, tmp_path, "ok", loader=loader)
    workdir = run.workdir
    run.progress.connect(events.append)
    run.log.connect(logs.append)
    run.finished.connect(finished.append)
    result = run.run_blocking(write_input=write_dummy_input, timeout=60)

    assert result.outcome is Outcome.OK and result.ok and result.exit_code == 0
    assert [e.stage for e in events] == [
        "start", "load", "inference", "inference", "inference", "inference",
        "postprocess", "write", "case_done", "done",
    ]
    assert [e.get("done") for e in events if e.stage == "inference"] == [1, 2, 3, 4]
    assert events[-2].get("lesions") == 3
    assert "a stray line from some library" in logs and "loading the checkpoint" in logs
    assert seen_outputs == {"mask": "--output", "probabilities": "--probabilities", "lesions": "--lesions"}
    assert result.loaded == result.loaded_or_raise() == "loaded into the scene"
    assert finished == [result]
    assert result.workdir is None and run.workdir is None and not workdir.exists()
    assert result.outputs == {}


def test_organ_mask_is_written_and_passed(fake_backend, fake_checkpoint, tmp_path):
    run = make_run(fake_backend, fake_checkpoint, tmp_path, "ok")
    logs = []
    run.log.connect(logs.append)
    result = run.run_blocking(write_input=write_dummy_input,
                              write_organ_mask=lambda path: path.write_text("lungs"))
    assert result.ok and "organ mask says lungs" in logs


def test_bad_input_exit_code_2_keeps_the_folder_and_reports_the_message(fake_backend, fake_checkpoint, tmp_path):
    run = make_run(fake_backend, fake_checkpoint, tmp_path, "bad_input")
    result = run.run_blocking(write_input=write_dummy_input, timeout=60)
    assert result.outcome is Outcome.BAD_INPUT and result.exit_code == 2
    assert result.message == "input volume input.nrrd is 2D; a 3D volume is needed"  # from the error event
    assert result.workdir is not None and (result.workdir / "input.nrrd").is_file()
    report = result.report()
    assert str(result.workdir) in report and "iwseg predict: error:" in report


def test_exit_code_3_is_a_cancel_and_removes_the_folder(fake_backend, fake_checkpoint, tmp_path):
    run = make_run(fake_backend, fake_checkpoint, tmp_path, "exit3")
    workdir = run.workdir
    result = run.run_blocking(write_input=write_dummy_input, timeout=60)
    assert result.outcome is Outcome.CANCELLED and result.exit_code == 3
    assert result.workdir is None and not workdir.exists()


def test_crash_keeps_the_folder_and_the_last_stderr_lines(fake_backend, fake_checkpoint, tmp_path):
    run = make_run(fake_backend, fake_checkpoint, tmp_path, "crash", stderr_lines=10)
    result = run.run_blocking(write_input=write_dummy_input, timeout=60)
    assert result.outcome is Outcome.FAILED and result.exit_code == 1
    # 100 log lines + a traceback went to stderr; only the last 10 are kept
    assert len(result.stderr_tail) == 10
    assert result.stderr_tail[-1] == "RuntimeError: CUDA exploded"
    assert "log line 0" not in "\n".join(result.stderr_tail)
    assert result.message == "the backend exited with code 1: RuntimeError: CUDA exploded"
    assert result.workdir.is_dir() and str(result.workdir) in result.report()
    with pytest.raises(BackendError, match=r"(?s)code 1: RuntimeError: CUDA exploded.*working folder was kept"):
        result.loaded_or_raise()  # the blocking mode's ending: the whole report, not just "failed"


@posix_only
def test_killed_backend_is_a_failure_that_mentions_memory(fake_backend, fake_checkpoint, tmp_path):
    result = make_run(fake_backend, fake_checkpoint, tmp_path, "sigkill").run_blocking(write_input=write_dummy_input)
    assert result.outcome is Outcome.FAILED and result.exit_code == -signal.SIGKILL
    assert "SIGKILL" in result.message and "memory" in result.message


@posix_only
def test_a_backend_killed_behind_the_launcher_gets_the_memory_hint(fake_backend, fake_checkpoint, tmp_path):
    run = make_launched_run(fake_backend, fake_checkpoint, tmp_path, "sigkill")
    result = run.run_blocking(write_input=write_dummy_input, timeout=60)
    assert result.exit_code == 1  # the launcher's code: the SIGKILL of its child is not visible to us
    assert result.outcome is Outcome.FAILED
    assert "out of memory" in result.message, result.message


def test_a_crash_with_a_traceback_gets_no_memory_hint(fake_backend, fake_checkpoint, tmp_path):
    result = make_run(fake_backend, fake_checkpoint, tmp_path, "crash").run_blocking(write_input=write_dummy_input)
    assert result.exit_code == 1 and "out of memory" not in result.message
    assert "out of memory" in describe_exit_code(1, silent=True)
    assert "out of memory" not in describe_exit_code(1) and "out of memory" not in describe_exit_code(2, silent=True)


def test_exit_0_without_outputs_is_a_failure(fake_backend, fake_checkpoint, tmp_path):
    result = make_run(fake_backend, fake_checkpoint, tmp_path, "no_output").run_blocking(write_input=write_dummy_input)
    assert result.outcome is Outcome.FAILED
    assert "did not write" in result.message and "mask.nrrd" in result.message
    assert result.workdir.is_dir()


def test_a_failing_loader_fails_the_run_and_keeps_the_folder(fake_backend, fake_checkpoint, tmp_path):
    def loader(outputs):
        raise ValueError("mask does not fit the volume")

    result = make_run(fake_backend, fake_checkpoint, tmp_path, "ok", loader=loader).run_blocking(write_input=write_dummy_input)
    assert result.outcome is Outcome.FAILED
    assert result.message == "reading the backend's results failed: ValueError: mask does not fit the volume"
    assert (result.workdir / "mask.nrrd").is_file() and result.outputs["mask"] == result.workdir / "mask.nrrd"


def test_failing_input_writer_removes_the_folder_and_runs_nothing(fake_backend, fake_checkpoint, tmp_path):
    run = make_run(fake_backend, fake_checkpoint, tmp_path, "ok")
    workdir = run.workdir

    def writer(path):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        run.start(write_input=writer)
    assert not workdir.exists() and run.backend is None


def test_missing_interpreter_is_a_clear_error(fake_checkpoint, tmp_path):
    run = InferenceRun(PredictOptions(models=(fake_checkpoint,)), command_prefix=[str(tmp_path / "no-such-python")],
                       workdir_parent=tmp_path)
    workdir = run.workdir
    with pytest.raises(BackendError, match="cannot start the backend"):
        run.start(write_input=write_dummy_input)
    assert not workdir.exists()


def test_run_blocking_timeout_cancels(fake_backend, fake_checkpoint, tmp_path):
    run = make_run(fake_backend, fake_checkpoint, tmp_path, "tree", cancel_grace_s=0.2)
    result = run.run_blocking(write_input=write_dummy_input, timeout=1.5)
    assert result.outcome is Outcome.CANCELLED
    assert "did not finish within 1.5 s" in result.message



# ---------------------------------------------------------------------------- close (Slicer exiting)


@posix_only
def test_close_kills_the_tree_and_removes_the_input_copy(fake_backend, fake_checkpoint, tmp_path):
    run, (child, grandchild) = start_tree(fake_backend, fake_checkpoint, tmp_path, "tree")
    backend, workdir = run.backend.pid, run.workdir
    assert (workdir / InferenceRun.INPUT_NAME).is_file()
    run.close()
    assert not workdir.exists(), "the patient's input volume was left in the temporary folder"
    deadline = time.monotonic() + 5
    while any(map(pid_alive, (backend, child, grandchild))) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(pid_alive, (backend, child, grandchild)))
    run.close()  # twice is fine


def test_close_of_a_finished_or_unstarted_run_removes_its_folder(fake_backend, fake_checkpoint, tmp_path):
    run = make_run(fake_backend, fake_checkpoint, tmp_path, "bad_input")
    result = run.run_blocking(write_input=write_dummy_input)
    assert result.workdir.is_dir()  # kept after a failure for inspection ...
    run.close()
    assert not result.workdir.exists()  # ... until the module closes
    fresh = make_run(fake_backend, fake_checkpoint, tmp_path, "ok")
    folder = fresh.workdir
    fresh.close()
    assert not folder.exists()



# ---------------------------------------------------------------------------- the real backend


@pytest.mark.slow
def test_real_backend_end_to_end_with_a_known_answer(tmp_path):
    """``python -m IWSegmentationLib predict`` through InferenceRun, on the hand-wired phantom model.

    The model is pointwise, logit = 20 (x - 0.5) of the preprocessed input (phantom.py), so
    the backend must return the phantom's reference mask exactly, on the input's oblique and
    anisotropic grid, with the lesion JSON's sizes and confidences that follow from it.
    """
    np = pytest.importorskip("numpy")
    pytest.importorskip("torch")
    from IWSegmentationLib.core import imageio
    from IWSegmentationLib.testing import phantom

    case = phantom.phantom_case(spacing=(1.5, 0.9, 0.8))
    model_path = phantom.threshold_checkpoint(tmp_path / "threshold.safetensors")
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    geometry = imageio.Geometry(size=case.image.shape[::-1], spacing=case.spacing[::-1], origin=(10.0, -5.0, 3.0),
                                direction=(c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    source = imageio.write_image(tmp_path / "volume.nrrd", case.image, geometry)

    def loader(outputs):
        mask, mask_geometry = imageio.read_image(outputs["mask"])
        prob, prob_geometry = imageio.read_image(outputs["probabilities"])
        table = json.loads(outputs["lesions"].read_text())
        return mask, mask_geometry, prob, prob_geometry, table

    stages = []
    run = InferenceRun(PredictOptions(models=(model_path,), device="cpu", overlap=0.25), workdir_parent=tmp_path,
                       loader=loader)
    run.progress.connect(lambda e: stages.append(e.stage))
    result = run.run_blocking(write_input=lambda path: path.write_bytes(source.read_bytes()), timeout=300)

    assert result.outcome is Outcome.OK, result.report()
    assert stages[0] == "start" and stages[-1] == "done" and "inference" in stages
    mask, mask_geometry, prob, prob_geometry, table = result.loaded
    assert mask_geometry.differences(geometry) == [] and prob_geometry.differences(geometry) == []
    assert np.array_equal(mask, case.reference)
    assert prob.dtype == np.float32 and prob.min() >= 0.0 and prob.max() <= 1.0
    # lesions of intensity 70, 85, 100 (of 100): confidence (maximum logit) 20 (v/100 - 0.5) = 4, 7, 10
    found = sorted((row["size_group"], row["confidence"]) for row in table["lesions"])
    expected = sorted(zip(("small", "medium", "large"), case.confidences()))
    assert [g for g, _ in found] == [g for g, _ in expected]
    assert np.allclose([c for _, c in found], [c for _, c in expected], atol=1e-3)
    assert result.workdir is None  # success: the working folder is gone

