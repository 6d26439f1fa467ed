"""DICOM helpers of the DICOM SEG tests: the CT series writer (defined in
:mod:`IWSegmentationLib.testing.dicom_series`, which the benchmark uses too) and a SEG reader
that checks where every frame lands."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from IWSegmentationLib.testing.dicom_series import write_ct_series

__all__ = ["segments_from_seg", "write_ct_series"]


def segments_from_seg(seg, files: list[Path], shape_zyx) -> np.ndarray:
    """Rebuild each segment of a DICOM SEG on the source grid, checking where every frame lands.

    ``files`` are the source files in slice order (:func:`write_ct_series`). Each frame's source
    image (DerivationImageSequence, by SOP instance UID) gives its slice; the frame's
    ImagePositionPatient must be that image's. Returns a ``[n_segments + 1, z, y, x]`` bool array
    (index 0 unused). Reads the SEG with pydicom only, not with the writer's library.
    """
    import pydicom

    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    slice_of = {ds.SOPInstanceUID: k for k, ds in enumerate(sources)}
    n = len(seg.SegmentSequence)
    out = np.zeros((n + 1, *shape_zyx), bool)
    pixels = seg.pixel_array.reshape(-1, *shape_zyx[1:])
    assert len(pixels) == seg.NumberOfFrames == len(seg.PerFrameFunctionalGroupsSequence)
    for frame, groups in zip(pixels, seg.PerFrameFunctionalGroupsSequence):
        (source_item,) = groups.DerivationImageSequence[0].SourceImageSequence
        k = slice_of[source_item.ReferencedSOPInstanceUID]
        position = [float(v) for v in groups.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in sources[k].ImagePositionPatient], atol=1e-4)
        number = groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        assert frame.any(), "empty frames are omitted"
        out[number, k] |= frame.astype(bool)
    return out
