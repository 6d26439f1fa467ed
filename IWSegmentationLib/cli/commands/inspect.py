"""``iwseg inspect CKPT [--verify]``: print a checkpoint's model card without running it."""

from __future__ import annotations

import json


def run(args) -> int:
    from ...nn.checkpoint import load_checkpoint, read_metadata  # lazy: `iwseg` starts without it

    card = load_checkpoint(args.checkpoint)[1] if args.verify else read_metadata(args.checkpoint)
    print(json.dumps(card, indent=2, sort_keys=True))
    return 0
