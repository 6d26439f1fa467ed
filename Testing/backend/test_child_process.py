"""One child process tree (IWSegmentationLib.backend.child_process.BackendProcess), with real subprocesses.

Fake backend scripts (Testing/_fake_backend.py) speak the JSON-lines protocol, spawn children and
grandchildren, ignore SIGTERM or clean up slowly, and run behind a stand-in for the ``PythonSlicer``
launcher. Nothing is mocked: the wrapper starts real process groups, reads real pipes and kills
real process trees.
"""

from __future__ import annotations

import signal
import sys
import time

import pytest
from _fake_backend import make_launched_run, make_run, posix_only, start_tree, wait_for, write_dummy_input

from IWSegmentationLib.backend.child_process import BackendProcess
from IWSegmentationLib.backend.job import Outcome
from IWSegmentationLib.backend.process_tree import (
    ProcessIdentity,
    descendant_pids,
    is_same_process,
    pid_alive,
    process_identity,
)
from IWSegmentationLib.core.errors import InputError


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



# ---------------------------------------------------------------------------- cancel and process trees


@posix_only
@pytest.mark.parametrize("mode", ["tree", "tree_detached"])
def test_cancel_kills_child_and_grandchild(fake_backend, fake_checkpoint, tmp_path, mode):
    run, (child, grandchild) = start_tree(fake_backend, fake_checkpoint, tmp_path, mode)
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
def test_cancel_escalates_to_kill_when_sigterm_is_ignored(fake_backend, fake_checkpoint, tmp_path):
    run, (child, grandchild) = start_tree(fake_backend, fake_checkpoint, tmp_path, "ignore_term", grace=0.3)
    t0 = time.monotonic()
    run.cancel()
    assert run.running  # cancel returns at once; the GUI keeps polling
    code = run.backend.wait(timeout=30)
    assert code == -signal.SIGKILL  # SIGTERM was ignored, so the tree got SIGKILL after the grace
    assert time.monotonic() - t0 >= 0.3
    assert run.result.outcome is Outcome.CANCELLED
    assert not pid_alive(child) and not pid_alive(grandchild)


@posix_only
def test_cancel_lets_a_cooperative_backend_exit_with_code_3(fake_backend, fake_checkpoint, tmp_path):
    run, (child, grandchild) = start_tree(fake_backend, fake_checkpoint, tmp_path, "graceful_term", grace=20)
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
def test_no_orphan_survives_a_successful_run(fake_backend, fake_checkpoint, tmp_path):
    run = make_run(fake_backend, fake_checkpoint, tmp_path, "orphan")
    pids = []
    run.progress.connect(lambda e: pids.extend(e.get("pids") or []))
    t0 = time.monotonic()
    result = run.run_blocking(write_input=write_dummy_input, timeout=60)
    assert result.outcome is Outcome.OK and len(pids) == 1
    assert time.monotonic() - t0 < 10  # the leftover held our pipes; it was killed, not waited for
    assert not pid_alive(pids[0]), "a child left behind by the backend survived"


@posix_only
def test_cancel_spares_a_process_that_reused_a_remembered_pid(fake_backend, fake_checkpoint, tmp_path, stranger):
    run, (child, grandchild) = start_tree(fake_backend, fake_checkpoint, tmp_path, "tree", grace=0.2)
    seen = process_identity(stranger.pid)
    # as if a descendant seen earlier had exited and its pid gone to this unrelated process
    run.backend._known_descendants[stranger.pid] = ProcessIdentity(stranger.pid, run.backend.pid, "earlier")
    run.cancel()
    run.backend.wait(timeout=30)
    assert run.result.outcome is Outcome.CANCELLED
    assert stranger.poll() is None and is_same_process(seen), "cancel killed a stranger"
    assert not pid_alive(child) and not pid_alive(grandchild)



# ---------------------------------------------------------------------------- behind the PythonSlicer launcher


@posix_only
def test_cancel_behind_the_launcher_keeps_the_grace_period(fake_backend, fake_checkpoint, tmp_path):
    marker = tmp_path / "cleaned.txt"
    run = make_launched_run(fake_backend, fake_checkpoint, tmp_path, "graceful_slow", cancel_grace_s=20)
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
def test_cancel_behind_the_launcher_still_kills_a_backend_that_ignores_sigterm(fake_backend, fake_checkpoint, tmp_path):
    run = make_launched_run(fake_backend, fake_checkpoint, tmp_path, "ignore_term", cancel_grace_s=0.5)
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

