"""The module's logic without Qt: volume node in, backend process, lesion segments out.

The scripted module's ``IWSegmentationLogic`` is a thin adapter from its parameter node to
:class:`LesionSegmentationLogic` (the SlicerNNUnet pattern: the logic lives in the library, the
module only wires widgets). Everything here uses MRML nodes, :mod:`IWSegmentationLib.slicer.mrml`,
:mod:`IWSegmentationLib.backend` and :mod:`IWSegmentationLib.slicer.panel` — no Qt, no ``slicer.app``
— so it runs, with the real backend, under the ``slicer-core`` wheel in the tests.

Flow of one run:

1. :meth:`LesionSegmentationLogic.check_inputs` refuses what cannot work (no volume, 2D,
   vector voxels, no model card) and returns warnings for the user to confirm (modality,
   organ-mask preset);
2. :meth:`~LesionSegmentationLogic.start` writes the volume (and the organ mask, on the
   volume's grid) into the job's folder with their exact geometry and starts the job the
   injected :class:`~IWSegmentationLib.backend.job.JobFactory` makes: by default
   ``python -m IWSegmentationLib predict`` in a child process
   (:class:`~IWSegmentationLib.backend.local_run.LocalJobFactory`), in tests a fake, and any other
   :class:`~IWSegmentationLib.backend.job.SegmentationJob` (e.g. a server) alike;
3. on success the run's loader reads the mask and the logit map (confidences are maximum
   logits; the probability volume is its sigmoid) and calls
   :func:`IWSegmentationLib.slicer.mrml.load_prediction` inside :func:`scene_rollback`: if anything
   fails, every node it added is removed, so a failed run leaves the scene as it was. A
   cancelled or failed backend never touches the scene at all.

When the scene closes, :attr:`LesionSegmentationLogic.results` is dropped: its nodes are gone.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from ..backend.job import JobFactory, RunResult, SegmentationJob
from ..backend.local_run import LocalJobFactory, check_local_checkpoints
from ..core.errors import InputError
from ..core.provenance import read_provenance
from ..predict.options import PredictOptions
from . import panel, parameter_node


@contextlib.contextmanager
def scene_rollback(scene) -> Iterator[None]:
    """If the block raises, remove every node it added to ``scene`` (then re-raise)."""
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    except BaseException:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in added:
            if node is not None and node.GetID() not in before:
                scene.RemoveNode(node)
        raise


def check_volume_node(volume_node) -> None:
    """Refuse a missing volume, an empty one, 2D slices or vector voxels (:class:`InputError`)."""
    if volume_node is None or volume_node.GetImageData() is None:
        raise InputError("Select an input volume.")
    image = volume_node.GetImageData()
    panel.check_volume_shape(image.GetDimensions(), image.GetNumberOfScalarComponents(), volume_node.GetName())


def check_single_channel(card: Mapping[str, Any], checkpoint: str | os.PathLike | None = None) -> None:
    """The module segments one volume: refuse a model of several input channels (multi-sequence
    MR, ``architecture.in_channels`` > 1) before anything starts, pointing to the command line."""
    from ..nn.model_card import card_in_channels

    channels = card_in_channels(card)
    if channels != 1:
        source = f" {checkpoint}" if checkpoint is not None else ""
        raise InputError(
            f"The model{source} takes {channels} image channels (e.g. several MR sequences); this module "
            f"segments one volume. Run it from the command line: iwseg predict --model CKPT --input "
            f"{' '.join(f'CHANNEL{c}.nii.gz' for c in range(channels))} --output MASK.nii.gz (see docs/inference.md)."
        )


class LesionSegmentationLogic:
    """Segment the lesions of a volume node with a checkpoint, in a backend job.

    ``job_factory`` makes the job of each run (:class:`~IWSegmentationLib.backend.job.JobFactory`);
    by default a :class:`~IWSegmentationLib.backend.local_run.LocalJobFactory` built from ``python`` (the
    interpreter that runs the backend, ``PythonSlicer`` inside Slicer), ``env`` (its environment,
    default :func:`~IWSegmentationLib.backend.interpreter.backend_environment`) and ``workdir_parent`` (where
    the temporary run folders go, default the system's temp folder). :attr:`results` holds the
    last :class:`~IWSegmentationLib.slicer.mrml.PredictionResults`, until the scene closes.
    """

    def __init__(self, scene, *, python: str | os.PathLike | None = None, env: Mapping[str, str] | None = None,
                 workdir_parent: str | os.PathLike | None = None,
                 job_factory: JobFactory | None = None) -> None:
        self.scene = scene
        self.job_factory: JobFactory = job_factory or LocalJobFactory(
            python, dict(env) if env is not None else None, workdir_parent)
        self._local_factory = self.job_factory
        self.results = None
        #: how many of the most confident lesions a result makes segments (None: all); see :meth:`show_more`
        self.segment_budget: int | None = panel.DEFAULT_SEGMENT_BUDGET
        self._close_observer = scene.AddObserver(scene.StartCloseEvent, self._on_scene_close)
        #: the reader's verdicts on :attr:`results` (``slicer.review.LesionReview``) and the status line of loading them
        self.review, self.review_note, self._model = None, "", (None, {})

    def _on_scene_close(self, caller=None, event=None) -> None:
        self.clear_results()

    def clear_results(self) -> None:
        """Forget the last results (their nodes left with the scene)."""
        self.results, self.review = None, None

    def close(self) -> None:
        """Stop observing the scene (the module's ``cleanup()``)."""
        if self._close_observer is not None:
            self.scene.RemoveObserver(self._close_observer)
            self._close_observer = None

    def read_model_card(self, checkpoint_path: str | os.PathLike, node: Any = None) -> dict:
        """The model card of the checkpoint, from where the jobs run (the file here, or the server);
        given the module's parameter ``node``, from where it says they run (:meth:`run_on_node`)."""
        if node is not None:
            self.run_on_node(node)
        return self.job_factory.model_card(PredictOptions(models=(checkpoint_path,)))

    def run_on(self, where: str = panel.RUN_ON[0], server_url: str = "",
               token_file: str | os.PathLike | None = None) -> None:
        """Run the next jobs on this computer (the factory given at construction) or on the
        ``iwseg serve`` server at ``server_url`` (docs/server.md), where the checkpoint names one
        of the server's models. ``where`` is one of :data:`~IWSegmentationLib.slicer.panel.RUN_ON`."""
        from ..serve.client import RemoteJobFactory, ServerClient  # standard library only

        if where not in panel.RUN_ON:
            raise InputError(f"run on must be one of {', '.join(panel.RUN_ON)}, got {where!r}")
        if where == panel.RUN_ON[0]:
            self.job_factory = self._local_factory
        else:
            self.job_factory = RemoteJobFactory(ServerClient.from_token_file(server_url.strip(), token_file or None))

    def describe_checkpoint(self, checkpoint_path: str | os.PathLike, node: Any = None) -> tuple[dict | None, str]:
        """The model card of ``checkpoint_path`` and the module's text for it (:func:`panel.model_card_text`):
        ``(None, why)`` for no checkpoint or one that cannot be used, ``({}, a note)`` while PyTorch is
        not installed (Apply installs it; then the card shows). Given the parameter ``node``, the card is
        read where it says the model runs, and the node's threshold and confidence slider start where
        the card says (:func:`~IWSegmentationLib.slicer.parameter_node.apply_model_card`)."""
        if not checkpoint_path:
            return None, "No checkpoint selected."
        try:
            card = self.read_model_card(checkpoint_path, node)
            text = panel.model_card_text(card)
        except ImportError:  # PyTorch not installed yet: Apply installs it, then the card shows
            return {}, "The model card shows once Apply has installed PyTorch."
        except InputError as exc:
            return None, f"Cannot use this checkpoint: {exc}"
        if node is not None:
            parameter_node.apply_model_card(node, card)
        return card, text

    def export(self, path: str | os.PathLike, dicom_database: Any = None):
        """The Export button: :attr:`results` as CSV (with the reader's verdicts) and, for a volume of
        ``dicom_database`` (``slicer.dicomDatabase``), as DICOM SEG; returns the
        :class:`~IWSegmentationLib.slicer.export.ExportResult`."""
        from .export import export_in_slicer  # lazy: imports mrml (vtk), as this class's other scene methods

        if self.results is None:
            raise InputError("No result to export: run the segmentation first.")
        return export_in_slicer(self.results, path, dicom_database, self.review)

    def run_on_node(self, node: Any) -> None:
        """:meth:`run_on` where the module's parameter node says: its ``runOn``, ``serverUrl`` and ``serverTokenFile``."""
        self.run_on(node.runOn, node.serverUrl, node.serverTokenFile)

    @property
    def runs_locally(self) -> bool:
        """True when jobs run on this computer (which then needs PyTorch)."""
        return self.job_factory is self._local_factory

    def check_checkpoint(self, options: PredictOptions) -> PredictOptions:
        """``options``, refused without a checkpoint or, for a job on this computer, when its file
        is missing (a server's model is named, not read here): before anything is installed."""
        if self.runs_locally:
            check_local_checkpoints(options)
        else:
            options.checkpoint  # noqa: B018  (the property raises InputError when none is selected)
        return options

    def check_inputs(self, volume_node, card: Mapping[str, Any] | None, dicom_modality: str | None = None) -> list[str]:
        """Raise :class:`InputError` for unusable inputs; return warnings the user should confirm."""
        check_volume_node(volume_node)
        if card is None:
            raise InputError("Select a readable model checkpoint.")
        check_single_channel(card)
        low, high = volume_node.GetImageData().GetScalarRange()
        return panel.compatibility_warnings(card, minimum=low, maximum=high, dicom_modality=dicom_modality)

    def check_node_inputs(self, node: Any, card: Mapping[str, Any] | None, dicom_database: Any = None) -> list[str]:
        """:meth:`check_inputs` of the parameter node's ``inputVolume``, with the modality of its DICOM
        series read from ``dicom_database`` (``slicer.dicomDatabase``; None: not from DICOM)."""
        volume = node.inputVolume
        modality = volume and panel.dicom_modality(volume.GetAttribute("DICOM.instanceUIDs"), dicom_database)
        return self.check_inputs(volume, card, modality)

    def start_node(self, node: Any, *, confirmed: bool = False, install: Callable[[], Any] | None = None,
                   on_progress: Callable[[Any], Any] | None = None,
                   on_finished: Callable[[RunResult], Any] | None = None,
                   on_log: Callable[[str], Any] | None = None) -> SegmentationJob:
        """:meth:`start` with what the module's parameter node says: where to run (:meth:`run_on_node`),
        the options (:func:`~IWSegmentationLib.slicer.parameter_node.predict_options`, the checkpoint checked
        first), the volume, organ mask, reference and display budget (``segmentBudget``).

        ``confirmed``: the user confirmed :meth:`check_inputs`' warnings (a modality mismatch runs anyway).
        ``install`` (``slicer.deps.ensure_in_slicer`` in Slicer) is called before a job on this computer,
        which needs PyTorch; a server needs nothing installed here."""
        self.run_on_node(node)
        options = self.check_checkpoint(parameter_node.predict_options(node, allow_modality_mismatch=confirmed))
        if install is not None and self.runs_locally:
            install()
        self.segment_budget = int(node.segmentBudget)
        return self.start(node.inputVolume, options, organ_mask=node.organMask, reference=node.referenceSegmentation,
                          on_progress=on_progress, on_finished=on_finished, on_log=on_log)

    def start(
        self,
        volume_node,
        options: PredictOptions,
        *,
        organ_mask=None,
        reference=None,
        on_progress: Callable[[Any], Any] | None = None,
        on_finished: Callable[[RunResult], Any] | None = None,
        on_log: Callable[[str], Any] | None = None,
    ) -> SegmentationJob:
        """Write the inputs and start the backend; returns the running :class:`~IWSegmentationLib.backend.job.SegmentationJob`.

        ``options`` (the module builds them with :func:`~IWSegmentationLib.slicer.parameter_node.predict_options`)
        are run with the outputs this logic loads: the mask, the logit map and the lesion table.

        Poll it (``run.poll()`` from a timer) or wait for it (``run.wait(timeout).loaded_or_raise()``, the blocking mode). On success its
        result's ``loaded`` is the :class:`~IWSegmentationLib.slicer.mrml.PredictionResults`.
        """
        from ..core import imageio
        from . import mrml

        # the logit map, not the probabilities: confidences are maximum logits, and the probability
        # volume is its sigmoid, computed on loading (one map written, read and sent, not two)
        options = options.with_outputs(probabilities=False, logits=True, lesions=True)
        check_volume_node(volume_node)
        card = self.job_factory.model_card(options)
        check_single_channel(card, options.checkpoint)
        self._model = (options.checkpoint, card)  # the verdict files name the model (slicer.review)
        sizes = panel.card_size_thresholds(card)
        array, geometry = mrml.array_from_volume(volume_node)

        def write_organ(path):
            organ = mrml.labelmap_on_volume_grid(organ_mask, volume_node) > 0
            imageio.write_image(path, organ.astype("uint8"), geometry)

        run = self.job_factory(options, loader=lambda outputs: self.load_results(outputs, volume_node, reference,
                                                                                    sizes))
        for signal, slot in ((run.progress, on_progress), (run.finished, on_finished), (run.log, on_log)):
            if slot is not None:
                signal.connect(slot)
        run.start(write_input=lambda path: imageio.write_image(path, array, geometry),
                  write_organ_mask=write_organ if organ_mask is not None else None)
        return run

    def load_results(self, outputs: Mapping[str, os.PathLike], volume_node, reference=None, size_thresholds_mm=None):
        """Read the backend's outputs onto the volume's grid and build the scene (all or nothing);
        only the :attr:`segment_budget` most confident lesions become segments (:meth:`show_more`)."""
        from ..core import imageio
        from . import mrml

        mask, mask_geometry = imageio.read_image(outputs["mask"], what="lesion mask")
        logits, logits_geometry = imageio.read_image(outputs["logits"], what="logit map")
        # the lesion JSON carries what the maps do not: per-lesion doubt (TTA, ensembles) and the second look
        report = json.loads(Path(outputs["lesions"]).read_text()) if outputs.get("lesions") else None
        with scene_rollback(self.scene):
            self.results = mrml.load_prediction(
                self.scene, volume_node, mask, logits, reference=reference,
                size_thresholds_mm=size_thresholds_mm, keep_probabilities=True,
                geometry=mask_geometry, logits_geometry=logits_geometry, budget=self.segment_budget,
                lesion_report=report,
            )
        self.results.provenance = read_provenance(outputs.get("lesions"))
        from .review import open_review  # lazy: imports mrml (vtk), as this method's other imports

        self.review, self.review_note = open_review(self.results, mask, outputs, *self._model)
        return self.results

    def set_verdict(self, row: Mapping[str, Any], verdict: str) -> str:
        """Accept or reject the lesion of a table row (``slicer.review.record_verdict``); returns the status line."""
        if self.review is None:
            raise InputError("No result to review: run the segmentation first.")
        from .review import record_verdict  # lazy: imports mrml (vtk)

        return record_verdict(self.review, row, verdict)

    def show_more(self, count: int | None = None) -> int:
        """Make segments of the next ``count`` (default :attr:`segment_budget`) most confident lesions
        the display budget left out; returns how many were added (0 without results)."""
        from . import mrml

        if self.results is None:
            return 0
        return mrml.show_more_results(self.scene, self.results, count or self.segment_budget or 0)

    @staticmethod
    def set_confidence_threshold(results, value: float) -> panel.DetectionCounts:
        """Show only lesions whose confidence (maximum logit) is >= ``value``; return the counts the panel shows."""
        from . import mrml

        mrml.set_confidence_threshold(results.segmentation, value)
        return panel.detection_counts(results.lesions, value, results.matches)

    def center_views_on(self, row: Mapping[str, Any]) -> tuple[float, float, float] | None:
        """Centre the slice views on a lesion-table row of :attr:`results` (its ``center_ras``,
        in the input volume's frame); returns the world point, or None for a row without a centre."""
        from . import mrml

        if self.results is None or row.get("center_ras") is None:
            return None
        volume = mrml.reference_volume_node(self.results.segmentation)
        return mrml.center_slice_views(self.scene, row["center_ras"], volume)
