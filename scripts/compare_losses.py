#!/usr/bin/env python
"""The paper's loss comparison (Shirokikh et al., MICCAI 2020, Table 2) on synthetic data.

Trains the same network with each loss -- bce, iw-bce, focal, iw-focal, dice, iw-dice, asl,
iw-asl, wce, gdl, dbce, combo -- from the same seed, on the same synthetic multi-lesion
training set, for the same number of *iterations* (so the result does not depend on machine
load), then predicts a separate held-out synthetic set and evaluates it lesion by lesion.
Writes a markdown table in the shape of the paper's Table 2 (CPM -- the paper's "avg Recall",
mean recall at 1/8 ... 8 FP/image -- and object Dice, each with its bootstrap std, overall and
per lesion size group; the mean recall over 0-5 FP/image as a secondary column), with the
exact command, the budget and the paper's published numbers beside ours.

    python scripts/compare_losses.py                                  # full budget (~30 min, 2 cores)
    python scripts/compare_losses.py --quick --markdown /tmp/t.md     # smoke run (2 losses, minutes)

Finished losses are kept in ``--work`` (a JSON report each), so an interrupted comparison
continues where it stopped when run again with the same settings.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LOSSES = ("bce", "iw-bce", "focal", "iw-focal", "dice", "iw-dice", "asl", "iw-asl", "wce", "gdl", "dbce", "combo")

#: The paper's Table 2 (hold-out; "avg Recall", which is the CPM, / object Dice), from docs of the authors' results
#: (../shared/reference/method-notes.md). DBCE and Combo are not in the paper.
PAPER = {
    "dice": {"LUNA16": (0.71, 0.76), "LiTS": (0.62, 0.63)},
    "iw-dice": {"LUNA16": (0.73, 0.77), "LiTS": (0.72, 0.49)},
    "bce": {"LUNA16": (0.42, 0.57), "LiTS": (0.47, 0.61)},
    "iw-bce": {"LUNA16": (0.67, 0.56), "LiTS": (0.59, 0.53)},
    "asl": {"LUNA16": (0.68, 0.77), "LiTS": (0.66, 0.63)},
    "iw-asl": {"LUNA16": (0.70, 0.76), "LiTS": (0.73, 0.53)},
    "focal": {"LUNA16": (0.35, 0.51), "LiTS": (0.50, 0.58)},
    "iw-focal": {"LUNA16": (0.55, 0.54), "LiTS": (0.62, 0.48)},
    "wce": {"LUNA16": (0.74, 0.50), "LiTS": (0.52, 0.41)},
    "gdl": {"LUNA16": (0.69, 0.73), "LiTS": (0.69, 0.60)},
}

#: Synthetic data: lung-CT-like volumes (1.25 x 0.7 x 0.7 mm) with vessels, about 5.5 nodules
#: per case of equivalent diameters 2-40 voxels, many small. Held-out cases come from another
#: seed. (The liver-like preset, whose lesions differ from the liver by 1.5-8 noise SDs, is not
#: learnt by any loss within a CPU budget of this size; see README.md.)
DATA = {"preset": "ct-lung", "shape": [48, 96, 96], "train_cases": 24, "heldout_cases": 12,
        "train_seed": 0, "heldout_seed": 2000}
#: The training budget, the same for every loss (iwseg train config keys). The paper's recipe
#: (SGD, Nesterov 0.9, lr drop to 1/10 at 80%, p = 0.5 lesion-centred patches, batch 2) with a
#: 10x higher lr than the paper's 1e-2 because the budget is 1/12 of its 10,000 steps.
TRAIN = {
    "model_size": "tiny", "patch_size": [32, 48, 48], "batch_size": 2,
    "epochs": 8, "iters_per_epoch": 100, "lr": 0.1, "lr_schedule": "step", "lr_final": 0.01,
    "lesion_probability": 0.5, "preprocessing": "ct-lung", "size_preset": "lung",
    "val_fraction": 0.0, "val_every": 0, "num_workers": 0, "seed": 0,
}
#: Torch threads per training process; ``--jobs`` processes run side by side.
THREADS = 1
QUICK = {"data": {"shape": [32, 64, 64], "train_cases": 4, "heldout_cases": 3},
         "train": {"model_size": "tiny", "patch_size": [32, 32, 32], "epochs": 1, "iters_per_epoch": 3},
         "losses": ("dice", "iw-dice")}
N_BOOTSTRAP = 100
BOOTSTRAP_FRACTION = 0.8


# --------------------------------------------------------------------------- steps


def make_data(work: Path, data: dict) -> tuple[Path, Path]:
    """Write the training and held-out sets once (re-used when ``dataset.json`` matches)."""
    from IWSegmentationLib.synth import write_dataset

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


def train_loss(loss: str, train_dir: Path, work: Path, settings: dict) -> tuple[Path, float, dict]:
    from IWSegmentationLib.training import TrainConfig, train

    config = TrainConfig.from_dict({**settings, "loss": loss, "data": str(train_dir),
                                    "out": str(work / "runs" / loss), "overwrite": True, "tensorboard": False,
                                    "progress": False})
    t = time.perf_counter()
    result = train(config)
    return result.last_checkpoint, time.perf_counter() - t, {"final_loss": result.history[-1]["loss"]}


def evaluate(checkpoint: Path, heldout: Path, seed: int) -> tuple[dict, list]:
    """Predict every held-out case (the checkpoint's own preprocessing and window) and evaluate."""
    from tqdm import tqdm

    from IWSegmentationLib.checkpoint import load_checkpoint
    from IWSegmentationLib.data import load_case, load_dataset
    from IWSegmentationLib.inference import predict_volume
    from IWSegmentationLib.lesions import size_thresholds
    from IWSegmentationLib.metrics import evaluate_cases, match_case

    model, card = load_checkpoint(checkpoint)
    thresholds = size_thresholds(card["size_thresholds"]["preset"])
    results = []
    for record in tqdm(load_dataset(heldout).cases, desc="held-out", unit="case", leave=False):
        volume = load_case(record)
        pred = predict_volume(model, volume.image, card, geometry=volume.geometry, organ_mask=volume.organ,
                              device="cpu")
        results.append(match_case(pred.probabilities, volume.lesion, volume.geometry.spacing_zyx,
                                  threshold=card["threshold"], thresholds=thresholds, case=record.id))
    return evaluate_cases(results, seed=seed), results


def object_dice_bootstrap(results, group: str | None, seed: int) -> dict:
    """Mean and std of the object Dice over the bootstrap resamples of the metrics module
    (``N_BOOTSTRAP`` draws of 80% of the images without replacement), images ordered by case."""
    ordered = sorted(results, key=lambda r: r.case)
    n = len(ordered)
    size = max(1, int(np.floor(BOOTSTRAP_FRACTION * n + 0.5)))
    rng = np.random.default_rng(seed)
    per_image = [np.asarray([les.hit_dice for les in r.lesions
                             if les.hit_dice > 0 and (group is None or les.size_group == group)]) for r in ordered]
    means = []
    for _ in range(N_BOOTSTRAP):
        pick = rng.choice(n, size=size, replace=False)
        values = np.concatenate([per_image[i] for i in pick])
        if values.size:
            means.append(values.mean())
    if not means:
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(means)), "std": float(np.std(means))}


