"""IWSegmentation: lesion segmentation with inverse-weighted 3D U-Nets, one segment per lesion.

A thin 3D Slicer scripted module: Qt widgets, the parameter node and the wiring. The work is
done elsewhere: inference in a separate backend process (``IWSegmentationLib.backend.local_run``, which
runs ``PythonSlicer -m IWSegmentationLib predict``), the texts and rows of the panel in
``IWSegmentationLib.slicer.panel`` and the scene building in ``IWSegmentationLib.slicer.mrml``; all three are
tested without Slicer. See docs/module.md.
"""

import importlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# ------------------------------------------------------------------------------------------ the engine


def _findEngine(moduleFile=__file__):
    """Make the engine, IWSegmentationLib, importable; return the folder added to sys.path (or None).

    Three install routes: ``pip install`` of the engine, or the extension build (the engine next
    to this file): already importable. The module path set to a checkout's ``IWSegmentation/``:
    the engine is at the repository root, one folder up, which is added to ``sys.path``.
    """
    if importlib.util.find_spec("IWSegmentationLib") is not None:
        return None
    root = os.path.dirname(os.path.dirname(os.path.abspath(moduleFile)))
    if not os.path.isfile(os.path.join(root, "IWSegmentationLib", "__init__.py")):
        raise ImportError(
            f"IWSegmentation cannot find its engine, the IWSegmentationLib package: it is not installed in "
            f"Slicer's Python, not next to {moduleFile} (extension build) and not in {root} (a repository "
            "checkout). Add a checkout's IWSegmentation folder as an additional module path, or install "
            "the engine with slicer.util.pip_install('<path of a checkout>') and restart Slicer.")
    sys.path.insert(0, root)
    return root


_findEngine()
from IWSegmentationLib.backend.device_probe import DeviceProbe  # noqa: E402
from IWSegmentationLib.backend.interpreter import backend_environment  # noqa: E402
from IWSegmentationLib.backend.job import Outcome  # noqa: E402
from IWSegmentationLib.backend.local_run import LocalJobFactory  # noqa: E402
from IWSegmentationLib.core import errors, lesion_sizes  # noqa: E402
from IWSegmentationLib.slicer import deps as slicer_deps  # noqa: E402
from IWSegmentationLib.slicer import logic as slicer_logic  # noqa: E402
from IWSegmentationLib.slicer import model_choices, panel  # noqa: E402
from IWSegmentationLib.slicer import reloading as slicer_reloading  # noqa: E402

# ------------------------------------------------------------------------------------------ the module


class IWSegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "IW Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["IWSegmentation developers"]
        self.parent.helpText = """Segments lesions with a 3D U-Net trained with inverse weighting, so small lesions are
not lost among large ones: one segment per lesion, coloured by size, with diameter, volume, confidence (the maximum
logit inside the lesion) and Dice.
Inference runs in a background process (Apply turns into Cancel). The user guide is docs/module.md in the
extension's source folder (the folder above this module's IWSegmentation/)."""
        self.parent.acknowledgementText = """Method: B. Shirokikh, A. Shevtsov, A. Kurmukov et al., "Universal Loss
Reweighting to Balance Lesion Size Inequality in 3D Medical Image Segmentation", MICCAI 2020, LNCS 12264,
pp. 523-532, doi:10.1007/978-3-030-59719-1_51."""


@parameterNodeWrapper
class IWSegmentationParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    organMask: vtkMRMLSegmentationNode
    referenceSegmentation: vtkMRMLSegmentationNode
    checkpointPath: str = ""
    device: Annotated[str, Choice(list(panel.DEVICE_CHOICES))] = "Auto"
    overlap: Annotated[float, WithinRange(0.0, 0.9)] = 0.25
    threshold: Annotated[float, WithinRange(0.05, 0.95)] = 0.5
    keepSpacing: bool = False
    allowUnmasked: bool = False
    tta: bool = False
    # a logit (a lesion's confidence is its maximum logit); the minimum, -5, is below every lesion's
    # (each lies above logit(threshold) >= logit(0.05) = -2.9), so the default shows them all
    confidenceThreshold: Annotated[float, WithinRange(-5.0, 50.0)] = -5.0
    runOn: Annotated[str, Choice(list(panel.RUN_ON))] = panel.RUN_ON[0]
    serverUrl: str = "http://127.0.0.1:8000"
    serverTokenFile: str = ""
    outputSegmentation: vtkMRMLSegmentationNode
    # the card's operating point ("1fp", "1/8fp"; empty: the threshold above); display budget
    operatingPoint: str = ""
    segmentBudget: Annotated[int, WithinRange(1, 100000)] = panel.DEFAULT_SEGMENT_BUDGET


class IWSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = self._parameterNode = self._gui = None
        self._run = self._progress = self._card = self._devices = self._deviceProbe = None
        self._installing, self._rows = False, []

    # -- setup and teardown ----------------------------------------------------------------------

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/IWSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = IWSegmentationLogic()
        self._gui = panel.GuiBinding(self.ui)  # connectGui once per node (Slicer 5.6/5.8 give no tag)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.checkpointPathLineEdit.connect("currentPathChanged(QString)", self.onCheckpointChanged)
        self.modelMenu = model_choices.ModelMenu(qt.QComboBox(), self.ui.checkpointPathLineEdit, row=1)  # the library
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateDeviceInfo)
        for name, signal in panel.RUN_ON_SIGNALS.items():  # where the model runs decides where its card is read
            getattr(self.ui, name).connect(signal, lambda *a: self.onCheckpointChanged(
                self.ui.checkpointPathLineEdit.currentPath))
        self.ui.confidenceSliderWidget.connect("valueChanged(double)", self.onConfidenceChanged)
        self.ui.lesionTableWidget.connect("cellClicked(int, int)", self.onLesionClicked)
        panel.fill_lesion_table(self.ui.lesionTableWidget, [], qt.QTableWidgetItem)  # the headers
        self.ui.showMoreButton.connect("clicked(bool)", self.onShowMoreLesions)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.ui.acceptLesionButton.connect("clicked(bool)", lambda *a: self.onVerdict("accepted"))  # docs/verdicts.md
        self.ui.rejectLesionButton.connect("clicked(bool)", lambda *a: self.onVerdict("rejected"))
        self.ui.progressBar.visible = False
        self.ui.legendLabel.text = panel.legend_html()

        # One timer polls the device probe (until it answers) and the running backend; the
        # backend's callbacks are therefore always called on the GUI thread.
        self._timer = qt.QTimer()
        self._timer.setInterval(150)
        self._timer.connect("timeout()", self.onPoll)
        self.startDeviceProbe()
        self.initializeParameterNode()

    def cleanup(self):
        """Slicer closes: no backend, no probe, no copy of the patient's volume is left behind."""
        self._timer.stop()
        if self._run is not None:
            self._run.close()
        if self._deviceProbe is not None:
            self._deviceProbe.close()
        self.logic.lesionLogic.close()
        self.removeObservers()

    def onReload(self):
        slicer_reloading.reload_engine()
        ScriptedLoadableModuleWidget.onReload(self)

    # -- the parameter node (Slicer's scripted-module template) ----------------------------------

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        # Keep the node (a run may finish while the user is elsewhere); only stop reacting to it.
        if self._parameterNode:
            self._gui.release()
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateApplyButton)

    def onSceneStartClose(self, caller, event):
        if self._run is not None and self._run.running:
            self._run.cancel()
        self.clearResults()
        self.setParameterNode(None)
        self._gui.forget()

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateApplyButton)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._gui.bind(self._parameterNode)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateApplyButton)
            if self.ui.checkpointPathLineEdit.currentPath != self._parameterNode.checkpointPath:
                self.ui.checkpointPathLineEdit.currentPath = self._parameterNode.checkpointPath
            self.updateApplyButton()

    def updateApplyButton(self, caller=None, event=None):
        state = panel.apply_button_state(
            running=self._run is not None and self._run.running, installing=self._installing,
            ready=bool(self._parameterNode and self._parameterNode.inputVolume and self._card is not None))
        self.ui.applyButton.text, self.ui.applyButton.enabled = state.text, state.enabled
        self.ui.applyButton.toolTip = state.tooltip

    # -- inputs: checkpoint and device -----------------------------------------------------------

    def onCheckpointChanged(self, path):
        if self._parameterNode:
            self._parameterNode.checkpointPath = path
        # the card sets the node's threshold and confidence; {}: PyTorch is not installed yet
        self._card, self.ui.modelCardLabel.text = self.logic.lesionLogic.describe_checkpoint(path, self._parameterNode)
        if self._card:
            self.ui.checkpointPathLineEdit.addCurrentPathToHistory()  # the settingKey's recent paths
        panel.organ_mask_hint(self._card).show(self.ui.organMaskLabel, self.ui.organMaskSelector)
        self.updateApplyButton()

    def startDeviceProbe(self):
        """Ask a child interpreter which devices torch sees (again after an install)."""
        self._devices = None
        self._deviceProbe = DeviceProbe(self.logic.python, env=self.logic.env)
        self._deviceProbe.start()
        self._timer.start()

    def updateDeviceInfo(self, *args):
        text, warning = panel.describe_devices(self._devices, panel.DEVICE_CHOICES[self.ui.deviceComboBox.currentText or "Auto"])
        self.ui.deviceInfoLabel.text = text + (f"\n⚠ {warning}" if warning else "")

    def onPoll(self):
        if self._devices is None and self._deviceProbe.poll() is not None:
            self._devices = self._deviceProbe.result
            self.updateDeviceInfo()
        if self._run is not None and self._run.running:
            self._run.poll()
        elif self._devices is not None:
            self._timer.stop()

    # -- the run ---------------------------------------------------------------------------------

    def onApplyButton(self):
        if self._installing:  # pip_install processes GUI events: never start a second pip
            return
        if self._run is not None and self._run.running:
            self._run.cancel()
            self.ui.statusLabel.text = "Cancelling…"
            return
        with slicer.util.tryWithErrorDisplay("Failed to start the segmentation.", waitCursor=True):
            warnings = self.logic.checkInputs(self._parameterNode, self._card)
            if warnings and not slicer.util.confirmOkCancelDisplay(
                    "\n\n".join(warnings) + "\n\nRun the segmentation anyway?", "IWSegmentation: check the inputs"):
                return
            self._progress = panel.ProgressState()
            self._installing = True
            self.updateApplyButton()
            try:
                self._run = self.logic.start(self._parameterNode, onProgress=self.onProgress,
                                             onFinished=self.onFinished, confirmed=bool(warnings))
            finally:
                self._installing = False
            if not self._card:
                self.onCheckpointChanged(self._parameterNode.checkpointPath)  # PyTorch is there now
            if panel.device_probe_is_stale(self._devices):
                self.startDeviceProbe()  # the device line was probed before PyTorch was installed
            self.ui.progressBar.value, self.ui.progressBar.visible = 0, True
            self.ui.statusLabel.text = "Starting the backend…"
            self._timer.start()
        self.updateApplyButton()

    def onProgress(self, event):
        self._progress.update(event)
        self.ui.progressBar.value = self._progress.percent
        self.ui.statusLabel.text = self._progress.text

    def onFinished(self, result):
        self.ui.progressBar.visible = False
        self.updateApplyButton()
        if result.outcome is Outcome.CANCELLED:
            self.ui.statusLabel.text = "Cancelled. The scene was not changed."
        elif not result.ok:
            self.ui.statusLabel.text = f"Failed: {result.message}"
            slicer.util.errorDisplay(result.report(), windowTitle="IWSegmentation: segmentation failed")
        else:
            self.showResults(result.loaded, result.seconds)

    # -- the results -----------------------------------------------------------------------------

    def showResults(self, results, seconds):
        parameters = self._parameterNode or self.logic.getParameterNode()
        parameters.outputSegmentation = results.segmentation
        self._rows = results.rows  # detected lesions, then missed reference lesions (FN)
        if seconds is not None:
            self.ui.statusLabel.text, self.ui.summaryLabel.text = panel.result_texts(
                len(results.lesions), seconds, getattr(self._progress, "summary", None))
            self.ui.statusLabel.text += f" {getattr(self.logic.lesionLogic, 'review_note', '')}".rstrip()  # verdicts
        panel.show_more_button(results.not_shown, parameters.segmentBudget).show(self.ui.showMoreButton)
        self.ui.resultsCollapsibleButton.enabled = True
        panel.fill_lesion_table(self.ui.lesionTableWidget, self._rows, qt.QTableWidgetItem)
        self.onConfidenceChanged(parameters.confidenceThreshold)

    def clearResults(self):
        """The scene closes: its lesions go, and so do their rows."""
        self.logic.lesionLogic.clear_results()
        self._rows = []
        self.ui.lesionTableWidget.setRowCount(0)
        self.ui.summaryLabel.text = self.ui.countsLabel.text = self.ui.statusLabel.text = ""
        self.ui.resultsCollapsibleButton.enabled = False

    def onConfidenceChanged(self, value):
        self.ui.confidenceSliderWidget.toolTip = panel.confidence_slider_text(self._card, value)
        results = self.logic.results
        if results is not None:
            counts = self.logic.setConfidenceThreshold(results, value).text()
            self.ui.countsLabel.text = panel.confidence_slider_text(self._card, value) + "\n" + counts

    def onShowMoreLesions(self):
        """The display budget: make segments of the next most confident lesions, then refresh the table."""
        with slicer.util.tryWithErrorDisplay("Could not add the lesions.", waitCursor=True):
            if self.logic.lesionLogic.show_more():
                self.showResults(self.logic.results, None)

    def onLesionClicked(self, row, column):
        if 0 <= row < len(self._rows):
            self.logic.centerOnLesion(self._rows[row])

    # ---- the reader's verdicts and the export (CSV and, for a DICOM volume, DICOM SEG: IWSegmentationLib.slicer.export)

    def onVerdict(self, verdict):
        row = self.ui.lesionTableWidget.currentRow()
        with slicer.util.tryWithErrorDisplay("Could not record the verdict.", waitCursor=True):
            self.ui.statusLabel.text = self.logic.lesionLogic.set_verdict(
                self._rows[row] if 0 <= row < len(self._rows) else {}, verdict)

    def onExportButton(self):
        results = self.logic.results
        path = results and qt.QFileDialog.getSaveFileName(
            self.parent, "Export lesions (.csv, .dcm)", results.segmentation.GetName(), "Lesion table (*.csv)")
        if path:
            with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
                database = getattr(slicer, "dicomDatabase", None)
                self.ui.statusLabel.text = self.logic.lesionLogic.export(path, database).message


