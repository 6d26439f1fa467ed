"""The cases of a prediction: collected from files, folders, DICOM series and datasets, with
where each case's outputs go, every path checked (label maps, shards, outputs) before any
inference runs."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..core.errors import InputError, IWSegError
from ..core.files import IMAGE_SUFFIXES, case_name, group_channels, list_images, preview_names
from ..core.imageio import Geometry, check_output_format, format_numbers, output_suffix
from ..core.label_maps import LABEL_MAP_MAX_VALUES, label_map_values  # noqa: F401  (the names predict used)
from ..core.organs import ORGAN_MASK_HOWTO, totalsegmentator_roi
from ..core.outputs import check_not_overwriting, check_output_path, check_writable, remove_stale_partials_of


@dataclass(frozen=True)
class OutputTargets:
    """Where a prediction's outputs go, by what the user gave: for one input, a file each; for
    a folder of cases, a folder each (``<case><suffix>``). None: that output is not written."""

    mask: Path
    probabilities: Path | None = None
    logits: Path | None = None
    lesions: Path | None = None
    dicom_seg: Path | None = None
    #: the DICOM SR measurement report (``--dicom-sr``; needs ``dicom_seg``)
    dicom_sr: Path | None = None


@dataclass
class PredictJob:
    """One input volume of a prediction and where its outputs go (a dataset case is ``data.Case``)."""

    name: str
    image: Path
    mask: Path
    probabilities: Path | None = None
    lesions: Path | None = None
    organ_mask: Path | None = None
    dicom_seg: Path | None = None
    #: Channels 1, 2, ... of a multi-channel image (``image`` is channel 0).
    more_channels: tuple[Path, ...] = ()
    logits: Path | None = None
    dicom_sr: Path | None = None

    @property
    def image_files(self) -> tuple[Path, ...]:
        return (self.image, *self.more_channels)

    @property
    def outputs(self) -> dict[str, Path | None]:
        """The case's mask, probability, logit and lesion-table paths by flag (None: not asked for)."""
        return {"--output": self.mask, "--probabilities": self.probabilities, "--logits": self.logits,
                "--lesions": self.lesions}

    def output_paths(self) -> list[Path]:
        """The paths of :attr:`outputs` that were asked for."""
        return [p for p in self.outputs.values() if p is not None]


def image_suffix(path: Path) -> str:
    """The image suffix of ``path`` (``.nii.gz``, ...), or "" for a name that is not an image file."""
    name = path.name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), "")


def is_dicom_folder(path: Path) -> bool:
    """True for a folder that holds a DICOM series."""
    import SimpleITK as sitk

    if not path.is_dir():
        return False
    with itk_warnings_off():
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))


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


#: Voxel spacing iwseg predict accepts, in mm: below it is a header in metres or a microscope, above
#: it not a scan (a 1e-6 mm spacing made the lung field's 15 mm margin a 30,000,001-voxel window).
SPACING_RANGE_MM = (0.01, 100.0)


def check_volume_grid(geometry: Geometry, path: Path) -> None:
    """Refuse a volume the 3D network cannot mean anything on, before it reaches it: a single
    slice (a 2D image stored as 3D), a single voxel, or a voxel spacing outside
    :data:`SPACING_RANGE_MM`; the message names the file and its shape or spacing."""
    flat = [axis for axis, n in zip("zyx", geometry.shape_zyx) if n < 2]
    if flat:
        raise InputError(f"image {path} has shape {geometry.shape_zyx} (z, y, x): one voxel along {', '.join(flat)}; "
                         "a 3D volume of at least 2 voxels along every axis is needed (a 2D image is refused)")
    low, high = SPACING_RANGE_MM
    if not all(low * (1 - 1e-6) <= s <= high * (1 + 1e-6) for s in geometry.spacing):  # NIfTI stores float32
        raise InputError(f"image {path} has voxel spacing {format_numbers(geometry.spacing, 8)} mm (x, y, z), outside "
                         f"[{low:g}, {high:g}] mm: is the header in metres or wrong? Fix the spacing first")