def summarise(report: dict, results, seed: int) -> dict:
    def part(sub: dict, group: str | None) -> dict:
        boot = (sub.get("bootstrap") or {}).get("avg_recall_0_5") or {}
        cpm_boot = (sub.get("bootstrap") or {}).get("cpm") or {}
        return {
            "n_lesions": sub.get("n_lesions"),
            "avg_recall": sub.get("avg_recall_0_5"),
            "avg_recall_boot_mean": boot.get("mean"),
            "avg_recall_boot_std": boot.get("std"),
            "cpm": sub.get("cpm"),
            "cpm_boot_mean": cpm_boot.get("mean"),
            "cpm_boot_std": cpm_boot.get("std"),
            "object_dice": (sub.get("object_dice") or {}).get("mean"),
            "object_dice_boot": object_dice_bootstrap(results, group, seed),
        }

    out = part(report, None)
    out["by_size"] = {g: part(sub, g) for g, sub in report["by_size"].items()}
    voxel = [r.voxel_dice for r in results if np.isfinite(r.voxel_dice)]
    out["voxel_dice"] = float(np.mean(voxel)) if voxel else None
    out["fp_per_image"] = float(np.mean([r.n_false_positives for r in results]))
    out["pred_to_ref_voxels"] = float(sum(r.pred_voxels for r in results) / max(1, sum(r.ref_voxels for r in results)))
    return out


