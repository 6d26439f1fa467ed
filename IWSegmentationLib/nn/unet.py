"""The paper's 3D U-Net: pre-activation residual blocks, additive skips, trilinear upsampling.

Design (Shirokikh et al., MICCAI 2020, section 4.2 and the authors' published network):

* a **pre-activation** unit is ``BatchNorm3d -> ReLU -> Conv3d`` (He et al. 2016);
* a **residual block** is two pre-activation units (kernel 3, no conv bias) plus a shortcut
  that is the identity, or a 1x1x1 convolution when the channel count changes;
* the **stem** is ``Conv3d(in, c0, 3)`` followed by one pre-activation unit ``c0 -> c0``;
* the **encoder** has ``len(channels)`` levels separated by ``MaxPool3d(2)``; level ``i`` runs
  ``blocks_per_level`` residual blocks, the first going ``channels[i-1] -> channels[i]``;
* the **bottleneck** (deepest level) runs ``blocks_per_level`` blocks up to ``channels[-1]`` and
  one more back down to ``channels[-2]``;
* the **decoder** upsamples trilinearly (x2), **adds** the skip — a 1x1x1 pre-activation unit
  applied to the encoder output of that level — and runs ``blocks_per_level`` residual blocks,
  the last one going ``channels[i] -> channels[i-1]`` (level 0 stays at ``channels[0]``);
* the **head** is a 1x1x1 residual block and a 1x1x1 pre-activation unit to ``out_channels``
  logits (no sigmoid: losses take logits). The authors' head ends with a bias-free conv and a
  ``BatchNorm3d(1)``; by default we use a conv bias instead (same affine freedom in eval mode,
  one fewer parameter, no batch statistics on the logits); ``head_norm: true`` builds the
  authors' head (in training mode its BatchNorm rescales the logits of each batch).

With the paper's widths 16/64/128/256 and two blocks per level this has 11,074,305 trainable
parameters (the authors report 11.07 M; hand count in ``Testing/nn/test_unet.py``) and
0.3992 MFLOP of convolution per input voxel (:func:`flops_per_voxel`; 837 GFLOP per 128^3
window). Inputs of any size are padded (at the far end of each axis, with
each sample's minimum, as the authors padded with the image minimum) to a multiple of
:func:`model_stride` and the output is cropped back, so odd sizes work.

Upsampling uses ``align_corners=False`` (PyTorch's default; the authors used ``True``): it is
translation-equivariant, so overlapping sliding windows agree better, and it has no parameters,
so the parameter count is unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import InputError

# The architecture config (its keys, presets, limits and validation) is torch-free, so a model
# card can be checked without importing torch; re-exported here where the network is built.
from .architecture import (  # noqa: F401
    ARCHITECTURE_NAME,
    CONFIG_KEYS,
    NORMS,
    PAPER_CONFIG,
    SIZES,
    SMALL_CONFIG,
    TINY_CONFIG,
    default_config,
    model_stride,
    validate_config,
)


def norm_layer(kind: str, channels: int) -> nn.Module:
    """The normalisation of a pre-activation unit (see :data:`NORMS`)."""
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    raise InputError(f"norm must be one of {', '.join(NORMS)}, got {kind!r}")


class PreActivation3d(nn.Sequential):
    """``Norm(in) -> ReLU -> Conv3d(in, out, k, padding=k//2)``; the norm is BatchNorm3d unless
    ``norm`` says otherwise."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, bias: bool = True,
                 norm: str = "batch"):
        super().__init__(
            norm_layer(norm, in_channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias),
        )


