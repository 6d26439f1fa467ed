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
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import __version__
from ..errors import EXIT_FAILURE, Cancelled, InputError, IWSegError
from ..imageio import (
    IMAGE_SUFFIXES,
    Geometry,
    atomic_output,
    case_name,
    check_not_overwriting,
    check_output_format,
    check_writable,
    folder_lock,
    list_images,
    output_suffix,
    preview_names,
    probabilities_to_uint8,
    read_channels,
    read_image,
    write_image,
)
from ..lesions import (
    CONNECTIVITIES,
    SIZE_PRESETS,
    SizeThresholds,
    analyze_lesions,
    parse_min_lesion_size,
    remove_small_components,
    size_thresholds,
)
from ..progress import CancelState, ProgressReporter

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
    p.add_argument("--model", required=True, type=Path, nargs="+", metavar="CKPT",
                   help="checkpoint (.safetensors); several: an ensemble whose probabilities are averaged "
                        "(their preprocessing, window and threshold must agree)")
    p.add_argument("--input", required=True, type=Path, nargs="+", metavar="IMG|DIR",
                   help="image, DICOM folder or folder of cases; several image files: the channels of one case "
                        "(e.g. T1 FLAIR, in the model's channel order). In a folder, case_0000, case_0001, ... "
                        "files are the channels of case 'case' (MSD / nnU-Net naming)")
    p.add_argument("--output", required=True, type=Path, metavar="MASK|DIR", help="binary lesion mask (uint8) or folder")
    p.add_argument("--probabilities", type=Path, metavar="PROB|DIR", help="also write the probability map (or folder)")
    p.add_argument("--probabilities-uint8", action="store_true",
                   help="write probabilities as uint8 round(255 p) instead of float32 (4x smaller)")
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
                   help="test-time mirroring: average the probabilities of the 8 flips over the 3 axes (8x the time)")
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
    dicom_seg: Path | None = None
    #: Channels 1, 2, ... of a multi-channel image (``image`` is channel 0).
    more_channels: tuple[Path, ...] = ()

    @property
    def image_files(self) -> tuple[Path, ...]:
        return (self.image, *self.more_channels)


def _image_suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), "")


def _is_dicom_folder(path: Path) -> bool:
    import SimpleITK as sitk

    if not path.is_dir():
        return False
    with itk_warnings_off():
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))


#: An input whose voxels take at most this many distinct integer values looks like a label map
#: (a lesion or organ mask given as the image): a scan has hundreds of grey values or more.
LABEL_MAP_MAX_VALUES = 16
#: Voxels of the evenly strided sample checked first, so a real scan is cleared in milliseconds.
_LABEL_SAMPLE_VOXELS = 1 << 20


@contextlib.contextmanager
def itk_warnings_off() -> Iterator[None]:
    """Silence ITK's own warnings (printed by C++ straight to stderr, e.g. ``GDCMSeriesFileNames
    ... No Series were found`` when a folder is probed for DICOM) and restore the setting after."""
    import SimpleITK as sitk

    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(before)


