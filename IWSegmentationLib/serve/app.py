"""``iwseg serve``: an HTTP inference server (FastAPI + uvicorn) for a shared GPU machine.

A laptop without a GPU (the 3D Slicer module, a script, ``iwseg predict --server``) uploads a
volume, follows the job's progress and downloads the outputs. There is **no second inference
path**: every job is one ``python -m IWSegmentationLib predict ... --progress-format jsonl``
child process, run and cancelled through :class:`~IWSegmentationLib.backend.local_run.InferenceRun`
exactly as the Slicer module runs it locally (own process group, whole tree killed on cancel,
exit codes 0 / 2 / 3 / other mapped to :class:`~IWSegmentationLib.backend.job.Outcome`).

* :class:`~IWSegmentationLib.serve.jobs.JobManager` (in :mod:`.jobs`) holds the jobs: a FIFO
  queue, at most ``workers`` running at once, finished results deleted after ``keep_results_s``.
* :func:`create_app` builds the FastAPI application (endpoints under ``/v1``, documented in
  docs/server.md and in the generated ``/docs`` page).

Security by default (see docs/server.md): loopback bind unless told otherwise, a bearer token
required on any other address, an upload size limit (413) and time limit (408), a job slot taken
before the upload is read (429 past ``--max-jobs``), a per-job time limit, a Host/Origin check
when the server has no tokens (no cross-site or DNS-rebinding requests from a browser), client
file names reduced to a checked image suffix (never used as a path), one token's jobs invisible
(404) to another, and models only from the ``--models`` folder, by name, read as safetensors
(never unpickled).
"""

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import os
import shutil
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Dict, List, Optional

from .. import __version__
from ..backend.job import Outcome
from ..core.devices import DEVICES
from ..core.errors import InputError
from .jobs import (  # noqa: F401  (re-exported: the app's names for its jobs)
    FILE_SUFFIXES,
    FINAL_STATES,
    LOG,
    QUEUED,
    RESULT_NAMES,
    RUNNING,
    SAFE_NAME,
    ApiError,
    Job,
    JobManager,
    JobRun,
    check_uploaded_organ_mask,
    format_event,
    list_models,
    relabel_lesion_report,
    single_file_suffix,
    upload_name,
)
from .multipart import MultipartReader, is_multipart
from .workdir import WORKDIR_PREFIX, hold_workdir, remove_stale_job_folders, remove_stale_workdirs

#: Seconds between two looks at a job's new events while streaming them.
STREAM_INTERVAL_S = 0.02
#: A blank line (not a protocol event; readers skip it) is streamed after this many quiet
#: seconds, so that a client's read timeout only fires when the server is really gone.
KEEPALIVE_S = 15.0
#: Characters a token may hold (printable ASCII without spaces, as HTTP headers carry them).
MIN_TOKEN_LENGTH = 16


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
    upload_timeout_s: float = 600.0
    job_timeout_s: Optional[float] = 3600.0

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
        if self.device not in DEVICES:
            raise InputError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if not self.upload_timeout_s > 0:
            raise InputError(f"--upload-timeout must be > 0 seconds, got {self.upload_timeout_s:g}")
        if self.max_jobs < 1:
            raise InputError(f"--max-jobs must be >= 1 (0 would refuse every job), got {self.max_jobs}")
        if not self.keep_results_s > 0:
            raise InputError(f"--keep-results must be > 0 seconds (0 would delete results before any "
                             f"client could download them), got {self.keep_results_s:g}")
        if self.job_timeout_s is not None and not self.job_timeout_s > 0:
            raise InputError(f"--job-timeout must be > 0 seconds, got {self.job_timeout_s:g}")


def host_allowed(header: str, server_host: str) -> bool:
    """Whether a ``Host`` header or an ``Origin`` (``http://name:port``) names this machine: a
    loopback name or address, or the address the server was bound to. A browser page from
    another site sends its own Origin; a DNS-rebinding page sends its own host name as Host."""
    text = header.strip()
    parts = urllib.parse.urlsplit(text if "://" in text else "//" + text)
    try:
        name = parts.hostname or ""
    except ValueError:
        return False
    return bool(name) and (is_loopback(name) or name == server_host.strip("[]").lower())


