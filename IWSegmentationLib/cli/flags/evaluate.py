"""The flags of ``iwseg evaluate``: its parser, help texts, choices and defaults; what the command does
with them is :mod:`IWSegmentationLib.cli.commands.evaluate`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ...evaluation.bootstrap import BOOTSTRAP_MODES
from ...evaluation.records import RECORD_SCORES
from .lesion_sizes import add_lesion_size_flags


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate",
        help="lesion-wise evaluation (FROC, CPM, avg recall, object Dice) of predictions against references",
        description=(
            "Lesion-wise evaluation as in Shirokikh et al. (MICCAI 2020). Pairs the files of --logits (or "
            "--pred) and --ref by case name (NIfTI/NRRD/MHA); predictions are logit maps (iwseg predict --logits: "
            "a lesion's confidence is its maximum logit, as the authors rank them) or probability maps in [0, 1] "
            "or binary masks, references binary lesion masks on the same voxel grid. Or pools per-lesion "
            "--records. See docs/metrics.md."
        ),
    )
    p.add_argument("--logits", type=Path, metavar="DIR",
                   help="folder of logit maps (iwseg predict --logits): components ranked by their maximum logit")
    p.add_argument("--pred", type=Path, metavar="DIR",
                   help="instead of --logits: folder of probability maps in [0, 1] or masks (e.g. from another "
                        "tool), ranked by their maximum probability (ties at 1.0 for confident components)")
    p.add_argument("--pred-values", default="auto", metavar="KIND",
                   help="what --pred's values are: auto (default: float maps are probabilities, a uint8 map "
                        "written by iwseg predict --probabilities-uint8 is round(255 p), an integer map of 0 and one "
                        "value k is a label map; other integer maps are refused), probability, uint8 (round(255 p) "
                        "without predict's note) or label=K (voxels of value K are lesion, e.g. label=2 for LiTS)")
    p.add_argument("--ref", type=Path, metavar="DIR", help="folder of reference lesion masks")
    p.add_argument("--records", type=Path, metavar="FILE",
                   help="instead of --pred/--ref: per-lesion records, the authors' prc_records.json or an "
                        "iwseg evaluate --json report or --csv table")
    p.add_argument("--records-score", choices=RECORD_SCORES, default="logit",
                   help="which score of the authors' records ranks detections (default logit, as they did)")
    p.add_argument("--hit-rule", default="paper", metavar="RULE",
                   help="when a component hits a lesion: paper (default: any overlap, many-to-one), one-to-one, "
                        "panoptica, or terms like 'hungarian,iou>0.5' / 'many,voxels>=10' (docs/metrics.md)")
    p.add_argument("--min-lesion-size", default=None, metavar="SIZE",
                   help="drop predicted components smaller than SIZE, e.g. 10vox or 5mm3 (default: keep all)")
    p.add_argument("--bootstrap", choices=BOOTSTRAP_MODES, default="ours",
                   help="ours (default: FP/image over each resample's images) or paper (the authors' quirk: "
                        "images without records left out, FP/image over all images, seed 42)")
    p.add_argument("--threshold", type=float, default=0.5, metavar="T",
                   help="segmentation threshold t_seg, a probability: components are those of prob > T, or of "
                        "logit > log(T / (1 - T)) with --logits (default 0.5)")
    p.add_argument("--spacing-from", choices=("ref", "pred"), default="ref",
                   help="image whose voxel spacing gives volumes and diameters (default ref)")
    add_lesion_size_flags(
        p, size_preset_help="size-group diameter cut-offs (default lung: small < 10 mm <= medium < 20 mm <= large)",
        connectivity_help="connected-component connectivity for lesions and predictions (default 26)")
    p.add_argument("--json", type=Path, metavar="OUT", help="write the full report as JSON")
    p.add_argument("--csv", type=Path, metavar="OUT",
                   help="write one row per reference lesion, then per false positive, as CSV")
    p.add_argument("--froc-png", type=Path, metavar="OUT", help="write the FROC plot as PNG")
    p.add_argument("--seed", type=int, default=None, help="bootstrap seed (default 0; 42 with --bootstrap paper)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_verdicts_argument(p)
    return p


def add_verdicts_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--verdicts`` flag of ``iwseg evaluate``."""
    parser.add_argument("--verdicts", type=Path, metavar="DIR_OR_FILE",
                        help="reviewer verdicts (CASE.verdicts.json files, or one file): also report the model plus "
                             "reader, rejected lesions removed and edited ones as edited (docs/verdicts.md)")
