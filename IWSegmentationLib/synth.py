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

Everything comes from one ``numpy.random.Generator`` seeded by ``seed``, so the same seed
gives byte-identical arrays (images are stored as int16, like scanners do). Each lesion only
touches its bounding box; a 64×128×128 case takes on the order of 0.1 s.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import InputError

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


@dataclass(frozen=True)
class SynthLesion:
    """One generated lesion. ``centre`` is a voxel index (z, y, x); ``voxels`` is its size in
    the label; ``diameter_vox`` the equivalent diameter ``(6 V / π)^(1/3)`` of that size;
    ``contrast`` the intensity difference to the organ (HU for CT, a.u. for MR)."""

    centre: tuple[float, float, float]
    voxels: int
    diameter_vox: float
    contrast: float
    kind: str


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


# ----------------------------------------------------------------------------- validation


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


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(shape: Sequence[int], available: int | None = None) -> None:
    """Refuse a volume size whose generation needs more memory than the machine has
    (:data:`BYTES_PER_VOXEL` per voxel), before anything is allocated or written."""
    available = _physical_memory() if available is None else available
    need = math.prod(int(v) for v in shape) * BYTES_PER_VOXEL
    if available and need > available:
        raise InputError(
            f"size {' x '.join(str(int(v)) for v in shape)} needs about {need / 2**30:.3g} GiB of memory to generate, "
            f"more than this machine's {available / 2**30:.3g} GiB; choose a smaller --size"
        )


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    try:
        sp = tuple(float(v) for v in spacing)
    except (TypeError, ValueError):
        raise InputError(f"spacing must be three positive numbers sz sy sx (mm), got {spacing!r}") from None
    if len(sp) != 3 or not all(math.isfinite(v) and v > 0 for v in sp):
        raise InputError(f"spacing must be three positive numbers sz sy sx (mm), got {tuple(spacing)}")
    return sp  # type: ignore[return-value]


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


# ----------------------------------------------------------------------------- fields


def _interp_matrix(n_out: int, n_in: int, sigma: float) -> np.ndarray:
    """Rows of Gaussian interpolation weights mapping ``n_in`` coarse samples to ``n_out``."""
    pos = (np.arange(n_out) + 0.5) / n_out * n_in - 0.5
    m = np.exp(-((pos[:, None] - np.arange(n_in)[None, :]) ** 2) / (2.0 * sigma * sigma))
    return (m / m.sum(axis=1, keepdims=True)).astype(np.float32)


def smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], cells: Sequence[int]) -> np.ndarray:
    """A smooth random field of unit standard deviation with about ``cells`` blobs per axis.

    White noise on a ``cells`` grid, interpolated to ``shape`` with Gaussian weights: three
    small matrix products instead of a large Gaussian filter (same look, ~10× faster).
    """
    coarse = rng.standard_normal(tuple(int(c) for c in cells), dtype=np.float32)
    mz, my, mx = (_interp_matrix(n, c, 0.8) for n, c in zip(shape, coarse.shape))
    f = coarse @ mx.T  # (cz, cy, W)
    f = np.matmul(my, f)  # (cz, H, W)
    f = (mz @ f.reshape(coarse.shape[0], -1)).reshape(shape)
    std = float(f.std())
    return f / std if std > 0 else f


