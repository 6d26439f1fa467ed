"""Voxel weights for the loss family.

* **Inverse weights** (Shirokikh et al., MICCAI 2020, eq. 1): a patch of N voxels is split
  into its K lesions ``L_1..L_K`` plus the background ``L_0``; every voxel of component j
  gets ``w_j = N / ((K+1)·|L_j|)``. Small lesions get large weights, so each component
  contributes the same total weight N/(K+1). :func:`component_weights` (from a label map)
  and :func:`inverse_weights` (from a binary mask).
* **Class-balancing weights**: the adaptive positive weight of WCE,
  ``(n − Σp)/Σp`` (:func:`positive_class_weight`, :func:`class_balance_weights`), and
  the GDL class weights ``1/(1 + (Σt_c)²)`` (:func:`gdl_class_weights`).
* **Dilated balancing weights** of DBCE (arXiv 2412.06045): balanced-CE weights computed
  on the lesion mask dilated by a ball of radius R (:func:`dilated_balance_weights`).

Every function takes a numpy array ``(D, H, W)`` or a torch tensor ``(B, 1, D, H, W)``
(weights per sample) and returns float32 of the same shape and kind (a tensor on the
input's device). The formulas, with sources, are in ``docs/losses.md``.

Speed: the inverse weights cost one labelling pass, one ``bincount`` and one table lookup
per sample, independent of the number of lesions (no per-component loop).
"""

from __future__ import annotations

import math
import numbers
import sys
from typing import Any, Callable

import numpy as np

from .errors import InputError
from .lesions import CONNECTIVITIES, label_components

WEIGHT_MODES = ("clip", "exact")

#: Label ids above this (and above 4·N) are renumbered with ``np.unique`` instead of being
#: counted with a ``bincount`` of length max_id + 1.
_DENSE_ID_LIMIT = 1 << 24


# --------------------------------------------------------------------------- input handling


def _is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")  # never import torch for a numpy call
    return torch is not None and isinstance(x, torch.Tensor)


def _check_array(x: Any, name: str) -> None:
    """Accept a numpy (D,H,W) array or a torch (B,1,D,H,W) tensor; raise InputError otherwise."""
    if _is_tensor(x):
        if x.ndim != 5 or x.shape[1] != 1:
            raise InputError(f"{name} must be a tensor of shape (B, 1, D, H, W), got {tuple(x.shape)}")
        if x.is_complex():
            raise InputError(f"{name} must be real, got dtype {x.dtype}")
    elif isinstance(x, np.ndarray):
        if x.ndim != 3:
            raise InputError(f"{name} must be a 3D array (D, H, W), got shape {x.shape}")
        if x.dtype.kind not in "biuf":
            raise InputError(f"{name} must be a boolean, integer or float array, got dtype {x.dtype}")
    else:
        raise InputError(f"{name} must be a numpy array (D, H, W) or a torch tensor (B, 1, D, H, W), "
                         f"got {type(x).__name__}")


def _mask_to_numpy(x) -> np.ndarray:
    """CPU numpy view of a (B,1,D,H,W) mask tensor (no copy for CPU tensors of numpy dtypes);
    dtypes numpy lacks (bfloat16) become ``x != 0`` first. Single-threaded numpy does the
    comparisons later, which stays fast when other work shares the cores."""
    import torch  # lazy: core stays torch-free (evaluation uses it)

    x = x.detach()
    if x.dtype == torch.bfloat16 or x.is_complex():
        x = x != 0
    return x.cpu().numpy()


def _check_mode(mode: str, w_min: float, w_max: float) -> None:
    if mode not in WEIGHT_MODES:
        raise InputError(f"weight mode must be one of {WEIGHT_MODES}, got {mode!r}")
    bounds_ok = all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                    for v in (w_min, w_max))
    if mode == "clip" and not (bounds_ok and 0 < w_min <= w_max):
        raise InputError(f"clip bounds must satisfy 0 < w_min <= w_max (finite numbers), "
                         f"got w_min={w_min!r} w_max={w_max!r}")


# --------------------------------------------------------------------------- inverse weights


def _weight_table(counts: np.ndarray, n: int, mode: str, w_min: float, w_max: float) -> np.ndarray:
    """Weight of every label id from its voxel count: ``n / (C·count)`` where C is the number of
    components present (label ids with count > 0, background included when present)."""
    present = counts > 0
    n_components = int(np.count_nonzero(present))
    table = np.zeros(counts.shape, np.float64)
    table[present] = n / (n_components * counts[present].astype(np.float64))
    if mode == "clip":
        np.clip(table, w_min, w_max, out=table)
    return table.astype(np.float32)


