"""Guards against absurd results: the one-line summary of a predicted case and its warnings.

A model used outside what it was trained on (another modality, voxel size or body part) does not
fail: it paints a third of the scan as one "lesion", or hundreds of specks. ``iwseg predict``
therefore says, for every case, how many lesions it found, how large the largest is and how much
of the organ (or body) they cover (:class:`LesionSummary`), and warns on two rules defined here
once, so that the command line, the lesion JSON and the Slicer module say the same thing:

* **large lesion**: one lesion covers more than :data:`LARGE_LESION_PERCENT` % of the body. A
  45 mm lung mass is about 48 mL, 0.2 % of a 20 L chest CT; a 10 cm liver tumour (524 mL) is
  about 3.5 % of a 15 L abdominal CT. The body is the preset's cheap intensity threshold
  (``body_threshold``, CT: above -900 HU); without one (MR), the whole volume.
* **many lesions**: :data:`MANY_LESIONS` lesions or more in one case (the paper's datasets have
  at most a few dozen per scan).

Standard library only: the Slicer module words the summary that the backend sends in its
``case_done`` event (:mod:`IWSegmentationLib.core.progress`) without numpy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

#: A lesion covering more than this percentage of the body is reported as implausible.
LARGE_LESION_PERCENT = 5.0

#: This many lesions or more in one case is reported as implausible.
MANY_LESIONS = 200


def _percent(part: int, whole: int) -> float | None:
    return 100.0 * part / whole if whole > 0 else None


@dataclass(frozen=True)
class LesionSummary:
    """What ``iwseg predict`` found in one case, and the numbers the guards look at.

    ``region`` is what the percentages are of: ``"organ mask"`` when one was given, else
    ``body`` (``"body"``, the preset's intensity threshold, or ``"volume"``, the whole image);
    ``body_voxels`` is the body the large-lesion rule compares with, with or without an organ mask.
    """

    lesions: int
    lesion_voxels: int
    largest_voxels: int
    largest_volume_mm3: float
    largest_diameter_mm: float
    region: str
    region_voxels: int
    body: str
    body_voxels: int

    @classmethod
    def of(cls, voxels: Sequence[int], voxel_mm3: float, *, body_voxels: int, body: str = "body",
           organ_voxels: int | None = None) -> LesionSummary:
        """The summary of lesions of ``voxels`` voxels each, on a grid of ``voxel_mm3`` mm³ voxels."""
        largest = max(voxels, default=0)
        volume = largest * float(voxel_mm3)
        return cls(
            lesions=len(voxels), lesion_voxels=int(sum(voxels)), largest_voxels=int(largest),
            largest_volume_mm3=volume, largest_diameter_mm=(6.0 * volume / math.pi) ** (1.0 / 3.0),
            region="organ mask" if organ_voxels is not None else body,
            region_voxels=int(organ_voxels if organ_voxels is not None else body_voxels),
            body=body, body_voxels=int(body_voxels),
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LesionSummary:
        """Read back :meth:`as_dict` (e.g. a ``case_done`` event's ``summary``); extra keys are ignored."""
        return cls(**{name: data[name] for name in cls.__dataclass_fields__})

    @property
    def largest_percent_of_body(self) -> float | None:
        return _percent(self.largest_voxels, self.body_voxels)

    def warnings(self) -> list[str]:
        """The guards' messages (empty for a plausible result)."""
        out = []
        share = self.largest_percent_of_body
        if share is not None and share > LARGE_LESION_PERCENT:
            out.append(f"the largest lesion covers {share:.1f}% of the {self.body} ({self.largest_volume_mm3 / 1000:.1f} mL; "
                       f"more than {LARGE_LESION_PERCENT:g}% is not a plausible lesion): is the image of another "
                       "modality, voxel size or body part than the model was trained on?")
        if self.lesions >= MANY_LESIONS:
            out.append(f"{self.lesions} lesions (at least {MANY_LESIONS} is not plausible): is the image of another "
                       "modality, voxel size or body part than the model was trained on?")
        return out

    def line(self) -> str:
        """``3 lesions; largest 117.6 mm³ (6.1 mm); lesions cover 0.52% of the body (largest 0.46%)``."""
        if not self.lesions:
            return "no lesions"
        head = (f"{self.lesions} lesion{'s' if self.lesions != 1 else ''}; largest "
                f"{_volume_text(self.largest_volume_mm3)} ({self.largest_diameter_mm:.1f} mm)")
        share = _percent(self.lesion_voxels, self.region_voxels)
        if share is None:
            return f"{head}; the {self.region} is empty"
        largest = _percent(self.largest_voxels, self.region_voxels)
        return f"{head}; lesions cover {share:.2f}% of the {self.region} (largest {largest:.2f}%)"

    def as_dict(self) -> dict:
        """JSON-ready: the fields, ``text`` (:meth:`line`) and ``warnings`` (:meth:`warnings`)."""
        return {**asdict(self), "largest_volume_mm3": round(self.largest_volume_mm3, 4),
                "largest_diameter_mm": round(self.largest_diameter_mm, 4), "text": self.line(),
                "warnings": self.warnings()}


def _volume_text(volume_mm3: float) -> str:
    return f"{volume_mm3 / 1000:.1f} mL" if volume_mm3 >= 1000 else f"{volume_mm3:.1f} mm³"
