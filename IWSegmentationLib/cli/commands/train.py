"""``iwseg train --config CONFIG.yaml [--set key=value ...] [--resume]``: train a lesion-segmentation U-Net.

Single process: ``iwseg train --config run.yaml``. SIGINT and SIGTERM cancel a run (exit code 3);
``--resume`` continues it from the last completed epoch. Several GPUs or machines: launch the same
command with ``torchrun`` (see docs/training.md); only rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import argparse
import sys

from ...core.progress import CancelState

# Imported at registration (numpy only; torch loads when a run starts): where training/ is not
# installed (the 3D Slicer extension), this import fails and the CLI leaves `train` out.
from ...training import load_config, train


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train an inverse-weighted 3D U-Net (headless; torchrun for several GPUs)",
        description="Train a 3D U-Net for lesion segmentation with the paper's recipe. Settings come from "
        "a YAML config (every key is documented in docs/training.md; `--print-config` shows them all "
        "with their values) and `--set key=value` overrides.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", help="YAML config file (omit to start from the defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set epochs=10 --set model.channels=[8,16,32,64] "
                        "(repeatable; values are YAML)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in the config's output folder exactly where it stopped")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit")


def run(args: argparse.Namespace) -> int:
    """Train; SIGINT and SIGTERM cancel the run (exit code 3) with its temporary files removed,
    even when the shell started it with SIGINT ignored (a background job)."""
    import yaml  # lazy: `iwseg` starts without yaml

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
