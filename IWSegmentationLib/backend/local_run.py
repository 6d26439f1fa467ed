"""The local job: one ``iwseg predict`` run as a child process on this computer.

:class:`InferenceRun` owns one prediction: a temporary working folder holding the input volume
and the outputs (:class:`~IWSegmentationLib.backend.job.FolderJob`), the command line
(:meth:`~IWSegmentationLib.predict.options.PredictOptions.to_arguments` after the interpreter's
:func:`~IWSegmentationLib.backend.interpreter.default_command_prefix`), the backend process
(:class:`~IWSegmentationLib.backend.child_process.BackendProcess`), and the outcome read from its
exit code. :class:`LocalJobFactory` makes one per prediction for the Slicer logic.

The 3D Slicer module never runs inference in its own process: a frozen GUI and a crash that
takes the whole application down are what users of other AI extensions complain about most.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..core.errors import InputError
from ..nn.checkpoint import read_metadata
from ..predict.options import PredictOptions
from .child_process import CANCEL_GRACE_S, BackendProcess
from .interpreter import backend_environment, default_command_prefix
from .job import FolderJob, Loader, Outcome, RunResult, describe_exit_code, outcome_for_exit_code


def check_local_checkpoints(options: PredictOptions) -> None:
    """Refuse options whose checkpoint(s) are not files on this computer (a job runs them here)."""
    if not options.models:
        raise InputError("no checkpoint selected")
    for path in options.models:
        if not path.is_file():
            raise InputError(f"checkpoint not found: {path}")


class InferenceRun(FolderJob):
    """One ``iwseg predict`` run on one volume, in its own temporary working folder.

    Typical use from a front end::

        run = InferenceRun(PredictOptions(models=(checkpoint,)), command_prefix=[pythonSlicer, "-m", "IWSegmentationLib"],
                           loader=read_outputs_into_scene)
        run.progress.connect(show_progress)      # ProgressEvent
        run.finished.connect(show_result)        # RunResult
        run.start(write_input=lambda path: export_volume(volume, path))
        # ... then call run.poll() from a timer until it returns False, or run.cancel().

    or, in a script or test, ``run.start(write_input=...)`` then ``run.wait().loaded_or_raise()``. The folder and the
    loader follow :class:`FolderJob`. ``command_prefix`` and ``backend_factory`` are injectable
    so tests can run a fake backend script.
    """

    def __init__(
        self,
        options: PredictOptions,
        *,
        command_prefix: Sequence[str | os.PathLike] | None = None,
        env: dict[str, str] | None = None,
        workdir_parent: str | os.PathLike | None = None,
        loader: Callable[[dict[str, Path]], Any] | None = None,
        stderr_lines: int = 40,
        cancel_grace_s: float = CANCEL_GRACE_S,
        backend_factory: Callable[..., BackendProcess] = BackendProcess,
    ) -> None:
        check_local_checkpoints(options)
        self.command_prefix = [os.fspath(c) for c in (command_prefix or default_command_prefix())]
        self.env = backend_environment() if env is None else env
        self._stderr_lines = stderr_lines
        self._cancel_grace_s = cancel_grace_s
        self._backend_factory = backend_factory
        self._backend: BackendProcess | None = None
        self._with_organ_mask = False
        super().__init__(options, workdir_parent=workdir_parent, loader=loader)

    @property
    def command(self) -> list[str]:
        organ = self.organ_mask_path if self._with_organ_mask else None
        return self.command_prefix + self.options.to_arguments(self.input_path, self.output_paths, organ)

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

    def model_card(self, options: PredictOptions) -> dict:
        """The checkpoint file's model card (its header only: no weights are read)."""
        check_local_checkpoints(options)
        return read_metadata(options.checkpoint)

    def __call__(self, options: PredictOptions, *, loader: Loader) -> InferenceRun:
        return InferenceRun(options, command_prefix=default_command_prefix(self.python), env=self.env,
                            workdir_parent=self.workdir_parent, loader=loader)
