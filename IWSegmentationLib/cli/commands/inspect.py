"""``iwseg inspect CKPT [--verify]``: print a checkpoint's model card without running it."""

from __future__ import annotations

import json

from ...nn.checkpoint import load_checkpoint, read_metadata


def run(args) -> int:
    card = load_checkpoint(args.checkpoint)[1] if args.verify else read_metadata(args.checkpoint)
    print(json.dumps(card, indent=2, sort_keys=True))
    return 0
