"""The flags of ``iwseg serve``: its parser, help texts, choices and defaults; what the command does
with them is :mod:`IWSegmentationLib.cli.commands.serve`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ...core.devices import DEVICES


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
    return p
