#!/usr/bin/env python
"""The paper's loss comparison (Shirokikh et al., MICCAI 2020, Table 2) on synthetic data.

Trains the same network with each loss -- bce, iw-bce, focal, iw-focal, dice, iw-dice, asl,
iw-asl, wce, gdl, dbce, combo -- and a peer reference arm (MONAI's own ``UNet`` trained with
``monai.losses.DiceLoss`` on the very same patch stream), for each optimiser recipe (the
paper's SGD and Adam) and each seed, on the same synthetic multi-lesion training set, for the
same number of *iterations* (so the result does not depend on machine load). Every run
predicts a separate held-out synthetic set; its probabilities are kept, and the table is
scored from them with the metrics code as it is when the table is written. The markdown has,
per optimiser, a table in the shape of the paper's Table 2 (the 7-point CPM, the paper's
"avg Recall", and object Dice, overall and per size group), each cell the mean over seeds
± the std over seeds, with the mean bootstrap std beside it, and the paper's numbers.

    python scripts/compare_losses.py                                  # full comparison (see docs/results)
    python scripts/compare_losses.py --quick --markdown /tmp/t.md     # smoke run (minutes)
    python scripts/compare_losses.py --table-only                     # re-score kept runs, no training

Finished runs are kept in ``--work``, so an interrupted comparison continues where it stopped
when run again with the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import _bench
import numpy as np

REPO = Path(__file__).resolve().parents[1]
LOSSES = ("bce", "iw-bce", "focal", "iw-focal", "dice", "iw-dice", "asl", "iw-asl", "wce", "gdl", "dbce", "combo")
#: The peer reference arm: MONAI's UNet + DiceLoss on our patches (skipped when MONAI is absent).
PEER = "monai-dice"
ARMS = LOSSES + (PEER,)

#: The paper's Table 2 (hold-out; avg recall = 7-point CPM / object Dice), from
#: ../shared/reference/method-notes.md and the paper (Metastases, their private MR data set).
#: DBCE and Combo are not in the paper.
PAPER = {
    "dice": {"LUNA16": (0.71, 0.76), "LiTS": (0.62, 0.63), "Metastases": (0.55, 0.69)},
    "iw-dice": {"LUNA16": (0.73, 0.77), "LiTS": (0.72, 0.49), "Metastases": (0.57, 0.68)},
    "bce": {"LUNA16": (0.42, 0.57), "LiTS": (0.47, 0.61), "Metastases": (0.47, 0.67)},
    "iw-bce": {"LUNA16": (0.67, 0.56), "LiTS": (0.59, 0.53), "Metastases": (0.52, 0.66)},
    "asl": {"LUNA16": (0.68, 0.77), "LiTS": (0.66, 0.63), "Metastases": (0.55, 0.71)},
    "iw-asl": {"LUNA16": (0.70, 0.76), "LiTS": (0.73, 0.53), "Metastases": (0.59, 0.66)},
    "focal": {"LUNA16": (0.35, 0.51), "LiTS": (0.50, 0.58), "Metastases": (0.40, 0.64)},
    "iw-focal": {"LUNA16": (0.55, 0.54), "LiTS": (0.62, 0.48), "Metastases": (0.52, 0.63)},
    "wce": {"LUNA16": (0.74, 0.50), "LiTS": (0.52, 0.41), "Metastases": (0.54, 0.39)},
    "gdl": {"LUNA16": (0.69, 0.73), "LiTS": (0.69, 0.60), "Metastases": (0.53, 0.70)},
}


#: Synthetic data: lung-CT-like volumes (1.25 x 0.7 x 0.7 mm) with vessels, about 5.5 nodules
#: per case of equivalent diameters 2-40 voxels, many small. Held-out cases come from another seed.
DATA = {"preset": "ct-lung", "shape": [48, 96, 96], "train_cases": 24, "heldout_cases": 12,
        "train_seed": 0, "heldout_seed": 2000}
#: The training budget, the same for every arm (iwseg train config keys), before the optimiser
#: recipe and the seed: the paper's sampling (p = 0.5 lesion-centred patches, batch 2, no
#: augmentation) and lr drop to 1/10 at 80%, with 150 steps of 32x48x48 patches (78 runs must fit
#: a developer session on 2 shared cores).
TRAIN = {
    "model_size": "tiny", "patch_size": [32, 48, 48], "batch_size": 2,
    "epochs": 3, "iters_per_epoch": 50, "lr_schedule": "step", "lr_decay_at": 0.8,
    "lesion_probability": 0.5, "preprocessing": "ct-lung", "size_preset": "lung",
    "val_fraction": 0.0, "val_every": 0, "num_workers": 0,
}
#: The optimiser recipes. ``sgd`` is the paper's (Nesterov 0.9), with lr 0.1 instead of its 1e-2
#: because the budget is 1/67 of its 10,000 steps; ``adam`` is the demo's.
OPTIMISERS = {
    "sgd": {"optimizer": "sgd", "lr": 0.1, "lr_final": 0.01, "momentum": 0.9, "nesterov": True},
    "adam": {"optimizer": "adam", "lr": 1e-3, "lr_final": 1e-4},
}
SEEDS = (0, 1, 2)
#: MONAI's UNet for the peer arm: 150 k parameters (ours, `tiny`: 86 k), residual units, BatchNorm.
PEER_NET = {"channels": (8, 16, 32, 64), "strides": (2, 2, 2), "num_res_units": 1, "norm": "batch"}
#: Torch threads per training process; ``--jobs`` processes run side by side.
THREADS = 1
QUICK = {"data": {"shape": [32, 64, 64], "train_cases": 4, "heldout_cases": 3},
         "train": {"patch_size": [32, 32, 32], "epochs": 1, "iters_per_epoch": 3},
         "arms": ("dice", "iw-dice", PEER), "seeds": (0,), "optimisers": ("sgd",)}


def peer_available() -> bool:
    try:
        import monai  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- runs


def run_id(optimiser: str, arm: str, seed: int) -> str:
    return f"{optimiser}-{arm}-s{seed}"


def make_data(work: Path, data: dict) -> tuple[Path, Path]:
    """Write the training and held-out sets once (re-used when ``dataset.json`` matches)."""
    from IWSegmentationLib.data.synth import write_dataset

    out = []
    for name, n, seed in (("train", data["train_cases"], data["train_seed"]),
                          ("heldout", data["heldout_cases"], data["heldout_seed"])):
        folder = work / "data" / name
        meta = folder / "dataset.json"
        if meta.is_file():
            summary = json.loads(meta.read_text()).get("iwseg", {})
            if (summary.get("seed"), summary.get("size"), len(summary.get("lesions_per_case", []))) == \
                    (seed, list(data["shape"]), n):
                out.append(folder)
                continue
        summary = write_dataset(folder, n, seed, data["preset"], shape=data["shape"], overwrite=True)
        print(f"  {name}: {n} cases, {summary['lesions_total']} lesions -> {folder}", flush=True)
        out.append(folder)
    return out[0], out[1]


def _config(arm: str, settings: dict, train_dir: Path, out: Path):
    from IWSegmentationLib.training import TrainConfig

    return TrainConfig.from_dict({**settings, "loss": "dice" if arm == PEER else arm, "data": str(train_dir),
                                  "out": str(out), "overwrite": True, "tensorboard": False, "progress": False})


def train_ours(config):
    """``iwseg train``'s own loop; returns the trained network, its card and the last loss."""
    from IWSegmentationLib.nn.checkpoint import load_checkpoint
    from IWSegmentationLib.training import train

    result = train(config, verbose=False)
    model, card = load_checkpoint(result.last_checkpoint)
    return model, card, result.history[-1]["loss"]


