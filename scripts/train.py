#!/usr/bin/env python
"""Train a lesion-segmentation U-Net: the same as ``iwseg train`` (see docs/training.md).

    python scripts/train.py --config run.yaml [--set key=value ...] [--resume]
    torchrun --nproc_per_node=4 scripts/train.py --config run.yaml
"""

import sys

from IWSegmentationLib.cli.main.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
