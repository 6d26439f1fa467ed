"""A real DICOM CT series written from a numpy volume: the source series of DICOM SEG checks.

Each slice ``k`` of a ``[z, y, x]`` int16 array becomes one CT Image Storage file (pydicom) with
the patient, study, series and frame-of-reference UIDs shared, ``ImagePositionPatient`` the grid
point ``(0, 0, k)`` and ``ImageOrientationPatient`` the grid's x and y axes, so SimpleITK reads the
files back as the same volume on the same grid. The files are named in a shuffled order so that
nothing can rely on file names following the slices. The tests (``Testing/_dicom.py``) and the
DICOM SEG benchmark (``scripts/bench/dicom_seg.py``) write their series with it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from IWSegmentationLib.core.imageio import Geometry


def write_ct_series(folder: Path, image: np.ndarray, geometry: Geometry, *, seed: int = 7) -> list[Path]:
    """Write ``image`` as a CT series into ``folder``; returns the files in slice order."""
    import pydicom  # lazy: optional (the dicom extra), only to write a series
    from pydicom.dataset import FileMetaDataset  # lazy: optional, as above
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # lazy: optional, as above

    folder.mkdir(parents=True, exist_ok=True)
    nz = image.shape[0]
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    direction = geometry.direction_matrix
    names = np.random.default_rng(seed).permutation(nz)
    paths = []
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", "IWSEG-0001", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", ""
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = "CT", "IWSegmentation tests", 3, k + 1
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [f"{v:.6f}" for v in geometry.index_to_physical((k, 0, 0))]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [f"{geometry.spacing[1]:.6f}", f"{geometry.spacing[0]:.6f}"]  # row, column spacing
        ds.SliceThickness = f"{geometry.spacing[2]:.6f}"
        ds.Rows, ds.Columns = image.shape[1], image.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PixelData = np.ascontiguousarray(image[k], dtype="<i2").tobytes()
        path = folder / f"IM{names[k]:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
