"""One case in memory: :class:`CaseVolume`, read by :func:`load_case` and prepared (once) by :func:`prepare_volume`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ..core.errors import InputError
from ..core.files import case_name
from ..core.imageio import Geometry, check_same_grid, read_channels, read_image
from ..preprocessing.cropping import organ_box
from ..preprocessing.lung_mask import automatic_organ_mask
from ..preprocessing.resampling import prepare_case, resample_to_geometry
from .reviewed import read_reviewed, reviewed_masks

if TYPE_CHECKING:
    from .datasets import Case


@dataclass
class CaseVolume:
    """A case in memory: ``image`` float32, ``lesion`` uint8 {0, 1}, ``organ`` uint8 {0, 1} or
    None, all ``[z, y, x]`` on ``geometry`` (a multi-channel image is ``[C, z, y, x]``).

    ``preprocessing`` is the preset the image was prepared with by :func:`prepare_volume`
    (network input), or None while it holds the raw intensities :func:`load_case` read. It
    makes "prepared exactly once" checkable: :func:`prepare_volume` refuses a prepared case.
    ``organ_crop`` is the margin (voxels) of the organ box the prepared case was cropped to
    (``crop_to_organ``), or None when it was not cropped; ``geometry`` is then the box's grid.
    ``negatives`` (uint8 {0, 1} or None) marks the voxels of the lesions a reader rejected
    (:mod:`.reviewed`): the sampler's hard negatives, resampled and cropped with the lesion mask.
    """

    id: str
    image: np.ndarray
    lesion: np.ndarray
    organ: np.ndarray | None
    geometry: Geometry
    preprocessing: dict | None = None
    organ_crop: int | None = None
    negatives: np.ndarray | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.geometry.spacing_zyx


def lesion_mask(
    label: np.ndarray,
    lesion_values: Sequence[float] = (1,),
    other_values: Sequence[float] = (),
    *,
    name: str = "label",
) -> np.ndarray:
    """Binary uint8 lesion mask of ``label``: 1 where the value is in ``lesion_values``.

    The label may only hold 0, ``lesion_values`` and ``other_values``; any other value raises
    :class:`InputError` naming ``name`` and the values found, so a label map with an
    unexpected class (or a probability map) is never silently read as background.
    """
    if not lesion_values:
        raise InputError(f"{name}: lesion_values must name at least one label value")
    allowed = np.unique(np.asarray([0, *lesion_values, *other_values], dtype=np.float64))
    ok = np.isin(label, _as_label_values(allowed, label.dtype))
    if not ok.all():
        bad = np.unique(label[~ok])
        shown = ", ".join(f"{v:g}" for v in bad[:10].astype(np.float64)) + (" ..." if bad.size > 10 else "")
        raise InputError(
            f"{name} holds unexpected label value(s) {shown} in {int((~ok).sum())} voxels; expected only "
            f"{', '.join(f'{v:g}' for v in allowed)} (lesion: {', '.join(f'{v:g}' for v in lesion_values)}). "
            "Give the lesion label values explicitly (lesion_values / --lesion-values)."
        )
    return np.isin(label, _as_label_values(lesion_values, label.dtype)).astype(np.uint8)


def _as_label_values(values: Sequence[float], dtype: np.dtype) -> np.ndarray:
    """``values`` in the label's own dtype, so ``np.isin`` can use its fast lookup table for
    integer labels (a value an integer label cannot hold is dropped: it cannot match)."""
    v = np.asarray(values, dtype=np.float64)
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        v = v[(v == np.round(v)) & (v >= info.min) & (v <= info.max)]
        return v.astype(dtype)
    return v


def load_case(case: Case, *, dtype=np.float32) -> CaseVolume:
    """Read a case: the image as ``dtype``, the binary lesion mask and the organ mask (if any).

    A case with a verdict file (``case.verdicts``) gets the reviewed label and the rejected lesions
    as ``negatives`` (:func:`.reviewed.reviewed_masks`).

    Raises :class:`~IWSegmentationLib.core.errors.GeometryMismatchError` naming the case when the
    label or mask is not on the image's voxel grid, and :class:`InputError` naming the case for
    unexpected label values or unreadable files.
    """
    image, geometry = read_channels(case.image_files, what=f"case {case.id}: image", dtype=dtype)
    label, label_geometry = read_image(case.label, what=f"case {case.id}: label")
    check_same_grid(geometry, label_geometry, f"case {case.id}: image {case.image}", f"label {case.label}")
    lesion = lesion_mask(label, case.lesion_values, case.other_values, name=f"case {case.id}: label {case.label}")
    organ = None
    if case.mask is not None:
        if Path(case.mask) == Path(case.label):
            mask_array = label
        else:
            mask_array, mask_geometry = read_image(case.mask, what=f"case {case.id}: mask")
            check_same_grid(geometry, mask_geometry, f"case {case.id}: image {case.image}", f"mask {case.mask}")
        if case.mask_values is None:
            organ = (mask_array != 0).astype(np.uint8)
        else:
            organ = np.isin(mask_array, _as_label_values(case.mask_values, mask_array.dtype)).astype(np.uint8)
    negatives = None
    if case.verdicts is not None:
        verdicts, labels = read_reviewed(case.verdicts, names=(case.id, case_name(case.image)), grid=geometry)
        lesion, negatives = reviewed_masks(lesion, labels, verdicts)
    return CaseVolume(case.id, image, lesion, organ, geometry, negatives=negatives)


def prepare_volume(volume: CaseVolume, params: Mapping[str, Any], crop_to_organ: int | None = None) -> CaseVolume:
    """A raw case turned into network input by the preprocessing preset ``params``, through
    :func:`preprocessing.prepare_case`, the function inference uses too; the lesion mask
    follows a resampling (nearest neighbour). With ``crop_to_organ`` (a margin in voxels) the
    prepared case is then cropped to :func:`preprocessing.organ_box` of its prepared organ mask,
    the box inference crops to (lesion voxels outside the box are dropped). Top-level, so
    DataLoader workers can pickle it.

    Raises:
        InputError: naming the case, when its image cannot be prepared, or ``crop_to_organ`` is
            set and the case has no organ mask or an empty one.
        RuntimeError: when ``volume`` is already prepared (a program error: preparing twice
            re-windows values already in [0, 1] and crushes the contrast).
    """
    if volume.preprocessing is not None:
        raise RuntimeError(f"case {volume.id} is already preprocessed; a case must be prepared exactly once")
    try:
        image, geometry, organ = prepare_case(volume.image, volume.geometry, dict(params), volume.organ)
    except InputError as exc:
        raise InputError(f"case {volume.id}: {exc}") from None
    lesion, negatives = volume.lesion, volume.negatives
    if geometry != volume.geometry:
        lesion = resample_to_geometry(lesion, volume.geometry, geometry, is_mask=True)
        if negatives is not None:
            negatives = resample_to_geometry(negatives, volume.geometry, geometry, is_mask=True)
    if crop_to_organ is None:
        return CaseVolume(volume.id, image, lesion, organ, geometry, preprocessing=dict(params), negatives=negatives)
    if organ is None:
        raise InputError(f"case {volume.id} has no organ mask, and crop_to_organ ({crop_to_organ} voxels) crops "
                         "every case to its organ's bounding box; give the dataset organ masks or set crop_to_organ: null")
    box = organ_box(organ, crop_to_organ)
    if box is None:
        raise InputError(f"case {volume.id}: its organ mask is empty, so crop_to_organ has no box to crop to")
    return CaseVolume(volume.id, box.crop(image), box.crop(lesion), box.crop(organ), box.geometry(geometry),
                      preprocessing=dict(params), organ_crop=int(crop_to_organ),
                      negatives=None if negatives is None else box.crop(negatives))


def load_prepared_case(case: Case, params: Mapping[str, Any], crop_to_organ: int | None = None,
                       auto_organ_mask: bool = False) -> CaseVolume:
    """:func:`load_case` (then :func:`with_automatic_organ` when ``auto_organ_mask``) then
    :func:`prepare_volume`: a case record as network input."""
    volume = load_case(case)
    if auto_organ_mask:
        volume = with_automatic_organ(volume, params)
    return prepare_volume(volume, params, crop_to_organ)


def with_automatic_organ(volume: CaseVolume, params: Mapping[str, Any]) -> CaseVolume:
    """A raw case with the automatic organ mask of the preset's organ
    (:func:`preprocessing.automatic_organ_mask`, the function ``iwseg predict`` uses without
    ``--organ-mask``) when it has no organ mask of its own; :class:`InputError` naming the case
    when none is found (no lungs in the image)."""
    if volume.organ is not None:
        return volume
    if volume.preprocessing is not None:
        raise RuntimeError(f"case {volume.id}: the automatic organ mask is found on the raw image, before preparing")
    organ = automatic_organ_mask(volume.image, params, volume.geometry)
    if organ is None:
        raise InputError(f"case {volume.id}: auto_organ_mask found no {params.get('mask')} in its image "
                         "(no air inside the body for the lung mask); give the case an organ mask")
    return replace(volume, organ=organ)
