"""The backend process wrapper (IWSegmentationLib.backend.process), tested with real subprocesses.

Each test writes a small fake backend script that speaks the JSON-lines protocol the way
``iwseg predict --progress-format jsonl`` does (events on stdout, logs on stderr, exit code
0/2/3/other), spawns child and grandchild processes, sleeps or crashes. Nothing is mocked:
the wrapper starts real process groups, reads real pipes and kills real process trees.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from IWSegmentationLib.backend.process import (
    BackendError,
    BackendProcess,
    DeviceProbe,
    InferenceRun,
    LocalJobFactory,
    Outcome,
    PredictParameters,
    ProcessIdentity,
    SegmentationJob,
    Signal,
    backend_environment,
    default_command_prefix,
    descendant_pids,
    describe_exit_code,
    is_same_process,
    no_console_window,
    outcome_for_exit_code,
    pid_alive,
    process_identity,
    signal_if_unchanged,
    write_known_answer_checkpoint,
)
from IWSegmentationLib.core.errors import InputError

posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX process groups and signals")

# The fake backend. It is called like the real one: ``fake.py predict --model M --input I
# --output O [--probabilities P] [--lesions L] ... --progress-format jsonl``; FAKE_MODE picks
# what it does. It imports nothing from this project, so a test failure is the wrapper's.
FAKE_BACKEND = textwrap.dedent(
    r'''
    import json, os, signal, subprocess, sys, time

    def emit(stage, **data):
        sys.stdout.write(json.dumps({"stage": stage, **data}) + "\n")
        sys.stdout.flush()

    def option(name):
        args = sys.argv[1:]
        return args[args.index(name) + 1] if name in args else None

    mode = os.environ.get("FAKE_MODE", "ok")
    assert sys.argv[1] == "predict", sys.argv
    assert option("--progress-format") == "jsonl", sys.argv
    emit("start", version="fake", cases=1, device="cpu")

    if mode == "ok":
        print("a stray line from some library", flush=True)  # not an event: must become a log line
        if option("--organ-mask"):
            with open(option("--organ-mask")) as f:
                print(f"organ mask says {f.read()}", file=sys.stderr, flush=True)
        print("loading the checkpoint", file=sys.stderr, flush=True)
        emit("load", case="input", message="checkpoint")
        for done in range(1, 5):
            time.sleep(0.02)
            emit("inference", case="input", done=done, total=4, eta_s=0.02 * (4 - done))
        emit("postprocess", case="input")
        outputs = {}
        for key in ("--output", "--probabilities", "--lesions"):
            path = option(key)
            if path:
                with open(path, "w") as f:
                    f.write(key)
                outputs[key.strip("-")] = path
        emit("write", case="input", path=option("--output"))
        emit("case_done", case="input", outputs=outputs, lesions=3, seconds=0.1)
        emit("done", seconds=0.1, cases=1)
        sys.exit(0)

    if mode == "orphan":
        # leaves a sleeping child behind and exits successfully
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        emit("load", case="input", message="orphan", pids=[child.pid])
        for key in ("--output", "--probabilities", "--lesions"):
            with open(option(key), "w") as f:
                f.write(key)
        emit("done", seconds=0.0, cases=1)
        sys.exit(0)

    if mode == "no_output":
        emit("done", seconds=0.0, cases=1)
        sys.exit(0)

    if mode == "bad_input":
        emit("error", message="input volume input.nrrd is 2D; a 3D volume is needed", exit_code=2)
        print("iwseg predict: error: input volume input.nrrd is 2D; a 3D volume is needed", file=sys.stderr)
        sys.exit(2)

    if mode == "exit3":
        print("iwseg predict: cancelled", file=sys.stderr)
        sys.exit(3)

    if mode == "crash":
        for i in range(100):
            print(f"log line {i}", file=sys.stderr)
        sys.stderr.flush()
        raise RuntimeError("CUDA exploded")

    if mode == "sigkill":
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    if mode == "graceful_slow":
        # like the real backend: on SIGTERM it takes a while to remove its partial outputs
        def on_slow_term(signum, frame):
            time.sleep(1.0)
            with open(os.environ["FAKE_MARKER"], "w") as f:
                f.write("cleaned up")
            os._exit(3)
        signal.signal(signal.SIGTERM, on_slow_term)
        emit("load", case="input", message="slow", pids=[os.getpid()])
        while True:
            time.sleep(0.05)

    if mode in ("tree", "tree_detached", "ignore_term", "graceful_term"):
        detached = mode == "tree_detached"
        child_code = (
            "import subprocess, sys, time\n"
            f"g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session={detached})\n"
            "print(g.pid, flush=True)\n"
            "time.sleep(120)\n"
        )
        child = subprocess.Popen([sys.executable, "-c", child_code], stdout=subprocess.PIPE, text=True)
        grandchild = int(child.stdout.readline())
        if mode == "ignore_term":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if mode == "graceful_term":
            def on_term(signum, frame):
                print("iwseg predict: cancelled", file=sys.stderr, flush=True)
                os._exit(3)
            signal.signal(signal.SIGTERM, on_term)
        emit("load", case="input", message="tree", pids=[child.pid, grandchild])
        done = 0
        while True:
            done += 1
            emit("inference", case="input", done=done, total=10**6, eta_s=None)
            time.sleep(0.05)
    '''
)


@pytest.fixture
def fake_backend(tmp_path) -> Path:
    script = tmp_path / "fake_backend.py"
    script.write_text(FAKE_BACKEND)
    return script


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not read by the fake backend")
    return path


def fake_env(mode: str) -> dict[str, str]:
    env = backend_environment()
    env["FAKE_MODE"] = mode
    return env


def make_run(fake_backend, checkpoint, tmp_path, mode, **kwargs) -> InferenceRun:
    work_parent = tmp_path / "runs"
    work_parent.mkdir(exist_ok=True)
    return InferenceRun(
        PredictParameters(checkpoint, device="cpu", overlap=0.25),
        command_prefix=[sys.executable, str(fake_backend)],
        env=fake_env(mode),
        workdir_parent=work_parent,
        **kwargs,
    )


def write_dummy_input(path: Path) -> None:
    path.write_bytes(b"NRRD0004\n")


def wait_for(predicate, run, timeout=20.0):
    """Poll ``run`` (delivering its signals) until ``predicate()`` is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert run.poll(), "the backend finished before the condition was met"
        assert time.monotonic() < deadline, "timed out waiting for the backend"
        time.sleep(0.02)


