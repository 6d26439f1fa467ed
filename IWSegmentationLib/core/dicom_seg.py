"""DICOM SEG of the lesions: one segment per lesion, referencing the source DICOM series.

A DICOM Segmentation object (SOP class 1.2.840.10008.5.1.4.1.1.66.4) is what a PACS, OHIF or
3D Slicer (with the QuantitativeReporting extension) loads back onto the images it was computed
on. It is written with `highdicom <https://highdicom.readthedocs.io>`_ (``pip install
'iwsegmentation[dicom]'``), imported lazily so the rest of the package never needs it. No torch.

What the object holds:

* one ``BINARY`` segment per lesion, segment number ``n`` for the voxels of value ``n`` in the
  label map given; its label is the name the Slicer segment has (``Lesion 07 - 4.2 mm - small``,
  :func:`IWSegmentationLib.core.lesions.segment_name` in ASCII), its description the size group, the
  equivalent diameter, the volume and the confidence (the lesion's maximum logit), its colour the size group's
  (:data:`~IWSegmentationLib.core.lesions.SIZE_GROUP_COLORS`), its category and type the terminology of
  the Slicer segments (:data:`IWSegmentationLib.core.lesions.LESION_TERMINOLOGY`: SCT 49755003
  *Morphologically Altered Structure* / SCT 52988006 *Lesion*), its algorithm ``AUTOMATIC``
  (IWSegmentation, family *Artificial Intelligence*);
* the patient, study and frame of reference of the source series, a
  ``ReferencedSeriesSequence`` naming every source image and, per frame, the source image it
  lies on (``DerivationImageSequence`` / ``SourceImageSequence``); frames are written only for
  slices a lesion touches (highdicom's ``omit_empty_frames``);
* ``ContentQualification`` ``RESEARCH``: the segmentation comes from a research model.

The label map's slice ``k`` (``[z, y, x]`` array order, :mod:`IWSegmentationLib.core.imageio`) must lie
on source image ``k``: :func:`order_by_slice` puts the series' images in that order by matching
each one's ``ImagePositionPatient`` and ``ImageOrientationPatient`` to the volume's grid, and
refuses a series that does not tile the grid exactly (a cropped, resampled or reformatted volume).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .. import __version__
from .errors import InputError, IWSegError
from .imageio import Geometry
from .lesions import LESION_TERMINOLOGY, SIZE_GROUP_COLORS, segment_name
from .outputs import atomic_output
from .provenance import Provenance

#: What ``pip install`` needs for this module (also the ``dicom`` extra of pyproject.toml).
HIGHDICOM_REQUIREMENT = "highdicom>=0.22"
#: Series number of the SEG series (the source's number is unrelated; viewers sort by it).
SEG_SERIES_NUMBER = 1000
#: How far (in voxels) an image's position may be from a grid slice and still be that slice:
#: ImagePositionPatient is a decimal string, rounded by the scanner to about 1e-4 mm or worse.
POSITION_TOLERANCE_VOXELS = 0.01
#: Tolerance on the direction cosines of ImageOrientationPatient against the grid's axes.
ORIENTATION_TOLERANCE = 1e-3


def require_highdicom():
    """The ``highdicom`` module, or an error that says how to install it."""
    try:
        import highdicom  # lazy: optional, only DICOM SEG output needs it
    except ImportError:
        raise IWSegError(
            f"writing a DICOM SEG needs highdicom: pip install '{HIGHDICOM_REQUIREMENT}' "
            "(or the package's extra: pip install 'iwsegmentation[dicom]')"
        ) from None
    return highdicom


def terminology_codes(serialized: str = LESION_TERMINOLOGY) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
    """``(category, type)`` as ``(scheme, value, meaning)`` triplets, from Slicer's serialised
    terminology entry (``context~SCHEME^VALUE^MEANING~SCHEME^VALUE^MEANING~...``)."""
    parts = serialized.split("~")
    if len(parts) < 3:
        raise InputError(f"not a serialised Slicer terminology entry: {serialized!r}")
    category, kind = (tuple(parts[i].split("^")) for i in (1, 2))
    if len(category) != 3 or len(kind) != 3 or not all(category) or not all(kind):
        raise InputError(f"terminology entry {serialized!r} has no category or type code")
    return category, kind


# ---------------------------------------------------------------------------- the source series


def read_headers(paths: Iterable[str | os.PathLike]) -> list[Any]:
    """The DICOM headers (no pixel data) of the image files among ``paths``; files that are not
    DICOM, and DICOM objects without an image position (DICOMDIR, reports), are skipped."""
    import pydicom  # lazy: only DICOM input needs pydicom
    from pydicom.errors import InvalidDicomError  # lazy: only DICOM input needs pydicom

    headers = []
    for path in paths:
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            continue
        if "ImagePositionPatient" in ds:
            headers.append(ds)
    return headers


def source_series(folder: str | os.PathLike, geometry: Geometry) -> list[Any]:
    """The images of the DICOM series in ``folder``, one per slice of ``geometry`` in array (z) order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"a DICOM SEG needs the source DICOM series; {folder} is not a DICOM series folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return order_by_slice(read_headers(files), geometry, what=f"DICOM series {folder}")


