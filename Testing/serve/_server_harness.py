"""A real ``iwseg serve`` on 127.0.0.1 for the server tests, and the helpers they share.

The server runs as ``python -m IWSegmentationLib serve`` on a free port, in its own process group;
``Server.stop`` kills everything it started. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _subprocess import kill_process_group

from IWSegmentationLib.backend.process_tree import descendant_pids, pid_alive
from IWSegmentationLib.core import imageio
from IWSegmentationLib.serve.client import ServerClient, ServerError

PY = [sys.executable, "-m", "IWSegmentationLib"]
REPO = Path(__file__).resolve().parents[2]
TOKENS = ("token-alice-0123456789abcdef", "token-bob-0123456789abcdefgh")
#: The shared server's upload limit: 1 MB, above the 32 x 48 x 48 float32 phantom (288 KiB + header).
LIMIT_MB = 1


def server_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running ``iwseg serve`` process: ``url``, ``proc``, and a client per token."""

    def __init__(self, models: Path, workdir: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir.parent / f"server-{self.port}.log", "w+")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [*PY, "serve", "--models", str(models), "--port", str(self.port), "--workdir", str(workdir),
             "--log-level", "warning", *extra],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, env=server_env(), start_new_session=True)
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(ServerError):
                ServerClient(self.url, timeout=2).health()
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"iwseg serve did not come up on {self.url}:\n{self.output()}", pytrace=False)
            time.sleep(0.2)

    def client(self, token: str | None = TOKENS[0]) -> ServerClient:
        return ServerClient(self.url, token, timeout=30)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-3000:]

    def jobs_running(self) -> list[int]:
        return [pid for pid in descendant_pids(self.proc.pid) if pid_alive(pid)]

    def stop(self, orphans: list[int] = ()) -> None:
        kill_process_group(self.proc)
        for pid in orphans:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self.log.close()


def slow_volume(folder: Path) -> Path:
    """A volume whose job runs for minutes (overlap 0.9, no skipping, 8 mirrored passes each): something to cancel.

    int16 keeps the upload at 500 KiB, under the 1 MB limit.
    """
    # noise, not a constant: predict refuses an image with few distinct integers (a label map?)
    # non-negative, as MR intensities are: the phantom checkpoint is an MR model, and predict refuses
    # a CT-looking volume (minimum below -200) for it
    image = np.random.default_rng(0).integers(0, 1400, size=(40, 80, 80), dtype=np.int16)
    return imageio.write_image(folder / "slow.nrrd", image, imageio.Geometry(size=(80, 80, 40), spacing=(1.0,) * 3,
                                                                               origin=(0.0,) * 3), compress=False)


SLOW = {"overlap": 0.9, "no_skip": True, "tta": True, "probabilities": True, "lesions": True}


def collapse_runs(stages) -> list[str]:
    """Stages with repeats collapsed: ``a a b a`` -> ``a b a``."""
    out: list[str] = []
    for stage in stages:
        if not out or out[-1] != stage:
            out.append(stage)
    return out


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout} s waiting for {what}", pytrace=False)


def wait_for_first_inference(client: ServerClient, job_id: str) -> None:
    for event in client.events(job_id):
        if event.stage == "inference":
            return
    pytest.fail("the job ended before its first inference event")
