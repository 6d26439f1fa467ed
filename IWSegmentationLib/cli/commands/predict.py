"""``iwseg predict``: lesion masks, probability maps and lesion tables from a trained checkpoint.

The argparse edge of the prediction use case (:mod:`IWSegmentationLib.predict`): the flags become
a :class:`~IWSegmentationLib.predict.options.PredictOptions` (which checks every range) and an
:class:`~IWSegmentationLib.predict.cases.OutputTargets`, then a
:class:`~IWSegmentationLib.predict.predictor.Predictor` runs them here, or
:func:`~IWSegmentationLib.serve.client.predict_on_server` on an ``iwseg serve`` server. A cancel
(SIGINT/SIGTERM) exits with code 3, bad input with code 2 and a one-line message naming the file
or flag. ``--progress-format jsonl`` speaks the protocol of :mod:`IWSegmentationLib.core.progress`
on stdout (logs on stderr). See docs/inference.md.
"""

from __future__ import annotations

import argparse

from ...core.errors import EXIT_FAILURE, Cancelled, InputError, IWSegError
from ...core.progress import CancelState, ProgressReporter
from ...models.library import resolve_model
from ...predict.cases import OutputTargets, collect_cases
from ...predict.options import PredictOptions
from ...predict.predictor import Predictor
from ...serve.client import ServerClient, model_name, predict_on_server
from ...serve.jobs import single_file_suffix


def options_from_arguments(args: argparse.Namespace) -> PredictOptions:
    """The prediction parameters of a parsed ``iwseg predict`` command line (checked on construction)."""
    models = tuple(args.model) if args.server else tuple(resolve_model(m) for m in args.model)  # library names
    return PredictOptions(
        models=models, device=args.device, overlap=args.overlap, threshold=args.threshold,
        batch_size=args.batch_size, precision=args.precision, engine=args.engine, tta=args.tta,
        no_skip=args.no_skip, force=args.force, threads=args.threads,
        probabilities=args.probabilities is not None, probabilities_uint8=args.probabilities_uint8,
        logits=args.logits is not None, lesions=args.lesions is not None, size_preset=args.size_preset,
        size_thresholds=None if args.size_thresholds is None else tuple(args.size_thresholds),
        connectivity=args.connectivity, min_lesion_size=args.min_lesion_size,
        allow_unmasked=args.allow_unmasked,
        operating_point=args.operating_point,
        keep_spacing=args.keep_spacing, allow_modality_mismatch=args.allow_modality_mismatch,
        no_doubt=args.no_doubt,
    )


def targets_from_arguments(args: argparse.Namespace) -> OutputTargets:
    """Where the outputs of a parsed ``iwseg predict`` command line go."""
    return OutputTargets(mask=args.output, probabilities=args.probabilities, logits=args.logits,
                         lesions=args.lesions, dicom_seg=args.dicom_seg, dicom_sr=args.dicom_sr)


def run(args: argparse.Namespace) -> int:
    reporter = ProgressReporter(args.progress_format)
    state = CancelState()

    def report_error(message: str, code: int) -> None:
        # in text mode the command line itself prints the error line on stderr
        if args.progress_format == "jsonl":
            reporter.emit("error", message=message, exit_code=code)

    try:
        with state.installed():
            options = options_from_arguments(args)
            targets = targets_from_arguments(args)
            if targets.dicom_sr is not None and targets.dicom_seg is None:
                raise InputError("--dicom-sr needs --dicom-seg: the SR's measurements reference the SEG's segments")
            if args.server:
                return _run_on_server(args, options, targets, reporter, state)
            return Predictor(options, reporter, state).run(args.input, targets, organ_mask=args.organ_mask,
                                                           shard=args.shard, overwrite=args.overwrite)
    except Cancelled as exc:
        report_error(f"cancelled: {exc}", exc.exit_code)
        raise
    except KeyboardInterrupt:
        report_error("cancelled", Cancelled.exit_code)
        raise Cancelled("interrupted") from None
    except IWSegError as exc:
        report_error(str(exc), exc.exit_code)
        raise
    except Exception as exc:
        report_error(f"{type(exc).__name__}: {exc}", EXIT_FAILURE)
        raise


def _run_on_server(args: argparse.Namespace, options: PredictOptions, targets: OutputTargets,
                   reporter: ProgressReporter, state: CancelState) -> int:
    """``--server URL``: the same path checks as a local run, then the job runs on the server."""
    if len(args.input) != 1:
        raise InputError("--server takes one image file as --input; multi-channel input runs on this computer")
    image = args.input[0]
    if image.is_dir():
        raise InputError(f"--input {image}: with --server give one image file (folders and DICOM series "
                         "are not sent to a server)")
    if args.organ_mask is not None:  # uploaded with the image; the server checks it as a local run does
        single_file_suffix(args.organ_mask.name, what="with --server, --organ-mask")
    if args.dicom_seg is not None or args.dicom_sr is not None:
        flag = "--dicom-seg" if args.dicom_seg is not None else "--dicom-sr"
        raise InputError(f"{flag} needs a DICOM series, which is not sent to a server; run without --server")
    if len(options.models) != 1:
        raise InputError("--server runs one model; an ensemble (several --model) runs on this computer")
    output_format = single_file_suffix(targets.mask.name, what="--output")
    for flag, path in (("--probabilities", targets.probabilities), ("--logits", targets.logits)):
        if path is not None and single_file_suffix(path.name, what=flag) != output_format:
            raise InputError(f"with --server, {flag} must use the format of --output ({output_format}), got {path.name}")
    case = collect_cases(image, targets, models=options.models, overwrite=args.overwrite,
                         organ_mask=args.organ_mask)[0]
    if options.device != "auto":
        reporter.emit("warning", case=None, message=f"--device {options.device} is ignored: the server picks the device")
    outputs = {"mask": case.mask, "probabilities": case.probabilities, "logits": case.logits, "lesions": case.lesions}
    client = ServerClient.from_token_file(args.server, args.token_file)
    return predict_on_server(client, model_name(options.models[0]), case.image, case.name,
                             {k: v for k, v in outputs.items() if v is not None},
                             {**options.to_request(), "output_format": output_format}, reporter, state,
                             organ_mask=case.organ_mask)
