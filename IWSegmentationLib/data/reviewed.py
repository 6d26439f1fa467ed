"""A reviewed case as training data: a reader's verdicts (:mod:`IWSegmentationLib.core.verdicts`,
docs/verdicts.md) turned into the label the trainer learns and the hard negatives it samples.

For a training case with a verdict file (``iwseg train``'s ``reviewed`` key):

* the **label** is the case's own lesion mask, plus the voxels of every *accepted* and *edited*
  lesion as the reader left them (the reviewed label map ``CASE.verdicts.nii.gz``), minus the voxels
  of every *rejected* lesion: a detection the reader kept is taught as lesion, one the reader
  judged a false positive is taught as background even where the reference marked it;
* the **negatives** are the rejected lesions' voxels: :class:`~IWSegmentationLib.data.sampling.PatchSampler`
  centres a share of the patches (``hard_negative_probability``) on them, so the network sees its
  own false positives more often than uniform sampling would show them.

Unreviewed lesions (no verdict) leave the label as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.imageio import Geometry, check_same_grid, read_image
from ..core.verdicts import VerdictFile, read_verdicts

#: The verdicts whose lesions become label voxels.
LABEL_VERDICTS = ("accepted", "edited")


def reviewed_masks(lesion: np.ndarray, reviewed_labels: np.ndarray,
                   verdicts: VerdictFile) -> tuple[np.ndarray, np.ndarray]:
    """``(label, negatives)``, both uint8 {0, 1} on ``lesion``'s grid: ``label`` = (``lesion`` ∪
    accepted ∪ edited) − rejected, ``negatives`` = rejected, where lesion ``n``'s voxels are those
    of value ``n`` in ``reviewed_labels`` (the reviewed label map)."""
    if reviewed_labels.shape != lesion.shape:
        raise ValueError(f"the reviewed label map {reviewed_labels.shape} and the lesion mask {lesion.shape} "
                         "must have the same shape")
    keep = np.isin(reviewed_labels, [n for v in LABEL_VERDICTS for n in verdicts.ids(v)])
    negatives = np.isin(reviewed_labels, verdicts.ids("rejected"))
    label = ((lesion != 0) | keep) & ~negatives
    return label.astype(np.uint8), negatives.astype(np.uint8)


def read_reviewed(path: str | os.PathLike, *, names: tuple[str, ...],
                  grid: Geometry) -> tuple[VerdictFile, np.ndarray]:
    """A case's verdict file and its reviewed label map, checked against the case: the file must
    name one of ``names`` (the case id, the image's case name) and be on ``grid`` (the image's);
    the label map must exist, be on ``grid`` and hold only ``0..count`` (the lesion set's ids).
    Every refusal is an :class:`InputError` naming the file and the case."""
    path = Path(path)
    verdicts = read_verdicts(path, grid=grid)
    if verdicts.case not in names:
        raise InputError(f"verdict file {path} is for case {verdicts.case!r}, not for case {names[0]!r}")
    if not verdicts.reviewed_labels:
        raise InputError(f"verdict file {path} (case {names[0]}) has no reviewed label map ('reviewed_labels' is "
                         "null), so its lesions' voxels are unknown; save the review again from the module")
    labels_path = path.parent / Path(verdicts.reviewed_labels).name
    if not labels_path.is_file():
        raise InputError(f"verdict file {path} (case {names[0]}): its reviewed label map {labels_path} is missing")
    labels, labels_grid = read_image(labels_path, what=f"case {names[0]}: reviewed label map")
    check_same_grid(grid, labels_grid, f"case {names[0]}: image", f"reviewed label map {labels_path}")
    values = np.unique(labels)
    bad = values[(values != np.round(values)) | (values < 0) | (values > verdicts.lesion_set.count)]
    if bad.size:
        raise InputError(f"reviewed label map {labels_path} (case {names[0]}) holds {bad[0]:g}: expected lesion ids "
                         f"0..{verdicts.lesion_set.count} of its verdict file's lesion set")
    return verdicts, labels.astype(np.int32, copy=False)
