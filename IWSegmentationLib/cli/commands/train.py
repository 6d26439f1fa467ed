"""``iwseg train --config CONFIG.yaml [--set key=value ...] [--resume]``: train a lesion-segmentation U-Net.

Single process: ``iwseg train --config run.yaml``. SIGINT and SIGTERM cancel a run (exit code 3);
``--resume`` continues it from the last completed epoch. Several GPUs or machines: launch the same
command with ``torchrun`` (see docs/training.md); only rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from ...core.progress import CancelState
from ...training import load_config, train  # numpy only: torch loads when a run starts


def run(args: argparse.Namespace) -> int:
    """Train; SIGINT and SIGTERM cancel the run (exit code 3) with its temporary files removed,
    even when the shell started it with SIGINT ignored (a background job)."""
    config = load_config(args.config, args.overrides)
    if args.print_config:
        sys.stdout.write(yaml.safe_dump(config.to_dict(), sort_keys=False))
        return 0
    state = CancelState()
    with state.installed():
        result = train(config, resume=args.resume, cancel=state)
    if result.is_main:
        print(result.summary(), flush=True)
    return 0
