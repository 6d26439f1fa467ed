"""The JSON-lines progress protocol spoken by ``iwseg predict --progress-format jsonl``.

The backend writes one JSON object per line on **stdout**; the 3D Slicer module (or any
other front end) reads them as they come. Human-readable logs go to stderr. Every object
has a ``"stage"`` key; the other keys depend on the stage:

=============  ==========================================================================
stage          keys
=============  ==========================================================================
``start``      ``version``, ``cases`` (number of input cases), ``device``; ``precision``
               (``fp32``/``fp16``/``bf16``), ``model`` (checkpoint path)
``load``       ``case``, ``message`` — reading the input or the checkpoint (``case`` null)
``preprocess`` ``case``
``inference``  ``case``, ``done``, ``total`` (windows that run, after background skipping),
               ``eta_s`` (seconds, or null); at most about 5 lines a second, the last with
               ``done == total``
``postprocess````case`` — thresholding, lesion analysis
``write``      ``case``, ``path`` — about to write this output (it appears atomically)
``case_done``  ``case``, ``outputs`` (mapping name -> path), ``lesions`` (count), ``seconds``;
               ``windows``, ``windows_total`` (windows run / in the full grid); ``engine``
               (``frozen`` or ``eager``, see ``inference.freeze_for_cpu``); ``summary``
               (``core.lesion_guards.LesionSummary.as_dict``: lesion count, largest lesion,
               share of the organ or body, its one-line ``text`` and ``warnings``; each warning
               is also sent as a ``warning`` event before it)
``warning``    ``message`` (e.g. "CUDA out of memory, retrying with batch size 1"); ``case``
               when it concerns one case (a folder case that failed and was skipped)
``done``       ``seconds``, ``cases`` (cases that succeeded); ``failed`` (list of case names)
``error``      ``message``, ``exit_code``
``download``   ``model``, ``done``, ``total`` (bytes; ``total`` null when the server does not
               say), ``eta_s`` — ``iwseg models fetch``; at most about 5 lines a second
=============  ==========================================================================

Keys after the semicolons were added after the first version; readers must not require them
and must ignore keys they do not know.

A line that is not a JSON object is not an event (a stray print from a library); readers
must skip it rather than fail. The process exit code is authoritative: 0 success, 2 bad
input, 3 cancelled, anything else a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TextIO

from .errors import Cancelled

STAGES = (
    "start", "load", "preprocess", "inference", "postprocess", "write", "case_done", "warning", "done", "error",
    "download",
)


@dataclass
class ProgressEvent:
    """One parsed protocol line."""

    stage: str
    data: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default=None):
        return self.data.get(key, default)

    @property
    def fraction(self) -> float | None:
        """``done / total`` in [0, 1] for events that carry both, else None."""
        done, total = self.data.get("done"), self.data.get("total")
        if isinstance(done, (int, float)) and isinstance(total, (int, float)) and total > 0:
            return max(0.0, min(1.0, done / total))
        return None


def parse_progress_line(line: str) -> ProgressEvent | None:
    """Parse one stdout line of the backend; ``None`` for anything that is not a protocol event."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("stage"), str):
        return None
    stage = obj.pop("stage")
    return ProgressEvent(stage, obj)