def _grid_index(ds, origin: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    return inverse @ (np.asarray([float(v) for v in ds.ImagePositionPatient]) - origin)


#: What a SEG copies from or references in every source image and cannot do without (DICOM type 1).
REQUIRED_REFERENCES = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
                       "FrameOfReferenceUID", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
#: Patient and study attributes a SEG must hold but may leave empty (DICOM type 2): an anonymised
#: series that dropped them gets them empty, in memory only (the source files are not touched).
EMPTY_ALLOWED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
                 "AccessionNumber", "SliceThickness")


def check_references(headers: Sequence[Any], *, what: str = "DICOM series") -> None:
    """Refuse a series a SEG cannot reference (before inference, not in highdicom after it): an
    image without one of :data:`REQUIRED_REFERENCES`, or images in two frames of reference. Adds
    the missing :data:`EMPTY_ALLOWED` attributes, empty, to ``headers``."""
    for ds in headers:
        missing = [name for name in REQUIRED_REFERENCES if not str(ds.get(name, "") or "").strip()]
        if missing:
            raise InputError(f"{what}: image {ds.get('SOPInstanceUID', '?')} has no {', '.join(missing)}; a DICOM SEG "
                             "must reference it (was the series anonymised too far?). Write the mask instead of --dicom-seg")
        for name in EMPTY_ALLOWED:
            if name not in ds:
                setattr(ds, name, None)
    frames = sorted({str(ds.FrameOfReferenceUID) for ds in headers})
    if len(frames) > 1:
        raise InputError(f"{what}: its images lie in {len(frames)} frames of reference ({', '.join(frames[:3])}); "
                         "a DICOM SEG references one")


