"""The job contract (IWSegmentationLib.backend.job): the exit-code policy, the signals, and a contract
that starts no process (the remote job of serve.client imports it in Slicer's GUI process)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _fake_backend import posix_only

from IWSegmentationLib.backend.job import Outcome, Signal, describe_exit_code, outcome_for_exit_code


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



def test_the_job_contract_and_the_remote_job_load_no_process_code():
    """A remote job needs the folder policy, not the process-tree kill: in a fresh interpreter,
    importing the contract and serve.client loads neither process_tree, child_process nor local_run."""
    code = ("import sys\n"
            "import IWSegmentationLib.backend.job, IWSegmentationLib.serve.client\n"
            "print(sorted(m.rsplit('.', 1)[1] for m in sys.modules if m.startswith('IWSegmentationLib.backend.')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['job']"
