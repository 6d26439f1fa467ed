"""The fake backend of the backend tests (backend/test_child_process.py, backend/test_local_run.py, ...): helpers.

Its fixtures (``fake_backend``, ``fake_checkpoint``, ``stranger``) are in conftest.py.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from IWSegmentationLib.backend.interpreter import backend_environment
from IWSegmentationLib.backend.local_run import InferenceRun
from IWSegmentationLib.predict.options import PredictOptions

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


# Slicer's PythonSlicer is a launcher (CTK AppLauncher): it starts the real interpreter as its
# child, dies at once on SIGTERM (no handler), and reports a child killed by a signal as exit
# code 1. This stand-in does the same, so the tests see what the module sees in Slicer.
FAKE_LAUNCHER = textwrap.dedent(
    """
    import subprocess, sys
    child = subprocess.Popen([sys.executable] + sys.argv[1:])
    code = child.wait()
    sys.exit(1 if code < 0 else code)
    """
)



def fake_env(mode: str) -> dict[str, str]:
    env = backend_environment()
    env["FAKE_MODE"] = mode
    return env


def make_run(fake_backend, checkpoint, tmp_path, mode, **kwargs) -> InferenceRun:
    work_parent = tmp_path / "runs"
    work_parent.mkdir(exist_ok=True)
    return InferenceRun(
        PredictOptions(models=(checkpoint,), device="cpu", overlap=0.25),
        command_prefix=[sys.executable, str(fake_backend)],
        env=fake_env(mode),
        workdir_parent=work_parent,
        **kwargs,
    )


def make_launched_run(fake_backend, checkpoint, tmp_path, mode, **kwargs) -> InferenceRun:
    launcher = tmp_path / "fake_launcher.py"
    launcher.write_text(FAKE_LAUNCHER)
    run = make_run(fake_backend, checkpoint, tmp_path, mode, **kwargs)
    run.command_prefix = [sys.executable, str(launcher), str(fake_backend)]
    return run


def write_dummy_input(path: Path) -> None:
    path.write_bytes(b"NRRD0004\n")


def wait_for(predicate, run, timeout=20.0):
    """Poll ``run`` (delivering its signals) until ``predicate()`` is true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert run.poll(), "the backend finished before the condition was met"
        assert time.monotonic() < deadline, "timed out waiting for the backend"
        time.sleep(0.02)


def start_tree(fake_backend, checkpoint, tmp_path, mode, grace=0.5):
    run = make_run(fake_backend, checkpoint, tmp_path, mode, cancel_grace_s=grace)
    pids = []
    run.progress.connect(lambda e: pids.extend(e.get("pids") or []))
    run.start(write_input=write_dummy_input)
    wait_for(lambda: len(pids) == 2, run)
    return run, pids