def label_map_values(image: np.ndarray, max_values: int = LABEL_MAP_MAX_VALUES) -> np.ndarray | None:
    """The distinct values of ``image`` when there are at most ``max_values`` and all are integers
    (what a mask or label map looks like), else None. A strided sample of about a million voxels
    is looked at first; only an image that already looks like a label map there pays a full pass."""
    flat = image.reshape(-1)
    step = max(1, flat.size // _LABEL_SAMPLE_VOXELS)
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


def check_label_map(image: np.ndarray, path: Path, *, force: bool, warn) -> None:
    """Refuse (unless ``force``) an integer image of few non-negative values, which is a mask or
    label map given by mistake as the scan; warn about other few-valued images (a float image or
    one with negative values, e.g. a flat synthetic CT, may be a real if unusual input)."""
    values = label_map_values(image)
    if values is None:
        return
    shown = ", ".join(f"{v:g}" for v in values.tolist())
    what = f"{path} looks like a label map, not a scan: its voxels take only {values.size} integer value(s) ({shown})"
    if image.dtype.kind in "biu" and values.min() >= 0 and not force:
        raise InputError(f"{what}; give the scan as --input, or pass --force to segment it anyway")
    warn(f"{what}; segmenting it anyway")


def organ_mask_warning(card: dict, given: bool) -> str | None:
    """What to tell the user when the card's preprocessing applies an organ mask (``mask: liver``)
    and ``--organ-mask`` is missing: the network then sees voxels outside the organ, which it never
    saw in training, and may call them lesions (the whole-liver 'lesion' of a ct-liver model)."""
    organ = (card.get("preprocessing") or {}).get("mask")
    if organ is None or given:
        return None
    return (f"the model was trained with a {organ} mask (model card preprocessing 'mask: {organ}') and no "
            f"--organ-mask was given, so voxels outside the {organ} are not masked as in training and may be "
            f"segmented as lesions; pass --organ-mask {organ.upper()}_MASK.nii.gz (non-zero inside the {organ}, "
            "on the image's grid) or, with a folder of cases, --organ-mask FOLDER holding one mask named like each case")


def msd_images_folder(root: Path) -> Path | None:
    """The images of a Medical Segmentation Decathlon / nnU-Net dataset root: ``imagesTs/`` when it
    holds images (the test cases), else ``imagesTr/``; None when neither does."""
    for sub in ("imagesTs", "imagesTr"):
        folder = root / sub
        if folder.is_dir() and list_images(folder, what=f"{sub} folder"):
            return folder
    return None


def resolve_dataset_root(src: Path, note) -> Path:
    """``src``, or the image folder of ``src`` when it is an MSD dataset root (no images or DICOM
    series of its own, an ``imagesTs/`` or ``imagesTr/`` inside), saying which through ``note``."""
    if not src.is_dir() or list_images(src, what="input folder") or _is_dicom_folder(src):
        return src
    from ..data import group_channels

    folder = msd_images_folder(src)
    if folder is None:
        return src
    n = len(group_channels(list_images(folder), where=folder))
    extra = "" if folder.name == "imagesTs" else " (it has no imagesTs/ with images: these are training cases)"
    note(f"{src} is a dataset root: predicting the {n} case(s) in {folder.name}/{extra}")
    return folder


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
    if image:
        check_output_format(path, flag)
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; with a single input give a file name")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise InputError(f"{flag} {path}: {parent} is a file, not a folder")


def _check_output_folder(flag: str, path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path}: with a folder of cases as --input this must be a folder, not a file")


def _refuse_existing(cases: list[Case]) -> None:
    """Refuse to replace outputs that exist (as ``synth`` and ``train`` do); ``--overwrite`` allows it."""
    existing = [str(p) for c in cases for p in (c.mask, c.probabilities, c.lesions) if p is not None and p.exists()]
    if existing:
        raise InputError(f"output(s) already exist: {preview_names(existing, 3)}; pass --overwrite to replace them, "
                         "or choose another output")


def _make_output_folders(cases: list[Case]) -> None:
    """Create the folders the outputs go to (once every path has been checked)."""
    for folder in sorted({p.parent for c in cases for p in (c.mask, c.probabilities, c.lesions) if p is not None}):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"cannot create output folder {folder}: {exc.strerror or exc}") from None


def split_channel_inputs(inputs: list[Path]) -> tuple[Path, tuple[Path, ...]]:
    """``--input`` as (the input, the files of channels 1, 2, ...): one path is any input;
    several are the channel files of one case, each an existing image file."""
    if len(inputs) == 1:
        return inputs[0], ()
    for path in inputs:
        if not path.exists():
            raise InputError(f"input not found: {path}")
        if not path.is_file() or not _image_suffix(path):
            raise InputError(f"--input {path}: several --input paths are the channels of one case and must each be "
                             f"an image file ({', '.join(IMAGE_SUFFIXES)})")
    if len({p.resolve() for p in inputs}) != len(inputs):
        raise InputError("--input names the same file twice; give each channel's own file")
    return inputs[0], tuple(inputs[1:])