# ---------------------------------------------------------------------------- pure helpers


def test_outcome_for_exit_code_follows_the_protocol():
    # 0 success, 2 bad input, 3 cancelled, anything else a failure (progress.py docstring)
    assert outcome_for_exit_code(0) is Outcome.OK
    assert outcome_for_exit_code(2) is Outcome.BAD_INPUT
    assert outcome_for_exit_code(3) is Outcome.CANCELLED
    for code in (1, 4, 137, -9, -11, None):
        assert outcome_for_exit_code(code) is Outcome.FAILED
    # our own cancel wins over whatever code the killed process had
    for code in (0, 1, -9, -15):
        assert outcome_for_exit_code(code, cancel_requested=True) is Outcome.CANCELLED


@posix_only
def test_describe_exit_code_names_signals_and_memory():
    assert describe_exit_code(1) == "the backend exited with code 1"
    text = describe_exit_code(-signal.SIGKILL)
    assert "SIGKILL" in text and "memory" in text
    assert "SIGSEGV" in describe_exit_code(-signal.SIGSEGV)


def test_signal_calls_slots_in_order_and_disconnects():
    calls = []
    sig = Signal()
    first, second = (lambda x: calls.append(("a", x))), (lambda x: calls.append(("b", x)))
    sig.connect(first)
    sig.connect(second)
    sig.emit(1)
    sig.disconnect(first)
    sig(2)
    assert calls == [("a", 1), ("b", 1), ("b", 2)]
    with pytest.raises(TypeError):
        sig.connect(42)


