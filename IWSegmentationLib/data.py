"""Datasets, splits and the training patch sampler.

* **Readers** turn a dataset folder into a list of :class:`Case` records (paths only, nothing
  is read yet): the Medical Segmentation Decathlon layout (also what nnU-Net and MONAI users
  have), LiTS, LUNA16-style ``.mhd`` scans with nodule masks, and a plain ``images/`` +
  ``labels/`` folder. :func:`load_dataset` detects the layout. :func:`load_case` reads one case,
  checks that image, label and mask share one voxel grid, and converts the label to a binary
  lesion mask using *explicit* lesion label values (an unexpected value is an error, never
  silently background). The layouts are described in ``docs/data.md``.
* **Splits** by case id: :func:`make_splits` (seeded fractions) or :func:`read_splits` (a JSON
  file ``{"train": [...], "val": [...], "test": [...]}``). A case is never in two splits.
* **Patch sampling as in the paper** (Shirokikh et al., MICCAI 2020): :class:`PatchSampler`
  labels the lesion components of the *whole* image once per case and, with probability
  ``lesion_probability`` (0.5), centres a patch on a random voxel of a uniformly chosen
  lesion, otherwise places it uniformly. Each :class:`Patch` carries the image, the binary
  target and the cropped component labels, from which the trainer computes inverse weights
  with in-patch counts (:func:`IWSegmentationLib.weights.component_weights`).
  :class:`PatchDataset` is the torch ``IterableDataset`` that feeds DataLoader workers.

Arrays are ``[z, y, x]``; see :mod:`IWSegmentationLib.imageio`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections import Counter, OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import numpy as np
from torch.utils.data import IterableDataset

from .errors import InputError, IWSegError
from .imageio import (
    Geometry,
    atomic_output,
    case_name,
    check_pairs,
    check_same_grid,
    list_images,
    natural_key,
    preview_names,
    read_channels,
    read_image,
)
from .lesions import label_components
from .preprocessing import prepare_case, resample_to_geometry

LAYOUTS = ("msd", "lits", "luna16", "plain")
#: Other spellings accepted for ``layout`` (the trainer's config uses ``luna`` and ``folder``).
LAYOUT_ALIASES = {"luna": "luna16", "folder": "plain", "decathlon": "msd", "nnunet": "msd"}
SPLIT_NAMES = ("train", "val", "test")

#: Words that mark a label of a ``dataset.json`` as a lesion (case-insensitive substring).
LESION_WORDS = ("lesion", "tumor", "tumour", "cancer", "nodule", "metasta", "mass", "neoplasm")
#: Words that mark a non-lesion label as the organ that contains the lesions (its values,
#: together with the lesion values, form the organ mask, as LiTS' liver label does).
ORGAN_WORDS = ("liver", "lung", "pancreas", "kidney", "brain", "prostate", "colon", "organ", "body")

#: Folder names of the LUNA16-style layout (see docs/data.md).
LUNA_NODULE_DIRS = ("seg-nodules", "nodule-masks", "nodule_masks")
LUNA_LUNG_DIRS = ("seg-lungs-LUNA16", "seg-lungs", "lung-masks", "lung_masks")

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One case of a dataset: where its files are and how to read its label.

    ``lesion_values`` are the label values that are lesion; ``other_values`` the other values
    the label may hold besides 0 (e.g. LiTS' liver, 1); anything else is an error. ``mask``
    is an optional organ/body mask file: voxels whose value is in ``mask_values`` (or nonzero
    when ``mask_values`` is None) are organ. ``mask`` may be the label file itself (LiTS).

    ``image`` is the image file, or its first channel when the case has several (multi-sequence
    MR: ``case_0000``, ``case_0001``, ... in the MSD / nnU-Net naming); ``more_channels`` are the
    files of channels 1, 2, ... in order.
    """

    id: str
    image: Path
    label: Path
    mask: Path | None = None
    lesion_values: tuple[float, ...] = (1,)
    other_values: tuple[float, ...] = ()
    mask_values: tuple[float, ...] | None = None
    more_channels: tuple[Path, ...] = ()

    @property
    def image_files(self) -> tuple[Path, ...]:
        """The image's channel files, channel 0 first."""
        return (self.image, *self.more_channels)

    @property
    def channels(self) -> int:
        return 1 + len(self.more_channels)


@dataclass
class CaseVolume:
    """A case in memory: ``image`` float32, ``lesion`` uint8 {0, 1}, ``organ`` uint8 {0, 1} or
    None, all ``[z, y, x]`` on ``geometry`` (a multi-channel image is ``[C, z, y, x]``).

    ``preprocessing`` is the preset the image was prepared with by :func:`prepare_volume`
    (network input), or None while it holds the raw intensities :func:`load_case` read. It
    makes "prepared exactly once" checkable: :func:`prepare_volume` refuses a prepared case.
    """

    id: str
    image: np.ndarray
    lesion: np.ndarray
    organ: np.ndarray | None
    geometry: Geometry
    preprocessing: dict | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.geometry.spacing_zyx


@dataclass
class Dataset:
    """The cases of a dataset folder, sorted by id, and the layout they were read with."""

    root: Path
    layout: str
    cases: list[Case]
    name: str = ""

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.cases]

    def __len__(self) -> int:
        return len(self.cases)

    def __iter__(self) -> Iterator[Case]:
        return iter(self.cases)

    @property
    def channels(self) -> int:
        """Image channels per case (1 unless the cases have ``_0000``, ``_0001``... files); every
        case must have as many, since one network sees them all."""
        first: dict[int, str] = {}
        for c in self.cases:
            first.setdefault(c.channels, c.id)
        if len(first) > 1:
            shown = ", ".join(f"{n} in case {cid}" for n, cid in sorted(first.items()))
            raise InputError(f"dataset {self.root}: the cases have different numbers of image channels ({shown}); "
                             "every case needs the same channels")
        return next(iter(first), 1)

    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.id == case_id:
                return c
        raise InputError(f"case {case_id!r} is not in dataset {self.root}; it has {preview_names(self.ids)}")

    def subset(self, ids: Sequence[str]) -> list[Case]:
        """The cases with these ids, in this order (unknown ids are an error)."""
        by_id = {c.id: c for c in self.cases}
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise InputError(f"case id(s) {preview_names(unknown)} are not in dataset {self.root}; "
                             f"it has {preview_names(self.ids)}")
        return [by_id[i] for i in ids]