def create_app(config: ServerConfig, manager: Optional[JobManager] = None):
    """The FastAPI application of ``iwseg serve`` (the manager's thread runs during its lifespan)."""

    from fastapi import Depends, FastAPI, Query, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

    config.check()
    root = Path(config.workdir) if config.workdir else Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
    root.mkdir(parents=True, exist_ok=True)
    models = list_models(config.models_dir)
    manager = manager or JobManager(
        models=models, root=root, workers=config.workers, device=config.device,
        keep_results_s=config.keep_results_s, max_jobs=config.max_jobs, cuda_devices=config.cuda_devices,
        job_timeout_s=config.job_timeout_s)
    digests = [token_digest(t) for t in config.tokens]
    held = hold_workdir(root)  # for the server's life: a folder nobody holds is a dead server's
    stale = remove_stale_job_folders(root) if config.workdir else remove_stale_workdirs(root)
    if stale:
        LOG.info("iwseg serve: removed %d folder(s) a killed server left: %s", len(stale),
                 ", ".join(p.name for p in stale))

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        try:
            manager.start()
            try:
                yield
            finally:
                manager.stop()
                if not config.workdir:
                    shutil.rmtree(root, ignore_errors=True)
        finally:
            os.close(held)

    app = FastAPI(
        title="IWSegmentation inference server", version=__version__, lifespan=lifespan,
        description="Lesion segmentation jobs run by `iwseg predict` on this machine. See docs/server.md.",
    )
    app.state.manager = manager

    @app.middleware("http")
    async def same_machine_only(request: Request, call_next):
        """Without tokens, only requests for this machine from this machine's pages: a web page
        elsewhere could otherwise POST a scan (a ``text/plain`` form needs no CORS preflight)."""
        if not digests:
            host, origin = request.headers.get("host", ""), request.headers.get("origin")
            if not host_allowed(host, config.host) or (origin is not None and not host_allowed(origin, config.host)):
                return JSONResponse({"detail": "refused: without --token-file this server answers only requests "
                                               "for this machine (Host) from this machine (Origin)"},
                                    status_code=403)
        return await call_next(request)

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

    @app.get("/v1/limits", summary="This server's limits; needs a token like every job call (a client checks "
                                   "its token here before it uploads)")
    def limits(_who: str = Depends(owner)) -> Dict[str, Any]:
        return {"max_upload_bytes": config.max_upload_bytes, "max_jobs": config.max_jobs,
                "upload_timeout_s": config.upload_timeout_s, "job_timeout_s": config.job_timeout_s,
                "keep_results_s": config.keep_results_s}

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

    @app.post("/v1/jobs", status_code=202, summary="Submit a job: the request body is the volume file, or a "
                                                   "multipart/form-data body with the parts image and organ_mask")
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
        operating_point: Optional[str] = Query(None, description="the model card's operating point, e.g. 1fp, "
                                                                 "1/8fp (instead of threshold)"),
        force: bool = Query(False, description="run on an input that looks like a label map"),
        logits: bool = Query(False, description="also return the blended logit map (result 'logits', float32)"),
        keep_spacing: bool = Query(False, description="segment on the volume's own grid, not resampled to the "
                                                      "model's voxel spacing"),
        allow_modality_mismatch: bool = Query(False, description="run a CT model on what looks like MR, or the "
                                                                 "reverse, instead of failing"),
        allow_unmasked: bool = Query(False, description="segment without an organ mask although the model needs one "
                                                        "(not as trained; the job warns)"),
        no_doubt: bool = Query(False, description="with tta, skip the per-lesion doubt (members' spread)"),
        who: str = Depends(owner),
    ):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_upload_bytes:
            raise ApiError(413, _too_large(config.max_upload_bytes))
        options = dict(threshold=threshold, overlap=overlap, probabilities=probabilities, lesions=lesions,
                       probabilities_uint8=probabilities_uint8, no_skip=no_skip, batch_size=batch_size,
                       precision=precision, engine=engine, size_preset=size_preset, size_thresholds=size_thresholds,
                       connectivity=connectivity, tta=tta, min_lesion_size=min_lesion_size, force=force, logits=logits,
                       operating_point=operating_point)
        options.update(keep_spacing=keep_spacing, allow_modality_mismatch=allow_modality_mismatch)
        options.update(allow_unmasked=allow_unmasked, no_doubt=no_doubt)
        # a query key that is no parameter here is refused by PredictOptions.from_request, not ignored
        options.update({key: request.query_params[key] for key in request.query_params
                        if key not in options and key not in ("model", "filename", "output_format")})
        job = manager.new_job(who, model, filename, options, output_format)  # takes a slot before the body is read
        try:
            await _receive_job_files(request, job.run, filename, config.max_upload_bytes, config.upload_timeout_s)
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

    @app.get("/v1/jobs/{job_id}/results/{name}", summary="Download an output: mask, probabilities, logits or lesions")
    def result(job_id: str, name: str, who: str = Depends(owner)):
        job = manager.get(who, job_id)
        if name not in RESULT_NAMES:
            raise ApiError(404, f"no result {name!r}; results are {', '.join(RESULT_NAMES)}")
        with manager.lock:
            path = job.results.get(name)
            if job.state != Outcome.OK.value or path is None or not path.is_file():
                raise ApiError(404, f"job {job_id} has no {name} (state {job.state})")
            media = "application/json" if name == "lesions" else "application/octet-stream"
            return FileResponse(path, media_type=media, filename=f"{name}{''.join(path.suffixes)}")

    return app