class IWSegmentationLogic(ScriptedLoadableModuleLogic):
    """Adapts the parameter node to ``IWSegmentationLib.slicer.logic`` (Qt-free, tested with slicer-core);
    ``jobFactory`` (a ``backend.job.JobFactory``, default a ``PythonSlicer`` child) runs the jobs on this computer."""

    def __init__(self, python=None, jobFactory=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.python = python or shutil.which("PythonSlicer") or sys.executable
        startup = slicer.util.startupEnvironment() if hasattr(slicer.util, "startupEnvironment") else None
        self.env = backend_environment(startup)  # PythonSlicer sets itself up from a clean environment
        self.lesionLogic = slicer_logic.LesionSegmentationLogic(
            slicer.mrmlScene, job_factory=jobFactory or LocalJobFactory(self.python, self.env))

    @property
    def results(self):
        return self.lesionLogic.results

    def getParameterNode(self):
        return IWSegmentationParameterNode(super().getParameterNode())

    def readModelCard(self, path, parameters=None):
        """The card of the model that will run: the file's, or the server's the parameter node chose."""
        return self.lesionLogic.read_model_card(path, parameters)

    def checkInputs(self, parameters, card):
        """Refuse unusable inputs (raises InputError); return warnings the user should confirm."""
        return self.lesionLogic.check_node_inputs(parameters, card, getattr(slicer, "dicomDatabase", None))

    def start(self, parameters, onProgress=None, onFinished=None, confirmed=False):
        """Install missing dependencies (first use), then start the backend; returns the running job."""
        return self.lesionLogic.start_node(
            parameters, confirmed=confirmed, install=slicer_deps.ensure_in_slicer, on_progress=onProgress,
            on_finished=onFinished, on_log=lambda line: logging.info(f"[iwseg] {line}"))

    def process(self, parameters, timeout=None):
        """Blocking mode for scripts and tests: run, wait, return the results; raise with the report on failure."""
        return self.start(parameters).wait(timeout).loaded_or_raise()

    def setConfidenceThreshold(self, results, value):
        return self.lesionLogic.set_confidence_threshold(results, value)

    def centerOnLesion(self, row):
        """Centre the slice views on a lesion-table row (a missed reference lesion too)."""
        return self.lesionLogic.center_views_on(row)


class IWSegmentationTest(ScriptedLoadableModuleTest):
    """The real path inside Slicer: a known-answer checkpoint (IWSegmentationLib/testing/phantom.py), a
    phantom volume and reference, Apply in blocking mode, then segments, colours, Dice, slider, screenshots."""

    def setUp(self):
        slicer.mrmlScene.Clear()
        self.tmp = tempfile.mkdtemp(prefix="IWSegmentationTest-")

    def runTest(self):
        for test in (self.test_KnownAnswer, self.test_BadInput, self.test_LeavingAndReentering,
                     self.test_SceneCloseClearsResults):
            self.setUp()
            test()

    def test_KnownAnswer(self):
        problem = slicer_deps.torch_problem()  # read from package metadata: torch is not imported here
        if problem is not None:
            self.delayDisplay(f"Known-answer test skipped: {problem} (install it with PyTorch Utils)")
            return
        import numpy as np

        from IWSegmentationLib.testing import phantom  # numpy only: the checkpoint is written by a child
        from IWSegmentationLib.testing.known_answer import write_known_answer_checkpoint

        self.delayDisplay("Known-answer segmentation of a phantom")
        case = phantom.phantom_case(spacing=(1.5, 0.9, 0.8))
        ijkToRas = np.diag([-case.spacing[2], -case.spacing[1], case.spacing[0], 1.0])
        volume = slicer.util.addVolumeFromArray(case.image, ijkToRas, name="Phantom")
        label = slicer.util.addVolumeFromArray(case.reference, ijkToRas, "Reference", "vtkMRMLLabelMapVolumeNode")
        reference = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Reference")
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(label, reference)
        logic = IWSegmentationLogic()
        params = logic.getParameterNode()
        params.inputVolume, params.referenceSegmentation, params.device = volume, reference, "CPU"
        torchLoaded = "torch" in sys.modules  # e.g. imported by hand in the Python console
        checkpoint = write_known_answer_checkpoint(
            os.path.join(self.tmp, "threshold.safetensors"), logic.python, env=logic.env)
        params.checkpointPath = str(checkpoint)
        results = logic.process(params, timeout=600)
        self.assertEqual("torch" in sys.modules, torchLoaded)  # Slicer's own process did not import it

        segmentation = results.segmentation.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), 3)
        self.assertEqual([c["size_group"] for c in results.lesions], ["large", "medium", "small"])  # largest first
        for lesion in results.lesions:
            color = segmentation.GetSegment(lesion["segment_id"]).GetColor()
            expected = [v / 255.0 for v in lesion_sizes.SIZE_GROUP_COLORS[lesion["size_group"]]]
            self.assertEqual([round(v, 3) for v in color], [round(v, 3) for v in expected])
            self.assertAlmostEqual(lesion["hit_dice"], 1.0, places=6)  # the prediction is the reference
        self.assertEqual([r["status"] for r in results.rows], ["TP"] * 3)
        self.assertEqual(results.table.GetNumberOfRows(), 3)

        # The slider (logits): the intensity-70 lesion has confidence 20 (0.7 - 0.5) = 4 < 5, the others 7 and 10.
        counts = panel.detection_counts(results.lesions, 5.0, results.matches)
        self.assertEqual((counts.shown, counts.detected, counts.false_positives), (2, 2, 0))
        logic.setConfidenceThreshold(results, 5.0)
        display = results.segmentation.GetDisplayNode()
        ids = [segmentation.GetNthSegmentID(i) for i in range(3)]
        self.assertEqual(sum(bool(display.GetSegmentVisibility(i)) for i in ids), 2)

        import ScreenCapture

        slicer.util.setSliceViewerLayers(background=volume, fit=True)
        smallest = results.rows[-1]  # a click on its row centres every slice view on it
        logic.centerOnLesion(smallest)
        red = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode().GetSliceToRAS()
        for axis in range(3):
            self.assertAlmostEqual(red.GetElement(axis, 3), smallest["center_ras"][axis], places=4)
        for view in ("Red", "Green"):
            path = os.path.join(self.tmp, f"IWSegmentationTest-{view}.png")
            ScreenCapture.ScreenCaptureLogic().captureImageFromView(
                slicer.app.layoutManager().sliceWidget(view).sliceView(), path)
            self.assertGreater(os.path.getsize(path), 0)
        self.delayDisplay(f"Test passed; screenshots in {self.tmp}")

    def test_BadInput(self):
        import numpy as np

        self.delayDisplay("Bad input is refused and leaves the scene unchanged")
        logic = IWSegmentationLogic()
        params = logic.getParameterNode()
        params.inputVolume = slicer.util.addVolumeFromArray(np.zeros((1, 20, 20), np.float32), name="Slice")
        with self.assertRaises(errors.InputError):
            logic.checkInputs(params, {"preprocessing": {"modality": "MR"}})
        params.inputVolume = slicer.util.addVolumeFromArray(np.zeros((20, 20, 20), np.float32), name="Zeros")
        params.checkpointPath = os.path.join(self.tmp, "missing.safetensors")
        nodes = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(errors.InputError):
            logic.start(params)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes)
        self.delayDisplay("Test passed")

    def _widget(self):
        slicer.util.selectModule("IWSegmentation")
        return slicer.modules.iwsegmentation.widgetRepresentation().self()

    def test_LeavingAndReentering(self):
        self.delayDisplay("Leaving the module keeps the parameter node; re-entering keeps the choices")
        widget = self._widget()
        widget.ui.deviceComboBox.setCurrentIndex(widget.ui.deviceComboBox.findText("CPU"))
        node = widget._parameterNode.parameterNode
        for _ in range(2):
            slicer.util.selectModule("Data")  # exit(): the node stays, for a run finishing meanwhile
            self.assertIs(widget._parameterNode.parameterNode, node)
            slicer.util.selectModule("IWSegmentation")
        self.assertEqual(widget._parameterNode.device, "CPU")
        self.assertEqual(widget.ui.deviceComboBox.currentText, "CPU")
        self.delayDisplay("Test passed")

    def test_SceneCloseClearsResults(self):
        import numpy as np

        from IWSegmentationLib.core import imageio
        from IWSegmentationLib.slicer import mrml

        self.delayDisplay("Closing the scene clears the lesion table")
        widget = self._widget()
        volume = slicer.util.addVolumeFromArray(np.zeros((8, 8, 8), np.float32), name="Zeros")
        mask = np.zeros((8, 8, 8), np.uint8)
        mask[2:5, 2:5, 2:5] = 1
        geometry = mrml.volume_geometry(volume)
        outputs = {"mask": imageio.write_image(os.path.join(self.tmp, "mask.nrrd"), mask, geometry),
                   "logits": imageio.write_image(os.path.join(self.tmp, "l.nrrd"), mask * 2.2, geometry)}
        widget.showResults(widget.logic.lesionLogic.load_results(outputs, volume), 1.0)
        self.assertEqual(widget.ui.lesionTableWidget.rowCount, 1)
        slicer.mrmlScene.Clear()
        self.assertIsNone(widget.logic.results)
        self.assertEqual(widget.ui.lesionTableWidget.rowCount, 0)
        widget.onConfidenceChanged(2.0)  # the slider no longer reaches for deleted nodes
        self.delayDisplay("Test passed")