class EtaEstimator:
    """Seconds left from the rate so far (None until one step is done)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._start = clock()

    def restart(self) -> None:
        self._start = self._clock()

    def eta(self, done: int, total: int) -> float | None:
        if done <= 0 or total <= 0:
            return None
        elapsed = self._clock() - self._start
        return round(elapsed / done * max(total - done, 0), 1)


class ProgressReporter:
    """Emits progress either as JSON lines (machine readable) or as plain text / tqdm bars.

    ``fmt`` is ``"jsonl"`` or ``"text"``. In ``jsonl`` mode every call writes one flushed
    line on ``stream`` (stdout by default); in ``text`` mode inference progress is shown as
    a tqdm bar on stderr and other stages as short log lines.
    """

    def __init__(self, fmt: str = "text", stream: TextIO | None = None):
        if fmt not in ("text", "jsonl"):
            raise ValueError(f"progress format must be 'text' or 'jsonl', got {fmt!r}")
        self.fmt = fmt
        self.stream = stream
        self._bar = None
        self._eta = EtaEstimator()

    def emit(self, stage: str, **data: Any) -> None:
        if self.fmt == "jsonl":
            out = self.stream or sys.stdout
            out.write(json.dumps({"stage": stage, **data}, default=str) + "\n")
            out.flush()
            return
        if stage in ("inference", "download"):
            self._text_bar(data, unit="win" if stage == "inference" else "B")
            return
        self._close_bar()
        message = data.get("message") or data.get("path") or ""
        case = data.get("case")
        prefix = f"[{case}] " if case else ""
        if stage in ("warning", "error"):
            print(f"{stage}: {prefix}{message}", file=self.stream or sys.stderr, flush=True)
        elif stage == "case_done" and isinstance(data.get("summary"), dict):
            print(f"{prefix}summary: {data['summary'].get('text')}", file=self.stream or sys.stderr, flush=True)
        elif message:
            print(f"{prefix}{stage}: {message}", file=self.stream or sys.stderr, flush=True)

    def inference_callback(self, case: str | None = None) -> Callable[[int, int], None]:
        """A ``progress(done, total)`` callback for sliding-window inference that reports here."""
        self._eta.restart()

        def progress(done: int, total: int) -> None:
            self.emit("inference", case=case, done=int(done), total=int(total), eta_s=self._eta.eta(done, total))

        return progress

    def _text_bar(self, data: dict, unit: str = "win") -> None:
        from tqdm import tqdm  # lazy: installed on first Apply in Slicer (slicer/deps.py)

        total, done = data.get("total") or 0, data.get("done") or 0
        if self._bar is None or self._bar.total != total:
            self._close_bar()
            desc = data.get("case") or data.get("model") or "inference"
            self._bar = tqdm(total=total, desc=f"{desc}", unit=unit, unit_scale=unit == "B", leave=False)
        self._bar.n = done
        self._bar.refresh()
        if done >= total:
            self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# --------------------------------------------------------------------------- cancellation

#: The signals every long-running command treats as "cancel" (exit code 3).
CANCEL_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class CancelState:
    """SIGINT and SIGTERM handling of the long-running commands (``predict``, ``train``,
    ``evaluate``): the first signal raises :class:`~IWSegmentationLib.core.errors.Cancelled` in the
    main thread, so unwinding removes every temporary output (``atomic_output``) and the
    command line exits with code 3. Inside :meth:`deferred` (outputs being committed, a batch
    being received from a worker) the block finishes first and the cancel is raised right
    after it; a second signal does not wait.

    :meth:`installed` sets both handlers explicitly, whatever the process inherited: a job
    started in the background by a non-interactive shell inherits an *ignored* SIGINT, and
    Python keeps it ignored unless a handler is installed. Child processes forked while the
    handlers are installed never raise :class:`Cancelled` (the parent does the cleanup): see
    :meth:`_child_default`.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._deferring = 0
        self._pid = os.getpid()

    def handler(self, signum, _frame) -> None:
        if os.getpid() != self._pid:  # a forked child
            self._child_default(signum)
            return
        repeated = self.requested is not None
        self.requested = signal.Signals(signum).name
        if not self._deferring or repeated:  # a second signal does not wait
            raise Cancelled(f"received {self.requested}")

    def _child_default(self, signum: int) -> None:
        """A forked child's handling: a DataLoader worker ignores the first signal, because its
        parent got the same one (a group signal, Ctrl-C) and shuts its workers down cleanly
        (a worker that dies instead makes the parent print a traceback); any other child, or
        a worker's second signal, takes the signal's default action."""
        data = sys.modules.get("torch.utils.data")
        if data is not None and data.get_worker_info() is not None and self.requested is None:
            self.requested = signal.Signals(signum).name
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt  # what Python's default SIGINT handler does
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def __call__(self) -> bool:
        return self.requested is not None

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if self.requested and not self._deferring:
            raise Cancelled(f"received {self.requested}")

    @contextlib.contextmanager
    def installed(self) -> Iterator[CancelState]:
        """Install the handlers (main thread only) and restore the previous ones afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        self._pid = os.getpid()
        previous = {sig: signal.signal(sig, self.handler) for sig in CANCEL_SIGNALS}
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def reinstall_cancel_handlers(_worker_id: int = 0) -> None:
    """``worker_init_fn`` of the trainer's DataLoader: torch's worker start replaces the SIGTERM
    handler a forked worker inherited with its own C handler, which dies on the signal. Under
    an installed :class:`CancelState` that death, on a SIGTERM sent to the whole process group
    (a scheduler, ``kill -- -PGID``), makes the parent print a traceback while it cancels; so
    the inherited handler is put back, and the worker waits for its parent to shut it down (see
    :meth:`CancelState._child_default`). Without a CancelState nothing changes."""
    for sig in CANCEL_SIGNALS:
        handler = signal.getsignal(sig)
        if isinstance(getattr(handler, "__self__", None), CancelState):
            signal.signal(sig, handler)