def organ_mask_plan(card: dict, given: bool, allow_unmasked: bool) -> tuple[str, str | None]:
    """How a run gets the organ mask the model needs (``nn.model_card.organ_mask_need``), and the
    one line that says so: ``("given", None)``, ``("none", None)`` (the model needs none),
    ``("automatic", note)`` (no ``--organ-mask``: the automatic mask of the organ, the CT
    lungs), ``("unmasked", warning)`` (``--allow-unmasked``). A model that needs a mask no one
    gave and that has no automatic one is refused (:class:`InputError`, exit 2), naming
    ``--organ-mask`` and how to get one."""
    from ..nn.model_card import organ_mask_need

    need = organ_mask_need(card)
    if given:
        return "given", None
    if not need.required:
        return "none", None
    organ = need.organ
    roi = totalsegmentator_roi(organ)
    if allow_unmasked:
        return "unmasked", (
            f"WARNING: --allow-unmasked: the model was trained on {organ}-masked input (model card organ_mask) and "
            f"sees the whole volume now; voxels outside the {organ} are not masked as in training, and the network "
            f"may fail inside the {organ} too (a ct-lung model scored CPM 0.025 instead of 0.605 this way)")
    if need.automatic:
        return "automatic", (f"no --organ-mask: using the automatic {organ} mask (preprocessing.automatic_organ_mask); "
                             f"pass --organ-mask to use your own")
    raise InputError(
        f"the model needs a {organ} mask (model card organ_mask: trained on {organ}-masked input) and no --organ-mask "
        f"was given: pass --organ-mask {(organ or 'organ').upper()}_MASK.nii.gz (non-zero inside the {organ}, on the "
        f"image's grid; with a folder of cases, a folder of masks named like the cases). "
        + ORGAN_MASK_HOWTO.format(roi=roi) + ". --allow-unmasked segments without one (not as trained)")


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
    if not src.is_dir() or list_images(src, what="input folder") or is_dicom_folder(src):
        return src
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


def check_output_file(flag: str, path: Path, *, image: bool) -> None:
    """Refuse an output file name (one input) that cannot be written: a folder, a non-image name
    for an image output, a parent that is a file, an existing FIFO or device."""
    if image and not image_suffix(path):
        raise InputError(f"{flag} {path}: use an image file name ending in {', '.join(IMAGE_SUFFIXES)}")
    if image:
        check_output_format(path, flag)
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; with a single input give a file name")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise InputError(f"{flag} {path}: {parent} is a file, not a folder")


def check_output_folder(flag: str, path: Path) -> None:
    """Refuse an output folder (a folder of cases as input) that is an existing file."""
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path}: with a folder of cases as --input this must be a folder, not a file")


def _refuse_existing(cases: list[PredictJob]) -> None:
    """Refuse to replace outputs that exist (as ``synth`` and ``train`` do); ``--overwrite`` allows it."""
    existing = [str(p) for c in cases for p in c.output_paths() if p.exists()]
    if existing:
        raise InputError(f"output(s) already exist: {preview_names(existing, 3)}; pass --overwrite to replace them, "
                         "or choose another output")


def _make_output_folders(cases: list[PredictJob]) -> None:
    """Create the folders the outputs go to (once every path has been checked)."""
    for folder in sorted({p.parent for c in cases for p in c.output_paths()}):
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
        if not path.is_file() or not image_suffix(path):
            raise InputError(f"--input {path}: several --input paths are the channels of one case and must each be "
                             f"an image file ({', '.join(IMAGE_SUFFIXES)})")
    if len({p.resolve() for p in inputs}) != len(inputs):
        raise InputError("--input names the same file twice; give each channel's own file")
    return inputs[0], tuple(inputs[1:])


def model_channels(checkpoint: Path) -> int | None:
    """The image channels the first model takes, read from its card's header (no weights), so a
    folder is read as that model's cases; None if the card cannot be read yet (loading the model
    then says why)."""
    from ..nn.checkpoint import read_metadata
    from ..nn.model_card import card_in_channels

    try:
        return card_in_channels(read_metadata(checkpoint))
    except IWSegError:
        return None


def check_case_channels(cases: list[PredictJob], card: dict) -> None:
    """Refuse, before any inference, cases whose channel count is not the model's."""
    from ..nn.model_card import check_in_channels

    for case in cases:
        files = ", ".join(p.name for p in case.image_files)
        check_in_channels(card, len(case.image_files), f"case {case.name} ({files})")


