"""The local model library: ``iwseg models add | list | verify | remove | accept`` on real
checkpoints, the licence gate of ``iwseg predict --model NAME``, and the library folder's default."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from IWSegmentationLib.cli import main
from IWSegmentationLib.core.errors import InputError
from IWSegmentationLib.core.imageio import Geometry, read_image, write_image
from IWSegmentationLib.models.library import (
    NOT_STATED,
    ModelLibrary,
    default_library_dir,
    looks_like_path,
    resolve_model,
)
from IWSegmentationLib.nn.checkpoint import save_checkpoint
from IWSegmentationLib.preprocessing.presets import get_preset
from IWSegmentationLib.testing.phantom import phantom_case, threshold_checkpoint, threshold_model

LICENSED = {"license": "LicenseRef-research-only", "license_requires_acceptance": True}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The phantom's threshold checkpoint, without a licence and with one that needs accepting."""
    folder = tmp_path_factory.mktemp("ckpts")
    plain = threshold_checkpoint(folder / "phantom.safetensors")
    licensed = folder / "licensed.safetensors"
    save_checkpoint(licensed, threshold_model(), {
        "patch_size": [32, 32, 32], "preprocessing": get_preset("mr"), "threshold": 0.5,
        "description": "phantom threshold model with a licence (tests)", **LICENSED})
    return {"plain": plain, "licensed": licensed}


def models(*args: str) -> int:
    return main(["models", *args])


def test_add_list_verify_remove(tmp_path, checkpoints, capsys):
    lib = tmp_path / "lib"
    assert models("add", str(checkpoints["plain"]), "--library", str(lib)) == 0
    assert models("add", str(checkpoints["plain"]), "--name", "second", "--library", str(lib)) == 0
    library = ModelLibrary(lib)
    assert [e.name for e in library.entries()] == ["phantom", "second"]
    entry = library.get("phantom")
    assert entry.sha256 == hashlib.sha256(checkpoints["plain"].read_bytes()).hexdigest()
    assert entry.license == NOT_STATED and not entry.needs_acceptance
    assert library.path_of(entry).read_bytes() == checkpoints["plain"].read_bytes()
    capsys.readouterr()

    assert models("list", "--library", str(lib)) == 0
    out = capsys.readouterr().out
    assert "phantom\n  licence: not stated\n" in out and f"sha256:  {entry.sha256}" in out
    assert "card:    Test model, not trained" in out and "preset mr; window 32x32x32; threshold 0.5" in out
    assert models("list", "--json", "--library", str(lib)) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["name"] for r in rows] == ["phantom", "second"] and rows[0]["path"] == str(library.path_of(entry))

    assert models("verify", "--library", str(lib)) == 0
    assert capsys.readouterr().out.count(": ok: sha256") == 2

    assert models("remove", "second", "--library", str(lib)) == 0
    assert [e.name for e in library.entries()] == ["phantom"] and not (lib / "second.safetensors").exists()
    assert models("remove", "second", "--library", str(lib)) == 2
    assert "no model 'second' in the model library" in capsys.readouterr().err


def test_verify_finds_a_modified_and_a_missing_file(tmp_path, checkpoints, capsys):
    library = ModelLibrary(tmp_path / "lib")
    library.add(checkpoints["plain"], "a")
    library.add(checkpoints["plain"], "b")
    path = library.path_of(library.get("a"))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one weight byte: the header and card still read
    path.write_bytes(bytes(data))
    library.path_of(library.get("b")).unlink()
    capsys.readouterr()
    assert models("verify", "--library", str(tmp_path / "lib")) == 2
    out = capsys.readouterr().out
    got = hashlib.sha256(bytes(data)).hexdigest()
    assert f"a: FAILED: {path} was modified: sha256 {got}, the library recorded {library.get('a').sha256}" in out
    assert "b: FAILED: file missing" in out
    assert models("verify", "a", "--library", str(tmp_path / "lib")) == 2


def test_add_refuses_what_is_not_a_safe_checkpoint(tmp_path, checkpoints):
    library = ModelLibrary(tmp_path / "lib")
    pickle = tmp_path / "model.pt"
    pickle.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a pickle's opening bytes
    with pytest.raises(InputError, match="model.pt"):
        library.add(pickle)
    with pytest.raises(InputError, match="not found"):
        library.add(tmp_path / "missing.safetensors")
    with pytest.raises(InputError, match="--name 'a/b' is not a valid model name"):
        library.add(checkpoints["plain"], "a/b")
    library.add(checkpoints["plain"], "m")
    other = tmp_path / "other.safetensors"
    threshold_checkpoint(other, gain=10.0)
    with pytest.raises(InputError, match="'m' is already in the library .*: sha256 .*another file"):
        library.add(other, "m")
    assert library.add(checkpoints["plain"], "m").action == "unchanged"  # the same file again: no change
    assert library.entries()[0].sha256 == hashlib.sha256(checkpoints["plain"].read_bytes()).hexdigest()


