"""Sliding-window inference: MONAI-exact window grid and blending, plus background skipping.

:func:`sliding_window_inference` tiles a 3D volume with overlapping windows of ``patch_size``,
runs a ``predictor`` on batches of windows and blends the window outputs into one volume.
With identical settings it reproduces ``monai.inferers.sliding_window_inference`` (MONAI 1.x,
``monai/inferers/utils.py`` and ``monai/data/utils.py``) to float32 rounding:

* **grid** — along each axis the scan interval is ``int(patch * (1 - overlap))`` (1 if that is
  0; the whole side if the patch equals the side); starts are ``0, s, 2s, ...`` up to the first
  one whose window reaches the border, and a window that would cross the border is shifted
  back to end exactly at it;
* **padding** — only on an axis where the patch is larger than the image: ``diff // 2`` before
  and the rest after, with a constant (``pad_value``, MONAI's ``cval=0``), cropped off at the end;
* **importance map** — ``"constant"``: ones; ``"gaussian"``: the *unnormalised* separable
  Gaussian ``exp(-x² / 2σ²)`` on ``x = -(p-1)/2 ... (p-1)/2`` with ``σ = sigma_scale * p`` per
  axis (peak 1), then clamped to ``>= max(min, 1e-3)``;
* **blend** — ``out(v) = Σ_w pred_w(v)·g_w(v) / Σ_w g_w(v)`` over the windows ``w`` containing ``v``.

Beyond MONAI:

* **background skipping** — given a ``foreground`` mask (the organ/body mask of the
  preprocessing, or ``image > threshold`` from :func:`foreground_from_threshold`), windows that
  contain no foreground voxel are never run. The blend then sums only over the windows that ran,
  so every foreground voxel — all of whose windows ran — gets exactly the value of the full run;
  voxels no window covered get ``fill_value`` (``predict_volume`` blends logits and passes
  :data:`~IWSegmentationLib.core.confidence.SKIPPED_LOGIT`, probability 0).
* **bounded memory** — one float32 accumulator of the output's size, filled in place
  (``addcmul_``); no float64 and no full-size weight map: ``Σ g`` is rebuilt slab by slab at the
  end (a few MB) and the accumulator is divided in place. A 512×512×300 output costs one
  float32 copy of the volume (300 MB) on top of the input and the model.
* ``torch.inference_mode``, batches of windows, optional autocast (``precision``: fp16 on CUDA,
  bf16 opt-in on CPU), a ``progress(done, total)`` callback and a ``cancel()`` check between
  batches (raises :class:`~IWSegmentationLib.core.errors.Cancelled`);
* **out of memory** on an accelerator: the window batch is halved and the batch retried; at
  batch size 1 a module predictor is moved to the CPU and inference goes on there. Each step is
  reported through ``on_warning``.

:func:`predict_volume` is the high-level entry point of ``iwseg predict``: the checkpoint's
preprocessing, the network's logits blended, skipping by the preprocessing mask, and the
logits (and the thresholded mask) back on the input grid.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..core.errors import Cancelled, InputError, IWSegError
from .devices import autocast_context, resolve_precision

#: Most sliding windows one volume may run: 200,000 (a 512 x 512 x 600 CT in 64^3 windows at overlap
#: 0.75 runs 29 x 29 x 35 = 29,435). A job past it is refused with the numbers that drive its time
#: (patch, overlap, volume), before anything runs.
MAX_WINDOWS = 200_000
BLEND_MODES = ("gaussian", "constant")


#: Voxels per slab when the blend weights are summed at the end (bounds that buffer to 64 MB).
_SLAB_VOXELS = 16 * 1024 * 1024


_OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError}
)


Predictor = Callable[[torch.Tensor], torch.Tensor]


def as_triple(value, name: str, cast=int) -> tuple:
    """``value`` (one number, or three for z, y, x) as a tuple of three ``cast`` values;
    :class:`InputError` naming the parameter ``name`` otherwise."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        value = (value,) * 3
    try:
        out = tuple(cast(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number or three numbers, got {value!r}") from None
    if len(out) != 3:
        raise InputError(f"{name} must be a number or three numbers (z, y, x), got {value!r}")
    return out


def scan_interval(image_size: Sequence[int], patch_size: Sequence[int], overlap: Sequence[float]) -> tuple[int, ...]:
    """MONAI's ``_get_scan_interval``: ``int(p * (1 - o))`` (at least 1), or ``p`` when ``p == image``."""
    return tuple(
        int(p) if p == s else max(int(p * (1 - o)), 1) for s, p, o in zip(image_size, patch_size, overlap)
    )


def window_starts(image_size: Sequence[int], patch_size: Sequence[int], overlap: Sequence[float]
                  ) -> list[list[int]]:
    """Per-axis window start indices on an image that is at least ``patch_size`` big (MONAI's
    ``dense_patch_slices``): ``0, s, 2s, ...`` up to the first window reaching the border; a
    window crossing the border is shifted back to end at it."""
    out = []
    for size, p, step in zip(image_size, patch_size, scan_interval(image_size, patch_size, overlap)):
        if p > size:
            raise InputError(f"patch side {p} is larger than the (padded) image side {size}")
        n = next(d for d in range(int(math.ceil(size / step)) + 1) if d * step + p >= size) + 1
        out.append([min(d * step, size - p) for d in range(n)])
    return out


def padding_for(image_size: Sequence[int], patch_size: Sequence[int]) -> list[tuple[int, int]]:
    """MONAI's padding: on an axis where the patch is larger, ``diff // 2`` before, the rest after."""
    pads = []
    for size, p in zip(image_size, patch_size):
        diff = max(int(p) - int(size), 0)
        pads.append((diff // 2, diff - diff // 2))
    return pads


def importance_map(patch_size: Sequence[int], blend: str = "gaussian", sigma_scale: float | Sequence[float] = 0.125,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Blend weights of one window, float32 of shape ``patch_size`` (MONAI's ``compute_importance_map``).

    ``"gaussian"``: ``Π_axis exp(-x² / (2 (sigma_scale·p)²))`` with ``x`` centred on the window
    (``-(p-1)/2 ... (p-1)/2``), peak 1, not normalised; then clamped below at ``max(min, 1e-3)``
    so the window border keeps a small positive weight. ``"constant"``: ones.
    """
    if blend not in BLEND_MODES:
        raise InputError(f"blend must be one of {', '.join(BLEND_MODES)}, got {blend!r}")
    patch_size = tuple(int(p) for p in patch_size)
    device = torch.device(device)
    if blend == "constant":
        weights = torch.ones(patch_size, dtype=torch.float32, device=device)
    else:
        scales = as_triple(sigma_scale, "sigma_scale", float)
        if any(s <= 0 for s in scales):
            raise InputError(f"sigma_scale must be positive, got {sigma_scale!r}")
        weights = None
        for axis, (p, scale) in enumerate(zip(patch_size, scales)):
            sigma = p * scale
            x = torch.arange(-(p - 1) / 2.0, (p - 1) / 2.0 + 1, dtype=torch.float32, device=device)
            g = torch.exp(x**2 / (-2 * sigma**2))
            # same operation order as MONAI so the float32 products are bit-identical
            weights = g if axis == 0 else weights.unsqueeze(-1) * g[(None,) * axis]
    floor = max(float(weights.min()), 1e-3)
    return weights.clamp_(min=floor)


def foreground_from_threshold(image: np.ndarray | torch.Tensor, threshold: float) -> np.ndarray:
    """``image > threshold`` as a bool array: a quick body mask (e.g. -500 HU on CT) for skipping."""
    if isinstance(image, torch.Tensor):
        return (image > threshold).cpu().numpy()
    return np.asarray(image) > threshold


def foreground_windows(foreground: np.ndarray, starts: Sequence[Sequence[int]], patch_size: Sequence[int]
                       ) -> np.ndarray:
    """Which windows contain at least one foreground voxel: bool array ``(nz, ny, nx)``.

    Reduces axis by axis (any over the window's z range, then y, then a cumulative sum over x),
    so the cost is about ``1 / (1 - overlap)`` passes over the mask, not one per window.
    """
    pz, py, px = (int(p) for p in patch_size)
    zs, ys, xs = (np.asarray(s, dtype=np.int64) for s in starts)
    hit = np.zeros((len(zs), len(ys), len(xs)), dtype=bool)
    for i, z in enumerate(zs):
        plane = foreground[z : z + pz].any(axis=0)
        if not plane.any():
            continue
        for j, y in enumerate(ys):
            row = plane[y : y + py].any(axis=0)
            csum = np.concatenate(([0], np.cumsum(row, dtype=np.int64)))
            hit[i, j] = csum[xs + px] > csum[xs]
    return hit


@dataclass
class InferenceStats:
    """What a run did, for logs and the benchmark: window counts, seconds, final batch size, device."""

    windows_total: int = 0
    windows_run: int = 0
    batch_size: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    engine: str = "eager"
    seconds_total: float = 0.0
    seconds_forward: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def seconds_per_window(self) -> float | None:
        return self.seconds_total / self.windows_run if self.windows_run else None

    @property
    def fraction_outside_forward(self) -> float | None:
        if self.seconds_total <= 0:
            return None
        return max(0.0, 1.0 - self.seconds_forward / self.seconds_total)


def _as_image_tensor(image) -> tuple[torch.Tensor, bool]:
    """``(C, D, H, W)`` float32 tensor view of a ``(D, H, W)`` or ``(C, D, H, W)`` array or tensor
    (no copy when it already is float32), and whether the input was numpy."""
    is_numpy = not isinstance(image, torch.Tensor)
    if is_numpy:
        array = np.asarray(image)
        if array.dtype.kind not in "biuf":
            raise InputError(f"image must be numeric, got dtype {array.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    else:
        tensor = image.detach()
        if not tensor.is_floating_point() or tensor.dtype != torch.float32:
            tensor = tensor.float()
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 4:
        raise InputError(f"image must be (D, H, W) or (C, D, H, W), got shape {tuple(image.shape)}")
    if min(tensor.shape[1:]) < 1:
        raise InputError(f"image has an empty axis: shape {tuple(image.shape)}")
    return tensor, is_numpy


def _module_device(predictor) -> torch.device | None:
    if isinstance(predictor, nn.Module):
        for tensor in predictor.parameters():
            return tensor.device
        for tensor in predictor.buffers():
            return tensor.device
    return None


class _WindowRunner:
    """Runs batches of windows through the predictor, halving the batch and falling back to the
    CPU on accelerator out-of-memory errors."""

    def __init__(self, predictor, device: torch.device, precision: str, batch_size: int,
                 on_warning: Callable[[str], None], stats: InferenceStats):
        self.predictor = predictor
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.on_warning = on_warning
        self.stats = stats

    def _warn(self, message: str) -> None:
        self.stats.warnings.append(message)
        self.on_warning(message)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Predictor output for ``batch`` (on the CPU or the accelerator), float32 ``(B, C, ...)``."""
        sync = self.device.type == "cuda"
        start = time.perf_counter()
        x = batch.to(self.device, non_blocking=True)
        with autocast_context(self.device, self.precision):
            out = self.predictor(x)
        if not isinstance(out, torch.Tensor):
            raise InputError(f"the predictor must return a tensor, got {type(out).__name__}")
        out = out.float()
        if sync:
            torch.cuda.synchronize(self.device)
        self.stats.seconds_forward += time.perf_counter() - start
        return out

    def handle_oom(self, exc: BaseException) -> None:
        """Shrink the batch or move to the CPU after an out-of-memory error; re-raise when neither helps."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.batch_size > 1:
            self.batch_size = max(1, self.batch_size // 2)
            self._warn(f"{self.device.type.upper()} out of memory; retrying with window batch size {self.batch_size}")
            return
        if self.device.type != "cpu" and hasattr(self.predictor, "to"):
            self.predictor.to("cpu")
            self.device = torch.device("cpu")
            if self.precision == "fp16":
                self.precision = "fp32"
            self._warn("out of memory on the accelerator even with one window per batch; continuing on the CPU")
            return
        raise IWSegError(
            f"out of memory running one window on {self.device}; use a smaller patch size or free memory"
        ) from exc


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, _OOM_ERRORS) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def sliding_window_inference(
    image: np.ndarray | torch.Tensor,
    predictor: Predictor,
    patch_size: int | Sequence[int],
    *,
    overlap: float | Sequence[float] = 0.5,
    blend: str = "gaussian",
    sigma_scale: float | Sequence[float] = 0.125,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    foreground: np.ndarray | None = None,
    pad_value: float = 0.0,
    fill_value: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    on_warning: Callable[[str], None] | None = None,
    stats: InferenceStats | None = None,
) -> np.ndarray | torch.Tensor:
    """Blend ``predictor`` outputs over overlapping windows of ``image``.

    Args:
        image: ``(D, H, W)`` or ``(C_in, D, H, W)``, numpy or torch (any numeric dtype; used as float32).
        predictor: callable ``(B, C_in, pz, py, px) -> (B, C_out, pz, py, px)`` tensor (logits or
            probabilities — blended as given). A module should be in ``eval()`` mode.
        patch_size: window size, one int or ``(pz, py, px)``.
        overlap: fraction of a window shared with its neighbour, in ``[0, 1)``, per axis or one value.
        blend: ``"gaussian"`` or ``"constant"`` (see the module docstring).
        sigma_scale: Gaussian σ as a fraction of the patch side.
        batch_size: windows per predictor call; default 4 on an accelerator, 1 on the CPU.
        device: where the predictor runs (default: the module's device, else the CPU). The output
            is always accumulated on the CPU.
        precision: ``"fp32"``, ``"fp16"`` (autocast, accelerators), ``"bf16"`` (autocast) or ``"auto"``.
        foreground: optional bool mask shaped like the image's ``(D, H, W)``; windows without a
            foreground voxel are skipped and voxels no window covers get ``fill_value``.
        pad_value: constant used where the patch is larger than the image (MONAI's ``cval``).
        progress: ``progress(done, total)`` after every batch (windows that run, after skipping).
        cancel: checked before every batch; when it returns true :class:`Cancelled` is raised.
        on_warning: receives messages such as out-of-memory fallbacks (default: ``warnings.warn``).
        stats: an :class:`InferenceStats` to fill in (window counts, timings, final device).

    Returns:
        ``(C_out, D, H, W)`` float32, numpy if ``image`` was numpy, else a CPU tensor.
    """
    t_start = time.perf_counter()
    stats = stats if stats is not None else InferenceStats()
    on_warning = on_warning or (lambda message: warnings.warn(message, RuntimeWarning, stacklevel=3))
    if not callable(predictor):
        raise InputError(f"predictor must be callable, got {type(predictor).__name__}")
    tensor, is_numpy = _as_image_tensor(image)
    spatial = tuple(tensor.shape[1:])
    patch = as_triple(patch_size, "patch_size", int)
    if any(p < 1 for p in patch):
        raise InputError(f"patch_size must be positive, got {patch_size!r}")
    overlaps = as_triple(overlap, "overlap", float)
    if any(not (0.0 <= o < 1.0) for o in overlaps):
        raise InputError(f"overlap must be in [0, 1), got {overlap!r}")
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if device is None:
        device = _module_device(predictor) or torch.device("cpu")
    device = torch.device(device) if not isinstance(device, torch.device) else device
    precision = resolve_precision(precision, device)
    weight = importance_map(patch, blend, sigma_scale, device="cpu")

    # pad (only where the patch is larger than the image), as MONAI does
    pads = padding_for(spatial, patch)
    if any(a or b for a, b in pads):
        flat = [v for a, b in reversed(pads) for v in (a, b)]
        tensor = torch.nn.functional.pad(tensor, flat, mode="constant", value=float(pad_value))
    padded = tuple(tensor.shape[1:])
    starts = window_starts(padded, patch, overlaps)
    n_windows = math.prod(len(s) for s in starts)
    if n_windows > MAX_WINDOWS:  # before the grid is even built (a 1^3 patch gave 131,072 windows, a 9-day ETA)
        raise InputError(f"{n_windows:,} windows of {list(patch)} voxels at overlap {list(overlaps)} over a volume of "
                         f"{list(spatial)} voxels: more than the {MAX_WINDOWS:,} a job may run; use a larger patch, a "
                         "lower overlap, or crop the volume")
    grid = np.stack(np.meshgrid(*starts, indexing="ij"), axis=-1).reshape(-1, 3)  # z-major, like MONAI
    stats.windows_total = len(grid)
    if foreground is not None:
        fg = np.asarray(foreground)
        if fg.shape != spatial:
            raise InputError(f"foreground mask shape {fg.shape} differs from the image shape {spatial}")
        fg = fg.astype(bool, copy=False)
        if any(a or b for a, b in pads):
            fg = np.pad(fg, pads, constant_values=False)
        grid = grid[foreground_windows(fg, starts, patch).reshape(-1)]
    total = len(grid)
    stats.windows_run = total

    runner = _WindowRunner(
        predictor, device, precision, int(batch_size or (1 if device.type == "cpu" else 4)), on_warning, stats
    )
    accumulator: torch.Tensor | None = None
    weight_dev = {}
    done = 0
    with torch.inference_mode():
        while done < total:
            if cancel is not None and cancel():
                raise Cancelled(f"cancelled after {done} of {total} windows")
            chunk = grid[done : done + runner.batch_size]
            batch = torch.stack([tensor[:, z : z + patch[0], y : y + patch[1], x : x + patch[2]] for z, y, x in chunk])
            try:
                out = runner.forward(batch)
            except Exception as exc:
                if not _is_oom(exc):
                    raise
                runner.handle_oom(exc)
                continue
            if out.ndim != 5 or out.shape[0] != len(chunk) or tuple(out.shape[2:]) != patch:
                raise InputError(
                    f"the predictor returned shape {tuple(out.shape)} for a batch of shape {tuple(batch.shape)}; "
                    "it must keep the batch size and the window size"
                )
            if accumulator is None:
                accumulator = torch.zeros((out.shape[1], *padded), dtype=torch.float32)
            key = out.device
            if key not in weight_dev:
                weight_dev[key] = weight.to(key)
            out = torch.mul(out, weight_dev[key]).cpu()  # out of place: the predictor's tensor may be a view
            for k, (z, y, x) in enumerate(chunk):
                accumulator[:, z : z + patch[0], y : y + patch[1], x : x + patch[2]].add_(out[k])
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        if accumulator is None:  # nothing ran: every window skipped (or an empty foreground)
            channels = _output_channels(predictor, tensor, patch, runner.device, runner.precision)
            accumulator = torch.full((channels, *padded), float(fill_value), dtype=torch.float32)
        else:
            _normalise_(accumulator, grid, weight, patch, fill_value)
        if any(a or b for a, b in pads):
            crop = tuple(slice(a, a + s) for (a, _), s in zip(pads, spatial))
            accumulator = accumulator[(slice(None), *crop)].contiguous()
    stats.batch_size = runner.batch_size
    stats.device = str(runner.device)
    stats.precision = runner.precision
    stats.seconds_total = time.perf_counter() - t_start
    # a plain (non-inference) tensor or array on the same memory, so callers may modify it in place
    result = accumulator.numpy()
    return result if is_numpy else torch.from_numpy(result)


def _output_channels(predictor, tensor, patch, device, precision) -> int:
    """Output channel count when no window ran: module ``config['out_channels']`` or one probe call."""
    config = getattr(predictor, "config", None)
    if isinstance(config, Mapping) and isinstance(config.get("out_channels"), int):
        return int(config["out_channels"])
    probe = torch.zeros((1, tensor.shape[0], *patch), dtype=torch.float32, device=device)
    with autocast_context(device, precision):
        return int(predictor(probe).shape[1])


def _normalise_(accumulator: torch.Tensor, grid: np.ndarray, weight: torch.Tensor, patch: Sequence[int],
                fill_value: float) -> None:
    """Divide ``accumulator`` by ``Σ g`` over the windows in ``grid``, in place and slab by slab.

    Σ g is rebuilt for a slab of z-slices at a time from the windows that overlap it — the same
    float32 additions in the same (z-major) order as MONAI's count map — so no full-size weight
    volume is ever held. Voxels no window covered get ``fill_value``.
    """
    _, depth, height, width = accumulator.shape
    slab = max(1, min(depth, _SLAB_VOXELS // max(1, height * width)))
    pz, py, px = patch
    for z0 in range(0, depth, slab):
        z1 = min(depth, z0 + slab)
        wsum = torch.zeros((z1 - z0, height, width), dtype=torch.float32)
        for z, y, x in grid[(grid[:, 0] < z1) & (grid[:, 0] + pz > z0)]:
            a, b = max(z, z0), min(z + pz, z1)
            wsum[a - z0 : b - z0, y : y + py, x : x + px] += weight[a - z : b - z]
        block = accumulator[:, z0:z1]
        uncovered = wsum == 0
        block.div_(wsum.clamp_(min=torch.finfo(torch.float32).tiny))
        if uncovered.any():
            block.masked_fill_(uncovered.expand_as(block), float(fill_value))
