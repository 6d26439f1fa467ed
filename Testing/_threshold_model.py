"""A known-answer network and scan for the predict and evaluate tests.

``threshold_model`` is the library's tiny residual U-Net with hand-set weights that make it a
voxel-wise threshold: every path is zero except stem -> skip 0 -> decoder 0 -> head, each carrying
channel 0 through an identity tap, and the head computes ``GAIN (x - 0.5)``. With the ``ct-lung``
preset (``x = (clip(HU, -1000, 300) + 1000) / 1300``) a voxel is a lesion exactly when its
HU > -350. ``ct_volume`` is a CT whose lesions are known by hand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from IWSegmentationLib.nn.checkpoint import save_checkpoint
from IWSegmentationLib.nn.unet import build_model, default_config
from IWSegmentationLib.preprocessing.presets import get_preset

GAIN = 40.0  # logit = GAIN * (x - 0.5): +100 HU -> +13.8, -800 HU -> -13.8

#: The card entry of a threshold model trained without organ masks: predict needs none (a card
#: without it is read from its ct-lung preset, which asks for the automatic lung mask, and the
#: flat phantoms here have no lungs for it to find).
NO_ORGAN_MASK = {"organ": "lung", "required": False, "automatic": True, "source": "none"}


def threshold_model() -> torch.nn.Module:
    model = build_model(default_config("tiny"))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, torch.nn.Conv3d):
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
        model.stem[0].weight[0, 0, 1, 1, 1] = 1.0
        model.stem[1][2].weight[0, 0, 1, 1, 1] = 1.0
        model.skips[0][2].weight[0, 0, 0, 0, 0] = 1.0
        model.head[1][2].weight[0, 0, 0, 0, 0] = GAIN
        model.head[1][2].bias[0] = -GAIN / 2
    return model.eval()


def ct_volume(shape=(24, 40, 48)) -> tuple[np.ndarray, np.ndarray]:
    """Air (-1000 HU), an elliptic body (-800 HU) and three lesions (+100 HU); returns (image, lesions)."""
    d, h, w = shape
    y, x = np.ogrid[:h, :w]
    image = np.full(shape, -1000, np.int16)
    image[:, ((y - h / 2) / (0.4 * h)) ** 2 + ((x - w / 2) / (0.4 * w)) ** 2 <= 1] = -800
    lesions = np.zeros(shape, bool)
    if shape == (24, 40, 48):
        lesions[5:9, 12:16, 14:20] = True  # 4 x 4 x 6 = 96 voxels
        lesions[14:16, 24:26, 28:30] = True  # 8 voxels
        lesions[20, 20, 30] = True  # 1 voxel
    else:  # one 1 x 2 x 2 lesion at the centre
        lesions[d // 2, h // 2 : h // 2 + 2, w // 2 : w // 2 + 2] = True
    image[lesions] = 100
    return image, lesions


def save_threshold_checkpoint(path: Path, **card) -> Path:
    """``threshold_model`` saved at ``path`` with the card the predict tests share: the ``ct-lung``
    preset, 16^3 patches, threshold 0.5, size groups at 2.5 / 5 mm, no organ mask needed;
    ``card`` entries are added or replace these."""
    save_checkpoint(path, threshold_model(), {
        "patch_size": [16, 16, 16], "preprocessing": get_preset("ct-lung"), "threshold": 0.5,
        "size_thresholds": [2.5, 5.0], "description": "hand-set voxel-wise threshold at -350 HU (tests)",
        "organ_mask": NO_ORGAN_MASK, **card,
    })
    return path
