"""The working folder of ``iwseg serve``: held with a lock while the server runs, and what a
killed server left behind removed at the next start.

A server killed by SIGKILL (or a power loss) cannot remove its uploads and results, which are
patient data. Each server holds an ``flock`` on its working folder for its whole life, so a
folder nobody holds belongs to a dead server: at start the server removes

* with the default working folder (``iwseg-serve-*`` in the system's temporary folder): every
  other ``iwseg-serve-*`` folder of this user that no live server holds and that is older than
  this process;
* with ``--workdir DIR``: inside ``DIR``, the job and result folders a server creates there
  (``iwseg-run-*``, ``results-*``); and two servers cannot share one ``--workdir``.

The partial files of a job's outputs live inside its job folder, so they go with it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import List

from ..backend.job import FolderJob
from ..core.errors import InputError
from ..core.outputs import process_start_time

#: Prefix of the default working folder (``tempfile.mkdtemp`` adds 8 random characters).
WORKDIR_PREFIX = "iwseg-serve-"
#: Prefix of the folders of finished jobs' results inside the working folder.
RESULTS_PREFIX = "results-"


def _try_lock(path: Path) -> int | None:
    """An open descriptor of ``path`` holding its exclusive ``flock``, or None if another holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - POSIX only
        return os.open(path, os.O_RDONLY)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def hold_workdir(root: Path, *, flag: str = "--workdir") -> int:
    """Take the lock on the server's working folder for the server's life (close the returned
    descriptor to give it up); :class:`InputError` when another live server holds it."""
    fd = _try_lock(root)
    if fd is None:
        raise InputError(f"{flag} {root} is in use by another iwseg serve; give each server its own folder")
    return fd


def remove_stale_workdirs(own: Path, parent: str | os.PathLike | None = None) -> List[Path]:
    """Remove the ``iwseg-serve-*`` folders in ``parent`` (default: the system's temporary folder)
    left by killed servers: this user's, older than this process, and held by no live server.
    ``own`` (this server's folder) is never touched. Returns the folders removed."""
    parent = Path(parent or tempfile.gettempdir())
    started = process_start_time()
    removed = []
    for entry in parent.glob(WORKDIR_PREFIX + "*"):
        with contextlib.suppress(OSError):
            info = entry.lstat()
            if (not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mtime >= started
                    or entry.resolve() == own.resolve() or len(entry.name) != len(WORKDIR_PREFIX) + 8):
                continue
            fd = _try_lock(entry)
            if fd is None:
                continue  # a live server's
            try:
                shutil.rmtree(entry)
                removed.append(entry)
            finally:
                os.close(fd)
    return sorted(removed)


def remove_stale_job_folders(root: Path) -> List[Path]:
    """Remove the job and result folders a killed server left in ``root`` (call it only while
    holding ``root``'s lock: then no live server owns them). Returns the folders removed."""
    removed = []
    for entry in root.iterdir():
        if entry.name.startswith((FolderJob.FOLDER_PREFIX, RESULTS_PREFIX)) and entry.is_dir() \
                and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return sorted(removed)
