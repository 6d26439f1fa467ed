"""Reading and writing 3D images with their geometry, and atomic output files.

Array convention used everywhere in IWSegmentationLib: numpy arrays are indexed
``[z, y, x]`` (SimpleITK's ``GetArrayFromImage`` order), and a ``spacing`` given to an
array function is in the same array-axis order ``(sz, sy, sx)``. :class:`Geometry` keeps
ITK's own ``(x, y, z)`` order for spacing, origin and size and offers ``spacing_zyx``.
Physical coordinates are ITK's LPS millimetres; Slicer converts them to RAS.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .errors import GeometryMismatchError, InputError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def case_name(path: str | os.PathLike) -> str:
    """Case id of an image file: its name without the image suffix (``case_001.nii.gz`` -> ``case_001``)."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).is_file() and any(str(path).lower().endswith(s) for s in IMAGE_SUFFIXES)


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of a 3D image, in ITK order: ``size``/``spacing``/``origin`` are (x, y, z),
    ``direction`` is the 3x3 direction matrix flattened row-major (columns are the axes)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Spacing in numpy array-axis order, as the array functions of this package take it."""
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return (self.size[2], self.size[1], self.size[0])

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def index_to_physical(self, index_zyx: Sequence[float]) -> tuple[float, float, float]:
        """Physical LPS point (mm) of a continuous voxel index given in array order (z, y, x)."""
        ijk = np.asarray(index_zyx, dtype=float)[::-1]
        point = np.asarray(self.origin) + self.direction_matrix @ (ijk * np.asarray(self.spacing))
        return tuple(float(v) for v in point)

    def differences(self, other: Geometry, *, rtol: float = 1e-4, atol: float = 1e-3) -> list[str]:
        """Human-readable list of the ways ``other`` is on a different grid (empty if the same)."""
        out = []
        if tuple(self.size) != tuple(other.size):
            out.append(f"size {tuple(self.size)} vs {tuple(other.size)}")
        for field in ("spacing", "origin", "direction"):
            a, b = np.asarray(getattr(self, field)), np.asarray(getattr(other, field))
            if not np.allclose(a, b, rtol=rtol, atol=atol):
                out.append(f"{field} {tuple(np.round(a, 4))} vs {tuple(np.round(b, 4))}")
        return out

    @classmethod
    def from_sitk(cls, image) -> Geometry:
        return cls(
            size=tuple(int(v) for v in image.GetSize()),
            spacing=tuple(float(v) for v in image.GetSpacing()),
            origin=tuple(float(v) for v in image.GetOrigin()),
            direction=tuple(float(v) for v in image.GetDirection()),
        )

    def apply_to(self, image) -> None:
        """Copy spacing, origin and direction onto a SimpleITK image of the same size."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)

    @classmethod
    def identity(cls, shape_zyx: Sequence[int], spacing_zyx: Sequence[float] = (1.0, 1.0, 1.0)) -> Geometry:
        """An axis-aligned grid at the origin, for arrays that come without a header."""
        return cls(
            size=tuple(int(v) for v in shape_zyx[::-1]),
            spacing=tuple(float(v) for v in spacing_zyx[::-1]),
            origin=(0.0, 0.0, 0.0),
        )


def check_same_grid(a: Geometry, b: Geometry, name_a: str, name_b: str) -> None:
    """Raise :class:`GeometryMismatchError` naming both files if ``a`` and ``b`` differ."""
    diffs = a.differences(b)
    if diffs:
        raise GeometryMismatchError(
            f"{name_a} and {name_b} are not on the same voxel grid: " + "; ".join(diffs)
            + ". Resample one onto the other first."
        )


def _sitk():
    import SimpleITK as sitk

    return sitk


def read_sitk(path: str | os.PathLike, *, what: str = "image"):
    """Read a NIfTI/NRRD/MHA file or a DICOM series folder into a SimpleITK image.

    Raises :class:`InputError` naming ``path`` when it is missing or unreadable.
    """
    sitk = _sitk()
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise InputError(f"{what} folder {path} holds no DICOM series")
            if len(series) > 1:
                raise InputError(
                    f"{what} folder {path} holds {len(series)} DICOM series; put one series per folder"
                )
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
            return reader.Execute()
        return sitk.ReadImage(str(path))
    except InputError:
        raise
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln for ln in first if "ERROR" in ln or "Exception" in ln), first[0] if first else "")
        raise InputError(f"cannot read {what} {path}: {detail.strip()}") from None


def read_image(path: str | os.PathLike, *, what: str = "image", dtype=None) -> tuple[np.ndarray, Geometry]:
    """Read a 3D scalar image as a ``[z, y, x]`` numpy array and its :class:`Geometry`.

    2D, 4D and multi-component images are refused with an :class:`InputError` naming the file.
    """
    sitk = _sitk()
    image = read_sitk(path, what=what)
    if image.GetDimension() != 3:
        raise InputError(f"{what} {path} is {image.GetDimension()}D; a 3D volume is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{what} {path} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "a single-component (scalar) volume is needed"
        )
    array = sitk.GetArrayFromImage(image)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    return array, Geometry.from_sitk(image)


def to_sitk(array: np.ndarray, geometry: Geometry):
    """Wrap a ``[z, y, x]`` array as a SimpleITK image on ``geometry``."""
    sitk = _sitk()
    if tuple(array.shape) != geometry.shape_zyx:
        raise InputError(f"array of shape {array.shape} does not fit a grid of shape {geometry.shape_zyx}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    geometry.apply_to(image)
    return image


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the file's suffix (writers pick the format from it). On any
    exception, or a cancel, the partial file is removed and an existing ``path`` is untouched.
    """
    path = Path(path)
    if not path.parent.exists():
        raise InputError(f"output folder does not exist: {path.parent} (for {path.name})")
    name = path.name
    suffix = next((s for s in IMAGE_SUFFIXES if name.lower().endswith(s)), path.suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.partial-", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_image(path: str | os.PathLike, array: np.ndarray, geometry: Geometry, *, compress: bool = True) -> Path:
    """Write a ``[z, y, x]`` array with ``geometry`` to ``path`` atomically (temp file, then rename)."""
    sitk = _sitk()
    image = to_sitk(array, geometry)
    with atomic_output(path) as tmp:
        sitk.WriteImage(image, str(tmp), compress)
    return Path(path)


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


def remove_stale_partials(folder: str | os.PathLike, names: Sequence[str]) -> list[Path]:
    """Remove the temporary files that :func:`atomic_output` left in ``folder`` for the outputs
    ``names`` when its process was killed before it could clean up (SIGKILL, power loss).

    Only files named exactly as ``atomic_output`` names them are removed: ``.NAME.partial-``,
    the 8 characters ``tempfile`` draws, and NAME's suffix; nothing else in ``folder`` is
    touched. Call it only where no other process is writing these outputs. Returns the paths
    removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    patterns = []
    for name in names:
        suffix = next((s for s in IMAGE_SUFFIXES if name.lower().endswith(s)), Path(name).suffix)
        patterns.append(re.compile(rf"^\.{re.escape(name)}\.partial-[a-z0-9_]{{8}}{re.escape(suffix)}$"))
    removed = []
    for entry in folder.iterdir():
        if any(p.match(entry.name) for p in patterns) and entry.is_file() and not entry.is_symlink():
            entry.unlink()
            removed.append(entry)
    return sorted(removed)
