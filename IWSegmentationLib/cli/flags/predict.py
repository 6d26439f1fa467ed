"""The flags of ``iwseg predict``: its parser, help texts, choices and defaults; what the command does
with them is :mod:`IWSegmentationLib.cli.commands.predict`.

Names and ranges only: ``iwseg predict --help``, and a command line with a bad flag, are answered
without importing the prediction pipeline (numpy, the predictor, the model library).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ...core.devices import DEVICES, ENGINES, PRECISIONS
from ...predict.options import OVERLAP_RANGE
from .lesion_sizes import add_lesion_size_flags


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict",
        help="segment lesions in a volume or a folder of volumes with a trained checkpoint",
        description=(
            "Segment lesions with a trained checkpoint (.safetensors). --input is an image file "
            "(NIfTI/NRRD/MHA), a DICOM series folder, or a folder of cases; then --output, "
            "--probabilities, --logits and --lesions are folders. Outputs keep the input's exact grid. "
            "Exit codes: 0 success, 2 bad input, 3 cancelled. See docs/inference.md."
        ),
    )
    p.add_argument("--model", required=True, type=Path, nargs="+", metavar="CKPT",
                   help="checkpoint (.safetensors) or the name of a model in the model library (iwseg models list; "
                        "docs/models.md); several: an ensemble whose logits are averaged "
                        "(their preprocessing, window and threshold must agree)")
    p.add_argument("--input", required=True, type=Path, nargs="+", metavar="IMG|DIR",
                   help="image, DICOM folder or folder of cases; several image files: the channels of one case "
                        "(e.g. T1 FLAIR, in the model's channel order). In a folder, case_0000, case_0001, ... "
                        "files are the channels of case 'case' (MSD / nnU-Net naming)")
    p.add_argument("--output", required=True, type=Path, metavar="MASK|DIR", help="binary lesion mask (uint8) or folder")
    p.add_argument("--probabilities", type=Path, metavar="PROB|DIR", help="also write the probability map (or folder)")
    p.add_argument("--probabilities-uint8", action="store_true",
                   help="write probabilities as uint8 round(255 p) instead of float32 (4x smaller)")
    p.add_argument("--logits", type=Path, metavar="LOGITS|DIR",
                   help="also write the blended logit map, float32 (or folder): what ranks lesions (a lesion's "
                        "confidence is its maximum logit); iwseg evaluate --logits reads it")
    p.add_argument("--lesions", type=Path, metavar="JSON|DIR", help="also write the lesion table as JSON (or folder)")
    p.add_argument("--dicom-seg", type=Path, metavar="DCM|DIR",
                   help="DICOM series input: also write the lesions as a DICOM SEG referencing the series, one "
                        "segment per lesion (or a folder: <case>.dcm); needs highdicom")
    p.add_argument("--dicom-sr", type=Path, metavar="DCM|DIR",
                   help="with --dicom-seg: also write a DICOM SR measurement report (TID 1500) referencing the SEG's "
                        "segments and the series: volume, equivalent diameter, confidence and size group per lesion "
                        "(or a folder: <case>.dcm); docs/dicom.md")
    p.add_argument("--organ-mask", type=Path, metavar="MASK|DIR",
                   help="organ mask the checkpoint's preprocessing uses (e.g. lungs for ct-lung), or a folder "
                        "of them named like the cases; also limits the windows that run. Without it a model that "
                        "needs one gets the automatic mask where one exists (CT lungs), else the run is refused")
    p.add_argument("--allow-unmasked", action="store_true",
                   help="segment without an organ mask although the model needs one (it then sees voxels it never "
                        "saw in training; a warning says so)")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto (CUDA, else Apple MPS, else CPU), cpu, cuda or mps (default auto)")
    p.add_argument("--overlap", type=float, metavar="F",
                   help=f"window overlap in [{OVERLAP_RANGE[0]:g}, {OVERLAP_RANGE[1]:g}] (default: checkpoint's, 0.25)")
    p.add_argument("--threshold", type=float, metavar="F", help="probability threshold in [0, 1) (default: checkpoint's)")
    p.add_argument("--batch-size", type=int, metavar="N", help="windows per forward pass (default 1 CPU, 4 GPU)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto (fp16 autocast on CUDA, fp32 elsewhere), fp32, fp16 (GPU) or bf16 (opt-in on CPU: "
                        "about 2x faster on CPUs with AVX-512 bf16/AMX, slightly different masks)")
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="auto (frozen for fp32 on the CPU with a narrow net, else eager), frozen (TorchScript + oneDNN, fp32 CPU "
                        "only: up to 2x faster for narrow nets, same outputs within 1e-6) or eager")
    p.add_argument("--no-skip", action="store_true", help="run every window (no background skipping)")
    p.add_argument("--tta", action="store_true",
                   help="test-time mirroring: average the logits of the 8 flips over the 3 axes (8x the time)")
    p.add_argument("--no-doubt", action="store_true",
                   help="with --tta or several --model: skip the per-lesion doubt (the members' spread and how many "
                        "found each lesion, in the lesion JSON; it keeps every member's logit map as float16)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    p.add_argument("--force", action="store_true",
                   help="segment an input that looks like a label map (few integer values) instead of refusing it")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for PyTorch (default: PyTorch's choice)")
    p.add_argument("--keep-spacing", action="store_true",
                   help="run the network on the input's own voxel grid instead of resampling it to the model's "
                        "voxel spacing (the model card's spacing) and the result back")
    p.add_argument("--allow-modality-mismatch", action="store_true",
                   help="run a CT model on an input that looks like MR, or the reverse, instead of refusing it "
                        "(e.g. an MR subtraction image with negative values)")
    add_lesion_size_flags(p, size_preset_help="lesion size groups (default: the checkpoint's, else lung)",
                          connectivity_help="lesion connected-component connectivity (default 26)")
    p.add_argument("--min-lesion-size", default=None, metavar="SIZE",
                   help="drop predicted lesions smaller than SIZE from the mask and lesion table, e.g. 10vox or "
                        "5mm3 (default: the checkpoint's min_lesion_size, else keep all; 'none' keeps all)")
    p.add_argument("--operating-point", default=None, metavar="RATE",
                   help="threshold at a validation operating point of the checkpoint's card, named by its false "
                        "positives per scan: 1/8fp, 1/4fp, 0.5fp, 1fp, 2fp, 4fp or 8fp (instead of --threshold; "
                        "iwseg inspect lists them)")
    p.add_argument("--shard", default=None, metavar="i/n",
                   help="folder input: process cases i, i+n, i+2n, ... (0 <= i < n) of the sorted list, to split "
                        "a cohort across processes; 'auto' reads RANK/WORLD_SIZE (torchrun) or SLURM_PROCID/NTASKS")
    p.add_argument("--progress-format", default="text", choices=("text", "jsonl"),
                   help="text: progress bars on stderr; jsonl: one JSON object per line on stdout")
    p.add_argument("--server", metavar="URL", help="run on an `iwseg serve` server (--model names one of its models; "
                   "one image file as --input); writes the same outputs as a local run. See docs/server.md")
    p.add_argument("--token-file", type=Path, metavar="F", help="with --server: file holding the bearer token")
    return p
