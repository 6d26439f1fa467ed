"""Preprocessing, one code path for training and inference: presets, intensities, foreground, the
automatic lung mask, resampling, the organ crop.
"""

from .cropping import (  # noqa: F401  (re-exported)
    MAX_CROP_MARGIN,
    OrganBox,
    organ_box,
)
from .foreground import (  # noqa: F401  (re-exported)
    foreground_mask,
    lung_field,
)
from .intensity import (  # noqa: F401  (re-exported)
    preprocess,
)
from .lung_mask import (  # noqa: F401  (re-exported)
    automatic_mask_available,
    automatic_organ_mask,
    lung_mask,
)
from .presets import (  # noqa: F401  (re-exported)
    MODALITIES,
    PARAM_KEYS,
    PRESETS,
    SCALINGS,
    get_preset,
    validate_params,
)
from .resampling import (  # noqa: F401  (re-exported)
    MAX_RESAMPLED_VOXELS,
    check_resampled_memory,
    prepare_case,
    prepare_channels,
    resample_to_geometry,
    resample_to_spacing,
    resampled_geometry,
)

__all__ = [
    "MAX_CROP_MARGIN",
    "OrganBox",
    "organ_box",
    "SCALINGS",
    "MODALITIES",
    "PARAM_KEYS",
    "PRESETS",
    "get_preset",
    "validate_params",
    "preprocess",
    "foreground_mask",
    "lung_field",
    "lung_mask",
    "automatic_organ_mask",
    "automatic_mask_available",
    "MAX_RESAMPLED_VOXELS",
    "check_resampled_memory",
    "resampled_geometry",
    "resample_to_geometry",
    "resample_to_spacing",
    "prepare_case",
    "prepare_channels",
]