def _check_label_dtype(dtype) -> None:
    if getattr(dtype, "kind", "") not in ("i", "u"):
        raise InputError(f"labels must be an integer component label map, got dtype {dtype} "
                         "(use inverse_weights for a binary mask)")


def _fill_weights(labels: np.ndarray, out: np.ndarray, mode: str, w_min: float, w_max: float,
                  lesion: np.ndarray | None = None) -> None:
    """Write the inverse weights of one (D,H,W) label map into ``out`` (float32, same shape).

    Cost: one pass to find the lesion voxels (skipped when ``lesion``, the boolean mask
    ``labels != 0``, is given), a ``bincount`` of the lesion voxels' ids only, one fill and
    one masked store, whatever the number of lesions. Plain single-threaded numpy on
    purpose: measured here, torch's multi-threaded kernels lose to it as soon as other work
    shares the cores (a training step, data-loader workers).
    """
    _check_label_dtype(labels.dtype)
    n = labels.size
    if n == 0:
        return
    if lesion is None:
        lesion = labels != 0
    ids = labels[lesion]  # ids of the lesion voxels only: usually a small fraction of N
    if ids.size and int(ids.min()) < 0:
        raise InputError("labels must be >= 0 (0 = background, each positive id one lesion)")
    max_id = int(ids.max()) if ids.size else 0
    if max_id >= 2**63:
        raise InputError("label ids must be below 2**63")
    if max_id >= _DENSE_ID_LIMIT and max_id > 4 * n:
        # Very sparse ids (e.g. hashed): renumber once, O(n log n) on lesion voxels only.
        _, ids = np.unique(ids, return_inverse=True)
        ids = ids.reshape(-1) + 1
        max_id = int(ids.max())
    counts = np.bincount(ids.astype(np.intp, copy=False), minlength=max_id + 1)
    counts[0] = n - ids.size  # background voxels
    table = _weight_table(counts, n, mode, w_min, w_max)
    out.fill(table[0])
    out[lesion] = table[ids]


def _run_per_sample(x, fill: Callable[[np.ndarray, np.ndarray], None]):
    """Call ``fill(sample, out)`` on a numpy (D,H,W) array, or on every (D,H,W) sample of a
    (B,1,D,H,W) CPU tensor, with ``out`` the float32 (D,H,W) array to write the weights into.
    Returns float32 weights with the shape and kind of ``x``."""
    out = np.empty(tuple(x.shape), np.float32)
    if _is_tensor(x):
        import torch  # lazy: core stays torch-free (evaluation uses it)

        arr = x.numpy()
        for b in range(arr.shape[0]):
            fill(arr[b, 0], out[b, 0])
        return torch.from_numpy(out)
    fill(x, out)
    return out


def component_weights(labels, *, mode: str = "clip", w_min: float = 1.0, w_max: float = 2e5):
    """Inverse weights from a component label map (eq. 1 of Shirokikh et al., MICCAI 2020).

    ``labels``: 0 = background, each positive id one lesion; a numpy (D,H,W) integer array
    or a torch (B,1,D,H,W) integer tensor (weights computed per sample). Ids need not be
    contiguous: a crop of a whole-image label map is fine, and only the components present
    in it count (the paper labels the whole image and weighs each training patch with
    in-patch voxel counts).

    Every voxel of component j gets ``w_j = N / (C·|L_j|)``, with N the voxels of the map and
    C the number of components present: K+1 with K lesions and the background (just K for a
    map with no background voxel). ``mode="exact"`` returns that (the weights sum to N);
    ``mode="clip"`` clips to ``[w_min, w_max]`` as the authors' code did (defaults 1 and 2e5,
    so the background weight becomes 1 and nothing is renormalised).

    Returns float32 weights of the input's shape and kind (a tensor on its device).
    """
    _check_array(labels, "labels")
    if _is_tensor(labels):
        import torch  # lazy: core stays torch-free (evaluation uses it)

        if labels.is_floating_point() or labels.dtype == torch.bool:
            _check_label_dtype(labels.dtype)
        labels = labels.detach()
        device, labels = labels.device, labels.cpu()
    _check_mode(mode, w_min, w_max)

    def fill(sample: np.ndarray, out: np.ndarray) -> None:
        _fill_weights(sample, out, mode, w_min, w_max)

    out = _run_per_sample(labels, fill)
    return out.to(device) if _is_tensor(out) else out


