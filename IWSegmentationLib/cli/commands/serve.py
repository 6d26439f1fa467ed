"""``iwseg serve``: the inference server (FastAPI + uvicorn), see :mod:`IWSegmentationLib.serve.app`
and docs/server.md. Needs the ``serve`` extra: ``pip install "iwsegmentation[serve]"``."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from ...core.devices import DEVICES
from ...core.errors import InputError


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="serve `iwseg predict` over HTTP for other machines (the Slicer module, scripts)",
        description=(
            "Run an HTTP inference server: clients upload a volume, stream its progress and download the "
            "mask, probabilities and lesion JSON. Each job is one `iwseg predict` process. Binds to "
            "127.0.0.1 unless --host says otherwise; any other address needs --token-file. "
            "Endpoints: docs/server.md, and http://HOST:PORT/docs once running."
        ),
    )
    p.add_argument("--models", required=True, type=Path, metavar="DIR",
                   help="folder of checkpoints (*.safetensors); the only place models are loaded from")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--token-file", type=Path, metavar="F",
                   help="bearer tokens, one per line; required unless --host is a loopback address")
    p.add_argument("--max-upload-mb", type=float, default=2048.0, metavar="N",
                   help="largest accepted upload in MB (default 2048); larger ones get HTTP 413")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="jobs run at once (default: one per CUDA GPU, else 1); the others wait in a queue")
    p.add_argument("--device", default="auto", choices=DEVICES, help="device of every job (default auto)")
    p.add_argument("--keep-results", type=float, default=3600.0, metavar="S",
                   help="seconds (> 0) a finished job's results are kept before they are deleted (default 3600)")
    p.add_argument("--max-jobs", type=int, default=100, metavar="N",
                   help="unfinished jobs and uploads in progress the server holds at most (>= 1); more get "
                        "HTTP 429 (default 100)")
    p.add_argument("--job-timeout", type=float, default=3600.0, metavar="S",
                   help="seconds a job may run before it is cancelled (default 3600); 0 for no limit")
    p.add_argument("--upload-timeout", type=float, default=600.0, metavar="S",
                   help="seconds an upload may take in all before it is dropped with HTTP 408 (default 600; "
                        "also dropped after 60 s without data)")
    p.add_argument("--workdir", type=Path, metavar="DIR",
                   help="folder for uploads and results (default: a temporary folder removed at exit)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run)
    return p


def _cuda_devices(device: str) -> int:
    """CUDA GPUs the jobs may use (asked in a child interpreter: the server never imports torch)."""
    if device not in ("auto", "cuda"):
        return 0
    from ...backend.device_probe import DeviceProbe  # lazy: `iwseg` starts without it


    return len(DeviceProbe().run_blocking().get("cuda") or [])


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # lazy: optional (the serve extra)
    except ImportError:
        raise InputError('iwseg serve needs FastAPI and uvicorn: pip install "iwsegmentation[serve]"') from None
    from ...serve.app import ServerConfig, create_app, read_token_file  # lazy: ~0.5 s, only iwseg serve

    gpus = _cuda_devices(args.device)
    config = ServerConfig(
        models_dir=args.models, host=args.host, port=args.port,
        tokens=read_token_file(args.token_file) if args.token_file else [],
        max_upload_bytes=int(args.max_upload_mb * 2**20), workers=args.workers if args.workers is not None else max(1, gpus),
        device=args.device, keep_results_s=args.keep_results, max_jobs=args.max_jobs,
        workdir=args.workdir, cuda_devices=gpus, upload_timeout_s=args.upload_timeout,
        job_timeout_s=args.job_timeout if args.job_timeout != 0 else None,
    )
    app = create_app(config)
    # SIGTERM and SIGINT stop a server gracefully (uvicorn finishes, the jobs are cancelled and their
    # files removed): that is its normal end, exit 0. uvicorn raises the signal again once it has
    # shut down; the command line's own handler would turn that into "cancelled" (exit 3).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(app, host=config.host, port=config.port, log_level=args.log_level,
                timeout_graceful_shutdown=10)
    return 0
