"""``iwseg train`` failures that were tracebacks or wrong exit codes (issue 23 items 9 and 10):
a non-UTF-8 ``--config``, ``--set batch_size=100000`` (the allocation fails: one line naming
batch_size, exit 2), a 4096³ patch (refused by config validation, bounded by memory), ``out``
equal to or inside the dataset folder, and a full disk (exit 4, no advice to ``--resume``).

Real child processes: the memory limit is RLIMIT_AS and the full disk is RLIMIT_FSIZE (with
SIGXFSZ ignored, a write past the limit fails with EFBIG, as on a full file system), each set in
the child only.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _tiny_training import tiny_config

from IWSegmentationLib.core.errors import InputError
from IWSegmentationLib.training import load_config

REPO = Path(__file__).resolve().parents[2]
PY = [sys.executable, "-m", "IWSegmentationLib"]


def _config_file(tmp_path: Path, data: Path, **overrides) -> Path:
    config = tiny_config(data, tmp_path / "run", **{"epochs": 1, "iters_per_epoch": 2, **overrides})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


def _train(args, *, limits=(), timeout=300) -> subprocess.CompletedProcess:
    def child() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        for which, value in limits:
            resource.setrlimit(which, (value, value))

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*PY, "train", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO, preexec_fn=child)


def test_a_non_utf8_config_is_one_line_exit_2(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("epochs: 2\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1\.yaml is not UTF-8 text \(byte 15"):
        load_config(path)  # main: UnicodeDecodeError (a traceback)
    done = _train(["--config", path], timeout=120)
    assert done.returncode == 2 and "not UTF-8 text" in done.stderr and "Traceback" not in done.stderr


def test_a_batch_too_large_for_memory_is_one_line_exit_2(dataset, tmp_path):
    config = _config_file(tmp_path, dataset)
    # 100000 patches of 16^3 float32 = 1.6 GB for the images alone, over a 1.5 GiB address-space
    # margin above what the interpreter with torch uses (about 2.5 GiB of virtual memory here)
    done = _train(["--config", config, "--set", "batch_size=100000"],
                  limits=[(resource.RLIMIT_AS, 4 * 2**30)])
    assert done.returncode == 2, done.stderr[-3000:]  # main: a RuntimeError traceback, exit 1
    assert "out of memory at batch size 100000 (patch_size [16, 16, 16], cpu): lower batch_size or patch_size" \
        in done.stderr
    assert "Traceback" not in done.stderr


def test_a_patch_no_machine_can_hold_is_refused_by_validation(dataset, tmp_path):
    # 4096^3 voxels * 32 bytes = 2 TiB
    with pytest.raises(InputError, match=r"'patch_size' is \[4096, 4096, 4096\]: one patch needs at least 2.05e\+03 GiB"):
        tiny_config(dataset, tmp_path / "run", patch_size=[4096] * 3)
    tiny_config(dataset, tmp_path / "run", patch_size=[128] * 3)  # 64 MiB: fine


def test_out_equal_to_or_inside_the_dataset_is_refused(dataset, tmp_path):
    for out in (dataset, dataset / "runs" / "a", Path(str(dataset) + "/imagesTr/../")):
        with pytest.raises(InputError, match="config key 'out' must not be the dataset folder"):
            tiny_config(dataset, out)
    tiny_config(dataset, Path(str(dataset) + "-runs"))  # a sibling with a common prefix: fine


def test_train_on_a_full_disk_exits_4_without_advising_resume(dataset, tmp_path):
    config = _config_file(tmp_path, dataset)
    done = _train(["--config", config], limits=[(resource.RLIMIT_FSIZE, 20_000)])  # files of 20 kB at most
    assert done.returncode == 4, done.stderr[-3000:]  # main: 2
    assert "--resume" not in done.stderr and "Traceback" not in done.stderr
    assert not [p for p in (tmp_path / "run").rglob("*") if ".partial-" in p.name]
