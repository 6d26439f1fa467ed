"""Testing/_subprocess.py: a timed-out child is killed with its whole tree, and the test fails."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
from _subprocess import run_in_group

from IWSegmentationLib.backend.process_tree import pid_alive

# The child starts a grandchild that ignores SIGTERM (like a worker stuck on a socket), prints
# its pid to the file argv[1], then sleeps past the timeout.
SPAWNER = (
    "import pathlib, subprocess, sys, time\n"
    "code = 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)'\n"
    "g = subprocess.Popen([sys.executable, '-c', code])\n"
    "pathlib.Path(sys.argv[1]).write_text(str(g.pid))\n"
    "print('stdout line', flush=True)\n"
    "print('stderr line', file=sys.stderr, flush=True)\n"
    "time.sleep(120)\n"
)


def test_timeout_kills_grandchildren_and_fails_with_output(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failed:
        run_in_group([sys.executable, "-c", SPAWNER, str(pid_file)], timeout=3, grace_s=0.5)
    grandchild = int(pid_file.read_text())
    try:
        message = str(failed.value)
        assert "did not finish within 3 s" in message
        assert "stdout line" in message and "stderr line" in message
        deadline = time.monotonic() + 5  # reaping by init may lag a little
        while pid_alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(grandchild)  # it ignored SIGTERM: only the SIGKILL after the grace got it
        assert time.monotonic() - start < 60  # not the 120 s sleep
    finally:
        if pid_alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)


def test_clean_exit_returns_both_streams():
    done = run_in_group([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(4)"],
                        timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (4, "out\n", "err\n")