def order_by_slice(headers: Sequence[Any], geometry: Geometry, *, what: str = "DICOM series") -> list[Any]:
    """Put single-frame images on the slices of ``geometry``: element ``k`` is the image whose
    ``ImagePositionPatient`` is the grid point ``(i, j, k) = (0, 0, k)`` and whose rows and columns run
    along the grid's y and x axes. Every slice needs exactly one image of one series."""
    if not headers:
        raise InputError(f"{what} holds no DICOM images with an ImagePositionPatient")
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for ds in headers})
    if len(series) != 1:
        raise InputError(f"{what} holds images of {len(series)} series; a DICOM SEG references one series")
    check_references(headers, what=what)
    nx, ny, nz = geometry.size
    axes = geometry.direction_matrix * np.asarray(geometry.spacing, dtype=float)[None, :]
    inverse, origin = np.linalg.inv(axes), np.asarray(geometry.origin, dtype=float)
    slots: list[Any] = [None] * nz
    for ds in headers:
        uid = ds.get("SOPInstanceUID", "?")
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise InputError(f"{what}: image {uid} is multi-frame; only single-frame series are supported")
        if (int(ds.Rows), int(ds.Columns)) != (ny, nx):
            raise InputError(f"{what}: image {uid} has {ds.Rows} x {ds.Columns} pixels; the volume's slices "
                             f"have {ny} x {nx}")
        cosines = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        if not (np.allclose(cosines[:3], geometry.direction_matrix[:, 0], atol=ORIENTATION_TOLERANCE)
                and np.allclose(cosines[3:], geometry.direction_matrix[:, 1], atol=ORIENTATION_TOLERANCE)):
            raise InputError(f"{what}: image {uid} has ImageOrientationPatient {list(np.round(cosines, 4))}, "
                             "not the volume's orientation; was the volume reformatted?")
        ijk = _grid_index(ds, origin, inverse)
        k = int(round(ijk[2]))
        if (np.abs(ijk[:2]) > POSITION_TOLERANCE_VOXELS).any() or abs(ijk[2] - k) > POSITION_TOLERANCE_VOXELS \
                or not 0 <= k < nz:
            raise InputError(f"{what}: image {uid} at ImagePositionPatient {list(ds.ImagePositionPatient)} is not a "
                             "slice of the volume's grid; was the volume cropped or resampled?")
        if slots[k] is not None:
            raise InputError(f"{what}: images {slots[k].SOPInstanceUID} and {uid} are both slice {k}")
        slots[k] = ds
    missing = [k for k, ds in enumerate(slots) if ds is None]
    if missing:
        raise InputError(f"{what} has no image for slice(s) {missing[:8]} of the volume's {nz}")
    return slots


# ---------------------------------------------------------------------------- segments


def _ascii(text: str) -> str:
    """DICOM's default character repertoire is ASCII: ``·`` becomes ``-``, other letters ``?``."""
    return text.replace("·", "-").encode("ascii", "replace").decode("ascii")


def segment_description(lesion: Mapping[str, Any]) -> str:
    """``small lesion, equivalent diameter 4.2 mm, volume 38.8 mm3, max logit 4.00``: the
    confidence is the lesion's maximum logit (``iwseg predict``'s lesion JSON, the Slicer
    segments), which still orders lesions whose probability rounds to 1."""
    parts = [f"{lesion.get('size_group') or 'unknown size'} lesion"]
    for key, text, digits, unit in (("diameter_mm", "equivalent diameter", 1, " mm"),
                                    ("volume_mm3", "volume", 1, " mm3"), ("confidence", "max logit", 2, "")):
        value = lesion.get(key)
        if value is not None:
            parts.append(f"{text} {float(value):.{digits}f}{unit}")
    doubt = lesion.get("doubt")  # with TTA or an ensemble (core.doubt): "found by 1/2, sd 3.00, doubtful"
    if doubt:
        parts.append(f"found by {doubt['found_by']}/{doubt['members']}, sd {float(doubt['confidence_sd']):.2f}"
                     + (", doubtful" if doubt["doubtful"] else ""))
    return ", ".join(parts)