def correlated_noise(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Unit-variance Gaussian noise blurred in-plane by [1, 2, 1]/4, like reconstructed CT noise."""
    from scipy import ndimage

    white = rng.standard_normal(shape, dtype=np.float32)
    kernel = np.array([0.25, 0.5, 0.25], np.float32)
    out = ndimage.correlate1d(white, kernel, axis=1, mode="reflect")
    out = ndimage.correlate1d(out, kernel, axis=2, mode="reflect")
    # each pass keeps variance sum(k^2) = 0.375; two passes leave std 0.375
    return out * np.float32(1.0 / 0.375)


def _soft(inside_depth: np.ndarray) -> np.ndarray:
    """Partial-volume fraction from a signed depth in voxels (positive inside)."""
    return np.clip(inside_depth + 0.5, 0.0, 1.0, dtype=np.float32)


def _norm_coords(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Broadcastable FOV coordinates in [-1, 1] along z, y, x (voxel centres)."""
    out = []
    for axis, n in enumerate(shape):
        c = ((np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0).astype(np.float32)
        sh = [1, 1, 1]
        sh[axis] = n
        out.append(c.reshape(sh))
    return out[0], out[1], out[2]


def _ellipsoid_depth(coords, centre, semi, shape, wobble=None) -> np.ndarray:
    """Approximate depth in voxels inside a (wobbly) ellipsoid given in FOV units.

    ``depth = (1 - r) * R`` with ``r`` the normalised radius and ``R`` the smallest semi-axis
    in voxels; ``wobble`` (a field, same shape) deforms the surface by a few percent.
    """
    z, y, x = coords
    r2 = ((z - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + ((x - centre[2]) / semi[2]) ** 2
    r = np.sqrt(r2, dtype=np.float32)
    if wobble is not None:
        r = r * (1.0 + wobble)
    scale = min(s * n / 2.0 for s, n in zip(semi, shape))
    return (1.0 - r) * np.float32(scale)


# ----------------------------------------------------------------------------- anatomy


@dataclass
class _Anatomy:
    image: np.ndarray  # float32, noise-free
    organ: np.ndarray  # bool
    organ_value: float
    noise_sd: float
    hypo_prob: float
    lesion_abs: Callable[[np.random.Generator], tuple[float, str]] | None = None


def _body_ct(rng, shape, coords, body_fraction, wob):
    """Elliptic-cylinder body with a fat rim and a spine; returns (image, body_depth, semi-axes)."""
    _, y, x = coords
    ratio = 0.72  # AP / lateral
    ax = min(0.95, math.sqrt(4.0 * body_fraction / (math.pi * ratio)))
    ay = min(0.95, 4.0 * body_fraction / (math.pi * ax))
    cy = float(rng.uniform(-0.03, 0.03))
    z = coords[0]
    phase, turns = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 1.0)
    zscale = 1.0 + 0.04 * np.sin(np.pi * turns * z + phase)  # slow change of the cross-section along z
    zscale = zscale / np.sqrt(np.mean(zscale**2))  # keeps the mean cross-section area
    r = np.sqrt(((y - cy) / ay) ** 2 + (x / ax) ** 2, dtype=np.float32) / zscale
    r = r * (1.0 + 0.02 * wob)
    semi_vox = min(ay * shape[1], ax * shape[2]) / 2.0
    depth = (1.0 - r) * np.float32(semi_vox)
    body = _soft(depth)
    fat_depth = 0.08 * semi_vox
    muscle = _soft(depth - fat_depth)
    image = np.float32(-1000.0) + body * np.float32(1000.0 - 100.0) + muscle * np.float32(145.0)  # fat -100, muscle 45
    # spine: a disc posterior of the centre, brighter every few slices (vertebrae vs discs)
    sy, sx = cy + 0.62 * ay, 0.0
    rs = 0.11 * ax
    spine = _soft((1.0 - np.sqrt(((y - sy) / rs) ** 2 + ((x - sx) / rs) ** 2)) * rs * shape[2] / 2.0)
    zc = np.arange(shape[0], dtype=np.float32).reshape(-1, 1, 1)
    bone = np.where(np.cos(2 * np.pi * zc / max(6.0, shape[0] / 6.0)) > -0.6, 650.0, 250.0).astype(np.float32)
    image += spine * (bone - 45.0)
    return image, depth, (ay, ax, cy)


def _anatomy_ct_liver(rng, shape, spacing, body_fraction) -> _Anatomy:
    coords = _norm_coords(shape)
    cells = [max(3, n // 10) for n in shape]
    wob = smooth_field(rng, shape, [max(2, n // 32) for n in shape]).astype(np.float32)
    image, body_depth, (ay, ax, cy) = _body_ct(rng, shape, coords, body_fraction, wob)
    liver_value = float(rng.uniform(60.0, 110.0))
    centre = (float(rng.uniform(-0.08, 0.08)), cy - 0.1 * ay, -0.33 * ax)
    semi = (0.75, 0.7 * ay, 0.56 * ax)
    depth = _ellipsoid_depth(coords, centre, semi, shape, wobble=0.06 * wob)
    depth = np.minimum(depth, body_depth - 2.0)
    organ_w = _soft(depth)
    image += organ_w * np.float32(liver_value - 45.0)
    texture = smooth_field(rng, shape, cells)
    image += _soft(body_depth) * texture * np.float32(6.0)
    return _Anatomy(image, depth >= 0.0, liver_value, float(rng.uniform(12.0, 18.0)), hypo_prob=0.65)


def _anatomy_ct_lung(rng, shape, spacing, body_fraction) -> _Anatomy:
    coords = _norm_coords(shape)
    wob = smooth_field(rng, shape, [max(2, n // 32) for n in shape]).astype(np.float32)
    image, body_depth, (ay, ax, cy) = _body_ct(rng, shape, coords, body_fraction, wob)
    lung_value = -850.0
    depth = None
    for side in (-1.0, 1.0):
        centre = (float(rng.uniform(-0.05, 0.05)), cy - 0.08 * ay, side * 0.44 * ax)
        semi = (0.82, 0.7 * ay, 0.36 * ax)
        d = _ellipsoid_depth(coords, centre, semi, shape, wobble=0.05 * wob)
        depth = d if depth is None else np.maximum(depth, d)
    depth = np.minimum(depth, body_depth - 3.0)
    organ = depth >= 0.0
    image += _soft(depth) * np.float32(lung_value - 45.0)
    texture = smooth_field(rng, shape, [max(3, n // 8) for n in shape])
    image += _soft(depth) * texture * np.float32(25.0)
    _add_vessels(rng, image, organ, spacing)

    def nodule(r):
        if r.random() < 0.2:  # ground-glass / part-solid: lower contrast
            return float(r.uniform(-650.0, -350.0)) - lung_value, "ground-glass"
        return float(r.uniform(-60.0, 60.0)) - lung_value, "solid"

    return _Anatomy(image, organ, lung_value, float(rng.uniform(15.0, 25.0)), hypo_prob=0.0, lesion_abs=nodule)


def _add_vessels(rng, image, organ, spacing, n_per_lung: int = 8):
    """Bright tube segments inside the lungs: the distractors a nodule detector must ignore."""
    idx = np.flatnonzero(organ)
    if idx.size == 0:
        return
    sp = np.asarray(spacing, dtype=np.float32)
    shape = np.asarray(organ.shape)
    for _ in range(2 * n_per_lung):
        p0 = np.asarray(np.unravel_index(idx[rng.integers(idx.size)], organ.shape), dtype=np.float32)
        direction = rng.standard_normal(3).astype(np.float32)
        direction /= np.linalg.norm(direction)
        length_mm = float(rng.uniform(10.0, 30.0))
        p1 = p0 + direction * length_mm / sp
        radius_mm = float(rng.uniform(0.6, 1.6))
        lo = np.maximum(np.floor(np.minimum(p0, p1) - radius_mm / sp - 1).astype(int), 0)
        hi = np.minimum(np.ceil(np.maximum(p0, p1) + radius_mm / sp + 2).astype(int), shape)
        if np.any(hi <= lo):
            continue
        zz, yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        rel = [(zz - p0[0]) * sp[0], (yy - p0[1]) * sp[1], (xx - p0[2]) * sp[2]]
        seg = (p1 - p0) * sp
        seg_len2 = float(seg @ seg) or 1.0
        t = np.clip((rel[0] * seg[0] + rel[1] * seg[1] + rel[2] * seg[2]) / seg_len2, 0.0, 1.0)
        d2 = (rel[0] - t * seg[0]) ** 2 + (rel[1] - t * seg[1]) ** 2 + (rel[2] - t * seg[2]) ** 2
        w = np.clip((radius_mm - np.sqrt(d2)) / float(sp.min()) + 0.5, 0.0, 1.0).astype(np.float32)
        box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        inside = organ[box]
        image[box] += w * inside * np.float32(880.0)


def _anatomy_mr(rng, shape, spacing, body_fraction) -> _Anatomy:
    coords = _norm_coords(shape)
    wob = smooth_field(rng, shape, [max(2, n // 32) for n in shape]).astype(np.float32)
    aspect = np.array([0.85, 1.0, 0.8])
    scale = (6.0 * body_fraction / (math.pi * aspect.prod())) ** (1.0 / 3.0)
    semi = tuple(float(min(0.96, a * scale)) for a in aspect)
    head = _ellipsoid_depth(coords, (0.0, 0.0, 0.0), semi, shape, wobble=0.02 * wob)
    rim = 0.06 * min(s * n / 2.0 for s, n in zip(semi, shape))  # scalp, skull, CSF thickness
    image = _soft(head) * np.float32(330.0)  # scalp/fat: bright on T1
    image += _soft(head - rim) * np.float32(40.0 - 330.0)  # skull: dark
    image += _soft(head - 2 * rim) * np.float32(90.0 - 40.0)  # CSF
    brain_depth = head - 2.6 * rim
    brain = _soft(brain_depth)
    gm_wm = smooth_field(rng, shape, [max(3, n // 5) for n in shape])
    brain_value = 250.0
    image += brain * (np.float32(brain_value - 90.0) + np.float32(10.0) * np.tanh(2.0 * gm_wm))
    return _Anatomy(image, brain_depth >= 0.0, brain_value, float(rng.uniform(8.0, 14.0)), hypo_prob=0.25)


_ANATOMY = {"ct-liver": _anatomy_ct_liver, "ct-lung": _anatomy_ct_lung, "mr": _anatomy_mr}


# ----------------------------------------------------------------------------- lesions


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.standard_normal(4)
    q /= np.linalg.norm(q)
    a, b, c, d = q
    return np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d],
        ],
        dtype=np.float32,
    )


def sample_diameters(rng: np.random.Generator, n: int, lo: float, hi: float, exponent: float) -> np.ndarray:
    """``n`` diameters from the truncated power law ``p(d) ∝ d^-exponent`` on ``[lo, hi]``
    (inverse-CDF sampling; ``exponent = 1`` is log-uniform)."""
    u = rng.random(n)
    if abs(exponent - 1.0) < 1e-9:
        return lo * (hi / lo) ** u
    e = 1.0 - exponent
    return (lo**e + u * (hi**e - lo**e)) ** (1.0 / e)


def _rasterize_lesion(rng, centre, radius_mm, spacing, shape):
    """Weight (partial-volume fraction) of one star-shaped lesion in its bounding box.

    Returns ``(box, weight, inside, rho)`` with ``inside = weight >= 0.5`` restricted to the
    26-connected piece holding the centre, or ``None`` if the box leaves the volume.
    """
    import cc3d

    sp = np.asarray(spacing, dtype=np.float32)
    stretch = np.exp(rng.uniform(-0.25, 0.25, 3)).astype(np.float32)
    stretch /= np.cbrt(stretch.prod())
    radii = np.float32(radius_mm) * stretch  # mm, in the lesion's own frame
    rot = _random_rotation(rng)
    n_waves = 3
    dirs = rng.standard_normal((n_waves, 3)).astype(np.float32)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    amps = rng.uniform(0.0, 0.08, n_waves).astype(np.float32)
    freqs = rng.uniform(1.5, 3.5, n_waves).astype(np.float32)
    phases = rng.uniform(0, 2 * np.pi, n_waves).astype(np.float32)

    reach = float(radii.max()) * 1.3
    half = np.ceil(reach / sp).astype(int) + 1
    c = np.asarray(centre, dtype=np.float32)
    lo = np.floor(c).astype(int) - half
    hi = np.floor(c).astype(int) + half + 1
    if np.any(lo < 0) or np.any(hi > np.asarray(shape)):
        return None
    zz, yy, xx = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    d = [(zz - c[0]).astype(np.float32) * sp[0], (yy - c[1]).astype(np.float32) * sp[1],
         (xx - c[2]).astype(np.float32) * sp[2]]
    # coordinates in the lesion frame, then normalised radius
    u = [rot[0, i] * d[0] + rot[1, i] * d[1] + rot[2, i] * d[2] for i in range(3)]
    rho = np.sqrt((u[0] / radii[0]) ** 2 + (u[1] / radii[1]) ** 2 + (u[2] / radii[2]) ** 2)
    norm = np.sqrt(u[0] ** 2 + u[1] ** 2 + u[2] ** 2) + np.float32(1e-6)
    bump = np.zeros_like(rho)
    for k in range(n_waves):
        proj = (u[0] * dirs[k, 0] + u[1] * dirs[k, 1] + u[2] * dirs[k, 2]) / norm
        bump += amps[k] * np.cos(freqs[k] * np.pi * proj + phases[k])
    rho = rho / (1.0 + bump)  # star-shaped: the surface moves radially by at most ±24%
    r_eq_vox = float(radius_mm / np.cbrt(sp.prod()))
    weight = np.clip((1.0 - rho) * np.float32(max(r_eq_vox, 0.5)) + 0.5, 0.0, 1.0).astype(np.float32)
    centre_idx = tuple(int(round(float(v))) - int(a) for v, a in zip(c, lo))
    weight[centre_idx] = max(float(weight[centre_idx]), 0.75)  # even the tiniest lesion has its voxel
    inside = weight >= 0.5
    labels = cc3d.connected_components(inside.astype(np.uint8), connectivity=26)
    inside = labels == labels[centre_idx]
    weight = np.where(inside, weight, np.minimum(weight, np.float32(0.49)))
    box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    return box, weight, inside, rho


def _dilate26(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.binary_dilation(mask, structure=np.ones((3, 3, 3), bool))


def _place_lesions(rng, anatomy: _Anatomy, spacing, shape, n, diam_lo, diam_hi, exponent):
    """Place ``n`` non-touching lesions inside the organ (adding them to ``anatomy.image``);
    returns ``(label, lesions)``."""
    label = np.zeros(shape, np.uint8)
    organ = anatomy.organ
    cand = np.flatnonzero(organ)
    if cand.size == 0 or n == 0:
        return label, []
    sp = np.asarray(spacing)
    voxel_cbrt = float(np.cbrt(sp.prod()))
    # the largest lesion the organ can hold: 60% of its thinnest extent (mm)
    extents = [np.ptp(np.nonzero(organ.any(axis=tuple(a for a in range(3) if a != ax)))[0]) + 1 for ax in range(3)]
    organ_mm = min(e * s for e, s in zip(extents, sp))
    hi = max(diam_lo * 1.01, min(diam_hi, 0.6 * organ_mm / voxel_cbrt))
    diameters = np.sort(sample_diameters(rng, n, diam_lo, hi, exponent))[::-1]  # large first
    lesions: list[SynthLesion] = []
    for dv in diameters:
        radius_mm = 0.5 * float(dv) * voxel_cbrt
        for attempt in range(40):
            if attempt and attempt % 10 == 0:
                radius_mm *= 0.8  # a lesion that does not fit becomes smaller rather than vanish
            flat = cand[rng.integers(cand.size)]
            centre = np.asarray(np.unravel_index(flat, shape), float) + rng.uniform(-0.5, 0.5, 3)
            reach = radius_mm * 1.3 / sp
            probes = [np.clip(np.round(centre + s * reach * e), 0, np.asarray(shape) - 1).astype(int)
                      for e in np.eye(3) for s in (-1, 1)]
            if not all(organ[tuple(p)] for p in probes):
                continue  # cheap rejection before rasterising
            raster = _rasterize_lesion(rng, centre, radius_mm, spacing, shape)
            if raster is None:
                continue
            box, weight, inside, rho = raster
            if not organ[box][inside].all():
                continue
            if label[box][_dilate26(inside)].any():
                continue  # would touch or overlap a lesion placed before
            contrast, kind = _lesion_contrast(rng, anatomy)
            profile = weight
            if kind != "ground-glass" and dv > 10 and rng.random() < 0.3:
                # rim enhancement / necrotic core of larger lesions
                profile = weight * (0.55 + 0.45 * np.clip(rho, 0.0, 1.0) ** 2)
                kind += "+rim"
            anatomy.image[box] += np.float32(contrast) * profile
            label[box][inside] = 1
            voxels = int(inside.sum())
            lesions.append(
                SynthLesion(
                    centre=tuple(float(round(v, 2)) for v in centre),
                    voxels=voxels,
                    diameter_vox=float(np.cbrt(6.0 * voxels / np.pi)),
                    contrast=round(float(contrast), 1),
                    kind=kind,
                )
            )
            break
    return label, lesions


def _lesion_contrast(rng, anatomy: _Anatomy) -> tuple[float, str]:
    if anatomy.lesion_abs is not None:
        return anatomy.lesion_abs(rng)
    magnitude = anatomy.noise_sd * float(np.exp(rng.uniform(np.log(1.5), np.log(8.0))))
    if rng.random() < anatomy.hypo_prob:
        return -magnitude, "hypo"
    return magnitude, "hyper"


# ----------------------------------------------------------------------------- public API


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
) -> SynthCase:
    """Generate one case with its lesion list; see the module docstring for the model.

    ``seed`` is anything ``numpy.random.default_rng`` takes (an int or a sequence of ints,
    e.g. ``(dataset_seed, case_index)``). ``shape`` is (D, H, W); ``spacing`` (sz, sy, sx) in
    mm defaults to :data:`DEFAULT_SPACING`; ``body_fraction`` (share of the FOV inside the
    body/head) to :data:`DEFAULT_BODY_FRACTION`. ``mean_lesions`` is the Poisson mean of the
    lesion count; diameters (voxels, equivalent) follow ``p(d) ∝ d^-size_exponent`` on
    ``diameter_range``, truncated to what the organ can hold.
    """
    preset = _check_preset(preset)
    shape = _check_shape(shape)
    spacing = _check_spacing(DEFAULT_SPACING[preset] if spacing is None else spacing)
    body_fraction = _check_body_fraction(
        DEFAULT_BODY_FRACTION[preset] if body_fraction is None else body_fraction, preset
    )
    lo, hi = _check_diameters(diameter_range, size_exponent)
    if not (0.0 <= float(mean_lesions) <= 50.0):
        raise InputError(f"mean_lesions must be in [0, 50], got {mean_lesions}")
    try:
        rng = np.random.default_rng(seed)
    except (TypeError, ValueError):
        raise InputError(f"seed must be a non-negative integer or a sequence of them, got {seed!r}") from None

    anatomy = _ANATOMY[preset](rng, shape, spacing, body_fraction)
    n = int(rng.poisson(mean_lesions))
    label, lesions = _place_lesions(rng, anatomy, spacing, shape, n, lo, hi, size_exponent)
    image = anatomy.image
    if preset == "mr":
        z, y, x = _norm_coords(shape)
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
    from scipy import ndimage

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
    import re

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
    from . import __version__
    from .imageio import Geometry, atomic_output, write_image

    preset = _check_preset(preset)
    shape = _check_shape(shape)
    check_memory(shape)
    spacing = _check_spacing(DEFAULT_SPACING[preset] if spacing is None else spacing)
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

    keep = {case_id(i) for i in range(cases)}
    _remove_stale_cases([dirs["imagesTr"]], keep, written)
    _remove_stale_cases([dirs["labelsTr"], dirs["masksTr"]], keep, {f"{cid}.nii.gz" for cid in keep})
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
