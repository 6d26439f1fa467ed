"""What every benchmark script shares: the machine line of its report and writing the report.

The scripts import it as ``import _bench`` (``python scripts/bench_x.py`` puts scripts/ on the path).
"""

from __future__ import annotations

import importlib
import os
import platform
from pathlib import Path
from typing import Sequence

from IWSegmentationLib.core.outputs import atomic_output


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux), else what :mod:`platform` knows."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            return next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), name)
    except OSError:
        return name


def visible_cores() -> int:
    """CPU cores this process may run on (its affinity), else all logical CPUs."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def versions(libraries: Sequence[str] = ("numpy",)) -> str:
    """``numpy 2.1.0, torch 2.13.0, Python 3.11.7`` (a library that is not installed says so)."""
    parts = []
    for name in libraries:
        try:
            parts.append(f"{name} {importlib.import_module(name).__version__}")
        except ImportError:
            parts.append(f"{name} not installed")
    return ", ".join([*parts, f"Python {platform.python_version()}"])


def machine_line(libraries: Sequence[str] = ("numpy",), threads: int | None = None) -> str:
    """One sentence for a report: CPU, cores (and threads used), GPU if torch sees one, versions."""
    gpu = ""
    if "torch" in libraries:
        import torch

        gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    used = f" (using {threads} threads)" if threads else ""
    return f"Machine: {cpu_name()}{gpu}, {visible_cores()} CPU core(s) visible{used}; {versions(libraries)}."


def write_report(path: str | os.PathLike | None, text: str) -> None:
    """Print the report and, if ``path`` is given, write it there atomically (parents created)."""
    text = text if text.endswith("\n") else text + "\n"
    print(text, end="", flush=True)
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
