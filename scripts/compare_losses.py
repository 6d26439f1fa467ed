#!/usr/bin/env python
"""The paper's loss comparison (Shirokikh et al., MICCAI 2020, Table 2) on synthetic data, in the
regime where the paper says inverse weighting helps.

The paper (section 5) finds its gains on LiTS (6.9 tumours per scan, "large lesions could be up to
50 times bigger than the small ones") and calls LUNA16 (about one nodule per patch) "hardly an
appropriate dataset to benefit from our method". So the default regime, ``lits``, is synthetic
liver CT with one large lesion and several small satellites per case (volumes 10-100 fold apart)
and patches that cover most of the organ; ``luna`` is the earlier one-small-lesion-per-patch
lung data, the paper's LUNA16 point.

Every arm -- dice, iw-dice, bce, iw-bce, focal, iw-focal, asl, iw-asl, wce, gdl (and dbce, combo
with ``--arms``), and a peer reference arm (MONAI's ``UNet`` trained with
``monai.losses.DiceLoss`` on the very same patch stream) -- is trained with the paper's optimiser
(SGD, Nesterov momentum 0.9, lr 1e-2 -> 1e-3 at 80%) for the same number of *iterations*, seed by
seed. Every ``--eval-every`` epochs the checkpoint just written is loaded through the normal
checkpoint path and predicts the held-out set; its blended **logits** (float32) are kept, so the
table and the training curves are scored afterwards, ranking components by their maximum logit,
with the metrics code as it is when the table is written.

    python -m scripts.compare_losses                                  # the study (docs/results)
    python -m scripts.compare_losses --quick --markdown /tmp/t.md     # smoke run (minutes)
    python -m scripts.compare_losses --table-only                     # score kept runs, train nothing

Resuming: a finished run is kept (its record and logits) and skipped; an interrupted run goes on
from its last finished epoch (the trainer's own ``resume``), so the study can be stopped at any
time and started again with the same command. Runs are ordered seed by seed, so a study stopped
early has whole seeds.
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

import numpy as np

from scripts.compare_losses_report import run_id, write_report

REPO = Path(__file__).resolve().parents[1]
PLAIN_AND_IW = (("dice", "iw-dice"), ("bce", "iw-bce"), ("focal", "iw-focal"), ("asl", "iw-asl"))
OTHERS = ("wce", "gdl", "dbce", "combo")
#: The peer reference arm: MONAI's UNet + DiceLoss on our patches (skipped when MONAI is absent).
PEER = "monai-dice"
ARMS = tuple(a for pair in PLAIN_AND_IW for a in pair) + OTHERS + (PEER,)
#: What runs without ``--arms``: the paper's ten losses and the peer (DBCE and Combo on request).
DEFAULT_ARMS = tuple(a for a in ARMS if a not in ("dbce", "combo"))

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

#: The data of each regime (``iwseg synth`` options; held-out cases come from another seed).
#: ``lits``: liver CT, one primary lesion of about 14 voxels' equivalent diameter (about 25 mm) and
#: Poisson(6) satellites of 2.5-5 voxels (4-9 mm), in a 32x64x64 volume at 2.5 x 1.5 x 1.5 mm
#: whose liver (about 26x29x31 voxels) a 32x40x40 patch covers. ``luna``: the earlier lung data.
REGIMES = {
    "lits": {
        "data": {"preset": "ct-liver", "shape": [32, 64, 64], "spacing": [2.5, 1.5, 1.5], "train_cases": 24,
                 "heldout_cases": 12, "train_seed": 0, "heldout_seed": 2000,
                 "options": {"mean_lesions": 6.0, "diameter_range": [2.5, 5.0], "primary_diameter": 14.0}},
        "train": {"patch_size": [32, 40, 40], "preprocessing": "ct-liver", "size_preset": "liver"},
    },
    "luna": {
        "data": {"preset": "ct-lung", "shape": [48, 96, 96], "spacing": [1.25, 0.7, 0.7], "train_cases": 24,
                 "heldout_cases": 12, "train_seed": 0, "heldout_seed": 2000, "options": {}},
        "train": {"patch_size": [32, 48, 48], "preprocessing": "ct-lung", "size_preset": "lung"},
    },
}
#: The training budget, the same for every arm and regime (iwseg train config keys): the paper's
#: sampling (p = 0.5 lesion-centred, batch 2, no augmentation), optimiser and lr drop at 80%; the
#: `tiny` U-Net (the paper's topology, 86 k parameters) so that the 33 runs fit about 2.5 h on 2 cores (they took far less: see docs/results).
TRAIN = {
    "model_size": "tiny", "batch_size": 2, "epochs": 16, "iters_per_epoch": 50,
    "optimizer": "sgd", "lr": 1e-2, "lr_final": 1e-3, "momentum": 0.9, "nesterov": True,
    "lr_schedule": "step", "lr_decay_at": 0.8, "lesion_probability": 0.5,
    "val_fraction": 0.0, "val_every": 0, "num_workers": 0,
}
EVAL_EVERY = 2
SEEDS = (0, 1, 2)
#: MONAI's UNet for the peer arm: 150 k parameters (ours, `tiny`: 86 k), residual units, BatchNorm.
PEER_NET = {"channels": (8, 16, 32, 64), "strides": (2, 2, 2), "num_res_units": 1, "norm": "batch"}
#: Torch threads per training process; ``--jobs`` processes run side by side.
THREADS = 1
QUICK = {"data": {"train_cases": 4, "heldout_cases": 3},
         "train": {"epochs": 2, "iters_per_epoch": 3},
         "arms": ("dice", "iw-dice", PEER), "seeds": (0,), "eval_every": 1}


def peer_available() -> bool:
    try:
        import monai  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- runs


def make_data(work: Path, data: dict) -> tuple[Path, Path]:
    """Write the training and held-out sets once (re-used when their ``dataset.json`` matches)."""
    from IWSegmentationLib.data.synth import write_dataset

    out = []
    for name, n, seed in (("train", data["train_cases"], data["train_seed"]),
                          ("heldout", data["heldout_cases"], data["heldout_seed"])):
        folder = work / "data" / name
        meta = folder / "dataset.json"
        wanted = {"seed": seed, "size": list(data["shape"]), "spacing": list(data["spacing"]),
                  "options": data["options"], "n": n}
        if meta.is_file():
            summary = json.loads(meta.read_text()).get("iwseg", {})
            have = {"seed": summary.get("seed"), "size": summary.get("size"), "spacing": summary.get("spacing"),
                    "options": summary.get("options"), "n": len(summary.get("lesions_per_case", []))}
            if have == wanted:
                out.append(folder)
                continue
        summary = write_dataset(folder, n, seed, data["preset"], shape=data["shape"], spacing=data["spacing"],
                                overwrite=True, **data["options"])
        print(f"  {name}: {n} cases, {summary['lesions_total']} lesions -> {folder}", flush=True)
        out.append(folder)
    return out[0], out[1]


def _config(arm: str, settings: dict, train_dir: Path, out: Path):
    from IWSegmentationLib.training import TrainConfig

    return TrainConfig.from_dict({**settings, "loss": "dice" if arm == PEER else arm, "data": str(train_dir),
                                  "out": str(out), "overwrite": True, "tensorboard": False, "progress": False})


def predict_heldout(model, card: dict, heldout: Path, device: str = "cpu") -> dict[str, np.ndarray]:
    """Blended float32 logits of every held-out case (the card's own preprocessing and window)."""
    from IWSegmentationLib.data import load_case, load_dataset
    from IWSegmentationLib.inference import predict_volume

    out = {}
    for record in load_dataset(heldout).cases:
        volume = load_case(record)
        pred = predict_volume(model, volume.image, card, geometry=volume.geometry, organ_mask=volume.organ,
                              device=device)
        out[record.id] = pred.logits.astype(np.float32)
    return out


def keep_logits(path: Path, logits: dict[str, np.ndarray]) -> None:
    from IWSegmentationLib.core.outputs import atomic_output

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **logits)


