"""Whether a volume's voxels look like a label map (a mask) rather than a scan.

One test, shared by ``iwseg predict`` (a mask given as the scan is refused) and the organ-mask
checks (:mod:`.organ_masks`: a scan given as the organ mask is refused), on this computer and on
a server.
"""

from __future__ import annotations

import numpy as np

#: An input whose voxels take at most this many distinct integer values looks like a label map
#: (a lesion or organ mask given as the image): a scan has hundreds of grey values or more.
LABEL_MAP_MAX_VALUES = 16


#: Voxels of the evenly strided sample checked first, so a real scan is cleared in milliseconds.
LABEL_SAMPLE_VOXELS = 1 << 20


def label_map_values(image: np.ndarray, max_values: int = LABEL_MAP_MAX_VALUES) -> np.ndarray | None:
    """The distinct values of ``image`` when there are at most ``max_values`` and all are integers
    (what a mask or label map looks like), else None. A strided sample of about a million voxels
    is looked at first; only an image that already looks like a label map there pays a full pass."""
    flat = image.reshape(-1)
    step = max(1, flat.size // LABEL_SAMPLE_VOXELS)
    values = np.unique(flat[::step])
    if values.size > max_values:
        return None
    if step > 1:
        values = np.unique(flat)
        if values.size > max_values:
            return None
    if values.dtype.kind == "f" and not np.array_equal(values, np.round(values)):
        return None  # NaN also ends up here (NaN != NaN)
    return values
