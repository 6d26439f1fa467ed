"""Where a run executes: device, DistributedDataParallel under ``torchrun``, AMP, seeding."""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.errors import InputError

if TYPE_CHECKING:
    from .config import TrainConfig


@dataclass
class DistInfo:
    """Where this process sits in a (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Any = None  # torch.device
    owns_group: bool = False  # this call created the process group (and destroys it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(config: TrainConfig) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1), else a single process.

    Backend: nccl when the ranks train on CUDA, gloo otherwise (CPU). Each rank trains on
    ``cuda:LOCAL_RANK`` when ``device`` is auto/cuda.
    """
    import torch  # lazy: `iwseg` starts without torch
    import torch.distributed as dist  # lazy: `iwseg` starts without torch

    from ..inference.devices import resolve_device  # lazy: imports torch

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(config.device, local_rank=local_rank, option="device: ")
    info = DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)
    if world_size > 1 and not dist.is_initialized():
        info.owns_group = True
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(
            backend=backend, timeout=datetime.timedelta(minutes=config.ddp_timeout_min), **kwargs
        )
    return info


def cleanup_distributed() -> None:
    import torch.distributed as dist  # lazy: `iwseg` starts without torch

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait until every rank of a distributed run reaches this point (nothing in a single-process run)."""
    if info.distributed:
        import torch.distributed as dist  # lazy: `iwseg` starts without torch

        if info.device is not None and info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def amp_settings(config: TrainConfig, device) -> tuple[bool, Any, bool]:
    """``(enabled, dtype, use_grad_scaler)`` for ``torch.autocast`` on ``device``."""
    import torch  # lazy: `iwseg` starts without torch

    mode = config.amp
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return False, None, False
    if device.type != "cuda":
        if mode == "fp16":
            raise InputError("config key 'amp': fp16 needs a CUDA device; use amp: bf16 or off on CPU")
        return True, torch.bfloat16, False
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mode == "bf16":
        return True, torch.bfloat16, False
    return True, torch.float16, True


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices) global generators."""
    import torch  # lazy: `iwseg` starts without torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