def _read_json(path: Path, *, what: str, missing: str) -> Any:
    """The JSON document in ``path``; :class:`InputError` with ``missing`` if the file does not
    exist, or naming ``what`` and the file if it cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(missing) from None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {what} {path}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Labels and cases
# ---------------------------------------------------------------------------------------------


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

    Raises :class:`~IWSegmentationLib.errors.GeometryMismatchError` naming the case when the
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
    return CaseVolume(case.id, image, lesion, organ, geometry)


def prepare_volume(volume: CaseVolume, params: Mapping[str, Any]) -> CaseVolume:
    """A raw case turned into network input by the preprocessing preset ``params``, through
    :func:`preprocessing.prepare_case`, the function inference uses too; the lesion mask
    follows a resampling (nearest neighbour). Top-level, so DataLoader workers can pickle it.

    Raises:
        InputError: naming the case, when its image cannot be prepared.
        RuntimeError: when ``volume`` is already prepared (a program error: preparing twice
            re-windows values already in [0, 1] and crushes the contrast).
    """
    if volume.preprocessing is not None:
        raise RuntimeError(f"case {volume.id} is already preprocessed; a case must be prepared exactly once")
    try:
        image, geometry, organ = prepare_case(volume.image, volume.geometry, dict(params), volume.organ)
    except InputError as exc:
        raise InputError(f"case {volume.id}: {exc}") from None
    lesion = volume.lesion
    if geometry != volume.geometry:
        lesion = resample_to_geometry(lesion, volume.geometry, geometry, is_mask=True)
    return CaseVolume(volume.id, image, lesion, organ, geometry, preprocessing=dict(params))


def load_prepared_case(case: Case, params: Mapping[str, Any]) -> CaseVolume:
    """:func:`load_case` then :func:`prepare_volume`: a case record as network input."""
    return prepare_volume(load_case(case), params)


# ---------------------------------------------------------------------------------------------
# Layout readers
# ---------------------------------------------------------------------------------------------


def _strip_channel(name: str) -> tuple[str, int | None]:
    """``liver_3_0000`` -> (``liver_3``, 0); ``liver_3`` -> (``liver_3``, None)."""
    m = _CHANNEL_SUFFIX.match(name)
    return (m["case"], int(m["channel"])) if m else (name, None)


def group_channels(files: Mapping[str, Path], *, where: str | os.PathLike = "folder",
                   channels: int | None = None) -> dict[str, tuple[Path, ...]]:
    """Case name -> its image files, channel 0 first, from ``{file name: path}`` (as
    :func:`~IWSegmentationLib.imageio.list_images` gives): files named ``<case>_0000``,
    ``<case>_0001``, ... (MSD / nnU-Net channel naming) form one case ``<case>``; any other name
    is a one-channel case of that name. Numbers without a ``_0000`` (``scan_0001``, ``scan_0002``)
    are case names, not channels. A gap in a case's channels or a case that is there both with
    and without the suffix raises :class:`InputError` naming ``where``.

    ``channels=1`` (a one-channel model reads the folder) groups nothing: every file is a case
    under its own name, so a folder of cases numbered ``scan_0000``, ``scan_0001``, ... stays a
    folder of cases."""
    if channels == 1:
        return {name: (file,) for name, file in files.items()}
    numbered: dict[str, dict[int, Path]] = {}
    for name, file in files.items():
        cid, channel = _strip_channel(name)
        if channel is not None:
            numbered.setdefault(cid, {})[channel] = file
    out: dict[str, tuple[Path, ...]] = {}
    grouped = {cid for cid, chans in numbered.items() if 0 in chans}
    for name, file in files.items():
        cid, channel = _strip_channel(name)
        if channel is None or cid not in grouped:
            if name in grouped:
                raise InputError(f"{where} holds case {name!r} both as {file.name} and as channel files "
                                 f"{numbered[name][0].name}, ...; keep one")
            out[name] = (file,)
    for cid in sorted(grouped):
        chans = numbered[cid]
        missing = [c for c in range(max(chans) + 1) if c not in chans]
        if missing:
            raise InputError(f"{where}: case {cid!r} has channel files up to _{max(chans):04d} but no "
                             f"{cid}_{missing[0]:04d} (channels are numbered _0000, _0001, ... without gaps)")
        out[cid] = tuple(chans[c] for c in range(len(chans)))
    return out


def _msd_labels(meta: Mapping, path: Path) -> dict[float, str]:
    """Label value -> name from ``dataset.json`` (MSD ``{"1": "liver"}`` or nnU-Net v2 ``{"liver": 1}``)."""
    labels = meta.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        raise InputError(f"{path} has no 'labels' mapping (value -> name)")
    out: dict[float, str] = {}
    for key, value in labels.items():
        try:
            if isinstance(value, str):  # MSD: "1": "liver"
                out[float(key)] = value
            elif isinstance(value, (int, float)) and not isinstance(value, bool):  # nnU-Net v2: "liver": 1
                out[float(value)] = str(key)
            else:
                raise ValueError
        except ValueError:
            raise InputError(
                f"{path}: cannot read label {key!r}: {value!r} (region-based nnU-Net labels are not supported; "
                "give lesion_values explicitly)") from None
    return out


def _num(v: float) -> float | int:
    return int(v) if float(v).is_integer() else float(v)


def _msd_values(labels: dict[float, str], lesion_values, path: Path):
    foreground = {v: n for v, n in labels.items() if v != 0}
    if lesion_values is None:
        lesion = [v for v, n in foreground.items() if any(w in n.lower() for w in LESION_WORDS)]
        if not lesion and len(foreground) == 1:
            lesion = list(foreground)
        if not lesion:
            raise InputError(
                f"{path}: cannot tell which label is the lesion among "
                f"{', '.join(f'{_num(v)}={n!r}' for v, n in sorted(foreground.items()))}; "
                "give lesion_values explicitly (e.g. --lesion-values 2)")
    else:
        lesion = [float(v) for v in lesion_values]
    other = [v for v in foreground if v not in lesion]
    organ = [v for v in other if any(w in foreground[v].lower() for w in ORGAN_WORDS)]
    mask_values = tuple(_num(v) for v in sorted(organ + lesion)) if organ else None
    return tuple(_num(v) for v in sorted(lesion)), tuple(_num(v) for v in sorted(other)), mask_values


def _find_with_channel(path: Path) -> Path | None:
    """``imagesTr/x.nii.gz`` or, failing that, its nnU-Net name ``imagesTr/x_0000.nii.gz``."""
    if path.is_file():
        return path
    name = case_name(path)
    suffix = path.name[len(name):]
    alt = path.with_name(f"{name}_0000{suffix}")
    return alt if alt.is_file() else None


def _more_channels(image: Path) -> tuple[Path, ...]:
    """The files of channels 1, 2, ... next to channel 0 ``x_0000.nii.gz``: ``x_0001.nii.gz``, ...
    up to the first that does not exist; () for an image without the channel suffix."""
    name = case_name(image)
    cid, channel = _strip_channel(name)
    if channel != 0:
        return ()
    suffix = image.name[len(name):]
    out = []
    while (nxt := image.with_name(f"{cid}_{len(out) + 1:04d}{suffix}")).is_file():
        out.append(nxt)
    return tuple(out)


def _listed_path(root: Path, value: Any, *, key: str, entry: int, path: Path, allow_outside: bool) -> Path:
    """``root / value`` for a path listed in ``dataset.json``; a path that leads outside
    ``root`` (absolute, or through ``..``) is refused unless ``allow_outside``. The check is on
    the path as written (normalised, symlinks not followed), so symlinks *inside* the dataset
    folder, which its owner put there, still work."""
    if not isinstance(value, str) or not value:
        raise InputError(f"{path}: training entry {entry} '{key}' must be a path string, got {value!r}")
    joined = Path(os.path.abspath(root / value))  # abspath normalises ".." without following symlinks
    if not allow_outside and not joined.is_relative_to(os.path.abspath(root)):
        raise InputError(
            f"{path}: training entry {entry} '{key}' {value!r} points outside the dataset folder {root}; "
            "move the file into the folder, or allow it explicitly (allow_outside_paths: true)"
        )
    return root / value


def read_msd(root: str | os.PathLike, *, lesion_values: Sequence[float] | None = None,
             allow_outside_paths: bool = False) -> Dataset:
    """Medical Segmentation Decathlon / nnU-Net layout: ``dataset.json``, ``imagesTr/``, ``labelsTr/``
    and optionally ``masksTr/`` (organ masks, as ``iwseg synth`` writes).

    Cases come from the ``training`` list of ``dataset.json`` when it has the key (MSD; an
    empty list is an error), else from the files in ``imagesTr/`` (nnU-Net v2). Listed paths
    must stay inside ``root`` unless ``allow_outside_paths``. Image names may carry nnU-Net's channel suffix
    ``_0000``; ``_0001``, ``_0002``, ... beside it are the case's further channels (multi-sequence
    MR; every case must have the same number, see :attr:`Dataset.channels`). Lesion values: the labels whose names contain a lesion
    word (tumour, cancer, lesion, nodule, metastasis, ...), or the only foreground label, unless
    ``lesion_values`` is given. A non-lesion label named like an organ (e.g. ``liver``) becomes
    the organ mask (organ ∪ lesion values) when no ``masksTr/`` file exists.
    """
    root = Path(root)
    path = root / "dataset.json"
    meta = _read_json(path, what="dataset description",
                      missing=f"{root} has no dataset.json (Medical Segmentation Decathlon layout)")
    if not isinstance(meta, Mapping):
        raise InputError(f"{path} must hold a JSON object")
    lesion, other, mask_values = _msd_values(_msd_labels(meta, path), lesion_values, path)
    images_dir, labels_dir, masks_dir = root / "imagesTr", root / "labelsTr", root / "masksTr"
    masks = list_images(masks_dir, what="mask folder") if masks_dir.is_dir() else {}

    entries: list[tuple[str, tuple[Path, ...], Path, Path | None]] = []
    training = meta.get("training")
    if training is not None and not (isinstance(training, list) and training):
        raise InputError(
            f"{path}: 'training' must be a non-empty list of {{\"image\": ..., \"label\": ...}} entries, got "
            f"{training!r}; list the cases, or remove the key to train on the files of {images_dir}"
        )
    if training:
        for i, item in enumerate(training):
            if not isinstance(item, Mapping) or "image" not in item or "label" not in item:
                raise InputError(f"{path}: training entry {i} needs 'image' and 'label' paths, got {item!r}")
            listed = functools.partial(_listed_path, root, entry=i, path=path, allow_outside=allow_outside_paths)
            image = _find_with_channel(listed(item["image"], key="image"))
            if image is None:
                raise InputError(f"{path}: image {item['image']} of training entry {i} not found under {root}")
            cid = _strip_channel(case_name(image))[0]
            label = listed(item["label"], key="label")
            if not label.is_file():
                raise InputError(f"case {cid}: label {label} (from {path.name}) not found")
            mask = listed(item["mask"], key="mask") if item.get("mask") else masks.get(cid)
            if mask is not None and not Path(mask).is_file():
                raise InputError(f"case {cid}: mask {mask} (from {path.name}) not found")
            entries.append((cid, (image, *_more_channels(image)), label, mask))
    else:
        images = group_channels(list_images(images_dir, what="imagesTr folder"), where=images_dir)
        labels = list_images(labels_dir, what="labelsTr folder")
        check_pairs(images, labels, first_what="image", second_what="label", first_dir=images_dir,
                    second_dir=labels_dir)
        entries = [(cid, images[cid], labels[cid], masks.get(cid)) for cid in images]
    if not entries:
        raise InputError(f"{root}: dataset.json lists no training cases and {images_dir} holds no images")
    seen: set[str] = set()
    cases = []
    for cid, (image, *more), label, mask in entries:
        if cid in seen:
            raise InputError(f"{path}: case {cid!r} is listed twice")
        seen.add(cid)
        if mask is None and mask_values is not None:  # the organ is a label class (MSD liver)
            cases.append(Case(cid, image, label, label, lesion, other, mask_values, tuple(more)))
        else:
            cases.append(Case(cid, image, label, mask, lesion, other, more_channels=tuple(more)))
    cases.sort(key=lambda c: natural_key(c.id))
    return Dataset(root, "msd", cases, name=str(meta.get("name", root.name)))


_LITS_VOLUME = re.compile(r"^volume-(\d+)\.nii(\.gz)?$", re.IGNORECASE)
_LITS_SEG = re.compile(r"^segmentation-(\d+)\.nii(\.gz)?$", re.IGNORECASE)


def _lits_files(root: Path, pattern: re.Pattern, what: str) -> dict[int, Path]:
    out: dict[int, Path] = {}
    for file in root.rglob("*.nii*"):
        m = pattern.match(file.name)
        if m and not file.name.startswith("."):
            n = int(m.group(1))
            if n in out:
                raise InputError(f"two LiTS {what} files for case {n}: {out[n]} and {file}")
            out[n] = file
    return out


def read_lits(
    root: str | os.PathLike, *, lesion_values: Sequence[float] | None = None
) -> Dataset:
    """LiTS: ``volume-N.nii[.gz]`` and ``segmentation-N.nii[.gz]`` anywhere under ``root`` (e.g. in
    ``Training Batch 1/`` and ``Training Batch 2/``). Tumour (label 2) is the lesion; liver
    (1) and tumour together form the organ mask. Case ids are ``volume-N``."""
    root = Path(root)
    volumes = _lits_files(root, _LITS_VOLUME, "volume")
    segs = _lits_files(root, _LITS_SEG, "segmentation")
    if not volumes:
        raise InputError(f"{root} holds no LiTS volume-N.nii files")
    check_pairs({f"volume-{n}": p for n, p in volumes.items()}, {f"volume-{n}": p for n, p in segs.items()},
                first_what="volume", second_what="segmentation", first_dir=root, second_dir=root)
    lesion = tuple(lesion_values) if lesion_values is not None else (2,)
    other = tuple(v for v in (1, 2) if v not in lesion)
    cases = [
        Case(f"volume-{n}", volumes[n], segs[n], segs[n], lesion_values=lesion, other_values=other,
             mask_values=(1, 2))
        for n in sorted(volumes)
    ]
    return Dataset(root, "lits", cases, name="LiTS")


def _first_dir(root: Path, names: Sequence[str]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def read_luna16(
    root: str | os.PathLike, *, lesion_values: Sequence[float] | None = None,
    other_values: Sequence[float] = (),
) -> Dataset:
    """LUNA16-style: scans ``<seriesuid>.mhd`` in ``subset*/`` folders (or directly in ``root``),
    nodule masks ``seg-nodules/<seriesuid>.mhd`` (also ``nodule-masks/``, ``nodule_masks/``;
    0 background, 1 nodule; any image format) and optional lung masks
    ``seg-lungs-LUNA16/<seriesuid>.mhd`` (nonzero = lung). LUNA16 itself ships no nodule masks
    (only centres and diameters); they must be made first, e.g. from the LIDC-IDRI annotations.
    Every scan needs a nodule mask (an empty one for a scan without nodules)."""
    root = Path(root)
    nodule_dir = _first_dir(root, LUNA_NODULE_DIRS)
    if nodule_dir is None:
        raise InputError(f"{root} has no nodule-mask folder ({' or '.join(LUNA_NODULE_DIRS)}) of a LUNA16-style dataset")
    lung_dir = _first_dir(root, LUNA_LUNG_DIRS)
    scans: dict[str, Path] = {}
    folders = [root] + sorted((d for d in root.iterdir() if d.is_dir() and d.name.lower().startswith("subset")),
                              key=lambda d: natural_key(d.name))
    for folder in folders:
        for file in sorted(folder.glob("*.mhd")):
            if file.name.startswith("."):
                continue
            cid = case_name(file)
            if cid in scans:
                raise InputError(f"scan {cid} appears twice: {scans[cid]} and {file}")
            scans[cid] = file
    if not scans:
        raise InputError(f"{root} holds no .mhd scans (in subset*/ folders or at the top)")
    nodules = list_images(nodule_dir, what="nodule-mask folder")
    missing = sorted(set(scans) - set(nodules), key=natural_key)
    if missing:
        raise InputError(f"no nodule mask in {nodule_dir} for scan(s) {preview_names(missing)} "
                         "(write an empty mask for a scan without nodules)")
    lungs = list_images(lung_dir, what="lung-mask folder") if lung_dir is not None else {}
    lesion = tuple(lesion_values) if lesion_values is not None else (1,)
    cases = [Case(cid, scans[cid], nodules[cid], lungs.get(cid), lesion_values=lesion,
                  other_values=tuple(other_values)) for cid in sorted(scans, key=natural_key)]
    return Dataset(root, "luna16", cases, name="LUNA16")


def read_plain(
    root: str | os.PathLike, *, lesion_values: Sequence[float] | None = None,
    other_values: Sequence[float] = (),
) -> Dataset:
    """A plain folder: ``images/`` and ``labels/`` holding files of the same case names (any of
    ``.nii.gz .nii .nrrd .nhdr .mha .mhd``), and optionally ``masks/`` (organ masks, nonzero =
    organ). Labels are 0/1 unless ``lesion_values`` (and ``other_values``) say otherwise."""
    root = Path(root)
    images_dir, labels_dir, masks_dir = root / "images", root / "labels", root / "masks"
    images = list_images(images_dir, what="images folder")
    labels = list_images(labels_dir, what="labels folder")
    check_pairs(images, labels, first_what="image", second_what="label", first_dir=images_dir, second_dir=labels_dir)
    masks = list_images(masks_dir, what="masks folder") if masks_dir.is_dir() else {}
    lesion = tuple(lesion_values) if lesion_values is not None else (1,)
    cases = [Case(cid, images[cid], labels[cid], masks.get(cid), lesion_values=lesion,
                  other_values=tuple(other_values)) for cid in sorted(images, key=natural_key)]
    return Dataset(root, "plain", cases, name=root.name)


def detect_layout(root: str | os.PathLike) -> str:
    """Which of :data:`LAYOUTS` the folder ``root`` is in (checked in that order)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"dataset folder not found: {root}")
    if (root / "dataset.json").is_file():
        return "msd"
    if any(_LITS_VOLUME.match(f.name) for f in root.rglob("volume-*.nii*")):
        return "lits"
    if _first_dir(root, LUNA_NODULE_DIRS) is not None:
        return "luna16"
    if (root / "images").is_dir() and (root / "labels").is_dir():
        return "plain"
    raise InputError(
        f"cannot tell the layout of dataset folder {root}: expected dataset.json + imagesTr/ + labelsTr/ (MSD), "
        "volume-N.nii + segmentation-N.nii (LiTS), subset*/*.mhd + seg-nodules/ (LUNA16-style) or "
        "images/ + labels/ (plain); see docs/data.md")


