"""``iwseg evaluate``: lesion-wise evaluation of predicted logit or probability maps against references.

Pairs prediction (``--logits`` or ``--pred``) and reference files by case name, matches lesions per case
(:func:`IWSegmentationLib.evaluation.case_overlaps`, labelled and counted once, then matched under each
compared hit rule), or reads per-lesion records
(:func:`IWSegmentationLib.evaluation.records.load_records`), pools the cases
(:func:`IWSegmentationLib.evaluation.evaluate_cases`), prints a summary table and optionally
writes a JSON report, a per-lesion CSV and a FROC plot. Definitions: ``docs/metrics.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Sequence, TextIO

import numpy as np

from ...core.errors import InputError
from ...core.files import pair_cases
from ...core.imageio import Geometry, check_same_grid, read_image, read_image_notes
from ...core.lesions import (
    SIZE_GROUP_COLORS,
    SIZE_GROUPS,
    SizeThresholds,
    parse_min_lesion_size,
    size_thresholds,
)
from ...core.outputs import atomic_output, check_not_overwriting, check_writable
from ...core.prediction_maps import parse_prediction_values, prediction_probabilities
from ...core.progress import CancelState
from ...evaluation.bootstrap import (
    BOOTSTRAP_FRACTION,
    N_BOOTSTRAP,
    PAPER_BOOTSTRAP_SEED,
    bootstrap_recall_curves,
)
from ...evaluation.froc import CPM_FP_RATES
from ...evaluation.hit_rules import parse_hit_rule
from ...evaluation.matching import CaseResult, case_overlaps
from ...evaluation.records import load_records
from ...evaluation.report import LOW_HIT_DICE, compare_hit_rules, evaluate_cases
from ..reader_comparison import (
    check_verdicts_sources,
    print_reader_comparison,
    reader_results,
)

CSV_COLUMNS = (
    "case", "lesion_id", "voxels", "volume_mm3", "diameter_mm", "size_group",
    "centroid_x_mm", "centroid_y_mm", "centroid_z_mm",
    "detected", "hit_dice", "confidence", "matched_component", "kind", "score",
)


def run(args: argparse.Namespace) -> int:
    """Evaluate; SIGINT and SIGTERM cancel (exit code 3) without leaving partial output files."""
    with CancelState().installed():
        return _evaluate(args)


def _evaluate(args: argparse.Namespace) -> int:
    thresholds = size_thresholds(args.size_preset, args.size_thresholds)
    if not (0.0 <= args.threshold < 1.0):
        raise InputError(f"--threshold must be in [0, 1), got {args.threshold}")
    _check_sources(args)
    check_verdicts_sources(args)
    if args.seed is not None and not 0 <= args.seed < 2**32:
        raise InputError(f"--seed must be in [0, 2^32), got {args.seed}")
    args.pred_values = parse_prediction_values(args.pred_values)
    if args.pred_values != "auto" and args.pred is None:
        raise InputError("--pred-values says what --pred's values are; give it with --pred")
    outputs = {"--json": args.json, "--csv": args.csv, "--froc-png": args.froc_png}
    for flag, path in outputs.items():
        if path is not None and not path.resolve().parent.is_dir():
            raise InputError(f"{flag}: output folder does not exist: {path.parent}")
    if args.records is not None:
        check_not_overwriting(outputs, {"--records": [args.records]})
    else:
        flag, folder = _prediction_source(args)
        pairs = pair_cases(folder, args.ref)
        check_not_overwriting(outputs, {flag: [folder, *(p for _, p, _ in pairs)],
                                        "--ref": [args.ref, *(r for _, _, r in pairs)]})
    for flag, path in outputs.items():
        if path is not None:
            check_writable(path.resolve().parent, flag)
    try:
        args.hit_rule = parse_hit_rule(args.hit_rule)
        args.min_lesion_size = parse_min_lesion_size(args.min_lesion_size)
    except InputError as exc:
        raise InputError(f"--hit-rule/--min-lesion-size: {exc}") from None
    if args.seed is None:
        args.seed = PAPER_BOOTSTRAP_SEED if args.bootstrap == "paper" else 0

    geometries: dict[str, Geometry] = {}
    comparison = None
    if args.records is not None:
        results = load_records(args.records, thresholds, score=args.records_score)
    else:
        by_rule = _evaluate_folders(args, thresholds, geometries)
        results = by_rule[str(args.hit_rule)]
        comparison = compare_hit_rules(by_rule)

    report = evaluate_cases(results, seed=args.seed, bootstrap_mode=args.bootstrap)
    print_summary(report, results, thresholds, threshold=args.threshold)
    if args.verdicts is not None:  # model alone vs model + reader (docs/verdicts.md)
        reader = reader_results(args, thresholds, results, _prediction_source(args)[1])
        report["model_plus_reader"] = print_reader_comparison(results, reader, seed=args.seed,
                                                              bootstrap_mode=args.bootstrap)
    if comparison is not None:
        report["hit_rule_comparison"] = comparison
        report["warnings"] = comparison["reasons"]
        print_rule_comparison(comparison)
    if args.json is not None:
        write_json(args.json, report)
    if args.csv is not None:
        write_lesion_csv(args.csv, results, geometries)
    if args.froc_png is not None:
        plot_froc(args.froc_png, report, results, thresholds, threshold=args.threshold, seed=args.seed,
                  bootstrap_mode=args.bootstrap)
    for flag, path in (("JSON", args.json), ("CSV", args.csv), ("FROC plot", args.froc_png)):
        if path is not None:
            print(f"{flag}: {path}")
    return 0


def _check_sources(args: argparse.Namespace) -> None:
    """Either --logits or --pred, with --ref; or --records (which are matched already)."""
    if args.logits is not None and args.pred is not None:
        raise InputError("give either --logits (logit maps) or --pred (probability maps), not both")
    if args.records is not None:
        if args.pred is not None or args.logits is not None or args.ref is not None:
            raise InputError("give either --records or --logits/--pred with --ref, not both")
        if args.hit_rule not in (None, "paper") or args.min_lesion_size is not None:
            raise InputError("--hit-rule and --min-lesion-size need masks (--logits/--pred with --ref): records are "
                             "matched already")
    elif (args.pred is None and args.logits is None) or args.ref is None:
        raise InputError("give --logits (or --pred) and --ref (folders of predictions and references), or --records "
                         "FILE")


def _prediction_source(args: argparse.Namespace) -> tuple[str, Path]:
    """The flag and folder of the predictions: ``--logits`` or ``--pred``."""
    return ("--logits", args.logits) if args.logits is not None else ("--pred", args.pred)


#: The hit rules every mask evaluation is also matched under, for the side-by-side comparison.
COMPARED_HIT_RULES = ("paper", "one-to-one")


def _evaluate_folders(args: argparse.Namespace, thresholds: SizeThresholds,
                      geometries: dict[str, Geometry]) -> dict[str, list[CaseResult]]:
    """Match every prediction/reference pair of the two folders (progress bar on stderr) under
    ``--hit-rule`` and under :data:`COMPARED_HIT_RULES`: ``{rule: cases}``, ``--hit-rule`` first."""
    from tqdm import tqdm  # lazy: `iwseg` starts without tqdm (~0.25 s)

    rules = {str(args.hit_rule): args.hit_rule}
    for name in COMPARED_HIT_RULES:
        rules.setdefault(str(parse_hit_rule(name)), parse_hit_rule(name))
    pairs = pair_cases(_prediction_source(args)[1], args.ref)
    results: dict[str, list[CaseResult]] = {rule: [] for rule in rules}
    bar = tqdm(pairs, desc="evaluate", unit="case", file=sys.stderr, leave=False, disable=args.no_progress)
    for name, pred_path, ref_path in bar:
        bar.set_postfix_str(name)
        for rule, case in _evaluate_pair(name, pred_path, ref_path, args, thresholds, geometries, rules).items():
            results[rule].append(case)
    bar.close()
    return results


def _evaluate_pair(name, pred_path, ref_path, args, thresholds, geometries, rules) -> dict[str, CaseResult]:
    ref, ref_geom = read_image(ref_path, what="reference")
    logits = args.logits is not None
    pred, pred_geom = read_image(pred_path, what="logit map" if logits else "prediction")
    if not logits:  # probability, round(255 p) (predict's note says so) or label map; else refused
        pred = prediction_probabilities(pred, read_image_notes(pred_path), pred_path, args.pred_values)
    check_same_grid(ref_geom, pred_geom, f"reference {ref_path}", f"prediction {pred_path}")
    geom = ref_geom if args.spacing_from == "ref" else pred_geom
    geometries[name] = geom
    overlaps = case_overlaps(  # labelled and counted once, then matched under each rule
        pred, ref, geom.spacing_zyx, threshold=args.threshold, thresholds=thresholds,
        connectivity=args.connectivity, case=name, pred_name=str(pred_path), ref_name=str(ref_path),
        min_lesion_size=args.min_lesion_size, score="logit" if logits else "probability",
        on_warning=lambda message: print(f"warning: --logits: {message}", file=sys.stderr),
    )
    return {rule_name: overlaps.match(rule) for rule_name, rule in rules.items()}


# --------------------------------------------------------------------------------------
# Summary table
# --------------------------------------------------------------------------------------


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _source(results: Sequence[CaseResult], threshold: float) -> str:
    """What the numbers were computed from (records, or thresholded maps) and what ranks the components."""
    ranked = f"ranked by max {results[0].score}" if results else ""
    if all(math.isnan(r.threshold) and r.ref_voxels == 0 and r.pred_voxels == 0 for r in results):
        return f"per-lesion records {ranked}"
    return f"components of prob > {threshold:g} {ranked}"


def _group_label(group: str, thresholds: SizeThresholds) -> str:
    s, m = f"{thresholds.small_mm:g}", f"{thresholds.large_mm:g}"
    return {"small": f"d < {s} mm", "medium": f"{s}-{m} mm", "large": f"d >= {m} mm"}[group]


def print_summary(report: dict, results: Sequence[CaseResult], thresholds: SizeThresholds, *,
                  threshold: float = 0.5, file: TextIO | None = None) -> None:
    """Print the readable summary table: one row for all lesions and one per size group."""
    out = file or sys.stdout
    n_fp: dict = {g: 0 for g in SIZE_GROUPS}
    n_hit: dict = {g: 0 for g in SIZE_GROUPS}
    for r in results:  # records without a size (group None) count only in the "all" row
        for c in r.components:
            n_fp[c.size_group] = n_fp.get(c.size_group, 0) + c.false_positive
        for les in r.lesions:
            n_hit[les.size_group] = n_hit.get(les.size_group, 0) + les.detected
    n_img = report["n_images"]
    dices = [r.voxel_dice for r in results if not math.isnan(r.voxel_dice)]
    boot = report["bootstrap"]
    print(f"iwseg evaluate: {n_img} image(s), {report['n_lesions']} reference lesion(s), {_source(results, threshold)}; "
          f"hit rule {report.get('hit_rule', 'paper')}; bootstrap {boot.get('mode', 'ours')} (seed {boot.get('seed')})",
          file=out)
    header = (f"{'group':<20}{'lesions':>8}{'hit':>6}{'recall':>8}{'FP/img':>8}{'CPM':>8}"
              f"{'avg rec 0-5':>13}{'obj Dice':>10}{'(n)':>6}{'CPM bootstrap':>17}")
    print(header, file=out)
    print("-" * len(header), file=out)
    rows = [("all", report, sum(n_hit.values()), sum(n_fp.values()))]
    rows += [(f"{g} ({_group_label(g, thresholds)})", report["by_size"][g], n_hit[g], n_fp[g]) for g in SIZE_GROUPS]
    for label, s, hits, fps in rows:
        recall = hits / s["n_lesions"] if s["n_lesions"] else None
        boot = s["bootstrap"]["cpm"]
        boot_txt = "n/a" if boot["mean"] is None else f"{boot['mean']:.3f} ± {boot['std']:.3f}"
        print(f"{label:<20}{s['n_lesions']:>8}{hits:>6}{_fmt(recall):>8}{fps / n_img:>8.2f}{_fmt(s['cpm']):>8}"
              f"{_fmt(s['avg_recall_0_5']):>13}{_fmt(s['object_dice']['mean']):>10}"
              f"{s['object_dice']['n']:>6}{boot_txt:>17}", file=out)
    mean_dice = f"{np.mean(dices):.3f}" if dices else "n/a"
    print(f"recall and FP/img at the segmentation threshold (all components); voxel Dice, mean over "
          f"{len(dices)} image(s): {mean_dice}", file=out)
    print("CPM (mean recall at 1/8 ... 8 FP/image) is the paper's Table 2 \"avg Recall\"; avg rec 0-5 is not "
          "(docs/metrics.md)", file=out)


def print_rule_comparison(comparison: dict, *, file: TextIO | None = None) -> None:
    """The hit rules side by side (:func:`IWSegmentationLib.evaluation.report.compare_hit_rules`) and,
    when they disagree, each reason as a ``warning:`` line on stderr."""
    out = file or sys.stdout
    print(f"{'hit rule':<22}{'recall':>8}{'FP/img':>8}{'CPM':>8}{'obj Dice':>10}{f'hits Dice<{LOW_HIT_DICE:g}':>16}",
          file=out)
    for r in comparison["rules"]:
        print(f"{r['hit_rule']:<22}{_fmt(r['recall']):>8}{r['fp_per_image']:>8.2f}{_fmt(r['cpm']):>8}"
              f"{_fmt(r['object_dice']):>10}{r['low_dice_hits']:>16}", file=out)
    if comparison["disagree"]:
        print("THE HIT RULES DISAGREE: the detection numbers above depend on the rule; see the warnings "
              "(docs/metrics.md, \"Hit rules side by side\")", file=out)
        for reason in comparison["reasons"]:
            print(f"warning: {reason}", file=sys.stderr)


# --------------------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------------------


def write_json(path: Path, report: dict) -> None:
    """The report as JSON (strict: undefined values are null, never NaN)."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")


