"""Processes as the operating system sees them: identity, descendants, signals, no console window.

A cancel must stop the whole tree of the backend (the ``PythonSlicer`` launcher, the
interpreter, its workers) and nothing else. This module finds a process's descendants (psutil
when installed, else ``/proc`` on Linux or ``ps`` on macOS/BSD), remembers each as a
:class:`ProcessIdentity` (pid, parent, start time), and signals a remembered process only while
its pid still belongs to it (:func:`signal_if_unchanged`): a pid freed and given to a stranger is
never signalled. :class:`~IWSegmentationLib.backend.child_process.BackendProcess` uses it.
"""

from __future__ import annotations

import collections
import contextlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


def no_console_window(os_name: str = os.name) -> dict[str, int]:
    """``subprocess`` keyword arguments that keep a child from opening a console window.

    Slicer on Windows is a GUI application: without ``CREATE_NO_WINDOW`` every child
    (the backend, the device probe, ``tasklist``/``taskkill``) flashes a console. Empty on POSIX.
    """
    if os_name != "nt":
        return {}
    return {"creationflags": getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000)}


@dataclass(frozen=True)
class ProcessIdentity:
    """A process as seen once: its pid, its parent's pid and its start time.

    A pid alone is not a process: once the process exits and is reaped the system may give the
    number to an unrelated one. ``start`` (an opaque token: clock ticks since boot on Linux,
    psutil's ``create_time``, ``ps``'s ``lstart``) tells the two apart; None where it cannot be read.
    """

    pid: int
    ppid: int
    start: str | None = None


def _linux_process_table() -> dict[int, ProcessIdentity]:
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        identity = _linux_identity(int(entry))
        if identity is not None:
            table[identity.pid] = identity
    return table


def _linux_identity(pid: int) -> ProcessIdentity | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # "pid (comm) state ppid ... starttime(22nd field)"; comm may hold spaces or parentheses:
    # split after the last ")". fields[0] is field 3 (state), so starttime is fields[19].
    fields = stat[stat.rfind(")") + 2:].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):  # a zombie is gone, only not reaped yet
        return None
    return ProcessIdentity(pid, int(fields[1]), fields[19])


def _ps_process_table() -> dict[int, ProcessIdentity]:
    out = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "ppid=", "-o", "stat=", "-o", "lstart="],
                         capture_output=True, text=True, timeout=10)
    table = {}
    for line in out.stdout.splitlines():
        parts = line.split(None, 3)
        if len(parts) == 4 and parts[0].isdigit() and parts[1].isdigit() and not parts[2].startswith("Z"):
            table[int(parts[0])] = ProcessIdentity(int(parts[0]), int(parts[1]), " ".join(parts[3].split()))
    return table


def _psutil_identity(psutil, proc) -> ProcessIdentity | None:
    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return ProcessIdentity(proc.pid, proc.ppid(), repr(proc.create_time()))
    except psutil.Error:
        return None


def _psutil():
    try:
        import psutil  # lazy: optional; the tables below do without it
    except ImportError:
        return None
    return psutil


def process_identity(pid: int) -> ProcessIdentity | None:
    """The live process that holds ``pid`` now, or None (no such process, or a zombie)."""
    psutil = _psutil()
    if psutil is not None:
        try:
            return _psutil_identity(psutil, psutil.Process(pid))
        except psutil.Error:
            return None
    if os.path.isdir("/proc"):
        return _linux_identity(pid)
    if os.name == "nt":
        return None
    try:
        return _ps_process_table().get(pid)
    except (OSError, subprocess.SubprocessError):
        return None


def is_same_process(remembered: ProcessIdentity) -> bool:
    """True if ``remembered.pid`` still belongs to the process we saw, not to a newcomer.

    The start time decides where both are known (same pid and same start time is the same
    process); without one, the parent must still be the one we saw.
    """
    now = process_identity(remembered.pid)
    if now is None:
        return False
    if remembered.start is not None and now.start is not None:
        return now.start == remembered.start
    return now.ppid == remembered.ppid


def descendants(pid: int) -> list[ProcessIdentity]:
    """Every live descendant of ``pid`` (children, grandchildren, ...), parents first.

    Uses psutil when it is installed, else ``/proc`` (Linux) or ``ps`` (macOS, BSD). Returns
    an empty list when the table cannot be read (e.g. on Windows, where ``taskkill /T`` walks
    the tree itself).
    """
    psutil = _psutil()
    if psutil is not None:
        try:
            found = [_psutil_identity(psutil, p) for p in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
        return [identity for identity in found if identity is not None]
    try:
        table = _linux_process_table() if os.path.isdir("/proc") else _ps_process_table()
    except (OSError, subprocess.SubprocessError):
        return []
    children: dict[int, list[ProcessIdentity]] = collections.defaultdict(list)
    for identity in table.values():
        children[identity.ppid].append(identity)
    found, todo, seen = [], list(children.get(pid, [])), set()
    while todo:
        child = todo.pop(0)
        if child.pid not in seen:
            seen.add(child.pid)
            found.append(child)
            todo.extend(children.get(child.pid, []))
    return found


def descendant_pids(pid: int) -> list[int]:
    """Pids of every live descendant of ``pid``, parents first (see :func:`descendants`)."""
    return [identity.pid for identity in descendants(pid)]


def pid_alive(pid: int) -> bool:
    """True if ``pid`` is a running process (a zombie waiting to be reaped counts as gone)."""
    if os.name == "nt":
        out = subprocess.run(["tasklist", "/FI", f"PID eq {pid}", "/NH"], capture_output=True, text=True,
                             **no_console_window())
        return str(pid) in out.stdout
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            text = stat.read_text(errors="replace")
            return text[text.rfind(")") + 2:].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    return True


def signal_if_unchanged(identities: Sequence[ProcessIdentity], sig: int) -> list[int]:
    """Send ``sig`` to each remembered process that still is the one we saw; return the pids signalled.

    A pid whose process exited may have been given to an unrelated process by now: it is
    skipped (see :func:`is_same_process`), so a cancel never kills a stranger.
    """
    sent = []
    for identity in identities:
        if not is_same_process(identity):
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(identity.pid, sig)
            sent.append(identity.pid)
    return sent


def signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to every process of the process group ``pgid`` (POSIX); a group already gone is no error.

    Safe from pid reuse: the system does not hand out a pid that is still some group's id, and
    the group lives as long as one member does.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
