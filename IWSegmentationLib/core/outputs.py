"""Writing outputs safely: atomic files (a temporary name, then a rename), overwrite and writability guards, folder locks, stale temporary files."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from .errors import InputError, OutputError
from .files import IMAGE_SUFFIXES


def _umask() -> int:
    """The process umask (read from /proc on Linux; elsewhere set and restored at once)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _output_error(path: Path, exc: BaseException) -> OutputError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return OutputError(f"cannot write {path}: {reason}")


#: errno values that mean "the system cannot store this file" rather than a bug.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EIO}


def check_output_path(path: str | os.PathLike, flag: str = "output") -> None:
    """Refuse an output path that exists and is not a regular file.

    A rename onto a device node, FIFO or socket would replace it (``--lesions /dev/null
    --overwrite`` run as root would destroy ``/dev/null``), and a folder cannot be replaced by a
    file. A symbolic link is judged by what it points to. :class:`InputError` naming ``flag``.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise InputError(f"{flag} {path}: cannot check it ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{flag} {path} is a folder; give a file name")
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise InputError(f"{flag} {path} is {kind}; outputs are written only to regular files "
                         "(refusing to replace it)")


def _lock_partial(fd: int) -> None:
    """Hold an advisory lock on a partial file while it is written, so that
    :func:`remove_stale_partials` can tell a live writer's file from a dead one's."""
    with contextlib.suppress(ImportError, OSError):
        import fcntl  # lazy: POSIX only (Windows has no fcntl)

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _commit(tmp: Path, path: Path, mode: int) -> None:
    """Check, flush and rename a complete temporary file onto ``path``, then sync the folder."""
    check_output_path(path)  # it may have appeared while the output was being computed
    os.chmod(tmp, mode)
    if tmp.stat().st_size == 0:
        raise OutputError(f"cannot write {path}: the writer produced an empty file (disk full?)")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    with contextlib.suppress(OSError):  # not every platform or file system can sync a folder
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the file's suffix (writers pick the format from it). On any
    exception, or a cancel, the partial file is removed and an existing ``path`` is untouched.
    Before the rename the file must be non-empty and is fsync'ed, so a full disk cannot put an
    empty or half-written file in place of a good one. The file gets the mode of the file it
    replaces, else ``0666`` less the umask (as ``open()`` would create it; ``mkstemp`` alone
    gives ``0600``). Write failures of the system (disk full, read-only, no permission) raise
    :class:`OutputError` naming ``path`` (exit code 4).
    """
    path = Path(path)
    if not path.parent.exists():
        raise InputError(f"output folder does not exist: {path.parent} (for {path.name})")
    check_output_path(path)
    mode = stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o666 & ~_umask()
    name = path.name
    suffix = next((s for s in IMAGE_SUFFIXES if name.lower().endswith(s)), path.suffix)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.partial-", suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise _output_error(path, exc) from None
    _lock_partial(fd)  # held (the descriptor stays open) until the block ends
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            _commit(tmp_path, path, mode)
        except OSError as exc:
            if exc.errno not in _WRITE_ERRNOS:
                raise
            raise _output_error(path, exc) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
        os.close(fd)


def check_writable(folder: str | os.PathLike, flag: str) -> None:
    """Create and remove a file in ``folder`` now, so that a read-only or forbidden output folder
    is reported before hours of work rather than after (:class:`OutputError`, exit code 4)."""
    folder = Path(folder)
    try:
        fd, probe = tempfile.mkstemp(prefix=".iwseg-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{flag}: cannot write in {folder}: {exc.strerror or exc}") from None


def check_not_overwriting(outputs: Mapping[str, str | os.PathLike | None],
                          inputs: Mapping[str, Sequence[str | os.PathLike] | str | os.PathLike | None]) -> None:
    """Refuse outputs that are one file twice, or that would overwrite an input.

    ``outputs`` maps a flag to its path (None = not given); ``inputs`` maps a flag to a path or a
    list of paths (files or folders). Paths are compared resolved, and existing ones also by inode
    (hard links, bind mounts). The :class:`InputError` names both flags and the path.
    """
    def same(a: Path, b: Path) -> bool:
        if a.resolve() == b.resolve():
            return True
        with contextlib.suppress(OSError):
            return a.exists() and b.exists() and os.path.samefile(a, b)
        return False

    given = [(flag, Path(p)) for flag, p in outputs.items() if p is not None]
    for i, (flag, out) in enumerate(given):
        for other_flag, other in given[:i]:
            if same(out, other):
                raise InputError(f"{other_flag} and {flag} are the same file {out}; give each output its own path")
        for in_flag, paths in inputs.items():
            if paths is None:
                continue
            for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
                if same(out, Path(p)):
                    raise InputError(f"{flag} {out} is the same file as {in_flag} {p}; refusing to overwrite the input")


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) on ``folder`` for the block.

    Processes that write a set of outputs into one folder commit them under this lock, so two
    writers of the same set leave one writer's whole set, never a mix. Nothing is created: the
    lock is on the folder itself, and is released when the block ends or the process dies.
    Without ``fcntl`` (Windows) the block runs unlocked: the last writer wins, file by file.
    """
    try:
        import fcntl  # lazy: POSIX only (Windows has no fcntl)
    except ImportError:  # pragma: no cover - POSIX only
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def process_start_time() -> float:
    """When this process started (seconds since the epoch): from ``/proc`` on Linux, else the
    time this module was first imported (a little later, so never too early)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        ticks = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    return _IMPORTED


_IMPORTED = time.time()


def _held_by_a_writer(path: Path) -> bool:
    """True when a live :func:`atomic_output` holds the lock on ``path`` (False without ``fcntl``)."""
    try:
        import fcntl  # lazy: POSIX only (Windows has no fcntl)
    except ImportError:  # pragma: no cover - POSIX only
        return False
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return True  # cannot look: leave it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def remove_stale_partials(folder: str | os.PathLike, names: Sequence[str]) -> list[Path]:
    """Remove the temporary files that :func:`atomic_output` left in ``folder`` for the outputs
    ``names`` when its process was killed before it could clean up (SIGKILL, power loss).

    A file is removed only if all of these hold: it is named exactly as ``atomic_output`` names
    it (``.NAME.partial-``, the 8 characters ``tempfile`` draws, and NAME's suffix); it is a
    regular file, not a link; it was last written before this process started; and no live
    ``atomic_output`` holds its lock (POSIX ``flock``). Nothing else in ``folder`` is touched,
    so a concurrent run writing the same outputs keeps its files. Returns the paths removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    patterns = []
    for name in names:
        suffix = next((s for s in IMAGE_SUFFIXES if name.lower().endswith(s)), Path(name).suffix)
        patterns.append(re.compile(rf"^\.{re.escape(name)}\.partial-[a-z0-9_]{{8}}{re.escape(suffix)}$"))
    started = process_start_time()
    removed = []
    for entry in folder.iterdir():
        if not any(p.match(entry.name) for p in patterns):
            continue
        try:
            info = entry.lstat()
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode) or info.st_mtime >= started or _held_by_a_writer(entry):
            continue
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
            removed.append(entry)
    return sorted(removed)


def remove_stale_partials_of(outputs: Sequence[str | os.PathLike | None]) -> list[Path]:
    """:func:`remove_stale_partials` for a list of output paths (None skipped), folder by folder:
    what a command calls at its start, before it writes ``outputs``."""
    by_folder: dict[Path, list[str]] = {}
    for output in outputs:
        if output is not None:
            by_folder.setdefault(Path(output).parent, []).append(Path(output).name)
    return sorted(p for folder, names in by_folder.items() for p in remove_stale_partials(folder, names))
