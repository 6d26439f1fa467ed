"""``iwseg predict``: lesion masks, probability maps and lesion tables from a trained checkpoint.

One volume (NIfTI/NRRD/MHA file or DICOM series folder) or a folder of them. For each case:
read -> the checkpoint's preprocessing -> sliding-window inference (background windows
skipped) -> threshold -> lesion analysis -> outputs on the input's exact grid. All outputs of a
case are written to temporary names first and renamed together only once all are complete, so
a failure or a cancel (SIGINT/SIGTERM, exit code 3) never leaves a half-written file and never
replaces an existing one with a partial result. Bad input exits with code 2 and a one-line
message naming the file. ``--progress-format jsonl`` speaks the protocol of
:mod:`IWSegmentationLib.progress` on stdout (logs on stderr). See docs/inference.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import __version__
from ..errors import EXIT_FAILURE, Cancelled, InputError, IWSegError
from ..imageio import IMAGE_SUFFIXES, Geometry, atomic_output, case_name, list_images, read_image, write_image
from ..lesions import CONNECTIVITIES, SIZE_PRESETS, SizeThresholds, analyze_lesions, size_thresholds
from ..progress import ProgressReporter

#: Same as inference.DEVICES / PRECISIONS / ENGINES, repeated so that ``iwseg --help`` and the other
#: sub-commands start without importing torch.
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
ENGINES = ("auto", "eager", "frozen")
#: Seconds between two ``inference`` progress lines of one case (the last one always goes out).
PROGRESS_INTERVAL_S = 0.2


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict",
        help="segment lesions in a volume or a folder of volumes with a trained checkpoint",
        description=(
            "Segment lesions with a trained checkpoint (.safetensors). --input is an image file "
            "(NIfTI/NRRD/MHA), a DICOM series folder, or a folder of cases; then --output, "
            "--probabilities and --lesions are folders. Outputs keep the input's exact grid. "
            "Exit codes: 0 success, 2 bad input, 3 cancelled. See docs/inference.md."
        ),
    )
    p.add_argument("--model", required=True, type=Path, metavar="CKPT", help="checkpoint (.safetensors)")
    p.add_argument("--input", required=True, type=Path, metavar="IMG|DIR", help="image, DICOM folder or folder of cases")
    p.add_argument("--output", required=True, type=Path, metavar="MASK|DIR", help="binary lesion mask (uint8) or folder")
    p.add_argument("--probabilities", type=Path, metavar="PROB|DIR", help="also write the probability map (or folder)")
    p.add_argument("--probabilities-uint8", action="store_true",
                   help="write probabilities as uint8 round(255 p) instead of float32 (4x smaller)")
    p.add_argument("--lesions", type=Path, metavar="JSON|DIR", help="also write the lesion table as JSON (or folder)")
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
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads for PyTorch (default: PyTorch's choice)")
    sizes = p.add_mutually_exclusive_group()
    sizes.add_argument("--size-preset", choices=sorted(SIZE_PRESETS), default=None,
                       help="lesion size groups (default: the checkpoint's, else lung)")
    sizes.add_argument("--size-thresholds", type=float, nargs=2, metavar=("S", "M"), default=None,
                       help="size-group cut-offs in mm: small if d < S, medium if S <= d < M, large if d >= M")
    p.add_argument("--connectivity", type=int, choices=CONNECTIVITIES, default=26,
                   help="lesion connected-component connectivity (default 26)")
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


# --------------------------------------------------------------------------- cancellation


class CancelState:
    """SIGINT/SIGTERM handling: the first signal raises :class:`Cancelled` in the main thread
    (unwinding removes every temporary output) unless outputs are being committed, in which case
    the commit finishes and the cancel is raised right after it."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._deferring = 0

    def handler(self, signum, _frame) -> None:
        self.requested = signal.Signals(signum).name
        if not self._deferring:
            raise Cancelled(f"received {self.requested}")

    def __call__(self) -> bool:
        return self.requested is not None

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if self.requested and not self._deferring:
            raise Cancelled(f"received {self.requested}")

    @contextlib.contextmanager
    def installed(self) -> Iterator[CancelState]:
        """Install the handlers (main thread only) and restore the previous ones afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {sig: signal.signal(sig, self.handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


# --------------------------------------------------------------------------- cases and outputs


@dataclass
class Case:
    """One input volume and where its outputs go."""

    name: str
    image: Path
    mask: Path
    probabilities: Path | None = None
    lesions: Path | None = None
    organ_mask: Path | None = None


def _image_suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), "")


def _is_dicom_folder(path: Path) -> bool:
    import SimpleITK as sitk

    return path.is_dir() and bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)``; ``"auto"`` from RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS; None -> (0, 1)."""
    if text is None:
        return 0, 1
    if text == "auto":
        for rank_key, size_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
            if rank_key in os.environ and size_key in os.environ:
                text = f"{os.environ[rank_key]}/{os.environ[size_key]}"
                break
        else:
            return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise InputError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise InputError(f"--shard i/n needs n >= 1 and 0 <= i < n, got {text!r}")
    return i, n


