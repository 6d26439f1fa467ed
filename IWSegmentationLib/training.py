"""The trainer: patch-based training of the inverse-weighted 3D U-Net, as in the paper.

Shirokikh et al., "Universal Loss Reweighting to Balance Lesion Size Inequality in 3D
Medical Image Segmentation" (MICCAI 2020), section 4.2: SGD with Nesterov momentum 0.9,
lr 1e-2 lowered to 1e-3 at 80% of training, 100 epochs of 100 iterations, batches of two
128³ patches; with probability 0.5 a patch is centred on a random voxel of a uniformly
chosen lesion, otherwise placed uniformly. Lesions are the connected components of the
whole reference mask; the inverse weights of a patch are computed from the in-patch voxel
counts of its cropped label map (:func:`IWSegmentationLib.weights.component_weights`).

Everything is configurable through :class:`TrainConfig` (a YAML file plus ``--set key=value``
overrides; unknown keys are refused with the list of valid ones). One call of
:func:`train` runs the whole job:

* cases are read, preprocessed (the same :mod:`preprocessing` code path inference uses) and
  split by case id; patches come from the data module's sampler in DataLoader worker
  processes, so the step does not wait on data (the wait is measured and logged);
* the content of every batch is a function of ``(seed, rank, epoch)`` only, which makes a
  run reproducible on CPU and lets ``resume`` continue *exactly* where a killed run stopped
  (the resume state -- weights, optimizer, scheduler, AMP scaler, RNG states, epoch -- is
  written atomically at the end of every epoch, without pickle);
* every ``val_every`` epochs the model is evaluated with the lesion-wise metrics
  (sliding-window prediction of whole validation cases) and the best and last checkpoints
  are written atomically with their model card;
* under ``torchrun`` it trains with DistributedDataParallel (gloo on CPU, nccl on GPU); each
  rank samples with its own seed and only rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

from .errors import CheckpointError, InputError

if TYPE_CHECKING:
    from .progress import CancelState

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

#: Metrics a run can select its best checkpoint by (keys of the validation report; higher is better).
#: ``cpm_object_dice`` (the default) is the harmonic mean of CPM and object Dice: a model that
#: paints one blob over many lesions has a high CPM under the paper's hit rule but an object
#: Dice near 0, so it cannot win on detection alone.
VAL_METRICS = ("cpm_object_dice", "cpm", "avg_recall_0_5", "object_dice", "small_avg_recall_0_5",
               "small_object_dice")
#: The merging warning: recall at least this high with object Dice below MERGE_WARNING_DICE.
MERGE_WARNING_RECALL = 0.5
MERGE_WARNING_DICE = 0.1
LR_SCHEDULES = ("step", "cosine", "constant")
AMP_MODES = ("auto", "off", "fp16", "bf16")
OPTIMIZERS = ("sgd", "adam", "adamw")
DATA_FORMATS = ("auto", "msd", "lits", "luna", "folder")


def _key(default: Any, kind: str, help: str, *, section: str):
    """A config field: its default, its kind (for parsing ``--set`` values) and its documentation."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)),
                     metadata={"kind": kind, "help": help, "section": section})
    return field(default=default, metadata={"kind": kind, "help": help, "section": section})


