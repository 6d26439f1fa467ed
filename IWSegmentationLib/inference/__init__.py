"""Inference: devices, the sliding window, the CPU engine, whole-volume prediction (torch).
"""

from .devices import (  # noqa: F401  (re-exported)
    DEVICES,
    PRECISIONS,
    resolve_device,
    resolve_precision,
)
from .engine import (  # noqa: F401  (re-exported)
    ENGINES,
    FROZEN_MAX_FLOPS_PER_VOXEL,
    FrozenNetwork,
    freeze_for_cpu,
    resolve_engine,
)
from .ensemble import (  # noqa: F401  (re-exported)
    check_ensemble,
)
from .predict import (  # noqa: F401  (re-exported)
    VolumePrediction,
    inference_settings,
    predict_volume,
)
from .predictors import (  # noqa: F401  (re-exported)
    EnsemblePredictor,
    MirroredPredictor,
    ProbabilityPredictor,
)
from .sliding_window import (  # noqa: F401  (re-exported)
    BLEND_MODES,
    InferenceStats,
    Predictor,
    foreground_from_threshold,
    foreground_windows,
    importance_map,
    padding_for,
    scan_interval,
    sliding_window_inference,
    window_starts,
)

__all__ = [
    "PRECISIONS",
    "DEVICES",
    "resolve_device",
    "resolve_precision",
    "BLEND_MODES",
    "Predictor",
    "scan_interval",
    "window_starts",
    "padding_for",
    "importance_map",
    "foreground_from_threshold",
    "foreground_windows",
    "InferenceStats",
    "sliding_window_inference",
    "ENGINES",
    "FrozenNetwork",
    "freeze_for_cpu",
    "FROZEN_MAX_FLOPS_PER_VOXEL",
    "resolve_engine",
    "ProbabilityPredictor",
    "MirroredPredictor",
    "EnsemblePredictor",
    "VolumePrediction",
    "inference_settings",
    "predict_volume",
    "check_ensemble",
]
