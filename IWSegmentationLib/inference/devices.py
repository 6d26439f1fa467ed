"""Where inference runs: device and precision resolution, autocast."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..core.errors import InputError

PRECISIONS = ("auto", "fp32", "fp16", "bf16")


DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str | torch.device | None = "auto", *, on_warning: Callable[[str], None] | None = None
                   ) -> torch.device:
    """``"auto"`` -> CUDA if available, else Apple MPS, else CPU; ``"cpu"``/``"cuda[:i]"``/``"mps"``
    are checked and an unavailable one raises :class:`InputError` saying what to use instead."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(
                "device 'cuda' is not available (this PyTorch build has no CUDA or no GPU is visible); "
                "use --device auto (falls back to the CPU) or --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) visible")
        return device
    if device.type == "mps":
        if not _mps_available():
            raise InputError("device 'mps' (Apple GPU) is not available here; use --device auto or --device cpu")
        return device
    raise InputError(f"unsupported device {name!r}; choose one of {', '.join(DEVICES)}")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _autocast(device: torch.device, precision: str):
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