@dataclass
class TrainConfig:
    """Every setting of a training run. Defaults reproduce the paper's setup (section 4.2).

    Build one with :func:`load_config` (YAML + overrides) or ``TrainConfig.from_dict``;
    both refuse unknown keys. ``kind`` in each field's metadata says how a ``--set`` value
    is parsed; ``help`` is the documentation shown in ``docs/training.md``.
    """

    # -- data ---------------------------------------------------------------------------------
    data: str = _key("", "str", "Dataset folder (MSD layout with dataset.json, LiTS, LUNA16-style or a plain "
                     "folder of image/label pairs). Required.", section="data")
    data_format: str = _key("auto", "str", f"Dataset layout: one of {', '.join(DATA_FORMATS)}.", section="data")
    allow_outside_paths: bool = _key(False, "bool", "Accept dataset.json paths that lead outside the dataset "
                                     "folder (absolute paths, '..'); refused by default.", section="data")
    splits: str | None = _key(None, "str?", "JSON file with case-id lists under 'train', 'val' (and optionally "
                              "'test'); when null the split is drawn from the fractions below.", section="data")
    val_fraction: float = _key(0.2, "float", "Fraction of cases held out for validation (when 'splits' is null).",
                               section="data")
    test_fraction: float = _key(0.0, "float", "Fraction of cases held out as a test split, never touched by "
                                "training (when 'splits' is null).", section="data")
    split_seed: int = _key(0, "int", "Seed of the random split.", section="data")
    preprocessing: str = _key("ct-liver", "str", "Intensity preset (ct-lung, ct-liver, mr); stored in the "
                              "checkpoint and applied identically at inference.", section="data")
    target_spacing: list | None = _key(None, "float3?", "Resample every case to this spacing (z, y, x) in mm; "
                                       "null keeps the native grid.", section="data")
    lesion_values: list | None = _key(None, "list?", "Label values that are lesion (null: from the dataset "
                                      "definition, e.g. LiTS tumour = 2, or 1).", section="data")
    empty_cases: str = _key("warn", "str", "Training cases without any lesion: 'warn' (keep them; they give "
                            "uniform patches), 'skip' (drop them) or 'error'.", section="data")
    cache_size: int | None = _key(None, "int?", "Training cases kept in memory per process (null: all, loaded and "
                                  "checked before training; else loaded lazily by the workers).", section="data")
    connectivity: int = _key(26, "int", "Connectivity (6, 18, 26) used to label lesions on the whole image.",
                             section="data")
    # -- model and loss ----------------------------------------------------------------------
    model_size: str = _key("paper", "str", "Network preset of models.default_config: paper (11.07 M parameters), "
                           "small (0.71 M, the CPU config's) or tiny (86 k, the demo's and the tests').", section="model")
    model: dict = _key({}, "dict", "Overrides of the preset (e.g. {channels: [8, 16, 32, 64], blocks_per_level: 1}); "
                       "dotted overrides work: --set model.channels=[8,16,32,64].", section="model")
    loss: str = _key("iw-dice", "str", "Loss name from losses.LOSS_NAMES (bce, iw-bce, focal, iw-focal, dice, "
                     "iw-dice, asl, iw-asl, wce, gdl, dbce, combo, iw-combo).", section="model")
    loss_params: dict = _key({}, "dict", "Keyword arguments of losses.get_loss (e.g. {beta: 1.5} for asl). For "
                             "iw-* losses, mode (clip/exact), w_min and w_max also set the per-patch inverse weights.",
                             section="model")
    init_checkpoint: str | None = _key(None, "str?", "Start from the weights of this checkpoint (same "
                                       "architecture) instead of a random initialisation.", section="model")
    # -- sampling ----------------------------------------------------------------------------
    patch_size: list = _key([128, 128, 128], "int3", "Training patch size (z, y, x) in voxels; each side a "
                            "multiple of the network stride.", section="sampling")
    batch_size: int = _key(2, "int", "Patches per step (per rank under DDP).", section="sampling")
    lesion_probability: float = _key(0.5, "float", "Probability that a patch is centred on a random voxel of a "
                                     "uniformly chosen lesion (else placed uniformly).", section="sampling")
    num_workers: int = _key(2, "int", "DataLoader worker processes that sample patches in the background "
                            "(0 = in the training process).", section="sampling")
    prefetch_factor: int = _key(4, "int", "Batches each worker prepares ahead.", section="sampling")
    augment: bool = _key(False, "bool", "Light augmentation: random flips and intensity scale/shift (the paper "
                         "used none).", section="sampling")
    flip_prob: float = _key(0.5, "float", "Probability of flipping each axis when 'augment' is on.",
                            section="sampling")
    intensity_scale: float = _key(0.1, "float", "Intensity multiplied by U(1-s, 1+s) when 'augment' is on.",
                                  section="sampling")
    intensity_shift: float = _key(0.1, "float", "Intensity shifted by U(-s, s) when 'augment' is on.",
                                  section="sampling")
    # -- optimisation ------------------------------------------------------------------------
    epochs: int = _key(100, "int", "Number of epochs.", section="optimisation")
    iters_per_epoch: int = _key(100, "int", "Optimizer steps per epoch.", section="optimisation")
    optimizer: str = _key("sgd", "str", f"One of {', '.join(('sgd', 'adam', 'adamw'))}: SGD with (Nesterov) momentum "
                          "(the paper), or Adam/AdamW (betas 0.9, 0.999; 'momentum' and 'nesterov' unused).",
                          section="optimisation")
    lr: float = _key(1e-2, "float", "Initial learning rate.", section="optimisation")
    lr_schedule: str = _key("step", "str", f"One of {', '.join(LR_SCHEDULES)}: 'step' drops lr to lr_final at "
                            "lr_decay_at of the epochs (the paper); 'cosine' anneals to lr_final.",
                            section="optimisation")
    lr_final: float = _key(1e-3, "float", "Learning rate after the drop (step) or at the end (cosine).",
                           section="optimisation")
    lr_decay_at: float = _key(0.8, "float", "Fraction of the epochs after which the step schedule drops the lr.",
                              section="optimisation")
    momentum: float = _key(0.9, "float", "SGD momentum.", section="optimisation")
    nesterov: bool = _key(True, "bool", "Nesterov momentum.", section="optimisation")
    weight_decay: float = _key(0.0, "float", "L2 weight decay.", section="optimisation")
    grad_clip: float | None = _key(None, "float?", "Clip the gradient norm to this value (null: no clipping).",
                                   section="optimisation")
    amp: str = _key("auto", "str", f"Mixed precision: one of {', '.join(AMP_MODES)}; 'auto' is bf16 (or fp16 "
                    "with loss scaling) on CUDA and off on CPU.", section="optimisation")
    seed: int = _key(0, "int", "Seed of weights initialisation, patch sampling and augmentation.",
                     section="optimisation")
    device: str = _key("auto", "str", "auto, cpu, cuda, cuda:N or mps. Under torchrun each rank uses "
                       "cuda:LOCAL_RANK.", section="optimisation")
    # -- validation --------------------------------------------------------------------------
    val_every: int = _key(10, "int", "Validate every this many epochs (and after the last); 0 disables "
                          "validation (then 'best' is the last).", section="validation")
    val_metric: str = _key("cpm_object_dice", "str", f"Metric that picks the best checkpoint: one of "
                           f"{', '.join(VAL_METRICS)}; cpm_object_dice is the harmonic mean of CPM and "
                           "object Dice, so a model that merges lesions is not preferred.", section="validation")
    val_hit_rule: str = _key("paper", "str", "When a predicted component hits a lesion at validation: paper "
                             "(any overlap, many-to-one), one-to-one, panoptica, or terms such as "
                             "'hungarian,iou>0.5' (docs/metrics.md).", section="validation")
    min_lesion_size: str | None = _key(None, "str?", "Drop predicted lesions smaller than this at validation "
                                       "and, through the model card, at inference: e.g. '10vox' or '5mm3' "
                                       "(null: keep all).", section="validation")
    val_max_cases: int | None = _key(None, "int?", "Validate on at most this many validation cases "
                                     "(null: all).", section="validation")
    val_patch_size: list | None = _key(None, "int3?", "Sliding-window size for validation and the checkpoint's "
                                       "inference default (null: patch_size).", section="validation")
    val_overlap: float = _key(0.25, "float", "Sliding-window overlap at validation.", section="validation")
    threshold: float = _key(0.5, "float", "Probability threshold of the predicted mask.", section="validation")
    size_preset: str = _key("liver", "str", "Lesion size groups (lung, liver, metastases) for by-size metrics; "
                            "stored in the checkpoint.", section="validation")
    size_thresholds: list | None = _key(None, "float2?", "Explicit [small_mm, large_mm] equivalent-diameter "
                                        "cut-offs, overriding size_preset.", section="validation")
    # -- output ------------------------------------------------------------------------------
    out: str = _key("runs/iwseg", "str", "Output folder: checkpoints, resume state, CSV log, TensorBoard "
                    "events, the resolved config.", section="output")
    overwrite: bool = _key(False, "bool", "Start a new run even if OUT already holds one (its checkpoints and "
                           "logs are replaced as the new run writes them).", section="output")
    tensorboard: bool = _key(True, "bool", "Write TensorBoard scalars to OUT/tensorboard (needs tensorboard).",
                             section="output")
    progress: bool = _key(True, "bool", "Show the tqdm progress bars (loading cases, training, validating); "
                          "false hides them all, log lines stay.", section="output")
    ddp_timeout_min: float = _key(60.0, "float", "DDP collective timeout in minutes (rank 0 validates while "
                                  "the others wait).", section="output")

    # ---------------------------------------------------------------------------------------
    @classmethod
    def key_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> TrainConfig:
        """Build a config from a mapping; unknown keys raise :class:`InputError` listing the valid ones."""
        if not isinstance(values, Mapping):
            raise InputError(f"{source} must be a mapping of key: value, got {type(values).__name__}")
        valid = cls.key_names()
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise InputError(
                f"{source}: unknown config key(s) {', '.join(map(repr, unknown))}. "
                f"Valid keys: {', '.join(valid)}"
            )
        kinds = {f.name: f.metadata["kind"] for f in fields(cls)}
        parsed = {k: _coerce(k, v, kinds[k], source) for k, v in values.items()}
        config = cls(**parsed)
        config.validate()
        return config

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        """Check ranges and choices; raise :class:`InputError` naming the key."""
        def need(cond: bool, key: str, what: str) -> None:
            if not cond:
                raise InputError(f"config key {key!r} {what}, got {getattr(self, key)!r}")

        need(self.empty_cases in ("warn", "skip", "error"), "empty_cases", "must be 'warn', 'skip' or 'error'")
        need(self.cache_size is None or self.cache_size >= 1, "cache_size", "must be >= 1 or null")
        need(self.data_format in DATA_FORMATS, "data_format", f"must be one of {', '.join(DATA_FORMATS)}")
        need(0 <= self.val_fraction < 1, "val_fraction", "must be in [0, 1)")
        need(0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1, "test_fraction",
             "must be in [0, 1) with val_fraction + test_fraction < 1")
        need(self.connectivity in (6, 18, 26), "connectivity", "must be 6, 18 or 26")
        need(all(v > 0 for v in self.patch_size), "patch_size", "must be three positive sizes")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(0 <= self.lesion_probability <= 1, "lesion_probability", "must be in [0, 1]")
        need(self.num_workers >= 0, "num_workers", "must be >= 0")
        need(self.prefetch_factor >= 1, "prefetch_factor", "must be >= 1")
        need(0 <= self.flip_prob <= 1, "flip_prob", "must be in [0, 1]")
        need(0 <= self.intensity_scale < 1, "intensity_scale", "must be in [0, 1)")
        need(self.intensity_shift >= 0, "intensity_shift", "must be >= 0")
        need(self.epochs >= 1, "epochs", "must be >= 1")
        need(self.iters_per_epoch >= 1, "iters_per_epoch", "must be >= 1")
        need(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.lr_final > 0, "lr_final", "must be > 0")
        need(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"must be one of {', '.join(LR_SCHEDULES)}")
        need(0 < self.lr_decay_at <= 1, "lr_decay_at", "must be in (0, 1]")
        need(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be > 0 or null")
        need(self.amp in AMP_MODES, "amp", f"must be one of {', '.join(AMP_MODES)}")
        need(self.val_every >= 0, "val_every", "must be >= 0")
        need(self.val_metric in VAL_METRICS, "val_metric", f"must be one of {', '.join(VAL_METRICS)}")
        self._validate_detection_keys(need)
        need(self.val_max_cases is None or self.val_max_cases >= 1, "val_max_cases", "must be >= 1 or null")
        need(self.val_patch_size is None or all(v > 0 for v in self.val_patch_size), "val_patch_size",
             "must be three positive sizes or null")
        need(0 <= self.val_overlap < 1, "val_overlap", "must be in [0, 1)")
        need(0 < self.threshold < 1, "threshold", "must be in (0, 1)")
        need(self.ddp_timeout_min > 0, "ddp_timeout_min", "must be > 0")
        need(bool(self.out), "out", "must name an output folder")
        self._validate_components()
        self._validate_patch_stride()
        if self.size_thresholds is not None:
            need(0 < self.size_thresholds[0] < self.size_thresholds[1], "size_thresholds",
                 "must be [small_mm, large_mm] with 0 < small < large")
        else:
            from .lesions import SIZE_PRESETS

            need(self.size_preset in SIZE_PRESETS, "size_preset", f"must be one of {', '.join(SIZE_PRESETS)}")

    def _validate_components(self) -> None:
        """Check the names other modules resolve (model, loss, preset), so a typo fails before any data is read."""
        from .losses import get_loss
        from .preprocessing import PRESETS

        if self.preprocessing not in PRESETS:
            raise InputError(f"config key 'preprocessing' must be one of {', '.join(PRESETS)}, got {self.preprocessing!r}")
        for key, check in (("model", lambda: self.model_config()), ("loss", lambda: get_loss(self.loss, **self.loss_params))):
            try:
                check()
            except InputError as exc:
                raise InputError(f"config key {key!r}: {exc}") from None

    def _validate_patch_stride(self) -> None:
        """Each training patch side must be a multiple of the network stride (the U-Net pools
        ``len(channels) - 1`` times); the message names the nearest valid sizes."""
        from .models import model_stride

        stride = model_stride(self.model_config())
        if all(p % stride == 0 for p in self.patch_size):
            return
        down = [max(stride, p // stride * stride) for p in self.patch_size]
        up = [-(-p // stride) * stride for p in self.patch_size]
        options = [down] + ([up] if up != down else [])
        nearest = " or ".join(str(v) for v in options)
        raise InputError(
            f"config key 'patch_size' must be a multiple of the network stride {stride} on every side "
            f"(the U-Net pools {stride.bit_length() - 1} times), got {self.patch_size}; nearest valid: {nearest}"
        )

    def model_config(self, in_channels: int | None = None) -> dict:
        """The validated architecture config: preset ``model_size`` with the ``model`` overrides.

        ``in_channels``: the image channels of the data (the trainer passes the dataset's), which
        the network takes; a ``model.in_channels`` set in the config must agree with it."""
        from .models import default_config

        overrides = dict(self.model)
        if in_channels is not None:
            given = overrides.get("in_channels")
            if given is not None and given != in_channels:
                raise InputError(f"config key 'model.in_channels' is {given!r} but the dataset's images have "
                                 f"{in_channels} channel(s); remove the key (it follows the data) or fix the data")
            overrides["in_channels"] = in_channels
        return default_config(self.model_size, **overrides)

    def preprocessing_params(self) -> dict:
        """The preprocessing preset dict stored in the checkpoint (with ``target_spacing`` applied)."""
        from .preprocessing import get_preset

        return get_preset(self.preprocessing, target_spacing=self.target_spacing)

    def weight_params(self) -> dict:
        """``component_weights`` keyword arguments of an iw-* loss (its mode, w_min, w_max)."""
        from .losses import loss_parameters

        defaults = loss_parameters(self.loss)
        return {k: self.loss_params.get(k, defaults[k]) for k in ("mode", "w_min", "w_max") if k in defaults}

    @property
    def inverse_weighted(self) -> bool:
        """Whether the loss takes per-patch inverse weights (``iw-*`` losses)."""
        return self.loss.strip().lower().replace("_", "-").startswith("iw-")

    def _validate_detection_keys(self, need) -> None:
        """``val_hit_rule`` and ``min_lesion_size`` must parse (their own messages say how)."""
        for key in ("val_hit_rule", "min_lesion_size"):
            try:
                self.detection_rule(key)
            except InputError as exc:
                need(False, key, str(exc))

    def detection_rule(self, only: str | None = None):
        """``(HitRule, MinLesionSize | None)`` of validation, from ``val_hit_rule`` and ``min_lesion_size``."""
        from .lesions import parse_min_lesion_size
        from .metrics import parse_hit_rule

        rule = parse_hit_rule(self.val_hit_rule) if only in (None, "val_hit_rule") else None
        size = parse_min_lesion_size(self.min_lesion_size) if only in (None, "min_lesion_size") else None
        return rule, size

    def size_groups(self):
        from .lesions import size_thresholds

        return size_thresholds(self.size_preset, self.size_thresholds)

    @property
    def inference_patch_size(self) -> list[int]:
        return list(self.val_patch_size or self.patch_size)


def _coerce(key: str, value: Any, kind: str, source: str) -> Any:
    """Check/convert one config value to its declared kind; errors name the key."""
    optional = kind.endswith("?")
    base = kind.rstrip("?")
    if value is None:
        if optional:
            return None
        raise InputError(f"{source}: config key {key!r} may not be null")

    def bad(what: str):
        return InputError(f"{source}: config key {key!r} must be {what}, got {value!r}")

    if base == "str":
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if base == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise bad("true or false")
    if base == "int":
        if isinstance(value, bool):
            raise bad("an integer")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise bad("an integer") from None
        if not as_float.is_integer():
            raise bad("an integer")
        return int(as_float)
    if base == "float":
        if isinstance(value, bool):
            raise bad("a number")
        try:
            out = float(value)  # also takes YAML's "1e-3", which PyYAML reads as a string
        except (TypeError, ValueError):
            raise bad("a number") from None
        if not math.isfinite(out):
            raise bad("a finite number")
        return out
    if base in ("int3", "float3", "float2"):
        n = int(base[-1])
        if isinstance(value, (int, float)) and not isinstance(value, bool) and base == "int3":
            value = [value] * 3  # "patch_size: 96" means 96³
        if not isinstance(value, (list, tuple)) or len(value) != n:
            raise bad(f"a list of {n} numbers")
        item = "int" if base.startswith("int") else "float"
        return [_coerce(key, v, item, source) for v in value]
    if base == "list":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        return list(value)
    if base == "dict":
        if not isinstance(value, Mapping):
            raise bad("a mapping")
        return dict(value)
    raise AssertionError(f"unknown config kind {kind}")


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Parse ``["key=value", "model.channels=[8,16,32,64]"]`` into a nested dict (values are YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for item in overrides or ():
        if "=" not in item:
            raise InputError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise InputError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise InputError(f"override {item!r}: value is not valid YAML ({exc.__class__.__name__})") from None
        head, _, rest = key.partition(".")
        if rest:
            out.setdefault(head, {})
            if not isinstance(out[head], dict):
                raise InputError(f"override {item!r} conflicts with an earlier override of {head!r}")
            out[head][rest] = value
        else:
            out[key] = value
    return out


def merge_config(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``overrides``; a dotted override (dict value) updates a dict key of ``base``."""
    merged = dict(base)
    dict_keys = {f.name for f in fields(TrainConfig) if f.metadata["kind"] == "dict"}
    for key, value in overrides.items():
        if key in dict_keys and isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] | Mapping[str, Any] = ()) -> TrainConfig:
    """Read a YAML config (or start from the defaults when ``path`` is None) and apply overrides.

    ``overrides`` is a list of ``key=value`` strings (the CLI's ``--set``) or a mapping.
    Unknown keys, in the file or the overrides, raise :class:`InputError` listing the valid keys.
    """
    import yaml

    values: dict[str, Any] = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise InputError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise InputError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise InputError(f"config file {path} must hold a mapping of key: value")
        values = dict(loaded)
    extra = parse_overrides(overrides) if not isinstance(overrides, Mapping) else dict(overrides)
    if extra:
        source = f"{source} + overrides" if path is not None else "overrides"
    return TrainConfig.from_dict(merge_config(values, extra), source=source)


def config_reference_markdown() -> str:
    """The config reference table (every key, default, meaning) as markdown, grouped by section."""
    lines: list[str] = []
    section = None
    for f in fields(TrainConfig):
        if f.metadata["section"] != section:
            section = f.metadata["section"]
            lines += ["", f"### {section.capitalize()}", "", "| key | default | meaning |", "|---|---|---|"]
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        shown = "null" if default is None else json.dumps(default)
        if isinstance(default, str):
            shown = default or '""'
        lines.append(f"| `{f.name}` | `{shown}` | {f.metadata['help']} |")
    return "\n".join(lines).lstrip() + "\n"


# ---------------------------------------------------------------------------------------------
# Optimiser and learning-rate schedule
# ---------------------------------------------------------------------------------------------


def build_optimizer(model, config: TrainConfig):
    """SGD with (Nesterov) momentum, the paper's optimiser; or Adam/AdamW."""
    import torch

    if config.optimizer in ("adam", "adamw"):
        cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
        return cls(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov and config.momentum > 0,
        weight_decay=config.weight_decay,
    )


def build_scheduler(optimizer, config: TrainConfig):
    """Per-epoch schedule (stepped once after every epoch). Its state is plain numbers (no lambdas),
    so it round-trips through the resume state without pickle.

    * ``step``: ``lr`` for the first ``round(lr_decay_at · epochs)`` epochs, then ``lr_final``
      (paper: 1e-2 for epochs 0-79, 1e-3 for epochs 80-99);
    * ``cosine``: cosine annealing from ``lr`` to ``lr_final`` over the epochs;
    * ``constant``: ``lr`` throughout.
    """
    import torch

    if config.lr_schedule == "step":
        milestone = max(1, int(round(config.lr_decay_at * config.epochs)))
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[milestone], gamma=config.lr_final / config.lr)
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs, eta_min=config.lr_final)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def lr_at_epoch(config: TrainConfig, epoch: int) -> float:
    """The learning rate the schedule gives during ``epoch`` (0-based); used by the docs and tests."""
    if config.lr_schedule == "step":
        milestone = max(1, int(round(config.lr_decay_at * config.epochs)))
        return config.lr if epoch < milestone else config.lr_final
    if config.lr_schedule == "cosine":
        return config.lr_final + (config.lr - config.lr_final) * (1 + math.cos(math.pi * epoch / config.epochs)) / 2
    return config.lr


# ---------------------------------------------------------------------------------------------
# Devices, mixed precision and DistributedDataParallel
# ---------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    """Where this process sits in a (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: Any = None  # torch.device
    owns_group: bool = False  # this call created the process group (and destroys it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0):
    """``auto`` -> cuda:LOCAL_RANK if available, else mps, else cpu; an unavailable device is an InputError."""
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"config key 'device': unknown device {name!r} (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("config key 'device' is 'cuda' but no CUDA GPU is available; use device: auto or cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("config key 'device' is 'mps' but MPS is not available; use device: auto or cpu")
    return device


def setup_distributed(config: TrainConfig) -> DistInfo:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1), else a single process.

    Backend: nccl when the ranks train on CUDA, gloo otherwise (CPU). Each rank trains on
    ``cuda:LOCAL_RANK`` when ``device`` is auto/cuda.
    """
    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(config.device, local_rank)
    info = DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)
    if world_size > 1 and not dist.is_initialized():
        info.owns_group = True
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(
            backend=backend, timeout=datetime.timedelta(minutes=config.ddp_timeout_min), **kwargs
        )
    return info


def cleanup_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _barrier(info: DistInfo) -> None:
    if info.distributed:
        import torch.distributed as dist

        if info.device is not None and info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def amp_settings(config: TrainConfig, device) -> tuple[bool, Any, bool]:
    """``(enabled, dtype, use_grad_scaler)`` for ``torch.autocast`` on ``device``."""
    import torch

    mode = config.amp
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return False, None, False
    if device.type != "cuda":
        if mode == "fp16":
            raise InputError("config key 'amp': fp16 needs a CUDA device; use amp: bf16 or off on CPU")
        return True, torch.bfloat16, False
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mode == "bf16":
        return True, torch.bfloat16, False
    return True, torch.float16, True


# ---------------------------------------------------------------------------------------------
# Seeds and RNG state
# ---------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices) global generators."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Logging: tqdm bar, CSV, TensorBoard (rank 0 only)
# ---------------------------------------------------------------------------------------------

#: Columns of OUT/log.csv, one row per epoch (validation columns are empty when not validated).
CSV_COLUMNS = (
    "epoch", "lr", "loss", "seconds", "iters_per_s", "data_wait_fraction",
    "val_cpm", "val_avg_recall_0_5", "val_object_dice", "val_recall", "val_cpm_object_dice",
    "val_small_avg_recall_0_5", "val_medium_avg_recall_0_5", "val_large_avg_recall_0_5",
    "val_small_object_dice", "val_medium_object_dice", "val_large_object_dice", "best",
)


class RunLogger:
    """Writes the per-epoch CSV log and TensorBoard scalars; does nothing when ``enabled`` is False.

    On resume, rows and events of epochs after the ``start_epoch`` finished ones (from a run
    killed mid-way) are dropped, so the log reads as if the run had never stopped. The CSV's
    ``epoch`` column counts from 1, like the progress bar and the model card.
    """

    def __init__(self, out: Path, *, enabled: bool, tensorboard: bool, start_epoch: int, iters_per_epoch: int):
        self.enabled = enabled
        self.csv_path = out / LOG_FILE
        self.writer = None
        if not enabled:
            return
        self._truncate_csv(start_epoch)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional dependency (the [train] extra)
                print("note: tensorboard is not installed; TensorBoard scalars are skipped "
                      "(pip install tensorboard)", flush=True)
            else:
                purge = start_epoch * iters_per_epoch if start_epoch else None
                self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=purge)

    def _truncate_csv(self, start_epoch: int) -> None:
        from .imageio import atomic_output

        rows = []
        if self.csv_path.is_file() and start_epoch > 0:
            with open(self.csv_path, newline="", encoding="utf-8") as fh:
                rows = [r for r in csv.DictReader(fh) if r.get("epoch", "").isdigit() and int(r["epoch"]) <= start_epoch]
        with atomic_output(self.csv_path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)

    def step(self, global_step: int, loss: float) -> None:
        if self.writer is not None:
            self.writer.add_scalar("train/loss_step", loss, global_step)

    def epoch(self, row: Mapping[str, Any], global_step: int) -> None:
        if not self.enabled:
            return
        with open(self.csv_path, "a", newline="", encoding="utf-8") as fh:
            csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction="ignore").writerow(
                {k: ("" if row.get(k) is None else row.get(k)) for k in CSV_COLUMNS}
            )
        if self.writer is not None:
            for key, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("iters_per_s", "train/iters_per_s"),
                             ("data_wait_fraction", "train/data_wait_fraction")):
                if row.get(key) is not None:
                    self.writer.add_scalar(tag, float(row[key]), global_step)
            for key, value in row.items():
                if key.startswith("val_") and value is not None:
                    self.writer.add_scalar(_tensorboard_tag(key), float(value), global_step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _tensorboard_tag(key: str) -> str:
    """``val_small_avg_recall_0_5`` -> ``val/small/avg_recall_0_5``; ``val_cpm`` -> ``val/cpm``."""
    name = key[len("val_"):]
    group, _, rest = name.partition("_")
    return f"val/{group}/{rest}" if group in ("small", "medium", "large") else f"val/{name}"


# ---------------------------------------------------------------------------------------------
# Data: cases, splits, preprocessing, the patch stream
# ---------------------------------------------------------------------------------------------


class BatchWeights:
    """DataLoader-worker transform of a batch: add the per-patch inverse ``weight`` of iw-* losses.

    ``component_weights`` runs on the *cropped* whole-image component labels of each patch, so
    the weights use in-patch voxel counts, as the authors trained (lesions labelled on the
    whole image). The labels are then dropped (unless ``keep_labels``) to save the transfer.
    """

    def __init__(self, inverse_weighted: bool, weight_params: Mapping[str, Any], keep_labels: bool = False):
        self.inverse_weighted = inverse_weighted
        self.weight_params = dict(weight_params)
        self.keep_labels = keep_labels

    def __call__(self, batch: dict) -> dict:
        from .weights import component_weights

        labels = batch["labels"] if self.keep_labels else batch.pop("labels")
        if self.inverse_weighted:
            batch["weight"] = component_weights(labels, **self.weight_params)
        return batch


@dataclass
class TrainingData:
    """What :func:`load_training_data` found: the split, the training cases (preprocessed
    ``CaseVolume`` objects, or ``Case`` records loaded lazily when ``cache_size`` is set), the
    validation ``Case`` records and a summary for the model card."""

    root: Path
    layout: str
    splits: dict[str, list[str]]
    params: dict
    train_cases: list
    val_cases: list
    summary: dict
    #: Image channels of every case (``_0000``, ``_0001``... files): the network's ``in_channels``.
    channels: int = 1


def _log(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message)


def load_training_data(config: TrainConfig, *, verbose: bool = True) -> TrainingData:
    """Read the dataset listing, split it, load and preprocess the training cases.

    Errors name the case or key: an empty split, a case whose label/mask is not on its image's
    grid or holds unexpected values, training cases without lesions (``empty_cases: error``)
    or a training split without any lesion at all.
    """
    from .data import load_dataset, load_prepared_case, make_splits, read_splits

    if not config.data:
        raise InputError("config key 'data' is required: the dataset folder to train on")
    dataset = load_dataset(config.data, config.data_format, lesion_values=config.lesion_values,
                           allow_outside_paths=config.allow_outside_paths)
    if len(dataset) == 0:
        raise InputError(f"dataset {config.data} holds no cases")
    channels = dataset.channels
    if config.splits:
        splits = read_splits(config.splits, dataset.ids)
    else:
        fractions = {"train": 1.0 - config.val_fraction - config.test_fraction}
        if config.val_fraction > 0:
            fractions["val"] = config.val_fraction
        if config.test_fraction > 0:
            fractions["test"] = config.test_fraction
        splits = make_splits(dataset.ids, fractions, config.split_seed)
    if not splits.get("train"):
        raise InputError(f"the training split of {config.data} is empty")
    params = config.preprocessing_params()
    train_records = dataset.subset(splits["train"])
    val_records = dataset.subset(splits.get("val", []))
    if config.val_max_cases is not None:
        val_records = val_records[: config.val_max_cases]

    lesion_counts: dict[str, int] = {}
    if config.cache_size is None:
        from tqdm import tqdm

        from .lesions import label_components

        train_cases = []
        bar = tqdm(train_records, desc="loading training cases", unit="case", disable=not (verbose and config.progress),
                   leave=False)
        for record in bar:
            volume = load_prepared_case(record, params)
            lesion_counts[record.id] = label_components(volume.lesion, config.connectivity)[1]
            train_cases.append(volume)
        bar.close()
        empty = [cid for cid, k in lesion_counts.items() if k == 0]
        if empty and len(empty) == len(train_cases):
            raise InputError(
                f"no training case of {config.data} contains a lesion ({len(empty)} cases, e.g. {empty[0]}); "
                "check lesion_values (which label values are lesion)"
            )
        if empty:
            listing = ", ".join(empty[:10]) + (f", ... ({len(empty)} in all)" if len(empty) > 10 else "")
            if config.empty_cases == "error":
                raise InputError(f"training case(s) without any lesion: {listing} (set empty_cases: warn or skip "
                                 "to train on them anyway)")
            if config.empty_cases == "skip":
                train_cases = [v for v in train_cases if lesion_counts[v.id] > 0]
                if verbose:
                    _log(f"note: skipping {len(empty)} training case(s) without lesions: {listing}")
            elif verbose:
                _log(f"note: {len(empty)} training case(s) have no lesion and give only uniform patches: {listing}")
    else:
        train_cases = list(train_records)

    spacings = [v.geometry.spacing_zyx for v in train_cases if hasattr(v, "geometry")]
    summary = {
        "dataset": str(Path(config.data).name),
        "root": str(Path(config.data).resolve()),
        "layout": dataset.layout,
        "cases": {name: len(ids) for name, ids in splits.items()},
        "train_cases_used": len(train_cases),
        "split_seed": None if config.splits else config.split_seed,
        "split_file": config.splits,
        "train_lesions": int(sum(lesion_counts.values())) if lesion_counts else None,
        "median_spacing_zyx": [float(v) for v in np.median(np.asarray(spacings), axis=0)] if spacings else None,
        "channels": channels,
    }
    return TrainingData(Path(config.data), dataset.layout, splits, params, train_cases, val_records, summary,
                        channels)


def make_patch_dataset(config: TrainConfig, cases: Sequence, params: Mapping[str, Any], *, rank: int = 0,
                       world_size: int = 1, start_step: int = 0, steps: int | None = None,
                       keep_labels: bool = False):
    """The data module's :class:`~IWSegmentationLib.data.PatchDataset` with this config's sampler,
    augmentation, preprocessing (for lazily loaded cases) and per-patch inverse weights.

    ``cases`` are :class:`~IWSegmentationLib.data.Case` records, prepared with ``params`` when
    first loaded, or volumes already prepared with ``params`` (:func:`load_training_data`'s
    in-memory path); a raw volume or one prepared with other parameters is refused, so a case
    reaches the network prepared exactly once, as :func:`inference.predict_volume` prepares it.
    Batch ``s`` is a pure function of ``(seed, rank, s)``, whatever the number of workers.
    """
    import functools

    from .data import CaseVolume, PatchDataset, PatchSampler, augment_patch, load_prepared_case

    for case in cases:
        if isinstance(case, CaseVolume) and case.preprocessing != dict(params):
            state = "raw" if case.preprocessing is None else "prepared with other parameters"
            raise RuntimeError(f"case {case.id} is {state}: the patch dataset takes records or volumes "
                               "prepared with these parameters (data.prepare_volume)")

    sampler = PatchSampler(config.patch_size, lesion_probability=config.lesion_probability,
                           connectivity=config.connectivity)
    augment = None
    if config.augment:
        augment = functools.partial(augment_patch, flip_probability=config.flip_prob,
                                    intensity_scale=config.intensity_scale, intensity_shift=config.intensity_shift)
    return PatchDataset(
        list(cases), sampler,
        batch_size=config.batch_size, steps=steps, start_step=start_step,
        seed=config.seed, rank=rank, world_size=world_size,
        loader=functools.partial(load_prepared_case, params=dict(params)),
        augment=augment,
        transform=BatchWeights(config.inverse_weighted, config.weight_params(), keep_labels),
        cache_size=config.cache_size,
    )


# ---------------------------------------------------------------------------------------------
# Validation and the model card
# ---------------------------------------------------------------------------------------------


def validate(model, cases: Sequence, config: TrainConfig, card: Mapping[str, Any], *, device=None,
             cache: dict | None = None, verbose: bool = True) -> dict:
    """Lesion-wise evaluation of ``model`` on whole validation cases.

    Each case is predicted with :func:`inference.predict_volume` (the checkpoint's own
    preprocessing, sliding window of ``val_patch_size`` with ``val_overlap``), matched with
    :func:`metrics.match_case` and the report built by :func:`metrics.evaluate_cases`.
    ``cache`` (a dict) keeps loaded cases between validations. Returns the report (see
    :func:`metrics.evaluate_cases`); the model is left in eval mode.
    """
    from tqdm import tqdm

    from .data import load_case
    from .inference import predict_volume
    from .metrics import evaluate_cases, match_case

    thresholds = config.size_groups()
    hit_rule, min_size = config.detection_rule()
    results = []
    bar = tqdm(cases, desc="validating", unit="case", leave=False, disable=not (verbose and config.progress))
    for record in bar:
        volume = cache.get(record.id) if cache is not None else None
        if volume is None:
            volume = load_case(record)
            if cache is not None:
                cache[record.id] = volume
        pred = predict_volume(model, volume.image, card, geometry=volume.geometry, organ_mask=volume.organ,
                              device=device or "cpu", overlap=config.val_overlap, channels_last=False)
        results.append(match_case(pred.probabilities, volume.lesion, volume.geometry.spacing_zyx,
                                  threshold=config.threshold, thresholds=thresholds,
                                  connectivity=config.connectivity, case=record.id,
                                  hit_rule=hit_rule, min_lesion_size=min_size))
    bar.close()
    return evaluate_cases(results, seed=config.seed)


def metric_row(report: Mapping[str, Any] | None) -> dict[str, float | None]:
    """The flat ``val_*`` numbers of a validation report (CSV columns, TensorBoard, best metric)."""
    if not report:
        return {}
    row = {
        "val_cpm": report.get("cpm"),
        "val_avg_recall_0_5": report.get("avg_recall_0_5"),
        "val_object_dice": (report.get("object_dice") or {}).get("mean"),
        "val_recall": report.get("recall"),
    }
    # no lesion hit: object Dice is undefined, but the detection it should temper is 0 as well
    dice = row["val_object_dice"] if row["val_object_dice"] is not None or row["val_cpm"] is None else 0.0
    row["val_cpm_object_dice"] = harmonic_mean(row["val_cpm"], dice)
    for group, sub in (report.get("by_size") or {}).items():
        row[f"val_{group}_avg_recall_0_5"] = sub.get("avg_recall_0_5")
        row[f"val_{group}_cpm"] = sub.get("cpm")
        row[f"val_{group}_object_dice"] = (sub.get("object_dice") or {}).get("mean")
    return row


def compact_metrics(report: Mapping[str, Any] | None, epoch: int) -> dict | None:
    """The validation numbers stored in the model card (no per-case lists, no curves);
    ``epoch`` is the 1-based number of the epoch they were measured after."""
    if not report:
        return None

    def part(sub: Mapping[str, Any]) -> dict:
        od = sub.get("object_dice") or {}
        boot = sub.get("bootstrap") or {}
        return {
            "n_lesions": sub.get("n_lesions"),
            "recall": sub.get("recall"),
            "cpm": sub.get("cpm"),
            "cpm_std": (boot.get("cpm") or {}).get("std"),
            "avg_recall_0_5": sub.get("avg_recall_0_5"),
            "avg_recall_0_5_std": (boot.get("avg_recall_0_5") or {}).get("std"),
            "object_dice": od.get("mean"),
            "object_dice_std": od.get("std"),
        }

    out = {"epoch": epoch, "n_images": report.get("n_images"), "hit_rule": report.get("hit_rule"), **part(report)}
    out["by_size"] = {g: part(sub) for g, sub in (report.get("by_size") or {}).items()}
    return out


def harmonic_mean(a: float | None, b: float | None) -> float | None:
    """``2ab / (a + b)`` of two scores in [0, 1] (0 when both are 0; None when either is undefined)."""
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return None
    return 2.0 * a * b / (a + b) if a + b > 0 else 0.0


def merging_warning(report: Mapping[str, Any] | None) -> str | None:
    """A warning when validation recall is high but object Dice is below 0.1: the model likely
    paints blobs that cover several lesions at once (the paper's hit rule counts one such blob
    as a hit for each of them). None otherwise."""
    row = metric_row(report)
    recall, dice = row.get("val_recall"), row.get("val_object_dice")
    if recall is None or dice is None or recall < MERGE_WARNING_RECALL or dice >= MERGE_WARNING_DICE:
        return None
    return (f"warning: validation recall {recall:.2f} with object Dice {dice:.3f} (< {MERGE_WARNING_DICE:g}): "
            "predicted components probably merge several lesions; check with val_hit_rule=one-to-one "
            "(docs/metrics.md, hit rules)")


def _metric_value(report: Mapping[str, Any] | None, name: str) -> float | None:
    value = metric_row(report).get(f"val_{name}")
    return None if value is None or not math.isfinite(float(value)) else float(value)


def model_card(config: TrainConfig, data: TrainingData, *, epoch: int, validation_metrics: Mapping | None,
               world_size: int = 1) -> dict:
    """The checkpoint metadata of this run (see docs/checkpoints.md)."""
    thresholds = config.size_groups()
    return {
        "architecture": config.model_config(data.channels),  # save_checkpoint writes the model's own
        "patch_size": list(config.patch_size),
        "preprocessing": data.params,
        "threshold": config.threshold,
        "loss": {"name": config.loss, "params": dict(config.loss_params)},
        "size_thresholds": {"small_mm": thresholds.small_mm, "large_mm": thresholds.large_mm,
                            "preset": None if config.size_thresholds else config.size_preset},
        "inference": {"patch_size": config.inference_patch_size, "overlap": config.val_overlap, "blend": "gaussian"},
        "training_data": data.summary,
        "validation_metrics": dict(validation_metrics) if validation_metrics else None,
        "min_lesion_size": config.detection_rule()[1].as_dict() if config.min_lesion_size else None,
        "training": {
            "epochs_done": epoch + 1,
            "epochs": config.epochs,
            "iterations": (epoch + 1) * config.iters_per_epoch,
            "batch_size": config.batch_size,
            "optimizer": {"name": config.optimizer, "lr": config.lr, "lr_final": config.lr_final,
                          "lr_schedule": config.lr_schedule, "momentum": config.momentum,
                          "nesterov": config.nesterov},
            "lesion_probability": config.lesion_probability,
            "augment": config.augment,
            "seed": config.seed,
            "world_size": world_size,
        },
        "description": f"{config.loss} U-Net trained by iwseg train on {data.summary['dataset']}",
    }


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

CONFIG_FILE = "config.yaml"
SPLITS_FILE = "splits.json"
LAST_CHECKPOINT = "last.safetensors"
BEST_CHECKPOINT = "best.safetensors"
RESUME_STATE = "resume.safetensors"
LOG_FILE = "log.csv"
#: The files a run writes (atomically) in its output folder.
RUN_FILES = (CONFIG_FILE, SPLITS_FILE, LAST_CHECKPOINT, BEST_CHECKPOINT, RESUME_STATE, LOG_FILE)
#: Config keys a resumed run may change: they do not alter the sequence of weights it computes.
RESUME_MAY_CHANGE = ("data", "allow_outside_paths", "out", "overwrite", "num_workers", "prefetch_factor", "cache_size", "progress",
                     "tensorboard", "val_every", "val_max_cases", "device", "ddp_timeout_min")


@dataclass
class TrainResult:
    """What a run produced (on every rank; only rank 0 wrote files)."""

    out: Path
    last_checkpoint: Path
    best_checkpoint: Path
    epochs_done: int
    history: list[dict] = field(default_factory=list)
    best_metric: str = ""
    best_value: float | None = None
    best_epoch: int | None = None
    seconds: float = 0.0
    is_main: bool = True

    def summary(self) -> str:
        best = (f"best {self.best_metric} {self.best_value:.4f} at epoch {self.best_epoch}"
                if self.best_value is not None else "no validation metric")
        return (f"trained {self.epochs_done} epoch(s) in {self.seconds:.0f} s; {best}\n"
                f"  best checkpoint: {self.best_checkpoint}\n  last checkpoint: {self.last_checkpoint}\n"
                f"  log: {self.out / 'log.csv'}")


def train(config: TrainConfig, *, resume: bool = False, verbose: bool = True,
          on_step: Callable[[int, int, float], None] | None = None,
          on_epoch_end: Callable[[int, dict], None] | None = None,
          cancel: CancelState | None = None) -> TrainResult:
    """Run (or, with ``resume``, continue) the training described by ``config``.

    Launched by ``torchrun`` (``WORLD_SIZE`` > 1) it trains with DistributedDataParallel.
    ``on_step(epoch, step, loss)`` and ``on_epoch_end(epoch, row)`` are called on every rank
    (an exception they raise stops the run as a crash would; tests use this to interrupt a run).
    ``cancel`` (the command line's installed :class:`~IWSegmentationLib.progress.CancelState`)
    defers a SIGINT/SIGTERM that arrives while the epoch's files are written (or a batch is
    handed over by a worker) until that is complete; any other time the cancel stops the run
    at once, its temporary files removed.
    """
    info = setup_distributed(config)
    try:
        return _Run(config, info, resume=resume, verbose=verbose, on_step=on_step, on_epoch_end=on_epoch_end,
                    cancel=cancel).run()
    finally:
        if info.owns_group:
            cleanup_distributed()


class _Run:
    """One training run; see :func:`train`."""

    def __init__(self, config: TrainConfig, info: DistInfo, *, resume: bool, verbose: bool, on_step, on_epoch_end,
                 cancel: CancelState | None = None):
        self.config = config
        self.cancel = cancel
        self.info = info
        self.resume = resume
        self.verbose = verbose and info.is_main
        self.on_step = on_step
        self.on_epoch_end = on_epoch_end
        self.out = Path(config.out)
        self.best: dict[str, Any] = {"metric": config.val_metric, "value": None, "epoch": None}
        self.latest_validation: dict | None = None
        self.history: list[dict] = []

    # -- setup -----------------------------------------------------------------------------
    def _check_output(self) -> None:
        state = self.out / RESUME_STATE
        if self.resume:
            if not state.is_file():
                raise InputError(f"--resume: {self.out} holds no resume state ({RESUME_STATE}); "
                                 "start the run without --resume")
        elif state.is_file() and not self.config.overwrite:
            raise InputError(
                f"output folder {self.out} already holds a training run ({RESUME_STATE}); continue it with "
                "--resume, or choose another 'out', or set overwrite: true to start over"
            )

    def _load_resume_state(self):
        from .checkpoint import load_training_state

        path = self.out / RESUME_STATE
        state = load_training_state(path)
        saved_arch = state.get("architecture")
        # the channels follow the data, read later (run() checks them against the dataset)
        saved_channels = saved_arch.get("in_channels") if isinstance(saved_arch, Mapping) else None
        arch = self.config.model_config(saved_channels if isinstance(saved_channels, int) else None)
        if saved_arch != arch:
            raise CheckpointError(
                f"cannot resume from {path}: it was written by a different architecture "
                f"({_describe_arch(saved_arch)}) than the config asks for ({_describe_arch(arch)}); "
                "resume with the same model settings, or start a new run in another 'out' folder"
            )
        saved = dict(state.get("config") or {})
        now = self.config.to_dict()
        changed = sorted(k for k in now if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != now[k])
        if changed:
            detail = "; ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
            raise InputError(
                f"cannot resume the run in {self.out} with a different config ({detail}); a resumed run must "
                f"repeat the same computation. Only {', '.join(RESUME_MAY_CHANGE)} may change"
            )
        return state

    def _remove_stale_partials(self) -> None:
        """Remove the temporary files of our own outputs that a killed run left behind (SIGKILL,
        power loss: no chance to clean up); nothing else in ``out`` is touched."""
        from .imageio import remove_stale_partials

        removed = remove_stale_partials(self.out, RUN_FILES)
        if removed and self.verbose:
            _log(f"note: removed {len(removed)} temporary file(s) of an earlier run that was killed: "
                 + ", ".join(p.name for p in removed))

    def _check_validation_cases(self, data: TrainingData) -> dict | None:
        """Read every validation case now, on rank 0, so a missing or broken file stops the run
        before the first step (naming the case and file) rather than at the first validation,
        epochs later. Returns the validation cache: with ``cache_size: null`` the cases read here
        stay in memory for the validations (the first one would have cached them anyway)."""
        from .data import load_case

        cache: dict | None = {} if self.config.cache_size is None else None
        if not self.info.is_main or self.config.val_every == 0:
            return cache
        for record in data.val_cases:
            try:
                volume = load_case(record)
            except InputError as exc:
                raise type(exc)(f"validation split: {exc}") from None
            if cache is not None:
                cache[record.id] = volume
        return cache

    def _cancel_deferred(self):
        """Defer a cancel while the epoch's checkpoints and resume state are written, or while a
        batch is received from a DataLoader worker (a cancel in the middle of that handover
        resets the worker's connection, which prints a traceback from the worker)."""
        return self.cancel.deferred() if self.cancel is not None else contextlib.nullcontext()

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> TrainResult:
        import torch

        from .checkpoint import restore_rng_state
        from .data import make_loader, write_splits
        from .losses import get_loss
        from .models import build_model

        config, info = self.config, self.info
        t_start = time.perf_counter()
        if info.is_main:
            self._check_output()
        state = self._load_resume_state() if self.resume else None

        seed_everything(config.seed)
        data = load_training_data(config, verbose=self.verbose)
        self.data = data
        if state is not None and state.get("splits") and state["splits"] != data.splits:
            raise InputError(f"cannot resume the run in {self.out}: the dataset split differs from the one it "
                             "was trained on (check 'data', 'splits' and the dataset folder)")
        if state is not None and (state.get("architecture") or {}).get("in_channels", 1) != data.channels:
            raise InputError(f"cannot resume the run in {self.out}: it was trained on images of "
                             f"{state['architecture'].get('in_channels', 1)} channel(s), the dataset's have "
                             f"{data.channels}")
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._remove_stale_partials()
            if config.overwrite and not self.resume:
                (self.out / RESUME_STATE).unlink(missing_ok=True)
            self._write_run_files(data, write_splits)
        val_cache = self._check_validation_cases(data)
        _barrier(info)

        device = info.device
        model = build_model(config.model_config(data.channels)).to(device)
        if config.init_checkpoint and state is None:
            self._init_from_checkpoint(model)
        loss_fn = get_loss(config.loss, **config.loss_params)
        optimizer = build_optimizer(model, config)
        scheduler = build_scheduler(optimizer, config)
        amp_on, amp_dtype, use_scaler = amp_settings(config, device)
        scaler = torch.amp.GradScaler(device.type if device.type == "cuda" else "cpu", enabled=use_scaler)
        start_epoch = 0
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            self.best = dict(state.get("best") or self.best)
            self.latest_validation = state.get("latest_validation")
            start_epoch = int(state["epoch"]) + 1
            restore_rng_state(state["rng"])
            if self.verbose:
                _log(f"resuming {self.out} at epoch {start_epoch + 1}/{config.epochs}")
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last_3d)
        self.model = model
        train_model = model
        if info.distributed:
            from torch.nn.parallel import DistributedDataParallel

            train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

        iters = config.iters_per_epoch
        result_paths = (self.out / LAST_CHECKPOINT, self.out / BEST_CHECKPOINT)
        if start_epoch >= config.epochs:
            if self.verbose:
                _log(f"the run in {self.out} already finished its {config.epochs} epochs")
            return self._result(config.epochs, result_paths, t_start)
        if self.verbose and info.is_main:
            from .train_report import log_start_report

            log_start_report(model, config, data, device, start_epoch=start_epoch,
                             autocast_dtype=amp_dtype if amp_on else None, log=_log)

        dataset = make_patch_dataset(config, data.train_cases, data.params, rank=info.rank,
                                     world_size=info.world_size, start_step=start_epoch * iters,
                                     steps=(config.epochs - start_epoch) * iters)
        if config.cache_size is None:
            dataset.preload()
        loader = make_loader(dataset, num_workers=config.num_workers, pin_memory=device.type == "cuda",
                             prefetch_factor=config.prefetch_factor)
        logger = RunLogger(self.out, enabled=info.is_main, tensorboard=config.tensorboard,
                           start_epoch=start_epoch, iters_per_epoch=iters)
        bar = None
        if self.verbose and config.progress:
            from tqdm import tqdm

            bar = tqdm(total=config.epochs * iters, initial=start_epoch * iters, desc="training", unit="it",
                       dynamic_ncols=True)
        stream = iter(loader)
        try:
            for epoch in range(start_epoch, config.epochs):
                row = self._train_epoch(epoch, stream, train_model, loss_fn, optimizer, scaler,
                                        (amp_on, amp_dtype), logger, bar)
                scheduler.step()
                report = None
                if self._validation_due(epoch):
                    if info.is_main:
                        if bar is not None:
                            bar.set_description("validating")
                        card = model_card(config, data, epoch=epoch, validation_metrics=None)
                        report = validate(model, data.val_cases, config, card, device=device, cache=val_cache,
                                          verbose=self.verbose)
                        model.train()
                        if bar is not None:
                            bar.set_description("training")
                    _barrier(info)
                if info.is_main:
                    with self._cancel_deferred():
                        self._end_epoch(epoch, row, report, model, optimizer, scheduler, scaler, logger, bar)
                _barrier(info)
                self.history.append(row)
                if self.on_epoch_end is not None:
                    self.on_epoch_end(epoch, row)
        finally:
            if bar is not None:
                bar.close()
            logger.close()
            del stream
        return self._result(config.epochs, result_paths, t_start)

    def _train_epoch(self, epoch, stream, model, loss_fn, optimizer, scaler, amp, logger, bar) -> dict:
        import torch

        from .data import next_batch

        config, device = self.config, self.info.device
        amp_on, amp_dtype = amp
        model.train()
        iters = config.iters_per_epoch
        wait = 0.0
        losses = []
        t0 = time.perf_counter()
        for i in range(iters):
            t = time.perf_counter()
            with self._cancel_deferred():
                batch = next_batch(stream)
            wait += time.perf_counter() - t
            image = batch["image"].to(device, non_blocking=True)
            target = batch["target"].to(device, non_blocking=True)
            weight = batch.get("weight")
            if weight is not None:
                weight = weight.to(device, non_blocking=True)
            if device.type == "cuda":
                image = image.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_on):
                logits = model(image)
            loss = loss_fn(logits.float(), target, weight)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.grad_clip is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise InputError(
                    f"training diverged: the {config.loss} loss is {value} at epoch {epoch + 1}, step {i + 1}; "
                    "lower 'lr' or set 'grad_clip'"
                )
            losses.append(value)
            step = epoch * iters + i
            if self.info.is_main:
                logger.step(step, value)
            if bar is not None:
                bar.update(1)
                if i % 5 == 0 or i == iters - 1:
                    bar.set_postfix(epoch=f"{epoch + 1}/{config.epochs}", loss=f"{np.mean(losses[-20:]):.4f}",
                                    wait=f"{100 * wait / max(time.perf_counter() - t0, 1e-9):.0f}%", refresh=False)
            if self.on_step is not None:
                self.on_step(epoch, i, value)
        seconds = time.perf_counter() - t0
        return {
            "epoch": epoch + 1,  # 1-based, as every number a user reads (bar, log.csv, card)
            "lr": optimizer.param_groups[0]["lr"],
            "loss": float(np.mean(losses)),
            "seconds": round(seconds, 3),
            "iters_per_s": round(iters / seconds, 4) if seconds > 0 else None,
            "data_wait_fraction": round(wait / seconds, 4) if seconds > 0 else None,
        }

    def _validation_due(self, epoch: int) -> bool:
        config = self.config
        if config.val_every == 0 or not self.data.val_cases:
            return False
        return (epoch + 1) % config.val_every == 0 or epoch == config.epochs - 1

    # -- saving ----------------------------------------------------------------------------
    def _end_epoch(self, epoch, row, report, model, optimizer, scheduler, scaler, logger, bar) -> None:
        from .checkpoint import capture_rng_state, save_checkpoint, save_training_state

        config = self.config
        improved = False
        if report is not None:
            self.latest_validation = compact_metrics(report, epoch + 1)
            row.update(metric_row(report))
            value = _metric_value(report, config.val_metric)
            if value is not None and (self.best["value"] is None or value > self.best["value"]):
                self.best = {"metric": config.val_metric, "value": value, "epoch": epoch + 1}
                improved = True
        no_validation = config.val_every == 0 or not self.data.val_cases
        if no_validation:
            self.best = {"metric": "last", "value": None, "epoch": epoch + 1}
            improved = True
        row["best"] = int(improved)
        card = model_card(config, self.data, epoch=epoch, validation_metrics=self.latest_validation,
                          world_size=self.info.world_size)
        _guarded_write(self.out / LAST_CHECKPOINT, lambda p: save_checkpoint(p, model, card))
        if improved:
            _guarded_write(self.out / BEST_CHECKPOINT, lambda p: save_checkpoint(p, model, card))
        state = {
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "rng": capture_rng_state(),
            "best": self.best,
            "latest_validation": self.latest_validation,
            "architecture": config.model_config(self.data.channels),
            "config": config.to_dict(),
            "splits": self.data.splits,
        }
        _guarded_write(self.out / RESUME_STATE, lambda p: save_training_state(p, state))
        logger.epoch(row, (epoch + 1) * config.iters_per_epoch)
        if self.verbose:
            parts = [f"epoch {epoch + 1}/{config.epochs}", f"loss {row['loss']:.4f}", f"lr {row['lr']:.2g}",
                     f"{row['iters_per_s']:.2f} it/s", f"data wait {100 * row['data_wait_fraction']:.1f}%"]
            if report is not None:
                for key in ("cpm", "object_dice", "cpm_object_dice", "recall", "avg_recall_0_5"):
                    v = row.get(f"val_{key}")
                    parts.append(f"{key} {'n/a' if v is None else f'{v:.3f}'}")
                small = row.get("val_small_cpm")
                parts.append(f"small cpm {'n/a' if small is None else f'{small:.3f}'}")
                if improved:
                    parts.append("(best)")
            _log(" | ".join(parts))
        warning = merging_warning(report)
        if warning:
            _log(warning)

    def _write_run_files(self, data: TrainingData, write_splits) -> None:
        import yaml

        from .imageio import atomic_output

        with atomic_output(self.out / CONFIG_FILE) as tmp:
            tmp.write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False), encoding="utf-8")
        write_splits(self.out / SPLITS_FILE, data.splits)

    def _init_from_checkpoint(self, model) -> None:
        from .checkpoint import load_checkpoint

        source, card = load_checkpoint(self.config.init_checkpoint)
        if card["architecture"] != model.config:
            raise CheckpointError(
                f"init_checkpoint {self.config.init_checkpoint} has a different architecture "
                f"({_describe_arch(card['architecture'])}) than the config ({_describe_arch(model.config)})"
            )
        model.load_state_dict(source.state_dict())

    def _result(self, epochs_done: int, paths, t_start: float) -> TrainResult:
        return TrainResult(
            out=self.out, last_checkpoint=paths[0], best_checkpoint=paths[1], epochs_done=epochs_done,
            history=self.history, best_metric=self.best.get("metric", ""), best_value=self.best.get("value"),
            best_epoch=self.best.get("epoch"), seconds=time.perf_counter() - t_start, is_main=self.info.is_main,
        )


def _describe_arch(arch: Any) -> str:
    if not isinstance(arch, Mapping):
        return repr(arch)
    return (f"channels {arch.get('channels')}, blocks_per_level {arch.get('blocks_per_level')}, "
            f"in_channels {arch.get('in_channels', 1)}")


def _guarded_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Run an atomic writer; a failure (disk full, permissions) keeps the previous file and is
    reported as a :class:`CheckpointError` naming the file."""
    try:
        write(path)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise CheckpointError(
            f"could not write {path}: {reason}. The previous {path.name} (if any) is intact; free disk "
            "space and continue with --resume"
        ) from exc
