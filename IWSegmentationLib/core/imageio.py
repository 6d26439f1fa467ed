"""Reading and writing 3D images with their geometry, and atomic output files.

Array convention used everywhere in IWSegmentationLib: numpy arrays are indexed
``[z, y, x]`` (SimpleITK's ``GetArrayFromImage`` order), and a ``spacing`` given to an
array function is in the same array-axis order ``(sz, sy, sx)``. :class:`Geometry` keeps
ITK's own ``(x, y, z)`` order for spacing, origin and size and offers ``spacing_zyx``.
Physical coordinates are ITK's LPS millimetres; Slicer converts them to RAS.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import GeometryMismatchError, InputError, OutputError
from .files import DETACHED_SUFFIXES, IMAGE_SUFFIXES
from .image_headers import header_problem, is_nifti, nifti_problem
from .outputs import atomic_output

#: ITK's metadata key for free-text notes: NIfTI's ``descrip`` field, a field of NRRD and MetaImage.
NOTES_KEY = "ITK_FileNotes"


def format_numbers(values: Sequence[float], digits: int = 4) -> str:
    """``(0.8, 0.8, 2)``: numbers for a message, rounded, never ``np.float64(...)``."""
    return "(" + ", ".join(f"{round(float(v), digits):g}" for v in values) + ")"


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
                out.append(f"{field} {format_numbers(a)} vs {format_numbers(b)}")
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
    import SimpleITK as sitk  # lazy: SimpleITK takes ~0.4 s to load; the GUI side imports this module

    return sitk


def itk_message(exc: BaseException) -> str:
    """The readable part of an ITK/SimpleITK error, on one line.

    ITK's text starts with ``Exception thrown in SimpleITK ImageFileReader_Execute: /src/...cxx:99:``
    and puts the reason on the next lines, behind ``sitk::ERROR:`` or ``ITK ERROR: NrrdImageIO(0x..):``;
    this keeps the reason (the first line and, for a chain of causes, the last one).
    """
    lines = []
    for line in str(exc).strip().splitlines():
        line = re.sub(r"^Exception thrown in .*?:\s*\S+\.(?:cxx|cpp|h|hxx|txx):\d+:\s*", "", line.strip())
        line = re.sub(r"^(?:sitk::ERROR|ITK ERROR|ERROR):\s*(?:\w+\(0x[0-9a-fA-F]+\):\s*)?", "", line)
        if line:
            lines.append(line)
    if not lines:
        return type(exc).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def _check_regular(path: Path, what: str) -> None:
    """Refuse a FIFO, socket or device before anything opens it (opening a FIFO blocks for ever)."""
    if not path.is_dir() and not path.is_file():
        raise InputError(f"{what} {path} is not a regular file (a FIFO, socket or device); give an image file or a DICOM folder")


def read_sitk(path: str | os.PathLike, *, what: str = "image"):
    """Read a NIfTI/NRRD/MHA file or a DICOM series folder into a SimpleITK image.

    Raises :class:`InputError` naming ``path`` when it is missing, not a regular file,
    unreadable, a DICOM series with a missing slice, or when its header disagrees with itself or
    with the file's size, or promises more than ``core.image_headers.MAX_VOXELS`` voxels
    (:func:`~IWSegmentationLib.core.image_headers.header_problem`, checked before ITK allocates).
    """
    sitk = _sitk()
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    _check_regular(path, what)
    if path.is_file() and (problem := header_problem(path)):  # before ITK allocates what the header promises
        raise InputError(f"{what} {path} {problem}")
    try:
        if path.is_dir():
            return _read_dicom_series(path, what)
        return sitk.ReadImage(str(path))
    except InputError:
        raise
    except RuntimeError as exc:
        raise InputError(f"cannot read {what} {path}: {itk_message(exc)}") from None


def _read_dicom_series(path: Path, what: str):
    sitk = _sitk()
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(path))
    if not series:
        raise InputError(f"{what} folder {path} holds no DICOM series")
    if len(series) > 1:
        raise InputError(f"{what} folder {path} holds {len(series)} DICOM series; put one series per folder")
    files = reader.GetGDCMSeriesFileNames(str(path), series[0])
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    check_slice_orientations([reader.GetMetaData(i, "0020|0037") if reader.HasMetaDataKey(i, "0020|0037") else ""
                              for i in range(len(files))], f"{what} folder {path}")
    positions = []
    for i in range(len(files)):
        if not reader.HasMetaDataKey(i, "0020|0032"):
            return image  # no ImagePositionPatient: nothing to check the spacing with
        positions.append([float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")])
    check_slice_positions(positions, image.GetDirection(), f"{what} folder {path}")
    return image


def check_slice_orientations(orientations: Sequence[str], where: str, *, tolerance: float = 1e-3) -> None:
    """Refuse a DICOM series whose slices do not share one ImageOrientationPatient (a scout or a
    reformatted slice filed in the series): stacked, it would be read as a slice of the volume.
    ``orientations`` are the tag's ``a\\b\\c\\d\\e\\f`` texts in reading order (``""`` where absent)."""
    cosines = []
    for text in orientations:
        try:
            cosines.append([float(v) for v in text.split("\\")] if text.strip() else None)
        except ValueError:
            cosines.append(None)
    known = [(i, c) for i, c in enumerate(cosines) if c is not None and len(c) == 6]
    if not known:
        return
    first_index, first = known[0]
    for i, c in known[1:]:
        if not np.allclose(c, first, atol=tolerance):
            raise InputError(
                f"{where}: slice {i + 1} of {len(orientations)} has ImageOrientationPatient {format_numbers(c)}, "
                f"slice {first_index + 1} has {format_numbers(first)}: the series mixes orientations (a scout or "
                "reformatted image?); put the slices of one orientation in their own folder"
            )