def inverse_weights(mask, *, connectivity: int = 26, mode: str = "clip", w_min: float = 1.0,
                    w_max: float = 2e5):
    """Inverse weights of a binary mask: label its components with
    :func:`~IWSegmentationLib.core.lesions.label_components` (``connectivity`` 6, 18 or 26; the
    paper uses 26), then :func:`component_weights`. Nonzero voxels are lesion.

    ``mask``: numpy (D,H,W) or torch (B,1,D,H,W) (labelled and weighted per sample).
    Returns float32 weights of the input's shape and kind.
    """
    _check_array(mask, "mask")
    _check_mode(mode, w_min, w_max)
    if connectivity not in CONNECTIVITIES:
        raise InputError(f"connectivity must be one of {CONNECTIVITIES}, got {connectivity}")
    if _is_tensor(mask):
        import torch  # lazy: core stays torch-free (evaluation uses it)

        arr = _mask_to_numpy(mask)
        out = np.empty(arr.shape, np.float32)
        for b in range(arr.shape[0]):
            _fill_labelled(arr[b, 0], out[b, 0], connectivity, mode, w_min, w_max)
        return torch.from_numpy(out).to(mask.device)
    out = np.empty(mask.shape, np.float32)
    _fill_labelled(mask, out, connectivity, mode, w_min, w_max)
    return out


def _fill_labelled(mask: np.ndarray, out: np.ndarray, connectivity: int, mode: str, w_min: float,
                   w_max: float) -> None:
    lesion = mask != 0
    labels, _ = label_components(lesion, connectivity)
    _fill_weights(labels, out, mode, w_min, w_max, lesion=lesion)


# --------------------------------------------------------------------------- class balancing


def positive_class_weight(foreground, *, per_sample: bool = True, min_sum: float = 1.0):
    """Adaptive positive-class weight of WCE: ``(n − Σf) / max(Σf, min_sum)``.

    ``foreground`` is a binary target or predicted probabilities (the paper's WCE uses the
    predicted probabilities p, Table 1). ``min_sum`` (in voxels) keeps the weight finite when
    nothing is foreground: the weight is then at most ``n − Σf``. numpy (D,H,W) -> float;
    torch (B,1,D,H,W) -> a (B,) tensor, or a 0-d tensor over the whole batch with
    ``per_sample=False`` (n = numel, as the authors' code). Differentiable for tensors:
    detach the input if the weight must be a constant.
    """
    _check_array(foreground, "foreground")
    if not (min_sum > 0 and math.isfinite(min_sum)):
        raise InputError(f"min_sum must be a positive number, got {min_sum}")
    if _is_tensor(foreground):
        f = foreground.float()
        if per_sample:
            s = f.sum(dim=(1, 2, 3, 4))
            n = f[0].numel()
        else:
            s = f.sum()
            n = f.numel()
        return (n - s) / s.clamp_min(min_sum)
    s = float(np.sum(foreground, dtype=np.float64))
    return (foreground.size - s) / max(s, min_sum)


def class_balance_weights(target, *, reference=None, per_sample: bool = True, min_sum: float = 1.0):
    """Voxel weights of weighted cross-entropy: 1 on background voxels and the positive weight
    :func:`positive_class_weight` of ``reference`` (default: the target itself, i.e. inverse
    class-frequency ratio) on lesion voxels: ``w = 1 + (w₊ − 1)·t``.

    ``target``: binary numpy (D,H,W) or torch (B,1,D,H,W). Returns float32 of the same kind.
    """
    _check_array(target, "target")
    reference = target if reference is None else reference
    _check_array(reference, "reference")
    if tuple(reference.shape) != tuple(target.shape):
        raise InputError(f"reference shape {tuple(reference.shape)} differs from target shape {tuple(target.shape)}")
    if _is_tensor(target):
        w_pos = positive_class_weight(reference.detach(), per_sample=per_sample, min_sum=min_sum)
        if w_pos.ndim == 1:
            w_pos = w_pos.view(-1, 1, 1, 1, 1)
        t = target.detach().float()
        return (1.0 + (w_pos.to(t.device) - 1.0) * t).float()
    w_pos = positive_class_weight(reference, min_sum=min_sum)
    return (1.0 + (w_pos - 1.0) * np.asarray(target, np.float64)).astype(np.float32)


def gdl_class_weights(target, *, smooth: float = 1.0):
    """Class weights of the two-class Generalized Dice loss: ``W_c = 1 / (smooth + (Σ t_c)²)``
    for c = lesion (t) and background (1 − t).

    Table 1 of the paper writes ``w_c² = 1/(Σ t_c)²``; the authors' code adds 1 to the squared
    volume (``smooth=1``) so an empty class does not divide by zero (MONAI uses ``1/(Σt)²``
    and replaces infinities). numpy (D,H,W) -> array ``[W_lesion, W_background]`` (float64);
    torch (B,1,D,H,W) -> (B, 2) float32 tensor.
    """
    _check_array(target, "target")
    if not (smooth > 0 and math.isfinite(smooth)):
        raise InputError(f"GDL smooth must be a positive number, got {smooth}")
    if _is_tensor(target):
        import torch  # lazy: core stays torch-free (evaluation uses it)

        t = target.detach().float()
        fg = t.sum(dim=(1, 2, 3, 4))
        bg = t[0].numel() - fg
        vols = torch.stack([fg, bg], dim=1)
        return 1.0 / (smooth + vols * vols)
    fg = float(np.sum(target, dtype=np.float64))
    vols = np.array([fg, target.size - fg])
    return 1.0 / (smooth + vols * vols)