def write_lesion_csv(path: Path, results: Sequence[CaseResult], geometries: dict[str, Geometry]) -> None:
    """One row per reference lesion (``kind`` lesion), then one per false-positive component
    (``kind`` false_positive, its id in ``matched_component``), and one ``kind`` image row for
    an image with neither, so that the table alone gives the FROC (``--records``). ``confidence``
    is the maximum logit (``score`` logit) or probability (``score`` probability) of the
    component. Centroids are in physical (LPS) mm when the geometry is known."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for r in results:
            geom = geometries.get(r.case)
            fps = [c for c in r.components if c.false_positive]
            for les in r.lesions:
                writer.writerow([r.case, les.id, *_size_cells(les, r, geom), int(les.detected), f"{les.hit_dice:.4f}",
                                 "" if les.confidence is None else f"{les.confidence:.6g}",
                                 "" if les.component is None else les.component, "lesion", r.score])
            for comp in fps:
                writer.writerow([r.case, "", *_size_cells(comp, r, geom), "", "0.0000", f"{comp.confidence:.6g}",
                                 comp.id, "false_positive", r.score])
            if not r.lesions and not fps:
                writer.writerow([r.case, *[""] * (len(CSV_COLUMNS) - 3), "image", r.score])


def _size_cells(les, r: CaseResult, geom: Geometry | None) -> list:
    """voxels, volume, diameter, size group and the centroid (x, y, z mm) of a lesion or component."""
    if geom is not None:
        centroid = geom.index_to_physical(les.centroid)
    else:
        centroid = tuple(c * s for c, s in zip(les.centroid[::-1], r.spacing[::-1]))
    return [les.voxels, f"{les.volume_mm3:.3f}", f"{les.diameter_mm:.3f}", les.size_group or "",
            *(f"{v:.2f}" for v in centroid)]


def _color(group: str) -> tuple[float, float, float]:
    return tuple(v / 255 for v in SIZE_GROUP_COLORS[group])


def plot_froc(path: Path, report: dict, results: Sequence[CaseResult], thresholds: SizeThresholds, *,
              threshold: float = 0.5, seed: int = 0, bootstrap_mode: str = "ours") -> None:
    """FROC plot: recall vs FP/image on a log axis (1/8 ... 8, as LUNA16), all lesions with a
    ±1 std bootstrap band and the CPM points marked, plus one curve per size group."""
    from matplotlib import patheffects  # lazy: matplotlib takes ~1 s to load; only the plot needs it
    from matplotlib.figure import Figure  # lazy: matplotlib takes ~1 s to load; only the plot needs it

    fig = Figure(figsize=(8.0, 6.0), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    x_lo, x_hi = 0.1, 10.0
    grid = np.geomspace(x_lo, x_hi, 300)
    stroke = [patheffects.withStroke(linewidth=3.6, foreground=(0.25, 0.25, 0.25))]

    for group in SIZE_GROUPS:
        s = report["by_size"][group]
        label = f"{group} ({_group_label(group, thresholds)}), n={s['n_lesions']}"
        if not s["n_lesions"]:
            ax.plot([], [], color=_color(group), lw=2, label=label + ": no lesions")
            continue
        recall = np.interp(grid, s["froc"]["fp_per_image"], s["froc"]["recall"])
        ax.plot(grid, recall, color=_color(group), lw=2.2, path_effects=stroke,
                label=f"{label}: CPM {_fmt(s['cpm'])}")

    if report["n_lesions"]:
        fr = report["froc"]
        recall = np.interp(grid, fr["fp_per_image"], fr["recall"])
        band = bootstrap_recall_curves(results, grid, n_resamples=N_BOOTSTRAP, fraction=BOOTSTRAP_FRACTION, seed=seed,
                                       mode=bootstrap_mode)
        band = band[np.isfinite(band[:, 0])]
        if band.shape[0] > 1:
            std = band.std(axis=0)
            ax.fill_between(grid, np.clip(recall - std, 0, 1), np.clip(recall + std, 0, 1), color="0.6",
                            alpha=0.35, lw=0, label=f"all lesions, ±1 std over {band.shape[0]} bootstrap resamples"
                                                    + (" (the authors' bootstrap)" if bootstrap_mode == "paper" else ""))
        ax.plot(grid, recall, color="black", lw=2.4,
                label=f"all lesions, n={report['n_lesions']}: CPM {_fmt(report['cpm'])}, "
                      f"avg recall 0-5 {_fmt(report['avg_recall_0_5'])}")
        cpm_recall = np.interp(CPM_FP_RATES, fr["fp_per_image"], fr["recall"])
        ax.plot(CPM_FP_RATES, cpm_recall, "o", ms=7, mfc="white", mec="black", mew=1.6, zorder=5,
                label="CPM points (1/8 ... 8 FP/image)")
        for x, y in zip(CPM_FP_RATES, cpm_recall):
            ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 9), ha="center",
                        fontsize=8, zorder=6, bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none",
                                                    "alpha": 0.85})
    else:
        ax.text(0.5, 0.5, "no reference lesions: recall is undefined", transform=ax.transAxes,
                ha="center", va="center", fontsize=12, color="0.3")

    ax.set_xscale("log")
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(-0.03, 1.06)
    ax.set_xticks(CPM_FP_RATES)
    ax.set_xticklabels(["1/8", "1/4", "1/2", "1", "2", "4", "8"])
    ax.minorticks_off()
    ax.grid(True, which="major", color="0.85", lw=0.8)
    ax.set_xlabel("False positives per image")
    ax.set_ylabel("Lesion recall (sensitivity)")
    ax.set_title(f"FROC: {report['n_images']} image(s), {report['n_lesions']} lesion(s), "
                 f"{_source(results, threshold)}", fontsize=11)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.92)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
