"""What a prediction writes for a case: the mask, the maps, the lesion report (size groups,
minimum size), the DICOM SEG, all renamed together; and the finite-output check."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from ..core import dicom_seg as dicom_seg_writer
from ..core import dicom_sr as dicom_sr_writer
from ..core.doubt import DOUBT_SD_LOGIT, SECOND_LOOK_NOTE, lesion_doubt, second_look
from ..core.errors import InputError
from ..core.imageio import Geometry, write_image
from ..core.lesion_guards import LesionSummary
from ..core.lesions import (
    SizeThresholds,
    analyze_lesions,
    parse_min_lesion_size,
    parse_size_thresholds,
    size_thresholds,
)
from ..core.operating_points import OperatingPoints
from ..core.outputs import atomic_output, folder_lock
from ..core.prediction_maps import PROBABILITY_UINT8_NOTE, probabilities_to_uint8
from ..core.progress import CancelState
from ..core.provenance import Provenance
from ..preprocessing.foreground import body_mask
from ..preprocessing.presets import validate_params
from .cases import PredictJob, check_output_file, check_output_folder
from .lesion_json import CONFIDENCE_NOTE, format_lesion_report
from .options import PredictOptions


def attach_dicom_seg(cases: list[PredictJob], src: Path, target: Path) -> None:
    """Set where each case's DICOM SEG goes (``--dicom-seg``): the given file for one series, else
    ``<folder>/<case>.dcm``. Every case must be a DICOM series (the SEG references its images), and
    the SEG must not land inside a source series folder (it would become a second series there)."""
    dicom_seg_writer.require_highdicom()  # before any inference
    not_dicom = [c.image for c in cases if not c.image.is_dir()]
    if not_dicom:
        raise InputError(f"--dicom-seg needs DICOM series as --input (a DICOM SEG references the source images); "
                         f"{not_dicom[0]} is an image file, not a DICOM series folder")
    single = len(cases) == 1 and cases[0].image == src
    if single:
        check_output_file("--dicom-seg", target, image=False)
        others = {p.resolve() for p in cases[0].outputs.values() if p is not None}
        if target.resolve() in others:
            raise InputError("--dicom-seg must be a different file from --output, --probabilities, --logits "
                             "and --lesions")
        cases[0].dicom_seg = target
    else:
        check_output_folder("--dicom-seg", target)
        for case in cases:
            case.dicom_seg = target / f"{case.name}.dcm"
    series_folders = {c.image.resolve() for c in cases}
    for case in cases:
        if case.dicom_seg.resolve().parent in series_folders:
            raise InputError(f"--dicom-seg {case.dicom_seg} is inside a source DICOM series folder; write it "
                             "elsewhere (a second series there would make the folder unreadable as one series)")


def attach_dicom_sr(cases: list[PredictJob], src: Path, target: Path) -> None:
    """Set where each case's DICOM SR goes (``--dicom-sr``, after :func:`attach_dicom_seg`): the
    given file for one series, else ``<folder>/<case>.dcm``. The SR measures the SEG's segments, so
    ``--dicom-seg`` must be given, and the two must not be one file or one folder."""
    if any(c.dicom_seg is None for c in cases):
        raise InputError("--dicom-sr needs --dicom-seg: the SR's measurements reference the SEG's segments")
    if len(cases) == 1 and cases[0].image == src:
        check_output_file("--dicom-sr", target, image=False)
        cases[0].dicom_sr = target
    else:
        check_output_folder("--dicom-sr", target)
        for case in cases:
            case.dicom_sr = target / f"{case.name}.dcm"
    for case in cases:
        others = {p.resolve() for p in (*case.outputs.values(), case.dicom_seg) if p is not None}
        if case.dicom_sr.resolve() in others:
            raise InputError(f"--dicom-sr {case.dicom_sr} is also another output (--dicom-seg, --output, --lesions, "
                             "...); give the SR its own file (or folder)")
        if case.dicom_sr.resolve().parent == case.image.resolve():
            raise InputError(f"--dicom-sr {case.dicom_sr} is inside the source DICOM series folder; write it elsewhere")


def size_thresholds_for(options: PredictOptions, card: dict) -> SizeThresholds:
    """The options' size groups, else the checkpoint's (list, dict or preset name), else lung."""
    if options.size_preset is not None or options.size_thresholds is not None:
        return size_thresholds(options.size_preset, options.size_thresholds)
    return parse_size_thresholds(card.get("size_thresholds"))


def operating_threshold(options: PredictOptions, card: dict) -> tuple[float | None, str | None]:
    """The logit threshold of ``--operating-point`` (None without it: the threshold applies) and
    the line to say once: which point, or that the card has none. Looking a point up is all it
    costs (no inference time). :class:`InputError` naming the checkpoint when its card has no
    operating points or none at that rate (listing those it has), or for an ensemble."""
    checkpoint = options.checkpoint
    points = OperatingPoints.of_card(card, f"checkpoint {checkpoint}: model card")
    if options.operating_point is None:
        if points is None and options.threshold is None:
            return None, (f"the model card of {checkpoint} has no operating points (written before they were "
                          f"stored): threshold {float(card.get('threshold', 0.5)):g}, the card's")
        return None, None
    if len(options.models) > 1:
        raise InputError("--operating-point needs one --model: an ensemble's averaged logits have no validation "
                         "FROC of their own; use --threshold")
    if points is None:
        raise InputError(f"--operating-point {options.operating_point}: the model card of {checkpoint} has no "
                         "operating points (it was written before iwseg train stored them, or without validation); "
                         "use --threshold")
    point = points.lookup(options.operating_point, where=f"the model card of {checkpoint}")
    recall = "n/a" if point.recall is None else f"{point.recall:.3f}"
    return point.logit_threshold, (
        f"operating point {point.name}: logit threshold {point.logit_threshold:.6g}; on validation "
        f"{point.achieved_fp_per_scan:g} FP/scan, recall {recall} (hit rule {points.hit_rule})")


def min_lesion_size_for(flag: str | None, card: dict):
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
    mask, numbered as every lesion output (``lesions.number_lesions``: 1 = the largest), centroids in voxel
    indices and in physical LPS mm, and its ``confidence``: the maximum blended logit inside it
    (probability ``sigmoid(confidence)``; a float32 probability would be exactly 1.0 for every
    lesion above logit 17, see :mod:`IWSegmentationLib.core.confidence`)."""
    labels, lesions = analyze_lesions(
        prediction.mask, geometry.spacing_zyx, connectivity=connectivity, thresholds=thresholds,
        scores=prediction.logits,
    )
    rows = [lesion_row(les, geometry) for les in lesions]
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
    add_doubt(report, prediction, labels, geometry, thresholds, connectivity)
    return report, len(rows)


