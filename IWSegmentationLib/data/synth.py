"""Synthetic multi-lesion CT/MR-like volumes: the project's embedded data.

The demo, the tests and the benchmarks need data anyone can regenerate, with what makes
lesion segmentation hard in the paper's datasets: **several lesions per case** (LiTS has
6.9 per scan, brain metastases 4.8), **sizes spanning an order of magnitude with many
small ones**, varying contrast and anisotropic voxels. :func:`generate_case` builds one case
in memory; :func:`write_dataset` writes a Medical Segmentation Decathlon layout folder that
:func:`IWSegmentationLib.data.load_dataset` reads back.

The model, in field-of-view (FOV) coordinates so that the anatomy scales with the grid:

* **Body**: CT — an elliptic cylinder along z (with a fat rim and a spine), its cross
  section chosen so that the body fills ``body_fraction`` of the FOV; MR — an ellipsoidal
  head (scalp, skull, CSF rim) of that volume fraction.
* **Organ** (returned as ``organ_mask``): ``ct-liver`` a deformed ellipsoid on the
  patient's right; ``ct-lung`` two lungs with a few vessels; ``mr`` the brain.
* **Texture and noise**: smooth random fields (low-resolution white noise interpolated
  with Gaussian weights, so each costs three small matrix products) and spatially
  correlated Gaussian noise (CT) or Rician noise with a bias field (MR).
* **Lesions**: ``Poisson(mean_lesions)`` per case, each a randomly rotated, mildly
  anisotropic ellipsoid with a smooth star-shaped boundary perturbation, physically round
  in mm (so flattened in voxels along the thick-slice axis), with a soft partial-volume
  edge. Sizes follow a truncated power law ``p(d) ∝ d^-size_exponent`` on the
  *equivalent diameter in voxels* ``d = (6 V / π)^(1/3)`` (V in voxels) between
  ``diameter_range`` — many small lesions, few large. Contrast is log-uniform between 1.5 and
  8 noise standard deviations, hypo- or hyperdense. Lesions lie entirely inside the organ and
  never touch each other (each is exactly one 26-connected component of the label).
  With ``primary_diameter`` (the LiTS regime of the paper's section 5: "large lesions could be
  up to 50 times bigger than the small ones"), the first lesion is a large one of about that
  diameter and the others are small satellites drawn from ``diameter_range``, so a patch that
  covers most of the organ holds several lesions whose volumes differ 10-100 fold.

Everything comes from one ``numpy.random.Generator`` seeded by ``seed``, so the same seed
gives byte-identical arrays (images are stored as int16, like scanners do). Each lesion only
touches its bounding box; a 64×128×128 case takes on the order of 0.1 s.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .. import __version__
from ..core.errors import InputError
from ..core.imageio import Geometry, write_image
from ..core.lesions import check_spacing
from ..core.memory import physical_memory
from ..core.outputs import atomic_output
from .synth_anatomy import ANATOMY, SynthLesion, correlated_noise, norm_coords, place_lesions

PRESETS = ("ct-liver", "ct-lung", "mr")


#: Default voxel spacing (sz, sy, sx) in mm per preset: thick-slice abdominal CT, thinner
#: chest CT, near-isotropic MR.
DEFAULT_SPACING: dict[str, tuple[float, float, float]] = {
    "ct-liver": (2.0, 0.8, 0.8),
    "ct-lung": (1.25, 0.7, 0.7),
    "mr": (1.5, 1.0, 1.0),
}


#: Default fraction of the FOV occupied by the body (CT) or the head (MR).
DEFAULT_BODY_FRACTION: dict[str, float] = {"ct-liver": 0.4, "ct-lung": 0.4, "mr": 0.3}


DEFAULT_SHAPE = (64, 128, 128)


MIN_SIDE = 16


#: Peak memory of generating one case, per voxel: 33-34 bytes measured with tracemalloc for
#: every preset at 64x128x128 (float32 fields and masks), rounded up.
BYTES_PER_VOXEL = 40


#: The label values a written dataset uses.
LABELS = {"0": "background", "1": "lesion"}


@dataclass
class SynthCase:
    """A generated case: int16 ``image``, uint8 binary ``label`` and ``organ_mask``, ``spacing``
    (sz, sy, sx) in mm, and the list of lesions in label order of placement."""

    image: np.ndarray
    label: np.ndarray
    organ_mask: np.ndarray
    spacing: tuple[float, float, float]
    preset: str
    lesions: list[SynthLesion] = field(default_factory=list)


def _check_preset(preset: str) -> str:
    if preset not in PRESETS:
        raise InputError(f"unknown synthetic preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return preset


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        out = tuple(int(v) for v in shape)
    except (TypeError, ValueError):
        raise InputError(f"size must be three integers D H W, got {shape!r}") from None
    if len(out) != 3 or min(out) < MIN_SIDE or any(int(v) != v for v in shape):
        raise InputError(f"size must be three integers D H W, each >= {MIN_SIDE}, got {tuple(shape)}")
    return out  # type: ignore[return-value]


def check_memory(shape: Sequence[int], available: int | None = None) -> None:
    """Refuse a volume size whose generation needs more memory than the machine has
    (:data:`BYTES_PER_VOXEL` per voxel), before anything is allocated or written."""
    available = physical_memory() if available is None else available
    need = math.prod(int(v) for v in shape) * BYTES_PER_VOXEL
    if available and need > available:
        raise InputError(
            f"size {' x '.join(str(int(v)) for v in shape)} needs about {need / 2**30:.3g} GiB of memory to generate, "
            f"more than this machine's {available / 2**30:.3g} GiB; choose a smaller --size"
        )


def _check_body_fraction(fraction: float, preset: str) -> float:
    upper = 0.7 if preset.startswith("ct") else 0.45
    if not (isinstance(fraction, (int, float)) and 0.1 <= float(fraction) <= upper):
        raise InputError(f"body_fraction for preset {preset} must be in [0.1, {upper}], got {fraction!r}")
    return float(fraction)


def _check_diameters(diameter_range: Sequence[float], size_exponent: float) -> tuple[float, float]:
    lo, hi = (float(v) for v in diameter_range)
    if not (1.0 <= lo < hi):
        raise InputError(f"diameter_range must satisfy 1 <= min < max (voxels), got {tuple(diameter_range)}")
    if not (0.0 <= size_exponent <= 4.0):
        raise InputError(f"size_exponent must be in [0, 4], got {size_exponent}")
    return lo, hi


def synth_case(
    seed: int | Sequence[int],
    shape: Sequence[int] = DEFAULT_SHAPE,
    preset: str = "ct-liver",
    *,
    spacing: Sequence[float] | None = None,
    body_fraction: float | None = None,
    mean_lesions: float = 5.5,
    diameter_range: Sequence[float] = (2.0, 40.0),
    size_exponent: float = 1.5,
    primary_diameter: float | None = None,
) -> SynthCase:
    """Generate one case with its lesion list; see the module docstring for the model.

    ``seed`` is anything ``numpy.random.default_rng`` takes (an int or a sequence of ints,
    e.g. ``(dataset_seed, case_index)``). ``shape`` is (D, H, W); ``spacing`` (sz, sy, sx) in
    mm defaults to :data:`DEFAULT_SPACING`; ``body_fraction`` (share of the FOV inside the
    body/head) to :data:`DEFAULT_BODY_FRACTION`. ``mean_lesions`` is the Poisson mean of the
    lesion count; diameters (voxels, equivalent) follow ``p(d) ∝ d^-size_exponent`` on
    ``diameter_range``, truncated to what the organ can hold. ``primary_diameter`` (voxels,
    equivalent) adds one large lesion of that diameter ± 15% (placed first; shrunk if the organ
    cannot hold it) to the ``Poisson(mean_lesions)`` small ones.
    """
    preset = _check_preset(preset)
    shape = _check_shape(shape)
    spacing = check_spacing(DEFAULT_SPACING[preset] if spacing is None else spacing)
    body_fraction = _check_body_fraction(
        DEFAULT_BODY_FRACTION[preset] if body_fraction is None else body_fraction, preset
    )
    lo, hi = _check_diameters(diameter_range, size_exponent)
    if not (0.0 <= float(mean_lesions) <= 50.0):
        raise InputError(f"mean_lesions must be in [0, 50], got {mean_lesions}")
    if primary_diameter is not None and not (hi < float(primary_diameter) <= 200.0):
        raise InputError(f"primary_diameter must be larger than the diameter_range maximum {hi:g} and at most "
                         f"200 voxels, got {primary_diameter}")
    try:
        rng = np.random.default_rng(seed)
    except (TypeError, ValueError):
        raise InputError(f"seed must be a non-negative integer or a sequence of them, got {seed!r}") from None

    anatomy = ANATOMY[preset](rng, shape, spacing, body_fraction)
    n = int(rng.poisson(mean_lesions))
    primary = None if primary_diameter is None else float(primary_diameter) * float(rng.uniform(0.85, 1.15))
    label, lesions = place_lesions(rng, anatomy, spacing, shape, n, lo, hi, size_exponent, primary=primary)
    image = anatomy.image
    if preset == "mr":
        z, y, x = norm_coords(shape)
        coef = rng.uniform(-0.12, 0.12, 4).astype(np.float32)
        bias = 1.0 + coef[0] * z + coef[1] * y + coef[2] * x + coef[3] * y * x
        signal = image * bias
        sd = np.float32(anatomy.noise_sd)
        real = signal + sd * rng.standard_normal(shape, dtype=np.float32)
        imag = sd * rng.standard_normal(shape, dtype=np.float32)
        image = np.sqrt(real * real + imag * imag)  # Rician magnitude noise
        image = np.clip(np.rint(image), 0, 32767)
    else:
        image += np.float32(anatomy.noise_sd) * correlated_noise(rng, shape)
        image = np.clip(np.rint(image), -1024, 3071)
    organ_mask = (anatomy.organ | (label > 0)).astype(np.uint8)
    return SynthCase(image.astype(np.int16), label, organ_mask, spacing, preset, lesions)


#: Noise standard deviation of the second sequence (a.u.) and its lesion contrast in those units.
SECOND_SEQUENCE_NOISE_SD = 10.0


SECOND_SEQUENCE_LESION_CONTRAST = 5.0


def second_sequence(case: SynthCase, seed: int | Sequence[int]) -> np.ndarray:
    """A second "sequence" of ``case`` (FLAIR-like), int16 on the same grid, for multi-channel data.

    The anatomy is the first image blurred (sigma 1 voxel) and rescaled to about 0-200 a.u.; every
    lesion is added *hyperintense* at :data:`SECOND_SEQUENCE_LESION_CONTRAST` noise SDs with a
    soft edge (the label blurred, sigma 0.7 voxel), then Gaussian noise of
    :data:`SECOND_SEQUENCE_NOISE_SD`. So the second channel carries a lesion contrast that the
    first lacks for its faint (1.5 SD) and hypo-intense lesions, as FLAIR does beside T1.
    Drawn from its own generator (``seed``), so channel 0 is the same as a one-channel dataset's.
    """
    from scipy import ndimage  # lazy: `iwseg` starts without scipy

    rng = np.random.default_rng(seed)
    base = ndimage.gaussian_filter(case.image.astype(np.float32), 1.0)
    lo, hi = (float(v) for v in np.percentile(base, [1.0, 99.0]))
    image = (base - np.float32(lo)) * np.float32(200.0 / max(hi - lo, 1.0))
    sd = np.float32(SECOND_SEQUENCE_NOISE_SD)
    lesion = ndimage.gaussian_filter(case.label.astype(np.float32), 0.7)
    image += np.float32(SECOND_SEQUENCE_LESION_CONTRAST) * sd * lesion
    image += sd * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(np.rint(image), 0, 32767).astype(np.int16)


def generate_case(
    seed: int | Sequence[int],
    shape: Sequence[int] = DEFAULT_SHAPE,
    preset: str = "ct-liver",
    **options,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float, float]]:
    """In-memory synthetic case: ``(image int16, label uint8 {0,1}, organ_mask uint8 {0,1},
    spacing (sz, sy, sx))``. Options as :func:`synth_case` (``spacing``, ``body_fraction``,
    ``mean_lesions``, ``diameter_range``, ``size_exponent``).

    A CT-like 256×256×128 volume whose body fills about 40% of the FOV, as the inference
    benchmark uses: ``generate_case(0, (128, 256, 256), "ct-liver", body_fraction=0.4)``.
    """
    case = synth_case(seed, shape, preset, **options)
    return case.image, case.label, case.organ_mask, case.spacing


def case_id(index: int) -> str:
    return f"synth_{index:03d}"


def _remove_stale_cases(folders, keep: set[str], written: set[str] | None = None) -> None:
    """After ``--force`` over a larger earlier dataset, drop its ``synth_NNN`` files that the
    new ``dataset.json`` does not list (only files of that exact generated name pattern, with an
    optional channel suffix ``_0000``); with ``written`` (the file names just written), also
    those of a kept case in the other naming (one- vs multi-channel)."""
    pattern = re.compile(r"^(synth_\d{3,})(_\d{4})?\.nii\.gz$")
    for folder in folders:
        for file in folder.iterdir():
            m = pattern.match(file.name)
            if m and (m.group(1) not in keep or (written is not None and file.name not in written)):
                file.unlink()


def write_dataset(
    out: str | os.PathLike,
    cases: int,
    seed: int = 0,
    preset: str = "ct-liver",
    *,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] | None = None,
    body_fraction: float | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    channels: int = 1,
    **options,
) -> dict:
    """Write ``cases`` synthetic cases as a Medical Segmentation Decathlon dataset in ``out``.

    Layout: ``dataset.json``, ``imagesTr/synth_000.nii.gz`` (int16), ``labelsTr/`` (uint8,
    1 = lesion), ``masksTr/`` (uint8 organ mask, lesions included) and ``lesions.csv`` (one
    row per lesion). Case ``i`` is generated from the seed ``(seed, i)``, so a dataset of 10
    cases is the first 10 cases of one of 50. Every file is written atomically. ``out`` must
    be empty or absent unless ``overwrite``. Returns the summary stored in ``dataset.json``.

    ``channels=2`` writes two sequences per case in the MSD / nnU-Net naming,
    ``imagesTr/synth_000_0000.nii.gz`` (the image above) and ``synth_000_0001.nii.gz``
    (:func:`second_sequence`, where every lesion is hyperintense).
    """
    preset = _check_preset(preset)
    shape = _check_shape(shape)
    check_memory(shape)
    spacing = check_spacing(DEFAULT_SPACING[preset] if spacing is None else spacing)
    if not isinstance(cases, int) or isinstance(cases, bool) or cases < 1:
        raise InputError(f"number of cases must be a positive integer, got {cases!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    if channels not in (1, 2):
        raise InputError(f"channels must be 1 or 2 (the image and a second sequence), got {channels!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"output folder {out} is not empty; choose another folder or pass --force to overwrite")
    if out.parent.exists() and not out.parent.is_dir():
        raise InputError(f"output {out}: {out.parent} is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)  # as before the staging folder: --out a/b/c makes a/b
    # everything is written into a staging folder next to ``out`` and moved in only when complete:
    # a full disk or a cancel leaves no partial dataset (the staging folder is removed)
    staging = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    staging.mkdir()  # with the umask's mode, which the dataset folder keeps
    try:
        summary = _write_cases(staging, cases, seed, preset, shape, spacing, body_fraction, progress, channels, options)
        _move_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _move_in(staging: Path, out: Path) -> None:
    """Put the complete dataset in ``staging`` at ``out``: a rename of the folder when ``out`` is
    absent or empty; else (``--force``) a rename of each file, then the old cases the new
    ``dataset.json`` does not list are removed (other files in ``out`` are kept)."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(staging, out)
        return
    for folder in ("imagesTr", "labelsTr", "masksTr"):
        (out / folder).mkdir(exist_ok=True)
        for file in (staging / folder).iterdir():
            os.replace(file, out / folder / file.name)
    for name in ("lesions.csv", "dataset.json"):  # dataset.json last: it says the dataset is there
        os.replace(staging / name, out / name)
    summary = json.loads((out / "dataset.json").read_text())["iwseg"]
    cids = {case_id(i) for i in range(len(summary["lesions_per_case"]))}
    channels = summary["channels"]
    written = {f"{c}.nii.gz" for c in cids} if channels == 1 else {f"{c}_{k:04d}.nii.gz" for c in cids for k in range(2)}
    _remove_stale_cases([out / "imagesTr"], cids, written)
    _remove_stale_cases([out / "labelsTr", out / "masksTr"], cids, {f"{c}.nii.gz" for c in cids})


