"""``iwseg inspect CKPT [--verify]``: print a checkpoint's model card without running it."""

from __future__ import annotations

import json


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
    parser.set_defaults(func=run)


def run(args) -> int:
    from ...nn.checkpoint import load_checkpoint, read_metadata  # lazy: `iwseg` starts without it

    card = load_checkpoint(args.checkpoint)[1] if args.verify else read_metadata(args.checkpoint)
    print(json.dumps(card, indent=2, sort_keys=True))
    return 0
