"""The Qt-free client of ``iwseg serve``: standard library only (``urllib``), so 3D Slicer needs
no extra package.

* :class:`ServerClient` speaks the HTTP API of :mod:`IWSegmentationLib.serve.app` (docs/server.md).
  Every error names the server: :class:`ServerInputError` (exit code 2) for what the user can
  fix (a bad token, an unknown model, an upload over the limit), :class:`ServerError` for a
  server that cannot be reached or went away.
* :class:`RemoteInferenceRun` has the interface of :class:`~IWSegmentationLib.backend.local_run.InferenceRun`
  (``progress`` / ``log`` / ``finished`` signals emitted from :meth:`~RemoteInferenceRun.poll`,
  ``start`` / ``cancel`` / ``wait`` / ``run_blocking``, a :class:`~IWSegmentationLib.backend.job.RunResult`
  with the same outcomes and folder policy), so a front end runs a job on a server exactly as it
  runs one locally. The HTTP calls run on a background thread; signals only on the polling thread.
* :func:`predict_on_server` runs ``iwseg predict --server URL``: the same outputs as a local run,
  written to temporary names and renamed together once all are downloaded. It is given explicit
  paths and options (the command line's edge checks the paths first); this module reads no
  command-line flags.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import secrets
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from ..backend.job import FolderJob, Loader, Outcome, RunResult
from ..core.errors import Cancelled, InputError, IWSegError
from ..core.outputs import atomic_output
from ..core.progress import ProgressEvent, ProgressReporter, parse_progress_line
from ..predict.lesion_json import relabelled_lesion_report
from ..predict.options import PredictOptions
from .multipart import encode_closing, encode_part_header

#: Seconds a request may wait for the server (the event stream sends a keep-alive line every 15 s).
DEFAULT_TIMEOUT_S = 60.0
DOWNLOAD_CHUNK = 1 << 20


class ServerError(IWSegError):
    """The server could not be reached, went away mid-job, or failed (exit code 1)."""


class ServerInputError(InputError):
    """The server refused the request for a reason the user can fix (exit code 2)."""


class ServerClient:
    """Calls of the ``iwseg serve`` HTTP API (``/v1``) with an optional bearer token."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InputError(f"server URL must look like http://host:port, got {url!r}")
        self.url = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self.token = token
        self.timeout = timeout

    @classmethod
    def from_token_file(cls, url: str, token_file: str | os.PathLike | None, **kwargs: Any) -> ServerClient:
        """A client whose token is the first one in ``token_file`` (None: no token)."""
        from .app import read_token_file

        return cls(url, read_token_file(token_file)[0] if token_file is not None else None, **kwargs)

    # -- plumbing ------------------------------------------------------------------------------

    def _open(self, method: str, path: str, *, query: Mapping[str, Any] | None = None, body=None,
              length: int | None = None, timeout: float | None = None,
              content_type: str = "application/octet-stream"):
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode(
                [(k, _query_value(v)) for k, v in query.items() if v is not None and not isinstance(v, (list, tuple))]
                + [(k, _query_value(x)) for k, v in query.items() if isinstance(v, (list, tuple)) for x in v])
        request = urllib.request.Request(url, data=body, method=method)
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        if length is not None:
            request.add_header("Content-Length", str(length))
            request.add_header("Content-Type", content_type)
        try:
            return urllib.request.urlopen(request, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as exc:
            raise self._http_error(exc, method, path) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerError(f"server {self.url} cannot be reached ({method} {path}): {reason}") from None

    def _http_error(self, exc: urllib.error.HTTPError, method: str, path: str) -> IWSegError:
        try:
            detail = json.loads(exc.read() or b"{}").get("detail", "")
        except (ValueError, OSError, AttributeError):
            detail = ""
        if not isinstance(detail, str):  # FastAPI's validation errors are a list of dicts
            detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in detail)
        text = f"server {self.url} answered {exc.code} to {method} {path}: {detail or exc.reason}"
        if exc.code == 401:
            text = f"server {self.url} refused the token (401): check --token-file"
        return ServerInputError(text) if 400 <= exc.code < 500 else ServerError(text)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        with self._open(method, path, **kwargs) as response:
            try:
                return json.loads(response.read())
            except (ValueError, OSError, http.client.HTTPException) as exc:
                raise ServerError(f"server {self.url}: bad answer to {method} {path}: {exc}") from None

    # -- the API -------------------------------------------------------------------------------

    def health(self) -> dict:
        return self._json("GET", "/v1/health")

    def limits(self) -> dict:
        """The server's limits (``max_upload_bytes``, ...), asked with the token: a wrong token is
        refused here (:class:`ServerInputError`, "refused the token") before anything is uploaded.
        A server older than this call (404) is asked for its health instead (no token check)."""
        try:
            return self._json("GET", "/v1/limits")
        except ServerInputError as exc:
            if " answered 404 " not in str(exc):
                raise
            return self.health()

    def models(self) -> list[dict]:
        """``[{"name", "card"}]`` for each model the server offers."""
        return self._json("GET", "/v1/models")

    def model_card(self, name: str) -> dict:
        """The card of model ``name``; :class:`ServerInputError` for an unusable model, or for an
        unknown one naming the models the server has."""
        models = self.models()
        for entry in models:
            if entry["name"] == name:
                if entry.get("card") is None:
                    raise ServerInputError(f"server {self.url}: model {name!r} is unusable: "
                                           f"{entry.get('error', 'no model card')}")
                return entry["card"]
        raise ServerInputError(f"server {self.url} has no model {name!r}; it has: "
                               f"{', '.join(entry['name'] for entry in models) or '(none)'}")

    def submit(self, image: str | os.PathLike, model: str, options: Mapping[str, Any] | None = None,
               organ_mask: str | os.PathLike | None = None) -> dict:
        """Upload ``image`` (streamed from disk) as a new job; returns its status (``id``, ``state``).

        With ``organ_mask`` the body is ``multipart/form-data`` with the parts ``image`` and
        ``organ_mask`` (docs/server.md); the server checks the mask as ``iwseg predict`` does."""
        image = Path(image)
        query = {"model": model, "filename": image.name, **(options or {})}
        with contextlib.ExitStack() as stack:
            files = [("image", image, stack.enter_context(open(image, "rb")))]
            if organ_mask is not None:
                files.append(("organ_mask", Path(organ_mask), stack.enter_context(open(organ_mask, "rb"))))
            sizes = [os.fstat(f.fileno()).st_size for _, _, f in files]
            # The server answers 401, 413 or 429 from the headers and closes; a client still sending
            # a large body would only see a broken pipe. So the token and the limit are checked first.
            limit = self.limits().get("max_upload_bytes")
            what = " + ".join(path.name for _, path, _ in files)
            if isinstance(limit, int) and sum(sizes) > limit:
                raise ServerInputError(f"server {self.url}: {what} ({sum(sizes) / 2**20:.1f} MB) is larger than "
                                       f"the server's upload limit of {limit / 2**20:g} MB (413)")
            if organ_mask is None:
                return self._json("POST", "/v1/jobs", query=query, body=files[0][2], length=sizes[0],
                                  timeout=max(self.timeout, 600.0))
            boundary = "iwseg-" + secrets.token_hex(16)
            heads = [encode_part_header(boundary, name, path.name, first=i == 0)
                     for i, (name, path, _) in enumerate(files)]
            tail = encode_closing(boundary)
            length = sum(map(len, heads)) + sum(sizes) + len(tail)
            body = _multipart_chunks(heads, [f for _, _, f in files], tail)
            return self._json("POST", "/v1/jobs", query=query, body=body, length=length,
                              timeout=max(self.timeout, 600.0), content_type=f"multipart/form-data; boundary={boundary}")

    def status(self, job_id: str) -> dict:
        return self._json("GET", f"/v1/jobs/{_quote(job_id)}")

    def cancel(self, job_id: str) -> dict:
        return self._json("POST", f"/v1/jobs/{_quote(job_id)}/cancel")

    def delete(self, job_id: str) -> dict:
        return self._json("DELETE", f"/v1/jobs/{_quote(job_id)}")

    def events(self, job_id: str) -> Iterator[ProgressEvent]:
        """The job's protocol events from the first, until the job has ended on the server."""
        path = f"/v1/jobs/{_quote(job_id)}/events"
        with self._open("GET", path) as response:
            try:
                for line in response:
                    event = parse_progress_line(line.decode("utf-8", "replace"))
                    if event is not None:
                        yield event
            except (OSError, http.client.HTTPException) as exc:
                raise ServerError(f"server {self.url}: the connection was lost while job {job_id} ran "
                                  f"({type(exc).__name__}: {exc or 'closed'}); the server may have stopped") from None

    def download(self, job_id: str, name: str, target: str | os.PathLike) -> Path:
        """Write result ``name`` (mask, probabilities, logits, lesions) to ``target`` (the caller makes it atomic)."""
        path = f"/v1/jobs/{_quote(job_id)}/results/{_quote(name)}"
        with self._open("GET", path) as response, open(target, "wb") as f:
            try:
                shutil.copyfileobj(response, f, DOWNLOAD_CHUNK)
            except (OSError, http.client.HTTPException) as exc:
                raise ServerError(f"server {self.url}: the download of {name} of job {job_id} broke off: {exc}") from None
        return Path(target)

    def follow(self, job_id: str, on_event: Callable[[ProgressEvent], Any], timeout: float = 30.0) -> dict:
        """Pass each of the job's events to ``on_event`` until it has ended; return its final status.

        A stream cut short (the server stopped or was killed) can look like a normal end to
        ``http.client``; the status request after it then fails, and the error says the
        connection was lost during the job.
        """
        for event in self.events(job_id):
            on_event(event)
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = self.status(job_id)
            except ServerError as exc:
                raise ServerError(f"server {self.url}: the connection was lost while job {job_id} ran; the server "
                                  f"may have stopped ({exc})") from None
            if info["state"] in FINAL_STATES or time.monotonic() > deadline:
                return info
            time.sleep(0.1)


