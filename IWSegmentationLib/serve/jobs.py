"""The jobs of ``iwseg serve``: the queue, and the files of each job.

What a client may choose is a :class:`~IWSegmentationLib.predict.options.PredictOptions`, read
from its request (:meth:`~IWSegmentationLib.predict.options.PredictOptions.from_request`: an
unknown option, or one the server chooses, is refused, as is a value out of range).

:class:`JobManager` holds the jobs: a FIFO queue, at most ``workers`` running at once, every
:class:`~IWSegmentationLib.backend.local_run.InferenceRun` call (start, poll, cancel) made from its
one scheduler thread, finished results deleted ``keep_results_s`` seconds after the job ended.
A job is one ``iwseg predict`` child process (:class:`JobRun`), so there is no second inference
path. :mod:`.app` puts HTTP in front of it.
"""

import hmac
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Dict, List, Mapping, Optional

from ..backend.child_process import CANCEL_GRACE_S
from ..backend.interpreter import backend_environment, default_command_prefix
from ..backend.job import Outcome, RunResult
from ..backend.local_run import InferenceRun
from ..core.errors import EXIT_CANCELLED, InputError
from ..core.imageio import read_geometry
from ..core.organ_masks import read_organ_mask
from ..core.outputs import atomic_output
from ..predict.lesion_json import relabelled_lesion_report
from ..predict.options import PredictOptions

#: Single-file image formats a job accepts as upload and writes as output (``.nhdr``/``.mhd``
#: keep their voxels in a second file, which one upload cannot carry).
FILE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


#: The outputs a job can return, by the name used in the URL.
RESULT_NAMES = ("mask", "probabilities", "logits", "lesions")


#: Job states; the last four are final and equal :class:`~IWSegmentationLib.backend.job.Outcome` values.
QUEUED, RUNNING = "queued", "running"


FINAL_STATES = tuple(o.value for o in Outcome)


#: Seconds between two passes of the scheduler thread (poll the running jobs, start queued ones).
SCHEDULER_INTERVAL_S = 0.02


#: Upload names kept as they are (others are stored as ``input`` + suffix).
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


LOG = logging.getLogger("uvicorn.error")


class ApiError(Exception):
    """An error answered as ``{"detail": message}`` with an HTTP status code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def upload_name(filename: str) -> str:
    """The name the server stores a client's upload under, inside the job's own folder.

    A name that is not a bare file name (a folder part, ``..``, a drive, a NUL) is refused with
    an :class:`InputError`, as is a suffix other than :data:`FILE_SUFFIXES`. A safe name (letters,
    digits, ``._-``) is kept, so that the case name in the events and the lesion JSON is the one a
    local run shows; any other becomes ``input`` + its suffix.
    """
    if (not filename or "\x00" in filename or filename in (".", "..")
            or PurePosixPath(filename).name != filename or PureWindowsPath(filename).name != filename):
        raise InputError(f"file name {filename!r} is not a bare file name (no folders, no '..')")
    suffix = single_file_suffix(filename, what="file name")
    return filename if SAFE_NAME.fullmatch(filename) else f"input{suffix}"


def single_file_suffix(name: str, *, what: str = "output format") -> str:
    """The suffix of ``name`` (``scan.nii.gz`` -> ``.nii.gz``) if it is one of :data:`FILE_SUFFIXES`."""
    suffix = next((s for s in FILE_SUFFIXES if name.lower().endswith(s)), None)
    if suffix is None:
        raise InputError(f"{what} {name!r}: use one of {', '.join(FILE_SUFFIXES)}")
    return suffix


def list_models(folder: "str | os.PathLike") -> Dict[str, Path]:
    """Model name (file name without ``.safetensors``) -> path, for the checkpoints directly in ``folder``.

    A link that points outside ``folder`` is left out: models are loaded only from there.
    """
    root = Path(folder).resolve()
    models = {}
    for path in sorted(root.glob("*.safetensors")):
        real = path.resolve()
        if real.is_file() and root in real.parents:
            models[path.name[: -len(".safetensors")]] = real
    return models


def format_event(stage: str, data: Dict[str, Any]) -> bytes:
    """One protocol line, serialised as :class:`~IWSegmentationLib.core.progress.ProgressReporter` writes it."""
    return (json.dumps({"stage": stage, **data}, default=str) + "\n").encode("utf-8")


class JobRun(InferenceRun):
    """An :class:`InferenceRun` whose input keeps the upload's format and whose image outputs use
    the format the client asked for (so they are the files a local ``iwseg predict`` writes)."""

    def __init__(self, options: PredictOptions, *, input_name: str, output_format: str = ".nrrd",
                 **kwargs: Any) -> None:
        self.input_name = input_name
        self.output_format = single_file_suffix(output_format)
        #: the uploaded organ mask's stored name (``organ_mask`` + its suffix); None: no mask uploaded
        self.organ_mask_name: Optional[str] = None
        super().__init__(options, **kwargs)

    @property
    def organ_mask_path(self) -> Path:
        return self._folder() / (self.organ_mask_name or self.ORGAN_MASK_NAME)

    def set_organ_mask_name(self, filename: str) -> Path:
        """Name the organ mask part ``filename`` (only its suffix is used); the path it goes to."""
        self.organ_mask_name = "organ_mask" + single_file_suffix(filename, what="organ mask file name")
        return self.organ_mask_path

    @property
    def input_path(self) -> Path:
        return self._folder() / "input" / self.input_name

    @property
    def output_paths(self) -> Dict[str, Path]:
        paths = {"mask": self._folder() / f"mask{self.output_format}"}
        if self.options.probabilities:
            paths["probabilities"] = self._folder() / f"probabilities{self.output_format}"
        if self.options.logits:
            paths["logits"] = self._folder() / f"logits{self.output_format}"
        if self.options.lesions:
            paths["lesions"] = self._folder() / "lesions.json"
        return paths


@dataclass
class Job:
    """One submitted job: its owner (a token digest), its run, its events and its results."""

    id: str
    owner: str
    model: str
    upload_name: str
    run: JobRun
    created: float = field(default_factory=time.time)
    state: str = QUEUED
    exit_code: Optional[int] = None
    message: str = ""
    log_tail: List[str] = field(default_factory=list)
    started: Optional[float] = None
    ended: Optional[float] = None
    results: Dict[str, Path] = field(default_factory=dict)
    result_dir: Optional[Path] = None
    cancel_requested: bool = False
    delete_requested: bool = False
    timed_out: bool = False
    events: List[bytes] = field(default_factory=list)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def describe(self, position: Optional[int] = None) -> Dict[str, Any]:
        """The job's public status (no server paths)."""
        return {
            "id": self.id, "state": self.state, "model": self.model, "exit_code": self.exit_code,
            "message": self.message, "queue_position": position, "created": self.created,
            "started": self.started, "ended": self.ended, "results": sorted(self.results),
            "events": len(self.events), "log_tail": self.log_tail if self.state != Outcome.OK.value else [],
        }


