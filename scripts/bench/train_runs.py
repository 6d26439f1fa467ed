"""Timed runs of a source tree's own ``train()``, for the training and start-up benchmarks.

* :func:`measure_cpu`: iterations/s and data-wait fraction of a short real ``train()``;
* :func:`first_step_marks`: ``iwseg train --config FILE`` run in this process until its first
  optimiser step, with the time marks of its phases.

The start-up benchmark compares source trees (``--old REF``), so these run in a child process
started as a *file* (``python scripts/bench/train_runs.py ...``) with ``PYTHONPATH=<tree>``:
the library imported is then the tree's, whatever its age, and the harness is this one. That is
why this module imports only the standard library at its top and the library inside the
functions (and why the clock starts on its first line, before any heavy import). The training
benchmark imports :func:`measure_cpu` as a module.

    python scripts/bench/train_runs.py first-step CONFIG.yaml RESULT.json
    python scripts/bench/train_runs.py speed DATA SETTINGS.json RESULT.json ITERS EPOCHS
"""

from __future__ import annotations

import time

T_CHILD = time.time()  # the child's first statement: before any heavy import

import importlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

#: Keys of the demo's settings a timed run leaves to each tree's default, as none changes what a
#: run does before its first step: the run never validates, and older trees know fewer validation
#: metrics (de48e32 refuses cpm_object_dice) and no ``license`` (the card's licence, 87c5729).
NOT_TIMED = ("val_metric", "license")


def run_settings(settings: dict) -> dict:
    """``settings`` without the keys of :data:`NOT_TIMED`."""
    return {k: v for k, v in settings.items() if k not in NOT_TIMED}


def measure_cpu(data: Path, settings: dict, *, num_workers: int, iters: int, epochs: int, warmup: int) -> dict:
    """Median iterations/s and data-wait fraction over the timed epochs of a real ``train()``:
    ``warmup`` epochs first (oneDNN builds its kernels, the workers start), then ``epochs`` timed
    ones of ``iters`` iterations, no validation, a constant learning rate."""
    from IWSegmentationLib.training import TrainConfig, train  # the tree under test's (torch)

    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig.from_dict({
            **run_settings(settings), "data": str(data), "out": out, "epochs": warmup + epochs,
            "iters_per_epoch": iters, "num_workers": num_workers, "val_every": 0, "tensorboard": False,
            "progress": False, "lr_schedule": "constant",
        })
        result = train(config, verbose=False)
    timed = result.history[warmup:]
    return {
        "iters_per_s": statistics.median(r["iters_per_s"] for r in timed),
        "data_wait": statistics.median(r["data_wait_fraction"] for r in timed),
        "epochs": len(timed),
        "iters": iters,
    }


class FirstStep(BaseException):
    """Raised by the optimiser hook to stop the run after its first step (a BaseException, so
    neither the trainer nor the CLI turns it into an error message)."""


def _timed(marks: dict, name: str, func):
    """``func`` wrapped so that the seconds of its first call land in ``marks[name]``."""
    def wrapper(*args, **kwargs):
        t = time.time()
        try:
            return func(*args, **kwargs)
        finally:
            marks.setdefault(name, time.time() - t)
    return wrapper


def _replace_everywhere(original, wrapper) -> int:
    """Point every name that holds ``original`` in the library's loaded modules at ``wrapper``
    (``from .inputs import load_training_data`` copies the function into the importing module, so
    patching one module is not enough); returns how many names were replaced."""
    count = 0
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("IWSegmentationLib"):
            for key, value in list(vars(module).items()):
                if value is original:
                    setattr(module, key, wrapper)
                    count += 1
    return count


def _first(*candidates: tuple[str, str]):
    """The first attribute ``(module, name)`` that exists: the trees differ in layout (``data``
    and ``training`` were single modules up to the redesign of issue 10, packages after)."""
    for module, name in candidates:
        try:
            found = getattr(importlib.import_module(module), name, None)
        except ImportError:
            found = None
        if found is not None:
            return found
    return None


def first_step_marks(config: Path) -> dict:
    """Run ``iwseg train --config CONFIG`` in this process until its first optimiser step; the
    wall-clock marks (``child_start``, ``train_entry``, ``first_step``), the seconds of the phases
    ``load_training_data``, ``preload``, ``start_report`` and ``val_check`` (absent where the
    tree has no such step), and the file the ``training`` package was imported from."""
    marks: dict = {"child_start": T_CHILD}
    # the tree under test's modules (torch), patched before the run
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from IWSegmentationLib import training
    from IWSegmentationLib.cli import main as cli_main  # the function, in every layout

    def entered(func):
        def wrapper(*args, **kwargs):
            marks.setdefault("train_entry", time.time())
            return func(*args, **kwargs)
        return wrapper

    def first_step(_optimizer, _args, _kwargs):
        marks["first_step"] = time.time()
        raise FirstStep

    _replace_everywhere(training.train, entered(training.train))
    _replace_everywhere(training.load_training_data,
                        _timed(marks, "load_training_data", training.load_training_data))
    patch_dataset = _first(("IWSegmentationLib.data.loader", "PatchDataset"), ("IWSegmentationLib.data", "PatchDataset"))
    patch_dataset.preload = _timed(marks, "preload", patch_dataset.preload)
    # steps newer trees take before the first step (0 s where a tree lacks them)
    start_report = _first(("IWSegmentationLib.training.report", "log_start_report"))
    if start_report is not None:
        _replace_everywhere(start_report, _timed(marks, "start_report", start_report))
    run_class = _first(("IWSegmentationLib.training.trainer", "_Run"), ("IWSegmentationLib.training", "_Run"))
    if run_class is not None and hasattr(run_class, "_check_validation_cases"):
        run_class._check_validation_cases = _timed(marks, "val_check", run_class._check_validation_cases)
    register_optimizer_step_pre_hook(first_step)
    try:
        rc = cli_main(["train", "--config", str(config)])
    except FirstStep:
        rc = 0
    if "first_step" not in marks:
        raise SystemExit(f"train_runs: the run ended (exit code {rc}) before a training step")
    if "train_entry" not in marks:
        raise SystemExit("train_runs: the first step came without training.train being entered")
    marks["module"] = training.__file__
    return marks


def main(argv: list[str]) -> int:
    """The child process's entry: ``first-step`` or ``speed`` (see the module docstring)."""
    if argv[:1] == ["first-step"] and len(argv) == 3:
        Path(argv[2]).write_text(json.dumps(first_step_marks(Path(argv[1]))), encoding="utf-8")
        return 0
    if argv[:1] == ["speed"] and len(argv) == 6:
        settings = json.loads(Path(argv[2]).read_text(encoding="utf-8"))
        r = measure_cpu(Path(argv[1]), settings, num_workers=settings["num_workers"], iters=int(argv[4]),
                        epochs=int(argv[5]), warmup=1)
        Path(argv[3]).write_text(json.dumps(r), encoding="utf-8")
        return 0
    print("usage: train_runs.py first-step CONFIG RESULT | speed DATA SETTINGS RESULT ITERS EPOCHS",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