def check_slice_positions(positions: Sequence[Sequence[float]], direction: Sequence[float], where: str,
                          *, tolerance: float = 0.2) -> None:
    """Refuse a DICOM series whose slices are not evenly spaced along the slice normal.

    ``positions`` are the slices' ImagePositionPatient (mm) in reading order, ``direction`` the
    volume's row-major 3x3 direction (its third column is the slice normal). A gap more than
    ``tolerance`` (relative) away from the median step, or two slices at one position, means a
    missing or duplicated slice: the volume would be stretched or squeezed there without notice.
    """
    if len(positions) < 3:
        return
    normal = np.asarray(direction, dtype=float).reshape(3, 3)[:, 2]
    along = np.asarray(positions, dtype=float) @ normal
    steps = np.abs(np.diff(along))
    step = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - step) > tolerance * max(step, 1e-6))
    if step <= 1e-6 or bad.size:
        k = int(bad[0]) if bad.size else 0
        missing = int(round(float(steps[bad].sum()) / step)) - bad.size if step > 1e-6 else 0
        raise InputError(
            f"{where}: the DICOM slices are not evenly spaced: slices {k + 1} and {k + 2} (of {len(positions)}) are "
            f"{steps[k]:.3g} mm apart, the usual step is {step:.3g} mm"
            + (f" (about {missing} slice(s) missing)" if missing > 0 else " (a duplicated or missing slice)")
            + "; export the complete series"
        )


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


def read_geometry(path: str | os.PathLike, *, what: str = "image") -> Geometry:
    """The :class:`Geometry` of an image file from its header alone (no voxels read), or of a
    DICOM series folder (read whole: ITK gives a series' spacing only after reading it); errors as
    :func:`read_sitk`. Training uses it to record the spacing of cases it loads lazily."""
    sitk = _sitk()
    path = Path(path)
    if path.is_dir() or not path.exists():
        return Geometry.from_sitk(read_sitk(path, what=what))
    _check_regular(path, what)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"cannot read {what} {path}: {itk_message(exc)}") from None
    if reader.GetDimension() != 3:
        raise InputError(f"{what} {path} is {reader.GetDimension()}D; a 3D volume is needed")
    return Geometry.from_sitk(reader)