def add_doubt(report: dict, prediction, labels: np.ndarray, geometry: Geometry, thresholds: SizeThresholds,
              connectivity: int) -> None:
    """Per-lesion doubt (with member maps: TTA or an ensemble) into each lesion row's ``doubt`` and the
    report's ``doubt`` note (None without members), and the ``second_look`` list (:mod:`..core.doubt`)."""
    rows = report["lesions"]
    t = prediction.logit_threshold
    if prediction.members is not None:
        for row, doubt in zip(rows, lesion_doubt(labels, len(rows), prediction.members, t)):
            row["doubt"] = doubt.as_dict()
    report["doubt"] = None if prediction.members is None else {
        "members": int(prediction.members.shape[0]), "logit_threshold": round(t, 6),
        "doubtful_sd_logit": DOUBT_SD_LOGIT,
        "note": "per member (a flip or a network): its maximum logit inside the lesion; found when above the "
                "logit threshold; doubtful when found by fewer than all members or the members' standard "
                f"deviation is above {DOUBT_SD_LOGIT:g} logit"}
    listed, count = second_look(prediction.logits, t, geometry.spacing_zyx, thresholds=thresholds,
                                connectivity=connectivity)
    report["second_look_note"] = SECOND_LOOK_NOTE
    report["second_look_count"] = count
    report["second_look"] = [lesion_row(les, geometry) for les in listed]


def lesion_row(les, geometry: Geometry) -> dict:
    """A lesion's (or a second-look component's) entry in the lesion JSON."""
    return {
        "id": les.id,
        "voxels": les.voxels,
        "volume_mm3": round(les.volume_mm3, 4),
        "diameter_mm": round(les.diameter_mm, 4),
        "size_group": les.size_group,
        "confidence": None if les.confidence is None else round(les.confidence, 6),
        "centroid_lps_mm": [round(v, 4) for v in geometry.index_to_physical(les.centroid)],
        "centroid_zyx": [round(v, 3) for v in les.centroid],
        "bbox_zyx": list(les.bbox),
    }


