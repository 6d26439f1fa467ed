"""``iwseg serve`` and its client, against a real uvicorn server on 127.0.0.1.

The server runs as ``python -m IWSegmentationLib serve`` on a free port, in its own process
group; every job is a real ``iwseg predict`` child; everything it started is killed at
teardown (its descendants are looked up before the kill, since a job's process tree lives in
its own session). The model is the hand-wired phantom checkpoint (phantom.py): a pointwise
``logit = 20 (x - 0.5)``, so the right mask is known in advance, and a volume takes a second.
Every wait is bounded.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from _server_harness import LIMIT_MB, PY, TOKENS, Server, collapse_runs, server_env, slow_volume, wait_until  # noqa: E402
from _subprocess import kill_process_group, run_in_group  # noqa: E402

from IWSegmentationLib.backend.job import Outcome  # noqa: E402
from IWSegmentationLib.core import imageio
from IWSegmentationLib.core.errors import InputError  # noqa: E402
from IWSegmentationLib.core.progress import parse_progress_line  # noqa: E402
from IWSegmentationLib.predict.options import PredictOptions  # noqa: E402
from IWSegmentationLib.serve import app as server  # noqa: E402
from IWSegmentationLib.serve.client import RemoteInferenceRun, ServerInputError  # noqa: E402
from IWSegmentationLib.testing import phantom

# ---------------------------------------------------------------------------- pure helpers


def test_loopback_and_token_rules(tmp_path, models):
    assert server.is_loopback("127.0.0.1") and server.is_loopback("::1") and server.is_loopback("localhost")
    assert not server.is_loopback("0.0.0.0") and not server.is_loopback("10.1.2.3")
    assert not server.is_loopback("gpu.example.org")  # a host name may resolve anywhere
    with pytest.raises(InputError, match="--token-file"):
        server.ServerConfig(models, host="0.0.0.0").check()
    server.ServerConfig(models, host="0.0.0.0", tokens=["x" * 16]).check()
    bad = tmp_path / "t.txt"
    bad.write_text("short\n")
    with pytest.raises(InputError, match=r"t\.txt, line 1"):
        server.read_token_file(bad)


def test_serve_refuses_a_network_address_without_a_token(models):
    done = run_in_group([*PY, "serve", "--models", str(models), "--host", "0.0.0.0", "--port", "1"],
                        timeout=60, env=server_env())
    assert done.returncode == 2 and "--token-file" in done.stderr


@pytest.mark.parametrize("name", ["../x.nrrd", "a/b.nrrd", "..\\x.nrrd", "C:x.nrrd", "..", "", "x\x00.nrrd"])
def test_upload_names_with_folders_are_refused(name):
    with pytest.raises(InputError, match="bare file name"):
        server.upload_name(name)


def test_upload_names_keep_safe_names_only():
    assert server.upload_name("case_7.nii.gz") == "case_7.nii.gz"
    assert server.upload_name("scan (1).nrrd") == "input.nrrd"  # kept out of paths and argv
    with pytest.raises(InputError, match="use one of"):
        server.upload_name("scan.nhdr")  # voxels in a second file: one upload cannot carry it


def test_models_come_only_from_the_folder(models):
    assert list(server.list_models(models)) == ["phantom"]  # the link to a file outside is left out


def test_job_options_become_predict_arguments(tmp_path):
    options = PredictOptions.from_request({"probabilities_uint8": True, "batch_size": 2, "size_thresholds": [4.0, 9.0],
                                           "connectivity": 6}, models=(tmp_path / "m.safetensors",))
    assert options.to_arguments(tmp_path / "in.nrrd", {"mask": tmp_path / "m.nrrd"})[12:] == [
        "--batch-size", "2", "--connectivity", "6", "--size-thresholds", "4.0", "9.0", "--probabilities-uint8"]
    with pytest.raises(InputError, match="--precision must be one of"):
        PredictOptions.from_request({"precision": "--model=/etc/passwd"})


# ---------------------------------------------------------------------------- the HTTP API


def test_health_needs_no_token_but_everything_else_does(srv):
    assert srv.client(None).health()["auth"] is True
    with pytest.raises(ServerInputError, match=r"refused the token \(401\)"):
        srv.client("wrong-token-0123456789").models()
    with pytest.raises(ServerInputError, match="401"):
        srv.client(None).models()
    assert [m["name"] for m in srv.client().models()] == ["phantom"]
    assert srv.client().models()[0]["card"]["threshold"] == 0.5
    with urllib.request.urlopen(f"{srv.url}/openapi.json", timeout=30) as response:  # the generated API page
        paths = json.loads(response.read())["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/results/{name}"} <= set(paths)


def test_unknown_job_model_and_result_are_404(srv, scan):
    client = srv.client()
    for call in (lambda: client.status("no-such-job"), lambda: client.cancel("no-such-job"),
                 lambda: client.download("no-such-job", "mask", os.devnull)):
        with pytest.raises(ServerInputError, match="answered 404"):
            call()
    with pytest.raises(ServerInputError, match="unknown model 'nope'"):
        client.submit(scan[0], "nope")
    with pytest.raises(ServerInputError, match="unknown model 'linked'"):
        client.submit(scan[0], "linked")


def test_a_bad_option_is_a_400_whose_body_is_the_cli_message(srv, scan):
    """The body's detail is PredictOptions' message, the one ``iwseg predict`` prints for the flag
    (issue 21: one message whichever front end; issue 23: overlap 0.999 is refused from a client)."""
    for query, message in (("overlap=0.999", "--overlap must be in [0, 0.9], got 0.999"),
                           ("threshold=1.0", "--threshold must be in [0, 1), got 1.0"),
                           ("batch_size=0", "--batch-size must be >= 1, got 0"),
                           ("colour=red", "unknown option(s) colour;")):
        status, body = _raw_post(srv, f"model=phantom&filename=scan.nii.gz&{query}", {"Content-Length": "1"}, b"x")
        assert status == 400 and body["detail"].startswith(message), (query, status, body)


def _raw_post(srv, query: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.putrequest("POST", "/v1/jobs?" + query)
        for key, value in {"Authorization": f"Bearer {TOKENS[0]}", **headers}.items():
            conn.putheader(key, value)
        conn.endheaders(body or None)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def test_oversized_upload_is_413_before_and_while_reading(srv, tmp_path):
    limit = LIMIT_MB * 2**20
    # declared too large: answered from the headers alone, the body is never sent
    status, body = _raw_post(srv, "model=phantom&filename=big.nrrd", {"Content-Length": str(limit + 1)})
    assert status == 413 and "limit of 1 MB" in body["detail"]
    # chunked (no length): counted while streaming, refused at byte limit + 1
    payload = b"x" * (limit + 1)
    chunked = f"{len(payload):x}\r\n".encode() + payload + b"\r\n0\r\n\r\n"
    status, body = _raw_post(srv, "model=phantom&filename=big.nrrd", {"Transfer-Encoding": "chunked"}, chunked)
    assert status == 413
    big = tmp_path / "big.nrrd"
    big.write_bytes(payload)
    with pytest.raises(ServerInputError, match="413"):
        srv.client().submit(big, "phantom")
    assert srv.client().health()["queued"] == 0 and not list((srv_workdir(srv)).glob("iwseg-run-*/input/*"))


def srv_workdir(srv) -> Path:
    args = srv.proc.args
    return Path(args[args.index("--workdir") + 1])


def test_traversal_file_name_is_refused_and_writes_nothing(srv, scan):
    before = set(srv_workdir(srv).rglob("*"))
    for name in ("../../escape.nii.gz", "..%2F..%2Fescape.nii.gz", "sub/escape.nii.gz"):
        status, body = _raw_post(srv, f"model=phantom&filename={name.replace('/', '%2F')}",
                                 {"Content-Length": str(scan[0].stat().st_size)}, scan[0].read_bytes())
        assert status == 400 and "bare file name" in body["detail"], (name, status, body)
    assert set(srv_workdir(srv).rglob("*")) == before
    assert not (srv_workdir(srv).parent / "escape.nii.gz").exists()


# ---------------------------------------------------------------------------- jobs


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("--tta", "--min-lesion-size", "300")], ids=["defaults", "tta-min-size"])
def test_server_outputs_equal_a_local_predict(srv, models, scan, tokens_file, tmp_path, extra):
    """``iwseg predict --server`` writes the files a local ``iwseg predict`` writes, byte for byte,
    with the options passed on to the server's job."""
    image, case = scan
    outs = {}
    for where in ("local", "remote"):
        folder = tmp_path / where
        folder.mkdir()
        cmd = [*PY, "predict", "--model", str(models / "phantom.safetensors"),
               "--input", str(image), "--output", str(folder / "mask.nii.gz"),
               "--probabilities", str(folder / "prob.nii.gz"), "--lesions", str(folder / "lesions.json"),
               "--logits", str(folder / "logits.nii.gz"), "--device", "cpu", "--progress-format", "jsonl", *extra]
        if where == "remote":
            cmd += ["--server", srv.url, "--token-file", str(tokens_file)]
            cmd[cmd.index("--device") + 1] = "auto"
        done = run_in_group(cmd, timeout=180, env=server_env(), cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        events = [parse_progress_line(line) for line in done.stdout.splitlines()]
        assert all(e is not None for e in events), done.stdout
        outs[where] = (folder, events)
    (local, local_events), (remote, remote_events) = outs["local"], outs["remote"]
    assert (remote / "mask.nii.gz").read_bytes() == (local / "mask.nii.gz").read_bytes()
    # the lesion JSON names the input as the command line gave it, in both runs
    assert (remote / "lesions.json").read_text() == (local / "lesions.json").read_text()
    assert json.loads((remote / "lesions.json").read_text())["image"] == str(image)
    prob_l, geometry_l = imageio.read_image(local / "prob.nii.gz")
    prob_r, geometry_r = imageio.read_image(remote / "prob.nii.gz")
    assert geometry_r.differences(geometry_l) == [] and np.abs(prob_r - prob_l).max() <= 1e-6
    # the logit map comes through the server too (job option logits, result "logits"), float32
    logits_l, _ = imageio.read_image(local / "logits.nii.gz")
    logits_r, geometry_r = imageio.read_image(remote / "logits.nii.gz")
    assert logits_r.dtype == np.float32 and geometry_r.differences(geometry_l) == []
    assert np.abs(logits_r - logits_l).max() <= 1e-4
    mask, _ = imageio.read_image(remote / "mask.nii.gz")
    lesions = json.loads((remote / "lesions.json").read_text())["lesions"]
    if extra:  # a minimum of 300 voxels drops the phantom's smaller lesions, on the server too
        assert [lesion["voxels"] for lesion in lesions] == [1315]  # of 263, 1315 and 39 voxels
        return
    assert len(lesions) == 3 and np.array_equal(mask, case.reference)  # the pointwise model's known answer
    # the same protocol, in the same order (inference lines are throttled by time: compare runs of them),
    # ending with the outputs at the local paths
    stages = [e.stage for e in remote_events]
    assert stages[0] == "start" and stages[-2:] == ["case_done", "done"] and "inference" in stages
    assert collapse_runs(e.stage for e in local_events) == collapse_runs(stages)
    assert remote_events[-2].get("outputs")["mask"] == str(remote / "mask.nii.gz")
    assert remote_events[-2].get("case") == "case_7" == local_events[-2].get("case")
    assert sorted(os.listdir(remote)) == ["lesions.json", "logits.nii.gz", "mask.nii.gz", "prob.nii.gz"]  # no temporary left


@pytest.mark.slow
def test_streamed_progress_parses_and_one_token_cannot_see_another(srv, scan, tmp_path):
    alice, bob = srv.client(TOKENS[0]), srv.client(TOKENS[1])
    job = alice.submit(scan[0], "phantom", {"probabilities": False, "lesions": False})
    with pytest.raises(ServerInputError, match="404"):
        bob.status(job["id"])
    with pytest.raises(ServerInputError, match="404"):
        bob.cancel(job["id"])
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    conn.request("GET", f"/v1/jobs/{job['id']}/events", headers={"Authorization": f"Bearer {TOKENS[0]}"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type") == "application/x-ndjson"
    lines = [line for line in response.read().decode().splitlines() if line.strip()]
    conn.close()
    events = [parse_progress_line(line) for line in lines]
    assert events and all(e is not None for e in events), lines
    inference = [e for e in events if e.stage == "inference"]
    assert inference and inference[-1].get("done") == inference[-1].get("total") > 0
    assert events[-1].stage == "done" and events[-1].get("cases") == 1
    info = alice.follow(job["id"], lambda event: None)
    assert info["state"] == "ok" and info["exit_code"] == 0 and info["results"] == ["mask"]
    with pytest.raises(ServerInputError, match="404"):
        bob.download(job["id"], "mask", tmp_path / "stolen.nrrd")
    alice.download(job["id"], "mask", tmp_path / "mask.nrrd")
    assert np.array_equal(imageio.read_image(tmp_path / "mask.nrrd")[0], scan[1].reference)
    alice.delete(job["id"])
    with pytest.raises(ServerInputError, match="404"):
        alice.status(job["id"])  # deleted: the results are gone


@pytest.mark.slow
def test_two_clients_one_worker_the_second_waits_and_both_finish(srv, scan, tmp_path):
    alice, bob = srv.client(TOKENS[0]), srv.client(TOKENS[1])
    first = alice.submit(scan[0], "phantom")
    second = bob.submit(scan[0], "phantom")  # milliseconds later; the first job takes seconds
    assert bob.status(second["id"])["state"] == "queued"
    assert bob.status(second["id"])["queue_position"] in (0, 1)  # 1 while the first has not started yet
    infos = {}
    for client, job in ((alice, first), (bob, second)):
        infos[job["id"]] = client.follow(job["id"], lambda event: None, timeout=120)
        assert infos[job["id"]]["state"] == "ok", infos[job["id"]]
        client.download(job["id"], "mask", tmp_path / f"{job['id']}.nrrd")
        assert np.array_equal(imageio.read_image(tmp_path / f"{job['id']}.nrrd")[0], scan[1].reference)
    # one worker: the second started only once the first had ended
    assert infos[first["id"]]["ended"] <= infos[second["id"]]["started"]


@pytest.mark.slow
def test_cancel_mid_job_is_exit_code_3_and_leaves_no_result(srv, tokens_file, tmp_path):
    """``iwseg predict --server`` interrupted (SIGTERM) mid-job: exit code 3, the server kills the
    job's process tree, no output appears, and the job keeps no result."""
    volume = slow_volume(tmp_path)
    out = tmp_path / "mask.nrrd"
    results_before = set(srv_workdir(srv).glob("results-*"))
    cmd = [*PY, "predict", "--server", srv.url, "--token-file", str(tokens_file), "--model", "phantom",
           "--input", str(volume), "--output", str(out), "--overlap", "0.9", "--no-skip", "--tta", "--progress-format", "jsonl"]
    client = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=server_env(),
                              start_new_session=True)
    try:
        for line in client.stdout:  # bounded: the job runs for minutes, its first inference line comes in seconds
            event = parse_progress_line(line)
            if event is not None and event.stage == "inference":
                break
        assert srv.jobs_running(), "the server runs no job"
        client.send_signal(signal.SIGTERM)
        code = client.wait(timeout=60)
        stderr = client.stderr.read()
    finally:
        kill_process_group(client)
    assert code == 3, stderr
    assert "cancelled" in stderr
    assert not out.exists() and not list(tmp_path.glob(".mask.nrrd.partial-*"))
    wait_until(lambda: not srv.jobs_running(), 30, "the job's process tree to be killed")
    assert set(srv_workdir(srv).glob("results-*")) == results_before  # the cancelled job kept nothing
    wait_until(lambda: not list(srv_workdir(srv).glob("iwseg-run-*")), 30, "the run folder (with the upload) to go")


@pytest.mark.slow
def test_remote_run_has_the_local_runner_shape_and_cancels(srv, scan, tmp_path):
    """:class:`RemoteInferenceRun` as the Slicer module uses :class:`InferenceRun`: progress on the
    polling thread, a loader on success, CANCELLED (exit code 3) after a cancel, folders removed."""
    client = srv.client()
    loaded = []
    run = RemoteInferenceRun(PredictOptions(models=(Path("phantom.safetensors"),)), client=client, workdir_parent=tmp_path,
                             loader=lambda outputs: loaded.append(imageio.read_image(outputs["mask"])[0]) or "ok")
    stages = []
    run.progress.connect(lambda e: stages.append(e.stage))
    result = run.run_blocking(write_input=lambda p: imageio.write_image(p, *imageio.read_image(scan[0])), timeout=120)
    assert result.outcome is Outcome.OK and result.loaded == "ok", result.report()
    assert np.array_equal(loaded[0], scan[1].reference)
    assert stages[0] == "start" and stages[-1] == "done" and result.workdir is None and run.workdir is None

    slow = RemoteInferenceRun(PredictOptions(models=(Path("phantom.safetensors"),), overlap=0.9, no_skip=True,
                                             tta=True), client=client, workdir_parent=tmp_path,
                              loader=lambda outputs: pytest.fail("loader after a cancel"))
    slow.progress.connect(lambda e: e.stage == "inference" and slow.cancel())
    volume = slow_volume(tmp_path)
    result = slow.run_blocking(write_input=lambda p: p.write_bytes(volume.read_bytes()), timeout=120)
    assert result.outcome is Outcome.CANCELLED and result.exit_code == 3, result.report()
    assert result.workdir is None and not list(tmp_path.glob("iwseg-remote-*"))
    wait_until(lambda: not srv.jobs_running(), 30, "the job's process tree to be killed")


@pytest.mark.slow
def test_killing_the_server_mid_job_is_a_clear_error_and_writes_nothing(models, tmp_path):
    (tmp_path / "work").mkdir()
    own = Server(models, tmp_path / "work", "--device", "cpu")
    orphans: list[int] = []
    try:
        volume = slow_volume(tmp_path)
        out = tmp_path / "mask.nrrd"
        cmd = [*PY, "predict", "--server", own.url, "--model", "phantom", "--input", str(volume),
               "--output", str(out), "--overlap", "0.9", "--no-skip", "--tta", "--progress-format", "jsonl"]
        client = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=server_env(),
                                  start_new_session=True)
        try:
            for line in client.stdout:
                event = parse_progress_line(line)
                if event is not None and event.stage == "inference":
                    break
            orphans = own.jobs_running()
            os.kill(own.proc.pid, signal.SIGKILL)
            code = client.wait(timeout=60)
            stderr = client.stderr.read()
        finally:
            kill_process_group(client)
    finally:
        own.stop(orphans)
    assert code == 1, stderr
    assert f"server {own.url}" in stderr and "connection was lost" in stderr
    assert not out.exists() and not list(tmp_path.glob(".mask.nrrd.partial-*"))


# ---------------------------------------------------------------------------- the Slicer logic, run on a server


@pytest.mark.slow
def test_the_slicer_logic_runs_on_the_server_and_a_failure_leaves_the_scene_unchanged(srv, models, tokens_file,
                                                                                      tmp_path):
    """"Run on: server" in the module is ``LesionSegmentationLogic.run_on(url, token_file)``: the
    model card comes from the server (no checkpoint file here), the lesions land in a real MRML
    scene (slicer-core) exactly as after a local run, and a refused job changes nothing."""
    slicer = pytest.importorskip("slicer")
    from IWSegmentationLib.nn.checkpoint import read_metadata
    from IWSegmentationLib.slicer import mrml
    from IWSegmentationLib.slicer.logic import LesionSegmentationLogic

    scene = slicer.vtkMRMLScene()
    case = phantom.phantom_case(spacing=(1.5, 0.9, 0.8))
    volume = mrml.add_volume_from_array(scene, case.image, imageio.Geometry(
        size=case.image.shape[::-1], spacing=case.spacing[::-1], origin=(0.0, 0.0, 0.0)), "Phantom")
    reference = mrml.lesion_segmentation(scene, volume, case.reference, name="Reference")
    logic = LesionSegmentationLogic(scene, workdir_parent=tmp_path)
    with pytest.raises(InputError, match="run on must be one of this computer, server"):
        logic.run_on("the cloud", srv.url)
    logic.run_on("server", f" {srv.url} ", str(tokens_file))  # as the panel's fields give them
    assert not logic.runs_locally
    missing_here = tmp_path / "phantom.safetensors"  # the name of a server model; no such file here
    local_card = read_metadata(models / "phantom.safetensors")
    assert logic.read_model_card(missing_here)["weights_sha256"] == local_card["weights_sha256"]

    before = [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]
    with pytest.raises(ServerInputError, match="has no model 'nope'.*phantom"):
        logic.start(volume, PredictOptions(models=(tmp_path / "nope.safetensors",)))
    logic.job_factory.extra = {"output_format": ".exe"}  # the server refuses the job (400): nothing runs
    result = logic.start(volume, PredictOptions(models=(missing_here,)), reference=reference).wait(timeout=120)
    assert result.outcome is Outcome.FAILED and srv.url in result.message and ".exe" in result.message
    assert [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())] == before
    assert logic.results is None

    logic.job_factory.extra = None
    result = logic.start(volume, PredictOptions(models=(missing_here,)), reference=reference).wait(timeout=120)
    assert result.ok, result.report()
    segments = logic.results.segmentation.GetSegmentation()
    assert segments.GetNumberOfSegments() == 3  # the phantom's three lesions, each matched to the reference
    assert [row["status"] for row in logic.results.rows] == ["TP", "TP", "TP"]
    assert not list(tmp_path.glob("iwseg-remote-*"))  # success: the local folder is gone
    logic.run_on("this computer")
    assert logic.runs_locally
