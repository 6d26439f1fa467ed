#!/usr/bin/env python
"""The project's main job on its embedded default data (``make demo``), on a laptop CPU.

1. generate a small synthetic lung-CT-like set with several nodules per case of very
   different sizes among vessels (``iwseg synth``), and a separate held-out set;
2. train a small inverse-weighted-Dice U-Net on it (``iwseg train``), keeping the checkpoint
   with the best validation ``cpm_object_dice`` (harmonic mean of CPM and object Dice);
3. predict the held-out cases (``iwseg predict``: masks, probability maps, lesion tables);
4. evaluate them lesion by lesion (``iwseg evaluate``: report.json, per-lesion CSV, FROC plot);
5. when 3D Slicer's Python (``slicer-core``) is available, render the lesions coloured by size.

Everything lands in ``--out`` (default ``demo_output/``) and the script ends by printing
where each file is. ``--quick`` shrinks every budget (a smoke test of the pipeline, about a
minute; the model it trains is not useful). The budgets below were chosen to finish in about
5 minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

#: Synthetic data of the demo (and of the training benchmarks, scripts/bench/): lung-CT-like volumes of
#: 48 x 96 x 96 voxels at 1.25 x 0.7 x 0.7 mm with vessels, about 5.5 nodules per case. (The
#: liver-like preset has lesions only 1.5-8 noise SDs from the liver: no loss learns them in a
#: few CPU minutes; see docs/results/README.md.)
SYNTH_PRESET = "ct-lung"
SYNTH_SHAPE = (48, 96, 96)
SYNTH_SEED = 0
HELDOUT_SEED = 1000
N_TRAIN = 24
N_HELDOUT = 8

#: The demo's training settings (iwseg train config keys). The paper's recipe (lr drop to 1/10 at
#: 80%, lesion-centred sampling with p = 0.5, iw-Dice), shrunk to a CPU budget: the tiny U-Net
#: (86 k parameters), 32 x 48 x 48 patches, 8 epochs of 100 iterations, Adam (lr 1e-3). The best
#: checkpoint is chosen by ``cpm_object_dice``, which a model that merges lesions into blobs
#: cannot win. docs/results/README.md compares the losses and optimisers.
TRAIN_SETTINGS = {
    "model_size": "tiny",
    "loss": "iw-dice",
    "patch_size": [32, 48, 48],
    "batch_size": 2,
    "epochs": 8,
    "iters_per_epoch": 100,
    "optimizer": "adam",
    "lr": 0.001,
    "lr_final": 0.0001,
    "num_workers": 1,
    "val_fraction": 0.17,
    "val_every": 4,
    "val_metric": "cpm_object_dice",
    "val_overlap": 0.25,
    "size_preset": "lung",
    "preprocessing": "ct-lung",
    "seed": 0,
    # the model is trained on synthetic data this script makes: it is the repository's, under its licence
    "license": "Apache-2.0",
}
QUICK = {"n_train": 6, "n_heldout": 2, "shape": (32, 64, 64),
         "train": {"model_size": "tiny", "patch_size": [32, 32, 32], "epochs": 2, "iters_per_epoch": 3,
                   "val_every": 2, "val_fraction": 0.34}}
MARKER = ".iwseg-demo"
#: Display window and level of the rendered picture (HU): the usual lung window.
LUNG_WINDOW = (1500.0, -600.0)


def stage(number: int, total: int, text: str) -> None:
    print(f"\n[{number}/{total}] {text}", flush=True)


def prepare_output(out: Path) -> None:
    """Create ``out``; an earlier demo output (it has the marker file) is replaced, anything else refused."""
    if out.exists():
        if not out.is_dir():
            raise SystemExit(f"demo: --out {out} exists and is not a folder")
        if any(out.iterdir()):
            if not (out / MARKER).is_file():
                raise SystemExit(f"demo: --out {out} is not empty and is not an earlier demo output; "
                                 "choose another folder")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by scripts/demo.py; the whole folder is replaced on the next run\n")


def generate(out: Path, n_train: int, n_heldout: int, shape) -> tuple[Path, Path]:
    from tqdm import tqdm

    from IWSegmentationLib.data.synth import write_dataset

    sets = []
    for name, n, seed in (("train", n_train, SYNTH_SEED), ("heldout", n_heldout, HELDOUT_SEED)):
        folder = out / "data" / name
        bar = tqdm(total=n, desc=f"synth {name}", unit="case")
        summary = write_dataset(folder, n, seed, SYNTH_PRESET, shape=shape,
                                progress=lambda done, total, cid, bar=bar: bar.update(1))
        bar.close()
        print(f"  {name}: {n} cases of {'x'.join(map(str, shape))} voxels, {summary['lesions_total']} lesions "
              f"-> {folder}")
        sets.append(folder)
    return sets[0], sets[1]


def train_model(train_dir: Path, out: Path, settings: dict):
    from IWSegmentationLib.training import TrainConfig, train

    config = TrainConfig.from_dict({**settings, "data": str(train_dir), "out": str(out / "training")})
    print(f"  {config.model_size} U-Net, loss {config.loss}, patches {config.patch_size} x {config.batch_size}, "
          f"{config.epochs} epochs x {config.iters_per_epoch} iterations, lr {config.lr:g} -> {config.lr_final:g}")
    result = train(config)
    print(result.summary())
    model_path = out / "model.safetensors"
    shutil.copyfile(result.model_checkpoint, model_path)
    return result, model_path


def run_cli(argv: list[str]) -> None:
    from IWSegmentationLib.cli import main

    code = main(argv)
    if code:
        raise SystemExit(f"demo: `iwseg {' '.join(argv)}` failed with exit code {code}")


def render(out: Path, heldout: Path) -> Path | None:
    """A review picture of the first held-out case: predicted lesions coloured by size group,
    false positives and missed reference lesions in their own colours
    (:func:`IWSegmentationLib.slicer.views.render_lesions_png`: Slicer's views rendered offscreen with
    slicer-core), or None when it cannot be made here (the reason is printed)."""
    from IWSegmentationLib.slicer.views import render_lesions_png

    images = sorted((heldout / "imagesTr").glob("*.nii.gz"))
    if not images:
        return None
    case = images[0].name
    png = out / "lesions_by_size.png"
    try:
        render_lesions_png(image=images[0], mask=out / "masks" / case, output=png,
                           size_preset=TRAIN_SETTINGS["size_preset"], window_level=LUNG_WINDOW,
                           reference=heldout / "labelsTr" / case,
                           title=f"{case}: predicted lesions by size, against the reference (held-out case)")
    except Exception as exc:  # rendering is a bonus: report and go on
        print(f"  skipped: {exc}")
        return None
    return png if png.is_file() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default demo_output)")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke test of the pipeline")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    out = args.out
    n_train, n_heldout, shape, settings = N_TRAIN, N_HELDOUT, SYNTH_SHAPE, dict(TRAIN_SETTINGS)
    if args.quick:
        n_train, n_heldout, shape = QUICK["n_train"], QUICK["n_heldout"], QUICK["shape"]
        settings.update(QUICK["train"])
    prepare_output(out)
    total = 5

    stage(1, total, "generating synthetic data (iwseg synth)")
    train_dir, heldout_dir = generate(out, n_train, n_heldout, shape)

    stage(2, total, "training an inverse-weighted Dice U-Net on the CPU (iwseg train)")
    result, model_path = train_model(train_dir, out, settings)

    stage(3, total, f"predicting the {n_heldout} held-out cases (iwseg predict)")
    for name in ("masks", "probabilities", "logits", "lesions"):
        (out / name).mkdir()
    run_cli(["predict", "--model", str(model_path), "--input", str(heldout_dir / "imagesTr"),
             "--organ-mask", str(heldout_dir / "masksTr"), "--output", str(out / "masks"),
             "--probabilities", str(out / "probabilities"), "--logits", str(out / "logits"),
             "--lesions", str(out / "lesions"), "--device", "cpu"])

    stage(4, total, "evaluating lesion by lesion (iwseg evaluate, lesions ranked by their maximum logit)")
    run_cli(["evaluate", "--logits", str(out / "logits"), "--ref", str(heldout_dir / "labelsTr"),
             "--size-preset", settings["size_preset"], "--json", str(out / "report.json"),
             "--csv", str(out / "lesions.csv"), "--froc-png", str(out / "froc.png")])

    stage(5, total, "rendering lesions coloured by size (3D Slicer's slicer-core)")
    picture = render(out, heldout_dir)
    if picture is not None:
        print(f"  {picture}")

    minutes = (time.perf_counter() - t0) / 60
    print(f"\nDemo finished in {minutes:.1f} min. Everything is in {out}/:")
    rows = [
        ("model.safetensors", f"the checkpoint with the best validation {settings['val_metric']} (harmonic mean "
                              "of CPM and object Dice) with its model card"),
        ("training/", "training run: last/best checkpoints, resume state, log.csv, tensorboard/, config.yaml"),
        ("data/", "the synthetic datasets, train/ and heldout/ (MSD layout)"),
        ("masks/", "predicted lesion masks of the held-out cases"),
        ("probabilities/", "predicted probability maps"),
        ("logits/", "the blended logit maps (what ranks lesions: a lesion's confidence is its maximum logit)"),
        ("lesions/", "per-case lesion tables (JSON: volume, diameter, size group, confidence = maximum logit)"),
        ("report.json", "lesion-wise evaluation: avg recall, CPM, object Dice, by size group"),
        ("lesions.csv", "one row per reference lesion: size, group, detected, Dice"),
        ("froc.png", "FROC curves, overall and per size group"),
    ]
    if picture is not None:
        rows.append((picture.name, "held-out case with its predicted lesions coloured by size"))
    for name, what in rows:
        print(f"  {out / name}: {what}")
    print(f"\nTensorBoard: tensorboard --logdir {out / 'training' / 'tensorboard'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
