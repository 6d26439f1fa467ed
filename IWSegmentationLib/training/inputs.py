"""What a run trains on: cases read and prepared once, the patch dataset, the batch weights."""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ..core.errors import InputError
from ..core.files import case_name
from ..core.imageio import read_geometry
from ..core.lesions import label_components
from ..core.verdicts import find_verdict_files
from ..data.cases import CaseVolume, load_prepared_case
from ..data.datasets import Case, Dataset, load_dataset
from ..data.sampling import PatchSampler, augment_patch
from ..data.splits import make_splits, read_splits
from ..preprocessing.resampling import resampled_geometry

if TYPE_CHECKING:
    from .config import TrainConfig


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
        from ..core.weights import component_weights  # lazy: `iwseg` starts without it

        labels = batch["labels"] if self.keep_labels else batch.pop("labels")
        if self.inverse_weighted:
            batch["weight"] = component_weights(labels, **self.weight_params)
        return batch


@dataclass
class TrainingData:
    """What :func:`load_training_data` found: the split, the training cases (preprocessed
    ``CaseVolume`` objects, or ``Case`` records loaded lazily when ``cache_size`` is set), the
    validation ``Case`` records and a summary for the model card. ``lesion_counts`` (case id ->
    lesions, counted on the prepared, cropped case as the sampler labels it) is filled when the
    cases are loaded up front, and always with ``case_sampling: lesions``."""

    root: Path
    layout: str
    splits: dict[str, list[str]]
    params: dict
    train_cases: list
    val_cases: list
    summary: dict
    #: Image channels of every case (``_0000``, ``_0001``... files): the network's ``in_channels``.
    channels: int = 1
    lesion_counts: dict[str, int] | None = None
    #: The training voxel spacing ``[sz, sy, sx]`` mm (:func:`training_spacing`), the card's ``spacing``.
    spacing: list[float] | None = None


def print_note(message: str) -> None:
    """Print ``message`` on a line of its own without breaking a progress bar on the screen (``tqdm.write``)."""
    from tqdm import tqdm  # lazy: `iwseg` starts without tqdm (~0.25 s)

    tqdm.write(message)


def load_training_data(config: TrainConfig, *, verbose: bool = True) -> TrainingData:
    """Read the dataset listing, split it, load and preprocess the training cases.

    With ``reviewed``, each training case with a verdict file is read as the reader left it
    (:func:`attach_verdicts`, :mod:`IWSegmentationLib.data.reviewed`).

    Errors name the case or key: an empty split, a case whose label/mask is not on its image's
    grid or holds unexpected values, training cases without lesions (``empty_cases: error``)
    or a training split without any lesion at all.
    """
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
    reviewed_cases = 0
    if config.reviewed is not None:
        train_records, reviewed_cases = attach_verdicts(train_records, dataset, config.reviewed, verbose=verbose)
    val_records = dataset.subset(splits.get("val", []))
    if config.val_max_cases is not None:
        val_records = val_records[: config.val_max_cases]

    lesion_counts: dict[str, int] = {}
    if config.cache_size is None:
        from tqdm import tqdm  # lazy: `iwseg` starts without tqdm (~0.25 s)

        train_cases = []
        bar = tqdm(train_records, desc="loading training cases", unit="case", disable=not (verbose and config.progress),
                   leave=False)
        for record in bar:
            volume = load_prepared_case(record, params, config.crop_to_organ, config.auto_organ_mask)
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
                    print_note(f"note: skipping {len(empty)} training case(s) without lesions: {listing}")
            elif verbose:
                use = ("are never drawn (case_sampling: lesions)" if config.case_sampling == "lesions"
                       else "give only uniform patches")
                print_note(f"note: {len(empty)} training case(s) have no lesion and {use}: {listing}")
    else:
        train_cases = list(train_records)
        if config.case_sampling == "lesions":
            lesion_counts = _count_lesions(train_records, params, config, verbose)
            if not any(lesion_counts.values()):
                raise InputError(f"no training case of {config.data} contains a lesion, so case_sampling: lesions "
                                 "has no case to draw; check lesion_values")

    spacing = training_spacing(train_cases, params)
    summary = {
        "dataset": str(Path(config.data).name),
        "root": str(Path(config.data).resolve()),
        "layout": dataset.layout,
        "cases": {name: len(ids) for name, ids in splits.items()},
        "train_cases_used": len(train_cases),
        "split_seed": None if config.splits else config.split_seed,
        "split_file": config.splits,
        "train_lesions": int(sum(lesion_counts.values())) if lesion_counts else None,
        "channels": channels,
        "organ_masks": sum(getattr(r, "mask", None) is not None for r in train_records),  # from the dataset
        "reviewed_cases": reviewed_cases,
    }
    return TrainingData(Path(config.data), dataset.layout, splits, params, train_cases, val_records, summary,
                        channels, lesion_counts or None, spacing)


