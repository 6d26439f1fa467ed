"""The child interpreter that runs this package: its command prefix and its environment.

Every child of the front end (the ``iwseg predict`` backend, the device probe, the self-test's
checkpoint writer) is ``python -m IWSegmentationLib...`` in an environment where this very package
is importable. Inside Slicer ``python`` is ``PythonSlicer``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def default_command_prefix(python: str | os.PathLike | None = None) -> list[str]:
    """``[python, "-m", "IWSegmentationLib"]``; inside Slicer pass the ``PythonSlicer`` path."""
    return [os.fspath(python or sys.executable), "-m", __package__.split(".")[0]]


def backend_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the child: this package importable, unbuffered UTF-8 output.

    Inside Slicer the extension's folder is on the application's ``sys.path`` but not on the
    ``PYTHONPATH`` a ``PythonSlicer`` child sees, so the package's parent folder is prepended.
    """
    env = dict(os.environ if base is None else base)
    package_parent = str(Path(__file__).resolve().parents[len(__package__.split("."))])  # above IWSegmentationLib/
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([package_parent] + [p for p in paths if p != package_parent])
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env
