"""The organs a model's input may be masked to, and how a user gets a mask of one: the words of
``iwseg predict``'s refusal and of the Slicer panel's hint, so both name the same TotalSegmentator
structures.

Standard library only (the Slicer panel imports it); reading and checking a mask file is
:mod:`IWSegmentationLib.core.organ_masks`.
"""

from __future__ import annotations

#: How to get an organ mask, for the messages: TotalSegmentator segments 100+ structures of CT
#: (lungs, liver, ...), and Slicer users have it as an extension.
ORGAN_MASK_HOWTO = ("TotalSegmentator makes one from the CT (e.g. `TotalSegmentator -i CT.nii.gz -o seg --roi_subset "
                    "{roi}`, or its 3D Slicer extension), as does any segmentation saved as a label map")

#: TotalSegmentator's names of the organs the presets mask (``--roi_subset``).
TOTALSEGMENTATOR_ROIS = {"liver": "liver", "lung": "lung_upper_lobe_left lung_lower_lobe_left lung_upper_lobe_right "
                                                    "lung_middle_lobe_right lung_lower_lobe_right"}


def totalsegmentator_roi(organ: str | None) -> str:
    """TotalSegmentator's structure name(s) for ``organ`` (the organ's own name when unknown)."""
    return TOTALSEGMENTATOR_ROIS.get(organ or "", organ or "ORGAN")
