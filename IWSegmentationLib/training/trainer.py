"""The training loop: :func:`train` runs a job as a short sequence of named steps.

The loop is :meth:`_Run.run`; each step (``on_train_start``, ``on_epoch_start``, ``train_step``,
``on_validation``, ``on_epoch_end``, ``on_train_end``) is a method, so the loop reads as the recipe
(as nnU-Net v2's ``run_training`` does).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from ..core.errors import CheckpointError, InputError, OutputError
from ..core.outputs import atomic_output, remove_stale_partials
from ..data.cases import load_case
from ..data.splits import write_splits
from ..nn.architecture import validate_config
from .card import model_card
from .distributed import amp_settings, barrier, cleanup_distributed, seed_everything, setup_distributed
from .inputs import load_training_data, make_patch_dataset, print_note
from .logger import LOG_FILE, RunLogger
from .optim import build_optimizer, build_scheduler
from .report import log_start_report
from .validation import compact_metrics, merging_warning, metric_row, metric_value, validate

if TYPE_CHECKING:
    from ..core.progress import CancelState
    from .config import TrainConfig
    from .distributed import DistInfo
    from .inputs import TrainingData


CONFIG_FILE = "config.yaml"


SPLITS_FILE = "splits.json"


LAST_CHECKPOINT = "last.safetensors"


BEST_CHECKPOINT = "best.safetensors"


RESUME_STATE = "resume.safetensors"


#: The files a run writes (atomically) in its output folder.
RUN_FILES = (CONFIG_FILE, SPLITS_FILE, LAST_CHECKPOINT, BEST_CHECKPOINT, RESUME_STATE, LOG_FILE)


#: Config keys a resumed run may change: they do not alter the sequence of weights it computes.
RESUME_MAY_CHANGE = ("data", "allow_outside_paths", "out", "overwrite", "num_workers", "prefetch_factor", "cache_size", "progress",
                     "tensorboard", "val_every", "val_max_cases", "device", "ddp_timeout_min", "checkpoint_choice",
                     "license", "license_url")


@dataclass
class TrainResult:
    """What a run produced (on every rank; only rank 0 wrote files)."""

    out: Path
    last_checkpoint: Path
    best_checkpoint: Path
    epochs_done: int
    history: list[dict] = field(default_factory=list)
    best_metric: str = ""
    best_value: float | None = None
    best_epoch: int | None = None
    seconds: float = 0.0
    is_main: bool = True
    #: The config's ``checkpoint_choice``: which of the two files is the run's model.
    checkpoint_choice: str = "best"

    @property
    def model_checkpoint(self) -> Path:
        """The run's model: :attr:`best_checkpoint` or :attr:`last_checkpoint`, as ``checkpoint_choice`` says."""
        return self.last_checkpoint if self.checkpoint_choice == "last" else self.best_checkpoint

    def summary(self) -> str:
        best = (f"best {self.best_metric} {self.best_value:.4f} at epoch {self.best_epoch}"
                if self.best_value is not None else "no validation metric")
        return (f"trained {self.epochs_done} epoch(s) in {self.seconds:.0f} s; {best}\n"
                f"  model: {self.model_checkpoint} (checkpoint_choice: {self.checkpoint_choice})\n"
                f"  best checkpoint: {self.best_checkpoint}\n  last checkpoint: {self.last_checkpoint}\n"
                f"  log: {self.out / 'log.csv'}")


