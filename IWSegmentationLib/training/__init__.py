"""The trainer: configuration, optimisation, devices, logging, data glue, validation, model card, loop.

The public API is re-exported here: ``from IWSegmentationLib.training import TrainConfig, train``.
"""

from .card import (  # noqa: F401  (re-exported)
    model_card,
)
from .config import (  # noqa: F401  (re-exported)
    AMP_MODES,
    CASE_SAMPLINGS,
    CHECKPOINT_CHOICES,
    DATA_FORMATS,
    LR_SCHEDULES,
    MERGE_WARNING_DICE,
    MERGE_WARNING_RECALL,
    OPTIMIZERS,
    VAL_METRICS,
    TrainConfig,
    config_reference_markdown,
    load_config,
    merge_config,
    parse_overrides,
)
from .distributed import (  # noqa: F401  (re-exported)
    DistInfo,
    amp_settings,
    cleanup_distributed,
    seed_everything,
    setup_distributed,
)
from .inputs import (  # noqa: F401  (re-exported)
    BatchWeights,
    TrainingData,
    case_weights,
    load_training_data,
    make_patch_dataset,
)
from .logger import (  # noqa: F401  (re-exported)
    CSV_COLUMNS,
    RunLogger,
)
from .optim import (  # noqa: F401  (re-exported)
    build_optimizer,
    build_scheduler,
    lr_at_epoch,
)
from .trainer import (  # noqa: F401  (re-exported)
    BEST_CHECKPOINT,
    CONFIG_FILE,
    LAST_CHECKPOINT,
    LOG_FILE,
    RESUME_MAY_CHANGE,
    RESUME_STATE,
    RUN_FILES,
    SPLITS_FILE,
    TrainResult,
    train,
)
from .validation import (  # noqa: F401  (re-exported)
    compact_metrics,
    harmonic_mean,
    merging_warning,
    metric_row,
    validate,
)

__all__ = [
    "VAL_METRICS",
    "MERGE_WARNING_RECALL",
    "MERGE_WARNING_DICE",
    "LR_SCHEDULES",
    "AMP_MODES",
    "OPTIMIZERS",
    "DATA_FORMATS",
    "CASE_SAMPLINGS",
    "CHECKPOINT_CHOICES",
    "TrainConfig",
    "parse_overrides",
    "merge_config",
    "load_config",
    "config_reference_markdown",
    "build_optimizer",
    "build_scheduler",
    "lr_at_epoch",
    "DistInfo",
    "setup_distributed",
    "cleanup_distributed",
    "amp_settings",
    "seed_everything",
    "CSV_COLUMNS",
    "RunLogger",
    "BatchWeights",
    "TrainingData",
    "case_weights",
    "load_training_data",
    "make_patch_dataset",
    "validate",
    "metric_row",
    "compact_metrics",
    "harmonic_mean",
    "merging_warning",
    "model_card",
    "CONFIG_FILE",
    "SPLITS_FILE",
    "LAST_CHECKPOINT",
    "BEST_CHECKPOINT",
    "RESUME_STATE",
    "LOG_FILE",
    "RUN_FILES",
    "RESUME_MAY_CHANGE",
    "TrainResult",
    "train",
]