def test_a_card_licence_needing_acceptance_gates_add(tmp_path, checkpoints, capsys):
    lib = tmp_path / "lib"
    assert models("add", str(checkpoints["licensed"]), "--library", str(lib)) == 2
    assert "licensed under: LicenseRef-research-only" in capsys.readouterr().err
    assert ModelLibrary(lib).entries() == []
    assert models("add", str(checkpoints["licensed"]), "--library", str(lib), "--accept-license") == 0
    entry = ModelLibrary(lib).get("licensed")
    assert entry.license == LICENSED["license"] and entry.accepted is not None


def _phantom_volume(folder: Path) -> Path:
    case = phantom_case()
    geometry = Geometry(size=case.image.shape[::-1], spacing=case.spacing[::-1], origin=(0.0, 0.0, 0.0),
                        direction=tuple(np.eye(3).ravel()))
    path = folder / "phantom.nrrd"
    write_image(path, case.image, geometry)
    return path


def test_predict_takes_a_library_name_once_its_licence_is_accepted(tmp_path, checkpoints, capsys, monkeypatch):
    lib = tmp_path / "lib"
    library = ModelLibrary(lib)
    library.add(checkpoints["licensed"], "research", accept_license=True)
    # an index written elsewhere (a shared library, an older version): recorded, not accepted
    index = json.loads(library.index_path.read_text())
    index["models"]["research"]["accepted"] = None
    library.index_path.write_text(json.dumps(index))
    monkeypatch.setenv("IWSEG_MODELS", str(lib))
    volume = _phantom_volume(tmp_path)
    args = ["predict", "--model", "research", "--input", str(volume), "--output", str(tmp_path / "mask.nrrd"),
            "--device", "cpu"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "'research' is licensed under: LicenseRef-research-only" in error and "iwseg models accept research" in error
    assert not (tmp_path / "mask.nrrd").exists()

    assert models("accept", "research") == 0
    assert "licensed under: LicenseRef-research-only" in capsys.readouterr().out
    assert main(args) == 0
    mask, _ = read_image(tmp_path / "mask.nrrd")
    # the phantom's threshold model finds its lesions exactly: the mask is the reference
    assert np.array_equal(mask, phantom_case().reference)


def test_a_model_value_is_a_path_or_a_library_name(tmp_path, checkpoints, monkeypatch):
    monkeypatch.setenv("IWSEG_MODELS", str(tmp_path / "lib"))
    ModelLibrary().add(checkpoints["plain"], "phantom-v1")
    assert resolve_model("phantom-v1") == tmp_path / "lib" / "phantom-v1.safetensors"
    assert resolve_model(checkpoints["plain"]) == checkpoints["plain"]  # a path stays a path
    assert resolve_model("missing.safetensors") == Path("missing.safetensors")  # predict reports the missing file
    assert looks_like_path("dir/name") and looks_like_path("x.pt") and not looks_like_path("phantom-v1")
    with pytest.raises(InputError, match="--model nothere: no such file, and no model 'nothere' in the model "
                                         "library"):
        resolve_model("nothere")


def test_the_default_library_folder():
    assert default_library_dir({"IWSEG_MODELS": "/srv/models"}, "linux") == Path("/srv/models")
    assert default_library_dir({"HOME": "/home/u"}, "linux") == Path("/home/u/.local/share/iwsegmentation/models")
    assert default_library_dir({"HOME": "/home/u", "XDG_DATA_HOME": "/data"}, "linux") == \
        Path("/data/iwsegmentation/models")
    assert default_library_dir({"HOME": "/Users/u"}, "darwin") == \
        Path("/Users/u/Library/Application Support/IWSegmentation/models")
    assert default_library_dir({"HOME": "C:/Users/u", "LOCALAPPDATA": "C:/Users/u/AppData/Local"}, "win32") == \
        Path("C:/Users/u/AppData/Local/IWSegmentation/models")


def test_a_corrupt_index_is_reported(tmp_path):
    (tmp_path / "index.json").write_text("{broken")
    with pytest.raises(InputError, match="index.json cannot be read"):
        ModelLibrary(tmp_path).entries()
    (tmp_path / "index.json").write_text(json.dumps({"format": "iwsegmentation.model_library",
                                                     "models": {"x": {"name": "x", "file": "../../etc/passwd",
                                                                      "sha256": "0" * 64}}}))
    with pytest.raises(InputError, match="entry 'x' is malformed"):
        ModelLibrary(tmp_path).entries()
