"""The flags of ``iwseg train``: its parser, help texts, choices and defaults; what the command does
with them is :mod:`IWSegmentationLib.cli.commands.train`.
"""

from __future__ import annotations

import argparse


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", help="YAML config file (omit to start from the defaults)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set epochs=10 --set model.channels=[8,16,32,64] "
                        "(repeatable; values are YAML)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in the config's output folder exactly where it stopped")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit")
