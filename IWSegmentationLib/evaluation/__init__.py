"""Lesion-wise evaluation on numpy arrays (no torch): matching, FROC, bootstrap, the report.
"""

from .bootstrap import (  # noqa: F401  (re-exported)
    BOOTSTRAP_FRACTION,
    N_BOOTSTRAP,
    bootstrap,
    bootstrap_recall_curves,
)
from .froc import (  # noqa: F401  (re-exported)
    AVG_RECALL_FP_RATES,
    CPM_FP_RATES,
    Froc,
    avg_recall,
    cpm,
    froc,
)
from .matching import (  # noqa: F401  (re-exported)
    CaseResult,
    ComponentResult,
    LesionResult,
    dice_from_counts,
    match_case,
    voxel_dice,
)
from .report import (  # noqa: F401  (re-exported)
    evaluate_cases,
    froc_of_cases,
)

__all__ = [
    "LesionResult",
    "ComponentResult",
    "CaseResult",
    "dice_from_counts",
    "voxel_dice",
    "match_case",
    "CPM_FP_RATES",
    "AVG_RECALL_FP_RATES",
    "Froc",
    "froc",
    "cpm",
    "avg_recall",
    "N_BOOTSTRAP",
    "BOOTSTRAP_FRACTION",
    "bootstrap_recall_curves",
    "bootstrap",
    "evaluate_cases",
    "froc_of_cases",
]