def load_dataset(
    root: str | os.PathLike,
    layout: str = "auto",
    *,
    lesion_values: Sequence[float] | None = None,
    other_values: Sequence[float] | None = None,
    allow_outside_paths: bool = False,
) -> Dataset:
    """List the cases of a dataset folder (no voxels are read; see :func:`load_case`).

    ``allow_outside_paths`` lets a ``dataset.json`` (MSD layout) list files outside ``root``;
    by default such a path is refused, so a dataset cannot make the trainer read, say,
    ``../../etc/passwd``.

    ``layout`` is ``"auto"`` or one of :data:`LAYOUTS` (aliases :data:`LAYOUT_ALIASES`).
    ``lesion_values`` overrides the layout's lesion label values; ``other_values`` are further
    label values allowed (not lesion) for the LUNA16-style and plain layouts, whose other
    values are otherwise errors (MSD and LiTS know theirs from the dataset definition).
    """
    layout = LAYOUT_ALIASES.get(layout, layout)
    if layout not in ("auto", *LAYOUTS):
        raise InputError(f"unknown dataset layout {layout!r}; choose auto, {', '.join(LAYOUTS)}")
    if lesion_values is not None:
        lesion_values = _check_values(lesion_values, "lesion_values")
        if not lesion_values:
            raise InputError("lesion_values must name at least one label value")
    other = _check_values(other_values or (), "other_values")
    if layout == "auto":
        layout = detect_layout(root)
    elif not Path(root).is_dir():
        raise InputError(f"dataset folder not found: {root}")
    if layout == "msd":
        dataset = read_msd(root, lesion_values=lesion_values, allow_outside_paths=allow_outside_paths)
    elif layout == "lits":
        dataset = read_lits(root, lesion_values=lesion_values)
    elif layout == "luna16":
        dataset = read_luna16(root, lesion_values=lesion_values, other_values=other)
    else:
        dataset = read_plain(root, lesion_values=lesion_values, other_values=other)
    if not dataset.cases:
        raise InputError(f"dataset {root} ({layout}) holds no cases")
    return dataset


