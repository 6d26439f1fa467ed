"""Where inference runs: device and precision resolution, autocast."""

from __future__ import annotations

import contextlib

import torch

from ..core.devices import DEVICES, PRECISIONS
from ..core.errors import InputError


def resolve_device(name: str | torch.device | None = "auto", *, local_rank: int | None = None,
                   option: str = "--device ") -> torch.device:
    """The ``torch.device`` for a device name, for inference and training alike.

    Args:
        name: ``"auto"`` (CUDA if available, else Apple MPS, else the CPU), ``"cpu"``, ``"cuda"``,
            ``"cuda:N"`` or ``"mps"`` (see :data:`~IWSegmentationLib.core.devices.DEVICES`).
        local_rank: a training rank under ``torchrun``: ``auto`` and a bare ``cuda`` become
            ``cuda:LOCAL_RANK`` (modulo the visible GPUs). None (inference): a bare ``cuda``.
        option: how the user sets the device, for the messages (``"--device "`` on the command
            line, ``"device: "`` in a training config).

    Raises:
        InputError: an unknown or unavailable device, saying what to use instead.
    """
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return _cuda(None, local_rank)
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)} (or cuda:N)") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                "device 'cuda' is not available (this PyTorch build has no CUDA or no GPU is visible); "
                f"use {option}auto (falls back to the CPU) or {option}cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
        return _cuda(device.index, local_rank)
    if device.type == "mps":
        if not _mps_available():
            raise InputError(f"device 'mps' (Apple GPU) is not available here; use {option}auto or {option}cpu")
        return device
    raise InputError(f"unsupported device {name!r}; choose one of {', '.join(DEVICES)}")


def _cuda(index: int | None, local_rank: int | None) -> torch.device:
    """``cuda:index``; without an index, ``cuda:LOCAL_RANK`` for a training rank, else plain ``cuda``."""
    if index is not None:
        return torch.device("cuda", index)
    if local_rank is None:
        return torch.device("cuda")
    return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def autocast_context(device: torch.device, precision: str):
    """The autocast context for ``precision`` on ``device`` (a null context for fp32)."""
    if precision in ("fp16", "bf16") and device.type in ("cuda", "cpu", "mps"):
        return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)
    return contextlib.nullcontext()


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is fp16 autocast on CUDA and fp32 elsewhere; fp16 on the CPU is refused (slow, and
    not what anyone wants); bf16 is allowed everywhere (opt-in on the CPU: ~2x faster where the CPU
    has AVX-512 bf16 or AMX, at a small accuracy cost — see docs/inference.md)."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise InputError("precision 'fp16' needs a GPU; on the CPU use 'fp32' or 'bf16'")
    return precision