def train(config: TrainConfig, *, resume: bool = False, verbose: bool = True,
          on_step: Callable[[int, int, float], None] | None = None,
          on_epoch_end: Callable[[int, dict], None] | None = None,
          cancel: CancelState | None = None) -> TrainResult:
    """Run (or, with ``resume``, continue) the training described by ``config``.

    Launched by ``torchrun`` (``WORLD_SIZE`` > 1) it trains with DistributedDataParallel.
    ``on_step(epoch, step, loss)`` and ``on_epoch_end(epoch, row)`` are called on every rank
    (an exception they raise stops the run as a crash would; tests use this to interrupt a run).
    ``cancel`` (the command line's installed :class:`~IWSegmentationLib.core.progress.CancelState`)
    defers a SIGINT/SIGTERM that arrives while the epoch's files are written (or a batch is
    handed over by a worker) until that is complete; any other time the cancel stops the run
    at once, its temporary files removed.
    """
    info = setup_distributed(config)
    try:
        return _Run(config, info, resume=resume, verbose=verbose, on_step=on_step, on_epoch_end=on_epoch_end,
                    cancel=cancel).run()
    finally:
        if info.owns_group:
            cleanup_distributed()


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: Python's ``MemoryError``, torch's
    ``OutOfMemoryError`` (an accelerator), or the ``RuntimeError`` of torch's CPU allocator
    ("DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class _Run:
    """One training run (see :func:`train`): :meth:`run` is the recipe, each step a method."""

    def __init__(self, config: TrainConfig, info: DistInfo, *, resume: bool, verbose: bool, on_step, on_epoch_end,
                 cancel: CancelState | None = None):
        self.config = config
        self.cancel = cancel
        self.info = info
        self.resume = resume
        self.verbose = verbose and info.is_main
        self.step_callback = on_step
        self.epoch_callback = on_epoch_end
        self.out = Path(config.out)
        self.best: dict[str, Any] = {"metric": config.val_metric, "value": None, "epoch": None}
        self.latest_validation: dict | None = None
        self.latest_operating_points: dict | None = None  # the card's section, from the latest validation
        self.history: list[dict] = []
        self.start_epoch = 0
        self.logger: RunLogger | None = None
        self.bar = None
        self.stream = None
        self.val_cache: dict | None = None

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Set up; then, epoch by epoch, train, validate and save; always close what was opened."""
        t_start = time.perf_counter()
        if self.on_train_start():
            try:
                for epoch in range(self.start_epoch, self.config.epochs):
                    self.on_epoch_start(epoch)
                    row = self.train_epoch(epoch)
                    report = self.on_validation(epoch)
                    self.on_epoch_end(epoch, row, report)
            finally:
                self.on_train_end()
        return self._result(t_start)

    # -- the steps -------------------------------------------------------------------------
    def on_train_start(self) -> bool:
        """Check the output folder, read the data, build the model (restored on resume) and open the
        patch stream. False when the run has nothing left to train."""
        state = self._prepare_output_and_data()
        self._build_model(state)
        if self.start_epoch >= self.config.epochs:
            if self.verbose:
                print_note(f"the run in {self.out} already finished its {self.config.epochs} epochs")
            return False
        if self.verbose:
            amp_on, amp_dtype = self.amp
            with self._out_of_memory_is_bad_input():  # it times one step with the run's batch
                log_start_report(self.model, self.config, self.data, self.info.device, start_epoch=self.start_epoch,
                                 autocast_dtype=amp_dtype if amp_on else None, log=print_note)
        self._open_stream()
        return True

    def on_epoch_start(self, epoch: int) -> None:
        """Put the network in training mode (validation left it in eval mode)."""
        self.train_model.train()

    def train_epoch(self, epoch: int) -> dict:
        """``iters_per_epoch`` steps, then the scheduler's step; returns the epoch's log row."""
        from ..data.loader import next_batch  # lazy: imports torch; importing the trainer stays torch-free

        config = self.config
        iters = config.iters_per_epoch
        wait = 0.0
        losses: list[float] = []
        t0 = time.perf_counter()
        for i in range(iters):
            t = time.perf_counter()
            with self._out_of_memory_is_bad_input():
                with self._cancel_deferred():
                    batch = next_batch(self.stream)  # a worker's error in one line, naming the case
                wait += time.perf_counter() - t
                value = self.train_step(batch)
            if not math.isfinite(value):
                raise InputError(
                    f"training diverged: the {config.loss} loss is {value} at epoch {epoch + 1}, step {i + 1}; "
                    "lower 'lr' or set 'grad_clip'"
                )
            losses.append(value)
            self._report_step(epoch, i, value, losses, wait, t0)
        seconds = time.perf_counter() - t0
        row = {
            "epoch": epoch + 1,  # 1-based, as every number a user reads (bar, log.csv, card)
            "lr": self.optimizer.param_groups[0]["lr"],
            "loss": float(np.mean(losses)),
            "seconds": round(seconds, 3),
            "iters_per_s": round(iters / seconds, 4) if seconds > 0 else None,
            "data_wait_fraction": round(wait / seconds, 4) if seconds > 0 else None,
        }
        self.scheduler.step()
        return row

    @contextlib.contextmanager
    def _out_of_memory_is_bad_input(self):
        """A batch that does not fit in memory is a setting the user chose: one line naming it
        (exit code 2), not torch's allocator traceback."""
        try:
            yield
        except (MemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
            config = self.config
            raise InputError(
                f"out of memory at batch size {config.batch_size} (patch_size {list(config.patch_size)}, "
                f"{self.info.device.type}): lower batch_size or patch_size") from None

    def train_step(self, batch: Mapping[str, Any]) -> float:
        """One optimiser step on one batch (AMP, gradient clipping); returns the loss."""
        import torch  # lazy: `iwseg` starts without torch

        config, device = self.config, self.info.device
        amp_on, amp_dtype = self.amp
        image = batch["image"].to(device, non_blocking=True)
        target = batch["target"].to(device, non_blocking=True)
        weight = batch.get("weight")
        if weight is not None:
            weight = weight.to(device, non_blocking=True)
        if device.type == "cuda":
            image = image.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_on):
            logits = self.train_model(image)
        loss = self.loss_fn(logits.float(), target, weight)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.train_model.parameters(), config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    def on_validation(self, epoch: int) -> dict | None:
        """Rank 0 validates when due (the others wait at the barrier); the report, or None."""
        if not self._validation_due(epoch):
            return None
        report = None
        if self.info.is_main:
            if self.bar is not None:
                self.bar.set_description("validating")
            card = model_card(self.config, self.data, epoch=epoch, validation_metrics=None)
            report = validate(self.model, self.data.val_cases, self.config, card, device=self.info.device,
                              cache=self.val_cache, verbose=self.verbose)
            self.model.train()
            if self.bar is not None:
                self.bar.set_description("training")
        barrier(self.info)
        return report

    def on_epoch_end(self, epoch: int, row: dict, report: dict | None) -> None:
        """Rank 0 updates the best, writes the checkpoints, the resume state and the log; then all ranks
        record the row and call the user's ``on_epoch_end``."""
        if self.info.is_main:
            with self._cancel_deferred():  # the epoch's files are complete, or not written
                improved = self._update_best(epoch, row, report)
                self._save(epoch, improved)
                self.logger.epoch(row, (epoch + 1) * self.config.iters_per_epoch)
            if self.verbose:
                print_note(_epoch_line(row, report, improved, self.config.epochs))
            warning = merging_warning(report)
            if warning:
                print_note(warning)
        barrier(self.info)
        self.history.append(row)
        if self.epoch_callback is not None:
            self.epoch_callback(epoch, row)

    def on_train_end(self) -> None:
        """Close the progress bar, the log and the patch stream (also after a crash)."""
        if self.bar is not None:
            self.bar.close()
        if self.logger is not None:
            self.logger.close()
        self.stream = None

    # -- setting up ------------------------------------------------------------------------
    def _check_output(self) -> None:
        state = self.out / RESUME_STATE
        if self.resume:
            if not state.is_file():
                raise InputError(f"--resume: {self.out} holds no resume state ({RESUME_STATE}); "
                                 "start the run without --resume")
        elif state.is_file() and not self.config.overwrite:
            raise InputError(
                f"output folder {self.out} already holds a training run ({RESUME_STATE}); continue it with "
                "--resume, or choose another 'out', or set overwrite: true to start over"
            )

    def _load_resume_state(self):
        from ..nn.training_state import load_training_state  # lazy: `iwseg` starts without it

        path = self.out / RESUME_STATE
        state = load_training_state(path)
        saved_arch = state.get("architecture")
        # the channels follow the data, read later (run() checks them against the dataset)
        saved_channels = saved_arch.get("in_channels") if isinstance(saved_arch, Mapping) else None
        arch = self.config.model_config(saved_channels if isinstance(saved_channels, int) else None)
        if isinstance(saved_arch, dict):  # keys added since (head_norm) take the value the run was built with
            with contextlib.suppress(InputError):
                saved_arch = validate_config(saved_arch)
        if saved_arch != arch:
            raise CheckpointError(
                f"cannot resume from {path}: it was written by a different architecture "
                f"({_describe_arch(saved_arch)}) than the config asks for ({_describe_arch(arch)}); "
                "resume with the same model settings, or start a new run in another 'out' folder"
            )
        saved = dict(state.get("config") or {})
        now = self.config.to_dict()
        changed = sorted(k for k in now if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != now[k])
        if changed:
            detail = "; ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
            raise InputError(
                f"cannot resume the run in {self.out} with a different config ({detail}); a resumed run must "
                f"repeat the same computation. Only {', '.join(RESUME_MAY_CHANGE)} may change"
            )
        return state

    def _remove_stale_partials(self) -> None:
        """Remove the temporary files of our own outputs that a killed run left behind (SIGKILL,
        power loss: no chance to clean up); nothing else in ``out`` is touched."""
        removed = remove_stale_partials(self.out, RUN_FILES)
        if removed and self.verbose:
            print_note(f"note: removed {len(removed)} temporary file(s) of an earlier run that was killed: "
                 + ", ".join(p.name for p in removed))

    def _check_validation_cases(self, data: TrainingData) -> dict | None:
        """Read every validation case now, on rank 0, so a missing or broken file stops the run
        before the first step (naming the case and file) rather than at the first validation,
        epochs later. Returns the validation cache: with ``cache_size: null`` the cases read here
        stay in memory for the validations (the first one would have cached them anyway)."""
        cache: dict | None = {} if self.config.cache_size is None else None
        if not self.info.is_main or self.config.val_every == 0:
            return cache
        for record in data.val_cases:
            try:
                volume = load_case(record)
            except InputError as exc:
                raise type(exc)(f"validation split: {exc}") from None
            if cache is not None:
                cache[record.id] = volume
        return cache

    def _cancel_deferred(self):
        """Defer a cancel while the epoch's checkpoints and resume state are written, or while a
        batch is received from a DataLoader worker (a cancel in the middle of that handover
        resets the worker's connection, which prints a traceback from the worker)."""
        return self.cancel.deferred() if self.cancel is not None else contextlib.nullcontext()

    def _prepare_output_and_data(self) -> dict | None:
        """Check the output folder, read the resume state and the data, write config and splits;
        returns the resume state (None for a new run)."""
        config, info = self.config, self.info
        if info.is_main:
            self._check_output()
        state = self._load_resume_state() if self.resume else None
        seed_everything(config.seed)
        self.data = load_training_data(config, verbose=self.verbose)
        if state is not None and state.get("splits") and state["splits"] != self.data.splits:
            raise InputError(f"cannot resume the run in {self.out}: the dataset split differs from the one it "
                             "was trained on (check 'data', 'splits' and the dataset folder)")
        if state is not None and (state.get("architecture") or {}).get("in_channels", 1) != self.data.channels:
            raise InputError(f"cannot resume the run in {self.out}: it was trained on images of "
                             f"{state['architecture'].get('in_channels', 1)} channel(s), the dataset's have "
                             f"{self.data.channels}")
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._remove_stale_partials()
            if config.overwrite and not self.resume:
                (self.out / RESUME_STATE).unlink(missing_ok=True)
            self._write_run_files(self.data, write_splits)
        self.val_cache = self._check_validation_cases(self.data)
        barrier(info)
        return state

    def _build_model(self, state: dict | None) -> None:
        """Network, loss, optimiser, scheduler and AMP scaler, restored from ``state`` when resuming."""
        import torch  # lazy: `iwseg` starts without torch

        from ..nn.losses import get_loss  # lazy: imports torch
        from ..nn.unet import build_model  # lazy: imports torch

        config, info = self.config, self.info
        device = info.device
        model = build_model(config.model_config(self.data.channels)).to(device)
        if config.init_checkpoint and state is None:
            self._init_from_checkpoint(model)
        self.loss_fn = get_loss(config.loss, **config.loss_params)
        self.optimizer = build_optimizer(model, config)
        self.scheduler = build_scheduler(self.optimizer, config)
        amp_on, amp_dtype, use_scaler = amp_settings(config, device)
        self.amp = (amp_on, amp_dtype)
        self.scaler = torch.amp.GradScaler(device.type if device.type == "cuda" else "cpu", enabled=use_scaler)
        if state is not None:
            self._restore(model, state)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last_3d)
        self.model = model
        self.train_model = model
        if info.distributed:
            from torch.nn.parallel import DistributedDataParallel  # lazy: `iwseg` starts without torch

            self.train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                       else None)

    def _restore(self, model, state: dict) -> None:
        """Continue exactly where the resume state stopped: weights, optimiser, scheduler, scaler, RNG."""
        from ..nn.training_state import restore_rng_state  # lazy: `iwseg` starts without it

        model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.best = dict(state.get("best") or self.best)
        self.latest_validation = state.get("latest_validation")
        self.latest_operating_points = state.get("latest_operating_points")
        self.start_epoch = int(state["epoch"]) + 1
        restore_rng_state(state["rng"])
        if self.verbose:
            print_note(f"resuming {self.out} at epoch {self.start_epoch + 1}/{self.config.epochs}")

    def _open_stream(self) -> None:
        """The patch stream from the first step still to train, the run log and the progress bar."""
        from ..data.loader import make_loader  # lazy: imports torch

        config, info = self.config, self.info
        iters, start = config.iters_per_epoch, self.start_epoch
        dataset = make_patch_dataset(config, self.data.train_cases, self.data.params, rank=info.rank,
                                     world_size=info.world_size, start_step=start * iters,
                                     steps=(config.epochs - start) * iters, lesion_counts=self.data.lesion_counts)
        if config.cache_size is None:
            dataset.preload()
        loader = make_loader(dataset, num_workers=config.num_workers, pin_memory=info.device.type == "cuda",
                             prefetch_factor=config.prefetch_factor)
        self.logger = RunLogger(self.out, enabled=info.is_main, tensorboard=config.tensorboard,
                                start_epoch=start, iters_per_epoch=iters)
        if self.verbose and config.progress:
            from tqdm import tqdm  # lazy: `iwseg` starts without tqdm (~0.25 s)

            self.bar = tqdm(total=config.epochs * iters, initial=start * iters, desc="training", unit="it",
                            dynamic_ncols=True)
        self.stream = iter(loader)

    # -- during an epoch -------------------------------------------------------------------
    def _report_step(self, epoch: int, i: int, value: float, losses: list[float], wait: float, t0: float) -> None:
        """The step's loss to the log, the progress bar and the user's ``on_step``."""
        config = self.config
        iters = config.iters_per_epoch
        if self.info.is_main:
            self.logger.step(epoch * iters + i, value)
        if self.bar is not None:
            self.bar.update(1)
            if i % 5 == 0 or i == iters - 1:
                self.bar.set_postfix(epoch=f"{epoch + 1}/{config.epochs}", loss=f"{np.mean(losses[-20:]):.4f}",
                                     wait=f"{100 * wait / max(time.perf_counter() - t0, 1e-9):.0f}%",
                                     refresh=False)
        if self.step_callback is not None:
            self.step_callback(epoch, i, value)

    def _validation_due(self, epoch: int) -> bool:
        config = self.config
        if config.val_every == 0 or not self.data.val_cases:
            return False
        return (epoch + 1) % config.val_every == 0 or epoch == config.epochs - 1

    # -- saving ----------------------------------------------------------------------------
    def _update_best(self, epoch: int, row: dict, report: dict | None) -> bool:
        """Record the validation in ``row`` and the best so far; whether this epoch is the new best
        (every epoch is, when the run does not validate: then "best" is the last)."""
        config = self.config
        improved = False
        if report is not None:
            self.latest_validation = compact_metrics(report, epoch + 1)
            points = report.get("operating_points")
            self.latest_operating_points = None if points is None else {**points, "epoch": epoch + 1}
            row.update(metric_row(report))
            value = metric_value(report, config.val_metric)
            if value is not None and (self.best["value"] is None or value > self.best["value"]):
                self.best = {"metric": config.val_metric, "value": value, "epoch": epoch + 1}
                improved = True
        no_validation = config.val_every == 0 or not self.data.val_cases
        if no_validation:
            self.best = {"metric": "last", "value": None, "epoch": epoch + 1}
            improved = True
        row["best"] = int(improved)
        return improved

    def _save(self, epoch: int, improved: bool) -> None:
        """The last (and, if improved, best) checkpoint with its model card, and the resume state."""
        from ..nn.checkpoint import save_checkpoint  # lazy: `iwseg` starts without it
        from ..nn.training_state import capture_rng_state, save_training_state  # lazy: as above

        config, model = self.config, self.model
        card = model_card(config, self.data, epoch=epoch, validation_metrics=self.latest_validation,
                          world_size=self.info.world_size, operating_points=self.latest_operating_points)
        _guarded_write(self.out / LAST_CHECKPOINT, lambda p: save_checkpoint(p, model, card))
        if improved:
            _guarded_write(self.out / BEST_CHECKPOINT, lambda p: save_checkpoint(p, model, card))
        state = {
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": capture_rng_state(),
            "best": self.best,
            "latest_validation": self.latest_validation,
            "latest_operating_points": self.latest_operating_points,
            "architecture": config.model_config(self.data.channels),
            "config": config.to_dict(),
            "splits": self.data.splits,
        }
        _guarded_write(self.out / RESUME_STATE, lambda p: save_training_state(p, state))

    def _write_run_files(self, data: TrainingData, write_splits) -> None:
        import yaml  # lazy: `iwseg` starts without yaml

        with atomic_output(self.out / CONFIG_FILE) as tmp:
            tmp.write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False), encoding="utf-8")
        write_splits(self.out / SPLITS_FILE, data.splits)

    def _init_from_checkpoint(self, model) -> None:
        from ..nn.checkpoint import load_checkpoint  # lazy: `iwseg` starts without it

        source, card = load_checkpoint(self.config.init_checkpoint)
        if card["architecture"] != model.config:
            raise CheckpointError(
                f"init_checkpoint {self.config.init_checkpoint} has a different architecture "
                f"({_describe_arch(card['architecture'])}) than the config ({_describe_arch(model.config)})"
            )
        model.load_state_dict(source.state_dict())

    def _result(self, t_start: float) -> TrainResult:
        return TrainResult(
            out=self.out, last_checkpoint=self.out / LAST_CHECKPOINT, best_checkpoint=self.out / BEST_CHECKPOINT,
            epochs_done=self.config.epochs,
            history=self.history, best_metric=self.best.get("metric", ""), best_value=self.best.get("value"),
            best_epoch=self.best.get("epoch"), seconds=time.perf_counter() - t_start, is_main=self.info.is_main,
            checkpoint_choice=self.config.checkpoint_choice,
        )