def model_channels(checkpoint: Path) -> int | None:
    """The image channels the first model takes, read from its card's header (no weights), so a
    folder is read as that model's cases; None if the card cannot be read yet (loading the model
    then says why)."""
    from ..checkpoint import read_metadata
    from ..model_card import card_in_channels

    try:
        return card_in_channels(read_metadata(checkpoint))
    except IWSegError:
        return None


def check_case_channels(cases: list[Case], card: dict) -> None:
    """Refuse, before any inference, cases whose channel count is not the model's."""
    from ..model_card import check_in_channels

    for case in cases:
        files = ", ".join(p.name for p in case.image_files)
        check_in_channels(card, len(case.image_files), f"case {case.name} ({files})")


def collect_cases(args: argparse.Namespace) -> list[Case]:
    """The cases to process (after ``--shard``), with their output paths; checks every path first."""
    from ..data import group_channels

    src: Path = args.input
    more_channels: tuple[Path, ...] = tuple(getattr(args, "more_channels", ()))
    if not src.exists():
        raise InputError(f"input not found: {src}")
    folder_mode = False
    inputs: dict[str, Path] = {}
    channels: dict[str, tuple[Path, ...]] = {}
    if src.is_dir():
        channels = group_channels(list_images(src, what="input folder"), where=src,
                                  channels=getattr(args, "model_channels", None))
        inputs = {name: files[0] for name, files in channels.items()}
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
        organ = args.organ_mask
        if organ is not None and not organ.exists():
            raise InputError(f"--organ-mask not found: {organ}")
        return _checked([Case(name, path, args.output, args.probabilities, args.lesions, organ,
                              more_channels=more_channels)], args)

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
        suffix = output_suffix(path)
        cases.append(Case(
            name, path, args.output / f"{name}{suffix}",
            args.probabilities / f"{name}{suffix}" if args.probabilities is not None else None,
            args.lesions / f"{name}.json" if args.lesions is not None else None,
            organs.get(name), more_channels=channels.get(name, (path,))[1:],
        ))
    if args.organ_mask is not None:
        missing = [c.name for c in cases if c.organ_mask is None]
        if missing:
            raise InputError(f"--organ-mask folder {args.organ_mask} has no mask for case(s) {', '.join(missing)}")
    return _checked(cases, args)


def _checked(cases: list[Case], args: argparse.Namespace) -> list[Case]:
    """Refuse outputs that would overwrite an input (image, organ mask, checkpoint) or each other,
    existing outputs without ``--overwrite``, and output folders that cannot be made or written,
    before any inference runs."""
    for case in cases:
        check_not_overwriting(
            {"--output": case.mask, "--probabilities": case.probabilities, "--lesions": case.lesions},
            {"--input": case.image_files, "--organ-mask": case.organ_mask, "--model": args.model},
        )
    if not getattr(args, "overwrite", False):
        _refuse_existing(cases)
    _make_output_folders(cases)
    folders = {p.parent for c in cases[:1] for p in (c.mask, c.probabilities, c.lesions) if p is not None}
    for folder in sorted(folders):
        check_writable(folder, "output")
    return cases


def _dicom_seg():
    from .. import dicom_seg

    return dicom_seg


