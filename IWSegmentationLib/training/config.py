"""The trainer: patch-based training of the inverse-weighted 3D U-Net, as in the paper.

Shirokikh et al., "Universal Loss Reweighting to Balance Lesion Size Inequality in 3D
Medical Image Segmentation" (MICCAI 2020), section 4.2: SGD with Nesterov momentum 0.9,
lr 1e-2 lowered to 1e-3 at 80% of training, 100 epochs of 100 iterations, batches of two
128³ patches; with probability 0.5 a patch is centred on a random voxel of a uniformly
chosen lesion, otherwise placed uniformly. Lesions are the connected components of the
whole reference mask; the inverse weights of a patch are computed from the in-patch voxel
counts of its cropped label map (:func:`IWSegmentationLib.core.weights.component_weights`).

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

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import (
    Annotated,
    Any,
    Callable,
    Mapping,
    Optional,
    Sequence,
    Union,
    get_args,
    get_origin,
    get_type_hints,
)

from ..core.errors import InputError
from ..core.lesions import SIZE_PRESETS, parse_min_lesion_size, size_thresholds
from ..core.memory import physical_memory
from ..evaluation.hit_rules import parse_hit_rule
from ..nn.architecture import default_config, model_stride
from ..nn.model_card import check_license
from ..preprocessing.presets import MAX_CROP_MARGIN, PRESETS, automatic_mask_available, get_preset

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


#: How a training case is drawn for each patch: ``uniform`` (every case alike) or ``lesions``
#: (in proportion to its lesion count, as the authors' ``with_cc`` config: every lesion alike).
CASE_SAMPLINGS = ("uniform", "lesions")


#: Which checkpoint is the run's model (``TrainResult.model_checkpoint``): the best by
#: ``val_metric``, or the last (the one the authors tested).
CHECKPOINT_CHOICES = ("best", "last")


#: ``hard_negative_probability`` when it is null and ``reviewed`` is set: a third of a reviewed
#: case's patches go to the lesions its reader rejected.
HARD_NEGATIVE_PROBABILITY = 0.33


@dataclass(frozen=True)
class Vector:
    """Type marker of a list of ``n`` numbers of type ``item`` (``Annotated[list, Vector(3, int)]``)."""

    n: int
    item: type


#: Field types that say how a value is parsed (the annotation is the only place a key's type is written).
Int3 = Annotated[list, Vector(3, int)]
Float3 = Annotated[list, Vector(3, float)]
Float2 = Annotated[list, Vector(2, float)]


#: Least memory one training patch voxel takes (image, target, weight, logits and their
#: gradients in float32, before the network's feature maps): a lower bound, for refusing a
#: ``patch_size`` no machine could hold (4096³ needs 2 TiB), not for fitting one.
BYTES_PER_PATCH_VOXEL = 32


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or inside it (resolved: links and ``..`` followed)."""
    p, f = Path(path).expanduser().resolve(), Path(folder).expanduser().resolve()
    return p == f or f in p.parents


