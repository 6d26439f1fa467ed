"""Image file names: the suffixes read and written, case names, a folder's images in natural order, image/label pairs."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import InputError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


#: Detached-header formats (header and voxel data in two files) -> the same format in one file.
#: They are read but never written: a pair of files cannot be replaced atomically, and the
#: header would name the temporary data file (docs/inference.md, "Output files").
DETACHED_SUFFIXES = {".mhd": ".mha", ".nhdr": ".nrrd"}


def case_name(path: str | os.PathLike) -> str:
    """Case id of an image file: its name without the image suffix (``case_001.nii.gz`` -> ``case_001``)."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).is_file() and any(str(path).lower().endswith(s) for s in IMAGE_SUFFIXES)


def list_images(folder: str | os.PathLike, *, what: str = "folder") -> dict[str, Path]:
    """Map case name -> image path for every image file directly inside ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{what} is not a folder: {folder}")
    out: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if is_image_file(entry) and not entry.name.startswith("."):
            name = case_name(entry)
            if name in out:
                raise InputError(f"{what} {folder} holds two images for case {name!r}: {out[name].name}, {entry.name}")
            out[name] = entry
    return out


def natural_key(text: str) -> list:
    """Sort key that orders ``case_2`` before ``case_10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def preview_names(items: Sequence[Any], n: int = 8) -> str:
    """``'a', 'b', ... (12 in all)``: the first ``n`` items quoted, for error messages."""
    items = list(items)
    shown = ", ".join(repr(i) for i in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def check_pairs(
    first: Mapping[str, Path], second: Mapping[str, Path], *, first_what: str, second_what: str,
    first_dir: str | os.PathLike, second_dir: str | os.PathLike,
) -> None:
    """Check that two case name -> file maps (e.g. images and labels, from :func:`list_images`)
    hold the same cases, and that ``first`` is not empty.

    One :class:`InputError` names every case without a partner, both ways, e.g.
    ``no label in labels/ for image case(s) 'b'; no image in images/ for label case(s) 'c'``.
    """
    if not first:
        raise InputError(f"{first_what} folder {first_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    problems = []
    no_second = sorted(set(first) - set(second), key=natural_key)
    no_first = sorted(set(second) - set(first), key=natural_key)
    if no_second:
        problems.append(f"no {second_what} in {second_dir} for {first_what} case(s) {preview_names(no_second)}")
    if no_first:
        problems.append(f"no {first_what} in {first_dir} for {second_what} case(s) {preview_names(no_first)}")
    if problems:
        raise InputError("; ".join(problems))


def pair_cases(pred_dir: str | os.PathLike, ref_dir: str | os.PathLike) -> list[tuple[str, Path, Path]]:
    """Pair prediction and reference files by case name, sorted by name; a file without a
    partner, or an empty reference folder, is an error (see :func:`check_pairs`)."""
    preds = list_images(pred_dir, what="prediction folder")
    refs = list_images(ref_dir, what="reference folder")
    check_pairs(refs, preds, first_what="reference", second_what="prediction", first_dir=ref_dir, second_dir=pred_dir)
    return [(name, preds[name], refs[name]) for name in sorted(refs)]


#: ``<case>_0000``, ``<case>_0001``, ...: MSD / nnU-Net channel files of one case
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def strip_channel(name: str) -> tuple[str, int | None]:
    """``liver_3_0000`` -> (``liver_3``, 0); ``liver_3`` -> (``liver_3``, None)."""
    m = _CHANNEL_SUFFIX.match(name)
    return (m["case"], int(m["channel"])) if m else (name, None)


def group_channels(files: Mapping[str, Path], *, where: str | os.PathLike = "folder",
                   channels: int | None = None) -> dict[str, tuple[Path, ...]]:
    """Case name -> its image files, channel 0 first, from ``{file name: path}`` (as
    :func:`~IWSegmentationLib.core.imageio.list_images` gives): files named ``<case>_0000``,
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
        cid, channel = strip_channel(name)
        if channel is not None:
            numbered.setdefault(cid, {})[channel] = file
    out: dict[str, tuple[Path, ...]] = {}
    grouped = {cid for cid, chans in numbered.items() if 0 in chans}
    for name, file in files.items():
        cid, channel = strip_channel(name)
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
