"""The CPU engine: a frozen (TorchScript) copy of the network, and the rule that picks eager or frozen."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..core.devices import ENGINES
from ..core.errors import InputError
from ..nn.unet import ResidualUNet3D, network_macs_per_voxel, pad_to_multiple


class FrozenNetwork(nn.Module):
    """A network compiled for fp32 CPU inference: TorchScript-traced, frozen and passed through
    ``torch.jit.optimize_for_inference``, which folds each BatchNorm into the convolution before
    it, pre-packs the convolution weights for oneDNN, fuses ReLUs, and keeps activations in
    oneDNN's blocked layout between layers instead of converting at every convolution.

    Why: the narrow 3D U-Nets used on CPUs are memory-bound, and those conversions cost as much as
    the arithmetic — the ``small`` net runs a 64³ window 2.1x faster this way (0.17 s vs 0.36 s on
    2 cores), outputs equal to the eager network within 3e-7. The wide ``paper`` net is
    compute-bound and gains little. Build it with :func:`freeze_for_cpu`.

    The trace has no shape-dependent branches for inputs whose sides are multiples of the
    network's stride, so one trace serves every window and batch size; other sizes are padded
    here exactly as the network pads them (:func:`models.pad_to_multiple`) and cropped back.
    """

    def __init__(self, frozen: torch.jit.ScriptModule, stride: int, config: Mapping[str, Any] | None):
        super().__init__()
        self.frozen = frozen
        self.stride = int(stride)
        self.config = dict(config or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = tuple(x.shape[2:])
        out = self.frozen(pad_to_multiple(x.contiguous(), self.stride))
        if tuple(out.shape[2:]) != spatial:
            out = out[:, :, : spatial[0], : spatial[1], : spatial[2]]
        return out


def freeze_for_cpu(model: nn.Module, *, tolerance: float = 1e-4,
                   on_warning: Callable[[str], None] | None = None) -> FrozenNetwork | None:
    """:class:`FrozenNetwork` of ``model`` (a :class:`models.ResidualUNet3D` on the CPU), or None.

    The trace is taken on a small probe (two strides per side: milliseconds, no full window) and
    checked against the eager network on a second random probe; it must agree within
    ``tolerance · (1 + max|logit|)``. When tracing fails, the model is not a stride-aligned U-Net,
    or the check fails, ``on_warning`` says why and None is returned: the caller runs eagerly.
    """
    stride = getattr(model, "stride", None)
    config = getattr(model, "config", None)
    if not isinstance(stride, int) or not isinstance(config, Mapping) or "in_channels" not in config:
        return None
    if any(t.device.type != "cpu" for t in model.parameters()):
        return None
    model.eval()
    side = 2 * stride
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn((2, int(config["in_channels"]), side, side + stride, side), generator=generator)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings about the shape checks, which hold here
            traced = torch.jit.trace(model, probe[:1, :, :side, :side, :side], check_trace=False)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        network = FrozenNetwork(frozen, stride, config)
        with torch.inference_mode():
            expected, got = model(probe), network(probe)
        error = float((expected - got).abs().max())
        limit = tolerance * (1.0 + float(expected.abs().max()))
    except Exception as exc:  # an unusual module or a torch build without oneDNN: run eagerly
        if on_warning is not None:
            on_warning(f"could not compile the network for the CPU ({type(exc).__name__}: {exc}); running it eagerly")
        return None
    if not error <= limit:
        if on_warning is not None:
            on_warning(f"the CPU-compiled network differs from the eager one by {error:.3g} (> {limit:.3g}); "
                       "running it eagerly")
        return None
    return network


#: Above this many convolution FLOPs per voxel a network is compute-bound on the CPU and ``auto``
#: keeps it eager (with channels_last_3d): measured on 2 cores, the ``small`` U-Net (0.05 MFLOP/voxel)
#: runs 2.1x faster frozen, the ``paper`` U-Net (0.40 MFLOP/voxel) 5% slower (4.42 vs 4.21 s per 128³).
FROZEN_MAX_FLOPS_PER_VOXEL = 0.2e6


def resolve_engine(engine: str, device: torch.device, precision: str, flops_per_voxel: float | None = None) -> str:
    """``auto`` → ``frozen`` for fp32 on the CPU when the network is narrow (``flops_per_voxel``
    below :data:`FROZEN_MAX_FLOPS_PER_VOXEL`, or unknown), else ``eager``; ``frozen`` on another
    device or precision is an error."""
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    frozen_possible = device.type == "cpu" and precision == "fp32"
    if engine == "auto":
        narrow = flops_per_voxel is None or flops_per_voxel < FROZEN_MAX_FLOPS_PER_VOXEL
        return "frozen" if frozen_possible and narrow else "eager"
    if engine == "frozen" and not frozen_possible:
        raise InputError(f"engine 'frozen' runs fp32 on the CPU only (device {device}, precision {precision}); "
                         "use --engine eager or auto")
    return engine


def _flops_per_voxel(model: nn.Module) -> float | None:
    """Convolution FLOPs per voxel of one of our U-Nets, counted on ``model`` itself; else None."""
    return 2.0 * network_macs_per_voxel(model) if isinstance(model, ResidualUNet3D) else None


def prepare_network(model: nn.Module, engine: str, device: torch.device, precision: str, channels_last: bool | None,
                    warn: Callable[[str], None]) -> nn.Module:
    """``model`` ready to run on ``device``: in eval mode, moved there, and either frozen for the
    CPU (``engine`` resolves to ``frozen`` and :func:`freeze_for_cpu` succeeds) or eager with
    ``channels_last_3d`` weights where that is faster (CPU and CUDA; ``channels_last`` overrides).
    :func:`predict_volume` restores the contiguous format afterwards."""
    engine = resolve_engine(engine, device, precision, _flops_per_voxel(model))
    model.eval()
    model.to(device)
    network = freeze_for_cpu(model, on_warning=warn) if engine == "frozen" else None
    if network is not None:
        return network
    if device.type in ("cpu", "cuda") if channels_last is None else bool(channels_last):
        model.to(memory_format=torch.channels_last_3d)
    return model
