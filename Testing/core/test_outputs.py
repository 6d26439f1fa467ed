"""Outputs go only to regular files, and stale partial files are removed safely (issue 23 items 6
and 10): ``core.outputs.atomic_output`` refuses an existing output path that is a FIFO, a device
node, a socket or a folder before anything is written (a rename would replace the node: as root,
``--lesions /dev/null --overwrite`` destroyed /dev/null), and ``remove_stale_partials_of`` removes
only the partial files of a killed run: our exact name, older than this process, not held by a
live writer."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from IWSegmentationLib.core.errors import InputError
from IWSegmentationLib.core.imageio import Geometry, write_image
from IWSegmentationLib.core.outputs import (
    atomic_output,
    check_output_path,
    process_start_time,
    remove_stale_partials_of,
)

REPO = Path(__file__).resolve().parents[2]
DAY = 86400.0


def test_a_fifo_output_is_refused_and_left_a_fifo(tmp_path):
    fifo = tmp_path / "lesions.json"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match=r"lesions\.json is a FIFO; outputs are written only to regular files"), \
            atomic_output(fifo) as tmp:
        tmp.write_text("{}")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lesions.json"]  # no partial file either


def test_write_image_onto_a_fifo_is_refused(tmp_path):
    fifo = tmp_path / "mask.nii.gz"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="is a FIFO"):
        write_image(fifo, np.zeros((2, 3, 4), np.uint8), Geometry.identity((2, 3, 4)))
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_dev_null_is_refused_before_anything_is_created():
    # old code: mkstemp in /dev (as root it succeeded and os.replace replaced /dev/null)
    before = os.stat("/dev/null")
    with pytest.raises(InputError, match=r"/dev/null is a device"), atomic_output("/dev/null") as tmp:
        tmp.write_text("{}")
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_ino == before.st_ino


def test_a_socket_a_folder_and_a_link_to_a_fifo_are_refused(tmp_path):
    sock_path = tmp_path / "s.json"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    try:
        with pytest.raises(InputError, match="is a socket"):
            check_output_path(sock_path, "--lesions")
    finally:
        server.close()
    (tmp_path / "folder.nii.gz").mkdir()
    with pytest.raises(InputError, match="--output .*folder.nii.gz is a folder"):
        check_output_path(tmp_path / "folder.nii.gz", "--output")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link.json").symlink_to(tmp_path / "fifo")
    with pytest.raises(InputError, match="is a FIFO"):
        check_output_path(tmp_path / "link.json")


def test_a_regular_file_is_still_replaced(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with atomic_output(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    check_output_path(tmp_path / "missing.json")  # a new file is fine


# --------------------------------------------------------------------------- stale partials


def _child_in_atomic_output(path: Path) -> tuple[subprocess.Popen, Path]:
    """A child process inside ``atomic_output(path)``, its partial file written; it waits there."""
    code = ("import sys, time\nfrom IWSegmentationLib.core.outputs import atomic_output\n"
            "with atomic_output(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'patient data')\n"
            "    print(tmp, flush=True)\n    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    partial = Path(proc.stdout.readline().strip())
    assert partial.is_file(), partial
    return proc, partial


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(timeout=30)
    proc.stdout.close()


def _backdate(*paths: Path) -> None:
    for path in paths:
        os.utime(path, (time.time() - DAY, time.time() - DAY), follow_symlinks=False)


def test_stale_partials_of_a_killed_run_are_removed_and_nothing_else(tmp_path):
    mask, lesions = tmp_path / "case.nii.gz", tmp_path / "case_lesions.json"
    killed, dead = _child_in_atomic_output(mask)
    _stop(killed)  # SIGKILL: the partial stays
    live, held = _child_in_atomic_output(lesions)
    try:
        fresh = tmp_path / ".case.nii.gz.partial-abcd1234.nii.gz"  # written after this process started
        fresh.write_bytes(b"x")
        keep = [tmp_path / ".case.nii.gz.partial-abcd1234.nii",     # another suffix
                tmp_path / ".case.nii.gz.partial-abc.nii.gz",        # not 8 characters
                tmp_path / "case.nii.gz.partial-abcd1234.nii.gz",    # no leading dot
                tmp_path / ".other.nii.gz.partial-abcd1234.nii.gz"]  # not an output asked about
        for path in keep:
            path.write_text("user file")
        link = tmp_path / ".case.nii.gz.partial-zzzz9999.nii.gz"
        link.symlink_to(tmp_path / "case_lesions.json")
        _backdate(dead, held, link, *keep)
        assert os.stat(dead).st_mtime < process_start_time() < fresh.stat().st_mtime

        removed = remove_stale_partials_of([mask, lesions, None])

        assert removed == [dead]  # the live writer's file, the fresh one, the link and the others stay
        assert held.is_file() and fresh.is_file() and link.is_symlink()
        assert all(p.read_text() == "user file" for p in keep)
    finally:
        _stop(live)
    _backdate(held)
    assert remove_stale_partials_of([lesions]) == [held]  # its writer is gone now
    assert remove_stale_partials_of([tmp_path / "missing" / "x.json"]) == []


def test_process_start_time_is_before_now_and_after_boot():
    started = process_start_time()
    assert time.time() - 7 * DAY < started <= time.time()
