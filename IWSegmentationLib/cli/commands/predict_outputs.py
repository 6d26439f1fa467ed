"""What ``iwseg predict`` writes for a case besides the mask: the lesion report (size groups, minimum size), DICOM SEG, the finite-output check."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ...core.errors import InputError
from ...core.imageio import Geometry, probabilities_to_uint8, write_image
from ...core.lesions import (
    SizeThresholds,
    analyze_lesions,
    parse_min_lesion_size,
    parse_size_thresholds,
    size_thresholds,
)
from ...core.outputs import atomic_output, folder_lock
from ...core.progress import CancelState
from .predict_inputs import _check_output_file, _check_output_folder

if TYPE_CHECKING:
    from .predict_inputs import PredictJob


#: What the lesion JSON's ``confidence`` is (its top-level ``confidence`` entry says so too).
CONFIDENCE_NOTE = ("maximum blended logit inside the lesion (probability = sigmoid(confidence)); logits, because "
                   "a float32 probability rounds to 1.0 above logit 17 and would tie every confident lesion")


def _dicom_seg():
    from ...core import dicom_seg

    return dicom_seg


def attach_dicom_seg(cases: list[PredictJob], args: argparse.Namespace) -> None:
    """Set where each case's DICOM SEG goes (``--dicom-seg``): the given file for one series, else
    ``<folder>/<case>.dcm``. Every case must be a DICOM series (the SEG references its images), and
    the SEG must not land inside a source series folder (it would become a second series there)."""
    _dicom_seg().require_highdicom()  # before any inference
    not_dicom = [c.image for c in cases if not c.image.is_dir()]
    if not_dicom:
        raise InputError(f"--dicom-seg needs DICOM series as --input (a DICOM SEG references the source images); "
                         f"{not_dicom[0]} is an image file, not a DICOM series folder")
    single = len(cases) == 1 and cases[0].image == args.input
    if single:
        _check_output_file("--dicom-seg", args.dicom_seg, image=False)
        others = {p.resolve() for p in cases[0].outputs.values() if p is not None}
        if args.dicom_seg.resolve() in others:
            raise InputError("--dicom-seg must be a different file from --output, --probabilities, --logits "
                             "and --lesions")
        cases[0].dicom_seg = args.dicom_seg
    else:
        _check_output_folder("--dicom-seg", args.dicom_seg)
        for case in cases:
            case.dicom_seg = args.dicom_seg / f"{case.name}.dcm"
    series_folders = {c.image.resolve() for c in cases}
    for case in cases:
        if case.dicom_seg.resolve().parent in series_folders:
            raise InputError(f"--dicom-seg {case.dicom_seg} is inside a source DICOM series folder; write it "
                             "elsewhere (a second series there would make the folder unreadable as one series)")


def _size_thresholds(args: argparse.Namespace, card: dict) -> SizeThresholds:
    """The command line's size groups, else the checkpoint's (list, dict or preset name), else lung."""
    if args.size_preset is not None or args.size_thresholds is not None:
        return size_thresholds(args.size_preset, args.size_thresholds)
    return parse_size_thresholds(card.get("size_thresholds"))


def _min_lesion_size(flag: str | None, card: dict):
    """--min-lesion-size, else the card's optional ``min_lesion_size`` ({"value", "unit"} or null)."""
    try:
        if flag is not None:
            return None if flag.strip().lower() == "none" else parse_min_lesion_size(flag)
        return parse_min_lesion_size(card.get("min_lesion_size"))
    except InputError as exc:
        where = "--min-lesion-size" if flag is not None else "checkpoint metadata 'min_lesion_size'"
        raise InputError(f"{where}: {exc}") from None


