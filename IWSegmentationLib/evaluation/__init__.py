"""Lesion-wise evaluation on numpy arrays (no torch): matching, FROC, bootstrap, the report.
"""

from .bootstrap import (  # noqa: F401  (re-exported)
    BOOTSTRAP_FRACTION,
    BOOTSTRAP_MODES,
    N_BOOTSTRAP,
    PAPER_BOOTSTRAP_SEED,
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
    operating_points,
)
from .hit_rules import (  # noqa: F401  (re-exported)
    HIT_RULE_PRESETS,
    MATCHINGS,
    HitRule,
    parse_hit_rule,
)
from .matching import (  # noqa: F401  (re-exported)
    CaseOverlaps,
    CaseResult,
    ComponentResult,
    LesionResult,
    case_overlaps,
    dice_from_counts,
    match_case,
    voxel_dice,
)
from .report import (  # noqa: F401  (re-exported)
    evaluate_cases,
    froc_of_cases,
    operating_points_of_cases,
)

__all__ = [
    "MATCHINGS",
    "HIT_RULE_PRESETS",
    "HitRule",
    "parse_hit_rule",
    "LesionResult",
    "ComponentResult",
    "CaseResult",
    "dice_from_counts",
    "voxel_dice",
    "match_case",
    "CaseOverlaps",
    "case_overlaps",
    "CPM_FP_RATES",
    "AVG_RECALL_FP_RATES",
    "Froc",
    "froc",
    "cpm",
    "avg_recall",
    "N_BOOTSTRAP",
    "BOOTSTRAP_FRACTION",
    "BOOTSTRAP_MODES",
    "PAPER_BOOTSTRAP_SEED",
    "bootstrap_recall_curves",
    "bootstrap",
    "evaluate_cases",
    "froc_of_cases",
    "operating_points",
    "operating_points_of_cases",
]
