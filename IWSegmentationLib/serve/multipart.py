"""A streaming reader of a ``multipart/form-data`` request body (RFC 7578), standard library only.

A job with an organ mask is one request whose body holds two files, the parts ``image`` and
``organ_mask`` (``curl -F image=@scan.nii.gz -F organ_mask=@lungs.nii.gz``). The server reads
the body chunk by chunk, as it reads a plain upload, so the same size limit, time limit and slot
apply to the whole request; each part's bytes go straight to the file :class:`MultipartReader`'s
``open_part`` gives for it (nothing is held in memory but one chunk and a boundary's length).
"""

from __future__ import annotations

import re
from typing import BinaryIO, Callable

from ..core.errors import InputError

#: Bytes a part's header block may take (a few short lines in practice).
MAX_PART_HEADER_BYTES = 16 * 1024
_BOUNDARY = re.compile(r'boundary=(?:"([^"]{1,70})"|([^\s;,"]{1,70}))', re.IGNORECASE)
_NAME = re.compile(r'(?<![A-Za-z*])name="([^"]*)"', re.IGNORECASE)
_FILENAME = re.compile(r'filename="([^"]*)"', re.IGNORECASE)


def is_multipart(content_type: str | None) -> bool:
    """Whether a request's ``Content-Type`` is ``multipart/form-data``."""
    return (content_type or "").split(";", 1)[0].strip().lower() == "multipart/form-data"


def boundary_of(content_type: str) -> bytes:
    """The ``boundary`` parameter of a ``multipart/form-data`` content type (:class:`InputError` if none)."""
    match = _BOUNDARY.search(content_type)
    if match is None:
        raise InputError("a multipart/form-data body needs a boundary in its Content-Type")
    return (match.group(1) or match.group(2)).encode("latin-1")


class MultipartReader:
    """Feed a multipart body's chunks in order (:meth:`feed`), then :meth:`close`.

    ``open_part(name, filename)`` is called when a part's headers have been read and returns the
    binary file its data is written to (closed by the reader at the part's end); it raises
    :class:`InputError` for a part it does not accept. A body that is not well-formed (no closing
    delimiter, a part without ``Content-Disposition: form-data; name=...``) is an
    :class:`InputError` too.
    """

    def __init__(self, content_type: str, open_part: Callable[[str, str | None], BinaryIO]) -> None:
        self._delimiter = b"\r\n--" + boundary_of(content_type)
        self._open_part = open_part
        self._buffer = bytearray(b"\r\n")  # the first delimiter has no CRLF before it
        self._state = "preamble"
        self._file: BinaryIO | None = None
        self.parts: list[str] = []

    def feed(self, chunk: bytes) -> None:
        """Take the next bytes of the body."""
        self._buffer += chunk
        while self._step():
            pass

    def close_file(self) -> None:
        """Close the file of the part being written, if any (also after an error; safe twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """The body has ended: :class:`InputError` unless its closing delimiter was read."""
        self.close_file()
        if self._state != "end":
            raise InputError("the multipart body ended before its closing boundary (an upload cut short?)")

    def _step(self) -> bool:
        """Consume what the buffer allows in the current state; True if the state moved on."""
        buffer, delimiter = self._buffer, self._delimiter
        if self._state in ("preamble", "data"):
            at = buffer.find(delimiter)
            keep = len(buffer) - len(delimiter) + 1 if at < 0 else at
            if self._file is not None and keep > 0:
                self._file.write(buffer[:keep])
            if at < 0:
                del buffer[: max(keep, 0)]
                return False
            del buffer[: at + len(delimiter)]
            if self._file is not None:
                self._file.close()
                self._file = None
            self._state = "delimiter"
            return True
        if self._state == "delimiter":
            if len(buffer) < 2:
                return False
            if buffer[:2] == b"--":
                self._state = "end"
                return False
            end = buffer.find(b"\r\n")
            if end < 0 or buffer[:end].strip(b" \t"):
                if end < 0 and len(buffer) < 256:
                    return False
                raise InputError("the multipart body is not well-formed (text after a boundary)")
            del buffer[: end + 2]
            self._state = "headers"
            return True
        if self._state == "headers":
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_PART_HEADER_BYTES:
                    raise InputError(f"a multipart part's headers exceed {MAX_PART_HEADER_BYTES} bytes")
                return False
            name, filename = _disposition(bytes(buffer[:end]))
            del buffer[: end + 4]
            self.parts.append(name)
            self._file = self._open_part(name, filename)
            self._state = "data"
            return True
        buffer.clear()  # "end": the epilogue is ignored
        return False


def _disposition(block: bytes) -> tuple[str, str | None]:
    """The ``name`` and ``filename`` of a part's ``Content-Disposition: form-data`` header."""
    for line in block.decode("utf-8", "replace").split("\r\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-disposition" and value.strip().lower().startswith("form-data"):
            name, filename = _NAME.search(value), _FILENAME.search(value)
            if name is not None:
                return name.group(1), filename.group(1) if filename else None
    raise InputError("a multipart part has no 'Content-Disposition: form-data; name=\"...\"' header")


def encode_part_header(boundary: str, name: str, filename: str, *, first: bool) -> bytes:
    """The bytes before a file part's data (its delimiter and headers), as a client sends them."""
    safe = filename.replace('"', "_").replace("\r", "_").replace("\n", "_")
    return ((b"" if first else b"\r\n") + f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
            f"filename=\"{safe}\"\r\nContent-Type: application/octet-stream\r\n\r\n".encode())


def encode_closing(boundary: str) -> bytes:
    """The bytes after the last part's data."""
    return f"\r\n--{boundary}--\r\n".encode("latin-1")
