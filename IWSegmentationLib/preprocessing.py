"""Intensity presets and resampling, shared by training and inference.

A *preset* is a plain JSON-able dict (stored in every checkpoint's model card) that says how
raw voxels become network input. The paper's presets (Shirokikh et al. 2020, section 4.1 and
the authors' preprocessing notebooks):

============ ======== ============== ============== =============================================
name         modality clip (raw)     scaling        organ mask
============ ======== ============== ============== =============================================
``ct-lung``  CT       -1000 … 300 HU window → [0,1] lung: voxels outside set to -1000 HU (→ 0)
``ct-liver`` CT       -300 … 300 HU  window → [0,1] liver: voxels outside set to -300 HU (→ 0)
``mr``       MR       none           percentile     none
============ ======== ============== ============== =============================================

Scalings (``params["scaling"]``):

* ``window``: ``(clip(x, lo, hi) - lo) / (hi - lo)``, so the clip window maps onto [0, 1];
* ``percentile``: ``clip((x - p_lo) / (p_hi - p_lo), 0, 1)`` with ``p_lo, p_hi`` the
  ``percentiles`` (default 0.5 and 99.5) of the image — of the voxels inside the mask when the
  preset uses one and a mask is given. Robust to a few hot voxels, unlike min-max;
* ``zscore``: ``(x - mean) / std`` (std floored at 1e-8), over the mask when one is used;
* ``none``: the clipped (or raw) values as float32.

With an organ mask, voxels outside it become the scaled value of the window minimum (``0`` for
``window`` and ``percentile``, the minimum inside the mask for ``zscore`` and ``none``), as
the authors set them to the minimum. A preset that names a mask still works without one (the
mask step is skipped): the checkpoint's ``preprocessing.mask`` tells the user to supply it.

Resampling (``params["target_spacing"]``, ``[sz, sy, sx]`` mm, an entry may be ``None`` to
keep that axis): linear interpolation for images, nearest neighbour for masks, onto a grid
with the same direction whose voxel *edges* align with the original's (the physical extent is
kept; ``size = floor(n * s / s_new + 0.5)``). :func:`resample_to_geometry` brings outputs back onto
the original grid exactly.

Memory: :func:`preprocess` makes one float32 copy of the image and works on it in place; it
never makes full-size float64 arrays.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import numpy as np

from .errors import InputError
from .imageio import Geometry, to_sitk

SCALINGS = ("window", "percentile", "zscore", "none")
#: Largest grid :func:`resampled_geometry` makes: 2^31 voxels (8 GiB as float32), so a crafted
#: target spacing cannot ask for terabytes (a 512 x 512 x 1000 CT upsampled 2x per axis fits).
MAX_RESAMPLED_VOXELS = 2 ** 31
MODALITIES = ("CT", "MR", "other")

#: Every preset has exactly these keys (``get_preset`` rejects others).
PARAM_KEYS = (
    "name",             # preset name, for people and logs
    "modality",         # "CT", "MR" or "other"
    "clip",             # [lo, hi] in raw units (HU for CT) or None
    "scaling",          # one of SCALINGS
    "percentiles",      # [p_lo, p_hi] for scaling="percentile"
    "mask",             # organ mask the preset applies ("lung", "liver", ...) or None
    "target_spacing",   # [sz, sy, sx] mm (entries may be None) or None: no resampling
    "body_threshold",   # raw value above which a voxel is body (for skipping empty windows) or None
)

PRESETS: dict[str, dict[str, Any]] = {
    "ct-lung": {
        "name": "ct-lung", "modality": "CT", "clip": [-1000.0, 300.0], "scaling": "window",
        "percentiles": [0.5, 99.5], "mask": "lung", "target_spacing": None, "body_threshold": -900.0,
    },
    "ct-liver": {
        "name": "ct-liver", "modality": "CT", "clip": [-300.0, 300.0], "scaling": "window",
        "percentiles": [0.5, 99.5], "mask": "liver", "target_spacing": None, "body_threshold": -500.0,
    },
    "mr": {
        "name": "mr", "modality": "MR", "clip": None, "scaling": "percentile",
        "percentiles": [0.5, 99.5], "mask": None, "target_spacing": None, "body_threshold": None,
    },
}


# --------------------------------------------------------------------------- presets


def get_preset(name: str, **overrides: Any) -> dict[str, Any]:
    """A validated copy of preset ``name`` with ``overrides`` applied, e.g.
    ``get_preset("ct-lung", target_spacing=[1.25, 0.7, 0.7])``."""
    if name not in PRESETS:
        raise InputError(f"unknown preprocessing preset {name!r}; choose one of {', '.join(PRESETS)}")
    params = copy.deepcopy(PRESETS[name])
    params.update(copy.deepcopy(overrides))
    return validate_params(params)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        raise InputError(f"preprocessing {what} must be a finite number, got {value!r}")
    return float(value)


def validate_params(params: dict[str, Any]) -> dict[str, Any]:
    """Check preset parameters (e.g. read back from a checkpoint) and return a normalised copy.

    Unknown keys and bad values raise :class:`InputError` naming the key.
    """
    if not isinstance(params, dict):
        raise InputError(f"preprocessing parameters must be a dict, got {type(params).__name__}")
    unknown = sorted(set(params) - set(PARAM_KEYS))
    missing = sorted(set(PARAM_KEYS) - set(params))
    if unknown:
        raise InputError(
            f"unknown preprocessing key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(PARAM_KEYS)}"
        )
    if missing:
        raise InputError(f"preprocessing parameters lack {', '.join(missing)} (start from get_preset(...))")
    out = copy.deepcopy(params)
    if out["modality"] not in MODALITIES:
        raise InputError(f"preprocessing 'modality' must be one of {', '.join(MODALITIES)}, got {out['modality']!r}")
    if out["scaling"] not in SCALINGS:
        raise InputError(f"preprocessing 'scaling' must be one of {', '.join(SCALINGS)}, got {out['scaling']!r}")
    if out["clip"] is not None:
        if not isinstance(out["clip"], (list, tuple)) or len(out["clip"]) != 2:
            raise InputError(f"preprocessing 'clip' must be [lo, hi] or None, got {out['clip']!r}")
        lo, hi = (_number(v, "'clip'") for v in out["clip"])
        if not lo < hi:
            raise InputError(f"preprocessing 'clip' needs lo < hi, got {out['clip']!r}")
        out["clip"] = [lo, hi]
    elif out["scaling"] == "window":
        raise InputError("preprocessing scaling 'window' needs a 'clip' window [lo, hi]")
    pct = out["percentiles"]
    if not isinstance(pct, (list, tuple)) or len(pct) != 2:
        raise InputError(f"preprocessing 'percentiles' must be [p_lo, p_hi], got {pct!r}")
    p_lo, p_hi = (_number(v, "'percentiles'") for v in pct)
    if not 0.0 <= p_lo < p_hi <= 100.0:
        raise InputError(f"preprocessing 'percentiles' need 0 <= p_lo < p_hi <= 100, got {pct!r}")
    out["percentiles"] = [p_lo, p_hi]
    if out["mask"] is not None and not isinstance(out["mask"], str):
        raise InputError(f"preprocessing 'mask' must be an organ name or None, got {out['mask']!r}")
    if out["target_spacing"] is not None:
        ts = out["target_spacing"]
        if not isinstance(ts, (list, tuple)) or len(ts) != 3:
            raise InputError(f"preprocessing 'target_spacing' must be [sz, sy, sx] mm or None, got {ts!r}")
        norm = []
        for v in ts:
            if v is None:
                norm.append(None)
                continue
            v = _number(v, "'target_spacing'")
            if v <= 0:
                raise InputError(f"preprocessing 'target_spacing' entries must be > 0, got {ts!r}")
            norm.append(v)
        out["target_spacing"] = norm
    if out["body_threshold"] is not None:
        out["body_threshold"] = _number(out["body_threshold"], "'body_threshold'")
    return out


# --------------------------------------------------------------------------- intensities


def _check_image(image: np.ndarray) -> None:
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


def _check_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
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
    _check_image(image)
    return _preprocess_inplace(np.array(image, dtype=np.float32, copy=True, order="C"), params, mask)


def _preprocess_inplace(out: np.ndarray, params: dict[str, Any], mask: np.ndarray | None) -> np.ndarray:
    """:func:`preprocess` on a float32 array this module owns (overwritten and returned)."""
    organ = _check_mask(mask, out.shape) if (mask is not None and params["mask"] is not None) else None
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


def foreground_mask(image: np.ndarray, params: dict[str, Any], mask: np.ndarray | None = None,
                    on_warning=None, spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray | None:
    """Where the network has something to segment, for skipping empty sliding windows.

    In this order: the organ mask when the preset uses one and it is given; for a CT preset whose
    organ is the lung, the automatic :func:`lung_field` (lung nodules lie in the lungs, and a
    chest CT's lungs fill a fraction of the scan); raw voxels above the preset's
    ``body_threshold`` (CT: air is about -1000 HU, so ``-900`` keeps the lungs for ``ct-lung``);
    else ``None`` (no skipping). ``image`` is the raw image (same grid as ``mask``).
    ``on_warning(message)`` hears when no lung field is found and the body threshold is used;
    ``spacing_zyx`` (mm) scales the lung field's margin.
    """
    params = validate_params(params)
    if mask is not None and params["mask"] is not None:
        return _check_mask(mask, image.shape)
    if params["mask"] == "lung" and params["modality"] == "CT":
        field = lung_field(image, spacing_zyx)
        if field is not None:
            return field
        if on_warning is not None:
            on_warning("no lung field found in the image (no air inside the body?); "
                       "skipping windows by the body threshold instead")
    if params["body_threshold"] is not None:
        return image > params["body_threshold"]
    return None


def lung_field(image: np.ndarray, spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0), *, air_below: float = -400.0,
               margin_mm: float = 15.0, min_fraction: float = 0.002) -> np.ndarray | None:
    """The lungs of a raw chest CT (HU), generously: for skipping windows, not for measuring.

    Air-like voxels (``< air_below`` HU) that are not connected to the in-plane border of the
    scan — the air around the patient is — and form components of at least ``min_fraction`` of
    the volume; holes filled slice by slice (nodules, vessels, airway walls inside the lungs);
    then grown by ``margin_mm`` in every direction, for masses on the pleura that bulge out of
    the aerated lung (the largest tumour of the pyradiomics chest CTs reaches 9.8 mm beyond it).
    Works on an in-plane subsampled grid of at most about 128 voxels a side (about 0.5 s for
    512x512x300). Bowel or tracheal air may be kept: that only costs windows.

    Returns a bool mask on the image's grid, or None when no such air is found (an image that is
    not a chest CT) — the caller then falls back to the body threshold.
    """
    import cc3d
    from scipy import ndimage

    from .lesions import component_sizes

    image = np.asarray(image)
    if image.ndim != 3:
        raise InputError(f"lung_field needs a 3D image, got shape {image.shape}")
    depth, height, width = image.shape
    step = max(1, min(height, width) // 128)
    air = np.ascontiguousarray(image[:, ::step, ::step] < air_below).view(np.uint8)
    labels = cc3d.connected_components(air, connectivity=6)
    if int(labels.max()) == 0:
        return None
    outside = np.unique(np.concatenate([labels[:, 0].ravel(), labels[:, -1].ravel(),
                                        labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]))
    voxels = component_sizes(labels)
    keep = voxels >= min_fraction * labels.size
    keep[outside] = False
    keep[0] = False
    if not keep.any():
        return None
    field = keep[labels]
    del labels, air
    for z in range(depth):
        if field[z].any():
            ndimage.binary_fill_holes(field[z], output=field[z])
    if margin_mm > 0:
        grid_mm = (float(spacing_zyx[0]), float(spacing_zyx[1]) * step, float(spacing_zyx[2]) * step)
        size = tuple(2 * math.ceil(margin_mm / max(s, 1e-6)) + 1 for s in grid_mm)
        field = ndimage.maximum_filter(field, size=size)
    if step > 1:
        field = np.repeat(np.repeat(field, step, axis=1), step, axis=2)[:, :height, :width]
    return np.ascontiguousarray(field)


# --------------------------------------------------------------------------- resampling


def resampled_geometry(geometry: Geometry, spacing_zyx: Sequence[float | None]) -> Geometry:
    """The grid with ``spacing_zyx`` (``None`` entries keep the axis) covering the same physical
    extent as ``geometry``: same direction, voxel edges aligned at the origin corner,
    ``size = max(1, floor(n * s / s_new + 0.5))`` (halves round up)."""
    if len(spacing_zyx) != 3:
        raise InputError(f"target spacing must have 3 entries (z, y, x), got {spacing_zyx!r}")
    old_xyz = np.asarray(geometry.spacing, dtype=float)
    new_xyz = np.array([old_xyz[i] if spacing_zyx[2 - i] is None else float(spacing_zyx[2 - i]) for i in range(3)])
    if np.any(new_xyz <= 0):
        raise InputError(f"target spacing must be > 0, got {spacing_zyx!r}")
    size = np.maximum(1, np.floor(np.asarray(geometry.size) * old_xyz / new_xyz + 0.5 + 1e-9))
    if float(np.prod(size)) > MAX_RESAMPLED_VOXELS:
        raise InputError(
            f"resampling the {tuple(geometry.size)} grid (spacing {tuple(round(v, 4) for v in geometry.spacing)} mm) "
            f"to target spacing {list(spacing_zyx)} mm would make {float(np.prod(size)):.3g} voxels, more than "
            f"{MAX_RESAMPLED_VOXELS} (8 GiB as float32); check the target spacing"
        )
    size = size.astype(int)
    origin = np.asarray(geometry.origin) + geometry.direction_matrix @ (0.5 * (new_xyz - old_xyz))
    return Geometry(
        size=tuple(int(v) for v in size),
        spacing=tuple(float(v) for v in new_xyz),
        origin=tuple(float(v) for v in origin),
        direction=geometry.direction,
    )


#: dtypes SimpleITK interpolates directly (into a float32 output), without a float32 copy first
_SITK_NATIVE = tuple(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.float32))


def resample_to_geometry(
    array: np.ndarray, geometry: Geometry, target: Geometry, *, is_mask: bool = False
) -> np.ndarray:
    """Resample ``array`` (on ``geometry``) onto the grid ``target`` with SimpleITK.

    Images: linear interpolation, float32 out. Masks (``is_mask=True``): nearest neighbour,
    the input dtype kept. Points outside the source image get 0 (edge voxels are extended by
    half a voxel, as ITK does, so grids from :func:`resampled_geometry` have no empty border).
    """
    import SimpleITK as sitk

    if array.ndim != 3:
        raise InputError(f"array to resample must be 3D [z, y, x], got shape {array.shape}")
    if array.dtype == bool:
        array = array.view(np.uint8)
    if not is_mask and array.dtype not in _SITK_NATIVE:
        array = array.astype(np.float32)  # float64, float16, int64...: interpolate in float32
    source = to_sitk(array, geometry)
    out_type = source.GetPixelID() if is_mask else sitk.sitkFloat32
    result = sitk.Resample(
        source,
        [int(v) for v in target.size],
        sitk.Transform(),
        sitk.sitkNearestNeighbor if is_mask else sitk.sitkLinear,
        [float(v) for v in target.origin],
        [float(v) for v in target.spacing],
        [float(v) for v in target.direction],
        0.0,
        out_type,
    )
    return sitk.GetArrayFromImage(result)


def resample_to_spacing(
    array: np.ndarray, geometry: Geometry, spacing_zyx: Sequence[float | None], *, is_mask: bool = False
) -> tuple[np.ndarray, Geometry]:
    """Resample onto :func:`resampled_geometry` ``(geometry, spacing_zyx)``; returns the array
    and its new geometry. Linear for images, nearest for masks (``is_mask=True``)."""
    target = resampled_geometry(geometry, spacing_zyx)
    if target == geometry:
        return (array if is_mask else array.astype(np.float32, copy=False)), geometry
    return resample_to_geometry(array, geometry, target, is_mask=is_mask), target


def prepare_case(
    image: np.ndarray, geometry: Geometry, params: dict[str, Any], mask: np.ndarray | None = None
) -> tuple[np.ndarray, Geometry, np.ndarray | None]:
    """The whole input path used by training and inference: resample image (linear) and mask
    (nearest) to ``params["target_spacing"]`` if set, then :func:`preprocess`.

    Returns ``(network_input float32, its geometry, resampled mask or None)``. Bring outputs
    back with ``resample_to_geometry(prob, returned_geometry, geometry)``.

    A multi-channel image ``[C, z, y, x]`` (multi-sequence MR) is prepared channel by channel
    (:func:`prepare_channels`).
    """
    if isinstance(image, np.ndarray) and image.ndim == 4:
        return prepare_channels(image, geometry, params, mask)
    params = validate_params(params)
    _check_image(image)
    if tuple(image.shape) != geometry.shape_zyx:
        raise InputError(f"image shape {image.shape} does not match its geometry {geometry.shape_zyx}")
    if mask is not None:
        _check_mask(mask, image.shape)
    target = geometry if params["target_spacing"] is None else resampled_geometry(geometry, params["target_spacing"])
    if target == geometry:
        return preprocess(image, params, mask), geometry, mask
    # the resampled image is a fresh float32 array: preprocess it in place (no second copy)
    work = resample_to_geometry(image, geometry, target)
    if mask is not None:
        mask = resample_to_geometry(np.asarray(mask != 0, dtype=np.uint8), geometry, target, is_mask=True)
    return _preprocess_inplace(work, params, mask), target, mask


def prepare_channels(
    image: np.ndarray, geometry: Geometry, params: dict[str, Any], mask: np.ndarray | None = None
) -> tuple[np.ndarray, Geometry, np.ndarray | None]:
    """:func:`prepare_case` of each channel of a ``[C, z, y, x]`` image, stacked: every channel is
    resampled onto the same grid and scaled on its own by the preset (e.g. the ``mr`` preset's
    percentiles of each sequence), because sequences have unrelated intensity ranges."""
    if image.shape[0] < 1:
        raise InputError(f"image has no channels: shape {image.shape}")
    channels, target, out_mask = [], geometry, mask
    for c in range(image.shape[0]):
        try:
            prepared, target, out_mask = prepare_case(image[c], geometry, params, mask)
        except InputError as exc:
            raise InputError(f"channel {c}: {exc}") from None
        channels.append(prepared)
    return np.stack(channels), target, out_mask
