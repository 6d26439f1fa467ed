#!/usr/bin/env python
"""Multi-channel input: what a second channel costs at inference, and what it buys.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736 \\
        nice -n 5 python scripts/bench_multichannel.py [--part cost|effect|both] [--threads 1]

1. **cost**: one ``iwseg synth --preset mr --channels 2`` case (48x128x128), the ``small`` U-Net
   built with ``in_channels`` 1 and 2 (same seed), :func:`inference.predict_volume` as ``iwseg
   predict`` runs it (preprocessing, frozen CPU engine, 64^3 windows, overlap 0.25) on channel 0
   alone and on both channels: median seconds of ``--repeats`` runs after a warm-up run, and the
   preprocessing (:func:`preprocessing.prepare_case`) alone.
2. **effect**: the same data with and without its second channel (``write_dataset`` with the same
   seed writes the same channel 0), a ``tiny`` U-Net trained on each with the same seed, steps
   and settings, then both evaluated lesion-wise (:func:`training.validate`) on held-out cases of
   another seed. A small budget: the numbers compare the two arms, they are not a model's quality.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def cost(repeats: int) -> None:
    from IWSegmentationLib.core.imageio import Geometry
    from IWSegmentationLib.data.synth import second_sequence, synth_case
    from IWSegmentationLib.inference import predict_volume
    from IWSegmentationLib.nn.architecture import default_config
    from IWSegmentationLib.nn.unet import build_model, network_macs_per_voxel
    from IWSegmentationLib.preprocessing import get_preset, prepare_case

    case = synth_case((0, 0), (48, 128, 128), "mr")
    image = np.stack([case.image, second_sequence(case, (0, 0, 1))]).astype(np.float32)
    geometry = Geometry.identity(case.image.shape, case.spacing)
    params = get_preset("mr")
    print(f"volume {case.image.shape}, small U-Net, 64^3 windows, overlap 0.25, {torch.get_num_threads()} thread(s), "
          f"runs alternated 1, 2, 1, 2, ...: median of {repeats} each after a warm-up")
    runs = {}
    for channels in (1, 2):
        torch.manual_seed(0)
        model = build_model(default_config("small", in_channels=channels))
        card = {"patch_size": [64, 64, 64], "preprocessing": params, "architecture": model.config}
        x = image[0] if channels == 1 else image
        runs[channels] = (model, card, x)
        predict_volume(model, x, card, geometry=geometry, device="cpu", on_warning=lambda m: None)  # warm-up
    times = {c: {"predict": [], "forward": [], "prepare": []} for c in runs}
    for _ in range(repeats):
        for channels, (model, card, x) in runs.items():
            t = time.perf_counter()
            prediction = predict_volume(model, x, card, geometry=geometry, device="cpu", on_warning=lambda m: None)
            times[channels]["predict"].append(time.perf_counter() - t)
            times[channels]["forward"].append(prediction.stats.seconds_forward)
            t = time.perf_counter()
            prepare_case(x, geometry, params)
            times[channels]["prepare"].append(time.perf_counter() - t)
    print("| channels | parameters | conv MFLOP / voxel | predict_volume s | of which forward passes s | prepare_case s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for channels, (model, _, _) in runs.items():
        med = {k: statistics.median(v) for k, v in times[channels].items()}
        n = sum(p.numel() for p in model.parameters())
        mflop = 2 * network_macs_per_voxel(model) / 1e6
        print(f"| {channels} | {n:,} | {mflop:.4f} | {med['predict']:.3f} | {med['forward']:.3f} | {med['prepare']:.3f} |")


def effect(iterations: int, epochs: int, cases: int, heldout: int, optimizer: str, lr: float, loss: str) -> None:
    from IWSegmentationLib.data import load_dataset
    from IWSegmentationLib.data.synth import write_dataset
    from IWSegmentationLib.nn.checkpoint import load_checkpoint
    from IWSegmentationLib.training import TrainConfig, metric_row, train, validate

    shape = (32, 64, 64)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = []
        for channels in (1, 2):
            data, test = tmp / f"data{channels}", tmp / f"test{channels}"
            write_dataset(data, cases, 0, "mr", shape=shape, channels=channels)
            lesions = write_dataset(test, heldout, 1000, "mr", shape=shape, channels=channels)["lesions_total"]
            config = TrainConfig.from_dict({
                "data": str(data), "out": str(tmp / f"run{channels}"), "model_size": "tiny",
                "patch_size": [32, 32, 32], "preprocessing": "mr", "epochs": epochs, "iters_per_epoch": iterations,
                "val_fraction": 0.0, "val_every": 0, "batch_size": 2, "optimizer": optimizer, "lr": lr, "loss": loss, "num_workers": 0, "tensorboard": False,
                "progress": False, "seed": 0, "empty_cases": "warn", "size_preset": "metastases",
            })
            t = time.perf_counter()
            result = train(config, verbose=False)
            seconds = time.perf_counter() - t
            model, card = load_checkpoint(result.last_checkpoint)
            records = load_dataset(test).cases
            report = validate(model, records, config, card, device="cpu", verbose=False)
            rows.append((channels, seconds, {**metric_row(report), "val_voxel_dice": voxel_dice(model, card, records)}))
        print(f"{cases} training cases {shape}, {epochs} x {iterations} steps ({loss}, {optimizer}, lr {lr:g}), tiny U-Net, seed 0; "
              f"held-out {heldout} cases (seed 1000), {lesions} lesions")
        print("| input | train s | voxel Dice | object Dice | recall | avg recall 0-5 FP | CPM |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for channels, seconds, row in rows:
            cells = " | ".join(_number(row.get(f"val_{k}"))
                               for k in ("voxel_dice", "object_dice", "recall", "avg_recall_0_5", "cpm"))
            name = "channel 0 only" if channels == 1 else "channels 0 + 1"
            print(f"| {name} | {seconds:.0f} | {cells} |")


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def voxel_dice(model, card, records) -> float:
    """Voxel Dice of ``p > threshold`` over all held-out voxels pooled: 2 TP / (2 TP + FP + FN)."""
    from IWSegmentationLib.data import load_case
    from IWSegmentationLib.inference import predict_volume

    tp = fp = fn = 0
    for record in records:
        volume = load_case(record)
        mask = predict_volume(model, volume.image, card, geometry=volume.geometry, device="cpu",
                              on_warning=lambda m: None).mask.astype(bool)
        ref = volume.lesion.astype(bool)
        tp, fp, fn = tp + int((mask & ref).sum()), fp + int((mask & ~ref).sum()), fn + int((~mask & ref).sum())
    return 2 * tp / max(2 * tp + fp + fn, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("cost", "effect", "both"), default="both")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--heldout", type=int, default=6)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--loss", default="bce")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part in ("cost", "both"):
        cost(args.repeats)
    if args.part in ("effect", "both"):
        effect(args.iterations, args.epochs, args.cases, args.heldout, args.optimizer, args.lr, args.loss)


if __name__ == "__main__":
    main()
