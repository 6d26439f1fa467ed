"""The model card a run writes into each checkpoint (what inference needs to reproduce training)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from ..preprocessing.presets import automatic_mask_available

if TYPE_CHECKING:
    from .config import TrainConfig
    from .inputs import TrainingData


def model_card(config: TrainConfig, data: TrainingData, *, epoch: int, validation_metrics: Mapping | None,
               world_size: int = 1, operating_points: Mapping | None = None) -> dict:
    """The checkpoint metadata of this run (see docs/checkpoints.md); ``operating_points``: the
    card's section measured by the validation the checkpoint is saved after (None: none)."""
    thresholds = config.size_groups()
    card = {
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
            "case_sampling": config.case_sampling,
            "hard_negative_probability": config.hard_negatives,
            "checkpoint_choice": config.checkpoint_choice,
            "augment": config.augment,
            "seed": config.seed,
            "world_size": world_size,
        },
        "description": f"{config.loss} U-Net trained by iwseg train on {data.summary['dataset']}",
    }
    if config.license is not None:  # unset: the card says "not stated"
        card["license"] = config.license
    if config.license_url is not None:
        card["license_url"] = config.license_url
    card["organ_mask"] = organ_mask_entry(config, data)
    if data.spacing is not None:  # the training voxel spacing: inference resamples its input to it
        card["spacing"] = list(data.spacing)
    if config.crop_to_organ is not None:  # written only when set: a card without it means no crop
        card["crop_to_organ"] = config.crop_to_organ
    if operating_points:  # written only when measured: a card without them keeps its threshold
        card["operating_points"] = dict(operating_points)
    return card


def organ_mask_entry(config: TrainConfig, data: TrainingData) -> dict:
    """The card's ``organ_mask`` (``nn.model_card.organ_mask_need``): the preset's organ; required
    when training masked its inputs (a case had a dataset mask, or ``auto_organ_mask``); whether
    the organ has an automatic mask; where the masks came from."""
    organ = data.params.get("mask")
    from_dataset = bool(data.summary.get("organ_masks"))
    source = ("none" if organ is None else
              "dataset+automatic" if from_dataset and config.auto_organ_mask else
              "automatic" if config.auto_organ_mask else "dataset" if from_dataset else "none")
    return {"organ": organ, "required": source != "none", "automatic": automatic_mask_available(data.params),
            "source": source}
