"""Limits of ``iwseg serve`` that a hostile or careless client used to get past (issue 23 items 4,
5, 8 and 10), against real uvicorn servers on 127.0.0.1:

* a job slot is taken before the upload is read: N+3 concurrent slow uploads against
  ``--max-jobs N`` get exactly 3 refusals (429), and an aborted upload gives its slot back;
* a slow-loris upload (1 byte every 2 s) is dropped with 408 within ``--upload-timeout``;
* ``--job-timeout`` cancels a job that runs too long, with a message saying so;
* ``--max-jobs 0`` and ``--keep-results 0`` are refused (exit 2); SIGTERM ends the server with 0;
* the folders a SIGKILLed server left are removed at the next start, and two servers cannot
  share one ``--workdir``;
* without tokens, a request for another host name or from another origin is refused (403);
* the client checks its token before it uploads: a wrong one is "refused the token" (exit 2).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from _server_harness import PY, REPO, SLOW, Server, free_port, server_env, slow_volume, wait_until  # noqa: E402
from _subprocess import kill_process_group  # noqa: E402

from IWSegmentationLib.serve.client import ServerClient, ServerError, ServerInputError  # noqa: E402


def _post_headers(port: int, length: int, *, token: str | None = None, extra: str = "",
                  path: str = "/v1/jobs?model=phantom&filename=scan.nrrd") -> socket.socket:
    """A connection that has sent a POST's headers (``length`` body bytes promised) and no body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}{extra}"
                 f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n".encode())
    return sock


def _status_if_answered(sock: socket.socket, wait: float) -> int | None:
    """The HTTP status the server has answered on ``sock`` within ``wait`` seconds, else None."""
    sock.settimeout(wait)
    try:
        head = sock.recv(4096)
    except (TimeoutError, socket.timeout):
        return None
    except ConnectionError:
        return -1
    return int(head.split()[1]) if head.startswith(b"HTTP/1.1") else -1


def test_max_jobs_cannot_be_bypassed_by_concurrent_slow_uploads(models, tmp_path):
    n = 2
    srv = Server(models, tmp_path / "work", "--max-jobs", str(n), "--device", "cpu")
    socks = []
    try:
        for _ in range(n + 3):  # all five send their headers, none its body yet
            socks.append(_post_headers(srv.port, 1000))
            socks[-1].sendall(b"x")  # a slow upload: one byte of a thousand
        answers = [_status_if_answered(s, 2.0) for s in socks]
        # the first n hold a slot while they upload; main answered none (it counted queued jobs only)
        assert answers.count(429) == 3 and answers.count(None) == n, answers
        assert srv.client(None).health()["uploading"] == n
        for s in socks:  # the clients vanish mid-upload: their slots come back
            s.close()
        wait_until(lambda: srv.client(None).health()["uploading"] == 0, 15, "the aborted uploads' slots")
        again = _post_headers(srv.port, 1000)
        assert _status_if_answered(again, 1.0) is None  # accepted for upload now
        again.close()
    finally:
        for s in socks:
            s.close()
        srv.stop()


def test_a_slow_loris_upload_is_dropped_within_the_upload_timeout(models, tmp_path):
    srv = Server(models, tmp_path / "work", "--upload-timeout", "3", "--device", "cpu")
    try:
        sock = _post_headers(srv.port, 100)
        t0, status = time.monotonic(), None
        while status is None and time.monotonic() - t0 < 20:  # 1 byte every 2 s
            with contextlib.suppress(OSError):
                sock.sendall(b"x")
            status = _status_if_answered(sock, 2.0)
        elapsed = time.monotonic() - t0
        sock.close()
        assert status == 408, status  # main: still open after 20 s (no body timeout)
        assert elapsed < 8, elapsed  # dropped after 3 s, seen at the next 2 s look
        wait_until(lambda: srv.client(None).health()["uploading"] == 0, 10, "the dropped upload's slot")
    finally:
        srv.stop()