def lesion_segment_descriptions(lesions: Sequence[Mapping[str, Any]], provenance: Provenance | None = None) -> list[Any]:
    """One highdicom ``SegmentDescription`` per lesion row, segment numbers ``1..len(lesions)``.

    A row is a lesion-table row, as :func:`IWSegmentationLib.slicer.mrml.lesion_rows` or the lesion JSON of
    ``iwseg predict`` makes them: ``id``, ``diameter_mm``, ``size_group`` and optionally ``name``
    (the segment label), ``volume_mm3``, ``confidence`` (the maximum logit).
    """
    hd = require_highdicom()
    from pydicom.sr.codedict import codes  # lazy: only DICOM SEG output needs pydicom

    (c_scheme, c_value, c_meaning), (t_scheme, t_value, t_meaning) = terminology_codes()
    category = hd.sr.CodedConcept(c_value, c_scheme, c_meaning)
    kind = hd.sr.CodedConcept(t_value, t_scheme, t_meaning)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="IWSegmentation", family=codes.cid7162.ArtificialIntelligence, version=__version__,
        parameters=None if provenance is None else provenance.parameters())
    width = max(2, len(str(len(lesions))))
    out = []
    for number, lesion in enumerate(lesions, start=1):
        group = str(lesion.get("size_group") or "unknown")
        diameter = float(lesion.get("diameter_mm") or 0.0)
        # the Slicer segment's name when the row has one (mrml.lesion_rows), else the same form
        label = _ascii(lesion.get("name") or segment_name(int(lesion.get("id") or number), diameter, group, width))
        extra = {}
        if group in SIZE_GROUP_COLORS and hasattr(getattr(hd, "color", None), "CIELabColor"):  # highdicom >= 0.23
            extra["display_color"] = hd.color.CIELabColor.from_rgb(*SIZE_GROUP_COLORS[group])
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=label[:64], segmented_property_category=category,
            segmented_property_type=kind, algorithm_type="AUTOMATIC", algorithm_identification=algorithm,
            tracking_id=label[:64], tracking_uid=hd.UID(), **extra,
        )
        description.SegmentDescription = _ascii(segment_description(lesion))
        out.append(description)
    return out


def lesion_seg(labels: np.ndarray, lesions: Sequence[Mapping[str, Any]], source: Sequence[Any], *,
               series_description: str = "IWSegmentation lesions", provenance: Provenance | None = None) -> Any:
    """The DICOM SEG dataset of a lesion label map.

    ``labels``: ``[z, y, x]`` integers on the source grid, 0 background and ``n`` the voxels of
    ``lesions[n - 1]``; ``source``: the source images in slice order (:func:`order_by_slice`);
    ``provenance``: what made the lesions (each segment's ``AlgorithmParameters``).
    """
    hd = require_highdicom()
    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.dtype.kind not in "iub":
        raise InputError(f"lesion labels must be a 3D integer array [z, y, x], got {labels.dtype} {labels.shape}")
    if not lesions:
        raise InputError("no lesions: a DICOM SEG needs at least one segment")
    if len(source) != labels.shape[0] or any((int(ds.Rows), int(ds.Columns)) != labels.shape[1:] for ds in source):
        raise InputError(f"lesion labels of shape {labels.shape} do not fit {len(source)} source images of "
                         f"{source[0].Rows} x {source[0].Columns} pixels")
    top = int(labels.max())
    if top > len(lesions) or int(labels.min()) < 0:
        raise InputError(f"lesion labels run from {int(labels.min())} to {top}; expected 0..{len(lesions)}")
    array = labels.astype(np.uint8 if len(lesions) < 2**8 else np.uint16 if len(lesions) < 2**16 else np.uint32)
    return hd.seg.Segmentation(
        source_images=list(source), pixel_array=array, segmentation_type="BINARY",
        segment_descriptions=lesion_segment_descriptions(lesions, provenance), series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="IWSegmentation", manufacturer_model_name="IWSegmentation", software_versions=__version__,
        device_serial_number="0", content_description="Lesions, one segment each (IWSegmentation)",
        content_label="LESIONS", series_description=series_description, content_qualification="RESEARCH",
    )


def write_lesion_seg(path: str | os.PathLike, labels: np.ndarray, lesions: Sequence[Mapping[str, Any]],
                     source: Sequence[Any], **options) -> Path:
    """Write :func:`lesion_seg` to ``path`` atomically (a temporary name, then a rename)."""
    save_dataset(path, lesion_seg(labels, lesions, source, **options))
    return Path(path)


def save_dataset(path: str | os.PathLike, dataset: Any) -> None:
    """Save a DICOM dataset (a SEG, an SR) to ``path`` atomically (a temporary name, then a rename)."""
    with atomic_output(path) as tmp:
        dataset.save_as(str(tmp))
