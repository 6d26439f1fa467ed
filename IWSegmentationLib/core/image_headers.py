"""Checks of an image file's header against its data, made before a reader allocates the volume.

ITK trusts a header: it allocates the volume the header promises, then reads what the file
holds (a truncated NIfTI is padded with zeros without an error; a 76-byte ``.nii.gz`` claiming
1000x1000x500 float32 had 2 GB allocated before anything failed). Here the header is read
with the standard library (NIfTI-1/2, NRRD, MetaImage), and the file is refused with a message
naming it when:

* its header disagrees with itself (a NIfTI ``bitpix`` other than its ``datatype``'s size);
* it holds more than :data:`MAX_VOXELS` voxels;
* it cannot hold the data the header promises: for raw data the file size is compared with
  the promised bytes; for compressed data the file size times :data:`MAX_DEFLATE_RATIO` (the
  most deflate can compress) bounds what it can hold, and a gzipped NIfTI is counted
  (streamed, stopping at the promised size) when its gzip size trailer disagrees.

Floating-point NIfTI voxels are also checked to be finite (one streaming pass), as ITK reads
NaN and infinity as 0. Anything this module cannot parse is left to the reader's own checks.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np

#: Largest volume read, in voxels (values, for multi-component images): 1024^3, 4 GiB as float32.
#: Far above a CT (512 x 512 x 1000 is a quarter of it), far below what would exhaust a machine.
MAX_VOXELS = 1024**3

#: Deflate (gzip, zlib) cannot expand data more than about 1032:1, so a compressed stream of
#: ``n`` bytes holds at most ``n * 1032`` bytes: a cheap upper bound, no decompression needed.
MAX_DEFLATE_RATIO = 1032

#: Bytes of a text header (NRRD, MetaImage) read at most while looking for its end.
_TEXT_HEADER_LIMIT = 1 << 20

_CHUNK_BYTES = 1 << 24

#: NIfTI datatype code -> bits per voxel (NIfTI-1 standard, nifti1.h).
NIFTI_BITS = {2: 8, 4: 16, 8: 32, 16: 32, 32: 64, 64: 64, 128: 24, 256: 8, 512: 16, 768: 32,
              1024: 64, 1280: 64, 1536: 128, 1792: 128, 2048: 256, 2304: 32}

#: NIfTI datatype codes of floating-point voxels -> numpy scalar type (complex types as float pairs).
_NIFTI_FLOATS = {16: "f4", 64: "f8", 32: "f4", 1792: "f8"}


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith((".nii", ".nii.gz"))


def header_problem(path: str | os.PathLike, *, max_voxels: int = MAX_VOXELS) -> str | None:
    """What is wrong with ``path``'s header or data size (a phrase that follows the file name:
    ``"is truncated: ..."``), or None when nothing is found. Reads headers only, plus, for a
    NIfTI, one streaming pass where :func:`nifti_problem` needs it; never allocates the volume."""
    name = str(path).lower()
    if is_nifti(name):
        return nifti_problem(path, max_voxels=max_voxels)
    if name.endswith((".nrrd", ".nhdr")):
        return _nrrd_problem(Path(path), max_voxels)
    if name.endswith((".mha", ".mhd")):
        return _meta_problem(Path(path), max_voxels)
    return None


def _too_many(voxels: int, sizes, max_voxels: int) -> str | None:
    if voxels > max_voxels:
        return (f"holds {voxels:,} voxels ({' x '.join(map(str, sizes))}), more than the limit of "
                f"{max_voxels:,} (core.image_headers.MAX_VOXELS); crop or resample it first")
    return None


def _truncated(need: int, have: int, *, compressed: bool = False, what: str = "the file") -> str:
    if compressed:
        return (f"is truncated: its header promises {need:,} bytes of voxel data, and {what} of {have:,} "
                f"compressed bytes cannot hold more than {have * MAX_DEFLATE_RATIO:,}")
    return f"is truncated: its header promises {need:,} bytes, {what} holds {have:,}"


# --------------------------------------------------------------------------------------------
# NIfTI-1 / NIfTI-2
# --------------------------------------------------------------------------------------------


def _nifti_header(head: bytes) -> tuple[int, list[int], int, int, str] | None:
    """``(vox_offset, dims, datatype, bitpix, byte order)`` of a NIfTI-1/2 header, or None."""
    for order in "<>":
        size = struct.unpack(order + "i", head[:4])[0] if len(head) >= 4 else 0
        if len(head) >= 348 and size == 348:
            dims = struct.unpack(order + "8h", head[40:56])
            datatype, bitpix = struct.unpack(order + "2h", head[70:74])
            offset = int(struct.unpack(order + "f", head[108:112])[0])
        elif len(head) >= 540 and size == 540:
            datatype, bitpix = struct.unpack(order + "2h", head[12:16])
            dims = struct.unpack(order + "8q", head[16:80])
            offset = struct.unpack(order + "q", head[168:176])[0]
        else:
            continue
        ndim = min(max(int(dims[0]), 0), 7)
        return max(int(offset), size), [max(int(d), 1) for d in dims[1:1 + ndim]], int(datatype), int(bitpix), order
    return None


def nifti_problem(path: str | os.PathLike, *, max_voxels: int = MAX_VOXELS) -> str | None:
    """What is wrong with a NIfTI file's header or voxel data, or None when it is consistent,
    complete and finite.

    The header's ``bitpix`` must be its ``datatype``'s size (else ITK reads a fraction of the
    data and pads the rest), the volume at most ``max_voxels``, and the data all there: for an
    uncompressed file the file size; for gzip the deflate bound first, then the stream's size
    trailer, or a count of the stream (stopping at the promised size) when that disagrees.
    Floating-point voxels must be finite (one streaming pass).
    """
    path = Path(path)
    with open(path, "rb") as fh:
        zipped = fh.read(2) == b"\x1f\x8b"
    opener = gzip.open if zipped else open
    try:
        with opener(path, "rb") as fh:
            header = _nifti_header(fh.read(540))
        if header is None:
            return None  # not NIfTI-1/2: ITK's own reader judges it
        offset, dims, datatype, bitpix, order = header
        expected = NIFTI_BITS.get(datatype)
        if expected is not None and bitpix != expected:
            return (f"has a header that disagrees with itself: bitpix {bitpix} but datatype {datatype}, whose "
                    f"voxels have {expected} bits; the file is damaged or was written by a faulty tool")
        voxels = math.prod(dims)
        if problem := _too_many(voxels, dims, max_voxels):
            return problem
        need = offset + voxels * max(bitpix, 0) // 8
        float_type = _NIFTI_FLOATS.get(datatype)
        file_size = path.stat().st_size
        if zipped and file_size * MAX_DEFLATE_RATIO < need:
            return _truncated(need, file_size, compressed=True)
        if float_type is None:
            if not zipped:
                return None if file_size >= need else _truncated(need, file_size)
            if _gzip_size_trailer(path) == need % (1 << 32):
                return None
        return _scan_nifti(path, opener, offset, need, float_type and order + float_type)
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        return f"is truncated or corrupt ({exc})"


def _gzip_size_trailer(path: Path) -> int:
    """ISIZE, the last 4 bytes of a gzip member: the uncompressed size modulo 2**32."""
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        return struct.unpack("<I", fh.read(4))[0]


def _scan_nifti(path: Path, opener, offset: int, need: int, dtype: str | None) -> str | None:
    """Count the bytes, up to ``need`` (and the non-finite values, for float data), in one pass."""
    total, bad, carry = 0, 0, b""
    with opener(path, "rb") as fh:
        while chunk := fh.read(_CHUNK_BYTES):
            start, end = max(0, offset - total), min(len(chunk), need - total)
            if dtype is not None and end > start:
                data = carry + chunk[start:end]
                usable = len(data) - len(data) % 8  # whole values of both f4 and f8
                values = np.frombuffer(data, dtype=dtype, count=usable // np.dtype(dtype).itemsize)
                bad += int(values.size - np.count_nonzero(np.isfinite(values)))
                carry = data[usable:]
            total += len(chunk)
            if total >= need:
                break
    if total < need:
        return (f"is truncated: its header promises {need} bytes{' (uncompressed)' if opener is gzip.open else ''}, "
                f"the file holds {total}")
    if bad:
        return f"holds {bad} NaN or infinite voxel value(s); values must be finite"
    return None


# --------------------------------------------------------------------------------------------
# NRRD and MetaImage (text headers)
# --------------------------------------------------------------------------------------------


def _text_header(path: Path, end: re.Pattern) -> tuple[list[str], int] | None:
    """The header's lines and its length in bytes, up to and including the line matching ``end``
    (None when no such line comes within :data:`_TEXT_HEADER_LIMIT` bytes). Reads 64 KiB first
    and walks line by line, so the voxel data after the header is not touched."""
    for limit in (1 << 16, _TEXT_HEADER_LIMIT):
        with open(path, "rb") as fh:
            head = fh.read(limit)
        lines, position = [], 0
        while (stop := head.find(b"\n", position)) >= 0:
            line = head[position:stop].decode("latin-1").rstrip("\r")
            position = stop + 1
            lines.append(line)
            if end.match(line):
                return lines, position
        if len(head) < limit:
            return None
    return None


#: NRRD type names -> bytes per value (the standard's aliases, normalised to lower case, no spaces).
_NRRD_BYTES = {**dict.fromkeys(("signedchar", "int8", "int8_t", "uchar", "unsignedchar", "uint8", "uint8_t"), 1),
               **dict.fromkeys(("short", "shortint", "signedshort", "signedshortint", "int16", "int16_t", "ushort",
                                "unsignedshort", "unsignedshortint", "uint16", "uint16_t"), 2),
               **dict.fromkeys(("int", "signedint", "int32", "int32_t", "uint", "unsignedint", "uint32",
                                "uint32_t", "float"), 4),
               **dict.fromkeys(("longlong", "longlongint", "signedlonglong", "signedlonglongint", "int64",
                                "int64_t", "ulonglong", "unsignedlonglong", "unsignedlonglongint", "uint64",
                                "uint64_t", "double"), 8)}


def _nrrd_problem(path: Path, max_voxels: int) -> str | None:
    with open(path, "rb") as fh:
        if fh.read(4) != b"NRRD":
            return None
    found = _text_header(path, re.compile(r"^$"))
    detached = None
    if found is None:  # a .nhdr may end without a blank line
        with open(path, "rb") as fh:
            text = fh.read(_TEXT_HEADER_LIMIT).decode("latin-1")
        found = (text.splitlines(), len(text.encode("latin-1")))
    lines, header_bytes = found
    fields = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            fields[key.strip().lower()] = value.strip().lstrip("=").strip()
    try:
        sizes = [int(v) for v in fields["sizes"].split()]
    except (KeyError, ValueError):
        return None
    if problem := _too_many(math.prod(sizes), sizes, max_voxels):
        return problem
    value_bytes = _NRRD_BYTES.get(fields.get("type", "").lower().replace(" ", ""))
    encoding = fields.get("encoding", "raw").lower()
    if value_bytes is None or any(k in fields for k in ("line skip", "lineskip", "byte skip", "byteskip")):
        return None
    need = math.prod(sizes) * value_bytes
    data_file = fields.get("data file") or fields.get("datafile")
    if data_file:
        if " " in data_file or "%" in data_file or data_file.upper().startswith("LIST"):
            return None  # several data files: left to the reader
        detached = path.parent / data_file
        if not detached.is_file():
            return f"names a data file {data_file} that does not exist beside it"
        have, where = detached.stat().st_size, f"its data file {data_file}"
    else:
        have, where = path.stat().st_size - header_bytes, "the file"
    if encoding == "raw" and have < need:
        return _truncated(need, have, what=where)
    if encoding in ("gzip", "gz") and have * MAX_DEFLATE_RATIO < need:
        return _truncated(need, have, compressed=True, what=where)
    return None


#: MetaImage element types -> bytes per value (MET_LONG's size depends on the writer: not checked).
_META_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
               "MET_FLOAT": 4, "MET_DOUBLE": 8, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8}


def _meta_problem(path: Path, max_voxels: int) -> str | None:
    found = _text_header(path, re.compile(r"^\s*ElementDataFile\s*=", re.IGNORECASE))
    if found is None:
        return None
    lines, header_bytes = found
    fields = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip()
    try:
        sizes = [int(v) for v in fields["dimsize"].split()]
        channels = int(fields.get("elementnumberofchannels", "1"))
    except (KeyError, ValueError):
        return None
    if problem := _too_many(math.prod(sizes) * channels, sizes, max_voxels):
        return problem
    value_bytes = _META_BYTES.get(fields.get("elementtype", "").upper())
    data_file = fields.get("elementdatafile", "")
    compressed = fields.get("compresseddata", "false").lower() == "true"
    if value_bytes is None or int(fields.get("headersize", "0") or 0) != 0:
        return None
    need = math.prod(sizes) * channels * value_bytes
    if data_file.upper() == "LOCAL":
        have, where = path.stat().st_size - header_bytes, "the file"
    elif " " in data_file or "%" in data_file or data_file.upper().startswith("LIST"):
        return None  # several data files: left to the reader
    else:
        detached = path.parent / data_file
        if not detached.is_file():
            return f"names a data file {data_file} that does not exist beside it"
        have, where = detached.stat().st_size, f"its data file {data_file}"
    if not compressed:
        return _truncated(need, have, what=where) if have < need else None
    packed = fields.get("compresseddatasize")
    if packed and packed.isdigit() and have < int(packed):
        return _truncated(int(packed), have, what=where).replace("bytes,", "compressed bytes,", 1)
    if have * MAX_DEFLATE_RATIO < need:
        return _truncated(need, have, compressed=True, what=where)
    return None
