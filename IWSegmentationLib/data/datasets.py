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
  with in-patch counts (:func:`IWSegmentationLib.core.weights.component_weights`).
  :class:`PatchDataset` is the torch ``IterableDataset`` that feeds DataLoader workers.

Arrays are ``[z, y, x]``; see :mod:`IWSegmentationLib.core.imageio`.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ..core.errors import InputError
from ..core.files import (
    case_name,
    check_pairs,
    group_channels,
    list_images,
    natural_key,
    preview_names,
    strip_channel,
)

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

    ``verdicts`` is the case's reviewer verdict file (``CASE.verdicts.json``, set by the trainer's
    ``reviewed`` key; :mod:`IWSegmentationLib.data.reviewed`), or None: :func:`~IWSegmentationLib.data.cases.load_case`
    then trains on the reviewed label and the rejected lesions as hard negatives.
    """

    id: str
    image: Path
    label: Path
    mask: Path | None = None
    lesion_values: tuple[float, ...] = (1,)
    other_values: tuple[float, ...] = ()
    mask_values: tuple[float, ...] | None = None
    more_channels: tuple[Path, ...] = ()
    verdicts: Path | None = None

    @property
    def image_files(self) -> tuple[Path, ...]:
        """The image's channel files, channel 0 first."""
        return (self.image, *self.more_channels)

    @property
    def channels(self) -> int:
        return 1 + len(self.more_channels)


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


def read_json(path: Path, *, what: str, missing: str) -> Any:
    """The JSON document in ``path``; :class:`InputError` with ``missing`` if the file does not
    exist, or naming ``what`` and the file if it cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(missing) from None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {what} {path}: {exc}") from None


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
    cid, channel = strip_channel(name)
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
    meta = read_json(path, what="dataset description",
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
            cid = strip_channel(case_name(image))[0]
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