def _check_values(values: Sequence[float], what: str) -> tuple:
    try:
        out = tuple(_num(float(v)) for v in values)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be numbers, got {values!r}") from None
    if any(v == 0 for v in out):
        raise InputError(f"{what} may not contain 0 (the background), got {list(values)}")
    return out


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------


def _split_counts(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder rounding of ``n * fraction`` so the counts add up to ``n``."""
    raw = {k: n * f for k, f in fractions.items()}
    counts = {k: int(math.floor(v)) for k, v in raw.items()}
    left = n - sum(counts.values())
    for k in sorted(raw, key=lambda k: -(raw[k] - counts[k]))[:left]:
        counts[k] += 1
    return counts


def make_splits(
    case_ids: Sequence[str],
    fractions: Sequence[float] | Mapping[str, float] = (0.8, 0.2),
    seed: int = 0,
) -> dict[str, list[str]]:
    """Seeded random split of ``case_ids`` by fractions.

    ``fractions`` is ``(train, val)``, ``(train, val, test)`` or a mapping with keys from
    :data:`SPLIT_NAMES`; the fractions must be positive and add up to 1. Counts use
    largest-remainder rounding; a split that would be empty is an error. The result depends
    only on the *set* of ids and the seed (not their order); ids are sorted within a split.
    """
    ids = [str(i) for i in case_ids]
    dup = sorted(i for i, n in Counter(ids).items() if n > 1)
    if dup:
        raise InputError(f"duplicate case id(s) {preview_names(dup)}")
    if isinstance(fractions, Mapping):
        frac = {str(k): fractions[k] for k in fractions}
    else:
        fractions = list(fractions)
        if len(fractions) not in (2, 3):
            raise InputError(f"fractions must be (train, val) or (train, val, test), got {fractions}")
        frac = dict(zip(SPLIT_NAMES, fractions))
    unknown = [k for k in frac if k not in SPLIT_NAMES]
    if unknown or "train" not in frac:
        raise InputError(f"split names must include 'train' and come from {', '.join(SPLIT_NAMES)}, got {list(frac)}")
    try:
        frac = {k: float(v) for k, v in frac.items()}
    except (TypeError, ValueError):
        raise InputError(f"fractions must be numbers, got {frac}") from None
    if any(not (v > 0) for v in frac.values()) or abs(sum(frac.values()) - 1.0) > 1e-6:
        raise InputError(f"split fractions must be positive and add up to 1, got {frac}")
    counts = _split_counts(len(ids), frac)
    empty = [k for k, c in counts.items() if c == 0]
    if empty:
        raise InputError(f"split(s) {', '.join(empty)} would be empty: {len(ids)} case(s) cannot be split as {frac}")
    order = np.random.default_rng(seed).permutation(len(ids))
    pool = [sorted(ids, key=natural_key)[i] for i in order]
    out, at = {}, 0
    for k in frac:
        out[k] = sorted(pool[at:at + counts[k]], key=natural_key)
        at += counts[k]
    return out


def check_splits(
    splits: Any, case_ids: Sequence[str] | None = None, *, source: str = "splits"
) -> dict[str, list[str]]:
    """Validate a split mapping: keys from :data:`SPLIT_NAMES` with ``train`` present, each a
    non-empty list of distinct string ids, no id in two splits and (if ``case_ids`` is given)
    no unknown id. Returns a clean ``{name: [ids]}``; errors name ``source``."""
    if not isinstance(splits, Mapping):
        raise InputError(f"{source} must be a JSON object {{\"train\": [...], \"val\": [...]}}, got {type(splits).__name__}")
    bad_keys = [k for k in splits if k not in SPLIT_NAMES]
    if bad_keys:
        raise InputError(f"{source}: unknown split name(s) {preview_names(bad_keys)}; valid names are {', '.join(SPLIT_NAMES)}")
    if "train" not in splits:
        raise InputError(f"{source} has no 'train' split")
    out: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for name, ids in splits.items():
        if not isinstance(ids, (list, tuple)) or not all(isinstance(i, str) for i in ids):
            raise InputError(f"{source}: split {name!r} must be a list of case-id strings")
        if not ids:
            raise InputError(f"{source}: split {name!r} is empty")
        for i in ids:
            if i in owner:
                where = "twice in" if owner[i] == name else f"in both {owner[i]!r} and"
                raise InputError(f"{source}: case {i!r} is {where} split {name!r}; a case may be in one split only")
            owner[i] = name
        out[name] = list(ids)
    if case_ids is not None:
        known = set(case_ids)
        unknown = [i for i in owner if i not in known]
        if unknown:
            raise InputError(f"{source}: case id(s) {preview_names(unknown)} are not in the dataset; "
                             f"known ids: {preview_names(sorted(known, key=natural_key))}")
    return out


def read_splits(
    path: str | os.PathLike, case_ids: Sequence[str] | None = None, *, fold: int = 0
) -> dict[str, list[str]]:
    """Read a split file ``{"train": [...], "val": [...], "test": [...]}`` and validate it with
    :func:`check_splits`. An nnU-Net ``splits_final.json`` (a list of such objects, one per
    fold) is accepted too: ``fold`` picks one."""
    path = Path(path)
    data = _read_json(path, what="split file", missing=f"split file not found: {path}")
    if isinstance(data, list):
        if not (0 <= fold < len(data)):
            raise InputError(f"split file {path} has {len(data)} fold(s); fold {fold} does not exist")
        data = data[fold]
    return check_splits(data, case_ids, source=f"split file {path}")


def write_splits(path: str | os.PathLike, splits: Mapping[str, Sequence[str]]) -> Path:
    """Write a (validated) split mapping as JSON, atomically."""
    clean = check_splits(dict(splits))
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(clean, indent=2) + "\n")
    return Path(path)


# ---------------------------------------------------------------------------------------------
# Patch sampling
# ---------------------------------------------------------------------------------------------


def _label_dtype(k: int):
    return np.uint8 if k < 2**8 else np.uint16 if k < 2**16 else np.int32


@dataclass
class PreparedCase:
    """A case ready for sampling (built once, then cached): the image and the whole-image
    component labels, both padded to at least the patch size, and per lesion the flat indices
    of its voxels (``lesion_voxels[offsets[j-1]:offsets[j]]`` for lesion ``j``)."""

    id: str
    image: np.ndarray
    labels: np.ndarray
    num_lesions: int
    lesion_voxels: np.ndarray
    offsets: np.ndarray
    pad_before: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        """The spatial shape (a multi-channel image is ``[C, z, y, x]``)."""
        return tuple(self.image.shape[-3:])  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        return int(self.image.nbytes + self.labels.nbytes + self.lesion_voxels.nbytes)


@dataclass
class Patch:
    """One training patch: ``image`` float32, ``target`` uint8 {0, 1} and ``labels`` int32
    (the whole-image component ids, cropped — ids need not be contiguous), all of
    ``patch_size``. ``start`` is the corner in the padded volume and ``origin`` the same corner
    on the case's own grid (negative where the volume was padded); ``lesion`` the id of the
    lesion the patch was centred on (0 for a uniformly placed patch)."""

    case: str
    image: np.ndarray
    target: np.ndarray
    labels: np.ndarray
    start: tuple[int, int, int]
    lesion: int
    origin: tuple[int, int, int] = (0, 0, 0)

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
    """

    def __init__(self, patch_size: Sequence[int], *, lesion_probability: float = 0.5,
                 connectivity: int = 26, pad_value: float | None = None):
        try:
            size = tuple(int(v) for v in patch_size)
        except (TypeError, ValueError):
            raise InputError(f"patch_size must be three positive integers, got {patch_size!r}") from None
        if len(size) != 3 or min(size) < 1:
            raise InputError(f"patch_size must be three positive integers (z, y, x), got {tuple(patch_size)}")
        if not (0.0 <= float(lesion_probability) <= 1.0):
            raise InputError(f"lesion_probability must be in [0, 1], got {lesion_probability}")
        if connectivity not in (6, 18, 26):
            raise InputError(f"connectivity must be 6, 18 or 26, got {connectivity}")
        self.patch_size = size
        self.lesion_probability = float(lesion_probability)
        self.connectivity = connectivity
        self.pad_value = pad_value

    def prepare(self, image: np.ndarray, lesion: np.ndarray, case_id: str = "case") -> PreparedCase:
        """Label the lesions of the whole image, pad to the patch size, index lesion voxels.
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
        flat = labels.ravel()
        idx = np.flatnonzero(flat)
        order = np.argsort(flat[idx], kind="stable")
        voxels = idx[order]
        counts = np.bincount(flat[idx].astype(np.intp), minlength=k + 1)[1:]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return PreparedCase(case_id, np.ascontiguousarray(image), labels, k, voxels, offsets,
                            tuple(a for a, _ in pad))

    def patch_start(self, case: PreparedCase, rng: np.random.Generator) -> tuple[tuple[int, int, int], int]:
        """Corner of the next patch and the lesion it is centred on (0: uniform)."""
        shape = np.asarray(case.shape)
        size = np.asarray(self.patch_size)
        hi = shape - size  # >= 0 after padding
        centred = rng.random() < self.lesion_probability
        if centred and case.num_lesions > 0:
            j = int(rng.integers(1, case.num_lesions + 1))
            a, b = int(case.offsets[j - 1]), int(case.offsets[j])
            flat = int(case.lesion_voxels[a + int(rng.integers(b - a))])
            centre = np.asarray(np.unravel_index(flat, case.shape))
            start = np.clip(centre - size // 2, 0, hi)
            return tuple(int(v) for v in start), j  # type: ignore[return-value]
        start = [int(rng.integers(0, h + 1)) for h in hi]
        return tuple(start), 0  # type: ignore[return-value]

    def sample(self, case: PreparedCase, rng: np.random.Generator) -> Patch:
        """One patch from a prepared case (copies, so the cached volume is never modified)."""
        start, lesion = self.patch_start(case, rng)
        box = tuple(slice(s, s + p) for s, p in zip(start, self.patch_size))
        labels = case.labels[box].astype(np.int32)
        origin = tuple(int(s - b) for s, b in zip(start, case.pad_before))
        return Patch(case.id, case.image[(..., *box)].copy(), (labels > 0).astype(np.uint8), labels, start, lesion,
                     origin)


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


def _batch_images(images: Sequence[np.ndarray]) -> np.ndarray:
    """Patches ``[z, y, x]`` or ``[C, z, y, x]`` stacked as the network's ``(B, C, z, y, x)``."""
    batch = np.stack(images)
    return batch[:, None] if batch.ndim == 4 else batch


class PatchDataset(IterableDataset):
    """Batches of training patches for a torch ``DataLoader(dataset, batch_size=None)``.

    Each item is one *batch* (a dict): ``image`` float32 ``(B, C, D, H, W)`` (C image channels),
    ``target`` float32 ``(B, 1, D, H, W)``, ``labels`` int32 ``(B, 1, D, H, W)`` (cropped whole-image component
    ids, for :func:`~IWSegmentationLib.weights.component_weights`), ``lesion_centred`` bool
    ``(B,)``, ``origin`` int64 ``(B, 3)`` (each patch's corner on its case's grid), ``case``
    (list of ids) and ``step``.

    **Determinism.** Batch ``step`` is drawn from its own generator
    ``rng_factory(step)`` (default :func:`default_batch_rng` of ``(seed, rank, step)``): which
    cases, where the patches go and the augmentation are a pure function of the seed, the
    DDP ``rank`` and the step. DataLoader worker ``w`` of ``W`` makes the steps with
    ``step % W == w`` and the loader returns them in step order, so the stream of batches is
    the same for any number of workers, and a resumed run (``start_step``) continues it
    exactly. Each rank draws its own stream over all cases.

    **Cases are used as given.** A :class:`CaseVolume` source is sampled as it is; a
    :class:`Case` record is turned into one by ``loader`` (default :func:`load_case`; the
    trainer passes :func:`load_prepared_case`). The dataset never transforms a volume itself,
    so whoever builds it decides, in one place, how a case is prepared.

    **Cache.** Cases are loaded, labelled and padded once, then kept in memory (at most ``cache_size`` cases, least recently used out;
    None = all; about 5–7 bytes per voxel). Call :meth:`preload` before creating the
    DataLoader: with the ``fork`` start method the workers then share the cached volumes.

    ``transform`` (optional, ``dict -> dict``) runs on each finished batch in the worker, e.g.
    to compute the inverse weights off the training step; ``augment`` (``(Patch, rng) -> Patch``,
    e.g. :func:`augment_patch`) on each patch.
    """

    def __init__(
        self,
        cases: Sequence[CaseSource],
        sampler: PatchSampler,
        *,
        batch_size: int = 2,
        steps: int | None = None,
        start_step: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        augment: Callable[[Patch, np.random.Generator], Patch] | None = None,
        transform: Callable[[dict], dict] | None = None,
        loader: Callable[[Case], CaseVolume] = load_case,
        cache_size: int | None = None,
        rng_factory: Callable[[int], np.random.Generator] | None = None,
    ):
        super().__init__()
        if not cases:
            raise InputError("PatchDataset needs at least one case (is the training split empty?)")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        if steps is not None and (not isinstance(steps, int) or steps < 0):
            raise InputError(f"steps must be a non-negative integer or None, got {steps!r}")
        if not isinstance(start_step, int) or start_step < 0:
            raise InputError(f"start_step must be a non-negative integer, got {start_step!r}")
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise InputError(f"rank must be in [0, world_size) and world_size >= 1, got rank={rank} world_size={world_size}")
        if cache_size is not None and cache_size < 1:
            raise InputError(f"cache_size must be >= 1 or None, got {cache_size}")
        self.cases = list(cases)
        self.sampler = sampler
        self.batch_size = batch_size
        self.steps = steps
        self.start_step = start_step
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.augment, self.transform, self.loader = augment, transform, loader
        self.cache_size = cache_size
        self.rng_factory = rng_factory
        self._cache: OrderedDict[int, PreparedCase] = OrderedDict()

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("an endless PatchDataset (steps=None) has no length")
        return self.steps

    def prepared(self, index: int) -> PreparedCase:
        """The cached, prepared case ``index`` (loaded on first use)."""
        hit = self._cache.get(index)
        if hit is not None:
            self._cache.move_to_end(index)
            return hit
        source = self.cases[index]
        volume = self.loader(source) if isinstance(source, Case) else source
        prepared = self.sampler.prepare(volume.image, volume.lesion, volume.id)
        self._cache[index] = prepared
        if self.cache_size is not None:
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return prepared

    def preload(self) -> int:
        """Load and prepare every case now (in this process); returns the bytes cached."""
        n = len(self.cases) if self.cache_size is None else min(self.cache_size, len(self.cases))
        for i in range(n):
            self.prepared(i)
        return sum(p.nbytes for p in self._cache.values())

    def rng(self, step: int) -> np.random.Generator:
        if self.rng_factory is not None:
            return self.rng_factory(step)
        return default_batch_rng(self.seed, self.rank, step)

    def sample_patches(self, step: int) -> list[Patch]:
        """The patches of batch ``step`` (a pure function of seed, rank and step)."""
        rng = self.rng(step)
        out = []
        for _ in range(self.batch_size):
            index = int(rng.integers(len(self.cases)))
            patch = self.sampler.sample(self.prepared(index), rng)
            if self.augment is not None:
                patch = self.augment(patch, rng)
            out.append(patch)
        return out

    def batch(self, step: int) -> dict:
        """Batch ``step`` as tensors (see the class docstring)."""
        import torch

        patches = self.sample_patches(step)
        batch = {
            "image": torch.from_numpy(_batch_images([p.image for p in patches])),
            "target": torch.from_numpy(np.stack([p.target for p in patches])[:, None].astype(np.float32)),
            "labels": torch.from_numpy(np.stack([p.labels for p in patches])[:, None]),
            "lesion_centred": torch.tensor([p.lesion_centred for p in patches]),
            "origin": torch.tensor([p.origin for p in patches], dtype=torch.int64),
            "case": [p.case for p in patches],
            "step": step,
        }
        return self.transform(batch) if self.transform is not None else batch

    def __iter__(self) -> Iterator[dict]:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        end = None if self.steps is None else self.start_step + self.steps
        step = self.start_step + worker
        while end is None or step < end:
            yield self.batch(step)
            step += workers


def make_loader(dataset: PatchDataset, *, num_workers: int = 2, pin_memory: bool = False,
                prefetch_factor: int = 2):
    """A ``DataLoader`` over batches of ``dataset`` with ``num_workers`` background processes
    (persistent, so their caches live for the whole run; they keep a cancel handler the
    parent installed, see :func:`~IWSegmentationLib.progress.reinstall_cancel_handlers`)."""
    from torch.utils.data import DataLoader

    from .progress import reinstall_cancel_handlers

    if num_workers < 0:
        raise InputError(f"num_workers must be >= 0, got {num_workers}")
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=prefetch_factor,
                      worker_init_fn=reinstall_cancel_handlers)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kwargs)


#: How torch's DataLoader starts the message of an error it re-raises from a worker process.
_WORKER_ERROR_PREFIX = "Caught "


def next_batch(stream: Iterator[dict]) -> dict:
    """The next batch of a :func:`make_loader` stream.

    A user error (:class:`~IWSegmentationLib.errors.IWSegError`, e.g. a case that cannot be
    prepared, named by :func:`prepare_volume`) raised in a worker process reaches the parent
    as torch's re-raise: the same class, but its message is the worker's whole traceback.
    Here it becomes that class again with the worker's own message, so the command line still
    prints one line naming the case. Other errors pass unchanged.
    """
    try:
        return next(stream)
    except IWSegError as exc:
        text = str(exc)
        marker = f"{type(exc).__module__}.{type(exc).__qualname__}: "
        if not text.startswith(_WORKER_ERROR_PREFIX) or marker not in text:
            raise
        raise type(exc)(text.rsplit(marker, 1)[1].strip()) from None