def lesion_report(case: PredictJob, prediction, geometry: Geometry, thresholds: SizeThresholds,
                  connectivity: int) -> tuple[dict, int]:
    """The lesion JSON of one case and its lesion count: one entry per connected component of the
    mask, ids in scan order (as ``lesions.label_components`` numbers them), centroids in voxel
    indices and in physical LPS mm, and its ``confidence``: the maximum blended logit inside it
    (probability ``sigmoid(confidence)``; a float32 probability would be exactly 1.0 for every
    lesion above logit 17, see :mod:`IWSegmentationLib.core.confidence`)."""
    _, lesions = analyze_lesions(
        prediction.mask, geometry.spacing_zyx, connectivity=connectivity, thresholds=thresholds,
        scores=prediction.logits,
    )
    rows = []
    for les in lesions:
        rows.append({
            "id": les.id,
            "voxels": les.voxels,
            "volume_mm3": round(les.volume_mm3, 4),
            "diameter_mm": round(les.diameter_mm, 4),
            "size_group": les.size_group,
            "confidence": None if les.confidence is None else round(les.confidence, 6),
            "centroid_lps_mm": [round(v, 4) for v in geometry.index_to_physical(les.centroid)],
            "centroid_zyx": [round(v, 3) for v in les.centroid],
            "bbox_zyx": list(les.bbox),
        })
    report = {
        "case": case.name,
        "image": str(case.image),
        **({"channels": [str(p) for p in case.image_files]} if case.more_channels else {}),
        "threshold": prediction.threshold,
        "confidence": CONFIDENCE_NOTE,
        "connectivity": connectivity,
        "spacing_zyx_mm": list(geometry.spacing_zyx),
        "size_thresholds_mm": {"small": thresholds.small_mm, "large": thresholds.large_mm},
        "coordinates": "centroid_lps_mm: physical LPS millimetres (ITK); centroid_zyx and bbox_zyx "
                       "(exclusive ends): voxel indices in array order",
        "lesions": rows,
    }
    return report, len(rows)


def format_lesion_report(report: dict) -> str:
    """The lesion JSON file's text (also used by the server, which relabels its ``image``)."""
    return json.dumps(report, indent=2, allow_nan=False) + "\n"


def _write_outputs(case: PredictJob, prediction, geometry: Geometry, report: dict, args, reporter,
                   state: CancelState, dicom_source=None) -> dict[str, str]:
    """Write every output of a case to temporary names, then rename them all (signals deferred
    during the renames), so a case's outputs appear together or not at all."""
    outputs: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_output(case.mask))
        reporter.emit("write", case=case.name, path=str(case.mask))
        write_image(tmp, prediction.mask, geometry)
        outputs["mask"] = str(case.mask)
        if case.probabilities is not None:
            tmp = stack.enter_context(atomic_output(case.probabilities))
            reporter.emit("write", case=case.name, path=str(case.probabilities))
            probs = prediction.probabilities  # computed here, only when asked for (float32, sigmoid of the logits)
            if args.probabilities_uint8:
                probs = probabilities_to_uint8(probs)
            write_image(tmp, probs, geometry)
            del probs
            outputs["probabilities"] = str(case.probabilities)
        if case.logits is not None:
            tmp = stack.enter_context(atomic_output(case.logits))
            reporter.emit("write", case=case.name, path=str(case.logits))
            write_image(tmp, prediction.logits, geometry)
            outputs["logits"] = str(case.logits)
        if case.lesions is not None:
            tmp = stack.enter_context(atomic_output(case.lesions))
            reporter.emit("write", case=case.name, path=str(case.lesions))
            tmp.write_text(format_lesion_report(report))
            outputs["lesions"] = str(case.lesions)
        if case.dicom_seg is not None and not report["lesions"]:
            reporter.emit("warning", case=case.name, message=f"no lesions found: no DICOM SEG written to {case.dicom_seg}"
                                                             " (a DICOM SEG needs at least one segment)")
        elif case.dicom_seg is not None:
            tmp = stack.enter_context(atomic_output(case.dicom_seg))
            reporter.emit("write", case=case.name, path=str(case.dicom_seg))
            # label_components numbers the components as the lesion JSON does: segment n = JSON lesion id n
            from ...core.lesions import label_components

            labels, _ = label_components(prediction.mask, args.connectivity)
            _dicom_seg().write_lesion_seg(tmp, labels, report["lesions"], dicom_source)
            outputs["dicom_seg"] = str(case.dicom_seg)
        with folder_lock(case.mask.parent), state.deferred():  # two writers of one set: the last wins whole
            stack.close()
    return outputs


def _check_finite(logits: np.ndarray, case: PredictJob, model: Path) -> None:
    """NaN logits threshold to "no lesion" and infinite ones are an overflow (fp16): refuse them
    instead of writing a wrong mask. Skipped voxels hold a finite logit (``SKIPPED_LOGIT``)."""
    bad = logits.size - int(np.count_nonzero(np.isfinite(logits)))
    if bad:
        raise InputError(
            f"{case.image}: the network gave NaN or infinite logits for {bad} voxel(s) with {model}; "
            "the image's values may be far out of range (or try --precision fp32)"
        )
