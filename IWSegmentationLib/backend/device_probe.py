"""Which devices torch sees, asked in a child interpreter: :class:`DeviceProbe`.

The GUI process never imports torch (a fresh Slicer may not even have it): the probe runs
``python -m IWSegmentationLib.core.device_report`` and reads the one JSON line it prints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from .interpreter import backend_environment
from .job import describe_exit_code
from .process_tree import no_console_window

#: The module the child runs (:mod:`IWSegmentationLib.core.device_report`): it prints what torch sees as one JSON line.
DEVICE_REPORT_MODULE = f"{__package__.split('.')[0]}.core.device_report"


class DeviceProbe:
    """Ask a child interpreter which devices torch sees (torch is never imported here).

    ``start()`` returns at once; ``poll()`` returns None while the child runs, then the
    result dict: ``{"torch": version or None, "cuda": [{"index", "name", "free_mb",
    "total_mb"}], "mps": bool, "error": str or None}``. ``run_blocking()`` does both.

    ``env`` is the child's environment (default: this process's); this package is made
    importable in it (:func:`~IWSegmentationLib.backend.interpreter.backend_environment`).
    """

    def __init__(self, python: str | os.PathLike | None = None, *, timeout_s: float = 60.0,
                 env: dict[str, str] | None = None) -> None:
        self.python = os.fspath(python or sys.executable)
        self.timeout_s = timeout_s
        self.env = env
        self.result: dict | None = None
        self._proc: subprocess.Popen | None = None
        self._started_at = 0.0

    def start(self) -> None:
        try:
            self._proc = subprocess.Popen(
                [self.python, "-m", DEVICE_REPORT_MODULE], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, env=backend_environment(self.env), **no_console_window(),
            )
        except OSError as exc:
            self.result = {"torch": None, "cuda": [], "mps": False, "error": f"cannot run {self.python}: {exc}"}
        self._started_at = time.monotonic()

    def poll(self) -> dict | None:
        if self.result is not None:
            return self.result
        if self._proc is None:
            raise RuntimeError("poll() before start()")
        if self._proc.poll() is None:
            if time.monotonic() - self._started_at < self.timeout_s:
                return None
            self._proc.kill()
        out, err = self._proc.communicate()
        self.result = self._parse(out, err, self._proc.returncode)
        return self.result

    def run_blocking(self) -> dict:
        self.start()
        while self.poll() is None:
            time.sleep(0.05)
        return self.result

    def close(self) -> None:
        """Stop a probe that is still running (the module's ``cleanup()``); its result says so."""
        if self._proc is not None and self.result is None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.communicate()
            self.result = {"torch": None, "cuda": [], "mps": False, "error": "the device probe was stopped"}

    @staticmethod
    def _parse(out: str, err: str, code: int | None) -> dict:
        for line in reversed((out or "").splitlines()):
            try:
                info = json.loads(line)
            except ValueError:
                continue
            if isinstance(info, dict):
                info.setdefault("cuda", [])
                info.setdefault("mps", False)
                info.setdefault("error", None)
                return info
        tail = (err or "").strip().splitlines()
        reason = tail[-1] if tail else describe_exit_code(code)
        return {"torch": None, "cuda": [], "mps": False, "error": reason}
