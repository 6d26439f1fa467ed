"""The known-answer checkpoint, written by a child interpreter for the module's self-test.

Apart from :mod:`.phantom` (which imports numpy): importing this module loads neither numpy nor
torch, so Slicer's own process stays free of them while the self-test prepares its model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ..backend.interpreter import backend_environment
from ..backend.job import BackendError, describe_exit_code
from ..backend.process_tree import no_console_window


def write_known_answer_checkpoint(path: str | os.PathLike, python: str | os.PathLike | None = None, *,
                                  env: dict[str, str] | None = None, timeout_s: float = 300.0) -> Path:
    """Write the phantom's known-answer checkpoint (:func:`IWSegmentationLib.testing.phantom.threshold_checkpoint`)
    from a child interpreter, and return its path.

    The module's self-test needs it inside Slicer, where the application must not import torch
    or safetensors (on a fresh Slicer they are not installed; the backend, a child, uses them).
    """
    code = "import sys; from IWSegmentationLib.testing import phantom; phantom.threshold_checkpoint(sys.argv[1])"
    proc = subprocess.run([os.fspath(python or sys.executable), "-c", code, os.fspath(path)], capture_output=True,
                          text=True, env=backend_environment() if env is None else env, timeout=timeout_s,
                          stdin=subprocess.DEVNULL, **no_console_window())
    if proc.returncode != 0 or not Path(path).is_file():
        tail = (proc.stderr.strip().splitlines() or [describe_exit_code(proc.returncode)])[-1]
        raise BackendError(f"writing the known-answer checkpoint {path} failed: {tail}")
    return Path(path)