def train_ours(config, eval_epochs: set[int], heldout: Path, logits_dir: Path) -> tuple[int, float]:
    """``iwseg train``'s own loop, continued from its resume state if an earlier start was
    interrupted; after each epoch in ``eval_epochs`` (1-based) the checkpoint just written is
    loaded (the normal checkpoint path) and predicts the held-out set. Returns (parameters, last loss)."""
    from IWSegmentationLib.nn.checkpoint import load_checkpoint
    from IWSegmentationLib.training import train
    from IWSegmentationLib.training.trainer import LAST_CHECKPOINT, RESUME_STATE

    out = Path(config.out)

    def on_epoch_end(epoch: int, row: dict) -> None:
        if epoch + 1 in eval_epochs:
            model, card = load_checkpoint(out / LAST_CHECKPOINT)
            keep_logits(logits_dir / f"e{epoch + 1:03d}.npz", predict_heldout(model, card, heldout, config.device))

    resume = (out / RESUME_STATE).is_file()
    result = train(config, resume=resume, verbose=False, on_epoch_end=on_epoch_end)
    model, _card = load_checkpoint(result.last_checkpoint)
    return sum(p.numel() for p in model.parameters()), (result.history[-1]["loss"] if result.history else float("nan"))


def train_peer(config, eval_epochs: set[int], heldout: Path, logits_dir: Path) -> tuple[int, float]:
    """MONAI's UNet + DiceLoss(sigmoid=True), fed the same patch stream as our ``dice`` arm
    (the trainer's own data path and seed), with the same optimiser and schedule; predicted
    with the same card (preprocessing, window) at the same epochs. Restarts when interrupted."""
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
    device = "cuda" if config.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    net = UNet(spatial_dims=3, in_channels=1, out_channels=1, **PEER_NET).to(device)
    loss_fn = DiceLoss(sigmoid=True)
    optimizer, value = build_optimizer(net, config), float("nan")
    scheduler = build_scheduler(optimizer, config)
    for epoch in range(config.epochs):
        net.train()
        for _ in range(config.iters_per_epoch):
            batch = next(stream)
            loss = loss_fn(net(batch["image"].to(device)), batch["target"].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
        scheduler.step()
        if epoch + 1 in eval_epochs:
            card = model_card(config, data, epoch=epoch, validation_metrics=None)
            keep_logits(logits_dir / f"e{epoch + 1:03d}.npz", predict_heldout(net.eval(), card, heldout, device))
    return sum(p.numel() for p in net.parameters()), value


def eval_epochs_for(epochs: int, every: int) -> list[int]:
    """The 1-based epochs whose checkpoint is scored: every ``every`` epochs and always the last."""
    return sorted({e for e in range(every, epochs + 1, every)} | {epochs})


def run_one(arm: str, seed: int, work: Path, train_dir: Path, heldout: Path, settings: dict, data: dict,
            eval_every: int) -> None:
    """Train one arm (scoring checkpoints along the way), then write its run record (atomically)."""
    import torch

    from IWSegmentationLib.core.outputs import atomic_output

    torch.set_num_threads(THREADS)
    rid = run_id(arm, seed)
    t = time.perf_counter()
    config = _config(arm, settings, train_dir, work / "runs" / rid)
    epochs = eval_epochs_for(settings["epochs"], eval_every)
    trainer = train_peer if arm == PEER else train_ours
    parameters, final_loss = trainer(config, set(epochs), heldout, work / "logits" / rid)
    record = {"run": rid, "arm": arm, "seed": seed, "settings": settings, "data": data, "eval_epochs": epochs,
              "threshold": 0.5, "final_loss": final_loss, "seconds": time.perf_counter() - t,
              "parameters": parameters}
    with atomic_output(work / "reports" / f"{rid}.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1))
    print(f"  {rid}: {record['seconds']:.0f} s, final loss {final_loss:.4f}", flush=True)


def is_done(work: Path, rid: str, settings: dict, data: dict) -> bool:
    """Whether run ``rid`` is kept (its record and every scored checkpoint) with these settings and data."""
    record = work / "reports" / f"{rid}.json"
    if not record.is_file():
        return False
    saved = json.loads(record.read_text())
    if saved.get("settings") != settings or saved.get("data") != data:
        return False
    return all((work / "logits" / rid / f"e{e:03d}.npz").is_file() for e in saved.get("eval_epochs", []))


def run_parallel(todo: list[tuple[str, int]], args, work: Path) -> None:
    """Run each (arm, seed) in its own process, ``args.jobs`` at a time, logs in work/logs/."""
    (work / "logs").mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS)}
    base = [sys.executable, "-m", "scripts.compare_losses", "--worker", "--work", str(work.resolve()), "--regime",
            args.regime,
            "--eval-every", str(args.eval_every)]
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
            arm, seed = pending.pop(0)
            rid = run_id(arm, seed)
            log = open(work / "logs" / f"{rid}.log", "a")  # noqa: SIM115 (closed when the process ends)
            print(f"[start] {rid} ({len(pending)} waiting)", flush=True)
            cmd = base + ["--arms", arm, "--seeds", str(seed)]
            running.append((rid, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO), log))
        time.sleep(2)
        for item in list(running):
            rid, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                tail = (work / "logs" / f"{rid}.log").read_text(errors="replace").strip().splitlines()[-1:]
                print(f"[done] {rid} (exit {proc.returncode}) {tail[0] if tail else ''}", flush=True)


