"""Patch sampling as in the paper: lesion-centred with probability ``p_lesion``, else uniform; augmentation."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence, Union

import numpy as np

from ..core.errors import InputError
from ..core.lesions import label_components
from .cases import CaseVolume
from .datasets import Case


def _label_dtype(k: int):
    return np.uint8 if k < 2**8 else np.uint16 if k < 2**16 else np.int32


@dataclass
class PreparedCase:
    """A case ready for sampling (built once, then cached): the image and the whole-image
    component labels, both padded to at least the patch size, and per lesion the flat indices
    of its voxels (``lesion_voxels[offsets[j-1]:offsets[j]]`` for lesion ``j``); the same for the
    components of the hard negatives (a reviewed case's rejected lesions; none elsewhere)."""

    id: str
    image: np.ndarray
    labels: np.ndarray
    num_lesions: int
    lesion_voxels: np.ndarray
    offsets: np.ndarray
    pad_before: tuple[int, int, int]
    num_negatives: int = 0
    negative_voxels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    negative_offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))

    @property
    def shape(self) -> tuple[int, int, int]:
        """The spatial shape (a multi-channel image is ``[C, z, y, x]``)."""
        return tuple(self.image.shape[-3:])  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return int(self.image.nbytes + self.labels.nbytes + self.lesion_voxels.nbytes + self.negative_voxels.nbytes)


@dataclass
class Patch:
    """One training patch: ``image`` float32, ``target`` uint8 {0, 1} and ``labels`` int32
    (the whole-image component ids, cropped — ids need not be contiguous), all of
    ``patch_size``. ``start`` is the corner in the padded volume and ``origin`` the same corner
    on the case's own grid (negative where the volume was padded); ``lesion`` the id of the
    lesion the patch was centred on (0 for a uniformly placed patch or a hard negative);
    ``hard_negative`` whether it was centred on a hard negative (a rejected lesion)."""

    case: str
    image: np.ndarray
    target: np.ndarray
    labels: np.ndarray
    start: tuple[int, int, int]
    lesion: int
    origin: tuple[int, int, int] = (0, 0, 0)
    hard_negative: bool = False

    @property
    def lesion_centred(self) -> bool:
        return self.lesion > 0


