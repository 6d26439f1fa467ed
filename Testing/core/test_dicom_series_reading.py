"""Reading a DICOM series folder (core.imageio.read_sitk): a slice in another orientation filed in
the series is refused naming the folder (#23 item 10), not stacked into the volume."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pydicom")

from _dicom import write_ct_series  # noqa: E402

from IWSegmentationLib.core.errors import InputError  # noqa: E402
from IWSegmentationLib.core.imageio import Geometry, check_slice_orientations, read_image  # noqa: E402


def _series(tmp_path):
    image = np.random.default_rng(1).integers(-1000, 200, (6, 10, 12)).astype(np.int16)
    geometry = Geometry(size=(12, 10, 6), spacing=(0.8, 0.8, 2.0), origin=(0.0, 0.0, 0.0))
    folder = tmp_path / "CT"
    return image, folder, write_ct_series(folder, image, geometry)


def test_a_slice_in_another_orientation_is_refused_naming_the_series(tmp_path):
    import pydicom

    image, folder, files = _series(tmp_path)
    array, _ = read_image(folder)  # the intact series reads back as written
    np.testing.assert_array_equal(array, image)
    ds = pydicom.dcmread(files[3])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal slice (a scout) filed in the axial series
    ds.save_as(files[3])
    with pytest.raises(InputError, match=rf"image folder {folder}: slice \d+ of 6 has ImageOrientationPatient "
                                         r"\(1, 0, 0, 0, 0, -1\).*mixes orientations"):
        read_image(folder)


def test_check_slice_orientations_tolerates_rounding_and_missing_tags():
    check_slice_orientations(["1\\0\\0\\0\\1\\0", "1\\0\\0\\0\\1.00001\\0", "", "x"], "s")  # 1e-5: rounding
    with pytest.raises(InputError, match="s: slice 2 of 2"):
        check_slice_orientations(["1\\0\\0\\0\\1\\0", "0.98\\0.2\\0\\0\\1\\0"], "s")