def test_a_job_longer_than_job_timeout_is_cancelled(models, tmp_path):
    srv = Server(models, tmp_path / "work", "--job-timeout", "2", "--device", "cpu")
    try:
        client = srv.client(None)
        job = client.submit(slow_volume(tmp_path), "phantom", SLOW)
        info = wait_until(lambda: (s := client.status(job["id"]))["state"] in ("ok", "cancelled", "failed", "bad_input")
                     and s, 90, "the job to end")
        assert info["state"] == "cancelled" and info["exit_code"] == 3
        assert "longer than this server's limit of 2 s (--job-timeout)" in info["message"]
    finally:
        srv.stop()


@pytest.mark.parametrize("flag, value, message", [("--max-jobs", "0", "--max-jobs must be >= 1"),
                                                  ("--keep-results", "0", "--keep-results must be > 0"),
                                                  ("--upload-timeout", "-1", "--upload-timeout must be > 0")])
def test_impossible_limits_are_refused(models, tmp_path, flag, value, message):
    done = subprocess.run([*PY, "serve", "--models", str(models), "--device", "cpu", "--port", "0", flag, value],
                          capture_output=True, text=True, timeout=120, env=server_env(), cwd=REPO)
    assert done.returncode == 2, done.stderr  # main: served (and refused every job, or kept nothing)
    assert message in done.stderr and "Traceback" not in done.stderr


def test_sigterm_stops_the_server_with_exit_0(models, tmp_path):
    srv = Server(models, tmp_path / "work", "--device", "cpu")
    srv.proc.send_signal(signal.SIGTERM)
    try:
        assert srv.proc.wait(timeout=30) == 0, srv.output()  # main: 3 (cancelled)
    finally:
        srv.stop()


def test_folders_of_a_killed_server_are_removed_at_the_next_start(models, tmp_path):
    work = tmp_path / "work"
    first = Server(models, work, "--device", "cpu")
    job_folder = work / "iwseg-run-abcd1234"  # as a SIGKILLed server leaves them: an upload, results
    (job_folder / "input").mkdir(parents=True)
    (job_folder / "input" / "patient.nrrd").write_bytes(b"patient data")
    (work / "results-abcd1234-xyz").mkdir()
    (work / "notes.txt").write_text("not the server's")
    # a second server on the same folder is refused while the first runs
    done = subprocess.run([*PY, "serve", "--models", str(models), "--device", "cpu", "--port", "0",
                           "--workdir", str(work)], capture_output=True, text=True, timeout=120, env=server_env())
    assert done.returncode == 2 and "is in use by another iwseg serve" in done.stderr, done.stderr
    assert job_folder.is_dir()
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(timeout=30)
    first.stop()
    second = Server(models, work, "--device", "cpu")
    try:
        assert not job_folder.exists() and not (work / "results-abcd1234-xyz").exists()
        assert (work / "notes.txt").read_text() == "not the server's"
    finally:
        second.stop()


