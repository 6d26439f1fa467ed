"""A job with an organ mask on ``iwseg serve``: the ``multipart/form-data`` upload (parts
``image`` and ``organ_mask``), checked as ``iwseg predict`` checks ``--organ-mask``, against a
real server and real ``iwseg predict`` children (the hand-wired phantom model: its answer is
known in advance, so which lesions a mask keeps is worked by hand)."""

from __future__ import annotations

import http.client
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from _server_harness import LIMIT_MB, PY, TOKENS, server_env  # noqa: E402
from _subprocess import run_in_group  # noqa: E402

from IWSegmentationLib.backend.job import Outcome  # noqa: E402
from IWSegmentationLib.core import imageio  # noqa: E402
from IWSegmentationLib.nn.checkpoint import save_checkpoint  # noqa: E402
from IWSegmentationLib.predict.options import PredictOptions  # noqa: E402
from IWSegmentationLib.preprocessing.presets import get_preset  # noqa: E402
from IWSegmentationLib.serve.client import RemoteInferenceRun, ServerInputError  # noqa: E402
from IWSegmentationLib.serve.multipart import encode_closing, encode_part_header  # noqa: E402
from IWSegmentationLib.testing import phantom  # noqa: E402
from IWSegmentationLib.testing.phantom import DEFAULT_LESIONS  # noqa: E402

#: The phantom's model with a preset that names an organ (``mr`` + ``mask: liver``): the input is
#: scaled by the organ's percentiles, and voxels outside the organ get probability 0.
MASKED = "phantom-organ"


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """The conftest's phantom model, and :data:`MASKED` (the server lists its models at start)."""
    folder = tmp_path_factory.mktemp("models")
    phantom.threshold_checkpoint(folder / "phantom.safetensors")
    save_checkpoint(folder / f"{MASKED}.safetensors", phantom.threshold_model(), {
        "patch_size": [32, 32, 32], "preprocessing": get_preset("mr", mask="liver"), "threshold": 0.5,
        "loss": "none (hand-wired test model)", "size_thresholds": [5.0, 10.0], "description": "phantom, organ-masked"})
    return folder


def organ_without_the_smallest_lesion(shape) -> np.ndarray:
    """1 everywhere but a box around the phantom's smallest lesion (centre z20 y14 x34, radius 2 mm
    on a 1.5 x 0.9 x 0.8 mm grid: at most 2 / 3 / 3 voxels from its centre), which the box of
    +-3 / 4 / 4 voxels holds whole; the other lesions (centres y34 x30, y24 x15) are 20 and 19
    voxels away. Worked by hand: the largest lesion (1315 voxels of 100) is still inside, more than
    0.5% of the 73,728 voxels, so the organ's 99.5th percentile stays 100 and its 0.5th 0 (the
    background): x = v / 100 as without a mask, the lesions of 85 and 100 stay (> 50), the one
    of 70 is outside the organ: probability 0."""
    cz, cy, cx = (int(v) for v in DEFAULT_LESIONS[0][:3])
    organ = np.ones(shape, np.uint8)
    organ[cz - 3:cz + 4, cy - 4:cy + 5, cx - 4:cx + 5] = 0
    return organ


@pytest.fixture(scope="module")
def organ(scan, tmp_path_factory):
    image, case = scan
    geometry = imageio.read_geometry(image)
    path = tmp_path_factory.mktemp("organ") / "organ.nii.gz"
    return imageio.write_image(path, organ_without_the_smallest_lesion(case.image.shape), geometry)


def predict(models, image, organ, folder, *extra, cwd=None):
    folder.mkdir()
    cmd = [*PY, "predict", "--model", str(models / f"{MASKED}.safetensors"), "--input", str(image),
           "--organ-mask", str(organ), "--output", str(folder / "mask.nii.gz"), "--lesions", str(folder / "lesions.json"),
           "--probabilities", str(folder / "prob.nii.gz"), "--progress-format", "jsonl", *extra]
    return run_in_group(cmd, timeout=180, env=server_env(), cwd=cwd or folder.parent)


