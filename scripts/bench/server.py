"""Server overhead: ``iwseg predict --server`` (loopback) against a local ``iwseg predict``, same job.

Both are timed as a user runs them, from the command's start to its exit, with the outputs
(mask and float32 probabilities, .nii.gz, and the lesion JSON) written:

* local: ``iwseg predict --model M --input V ...``;
* server: ``iwseg predict --server URL --model NAME --input V ...`` against an ``iwseg serve``
  started once on 127.0.0.1 (one worker, the same device and environment). Its extra work is the
  upload, the queue, the event stream, the downloads and the client's own start-up;
* api: the same job through the Python client (:func:`api_run`), with the server's own account
  of the job's time.

Runs alternate (local, server, api, local, ...; :func:`scripts.bench.timing.interleaved`) so
that a change in the machine's load hits all three; ``--warmup`` rounds are dropped, then medians
are reported, and every round's three masks must be the same bytes. The ``--progress-format jsonl``
lines are time-stamped as they arrive, which splits the time: *to start* is until the backend's
``start`` event (process start-up, and for the server the upload and the queue), *after done*
from the ``done`` event to the exit (for the server the downloads). The model is the phantom
checkpoint of IWSegmentationLib/testing/phantom.py (the library's tiny U-Net, hand-wired), on a
256 x 256 x 128 phantom volume by default.

    python -m scripts.bench server                      # into docs/benchmarks.md
    python -m scripts.bench.server --quick              # a smoke run (a 128 x 128 x 64 volume, one round)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from IWSegmentationLib.backend.process_tree import descendant_pids
from IWSegmentationLib.core import imageio
from IWSegmentationLib.serve.client import ServerClient, download_outputs
from IWSegmentationLib.testing import phantom
from scripts.bench import report, timing

REPO = Path(__file__).resolve().parents[2]
PY = [sys.executable, "-m", "IWSegmentationLib"]
WHERE = ("local", "server", "api")


def make_volume(folder: Path, shape_zyx: tuple[int, int, int]) -> Path:
    """A phantom body with lesions spread over the whole grid (so every window does real work)."""
    rng = np.random.default_rng(0)
    z, y, x = shape_zyx
    lesions = []
    for cz in range(12, z - 12, 32):
        for cy in range(16, y - 16, 48):
            for cx in range(16, x - 16, 48):
                lesions.append((cz + rng.uniform(-4, 4), cy + rng.uniform(-8, 8), cx + rng.uniform(-8, 8),
                                rng.uniform(3.0, 8.0), rng.choice([70.0, 85.0, 100.0])))
    case = phantom.phantom_case(shape_zyx, (1.0, 0.8, 0.8), lesions)
    geometry = imageio.Geometry(size=(x, y, z), spacing=(0.8, 0.8, 1.0), origin=(0.0, 0.0, 0.0))
    return imageio.write_image(folder / "volume.nii.gz", case.image, geometry)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run one command; seconds to its ``start`` event, to its ``done`` event, and to its exit."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    marks = {}
    for line in proc.stdout:
        with contextlib.suppress(ValueError):
            stage = json.loads(line).get("stage")
            if stage in ("start", "done"):
                marks[stage] = time.perf_counter() - t0
    err = proc.stderr.read()
    if proc.wait() != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
    total = time.perf_counter() - t0
    return {"total_s": total, "to_start_s": marks["start"], "after_done_s": total - marks["done"]}


def api_run(client: ServerClient, volume: Path, out: Path) -> dict[str, float]:
    """The same job through the Python client, with the server's own account of the job's run.

    ``overhead_s`` is everything but the backend process's life on the server (``started`` to
    ``ended`` of the job): upload, queue, event stream, downloads and writing the files. It is a
    difference of two clocks of one run, so the machine's load changes it far less than it changes
    the difference of two separate runs' totals.
    """
    t0 = time.perf_counter()
    job = client.submit(volume, "phantom", {"output_format": ".nii.gz"})
    upload = time.perf_counter() - t0
    info = client.follow(job["id"], lambda event: None)
    followed = time.perf_counter() - t0
    download_outputs(client, job["id"], {"mask": out / "mask.nii.gz", "probabilities": out / "prob.nii.gz",
                                         "lesions": out / "lesions.json"}, str(volume))
    total = time.perf_counter() - t0
    client.delete(job["id"])
    if info["state"] != "ok":
        raise SystemExit(f"the server job failed: {info['message']}")
    job_s = info["ended"] - info["started"]
    return {"total_s": total, "upload_s": upload, "queue_s": info["started"] - info["created"], "job_s": job_s,
            "download_s": total - followed, "overhead_s": total - job_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(128, 256, 256), metavar=("Z", "Y", "X"))
    ap.add_argument("--repeats", type=int, default=3, help="measured rounds (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=1, help="rounds run first and dropped")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="a 128 x 128 x 64 volume, one round, no warm-up")
    report.add_report_argument(ap)
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    if args.quick:
        args.shape, args.repeats, args.warmup = (64, 128, 128), 1, 0

    env = dict(os.environ, PYTHONPATH=str(REPO))
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        tmp = Path(tmp)
        (tmp / "models").mkdir()
        model = phantom.threshold_checkpoint(tmp / "models" / "phantom.safetensors")
        volume = make_volume(tmp, tuple(args.shape))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([*PY, "serve", "--models", str(tmp / "models"), "--port", str(port),
                                   "--device", args.device, "--workers", "1", "--log-level", "warning",
                                   "--workdir", str(tmp / "serve")],
                                  env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_for_health(url, server)
            client = ServerClient(url)
            done = dict.fromkeys(WHERE, 0)

            def job(where: str):
                def run() -> dict[str, float]:
                    out = tmp / f"{where}-{done[where]}"
                    done[where] += 1
                    out.mkdir()
                    if where == "api":
                        return api_run(client, volume, out)
                    cmd = [*PY, "predict", "--input", str(volume), "--output", str(out / "mask.nii.gz"),
                           "--probabilities", str(out / "prob.nii.gz"), "--lesions", str(out / "lesions.json"),
                           "--progress-format", "jsonl"]
                    cmd += (["--model", str(model), "--device", args.device] if where == "local"
                            else ["--model", "phantom", "--server", url])
                    return timed(cmd, env)
                return run

            runs = timing.interleaved({where: job(where) for where in WHERE}, args.repeats, args.warmup,
                                      on_result=lambda label, where, result: print(
                                          f"{label} {where}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()),
                                          file=sys.stderr, flush=True))
            for i in range(args.warmup + args.repeats):
                local_mask = (tmp / f"local-{i}" / "mask.nii.gz").read_bytes()
                if any((tmp / f"{w}-{i}" / "mask.nii.gz").read_bytes() != local_mask for w in ("server", "api")):
                    raise SystemExit(f"run {i}: a server mask differs from the local one")
        finally:
            for pid in descendant_pids(server.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            server.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=20)

    report.publish("server", markdown(runs, args), args.report, argv, quick=args.quick)
    return 0


def wait_for_health(url: str, server: subprocess.Popen, seconds: float = 120) -> None:
    """Wait until the server answers ``/v1/health``; stop if it exits or takes over ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(f"{url}/v1/health", timeout=2).read()
            return
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("iwseg serve did not start") from None
            time.sleep(0.2)


