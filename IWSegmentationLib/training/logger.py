"""The run log: ``OUT/log.csv`` (one row per epoch) and, when installed, TensorBoard."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping

from ..core.outputs import atomic_output

#: The run log's file name inside OUT.
LOG_FILE = "log.csv"

#: Columns of OUT/log.csv, one row per epoch (validation columns are empty when not validated).
CSV_COLUMNS = (
    "epoch", "lr", "loss", "seconds", "iters_per_s", "data_wait_fraction",
    "val_cpm", "val_avg_recall_0_5", "val_object_dice", "val_recall", "val_cpm_object_dice",
    "val_small_avg_recall_0_5", "val_medium_avg_recall_0_5", "val_large_avg_recall_0_5",
    "val_small_object_dice", "val_medium_object_dice", "val_large_object_dice", "best",
)


class RunLogger:
    """Writes the per-epoch CSV log and TensorBoard scalars; does nothing when ``enabled`` is False.

    On resume, rows and events of epochs after the ``start_epoch`` finished ones (from a run
    killed mid-way) are dropped, so the log reads as if the run had never stopped. The CSV's
    ``epoch`` column counts from 1, like the progress bar and the model card.
    """

    def __init__(self, out: Path, *, enabled: bool, tensorboard: bool, start_epoch: int, iters_per_epoch: int):
        self.enabled = enabled
        self.csv_path = out / LOG_FILE
        self.writer = None
        if not enabled:
            return
        self._truncate_csv(start_epoch)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # lazy: imports torch
            except ImportError:  # tensorboard is an optional dependency (the [train] extra)
                print("note: tensorboard is not installed; TensorBoard scalars are skipped "
                      "(pip install tensorboard)", flush=True)
            else:
                purge = start_epoch * iters_per_epoch if start_epoch else None
                self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=purge)

    def _truncate_csv(self, start_epoch: int) -> None:
        rows = []
        if self.csv_path.is_file() and start_epoch > 0:
            with open(self.csv_path, newline="", encoding="utf-8") as fh:
                rows = [r for r in csv.DictReader(fh) if r.get("epoch", "").isdigit() and int(r["epoch"]) <= start_epoch]
        with atomic_output(self.csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def step(self, global_step: int, loss: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("train/loss_step", loss, global_step)

    def epoch(self, row: Mapping[str, Any], global_step: int) -> None:
        if not self.enabled:
            return
        with open(self.csv_path, "a", newline="", encoding="utf-8") as fh:
            csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore").writerow(
                {k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS}
            )
        if self.writer is not None:
            for key, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("iters_per_s", "train/iters_per_s"),
                             ("data_wait_fraction", "train/data_wait_fraction")):
                if row.get(key) is not None:
                    self.writer.add_scalar(tag, float(row[key]), global_step)
            for key, value in row.items():
                if key.startswith("val_") and value is not None:
                    self.writer.add_scalar(_tensorboard_tag(key), float(value), global_step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _tensorboard_tag(key: str) -> str:
    """``val_small_avg_recall_0_5`` -> ``val/small/avg_recall_0_5``; ``val_cpm`` -> ``val/cpm``."""
    name = key[len("val_"):]
    group, _, rest = name.partition("_")
    return f"val/{group}/{rest}" if group in ("small", "medium", "large") else f"val/{name}"
