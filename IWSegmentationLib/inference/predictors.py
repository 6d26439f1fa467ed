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
        return self.mean_of_flips(self.predictor, x, self.flips)

    @staticmethod
    def mean_of_flips(predictor, x: torch.Tensor, flips) -> torch.Tensor:
        """The mean of ``flip(predictor(flip(x, a)), a)`` over the axis subsets ``flips``."""
        total = None
        for dims in flips:
            out = predictor(torch.flip(x, dims) if dims else x).float()
            out = torch.flip(out, dims) if dims else out
            total = out if total is None else total.add_(out)
        return total.div_(len(flips))


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


class MemberPredictor(nn.Module):
    """The members' logits side by side, one output channel each, for per-lesion doubt
    (:mod:`IWSegmentationLib.core.doubt`): the 8 flips of :class:`MirroredPredictor` (one network),
    or the networks of an ensemble (each mirrored when ``tta``; then a member is a network, its
    flips averaged). The sliding window blends each channel on its own; the blend is linear, so the
    mean of the blended channels is the blended mean that :class:`MirroredPredictor` /
    :class:`EnsemblePredictor` give (equal up to float32 rounding). Each member must return one
    channel. A module, so the OOM fallback can move it."""

    def __init__(self, members: Sequence[nn.Module], tta: bool):
        super().__init__()
        if not members:
            raise InputError("doubt needs at least one model")
        self.members = nn.ModuleList(members)
        self.tta = bool(tta)
        self.flips = MirroredPredictor(members[0]).flips
        #: how many channels :meth:`forward` returns
        self.count = len(self.flips) if len(members) == 1 else len(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.members) == 1:  # the members are the flips of one network
            net = self.members[0]
            outs = [(torch.flip(net(torch.flip(x, dims)).float(), dims) if dims else net(x).float())
                    for dims in self.flips]
        else:  # the members are the networks (each mirrored with TTA)
            outs = [(MirroredPredictor.mean_of_flips(m, x, self.flips) if self.tta else m(x).float())
                    for m in self.members]
        if any(o.shape[1] != 1 for o in outs):
            raise InputError(f"the model returns {outs[0].shape[1]} channels; lesion segmentation needs 1")
        return torch.cat(outs, dim=1)