FINAL_STATES = tuple(o.value for o in Outcome)


def _multipart_chunks(heads: list[bytes], files: list, tail: bytes) -> Iterator[bytes]:
    """A multipart body streamed from open files: each part's header, then its file in chunks."""
    for head, f in zip(heads, files):
        yield head
        while chunk := f.read(DOWNLOAD_CHUNK):
            yield chunk
    yield tail


def _quote(part: str) -> str:
    return urllib.parse.quote(str(part), safe="")


def _query_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def download_outputs(client: ServerClient, job_id: str, outputs: Mapping[str, Path], image_name: str,
                     deferred: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                     on_write: Callable[[str, Path], Any] | None = None) -> None:
    """Download every output of a finished job to temporary names, then rename them all together.

    The lesion JSON's ``image`` becomes ``image_name`` (what a local run writes there). A
    broken download or a cancel leaves no partial file and keeps existing files untouched.
    """
    with contextlib.ExitStack() as stack:
        for name, target in outputs.items():
            tmp = stack.enter_context(atomic_output(target))
            if on_write is not None:
                on_write(name, target)
            client.download(job_id, name, tmp)
            if name == "lesions":
                tmp.write_text(relabelled_lesion_report(tmp.read_text(encoding="utf-8"), image_name), encoding="utf-8")
        with deferred():
            stack.close()


