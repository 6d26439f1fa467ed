"""The job contract: what a front end needs from one segmentation, wherever it runs.

A *job* segments one volume. The Slicer logic and the module see only this contract:

* :class:`SegmentationJob` — start, poll, cancel, wait, close, and the :class:`Signal` objects
  ``progress``, ``log`` and ``finished`` (plain Python: no Qt, so it runs and is tested anywhere);
* :class:`RunResult` — how a job ended: an :class:`Outcome` from the exit-code policy
  (:func:`outcome_for_exit_code`, :func:`describe_exit_code`), the message, the kept folder;
* :class:`JobFactory` — makes the jobs of one place (this computer, a server);
* :class:`FolderJob` — the part every job shares: a temporary working folder for the input and
  the outputs, and one policy for the end of a run (load on success; folder removed after
  success or cancel, kept after a failure).

The local job (:class:`~IWSegmentationLib.backend.local_run.InferenceRun`, an ``iwseg predict``
child process) and the remote one (:class:`~IWSegmentationLib.serve.client.RemoteInferenceRun`)
both subclass :class:`FolderJob`. Nothing here starts or kills a process: the remote job, which
runs in Slicer's GUI process with the standard library only, imports this module and not
:mod:`~IWSegmentationLib.backend.process_tree`.
"""

from __future__ import annotations

import enum
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from ..core.errors import EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_OK, InputError, IWSegError
from ..predict.options import PredictOptions


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


#: ``loader(outputs)``: reads the outputs (``{"mask": path, "logits": path, "lesions": path}``, those asked for)
#: on success, on the polling thread, while the files still exist; its value becomes ``RunResult.loaded``.
Loader = Callable[[dict[str, Path]], Any]


@dataclass
class RunResult:
    """The end of a :class:`SegmentationJob`.

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
    after success or cancel and kept after a failure, for inspection.
    :class:`~IWSegmentationLib.backend.local_run.InferenceRun` (a local process) and
    :class:`~IWSegmentationLib.serve.client.RemoteInferenceRun` (a job on an ``iwseg serve`` server)
    add how the work runs.
    """

    INPUT_NAME = "input.nrrd"
    ORGAN_MASK_NAME = "organ_mask.nrrd"
    OUTPUT_NAMES = {"mask": "mask.nrrd", "probabilities": "probabilities.nrrd", "logits": "logits.nrrd",
                    "lesions": "lesions.json"}
    FOLDER_PREFIX = "iwseg-run-"
    #: Who wrote the outputs, in messages ("reading the backend's results failed").
    WRITER = "backend"

    def __init__(self, options: PredictOptions, *, workdir_parent: str | os.PathLike | None = None,
                 loader: Callable[[dict[str, Path]], Any] | None = None) -> None:
        self.options = options
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
        wanted = {"mask": True, "probabilities": self.options.probabilities, "logits": self.options.logits,
                  "lesions": self.options.lesions}
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


@runtime_checkable
class SegmentationJob(Protocol):
    """One segmentation of one volume, wherever it runs; what the Slicer logic and the module use.

    :class:`~IWSegmentationLib.backend.local_run.InferenceRun` (a local ``iwseg predict`` process) is one;
    :class:`~IWSegmentationLib.serve.client.RemoteInferenceRun` (a job on an inference server) is another.
    The contract:

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
    (:class:`~IWSegmentationLib.backend.local_run.LocalJobFactory`, or
    :class:`~IWSegmentationLib.serve.client.RemoteJobFactory` for a server).
    """

    def model_card(self, options: PredictOptions) -> dict:
        """The model card of ``options.checkpoint`` where the jobs run; :class:`InputError` if unusable."""
        ...

    def __call__(self, options: PredictOptions, *, loader: Loader) -> SegmentationJob: ...
