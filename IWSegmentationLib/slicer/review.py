"""The reader's review of one result: accept / reject per lesion, *edited* when a segment was changed.

:class:`LesionReview` keeps the verdicts of a :class:`~IWSegmentationLib.slicer.mrml.PredictionResults`
keyed by the lesion's number (1 = the largest, :func:`IWSegmentationLib.core.lesions.number_lesions`:
the same lesion in the lesion JSON, the DICOM SEG, the segments and the CSV) and writes them as the
verdict file of :mod:`IWSegmentationLib.core.verdicts` (docs/verdicts.md) with the reviewed label map
beside it. A lesion is **edited** when its segment's voxels are no longer the predicted lesion's
(:meth:`LesionReview.detect_edits`, run before every save): the reader painted or erased in the
Segment Editor. A rejection stands over an edit (the reader discarded the finding).

The module's two buttons call :meth:`LesionReview.set_verdict` and :meth:`LesionReview.save`;
everything else is here, without Qt, tested under ``slicer-core``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..core.errors import InputError
from ..core.files import case_name
from ..core.imageio import write_image
from ..core.lesions import analyze_lesions
from ..core.verdicts import LesionSet, Verdict, VerdictFile, read_verdicts, utc_now, verdict_paths
from . import mrml

#: The verdicts a reader gives with the module's buttons (``edited`` is found, not given).
READER_VERDICTS = ("accepted", "rejected")


def case_of_volume(volume_node) -> tuple[str, str, Path | None]:
    """The case name, image file name and folder of a volume node: from the file it was loaded from
    (``case_name`` as ``iwseg predict`` names cases), else its node name and no folder."""
    storage = volume_node.GetStorageNode() if hasattr(volume_node, "GetStorageNode") else None
    file = storage.GetFileName() if storage is not None else None
    if file:
        return case_name(file), Path(file).name, Path(file).parent
    return volume_node.GetName(), "", None


class LesionReview:
    """The verdicts on one result's lesions (module docstring).

    ``mask`` is the backend's lesion mask on the volume's grid (the segments were made from it);
    ``threshold`` (a probability) and ``connectivity`` what made it, as the lesion JSON records them;
    ``model_name`` / ``model_sha256`` the model (checkpoint stem, the card's ``weights_sha256``).
    """

    def __init__(self, results, mask: np.ndarray, *, model_name: str, model_sha256: str | None,
                 threshold: float | None = None, connectivity: int = 26):
        self.results = results
        self.volume = mrml.reference_volume_node(results.segmentation)
        if self.volume is None:
            raise InputError(f"segmentation {results.segmentation.GetName()!r} records no input volume")
        self.grid = mrml.volume_geometry(self.volume)
        self.case, self.image, self.folder = case_of_volume(self.volume)
        # the lesions as every output numbers them: label value n is lesion n
        self.labels, lesions = analyze_lesions(mask, self.grid.spacing_zyx, connectivity=connectivity)
        self.lesion_set = LesionSet.of(lesions, threshold=threshold, connectivity=connectivity)
        self.boxes = {les.id: les.bbox for les in lesions}
        self.model_name, self.model_sha256 = model_name, model_sha256
        self.verdicts: dict[int, Verdict] = {}

    # ------------------------------------------------------------------ verdicts
    def set_verdict(self, lesion: int, verdict: str, reviewer: str = "") -> None:
        """Give lesion ``lesion`` (its number) one of :data:`READER_VERDICTS`; an edited lesion that is
        accepted stays ``edited`` (its voxels are the reader's)."""
        if verdict not in READER_VERDICTS:
            raise InputError(f"verdict must be one of {', '.join(READER_VERDICTS)}, got {verdict!r}")
        if lesion not in self.boxes:
            raise InputError(f"no lesion {lesion} in this result (lesions 1..{len(self.boxes)})")
        if verdict == "accepted" and self.segment_edited(lesion):
            verdict = "edited"
        self.verdicts[lesion] = Verdict(verdict, reviewer, utc_now())

    def verdict_of(self, lesion: int) -> str | None:
        """The lesion's verdict, or None when it was not reviewed."""
        entry = self.verdicts.get(lesion)
        return entry.verdict if entry else None

    def by_lesion(self) -> dict[int, str]:
        """``{lesion number: verdict}``: the CSV's ``verdict`` column."""
        return {n: v.verdict for n, v in self.verdicts.items()}

    # ------------------------------------------------------------------ edits
    def segment_ids(self) -> dict[int, str]:
        """``{lesion number: segment id}`` of the lesions shown as segments."""
        return {row["id"]: row["segment_id"] for row in mrml.segment_rows(self.results.segmentation)
                if row["id"] in self.boxes}

    def segment_voxels(self, lesion: int) -> np.ndarray | None:
        """The lesion's segment on the volume's grid (bool ``[z, y, x]``), or None when it is not a segment."""
        segment = self.segment_ids().get(lesion)
        if segment is None:
            return None
        return mrml.labelmap_on_volume_grid(self.results.segmentation, self.volume, [segment]) > 0

    def edited_lesions(self) -> set[int]:
        """The lesions whose segment differs from the predicted lesion by any voxel, in one pass over
        the segments' labelmap: lesion ``n`` is unchanged when its segment and its predicted voxels
        have the same count and that count is also their overlap."""
        segments = self.segment_ids()
        if not segments:
            return set()
        order = list(segments)
        drawn = mrml.labelmap_on_volume_grid(self.results.segmentation, self.volume, [segments[n] for n in order])
        inside = (drawn > 0) | (self.labels > 0)
        k = int(self.labels.max()) + 1
        pairs = np.bincount(drawn[inside].astype(np.int64) * k + self.labels[inside], minlength=(len(order) + 1) * k)
        pairs = pairs.reshape(len(order) + 1, k)
        edited = set()
        for j, n in enumerate(order, start=1):
            overlap = pairs[j, n]
            if not (overlap == pairs[j].sum() == pairs[:, n].sum()):
                edited.add(n)
        return edited

    def segment_edited(self, lesion: int) -> bool:
        """Whether the lesion's segment differs from the predicted lesion by any voxel."""
        return lesion in self.edited_lesions()

    def detect_edits(self, reviewer: str = "") -> list[int]:
        """Mark every changed segment ``edited`` (unless rejected); returns the lesions newly marked."""
        marked = []
        for lesion in sorted(self.edited_lesions()):
            if self.verdict_of(lesion) in ("rejected", "edited"):
                continue
            previous = self.verdicts.get(lesion)
            self.verdicts[lesion] = Verdict("edited", reviewer or (previous.reviewer if previous else ""), utc_now())
            marked.append(lesion)
        return marked

    def reviewed_labels(self) -> np.ndarray:
        """Lesion ``n``'s voxels as the reader left them (value ``n``): an edited lesion's segment, else the
        predicted lesion; where an edited segment overlaps another lesion, the edited one wins."""
        out = self.labels.copy()
        for lesion in self.ids("edited"):
            voxels = self.segment_voxels(lesion)
            if voxels is not None:
                out[out == lesion] = 0
                out[voxels] = lesion
        return out

    def ids(self, verdict: str) -> list[int]:
        return sorted(n for n, v in self.verdicts.items() if v.verdict == verdict)

    # ------------------------------------------------------------------ files
    def verdict_file(self, reviewed_labels: str | None = None) -> VerdictFile:
        return VerdictFile(self.case, self.image, self.grid, self.model_name, self.model_sha256, self.lesion_set,
                           dict(self.verdicts), reviewed_labels)

    def save(self, folder: str | os.PathLike | None = None, reviewer: str = "") -> Path:
        """Write ``CASE.verdicts.json`` and the reviewed label map ``CASE.verdicts.nii.gz`` in ``folder``
        (default: beside the case's image file), after :meth:`detect_edits`; returns the JSON's path."""
        folder = Path(folder) if folder is not None else self.folder
        if folder is None:
            raise InputError(f"volume {self.volume.GetName()!r} was not loaded from a file: choose a folder "
                             "for its verdicts (Export writes them beside the CSV)")
        self.detect_edits(reviewer)
        json_path, labels_path = verdict_paths(folder, self.case)
        write_image(labels_path, self.reviewed_labels().astype(np.uint16 if len(self.boxes) < 2**16 else np.uint32),
                    self.grid)
        return self.verdict_file(labels_path.name).write(json_path)

    def load(self, folder: str | os.PathLike | None = None) -> bool:
        """Read the case's verdict file from ``folder`` (default: beside the image) when there is one;
        a file for another case, grid, model or lesion set is refused, naming what differs."""
        folder = Path(folder) if folder is not None else self.folder
        if folder is None or not verdict_paths(folder, self.case)[0].is_file():
            return False
        found = read_verdicts(verdict_paths(folder, self.case)[0], case=self.case, grid=self.grid,
                              model_sha256=self.model_sha256, lesion_set=self.lesion_set)
        self.verdicts = dict(found.verdicts)
        return True


def model_identity(card: Mapping[str, Any], checkpoint: str | os.PathLike | None) -> tuple[str, str | None]:
    """``(name, weights sha256)`` of the model a result came from: the checkpoint's stem and the card's
    ``weights_sha256`` (None in a card written without it)."""
    return (Path(checkpoint).stem if checkpoint else "model"), card.get("weights_sha256")


def open_review(results, mask: np.ndarray, outputs: Mapping[str, Any], checkpoint, card: Mapping[str, Any]
                ) -> tuple[LesionReview, str]:
    """The review of a freshly loaded result, with the verdicts already saved beside the case when
    there are some; returns it and a line for the status (a verdict file for another case, model or
    lesion set is not loaded, and the line says what differs). The threshold and connectivity come
    from the backend's lesion JSON (``outputs["lesions"]``) when there is one."""
    report: dict = {}
    if outputs.get("lesions") and Path(outputs["lesions"]).is_file():
        report = json.loads(Path(outputs["lesions"]).read_text(encoding="utf-8"))
    name, sha = model_identity(card, checkpoint)
    review = LesionReview(results, mask, model_name=name, model_sha256=sha, threshold=report.get("threshold"),
                          connectivity=int(report.get("connectivity", results.connectivity)))
    try:
        loaded = review.load()
    except InputError as exc:
        return review, f"Earlier verdicts not loaded: {exc}"
    return review, (f"Loaded {len(review.verdicts)} verdict(s) of {review.case}" if loaded else "")


def record_verdict(review: LesionReview, row: Mapping[str, Any], verdict: str, reviewer: str = "") -> str:
    """The module's Accept / Reject buttons: give the lesion of table ``row`` the verdict and save the
    verdicts beside the case when its image came from a file; returns the status line."""
    if row.get("row") != "detection":
        raise InputError("Select a detected lesion: a missed reference lesion has no verdict")
    review.set_verdict(int(row["id"]), verdict, reviewer)
    said = f"{row['name']}: {review.verdict_of(int(row['id']))}"
    if review.folder is None:
        return f"{said} (saved with Export: the volume was not loaded from a file)"
    return f"{said}; saved {review.save(reviewer=reviewer)}"
