"""Intensity normalisation (window, percentile, z-score), the same for training and inference."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..core.errors import InputError
from .presets import validate_params


def check_image(image: np.ndarray) -> None:
    """Refuse (:class:`InputError`) an image that is not a non-empty 3D ``[z, y, x]`` array of
    finite real numbers: every preprocessing entry point checks its input here, once."""
    if not isinstance(image, np.ndarray):
        raise InputError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim != 3:
        raise InputError(f"image must be a 3D array [z, y, x], got shape {image.shape}")
    if not (np.issubdtype(image.dtype, np.number) or image.dtype == bool) or np.iscomplexobj(image):
        raise InputError(f"image must hold real numbers, got dtype {image.dtype}")
    if image.size == 0:
        raise InputError("image is empty")
    # min/max propagate NaN and expose inf without a full-size temporary
    if np.issubdtype(image.dtype, np.floating) and not (
        math.isfinite(float(image.min())) and math.isfinite(float(image.max()))
    ):
        bad = int(np.count_nonzero(~np.isfinite(image)))
        raise InputError(
            f"image holds {bad} NaN or infinite voxel(s); fix or mask them before segmentation"
        )


def check_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``mask`` as a bool array (non-zero = inside), after checking it is a numpy array of the
    image's ``shape``; :class:`InputError` otherwise."""
    if not isinstance(mask, np.ndarray):
        raise InputError(f"mask must be a numpy array, got {type(mask).__name__}")
    if mask.shape != shape:
        raise InputError(f"mask shape {mask.shape} does not match image shape {shape}")
    return mask if mask.dtype == bool else mask != 0


def _blockwise_moments(x: np.ndarray, block: int = 16) -> tuple[float, float]:
    """Mean and std of a float32 array, accumulated in float64 over slabs of ``block`` slices
    (no full-size float64 temporary)."""
    s1 = s2 = 0.0
    flat = x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(-1, 1)
    for i in range(0, flat.shape[0], block):
        slab = flat[i:i + block]
        s1 += float(slab.sum(dtype=np.float64))
        s2 += float(np.square(slab, dtype=np.float64).sum())
    n = x.size
    mean = s1 / n
    var = max(s2 / n - mean * mean, 0.0)
    return mean, math.sqrt(var)


def preprocess(image: np.ndarray, params: dict[str, Any], mask: np.ndarray | None = None) -> np.ndarray:
    """Raw ``[z, y, x]`` intensities -> float32 network input, by the preset ``params``.

    Steps: clip to ``params["clip"]`` (if any); scale (``window``/``percentile``/``zscore``/
    ``none``, see the module docstring); if the preset names a ``mask`` and ``mask`` is given
    (same shape, non-zero = organ), set voxels outside it to the scaled minimum. The input is
    never modified. NaN or infinite voxels raise :class:`InputError`. No resampling here: see
    :func:`prepare_case`.
    """
    params = validate_params(params)
    check_image(image)
    return preprocess_inplace(np.array(image, dtype=np.float32, copy=True, order="C"), params, mask)


def preprocess_inplace(out: np.ndarray, params: dict[str, Any], mask: np.ndarray | None) -> np.ndarray:
    """:func:`preprocess` on a float32 array the caller owns (overwritten and returned), with
    ``params`` already validated: :func:`~.resampling.prepare_case` saves a full-size copy this way."""
    organ = check_mask(mask, out.shape) if (mask is not None and params["mask"] is not None) else None
    if params["clip"] is not None:
        lo, hi = params["clip"]
        np.clip(out, lo, hi, out=out)
    scaling = params["scaling"]
    if scaling == "window":
        lo, hi = params["clip"]
        out -= np.float32(lo)
        out *= np.float32(1.0 / (hi - lo))
        fill = 0.0
    elif scaling == "percentile":
        sample = out[organ] if organ is not None and organ.any() else out
        p_lo, p_hi = np.percentile(sample, params["percentiles"])
        del sample
        out -= np.float32(p_lo)
        out *= np.float32(1.0 / (p_hi - p_lo)) if p_hi > p_lo else np.float32(0.0)
        np.clip(out, 0.0, 1.0, out=out)
        fill = 0.0
    elif scaling == "zscore":
        sample = out[organ] if organ is not None and organ.any() else out
        mean, std = _blockwise_moments(sample)
        fill = (float(sample.min()) - mean) / max(std, 1e-8)
        del sample
        out -= np.float32(mean)
        out *= np.float32(1.0 / max(std, 1e-8))
    else:
        fill = float(out[organ].min()) if organ is not None and organ.any() else float(out.min())
    if organ is not None:
        np.copyto(out, np.float32(fill), where=~organ)
    return out
