"""The streaming ``multipart/form-data`` reader of ``iwseg serve`` (serve/multipart.py), fed the
bodies the standard-library client builds, cut into arbitrary chunks."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from IWSegmentationLib.core.errors import InputError
from IWSegmentationLib.serve.multipart import (
    MultipartReader,
    encode_closing,
    encode_part_header,
    is_multipart,
)

BOUNDARY = "iwseg-0123456789abcdef"
TYPE = f"multipart/form-data; boundary={BOUNDARY}"


class Kept(io.BytesIO):
    def close(self) -> None:  # keep the bytes readable after the reader closes the part
        pass


def body(parts: list[tuple[str, str, bytes]]) -> bytes:
    out = b"".join(encode_part_header(BOUNDARY, name, filename, first=i == 0) + data
                   for i, (name, filename, data) in enumerate(parts))
    return out + encode_closing(BOUNDARY)


def read(data: bytes, cuts: list[int]) -> dict[str, tuple[str | None, bytes]]:
    files: dict[str, tuple[str | None, Kept]] = {}

    def open_part(name, filename):
        files[name] = (filename, Kept())
        return files[name][1]

    reader = MultipartReader(TYPE, open_part)
    start = 0
    for cut in sorted(cuts) + [len(data)]:
        reader.feed(data[start:cut])
        start = max(start, cut)
    reader.close()
    return {name: (filename, f.getvalue()) for name, (filename, f) in files.items()}


# data that looks like a boundary's pieces: CR, LF, dashes, a near-miss of the boundary itself
tricky = st.lists(st.sampled_from([b"\r", b"\n", b"-", b"--", b"\r\n--", b"\r\n--iwseg-01", b"x", b"\x00"]),
                  max_size=40).map(b"".join)


@settings(max_examples=200, deadline=None)
@given(image=tricky, mask=tricky, cuts=st.lists(st.integers(0, 600), max_size=8))
def test_any_chunking_gives_back_each_part_exactly(image, mask, cuts):
    data = body([("image", "scan.nii.gz", image), ("organ_mask", "lungs.nii.gz", mask)])
    assert read(data, cuts) == {"image": ("scan.nii.gz", image), "organ_mask": ("lungs.nii.gz", mask)}


def test_a_body_cut_short_or_without_names_is_refused():
    data = body([("image", "scan.nii.gz", b"abc")])
    with pytest.raises(InputError, match="before its closing boundary"):
        read(data[:-10], [])
    nameless = f"--{BOUNDARY}\r\nContent-Type: x\r\n\r\nabc".encode() + encode_closing(BOUNDARY)
    with pytest.raises(InputError, match="Content-Disposition"):
        read(nameless, [])
    with pytest.raises(InputError, match="boundary"):
        MultipartReader("multipart/form-data", lambda name, filename: Kept())
    assert is_multipart("Multipart/Form-Data; boundary=x") and not is_multipart("application/octet-stream")


def test_curl_style_preamble_and_quoted_boundary():
    # curl -F writes no preamble but quotes nothing; browsers may quote the boundary parameter
    data = b"preamble to ignore\r\n" + body([("image", "a.nrrd", b"1234")]) + b"epilogue"
    files = {}
    reader = MultipartReader(f'multipart/form-data; boundary="{BOUNDARY}"',
                             lambda name, filename: files.setdefault(name, Kept()))
    reader.feed(data)
    reader.close()
    assert files["image"].getvalue() == b"1234"
