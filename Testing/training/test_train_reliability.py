"""Reliability of `iwseg train` and `iwseg evaluate` (issue 14 items 5-6, issue 16 items 3-5):
dataset paths that escape the folder, an empty training list, broken validation cases found
before the first step, the stride check of patch_size, `progress: false`, SIGINT and SIGTERM
(exit 3, also with SIGINT ignored by the parent shell), stale temporary files.

Runs train the ``tiny`` U-Net on the four 16x32x32 synthetic cases of Testing/_tiny_training.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from _tiny_training import tiny_config

from IWSegmentationLib.core.errors import Cancelled, GeometryMismatchError, InputError
from IWSegmentationLib.core.imageio import read_image, write_image
from IWSegmentationLib.core.outputs import remove_stale_partials
from IWSegmentationLib.core.progress import CancelState
from IWSegmentationLib.data import load_dataset
from IWSegmentationLib.nn.checkpoint import load_checkpoint
from IWSegmentationLib.nn.training_state import load_training_state
from IWSegmentationLib.training import (
    LAST_CHECKPOINT,
    RESUME_STATE,
    RUN_FILES,
    TrainConfig,
    load_training_data,
    train,
)

REPO = Path(__file__).resolve().parents[2]
#: Testing/training/conftest.py's module-scoped fixture: four synthetic liver-CT cases of 16x32x32 voxels (MSD
#: layout with a 'training' list in dataset.json)


def tiny(data: Path, out: Path, **overrides) -> TrainConfig:
    """The tiny config of Testing/_tiny_training.py, one epoch of two steps unless overridden."""
    return tiny_config(data, out, **{"epochs": 1, "iters_per_epoch": 2, **overrides})


def _copy_with_listing(dataset: Path, root: Path, edit) -> Path:
    """A copy of ``dataset`` whose dataset.json went through ``edit(meta)``."""
    shutil.copytree(dataset, root)
    meta = json.loads((root / "dataset.json").read_text())
    edit(meta)
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


# --------------------------------------------------------------------------- dataset.json


@pytest.mark.parametrize("how", ["dotdot", "absolute"])
def test_dataset_json_path_outside_the_folder_is_refused_unless_allowed(dataset, tmp_path, how):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(dataset / "labelsTr" / "synth_001.nii.gz", outside / "secret.nii.gz")
    root = tmp_path / "data"
    target = "../elsewhere/secret.nii.gz" if how == "dotdot" else str(outside / "secret.nii.gz")

    def point_outside(meta):
        meta["training"][1]["label"] = target

    _copy_with_listing(dataset, root, point_outside)
    with pytest.raises(InputError) as info:
        load_dataset(root)
    message = str(info.value)
    assert str(root / "dataset.json") in message and "training entry 1 'label'" in message
    assert repr(target) in message and "outside the dataset folder" in message
    assert "allow_outside_paths: true" in message
    # through the trainer's config too (exit code 2 on the command line)
    with pytest.raises(InputError, match="outside the dataset folder"):
        load_training_data(tiny(root, tmp_path / "o"), verbose=False)
    # explicitly allowed: the listed file is read
    allowed = load_dataset(root, allow_outside_paths=True)
    assert allowed.cases[1].label == root / target
    data = load_training_data(tiny(root, tmp_path / "o", allow_outside_paths=True, val_fraction=0.0), verbose=False)
    assert len(data.train_cases) == 4


def test_symlink_inside_the_dataset_folder_is_still_followed(dataset, tmp_path):
    # the check is on the path as written: a symlinked imagesTr/ (data on another disk) works
    store = tmp_path / "store"
    shutil.copytree(dataset / "imagesTr", store)
    root = tmp_path / "data"
    shutil.copytree(dataset, root, ignore=shutil.ignore_patterns("imagesTr"))
    (root / "imagesTr").symlink_to(store, target_is_directory=True)
    assert len(load_dataset(root)) == 4


def test_empty_training_list_is_an_error_not_a_fallback_to_imagesTr(dataset, tmp_path):
    root = _copy_with_listing(dataset, tmp_path / "data", lambda meta: meta.update(training=[]))
    with pytest.raises(InputError, match=r"'training' must be a non-empty list.*remove the key") as info:
        load_dataset(root)
    assert str(root / "dataset.json") in str(info.value)
    # without the key, the files of imagesTr/ are the cases (nnU-Net v2)
    root2 = _copy_with_listing(dataset, tmp_path / "data2", lambda meta: meta.pop("training"))
    assert load_dataset(root2).ids == ["synth_000", "synth_001", "synth_002", "synth_003"]


# --------------------------------------------------------------------------- up-front checks


def test_broken_validation_case_stops_the_run_before_the_first_step(dataset, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"train": ["synth_000", "synth_001", "synth_002"], "val": ["synth_003"]}))
    label_path = root / "labelsTr" / "synth_003.nii.gz"
    label, geometry = read_image(label_path)
    write_image(label_path, label[:, :, :-1], type(geometry).identity(label[:, :, :-1].shape, geometry.spacing_zyx))
    steps = []
    config = tiny(root, tmp_path / "run", splits=str(splits), epochs=3, val_every=3)
    with pytest.raises(GeometryMismatchError) as info:
        train(config, verbose=False, on_step=lambda *a: steps.append(a))
    assert steps == []  # on the old main it trained 3 epochs (6 steps), then failed at validation
    message = str(info.value)
    assert message.startswith("validation split: ") and "synth_003" in message and str(label_path) in message


@pytest.mark.parametrize(("patch", "channels", "nearest"), [
    ([20, 16, 16], [4, 8, 16, 32], "stride 8 on every side (the U-Net pools 3 times), got [20, 16, 16]; "
                                   "nearest valid: [16, 16, 16] or [24, 16, 16]"),
    ([4, 16, 17], [4, 8, 16, 32], "nearest valid: [8, 16, 16] or [8, 16, 24]"),
    ([24, 32, 32], [4, 8, 16, 32, 64], "stride 16 on every side (the U-Net pools 4 times), got [24, 32, 32]; "
                                       "nearest valid: [16, 32, 32] or [32, 32, 32]"),
])
def test_patch_size_not_a_multiple_of_the_stride_is_refused_with_the_nearest_sizes(patch, channels, nearest):
    # stride = 2 ** (len(channels) - 1); 20 lies between 2*8 = 16 and 3*8 = 24
    with pytest.raises(InputError) as info:
        TrainConfig.from_dict({"model_size": "tiny", "model": {"channels": channels}, "patch_size": patch})
    assert "config key 'patch_size' must be a multiple of the network stride" in str(info.value)
    assert nearest in str(info.value)
    TrainConfig.from_dict({"model_size": "tiny", "model": {"channels": channels},
                           "patch_size": [2 ** (len(channels) - 1) * 3] * 3})  # a multiple is fine


@pytest.mark.parametrize("progress", [True, False])
def test_progress_false_hides_the_loading_bar(dataset, tmp_path, capsys, progress):
    load_training_data(tiny(dataset, tmp_path / "o", progress=progress), verbose=True)
    err = capsys.readouterr().err
    assert ("loading training cases" in err) is progress


# --------------------------------------------------------------------------- stale partials


def killed_inside_atomic_output(path: Path) -> Path:
    """The partial file a process SIGKILLed inside ``atomic_output(path)`` leaves (a real child,
    so that its lock dies with it)."""
    code = ("import sys, time\nfrom IWSegmentationLib.core.outputs import atomic_output\n"
            "with atomic_output(sys.argv[1]) as tmp:\n    tmp.write_bytes(b'half a file')\n"
            "    print(tmp, flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        partial = Path(proc.stdout.readline().strip())
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    assert partial.is_file() and partial.parent == path.parent
    return partial


def test_stale_partials_of_our_outputs_are_removed_and_nothing_else(dataset, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # what a run killed by SIGKILL inside atomic_output leaves: the context never exits
    real = killed_inside_atomic_output(out / LAST_CHECKPOINT)
    handmade = out / ".resume.safetensors.partial-ab_c1234.safetensors"
    handmade.write_bytes(b"x")
    for path in (real, handmade):  # written by an earlier run: before this process started
        os.utime(path, (time.time() - 86400, time.time() - 86400))
    keep = [out / ".notes.txt.partial-abcd1234.txt",            # not one of our outputs
            out / "last.safetensors.partial-abcd1234",           # not our naming (no leading dot)
            out / ".last.safetensors.partial-abc.safetensors",   # not 8 random characters
            out / "my-notes.txt"]
    for path in keep:
        path.write_text("user file")
    train(tiny(dataset, out), verbose=False)
    assert not real.exists() and not handmade.exists()
    assert all(path.read_text() == "user file" for path in keep)
    assert not [p.name for p in out.iterdir() if ".partial-" in p.name and p not in keep]
    assert remove_stale_partials(tmp_path / "missing", RUN_FILES) == []


# --------------------------------------------------------------------------- signals


def test_cancel_during_the_save_waits_for_complete_files(dataset, tmp_path, monkeypatch):
    import IWSegmentationLib.nn.checkpoint as checkpoint

    real_save = checkpoint.save_checkpoint
    sent = []

    def save_then_signal(path, model, card):
        if not sent:  # SIGTERM arrives while the epoch's files are being written
            sent.append(path)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_save(path, model, card)

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_signal)
    out = tmp_path / "run"
    state = CancelState()
    with state.installed(), pytest.raises(Cancelled, match="SIGTERM"):
        train(tiny(dataset, out, epochs=3), verbose=False, cancel=state)
    assert signal.getsignal(signal.SIGTERM) is not state.handler  # handlers restored
    assert load_training_state(out / RESUME_STATE)["epoch"] == 0  # written after the signal, complete
    load_checkpoint(out / LAST_CHECKPOINT)  # sha256 verified
    assert not [p.name for p in out.iterdir() if ".partial-" in p.name]


def test_a_second_signal_does_not_wait_for_the_deferred_block():
    state = CancelState()
    with state.installed(), pytest.raises(Cancelled, match="SIGINT"), state.deferred():
        os.kill(os.getpid(), signal.SIGTERM)  # deferred: the block goes on
        assert state.requested == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)   # the second one raises at once
        pytest.fail("the second signal was deferred too")


def test_forked_child_takes_the_default_action_instead_of_raising():
    # DataLoader workers are forked while the handlers are installed: they must not raise
    # Cancelled (the parent, which got the same signal, cleans up)
    with CancelState().installed():
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)
            except BaseException:
                os._exit(7)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # what `cmd &` in a non-interactive shell does


@pytest.mark.parametrize("how", ["SIGTERM-to-group", "SIGINT-to-group", "SIGINT-while-ignored-by-parent"])
def test_train_subprocess_cancels_with_exit_3_and_no_partials(dataset, tmp_path, how):
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(textwrap.dedent(f"""\
        data: {dataset}
        out: {out}
        model_size: tiny
        patch_size: [16, 16, 16]
        epochs: 500
        iters_per_epoch: 4
        num_workers: 1
        val_every: 0
        val_fraction: 0.25
        tensorboard: false
        progress: false
        """))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "IWSegmentationLib", "train", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
        preexec_fn=_ignore_sigint if how.endswith("ignored-by-parent") else None,
    )
    try:
        for line in proc.stdout:
            if line.startswith("epoch 2/500"):  # a worker runs and one epoch was saved
                break
        sig = signal.SIGTERM if how.startswith("SIGTERM") else signal.SIGINT
        if how.endswith("to-group"):  # a scheduler, `kill -- -PGID`, Ctrl-C: the workers get it too
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 3, err[-2000:]
    assert "iwseg train: cancelled: received SIG" in err and "Traceback" not in err
    assert not [p.name for p in out.iterdir() if ".partial-" in p.name]
    assert load_training_state(out / RESUME_STATE)["epoch"] >= 1


def test_evaluate_subprocess_sigterm_exits_3(tmp_path):
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    from IWSegmentationLib.core.imageio import Geometry

    mask = np.zeros((8, 8, 8), np.uint8)
    mask[2:5, 2:5, 2:5] = 1
    for name in ("a", "b"):
        write_image(ref / f"{name}.nrrd", mask, Geometry.identity(mask.shape))
        write_image(pred / f"{name}.nrrd", mask.astype(np.float32), Geometry.identity(mask.shape))
    # the SIGTERM is sent from inside the run, when the first case is being matched, so the
    # test does not depend on timing; the handler under test is the command's own
    driver = textwrap.dedent(f"""\
        import os, signal, sys
        import IWSegmentationLib.cli.commands.evaluate as ev
        real = ev.case_overlaps
        def case_overlaps(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            return real(*args, **kwargs)
        ev.case_overlaps = case_overlaps
        from IWSegmentationLib.cli import main
        sys.exit(main(["evaluate", "--pred", {str(pred)!r}, "--ref", {str(ref)!r},
                       "--json", {str(tmp_path / "r.json")!r}, "--no-progress"]))
        """)
    done = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 3, (done.returncode, done.stderr[-2000:])  # old main: -15 (shell: 143)
    assert "iwseg evaluate: cancelled: received SIGTERM" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred", "ref"]  # no report, no partial
