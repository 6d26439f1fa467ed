"""``iwseg serve``: an HTTP inference server (FastAPI + uvicorn) for a shared GPU machine.

A laptop without a GPU (the 3D Slicer module, a script, ``iwseg predict --server``) uploads a
volume, follows the job's progress and downloads the outputs. There is **no second inference
path**: every job is one ``python -m IWSegmentationLib predict ... --progress-format jsonl``
child process, run and cancelled through :class:`~IWSegmentationLib.backend.process.InferenceRun`
exactly as the Slicer module runs it locally (own process group, whole tree killed on cancel,
exit codes 0 / 2 / 3 / other mapped to :class:`~IWSegmentationLib.backend.process.Outcome`).

* :class:`JobManager` holds the jobs: a FIFO queue, at most ``workers`` running at once, all
  :class:`InferenceRun` calls (start, poll, cancel) made from its one scheduler thread, finished
  results deleted ``keep_results_s`` seconds after the job ended.
* :func:`create_app` builds the FastAPI application (endpoints under ``/v1``, documented in
  docs/server.md and in the generated ``/docs`` page).

Security by default (see docs/server.md): loopback bind unless told otherwise, a bearer token
required on any other address, an upload size limit (413), client file names reduced to a
checked image suffix (never used as a path), one token's jobs invisible (404) to another, and
models only from the ``--models`` folder, by name, read as safetensors (never unpickled).
"""

import asyncio
import hashlib
import hmac
import ipaddress
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
from typing import Annotated, Any, Dict, List, Optional

from .. import __version__
from ..backend import process
from ..core.errors import EXIT_CANCELLED, InputError

#: Single-file image formats a job accepts as upload and writes as output (``.nhdr``/``.mhd``
#: keep their voxels in a second file, which one upload cannot carry).
FILE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
#: The outputs a job can return, by the name used in the URL.
RESULT_NAMES = ("mask", "probabilities", "lesions")
#: Job states; the last four are final and equal :class:`~IWSegmentationLib.backend.process.Outcome` values.
QUEUED, RUNNING = "queued", "running"
FINAL_STATES = tuple(o.value for o in process.Outcome)
#: Seconds between two passes of the scheduler thread (poll the running jobs, start queued ones).
SCHEDULER_INTERVAL_S = 0.02
#: Seconds between two looks at a job's new events while streaming them.
STREAM_INTERVAL_S = 0.02
#: A blank line (not a protocol event; readers skip it) is streamed after this many quiet
#: seconds, so that a client's read timeout only fires when the server is really gone.
KEEPALIVE_S = 15.0
#: Upload names kept as they are (others are stored as ``input`` + suffix).
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
LOG = logging.getLogger("uvicorn.error")
#: Characters a token may hold (printable ASCII without spaces, as HTTP headers carry them).
MIN_TOKEN_LENGTH = 16


