"""Multi-channel input: what a second channel costs at inference, and what it buys.

    nice -n 5 python -m scripts.bench multichannel                  # both parts, into docs/benchmarks.md
    nice -n 5 python -m scripts.bench.multichannel [--part cost|effect|both] [--threads 1] [--quick]

1. **cost**: one ``iwseg synth --preset mr --channels 2`` case (48x128x128), the ``small`` U-Net
   built with ``in_channels`` 1 and 2 (same seed), :func:`inference.predict_volume` as ``iwseg
   predict`` runs it (preprocessing, frozen CPU engine, 64^3 windows, overlap 0.25) on channel 0
   alone and on both channels, runs alternated (:func:`scripts.bench.timing.interleaved`): median
   seconds of ``--repeats`` runs after a warm-up round, and the preprocessing
   (:func:`preprocessing.prepare_case`) alone.
2. **effect**: the same data with and without its second channel (``write_dataset`` with the same
   seed writes the same channel 0), a ``tiny`` U-Net trained on each with the same seed, steps
   and settings, then both evaluated lesion-wise (:func:`training.validate`) on held-out cases of
   another seed. A small budget: the numbers compare the two arms, they are not a model's quality.

Each part writes its own block of the report (``multichannel/cost``, ``multichannel/effect``).
``--quick`` (one cost round of the ``tiny`` U-Net on 32 x 64 x 64; 2 training cases, 1 epoch of 2
steps) only checks that it works.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from scripts.bench import report, timing


def cost(repeats: int, shape: tuple[int, int, int] = (48, 128, 128), net: str = "small", patch: int = 64) -> str:
    """The cost table (markdown): ``predict_volume`` with 1 and 2 input channels, alternated."""
    from IWSegmentationLib.core.imageio import Geometry
    from IWSegmentationLib.data.synth import second_sequence, synth_case
    from IWSegmentationLib.inference import predict_volume
    from IWSegmentationLib.nn.architecture import default_config
    from IWSegmentationLib.nn.unet import build_model, network_macs_per_voxel
    from IWSegmentationLib.preprocessing.presets import get_preset
    from IWSegmentationLib.preprocessing.resampling import prepare_case

    case = synth_case((0, 0), shape, "mr")
    image = np.stack([case.image, second_sequence(case, (0, 0, 1))]).astype(np.float32)
    geometry = Geometry.identity(case.image.shape, case.spacing)
    params = get_preset("mr")
    runs = {}
    for channels in (1, 2):
        torch.manual_seed(0)
        model = build_model(default_config(net, in_channels=channels))
        card = {"patch_size": [patch] * 3, "preprocessing": params, "architecture": model.config}
        runs[channels] = (model, card, image[0] if channels == 1 else image)

    def job(channels: int):
        model, card, x = runs[channels]

        def run() -> dict[str, float]:
            t = time.perf_counter()
            prediction = predict_volume(model, x, card, geometry=geometry, device="cpu", on_warning=lambda m: None)
            predict_s = time.perf_counter() - t
            t = time.perf_counter()
            prepare_case(x, geometry, params)
            return {"predict": predict_s, "forward": prediction.stats.seconds_forward,
                    "prepare": time.perf_counter() - t}
        return run

    times = timing.interleaved({channels: job(channels) for channels in runs}, repeats, warmup=1)
    lines = [f"Volume {case.image.shape}, {net} U-Net, {patch}^3 windows, overlap 0.25, {torch.get_num_threads()} "
             f"thread(s), runs alternated 1, 2, 1, 2, ...: median of {repeats} each after a warm-up round. "
             + timing.machine_line(("torch",), threads=torch.get_num_threads()), "",
             "| channels | parameters | conv MFLOP / voxel | predict_volume s | of which forward passes s | "
             "prepare_case s |", "|---:|---:|---:|---:|---:|---:|"]
    for channels, (model, _, _) in runs.items():
        med = timing.medians(times[channels])
        n = sum(p.numel() for p in model.parameters())
        mflop = 2 * network_macs_per_voxel(model) / 1e6
        lines.append(f"| {channels} | {n:,} | {mflop:.4f} | {med['predict']:.3f} | {med['forward']:.3f} | "
                     f"{med['prepare']:.3f} |")
    return "\n".join(lines)


def effect(iterations: int, epochs: int, cases: int, heldout: int, optimizer: str, lr: float, loss: str) -> str:
    """The effect table (markdown): a ``tiny`` U-Net trained on channel 0 alone and on both."""
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
            scores = validate(model, records, config, card, device="cpu", verbose=False)
            rows.append((channels, seconds, {**metric_row(scores), "val_voxel_dice": voxel_dice(model, card, records)}))
    lines = [f"{cases} training cases {shape}, {epochs} x {iterations} steps ({loss}, {optimizer}, lr {lr:g}), "
             f"tiny U-Net, seed 0; held-out {heldout} cases (seed 1000), {lesions} lesions. "
             + timing.machine_line(("torch",), threads=torch.get_num_threads()), "",
             "| input | train s | voxel Dice | object Dice | recall | avg recall 0-5 FP | CPM |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for channels, seconds, row in rows:
        cells = " | ".join(_number(row.get(f"val_{k}"))
                           for k in ("voxel_dice", "object_dice", "recall", "avg_recall_0_5", "cpm"))
        name = "channel 0 only" if channels == 1 else "channels 0 + 1"
        lines.append(f"| {name} | {seconds:.0f} | {cells} |")
    return "\n".join(lines)


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


def main(argv: list[str] | None = None) -> int:
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
    parser.add_argument("--quick", action="store_true", help="tiny sizes and budgets: checks it works")
    report.add_report_argument(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.iterations, args.epochs, args.cases, args.heldout = 1, 2, 1, 2, 1
    torch.set_num_threads(args.threads)
    if args.part in ("cost", "both"):
        text = cost(1, (32, 64, 64), "tiny", 32) if args.quick else cost(args.repeats)
        report.publish("multichannel/cost", text, args.report, argv, quick=args.quick)
    if args.part in ("effect", "both"):
        text = effect(args.iterations, args.epochs, args.cases, args.heldout, args.optimizer, args.lr, args.loss)
        report.publish("multichannel/effect", text, args.report, argv, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
