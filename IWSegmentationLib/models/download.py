"""Download one file with resume and a sha256 check: :func:`download`.

The bytes go to ``<target>.partial``. When a download is cut off, the partial file stays, and
the next call asks the server for the rest (an HTTP ``Range: bytes=N-`` request); a server that
answers with the whole file (200 instead of 206) is read from the start again. When every byte
is there, the file's sha256 must equal the expected one: a file that does not match is deleted
and reported (:class:`ChecksumError`, naming the URL and both hashes); one that matches is
fsync'ed and renamed onto ``target`` in one step, so the target is either absent or whole.

Standard library only (``urllib``), so the Slicer module can use it without extra packages.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from ..core.errors import Cancelled, InputError, OutputError
from ..core.outputs import check_output_path

#: Bytes read per step (and between two cancel checks).
CHUNK_BYTES = 1 << 20
#: Seconds a read may wait for the server before the download counts as interrupted.
TIMEOUT_S = 60.0
#: The suffix of a download in progress, kept for the next try.
PARTIAL_SUFFIX = ".partial"

#: ``progress(done_bytes, total_bytes_or_None)``
Progress = Callable[[int, "int | None"], None]


class DownloadError(InputError):
    """A download could not be completed (server error, refused or cut-off connection); the
    bytes received so far are kept for the next try."""


class ChecksumError(InputError):
    """A downloaded file does not have the sha256 its manifest gives (the file was deleted)."""


def file_sha256(path: str | os.PathLike, chunk: int = CHUNK_BYTES) -> str:
    """The sha256 of the file at ``path`` as 64 lowercase hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def partial_path(target: str | os.PathLike) -> Path:
    """Where the download of ``target`` is kept while it is incomplete."""
    target = Path(target)
    return target.with_name(target.name + PARTIAL_SUFFIX)


def download(url: str, target: str | os.PathLike, sha256: str, *, size: int | None = None,
             progress: Progress | None = None, cancelled: Callable[[], bool] | None = None,
             timeout: float = TIMEOUT_S) -> Path:
    """Fetch ``url`` into ``target`` (resuming a ``.partial`` file), check its ``sha256``, rename.

    ``size`` (bytes, optional) is the expected length: more bytes than that stop the download
    as a mismatch. ``progress`` is called after each chunk; ``cancelled()`` true raises
    :class:`Cancelled` (the partial file stays for a later resume). Raises
    :class:`DownloadError` when the transfer fails (the partial file stays),
    :class:`ChecksumError` when the complete file does not match (it is deleted).
    """
    target = Path(target)
    check_output_path(target)
    partial = partial_path(target)
    have = partial.stat().st_size if partial.is_file() else 0
    if size is not None and have > size:
        partial.unlink()
        have = 0
    if size is None or have < size:
        total = _fetch(url, partial, have, size, progress, cancelled, timeout)
    else:
        total = have
    if size is not None and total != size:
        partial.unlink()
        raise ChecksumError(f"download of {url} has {total} bytes, the manifest says {size}; the file was deleted")
    got = file_sha256(partial)
    if got != sha256:
        partial.unlink()
        raise ChecksumError(f"download of {url} does not match its sha256: expected {sha256}, got {got}; "
                            f"the file was deleted")
    try:
        with open(partial, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(partial, target)
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target


def _fetch(url: str, partial: Path, have: int, size: int | None, progress: Progress | None,
           cancelled: Callable[[], bool] | None, timeout: float) -> int:
    """Append the rest of ``url`` to ``partial`` (which holds ``have`` bytes); return its length."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing after byte `have`: the partial file is already whole
            return have
        raise DownloadError(f"cannot download {url}: the server answered {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"cannot download {url}: {getattr(exc, 'reason', exc)}") from None
    with response:
        start = _resumed_at(response, have)
        total = _total_length(response, start, size)
        done = start
        try:
            with open(partial, "r+b" if start else "wb") as out:
                out.seek(start)
                out.truncate()
                if progress:
                    progress(done, total)
                while True:
                    if cancelled is not None and cancelled():
                        raise Cancelled(f"download of {url} cancelled after {done} bytes (kept in {partial})")
                    block = response.read(CHUNK_BYTES)
                    if not block:
                        break
                    out.write(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
                    if size is not None and done > size:
                        break  # more than the manifest says: stop, and report the mismatch
        except OSError as exc:
            if isinstance(exc, (TimeoutError, ConnectionError)):
                raise _interrupted(url, partial, exc) from None
            raise OutputError(f"cannot write {partial}: {exc.strerror or exc}") from None
        except http.client.HTTPException as exc:
            raise _interrupted(url, partial, exc) from None
    if total is not None and done < total:
        raise _interrupted(url, partial, f"the connection closed after {done} of {total} bytes")
    return done


def _resumed_at(response, have: int) -> int:
    """Where the body of ``response`` starts in the file: ``have`` for a 206 answer to our range, 0
    for a 200 (the server sent the whole file)."""
    if response.status != 206:
        return 0
    match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    if not match or int(match.group(1)) != have:
        raise DownloadError(f"cannot resume {response.url}: asked for bytes from {have}, the server sent "
                            f"{response.headers.get('Content-Range')!r}")
    return have


def _total_length(response, start: int, size: int | None) -> int | None:
    """The whole file's length: from the response when it says, else the manifest's ``size``."""
    length = response.headers.get("Content-Length")
    with contextlib.suppress(TypeError, ValueError):
        return start + int(length)
    return size


def _interrupted(url: str, partial: Path, why) -> DownloadError:
    kept = partial.stat().st_size if partial.exists() else 0
    return DownloadError(f"download of {url} was interrupted ({why}); {kept} bytes are kept in {partial}: "
                         f"run the same command again to resume")


class RateLimit:
    """Calls ``callback(done, total)`` at most ``per_second`` times a second, and always for the
    last chunk (``done == total``): a download reports like inference does (about 5 lines a second)."""

    def __init__(self, callback: Progress, per_second: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.callback, self.interval, self.clock = callback, 1.0 / per_second, clock
        self._last: float | None = None

    def __call__(self, done: int, total: int | None) -> None:
        now = self.clock()
        if self._last is None or now - self._last >= self.interval or (total is not None and done >= total):
            self._last = now
            self.callback(done, total)
