"""Speed of the inverse weights (issue 2, "Speed"): one run, medians after warm-up.

    python -m scripts.bench.weights [--quick] [--threads 2] [--report FILE]

Times ``weights.inverse_weights`` (labelling included) on a (2, 1, 128, 128, 128) float
target batch with 10, 200 and 2,000 lesions, and a per-component reference loop (one
``labels == j`` pass per component, O(K·N)) at 200 lesions. Targets: ≤ 15 ms median with
10 and with 2,000 lesions on 2 CPU cores, and ≥ 50x faster than the loop at 200 lesions.
Run it on a quiet machine, pinned to two cores, e.g.

    taskset -c 0,1 python -m scripts.bench weights

``--quick`` (64³ patches, few repeats) only checks that the script works.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from IWSegmentationLib.core.lesions import label_components
from IWSegmentationLib.core.weights import inverse_weights
from scripts.bench import report, timing

TARGET_MS = 15.0
TARGET_RATIO = 50.0


def make_batch(size: int, n_lesions: int, batch: int, seed: int) -> torch.Tensor:
    """(B, 1, size³) float target with ``n_lesions`` separate lesions per sample: boxes of 1-4
    voxels a side, one per randomly chosen cell of a 6-voxel grid (so they never touch)."""
    rng = np.random.default_rng(seed)
    cells = size // 6
    if n_lesions > cells**3:
        raise SystemExit(f"{n_lesions} lesions do not fit a {size}³ patch (at most {cells ** 3})")
    out = np.zeros((batch, 1, size, size, size), np.float32)
    for b in range(batch):
        chosen = rng.choice(cells**3, n_lesions, replace=False)
        corners = np.stack(np.unravel_index(chosen, (cells,) * 3), axis=1) * 6 + 1
        sides = rng.integers(1, 5, size=(n_lesions, 3))
        for (z, y, x), (dz, dy, dx) in zip(corners, sides):
            out[b, 0, z:z + dz, y:y + dy, x:x + dx] = 1.0
    return torch.from_numpy(out)


def reference_loop(target: torch.Tensor, w_min: float = 1.0, w_max: float = 2e5) -> torch.Tensor:
    """The per-component loop the vectorised code replaces: one full-volume mask per component."""
    out = torch.empty(target.shape, dtype=torch.float32)
    for b in range(target.shape[0]):
        labels, k = label_components(target[b, 0].numpy())
        n = labels.size
        w = np.empty(labels.shape, np.float32)
        for j in range(k + 1):
            sel = labels == j
            count = int(sel.sum())
            if count:
                w[sel] = min(max(n / ((k + 1) * count), w_min), w_max)
        out[b, 0] = torch.from_numpy(w)
    return out


def median_ms(fn, repeats: int, warmup: int) -> float:
    """:func:`timing.median_time` in milliseconds."""
    return timing.median_time(fn, repeats, warmup)[0] * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64³ patches and few repeats: a smoke test")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default 50; quick 5)")
    report.add_report_argument(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    size = 64 if args.quick else 128
    repeats = args.repeats or (5 if args.quick else 50)
    warmup = 2 if args.quick else 5
    counts = (10, 200, 1000) if args.quick else (10, 200, 2000)
    loop_repeats = 2 if args.quick else 5
    shape = f"(2, 1, {size}, {size}, {size})"

    def verdict(ok: bool) -> str:
        return "n/a (quick)" if args.quick else ("yes" if ok else "NO")

    rows = []
    timings = {}
    for i, k in enumerate(counts):
        batch = make_batch(size, k, 2, seed=i)
        timings[k] = median_ms(lambda batch=batch: inverse_weights(batch), repeats, warmup)
        rows.append((f"`inverse_weights` {shape}", k, timings[k], f"≤ {TARGET_MS:g} ms" if k != 200 else "",
                     verdict(timings[k] <= TARGET_MS) if k != 200 else ""))
    batch = make_batch(size, 200, 2, seed=1)
    expected = inverse_weights(batch)
    assert torch.equal(reference_loop(batch), expected), "reference loop and inverse_weights disagree"
    loop_ms = median_ms(lambda: reference_loop(batch), loop_repeats, 1)
    ratio = loop_ms / timings[200]
    rows.append((f"per-component loop {shape}", 200, loop_ms, "", ""))
    rows.append(("speed-up over the loop", 200, None, f"≥ {TARGET_RATIO:g}x",
                 f"{ratio:.0f}x, {verdict(ratio >= TARGET_RATIO)}"))

    lines = [
        f"Inverse weights, medians of {repeats} runs after {warmup} warm-up runs "
        f"(loop: {loop_repeats} runs). {timing.machine_line(('torch', 'numpy'), threads=args.threads)}",
        "",
        "| case | lesions / sample | median ms | target | met |",
        "|---|---:|---:|---|---|",
    ]
    for name, k, ms, target, met in rows:
        lines.append(f"| {name} | {k} | {'' if ms is None else f'{ms:.2f}'} | {target} | {met} |")
    report.publish("weights", "\n".join(lines), args.report, argv, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
