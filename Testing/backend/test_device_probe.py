"""The device probe (IWSegmentationLib.backend.device_probe): a child interpreter runs
``python -m IWSegmentationLib.core.device_report`` against a fake torch, so no GPU is needed."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

from _fake_backend import posix_only

from IWSegmentationLib.backend.device_probe import DeviceProbe
from IWSegmentationLib.backend.process_tree import pid_alive


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