def test_predict_arguments_are_the_cli_contract(tmp_path, checkpoint):
    params = PredictParameters(checkpoint, device="cuda", overlap=0.25, threshold=0.4)
    outputs = {"mask": tmp_path / "m.nrrd", "probabilities": tmp_path / "p.nrrd", "lesions": tmp_path / "l.json"}
    assert params.arguments(tmp_path / "in.nrrd", outputs, tmp_path / "organ.nrrd") == [
        "predict", "--model", str(checkpoint.resolve()), "--input", str(tmp_path / "in.nrrd"),
        "--output", str(tmp_path / "m.nrrd"), "--device", "cuda", "--progress-format", "jsonl",
        "--overwrite", "--probabilities", str(tmp_path / "p.nrrd"), "--lesions", str(tmp_path / "l.json"),
        "--organ-mask", str(tmp_path / "organ.nrrd"), "--overlap", "0.25", "--threshold", "0.4",
    ]
    # no overlap/threshold: the checkpoint's own are used, so the options are left out
    args = PredictParameters(checkpoint).arguments(tmp_path / "in.nrrd", {"mask": tmp_path / "m.nrrd"})
    assert args == ["predict", "--model", str(checkpoint.resolve()), "--input", str(tmp_path / "in.nrrd"),
                    "--output", str(tmp_path / "m.nrrd"), "--device", "auto", "--progress-format", "jsonl",
                    "--overwrite"]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"device": "tpu"}, "device"),
        ({"overlap": 1.0}, "overlap"),
        ({"overlap": -0.1}, "overlap"),
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
    ],
)
def test_predict_parameters_name_the_bad_parameter(checkpoint, change, needle):
    params = PredictParameters(checkpoint, **change)
    with pytest.raises(InputError, match=needle):
        params.validate()


def test_relative_paths_become_absolute_for_the_backend(checkpoint, tmp_path, monkeypatch):
    # the backend runs inside its working folder, so a relative path would point elsewhere
    monkeypatch.chdir(checkpoint.parent)
    run = InferenceRun(PredictParameters(Path(checkpoint.name)), workdir_parent=".")
    try:
        command = run.command
        assert command[command.index("--model") + 1] == str(checkpoint.resolve())
        assert run.workdir.is_absolute() and Path(command[command.index("--input") + 1]).is_absolute()
    finally:
        run.discard()


