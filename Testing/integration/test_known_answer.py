"""The known-answer checkpoint writer (IWSegmentationLib.testing.known_answer): a child writes it,
so the caller (Slicer's GUI process in the module's self-test) imports no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from IWSegmentationLib.backend.interpreter import backend_environment
from IWSegmentationLib.backend.job import BackendError
from IWSegmentationLib.testing.known_answer import write_known_answer_checkpoint


@pytest.mark.slow
def test_known_answer_checkpoint_is_written_without_importing_torch_here(tmp_path):
    path = tmp_path / "threshold.safetensors"
    code = (
        "import sys\n"
        "from IWSegmentationLib.testing.known_answer import write_known_answer_checkpoint\n"
        "write_known_answer_checkpoint(sys.argv[1])\n"
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