def attach_verdicts(records: Sequence[Case], dataset: Dataset, reviewed: str, *,
                    verbose: bool = True) -> tuple[list[Case], int]:
    """The training ``records``, each with its verdict file from ``reviewed`` (a folder of
    ``CASE.verdicts.json`` or one file; ``Case.verdicts``), and how many have one. A file is
    matched by the case name inside it: the case id or its image's name without extension. A
    file for no case of the dataset is refused (a typo or another dataset), one for a validation
    or test case is left out with a note (those are scored against their reference)."""
    files = find_verdict_files(reviewed, flag="config key 'reviewed'")
    owner = {}
    for case in dataset.cases:
        owner.setdefault(case.id, case.id)
        owner.setdefault(case_name(case.image), case.id)
    unknown = sorted(name for name in files if name not in owner)
    if unknown:
        raise InputError(f"config key 'reviewed': verdict file {files[unknown[0]]} is for case {unknown[0]!r}, which is "
                         f"not a case of the dataset {dataset.root} ({len(unknown)} such file(s))")
    by_case = {owner[name]: path for name, path in files.items()}
    train_ids = {r.id for r in records}
    left_out = sorted(cid for cid in by_case if cid not in train_ids)
    if left_out and verbose:
        print_note(f"note: reviewed: {len(left_out)} verdict file(s) of cases outside the training split are not used: "
                   + ", ".join(left_out[:10]))
    out = [replace(r, verdicts=by_case[r.id]) if r.id in by_case else r for r in records]
    return out, sum(r.id in by_case for r in records)


def training_spacing(cases: Sequence, params: Mapping[str, Any]) -> list[float] | None:
    """The voxel spacing the network was trained at, ``[sz, sy, sx]`` mm: per axis, the median over
    ``cases`` of their spacing after the preset's ``target_spacing`` (an axis it leaves ``None``
    keeps each case's own). Prepared volumes give their grid; cases loaded lazily (``cache_size``)
    are read from their image headers and the target spacing applied as preparing them would.
    The model card records it as ``spacing``, and inference resamples its input to it."""
    spacings = []
    for case in cases:
        if hasattr(case, "geometry"):  # a prepared CaseVolume: its grid is the network's
            spacings.append(case.geometry.spacing_zyx)
            continue
        geometry = read_geometry(case.image, what=f"case {case.id}: image")
        if params.get("target_spacing") is not None:
            try:
                geometry = resampled_geometry(geometry, params["target_spacing"])
            except InputError as exc:  # name the case, as preparing it would
                raise InputError(f"case {case.id} ({case.image}): {exc}") from None
        spacings.append(geometry.spacing_zyx)
    if not spacings:
        return None
    return [float(v) for v in np.median(np.asarray(spacings, dtype=float), axis=0)]