def test_missing_checkpoint_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(InputError, match="checkpoint not found"):
        InferenceRun(PredictParameters(tmp_path / "missing.safetensors"), workdir_parent=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no working folder was created


def test_backend_environment_makes_the_package_importable():
    env = backend_environment({"PYTHONPATH": "/somewhere/else"})
    package_parent = str(Path(__import__("IWSegmentationLib").__file__).resolve().parent.parent)
    assert env["PYTHONPATH"].split(os.pathsep) == [package_parent, "/somewhere/else"]
    assert env["PYTHONUNBUFFERED"] == "1"
    assert default_command_prefix("/opt/Slicer/bin/PythonSlicer") == [
        "/opt/Slicer/bin/PythonSlicer", "-m", "IWSegmentationLib",
    ]


# ---------------------------------------------------------------------------- real runs


def test_successful_run_delivers_events_in_order_and_removes_the_folder(fake_backend, checkpoint, tmp_path):
    events, logs, finished = [], [], []
    seen_outputs = {}

    def loader(outputs):
        # the outputs still exist while the loader runs; what it returns is kept
        seen_outputs.update({k: p.read_text() for k, p in outputs.items()})
        return "loaded into the scene"

    run = make_run(fake_backend, checkpoint, tmp_path, "ok", loader=loader)
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


def test_organ_mask_is_written_and_passed(fake_backend, checkpoint, tmp_path):
    run = make_run(fake_backend, checkpoint, tmp_path, "ok")
    logs = []
    run.log.connect(logs.append)
    result = run.run_blocking(write_input=write_dummy_input,
                              write_organ_mask=lambda path: path.write_text("lungs"))
    assert result.ok and "organ mask says lungs" in logs


def test_bad_input_exit_code_2_keeps_the_folder_and_reports_the_message(fake_backend, checkpoint, tmp_path):
    run = make_run(fake_backend, checkpoint, tmp_path, "bad_input")
    result = run.run_blocking(write_input=write_dummy_input, timeout=60)
    assert result.outcome is Outcome.BAD_INPUT and result.exit_code == 2
    assert result.message == "input volume input.nrrd is 2D; a 3D volume is needed"  # from the error event
    assert result.workdir is not None and (result.workdir / "input.nrrd").is_file()
    report = result.report()
    assert str(result.workdir) in report and "iwseg predict: error:" in report


def test_exit_code_3_is_a_cancel_and_removes_the_folder(fake_backend, checkpoint, tmp_path):
    run = make_run(fake_backend, checkpoint, tmp_path, "exit3")
    workdir = run.workdir
    result = run.run_blocking(write_input=write_dummy_input, timeout=60)
    assert result.outcome is Outcome.CANCELLED and result.exit_code == 3
    assert result.workdir is None and not workdir.exists()


def test_crash_keeps_the_folder_and_the_last_stderr_lines(fake_backend, checkpoint, tmp_path):
    run = make_run(fake_backend, checkpoint, tmp_path, "crash", stderr_lines=10)
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
def test_killed_backend_is_a_failure_that_mentions_memory(fake_backend, checkpoint, tmp_path):
    result = make_run(fake_backend, checkpoint, tmp_path, "sigkill").run_blocking(write_input=write_dummy_input)
    assert result.outcome is Outcome.FAILED and result.exit_code == -signal.SIGKILL
    assert "SIGKILL" in result.message and "memory" in result.message


def test_exit_0_without_outputs_is_a_failure(fake_backend, checkpoint, tmp_path):
    result = make_run(fake_backend, checkpoint, tmp_path, "no_output").run_blocking(write_input=write_dummy_input)
    assert result.outcome is Outcome.FAILED
    assert "did not write" in result.message and "mask.nrrd" in result.message
    assert result.workdir.is_dir()


def test_a_failing_loader_fails_the_run_and_keeps_the_folder(fake_backend, checkpoint, tmp_path):
    def loader(outputs):
        raise ValueError("mask does not fit the volume")

    result = make_run(fake_backend, checkpoint, tmp_path, "ok", loader=loader).run_blocking(write_input=write_dummy_input)
    assert result.outcome is Outcome.FAILED
    assert result.message == "reading the backend's results failed: ValueError: mask does not fit the volume"
    assert (result.workdir / "mask.nrrd").is_file() and result.outputs["mask"] == result.workdir / "mask.nrrd"


def test_failing_input_writer_removes_the_folder_and_runs_nothing(fake_backend, checkpoint, tmp_path):
    run = make_run(fake_backend, checkpoint, tmp_path, "ok")
    workdir = run.workdir

    def writer(path):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        run.start(write_input=writer)
    assert not workdir.exists() and run.backend is None


def test_missing_interpreter_is_a_clear_error(checkpoint, tmp_path):
    run = InferenceRun(PredictParameters(checkpoint), command_prefix=[str(tmp_path / "no-such-python")],
                       workdir_parent=tmp_path)
    workdir = run.workdir
    with pytest.raises(BackendError, match="cannot start the backend"):
        run.start(write_input=write_dummy_input)
    assert not workdir.exists()


# ---------------------------------------------------------------------------- cancel and process trees


def start_tree(fake_backend, checkpoint, tmp_path, mode, grace=0.5):
    run = make_run(fake_backend, checkpoint, tmp_path, mode, cancel_grace_s=grace)
    pids = []
    run.progress.connect(lambda e: pids.extend(e.get("pids") or []))
    run.start(write_input=write_dummy_input)
    wait_for(lambda: len(pids) == 2, run)
    return run, pids


@posix_only
@pytest.mark.parametrize("mode", ["tree", "tree_detached"])
def test_cancel_kills_child_and_grandchild(fake_backend, checkpoint, tmp_path, mode):
    run, (child, grandchild) = start_tree(fake_backend, checkpoint, tmp_path, mode)
    backend_pid = run.backend.pid
    assert pid_alive(child) and pid_alive(grandchild)
    assert {child, grandchild} <= set(descendant_pids(backend_pid))
    workdir = run.workdir
    run.cancel()
    run.backend.wait(timeout=30)
    result = run.result
    assert result.outcome is Outcome.CANCELLED
    # the grandchild of "tree_detached" started its own session: only the descendant scan reaches it
    deadline = time.monotonic() + 5
    while any(map(pid_alive, (backend_pid, child, grandchild))) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(backend_pid)
    assert not pid_alive(child), "child process survived the cancel"
    assert not pid_alive(grandchild), "grandchild process survived the cancel"
    assert result.workdir is None and not workdir.exists()


@posix_only
def test_cancel_escalates_to_kill_when_sigterm_is_ignored(fake_backend, checkpoint, tmp_path):
    run, (child, grandchild) = start_tree(fake_backend, checkpoint, tmp_path, "ignore_term", grace=0.3)
    t0 = time.monotonic()
    run.cancel()
    assert run.running  # cancel returns at once; the GUI keeps polling
    code = run.backend.wait(timeout=30)
    assert code == -signal.SIGKILL  # SIGTERM was ignored, so the tree got SIGKILL after the grace
    assert time.monotonic() - t0 >= 0.3
    assert run.result.outcome is Outcome.CANCELLED
    assert not pid_alive(child) and not pid_alive(grandchild)


@posix_only
def test_cancel_lets_a_cooperative_backend_exit_with_code_3(fake_backend, checkpoint, tmp_path):
    run, (child, grandchild) = start_tree(fake_backend, checkpoint, tmp_path, "graceful_term", grace=20)
    t0 = time.monotonic()
    run.cancel()
    code = run.backend.wait(timeout=30)
    assert code == 3 and time.monotonic() - t0 < 10  # exited by itself, long before the grace ended
    assert run.result.outcome is Outcome.CANCELLED
    assert "iwseg predict: cancelled" in run.result.stderr_tail
    # its children did not handle SIGTERM themselves... but the group got it, and the exit kills the rest
    time.sleep(0.2)
    assert not pid_alive(child) and not pid_alive(grandchild)


@posix_only
def test_no_orphan_survives_a_successful_run(fake_backend, checkpoint, tmp_path):
    run = make_run(fake_backend, checkpoint, tmp_path, "orphan")
    pids = []
    run.progress.connect(lambda e: pids.extend(e.get("pids") or []))
    t0 = time.monotonic()
    result = run.run_blocking(write_input=write_dummy_input, timeout=60)
    assert result.outcome is Outcome.OK and len(pids) == 1
    assert time.monotonic() - t0 < 10  # the leftover held our pipes; it was killed, not waited for
    assert not pid_alive(pids[0]), "a child left behind by the backend survived"


def test_run_blocking_timeout_cancels(fake_backend, checkpoint, tmp_path):
    run = make_run(fake_backend, checkpoint, tmp_path, "tree", cancel_grace_s=0.2)
    result = run.run_blocking(write_input=write_dummy_input, timeout=1.5)
    assert result.outcome is Outcome.CANCELLED
    assert "did not finish within 1.5 s" in result.message


def test_backend_process_rejects_bad_arguments():
    with pytest.raises(InputError, match="command"):
        BackendProcess("python -m x")
    with pytest.raises(InputError, match="stderr_lines"):
        BackendProcess(["x"], stderr_lines=0)
    with pytest.raises(RuntimeError, match="before start"):
        BackendProcess([sys.executable]).poll()


def test_backend_process_alone_reports_events_and_exit(tmp_path):
    script = tmp_path / "tiny.py"
    script.write_text(
        "import json, sys\n"
        "print(json.dumps({'stage': 'warning', 'message': 'CUDA out of memory, retrying'}), flush=True)\n"
        "print('{not json', flush=True)\n"
        "print(json.dumps({'stage': 'done', 'seconds': 0, 'cases': 1}), flush=True)\n"
        "sys.exit(5)\n"
    )
    proc = BackendProcess([sys.executable, str(script)])
    events, logs, codes = [], [], []
    proc.event.connect(events.append)
    proc.log.connect(logs.append)
    proc.finished.connect(codes.append)
    proc.start()
    assert proc.wait(timeout=30) == 5
    assert [(e.stage, e.data) for e in events] == [
        ("warning", {"message": "CUDA out of memory, retrying"}), ("done", {"seconds": 0, "cases": 1}),
    ]
    assert logs == ["{not json"] and codes == [5]
    assert proc.last_event.stage == "done" and not proc.poll()
    with pytest.raises(RuntimeError, match="already started"):
        proc.start()


# ---------------------------------------------------------------------------- device probe


def _fake_torch(folder: Path, body: str) -> dict[str, str]:
    folder.mkdir()
    (folder / "torch.py").write_text(textwrap.dedent(body))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(folder)
    return env


def test_device_probe_reports_cuda_memory_from_a_child(tmp_path):
    env = _fake_torch(tmp_path / "fake", """
        __version__ = "9.9.9+cu999"
        class cuda:
            is_available = staticmethod(lambda: True)
            device_count = staticmethod(lambda: 1)
            get_device_name = staticmethod(lambda i: "Fake GPU")
            mem_get_info = staticmethod(lambda i: (3 * 2**30, 8 * 2**30))
        class backends:
            mps = None
    """)
    info = DeviceProbe(sys.executable, env=env).run_blocking()
    assert info == {
        "torch": "9.9.9+cu999", "mps": False, "error": None,
        "cuda": [{"index": 0, "name": "Fake GPU", "free_mb": 3072, "total_mb": 8192}],
    }


def test_device_probe_without_torch_says_so(tmp_path):
    env = _fake_torch(tmp_path / "fake", "raise ImportError('No module named torch (fake)')")
    info = DeviceProbe(sys.executable, env=env).run_blocking()
    assert info["torch"] is None and info["cuda"] == [] and "No module named torch" in info["error"]


def test_device_probe_with_a_missing_interpreter(tmp_path):
    info = DeviceProbe(tmp_path / "no-python").run_blocking()
    assert info["torch"] is None and "cannot run" in info["error"]


def test_device_probe_parses_only_its_json_line():
    info = DeviceProbe._parse("noise\n" + json.dumps({"torch": "2.0", "cuda": []}) + "\n", "", 0)
    assert info == {"torch": "2.0", "cuda": [], "mps": False, "error": None}
    assert DeviceProbe._parse("", "Segmentation fault\n", -11)["error"] == "Segmentation fault"


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
    run = InferenceRun(PredictParameters(model_path, device="cpu", overlap=0.25), workdir_parent=tmp_path,
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


# ---------------------------------------------------------------------------- the known-answer model


def test_threshold_model_is_the_pointwise_function_it_claims():
    torch = pytest.importorskip("torch")
    np = pytest.importorskip("numpy")
    from IWSegmentationLib.testing import phantom

    model = phantom.threshold_model(gain=20.0, level=0.5)
    x = torch.rand(1, 1, 20, 27, 33, generator=torch.Generator().manual_seed(0))  # odd sizes: padded and cropped
    with torch.no_grad():
        logits = model(x)
    # logit = 20 (x - 0.5), up to BatchNorm's eps: three BN layers scale by (1 + 1e-5)^-1/2 each
    assert logits.shape == x.shape
    assert np.abs((logits - 20.0 * (x - 0.5)).numpy()).max() < 1e-3


def test_phantom_case_geometry_and_refusals():
    np = pytest.importorskip("numpy")
    from IWSegmentationLib.testing import phantom

    case = phantom.phantom_case(spacing=(2.0, 1.0, 1.0))
    assert case.image.shape == case.reference.shape == (32, 48, 48) and case.spacing == (2.0, 1.0, 1.0)
    assert set(np.unique(case.image[case.reference > 0])) == {70.0, 85.0, 100.0}
    assert case.image.dtype == np.float32 and case.reference.dtype == np.uint8
    # maximum logits 20 (v/100 - 0.5) for v = 70, 85, 100
    assert case.confidences() == pytest.approx([4.0, 7.0, 10.0])
    with pytest.raises(InputError, match="overlaps"):
        phantom.phantom_case(lesions=[(16, 24, 24, 4.0, 100.0), (16, 26, 24, 4.0, 90.0)])
    with pytest.raises(InputError, match="0.5%"):
        phantom.phantom_case(lesions=[(16, 24, 24, 1.0, 100.0)])
    with pytest.raises(InputError, match="shape"):
        phantom.phantom_case(shape=(4, 48, 48))


# ---------------------------------------------------------------------------- behind the PythonSlicer launcher

# Slicer's PythonSlicer is a launcher (CTK AppLauncher): it starts the real interpreter as its
# child, dies at once on SIGTERM (no handler), and reports a child killed by a signal as exit
# code 1. This stand-in does the same, so the tests below see what the module sees in Slicer.
FAKE_LAUNCHER = textwrap.dedent(
    """
    import subprocess, sys
    child = subprocess.Popen([sys.executable] + sys.argv[1:])
    code = child.wait()
    sys.exit(1 if code < 0 else code)
    """
)


def make_launched_run(fake_backend, checkpoint, tmp_path, mode, **kwargs) -> InferenceRun:
    launcher = tmp_path / "fake_launcher.py"
    launcher.write_text(FAKE_LAUNCHER)
    run = make_run(fake_backend, checkpoint, tmp_path, mode, **kwargs)
    run.command_prefix = [sys.executable, str(launcher), str(fake_backend)]
    return run


@posix_only
def test_a_backend_killed_behind_the_launcher_gets_the_memory_hint(fake_backend, checkpoint, tmp_path):
    run = make_launched_run(fake_backend, checkpoint, tmp_path, "sigkill")
    result = run.run_blocking(write_input=write_dummy_input, timeout=60)
    assert result.exit_code == 1  # the launcher's code: the SIGKILL of its child is not visible to us
    assert result.outcome is Outcome.FAILED
    assert "out of memory" in result.message, result.message


def test_a_crash_with_a_traceback_gets_no_memory_hint(fake_backend, checkpoint, tmp_path):
    result = make_run(fake_backend, checkpoint, tmp_path, "crash").run_blocking(write_input=write_dummy_input)
    assert result.exit_code == 1 and "out of memory" not in result.message
    assert "out of memory" in describe_exit_code(1, silent=True)
    assert "out of memory" not in describe_exit_code(1) and "out of memory" not in describe_exit_code(2, silent=True)


@posix_only
def test_cancel_behind_the_launcher_keeps_the_grace_period(fake_backend, checkpoint, tmp_path):
    marker = tmp_path / "cleaned.txt"
    run = make_launched_run(fake_backend, checkpoint, tmp_path, "graceful_slow", cancel_grace_s=20)
    run.env["FAKE_MARKER"] = str(marker)
    pids = []
    run.progress.connect(lambda e: pids.extend(e.get("pids") or []))
    run.start(write_input=write_dummy_input)
    wait_for(lambda: pids, run)
    (backend,) = pids
    launcher = run.backend.pid
    t0 = time.monotonic()
    run.cancel()
    run.backend.wait(timeout=30)
    # The launcher died at once; the backend still got its 1 s to clean up, then exited by itself.
    assert marker.read_text() == "cleaned up", "the backend was killed before it could clean up"
    assert time.monotonic() - t0 < 10
    assert run.result.outcome is Outcome.CANCELLED
    assert not pid_alive(launcher) and not pid_alive(backend)


@posix_only
def test_cancel_behind_the_launcher_still_kills_a_backend_that_ignores_sigterm(fake_backend, checkpoint, tmp_path):
    run = make_launched_run(fake_backend, checkpoint, tmp_path, "ignore_term", cancel_grace_s=0.5)
    pids = []
    run.progress.connect(lambda e: pids.extend(e.get("pids") or []))
    run.start(write_input=write_dummy_input)
    wait_for(lambda: len(pids) == 2, run)
    t0 = time.monotonic()
    run.cancel()
    run.backend.wait(timeout=30)
    assert time.monotonic() - t0 >= 0.5
    assert run.result.outcome is Outcome.CANCELLED
    deadline = time.monotonic() + 5
    while any(map(pid_alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(pid_alive, pids))


# ---------------------------------------------------------------------------- pid reuse


@pytest.fixture
def stranger():
    """A process outside every backend tree (what a reused pid would belong to)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


@posix_only
def test_a_pid_with_another_start_time_is_not_signalled(stranger):
    seen = process_identity(stranger.pid)
    assert seen is not None and seen.ppid == os.getpid() and seen.start is not None
    assert is_same_process(seen)
    # The remembered process had this pid but started at another time: the pid was reused.
    reused = ProcessIdentity(stranger.pid, seen.ppid, start=seen.start + "0")
    assert not is_same_process(reused)
    assert signal_if_unchanged([reused], signal.SIGKILL) == []
    time.sleep(0.1)
    assert stranger.poll() is None, "a process that merely reused a pid was killed"
    assert signal_if_unchanged([seen], signal.SIGKILL) == [stranger.pid]
    assert stranger.wait(timeout=10) == -signal.SIGKILL


@posix_only
def test_without_a_start_time_the_parent_decides(stranger):
    seen = process_identity(stranger.pid)
    assert is_same_process(ProcessIdentity(stranger.pid, seen.ppid, start=None))
    assert not is_same_process(ProcessIdentity(stranger.pid, seen.ppid + 1, start=None))
    assert not is_same_process(ProcessIdentity(2**22 + 7, 1, start=None))  # above pid_max: no such process


@posix_only
def test_cancel_spares_a_process_that_reused_a_remembered_pid(fake_backend, checkpoint, tmp_path, stranger):
    run, (child, grandchild) = start_tree(fake_backend, checkpoint, tmp_path, "tree", grace=0.2)
    seen = process_identity(stranger.pid)
    # as if a descendant seen earlier had exited and its pid gone to this unrelated process
    run.backend._known_descendants[stranger.pid] = ProcessIdentity(stranger.pid, run.backend.pid, "earlier")
    run.cancel()
    run.backend.wait(timeout=30)
    assert run.result.outcome is Outcome.CANCELLED
    assert stranger.poll() is None and is_same_process(seen), "cancel killed a stranger"
    assert not pid_alive(child) and not pid_alive(grandchild)


# ---------------------------------------------------------------------------- close (Slicer exiting)


@posix_only
def test_close_kills_the_tree_and_removes_the_input_copy(fake_backend, checkpoint, tmp_path):
    run, (child, grandchild) = start_tree(fake_backend, checkpoint, tmp_path, "tree")
    backend, workdir = run.backend.pid, run.workdir
    assert (workdir / InferenceRun.INPUT_NAME).is_file()
    run.close()
    assert not workdir.exists(), "the patient's input volume was left in the temporary folder"
    deadline = time.monotonic() + 5
    while any(map(pid_alive, (backend, child, grandchild))) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(pid_alive, (backend, child, grandchild)))
    run.close()  # twice is fine


def test_close_of_a_finished_or_unstarted_run_removes_its_folder(fake_backend, checkpoint, tmp_path):
    run = make_run(fake_backend, checkpoint, tmp_path, "bad_input")
    result = run.run_blocking(write_input=write_dummy_input)
    assert result.workdir.is_dir()  # kept after a failure for inspection ...
    run.close()
    assert not result.workdir.exists()  # ... until the module closes
    fresh = make_run(fake_backend, checkpoint, tmp_path, "ok")
    folder = fresh.workdir
    fresh.close()
    assert not folder.exists()


@posix_only
def test_device_probe_close_stops_a_running_probe(tmp_path):
    slow_python = tmp_path / "slow-python"
    slow_python.write_text("#!/bin/sh\nexec sleep 60\n")
    slow_python.chmod(0o755)
    probe = DeviceProbe(slow_python)
    probe.start()
    assert probe.poll() is None
    pid = probe._proc.pid
    probe.close()
    assert not pid_alive(pid)
    assert probe.poll()["error"] == "the device probe was stopped"


# ---------------------------------------------------------------------------- no console windows on Windows


def test_children_get_no_console_window_on_windows():
    assert no_console_window("posix") == {}
    assert no_console_window("nt")["creationflags"] & 0x08000000  # CREATE_NO_WINDOW


def test_every_child_process_is_started_without_a_console_window():
    """Each ``subprocess.Popen``/``run`` in process.py passes ``**no_console_window()`` (or a
    creationflags that includes it); only the POSIX-only ``ps`` call is exempt."""
    source = Path(sys.modules[PredictParameters.__module__].__file__).read_text()
    calls = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute) and node.func.attr in ("Popen", "run")
             and getattr(node.func.value, "id", None) == "subprocess"]
    assert len(calls) >= 5
    for call in calls:
        args = ast.unparse(call)
        if args.startswith("subprocess.run(['ps'"):
            continue
        assert "no_console_window()" in args or "**kwargs" in args, args
    assert 'kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | no_console_window()' in source


# ---------------------------------------------------------------------------- the job contract


def test_inference_run_fulfils_the_job_protocol(checkpoint, tmp_path):
    factory = LocalJobFactory(python="/opt/slicer/bin/PythonSlicer", env={"X": "1"}, workdir_parent=tmp_path)
    run = factory(PredictParameters(checkpoint), loader=lambda outputs: outputs)
    try:
        assert isinstance(run, SegmentationJob)
        assert run.command[:3] == ["/opt/slicer/bin/PythonSlicer", "-m", "IWSegmentationLib"]
        assert run.env == {"X": "1"} and run.workdir.parent == tmp_path.resolve()
    finally:
        run.close()
    assert not isinstance(object(), SegmentationJob)


@pytest.mark.slow
def test_known_answer_checkpoint_is_written_without_importing_torch_here(tmp_path):
    path = tmp_path / "threshold.safetensors"
    code = (
        "import sys\n"
        "from IWSegmentationLib.backend import process\n"
        "process.write_known_answer_checkpoint(sys.argv[1])\n"
        "print(sorted(m for m in ('torch', 'safetensors', 'numpy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300,
                         env=backend_environment())
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]"], "the caller imported torch, safetensors or numpy itself"
    from IWSegmentationLib.nn.checkpoint import read_metadata

    assert read_metadata(path)["threshold"] == 0.5  # phantom.threshold_checkpoint's card


def test_known_answer_checkpoint_failure_names_the_file(tmp_path):
    with pytest.raises(BackendError, match="known-answer checkpoint"):
        write_known_answer_checkpoint(tmp_path / "missing-dir" / "x.safetensors")
