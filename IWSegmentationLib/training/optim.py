"""The optimiser and the learning-rate schedule of a run (the paper's SGD + step decay by default)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import TrainConfig


def build_optimizer(model, config: TrainConfig):
    """SGD with (Nesterov) momentum, the paper's optimiser; or Adam/AdamW."""
    import torch  # lazy: `iwseg` starts without torch

    if config.optimizer in ("adam", "adamw"):
        cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
        return cls(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov and config.momentum > 0,
        weight_decay=config.weight_decay,
    )


def build_scheduler(optimizer, config: TrainConfig):
    """Per-epoch schedule (stepped once after every epoch). Its state is plain numbers (no lambdas),
    so it round-trips through the resume state without pickle.

    * ``step``: ``lr`` for the first ``round(lr_decay_at · epochs)`` epochs, then ``lr_final``
      (paper: 1e-2 for epochs 0-79, 1e-3 for epochs 80-99);
    * ``cosine``: cosine annealing from ``lr`` to ``lr_final`` over the epochs;
    * ``constant``: ``lr`` throughout.
    """
    import torch  # lazy: `iwseg` starts without torch

    if config.lr_schedule == "step":
        milestone = max(1, int(round(config.lr_decay_at * config.epochs)))
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[milestone], gamma=config.lr_final / config.lr)
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs, eta_min=config.lr_final)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def lr_at_epoch(config: TrainConfig, epoch: int) -> float:
    """The learning rate the schedule gives during ``epoch`` (0-based); used by the docs and tests."""
    if config.lr_schedule == "step":
        milestone = max(1, int(round(config.lr_decay_at * config.epochs)))
        return config.lr if epoch < milestone else config.lr_final
    if config.lr_schedule == "cosine":
        return config.lr_final + (config.lr - config.lr_final) * (1 + math.cos(math.pi * epoch / config.epochs)) / 2
    return config.lr
