"""DICOM SR of the lesions: a TID 1500 Measurement Report, one measurement group per lesion.

A Comprehensive 3D SR (SOP class 1.2.840.10008.5.1.4.1.1.88.34) holding the *Imaging Measurement
Report* (TID 1500) is what PACS viewers and OHIF read as measurements, where the DICOM SEG
(:mod:`IWSegmentationLib.core.dicom_seg`) is the voxels. Written with highdicom, imported lazily
(:func:`~IWSegmentationLib.core.dicom_seg.require_highdicom`); no torch.

One *Volumetric ROI Measurements* group (TID 1411) per lesion, lesion ``n`` in the group ``n``:

* its tracking identifier and tracking UID are those of SEG segment ``n`` (the segment label,
  ``Lesion 07 - 4.2 mm - small``), and its *Referenced Segment* is segment ``n`` of the SEG (SOP
  class and instance UID) with the source series as *Source Series for Segmentation*;
* finding type SCT 52988006 *Lesion*, finding category SCT 49755003 *Morphologically Altered
  Structure* (the SEG's terminology, :data:`~IWSegmentationLib.core.lesions.LESION_TERMINOLOGY`);
* measurements (TID 300): *Volume* (SCT 118565006) in ``mm3``, the equivalent diameter (the
  diameter of the sphere of that volume: :data:`EQUIVALENT_DIAMETER`, a code of this project's
  scheme ``99IWSEG``, since no standard code names it) in ``mm``, and the confidence, the lesion's
  maximum logit (:data:`MAXIMUM_LOGIT`, ``99IWSEG``) in UCUM ``1`` *no units* (a logit is a pure
  number; ``sigmoid`` of it is the probability);
* qualitative evaluations: the size group (:data:`SIZE_GROUP`, values ``99IWSEG`` ``SMALL`` /
  ``MEDIUM`` / ``LARGE``) and, when the lesion has one, the reviewer's verdict
  (:data:`REVIEWER_VERDICT`, values ``ACCEPTED`` / ``REJECTED`` / ``EDITED`` or any verdict word,
  upper-cased);
* the algorithm identification (TID 4019): ``IWSegmentation``, the engine version, and the
  :class:`~IWSegmentationLib.core.provenance.Provenance` as parameters (model, weights sha256,
  threshold, operating point).

The observer is a device (TID 1004): ``IWSegmentation``, model name the model's, its UID derived
from the weights' sha256 (one model, one device UID). The SR's evidence is the source series and
the SEG. ``99IWSEG`` is declared in the SR's ``CodingSchemeIdentificationSequence``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from .. import __version__
from .dicom_seg import require_highdicom, save_dataset, terminology_codes
from .errors import InputError
from .provenance import Provenance

#: The coding scheme of the concepts no standard code names (``99``: a private scheme, PS3.16 8.2).
SCHEME = "99IWSEG"
#: ``(value, scheme, meaning)`` of the concepts of :data:`SCHEME`.
EQUIVALENT_DIAMETER = ("EQDIAM", SCHEME, "Equivalent sphere diameter")
MAXIMUM_LOGIT = ("MAXLOGIT", SCHEME, "Maximum logit")
SIZE_GROUP = ("SIZEGROUP", SCHEME, "Lesion size group")
REVIEWER_VERDICT = ("VERDICT", SCHEME, "Reviewer verdict")
#: Series number of the SR series (the SEG's is ``dicom_seg.SEG_SERIES_NUMBER``, 1000).
SR_SERIES_NUMBER = 1001


def _code(hd, triplet: tuple[str, str, str]):
    value, scheme, meaning = triplet
    return hd.sr.CodedConcept(value, scheme, meaning)


def _word_code(hd, word: str, what: str):
    """A value of :data:`SCHEME`: ``small`` -> ``SMALL`` / ``small``."""
    if not isinstance(word, str) or not word.strip():
        raise InputError(f"a lesion's {what} must be a non-empty string, got {word!r}")
    text = word.strip().encode("ascii", "replace").decode("ascii")
    return hd.sr.CodedConcept(text.upper().replace(" ", "_")[:16], SCHEME, text[:64])


def device_uid(provenance: Provenance) -> str:
    """The device observer's UID: derived from the weights' digest, so one model is one device."""
    from pydicom.uid import generate_uid  # lazy: only DICOM output needs pydicom

    return generate_uid(entropy_srcs=["IWSegmentation", provenance.weights_sha256])


def lesion_groups(lesions: Sequence[Mapping[str, Any]], seg: Any, provenance: Provenance) -> list[Any]:
    """One TID 1411 measurement group per lesion; lesion ``n`` (1-based) is segment ``n`` of ``seg``."""
    hd = require_highdicom()
    from pydicom.sr.codedict import codes  # lazy: only DICOM output needs pydicom

    segments = list(seg.SegmentSequence)
    if [int(s.SegmentNumber) for s in segments] != list(range(1, len(lesions) + 1)):
        raise InputError(f"the DICOM SEG {seg.SOPInstanceUID} has segments "
                         f"{[int(s.SegmentNumber) for s in segments][:8]}; the SR's {len(lesions)} lesions need "
                         f"segments 1..{len(lesions)}, lesion n = segment n")
    (c_scheme, c_value, c_meaning), (t_scheme, t_value, t_meaning) = terminology_codes()
    category_code = hd.sr.CodedConcept(c_value, c_scheme, c_meaning)
    kind_code = hd.sr.CodedConcept(t_value, t_scheme, t_meaning)
    algorithm = hd.sr.AlgorithmIdentification(
        name="IWSegmentation", version=provenance.engine_version,
        parameters=[",".join(f"{key}={value}" for key, value in provenance.parameters().items())])
    source_series = hd.sr.SourceSeriesForSegmentation(str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID))
    units = {"mm3": codes.UCUM.CubicMillimeter, "mm": codes.UCUM.Millimeter, "1": codes.UCUM.NoUnits}
    groups = []
    for number, (lesion, segment) in enumerate(zip(lesions, segments), start=1):
        tracking = hd.sr.TrackingIdentifier(uid=str(segment.TrackingUID), identifier=str(segment.SegmentLabel))
        measurements = []
        for key, name, unit in (("volume_mm3", codes.SCT.Volume, "mm3"),
                                ("diameter_mm", _code(hd, EQUIVALENT_DIAMETER), "mm"),
                                ("confidence", _code(hd, MAXIMUM_LOGIT), "1")):
            if lesion.get(key) is not None:
                measurements.append(hd.sr.Measurement(name=name, value=float(lesion[key]), unit=units[unit]))
        evaluations = [hd.sr.QualitativeEvaluation(_code(hd, SIZE_GROUP),
                                                   _word_code(hd, lesion.get("size_group") or "unknown", "size group"))]
        if lesion.get("verdict") is not None:
            evaluations.append(hd.sr.QualitativeEvaluation(_code(hd, REVIEWER_VERDICT),
                                                           _word_code(hd, lesion["verdict"], "verdict")))
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_segment=hd.sr.ReferencedSegment(sop_class_uid=str(seg.SOPClassUID),
                                                       sop_instance_uid=str(seg.SOPInstanceUID),
                                                       segment_number=number, source_series=source_series),
            finding_type=kind_code, finding_category=category_code, algorithm_id=algorithm,
            measurements=measurements, qualitative_evaluations=evaluations,
        ))
    return groups


def lesion_sr(lesions: Sequence[Mapping[str, Any]], seg: Any, source: Sequence[Any], provenance: Provenance, *,
              series_description: str = "IWSegmentation lesion measurements") -> Any:
    """The DICOM SR (TID 1500) of ``lesions``, rows of the lesion JSON (``volume_mm3``,
    ``diameter_mm``, ``size_group``, ``confidence``, optionally ``verdict``), measured on the
    segments of ``seg`` (the DICOM SEG dataset of the same lesions, :func:`dicom_seg.lesion_seg`)
    over the ``source`` images (:func:`dicom_seg.order_by_slice`)."""
    hd = require_highdicom()
    from pydicom.sr.codedict import codes  # lazy: only DICOM output needs pydicom

    if not lesions:
        raise InputError("no lesions: a DICOM SR measurement report needs at least one lesion")
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(provenance), name="IWSegmentation", manufacturer_name="IWSegmentation",
            model_name=provenance.model[:64]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_code(hd, PROCEDURES[_modality(source)]) if _modality(source) in PROCEDURES
        else codes.SCT.ImagingProcedure,
        imaging_measurements=lesion_groups(lesions, seg, provenance),
    )
    scheme = hd.coding_schemes.CodingSchemeIdentificationItem(
        designator=SCHEME, name="IWSegmentation concepts", responsible_organization="IWSegmentation")
    return hd.sr.Comprehensive3DSR(
        evidence=[seg], content=report[0], series_instance_uid=hd.UID(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="IWSegmentation", is_complete=True,
        series_description=series_description, software_versions=__version__, content_qualification="RESEARCH",
        coding_schemes=[scheme], manufacturer_model_name="IWSegmentation", device_serial_number="0",
    )


#: The *Procedure Reported* (CID 100) by the source series' Modality; others: SCT *Imaging procedure*.
PROCEDURES = {"CT": ("25045-6", "LN", "CT unspecified body region"), "MR": ("25056-3", "LN", "MRI unspecified body region")}


def _modality(source: Sequence[Any]) -> str:
    return str(source[0].get("Modality", "")) if source else ""


def write_lesion_sr(path: str | os.PathLike, lesions: Sequence[Mapping[str, Any]], seg: Any, source: Sequence[Any],
                    provenance: Provenance, **options) -> Path:
    """Write :func:`lesion_sr` to ``path`` atomically (a temporary name, then a rename)."""
    save_dataset(path, lesion_sr(lesions, seg, source, provenance, **options))
    return Path(path)
