"""The local prediction, files in -> files out: :class:`Predictor`.

For each case: read -> the checkpoint's preprocessing -> sliding-window inference (background
windows skipped) -> threshold -> lesion analysis -> outputs on the input's exact grid. Every path
is checked before any inference runs (:mod:`.cases`); all outputs of a case are written to
temporary names and renamed together (:mod:`.outputs`), so a failure or a cancel never leaves a
half-written file. Progress goes out through a
:class:`~IWSegmentationLib.core.progress.ProgressReporter` (the JSON-lines protocol or text).
``iwseg predict`` (``cli/commands/predict.py``) turns its flags into a :class:`PredictOptions`
and calls :meth:`Predictor.run`; torch is imported when a run starts, not with this module.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import __version__
from ..core import dicom_seg as dicom_seg_writer
from ..core import organ_masks
from ..core.confidence import probability_to_logit
from ..core.errors import InputError
from ..core.imageio import read_channels
from ..core.lesions import remove_small_components
from ..core.progress import CancelState, ProgressReporter
from ..core.provenance import Provenance
from ..nn.checkpoint import load_checkpoint
from .cases import (
    OutputTargets,
    PredictJob,
    check_case_channels,
    check_label_map,
    check_volume_grid,
    collect_cases,
    model_channels,
    organ_mask_plan,
    parse_shard,
    prepare_outputs,
    resolve_dataset_root,
    split_channel_inputs,
)
from .model_match import check_modality, no_spacing_note, spacing_note
from .options import PredictOptions
from .outputs import (
    attach_dicom_seg,
    attach_dicom_sr,
    check_finite,
    guard_region,
    lesion_report,
    min_lesion_size_for,
    operating_threshold,
    size_thresholds_for,
    summarize,
    write_case_outputs,
)

#: Seconds between two ``inference`` progress lines of one case (the last one always goes out).
PROGRESS_INTERVAL_S = 0.2


class Throttled:
    """Forwards ``progress(done, total)`` at most every ``interval`` seconds (always the last)."""

    def __init__(self, callback, interval: float = PROGRESS_INTERVAL_S):
        self.callback, self.interval, self.last = callback, interval, -1e9

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - self.last >= self.interval:
            self.last = now
            self.callback(done, total)


def device_name(requested: str) -> str:
    """``auto`` under torchrun picks ``cuda:LOCAL_RANK`` so ranks do not share one GPU."""
    import torch  # lazy: importing the predictor stays torch-free

    if requested == "auto" and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK']) % max(1, torch.cuda.device_count())}"
    return requested


class Predictor:
    """Runs :class:`PredictOptions` on files: :meth:`run` reads the inputs and writes the outputs.

    ``reporter`` receives the progress events; ``cancel`` is checked between windows (a SIGINT or
    SIGTERM handler sets it when installed by the caller). Bad input raises
    :class:`~IWSegmentationLib.core.errors.InputError` naming the file or the flag.
    """

    def __init__(self, options: PredictOptions, reporter: ProgressReporter | None = None,
                 cancel: CancelState | None = None) -> None:
        if not options.models:
            raise InputError("--model: no checkpoint selected")
        self.options = options
        self.reporter = reporter or ProgressReporter("text")
        self.cancel = cancel or CancelState()
        #: where this run's organ masks come from (:func:`organ_mask_plan`), set when a run starts
        self.organ_plan = "none"
        #: the logit threshold of --operating-point, looked up in the card when the run starts
        self.logit_threshold: float | None = None
        #: the model cards of ``options.models``, read when a run starts (:meth:`load_models`)
        self.cards: list[dict] = []

    def run(self, inputs: Sequence[Path], targets: OutputTargets, *, organ_mask: Path | None = None,
            shard: str | None = None, overwrite: bool = False) -> int:
        """Predict ``inputs`` (one path; several: the channel files of one case) into ``targets``.

        ``targets`` must ask for the outputs the options ask for (``probabilities``, ``logits``,
        ``lesions``). Returns 0; a case that fails in a folder of cases is skipped with a warning
        and the run ends with an :class:`InputError` naming the failed cases.
        """
        import torch  # lazy (torch): importing the predictor, and so the CLI, stays torch-free

        from ..inference.devices import resolve_device, resolve_precision  # lazy: torch

        options, reporter = self.options, self.reporter
        wanted = {"probabilities": targets.probabilities, "logits": targets.logits, "lesions": targets.lesions}
        for name, path in wanted.items():
            if getattr(options, name) != (path is not None):
                raise ValueError(f"the options {'ask' if getattr(options, name) else 'do not ask'} for {name}, "
                                 f"the targets {'do not give' if path is None else 'give'} its path")
        t0 = time.monotonic()
        if options.threads is not None:
            torch.set_num_threads(options.threads)
        parse_shard(shard)  # a bad --shard is an error even for a single input (where it does nothing)
        notes: list[str] = []
        src, more_channels = split_channel_inputs(list(inputs))
        src = resolve_dataset_root(src, notes.append)
        cases = collect_cases(src, targets, more_channels=more_channels, model_channels=model_channels(options.models[0]),
                              organ_mask=organ_mask, shard=shard, models=options.models, overwrite=overwrite)
        if targets.dicom_seg is not None:
            attach_dicom_seg(cases, src, targets.dicom_seg)
        if targets.dicom_sr is not None:
            attach_dicom_sr(cases, src, targets.dicom_sr)
        prepare_outputs(cases)
        device = resolve_device(device_name(options.device))
        precision = resolve_precision(options.precision, device)
        reporter.emit("start", version=__version__, cases=len(cases), device=str(device), precision=precision,
                      model=", ".join(str(m) for m in options.models))
        for note in notes:
            reporter.emit("load", case=None, message=note)
        model, card = self.load_models()
        check_case_channels(cases, card)
        self.organ_plan, note = organ_mask_plan(card, organ_mask is not None, options.allow_unmasked)
        if note:
            reporter.emit("warning" if self.organ_plan == "unmasked" else "load", case=None, message=note)
        note = no_spacing_note(card, options.keep_spacing)  # said once per run, not per case
        if note:
            reporter.emit("load", case=None, message=note)
        thresholds = size_thresholds_for(options, card)
        min_size = min_lesion_size_for(options.min_lesion_size, card)
        self.logit_threshold, note = operating_threshold(options, card)
        if note:
            reporter.emit("load", case=None, message=note)

        failed: list[str] = []
        bar = None
        if reporter.fmt == "text" and len(cases) > 1:
            from tqdm import tqdm  # lazy: only a text run over several cases shows the bar

            bar = tqdm(total=len(cases), desc="cases", unit="case", file=sys.stderr)
        for case in cases:
            try:
                self.predict_case(case, model, card, device, precision, thresholds, min_size)
            except InputError as exc:
                if len(cases) == 1:
                    raise
                failed.append(case.name)
                reporter.emit("warning", case=case.name, message=f"case skipped: {exc}")
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        reporter.emit("done", seconds=round(time.monotonic() - t0, 2), cases=len(cases) - len(failed), failed=failed)
        if failed:
            raise InputError(f"{len(failed)} of {len(cases)} case(s) failed: {', '.join(failed)}")
        return 0

    def load_models(self) -> tuple[list, dict]:
        """The networks of ``--model`` and the card of the first; several must agree
        (:func:`inference.check_ensemble` names the two files that do not)."""
        from ..inference.ensemble import check_ensemble  # lazy: torch

        paths = self.options.models
        if len(set(p.resolve() for p in paths)) != len(paths):
            raise InputError("--model names the same checkpoint twice; an ensemble needs different checkpoints")
        models, cards = [], []
        for path in paths:
            self.reporter.emit("load", case=None, message=f"checkpoint {path}")
            model, card = load_checkpoint(path, map_location="cpu")
            models.append(model)
            cards.append((str(path), card))
        check_ensemble(cards)
        self.cards = [card for _, card in cards]  # every model's card: the provenance's weights
        return models, cards[0][1]

    def provenance(self, threshold: float) -> Provenance:
        """What made this run's lesions: the models, their weights' sha256, the threshold (``threshold``
        the probability the prediction used; the logit of ``--operating-point`` when one was given)
        and the engine version (:mod:`IWSegmentationLib.core.provenance`)."""
        logit = self.logit_threshold if self.logit_threshold is not None else probability_to_logit(threshold)
        return Provenance.of_models(self.options.models, self.cards, threshold=threshold, logit_threshold=logit,
                                    operating_point=self.options.operating_point)

    def read_organ_mask(self, case: PredictJob, image: np.ndarray, geometry, card: dict) -> np.ndarray | None:
        """The case's organ mask: its ``--organ-mask`` file, checked (the image's grid, not empty,
        a label map), or the automatic mask when the run's plan says so (:func:`organ_mask_plan`;
        the function training's ``auto_organ_mask`` uses), or None."""
        from ..preprocessing.lung_mask import automatic_organ_mask

        if case.organ_mask is not None:
            return organ_masks.read_organ_mask(case.organ_mask, case.image, geometry)
        if self.organ_plan != "automatic":
            return None
        organ = automatic_organ_mask(image, card["preprocessing"], geometry)
        if organ is None or not organ.any():
            raise InputError(f"{case.image}: the automatic {card['preprocessing'].get('mask')} mask found nothing "
                             "(no air inside the body: is it a chest CT?); pass --organ-mask, or --allow-unmasked")
        self.reporter.emit("load", case=case.name, message=f"automatic {card['preprocessing'].get('mask')} mask: "
                                                           f"{100.0 * float(organ.mean()):.1f}% of the volume")
        return organ

    def predict_case(self, case: PredictJob, model, card: dict, device, precision, thresholds, min_size) -> None:
        """Read, predict, post-process and write one case (its outputs appear together or not at all)."""
        from ..inference.predict import predict_volume  # lazy: torch

        options, reporter = self.options, self.reporter
        t0 = time.monotonic()
        reporter.emit("load", case=case.name, message=f"reading {', '.join(map(str, case.image_files))}")
        image, geometry = read_channels(case.image_files, what="image")
        check_volume_grid(geometry, case.image)  # a 2D slice or a micrometre spacing never reaches the network
        check_label_map(image, case.image, force=options.force,
                        warn=lambda message: reporter.emit("warning", case=case.name, message=message))
        # the SEG's source images are read (and matched to the grid) before inference, so a series
        # that cannot be referenced fails in seconds, not after the network has run
        dicom_source = None if case.dicom_seg is None else dicom_seg_writer.source_series(case.image, geometry)
        mismatch = check_modality(card, image, str(case.image), options.allow_modality_mismatch)
        if mismatch:
            reporter.emit("warning", case=case.name, message=mismatch)
        organ = self.read_organ_mask(case, image, geometry, card)
        note = spacing_note(card, geometry, options.keep_spacing)  # one line when the input is resampled
        reporter.emit("preprocess", case=case.name, **({"message": note} if note else {}))
        try:
            prediction = predict_volume(
                model, image, card, geometry=geometry, organ_mask=organ, device=device, overlap=options.overlap,
                threshold=options.threshold, batch_size=options.batch_size, precision=precision,
                skip_background=not options.no_skip, engine=options.engine, tta=options.tta,
                keep_spacing=options.keep_spacing, progress=Throttled(reporter.inference_callback(case.name)), cancel=self.cancel,
                on_warning=lambda message: reporter.emit("warning", case=case.name, message=message),
                logit_threshold=self.logit_threshold,
                members=not options.no_doubt,  # per-lesion doubt: only with --tta or an ensemble
            )
        except InputError as exc:
            raise InputError(f"{case.image}: {exc}") from None
        check_finite(prediction.logits, case, ", ".join(map(str, options.models)))
        region = guard_region(image, card, organ)  # what the summary's percentages are of (lesion_guards)
        del image, organ
        reporter.emit("postprocess", case=case.name)
        if min_size is not None:
            prediction.mask = remove_small_components(prediction.mask, geometry.spacing_zyx, min_size,
                                                      options.connectivity).astype(np.uint8)
        # the lesion count goes into the progress protocol, so lesions are analysed even without --lesions
        report, n_lesions = lesion_report(case, prediction, geometry, thresholds, options.connectivity)
        report["provenance"] = self.provenance(prediction.threshold).as_dict()  # the JSON, the SEG and the SR
        prediction.members = None  # the members' maps are reduced to the lesions' doubt: freed before writing
        summary = summarize(report, geometry, region)
        for message in summary.warnings():
            reporter.emit("warning", case=case.name, message=message)
        outputs = write_case_outputs(case, prediction, geometry, report, options, reporter, self.cancel, dicom_source)
        reporter.emit("case_done", case=case.name, outputs=outputs, lesions=n_lesions,
                      windows=prediction.stats.windows_run, windows_total=prediction.stats.windows_total,
                      engine=prediction.stats.engine, seconds=round(time.monotonic() - t0, 2),
                      summary=summary.as_dict())
