"""The child interpreter (IWSegmentationLib.backend.interpreter): its command prefix and environment."""

from __future__ import annotations

import os
from pathlib import Path

from IWSegmentationLib.backend.interpreter import backend_environment, default_command_prefix


def test_backend_environment_makes_the_package_importable():
    env = backend_environment({"PYTHONPATH": "/somewhere/else"})
    package_parent = str(Path(__import__("IWSegmentationLib").__file__).resolve().parent.parent)
    assert env["PYTHONPATH"].split(os.pathsep) == [package_parent, "/somewhere/else"]
    assert env["PYTHONUNBUFFERED"] == "1"
    assert default_command_prefix("/opt/Slicer/bin/PythonSlicer") == [
        "/opt/Slicer/bin/PythonSlicer", "-m", "IWSegmentationLib",
    ]

