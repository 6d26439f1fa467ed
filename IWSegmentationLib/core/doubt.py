"""Per-lesion doubt (test-time mirroring or an ensemble) and the second-look list.

**Doubt.** With ``--tta`` (8 flips) or several ``--model`` (an ensemble), the blended logit map is
the mean of M *members* (flips or networks). A lesion is a connected component of the final mask;
for each lesion and each member, the member's confidence is the member's own maximum logit inside
the lesion. :func:`lesion_doubt` reports, per lesion:

* ``members``: M;
* ``found_by``: how many members found it (their own logit is above the run's logit threshold
  somewhere inside the lesion), and ``fraction = found_by / members``;
* ``confidence_sd`` (the population standard deviation, ``ddof=0``), ``confidence_min`` and
  ``confidence_max`` of the members' confidences;
* ``doubtful``: found by fewer than all members, **or** ``confidence_sd > DOUBT_SD_LOGIT``
  (:func:`is_doubtful`, the one definition).

**Second look.** The components of ``logits > logit_threshold - SECOND_LOOK_MARGIN_LOGIT`` whose
maximum logit is at most the logit threshold: candidates just below the operating point. Their
maximum is not above the threshold, so none of their voxels is in the mask: they overlap no lesion
(and a component holding a lesion, or one removed by the minimum lesion size, has a maximum above
it and is not listed). They are listed for review, never made into mask voxels or segments.

Numpy and cc3d (through :mod:`.lesions`); no torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Sequence

import numpy as np

from .errors import InputError
from .lesions import Lesion, SizeThresholds, label_components, lesion_table

#: A lesion whose members' confidences (maximum logits) have a standard deviation above this
#: (logit units) is doubtful even when every member found it: one logit is a factor e in the
#: odds, so members that disagree by about 2 logits (sd 1 for two members) disagree on the odds
#: by a factor of 7.
DOUBT_SD_LOGIT = 1.0
#: How far below the run's logit threshold a component's maximum logit may be for the second-look
#: list (logit units): at the default threshold 0.5 (logit 0), probabilities above 0.27.
SECOND_LOOK_MARGIN_LOGIT = 1.0
#: At most this many second-look components are listed (the most confident); the count says how many there were.
SECOND_LOOK_LIMIT = 100
#: What the lesion JSON's top-level ``second_look_note`` says.
SECOND_LOOK_NOTE = (f"components whose maximum logit is within {SECOND_LOOK_MARGIN_LOGIT:g} logit below the "
                    "run's logit threshold (not in the mask, overlapping no lesion), most confident first; "
                    f"at most {SECOND_LOOK_LIMIT} listed")


@dataclass(frozen=True)
class LesionDoubt:
    """One lesion's doubt (see the module docstring); confidences are logits."""

    members: int
    found_by: int
    fraction: float
    confidence_sd: float
    confidence_min: float
    confidence_max: float
    doubtful: bool

    def as_dict(self, digits: int = 6) -> dict:
        """The lesion JSON's ``doubt`` entry (floats rounded to ``digits``)."""
        d = asdict(self)
        for key in ("fraction", "confidence_sd", "confidence_min", "confidence_max"):
            d[key] = round(d[key], digits)
        return d


def is_doubtful(found_by: int, members: int, confidence_sd: float) -> bool:
    """The one definition: found by fewer than all members, or a spread above :data:`DOUBT_SD_LOGIT`."""
    return found_by < members or confidence_sd > DOUBT_SD_LOGIT


def member_maxima(labels: np.ndarray, k: int, members: np.ndarray) -> np.ndarray:
    """``[M, K + 1]`` float64: each member's maximum logit inside each label 1..K (``-inf`` where
    absent; column 0, the background, too). The lesion voxels are found once for all members."""
    if members.ndim != 4 or members.shape[1:] != labels.shape:
        raise InputError(f"member logit maps of shape {members.shape} do not match labels of shape {labels.shape}")
    inside = np.flatnonzero(labels.reshape(-1) > 0)
    ids = labels.reshape(-1)[inside]
    out = np.full((members.shape[0], k + 1), -np.inf, dtype=np.float64)
    for m in range(members.shape[0]):
        np.maximum.at(out[m], ids, members[m].reshape(-1)[inside].astype(np.float64))
    return out


def lesion_doubt(labels: np.ndarray, k: int, members: np.ndarray, logit_threshold: float) -> list[LesionDoubt]:
    """The doubt of lesions 1..K of ``labels`` (label ``n`` = lesion ``n``) from the members' logit
    maps ``[M, z, y, x]`` and the run's logit threshold; one entry per label, in label order."""
    maxima = member_maxima(labels, k, members)
    out = []
    for j in range(1, k + 1):
        conf = maxima[:, j]
        found = int(np.count_nonzero(conf > logit_threshold))
        sd = float(np.std(conf))
        out.append(LesionDoubt(members=len(conf), found_by=found, fraction=found / len(conf), confidence_sd=sd,
                               confidence_min=float(conf.min()), confidence_max=float(conf.max()),
                               doubtful=is_doubtful(found, len(conf), sd)))
    return out


def second_look(logits: np.ndarray, logit_threshold: float, spacing: Sequence[float], *,
                thresholds: SizeThresholds | None = None, connectivity: int = 26,
                margin: float = SECOND_LOOK_MARGIN_LOGIT) -> tuple[list[Lesion], int]:
    """The second-look components (module docstring), most confident first (ties: larger, then
    id), at most :data:`SECOND_LOOK_LIMIT`, and how many there were in all. Their ids are their
    rank, 1 = the most confident."""
    if not margin > 0:
        raise InputError(f"the second-look margin must be a positive number of logits, got {margin!r}")
    low = (logits > logit_threshold - margin) & (logits <= logit_threshold)
    if not low.any():
        return [], 0
    # components of "logit > threshold - margin": the voxels above the threshold count, so a
    # component touching a lesion is the lesion's own and is dropped by its maximum below
    labels, k = label_components(logits > logit_threshold - margin, connectivity)
    found = [les for les in lesion_table(labels, spacing, thresholds=thresholds, scores=logits, k=k)
             if les.confidence is not None and les.confidence <= logit_threshold]
    found.sort(key=lambda les: (-les.confidence, -les.voxels, les.id))
    listed = [replace(les, id=n) for n, les in enumerate(found[:SECOND_LOOK_LIMIT], start=1)]
    return listed, len(found)
