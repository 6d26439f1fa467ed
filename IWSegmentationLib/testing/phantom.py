"""A known answer for end-to-end tests: a small phantom and a hand-wired checkpoint.

An untrained network predicts noise, so a test that runs the whole path (volume -> backend
process -> mask -> segments -> Dice table) could only check that *something* came back. Here
the answer is known in advance:

* :func:`phantom_case` draws a body (intensity ``body``) with spherical lesions of given radii
  (mm) and intensities on an optionally anisotropic grid, and the exact reference mask;
* :func:`threshold_checkpoint` writes a real checkpoint (the library's residual U-Net, the
  ``mr`` preset, a genuine model card) whose weights are set by hand so that the network is
  a **pointwise** function of its preprocessed input ``x``: ``logit = gain · (x − level)``.
  Every convolution is zero except one path that carries channel 0 of the input from the stem
  through the level-0 skip to the head (BatchNorm at its initial identity statistics,
  ReLU a no-op on ``x >= 0``), and the bottleneck and deeper skips are switched off.

With the ``mr`` preset, ``x`` is the image scaled by its 0.5 / 99.5 percentiles; in the
default phantom these are the background (0) and the brightest lesion (100), so a voxel is
lesion exactly when its intensity is above ``level · 100``, and a lesion of intensity ``v``
has confidence (maximum logit) ``gain · (v / 100 − level)``, probability ``sigmoid`` of it. The backend's prediction is then the
reference mask, voxel for voxel, whatever the window layout or blending.

Used by ``Testing/backend/test_local_run.py`` (the real backend through :class:`~IWSegmentationLib.backend.local_run.InferenceRun`)
and by the Slicer module's self-test (``IWSegmentationTest``), which writes the checkpoint with
:func:`IWSegmentationLib.testing.known_answer.write_known_answer_checkpoint`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.errors import InputError
from ..nn.checkpoint import save_checkpoint
from ..preprocessing.presets import get_preset

#: Default lesions: (centre z, y, x in voxels, radius in mm, intensity). Diameters of about
#: 4, 8 and 14 mm fall in the small / medium / large groups of the thresholds (5, 10) mm, and
#: the three intensities give three distinct confidences.
DEFAULT_LESIONS: tuple[tuple[float, float, float, float, float], ...] = (
    (20.0, 14.0, 34.0, 2.0, 70.0),
    (12.0, 34.0, 30.0, 4.0, 85.0),
    (22.0, 24.0, 15.0, 7.0, 100.0),
)
DEFAULT_SIZE_THRESHOLDS = (5.0, 10.0)


@dataclass
class PhantomCase:
    """A phantom volume ``image`` (float32, ``[z, y, x]``), its exact lesion mask ``reference``
    (uint8), the spacing ``(sz, sy, sx)`` in mm and, per lesion, its intensity."""

    image: np.ndarray
    reference: np.ndarray
    spacing: tuple[float, float, float]
    intensities: list[float] = field(default_factory=list)

    def confidences(self, gain: float = 20.0, level: float = 0.5) -> list[float]:
        """The confidence, the maximum logit ``gain · (v / top − level)``, that the threshold
        checkpoint gives each lesion (in the order of ``intensities``)."""
        top = max(self.intensities)
        return [gain * (v / top - level) for v in self.intensities]


def phantom_case(
    shape: Sequence[int] = (32, 48, 48),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    lesions: Sequence[Sequence[float]] = DEFAULT_LESIONS,
    body: float = 40.0,
) -> PhantomCase:
    """Draw the phantom: background 0, an ellipsoidal body of intensity ``body`` filling most of
    the grid, and one sphere per ``(cz, cy, cx, radius_mm, intensity)`` (centres in voxels).

    Lesions must not touch each other, and together they must cover more than 0.5% of the
    voxels so that the 99.5th percentile is the brightest lesion (the ``mr`` preset's scaling).
    """
    shape = tuple(int(s) for s in shape)
    sp = np.asarray(spacing, dtype=float)
    if len(shape) != 3 or min(shape) < 8:
        raise InputError(f"phantom shape must be 3 sizes >= 8, got {shape}")
    if sp.shape != (3,) or np.any(sp <= 0):
        raise InputError(f"phantom spacing must be 3 positive numbers, got {spacing}")
    zz, yy, xx = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    centre = [(n - 1) / 2.0 for n in shape]
    semi = [0.45 * n for n in shape]
    inside = sum(((g - c) / a) ** 2 for g, c, a in zip((zz, yy, xx), centre, semi)) <= 1.0
    image = np.where(inside, np.float32(body), np.float32(0.0)).astype(np.float32)
    reference = np.zeros(shape, dtype=np.uint8)
    intensities = []
    for cz, cy, cx, radius_mm, value in lesions:
        dist2 = ((zz - cz) * sp[0]) ** 2 + ((yy - cy) * sp[1]) ** 2 + ((xx - cx) * sp[2]) ** 2
        sphere = dist2 <= radius_mm ** 2
        if not sphere.any():
            raise InputError(f"lesion at ({cz}, {cy}, {cx}) with radius {radius_mm} mm covers no voxel")
        if (reference[sphere] != 0).any():
            raise InputError(f"lesion at ({cz}, {cy}, {cx}) overlaps another lesion")
        image[sphere] = np.float32(value)
        reference[sphere] = 1
        intensities.append(float(value))
    if reference.mean() <= 0.005:
        raise InputError("phantom lesions cover <= 0.5% of the voxels; the mr preset would not map them to 1")
    return PhantomCase(image, reference, tuple(float(s) for s in sp), intensities)


def threshold_model(gain: float = 20.0, level: float = 0.5, config: dict | None = None):
    """The library's U-Net with weights set so that ``logit = gain · (x − level)`` voxel-wise."""
    import torch  # lazy: the phantom's data is made without torch

    from ..nn.unet import build_model, default_config  # lazy: imports torch

    model = build_model(config or default_config("tiny"))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv3d):
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()

        def pass_channel0(conv, value=1.0):
            c = conv.weight.shape[-1] // 2
            conv.weight[0, 0, c, c, c] = value

        pass_channel0(model.stem[0])
        pass_channel0(model.stem[1][2])
        for block in [*(b for level_ in model.encoder for b in level_), *(b for level_ in model.decoder for b in level_)]:
            if isinstance(block.shortcut, torch.nn.Conv3d):
                pass_channel0(block.shortcut)
        pass_channel0(model.skips[0][2])  # deeper skips and the bottleneck stay zero
        head = model.head[1][2]
        pass_channel0(head, gain)
        head.bias.fill_(-gain * level)
    model.eval()
    return model


def threshold_checkpoint(
    path: str | os.PathLike,
    *,
    gain: float = 20.0,
    level: float = 0.5,
    patch_size: Sequence[int] = (32, 32, 32),
    size_thresholds: Sequence[float] = DEFAULT_SIZE_THRESHOLDS,
) -> Path:
    """Write the hand-wired model as a real checkpoint (``mr`` preset, threshold 0.5)."""
    path = Path(path)
    save_checkpoint(path, threshold_model(gain, level), {
        "patch_size": [int(p) for p in patch_size],
        "preprocessing": get_preset("mr"),
        "threshold": 0.5,
        "loss": "none (hand-wired test model)",
        "size_thresholds": [float(s) for s in size_thresholds],
        "description": f"Test model, not trained: logit = {gain:g} * (x - {level:g}) of the "
                       "preprocessed input x. See IWSegmentationLib/testing/phantom.py.",
    })
    return path
