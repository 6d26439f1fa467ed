"""``iwseg synth``: write a synthetic multi-lesion dataset (MSD layout) for demos, tests, benchmarks.

See :mod:`IWSegmentationLib.data.synth` for the model and ``docs/data.md`` for the layout.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from ...core.errors import InputError
from ...core.outputs import atomic_output
from ...data.synth import write_dataset


def run(args: argparse.Namespace) -> int:
    if args.cases < 1:
        raise InputError(f"--cases must be >= 1, got {args.cases}")
    if args.seed < 0:
        raise InputError(f"--seed must be >= 0, got {args.seed}")
    if args.histogram is not None and not args.histogram.resolve().parent.is_dir():
        raise InputError(f"--histogram: output folder does not exist: {args.histogram.parent}")

    def progress(done: int, total: int, case: str) -> None:
        if not args.quiet:
            print(f"\r[{done}/{total}] {case}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    summary = write_dataset(
        args.out, args.cases, args.seed, args.preset, shape=args.size, spacing=args.spacing,
        body_fraction=args.body_fraction, overwrite=args.force, progress=progress, mean_lesions=args.mean_lesions,
        channels=args.channels,
    )
    counts = summary["lesions_per_case"]
    print(f"wrote {args.cases} {args.preset} case(s) of {'x'.join(map(str, summary['size']))} voxels, "
          f"spacing {tuple(summary['spacing'])} mm, {summary['lesions_total']} lesions "
          f"({np.mean(counts):.1f} per case) to {args.out}")
    if args.histogram is not None:
        diameters = read_lesion_diameters(args.out / "lesions.csv")
        plot_lesion_sizes(diameters, counts, args.histogram,
                          title=f"iwseg synth --preset {args.preset} --cases {args.cases} --seed {args.seed} "
                                f"--size {' '.join(map(str, summary['size']))}")
        print(f"histogram: {args.histogram}")
    return 0


def read_lesion_diameters(path: Path) -> np.ndarray:
    """Equivalent diameters (voxels) from a ``lesions.csv`` written by :func:`write_dataset`."""
    with open(path, newline="") as fh:
        return np.asarray([float(row["diameter_vox"]) for row in csv.DictReader(fh)], dtype=float)


def plot_lesion_sizes(diameters: Sequence[float], counts: Sequence[int], path: Path, *, title: str = "") -> Path:
    """Two panels: the lesion equivalent-diameter histogram (log bins) and lesions per case."""
    import matplotlib  # lazy: matplotlib takes ~1 s to load; only the plot needs it
    import matplotlib.ticker  # lazy: matplotlib takes ~1 s to load; only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib takes ~1 s to load; only the plot needs it

    d = np.asarray(diameters, dtype=float)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    if d.size:
        bins = np.geomspace(max(1.0, d.min() * 0.95), d.max() * 1.05, 20)
        a.hist(d, bins=bins, color="#0072B2", edgecolor="white")
        a.set_xscale("log")
        ticks = [t for t in (1, 2, 3, 5, 10, 20, 40, 80) if bins[0] <= t <= bins[-1]]
        a.set_xticks(ticks, [str(t) for t in ticks])
        a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        med = float(np.median(d))
        a.axvline(med, color="#D55E00", linestyle="--", label=f"median {med:.1f}")
        a.legend()
    a.set_xlabel("lesion equivalent diameter (voxels), (6 V / π)^(1/3)")
    a.set_ylabel("lesions")
    a.set_title(f"{d.size} lesions")
    c = np.asarray(counts, dtype=int)
    if c.size:
        b.hist(c, bins=np.arange(c.max() + 2) - 0.5, color="#009E73", edgecolor="white")
    b.set_xlabel("lesions per case")
    b.set_ylabel("cases")
    b.set_title(f"mean {c.mean():.2f} per case" if c.size else "no cases")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return Path(path)
