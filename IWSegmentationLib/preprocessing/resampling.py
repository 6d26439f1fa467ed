"""Resampling to a spacing or a grid, and :func:`prepare_case`, the one preprocessing entry point."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ..core.errors import InputError
from ..core.imageio import Geometry, to_sitk
from ..core.memory import physical_memory
from .intensity import check_image, check_mask, preprocess, preprocess_inplace
from .presets import validate_params

#: Largest grid :func:`resampled_geometry` makes: 2^31 voxels (8 GiB as float32), so a crafted
#: target spacing cannot ask for terabytes (a 512 x 512 x 1000 CT upsampled 2x per axis fits).
MAX_RESAMPLED_VOXELS = 2 ** 31
#: Bytes a prediction holds per voxel of the resampled grid at its peak, per image channel plus
#: two: the float32 network input of each channel, the float32 logit accumulator of the
#: sliding window and SimpleITK's float32 copy while resampling (:func:`check_resampled_memory`).
RESAMPLED_BYTES_PER_VOXEL = 4


def grid_text(geometry: Geometry) -> str:
    """``512x512x300 voxels of 0.7x0.7x5 mm`` (x, y, z, as ITK and the viewers list them), for messages."""
    return (f"{'x'.join(str(int(v)) for v in geometry.size)} voxels of "
            f"{'x'.join(f'{round(float(v), 4):g}' for v in geometry.spacing)} mm")


def check_resampled_memory(geometry: Geometry, target: Geometry, *, channels: int = 1,
                           available: int | None = None) -> None:
    """Refuse, before anything is allocated, a prediction whose resampled grid ``target`` needs
    more than this machine's physical memory (``available`` bytes when given):
    ``RESAMPLED_BYTES_PER_VOXEL * (channels + 2)`` bytes per resampled voxel. The message names
    the input grid, the resampled grid and the limit."""
    available = physical_memory() if available is None else available
    need = math.prod(int(v) for v in target.size) * RESAMPLED_BYTES_PER_VOXEL * (int(channels) + 2)
    if available and need > available:
        raise InputError(
            f"resampling the input ({grid_text(geometry)}) to the model's spacing gives {grid_text(target)}, "
            f"which needs about {need / 2**30:.3g} GiB of memory, more than this machine's "
            f"{available / 2**30:.3g} GiB; crop the volume, or predict on its own grid (--keep-spacing)"
        )


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
            f"resampling the input ({grid_text(geometry)}, x y z) to target spacing {list(spacing_zyx)} mm (z, y, x) "
            f"would make {float(np.prod(size)):.3g} voxels ({'x'.join(str(int(v)) for v in size)}), more than "
            f"{MAX_RESAMPLED_VOXELS}, the limit (preprocessing.MAX_RESAMPLED_VOXELS, 8 GiB as float32); check the "
            "target spacing"
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
    array: np.ndarray, geometry: Geometry, target: Geometry, *, is_mask: bool = False,
    default_value: float = 0.0,
) -> np.ndarray:
    """Resample ``array`` (on ``geometry``) onto the grid ``target`` with SimpleITK.

    Images: linear interpolation, float32 out. Masks (``is_mask=True``): nearest neighbour,
    the input dtype kept. Points outside the source image get ``default_value`` (0 unless
    given; logits pass :data:`~IWSegmentationLib.core.confidence.SKIPPED_LOGIT`, since a logit
    of 0 is probability 0.5). Edge voxels are extended by half a voxel, as ITK does, but a
    coarser grid from :func:`resampled_geometry` may still end up to half a coarse voxel short
    of the fine grid's far edge, so such points do occur.
    """
    import SimpleITK as sitk  # lazy: SimpleITK takes ~0.4 s to load; only resampling needs it

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
        float(default_value),
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
    check_image(image)
    if tuple(image.shape) != geometry.shape_zyx:
        raise InputError(f"image shape {image.shape} does not match its geometry {geometry.shape_zyx}")
    if mask is not None:
        check_mask(mask, image.shape)
    target = geometry if params["target_spacing"] is None else resampled_geometry(geometry, params["target_spacing"])
    if target == geometry:
        return preprocess(image, params, mask), geometry, mask
    # the resampled image is a fresh float32 array: preprocess it in place (no second copy)
    work = resample_to_geometry(image, geometry, target)
    if mask is not None:
        mask = resample_to_geometry(np.asarray(mask != 0, dtype=np.uint8), geometry, target, is_mask=True)
    return preprocess_inplace(work, params, mask), target, mask


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