def guard_region(image: np.ndarray, card: dict, organ: np.ndarray | None) -> dict:
    """What a case's lesions are measured against (:class:`~IWSegmentationLib.core.lesion_guards.LesionSummary`):
    the body (the preset's intensity threshold on the first channel; the whole volume without one,
    or when it keeps nothing) and the organ mask's voxels when one was given."""
    spatial = image if image.ndim == 3 else image[0]
    body = body_mask(spatial, validate_params(dict(card.get("preprocessing") or {})))
    body_voxels = 0 if body is None else int(np.count_nonzero(body))
    region = {"body": "body", "body_voxels": body_voxels} if body_voxels else {"body": "volume",
                                                                               "body_voxels": int(spatial.size)}
    region["organ_voxels"] = None if organ is None else int(np.count_nonzero(organ))
    return region


def summarize(report: dict, geometry: Geometry, region: dict) -> LesionSummary:
    """The case's one-line summary and guards; added to the lesion ``report`` as ``summary`` and ``warnings``."""
    summary = LesionSummary.of([row["voxels"] for row in report["lesions"]], float(np.prod(geometry.spacing_zyx)),
                               **region)
    report["summary"] = summary.as_dict()
    report["warnings"] = summary.warnings()
    return summary


def write_case_outputs(case: PredictJob, prediction, geometry: Geometry, report: dict, options: PredictOptions,
                       reporter, state: CancelState, dicom_source=None) -> dict[str, str]:
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
            if options.probabilities_uint8:
                probs = probabilities_to_uint8(probs)
            # the note tells iwseg evaluate that the values are round(255 p), not labels
            write_image(tmp, probs, geometry, notes=PROBABILITY_UINT8_NOTE if options.probabilities_uint8 else None)
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
            sr = "" if case.dicom_sr is None else f" and no DICOM SR to {case.dicom_sr}"
            reporter.emit("warning", case=case.name, message=f"no lesions found: no DICOM SEG written to {case.dicom_seg}"
                                                             f"{sr} (a DICOM SEG needs at least one segment)")
        elif case.dicom_seg is not None:
            tmp = stack.enter_context(atomic_output(case.dicom_seg))
            reporter.emit("write", case=case.name, path=str(case.dicom_seg))
            # analyze_lesions numbers the lesions as the lesion JSON does: segment n = JSON lesion id n
            labels, _ = analyze_lesions(prediction.mask, geometry.spacing_zyx, connectivity=options.connectivity)
            provenance = Provenance.from_dict(report["provenance"])  # Predictor.predict_case adds it
            seg = dicom_seg_writer.lesion_seg(labels, report["lesions"], dicom_source, provenance=provenance)
            dicom_seg_writer.save_dataset(tmp, seg)
            outputs["dicom_seg"] = str(case.dicom_seg)
            if case.dicom_sr is not None:  # the SR measures the SEG's segments: lesion n = segment n
                tmp = stack.enter_context(atomic_output(case.dicom_sr))
                reporter.emit("write", case=case.name, path=str(case.dicom_sr))
                dicom_seg_writer.save_dataset(tmp, dicom_sr_writer.lesion_sr(report["lesions"], seg, dicom_source,
                                                                              provenance))
                outputs["dicom_sr"] = str(case.dicom_sr)
        with folder_lock(case.mask.parent), state.deferred():  # two writers of one set: the last wins whole
            stack.close()
    return outputs


def check_finite(logits: np.ndarray, case: PredictJob, model) -> None:
    """NaN logits threshold to "no lesion" and infinite ones are an overflow (fp16): refuse them
    instead of writing a wrong mask. Skipped voxels hold a finite logit (``SKIPPED_LOGIT``)."""
    bad = logits.size - int(np.count_nonzero(np.isfinite(logits)))
    if bad:
        raise InputError(
            f"{case.image}: the network gave NaN or infinite logits for {bad} voxel(s) with {model}; "
            "the image's values may be far out of range (or try --precision fp32)"
        )
