"""``iwseg predict``: lesion masks, probability maps and lesion tables from a trained checkpoint.

One volume (NIfTI/NRRD/MHA file or DICOM series folder) or a folder of them. For each case:
read -> the checkpoint's preprocessing -> sliding-window inference (background windows
skipped) -> threshold -> lesion analysis -> outputs on the input's exact grid. All outputs of a
case are written to temporary names first and renamed together only once all are complete, so
a failure or a cancel (SIGINT/SIGTERM, exit code 3) never leaves a half-written file and never
replaces an existing one with a partial result. Bad input exits with code 2 and a one-line
message naming the file. ``--progress-format jsonl`` speaks the protocol of
:mod:`IWSegmentationLib.core.progress` on stdout (logs on stderr). See docs/inference.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ... import __version__
from ...core.devices import DEVICES, ENGINES, PRECISIONS
from ...core.errors import EXIT_FAILURE, Cancelled, InputError, IWSegError
from ...core.imageio import (
    read_channels,
    read_image,
)
from ...core.lesions import (
    CONNECTIVITIES,
    SIZE_PRESETS,
    remove_small_components,
)
from ...core.progress import CancelState, ProgressReporter
from .predict_inputs import (
    check_case_channels,
    check_label_map,
    collect_cases,
    model_channels,
    organ_mask_warning,
    parse_shard,
    resolve_dataset_root,
    split_channel_inputs,
)
from .predict_outputs import (
    _check_finite,
    _dicom_seg,
    _min_lesion_size,
    _size_thresholds,
    _write_outputs,
    attach_dicom_seg,
    lesion_report,
)

if TYPE_CHECKING:
    from .predict_inputs import PredictJob


#: Seconds between two ``inference`` progress lines of one case (the last one always goes out).
PROGRESS_INTERVAL_S = 0.2


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
                   help="checkpoint (.safetensors); several: an ensemble whose logits are averaged "
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
    p.add_argument("--organ-mask", type=Path, metavar="MASK|DIR",
                   help="organ mask the checkpoint's preprocessing uses (e.g. lungs for ct-lung), or a folder "
                        "of them named like the cases; also limits the windows that run")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="auto (CUDA, else Apple MPS, else CPU), cpu, cuda or mps (default auto)")
    p.add_argument("--overlap", type=float, metavar="F", help="window overlap in [0, 1) (default: checkpoint's, 0.25)")
    p.add_argument("--threshold", type=float, metavar="F", help="probability threshold (default: checkpoint's)")
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
    p.add_argument("--overwrite", action="store_true", help="replace outputs that already exist")
    p.add_argument("--force", action="store_true",
                   help="segment an input that looks like a label map (few integer values) instead of refusing it")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for PyTorch (default: PyTorch's choice)")
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--size-preset", choices=sorted(SIZE_PRESETS), default=None,
                       help="lesion size groups (default: the checkpoint's, else lung)")
    sizes.add_argument("--size-thresholds", type=float, nargs=2, metavar=("S", "M"), default=None,
                       help="size-group cut-offs in mm: small if d < S, medium if S <= d < M, large if d >= M")
    p.add_argument("--connectivity", type=int, choices=CONNECTIVITIES, default=26,
                   help="lesion connected-component connectivity (default 26)")
    p.add_argument("--min-lesion-size", default=None, metavar="SIZE",
                   help="drop predicted lesions smaller than SIZE from the mask and lesion table, e.g. 10vox or "
                        "5mm3 (default: the checkpoint's min_lesion_size, else keep all; 'none' keeps all)")
    p.add_argument("--shard", default=None, metavar="i/n",
                   help="folder input: process cases i, i+n, i+2n, ... (0 <= i < n) of the sorted list, to split "
                        "a cohort across processes; 'auto' reads RANK/WORLD_SIZE (torchrun) or SLURM_PROCID/NTASKS")
    p.add_argument("--progress-format", default="text", choices=("text", "jsonl"),
                   help="text: progress bars on stderr; jsonl: one JSON object per line on stdout")
    p.add_argument("--server", metavar="URL", help="run on an `iwseg serve` server (--model names one of its models; "
                   "one image file as --input); writes the same outputs as a local run. See docs/server.md")
    p.add_argument("--token-file", type=Path, metavar="F", help="with --server: file holding the bearer token")
    p.set_defaults(func=run)
    return p


class _Throttled:
    """Forwards ``progress(done, total)`` at most every ``interval`` seconds (always the last)."""

    def __init__(self, callback, interval: float = PROGRESS_INTERVAL_S):
        self.callback, self.interval, self.last = callback, interval, -1e9

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - self.last >= self.interval:
            self.last = now
            self.callback(done, total)


def _device_name(requested: str) -> str:
    """``auto`` under torchrun picks ``cuda:LOCAL_RANK`` so ranks do not share one GPU."""
    import torch

    if requested == "auto" and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK']) % max(1, torch.cuda.device_count())}"
    return requested


def run(args: argparse.Namespace) -> int:
    reporter = ProgressReporter(args.progress_format)
    state = CancelState()

    def report_error(message: str, code: int) -> None:
        # in text mode the command line itself prints the error line on stderr
        if args.progress_format == "jsonl":
            reporter.emit("error", message=message, exit_code=code)

    try:
        with state.installed():
            if args.server:
                from ...serve.client import predict_on_server

                return predict_on_server(args, reporter, state)
            return _run(args, reporter, state)
    except Cancelled as exc:
        report_error(f"cancelled: {exc}", exc.exit_code)
        raise
    except KeyboardInterrupt:
        report_error("cancelled", Cancelled.exit_code)
        raise Cancelled("interrupted") from None
    except IWSegError as exc:
        report_error(str(exc), exc.exit_code)
        raise
    except Exception as exc:
        report_error(f"{type(exc).__name__}: {exc}", EXIT_FAILURE)
        raise


def _run(args: argparse.Namespace, reporter: ProgressReporter, state: CancelState) -> int:
    import torch

    from ...inference.devices import resolve_device, resolve_precision

    t0 = time.monotonic()
    if args.overlap is not None and not 0.0 <= args.overlap < 1.0:
        raise InputError(f"--overlap must be in [0, 1), got {args.overlap}")
    if args.threshold is not None and not 0.0 <= args.threshold < 1.0:
        raise InputError(f"--threshold must be in [0, 1), got {args.threshold}")
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threads is not None:
        limit = os.cpu_count() or 1
        if not 1 <= args.threads <= limit:
            raise InputError(f"--threads must be between 1 and {limit} (the CPUs of this machine), got {args.threads}")
        torch.set_num_threads(args.threads)
    parse_shard(args.shard)  # a bad --shard is an error even for a single input (where it does nothing)
    notes: list[str] = []
    args.input, args.more_channels = split_channel_inputs(list(args.input))
    args.model_channels = model_channels(args.model[0])
    args.input = resolve_dataset_root(args.input, notes.append)
    cases = collect_cases(args)
    if args.dicom_seg is not None:
        attach_dicom_seg(cases, args)
    device = resolve_device(_device_name(args.device))
    precision = resolve_precision(args.precision, device)
    reporter.emit("start", version=__version__, cases=len(cases), device=str(device), precision=precision,
                  model=", ".join(str(m) for m in args.model))
    for note in notes:
        reporter.emit("load", case=None, message=note)
    model, card = _load_models(args.model, reporter)
    check_case_channels(cases, card)
    warning = organ_mask_warning(card, args.organ_mask is not None)
    if warning:
        reporter.emit("warning", case=None, message=warning)
    thresholds = _size_thresholds(args, card)
    args.min_lesion_size = _min_lesion_size(args.min_lesion_size, card)

    failed: list[str] = []
    bar = None
    if args.progress_format == "text" and len(cases) > 1:
        from tqdm import tqdm

        bar = tqdm(total=len(cases), desc="cases", unit="case", file=sys.stderr)
    for case in cases:
        try:
            _predict_case(case, model, card, args, device, precision, thresholds, reporter, state)
        except InputError as exc:
            if len(cases) == 1:
                raise
            failed.append(case.name)
            reporter.emit("warning", case=case.name, message=f"case skipped: {exc}")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    reporter.emit("done", seconds=round(time.monotonic() - t0, 2), cases=len(cases) - len(failed), failed=failed)
    if failed:
        raise InputError(f"{len(failed)} of {len(cases)} case(s) failed: {', '.join(failed)}")
    return 0


def _load_models(paths: list[Path], reporter: ProgressReporter) -> tuple[list, dict]:
    """The networks of ``--model`` and the card of the first; several must agree
    (:func:`inference.check_ensemble` names the two files that do not)."""
    from ...inference.ensemble import check_ensemble
    from ...nn.checkpoint import load_checkpoint

    if len(set(p.resolve() for p in paths)) != len(paths):
        raise InputError("--model names the same checkpoint twice; an ensemble needs different checkpoints")
    models, cards = [], []
    for path in paths:
        reporter.emit("load", case=None, message=f"checkpoint {path}")
        model, card = load_checkpoint(path, map_location="cpu")
        models.append(model)
        cards.append((str(path), card))
    check_ensemble(cards)
    return models, cards[0][1]


def _predict_case(case: PredictJob, model, card: dict, args, device, precision, thresholds, reporter, state) -> None:
    from ...inference.predict import predict_volume

    t0 = time.monotonic()
    reporter.emit("load", case=case.name, message=f"reading {', '.join(map(str, case.image_files))}")
    image, geometry = read_channels(case.image_files, what="image")
    check_label_map(image, case.image, force=args.force,
                    warn=lambda message: reporter.emit("warning", case=case.name, message=message))
    # the SEG's source images are read (and matched to the grid) before inference, so a series
    # that cannot be referenced fails in seconds, not after the network has run
    dicom_source = None if case.dicom_seg is None else _dicom_seg().source_series(case.image, geometry)
    organ = None
    if case.organ_mask is not None:
        organ, organ_geometry = read_image(case.organ_mask, what="organ mask")
        diffs = geometry.differences(organ_geometry)
        if diffs:
            raise InputError(f"organ mask {case.organ_mask} is not on the grid of {case.image}: {'; '.join(diffs)}")
    reporter.emit("preprocess", case=case.name)
    try:
        prediction = predict_volume(
            model, image, card, geometry=geometry, organ_mask=organ, device=device, overlap=args.overlap,
            threshold=args.threshold, batch_size=args.batch_size, precision=precision,
            skip_background=not args.no_skip, engine=args.engine, tta=args.tta,
            progress=_Throttled(reporter.inference_callback(case.name)), cancel=state,
            on_warning=lambda message: reporter.emit("warning", case=case.name, message=message),
        )
    except InputError as exc:
        raise InputError(f"{case.image}: {exc}") from None
    _check_finite(prediction.logits, case, args.model)
    del image, organ
    reporter.emit("postprocess", case=case.name)
    if args.min_lesion_size is not None:
        prediction.mask = remove_small_components(prediction.mask, geometry.spacing_zyx, args.min_lesion_size,
                                                  args.connectivity).astype(np.uint8)
    # the lesion count goes into the progress protocol, so lesions are analysed even without --lesions
    report, n_lesions = lesion_report(case, prediction, geometry, thresholds, args.connectivity)
    outputs = _write_outputs(case, prediction, geometry, report, args, reporter, state, dicom_source)
    reporter.emit("case_done", case=case.name, outputs=outputs, lesions=n_lesions,
                  windows=prediction.stats.windows_run, windows_total=prediction.stats.windows_total,
                  engine=prediction.stats.engine, seconds=round(time.monotonic() - t0, 2))
