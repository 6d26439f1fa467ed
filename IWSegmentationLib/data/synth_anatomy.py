"""The synthetic anatomy and lesions behind :mod:`IWSegmentationLib.data.synth`: smooth fields, organs, vessels, rasterised lesions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


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
    from scipy import ndimage  # lazy: `iwseg` starts without scipy

    white = rng.standard_normal(shape, dtype=np.float32)
    kernel = np.array([0.25, 0.5, 0.25], np.float32)
    out = ndimage.correlate1d(white, kernel, axis=1, mode="reflect")
    out = ndimage.correlate1d(out, kernel, axis=2, mode="reflect")
    # each pass keeps variance sum(k^2) = 0.375; two passes leave std 0.375
    return out * np.float32(1.0 / 0.375)


def _soft(inside_depth: np.ndarray) -> np.ndarray:
    """Partial-volume fraction from a signed depth in voxels (positive inside)."""
    return np.clip(inside_depth + 0.5, 0.0, 1.0, dtype=np.float32)


def norm_coords(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    coords = norm_coords(shape)
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
    coords = norm_coords(shape)
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
    coords = norm_coords(shape)
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


#: preset name -> the function that draws its anatomy (image, body mask, lesion intensity), for :mod:`.synth`
ANATOMY = {"ct-liver": _anatomy_ct_liver, "ct-lung": _anatomy_ct_lung, "mr": _anatomy_mr}


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
    import cc3d  # lazy: `iwseg` starts without cc3d

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
    from scipy import ndimage  # lazy: `iwseg` starts without scipy

    return ndimage.binary_dilation(mask, structure=np.ones((3, 3, 3), bool))


def place_lesions(rng, anatomy: _Anatomy, spacing, shape, n, diam_lo, diam_hi, exponent,
                  primary: float | None = None):
    """Place ``n`` non-touching lesions inside the organ (adding them to ``anatomy.image``);
    returns ``(label, lesions)``. ``primary`` (equivalent diameter in voxels) adds one large lesion,
    placed first, capped like the others at what the organ can hold."""
    label = np.zeros(shape, np.uint8)
    organ = anatomy.organ
    cand = np.flatnonzero(organ)
    if cand.size == 0 or (n == 0 and primary is None):
        return label, []
    sp = np.asarray(spacing)
    voxel_cbrt = float(np.cbrt(sp.prod()))
    # the largest lesion the organ can hold: 60% of its thinnest extent (mm)
    extents = [np.ptp(np.nonzero(organ.any(axis=tuple(a for a in range(3) if a != ax)))[0]) + 1 for ax in range(3)]
    organ_mm = min(e * s for e, s in zip(extents, sp))
    hi = max(diam_lo * 1.01, min(diam_hi, 0.6 * organ_mm / voxel_cbrt))
    diameters = np.sort(sample_diameters(rng, n, diam_lo, hi, exponent))[::-1]  # large first
    if primary is not None:
        cap = max(diam_lo * 1.01, 0.6 * organ_mm / voxel_cbrt)
        diameters = np.concatenate([[min(primary, cap)], diameters])
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