def _check_output_file(flag: str, path: Path, *, image: bool) -> None:
    if image and not _image_suffix(path):
        raise InputError(f"{flag} {path}: use an image file name ending in {', '.join(IMAGE_SUFFIXES)}")
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; with a single input give a file name")
    if not path.parent.is_dir():
        raise InputError(f"{flag}: output folder does not exist: {path.parent}")


def _check_output_folder(flag: str, path: Path) -> None:
    if not path.is_dir():
        raise InputError(f"{flag} {path}: with a folder of cases as --input this must be an existing folder")


def collect_cases(args: argparse.Namespace) -> list[Case]:
    """The cases to process (after ``--shard``), with their output paths; checks every path first."""
    src: Path = args.input
    if not src.exists():
        raise InputError(f"input not found: {src}")
    folder_mode = False
    inputs: dict[str, Path] = {}
    if src.is_dir():
        inputs = list_images(src, what="input folder")
        if inputs:
            folder_mode = True
        elif _is_dicom_folder(src):
            inputs = {src.name: src}
        else:
            subdirs = sorted(d for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
            inputs = {d.name: d for d in subdirs if _is_dicom_folder(d)}
            if not inputs:
                raise InputError(
                    f"input folder {src} holds no images ({', '.join(IMAGE_SUFFIXES)}), "
                    "no DICOM series and no sub-folders with DICOM series"
                )
            folder_mode = True
    else:
        if not _image_suffix(src):
            raise InputError(f"input {src}: not an image file ({', '.join(IMAGE_SUFFIXES)}) or DICOM folder")
        inputs = {case_name(src): src}

    if not folder_mode:
        name, path = next(iter(inputs.items()))
        _check_output_file("--output", args.output, image=True)
        if args.probabilities is not None:
            _check_output_file("--probabilities", args.probabilities, image=True)
        if args.lesions is not None:
            _check_output_file("--lesions", args.lesions, image=False)
        outs = [p.resolve() for p in (args.output, args.probabilities, args.lesions) if p is not None]
        if len(set(outs)) != len(outs):
            raise InputError("--output, --probabilities and --lesions must be different files")
        if path.resolve() in outs:
            raise InputError(f"an output path is the input image {path}; refusing to overwrite the input")
        organ = args.organ_mask
        if organ is not None and not organ.exists():
            raise InputError(f"--organ-mask not found: {organ}")
        return [Case(name, path, args.output, args.probabilities, args.lesions, organ)]

    _check_output_folder("--output", args.output)
    folders = [args.output.resolve()]
    for flag, value in (("--probabilities", args.probabilities), ("--lesions", args.lesions)):
        if value is not None:
            _check_output_folder(flag, value)
            if value.resolve() in folders:
                raise InputError(f"{flag} must be a different folder from the other outputs (same case names)")
            folders.append(value.resolve())
    if src.resolve() in folders[:2]:
        raise InputError(f"output folder {src} is the input folder; refusing to overwrite the input images")
    organs: dict[str, Path] = {}
    if args.organ_mask is not None:
        organs = list_images(args.organ_mask, what="--organ-mask folder")
    i, n = parse_shard(args.shard)
    cases = []
    for name in sorted(inputs)[i::n]:
        path = inputs[name]
        suffix = _image_suffix(path) or ".nii.gz"
        cases.append(Case(
            name, path, args.output / f"{name}{suffix}",
            args.probabilities / f"{name}{suffix}" if args.probabilities is not None else None,
            args.lesions / f"{name}.json" if args.lesions is not None else None,
            organs.get(name),
        ))
    if args.organ_mask is not None:
        missing = [c.name for c in cases if c.organ_mask is None]
        if missing:
            raise InputError(f"--organ-mask folder {args.organ_mask} has no mask for case(s) {', '.join(missing)}")
    return cases


def _size_thresholds(args: argparse.Namespace, card: dict) -> SizeThresholds:
    """The command line's size groups, else the checkpoint's (list, dict or preset name), else lung."""
    if args.size_preset is not None or args.size_thresholds is not None:
        return size_thresholds(args.size_preset, args.size_thresholds)
    value = card.get("size_thresholds")
    if isinstance(value, str):
        return size_thresholds(value)
    if isinstance(value, (list, tuple)):
        return size_thresholds(None, value)
    if isinstance(value, dict) and {"small_mm", "large_mm"} <= set(value):
        return SizeThresholds(float(value["small_mm"]), float(value["large_mm"]))
    return size_thresholds(None, None)


def lesion_report(case: Case, prediction, geometry: Geometry, thresholds: SizeThresholds,
                  connectivity: int) -> tuple[dict, int]:
    """The lesion JSON of one case and its lesion count: one entry per connected component of the
    mask, ids in scan order (as ``lesions.label_components`` numbers them), centroids in voxel
    indices and in physical LPS mm."""
    _, lesions = analyze_lesions(
        prediction.mask, geometry.spacing_zyx, connectivity=connectivity, thresholds=thresholds,
        probabilities=prediction.probabilities,
    )
    rows = []
    for les in lesions:
        rows.append({
            "id": les.id,
            "voxels": les.voxels,
            "volume_mm3": round(les.volume_mm3, 4),
            "diameter_mm": round(les.diameter_mm, 4),
            "size_group": les.size_group,
            "confidence": None if les.confidence is None else round(les.confidence, 6),
            "centroid_lps_mm": [round(v, 4) for v in geometry.index_to_physical(les.centroid)],
            "centroid_zyx": [round(v, 3) for v in les.centroid],
            "bbox_zyx": list(les.bbox),
        })
    report = {
        "case": case.name,
        "image": str(case.image),
        "threshold": prediction.threshold,
        "connectivity": connectivity,
        "spacing_zyx_mm": list(geometry.spacing_zyx),
        "size_thresholds_mm": {"small": thresholds.small_mm, "large": thresholds.large_mm},
        "coordinates": "centroid_lps_mm: physical LPS millimetres (ITK); centroid_zyx and bbox_zyx "
                       "(exclusive ends): voxel indices in array order",
        "lesions": rows,
    }
    return report, len(rows)


def format_lesion_report(report: dict) -> str:
    """The lesion JSON file's text (also used by the server, which relabels its ``image``)."""
    return json.dumps(report, indent=2, allow_nan=False) + "\n"


# --------------------------------------------------------------------------- the command


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
                from ..remote import predict_on_server

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

    from ..checkpoint import load_checkpoint
    from ..inference import resolve_device, resolve_precision

    t0 = time.monotonic()
    if args.overlap is not None and not 0.0 <= args.overlap < 1.0:
        raise InputError(f"--overlap must be in [0, 1), got {args.overlap}")
    if args.threshold is not None and not 0.0 <= args.threshold < 1.0:
        raise InputError(f"--threshold must be in [0, 1), got {args.threshold}")
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    parse_shard(args.shard)  # a bad --shard is an error even for a single input (where it does nothing)
    cases = collect_cases(args)
    device = resolve_device(_device_name(args.device))
    precision = resolve_precision(args.precision, device)
    reporter.emit("start", version=__version__, cases=len(cases), device=str(device), precision=precision,
                  model=str(args.model))
    reporter.emit("load", case=None, message=f"checkpoint {args.model}")
    model, card = load_checkpoint(args.model, map_location="cpu")
    thresholds = _size_thresholds(args, card)

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


def _predict_case(case: Case, model, card: dict, args, device, precision, thresholds, reporter, state) -> None:
    from ..inference import predict_volume

    t0 = time.monotonic()
    reporter.emit("load", case=case.name, message=f"reading {case.image}")
    image, geometry = read_image(case.image, what="image")
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
            skip_background=not args.no_skip, engine=args.engine,
            progress=_Throttled(reporter.inference_callback(case.name)), cancel=state,
            on_warning=lambda message: reporter.emit("warning", case=case.name, message=message),
        )
    except InputError as exc:
        raise InputError(f"{case.image}: {exc}") from None
    del image, organ
    reporter.emit("postprocess", case=case.name)
    # the lesion count goes into the progress protocol, so lesions are analysed even without --lesions
    report, n_lesions = lesion_report(case, prediction, geometry, thresholds, args.connectivity)
    outputs = _write_outputs(case, prediction, geometry, report, args, reporter, state)
    reporter.emit("case_done", case=case.name, outputs=outputs, lesions=n_lesions,
                  windows=prediction.stats.windows_run, windows_total=prediction.stats.windows_total,
                  engine=prediction.stats.engine, seconds=round(time.monotonic() - t0, 2))


def _write_outputs(case: Case, prediction, geometry: Geometry, report: dict, args, reporter,
                   state: CancelState) -> dict[str, str]:
    """Write every output of a case to temporary names, then rename them all (signals deferred
    during the renames), so a case's outputs appear together or not at all."""
    outputs: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_output(case.mask))
        reporter.emit("write", case=case.name, path=str(case.mask))
        write_image(tmp, prediction.mask, geometry)
        outputs["mask"] = str(case.mask)
        if case.probabilities is not None:
            tmp = stack.enter_context(atomic_output(case.probabilities))
            reporter.emit("write", case=case.name, path=str(case.probabilities))
            probs = prediction.probabilities
            if args.probabilities_uint8:
                probs = np.rint(probs * np.float32(255.0)).astype(np.uint8)
            write_image(tmp, probs, geometry)
            outputs["probabilities"] = str(case.probabilities)
        if case.lesions is not None:
            tmp = stack.enter_context(atomic_output(case.lesions))
            reporter.emit("write", case=case.name, path=str(case.lesions))
            tmp.write_text(format_lesion_report(report))
            outputs["lesions"] = str(case.lesions)
        with state.deferred():
            stack.close()
    return outputs
