"""Benchmark of the lesion-wise evaluation (``iwseg evaluate``) on one large synthetic case.

Target from issue 2: one 512x512x300 case with 30 lesions evaluated in <= 1.5 s on 2 CPU
cores. The case is a probability map with low background noise everywhere (as a sigmoid
output has), 30 reference lesions of 2-25 mm of which about 80% are found (some shifted,
so Dice < 1), and 10 false-positive blobs. Timed separately, median of ``--repeats`` after
one warm-up run:

* ``match_case``: input checks, thresholding, labelling reference and prediction (cc3d),
  the two lesion tables, confidences and all overlaps (:mod:`IWSegmentationLib.evaluation`);
* ``evaluate_cases``: FROC, CPM, avg recall, object Dice, 100 bootstrap resamples, for all
  lesions and the three size groups;
* the matching ``iwseg evaluate`` does per case: under the hit rules it compares side by side
  (``COMPARED_HIT_RULES``, paper and one-to-one), once with one ``case_overlaps`` and a
  ``CaseOverlaps.match`` per rule (what it does now: one labelling per volume), and once with a
  ``match_case`` per rule (how it matched before: the case labelled again for every rule);
  the two interleaved, median of ``--repeats`` rounds after one warm-up round;
* ``read 2 files``: reading the prediction and reference as uncompressed NRRD (``--with-io``).

Run quietly (``python -m scripts.bench evaluate`` sets the allocator), e.g.::

    python -m scripts.bench.evaluate --with-io --report docs/benchmarks.md

``--quick`` uses a 300x256x256 volume with 15 lesions and 2 repeats, to check the script runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from IWSegmentationLib.cli.commands.evaluate import COMPARED_HIT_RULES
from IWSegmentationLib.core.imageio import Geometry, read_image, write_image
from IWSegmentationLib.core.lesions import SIZE_PRESETS
from IWSegmentationLib.evaluation import case_overlaps, evaluate_cases, match_case
from scripts.bench import report, timing

TARGET_S = 1.5
SPACING = (1.0, 0.7, 0.7)  # (sz, sy, sx) mm, a typical chest CT


def _ball(shape, center, radius_vox):
    """Slices and boolean ball of an ellipsoid with per-axis radii, clipped to ``shape``."""
    lo = [max(0, int(np.floor(c - r))) for c, r in zip(center, radius_vox)]
    hi = [min(s, int(np.ceil(c + r)) + 1) for s, c, r in zip(shape, center, radius_vox)]
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    grids = np.ogrid[sl]
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radius_vox)) <= 1.0
    return sl, inside


def make_case(shape, n_lesions: int, n_fp: int = 10, seed: int = 0):
    """A probability map and a reference mask with ``n_lesions`` lesions (``[z, y, x]``)."""
    rng = np.random.default_rng(seed)
    ref = np.zeros(shape, np.uint8)
    prob = rng.random(shape, dtype=np.float32)
    prob *= 0.2  # background noise, well below the 0.5 threshold
    sp = np.asarray(SPACING)
    for i in range(n_lesions):
        diameter_mm = rng.uniform(2.0, 25.0)
        radius = diameter_mm / 2 / sp
        center = [rng.uniform(r + 1, s - r - 2) for s, r in zip(shape, radius)]
        sl, inside = _ball(shape, center, radius)
        ref[sl][inside] = 1
        if i % 5 == 4:  # every fifth lesion is missed
            continue
        shift = rng.integers(-1, 2, size=3) * (i % 3 == 0)
        sl2, inside2 = _ball(shape, [c + d for c, d in zip(center, shift)], radius)
        region = prob[sl2]
        region[inside2] = np.maximum(region[inside2], rng.uniform(0.55, 0.99))
    for _ in range(n_fp):
        radius = rng.uniform(1.0, 4.0) / sp
        center = [rng.uniform(r + 1, s - r - 2) for s, r in zip(shape, radius)]
        sl, inside = _ball(shape, center, radius)
        region = prob[sl]
        region[inside & (ref[sl] == 0)] = rng.uniform(0.5, 0.9)
    return prob, ref


def run(shape, n_lesions: int, repeats: int, with_io: bool) -> tuple[list[tuple[str, float]], dict]:
    prob, ref = make_case(shape, n_lesions)
    thresholds = SIZE_PRESETS["lung"]
    t_match, case = timing.median_time(lambda: match_case(prob, ref, SPACING, thresholds=thresholds, case="bench"),
                                       repeats)
    t_report, scores = timing.median_time(lambda: evaluate_cases([case]), repeats)
    t_shared, t_per_rule = _compared_rules_times(prob, ref, thresholds, repeats)
    n = len(COMPARED_HIT_RULES)
    rows = [("match_case (checks, 2x label, 2x lesion table, overlaps)", t_match),
            ("evaluate_cases (FROC, CPM, avg recall, 4x100 bootstrap)", t_report),
            ("total in memory", t_match + t_report),
            (f"{n} compared hit rules: case_overlaps + {n}x match (iwseg evaluate)", t_shared),
            (f"{n} compared hit rules: {n}x match_case (one labelling per rule)", t_per_rule)]
    if with_io:
        geometry = Geometry.identity(shape, SPACING)
        with tempfile.TemporaryDirectory() as tmp:
            p_pred, p_ref = Path(tmp, "pred.nrrd"), Path(tmp, "ref.nrrd")
            write_image(p_pred, prob, geometry, compress=False)
            write_image(p_ref, ref, geometry, compress=False)
            t_io, _ = timing.median_time(lambda: (read_image(p_pred), read_image(p_ref)), repeats)
        rows.append(("read 2 files (uncompressed NRRD)", t_io))
        rows.append(("total with reading", t_match + t_report + t_io))
    info = {"lesions": len(case.lesions), "components": len(case.components),
            "false positives": case.n_false_positives, "cpm": scores["cpm"]}
    return rows, info


def _compared_rules_times(prob, ref, thresholds, repeats: int) -> tuple[float, float]:
    """Median seconds of matching the case under :data:`COMPARED_HIT_RULES` from one shared
    :func:`case_overlaps`, and with one :func:`match_case` per rule; the two interleaved."""

    def shared():
        overlaps = case_overlaps(prob, ref, SPACING, thresholds=thresholds, case="bench")
        return [overlaps.match(rule) for rule in COMPARED_HIT_RULES]

    def per_rule():
        return [match_case(prob, ref, SPACING, thresholds=thresholds, case="bench", hit_rule=rule)
                for rule in COMPARED_HIT_RULES]

    def timed(fn):
        start = time.perf_counter()
        fn()
        return {"seconds": time.perf_counter() - start}

    kept = timing.interleaved({"shared": lambda: timed(shared), "per_rule": lambda: timed(per_rule)}, repeats)
    return timing.medians(kept["shared"])["seconds"], timing.medians(kept["per_rule"])["seconds"]


def markdown_table(rows, shape, n_lesions, info, repeats) -> str:
    lines = [
        f"Evaluation of one {'x'.join(map(str, shape[::-1]))} (x·y·z) case, {n_lesions} lesions "
        f"({info['components']} predicted components, {info['false positives']} FP); median of {repeats} "
        f"after a warm-up. {timing.machine_line()} Target: total in memory <= {TARGET_S} s.",
        "",
        "| step | seconds |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {seconds:.3f} |" for name, seconds in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small volume, 2 repeats: check that it runs")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats after the warm-up (default 7)")
    parser.add_argument("--with-io", action="store_true", help="also time reading the two files")
    report.add_report_argument(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    shape, n_lesions = ((300, 256, 256), 15) if args.quick else ((300, 512, 512), 30)
    repeats = args.repeats or (2 if args.quick else 7)
    rows, info = run(shape, n_lesions, repeats, args.with_io)
    table = markdown_table(rows, shape, n_lesions, info, repeats)
    report.publish("evaluate", table, args.report, argv, quick=args.quick)
    total = dict(rows)["total in memory"]
    if not args.quick and total > TARGET_S:
        print(f"note: {total:.2f} s is above the {TARGET_S} s target", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