# --------------------------------------------------------------------------- DBCE


def dilate_ball(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary dilation of a (D,H,W) mask by the closed Euclidean ball of ``radius`` voxels:
    the voxels whose centre is at distance ≤ radius from a mask voxel's centre.

    Exact, via the separable squared Euclidean distance
    ``D(z,y,x) = min_dz [dz² + min_dy [dy² + min_dx [dx² + f]]]`` (f = 0 on the mask),
    each 1D minimum over the offsets |d| ≤ ⌊radius⌋ only and capped just above radius²:
    values above radius² are never needed. Small-integer numpy passes over the mask's
    bounding box grown by ⌊radius⌋, about 6·⌊radius⌋ passes in all.
    """
    fg = np.asarray(mask) != 0
    if radius == 0 or not fg.any():
        return fg
    r = int(math.floor(radius))
    limit = int(math.floor(radius * radius))  # squared distances are integers: D <= R² <=> D <= limit
    slices = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(fg.any(axis=other))
        slices.append(slice(max(int(idx[0]) - r, 0), min(int(idx[-1]) + r + 1, fg.shape[axis])))
    crop = tuple(slices)
    dtype = np.uint16 if 2 * limit + 1 < np.iinfo(np.uint16).max else np.uint32
    cap = dtype(limit + 1)
    dist = np.where(fg[crop], dtype(0), cap)
    for axis in range(3):
        out = dist.copy()
        n = dist.shape[axis]
        for d in range(1, min(r, n - 1) + 1):
            step = dtype(d * d)
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[axis], hi[axis] = slice(0, n - d), slice(d, n)
            lo, hi = tuple(lo), tuple(hi)
            np.minimum(out[hi], dist[lo] + step, out=out[hi])  # neighbour at -d
            np.minimum(out[lo], dist[hi] + step, out=out[lo])  # neighbour at +d
        np.minimum(out, cap, out=out)
        dist = out
    result = np.zeros(fg.shape, bool)
    result[crop] = dist <= limit
    return result


def _dbce_sample(mask: np.ndarray, out: np.ndarray, radius: float) -> None:
    dilated = dilate_ball(mask, radius)
    n = dilated.size
    d = int(np.count_nonzero(dilated))
    if d in (0, n):
        out.fill(1.0)
        return
    w_in, w_out = n / (2.0 * d), n / (2.0 * (n - d))
    np.copyto(out, np.where(dilated, np.float32(w_in), np.float32(w_out)))


def dilated_balance_weights(mask, *, radius: float = 3.0):
    """Voxel weights of the Dilated Balanced Cross-Entropy (DBCE, arXiv 2412.06045).

    Let ``D`` be the lesion mask dilated by a ball of ``radius`` voxels
    (:func:`dilate_ball`) and N the voxels of the patch. Voxels in D (lesions and their
    surroundings) get ``N / (2|D|)``, the others ``N / (2(N − |D|))``: each side carries half
    the total weight and the weights sum to N. ``radius=0`` is plain balanced CE
    (inverse class frequency). A patch with no lesion (or all lesion after dilation) gets
    weight 1 everywhere. The DBCE paper publishes no code; this formula is ours
    (see docs/losses.md).

    ``mask``: binary numpy (D,H,W) or torch (B,1,D,H,W) (per sample). Returns float32.
    """
    _check_array(mask, "mask")
    if isinstance(radius, bool) or not (isinstance(radius, numbers.Real) and math.isfinite(radius) and radius >= 0):
        raise InputError(f"DBCE radius must be a number >= 0 (voxels), got {radius!r}")
    if _is_tensor(mask):
        import torch  # lazy: core stays torch-free (evaluation uses it)

        arr = _mask_to_numpy(mask)
        out = np.empty(arr.shape, np.float32)
        for b in range(arr.shape[0]):
            _dbce_sample(arr[b, 0], out[b, 0], float(radius))
        return torch.from_numpy(out).to(mask.device)
    out = np.empty(mask.shape, np.float32)
    _dbce_sample(mask, out, float(radius))
    return out


__all__ = [
    "WEIGHT_MODES",
    "class_balance_weights",
    "component_weights",
    "dilate_ball",
    "dilated_balance_weights",
    "gdl_class_weights",
    "inverse_weights",
    "positive_class_weight",
]
