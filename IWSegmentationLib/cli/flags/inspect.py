"""The flags of ``iwseg inspect``: its parser, help texts, choices and defaults; what the command does
with them is :mod:`IWSegmentationLib.cli.commands.inspect`.
"""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="print a checkpoint's model card (JSON)",
        description="Print the model card of a .safetensors checkpoint: architecture, patch size, "
        "preprocessing, loss, size thresholds, training data, validation metrics and licence "
        "(license: an SPDX id, or \"not stated\"). "
        "Reads the header only, unless --verify.",
    )
    parser.add_argument("checkpoint", help="checkpoint file (.safetensors)")
    parser.add_argument(
        "--verify", action="store_true", help="also load the weights and check their sha256 and architecture"
    )
