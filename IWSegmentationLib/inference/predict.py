"""Whole volumes: preprocessing, sliding window and resampling back, driven by the checkpoint's model card."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..core.confidence import SKIPPED_LOGIT, probability_to_logit
from ..core.errors import InputError
from ..core.imageio import Geometry
from ..core.prediction_maps import sigmoid
from ..nn.model_card import card_spacing, check_in_channels
from ..preprocessing.cropping import OrganBox, organ_box
from ..preprocessing.foreground import foreground_mask
from ..preprocessing.presets import validate_params
from ..preprocessing.resampling import (
    check_resampled_memory,
    prepare_case,
    resample_to_geometry,
    resampled_geometry,
)
from .devices import resolve_device, resolve_precision
from .engine import prepare_network
from .predictors import EnsemblePredictor, MemberPredictor, MirroredPredictor
from .sliding_window import InferenceStats, as_triple, sliding_window_inference


@dataclass
class VolumePrediction:
    """:func:`predict_volume`'s result, on the input grid: the blended float32 ``logits`` (what
    ranks components: their maximum logit is their confidence), the uint8 mask
    ``logits > logit(threshold)`` (the same as ``probabilities > threshold`` without the
    sigmoid's rounding), the threshold used (a probability) and the run's
    :class:`InferenceStats`. Voxels no window covered have the logit
    :data:`~IWSegmentationLib.core.confidence.SKIPPED_LOGIT` (probability 0).

    :attr:`probabilities` is computed from the logits when asked for, not kept: a second
    float32 volume is paid for only by a caller that wants probabilities (``iwseg predict``
    computes it only to write ``--probabilities``)."""

    logits: np.ndarray
    mask: np.ndarray
    threshold: float
    stats: InferenceStats
    #: the mask's threshold as a logit (``logits > logit_threshold`` is the mask)
    logit_threshold: float | None = None
    #: with ``members=True`` and TTA or an ensemble: each member's own logit map, float16
    #: ``[M, z, y, x]`` on the input grid (:func:`member_logit_maps`); else None
    members: np.ndarray | None = None

    @property
    def probabilities(self) -> np.ndarray:
        """``sigmoid(logits)``, float32, a new array on every access (keep it if needed twice)."""
        return sigmoid(self.logits)


def inference_settings(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Patch size, overlap and blend a checkpoint asks for: its optional ``inference`` entry
    (``patch_size``, ``overlap``, ``blend``), else ``patch_size``, overlap 0.25, Gaussian blend."""
    extra = metadata.get("inference") or {}
    if not isinstance(extra, Mapping):
        raise InputError(f"checkpoint metadata 'inference' must be a dict, got {extra!r}")
    patch = extra.get("patch_size") or metadata.get("patch_size")
    if patch is None:
        raise InputError("checkpoint metadata has no 'patch_size': cannot choose the sliding-window size")
    return {
        "patch_size": as_triple(patch, "patch_size", int),
        "overlap": float(extra.get("overlap", 0.25)),
        "blend": str(extra.get("blend", "gaussian")),
    }


def card_organ_box(metadata: Mapping[str, Any], organ: np.ndarray | None,
                   warn: Callable[[str], None]) -> OrganBox | None:
    """The organ box a model card's ``crop_to_organ`` asks for, of ``organ`` (the organ mask on
    the network's grid, as :func:`preprocessing.prepare_case` returns it), or None: no crop in
    the card, or (with a warning) no organ mask or an empty one, when the whole volume is used."""
    margin = metadata.get("crop_to_organ")
    if margin is None:
        return None
    if organ is None:
        warn(f"the model was trained on volumes cropped to the organ's bounding box (model card crop_to_organ: "
             f"{margin} voxels) but no organ mask was given, so it sees the whole volume, unlike in training, "
             "and may find lesions outside the organ; give the organ mask (--organ-mask)")
        return None
    box = organ_box(organ, int(margin))
    if box is None:
        warn(f"the organ mask is empty, so the organ crop of the model card (crop_to_organ: {margin} voxels) "
             "cannot be applied; the whole volume is used")
    return box


def predict_volume(
    model: nn.Module | Sequence[nn.Module],
    image: np.ndarray,
    metadata: Mapping[str, Any],
    *,
    geometry=None,
    organ_mask: np.ndarray | None = None,
    device: str | torch.device = "auto",
    overlap: float | None = None,
    threshold: float | None = None,
    blend: str | None = None,
    batch_size: int | None = None,
    precision: str = "auto",
    skip_background: bool = True,
    channels_last: bool | None = None,
    engine: str = "auto",
    tta: bool = False,
    keep_spacing: bool = False,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    on_warning: Callable[[str], None] | None = None,
    logit_threshold: float | None = None,
    members: bool = False,
) -> VolumePrediction:
    """Lesion logits (and the mask) of a raw 3D image with a trained network and its model card.

    Steps: :func:`preprocessing.prepare_case` (resampling to the model's voxel spacing,
    :func:`~IWSegmentationLib.nn.model_card.card_spacing`, unless ``keep_spacing``; then intensity
    scaling and the organ mask), the foreground for skipping
    (:func:`preprocessing.foreground_mask`: the organ mask, else the lung field for ``ct-lung``,
    else the preset's body threshold),
    :func:`sliding_window_inference` of the logits ``model(x)`` (blended), resampling the logits
    back to the input grid (as nnU-Net resamples logits before its softmax), and
    ``mask = logits > logit(threshold)``. Logits are blended rather than probabilities: the
    measurement behind that choice is in docs/inference.md.

    Args:
        model: the network (``load_checkpoint``'s first value), or several networks whose cards
            agree (:func:`check_ensemble`): an ensemble whose logits are averaged
            (:class:`EnsemblePredictor`). Each is put in ``eval()`` mode and moved to ``device``
            (to the CPU on an out-of-memory fallback).
        image: raw ``[z, y, x]`` intensities (HU for CT), or ``[C, z, y, x]`` for a network of
            ``C`` input channels (the card's ``architecture.in_channels``; another count is
            refused). Each channel is prepared on its own; the foreground (skipping) is taken
            from channel 0. NaN/inf voxels raise :class:`InputError`.
        metadata: the checkpoint's model card (``patch_size``, ``preprocessing``, ``threshold``).
        geometry: the image's :class:`~IWSegmentationLib.core.imageio.Geometry` (spacing matters when
            the card resamples); default: 1 mm isotropic, axis-aligned.
        organ_mask: the organ mask the preset names (e.g. lungs for ``ct-lung``), same grid. Voxels
            outside it get :data:`~IWSegmentationLib.core.confidence.SKIPPED_LOGIT` (probability 0)
            when the preset masks (its ``mask`` is not None). A card
            with ``crop_to_organ`` (the network was trained on organ boxes) crops the prepared
            input to :func:`preprocessing.organ_box` of it and pastes the prediction back (no
            lesion outside the box); without a mask such a card gets a warning.
        overlap, threshold, blend: override the card's values (see :func:`inference_settings`).
        precision: ``auto`` (fp16 autocast on CUDA, fp32 elsewhere), ``fp32``, ``fp16``, ``bf16``.
        skip_background: skip windows outside the foreground (their voxels get
            :data:`~IWSegmentationLib.core.confidence.SKIPPED_LOGIT`, probability 0).
        channels_last: use ``channels_last_3d`` weights with the eager engine (default: on for
            CPU and CUDA, where it is faster for 3D convolutions; off on MPS).
        engine: ``auto`` (``frozen`` for fp32 on the CPU with a narrow network, see
            :func:`resolve_engine`; else ``eager``), ``frozen``
            (:func:`freeze_for_cpu`; falls back to eager with a warning if it cannot be built)
            or ``eager`` (the module as it is).
        tta: test-time mirroring (:class:`MirroredPredictor`): 8 passes per window, averaged.
        logit_threshold: the mask's threshold given as a logit (an operating point of the card,
            ``core.operating_points``), used instead of ``threshold``; the result's ``threshold``
            is its sigmoid. A logit, so a threshold above logit 37 (probability 1.0 in float64) stays exact.
        keep_spacing: run the network on the input's own grid, not resampled to the model's
            spacing (nor to the preset's ``target_spacing``).
        members: with ``tta`` or several models, also return each member's logit map
            (:attr:`VolumePrediction.members`, for per-lesion doubt): the window blends every
            member as a channel (:class:`MemberPredictor`) in the same pass, and the logits are
            their mean. Ignored (None) for one model without TTA; see :func:`member_logit_maps`.
    """
    models = [model] if isinstance(model, nn.Module) else list(model)
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise InputError(f"model must be a torch.nn.Module or a list of them, got {type(model).__name__}")
    if not isinstance(metadata, Mapping) or "preprocessing" not in metadata:
        raise InputError("checkpoint metadata lacks 'preprocessing': cannot prepare the image")
    settings = inference_settings(metadata)
    params = validate_params(dict(metadata["preprocessing"]))
    # the model's voxel spacing replaces the preset's target_spacing (it agrees with it where set)
    params["target_spacing"] = None if keep_spacing else card_spacing(metadata)
    if logit_threshold is None:
        threshold = float(metadata.get("threshold", 0.5) if threshold is None else threshold)
        logit_threshold = probability_to_logit(threshold)
    else:
        logit_threshold = float(logit_threshold)
        threshold = float(sigmoid(np.float64(logit_threshold)))
    image = np.asarray(image)
    if image.ndim not in (3, 4):
        raise InputError(f"image must be a 3D array [z, y, x] or, with several channels, [C, z, y, x]; "
                         f"got shape {image.shape}")
    check_in_channels(metadata, 1 if image.ndim == 3 else image.shape[0], "the image")
    spatial = image if image.ndim == 3 else image[0]  # the grid, for the foreground (all channels share it)
    geometry = geometry or Geometry.identity(spatial.shape)
    device = resolve_device(device)
    precision = resolve_precision(precision, device)

    stats = InferenceStats()
    report = on_warning or (lambda message: warnings.warn(message, RuntimeWarning, stacklevel=2))

    def warn(message: str) -> None:
        stats.warnings.append(message)
        report(message)

    if params["target_spacing"] is not None:  # refused before anything is allocated
        check_resampled_memory(geometry, resampled_geometry(geometry, params["target_spacing"]),
                               channels=1 if image.ndim == 3 else image.shape[0])
    network_input, work_geometry, work_organ = prepare_case(image, geometry, params, organ_mask)
    foreground = None
    if skip_background:
        foreground = foreground_mask(spatial, params, organ_mask, on_warning=warn, spacing_zyx=geometry.spacing_zyx)
        if foreground is not None and work_geometry != geometry:
            foreground = resample_to_geometry(foreground.view(np.uint8), geometry, work_geometry, is_mask=True) != 0
    box = card_organ_box(metadata, work_organ, warn)
    if box is not None:  # the network sees the organ box it was trained on; pasted back below
        network_input = box.crop(network_input)
        foreground = None if foreground is None else box.crop(foreground)

    networks = [prepare_network(m, engine, device, precision, channels_last, warn) for m in models]
    stats.engine = "frozen" if all(n is not m for n, m in zip(networks, models)) else "eager"
    predictor: nn.Module = EnsemblePredictor(networks) if len(networks) > 1 else networks[0]
    if tta:
        predictor = MirroredPredictor(predictor)
    if members and (tta or len(networks) > 1):
        predictor = MemberPredictor(networks, tta)
        member_count = predictor.count
    else:
        member_count = 0
    try:
        logits = sliding_window_inference(
            network_input,
            predictor,
            settings["patch_size"],
            overlap=settings["overlap"] if overlap is None else overlap,
            blend=blend or settings["blend"],
            batch_size=batch_size,
            device=device,
            precision=precision,
            foreground=foreground,
            pad_value=float(network_input.min()),
            fill_value=SKIPPED_LOGIT,
            progress=progress,
            cancel=cancel,
            on_warning=on_warning,
            stats=stats,
        )
    finally:
        for m in models:
            m.to(memory_format=torch.contiguous_format)
    del network_input, foreground
    member_maps = None
    if member_count:  # the mean of the members is the blended logit map; the members kept as float16
        member_maps = logits.astype(np.float16)
        logits = logits.mean(axis=0, dtype=np.float32, keepdims=True)
    if logits.shape[0] != 1:
        raise InputError(f"the model returns {logits.shape[0]} channels; lesion segmentation needs 1")
    logits = logits[0]
    if member_maps is not None:
        member_maps = member_logit_maps(member_maps, box, work_geometry, geometry,
                                        organ_mask if params["mask"] is not None else None)
    if box is not None:
        logits = box.paste(logits, fill=SKIPPED_LOGIT)  # outside the organ box: no lesion (probability 0)
    if work_geometry != geometry:
        # points of the input grid beyond the coarse grid's edge read as skipped, not as logit 0 (p = 0.5)
        logits = resample_to_geometry(logits, work_geometry, geometry, default_value=SKIPPED_LOGIT)
    if organ_mask is not None and params["mask"] is not None:
        # outside the organ the input was masked away: no lesion there, probability exactly 0
        np.copyto(logits, np.float32(SKIPPED_LOGIT), where=np.asarray(organ_mask) == 0)
    mask = (logits > logit_threshold).view(np.uint8)
    return VolumePrediction(logits=logits, mask=mask, threshold=threshold, stats=stats,
                            logit_threshold=float(logit_threshold), members=member_maps)


def member_logit_maps(members: np.ndarray, box: OrganBox | None, work_geometry: Geometry, geometry: Geometry,
                      organ_mask: np.ndarray | None) -> np.ndarray:
    """The members' float16 logit maps ``[M, ...]`` of the network's grid brought to the input grid
    as the blended map is (organ box pasted back, resampled, SKIPPED_LOGIT outside the organ mask),
    one member at a time in float32, so only one float32 member map is held besides the result.

    Why float16 maps and one pass (measured in docs/benchmarks.md, "TTA doubt"): the alternative, a
    second pass that keeps a running maximum per member over the final lesions, would run every
    window twice, and per-lesion doubt is to cost what TTA costs. The window accumulates the M
    members in float32 (M times the blended map's memory, 8 for TTA: the price of one pass); then
    they are kept as float16, half of that: 8 x 2 bytes per voxel for TTA, 1 GB for a
    512 x 512 x 128 CT. Float16 keeps a logit to 3 significant digits (0.008 at logit 10), finer
    than the spread that makes a lesion doubtful (:data:`~IWSegmentationLib.core.doubt.DOUBT_SD_LOGIT`);
    SKIPPED_LOGIT (-1e4) is exact in float16."""
    out = np.empty((members.shape[0], *geometry.shape_zyx), dtype=np.float16)
    outside = None if organ_mask is None else np.asarray(organ_mask) == 0
    for m in range(members.shape[0]):
        member = members[m].astype(np.float32)
        if box is not None:
            member = box.paste(member, fill=SKIPPED_LOGIT)
        if work_geometry != geometry:
            member = resample_to_geometry(member, work_geometry, geometry, default_value=SKIPPED_LOGIT)
        if outside is not None:
            np.copyto(member, np.float32(SKIPPED_LOGIT), where=outside)
        out[m] = member
    return out
