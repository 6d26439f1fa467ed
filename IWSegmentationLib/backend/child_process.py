"""One child process, watched and cancellable: :class:`BackendProcess`.

It runs one command (``python -m IWSegmentationLib predict ... --progress-format jsonl``, or any
other) in its **own process group / session**, reads stdout and stderr in background threads,
and delivers the parsed :class:`~IWSegmentationLib.core.progress.ProgressEvent` objects of the
JSON-lines protocol and the log lines through plain-Python
:class:`~IWSegmentationLib.backend.job.Signal` objects. Signals are emitted only from
:meth:`BackendProcess.poll` (or :meth:`~BackendProcess.wait`), i.e. on the thread that polls: a Qt
front end polls from a ``QTimer`` on the GUI thread, a script just calls ``wait()``.
:meth:`~BackendProcess.cancel` stops the **whole process tree** (SIGTERM to the group, then SIGKILL
to the group and to every descendant seen, :mod:`~IWSegmentationLib.backend.process_tree`;
``taskkill /T /F`` on Windows), so no orphaned worker keeps a GPU busy.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import signal
import subprocess
import threading
import time
from typing import Any, Sequence

from ..core.errors import InputError
from ..core.progress import ProgressEvent, parse_progress_line
from .job import BackendError, Signal
from .process_tree import (
    ProcessIdentity,
    descendants,
    is_same_process,
    no_console_window,
    signal_group,
    signal_if_unchanged,
)

#: Seconds a cancelled backend gets to stop by itself (it removes partial outputs and exits
#: with code 3) before the whole tree is killed.
CANCEL_GRACE_S = 3.0

#: Seconds to wait for the last output lines after the process has exited (a leftover
#: grandchild can keep the pipes open; its output is not worth a hang).
READER_GRACE_S = 2.0

#: Seconds between scans of the process table for descendants while the backend runs.
TREE_SCAN_INTERVAL_S = 1.0


class BackendProcess:
    """Run one command as a cancellable child process tree speaking the JSON-lines protocol.

    Signals (emitted only from :meth:`poll` / :meth:`wait`, on the calling thread):

    * ``event(ProgressEvent)`` — each protocol line of stdout, in order;
    * ``log(str)`` — each stderr line and each stdout line that is not a protocol event;
    * ``finished(int)`` — once, with the exit code, after all output was delivered.

    The last ``stderr_lines`` stderr lines are kept in :attr:`stderr_tail` for error reports.
    """

    def __init__(
        self,
        command: Sequence[str | os.PathLike],
        *,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        stderr_lines: int = 40,
        cancel_grace_s: float = CANCEL_GRACE_S,
    ) -> None:
        if isinstance(command, (str, bytes)) or not command:
            raise InputError(f"command must be a non-empty list of arguments, got {command!r}")
        if stderr_lines < 1:
            raise InputError(f"stderr_lines must be at least 1, got {stderr_lines}")
        if cancel_grace_s < 0:
            raise InputError(f"cancel_grace_s must be >= 0, got {cancel_grace_s}")
        self.command = [os.fspath(c) for c in command]
        self.env = env
        self.cwd = cwd
        self.cancel_grace_s = float(cancel_grace_s)
        self.event = Signal()
        self.log = Signal()
        self.finished = Signal()
        self.returncode: int | None = None
        self.cancel_requested = False
        self.last_event: ProgressEvent | None = None
        self.error_event: ProgressEvent | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=stderr_lines)
        self._queue: queue.Queue = queue.Queue()
        self._proc: subprocess.Popen | None = None
        self._open_streams = 0
        self._exited_at: float | None = None
        self._kill_at: float | None = None
        self._known_descendants: dict[int, ProcessIdentity] = {}
        self._tree_killed_at: float | None = None
        self._next_tree_scan = 0.0
        self._done = False

    # -- state ---------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def started(self) -> bool:
        return self._proc is not None

    @property
    def done(self) -> bool:
        """True once :attr:`finished` was emitted."""
        return self._done

    @property
    def stderr_tail(self) -> list[str]:
        return list(self._stderr)

    # -- start ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the process in a new process group (POSIX session / Windows process group)."""
        if self._proc is not None:
            raise RuntimeError("this BackendProcess was already started; create a new one")
        kwargs: dict[str, Any] = dict(
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=self.env, cwd=self.cwd, text=True, encoding="utf-8", errors="replace", bufsize=1,
        )
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | no_console_window()["creationflags"]
        else:
            kwargs["start_new_session"] = True
        try:
            self._proc = subprocess.Popen(self.command, **kwargs)
        except OSError as exc:
            raise BackendError(f"cannot start the backend {self.command[0]!r}: {exc.strerror or exc}") from None
        self._open_streams = 2
        for target, stream in ((self._read_stdout, self._proc.stdout), (self._read_stderr, self._proc.stderr)):
            threading.Thread(target=target, args=(stream,), daemon=True, name="iwseg-backend-reader").start()

    def _read_stdout(self, stream) -> None:
        try:
            for line in stream:
                event = parse_progress_line(line)
                self._queue.put(("event", event) if event is not None else ("log", line.rstrip("\r\n")))
        except (OSError, ValueError):
            pass
        finally:
            self._queue.put(("eof", None))

    def _read_stderr(self, stream) -> None:
        try:
            for line in stream:
                line = line.rstrip("\r\n")
                self._stderr.append(line)
                self._queue.put(("log", line))
        except (OSError, ValueError):
            pass
        finally:
            self._queue.put(("eof", None))

    # -- delivery ------------------------------------------------------------------------------

    def _dispatch(self, item: tuple[str, Any]) -> None:
        kind, payload = item
        if kind == "event":
            self.last_event = payload
            if payload.stage == "error":
                self.error_event = payload
            self.event.emit(payload)
        elif kind == "log":
            self.log.emit(payload)
        elif kind == "eof":
            self._open_streams -= 1

    def _drain(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            self._dispatch(item)

    def poll(self) -> bool:
        """Deliver pending output through the signals; return True while the run is not finished.

        Call it periodically from the thread that owns the callbacks (a ``QTimer`` in Slicer).
        """
        if self._proc is None:
            raise RuntimeError("poll() before start()")
        if self._done:
            return False
        self._drain()
        now = time.monotonic()
        if self._proc.poll() is None:
            if self._kill_at is not None and now >= self._kill_at:
                self._kill_tree()
            elif now >= self._next_tree_scan:
                # A descendant that starts its own session leaves the process group; remember
                # it while its parent still lives so cancel and exit can still reach it.
                self._remember_descendants()
                self._next_tree_scan = now + TREE_SCAN_INTERVAL_S
            return True
        if self._exited_at is None:
            self._exited_at = now
        if self._in_grace(now):
            return True
        if self._tree_killed_at is None:
            # Leftover descendants are orphans now; they may also hold our pipes open.
            self._kill_tree()
            self._tree_killed_at = now
        if self._open_streams > 0 and now - self._tree_killed_at < READER_GRACE_S:
            return True
        self._finish()
        return False

    def _in_grace(self, now: float) -> bool:
        """True while a cancel's grace period runs and a remembered descendant still lives.

        Behind the ``PythonSlicer`` launcher the direct child is the launcher: it dies at once
        on SIGTERM while the real backend, its child, is still removing its partial outputs.
        Its exit must not cut the backend's grace period short.
        """
        if self._kill_at is None or now >= self._kill_at:
            return False
        return any(is_same_process(identity) for identity in self._known_descendants.values())

    def wait(self, timeout: float | None = None) -> int:
        """Block until the run finishes, emitting signals on this thread; return the exit code.

        Raises :class:`TimeoutError` (the process keeps running) if ``timeout`` seconds pass.
        """
        if self._proc is None:
            raise RuntimeError("wait() before start()")
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            with contextlib.suppress(queue.Empty):
                self._dispatch(self._queue.get(timeout=0.05))
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the backend did not finish within {timeout} s")
        return int(self.returncode)

    def _finish(self) -> None:
        self.returncode = self._proc.returncode
        self._kill_tree()  # no orphan survives the backend, whatever the exit
        self._drain()
        self._done = True
        self.finished.emit(self.returncode)

    # -- cancel --------------------------------------------------------------------------------

    def cancel(self) -> None:
        """Stop the run: ask politely, then kill the whole tree ``cancel_grace_s`` later.

        Returns at once (the GUI stays responsive); keep calling :meth:`poll` or :meth:`wait`
        to see ``finished``. On Windows the tree is killed at once with ``taskkill /T /F``.
        """
        if self._proc is None or self._done or self.cancel_requested:
            return
        self.cancel_requested = True
        if self._proc.poll() is not None:
            return
        self._remember_descendants()
        if os.name == "nt":
            self._kill_tree()
            return
        signal_group(self._proc.pid, signal.SIGTERM)
        self._kill_at = time.monotonic() + self.cancel_grace_s
        if self.cancel_grace_s == 0:
            self._kill_tree()

    def close(self) -> None:
        """Kill the tree now without waiting (for application exit)."""
        if self._proc is not None and not self._done:
            self.cancel_requested = True
            self._kill_tree()

    def _remember_descendants(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            for identity in descendants(self._proc.pid):
                self._known_descendants.setdefault(identity.pid, identity)

    def _kill_tree(self) -> None:
        """SIGKILL the process group and every descendant seen so far (some may have left the group)."""
        proc = self._proc
        if os.name == "nt":
            if proc.poll() is None:
                subprocess.run(["taskkill", "/PID", str(proc.pid), "/T", "/F"], capture_output=True,
                               **no_console_window())
            return
        self._remember_descendants()
        signal_group(proc.pid, signal.SIGKILL)
        signal_if_unchanged(list(self._known_descendants.values()), signal.SIGKILL)
        if proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._kill_at = None