class PatchSampler:
    """The paper's patch sampler.

    With probability ``lesion_probability`` a patch is centred on a random voxel of a lesion
    chosen uniformly among the case's lesions (so small lesions are chosen as often as large
    ones); near the border the patch is shifted inside the volume, so it still contains that
    voxel. Otherwise its corner is uniform over all positions inside the volume. A case
    without lesions always gets uniform patches. Lesions are the ``connectivity``-connected
    components (26 by default, as the paper) of the *whole* lesion mask, labelled once per
    case in :meth:`prepare`. A volume smaller than the patch is padded (centred) with
    ``pad_value`` (default: the image minimum) and label 0.

    **Hard negatives.** A case prepared with ``negatives`` (a reviewed case's rejected lesions,
    :mod:`.reviewed`) first gets, with probability ``hard_negative_probability``, a patch centred
    on a random voxel of one of their components, chosen uniformly; the other patches follow the
    rule above. With probability 0 (the default), or for a case without negatives, no random
    number is drawn for it, so the patch stream is the one the sampler always made.
    """

    def __init__(self, patch_size: Sequence[int], *, lesion_probability: float = 0.5,
                 connectivity: int = 26, pad_value: float | None = None,
                 hard_negative_probability: float = 0.0):
        try:
            size = tuple(int(v) for v in patch_size)
        except (TypeError, ValueError):
            raise InputError(f"patch_size must be three positive integers, got {patch_size!r}") from None
        if len(size) != 3 or min(size) < 1:
            raise InputError(f"patch_size must be three positive integers (z, y, x), got {tuple(patch_size)}")
        if not (0.0 <= float(lesion_probability) <= 1.0):
            raise InputError(f"lesion_probability must be in [0, 1], got {lesion_probability}")
        if not (0.0 <= float(hard_negative_probability) <= 1.0):
            raise InputError(f"hard_negative_probability must be in [0, 1], got {hard_negative_probability}")
        if connectivity not in (6, 18, 26):
            raise InputError(f"connectivity must be 6, 18 or 26, got {connectivity}")
        self.patch_size = size
        self.lesion_probability = float(lesion_probability)
        self.connectivity = connectivity
        self.pad_value = pad_value
        self.hard_negative_probability = float(hard_negative_probability)

    def prepare(self, image: np.ndarray, lesion: np.ndarray, case_id: str = "case",
                negatives: np.ndarray | None = None) -> PreparedCase:
        """Label the lesions of the whole image, pad to the patch size, index lesion voxels (and
        those of the components of ``negatives``, the hard negatives, when given).
        ``image`` is ``[z, y, x]`` or, with several channels, ``[C, z, y, x]``."""
        if image.ndim not in (3, 4) or lesion.ndim != 3 or tuple(lesion.shape) != tuple(image.shape[-3:]):
            raise InputError(f"case {case_id}: image {image.shape} and lesion mask {lesion.shape} must have the "
                             "same 3D shape (the image may have a leading channel axis)")
        labels, k = label_components(lesion, self.connectivity)
        labels = labels.astype(_label_dtype(k), copy=False)
        image = np.asarray(image, dtype=np.float32)
        pad = [(max(0, p - s) // 2, max(0, p - s) - max(0, p - s) // 2) for p, s in zip(self.patch_size, image.shape[-3:])]
        if any(a or b for a, b in pad):
            value = float(image.min()) if self.pad_value is None else float(self.pad_value)
            image = np.pad(image, [(0, 0)] * (image.ndim - 3) + pad, constant_values=value)
            labels = np.pad(labels, pad, constant_values=0)
        voxels, offsets = _component_voxels(labels, k)
        out = PreparedCase(case_id, np.ascontiguousarray(image), labels, k, voxels, offsets, tuple(a for a, _ in pad))
        if negatives is not None:
            if tuple(negatives.shape) != tuple(lesion.shape):
                raise InputError(f"case {case_id}: the hard-negative mask {negatives.shape} and the lesion mask "
                                 f"{lesion.shape} must have the same shape")
            negative_labels, out.num_negatives = label_components(negatives, self.connectivity)
            if any(a or b for a, b in pad):
                negative_labels = np.pad(negative_labels, pad, constant_values=0)
            out.negative_voxels, out.negative_offsets = _component_voxels(negative_labels, out.num_negatives)
        return out

    def patch_start(self, case: PreparedCase, rng: np.random.Generator) -> tuple[tuple[int, int, int], int]:
        """Corner of the next patch and the lesion it is centred on (0: uniform or a hard negative)."""
        return self.patch_placement(case, rng)[:2]

    def patch_placement(self, case: PreparedCase,
                        rng: np.random.Generator) -> tuple[tuple[int, int, int], int, bool]:
        """Corner of the next patch, the lesion it is centred on (0: none) and whether it is
        centred on a hard negative."""
        size = np.asarray(self.patch_size)
        hi = np.asarray(case.shape) - size  # >= 0 after padding
        if (self.hard_negative_probability > 0 and case.num_negatives > 0
                and rng.random() < self.hard_negative_probability):
            _, centre = _random_component_voxel(case.negative_voxels, case.negative_offsets, case.num_negatives,
                                                case.shape, rng)
            return tuple(int(v) for v in np.clip(centre - size // 2, 0, hi)), 0, True  # type: ignore[return-value]
        centred = rng.random() < self.lesion_probability
        if centred and case.num_lesions > 0:
            j, centre = _random_component_voxel(case.lesion_voxels, case.offsets, case.num_lesions, case.shape, rng)
            start = np.clip(centre - size // 2, 0, hi)
            return tuple(int(v) for v in start), j, False  # type: ignore[return-value]
        start = [int(rng.integers(0, h + 1)) for h in hi]
        return tuple(start), 0, False  # type: ignore[return-value]

    def sample(self, case: PreparedCase, rng: np.random.Generator) -> Patch:
        """One patch from a prepared case (copies, so the cached volume is never modified)."""
        start, lesion, hard_negative = self.patch_placement(case, rng)
        box = tuple(slice(s, s + p) for s, p in zip(start, self.patch_size))
        labels = case.labels[box].astype(np.int32)
        origin = tuple(int(s - b) for s, b in zip(start, case.pad_before))
        return Patch(case.id, case.image[(..., *box)].copy(), (labels > 0).astype(np.uint8), labels, start, lesion,
                     origin, hard_negative)


def _component_voxels(labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The flat indices of the voxels of components ``1..k`` of ``labels``, grouped by component,
    and the offsets of each group (component ``j``: ``voxels[offsets[j-1]:offsets[j]]``)."""
    flat = labels.ravel()
    idx = np.flatnonzero(flat)
    voxels = idx[np.argsort(flat[idx], kind="stable")]
    counts = np.bincount(flat[idx].astype(np.intp), minlength=k + 1)[1:]
    return voxels, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _random_component_voxel(voxels: np.ndarray, offsets: np.ndarray, k: int, shape: tuple[int, ...],
                            rng: np.random.Generator) -> tuple[int, np.ndarray]:
    """A component ``j`` chosen uniformly among ``1..k`` and a random voxel ``(z, y, x)`` of it."""
    j = int(rng.integers(1, k + 1))
    a, b = int(offsets[j - 1]), int(offsets[j])
    return j, np.asarray(np.unravel_index(int(voxels[a + int(rng.integers(b - a))]), shape))


def augment_patch(
    patch: Patch,
    rng: np.random.Generator,
    *,
    flip_axes: Sequence[int] = (0, 1, 2),
    flip_probability: float = 0.5,
    intensity_scale: float = 0.1,
    intensity_shift: float = 0.1,
) -> Patch:
    """Light augmentation: flip each axis of ``flip_axes`` with ``flip_probability`` (image,
    target and labels alike, so in-patch lesion sizes are unchanged), then jitter the image
    intensity ``x -> x * (1 + a) + b`` with ``a ~ U(-intensity_scale, intensity_scale)`` and
    ``b ~ U(-intensity_shift, intensity_shift)`` (in preprocessed units, [0, 1] for CT)."""
    if any(a not in (0, 1, 2) for a in flip_axes):
        raise InputError(f"flip_axes must be among 0, 1, 2, got {tuple(flip_axes)}")
    if not (0.0 <= flip_probability <= 1.0) or intensity_scale < 0 or intensity_shift < 0:
        raise InputError("flip_probability must be in [0, 1] and the intensity jitter non-negative")
    flips = tuple(a for a in flip_axes if rng.random() < flip_probability)
    scale = 1.0 + rng.uniform(-intensity_scale, intensity_scale)
    shift = rng.uniform(-intensity_shift, intensity_shift)
    image, target, labels = patch.image, patch.target, patch.labels
    if flips:
        image = np.ascontiguousarray(np.flip(image, tuple(a + image.ndim - 3 for a in flips)))  # after a channel axis
        target = np.ascontiguousarray(np.flip(target, flips))
        labels = np.ascontiguousarray(np.flip(labels, flips))
    image = (image * np.float32(scale) + np.float32(shift)).astype(np.float32, copy=False)
    return replace(patch, image=image, target=target, labels=labels)


def default_batch_rng(seed: int, rank: int, step: int) -> np.random.Generator:
    """The generator of global training step ``step`` on DDP rank ``rank``."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(rank), int(step), 0x5A3D])


CaseSource = Union[Case, CaseVolume]


def batch_images(images: Sequence[np.ndarray]) -> np.ndarray:
    """Patches ``[z, y, x]`` or ``[C, z, y, x]`` stacked as the network's ``(B, C, z, y, x)``."""
    batch = np.stack(images)
    return batch[:, None] if batch.ndim == 4 else batch
