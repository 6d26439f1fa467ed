"""Model plus reader: a prediction as a reader left it after review (docs/verdicts.md).

``iwseg evaluate --verdicts`` evaluates each case twice, from one score map: the model alone, and
the *model plus reader*, the same map with the reader's verdicts applied
(:func:`reader_scores`):

* a **rejected** lesion's voxels get the lowest score (``floor``), so the component is gone at any
  threshold: a rejected false positive no longer counts, and a rejected true lesion is missed;
* an **edited** lesion, when the reviewed label map was saved, is replaced by its edited voxels,
  which get the lesion's own confidence (its maximum score), so it ranks where it ranked before;
  without the label map it is counted as the model predicted it;
* **accepted** and unreviewed lesions are kept as the model predicted them.

The lesions are those of the verdict file's lesion set: recomputed from the map at the file's
probability threshold and connectivity (:func:`predicted_lesions`) and refused, naming what differs,
when their fingerprint is not the file's.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..core.confidence import SKIPPED_LOGIT, probability_to_logit
from ..core.lesions import Lesion, analyze_lesions
from ..core.verdicts import LesionSet, VerdictFile

#: The score a rejected lesion's voxels get: below every threshold (logits) or 0 (probabilities).
FLOOR = {"logit": SKIPPED_LOGIT, "probability": 0.0}


def predicted_lesions(scores: np.ndarray, threshold: float, connectivity: int, score: str
                      ) -> tuple[np.ndarray, list[Lesion], LesionSet]:
    """The numbered lesions of ``scores > threshold`` (a probability; compared as a logit when
    ``score`` is ``"logit"``), as ``iwseg predict`` numbers them, and their :class:`LesionSet`."""
    cut = probability_to_logit(threshold) if score == "logit" else threshold
    labels, lesions = analyze_lesions(scores > cut, connectivity=connectivity, scores=scores)
    return labels, lesions, LesionSet.of(lesions, threshold=threshold, connectivity=connectivity)


def reader_scores(scores: np.ndarray, labels: np.ndarray, lesions: Sequence[Lesion], verdicts: VerdictFile,
                  reviewed_labels: np.ndarray | None = None, *, score: str = "logit") -> np.ndarray:
    """A copy of ``scores`` with ``verdicts`` applied (module docstring). ``labels`` / ``lesions`` are
    the numbered predicted lesions (:func:`predicted_lesions`); ``reviewed_labels`` the reviewed
    label map (lesion ``n``'s voxels as the reader left them), or None when none was saved."""
    out = np.array(scores, copy=True)
    floor = FLOOR[score]
    rejected = verdicts.ids("rejected")
    edited = verdicts.ids("edited") if reviewed_labels is not None else []
    gone = np.isin(labels, rejected + edited) if rejected or edited else None
    if gone is not None:
        out[gone] = floor
    confidence = {les.id: les.confidence for les in lesions}
    for n in edited:
        out[reviewed_labels == n] = confidence[n]
    return out