def _write_cases(out: Path, cases: int, seed: int, preset: str, shape, spacing, body_fraction, progress, channels: int,
                 options: dict) -> dict:
    """Write the dataset into the empty folder ``out`` (the staging folder of :func:`write_dataset`)."""
    dirs = {name: out / name for name in ("imagesTr", "labelsTr", "masksTr")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)

    geometry = Geometry.identity(shape, spacing)
    training, rows, counts, written = [], [], [], set()
    for i in range(cases):
        cid = case_id(i)
        case = synth_case((seed, i), shape, preset, spacing=spacing, body_fraction=body_fraction, **options)
        name = f"{cid}.nii.gz"
        images = [case.image] if channels == 1 else [case.image, second_sequence(case, (seed, i, 1))]
        for c, image in enumerate(images):
            image_name = name if channels == 1 else f"{cid}_{c:04d}.nii.gz"
            write_image(dirs["imagesTr"] / image_name, image, geometry)
            written.add(image_name)
        write_image(dirs["labelsTr"] / name, case.label, geometry)
        write_image(dirs["masksTr"] / name, case.organ_mask, geometry)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}", "mask": f"./masksTr/{name}"})
        counts.append(len(case.lesions))
        for j, les in enumerate(case.lesions, start=1):
            rows.append([cid, j, les.voxels, round(les.diameter_vox, 3), les.contrast, les.kind,
                         *les.centre])
        if progress is not None:
            progress(i + 1, cases, cid)

    with atomic_output(out / "lesions.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case", "lesion", "voxels", "diameter_vox", "contrast", "kind", "z", "y", "x"])
        writer.writerows(rows)
    summary = {
        "generator": "IWSegmentationLib.synth",
        "version": __version__,
        "seed": seed,
        "preset": preset,
        "size": list(shape),
        "spacing": list(spacing),
        "body_fraction": body_fraction if body_fraction is not None else DEFAULT_BODY_FRACTION[preset],
        "options": {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in options.items()},
        "lesions_per_case": counts,
        "lesions_total": int(sum(counts)),
        "channels": channels,
    }
    dataset = {
        "name": f"IWSegSynthetic-{preset}",
        "description": "Synthetic multi-lesion volumes generated by `iwseg synth` (IWSegmentation)",
        "reference": "IWSegmentationLib.synth",
        "licence": "CC0-1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "MR" if preset == "mr" else "CT", **({"1": "synthetic FLAIR-like"} if channels == 2 else {})},
        "labels": dict(LABELS),
        "numTraining": cases,
        "numTest": 0,
        "training": training,
        "test": [],
        "iwseg": summary,
    }
    with atomic_output(out / "dataset.json") as tmp:
        tmp.write_text(json.dumps(dataset, indent=2) + "\n")
    return summary
