"""The backend process: ``iwseg predict`` run as a child process, watched and cancellable.

The 3D Slicer module never runs inference in its own process: a frozen GUI and a crash that
takes the whole application down are what users of other AI extensions complain about most.
Instead it starts ``python -m IWSegmentationLib predict ... --progress-format jsonl`` (inside
Slicer the interpreter is ``PythonSlicer``) and reads the JSON-lines protocol of
:mod:`IWSegmentationLib.core.progress` from its stdout.

Everything here is plain Python (no Qt, no Slicer), so it is tested with real subprocesses:

* :class:`BackendProcess` runs one command in its **own process group / session**, reads
  stdout and stderr in background threads, and delivers parsed :class:`ProgressEvent` objects
  and log lines through plain-Python :class:`Signal` objects. Signals are emitted only from
  :meth:`BackendProcess.poll` (or :meth:`~BackendProcess.wait`), i.e. on the thread that polls:
  a Qt front end polls from a ``QTimer`` on the GUI thread, a script just calls ``wait()``.
  :meth:`~BackendProcess.cancel` stops the **whole process tree** (SIGTERM to the group, then
  SIGKILL to the group and to every descendant seen; ``taskkill /T /F`` on Windows), so no
  orphaned worker keeps a GPU busy.
* :class:`InferenceRun` owns one prediction: a temporary working folder holding the input
  volume and the outputs, the command line, the exit-code outcome (:class:`Outcome`), an
  optional ``loader`` that reads the outputs before the folder goes, and the folder policy:
  removed after success or cancel, kept (its path in the report) after a failure.
* :class:`DeviceProbe` asks a child interpreter which accelerators torch sees and how much
  memory is free, so the GUI process never has to import torch.

Why this module is over 600 lines: :class:`BackendProcess` (the child, its reader threads, the
process-tree kill), :class:`InferenceRun` (an ``iwseg predict`` run on top of it) and
:class:`DeviceProbe` share the exit-code policy and the JSON-lines reading, and the module is being
reworked for an injectable process (a ``Protocol`` the logic takes, issue 10 item 4) on another
branch; it is split along those three classes with that change, not before, so the two edits
do not collide.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from ..core.devices import DEVICES
from ..core.errors import EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_OK, InputError, IWSegError
from ..core.progress import ProgressEvent, parse_progress_line

#: Seconds a cancelled backend gets to stop by itself (it removes partial outputs and exits
#: with code 3) before the whole tree is killed.
CANCEL_GRACE_S = 3.0

#: Seconds to wait for the last output lines after the process has exited (a leftover
#: grandchild can keep the pipes open; its output is not worth a hang).
READER_GRACE_S = 2.0

#: Seconds between scans of the process table for descendants while the backend runs.
TREE_SCAN_INTERVAL_S = 1.0


class BackendError(IWSegError):
    """The backend could not be started (interpreter missing, not executable), or a blocking
    run did not succeed (the message is :meth:`RunResult.report`)."""


class Signal:
    """A minimal plain-Python signal: ``connect`` callables, ``emit`` calls them in order.

    Used instead of Qt signals so that this module runs without Qt (the style of
    KitwareMedical's SlicerNNUnet). Calling the signal is the same as ``emit``.
    """

    def __init__(self) -> None:
        self._slots: list[Callable[..., Any]] = []

    def connect(self, slot: Callable[..., Any]) -> None:
        if not callable(slot):
            raise TypeError(f"slot must be callable, got {type(slot).__name__}")
        self._slots.append(slot)

    def disconnect(self, slot: Callable[..., Any]) -> None:
        self._slots.remove(slot)

    def emit(self, *args: Any) -> None:
        for slot in list(self._slots):
            slot(*args)

    __call__ = emit


class Outcome(str, enum.Enum):
    """How a backend run ended, from its exit code (the protocol's authority) and our cancel."""

    OK = "ok"
    BAD_INPUT = "bad_input"
    CANCELLED = "cancelled"
    FAILED = "failed"


def outcome_for_exit_code(code: int | None, *, cancel_requested: bool = False) -> Outcome:
    """Map an exit code to an :class:`Outcome`: 0 ok, 2 bad input, 3 cancelled, else failed.

    A run the user cancelled is :attr:`Outcome.CANCELLED` whatever its code (a killed process
    exits with a negative code on POSIX, 1 on Windows), so the front end leaves the scene alone.
    """
    if cancel_requested:
        return Outcome.CANCELLED
    if code == EXIT_OK:
        return Outcome.OK
    if code == EXIT_BAD_INPUT:
        return Outcome.BAD_INPUT
    if code == EXIT_CANCELLED:
        return Outcome.CANCELLED
    return Outcome.FAILED


#: What a backend killed without a word usually means, and what to try.
OUT_OF_MEMORY_HINT = "often the system ran out of memory: try a smaller overlap, or the CPU device"


def describe_exit_code(code: int | None, *, silent: bool = False) -> str:
    """A short human sentence for an exit code, naming the signal for killed processes.

    ``silent`` says the backend left no error message (no protocol ``error`` event, no
    traceback, no ``error:`` line). Behind the ``PythonSlicer`` launcher a backend killed by
    the system (SIGKILL from the out-of-memory killer) reaches us only as the launcher's exit
    code 1, so a silent failure gets the out-of-memory hint too.
    """
    if code is None:
        return "the backend did not finish"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        text = f"the backend was killed by {name}"
        if -code == getattr(signal, "SIGKILL", 9):
            text += f" ({OUT_OF_MEMORY_HINT})"
        return text
    if silent and code not in (EXIT_OK, EXIT_BAD_INPUT, EXIT_CANCELLED):
        return (f"the backend stopped with exit code {code} and no error message, which is how a killed "
                f"backend shows behind the PythonSlicer launcher ({OUT_OF_MEMORY_HINT})")
    return f"the backend exited with code {code}"


def no_console_window(os_name: str = os.name) -> dict[str, int]:
    """``subprocess`` keyword arguments that keep a child from opening a console window.

    Slicer on Windows is a GUI application: without ``CREATE_NO_WINDOW`` every child
    (the backend, the device probe, ``tasklist``/``taskkill``) flashes a console. Empty on POSIX.
    """
    if os_name != "nt":
        return {}
    return {"creationflags": getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000)}


# --------------------------------------------------------------------------------------------
# Process trees
# --------------------------------------------------------------------------------------------


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
        import psutil  # optional: the tables below do without it
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


def _signal_group(pgid: int, sig: int) -> None:
    # Safe from pid reuse: the system does not hand out a pid that is still some group's id,
    # and the group lives as long as one member does.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# --------------------------------------------------------------------------------------------
# One backend process
# --------------------------------------------------------------------------------------------


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
        _signal_group(self._proc.pid, signal.SIGTERM)
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
        _signal_group(proc.pid, signal.SIGKILL)
        signal_if_unchanged(list(self._known_descendants.values()), signal.SIGKILL)
        if proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._kill_at = None


# --------------------------------------------------------------------------------------------
# One prediction
# --------------------------------------------------------------------------------------------


@dataclass
class PredictParameters:
    """What the user chose for one prediction; :meth:`validate` names the bad parameter."""

    checkpoint: Path
    device: str = "auto"
    overlap: float | None = None  # None: the checkpoint's own (or the backend's default)
    threshold: float | None = None  # None: the checkpoint's own threshold
    probabilities: bool = True
    lesions: bool = True
    logits: bool = False  # the logit map (--logits): what the module loads, for maximum-logit confidences

    def validate(self, *, local: bool = True) -> None:
        """``local=False``: the checkpoint names a model on a server, so it need not exist here."""
        if not self.checkpoint:
            raise InputError("no checkpoint selected")
        if local and not Path(self.checkpoint).is_file():
            raise InputError(f"checkpoint not found: {self.checkpoint}")
        if self.device not in DEVICES:
            raise InputError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.overlap is not None and not 0.0 <= float(self.overlap) < 1.0:
            raise InputError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.threshold is not None and not 0.0 < float(self.threshold) < 1.0:
            raise InputError(f"threshold must be in (0, 1), got {self.threshold}")

    def arguments(self, input_path: Path, outputs: dict[str, Path], organ_mask: Path | None = None) -> list[str]:
        """The ``predict`` sub-command and its options (see ``iwseg predict --help``)."""
        # absolute: the backend runs in its working folder, not in the caller's current folder
        args = [
            "predict", "--model", str(Path(self.checkpoint).resolve()), "--input", str(input_path),
            "--output", str(outputs["mask"]), "--device", self.device, "--progress-format", "jsonl",
            "--overwrite",  # the job's own fresh folder: a file there is this job's, never the user's
        ]
        if "probabilities" in outputs:
            args += ["--probabilities", str(outputs["probabilities"])]
        if "logits" in outputs:
            args += ["--logits", str(outputs["logits"])]
        if "lesions" in outputs:
            args += ["--lesions", str(outputs["lesions"])]
        if organ_mask is not None:
            args += ["--organ-mask", str(organ_mask)]
        if self.overlap is not None:
            args += ["--overlap", repr(float(self.overlap))]
        if self.threshold is not None:
            args += ["--threshold", repr(float(self.threshold))]
        return args


def default_command_prefix(python: str | os.PathLike | None = None) -> list[str]:
    """``[python, "-m", "IWSegmentationLib"]``; inside Slicer pass the ``PythonSlicer`` path."""
    return [os.fspath(python or sys.executable), "-m", __package__.split(".")[0]]


def backend_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the child: this package importable, unbuffered UTF-8 output.

    Inside Slicer the extension's folder is on the application's ``sys.path`` but not on the
    ``PYTHONPATH`` a ``PythonSlicer`` child sees, so the package's parent folder is prepended.
    """
    env = dict(os.environ if base is None else base)
    package_parent = str(Path(__file__).resolve().parents[len(__package__.split("."))])  # above IWSegmentationLib/
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([package_parent] + [p for p in paths if p != package_parent])
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def write_known_answer_checkpoint(path: str | os.PathLike, python: str | os.PathLike | None = None, *,
                                  env: dict[str, str] | None = None, timeout_s: float = 300.0) -> Path:
    """Write the phantom's known-answer checkpoint (:func:`IWSegmentationLib.testing.phantom.threshold_checkpoint`)
    from a child interpreter, and return its path.

    The module's self-test needs it inside Slicer, where the application must not import torch
    or safetensors (on a fresh Slicer they are not installed; the backend, a child, uses them).
    """
    code = "import sys; from IWSegmentationLib.testing import phantom; phantom.threshold_checkpoint(sys.argv[1])"
    proc = subprocess.run([os.fspath(python or sys.executable), "-c", code, os.fspath(path)], capture_output=True,
                          text=True, env=backend_environment() if env is None else env, timeout=timeout_s,
                          stdin=subprocess.DEVNULL, **no_console_window())
    if proc.returncode != 0 or not Path(path).is_file():
        tail = (proc.stderr.strip().splitlines() or [describe_exit_code(proc.returncode)])[-1]
        raise BackendError(f"writing the known-answer checkpoint {path} failed: {tail}")
    return Path(path)


@dataclass
class RunResult:
    """The end of an :class:`InferenceRun`.

    ``workdir`` is the kept working folder after a failure (None after success or cancel, when
    it was removed). ``loaded`` is what the ``loader`` returned.
    """

    outcome: Outcome
    exit_code: int | None
    message: str
    outputs: dict[str, Path] = field(default_factory=dict)
    workdir: Path | None = None
    stderr_tail: list[str] = field(default_factory=list)
    seconds: float = 0.0
    loaded: Any = None

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK

    def loaded_or_raise(self) -> Any:
        """What the loader returned; :class:`BackendError` with :meth:`report` if the run did not succeed.

        The blocking mode's ending, for every :class:`SegmentationJob`: ``job.wait(timeout).loaded_or_raise()``.
        """
        if not self.ok:
            raise BackendError(self.report())
        return self.loaded

    def report(self, log_lines: int = 15) -> str:
        """Multi-line text for an error dialog: the message, the kept folder, the last log lines."""
        parts = [self.message]
        if self.workdir is not None:
            parts.append(f"The working folder was kept for inspection: {self.workdir}")
        tail = [line for line in self.stderr_tail if line.strip()][-log_lines:]
        if tail and self.outcome is not Outcome.OK:
            parts.append("Last lines of the backend log:\n" + "\n".join(tail))
        return "\n\n".join(parts)


class FolderJob:
    """What every job here shares: a temporary working folder and one policy for the end of a run.

    The input volume (and organ mask) is written into the folder, the outputs are read from it,
    ``loader(outputs)`` runs on success on the polling thread while the files still exist (its
    value becomes :attr:`RunResult.loaded`; if it raises, the run failed). The folder is removed
    after success or cancel and kept after a failure, for inspection. :class:`InferenceRun` (a
    local process) and ``remote.RemoteInferenceRun`` (a job on an ``iwseg serve`` server) add how
    the work runs.
    """

    INPUT_NAME = "input.nrrd"
    ORGAN_MASK_NAME = "organ_mask.nrrd"
    OUTPUT_NAMES = {"mask": "mask.nrrd", "probabilities": "probabilities.nrrd", "logits": "logits.nrrd",
                    "lesions": "lesions.json"}
    FOLDER_PREFIX = "iwseg-run-"
    #: Who wrote the outputs, in messages ("reading the backend's results failed").
    WRITER = "backend"

    def __init__(self, parameters: PredictParameters, *, workdir_parent: str | os.PathLike | None = None,
                 loader: Callable[[dict[str, Path]], Any] | None = None) -> None:
        self.parameters = parameters
        self.loader = loader
        self.progress = Signal()
        self.log = Signal()
        self.finished = Signal()
        self.result: RunResult | None = None
        self._started_at: float | None = None
        if workdir_parent is not None and not Path(workdir_parent).is_dir():
            raise InputError(f"working folder parent does not exist: {workdir_parent}")
        self.workdir: Path | None = Path(tempfile.mkdtemp(prefix=self.FOLDER_PREFIX, dir=workdir_parent)).resolve()

    @property
    def input_path(self) -> Path:
        return self._folder() / self.INPUT_NAME

    @property
    def output_paths(self) -> dict[str, Path]:
        wanted = {"mask": True, "probabilities": self.parameters.probabilities, "logits": self.parameters.logits,
                  "lesions": self.parameters.lesions}
        return {key: self._folder() / name for key, name in self.OUTPUT_NAMES.items() if wanted[key]}

    @property
    def organ_mask_path(self) -> Path:
        return self._folder() / self.ORGAN_MASK_NAME

    def _folder(self) -> Path:
        if self.workdir is None:
            raise RuntimeError("this run's working folder was already removed")
        return self.workdir

    def _write_inputs(self, write_input: Callable[[Path], Any] | None,
                      write_organ_mask: Callable[[Path], Any] | None) -> bool:
        """Write the input and, if asked, the organ mask; True when an organ mask was written."""
        if write_input is not None:
            write_input(self.input_path)
        if not self.input_path.is_file():
            raise InputError(f"the input volume was not written to {self.input_path}")
        if write_organ_mask is None:
            return False
        write_organ_mask(self.organ_mask_path)
        if not self.organ_mask_path.is_file():
            raise InputError(f"the organ mask was not written to {self.organ_mask_path}")
        return True

    def run_blocking(
        self,
        write_input: Callable[[Path], Any] | None = None,
        timeout: float | None = None,
        write_organ_mask: Callable[[Path], Any] | None = None,
    ) -> RunResult:
        """Start, wait, and return the :class:`RunResult` (for scripts and tests).

        If ``timeout`` seconds pass, the run is cancelled and its result is CANCELLED.
        """
        self.start(write_input, write_organ_mask)
        return self.wait(timeout)

    def discard(self) -> None:
        """Remove the working folder (safe to call twice)."""
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def _conclude(self, outcome: Outcome, code: int | None, message: str, log_tail: Sequence[str]) -> RunResult:
        """Check and load the outputs of a successful run, apply the folder policy, emit ``finished``."""
        outputs = self.output_paths
        loaded = None
        if outcome is Outcome.OK:
            missing = [f"{key} ({path.name})" for key, path in outputs.items() if not path.is_file()]
            if missing:
                outcome = Outcome.FAILED
                message = f"the {self.WRITER} exited successfully but did not write: {', '.join(missing)}"
            elif self.loader is not None:
                try:
                    loaded = self.loader(dict(outputs))
                except Exception as exc:  # reported to the user; the folder is kept
                    outcome = Outcome.FAILED
                    message = f"reading the {self.WRITER}'s results failed: {type(exc).__name__}: {exc}"
        keep = outcome in (Outcome.FAILED, Outcome.BAD_INPUT)
        workdir = self.workdir if keep else None
        if not keep:
            self.discard()
        self.result = RunResult(
            outcome=outcome, exit_code=code, message=message, outputs=outputs if keep else {},
            workdir=workdir, stderr_tail=list(log_tail),
            seconds=round(time.monotonic() - (self._started_at or time.monotonic()), 3), loaded=loaded,
        )
        self.finished.emit(self.result)
        return self.result


class InferenceRun(FolderJob):
    """One ``iwseg predict`` run on one volume, in its own temporary working folder.

    Typical use from a front end::

        run = InferenceRun(PredictParameters(checkpoint), command_prefix=[pythonSlicer, "-m", "IWSegmentationLib"],
                           loader=read_outputs_into_scene)
        run.progress.connect(show_progress)      # ProgressEvent
        run.finished.connect(show_result)        # RunResult
        run.start(write_input=lambda path: export_volume(volume, path))
        # ... then call run.poll() from a timer until it returns False, or run.cancel().

    or, in a script or test, ``result = run.run_blocking(write_input=...)``. The folder and the
    loader follow :class:`FolderJob`. ``command_prefix`` and ``backend_factory`` are injectable
    so tests can run a fake backend script.
    """

    def __init__(
        self,
        parameters: PredictParameters,
        *,
        command_prefix: Sequence[str | os.PathLike] | None = None,
        env: dict[str, str] | None = None,
        workdir_parent: str | os.PathLike | None = None,
        loader: Callable[[dict[str, Path]], Any] | None = None,
        stderr_lines: int = 40,
        cancel_grace_s: float = CANCEL_GRACE_S,
        backend_factory: Callable[..., BackendProcess] = BackendProcess,
    ) -> None:
        parameters.validate()
        self.command_prefix = [os.fspath(c) for c in (command_prefix or default_command_prefix())]
        self.env = backend_environment() if env is None else env
        self._stderr_lines = stderr_lines
        self._cancel_grace_s = cancel_grace_s
        self._backend_factory = backend_factory
        self._backend: BackendProcess | None = None
        self._with_organ_mask = False
        super().__init__(parameters, workdir_parent=workdir_parent, loader=loader)

    @property
    def command(self) -> list[str]:
        organ = self.organ_mask_path if self._with_organ_mask else None
        return self.command_prefix + self.parameters.arguments(self.input_path, self.output_paths, organ)

    @property
    def running(self) -> bool:
        return self._backend is not None and self.result is None

    @property
    def backend(self) -> BackendProcess | None:
        return self._backend

    def start(
        self,
        write_input: Callable[[Path], Any] | None = None,
        write_organ_mask: Callable[[Path], Any] | None = None,
    ) -> None:
        """Write the input (``write_input(path)``, if given) and start the backend.

        ``write_organ_mask(path)``, if given, writes the organ mask the checkpoint's preset
        uses (passed as ``--organ-mask``). If writing or starting fails, the folder is removed
        and the exception propagates: nothing was run.
        """
        if self._backend is not None or self.result is not None:
            raise RuntimeError("this InferenceRun was already started; create a new one")
        try:
            self._with_organ_mask = self._write_inputs(write_input, write_organ_mask)
            backend = self._backend_factory(
                self.command, env=self.env, cwd=str(self._folder()),
                stderr_lines=self._stderr_lines, cancel_grace_s=self._cancel_grace_s,
            )
            backend.event.connect(self.progress.emit)
            backend.log.connect(self.log.emit)
            backend.finished.connect(self._on_finished)
            self._backend = backend
            self._started_at = time.monotonic()
            backend.start()
        except BaseException:
            self._backend = None
            self.discard()
            raise

    def poll(self) -> bool:
        """Deliver pending progress; True while running (see :meth:`BackendProcess.poll`)."""
        if self.result is not None:
            return False
        if self._backend is None:
            raise RuntimeError("poll() before start()")
        return self._backend.poll()

    def cancel(self) -> None:
        """Cancel the run (returns at once; keep polling to receive ``finished``)."""
        if self._backend is not None and self.result is None:
            self._backend.cancel()

    def wait(self, timeout: float | None = None) -> RunResult:
        """Block until a started run finishes (signals are emitted on this thread); return its result.

        If ``timeout`` seconds pass, the run is cancelled and its result is CANCELLED. An
        exception while waiting (e.g. KeyboardInterrupt in a script) kills the tree first.
        """
        if self._backend is None:
            raise RuntimeError("wait() before start()")
        if self.result is not None:
            return self.result
        try:
            self._backend.wait(timeout)
        except TimeoutError:
            self._backend.cancel()
            self._backend.wait()
            self.result.message = f"cancelled: the backend did not finish within {timeout} s"
        except BaseException:
            self._backend.close()
            raise
        return self.result

    def close(self) -> None:
        """Kill the backend tree now and remove the working folder with the patient's input volume.

        For the module's ``cleanup()`` (Slicer closing): no process and no copy of the input is
        left behind. ``finished`` is not emitted. Safe to call at any time, twice too.
        """
        if self._backend is not None and self.result is None:
            self._backend.close()
        self.discard()

    # -- end of the run ------------------------------------------------------------------------

    def _on_finished(self, code: int) -> None:
        backend = self._backend
        outcome = outcome_for_exit_code(code, cancel_requested=backend.cancel_requested)
        self._conclude(outcome, code, self._message(outcome, code, backend), backend.stderr_tail)

    @staticmethod
    def _message(outcome: Outcome, code: int | None, backend: BackendProcess) -> str:
        if outcome is Outcome.OK:
            return "done"
        if outcome is Outcome.CANCELLED:
            return "cancelled"
        if backend.error_event is not None and backend.error_event.get("message"):
            return str(backend.error_event.get("message"))
        lines = [line.strip() for line in backend.stderr_tail if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]
        detail = errors[-1] if errors else (lines[-1] if lines else "")
        silent = not errors and not any(line.startswith("Traceback") for line in lines)
        base = describe_exit_code(code, silent=silent)
        return f"{base}: {detail}" if detail else base


# --------------------------------------------------------------------------------------------
# The job contract: what the Slicer logic needs from a run, local or remote
# --------------------------------------------------------------------------------------------


#: ``loader(outputs)``: reads the outputs (``{"mask": path, "logits": path, "lesions": path}``, those asked for)
#: on success, on the polling thread, while the files still exist; its value becomes ``RunResult.loaded``.
Loader = Callable[[dict[str, Path]], Any]


@runtime_checkable
class SegmentationJob(Protocol):
    """One segmentation of one volume, wherever it runs; what the Slicer logic and the module use.

    :class:`InferenceRun` (a local ``iwseg predict`` process) is one; a job on an inference
    server can be another. The contract:

    * ``start(write_input, write_organ_mask=None)`` writes the inputs through the callbacks (each
      gets the path to write to) and starts the work; it returns at once. If it raises, nothing ran.
    * ``poll()`` delivers pending signals on the calling thread (the GUI's timer) and returns True
      while the job is not finished; ``wait(timeout)`` blocks until the end (scripts and tests).
    * ``cancel()`` asks the job to stop and returns at once; ``finished`` follows.
    * ``close()`` stops everything now and removes the inputs (application exit); no signal follows.
    * Signals (:class:`Signal`, emitted only from ``poll``/``wait``): ``progress(ProgressEvent)``,
      ``log(str)``, and ``finished(RunResult)`` exactly once. Success, failure and cancel all end
      there, told apart by :attr:`RunResult.outcome`; a failure carries its message and report
      (so there is no separate "failed" signal).
    * ``running`` is True from ``start`` until ``finished``.
    """

    progress: Signal
    log: Signal
    finished: Signal

    @property
    def running(self) -> bool: ...

    def start(self, write_input: Callable[[Path], Any] | None = None,
              write_organ_mask: Callable[[Path], Any] | None = None) -> None: ...

    def poll(self) -> bool: ...

    def cancel(self) -> None: ...

    def wait(self, timeout: float | None = None) -> RunResult: ...

    def close(self) -> None: ...


class JobFactory(Protocol):
    """Makes the :class:`SegmentationJob` of one prediction, and says which model it will run.

    Injected into :class:`~IWSegmentationLib.slicer.logic.LesionSegmentationLogic` (the
    SlicerNNUnet pattern), so tests pass a fake and the module can choose where jobs run
    (:class:`LocalJobFactory`, or ``serve.client.RemoteJobFactory`` for a server).
    """

    def model_card(self, parameters: PredictParameters) -> dict:
        """The model card of ``parameters.checkpoint`` where the jobs run; :class:`InputError` if unusable."""
        ...

    def __call__(self, parameters: PredictParameters, *, loader: Loader) -> SegmentationJob: ...


@dataclass
class LocalJobFactory:
    """The default :class:`JobFactory`: an :class:`InferenceRun` of ``python -m IWSegmentationLib predict``.

    ``python`` is the interpreter (``PythonSlicer`` inside Slicer), ``env`` its environment
    (default :func:`backend_environment`), ``workdir_parent`` where run folders go (default: the
    system's temporary folder).
    """

    python: str | os.PathLike | None = None
    env: dict[str, str] | None = None
    workdir_parent: str | os.PathLike | None = None

    def model_card(self, parameters: PredictParameters) -> dict:
        """The checkpoint file's model card (its header only: no weights are read)."""
        from ..nn.checkpoint import read_metadata

        parameters.validate()
        return read_metadata(parameters.checkpoint)

    def __call__(self, parameters: PredictParameters, *, loader: Loader) -> InferenceRun:
        return InferenceRun(parameters, command_prefix=default_command_prefix(self.python), env=self.env,
                            workdir_parent=self.workdir_parent, loader=loader)


# --------------------------------------------------------------------------------------------
# Which devices torch sees, asked in a child interpreter
# --------------------------------------------------------------------------------------------

_DEVICE_PROBE_CODE = r"""
import json
try:
    import torch
except Exception as exc:
    print(json.dumps({"torch": None, "error": f"{type(exc).__name__}: {exc}", "cuda": [], "mps": False}))
    raise SystemExit(0)
info = {"torch": torch.__version__, "cuda": [], "mps": False, "error": None}
try:
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            info["cuda"].append({"index": i, "name": torch.cuda.get_device_name(i),
                                 "free_mb": free // 2**20, "total_mb": total // 2**20})
    mps = getattr(torch.backends, "mps", None)
    info["mps"] = bool(mps is not None and mps.is_available())
except Exception as exc:
    info["error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(info))
"""


class DeviceProbe:
    """Ask a child interpreter which devices torch sees (torch is never imported here).

    ``start()`` returns at once; ``poll()`` returns None while the child runs, then the
    result dict: ``{"torch": version or None, "cuda": [{"index", "name", "free_mb",
    "total_mb"}], "mps": bool, "error": str or None}``. ``run_blocking()`` does both.
    """

    def __init__(self, python: str | os.PathLike | None = None, *, timeout_s: float = 60.0,
                 env: dict[str, str] | None = None) -> None:
        self.python = os.fspath(python or sys.executable)
        self.timeout_s = timeout_s
        self.env = env
        self.result: dict | None = None
        self._proc: subprocess.Popen | None = None
        self._started_at = 0.0

    def start(self) -> None:
        try:
            self._proc = subprocess.Popen(
                [self.python, "-c", _DEVICE_PROBE_CODE], stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env, **no_console_window(),
            )
        except OSError as exc:
            self.result = {"torch": None, "cuda": [], "mps": False, "error": f"cannot run {self.python}: {exc}"}
        self._started_at = time.monotonic()

    def poll(self) -> dict | None:
        if self.result is not None:
            return self.result
        if self._proc is None:
            raise RuntimeError("poll() before start()")
        if self._proc.poll() is None:
            if time.monotonic() - self._started_at < self.timeout_s:
                return None
            self._proc.kill()
        out, err = self._proc.communicate()
        self.result = self._parse(out, err, self._proc.returncode)
        return self.result

    def run_blocking(self) -> dict:
        self.start()
        while self.poll() is None:
            time.sleep(0.05)
        return self.result

    def close(self) -> None:
        """Stop a probe that is still running (the module's ``cleanup()``); its result says so."""
        if self._proc is not None and self.result is None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.communicate()
            self.result = {"torch": None, "cuda": [], "mps": False, "error": "the device probe was stopped"}

    @staticmethod
    def _parse(out: str, err: str, code: int | None) -> dict:
        for line in reversed((out or "").splitlines()):
            try:
                info = json.loads(line)
            except ValueError:
                continue
            if isinstance(info, dict):
                info.setdefault("cuda", [])
                info.setdefault("mps", False)
                info.setdefault("error", None)
                return info
        tail = (err or "").strip().splitlines()
        reason = tail[-1] if tail else describe_exit_code(code)
        return {"torch": None, "cuda": [], "mps": False, "error": reason}
