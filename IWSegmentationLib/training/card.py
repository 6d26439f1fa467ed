"""The model card a run writes into each checkpoint (what inference needs to reproduce training)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from .config import TrainConfig
    from .inputs import TrainingData


def model_card(config: TrainConfig, data: TrainingData, *, epoch: int, validation_metrics: Mapping | None,
               world_size: int = 1) -> dict:
    """The checkpoint metadata of this run (see docs/checkpoints.md)."""
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
            "checkpoint_choice": config.checkpoint_choice,
            "augment": config.augment,
            "seed": config.seed,
            "world_size": world_size,
        },
        "description": f"{config.loss} U-Net trained by iwseg train on {data.summary['dataset']}",
    }
    if data.spacing is not None:  # the training voxel spacing: inference resamples its input to it
        card["spacing"] = list(data.spacing)
    if config.crop_to_organ is not None:  # written only when set: a card without it means no crop
        card["crop_to_organ"] = config.crop_to_organ
    return card
