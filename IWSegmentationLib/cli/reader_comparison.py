"""``iwseg evaluate --verdicts``: the model alone and the model plus reader, side by side (docs/verdicts.md).

Every evaluated case with a verdict file is matched a second time, on its score map with the
reader's verdicts applied (:func:`IWSegmentationLib.evaluation.reader.reader_scores`: rejected
lesions removed, edited ones replaced by the reviewed label map's voxels when it was saved); a case
without one counts as the model predicted it. Both sets are pooled as ``iwseg evaluate`` pools any
cases.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence, TextIO

from ..core.errors import InputError
from ..core.files import pair_cases
from ..core.imageio import check_same_grid, read_image, read_image_notes
from ..core.lesions import SizeThresholds
from ..core.prediction_maps import prediction_probabilities
from ..core.verdicts import VERDICTS, find_verdict_files, read_verdicts
from ..evaluation.matching import CaseResult, match_case
from ..evaluation.reader import predicted_lesions, reader_scores
from ..evaluation.report import detection_summary, evaluate_cases


def check_verdicts_sources(args: argparse.Namespace) -> None:
    """``--verdicts`` needs the score maps (``--logits``/``--pred`` with ``--ref``), not records."""
    if args.verdicts is not None and args.records is not None:
        raise InputError("--verdicts needs --logits (or --pred) and --ref: verdicts name lesions of a score map, "
                         "--records have none")


def reader_results(args: argparse.Namespace, thresholds: SizeThresholds, model_alone: Sequence[CaseResult],
                   folder: Path) -> tuple[list[CaseResult], dict]:
    """The cases as the reader left them, in the order of ``model_alone``, and what was applied:
    ``{"reviewed_cases", "accepted", "rejected", "edited", "edited_with_mask"}``."""
    files = find_verdict_files(args.verdicts)
    pairs = {name: (pred, ref) for name, pred, ref in pair_cases(folder, args.ref)}
    unknown = sorted(set(files) - set(pairs))
    for name in unknown:
        print(f"warning: --verdicts: {files[name]} is for case {name!r}, which is not evaluated", file=sys.stderr)
    score = "logit" if args.logits is not None else "probability"
    counts = {"reviewed_cases": 0, **{v: 0 for v in VERDICTS}, "edited_with_mask": 0}
    out = []
    for case in model_alone:
        if case.case not in files:
            out.append(case)
            continue
        pred_path, ref_path = pairs[case.case]
        ref, ref_geom = read_image(ref_path, what="reference")
        scores, geom = read_image(pred_path, what="logit map" if score == "logit" else "prediction")
        if score == "probability":
            scores = prediction_probabilities(scores, read_image_notes(pred_path), pred_path, args.pred_values)
        check_same_grid(ref_geom, geom, f"reference {ref_path}", f"prediction {pred_path}")
        verdicts = read_verdicts(files[case.case], case=case.case, grid=geom)
        threshold = args.threshold if verdicts.lesion_set.threshold is None else verdicts.lesion_set.threshold
        labels, lesions, found = predicted_lesions(scores, threshold, verdicts.lesion_set.connectivity, score)
        verdicts.check_matches(files[case.case], lesion_set=found)  # refused, naming both lesion sets
        reviewed = None
        if verdicts.reviewed_labels and verdicts.ids("edited"):
            path = files[case.case].parent / verdicts.reviewed_labels
            reviewed, reviewed_geom = read_image(path, what="reviewed label map")
            check_same_grid(geom, reviewed_geom, f"prediction {pred_path}", f"reviewed label map {path}")
            counts["edited_with_mask"] += len(verdicts.ids("edited"))
        counts["reviewed_cases"] += 1
        for v in VERDICTS:
            counts[v] += len(verdicts.ids(v))
        edited = reader_scores(scores, labels, lesions, verdicts, reviewed, score=score)
        spacing = ref_geom.spacing_zyx if args.spacing_from == "ref" else geom.spacing_zyx
        out.append(match_case(edited, ref, spacing, threshold=args.threshold, thresholds=thresholds,
                              connectivity=args.connectivity, case=case.case, pred_name=str(pred_path),
                              ref_name=str(ref_path), hit_rule=args.hit_rule, min_lesion_size=args.min_lesion_size,
                              score=score))
    return out, counts


def print_reader_comparison(model_alone: Sequence[CaseResult], reader: tuple[list[CaseResult], dict], *,
                            seed: int = 0, bootstrap_mode: str = "ours", file: TextIO | None = None) -> dict:
    """Print the model alone and the model plus reader side by side; returns the report's
    ``model_plus_reader`` entry: both rows, the verdict counts and the full report of the reader's cases."""
    out = file or sys.stdout
    cases, counts = reader
    rows = {"model alone": detection_summary(model_alone), "model + reader": detection_summary(cases)}
    print(f"{'':<22}{'recall':>8}{'FP/img':>8}{'CPM':>8}{'obj Dice':>10}", file=out)
    for label, r in rows.items():
        print(f"{label:<22}{_fmt(r['recall']):>8}{r['fp_per_image']:>8.2f}{_fmt(r['cpm']):>8}"
              f"{_fmt(r['object_dice']):>10}", file=out)
    print(f"verdicts: {counts['reviewed_cases']} of {len(cases)} case(s) reviewed; {counts['accepted']} accepted, "
          f"{counts['rejected']} rejected, {counts['edited']} edited ({counts['edited_with_mask']} with the "
          "reviewed label map)", file=out)
    return {"model_alone": rows["model alone"], "model_plus_reader": rows["model + reader"], "verdicts": counts,
            "report": evaluate_cases(cases, seed=seed, bootstrap_mode=bootstrap_mode)}


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