# --------------------------------------------------------------------------- table


def _spacing(preset: str):
    from IWSegmentationLib.synth import DEFAULT_SPACING

    return DEFAULT_SPACING[preset]


def _pm(mean, std) -> str:
    if mean is None:
        return "—"
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def _v(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _optimiser(settings: dict) -> str:
    name = settings.get("optimizer", "sgd")
    return "SGD (Nesterov 0.9)" if name == "sgd" else {"adam": "Adam", "adamw": "AdamW"}.get(name, name)


def markdown(rows: dict, settings: dict, data: dict, command: str, seconds: float, thresholds, jobs: int) -> str:
    s = settings
    lines = [
        "# Loss comparison on synthetic multi-lesion data (the paper's Table 2, reproduced in shape)",
        "",
        "Generated by `scripts/compare_losses.py`; the findings are discussed in [README.md](README.md).",
        "",
        f"**Command:** `{command}`",
        "",
        f"**Budget (the same for every loss):** {s['epochs']} epochs x {s['iters_per_epoch']} iterations = "
        f"{s['epochs'] * s['iters_per_epoch']} {_optimiser(s)} steps (lr {s['lr']:g} -> {s['lr_final']:g} at 80%), "
        f"batch {s['batch_size']} of {'x'.join(map(str, s['patch_size']))} patches "
        f"({s['batch_size'] * s['epochs'] * s['iters_per_epoch']} patches in all), `{s['model_size']}` U-Net, "
        f"lesion-centred sampling p = {s['lesion_probability']}, no augmentation, seed {s['seed']}, CPU fp32, "
        f"{THREADS} torch thread per run. Wall time of the whole comparison: {seconds / 60:.0f} min with {jobs} "
        f"runs side by side on {platform.machine()} ({__import__('os').cpu_count()} cores, shared with other work).",
        "",
        f"**Data:** `iwseg synth` preset `{data['preset']}`, {data['train_cases']} training cases (seed "
        f"{data['train_seed']}) and {data['heldout_cases']} held-out cases (seed {data['heldout_seed']}) of "
        f"{'x'.join(map(str, data['shape']))} voxels at {' x '.join(f'{v:g}' for v in _spacing(data['preset']))} mm. "
        f"Size groups (equivalent diameter, preset `{s['size_preset']}`): small < {thresholds.small_mm:g} mm <= "
        f"medium < {thresholds.large_mm:g} mm <= large.",
        "",
        "**Metrics** (held-out set, `IWSegmentationLib.metrics`, docs/metrics.md): CPM = mean recall at 1/8, "
        "1/4, 1/2, 1, 2, 4 and 8 false positives per image, which is the paper's \"avg Recall\" (the number "
        "to set beside the paper's columns), mean ± std over 100 bootstrap resamples of 80% of the images "
        "(our bootstrap: FP/image over each resample's images; the authors' `--bootstrap paper` reads about "
        "0.02 higher on their LiTS Dice records); object Dice = mean Dice of the detected lesions with their "
        "best-matching component, mean ± std over the same resamples; avg recall 0-5 = mean recall over 0-5 "
        "FP/image, not a number of the paper, kept as a secondary column. Per size group, the group's lesions "
        "are the denominator. Voxel Dice is the per-image Dice of the 0.5-thresholded mask; pred/ref is "
        "predicted over reference lesion voxels (> 1: over-segmentation).",
        "",
        "| loss | CPM | object Dice | small: CPM | small: obj Dice | medium: CPM | medium: obj Dice | "
        "large: CPM | large: obj Dice | avg recall 0-5 | voxel Dice | FP/image @0.5 | pred/ref | paper LUNA16 | "
        "paper LiTS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for loss in LOSSES:
        if loss not in rows:
            continue
        r = rows[loss]
        cells = [f"`{loss}`", _pm(r.get("cpm_boot_mean"), r.get("cpm_boot_std")),
                 _pm(r["object_dice_boot"]["mean"], r["object_dice_boot"]["std"])]
        for g in ("small", "medium", "large"):
            sub = r["by_size"][g]
            cells += [_pm(sub.get("cpm_boot_mean"), sub.get("cpm_boot_std")),
                      _pm(sub["object_dice_boot"]["mean"], sub["object_dice_boot"]["std"])]
        cells += [_pm(r["avg_recall_boot_mean"], r["avg_recall_boot_std"]), _v(r["voxel_dice"]),
                  _v(r["fp_per_image"], 1), _v(r["pred_to_ref_voxels"], 1)]
        paper = PAPER.get(loss, {})
        for ds in ("LUNA16", "LiTS"):
            cells.append(" / ".join(f"{v:.2f}" for v in paper[ds]) if ds in paper else "—")
        lines.append("| " + " | ".join(cells) + " |")
    counts = next(iter(rows.values()))
    groups = ", ".join(f"{g} {counts['by_size'][g]['n_lesions']}" for g in ("small", "medium", "large"))
    lines += [
        "",
        f"Held-out lesions: {counts['n_lesions']} ({groups}). "
        "Paper columns: \"avg Recall\" (the CPM) / object Dice on the LUNA16 and LiTS hold-out sets, trained 100 x 100 "
        "iterations with 128³ patches on a GPU (Shirokikh et al. 2020, Table 2); DBCE and Combo were not in "
        "the paper.",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- orchestration


def _done(report_path: Path, settings: dict, data: dict) -> bool:
    if not report_path.is_file():
        return False
    saved = json.loads(report_path.read_text())
    return saved.get("settings") == settings and saved.get("data") == data


def run_one(loss: str, work: Path, train_dir: Path, heldout_dir: Path, settings: dict, data: dict) -> None:
    """Train one loss, evaluate it on the held-out set, write its report JSON (atomically)."""
    import torch

    from IWSegmentationLib.imageio import atomic_output

    torch.set_num_threads(THREADS)
    t = time.perf_counter()
    checkpoint, train_seconds, extra = train_loss(loss, train_dir, work, settings)
    report, results = evaluate(checkpoint, heldout_dir, settings["seed"])
    summary = {**summarise(report, results, settings["seed"]), **extra, "train_seconds": train_seconds}
    seconds = time.perf_counter() - t
    with atomic_output(work / "reports" / f"{loss}.json") as tmp:
        tmp.write_text(json.dumps({"loss": loss, "settings": settings, "data": data, "seconds": seconds,
                                   "summary": summary, "report": report}, indent=1, default=float))
    print(f"  {loss}: CPM {_v(summary['cpm'])}, small CPM {_v(summary['by_size']['small']['cpm'])}, "
          f"avg recall 0-5 {_v(summary['avg_recall'])}, "
          f"object Dice {_v(summary['object_dice'])}, voxel Dice {_v(summary['voxel_dice'])} ({seconds:.0f} s)",
          flush=True)


def run_parallel(losses: list[str], args, work: Path) -> None:
    """Run each loss in its own process (``--worker``), ``args.jobs`` at a time, logs in work/logs/."""
    import os
    import subprocess

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
    pending, running = list(losses), []
    while pending or running:
        while pending and len(running) < max(1, args.jobs):
            loss = pending.pop(0)
            log = open(work / "logs" / f"{loss}.log", "w")  # noqa: SIM115 (closed when the process ends)
            print(f"[start] {loss} (log: {work / 'logs' / (loss + '.log')})", flush=True)
            running.append((loss, subprocess.Popen(base + ["--losses", loss], stdout=log, stderr=subprocess.STDOUT,
                                                   env=env), log))
        time.sleep(2)
        for item in list(running):
            loss, proc, log = item
            if proc.poll() is not None:
                log.close()
                running.remove(item)
                tail = (work / "logs" / f"{loss}.log").read_text(errors="replace").strip().splitlines()[-1:]
                print(f"[done] {loss} (exit {proc.returncode}) {tail[0] if tail else ''}", flush=True)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("compare_output"),
                        help="working folder: data, runs, per-loss reports (default compare_output)")
    parser.add_argument("--markdown", type=Path, default=REPO / "docs" / "results" / "compare_losses.md",
                        help="where to write the table (default docs/results/compare_losses.md)")
    parser.add_argument("--losses", nargs="+", choices=LOSSES, default=None, help="a subset of the losses")
    parser.add_argument("--quick", action="store_true", help="tiny budget, two losses: a smoke run")
    parser.add_argument("--force", action="store_true", help="retrain losses whose report already exists")
    parser.add_argument("--jobs", type=int, default=2,
                        help="losses trained side by side, one CPU thread each (default 2; results do not depend on it)")
    parser.add_argument("--epochs", type=int, help=f"override the budget's epochs (default {TRAIN['epochs']})")
    parser.add_argument("--iters", type=int, help=f"override the iterations per epoch (default {TRAIN['iters_per_epoch']})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training key of the budget for every loss, e.g. --set optimizer=adam "
                             "--set model.norm=instance (as iwseg train --set: values are YAML; repeatable)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from IWSegmentationLib.imageio import atomic_output
    from IWSegmentationLib.lesions import size_thresholds

    data, settings, losses = dict(DATA), dict(TRAIN), tuple(args.losses or LOSSES)
    if args.quick:
        data.update(QUICK["data"])
        settings.update(QUICK["train"])
        losses = tuple(args.losses or QUICK["losses"])
    if args.epochs:
        settings["epochs"] = args.epochs
    if args.iters:
        settings["iters_per_epoch"] = args.iters
    from IWSegmentationLib.errors import InputError
    from IWSegmentationLib.training import merge_config, parse_overrides

    try:
        settings = merge_config(settings, parse_overrides(args.overrides))
    except InputError as exc:
        parser.error(f"--set: {exc}")
    command = "python scripts/compare_losses.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                       else sys.argv[1:]))
    work = args.work
    (work / "reports").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print("[data] synthetic training and held-out sets", flush=True)
    train_dir, heldout_dir = make_data(work, data)
    if args.worker:  # one loss, in a child process started below
        for loss in losses:
            run_one(loss, work, train_dir, heldout_dir, settings, data)
        return 0
    todo = []
    for loss in losses:
        report_path = work / "reports" / f"{loss}.json"
        if args.force or not _done(report_path, settings, data):
            todo.append(loss)
        else:
            print(f"  {loss}: already done ({report_path})", flush=True)
    run_parallel(todo, args, work)
    rows: dict[str, dict] = {}
    spent = 0.0
    for loss in losses:
        report_path = work / "reports" / f"{loss}.json"
        if not _done(report_path, settings, data):
            raise SystemExit(f"compare_losses: no report for {loss} in {report_path} (see the log above)")
        saved = json.loads(report_path.read_text())
        rows[loss] = saved["summary"]
        spent += saved.get("seconds", 0.0)
    thresholds = size_thresholds(settings["size_preset"])
    text = markdown(rows, settings, data, command.strip(), time.perf_counter() - t0 if todo else spent,
                    thresholds, args.jobs)
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.markdown) as tmp:
        tmp.write_text(text, encoding="utf-8")
    print(text)
    print(f"written: {args.markdown} ({(time.perf_counter() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