class JobManager:
    """The queue and the scheduler thread of the server's jobs.

    Every :class:`InferenceRun` call happens on the scheduler thread; request handlers only
    add jobs, set ``cancel_requested`` and read state under :attr:`lock`.

    ``max_jobs`` bounds the unfinished jobs **plus the uploads in progress**: a submission takes
    a slot (:meth:`new_job`) before its body is read and gives it back if the upload fails, so
    concurrent slow uploads cannot get past the limit. A running job is cancelled once it has run
    ``job_timeout_s`` seconds (None: no limit). A job is not tied to the connection that
    submitted it (clients fetch it later by id): a client that vanishes leaves its job to finish,
    bounded by ``job_timeout_s``, and its results to expire after ``keep_results_s``.
    """

    def __init__(self, *, models: Dict[str, Path], root: Path, workers: int = 1, device: str = "auto",
                 keep_results_s: float = 3600.0, max_jobs: int = 100, cuda_devices: int = 0,
                 command_prefix: Optional[List[str]] = None, env: Optional[Dict[str, str]] = None,
                 cancel_grace_s: float = CANCEL_GRACE_S, job_timeout_s: Optional[float] = None) -> None:
        if workers < 1:
            raise InputError(f"--workers must be >= 1, got {workers}")
        if not keep_results_s > 0:
            raise InputError(f"--keep-results must be > 0 seconds (0 would delete results before any "
                             f"client could download them), got {keep_results_s:g}")
        if max_jobs < 1:
            raise InputError(f"--max-jobs must be >= 1 (0 would refuse every job), got {max_jobs}")
        if job_timeout_s is not None and not job_timeout_s > 0:
            raise InputError(f"--job-timeout must be > 0 seconds, got {job_timeout_s:g}")
        self.models = models
        self.root = root
        self.workers = workers
        self.device = device
        self.keep_results_s = keep_results_s
        self.max_jobs = max_jobs
        self.cuda_devices = cuda_devices
        self.command_prefix = command_prefix or default_command_prefix()
        self.env = env if env is not None else backend_environment()
        self.cancel_grace_s = cancel_grace_s
        self.job_timeout_s = job_timeout_s
        self.lock = threading.RLock()
        self.jobs: Dict[str, Job] = {}
        self._uploading = 0  # slots taken by submissions whose upload has not ended yet
        self._slots: Dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True, name="iwseg-serve-scheduler")
        self._thread.start()

    def stop(self) -> None:
        """Kill every running job's process tree and remove every job's files."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self.lock:
            for job in self.jobs.values():
                if job.run.backend is not None and not job.run.backend.done:
                    job.run.backend.close()
                if not job.final:
                    self._end(job, Outcome.CANCELLED.value, EXIT_CANCELLED, "cancelled: the server stopped")
                self._remove_files(job)
            self.jobs.clear()

    # -- requests ------------------------------------------------------------------------------

    def new_job(self, owner: str, model: str, filename: str, request: Mapping[str, Any],
                output_format: str = ".nrrd") -> Job:
        """Create a job (its folder, not yet its input) and take its slot; :class:`ApiError` for
        bad requests (400 for an option :class:`PredictOptions` refuses, named by its flag), 429
        when ``max_jobs`` slots are taken. ``request``: the job's options by field name. The slot is the job's from now on:
        :meth:`enqueue` keeps it, :meth:`discard` (a failed upload) gives it back."""
        path = self.models.get(model)
        if path is None:
            raise ApiError(404, f"unknown model {model!r}; GET /v1/models lists the models")
        with self.lock:  # checked and taken under one lock: two submissions cannot take one slot
            if sum(not j.final for j in self.jobs.values()) + self._uploading >= self.max_jobs:
                raise ApiError(429, f"the server already holds {self.max_jobs} unfinished jobs; try again later")
            self._uploading += 1
        try:
            return self._create(owner, model, path, filename, request, output_format)
        except BaseException:
            self._release_upload_slot()
            raise

    def _release_upload_slot(self) -> None:
        with self.lock:
            self._uploading = max(0, self._uploading - 1)

    def _create(self, owner: str, model: str, path: Path, filename: str, request: Mapping[str, Any],
                output_format: str) -> Job:
        try:
            options = PredictOptions.from_request(request, models=(path,), device=self.device)
            stored = upload_name(filename)
            run = JobRun(options, input_name=stored, output_format=output_format, command_prefix=self.command_prefix,
                         env=self.env, workdir_parent=self.root, cancel_grace_s=self.cancel_grace_s,
                         loader=None)
        except InputError as exc:
            raise ApiError(400, str(exc)) from None
        run.input_path.parent.mkdir()  # its own folder: an upload named like an output cannot collide
        job = Job(id=secrets.token_urlsafe(16), owner=owner, model=model, upload_name=stored, run=run)
        run.loader = lambda outputs, job=job: self._keep_results(job, outputs)
        run.progress.connect(lambda event, job=job: self._add_event(job, format_event(event.stage, event.data)))
        return job

    def enqueue(self, job: Job) -> None:
        """Queue a job whose upload is complete (its slot, taken by :meth:`new_job`, stays taken)."""
        with self.lock:
            self._uploading = max(0, self._uploading - 1)
            self.jobs[job.id] = job

    def discard(self, job: Job) -> None:
        """Forget a job that was never queued (its upload failed) and give its slot back."""
        try:
            job.run.discard()
        finally:
            self._release_upload_slot()

    def uploading(self) -> int:
        """Submissions whose upload is still being read (each holds a slot of ``max_jobs``)."""
        with self.lock:
            return self._uploading

    def get(self, owner: str, job_id: str) -> Job:
        """The job, if it exists **and** belongs to ``owner``; else 404 (no hint that it exists)."""
        with self.lock:
            job = self.jobs.get(job_id)
            if job is None or not hmac.compare_digest(job.owner, owner):
                raise ApiError(404, f"no job {job_id!r}")
            return job

    def position(self, job: Job) -> Optional[int]:
        """0-based place of a queued job in the queue (None once it runs)."""
        with self.lock:
            if job.state != QUEUED:
                return None
            queued = [j for j in self.jobs.values() if j.state == QUEUED]
            return queued.index(job)

    def cancel(self, job: Job) -> None:
        with self.lock:
            if not job.final:
                job.cancel_requested = True

    def delete(self, job: Job) -> None:
        """Cancel the job if it has not ended, and remove its results now."""
        with self.lock:
            self.cancel(job)
            if job.final:
                self._remove_files(job)
                self.jobs.pop(job.id, None)
            else:
                job.delete_requested = True  # removed by the scheduler once the run has ended

    def counts(self) -> Dict[str, int]:
        with self.lock:
            states = [j.state for j in self.jobs.values()]
            uploading = self._uploading
        return {"queued": states.count(QUEUED), "running": states.count(RUNNING), "uploading": uploading}

    # -- the scheduler thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # a bug must not stop every later job; it is logged, the loop goes on
                LOG.exception("iwseg serve: the scheduler pass failed")
            self._stop.wait(SCHEDULER_INTERVAL_S)

    def tick(self) -> None:
        """One pass: apply cancels, poll running runs, start queued jobs, expire old results."""
        with self.lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            if job.state == QUEUED and job.cancel_requested:
                with self.lock:
                    job.run.discard()
                    self._end(job, Outcome.CANCELLED.value, EXIT_CANCELLED, "cancelled before it started")
            elif job.state == RUNNING:
                if (self.job_timeout_s is not None and not job.cancel_requested and job.started is not None
                        and time.time() - job.started > self.job_timeout_s):
                    with self.lock:
                        job.cancel_requested = job.timed_out = True
                if job.cancel_requested:
                    job.run.cancel()
                job.run.poll()
        with self.lock:
            free = [slot for slot in range(self.workers) if slot not in self._slots.values()]
            for job in [j for j in self.jobs.values() if j.state == QUEUED][: len(free)]:
                self._start(job, free.pop(0))
            now = time.time()
            for job in list(self.jobs.values()):
                if job.final and (job.delete_requested or now - job.ended > self.keep_results_s):
                    self._remove_files(job)
                    self.jobs.pop(job.id, None)

    def _start(self, job: Job, slot: int) -> None:
        if self.cuda_devices > 0:  # one GPU per worker slot
            job.run.env = dict(job.run.env, CUDA_VISIBLE_DEVICES=str(slot % self.cuda_devices))
        job.run.finished.connect(lambda result, job=job: self._on_finished(job, result))
        job.state, job.started = RUNNING, time.time()
        self._slots[job.id] = slot
        try:  # an uploaded organ mask is already in the run's folder: the writer only names it
            job.run.start(write_organ_mask=(lambda _path: None) if job.run.organ_mask_name else None)
        except Exception as exc:  # the interpreter is missing, the input vanished: the job failed
            self._end(job, Outcome.FAILED.value, None, f"the backend could not start: {exc}")

    def _on_finished(self, job: Job, result: RunResult) -> None:
        with self.lock:
            code = EXIT_CANCELLED if result.outcome is Outcome.CANCELLED else result.exit_code
            job.log_tail = [line for line in result.stderr_tail if line.strip()][-15:]
            if result.workdir is not None:  # a failed run's folder: the job's files, removed with it
                job.result_dir = job.result_dir or result.workdir
            message = result.message
            if job.timed_out and result.outcome is Outcome.CANCELLED:
                message = f"cancelled: the job ran longer than this server's limit of {self.job_timeout_s:g} s (--job-timeout)"
            self._end(job, result.outcome.value, code, message)

    def _end(self, job: Job, state: str, exit_code: Optional[int], message: str) -> None:
        job.state, job.exit_code, job.message = state, exit_code, message
        job.ended = time.time()
        self._slots.pop(job.id, None)
        if state != Outcome.OK.value:
            for path in job.results.values():
                path.unlink(missing_ok=True)
            job.results = {}

    def _keep_results(self, job: Job, outputs: Dict[str, Path]) -> Dict[str, Path]:
        """The run's loader: move its outputs out of the run folder (which is then removed)."""
        folder = Path(tempfile.mkdtemp(prefix=f"results-{job.id[:8]}-", dir=self.root))
        kept = {}
        for name, path in outputs.items():
            target = folder / path.name
            os.replace(path, target)
            kept[name] = target
        if "lesions" in kept:
            relabel_lesion_report(kept["lesions"], job.upload_name)
        with self.lock:
            job.result_dir, job.results = folder, kept
        return kept

    def _add_event(self, job: Job, line: bytes) -> None:
        with self.lock:
            job.events.append(line)

    def _remove_files(self, job: Job) -> None:
        job.run.discard()
        if job.result_dir is not None:
            shutil.rmtree(job.result_dir, ignore_errors=True)
            job.result_dir = None
        job.results = {}


def check_uploaded_organ_mask(run: JobRun, image_name: str, mask_name: str) -> None:
    """Refuse (:class:`InputError`) an uploaded organ mask that ``iwseg predict`` would refuse (not
    on the image's grid, empty, not a label map: :func:`~IWSegmentationLib.core.organ_masks.read_organ_mask`),
    with its message, naming the files as the client named them (never the server's paths)."""
    try:
        read_organ_mask(run.organ_mask_path, run.input_path, read_geometry(run.input_path))
    except InputError as exc:
        message = str(exc).replace(str(run.organ_mask_path), mask_name).replace(str(run.input_path), image_name)
        raise InputError(message) from None


def relabel_lesion_report(path: Path, image: str) -> None:
    """Set the lesion JSON's ``image`` to ``image`` (the run's temporary path means nothing to
    the client), written as ``iwseg predict`` writes it, atomically."""
    text = relabelled_lesion_report(path.read_text(encoding="utf-8"), image)
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