def collect_cases(src: Path, targets: OutputTargets, *, more_channels: Sequence[Path] = (),
                  model_channels: int | None = None, organ_mask: Path | None = None, shard: str | None = None,
                  models: Sequence[Path] = (), overwrite: bool = False) -> list[PredictJob]:
    """The cases to process (after ``shard``), with their output paths; checks every path first.

    ``src`` is an image file (whose other channels are ``more_channels``), a DICOM series folder
    or a folder of cases (read as cases of ``model_channels`` channels); ``organ_mask`` a file
    (one input) or a folder of masks named like the cases. Outputs that exist are refused unless
    ``overwrite``; none may be an input, an organ mask or one of ``models``.
    """
    more_channels = tuple(more_channels)
    if not src.exists():
        raise InputError(f"input not found: {src}")
    folder_mode = False
    inputs: dict[str, Path] = {}
    channels: dict[str, tuple[Path, ...]] = {}
    if src.is_dir():
        channels = group_channels(list_images(src, what="input folder"), where=src, channels=model_channels)
        inputs = {name: files[0] for name, files in channels.items()}
        if inputs:
            folder_mode = True
        elif is_dicom_folder(src):
            inputs = {src.name: src}
        else:
            subdirs = sorted(d for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
            inputs = {d.name: d for d in subdirs if is_dicom_folder(d)}
            if not inputs:
                raise InputError(
                    f"input folder {src} holds no images ({', '.join(IMAGE_SUFFIXES)}), "
                    "no DICOM series and no sub-folders with DICOM series"
                )
            folder_mode = True
    else:
        if not image_suffix(src):
            raise InputError(f"input {src}: not an image file ({', '.join(IMAGE_SUFFIXES)}) or DICOM folder")
        inputs = {case_name(src): src}

    if not folder_mode:
        name, path = next(iter(inputs.items()))
        check_output_file("--output", targets.mask, image=True)
        for flag, value in (("--probabilities", targets.probabilities), ("--logits", targets.logits)):
            if value is not None:
                check_output_file(flag, value, image=True)
        if targets.lesions is not None:
            check_output_file("--lesions", targets.lesions, image=False)
        if organ_mask is not None and not organ_mask.exists():
            raise InputError(f"--organ-mask not found: {organ_mask}")
        return _checked([PredictJob(name, path, targets.mask, targets.probabilities, targets.lesions, organ_mask,
                                     more_channels=more_channels, logits=targets.logits)], models, overwrite)

    check_output_folder("--output", targets.mask)
    folders = [targets.mask.resolve()]
    image_folders = [targets.mask.resolve()]  # images named like the inputs: never the input folder
    for flag, value in (("--probabilities", targets.probabilities), ("--logits", targets.logits),
                        ("--lesions", targets.lesions)):
        if value is not None:
            check_output_folder(flag, value)
            if value.resolve() in folders:
                raise InputError(f"{flag} must be a different folder from the other outputs (same case names)")
            folders.append(value.resolve())
            if flag != "--lesions":
                image_folders.append(value.resolve())
    if src.resolve() in image_folders:
        raise InputError(f"output folder {src} is the input folder; refusing to overwrite the input images")
    organs: dict[str, Path] = {}
    if organ_mask is not None:
        organs = list_images(organ_mask, what="--organ-mask folder")
    i, n = parse_shard(shard)
    cases = []
    for name in sorted(inputs)[i::n]:
        path = inputs[name]
        suffix = output_suffix(path)
        cases.append(PredictJob(
            name, path, targets.mask / f"{name}{suffix}",
            targets.probabilities / f"{name}{suffix}" if targets.probabilities is not None else None,
            targets.lesions / f"{name}.json" if targets.lesions is not None else None,
            organs.get(name), more_channels=channels.get(name, (path,))[1:],
            logits=targets.logits / f"{name}{suffix}" if targets.logits is not None else None,
        ))
    if organ_mask is not None:
        missing = [c.name for c in cases if c.organ_mask is None]
        if missing:
            raise InputError(f"--organ-mask folder {organ_mask} has no mask for case(s) {', '.join(missing)}")
    return _checked(cases, models, overwrite)


def _checked(cases: list[PredictJob], models: Sequence[Path], overwrite: bool) -> list[PredictJob]:
    """Refuse outputs that would overwrite an input (image, organ mask, checkpoint) or each other,
    existing outputs without ``--overwrite``, and output folders that cannot be made or written,
    before any inference runs."""
    for case in cases:
        check_not_overwriting(
            case.outputs, {"--input": case.image_files, "--organ-mask": case.organ_mask, "--model": list(models)},
        )
    if not overwrite:
        _refuse_existing(cases)
    _make_output_folders(cases)
    folders = {p.parent for c in cases[:1] for p in c.output_paths()}
    for folder in sorted(folders):
        check_writable(folder, "output")
    return cases


def prepare_outputs(cases: list[PredictJob]) -> None:
    """Before any inference: refuse an output that exists and is not a regular file (a FIFO, a
    device such as ``/dev/null``, a folder: the final rename would replace it), then remove the
    temporary files a killed earlier run left next to these outputs."""
    for case in cases:
        for flag, path in (*case.outputs.items(), ("--dicom-seg", case.dicom_seg), ("--dicom-sr", case.dicom_sr)):
            if path is not None:
                check_output_path(path, flag)
    remove_stale_partials_of([p for c in cases for p in (*c.output_paths(), c.dicom_seg, c.dicom_sr)])