def test_default_workdirs_of_killed_servers_are_removed_and_live_ones_kept(models, tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    dead, live = tmp / "iwseg-serve-deadbeef", tmp / "iwseg-serve-alive123"
    for folder in (dead, live):
        (folder / "iwseg-run-abcd1234" / "input").mkdir(parents=True)
        os.utime(folder, (time.time() - 86400, time.time() - 86400))
    other = tmp / "iwseg-serve-notes"  # not mkdtemp's name: not ours
    other.mkdir()
    import fcntl

    held = os.open(live, os.O_RDONLY)  # a live server holds its folder
    fcntl.flock(held, fcntl.LOCK_EX)
    monkeypatch.setenv("TMPDIR", str(tmp))
    port = free_port()
    proc = subprocess.Popen([*PY, "serve", "--models", str(models), "--device", "cpu", "--port", str(port),
                             "--log-level", "warning"], env=server_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def up() -> bool:
            with contextlib.suppress(ServerError):
                return ServerClient(f"http://127.0.0.1:{port}", timeout=2).health()["status"] == "ok"
            return False

        wait_until(up, 90, "the server to come up")
        assert not dead.exists()  # main: kept for ever (patient data in a dead server's upload)
        assert live.is_dir() and other.is_dir()
        assert len(list(tmp.glob("iwseg-serve-*"))) == 3  # live, other, and the new server's own
    finally:
        os.close(held)
        kill_process_group(proc)
        proc.wait(timeout=30)


def test_without_tokens_other_hosts_and_origins_are_refused(models, tmp_path):
    srv = Server(models, tmp_path / "work", "--device", "cpu")
    try:
        # a page on another site POSTs a text/plain form (no CORS preflight) at the server
        sock = _post_headers(srv.port, 5, extra="Origin: http://evil.example\r\n")
        sock.sendall(b"hello")
        assert _status_if_answered(sock, 5) == 403  # main: accepted (202)
        sock.close()
        rebinding = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        rebinding.sendall(b"GET /v1/health HTTP/1.1\r\nHost: evil.example:8000\r\n\r\n")
        assert _status_if_answered(rebinding, 5) == 403
        rebinding.close()
        same = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        same.sendall(f"GET /v1/health HTTP/1.1\r\nHost: localhost:{srv.port}\r\n"
                     f"Origin: http://127.0.0.1:{srv.port}\r\n\r\n".encode())
        assert _status_if_answered(same, 5) == 200
        same.close()
    finally:
        srv.stop()


def test_a_wrong_token_is_refused_before_the_upload(models, tokens_file, tmp_path):
    srv = Server(models, tmp_path / "work", "--token-file", str(tokens_file), "--device", "cpu",
                 "--max-upload-mb", "64")
    try:
        big = tmp_path / "big.nrrd"  # 32 MB: main streamed it into a 401 and saw "Broken pipe"
        big.write_bytes(b"\0" * (32 << 20))
        wrong = ServerClient(srv.url, "wrong-token-0123456789abcdef", timeout=30)
        with pytest.raises(ServerInputError, match="refused the token"):
            wrong.submit(big, "phantom")
        token_file = tmp_path / "wrong.txt"
        token_file.write_text("wrong-token-0123456789abcdef\n")
        model = tmp_path / "phantom.safetensors"
        model.write_bytes((models / "phantom.safetensors").read_bytes())
        done = subprocess.run([*PY, "predict", "--server", srv.url, "--token-file", str(token_file), "--model",
                               str(model), "--input", str(big), "--output", str(tmp_path / "mask.nrrd")],
                              capture_output=True, text=True, timeout=120, env=server_env())
        assert done.returncode == 2, done.stderr
        assert "refused the token (401)" in done.stderr and "Broken pipe" not in done.stderr
    finally:
        srv.stop()


def test_upload_slot_accounting_is_exact(tmp_path):
    # the JobManager alone: a failed upload gives its slot back, an enqueued job keeps it
    from IWSegmentationLib.serve.jobs import ApiError, JobManager

    model = tmp_path / "m.safetensors"
    model.write_bytes(b"x")
    manager = JobManager(models={"m": model}, root=tmp_path, max_jobs=2, command_prefix=["true"], env={})
    a = manager.new_job("o", "m", "a.nrrd", {})
    b = manager.new_job("o", "m", "b.nrrd", {})
    with pytest.raises(ApiError) as full:
        manager.new_job("o", "m", "c.nrrd", {})
    assert full.value.status == 429 and manager.uploading() == 2
    manager.discard(a)
    manager.enqueue(b)
    assert manager.uploading() == 0 and manager.counts()["queued"] == 1
    c = manager.new_job("o", "m", "c.nrrd", {})  # a's slot is free again
    with pytest.raises(ApiError):
        manager.new_job("o", "m", "d.nrrd", {})  # b (queued) and c (uploading) hold both
    with pytest.raises(ApiError):
        manager.new_job("o", "m", "../e.nrrd", {})  # a bad request takes no slot ...
    assert manager.uploading() == 1  # ... and leaves the count as it was
    manager.discard(c)
