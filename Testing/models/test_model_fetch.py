"""``iwseg models fetch`` against a real HTTP server on 127.0.0.1 (started here, in a thread).

The server serves a tiny real checkpoint (the phantom's threshold model) and honours
``Range: bytes=N-`` with a 206 answer. It can be told to send only the first half of the file
and then drop the connection (an interrupted download), to send other bytes than the manifest's
sha256 (a corrupt or replaced file), or to ignore ranges (a plain 200). Nothing leaves the
loopback interface.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from IWSegmentationLib.cli import main
from IWSegmentationLib.core.errors import InputError
from IWSegmentationLib.core.progress import parse_progress_line
from IWSegmentationLib.models.download import DownloadError, download, partial_path
from IWSegmentationLib.models.library import ModelLibrary
from IWSegmentationLib.models.manifest import MANIFEST_FORMAT, read_manifest
from IWSegmentationLib.nn.checkpoint import save_checkpoint
from IWSegmentationLib.preprocessing.presets import get_preset
from IWSegmentationLib.testing.phantom import threshold_checkpoint, threshold_model


class FileServer(http.server.ThreadingHTTPServer):
    """Serves ``files`` (path -> bytes) with Range support; ``drop_after`` (bytes) cuts a response
    off after that many bytes of the file; ``ignore_range`` answers every request with the whole file."""

    def __init__(self, files: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.files = files
        self.drop_after: int | None = None
        self.ignore_range = False
        self.requests: list[str | None] = []  # the Range header of each GET

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class RangeHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802 (http.server's name)
        server: FileServer = self.server
        body = server.files.get(self.path)
        server.requests.append(self.headers.get("Range"))
        if body is None:
            self.send_error(404, "no such model")
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and not server.ignore_range:
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        end = len(body) if server.drop_after is None else min(len(body), server.drop_after)
        self.wfile.write(body[start:end])
        self.wfile.flush()
        if end < len(body):
            self.close_connection = True  # the rest never comes: the client sees a short body


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory) -> bytes:
    return threshold_checkpoint(tmp_path_factory.mktemp("ckpt") / "phantom.safetensors").read_bytes()


def corrupted(data: bytes) -> bytes:
    """``data`` with the bits of its last byte flipped (a weight, not the header)."""
    return data[:-1] + bytes([data[-1] ^ 0xFF])


@pytest.fixture
def server(model_bytes):
    srv = FileServer({"/phantom.safetensors": model_bytes, "/other.safetensors": corrupted(model_bytes)})
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def write_manifest(path: Path, server: FileServer, model_bytes: bytes, **fields) -> Path:
    entry = {"name": "phantom", "url": f"{server.url}/phantom.safetensors",
             "sha256": hashlib.sha256(model_bytes).hexdigest(), "license": "CC0-1.0",
             "description": "the phantom's threshold model (tests)", "modality": "MR", "organ": "phantom",
             "size": len(model_bytes), **fields}
    path.write_text(json.dumps({"format": MANIFEST_FORMAT, "models": [entry]}))
    return path


def fetch(library: Path, manifest: Path, *extra: str, name: str = "phantom") -> int:
    return main(["models", "fetch", name, "--library", str(library), "--manifest", str(manifest), *extra])


def test_fetch_downloads_checks_and_records_the_model(tmp_path, server, model_bytes, capsys):
    manifest = write_manifest(tmp_path / "models.json", server, model_bytes)
    assert fetch(tmp_path / "lib", manifest, "--progress-format", "jsonl") == 0
    events = [parse_progress_line(line) for line in capsys.readouterr().out.splitlines()]
    downloads = [e for e in events if e.stage == "download"]
    assert downloads[-1].get("done") == downloads[-1].get("total") == len(model_bytes)
    assert events[-1].stage == "done" and events[-1].get("license") == "CC0-1.0"
    library = ModelLibrary(tmp_path / "lib")
    (entry,) = library.entries()
    assert library.path_of(entry).read_bytes() == model_bytes
    assert (entry.name, entry.license, entry.modality, entry.source) == (
        "phantom", "CC0-1.0", "MR", f"{server.url}/phantom.safetensors")
    assert not list((tmp_path / "lib").glob(".*")), "no download leftovers in the library"
    # fetched again: nothing is downloaded (same sha256)
    assert fetch(tmp_path / "lib", manifest) == 0
    assert server.requests == [None]


def test_an_interrupted_download_resumes_where_it_stopped(tmp_path, server, model_bytes, capsys):
    manifest = write_manifest(tmp_path / "models.json", server, model_bytes)
    half = len(model_bytes) // 2
    server.drop_after = half
    assert fetch(tmp_path / "lib", manifest) == 2
    error = capsys.readouterr().err
    library = ModelLibrary(tmp_path / "lib")
    kept = library.partial_download("phantom")
    assert kept.read_bytes() == model_bytes[:half]
    assert f"interrupted (the connection closed after {half} of {len(model_bytes)} bytes)" in error
    assert str(kept) in error and "run the same command again to resume" in error
    assert library.entries() == []
    server.drop_after = None
    assert fetch(tmp_path / "lib", manifest) == 0
    assert server.requests == [None, f"bytes={half}-"]  # the second try asked only for the rest
    assert library.path_of(library.get("phantom")).read_bytes() == model_bytes
    assert not kept.exists()


def test_a_server_ignoring_the_range_restarts_the_download(tmp_path, server, model_bytes):
    target = tmp_path / "m.safetensors"
    garbage = b"garbage that is not the file's start"
    partial_path(target).write_bytes(garbage)
    server.ignore_range = True  # a 200 with the whole file: it is written from byte 0, not appended
    download(f"{server.url}/phantom.safetensors", target, hashlib.sha256(model_bytes).hexdigest())
    assert target.read_bytes() == model_bytes and server.requests == [f"bytes={len(garbage)}-"]


def test_a_download_with_another_sha256_is_deleted_and_reported(tmp_path, server, model_bytes, capsys):
    url = f"{server.url}/other.safetensors"  # one byte differs from the manifest's file
    manifest = write_manifest(tmp_path / "models.json", server, model_bytes, url=url)
    expected = hashlib.sha256(model_bytes).hexdigest()
    got = hashlib.sha256(corrupted(model_bytes)).hexdigest()
    assert fetch(tmp_path / "lib", manifest) == 2
    message = capsys.readouterr().err
    assert f"download of {url} does not match its sha256: expected {expected}, got {got}" in message
    assert "the file was deleted" in message
    assert not any((tmp_path / "lib").iterdir()), "the bad download is gone"
    assert ModelLibrary(tmp_path / "lib").entries() == []


def test_the_cli_reports_a_sha256_mismatch_with_exit_code_2(tmp_path, server, model_bytes):
    manifest = write_manifest(tmp_path / "models.json", server, model_bytes, url=f"{server.url}/other.safetensors")
    done = subprocess.run([sys.executable, "-m", "IWSegmentationLib", "models", "fetch", "phantom", "--library",
                           str(tmp_path / "lib"), "--manifest", str(manifest)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr
    assert "does not match its sha256" in done.stderr and "other.safetensors" in done.stderr


def test_a_licence_needing_acceptance_is_shown_and_gates_fetch_and_predict(tmp_path, server, model_bytes, capsys,
                                                                           monkeypatch):
    manifest = write_manifest(tmp_path / "models.json", server, model_bytes, license="LicenseRef-research-only",
                              license_requires_acceptance=True, license_url="https://example.org/licence")
    assert fetch(tmp_path / "lib", manifest) == 2
    assert server.requests == [], "nothing is downloaded before the licence is accepted"
    error = capsys.readouterr().err  # the licence is shown before first use
    assert "licensed under: LicenseRef-research-only (https://example.org/licence)" in error
    assert "--accept-license" in error
    assert fetch(tmp_path / "lib", manifest, "--accept-license") == 0
    entry = ModelLibrary(tmp_path / "lib").get("phantom")
    assert entry.accepted is not None and not entry.needs_acceptance
    # accepted once, the same file is fetched again without the flag
    assert fetch(tmp_path / "lib", manifest) == 0


def test_manifest_errors_name_the_entry_and_the_field(tmp_path, server, model_bytes, capsys):
    good = json.loads(write_manifest(tmp_path / "good.json", server, model_bytes).read_text())["models"][0]
    cases = [
        ({**good, "sha256": "abc"}, "entry 0 ('phantom'): field 'sha256' must be 64"),
        ({**good, "licence": "MIT"}, "entry 0 ('phantom'): unknown field(s) licence"),
        ({k: v for k, v in good.items() if k != "organ"}, "entry 0 ('phantom'): field 'organ' is required"),
        ({**good, "url": "ftp://x/y"}, "field 'url' must be an http:// or https:// URL"),
        ({**good, "size": -3}, "field 'size' must be a positive"),
        ({**good, "size": True}, "field 'size' must be a whole number"),
        ({**good, "name": "a/b"}, "is not a valid model name"),
        ({**good, "name": "x.safetensors"}, "is not a valid model name"),
    ]
    for index, (entry, expected) in enumerate(cases):
        path = tmp_path / f"bad{index}.json"
        path.write_text(json.dumps({"format": MANIFEST_FORMAT, "models": [entry]}))
        with pytest.raises(InputError) as exc:
            read_manifest(path)
        assert f"manifest {path}" in str(exc.value) and expected in str(exc.value), (expected, str(exc.value))
    path = tmp_path / "twice.json"
    path.write_text(json.dumps({"format": MANIFEST_FORMAT, "models": [good, good]}))
    with pytest.raises(InputError, match="entry 1: name 'phantom' appears twice"):
        read_manifest(path)
    path.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_manifest(path)
    assert fetch(tmp_path / "lib", tmp_path / "good.json", name="nothere") == 2
    assert "has no model 'nothere' (it lists: phantom)" in capsys.readouterr().err


def test_a_manifest_is_read_from_a_url(tmp_path, server, model_bytes):
    manifest = write_manifest(tmp_path / "models.json", server, model_bytes)
    server.files["/models.json"] = manifest.read_bytes()
    (entry,) = read_manifest(f"{server.url}/models.json")
    assert entry.name == "phantom" and entry.size == len(model_bytes)
    with pytest.raises(InputError, match="cannot read the manifest"):
        read_manifest(f"{server.url}/missing.json")


def test_a_missing_file_on_the_server_is_a_clear_error(tmp_path, server, model_bytes):
    manifest = write_manifest(tmp_path / "models.json", server, model_bytes, url=f"{server.url}/gone.safetensors")
    with pytest.raises(DownloadError, match="gone.safetensors: the server answered 404"):
        ModelLibrary(tmp_path / "lib").fetch(read_manifest(manifest)[0])
    assert ModelLibrary(tmp_path / "lib").entries() == []


def test_a_card_asking_for_acceptance_keeps_the_model_unaccepted(tmp_path, server, capsys):
    """The manifest does not say so, the downloaded card does: the model is kept, not accepted."""
    path = tmp_path / "licensed.safetensors"
    save_checkpoint(path, threshold_model(), {"patch_size": [32, 32, 32], "preprocessing": get_preset("mr"),
                                              "license": "LicenseRef-research-only", "license_requires_acceptance": True})
    data = path.read_bytes()
    server.files["/licensed.safetensors"] = data
    manifest = write_manifest(tmp_path / "models.json", server, data, url=f"{server.url}/licensed.safetensors",
                              license="see the model card")
    assert fetch(tmp_path / "lib", manifest) == 2
    assert "iwseg models accept phantom" in capsys.readouterr().err
    entry = ModelLibrary(tmp_path / "lib").get("phantom")
    assert entry.needs_acceptance and entry.license == "see the model card"
    with pytest.raises(InputError, match="must be accepted before first use"):
        ModelLibrary(tmp_path / "lib").resolve("phantom")
    assert main(["models", "accept", "phantom", "--library", str(tmp_path / "lib")]) == 0
    assert ModelLibrary(tmp_path / "lib").resolve("phantom").read_bytes() == data


def test_fetch_refuses_a_name_taken_by_another_file_before_downloading(tmp_path, server, model_bytes, capsys):
    """As ``add`` does: the entry there is named, nothing is fetched, ``--replace`` is the way out."""
    lib = tmp_path / "lib"
    mine = threshold_checkpoint(tmp_path / "mine.safetensors", gain=10.0)  # another file than the server's
    assert main(["models", "add", str(mine), "--name", "phantom", "--library", str(lib)]) == 0
    old = ModelLibrary(lib).get("phantom")
    manifest = write_manifest(tmp_path / "models.json", server, model_bytes)
    capsys.readouterr()
    assert fetch(lib, manifest) == 2
    err = capsys.readouterr().err
    assert f"model 'phantom' is already in the library {lib}: sha256 {old.sha256[:12]}..., added {old.added}" in err
    assert "give --replace to `iwseg models fetch`" in err and "`iwseg models remove phantom` first" in err
    assert server.requests == [] and ModelLibrary(lib).get("phantom") == old

    assert fetch(lib, manifest, "--replace") == 0
    assert f"replaced phantom ({lib / 'phantom.safetensors'}): sha256 {old.sha256[:12]}..." in capsys.readouterr().err
    entry = ModelLibrary(lib).get("phantom")
    assert entry.sha256 == hashlib.sha256(model_bytes).hexdigest() and entry.source == f"{server.url}/phantom.safetensors"
    assert (lib / "phantom.safetensors").read_bytes() == model_bytes and server.requests == [None]


def test_fetching_again_keeps_the_card_licence_gate(tmp_path, server, capsys):
    """A model whose card (not the manifest) asks for acceptance, fetched twice without accepting:
    the second fetch downloads nothing and must not drop the card's requirement."""
    path = tmp_path / "licensed.safetensors"
    save_checkpoint(path, threshold_model(), {"patch_size": [32, 32, 32], "preprocessing": get_preset("mr"),
                                              "license": "LicenseRef-research-only", "license_requires_acceptance": True})
    server.files["/licensed.safetensors"] = path.read_bytes()
    manifest = write_manifest(tmp_path / "models.json", server, path.read_bytes(),
                              url=f"{server.url}/licensed.safetensors", license="see the model card")
    assert fetch(tmp_path / "lib", manifest) == 2
    assert fetch(tmp_path / "lib", manifest) == 2  # still not accepted, and still said
    assert capsys.readouterr().err.count("iwseg models accept phantom") == 2
    assert server.requests == [None] and ModelLibrary(tmp_path / "lib").get("phantom").needs_acceptance
    assert fetch(tmp_path / "lib", manifest, "--accept-license") == 0
    assert not ModelLibrary(tmp_path / "lib").get("phantom").needs_acceptance
