"""``iwseg models add`` under a name already taken: another file is refused (naming the entry there
and ``--replace``), the same file again changes nothing, ``--replace`` swaps it and asks for its
licence anew. Real checkpoints, real library folders, the CLI in a real subprocess."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
from _subprocess import run_in_group

from IWSegmentationLib.core.errors import InputError
from IWSegmentationLib.models.library import ModelLibrary
from IWSegmentationLib.nn.checkpoint import save_checkpoint
from IWSegmentationLib.preprocessing.presets import get_preset
from IWSegmentationLib.testing.phantom import threshold_checkpoint, threshold_model


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Two different checkpoints (the threshold model at gain 20 and 10) and a licensed one."""
    folder = tmp_path_factory.mktemp("ckpts")
    licensed = folder / "licensed.safetensors"
    save_checkpoint(licensed, threshold_model(), {
        "patch_size": [32, 32, 32], "preprocessing": get_preset("mr"), "threshold": 0.5,
        "description": "licensed phantom model (tests)", "license": "LicenseRef-research-only",
        "license_requires_acceptance": True})
    return {"first": threshold_checkpoint(folder / "first.safetensors"),
            "second": threshold_checkpoint(folder / "second.safetensors", gain=10.0), "licensed": licensed}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def iwseg_models(*args: str):
    return run_in_group([sys.executable, "-m", "IWSegmentationLib", "models", *args], timeout=120)


def test_another_file_under_a_taken_name_is_refused_and_nothing_changes(tmp_path, files):
    lib = tmp_path / "lib"
    assert iwseg_models("add", str(files["first"]), "--name", "liver", "--library", str(lib)).returncode == 0
    index_before = (lib / "index.json").read_bytes()
    added = json.loads(index_before)["models"]["liver"]["added"]

    done = iwseg_models("add", str(files["second"]), "--name", "liver", "--library", str(lib))
    assert done.returncode == 2, done.stderr
    # the message names the entry there (short sha256, when added, where from), the new file's hash and the way out
    assert f"model 'liver' is already in the library {lib}: sha256 {sha(files['first'])[:12]}..., added {added}" \
        in done.stderr
    assert f"from {files['first'].resolve()}" in done.stderr
    assert f"this file's sha256 is {sha(files['second'])[:12]}..." in done.stderr
    assert "give --replace to `iwseg models add`" in done.stderr
    assert (lib / "index.json").read_bytes() == index_before
    assert (lib / "liver.safetensors").read_bytes() == files["first"].read_bytes()
    assert sorted(p.name for p in lib.iterdir()) == ["index.json", "liver.safetensors"]  # no temporary copy left


def test_the_same_file_again_is_a_no_op_that_says_so(tmp_path, files):
    lib = tmp_path / "lib"
    assert iwseg_models("add", str(files["first"]), "--name", "liver", "--library", str(lib)).returncode == 0
    index_before = (lib / "index.json").read_bytes()
    copy = tmp_path / "elsewhere" / "same.safetensors"  # the same bytes from another path, added later
    copy.parent.mkdir()
    shutil.copyfile(files["first"], copy)

    done = iwseg_models("add", str(copy), "--name", "liver", "--library", str(lib))
    assert done.returncode == 0, done.stderr
    assert f"liver ({lib / 'liver.safetensors'}) is already in the library with this file " \
           f"(sha256 {sha(files['first'])[:12]}...): not copied again, its entry kept" in done.stdout
    # the entry is kept as it was: its source stays the first path, its time the first time
    assert (lib / "index.json").read_bytes() == index_before


def test_replace_swaps_the_file_and_says_what_it_replaced(tmp_path, files):
    lib = tmp_path / "lib"
    assert iwseg_models("add", str(files["first"]), "--name", "liver", "--library", str(lib)).returncode == 0
    old = ModelLibrary(lib).get("liver")

    done = iwseg_models("add", str(files["second"]), "--name", "liver", "--replace", "--library", str(lib))
    assert done.returncode == 0, done.stderr
    assert f"replaced liver ({lib / 'liver.safetensors'}): sha256 {old.sha256[:12]}... (added {old.added}) " \
           f"by {sha(files['second'])[:12]}..." in done.stdout
    entry = ModelLibrary(lib).get("liver")
    assert entry.sha256 == sha(files["second"]) and entry.source == str(files["second"].resolve())
    assert (lib / "liver.safetensors").read_bytes() == files["second"].read_bytes()
    assert [r.ok for r in ModelLibrary(lib).verify()] == [True]


def test_a_replacing_file_asks_for_its_licence_anew(tmp_path, files):
    library = ModelLibrary(tmp_path / "lib")
    first = library.add(files["first"], "m")
    assert (first.action, first.previous) == ("added", None)
    with pytest.raises(InputError, match="licensed under: LicenseRef-research-only"):
        library.add(files["licensed"], "m", replace=True)
    assert library.get("m").sha256 == sha(files["first"])  # refused before anything was copied
    stored = library.add(files["licensed"], "m", replace=True, accept_license=True)
    assert stored.action == "replaced" and stored.previous == first.entry
    assert stored.entry.accepted is not None and not stored.entry.needs_acceptance
    # and back: the accepted time of the licensed file does not stick to the plain file that replaces it
    back = library.add(files["first"], "m", replace=True)
    assert back.action == "replaced" and back.entry.accepted is None


def test_a_missing_copy_of_the_same_file_is_restored(tmp_path, files):
    library = ModelLibrary(tmp_path / "lib")
    first = library.add(files["first"], "m").entry
    library.path_of(first).unlink()
    stored = library.add(files["first"], "m")
    assert stored.action == "restored" and stored.entry.added == first.added
    assert library.path_of(stored.entry).read_bytes() == files["first"].read_bytes()