def _count_lesions(records: Sequence, params: Mapping[str, Any], config: TrainConfig, verbose: bool) -> dict[str, int]:
    """Lesions of each case as the sampler will count them (prepared, cropped, labelled with
    ``connectivity``), for ``case_sampling: lesions`` when the cases are loaded lazily: one pass
    over the data before training, keeping nothing but the counts."""
    from tqdm import tqdm  # lazy: `iwseg` starts without tqdm (~0.25 s)

    counts = {}
    for record in tqdm(records, desc="counting lesions", unit="case", disable=not (verbose and config.progress),
                       leave=False):
        volume = load_prepared_case(record, params, config.crop_to_organ, config.auto_organ_mask)
        counts[record.id] = label_components(volume.lesion, config.connectivity)[1]
    return counts


def case_weights(config: TrainConfig, cases: Sequence, lesion_counts: Mapping[str, int] | None) -> list[float] | None:
    """The sampling weight of each training case: None for ``case_sampling: uniform``; its lesion
    count for ``lesions`` (so every lesion of the training set is equally likely, as the authors'
    ``with_cc`` config; a case without lesions is never drawn)."""
    if config.case_sampling == "uniform":
        return None
    if lesion_counts is None or any(c.id not in lesion_counts for c in cases):
        raise RuntimeError("case_sampling: lesions needs the lesion count of every training case "
                           "(TrainingData.lesion_counts from load_training_data)")
    return [float(lesion_counts[c.id]) for c in cases]


def make_patch_dataset(config: TrainConfig, cases: Sequence, params: Mapping[str, Any], *, rank: int = 0,
                       world_size: int = 1, start_step: int = 0, steps: int | None = None,
                       keep_labels: bool = False, lesion_counts: Mapping[str, int] | None = None):
    """The data module's :class:`~IWSegmentationLib.data.loader.PatchDataset` with this config's sampler,
    case sampling (``lesion_counts``, :attr:`TrainingData.lesion_counts`, is needed for
    ``case_sampling: lesions``), augmentation, preprocessing and organ crop (for lazily loaded
    cases) and per-patch inverse weights.

    ``cases`` are :class:`~IWSegmentationLib.data.Case` records, prepared with ``params`` when
    first loaded, or volumes already prepared with ``params`` (:func:`load_training_data`'s
    in-memory path); a raw volume or one prepared with other parameters is refused, so a case
    reaches the network prepared exactly once, as :func:`inference.predict_volume` prepares it.
    Batch ``s`` is a pure function of ``(seed, rank, s)``, whatever the number of workers.
    """
    from ..data.loader import PatchDataset  # lazy: imports torch; `iwseg` starts without it

    for case in cases:
        if not isinstance(case, CaseVolume):
            continue
        if case.preprocessing != dict(params):
            state = "raw" if case.preprocessing is None else "prepared with other parameters"
        elif case.organ_crop != config.crop_to_organ:
            state = f"prepared with another organ crop ({case.organ_crop} vs crop_to_organ {config.crop_to_organ})"
        else:
            continue
        raise RuntimeError(f"case {case.id} is {state}: the patch dataset takes records or volumes "
                           "prepared with these parameters and organ crop (data.prepare_volume)")

    sampler = PatchSampler(config.patch_size, lesion_probability=config.lesion_probability,
                           connectivity=config.connectivity, hard_negative_probability=config.hard_negatives)
    augment = None
    if config.augment:
        augment = functools.partial(augment_patch, flip_probability=config.flip_prob,
                                    intensity_scale=config.intensity_scale, intensity_shift=config.intensity_shift)
    return PatchDataset(
        list(cases), sampler,
        batch_size=config.batch_size, steps=steps, start_step=start_step,
        seed=config.seed, rank=rank, world_size=world_size,
        loader=functools.partial(load_prepared_case, params=dict(params), crop_to_organ=config.crop_to_organ,
                                 auto_organ_mask=config.auto_organ_mask),
        augment=augment,
        transform=BatchWeights(config.inverse_weighted, config.weight_params(), keep_labels),
        cache_size=config.cache_size,
        case_weights=case_weights(config, cases, lesion_counts),
    )