def markdown(runs: dict[str, list[dict[str, float]]], args) -> str:
    """The two tables (CLI runs; the Python client's split), the overhead sentence, every run."""
    medians = {where: timing.medians(rows) for where, rows in runs.items()}
    overhead = medians["api"]["overhead_s"] / medians["local"]["total_s"]
    end_to_end = medians["server"]["total_s"] / medians["local"]["total_s"] - 1.0
    z, y, x = args.shape
    lines = [f"`iwseg predict` on a {x} × {y} × {z} phantom volume on loopback, {args.device}, one server worker; "
             f"{args.repeats} interleaved round(s) after {args.warmup} warm-up, medians. "
             + timing.machine_line(("torch",)), "",
             "| run | total s | to `start` s | after `done` s |", "|---|---:|---:|---:|"]
    for where, label in (("local", "local `iwseg predict`"), ("server", "`iwseg predict --server`")):
        m = medians[where]
        lines.append(f"| {label} | {m['total_s']:.2f} | {m['to_start_s']:.2f} | {m['after_done_s']:.2f} |")
    a = medians["api"]
    lines += ["", "| Python client | total s | upload s | queue s | job on the server s | downloads s | overhead s |",
              "|---|---:|---:|---:|---:|---:|---:|",
              f"| median | {a['total_s']:.2f} | {a['upload_s']:.3f} | {a['queue_s']:.3f} | {a['job_s']:.2f} | "
              f"{a['download_s']:.3f} | {a['overhead_s']:.3f} |", "",
              f"Server overhead (Python client total - job on the server) / local total: {100 * overhead:.1f}%; "
              f"end to end, CLI vs CLI: {100 * end_to_end:+.1f}%. Target: overhead <= 10%.", "",
              "Every run, total s: " + "; ".join(
                  f"{where}: " + ", ".join(f"{r['total_s']:.2f}" for r in runs[where]) for where in WHERE) + "."]
    return "\n".join(lines)

if __name__ == "__main__":
    sys.exit(main())