def _epoch_line(row: dict, report: dict | None, improved: bool, epochs: int) -> str:
    """The console line of an epoch: loss, lr, speed, data wait and, when validated, the metrics."""
    parts = [f"epoch {row['epoch']}/{epochs}", f"loss {row['loss']:.4f}", f"lr {row['lr']:.2g}",
             f"{row['iters_per_s']:.2f} it/s", f"data wait {100 * row['data_wait_fraction']:.1f}%"]
    if report is not None:
        for key in ("cpm", "object_dice", "cpm_object_dice", "recall", "avg_recall_0_5"):
            v = row.get(f"val_{key}")
            parts.append(f"{key} {'n/a' if v is None else f'{v:.3f}'}")
        small = row.get("val_small_cpm")
        parts.append(f"small cpm {'n/a' if small is None else f'{small:.3f}'}")
        if improved:
            parts.append("(best)")
    return " | ".join(parts)


def _describe_arch(arch: Any) -> str:
    if not isinstance(arch, Mapping):
        return repr(arch)
    return (f"channels {arch.get('channels')}, blocks_per_level {arch.get('blocks_per_level')}, "
            f"in_channels {arch.get('in_channels', 1)}")


def _guarded_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Run an atomic writer; a failure (disk full, permissions) keeps the previous file and is
    reported as an :class:`OutputError` (exit code 4) naming the file. ``--resume`` is advised
    only when a resume state is there for it to continue from (before the first one is written,
    a ``--resume`` would be refused)."""
    try:
        write(path)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if (path.parent / RESUME_STATE).is_file():
            then = "free disk space and continue with --resume (from the last resume state written)"
        else:
            then = "free disk space and start the run again (no resume state was written yet)"
        raise OutputError(f"could not write {path}: {reason}. The previous {path.name} (if any) is intact; {then}") \
            from exc
