"""Run a test's child process so that no descendant outlives the test.

``subprocess.run(..., timeout=...)`` kills only the direct child on a timeout: the workers that
``torchrun`` (or a DataLoader) started are orphaned and can sit on a socket for ever. Here the
child starts in its own session (so it leads a process group holding all its descendants);
on a timeout, or any exception while waiting (e.g. Ctrl-C), the whole group gets SIGTERM and,
after a grace period, SIGKILL, and the test fails with the output captured so far.
Descendants that left the group (a new session of their own) are found with
:func:`IWSegmentationLib.backend.process_tree.descendant_pids` before the group is signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from typing import Sequence

import pytest

from IWSegmentationLib.backend.process_tree import descendant_pids, pid_alive

#: Seconds the group gets after SIGTERM before SIGKILL.
GRACE_S = 5.0


def _signal(pids: Sequence[int], pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def kill_process_group(proc: subprocess.Popen, grace_s: float = GRACE_S) -> None:
    """SIGTERM the group led by ``proc`` (and its descendants seen now), SIGKILL after ``grace_s``."""
    seen = descendant_pids(proc.pid) if proc.poll() is None else []
    _signal(seen, proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and (proc.poll() is None or any(map(pid_alive, seen))):
        time.sleep(0.05)
    _signal([pid for pid in seen if pid_alive(pid)], proc.pid, signal.SIGKILL)


def run_in_group(cmd: Sequence[str | os.PathLike], *, timeout: float, grace_s: float = GRACE_S,
                 **kwargs) -> subprocess.CompletedProcess:
    """Like ``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)``,
    but the child leads a new process group that is killed whole on timeout or error.

    A timeout fails the test (``pytest.fail``) with the tail of stdout and stderr; any other
    exception is re-raised after the kill. On a normal exit, leftovers of the group are killed
    too, so nothing outlives the test either way.
    """
    if os.name == "nt":  # pragma: no cover - the tests run on POSIX
        raise RuntimeError("run_in_group needs POSIX process groups")
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException as exc:
        kill_process_group(proc, grace_s)
        out = err = ""
        try:  # retrying communicate loses no output (subprocess docs)
            out, err = proc.communicate(timeout=grace_s)
        except subprocess.TimeoutExpired:  # a survivor holds the pipes: give up on the rest
            proc.kill()
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                stream.close()
        if isinstance(exc, subprocess.TimeoutExpired):
            pytest.fail(f"{' '.join(map(str, cmd))[:300]} did not finish within {timeout} s; its process "
                        f"group was killed.\n--- stdout (tail)\n{out[-3000:]}\n--- stderr (tail)\n{err[-3000:]}",
                        pytrace=False)
        raise
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of a clean exit
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
