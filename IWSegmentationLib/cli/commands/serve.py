"""``iwseg serve``: the inference server (FastAPI + uvicorn), see :mod:`IWSegmentationLib.serve.app`
and docs/server.md. Needs the ``serve`` extra: ``pip install "iwsegmentation[serve]"``."""

from __future__ import annotations

import argparse
import signal

from ...backend.device_probe import DeviceProbe
from ...core.errors import InputError


def _cuda_devices(device: str) -> int:
    """CUDA GPUs the jobs may use (asked in a child interpreter: the server never imports torch)."""
    if device not in ("auto", "cuda"):
        return 0
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