def train_peer(config):
    """MONAI's UNet + DiceLoss(sigmoid=True), fed the same patch stream as our ``dice`` arm
    (the trainer's own data path and seed), with the same optimiser and schedule."""
    import torch
    from monai.losses import DiceLoss
    from monai.networks.nets import UNet

    from IWSegmentationLib.training import (
        build_optimizer,
        build_scheduler,
        load_training_data,
        make_patch_dataset,
        model_card,
    )

    torch.manual_seed(config.seed)
    data = load_training_data(config, verbose=False)
    steps = config.epochs * config.iters_per_epoch
    stream = iter(make_patch_dataset(config, data.train_cases, data.params, steps=steps))
    net = UNet(spatial_dims=3, in_channels=1, out_channels=1, **PEER_NET)
    loss_fn = DiceLoss(sigmoid=True)
    optimizer, value = build_optimizer(net, config), float("nan")
    scheduler = build_scheduler(optimizer, config)
    net.train()
    for _epoch in range(config.epochs):
        for _ in range(config.iters_per_epoch):
            batch = next(stream)
            loss = loss_fn(net(batch["image"]), batch["target"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
        scheduler.step()
    card = model_card(config, data, epoch=config.epochs - 1, validation_metrics=None)
    return net.eval(), card, value


def predict_heldout(model, card: dict, heldout: Path) -> dict[str, np.ndarray]:
    """Probabilities of every held-out case (the card's own preprocessing and window), float16."""
    from IWSegmentationLib.data import load_case, load_dataset
    from IWSegmentationLib.inference import predict_volume

    out = {}
    for record in load_dataset(heldout).cases:
        volume = load_case(record)
        pred = predict_volume(model, volume.image, card, geometry=volume.geometry, organ_mask=volume.organ,
                              device="cpu")
        out[record.id] = pred.probabilities.astype(np.float16)
    return out


def run_one(optimiser: str, arm: str, seed: int, work: Path, train_dir: Path, heldout: Path, settings: dict,
            data: dict) -> None:
    """Train one arm, predict the held-out set, keep its probabilities and a run record (atomically)."""
    import torch

    from IWSegmentationLib.core.outputs import atomic_output

    torch.set_num_threads(THREADS)
    rid = run_id(optimiser, arm, seed)
    t = time.perf_counter()
    config = _config(arm, settings, train_dir, work / "runs" / rid)
    model, card, final_loss = (train_peer if arm == PEER else train_ours)(config)
    train_seconds = time.perf_counter() - t
    probs = predict_heldout(model, card, heldout)
    with atomic_output(work / "probs" / f"{rid}.npz") as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **probs)
    record = {"run": rid, "optimiser": optimiser, "arm": arm, "seed": seed, "settings": settings, "data": data,
              "threshold": card["threshold"], "final_loss": final_loss, "train_seconds": train_seconds,
              "seconds": time.perf_counter() - t, "parameters": sum(p.numel() for p in model.parameters())}
    with atomic_output(work / "reports" / f"{rid}.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    print(f"  {rid}: {record['seconds']:.0f} s (train {train_seconds:.0f} s), final loss {final_loss:.4f}", flush=True)


def _done(work: Path, rid: str, settings: dict, data: dict) -> bool:
    """Whether run ``rid`` is kept (its record and probabilities) with these settings and data."""
    record = work / "reports" / f"{rid}.json"
    if not (record.is_file() and (work / "probs" / f"{rid}.npz").is_file()):
        return False
    saved = json.loads(record.read_text())
    return saved.get("settings") == settings and saved.get("data") == data


def run_parallel(todo: list[tuple[str, str, int]], args, work: Path) -> None:
    """Run each (optimiser, arm, seed) in its own process, ``args.jobs`` at a time, logs in work/logs/."""
    (work / "logs").mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    base = [sys.executable, str(Path(__file__).resolve()), "--worker", "--work", str(work)]
    if args.quick:
        base.append("--quick")
    for flag, value in (("--epochs", args.epochs), ("--iters", args.iters)):
        if value:
            base += [flag, str(value)]
    for pair in args.overrides:
        base += ["--set", pair]
    pending, running = list(todo), []
    while pending or running:
        while pending and len(running) < max(1, args.jobs):
            optimiser, arm, seed = pending.pop(0)
            rid = run_id(optimiser, arm, seed)
            log = open(work / "logs" / f"{rid}.log", "w")  # noqa: SIM115 (closed when the process ends)
            print(f"[start] {rid} ({len(pending)} waiting)", flush=True)
            cmd = base + ["--optimisers", optimiser, "--arms", arm, "--seeds", str(seed)]
            running.append((rid, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        time.sleep(2)
        for item in list(running):
            rid, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                tail = (work / "logs" / f"{rid}.log").read_text(errors="replace").strip().splitlines()[-1:]
                print(f"[done] {rid} (exit {proc.returncode}) {tail[0] if tail else ''}", flush=True)


# --------------------------------------------------------------------------- scoring


def score_run(work: Path, rid: str, heldout_cases: dict, size_preset: str) -> dict:
    """The run's held-out report, scored now from its kept probabilities."""
    from IWSegmentationLib.core.lesions import size_thresholds
    from IWSegmentationLib.evaluation import evaluate_cases, match_case

    record = json.loads((work / "reports" / f"{rid}.json").read_text())
    thresholds = size_thresholds(size_preset)
    results = []
    with np.load(work / "probs" / f"{rid}.npz") as probs:
        for case_id, volume in heldout_cases.items():
            results.append(match_case(probs[case_id].astype(np.float32), volume.lesion, volume.geometry.spacing_zyx,
                                      threshold=record["threshold"], thresholds=thresholds, case=case_id))
    report = evaluate_cases(results, seed=0)
    return {**summarise(report, results), "record": record}


def object_dice_bootstrap(results, group: str | None, n_resamples: int = 100, fraction: float = 0.8) -> dict:
    """Mean and std of the object Dice over ``n_resamples`` draws of 80% of the images without
    replacement (the same resampling as the metrics module's recall bootstrap), images by case."""
    ordered = sorted(results, key=lambda r: r.case)
    n = len(ordered)
    size = max(1, int(np.floor(fraction * n + 0.5)))
    rng = np.random.default_rng(0)
    per_image = [np.asarray([les.hit_dice for les in r.lesions
                             if les.hit_dice > 0 and (group is None or les.size_group == group)]) for r in ordered]
    means = []
    for _ in range(n_resamples):
        values = np.concatenate([per_image[i] for i in rng.choice(n, size=size, replace=False)])
        if values.size:
            means.append(values.mean())
    return {"mean": float(np.mean(means)) if means else None, "std": float(np.std(means)) if means else None}


def summarise(report: dict, results) -> dict:
    def part(sub: dict, group: str | None) -> dict:
        boot = sub.get("bootstrap") or {}
        return {
            "n_lesions": sub.get("n_lesions"),
            "cpm": sub.get("cpm"),
            "cpm_boot_std": (boot.get("cpm") or {}).get("std"),
            "avg_recall_0_5": sub.get("avg_recall_0_5"),
            "avg_recall_0_5_boot_std": (boot.get("avg_recall_0_5") or {}).get("std"),
            "object_dice": (sub.get("object_dice") or {}).get("mean"),
            "object_dice_boot_std": object_dice_bootstrap(results, group)["std"],
            "detected": sum(1 for r in results for les in r.lesions
                            if les.hit_dice > 0 and (group is None or les.size_group == group)),
        }

    out = part(report, None)
    out["by_size"] = {g: part(sub, g) for g, sub in report["by_size"].items()}
    voxel = [r.voxel_dice for r in results if np.isfinite(r.voxel_dice)]
    out["voxel_dice"] = float(np.mean(voxel)) if voxel else None
    out["fp_per_image"] = float(np.mean([r.n_false_positives for r in results]))
    out["pred_to_ref_voxels"] = float(sum(r.pred_voxels for r in results) / max(1, sum(r.ref_voxels for r in results)))
    return out


def aggregate(scores: list[dict], key: str, group: str | None = None) -> tuple[float | None, float | None, float | None]:
    """(mean over seeds, std over seeds, mean bootstrap std) of one metric; undefined values
    (no detected lesion: no object Dice) count as 0 for recall-type keys and are left out otherwise."""
    parts = [s if group is None else s["by_size"][group] for s in scores]
    values = [p[key] for p in parts]
    if key in ("cpm", "avg_recall_0_5"):
        values = [0.0 if v is None else v for v in values]
    values = [v for v in values if v is not None]
    if not values:
        return None, None, None
    boots = [p.get(f"{key}_boot_std") for p in parts if p.get(f"{key}_boot_std") is not None]
    return float(np.mean(values)), float(np.std(values)), (float(np.mean(boots)) if boots else None)


# --------------------------------------------------------------------------- table


def _spacing(preset: str):
    from IWSegmentationLib.data.synth import DEFAULT_SPACING

    return DEFAULT_SPACING[preset]


def _cell(agg: tuple) -> str:
    mean, std, boot = agg
    if mean is None:
        return "—"
    return f"{mean:.2f} ± {std:.2f}" + (f" ({boot:.2f})" if boot is not None else "")


def _v(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _recipe(name: str) -> str:
    o = OPTIMISERS[name]
    label = "SGD, Nesterov momentum 0.9 (the paper's)" if o["optimizer"] == "sgd" else "Adam"
    return f"{label}, lr {o['lr']:g} -> {o['lr_final']:g} at 80%"


def table(optimiser: str, scores: dict[str, list[dict]], groups: list[str]) -> list[str]:
    head = ["loss", "CPM", "object Dice"]
    for g in groups:
        head += [f"{g}: CPM", f"{g}: obj Dice"]
    head += ["avg recall 0-5 FP", "detected @0.5", "voxel Dice", "FP/image @0.5", "pred/ref", "paper LUNA16",
             "paper LiTS"]
    lines = [f"### {_recipe(optimiser)}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in ARMS:
        runs = scores.get(arm)
        if not runs:
            continue
        cells = [f"`{arm}`", _cell(aggregate(runs, "cpm")), _cell(aggregate(runs, "object_dice"))]
        for g in groups:
            cells += [_cell(aggregate(runs, "cpm", g)), _cell(aggregate(runs, "object_dice", g))]
        n = runs[0]["n_lesions"]
        detected = [r["detected"] for r in runs]
        cells += [_cell(aggregate(runs, "avg_recall_0_5")), f"{np.mean(detected):.0f}/{n}",
                  _v(float(np.mean([r["voxel_dice"] or 0.0 for r in runs]))),
                  _v(float(np.mean([r["fp_per_image"] for r in runs])), 1),
                  _v(float(np.mean([r["pred_to_ref_voxels"] for r in runs])), 1)]
        paper = PAPER.get(arm, {})
        cells += [" / ".join(f"{v:.2f}" for v in paper[ds]) if ds in paper else "—" for ds in ("LUNA16", "LiTS")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(scores: dict[str, dict[str, list[dict]]], settings: dict, data: dict, seeds, command: str,
             wall_seconds: float | None, jobs: int) -> str:
    from IWSegmentationLib.core.lesions import size_thresholds

    s = settings
    thresholds = size_thresholds(s["size_preset"])
    any_runs = [r for by_arm in scores.values() for runs in by_arm.values() for r in runs]
    first = any_runs[0]
    groups = [g for g in ("small", "medium", "large") if first["by_size"][g]["n_lesions"]]
    run_seconds = [r["record"]["seconds"] for r in any_runs]
    steps = s["epochs"] * s["iters_per_epoch"]
    peer_params = next((r["record"]["parameters"] for r in any_runs if r["record"]["arm"] == PEER), None)
    ours_params = next((r["record"]["parameters"] for r in any_runs if r["record"]["arm"] != PEER), None)
    wall = f"{wall_seconds / 60:.0f} min wall with {jobs} runs side by side" if wall_seconds else "see the run records"
    lines = [
        "# Loss comparison on synthetic multi-lesion data (the paper's Table 2, reproduced in shape)",
        "",
        "Generated by `scripts/compare_losses.py`; the findings are discussed in [README.md](README.md).",
        "",
        f"**Command:** `{command}`",
        "",
        f"**Budget (the same for every arm):** {s['epochs']} epochs x {s['iters_per_epoch']} iterations = {steps} "
        f"steps, batch {s['batch_size']} of {'x'.join(map(str, s['patch_size']))} patches, lesion-centred "
        f"sampling p = {s['lesion_probability']}, no augmentation, `{s['model_size']}` U-Net ({ours_params:,} "
        f"parameters), seeds {', '.join(map(str, seeds))} (network initialisation and patch stream), CPU fp32, "
        f"{THREADS} torch thread per run. {len(any_runs)} runs, median {np.median(run_seconds):.0f} s each "
        f"(training and held-out prediction); {wall} on {_bench.cpu_name()} ({_bench.visible_cores()} cores, shared "
        "with other work).",
        "",
        f"**Peer arm** `{PEER}`: MONAI's `UNet` (channels {PEER_NET['channels']}, {PEER_NET['num_res_units']} "
        f"residual unit per level, {peer_params or 0:,} parameters) trained with `monai.losses.DiceLoss(sigmoid=True)` "
        "on the same patches (the trainer's own patch stream and seed), optimiser and schedule; predicted and "
        "scored like the others.",
        "",
        f"**Data:** `iwseg synth` preset `{data['preset']}`, {data['train_cases']} training cases (seed "
        f"{data['train_seed']}) and {data['heldout_cases']} held-out cases (seed {data['heldout_seed']}) of "
        f"{'x'.join(map(str, data['shape']))} voxels at {' x '.join(f'{v:g}' for v in _spacing(data['preset']))} mm; "
        f"{first['n_lesions']} held-out lesions ("
        + ", ".join(f"{g} {first['by_size'][g]['n_lesions']}" for g in ("small", "medium", "large"))
        + f"). Size groups (equivalent diameter, preset `{s['size_preset']}`): small < {thresholds.small_mm:g} mm "
        f"<= medium < {thresholds.large_mm:g} mm <= large.",
        "",
        "**Metrics** (held-out set, `IWSegmentationLib.evaluation`, the paper's matching rule): **CPM** = mean "
        "recall at 1/8, 1/4, 1/2, 1, 2, 4 and 8 FP/image, which is what the paper's Table 2 calls \"avg "
        "Recall\" (see docs/metrics.md); object Dice = mean Dice of the detected lesions with their best-matching "
        "component. Each cell: **mean over seeds ± std over seeds (mean bootstrap std over 100 resamples of 80% of "
        "the images)**. Per size group, the group's lesions are the denominator. `avg recall 0-5 FP` is the mean "
        "recall over 0-5 FP/image (our earlier headline, not the paper's metric). `detected @0.5`: lesions hit by "
        "a component of the 0.5-thresholded mask (mean over seeds). Voxel Dice is the per-image Dice of that "
        "mask; pred/ref is predicted over reference lesion voxels (> 1: over-segmentation).",
        "",
    ]
    for optimiser, by_arm in scores.items():
        lines += table(optimiser, by_arm, groups)
    lines += [
        "Paper columns: avg recall (CPM) / object Dice on the LUNA16 and LiTS hold-out sets, trained 100 x 100 "
        "iterations with 128³ patches and an 11 M-parameter network on a GPU (Shirokikh et al. 2020, Table 2); "
        "DBCE and Combo were not in the paper.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("compare_output"),
                        help="working folder: data, runs, kept probabilities, run records (default compare_output)")
    parser.add_argument("--markdown", type=Path, default=REPO / "docs" / "results" / "compare_losses.md",
                        help="where to write the tables (default docs/results/compare_losses.md)")
    parser.add_argument("--arms", "--losses", dest="arms", nargs="+", choices=ARMS, default=None,
                        help=f"a subset of the losses (and the peer arm {PEER})")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help=f"seeds (default {' '.join(map(str, SEEDS))})")
    parser.add_argument("--optimisers", nargs="+", choices=tuple(OPTIMISERS), default=None,
                        help="optimiser recipes (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny budget, two losses and the peer: a smoke run")
    parser.add_argument("--force", action="store_true", help="retrain runs that are already kept")
    parser.add_argument("--table-only", action="store_true", help="score the kept runs and write the table; train nothing")
    parser.add_argument("--jobs", type=int, default=2,
                        help="runs side by side, one CPU thread each (default 2; results do not depend on it)")
    parser.add_argument("--epochs", type=int, help=f"override the budget's epochs (default {TRAIN['epochs']})")
    parser.add_argument("--iters", type=int, help=f"override the iterations per epoch (default {TRAIN['iters_per_epoch']})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training key for every run, e.g. --set model.norm=instance "
                             "(as iwseg train --set: values are YAML; repeatable)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from IWSegmentationLib.core.errors import InputError
    from IWSegmentationLib.data import load_case, load_dataset
    from IWSegmentationLib.training import merge_config, parse_overrides

    data, base = dict(DATA), dict(TRAIN)
    arms, seeds, optimisers = tuple(args.arms or ARMS), tuple(args.seeds or SEEDS), tuple(args.optimisers or OPTIMISERS)
    if args.quick:
        data.update(QUICK["data"])
        base.update(QUICK["train"])
        arms = tuple(args.arms or QUICK["arms"])
        seeds, optimisers = tuple(args.seeds or QUICK["seeds"]), tuple(args.optimisers or QUICK["optimisers"])
    if PEER in arms and not peer_available():
        print(f"note: MONAI is not installed: the peer arm {PEER} is skipped", flush=True)
        arms = tuple(a for a in arms if a != PEER)
    if args.epochs:
        base["epochs"] = args.epochs
    if args.iters:
        base["iters_per_epoch"] = args.iters
    try:
        overrides = parse_overrides(args.overrides)
    except InputError as exc:
        parser.error(f"--set: {exc}")

    def settings_for(optimiser: str, seed: int) -> dict:
        return merge_config({**base, **OPTIMISERS[optimiser], "seed": seed}, overrides)

    work = args.work
    for folder in ("reports", "probs"):
        (work / folder).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_dir, heldout_dir = make_data(work, data)
    if args.worker:  # one run, in a child process started by run_parallel
        for optimiser in optimisers:
            for arm in arms:
                for seed in seeds:
                    run_one(optimiser, arm, seed, work, train_dir, heldout_dir, settings_for(optimiser, seed), data)
        return 0
    runs = [(o, a, s) for s in seeds for o in optimisers for a in arms]  # seed-major: whole seeds finish first
    todo = [r for r in runs if args.force or not _done(work, run_id(*r), settings_for(r[0], r[2]), data)]
    if todo and args.table_only:
        raise SystemExit(f"compare_losses: {len(todo)} run(s) not kept yet, e.g. {run_id(*todo[0])}")
    print(f"[runs] {len(runs) - len(todo)} kept, {len(todo)} to train", flush=True)
    run_parallel(todo, args, work)
    missing = [run_id(*r) for r in runs if not _done(work, run_id(*r), settings_for(r[0], r[2]), data)]
    if missing:
        raise SystemExit(f"compare_losses: no kept result for {', '.join(missing[:5])} (see {work / 'logs'})")
    print("[score] held-out cases, from the kept probabilities", flush=True)
    heldout = {record.id: load_case(record) for record in load_dataset(heldout_dir).cases}
    scores: dict[str, dict[str, list[dict]]] = {}
    for optimiser, arm, seed in runs:
        score = score_run(work, run_id(optimiser, arm, seed), heldout, base["size_preset"])
        scores.setdefault(optimiser, {}).setdefault(arm, []).append(score)
    command = "python scripts/compare_losses.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                       else sys.argv[1:]))
    wall = time.perf_counter() - t0 if todo and len(todo) == len(runs) else None
    text = markdown(scores, settings_for(optimisers[0], seeds[0]), data, seeds, command.strip(), wall, args.jobs)
    _bench.write_report(args.markdown, text)
    print(f"written: {args.markdown} ({(time.perf_counter() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
