"""The loss family of the inverse-weighting paper, on logits.

Every loss is a ``torch.nn.Module`` called ``loss(logits, target, weight=None)`` with
``logits`` and a binary ``target`` of shape ``(B, 1, D, H, W)`` and returns a scalar.
``weight`` (same shape, >= 0) is a voxel weight map; when it is given every loss uses it:

* voxel-wise losses (``bce``, ``focal``, ``wce``, ``dbce`` and the CE part of ``combo``)
  return the mean over all voxels of ``w·ℓ`` (the mean, not a weighted mean: the weights are
  not renormalised, as the authors trained);
* region losses (``dice``, ``asl``, ``gdl`` and the Dice part of ``combo``) put ``w`` inside
  both sums, compute one value per sample and average over the batch.

The ``iw-*`` losses are the same losses with inverse weights (Shirokikh et al., MICCAI
2020): they use ``weight`` when it is given (e.g. weights of a whole-image label map
cropped to the patch, as the authors trained) and otherwise compute
:func:`~IWSegmentationLib.core.weights.inverse_weights` from the target.

Numerics: probabilities come from ``sigmoid`` and logarithms from ``logsigmoid`` (no
``log(0)``), everything is computed in float32 with autocast disabled (safe under
fp16/bf16 autocast), and region ratios never divide by zero, so gradients are finite
also on all-background and all-foreground patches. Formulas and sources:
``docs/losses.md``; create losses by name with :func:`get_loss`.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import InputError
from ..core.lesions import CONNECTIVITIES
from ..core.weights import (
    WEIGHT_MODES,
    dilated_balance_weights,
    gdl_class_weights,
    inverse_weights,
    positive_class_weight,
)

#: Smallest denominator of a region ratio: an empty sample (no lesion, nothing predicted)
#: gives ratio 0 instead of 0/0. Far below any real sum of weights.
_TINY = 1e-12
_SUM_DIMS = (1, 2, 3, 4)


# --------------------------------------------------------------------------- validation


def _check_number(name: str, value, *, low: float | None = None, high: float | None = None,
                  low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise InputError(f"loss parameter {name} must be a finite number, got {value!r}")
    value = float(value)
    if low is not None and (value < low or (low_open and value == low)):
        raise InputError(f"loss parameter {name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise InputError(f"loss parameter {name} must be <= {high}, got {value}")
    return value


def _check_inputs(logits, target, weight) -> None:
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise InputError("loss inputs must be torch tensors (logits, target)")
    if logits.ndim != 5 or logits.shape[1] != 1:
        raise InputError(f"logits must have shape (B, 1, D, H, W), got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise InputError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if target.shape != logits.shape:
        raise InputError(f"target shape {tuple(target.shape)} differs from logits shape {tuple(logits.shape)}")
    if logits.numel() == 0:
        raise InputError("logits are empty")
    t_min, t_max = torch.aminmax(target.detach().float())
    if not (bool(t_min >= 0) and bool(t_max <= 1)):  # also catches NaN
        raise InputError(f"target must be binary (values in [0, 1]), got values in [{float(t_min)}, {float(t_max)}]")
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise InputError(f"weight must be a torch tensor, got {type(weight).__name__}")
        if weight.shape != logits.shape:
            raise InputError(f"weight shape {tuple(weight.shape)} differs from logits shape {tuple(logits.shape)}")
        w = weight.detach().float()
        if not bool(torch.isfinite(w).all()) or not bool(w.min() >= 0):
            raise InputError("weight must be finite and >= 0")


def _no_autocast(device: torch.device):
    """Context that disables autocast on ``device`` (nothing where autocast is unavailable)."""
    available = getattr(torch.amp, "is_autocast_available", None)
    if available is not None and not available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def _weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean over all voxels of ``w·values`` (the plain mean when there is no weight)."""
    return values.mean() if weight is None else (weight * values).mean()