class ApiError(Exception):
    """An error answered as ``{"detail": message}`` with an HTTP status code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); host names are not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def token_digest(token: str) -> str:
    """SHA-256 of a token: what the server keeps and what owns a job (never the token itself)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def read_token_file(path: "str | os.PathLike") -> List[str]:
    """The tokens in ``path``: one per line, blank lines and ``#`` comments skipped.

    Each token must be at least :data:`MIN_TOKEN_LENGTH` printable ASCII characters without
    spaces; each token is one identity (its jobs are invisible to the others).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--token-file {path}: cannot read it ({exc})") from None
    tokens = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) < MIN_TOKEN_LENGTH or not all(33 <= ord(c) < 127 for c in line):
            raise InputError(f"--token-file {path}, line {number}: a token must be at least {MIN_TOKEN_LENGTH} "
                             "printable ASCII characters without spaces (e.g. python -c "
                             "'import secrets; print(secrets.token_urlsafe(32))')")
        tokens.append(line)
    if not tokens:
        raise InputError(f"--token-file {path} holds no token")
    return tokens


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


# --------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------


@dataclass
class JobOptions:
    """What a client may choose for a job; each maps to one ``iwseg predict`` option.

    The device and the model file are the server's choice (``--device``, ``--models``).
    """

    threshold: Optional[float] = None
    overlap: Optional[float] = None
    probabilities: bool = True
    lesions: bool = True
    output_format: str = ".nrrd"
    probabilities_uint8: bool = False
    no_skip: bool = False
    batch_size: Optional[int] = None
    precision: Optional[str] = None
    engine: Optional[str] = None
    size_preset: Optional[str] = None
    size_thresholds: Optional[List[float]] = None
    connectivity: Optional[int] = None
    tta: bool = False
    min_lesion_size: Optional[str] = None
    force: bool = False

    def check(self) -> None:
        """Refuse a value ``iwseg predict`` would refuse, before anything is uploaded."""
        from ..cli.commands.predict import ENGINES, PRECISIONS
        from ..core.lesions import CONNECTIVITIES, SIZE_PRESETS, parse_min_lesion_size

        single_file_suffix(self.output_format)
        for name, value, allowed in (("precision", self.precision, PRECISIONS), ("engine", self.engine, ENGINES),
                                     ("size_preset", self.size_preset, tuple(sorted(SIZE_PRESETS))),
                                     ("connectivity", self.connectivity, CONNECTIVITIES)):
            if value is not None and value not in allowed:
                raise InputError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.size_thresholds is not None and len(self.size_thresholds) != 2:
            raise InputError(f"size_thresholds needs two values (S M), got {self.size_thresholds}")
        if self.min_lesion_size is not None and self.min_lesion_size.strip().lower() != "none":
            parse_min_lesion_size(self.min_lesion_size)

    def extra_arguments(self) -> List[str]:
        """The ``iwseg predict`` options beyond :meth:`PredictParameters.arguments`."""
        self.check()
        args: List[str] = []
        if self.probabilities_uint8:
            args.append("--probabilities-uint8")
        for flag, wanted in (("--no-skip", self.no_skip), ("--tta", self.tta), ("--force", self.force)):
            if wanted:
                args.append(flag)
        for flag, value in (("--batch-size", self.batch_size), ("--precision", self.precision),
                            ("--engine", self.engine), ("--size-preset", self.size_preset),
                            ("--connectivity", self.connectivity), ("--min-lesion-size", self.min_lesion_size)):
            if value is not None:
                args += [flag, str(value)]
        if self.size_thresholds is not None:
            args += ["--size-thresholds", *(repr(float(v)) for v in self.size_thresholds)]
        return args


class JobRun(process.InferenceRun):
    """An :class:`InferenceRun` whose input keeps the upload's format and whose image outputs use
    the format the client asked for (so they are the files a local ``iwseg predict`` writes)."""

    def __init__(self, parameters: process.PredictParameters, *, input_name: str, options: JobOptions,
                 **kwargs: Any) -> None:
        self.input_name = input_name
        self.options = options
        self.output_format = single_file_suffix(options.output_format)
        self._extra = options.extra_arguments()
        super().__init__(parameters, **kwargs)

    @property
    def input_path(self) -> Path:
        return self._folder() / "input" / self.input_name

    @property
    def output_paths(self) -> Dict[str, Path]:
        paths = {"mask": self._folder() / f"mask{self.output_format}"}
        if self.parameters.probabilities:
            paths["probabilities"] = self._folder() / f"probabilities{self.output_format}"
        if self.parameters.lesions:
            paths["lesions"] = self._folder() / "lesions.json"
        return paths

    @property
    def command(self) -> List[str]:
        return super().command + self._extra


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
            "events": len(self.events), "log_tail": self.log_tail if self.state != process.Outcome.OK.value else [],
        }


class JobManager:
    """The queue and the scheduler thread of the server's jobs.

    Every :class:`InferenceRun` call happens on the scheduler thread; request handlers only
    add jobs, set ``cancel_requested`` and read state under :attr:`lock`.
    """

    def __init__(self, *, models: Dict[str, Path], root: Path, workers: int = 1, device: str = "auto",
                 keep_results_s: float = 3600.0, max_jobs: int = 100, cuda_devices: int = 0,
                 command_prefix: Optional[List[str]] = None, env: Optional[Dict[str, str]] = None,
                 cancel_grace_s: float = process.CANCEL_GRACE_S) -> None:
        if workers < 1:
            raise InputError(f"--workers must be >= 1, got {workers}")
        if keep_results_s < 0:
            raise InputError(f"--keep-results must be >= 0 seconds, got {keep_results_s}")
        self.models = models
        self.root = root
        self.workers = workers
        self.device = device
        self.keep_results_s = keep_results_s
        self.max_jobs = max_jobs
        self.cuda_devices = cuda_devices
        self.command_prefix = command_prefix or process.default_command_prefix()
        self.env = env if env is not None else process.backend_environment()
        self.cancel_grace_s = cancel_grace_s
        self.lock = threading.RLock()
        self.jobs: Dict[str, Job] = {}
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
                    self._end(job, process.Outcome.CANCELLED.value, EXIT_CANCELLED, "cancelled: the server stopped")
                self._remove_files(job)
            self.jobs.clear()

    # -- requests ------------------------------------------------------------------------------

    def new_job(self, owner: str, model: str, filename: str, options: JobOptions) -> Job:
        """Create a job (its folder, not yet its input); :class:`ApiError` for bad requests."""
        path = self.models.get(model)
        if path is None:
            raise ApiError(404, f"unknown model {model!r}; GET /v1/models lists the models")
        with self.lock:
            if sum(not j.final for j in self.jobs.values()) >= self.max_jobs:
                raise ApiError(429, f"the server already holds {self.max_jobs} unfinished jobs; try again later")
        try:
            stored = upload_name(filename)
            parameters = process.PredictParameters(
                path, device=self.device, overlap=options.overlap, threshold=options.threshold,
                probabilities=options.probabilities, lesions=options.lesions)
            run = JobRun(parameters, input_name=stored, options=options, command_prefix=self.command_prefix,
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
        with self.lock:
            self.jobs[job.id] = job

    def discard(self, job: Job) -> None:
        """Forget a job that was never queued (its upload failed)."""
        job.run.discard()

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
        return {"queued": states.count(QUEUED), "running": states.count(RUNNING)}

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
                    self._end(job, process.Outcome.CANCELLED.value, EXIT_CANCELLED, "cancelled before it started")
            elif job.state == RUNNING:
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
        try:
            job.run.start()
        except Exception as exc:  # the interpreter is missing, the input vanished: the job failed
            self._end(job, process.Outcome.FAILED.value, None, f"the backend could not start: {exc}")

    def _on_finished(self, job: Job, result: process.RunResult) -> None:
        with self.lock:
            code = EXIT_CANCELLED if result.outcome is process.Outcome.CANCELLED else result.exit_code
            job.log_tail = [line for line in result.stderr_tail if line.strip()][-15:]
            if result.workdir is not None:  # a failed run's folder: the job's files, removed with it
                job.result_dir = job.result_dir or result.workdir
            self._end(job, result.outcome.value, code, result.message)

    def _end(self, job: Job, state: str, exit_code: Optional[int], message: str) -> None:
        job.state, job.exit_code, job.message = state, exit_code, message
        job.ended = time.time()
        self._slots.pop(job.id, None)
        if state != process.Outcome.OK.value:
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


def relabel_lesion_report(path: Path, image: str) -> None:
    """Set the lesion JSON's ``image`` to ``image`` (the run's temporary path means nothing to
    the client), written as ``iwseg predict`` writes it, atomically."""
    from ..cli.commands.predict_outputs import format_lesion_report
    from ..core.outputs import atomic_output

    report = json.loads(path.read_text(encoding="utf-8"))
    report["image"] = image
    with atomic_output(path) as tmp:
        tmp.write_text(format_lesion_report(report), encoding="utf-8")


# --------------------------------------------------------------------------------------------
# The HTTP application
# --------------------------------------------------------------------------------------------


@dataclass
class ServerConfig:
    """Everything ``iwseg serve`` was told; :meth:`check` refuses an unsafe or impossible setup."""

    models_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    tokens: List[str] = field(default_factory=list)
    max_upload_bytes: int = 2048 * 2**20
    workers: int = 1
    device: str = "auto"
    keep_results_s: float = 3600.0
    max_jobs: int = 100
    workdir: Optional[Path] = None
    cuda_devices: int = 0

    def check(self) -> None:
        if not Path(self.models_dir).is_dir():
            raise InputError(f"--models {self.models_dir}: not a folder")
        if not is_loopback(self.host) and not self.tokens:
            raise InputError(f"--host {self.host} is not a loopback address: refusing to serve without "
                             "--token-file (anyone on the network could upload scans and run jobs)")
        if self.max_upload_bytes < 1:
            raise InputError(f"--max-upload-mb must be > 0, got {self.max_upload_bytes / 2**20:g}")
        if not 0 <= self.port < 65536:
            raise InputError(f"--port must be in 0..65535, got {self.port}")
        if self.device not in process.DEVICES:
            raise InputError(f"--device must be one of {', '.join(process.DEVICES)}, got {self.device!r}")


def create_app(config: ServerConfig, manager: Optional[JobManager] = None):
    """The FastAPI application of ``iwseg serve`` (the manager's thread runs during its lifespan)."""
    import contextlib

    from fastapi import Depends, FastAPI, Query, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

    config.check()
    root = Path(config.workdir) if config.workdir else Path(tempfile.mkdtemp(prefix="iwseg-serve-"))
    root.mkdir(parents=True, exist_ok=True)
    models = list_models(config.models_dir)
    manager = manager or JobManager(
        models=models, root=root, workers=config.workers, device=config.device,
        keep_results_s=config.keep_results_s, max_jobs=config.max_jobs, cuda_devices=config.cuda_devices)
    digests = [token_digest(t) for t in config.tokens]

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        manager.start()
        try:
            yield
        finally:
            manager.stop()
            if not config.workdir:
                shutil.rmtree(root, ignore_errors=True)

    app = FastAPI(
        title="IWSegmentation inference server", version=__version__, lifespan=lifespan,
        description="Lesion segmentation jobs run by `iwseg predict` on this machine. See docs/server.md.",
    )
    app.state.manager = manager

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=headers)

    def owner(request: Request) -> str:
        """The caller's identity: its token's digest (``anonymous`` when the server has no tokens)."""
        if not digests:
            return "anonymous"
        scheme, _, credential = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and credential.strip():
            digest = token_digest(credential.strip())
            for known in digests:
                if hmac.compare_digest(known, digest):
                    return known
        raise ApiError(401, "a valid bearer token is required (Authorization: Bearer <token>)")

    @app.get("/v1/health", summary="Is the server up (no token needed)")
    def health() -> Dict[str, Any]:
        return {"status": "ok", "version": __version__, "workers": config.workers,
                "max_upload_bytes": config.max_upload_bytes, "auth": bool(digests), **manager.counts()}

    @app.get("/v1/models", summary="The models in --models, with their model cards")
    def get_models(_who: str = Depends(owner)) -> List[Dict[str, Any]]:
        from ..core.errors import CheckpointError
        from ..nn.checkpoint import read_metadata

        listed = []
        for name, path in models.items():
            try:
                listed.append({"name": name, "card": read_metadata(path)})
            except CheckpointError as exc:
                listed.append({"name": name, "card": None, "error": str(exc).replace(str(path), name)})
        return listed

    @app.post("/v1/jobs", status_code=202, summary="Submit a job: the request body is the volume file")
    async def submit(
        request: Request,
        model: str = Query(..., description="a name from GET /v1/models"),
        filename: str = Query(..., description="the volume's file name; only its suffix is used "
                                               f"({', '.join(FILE_SUFFIXES)})"),
        threshold: Optional[float] = None, overlap: Optional[float] = None,
        probabilities: bool = True, lesions: bool = True,
        output_format: str = Query(".nrrd", description=f"suffix of the image outputs: {', '.join(FILE_SUFFIXES)}"),
        probabilities_uint8: bool = False, no_skip: bool = False, batch_size: Optional[int] = None,
        precision: Optional[str] = None, engine: Optional[str] = None, size_preset: Optional[str] = None,
        size_thresholds: Annotated[Optional[List[float]], Query()] = None, connectivity: Optional[int] = None,
        tta: bool = False, min_lesion_size: Optional[str] = None,
        force: bool = Query(False, description="run on an input that looks like a label map"),
        who: str = Depends(owner),
    ):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_upload_bytes:
            raise ApiError(413, _too_large(config.max_upload_bytes))
        options = JobOptions(threshold, overlap, probabilities, lesions, output_format, probabilities_uint8,
                             no_skip, batch_size, precision, engine, size_preset, size_thresholds, connectivity,
                             tta, min_lesion_size, force)
        job = manager.new_job(who, model, filename, options)
        try:
            await _receive(request, job.run.input_path, config.max_upload_bytes)
        except BaseException:
            manager.discard(job)
            raise
        manager.enqueue(job)
        return job.describe(manager.position(job))

    @app.get("/v1/jobs/{job_id}", summary="A job's state, exit code and message")
    def status(job_id: str, who: str = Depends(owner)) -> Dict[str, Any]:
        job = manager.get(who, job_id)
        return job.describe(manager.position(job))

    @app.get("/v1/jobs/{job_id}/events", summary="Stream the job's progress as JSON lines (iwseg predict --progress-format jsonl)")
    def events(job_id: str, who: str = Depends(owner)):
        job = manager.get(who, job_id)
        return StreamingResponse(_event_stream(manager, job), media_type="application/x-ndjson")

    @app.post("/v1/jobs/{job_id}/cancel", summary="Cancel a job (its process tree is killed)")
    def cancel(job_id: str, who: str = Depends(owner)) -> Dict[str, Any]:
        job = manager.get(who, job_id)
        manager.cancel(job)
        return job.describe(manager.position(job))

    @app.delete("/v1/jobs/{job_id}", summary="Cancel a job if needed and delete its results now")
    def delete(job_id: str, who: str = Depends(owner)) -> Dict[str, Any]:
        job = manager.get(who, job_id)
        manager.delete(job)
        return {"id": job.id, "deleted": True}

    @app.get("/v1/jobs/{job_id}/results/{name}", summary="Download an output: mask, probabilities or lesions")
    def result(job_id: str, name: str, who: str = Depends(owner)):
        job = manager.get(who, job_id)
        if name not in RESULT_NAMES:
            raise ApiError(404, f"no result {name!r}; results are {', '.join(RESULT_NAMES)}")
        with manager.lock:
            path = job.results.get(name)
            if job.state != process.Outcome.OK.value or path is None or not path.is_file():
                raise ApiError(404, f"job {job_id} has no {name} (state {job.state})")
            media = "application/json" if name == "lesions" else "application/octet-stream"
            return FileResponse(path, media_type=media, filename=f"{name}{''.join(path.suffixes)}")

    return app


def _too_large(limit: int) -> str:
    return f"the upload is larger than this server's limit of {limit / 2**20:g} MB (iwseg serve --max-upload-mb)"


async def _receive(request, target: Path, limit: int) -> None:
    """Stream the request body into ``target``; 413 (and no file) once it exceeds ``limit`` bytes."""
    size = 0
    try:
        with open(target, "wb") as f:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, _too_large(limit))
                f.write(chunk)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    if size == 0:
        target.unlink(missing_ok=True)
        raise ApiError(400, "the request body (the volume file) is empty")


async def _event_stream(manager: JobManager, job: Job):
    """Yield the job's protocol lines from the first, following it until it has ended."""
    sent, quiet_since = 0, time.monotonic()
    while True:
        with manager.lock:
            lines, final = job.events[sent:], job.final
        for line in lines:
            yield line
        sent += len(lines)
        if lines:
            quiet_since = time.monotonic()
        elif final:
            return
        elif time.monotonic() - quiet_since > KEEPALIVE_S:
            yield b"\n"
            quiet_since = time.monotonic()
        await asyncio.sleep(STREAM_INTERVAL_S)
