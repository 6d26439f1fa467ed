"""What a sliding window calls: the network's logits, test-time mirroring and the mean of an ensemble.

Inference blends **logits** (as nnU-Net does): the network's raw output is what the window
blend, test-time mirroring and ensembles average, and the sigmoid is taken once, at the end.
A logit keeps ranking information that a float32 sigmoid loses above about 17 (where it rounds
to exactly 1.0), so a component's confidence -- its maximum logit -- still orders confident
detections. :class:`ProbabilityPredictor` (``sigmoid(model(x))``) is kept for callers that
want probabilities per window.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
from torch import nn

from ..core.errors import InputError


class ProbabilityPredictor(nn.Module):
    """``sigmoid(model(x))`` per window, for callers that blend probabilities (``iwseg predict``
    blends logits). Being a module, it can be moved to the CPU on out-of-memory."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(x))


class MirroredPredictor(nn.Module):
    """Test-time mirroring, as nnU-Net does it: the mean of ``flip(predictor(flip(x, a)), a)`` over
    every subset ``a`` of the three spatial axes (2³ = 8 passes, the identity included).

    Wrap the network (a predictor of logits): the mean is then a mean of logits, as nnU-Net's
    mirroring sums logits. Each window costs 8 forward passes; the Gaussian blend weights are symmetric, so
    mirroring commutes with the sliding window. A module, so the OOM fallback can move it.
    """

    AXES = (2, 3, 4)

    def __init__(self, predictor: nn.Module):
        super().__init__()
        self.predictor = predictor
        self.flips = [dims for r in range(len(self.AXES) + 1) for dims in itertools.combinations(self.AXES, r)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for dims in self.flips:
            out = self.predictor(torch.flip(x, dims) if dims else x).float()
            out = torch.flip(out, dims) if dims else out
            total = out if total is None else total.add_(out)
        return total.div_(len(self.flips))


class EnsemblePredictor(nn.Module):
    """The mean of several predictors' outputs on the same window: an ensemble of checkpoints
    (nnU-Net's folds), averaging logits as nnU-Net does. Build the members' cards' agreement first with
    :func:`check_ensemble`: averaging only makes sense when every member sees the same input."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if not members:
            raise InputError("an ensemble needs at least one model")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = None
        for member in self.members:
            out = member(x).float()
            total = out if total is None else total.add_(out)
        return total.div_(len(self.members))