# --------------------------------------------------------------------------------------------
# iwseg predict --server
# --------------------------------------------------------------------------------------------


def predict_on_server(client: ServerClient, model: str, image: Path, case_name: str, outputs: Mapping[str, Path],
                      options: Mapping[str, Any], reporter: ProgressReporter, state,
                      organ_mask: Path | None = None) -> int:
    """Run one job on the server and write its ``outputs`` (``mask``, ``probabilities``, ``logits``,
    ``lesions`` -> path) where a local run puts them; ``options`` is the job's request
    (:meth:`~IWSegmentationLib.predict.options.PredictOptions.to_request` and ``output_format``).
    The progress events go to ``reporter`` as a local run's would; ``state`` defers signals
    while the outputs are renamed. ``organ_mask`` is uploaded with the image (``--organ-mask``)."""
    t0 = time.monotonic()
    job = client.submit(image, model, options, organ_mask=organ_mask)
    held: list[ProgressEvent] = []
    try:

        def forward(event: ProgressEvent) -> None:
            if event.stage in ("case_done", "done"):  # said once the outputs are here
                held.append(event)
            elif event.stage not in ("write", "error"):  # server paths; the error comes as the status
                reporter.emit(event.stage, **event.data)

        info = client.follow(job["id"], forward)
        _raise_for_state(client, info)
        download_outputs(client, job["id"], outputs, str(image), state.deferred,
                         on_write=lambda _name, path: reporter.emit("write", case=case_name, path=str(path)))
    except BaseException:
        with contextlib.suppress(IWSegError):
            client.cancel(job["id"])
        raise
    finally:
        with contextlib.suppress(IWSegError):
            client.delete(job["id"])
    for event in held:
        data = dict(event.data)
        if event.stage == "case_done":
            data["outputs"] = {k: str(v) for k, v in outputs.items()}
        if event.stage == "done":
            data["seconds"] = round(time.monotonic() - t0, 2)
        reporter.emit(event.stage, **data)
    return 0