def patch_statistics(train_dir: Path, settings: dict, n_patches: int = 400) -> dict:
    """Lesions per training patch (mean, and the share of patches with 0, 1, 2-3, 4+ lesions) on the
    trainer's own patch stream (seed 0), and the training lesions' equivalent diameters."""
    from IWSegmentationLib.core.lesions import label_components
    from IWSegmentationLib.training import load_training_data, make_patch_dataset

    config = _config("dice", {**settings, "seed": 0}, train_dir, Path("/nonexistent-compare-losses"))
    data = load_training_data(config, verbose=False)
    stream = iter(make_patch_dataset(config, data.train_cases, data.params, steps=n_patches))
    counts = []
    while len(counts) < n_patches:
        batch = next(stream)
        for target in batch["target"].numpy():
            counts.append(label_components(target.reshape(target.shape[-3:]) > 0, 26)[1])
    counts = np.asarray(counts[:n_patches])
    bins = {"0": counts == 0, "1": counts == 1, "2-3": (counts >= 2) & (counts <= 3), "4+": counts >= 4}
    return {"patches": int(counts.size), "mean_lesions_per_patch": float(counts.mean()),
            "share": {k: float(v.mean()) for k, v in bins.items()}}


# --------------------------------------------------------------------------- main


def settings_for(base: dict, seed: int, overrides: dict) -> dict:
    from IWSegmentationLib.training import merge_config

    return merge_config({**base, "seed": seed}, overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regime", choices=tuple(REGIMES), default="lits",
                        help="lits: several lesions per patch, volumes 10-100x apart (default); luna: about one "
                             "small lesion per patch")
    parser.add_argument("--work", type=Path, default=None,
                        help="working folder: data, runs, kept logits, run records (default compare_output/REGIME)")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="where to write the tables (default docs/results/compare_losses_REGIME.md)")
    parser.add_argument("--arms", "--losses", dest="arms", nargs="+", choices=ARMS, default=None,
                        help=f"a subset of the losses (and the peer arm {PEER}); default: the paper's ten and the peer")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help=f"seeds (default {' '.join(map(str, SEEDS))})")
    parser.add_argument("--quick", action="store_true", help="tiny budget, two losses and the peer: a smoke run")
    parser.add_argument("--force", action="store_true", help="retrain runs that are already kept")
    parser.add_argument("--table-only", action="store_true",
                        help="score the kept runs and write the table; train nothing (runs not kept are left out)")
    parser.add_argument("--jobs", type=int, default=2,
                        help="runs side by side, one CPU thread each (default 2; results do not depend on it)")
    parser.add_argument("--epochs", type=int, help=f"override the budget's epochs (default {TRAIN['epochs']})")
    parser.add_argument("--iters", type=int, help=f"override the iterations per epoch (default {TRAIN['iters_per_epoch']})")
    parser.add_argument("--eval-every", type=int, default=None,
                        help=f"score the checkpoint every this many epochs (default {EVAL_EVERY})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training key for every run, e.g. --set model.norm=instance "
                             "(as iwseg train --set: values are YAML; repeatable)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from IWSegmentationLib.core.errors import InputError
    from IWSegmentationLib.training import parse_overrides

    regime = REGIMES[args.regime]
    data = {**regime["data"], "options": dict(regime["data"]["options"])}
    base = {**TRAIN, **regime["train"]}
    arms, seeds = tuple(args.arms or DEFAULT_ARMS), tuple(args.seeds or SEEDS)
    args.eval_every = args.eval_every or EVAL_EVERY
    if args.quick:
        data.update(QUICK["data"])
        base.update(QUICK["train"])
        arms = tuple(args.arms or QUICK["arms"])
        seeds = tuple(args.seeds or QUICK["seeds"])
        args.eval_every = QUICK["eval_every"]
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

    work = args.work or Path("compare_output") / args.regime
    (work / "reports").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_dir, heldout_dir = make_data(work, data)
    if args.worker:  # one run, in a child process started by run_parallel
        for arm in arms:
            for seed in seeds:
                run_one(arm, seed, work, train_dir, heldout_dir, settings_for(base, seed, overrides), data,
                        args.eval_every)
        return 0
    runs = [(a, s) for s in seeds for a in arms]  # seed-major: whole seeds finish first
    todo = [] if args.table_only else [
        r for r in runs if args.force or not is_done(work, run_id(*r), settings_for(base, r[1], overrides), data)]
    print(f"[runs] {len(runs) - len(todo)} kept, {len(todo)} to train", flush=True)
    run_parallel(todo, args, work)
    wall = time.perf_counter() - t0
    log = work / "wall_seconds.json"
    spent = json.loads(log.read_text()) if log.is_file() else []
    if todo:
        log.write_text(json.dumps(spent + [{"runs": len(todo), "seconds": wall, "jobs": args.jobs}]))
    kept = [r for r in runs if is_done(work, run_id(*r), settings_for(base, r[1], overrides), data)]
    command = "python -m scripts.compare_losses " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                       else sys.argv[1:]))
    markdown = args.markdown or REPO / "docs" / "results" / f"compare_losses_{args.regime}.md"
    write_report(work, kept, base, data, args.regime, command.strip(), markdown,
                 patch_stats=patch_statistics(train_dir, settings_for(base, 0, overrides)), pairs=PLAIN_AND_IW,
                 paper=PAPER, peer=PEER)
    print(f"written: {markdown} ({(time.perf_counter() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