@pytest.mark.slow
def test_a_job_with_an_organ_mask_equals_the_local_predict_and_drops_the_lesion_outside(
        srv, models, scan, organ, tokens_file, tmp_path):
    image, case = scan
    local = predict(models, image, organ, tmp_path / "local", "--device", "cpu")
    remote = predict(models, image, organ, tmp_path / "remote", "--server", srv.url, "--token-file", str(tokens_file))
    assert local.returncode == 0, local.stderr[-2000:]
    assert remote.returncode == 0, remote.stderr[-2000:]
    for name in ("mask.nii.gz", "lesions.json"):
        assert (tmp_path / "remote" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    mask, _ = imageio.read_image(tmp_path / "remote" / "mask.nii.gz")
    inside = organ_without_the_smallest_lesion(case.image.shape).astype(bool)
    # the pointwise model's known answer, cut to the organ: the smallest lesion (39 voxels) is gone
    assert np.array_equal(mask, case.reference * inside)
    voxels = sorted(lesion["voxels"] for lesion in json.loads((tmp_path / "remote" / "lesions.json").read_text())["lesions"])
    assert voxels == [263, 1315]  # of the phantom's 263, 1315 and 39 voxels
    prob, _ = imageio.read_image(tmp_path / "remote" / "prob.nii.gz")
    assert prob[~inside].max() == 0.0  # probability 0 outside the organ, on the server too


def test_a_remote_run_uploads_the_organ_mask_it_is_given(srv, scan, organ, tmp_path):
    """The module's path (slicer/logic -> RemoteInferenceRun.start(write_organ_mask=...))."""
    image, case = scan
    run = RemoteInferenceRun(PredictOptions(models=(f"{MASKED}.safetensors",), probabilities=False, lesions=False),
                             client=srv.client(), workdir_parent=tmp_path,
                             loader=lambda outputs: imageio.read_image(outputs["mask"])[0])
    result = run.run_blocking(write_input=lambda path: imageio.write_image(path, *imageio.read_image(image)),
                              write_organ_mask=lambda path: imageio.write_image(path, *imageio.read_image(organ)),
                              timeout=120)
    assert result.outcome is Outcome.OK, result.details()
    assert np.array_equal(result.loaded, case.reference * organ_without_the_smallest_lesion(case.image.shape))


def test_allow_unmasked_is_a_job_option(srv, scan, tmp_path):
    """The masked model without a mask: refused (no automatic liver mask), as the CLI refuses it,
    unless the job asks for allow_unmasked."""
    image, _ = scan
    client = srv.client()
    for allow, state in ((False, Outcome.BAD_INPUT.value), (True, Outcome.OK.value)):
        job = client.submit(image, MASKED, {"allow_unmasked": allow, "probabilities": False, "lesions": False})
        info = client.follow(job["id"], lambda event: None)
        assert info["state"] == state, info
        if not allow:
            assert "--organ-mask" in info["message"] and "--allow-unmasked" in info["message"]
        client.delete(job["id"])


def cli_error(models, folder, image_name, mask_name) -> str:
    """The one line ``iwseg predict`` prints for a bad mask (run where both files are, by name)."""
    done = run_in_group([*PY, "predict", "--model", str(models / f"{MASKED}.safetensors"), "--input", image_name,
                         "--organ-mask", mask_name, "--output", "out.nii.gz", "--device", "cpu"],
                        timeout=120, env=server_env(), cwd=folder)
    assert done.returncode == 2, done.stderr[-2000:]
    return done.stderr.strip().splitlines()[-1].removeprefix("iwseg predict: error: ")


@pytest.mark.parametrize("bad", ["another-grid", "empty"])
def test_a_bad_organ_mask_is_a_400_with_the_cli_message(srv, models, scan, tmp_path, bad):
    image, case = scan
    shutil.copy(image, tmp_path / image.name)
    geometry = imageio.read_geometry(image)
    if bad == "empty":
        imageio.write_image(tmp_path / "bad.nii.gz", np.zeros(case.image.shape, np.uint8), geometry)
    else:  # one slice fewer: the grid differs in size
        smaller = imageio.Geometry(size=(*geometry.size[:2], geometry.size[2] - 1), spacing=geometry.spacing,
                                   origin=geometry.origin, direction=geometry.direction)
        imageio.write_image(tmp_path / "bad.nii.gz", np.ones(case.image.shape, np.uint8)[1:], smaller)
    expected = cli_error(models, tmp_path, image.name, "bad.nii.gz")
    assert ("is empty" if bad == "empty" else "is not on the grid of case_7.nii.gz: size") in expected
    with pytest.raises(ServerInputError) as refused:
        srv.client().submit(image, MASKED, organ_mask=tmp_path / "bad.nii.gz")
    assert str(refused.value).endswith(f"answered 400 to POST /v1/jobs: {expected}")
    assert srv.client().health()["queued"] == 0 and srv.client().health()["uploading"] == 0


def test_an_oversized_organ_mask_is_refused_like_an_oversized_image(srv, scan, tmp_path):
    image, _ = scan
    big = tmp_path / "big.nrrd"
    big.write_bytes(b"x" * (LIMIT_MB * 2**20 - image.stat().st_size + 1))  # image + mask: one byte over
    with pytest.raises(ServerInputError, match=r"case_7\.nii\.gz \+ big\.nrrd .* upload limit of 1 MB \(413\)"):
        srv.client().submit(image, "phantom", organ_mask=big)
    # a client that does not check first: the server counts the multipart body as it streams it
    payload = (encode_part_header("b0undary", "image", image.name, first=True) + image.read_bytes()
               + encode_part_header("b0undary", "organ_mask", "big.nrrd", first=False) + big.read_bytes()
               + encode_closing("b0undary"))
    chunked = f"{len(payload):x}\r\n".encode() + payload + b"\r\n0\r\n\r\n"
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.putrequest("POST", f"/v1/jobs?model=phantom&filename={image.name}")
        for key, value in {"Authorization": f"Bearer {TOKENS[0]}", "Transfer-Encoding": "chunked",
                           "Content-Type": "multipart/form-data; boundary=b0undary"}.items():
            conn.putheader(key, value)
        conn.endheaders(chunked)
        response = conn.getresponse()
        assert response.status == 413 and "limit of 1 MB" in json.loads(response.read())["detail"]
    finally:
        conn.close()
    assert srv.client().health()["uploading"] == 0
