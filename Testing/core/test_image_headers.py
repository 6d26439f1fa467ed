"""Image headers are checked against themselves and the file size before ITK allocates (issue 23
items 2, 3 and 10): a NIfTI whose bitpix disagrees with its datatype, a 76-byte ``.nii.gz``
claiming 1000x1000x500 float32, truncated NRRD/MHA/MHD files (ITK said "No such file or
directory" for those) and volumes above the voxel cap are refused with an InputError naming the
file; complete files of every format still read."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from IWSegmentationLib.core.errors import InputError
from IWSegmentationLib.core.image_headers import MAX_VOXELS, header_problem
from IWSegmentationLib.core.imageio import read_image

REPO = Path(__file__).resolve().parents[2]
ARRAY = (np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8) / 7).astype(np.float32)


def nifti1_header(dims_xyz, datatype: int, bitpix: int) -> bytes:
    """A minimal little-endian NIfTI-1 header (348 bytes) plus the 4 extension bytes, vox_offset 352."""
    head = bytearray(348)
    struct.pack_into("<i", head, 0, 348)
    struct.pack_into("<8h", head, 40, len(dims_xyz), *dims_xyz, *([1] * (7 - len(dims_xyz))))
    struct.pack_into("<2h", head, 70, datatype, bitpix)
    struct.pack_into("<8f", head, 76, 1, 1, 1, 1, 1, 1, 1, 1)  # pixdim
    struct.pack_into("<f", head, 108, 352.0)  # vox_offset
    struct.pack_into("<f", head, 112, 1.0)  # scl_slope
    head[344:348] = b"n+1\0"
    return bytes(head) + b"\0\0\0\0"


def write(path: Path, compress: bool = False) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(ARRAY), str(path), compress)
    return path


def test_a_nifti_whose_bitpix_disagrees_with_its_datatype_is_refused(tmp_path):
    # float32 (datatype 16, 32 bits) declared with bitpix 8, holding the quarter of the data that
    # bitpix promises: main's size check (by bitpix) passed and ITK padded 3/4 with zeros, exit 0
    path = tmp_path / "liar.nii"
    path.write_bytes(nifti1_header((8, 7, 6), 16, 8) + ARRAY.tobytes()[: ARRAY.nbytes // 4])
    with pytest.raises(InputError, match=r"liar\.nii has a header that disagrees with itself: bitpix 8 but "
                                         r"datatype 16, whose voxels have 32 bits"):
        read_image(path)
    good = tmp_path / "good.nii"
    good.write_bytes(nifti1_header((8, 7, 6), 16, 32) + ARRAY.tobytes())
    np.testing.assert_array_equal(read_image(good)[0], ARRAY)


def _76_byte_bomb(path: Path) -> Path:
    """A .nii.gz of 76 bytes whose header claims 1000 x 1000 x 500 float32 (2 GB)."""
    path.write_bytes(gzip.compress(nifti1_header((1000, 1000, 500), 16, 32), compresslevel=9, mtime=0))
    return path


def test_a_tiny_gzip_claiming_2_gb_is_refused_before_itk_allocates(tmp_path):
    path = _76_byte_bomb(tmp_path / "bomb.nii.gz")
    assert path.stat().st_size < 100
    # a child whose address space is capped 1 GiB above what it uses: ITK's 2 GB allocation would
    # fail there with a different message ("Failed to allocate memory"), so the message proves the
    # header check ran first. Need: 352 + 5e8 * 4 = 2,000,000,352 bytes; the file can hold at most
    # (76..99 bytes) * 1032 < 102,168.
    code = textwrap.dedent(f"""
        import resource, sys
        from IWSegmentationLib.core.errors import InputError
        from IWSegmentationLib.core.imageio import read_image
        import SimpleITK
        size = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, size + 2**30))
        try:
            read_image({str(path)!r})
        except InputError as exc:
            print(exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert "bomb.nii.gz is truncated: its header promises 2,000,000,352 bytes of voxel data" in out.stdout
    assert "cannot hold more than" in out.stdout


@pytest.mark.parametrize("name, compress", [("a.mha", False), ("b.mha", True), ("c.nrrd", False), ("e.nii", False)])
def test_truncated_files_are_reported_as_truncated(tmp_path, name, compress):
    # (a gzipped NRRD a little short is within the deflate bound: ITK's own message says
    # "expected 1344 bytes but received 894", which is clear enough; a gzipped MHA records its
    # compressed size, so it is caught here)
    path = write(tmp_path / name, compress)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 300])  # the last 300 bytes lost (6*7*8 float32 = 1344 bytes)
    with pytest.raises(InputError, match=rf"{name} is truncated: its header promises"):
        read_image(path)


def test_a_truncated_mhd_data_file_is_reported_as_truncated_not_missing(tmp_path):
    path = write(tmp_path / "scan.mhd")
    raw = tmp_path / "scan.raw"
    raw.write_bytes(raw.read_bytes()[:1000])
    # ITK said: "File cannot be read: scan.mhd for reading. Reason: No such file or directory"
    with pytest.raises(InputError, match=r"scan\.mhd is truncated: its header promises 1,344 bytes, "
                                         r"its data file scan\.raw holds 1,000"):
        read_image(path)
    raw.unlink()
    with pytest.raises(InputError, match="names a data file scan.raw that does not exist beside it"):
        read_image(path)


def test_a_volume_above_the_voxel_cap_is_refused_from_its_header(tmp_path):
    # 2048^3 = 8,589,934,592 voxels > MAX_VOXELS = 1024^3; the header is all there is
    path = tmp_path / "huge.nrrd"
    path.write_bytes(b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2048 2048 2048\nencoding: raw\n\n" + b"\0" * 64)
    with pytest.raises(InputError, match=r"huge\.nrrd holds 8,589,934,592 voxels \(2048 x 2048 x 2048\), "
                                         r"more than the limit of 1,073,741,824"):
        read_image(path)
    assert MAX_VOXELS == 1024**3
    small = write(tmp_path / "small.mha")
    assert "more than the limit of 335" in header_problem(small, max_voxels=335)  # 6*7*8 = 336 voxels
    assert header_problem(small, max_voxels=336) is None


@pytest.mark.parametrize("name, compress", [("a.nii", False), ("b.nii.gz", True), ("c.nrrd", False),
                                            ("d.nrrd", True), ("e.mha", False), ("f.mha", True),
                                            ("g.mhd", False), ("h.nhdr", False), ("i.nhdr", True)])
def test_complete_files_of_every_format_still_read(tmp_path, name, compress):
    path = write(tmp_path / name, compress)
    assert header_problem(path) is None
    np.testing.assert_array_equal(read_image(path)[0], ARRAY)


@settings(max_examples=25, deadline=None)
@given(keep=st.integers(min_value=0, max_value=1344))
def test_a_raw_mha_is_truncated_exactly_when_bytes_are_missing(tmp_path_factory, keep):
    # invariant: the header check says "truncated" iff fewer than the 1344 data bytes remain
    folder = tmp_path_factory.mktemp("mha")
    path = write(folder / "x.mha")
    data = path.read_bytes()
    header = len(data) - ARRAY.nbytes
    path.write_bytes(data[: header + keep])
    problem = header_problem(path)
    assert (problem is not None) == (keep < ARRAY.nbytes)
    if problem:
        assert problem == f"is truncated: its header promises 1,344 bytes, the file holds {keep:,}"
