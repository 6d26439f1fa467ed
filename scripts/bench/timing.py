"""The timing rules every benchmark of the suite follows, in one place.

* **Allocator:** glibc is told not to hand freed memory back to the system
  (:data:`MALLOC_ENV`); on the project's VMs freshly mapped pages are slow to touch, so without
  it the same loop gets slower as it frees and re-maps its buffers. It must be in a process's
  environment when the process starts, so the runner (:mod:`scripts.bench.__main__`) starts every
  benchmark with :func:`quiet_env`, and benchmarks that time child processes pass it on.
* **Warm-up, then the median:** :func:`median_time` runs a function ``warmup`` times untimed
  (oneDNN builds its kernels, caches fill), then reports the median of ``repeats`` timed runs.
* **Interleaved pairs:** :func:`interleaved` runs the jobs being compared in turns (a, b, a, b,
  ...), dropping the first ``warmup`` rounds, so that a change in the machine's load hits every
  job alike; :func:`medians` reduces each job's rows key by key.
* **The machine line** (:func:`machine_line`) says on what the numbers were measured.

Standard library only at the top (torch is imported only to name a GPU), so that it also serves
child processes that run an older checkout's code (``scripts.bench.train_runs``).
"""

from __future__ import annotations

import importlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

T = TypeVar("T")

#: glibc malloc settings of every benchmark run: never return memory to the system with mmap's
#: munmap or by trimming the heap (thresholds of 4 GiB and 64 GiB).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def quiet_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with :data:`MALLOC_ENV` set."""
    return {**(os.environ if base is None else base), **MALLOC_ENV}


def malloc_prefix() -> str:
    """``MALLOC_...=... `` as a command line shows it, if this process runs with :data:`MALLOC_ENV`."""
    if all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()) + " "
    return ""


def median_time(fn: Callable[[], T], repeats: int, warmup: int = 1) -> tuple[float, T]:
    """Median seconds of ``repeats`` timed calls of ``fn`` after ``warmup`` untimed ones, and
    the last call's result."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def interleaved(jobs: Mapping[str, Callable[[], T]], rounds: int, warmup: int = 1,
                on_result: Callable[[str, str, T], None] | None = None) -> dict[str, list[T]]:
    """Run every job once per round, in the order given, ``warmup + rounds`` rounds; return each
    job's results of the timed rounds (the warm-up rounds are dropped). ``on_result(label, name,
    result)`` sees every result as it comes (label ``warm-up`` or ``round N``)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    kept: dict[str, list[T]] = {name: [] for name in jobs}
    for i in range(warmup + rounds):
        label = "warm-up" if i < warmup else f"round {i - warmup + 1}"
        for name, job in jobs.items():
            result = job()
            if on_result is not None:
                on_result(label, name, result)
            if i >= warmup:
                kept[name].append(result)
    return kept


def medians(rows: Sequence[Mapping[str, float]], keys: Sequence[str] | None = None) -> dict[str, float]:
    """The median of each key (default: the first row's keys) over ``rows``."""
    keys = list(rows[0]) if keys is None else keys
    return {k: statistics.median(r[k] for r in rows) for k in keys}


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
        import torch  # only to name the GPU; the module stays torch-free for the child processes

        gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    used = f" (using {threads} threads)" if threads else ""
    return f"Machine: {cpu_name()}{gpu}, {visible_cores()} CPU core(s) visible{used}; {versions(libraries)}."