def _wsum(x: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Per-sample sum of ``w·x`` over (C, D, H, W): shape (B,)."""
    return (x if weight is None else weight * x).sum(dim=_SUM_DIMS)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return num / den.clamp_min(_TINY)


# --------------------------------------------------------------------------- base


class SegmentationLoss(nn.Module):
    """Base class: validates ``(logits, target, weight)``, computes in float32 without
    autocast, and calls :meth:`compute` with ``x`` (logits), ``t`` (target) and ``w``
    (the weight map or None)."""

    name = ""

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        _check_inputs(logits, target, weight)
        with _no_autocast(logits.device):
            x = logits.float()
            t = target.detach().to(device=x.device, dtype=torch.float32)
            w = self.resolve_weight(target, weight)
            if w is not None:
                w = w.detach().to(device=x.device, dtype=torch.float32)
            return self.compute(x, t, w)

    def resolve_weight(self, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor | None:
        """The weight map to use; plain losses use ``weight`` as given."""
        return weight

    def compute(self, x: torch.Tensor, t: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


# --------------------------------------------------------------------------- voxel-wise losses


class BCELoss(SegmentationLoss):
    """Binary cross-entropy on logits.

    ``ℓ_i = −[t_i log p_i + (1 − t_i) log(1 − p_i)]``, p = σ(x), computed as
    ``softplus(x) − t·x``; returns ``mean_i(w_i ℓ_i)``.
    Source: Table 1 of Shirokikh et al., MICCAI 2020 (BCE / iw-BCE).
    """

    name = "bce"

    def compute(self, x, t, w):
        return _weighted_mean(F.binary_cross_entropy_with_logits(x, t, reduction="none"), w)


class FocalLoss(SegmentationLoss):
    """Focal loss (Lin et al., ICCV 2017) in the form of Table 1 of Shirokikh et al.:

    ``ℓ_i = −[α (1 − p_i)^γ t_i log p_i + (1 − α) p_i^γ (1 − t_i) log(1 − p_i)]``,
    returns ``mean_i(w_i ℓ_i)``. Defaults α = 0.75 (chosen on validation by the paper), γ = 2.
    Powers are taken as ``exp(γ·logσ)`` so the gradient stays finite for any γ >= 0.
    """

    name = "focal"

    def __init__(self, alpha: float = 0.75, gamma: float = 2.0):
        super().__init__()
        self.alpha = _check_number("alpha", alpha, low=0.0, high=1.0)
        self.gamma = _check_number("gamma", gamma, low=0.0)

    def compute(self, x, t, w):
        log_p, log_q = F.logsigmoid(x), F.logsigmoid(-x)  # log p, log(1 − p)
        pos = self.alpha * torch.exp(self.gamma * log_q) * t * log_p
        neg = (1.0 - self.alpha) * torch.exp(self.gamma * log_p) * (1.0 - t) * log_q
        return _weighted_mean(-(pos + neg), w)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}"


class WCELoss(SegmentationLoss):
    """Weighted cross-entropy with the adaptive positive weight of Table 1 (Shirokikh et al.;
    after Ronneberger et al. 2015):

    ``ℓ_i = −[w₊ t_i log p_i + (1 − t_i) log(1 − p_i)]``, ``w₊ = (n − Σp) / Σp``,
    from the predicted probabilities p (detached: a constant per step), over the whole
    batch (n = numel, as the authors' code) or per sample with ``per_sample=True``.
    ``Σp`` is floored at ``min_sum`` voxels, so ``w₊ <= n``. Returns ``mean_i(w_i ℓ_i)``.
    """

    name = "wce"

    def __init__(self, per_sample: bool = False, min_sum: float = 1.0):
        super().__init__()
        self.per_sample = bool(per_sample)
        self.min_sum = _check_number("min_sum", min_sum, low=0.0, low_open=True)

    def compute(self, x, t, w):
        w_pos = positive_class_weight(torch.sigmoid(x).detach(), per_sample=self.per_sample, min_sum=self.min_sum)
        if w_pos.ndim == 1:
            w_pos = w_pos.view(-1, 1, 1, 1, 1)
        loss = -(w_pos * t * F.logsigmoid(x) + (1.0 - t) * F.logsigmoid(-x))
        return _weighted_mean(loss, w)

    def extra_repr(self) -> str:
        return f"per_sample={self.per_sample}, min_sum={self.min_sum}"


class DBCELoss(SegmentationLoss):
    """Dilated Balanced Cross-Entropy (Hosseini & Soleymani Baghshah, arXiv 2412.06045).

    ``ℓ_i = BCE_i``, returns ``mean_i(w_i · d_i · ℓ_i)`` with d the dilated balancing weights
    of :func:`~IWSegmentationLib.core.weights.dilated_balance_weights`: with D the lesion mask
    dilated by a ball of ``radius`` voxels and N the voxels of the sample,
    ``d_i = N / (2|D|)`` inside D and ``N / (2(N − |D|))`` outside (1 everywhere when D is
    empty or the whole patch). The paper publishes no code; this precise formula is ours.
    """

    name = "dbce"

    def __init__(self, radius: float = 3.0):
        super().__init__()
        self.radius = _check_number("radius", radius, low=0.0)

    def compute(self, x, t, w):
        d = dilated_balance_weights(t, radius=self.radius)
        w = d if w is None else w * d
        return _weighted_mean(F.binary_cross_entropy_with_logits(x, t, reduction="none"), w)

    def extra_repr(self) -> str:
        return f"radius={self.radius}"


# --------------------------------------------------------------------------- region losses


class DiceLoss(SegmentationLoss):
    """Soft Dice loss (Milletari et al., 3DV 2016), Table 1 of Shirokikh et al.:

    per sample ``1 − 2 Σ w p t / Σ w (p² + t²)``, mean over the batch; no smoothing term
    (an empty sample with nothing predicted gives 1 with zero gradient, not 0/0).
    """

    name = "dice"

    def compute(self, x, t, w):
        p = torch.sigmoid(x)
        return (1.0 - _ratio(2.0 * _wsum(p * t, w), _wsum(p * p + t * t, w))).mean()


class ASLLoss(SegmentationLoss):
    """Asymmetric similarity loss (Hashemi et al., IEEE Access 2018), F_β-based.

    Table 1 of Shirokikh et al. (default, ``squared=False``): per sample
    ``1 − (1 + β²) Σ w p t / Σ w (β² t + p)``. The authors' code trained with the squared
    denominator ``Σ w (β² t² + p²)`` (``squared=True``; with β = 1 that is the Dice loss).
    Mean over the batch; β = 1.5 as in the paper.
    """

    name = "asl"

    def __init__(self, beta: float = 1.5, squared: bool = False):
        super().__init__()
        self.beta = _check_number("beta", beta, low=0.0, low_open=True)
        self.squared = bool(squared)

    def compute(self, x, t, w):
        p = torch.sigmoid(x)
        b2 = self.beta**2
        den = b2 * t * t + p * p if self.squared else b2 * t + p
        return (1.0 - _ratio((1.0 + b2) * _wsum(p * t, w), _wsum(den, w))).mean()

    def extra_repr(self) -> str:
        return f"beta={self.beta}, squared={self.squared}"


class GDLLoss(SegmentationLoss):
    """Two-class Generalized Dice loss (Sudre et al., DLMIA 2017), Table 1 of Shirokikh et al.:

    per sample ``1 − 2 Σ_c W_c Σ_i w p_ci t_ci / Σ_c W_c Σ_i w (p_ci² + t_ci²)`` over the
    classes c = lesion (p, t) and background (1 − p, 1 − t), with class weights
    ``W_c = 1 / (smooth + (Σ_i t_ci)²)`` from the target (smooth = 1 as the authors' code;
    MONAI uses ``1/(Σt)²``). ``squared=False`` uses ``p + t`` in the denominator (Sudre's
    form). Mean over the batch.
    """

    name = "gdl"

    def __init__(self, smooth: float = 1.0, squared: bool = True):
        super().__init__()
        self.smooth = _check_number("smooth", smooth, low=0.0, low_open=True)
        self.squared = bool(squared)

    def compute(self, x, t, w):
        cw = gdl_class_weights(t, smooth=self.smooth).to(x.device)  # (B, 2)
        num = x.new_zeros(x.shape[0])
        den = x.new_zeros(x.shape[0])
        for c, (p_c, t_c) in enumerate(((torch.sigmoid(x), t), (torch.sigmoid(-x), 1.0 - t))):
            num = num + cw[:, c] * _wsum(p_c * t_c, w)
            den = den + cw[:, c] * _wsum(p_c * p_c + t_c * t_c if self.squared else p_c + t_c, w)
        return (1.0 - _ratio(2.0 * num, den)).mean()

    def extra_repr(self) -> str:
        return f"smooth={self.smooth}, squared={self.squared}"


class ComboLoss(SegmentationLoss):
    """Combo loss, the formula of the paper (Taghanaki et al., CMIG 2019, arXiv 1805.02798):

    ``L = α · mean_i(w_i · −[β t_i log p_i + (1 − β)(1 − t_i) log(1 − p_i)]) − (1 − α) · DSC``,
    ``DSC = (2 Σ w p t + S) / (Σ w (p + t) + S)`` per sample, mean over the batch.
    Defaults α = β = 0.5, S = 1 (the paper's smoothing). L lies in [−(1 − α), ∞).
    The authors' Keras code differs from this formula in the background CE term (see
    docs/losses.md); we implement the paper.
    """

    name = "combo"

    def __init__(self, alpha: float = 0.5, beta: float = 0.5, smooth: float = 1.0):
        super().__init__()
        self.alpha = _check_number("alpha", alpha, low=0.0, high=1.0)
        self.beta = _check_number("beta", beta, low=0.0, high=1.0)
        self.smooth = _check_number("smooth", smooth, low=0.0)

    def compute(self, x, t, w):
        ce = -(self.beta * t * F.logsigmoid(x) + (1.0 - self.beta) * (1.0 - t) * F.logsigmoid(-x))
        p = torch.sigmoid(x)
        dsc = _ratio(2.0 * _wsum(p * t, w) + self.smooth, _wsum(p + t, w) + self.smooth)
        return self.alpha * _weighted_mean(ce, w) - (1.0 - self.alpha) * dsc.mean()

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, smooth={self.smooth}"


# --------------------------------------------------------------------------- inverse weighting


class _InverseWeighted:
    """Mixin of the ``iw-*`` losses: ``weight`` when given, else inverse weights of the target
    (:func:`~IWSegmentationLib.core.weights.inverse_weights`: components with ``connectivity``,
    ``w_j = N/((K+1)|L_j|)``, clipped to [w_min, w_max] in ``mode="clip"``)."""

    def _init_iw(self, connectivity: int, mode: str, w_min: float, w_max: float) -> None:
        if connectivity not in CONNECTIVITIES:
            raise InputError(f"loss parameter connectivity must be one of {CONNECTIVITIES}, got {connectivity!r}")
        if mode not in WEIGHT_MODES:
            raise InputError(f"loss parameter mode must be one of {WEIGHT_MODES}, got {mode!r}")
        self.connectivity, self.mode = connectivity, mode
        self.w_min = _check_number("w_min", w_min, low=0.0, low_open=True)
        self.w_max = _check_number("w_max", w_max, low=self.w_min)

    def resolve_weight(self, target, weight):
        if weight is not None:
            return weight
        return inverse_weights(target.detach(), connectivity=self.connectivity, mode=self.mode,
                               w_min=self.w_min, w_max=self.w_max)

    def _iw_repr(self) -> str:
        return f"connectivity={self.connectivity}, mode={self.mode!r}, w_min={self.w_min}, w_max={self.w_max}"


class IWBCELoss(_InverseWeighted, BCELoss):
    """iw-BCE: ``mean_i(w_i ℓ_i)`` with BCE ℓ and inverse weights w (Table 1, Shirokikh et al.)."""

    name = "iw-bce"

    def __init__(self, connectivity: int = 26, mode: str = "clip", w_min: float = 1.0, w_max: float = 2e5):
        super().__init__()
        self._init_iw(connectivity, mode, w_min, w_max)

    def extra_repr(self) -> str:
        return self._iw_repr()


class IWFocalLoss(_InverseWeighted, FocalLoss):
    """iw-Focal: the focal loss of :class:`FocalLoss` with inverse weights (Table 1, Shirokikh et al.)."""

    name = "iw-focal"

    def __init__(self, alpha: float = 0.75, gamma: float = 2.0, connectivity: int = 26, mode: str = "clip",
                 w_min: float = 1.0, w_max: float = 2e5):
        super().__init__(alpha=alpha, gamma=gamma)
        self._init_iw(connectivity, mode, w_min, w_max)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._iw_repr()}"


class IWDiceLoss(_InverseWeighted, DiceLoss):
    """iw-Dice: ``1 − 2 Σ w p t / Σ w (p² + t²)`` with inverse weights (Table 1, Shirokikh et al.)."""

    name = "iw-dice"

    def __init__(self, connectivity: int = 26, mode: str = "clip", w_min: float = 1.0, w_max: float = 2e5):
        super().__init__()
        self._init_iw(connectivity, mode, w_min, w_max)

    def extra_repr(self) -> str:
        return self._iw_repr()


class IWASLLoss(_InverseWeighted, ASLLoss):
    """iw-ASL: ``1 − (1 + β²) Σ w p t / Σ w (β² t + p)`` with inverse weights (Table 1,
    Shirokikh et al.; ``squared=True`` for the code's ``β² t² + p²``)."""

    name = "iw-asl"

    def __init__(self, beta: float = 1.5, squared: bool = False, connectivity: int = 26, mode: str = "clip",
                 w_min: float = 1.0, w_max: float = 2e5):
        super().__init__(beta=beta, squared=squared)
        self._init_iw(connectivity, mode, w_min, w_max)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._iw_repr()}"


class IWComboLoss(_InverseWeighted, ComboLoss):
    """iw-Combo: ``α · mean_i(w_i · CE_β,i) − (1 − α) · (2 Σ w p t + S) / (Σ w (p + t) + S)``, the
    Combo loss (Taghanaki et al., arXiv 1805.02798; :class:`ComboLoss`) with the inverse weights
    of Shirokikh et al. (MICCAI 2020) in the CE mean and in both Dice sums (our combination;
    the inverse-weighting paper does not evaluate Combo)."""

    name = "iw-combo"

    def __init__(self, alpha: float = 0.5, beta: float = 0.5, smooth: float = 1.0, connectivity: int = 26,
                 mode: str = "clip", w_min: float = 1.0, w_max: float = 2e5):
        super().__init__(alpha=alpha, beta=beta, smooth=smooth)
        self._init_iw(connectivity, mode, w_min, w_max)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._iw_repr()}"


# --------------------------------------------------------------------------- registry

_LOSSES: dict[str, type[SegmentationLoss]] = {
    cls.name: cls
    for cls in (BCELoss, FocalLoss, WCELoss, DiceLoss, ASLLoss, GDLLoss, DBCELoss, ComboLoss,
                IWBCELoss, IWFocalLoss, IWDiceLoss, IWASLLoss, IWComboLoss)
}

#: Every loss name :func:`get_loss` accepts.
LOSS_NAMES: tuple[str, ...] = tuple(_LOSSES)


def loss_parameters(name: str) -> dict[str, object]:
    """The parameters of loss ``name`` and their defaults."""
    cls = _LOSSES[_normalise(name)]
    return {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"}


def _normalise(name: str) -> str:
    if not isinstance(name, str):
        raise InputError(f"loss name must be a string, got {type(name).__name__}; valid names: {', '.join(LOSS_NAMES)}")
    key = name.strip().lower().replace("_", "-")
    if key not in _LOSSES:
        raise InputError(f"unknown loss {name!r}; valid names: {', '.join(LOSS_NAMES)}")
    return key


def get_loss(name: str, **params) -> SegmentationLoss:
    """Create the loss ``name`` (one of :data:`LOSS_NAMES`; ``_`` and case are ignored) with
    ``params``. Unknown names or parameters, and out-of-range values, raise InputError."""
    key = _normalise(name)
    allowed = loss_parameters(key)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        listing = ", ".join(allowed) if allowed else "none"
        raise InputError(f"unknown parameter(s) {', '.join(unknown)} for loss {key!r}; it takes: {listing}")
    return _LOSSES[key](**params)


__all__ = [
    "LOSS_NAMES",
    "ASLLoss",
    "BCELoss",
    "ComboLoss",
    "DBCELoss",
    "DiceLoss",
    "FocalLoss",
    "GDLLoss",
    "IWASLLoss",
    "IWBCELoss",
    "IWComboLoss",
    "IWDiceLoss",
    "IWFocalLoss",
    "SegmentationLoss",
    "WCELoss",
    "get_loss",
    "loss_parameters",
]