def _too_large(limit: int) -> str:
    return f"the upload is larger than this server's limit of {limit / 2**20:g} MB (iwseg serve --max-upload-mb)"


#: The parts of a multipart job upload: the volume file and, optionally, its organ mask.
JOB_PARTS = ("image", "organ_mask")
#: Seconds an upload may send nothing before it is dropped (within ``--upload-timeout``).
UPLOAD_IDLE_S = 60.0


async def _receive_job_files(request, run: JobRun, filename: str, limit: int, timeout_s: float) -> None:
    """Read a job's upload into its run folder: the body is the volume file, or (``multipart/form-data``)
    the parts ``image`` and ``organ_mask``, each a file. The limits of :func:`_receive` hold for the
    whole body; a part missing or named otherwise, or an organ mask ``iwseg predict`` would refuse
    (another grid, empty: :func:`~IWSegmentationLib.serve.jobs.check_uploaded_organ_mask`, run off
    the event loop), is a 400 with that message."""
    content_type = request.headers.get("content-type")
    if not is_multipart(content_type):
        await _receive(request, run.input_path, limit, timeout_s)
        return
    opened: Dict[str, Path] = {}
    mask_name = "organ_mask"  # what the messages call it: the client's file name, without folders

    def open_part(name: str, part_filename: Optional[str]):
        nonlocal mask_name
        if name in opened or name not in JOB_PARTS:
            raise InputError(f"multipart part {name!r}: the parts are {', '.join(JOB_PARTS)}, each once")
        if name == "organ_mask":
            mask_name = PurePosixPath((part_filename or "").replace("\\", "/")).name or mask_name
        path = run.input_path if name == "image" else run.set_organ_mask_name(part_filename or "")
        opened[name] = path
        return open(path, "wb")

    try:
        reader = MultipartReader(content_type, open_part)
    except InputError as exc:
        raise ApiError(400, str(exc)) from None
    try:
        await _receive(request, reader, limit, timeout_s)
    except InputError as exc:
        raise ApiError(400, str(exc)) from None
    finally:
        reader.close_file()
    for name, what in (("image", "the volume file"), ("organ_mask", "the organ mask file")):
        path = opened.get(name)
        if name == "image" and path is None:
            raise ApiError(400, "the multipart body has no part 'image' (the volume file)")
        if path is not None and path.stat().st_size == 0:
            raise ApiError(400, f"the multipart part {name!r} ({what}) is empty")
    if "organ_mask" in opened:
        try:
            await asyncio.to_thread(check_uploaded_organ_mask, run, filename, mask_name)
        except InputError as exc:
            raise ApiError(400, str(exc)) from None


async def _receive(request, target: "Path | MultipartReader", limit: int, timeout_s: float = 600.0) -> None:
    """Stream the request body into ``target`` (a file, or a :class:`MultipartReader` fed the
    chunks); 413 (and no file) once it exceeds ``limit`` bytes, 408 once it has taken
    ``timeout_s`` seconds in all or :data:`UPLOAD_IDLE_S` without a byte (a client trickling
    bytes cannot hold a slot and a connection for ever)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    size = 0
    reader = target if isinstance(target, MultipartReader) else None
    try:
        with contextlib.nullcontext(reader) if reader is not None else open(target, "wb") as f:
            chunks = request.stream().__aiter__()
            while True:
                left = deadline - loop.time()
                try:
                    if left <= 0:
                        raise asyncio.TimeoutError
                    chunk = await asyncio.wait_for(chunks.__anext__(), min(left, UPLOAD_IDLE_S))
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    raise ApiError(408, f"the upload was too slow: not complete after {timeout_s:g} s, or "
                                        f"{UPLOAD_IDLE_S:g} s without data (iwseg serve --upload-timeout)") from None
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, _too_large(limit))
                f.feed(chunk) if reader is not None else f.write(chunk)
            if reader is not None:
                reader.close()
    except BaseException:
        if reader is None:
            target.unlink(missing_ok=True)
        raise
    if size == 0:
        if reader is None:
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