def _key(default: Any, help: str, *, section: str):
    """A config field: its default and its documentation (its type is the field's annotation)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)),
                     metadata={"help": help, "section": section})
    return field(default=default, metadata={"help": help, "section": section})


@dataclass
class TrainConfig:
    """Every setting of a training run. Defaults reproduce the paper's setup (section 4.2).

    Build one with :func:`load_config` (YAML + overrides) or ``TrainConfig.from_dict``;
    both refuse unknown keys. ``kind`` in each field's metadata says how a ``--set`` value
    is parsed; ``help`` is the documentation shown in ``docs/training.md``.
    """

    # -- data ---------------------------------------------------------------------------------
    data: str = _key("", "Dataset folder (MSD layout with dataset.json, LiTS, LUNA16-style or a plain "
                     "folder of image/label pairs). Required.", section="data")
    data_format: str = _key("auto", f"Dataset layout: one of {', '.join(DATA_FORMATS)}.", section="data")
    allow_outside_paths: bool = _key(False, "Accept dataset.json paths that lead outside the dataset "
                                     "folder (absolute paths, '..'); refused by default.", section="data")
    splits: Optional[str] = _key(None, "JSON file with case-id lists under 'train', 'val' (and optionally "
                              "'test'); when null the split is drawn from the fractions below.", section="data")
    val_fraction: float = _key(0.2, "Fraction of cases held out for validation (when 'splits' is null).",
                               section="data")
    test_fraction: float = _key(0.0, "Fraction of cases held out as a test split, never touched by "
                                "training (when 'splits' is null).", section="data")
    split_seed: int = _key(0, "Seed of the random split.", section="data")
    preprocessing: str = _key("ct-liver", "Intensity preset (ct-lung, ct-liver, mr); stored in the "
                              "checkpoint and applied identically at inference.", section="data")
    target_spacing: Optional[Float3] = _key(None, "Resample every case to this spacing (z, y, x) in mm; "
                                       "null keeps the native grid.", section="data")
    lesion_values: Optional[list] = _key(None, "Label values that are lesion (null: from the dataset "
                                      "definition, e.g. LiTS tumour = 2, or 1).", section="data")
    empty_cases: str = _key("warn", "Training cases without any lesion: 'warn' (keep them; they give "
                            "uniform patches), 'skip' (drop them) or 'error'.", section="data")
    cache_size: Optional[int] = _key(None, "Training cases kept in memory per process (null: all, loaded and "
                                  "checked before training; else loaded lazily by the workers).", section="data")
    connectivity: int = _key(26, "Connectivity (6, 18, 26) used to label lesions on the whole image.",
                             section="data")
    crop_to_organ: Optional[int] = _key(None, "Crop every case to its organ mask's bounding box grown by this "
                                        "many voxels (of the network's grid) before sampling, as the authors "
                                        "prepared LiTS (5); stored in the model card, so inference crops alike "
                                        "when given an organ mask. null: no crop.", section="data")
    auto_organ_mask: bool = _key(False, "Give every case without an organ mask the automatic one "
                                 "(preprocessing.automatic_organ_mask: the CT lung mask, for ct-lung), the mask "
                                 "iwseg predict makes when no --organ-mask is given, so training and inference "
                                 "mask alike; stored in the model card (organ_mask.source).", section="data")
    reviewed: Optional[str] = _key(None, "Reviewed cases: a folder of reviewer verdict files (CASE.verdicts.json with "
                                   "its reviewed label map CASE.verdicts.nii.gz; docs/verdicts.md) or one such file. "
                                   "A training case with one trains on (its label + accepted + edited lesions) - "
                                   "rejected lesions, and its rejected lesions become hard negatives. null: none.",
                                   section="data")
    # -- model and loss ----------------------------------------------------------------------
    model_size: str = _key("paper", "Network preset of models.default_config: paper (11.07 M parameters), "
                           "small (0.71 M, the CPU config's) or tiny (86 k, the demo's and the tests').", section="model")
    model: dict = _key({}, "Overrides of the preset (e.g. {channels: [8, 16, 32, 64], blocks_per_level: 1}); "
                       "dotted overrides work: --set model.channels=[8,16,32,64]. head_norm: true ends the "
                       "network with the authors' head (bias-free conv + BatchNorm3d on the logits; "
                       "docs/checkpoints.md).", section="model")
    loss: str = _key("iw-dice", "Loss name from losses.LOSS_NAMES (bce, iw-bce, focal, iw-focal, dice, "
                     "iw-dice, asl, iw-asl, wce, gdl, dbce, combo, iw-combo).", section="model")
    loss_params: dict = _key({}, "Keyword arguments of losses.get_loss (e.g. {beta: 1.5} for asl). For "
                             "iw-* losses, mode (clip/exact), w_min and w_max also set the per-patch inverse weights.",
                             section="model")
    init_checkpoint: Optional[str] = _key(None, "Start from the weights of this checkpoint (same "
                                       "architecture) instead of a random initialisation.", section="model")
    # -- sampling ----------------------------------------------------------------------------
    patch_size: Int3 = _key([128, 128, 128], "Training patch size (z, y, x) in voxels; each side a "
                            "multiple of the network stride.", section="sampling")
    batch_size: int = _key(2, "Patches per step (per rank under DDP).", section="sampling")
    case_sampling: str = _key("uniform", "How the case of each patch is drawn: 'uniform' (every training case "
                              "alike) or 'lesions' (in proportion to its number of lesions, so every lesion is "
                              "equally likely, as the authors' code; cases without lesions are never drawn).",
                              section="sampling")
    lesion_probability: float = _key(0.5, "Probability that a patch is centred on a random voxel of a "
                                     "uniformly chosen lesion (else placed uniformly).", section="sampling")
    num_workers: int = _key(2, "DataLoader worker processes that sample patches in the background "
                            "(0 = in the training process).", section="sampling")
    prefetch_factor: int = _key(4, "Batches each worker prepares ahead.", section="sampling")
    augment: bool = _key(False, "Light augmentation: random flips and intensity scale/shift (the paper "
                         "used none).", section="sampling")
    flip_prob: float = _key(0.5, "Probability of flipping each axis when 'augment' is on.",
                            section="sampling")
    intensity_scale: float = _key(0.1, "Intensity multiplied by U(1-s, 1+s) when 'augment' is on.",
                                  section="sampling")
    intensity_shift: float = _key(0.1, "Intensity shifted by U(-s, s) when 'augment' is on.",
                                  section="sampling")
    hard_negative_probability: Optional[float] = _key(None, "Probability that a patch of a reviewed case with "
                                                      "rejected lesions is centred on a random voxel of one of them "
                                                      "(a hard negative; the other patches follow "
                                                      "lesion_probability). null: "
                                                      f"{HARD_NEGATIVE_PROBABILITY} with 'reviewed', else 0.",
                                                      section="sampling")
    # -- optimisation ------------------------------------------------------------------------
    epochs: int = _key(100, "Number of epochs.", section="optimisation")
    iters_per_epoch: int = _key(100, "Optimizer steps per epoch.", section="optimisation")
    optimizer: str = _key("sgd", f"One of {', '.join(('sgd', 'adam', 'adamw'))}: SGD with (Nesterov) momentum "
                          "(the paper), or Adam/AdamW (betas 0.9, 0.999; 'momentum' and 'nesterov' unused).",
                          section="optimisation")
    lr: float = _key(1e-2, "Initial learning rate.", section="optimisation")
    lr_schedule: str = _key("step", f"One of {', '.join(LR_SCHEDULES)}: 'step' drops lr to lr_final at "
                            "lr_decay_at of the epochs (the paper); 'cosine' anneals to lr_final.",
                            section="optimisation")
    lr_final: float = _key(1e-3, "Learning rate after the drop (step) or at the end (cosine).",
                           section="optimisation")
    lr_decay_at: float = _key(0.8, "Fraction of the epochs after which the step schedule drops the lr.",
                              section="optimisation")
    momentum: float = _key(0.9, "SGD momentum.", section="optimisation")
    nesterov: bool = _key(True, "Nesterov momentum.", section="optimisation")
    weight_decay: float = _key(0.0, "L2 weight decay.", section="optimisation")
    grad_clip: Optional[float] = _key(None, "Clip the gradient norm to this value (null: no clipping).",
                                   section="optimisation")
    amp: str = _key("auto", f"Mixed precision: one of {', '.join(AMP_MODES)}; 'auto' is bf16 (or fp16 "
                    "with loss scaling) on CUDA and off on CPU.", section="optimisation")
    seed: int = _key(0, "Seed of weights initialisation, patch sampling and augmentation.",
                     section="optimisation")
    device: str = _key("auto", "auto, cpu, cuda, cuda:N or mps. Under torchrun each rank uses "
                       "cuda:LOCAL_RANK.", section="optimisation")
    # -- validation --------------------------------------------------------------------------
    val_every: int = _key(10, "Validate every this many epochs (and after the last); 0 disables "
                          "validation (then 'best' is the last).", section="validation")
    val_metric: str = _key("cpm_object_dice", f"Metric that picks the best checkpoint: one of "
                           f"{', '.join(VAL_METRICS)}; cpm_object_dice is the harmonic mean of CPM and "
                           "object Dice, so a model that merges lesions is not preferred.", section="validation")
    checkpoint_choice: str = _key("best", "Which checkpoint is the run's model (printed as 'model:' at the end, "
                                  "recorded in the model card): 'best' (best.safetensors, by val_metric) or "
                                  "'last' (last.safetensors, the one the authors tested). Both files are written.",
                                  section="validation")
    val_hit_rule: str = _key("paper", "When a predicted component hits a lesion at validation: paper "
                             "(any overlap, many-to-one), one-to-one, panoptica, or terms such as "
                             "'hungarian,iou>0.5' (docs/metrics.md).", section="validation")
    min_lesion_size: Optional[str] = _key(None, "Drop predicted lesions smaller than this at validation "
                                          "and, through the model card, at inference: e.g. '10vox' or '5mm3' "
                                          "(null: keep all).", section="validation")
    val_max_cases: Optional[int] = _key(None, "Validate on at most this many validation cases "
                                     "(null: all).", section="validation")
    val_patch_size: Optional[Int3] = _key(None, "Sliding-window size for validation and the checkpoint's "
                                       "inference default (null: patch_size).", section="validation")
    val_overlap: float = _key(0.25, "Sliding-window overlap at validation.", section="validation")
    threshold: float = _key(0.5, "Probability threshold of the predicted mask.", section="validation")
    size_preset: str = _key("liver", "Lesion size groups (lung, liver, metastases) for by-size metrics; "
                            "stored in the checkpoint.", section="validation")
    size_thresholds: Optional[Float2] = _key(None, "Explicit [small_mm, large_mm] equivalent-diameter "
                                        "cut-offs, overriding size_preset.", section="validation")
    # -- output ------------------------------------------------------------------------------
    out: str = _key("runs/iwseg", "Output folder: checkpoints, resume state, CSV log, TensorBoard "
                    "events, the resolved config.", section="output")
    overwrite: bool = _key(False, "Start a new run even if OUT already holds one (its checkpoints and "
                           "logs are replaced as the new run writes them).", section="output")
    tensorboard: bool = _key(True, "Write TensorBoard scalars to OUT/tensorboard (needs tensorboard).",
                             section="output")
    progress: bool = _key(True, "Show the tqdm progress bars (loading cases, training, validating); "
                          "false hides them all, log lines stay.", section="output")
    ddp_timeout_min: float = _key(60.0, "DDP collective timeout in minutes (rank 0 validates while "
                                  "the others wait).", section="output")
    license: Optional[str] = _key(None, "The trained model's licence, written into its model card: an SPDX "
                                  "expression such as Apache-2.0 or CC-BY-NC-4.0 (the training data's terms "
                                  "usually decide it); null: 'not stated'.", section="output")
    license_url: Optional[str] = _key(None, "A URL of the model's licence, written into its model card.",
                                      section="output")

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
        types = field_types()
        parsed = {k: _coerce(k, v, types[k], source) for k, v in values.items()}
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
        need(self.crop_to_organ is None or 0 <= self.crop_to_organ <= MAX_CROP_MARGIN, "crop_to_organ",
             f"must be a margin in voxels from 0 to {MAX_CROP_MARGIN}, or null")
        need(self.case_sampling in CASE_SAMPLINGS, "case_sampling", f"must be one of {', '.join(CASE_SAMPLINGS)}")
        need(self.checkpoint_choice in CHECKPOINT_CHOICES, "checkpoint_choice",
             f"must be one of {', '.join(CHECKPOINT_CHOICES)}")
        need(all(v > 0 for v in self.patch_size), "patch_size", "must be three positive sizes")
        need(self.batch_size >= 1, "batch_size", "must be >= 1")
        need(0 <= self.lesion_probability <= 1, "lesion_probability", "must be in [0, 1]")
        need(self.hard_negative_probability is None or 0 <= self.hard_negative_probability <= 1,
             "hard_negative_probability", "must be in [0, 1] or null")
        need(not self.hard_negative_probability or self.reviewed is not None, "hard_negative_probability",
             "needs 'reviewed' (the verdict files whose rejected lesions are the hard negatives)")
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
        check_license(self.license, self.license_url, source="training config")
        need(bool(self.out), "out", "must name an output folder")
        need(not self.data or not _inside(self.out, self.data), "out",
             f"must not be the dataset folder {self.data!r} or inside it (the run's files would mix with the "
             "dataset's and be read as cases)")
        self._validate_patch_memory()
        self._validate_components()
        self._validate_patch_stride()
        if self.size_thresholds is not None:
            need(0 < self.size_thresholds[0] < self.size_thresholds[1], "size_thresholds",
                 "must be [small_mm, large_mm] with 0 < small < large")
        else:
            need(self.size_preset in SIZE_PRESETS, "size_preset", f"must be one of {', '.join(SIZE_PRESETS)}")

    def _validate_components(self) -> None:
        """Check the names other modules resolve (model, loss, preset), so a typo fails before any data is read."""
        from ..nn.losses import get_loss  # lazy: imports torch; loaded only when a config is validated

        if self.preprocessing not in PRESETS:
            raise InputError(f"config key 'preprocessing' must be one of {', '.join(PRESETS)}, got {self.preprocessing!r}")
        if self.auto_organ_mask and not automatic_mask_available(PRESETS[self.preprocessing]):
            raise InputError(f"config key 'auto_organ_mask': the preset {self.preprocessing!r} has no automatic organ "
                             "mask (only ct-lung does: the CT lung mask); give the dataset organ masks instead")
        for key, check in (("model", lambda: self.model_config()), ("loss", lambda: get_loss(self.loss, **self.loss_params))):
            try:
                check()
            except InputError as exc:
                raise InputError(f"config key {key!r}: {exc}") from None

    def _validate_patch_stride(self) -> None:
        """Each training patch side must be a multiple of the network stride (the U-Net pools
        ``len(channels) - 1`` times); the message names the nearest valid sizes."""
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
        return get_preset(self.preprocessing, target_spacing=self.target_spacing)

    def weight_params(self) -> dict:
        """``component_weights`` keyword arguments of an iw-* loss (its mode, w_min, w_max)."""
        from ..nn.losses import loss_parameters  # lazy: imports torch, as above

        defaults = loss_parameters(self.loss)
        return {k: self.loss_params.get(k, defaults[k]) for k in ("mode", "w_min", "w_max") if k in defaults}

    @property
    def hard_negatives(self) -> float:
        """The probability the sampler centres a reviewed case's patch on a rejected lesion:
        ``hard_negative_probability``, or when null :data:`HARD_NEGATIVE_PROBABILITY` with
        ``reviewed`` and 0 without."""
        if self.hard_negative_probability is not None:
            return self.hard_negative_probability
        return HARD_NEGATIVE_PROBABILITY if self.reviewed is not None else 0.0

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
        rule = parse_hit_rule(self.val_hit_rule) if only in (None, "val_hit_rule") else None
        size = parse_min_lesion_size(self.min_lesion_size) if only in (None, "min_lesion_size") else None
        return rule, size

    def size_groups(self):
        return size_thresholds(self.size_preset, self.size_thresholds)

    def _validate_patch_memory(self) -> None:
        """Refuse a patch one sample of which needs more memory than the machine has
        (:data:`BYTES_PER_PATCH_VOXEL` per voxel), before any data is read."""
        available = physical_memory()
        for key in ("patch_size", "val_patch_size"):
            patch = getattr(self, key)
            need = math.prod(int(v) for v in patch) * BYTES_PER_PATCH_VOXEL if patch else 0
            if available and need > available:
                raise InputError(
                    f"config key {key!r} is {list(patch)}: one patch needs at least {need / 2**30:.3g} GiB of memory, "
                    f"more than this machine's {available / 2**30:.3g} GiB; choose a smaller {key}")

    @property
    def inference_patch_size(self) -> list[int]:
        return list(self.val_patch_size or self.patch_size)


def field_types() -> dict[str, Any]:
    """Key -> declared type of every :class:`TrainConfig` field, read from the annotations."""
    if not _FIELD_TYPES:
        _FIELD_TYPES.update(get_type_hints(TrainConfig, include_extras=True))
    return _FIELD_TYPES


_FIELD_TYPES: dict[str, Any] = {}


def _coerce(key: str, value: Any, declared: Any, source: str) -> Any:
    """Check/convert one config value to its declared type; errors name the key."""
    optional = get_origin(declared) is Union and type(None) in get_args(declared)
    if optional:
        declared = next(a for a in get_args(declared) if a is not type(None))
    if value is None:
        if optional:
            return None
        raise InputError(f"{source}: config key {key!r} may not be null")

    def bad(what: str) -> InputError:
        return InputError(f"{source}: config key {key!r} must be {what}, got {value!r}")

    if get_origin(declared) is Annotated:
        return _as_vector(value, get_args(declared)[1], bad)
    return _CONVERTERS[declared](value, bad)


def _as_str(value: Any, bad: Callable[[str], InputError]) -> str:
    if not isinstance(value, str):
        raise bad("a string")
    return value


def _as_bool(value: Any, bad: Callable[[str], InputError]) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
        return value.lower() in ("true", "yes", "on", "1")
    raise bad("true or false")


def _as_int(value: Any, bad: Callable[[str], InputError]) -> int:
    try:
        as_float = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        raise bad("an integer") from None
    if not as_float.is_integer():
        raise bad("an integer")
    return int(as_float)


def _as_float(value: Any, bad: Callable[[str], InputError]) -> float:
    if isinstance(value, bool):
        raise bad("a number")
    try:
        out = float(value)  # also takes YAML's "1e-3", which PyYAML reads as a string
    except (TypeError, ValueError):
        raise bad("a number") from None
    if not math.isfinite(out):
        raise bad("a finite number")
    return out


def _as_list(value: Any, bad: Callable[[str], InputError]) -> list:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise bad("a list")
    return list(value)


def _as_dict(value: Any, bad: Callable[[str], InputError]) -> dict:
    if not isinstance(value, Mapping):
        raise bad("a mapping")
    return dict(value)


def _as_vector(value: Any, vector: Vector, bad: Callable[[str], InputError]) -> list:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and vector == Vector(3, int):
        value = [value] * 3  # "patch_size: 96" means 96³
    if not isinstance(value, (list, tuple)) or len(value) != vector.n:
        raise bad(f"a list of {vector.n} numbers")
    return [_CONVERTERS[vector.item](v, bad) for v in value]


_CONVERTERS: dict[type, Callable[[Any, Callable[[str], InputError]], Any]] = {
    str: _as_str, bool: _as_bool, int: _as_int, float: _as_float, list: _as_list, dict: _as_dict,
}


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Parse ``["key=value", "model.channels=[8,16,32,64]"]`` into a nested dict (values are YAML)."""
    import yaml  # lazy: `iwseg` starts without yaml

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
    dict_keys = {name for name, declared in field_types().items() if declared is dict}
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
    import yaml  # lazy: `iwseg` starts without yaml

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
        except UnicodeDecodeError as exc:
            raise InputError(f"config file {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
                             "save it as UTF-8") from None
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