def read_channels(paths: Sequence[str | os.PathLike], *, what: str = "image", dtype=None) -> tuple[np.ndarray, Geometry]:
    """Read the channel files of one case (e.g. the T1 and FLAIR of a multi-sequence MR) with
    :func:`read_image`: one file gives its ``[z, y, x]`` array, several give ``[C, z, y, x]`` in
    the order given. The channels must share the voxel grid (size, spacing, origin, direction),
    as the network sees them voxel by voxel; else :class:`GeometryMismatchError` naming both files.
    """
    paths = list(paths)
    if not paths:
        raise InputError(f"{what}: no channel files given")
    first, geometry = read_image(paths[0], what=what, dtype=dtype)
    if len(paths) == 1:
        return first, geometry
    arrays = [first]
    for c, path in enumerate(paths[1:], start=1):
        array, other = read_image(path, what=f"{what} channel {c}", dtype=dtype)
        check_same_grid(geometry, other, f"{what} channel 0 {paths[0]}", f"channel {c} {path}")
        arrays.append(array)
    return np.stack(arrays), geometry


def to_sitk(array: np.ndarray, geometry: Geometry):
    """Wrap a ``[z, y, x]`` array as a SimpleITK image on ``geometry``."""
    sitk = _sitk()
    if tuple(array.shape) != geometry.shape_zyx:
        raise InputError(f"array of shape {array.shape} does not fit a grid of shape {geometry.shape_zyx}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    geometry.apply_to(image)
    return image


def check_output_format(path: str | os.PathLike, flag: str = "output") -> None:
    """Refuse an image output in a detached-header format (see :data:`DETACHED_SUFFIXES`)."""
    name = str(path).lower()
    for detached, single in DETACHED_SUFFIXES.items():
        if name.endswith(detached):
            raise InputError(
                f"{flag} {path}: {detached} keeps the voxels in a second file, which cannot be replaced "
                f"together with the header; write {single} instead (the same format in one file)"
            )


def output_suffix(input_path: str | os.PathLike) -> str:
    """The suffix of an output named after an input: the input's, with a detached format made single-file."""
    name = Path(input_path).name.lower()
    suffix = next((s for s in IMAGE_SUFFIXES if name.endswith(s)), ".nii.gz")
    return DETACHED_SUFFIXES.get(suffix, suffix)


def write_image(path: str | os.PathLike, array: np.ndarray, geometry: Geometry, *, compress: bool = True,
                notes: str | None = None) -> Path:
    """Write a ``[z, y, x]`` array with ``geometry`` to ``path`` atomically (temp file, then rename).

    ``notes`` (at most 80 characters) go into the file's header as ITK's ``ITK_FileNotes``
    (NIfTI ``descrip``, an NRRD or MetaImage field); :func:`read_image_notes` reads them back.

    The written file is read back before the rename: its header must give the grid's size and,
    for NIfTI (whose ITK writer does not fail on a short write), the voxel data must be all there.
    Any failure raises :class:`OutputError` and leaves an existing ``path`` as it was.
    """
    sitk = _sitk()
    check_output_format(path)
    image = to_sitk(array, geometry)
    if notes:
        image.SetMetaData(NOTES_KEY, notes)
    path = Path(path)
    with atomic_output(path) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), compress)
        except RuntimeError as exc:
            raise OutputError(f"cannot write {path}: {itk_message(exc)}") from None
        _verify_written(tmp, path, geometry)
    return path


def read_image_notes(path: str | os.PathLike) -> str:
    """The notes :func:`write_image` put into a file's header (``""`` if none, or for a DICOM
    folder); reads the header only."""
    path = Path(path)
    if not path.is_file():
        return ""
    reader = _sitk().ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"cannot read {path}: {itk_message(exc)}") from None
    keys = set(reader.GetMetaDataKeys())
    return next((reader.GetMetaData(k) for k in (NOTES_KEY, "descrip") if k in keys), "")


def _verify_written(tmp: Path, path: Path, geometry: Geometry) -> None:
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(tmp))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise OutputError(f"cannot write {path}: the file written does not read back ({itk_message(exc)})") from None
    if tuple(reader.GetSize()) != tuple(geometry.size):
        raise OutputError(f"cannot write {path}: the file written reads back as size {reader.GetSize()}")
    if is_nifti(tmp) and (problem := nifti_problem(tmp)):
        raise OutputError(f"cannot write {path}: the file written {problem} (disk full?)")
