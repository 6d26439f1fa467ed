"""The architecture config of the paper's 3D U-Net: its keys, the size presets, limits, validation.

Plain dicts and no torch, so a checkpoint's model card can be validated (and shown in the
Slicer GUI) without importing torch; :mod:`IWSegmentationLib.nn.unet` builds the network from
a config and re-exports these names.

The limits (:data:`MAX_LEVELS`, :data:`MAX_CHANNELS`, ...) are far above any network of the
paper's family (16/64/128/256 channels, 2 blocks, kernel 3) and exist only so that a crafted
config is refused with a clear message instead of a crash; memory is bounded separately by the
checkpoint loader, which compares the network's tensor shapes with the file's before building it.
"""

from __future__ import annotations

import copy
from typing import Any

from ..core.errors import InputError

ARCHITECTURE_NAME = "residual_unet3d"

#: The paper's network (11.07 M parameters, stride 8).
PAPER_CONFIG: dict[str, Any] = {
    "name": ARCHITECTURE_NAME,
    "in_channels": 1,
    "out_channels": 1,
    "channels": [16, 64, 128, 256],
    "blocks_per_level": 2,
    "kernel_size": 3,
    "norm": "batch",
    "head_norm": False,
}

#: Normalisation layers of the pre-activation units: the paper's ``batch`` (BatchNorm3d), or
#: ``instance`` (InstanceNorm3d with affine parameters) and ``group`` (GroupNorm, 8 groups or
#: fewer) whose statistics do not depend on the batch (see docs/results/README.md: BatchNorm at
#: batch size 2 makes eval-mode outputs depend on the last steps' running averages).
NORMS = ("batch", "instance", "group")

#: ``head_norm``: False, the head ends with a conv with bias (our default); True, with a bias-free
#: conv followed by ``BatchNorm3d(out_channels)`` on the logits, as the authors' network. A card
#: written before the key existed means False, the network it was trained as.

#: Same topology (3 poolings, stride 8), narrow and shallow: for CPU tests and demos.
TINY_CONFIG: dict[str, Any] = {
    **PAPER_CONFIG,
    "channels": [4, 8, 16, 32],
    "blocks_per_level": 1,
}

#: Small but useful: the ``make demo`` network (about 0.7 M parameters).
SMALL_CONFIG: dict[str, Any] = {
    **PAPER_CONFIG,
    "channels": [8, 16, 32, 64],
    "blocks_per_level": 2,
}

SIZES = {"paper": PAPER_CONFIG, "small": SMALL_CONFIG, "tiny": TINY_CONFIG}
CONFIG_KEYS = tuple(PAPER_CONFIG)

#: Sanity limits of a config (see the module docstring).
MAX_LEVELS = 8            # len(channels): 7 poolings, stride 128
MAX_CHANNELS = 4096       # any entry of channels
MAX_IO_CHANNELS = 64      # in_channels, out_channels
MAX_BLOCKS = 16           # blocks_per_level
MAX_KERNEL = 9            # kernel_size


def _bounded_int(value: Any, key: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InputError(f"model config {key!r} must be an integer in [{low}, {high}], got {value!r}")
    return value


def default_config(size: str = "paper", **overrides: Any) -> dict[str, Any]:
    """A validated architecture config: the ``size`` preset (``paper``, ``small``, ``tiny``)
    with ``overrides`` applied, e.g. ``default_config(channels=[8, 16, 32, 64])``."""
    if size not in SIZES:
        raise InputError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    config = copy.deepcopy(SIZES[size])
    config.update(copy.deepcopy(overrides))
    return validate_config(config)


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check an architecture config and return a normalised copy (missing keys take the
    paper's values). Unknown keys and bad values raise :class:`InputError`."""
    if not isinstance(config, dict):
        raise InputError(f"model config must be a dict, got {type(config).__name__}")
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise InputError(
            f"unknown model config key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(CONFIG_KEYS)}"
        )
    out = {**copy.deepcopy(PAPER_CONFIG), **copy.deepcopy(config)}
    if out["name"] != ARCHITECTURE_NAME:
        raise InputError(f"model config 'name' is {out['name']!r}; this library builds only {ARCHITECTURE_NAME!r}")
    channels = out["channels"]
    if not isinstance(channels, (list, tuple)) or not 2 <= len(channels) <= MAX_LEVELS:
        raise InputError(f"model config 'channels' must be a list of 2 to {MAX_LEVELS} positive ints, got {channels!r}")
    out["channels"] = [_bounded_int(c, "channels", 1, MAX_CHANNELS) for c in channels]
    for key in ("in_channels", "out_channels"):
        _bounded_int(out[key], key, 1, MAX_IO_CHANNELS)
    _bounded_int(out["blocks_per_level"], "blocks_per_level", 1, MAX_BLOCKS)
    k = _bounded_int(out["kernel_size"], "kernel_size", 1, MAX_KERNEL)
    if k % 2 == 0:
        raise InputError(f"model config 'kernel_size' must be odd, got {k!r}")
    if out["norm"] not in NORMS:
        raise InputError(f"model config 'norm' must be one of {', '.join(NORMS)}, got {out['norm']!r}")
    if not isinstance(out["head_norm"], bool):
        raise InputError(f"model config 'head_norm' must be true or false, got {out['head_norm']!r}")
    return out


def model_stride(config: dict[str, Any]) -> int:
    """Factor every input side is padded to: ``2 ** poolings`` (8 for the paper's 3 poolings)."""
    return 2 ** (len(validate_config(config)["channels"]) - 1)