def _raise_for_state(client: ServerClient, info: Mapping[str, Any]) -> None:
    """Nothing for a successful job; else the exception a local run would end with."""
    state, message = info["state"], info.get("message") or ""
    if state == Outcome.OK.value:
        return
    where = f"server {client.url}, job {info['id']}"
    if state == Outcome.CANCELLED.value:
        raise Cancelled(f"{message} ({where})")
    if state == Outcome.BAD_INPUT.value:
        raise ServerInputError(f"{message} ({where})")
    tail = "\n".join(info.get("log_tail") or [])
    raise ServerError(f"{message} ({where})" + (f"\nLast lines of the server's backend log:\n{tail}" if tail else ""))


# --------------------------------------------------------------------------------------------
# The front end's runner
# --------------------------------------------------------------------------------------------


def model_name(checkpoint: str | os.PathLike) -> str:
    """The server's name of a model: the checkpoint's file name without ``.safetensors``."""
    name = Path(str(checkpoint)).name
    return name[: -len(".safetensors")] if name.endswith(".safetensors") else name


class RemoteInferenceRun(FolderJob):
    """One prediction on a server: a :class:`~IWSegmentationLib.backend.job.SegmentationJob`, as
    :class:`~IWSegmentationLib.backend.local_run.InferenceRun` is, with the same folder policy
    (:class:`~IWSegmentationLib.backend.job.FolderJob`).

    ``model`` names the server's model (default: :func:`model_name` of the options'
    checkpoint; the server's ``--models`` folder must hold it, and the checkpoint need not exist
    here). The device is the server's; ``options`` adds job options (``no_skip``, ``tta``, ... see
    docs/server.md). The input is written to a local temporary folder, uploaded, and the outputs
    are downloaded there before ``loader(outputs)`` runs on the polling thread. A server that
    cannot be reached or goes away mid-job is a FAILED result whose message names the server.
    The HTTP calls run on a background thread; signals are emitted only from ``poll``/``wait``.
    """

    FOLDER_PREFIX = "iwseg-remote-"
    WRITER = "server"

    def __init__(self, options: PredictOptions, *, client: ServerClient, model: str | None = None,
                 extra: Mapping[str, Any] | None = None, workdir_parent: str | os.PathLike | None = None,
                 loader: Callable[[dict[str, Path]], Any] | None = None) -> None:
        self.client = client
        self.model = model or model_name(options.checkpoint)
        self.extra_options = dict(extra or {})
        self.job_id: str | None = None
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._with_organ_mask = False
        super().__init__(options, workdir_parent=workdir_parent, loader=loader)

    @property
    def running(self) -> bool:
        return self._thread is not None and self.result is None

    def request(self) -> dict[str, Any]:
        """The job's request: the options (but the server's own choices), the output format, then
        ``extra`` given to the constructor (e.g. another ``output_format``)."""
        return {**self.options.to_request(), "output_format": ".nrrd", **self.extra_options}

    def start(self, write_input: Callable[[Path], Any] | None = None,
              write_organ_mask: Callable[[Path], Any] | None = None) -> None:
        """Write the input (and the organ mask, if ``write_organ_mask`` is given: it is uploaded
        with the input), then upload and follow the job on a background thread."""
        if self._thread is not None or self.result is not None:
            raise RuntimeError("this RemoteInferenceRun was already started; create a new one")
        try:
            self._with_organ_mask = self._write_inputs(write_input, write_organ_mask)
        except BaseException:
            self.discard()
            raise
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._work, daemon=True, name="iwseg-remote-run")
        self._thread.start()

    def _work(self) -> None:
        try:
            job = self.client.submit(self.input_path, self.model, self.request(),
                                     organ_mask=self.organ_mask_path if self._with_organ_mask else None)
            self.job_id = job["id"]
            if self._cancel.is_set():
                self.client.cancel(self.job_id)
            info = self.client.follow(self.job_id, lambda event: self._queue.put(("event", event)))
            if info["state"] == Outcome.OK.value:
                download_outputs(self.client, self.job_id, self.output_paths, self.INPUT_NAME)
            self._queue.put(("end", info))
        except Exception as exc:
            self._queue.put(("error", exc))
        finally:
            if self.job_id is not None:
                with contextlib.suppress(IWSegError):
                    self.client.delete(self.job_id)

    def poll(self) -> bool:
        """Deliver pending progress; True while the job runs (call it from a timer)."""
        if self.result is not None:
            return False
        if self._thread is None:
            raise RuntimeError("poll() before start()")
        while True:
            try:
                kind, payload = self._queue.get_nowait()
            except queue.Empty:
                return True
            if kind == "event":
                self.progress.emit(payload)
            else:
                self._finish(kind, payload)
                return False

    def cancel(self) -> None:
        """Ask the server to cancel (returns at once; keep polling to receive ``finished``)."""
        if self.result is not None or self._cancel.is_set():
            return
        self._cancel.set()
        if self.job_id is not None:
            job_id = self.job_id
            threading.Thread(target=lambda: self._quiet_cancel(job_id), daemon=True).start()

    def _quiet_cancel(self, job_id: str) -> None:
        with contextlib.suppress(IWSegError):
            self.client.cancel(job_id)

    def wait(self, timeout: float | None = None) -> RunResult:
        """Block until the job ends (signals on this thread); cancel it after ``timeout`` seconds."""
        if self._thread is None:
            raise RuntimeError("wait() before start()")
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            time.sleep(0.02)
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                deadline = None
        return self.result

    def close(self) -> None:
        """Cancel the server's job and remove the local folder now (application exit); no signal follows."""
        if self.running:
            self._cancel.set()
            if self.job_id is not None:
                self._quiet_cancel(self.job_id)
        self.discard()

    def _finish(self, kind: str, payload: Any) -> None:
        code, log = None, []
        if kind == "error":
            outcome = Outcome.CANCELLED if self._cancel.is_set() else Outcome.FAILED
            message = "cancelled" if outcome is Outcome.CANCELLED else str(payload)
        else:
            outcome = Outcome(payload["state"])
            code, message, log = payload.get("exit_code"), payload.get("message") or "", payload.get("log_tail") or []
            if self._cancel.is_set() and outcome is not Outcome.OK:
                outcome, message = Outcome.CANCELLED, "cancelled"
        self._conclude(outcome, code, message, log)


@dataclass
class RemoteJobFactory:
    """A :class:`~IWSegmentationLib.backend.job.JobFactory` whose jobs run on ``client``'s server.

    Injected into :class:`~IWSegmentationLib.slicer.logic.LesionSegmentationLogic` in place of
    the default :class:`~IWSegmentationLib.backend.local_run.LocalJobFactory` ("Run on: server").
    ``model`` overrides the model name taken from the checkpoint field; ``extra`` is added to
    each job's request.
    """

    client: ServerClient
    model: str | None = None
    extra: Mapping[str, Any] | None = None
    workdir_parent: str | os.PathLike | None = None

    def model_card(self, options: PredictOptions) -> dict:
        """The server's card of the model; :class:`ServerInputError` naming the models it has if unknown."""
        return self.client.model_card(self.model or model_name(options.checkpoint))

    def __call__(self, options: PredictOptions, *, loader: Loader) -> RemoteInferenceRun:
        return RemoteInferenceRun(options, client=self.client, model=self.model, extra=self.extra,
                                  workdir_parent=self.workdir_parent, loader=loader)


__all__ = ["RemoteInferenceRun", "RemoteJobFactory", "ServerClient", "ServerError", "ServerInputError",
           "model_name", "predict_on_server"]
