"""Processes as the system sees them (IWSegmentationLib.backend.process_tree), with real processes:
a pid that was given to another process is never signalled, and no child opens a console window."""

from __future__ import annotations

import ast
import os
import signal
import time
from pathlib import Path

from _fake_backend import posix_only

from IWSegmentationLib.backend.process_tree import (
    ProcessIdentity,
    is_same_process,
    no_console_window,
    process_identity,
    signal_if_unchanged,
)

LIB = Path(__file__).resolve().parents[2] / "IWSegmentationLib"


# ---------------------------------------------------------------------------- pid reuse


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



# ---------------------------------------------------------------------------- no console windows on Windows


def test_children_get_no_console_window_on_windows():
    assert no_console_window("posix") == {}
    assert no_console_window("nt")["creationflags"] & 0x08000000  # CREATE_NO_WINDOW



def test_every_child_process_is_started_without_a_console_window():
    """Each ``subprocess.Popen``/``run`` of the modules that start children passes ``**no_console_window()``
    (or a creationflags that includes it); only the POSIX-only ``ps`` call is exempt."""
    sources = {path.name: path.read_text() for path in sorted((LIB / "backend").glob("*.py"))}
    sources["known_answer.py"] = (LIB / "testing" / "known_answer.py").read_text()
    calls = [node for source in sources.values() for node in ast.walk(ast.parse(source))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and node.func.attr in ("Popen", "run") and getattr(node.func.value, "id", None) == "subprocess"]
    # process_tree: ps, tasklist, taskkill-free; child_process: Popen, taskkill; device_probe: Popen; known_answer: run
    assert len(calls) >= 5
    for call in calls:
        args = ast.unparse(call)
        if args.startswith("subprocess.run(['ps'"):
            continue
        assert "no_console_window()" in args or "**kwargs" in args, args
    source = sources["child_process.py"]
    assert 'kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | no_console_window()' in source