def attach_dicom_seg(cases: list[Case], args: argparse.Namespace) -> None:
    """Set where each case's DICOM SEG goes (``--dicom-seg``): the given file for one series, else
    ``<folder>/<case>.dcm``. Every case must be a DICOM series (the SEG references its images), and
    the SEG must not land inside a source series folder (it would become a second series there)."""
    _dicom_seg().require_highdicom()  # before any inference
    not_dicom = [c.image for c in cases if not c.image.is_dir()]
    if not_dicom:
        raise InputError(f"--dicom-seg needs DICOM series as --input (a DICOM SEG references the source images); "
                         f"{not_dicom[0]} is an image file, not a DICOM series folder")
    single = len(cases) == 1 and cases[0].image == args.input
    if single:
        _check_output_file("--dicom-seg", args.dicom_seg, image=False)
        others = {p.resolve() for p in (cases[0].mask, cases[0].probabilities, cases[0].lesions) if p is not None}
        if args.dicom_seg.resolve() in others:
            raise InputError("--dicom-seg must be a different file from --output, --probabilities and --lesions")
        cases[0].dicom_seg = args.dicom_seg
    else:
        _check_output_folder("--dicom-seg", args.dicom_seg)
        for case in cases:
            case.dicom_seg = args.dicom_seg / f"{case.name}.dcm"
    series_folders = {c.image.resolve() for c in cases}
    for case in cases:
        if case.dicom_seg.resolve().parent in series_folders:
            raise InputError(f"--dicom-seg {case.dicom_seg} is inside a source DICOM series folder; write it "
                             "elsewhere (a second series there would make the folder unreadable as one series)")


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


def _min_lesion_size(flag: str | None, card: dict):
    """--min-lesion-size, else the card's optional ``min_lesion_size`` ({"value", "unit"} or null)."""
    try:
        if flag is not None:
            return None if flag.strip().lower() == "none" else parse_min_lesion_size(flag)
        return parse_min_lesion_size(card.get("min_lesion_size"))
    except InputError as exc:
        where = "--min-lesion-size" if flag is not None else "checkpoint metadata 'min_lesion_size'"
        raise InputError(f"{where}: {exc}") from None


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
        **({"channels": [str(p) for p in case.image_files]} if case.more_channels else {}),
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

    from ..inference import resolve_device, resolve_precision

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
    from ..checkpoint import load_checkpoint
    from ..inference import check_ensemble

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


def _predict_case(case: Case, model, card: dict, args, device, precision, thresholds, reporter, state) -> None:
    from ..inference import predict_volume

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
    _check_finite(prediction.probabilities, case, args.model)
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


def _write_outputs(case: Case, prediction, geometry: Geometry, report: dict, args, reporter,
                   state: CancelState, dicom_source=None) -> dict[str, str]:
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
                probs = probabilities_to_uint8(probs)
            write_image(tmp, probs, geometry)
            outputs["probabilities"] = str(case.probabilities)
        if case.lesions is not None:
            tmp = stack.enter_context(atomic_output(case.lesions))
            reporter.emit("write", case=case.name, path=str(case.lesions))
            tmp.write_text(format_lesion_report(report))
            outputs["lesions"] = str(case.lesions)
        if case.dicom_seg is not None and not report["lesions"]:
            reporter.emit("warning", case=case.name, message=f"no lesions found: no DICOM SEG written to {case.dicom_seg}"
                                                             " (a DICOM SEG needs at least one segment)")
        elif case.dicom_seg is not None:
            tmp = stack.enter_context(atomic_output(case.dicom_seg))
            reporter.emit("write", case=case.name, path=str(case.dicom_seg))
            # label_components numbers the components as the lesion JSON does: segment n = JSON lesion id n
            from ..lesions import label_components

            labels, _ = label_components(prediction.mask, args.connectivity)
            _dicom_seg().write_lesion_seg(tmp, labels, report["lesions"], dicom_source)
            outputs["dicom_seg"] = str(case.dicom_seg)
        with folder_lock(case.mask.parent), state.deferred():  # two writers of one set: the last wins whole
            stack.close()
    return outputs


def _check_finite(probabilities: np.ndarray, case: Case, model: Path) -> None:
    """NaN/inf probabilities threshold to "no lesion": refuse them instead of writing an empty mask."""
    bad = probabilities.size - int(np.count_nonzero(np.isfinite(probabilities)))
    if bad:
        raise InputError(
            f"{case.image}: the network gave NaN or infinite probabilities for {bad} voxel(s) with {model}; "
            "the image's values may be far out of range (or try --precision fp32)"
        )