class ResBlock3d(nn.Module):
    """Pre-activation residual block: ``x -> shortcut(x) + PreAct(PreAct(x))``.

    The shortcut is the identity when ``in == out`` channels, else a bias-free 1x1x1 conv.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, norm: str = "batch"):
        super().__init__()
        self.conv_path = nn.Sequential(
            PreActivation3d(in_channels, out_channels, kernel_size, bias=False, norm=norm),
            PreActivation3d(out_channels, out_channels, kernel_size, bias=False, norm=norm),
        )
        self.shortcut: nn.Module = (
            nn.Identity() if in_channels == out_channels else nn.Conv3d(in_channels, out_channels, 1, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The shortcut runs first: the conv path's in-place ReLU acts on a BN output, never on x.
        return self.shortcut(x) + self.conv_path(x)


def _blocks(widths: list[int], kernel_size: int, norm: str = "batch") -> nn.Sequential:
    """Residual blocks along ``widths``: ``[a, b, c]`` gives ``a->b``, ``b->c``."""
    return nn.Sequential(*(ResBlock3d(a, b, kernel_size, norm) for a, b in zip(widths[:-1], widths[1:])))


class ResidualUNet3D(nn.Module):
    """The paper's residual 3D U-Net. ``forward((B, C, D, H, W)) -> (B, out, D, H, W)`` logits.

    Build it with :func:`build_model`; ``self.config`` holds the validated config, which
    checkpoints store to rebuild the network.
    """

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = validate_config(config)
        ch = self.config["channels"]
        b = self.config["blocks_per_level"]
        k = self.config["kernel_size"]
        norm = self.config["norm"]
        levels = len(ch)
        self.stride = 2 ** (levels - 1)

        self.stem = nn.Sequential(
            nn.Conv3d(self.config["in_channels"], ch[0], k, padding=k // 2, bias=False),
            PreActivation3d(ch[0], ch[0], k, norm=norm),
        )
        self.pool = nn.MaxPool3d(2)
        # encoder[i]: level i, input has ch[i-1] channels (ch[0] at level 0)
        self.encoder = nn.ModuleList(
            _blocks([ch[max(i - 1, 0)]] + [ch[i]] * b, k, norm) for i in range(levels - 1)
        )
        self.bottleneck = _blocks([ch[-2]] + [ch[-1]] * b + [ch[-2]], k, norm)
        self.skips = nn.ModuleList(PreActivation3d(ch[i], ch[i], 1, norm=norm) for i in range(levels - 1))
        # decoder[i]: level i, output has ch[i-1] channels (ch[0] at level 0)
        self.decoder = nn.ModuleList(
            _blocks([ch[i]] * b + [ch[max(i - 1, 0)]], k, norm) for i in range(levels - 1)
        )
        out = self.config["out_channels"]
        head_norm = self.config["head_norm"]
        self.head = nn.Sequential(
            ResBlock3d(ch[0], ch[0], 1, norm),
            PreActivation3d(ch[0], out, 1, bias=not head_norm, norm=norm),
            *([nn.BatchNorm3d(out)] if head_norm else []),  # the authors' head: BatchNorm on the logits
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise InputError(f"model input must be (B, C, D, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.config["in_channels"]:
            raise InputError(f"model expects {self.config['in_channels']} input channel(s), got {x.shape[1]}")
        spatial = tuple(x.shape[2:])
        x = pad_to_multiple(x, self.stride)
        x = self.stem(x)
        skips = []
        for i, level in enumerate(self.encoder):
            if i:
                x = self.pool(x)
            x = level(x)
            skips.append(self.skips[i](x))
        x = self.bottleneck(self.pool(x))
        for i in reversed(range(len(self.decoder))):
            x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
            x = self.decoder[i](x + skips[i])
        x = self.head(x)
        if tuple(x.shape[2:]) != spatial:
            x = x[:, :, : spatial[0], : spatial[1], : spatial[2]]
        return x


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the spatial axes of ``(B, C, D, H, W)`` at their far end to a multiple of ``multiple``,
    filling with each sample's minimum (the value of air/background after preprocessing).
    Returns ``x`` itself when no padding is needed; keeps ``channels_last_3d`` layout."""
    spatial = x.shape[2:]
    target = [-(-s // multiple) * multiple for s in spatial]
    if list(spatial) == target:
        return x
    fmt = torch.channels_last_3d if (x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last_3d)) \
        else torch.contiguous_format
    out = torch.empty((*x.shape[:2], *target), dtype=x.dtype, device=x.device, memory_format=fmt)
    out.copy_(x.amin(dim=(1, 2, 3, 4), keepdim=True).expand_as(out))
    out[:, :, : spatial[0], : spatial[1], : spatial[2]] = x
    return out


def build_model(config: dict[str, Any] | None = None) -> ResidualUNet3D:
    """Build the network from an architecture config (see :func:`default_config`)."""
    return ResidualUNet3D(default_config() if config is None else config)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def macs_per_voxel(config: dict[str, Any]) -> float:
    """Convolution multiply-accumulates per input voxel, counted analytically from the config.

    A conv ``in -> out`` with kernel ``k`` at level ``l`` (resolution ``1/8**l`` of the input)
    costs ``in * out * k**3 / 8**l`` MACs per input voxel. BatchNorm, ReLU, pooling, upsampling
    and additions are not counted (they are < 1% of the work). Padding to the stride is not
    counted either: this is the cost per voxel of a stride-aligned input.
    """
    return network_macs_per_voxel(build_model(config))


def network_macs_per_voxel(model: ResidualUNet3D) -> float:
    """:func:`macs_per_voxel` of an already built network (no second copy is built)."""
    total = 0.0
    levels = {id(m): 0 for m in model.stem.modules()}
    for level, module in enumerate(model.encoder):
        levels.update({id(m): level for m in module.modules()})
        levels.update({id(m): level for m in model.skips[level].modules()})
        levels.update({id(m): level for m in model.decoder[level].modules()})
    levels.update({id(m): len(model.encoder) for m in model.bottleneck.modules()})
    levels.update({id(m): 0 for m in model.head.modules()})
    for module in model.modules():
        if isinstance(module, nn.Conv3d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.kernel_size[2]
            total += module.in_channels * module.out_channels * k / 8 ** levels[id(module)]
    return total


def flops_per_voxel(config: dict[str, Any]) -> float:
    """Convolution FLOPs per input voxel (``2 x`` :func:`macs_per_voxel`); the paper's net: ~0.40 M.

    Multiply by the number of window voxels and divide by seconds for achieved FLOP/s.
    """
    return 2.0 * macs_per_voxel(config)
