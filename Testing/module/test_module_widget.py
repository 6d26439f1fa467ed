"""The module's widget (IWSegmentation/IWSegmentation.py) with its Qt widgets mocked.

The real application cannot run here, so the widget class is loaded with stand-ins for the few
``qt``/``slicer``/``vtk`` names it uses, and its own methods run against fake widgets that
record what is done to them. The engine behind it (``panel``, ``backend``) is the real one.
What needs the real Qt and MRML is covered by ``IWSegmentationTest`` inside Slicer; these tests
pin the life-cycle defects of issue 15 (each failed on the module as it was).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest

from IWSegmentationLib.backend.job import Outcome, RunResult
from IWSegmentationLib.slicer.logic import LesionSegmentationLogic

MODULE_PY = Path(__file__).resolve().parents[2] / "IWSegmentation" / "IWSegmentation.py"


class FakeWidget:
    """A Qt widget: any attribute can be set; every method call is recorded in ``calls``."""

    def __init__(self, **attributes):
        self.calls: list[tuple] = []
        self.rowCount = 0
        self.text = ""
        self.enabled = True
        self.__dict__.update(attributes)

    def setRowCount(self, n):  # noqa: N802 (Qt's name)
        self.rowCount = n

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args: self.calls.append((name, *args))


def _stub_modules(errors: list) -> dict[str, types.ModuleType]:
    qt = types.ModuleType("qt")
    qt.QTimer, qt.QTableWidgetItem = FakeWidget, lambda text: text
    vtk = types.ModuleType("vtk")
    vtk.vtkCommand = types.SimpleNamespace(ModifiedEvent=33)
    slicer = types.ModuleType("slicer")
    slicer.vtkMRMLScalarVolumeNode = type("vtkMRMLScalarVolumeNode", (), {})
    slicer.vtkMRMLSegmentationNode = type("vtkMRMLSegmentationNode", (), {})
    slicer.mrmlScene = types.SimpleNamespace(StartCloseEvent=1, EndCloseEvent=2)
    util = types.ModuleType("slicer.util")

    class VTKObservationMixin:
        def __init__(self):
            self.observed = []

        def addObserver(self, obj, event, method):  # noqa: N802
            self.observed.append((obj, event))

        def removeObserver(self, obj, event, method):  # noqa: N802
            if (obj, event) in self.observed:
                self.observed.remove((obj, event))

        def removeObservers(self):  # noqa: N802
            self.observed.clear()

    @contextlib.contextmanager
    def tryWithErrorDisplay(message, waitCursor=False):  # noqa: N802 (Slicer shows the error in a dialog)
        try:
            yield
        except Exception as exc:
            errors.append(exc)

    util.VTKObservationMixin, util.tryWithErrorDisplay = VTKObservationMixin, tryWithErrorDisplay
    util.confirmOkCancelDisplay = lambda *args: True
    util.errorDisplay = lambda *args, **kwargs: errors.append(args)
    slicer.util = util
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = wrapper.WithinRange = lambda *args: None
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
                 "ScriptedLoadableModuleWidget"):
        setattr(scripted, name, type(name, (), {"__init__": lambda self, parent=None: None}))
    return {"qt": qt, "vtk": vtk, "slicer": slicer, "slicer.util": util, "slicer.parameterNodeWrapper": wrapper,
            "slicer.ScriptedLoadableModule": scripted}


@pytest.fixture
def module(monkeypatch):
    """IWSegmentation.py loaded with the stand-ins (sys.modules is restored afterwards)."""
    errors: list = []
    for name, stub in _stub_modules(errors).items():
        monkeypatch.setitem(sys.modules, name, stub)
    spec = importlib.util.spec_from_file_location("IWSegmentation_under_test", MODULE_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.shown_errors = errors
    return mod


class FakeParameters:
    """A parameter node wrapper: Slicer makes a new one around the same MRML node on every call."""

    def __init__(self, node, log):
        self.parameterNode, self.log = node, log

    def connectGui(self, gui):  # noqa: N802
        self.log.append("connect")  # Slicer 5.6/5.8: no tag

    def disconnectGui(self, tag):  # noqa: N802
        self.log.append("disconnect")

    def __getattr__(self, name):  # the parameters themselves live on the shared node
        return getattr(self.parameterNode, name)

    def __setattr__(self, name, value):
        if name in ("parameterNode", "log"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.parameterNode, name, value)


class FakeRun:
    def __init__(self):
        self.running, self.closed = True, False

    def close(self):
        self.closed, self.running = True, False


class FakeLesionLogic:
    """The engine's logic with no backend: its real ``describe_checkpoint`` over a card reader that
    records where it was asked to read (the node says where the model runs)."""

    describe_checkpoint = LesionSegmentationLogic.describe_checkpoint

    def __init__(self, owner):
        self.owner, self.card_read_with = owner, None

    def clear_results(self):
        self.owner.results = None

    def close(self):
        pass

    def read_model_card(self, path, node=None):
        self.card_read_with = node
        return {"threshold": 0.4}


class FakeLogic:
    def __init__(self):
        self.node = types.SimpleNamespace(inputVolume="volume", checkpointPath="", confidenceThreshold=0.0,
                                          outputSegmentation=None, device="CPU", threshold=0.5,
                                          operatingPoint="", segmentBudget=200)
        self.gui_log: list[str] = []
        self.results = None
        self.python, self.env = sys.executable, None
        self.lesionLogic = FakeLesionLogic(self)
        self.started = 0

    def getParameterNode(self):  # noqa: N802
        return FakeParameters(self.node, self.gui_log)

    def checkInputs(self, parameters, card):  # noqa: N802
        return []

    def setConfidenceThreshold(self, results, value):  # noqa: N802
        return types.SimpleNamespace(text=lambda: f"{len(results.lesions)} shown")


def make_widget(module):
    widget = module.IWSegmentationWidget()
    names = ("applyButton", "statusLabel", "summaryLabel", "countsLabel", "progressBar", "modelCardLabel",
             "resultsCollapsibleButton", "lesionTableWidget", "deviceInfoLabel", "checkpointPathLineEdit",
             "deviceComboBox", "confidenceSliderWidget", "organMaskLabel", "organMaskSelector",
             "showMoreButton", "exportButton", "acceptLesionButton", "rejectLesionButton", "legendLabel",
             *module.panel.RUN_ON_SIGNALS)
    widget.ui = types.SimpleNamespace(**{name: FakeWidget() for name in names})
    widget.ui.checkpointPathLineEdit.currentPath = ""
    widget.logic = FakeLogic()
    widget._gui = module.panel.GuiBinding(widget.ui)
    widget._timer = FakeWidget()
    widget._card = {}
    return widget


def ok_result(n_lesions=2, not_shown=()):
    lesions = [{"name": f"Lesion {i}"} for i in range(n_lesions)]
    rows = [{"name": f"Lesion {i}", "status": "TP"} for i in range(n_lesions)]
    loaded = types.SimpleNamespace(segmentation="segmentation node", rows=rows, lesions=lesions,
                                   not_shown=list(not_shown))
    return RunResult(Outcome.OK, 0, "done", loaded=loaded, seconds=3.0)


def test_a_run_finishing_while_in_another_module_fills_the_results(module):
    widget = make_widget(module)
    widget.enter()
    widget.exit()  # the user went to another module; the backend keeps running
    widget.onFinished(ok_result())
    assert module.shown_errors == []
    assert widget.logic.node.outputSegmentation == "segmentation node"
    assert widget.ui.lesionTableWidget.rowCount == 2


def test_lesions_left_out_by_the_display_budget_offer_a_show_next_button(module):
    widget = make_widget(module)
    widget.onFinished(ok_result())
    assert widget.ui.showMoreButton.visible is False  # nothing left out: no button
    widget.onFinished(ok_result(not_shown=["a", "b", "c"]))
    assert widget.ui.showMoreButton.visible is True and widget.ui.showMoreButton.text == "Show next 200 lesions"
    assert widget.ui.showMoreButton.toolTip.startswith("3 more lesion(s), less confident, are counted")


def test_reentering_connects_the_gui_once_on_slicer_5_6(module):
    widget = make_widget(module)
    for _ in range(3):
        widget.enter()
        widget.exit()
    widget.enter()
    assert widget.logic.gui_log.count("connect") == 1  # connectGui gave no tag: connected for good


def test_apply_cannot_start_a_second_install(module, monkeypatch):
    widget = make_widget(module)
    widget.enter()
    seen = []

    def start(parameters, onProgress=None, onFinished=None, confirmed=False):
        widget.logic.started += 1
        seen.append(widget.ui.applyButton.enabled)
        if widget.logic.started == 1:
            widget.onApplyButton()  # pip_install processes GUI events: a second click arrives
        return FakeRun()

    widget.logic.start = start
    widget.onApplyButton()
    assert module.shown_errors == []
    assert widget.logic.started == 1 and seen == [False]
    assert widget.ui.applyButton.text == "Cancel" and widget.ui.applyButton.enabled


def test_the_device_line_is_probed_again_after_installing_torch(module, monkeypatch):
    probes = []

    class Probe:
        def __init__(self, python, env=None):
            probes.append(self)

        def start(self):
            pass

    monkeypatch.setattr(module, "DeviceProbe", Probe)
    widget = make_widget(module)
    widget.enter()
    widget._devices = {"torch": None, "cuda": [], "mps": False, "error": "No module named 'torch'"}
    widget.logic.start = lambda parameters, **kwargs: FakeRun()
    widget.onApplyButton()
    assert len(probes) == 1 and widget._devices is None  # asked again; the answer will fill the line


def test_closing_the_scene_empties_the_table(module):
    widget = make_widget(module)
    widget.enter()
    widget.onFinished(ok_result(3))
    widget.logic.results = "results of the old scene"
    assert widget.ui.lesionTableWidget.rowCount == 3
    widget.onSceneStartClose(None, None)
    assert widget.ui.lesionTableWidget.rowCount == 0 and widget._rows == []
    assert widget.logic.results is None and widget.ui.resultsCollapsibleButton.enabled is False


def test_cleanup_closes_the_run_and_the_probe(module):
    widget = make_widget(module)
    run, probe = FakeRun(), types.SimpleNamespace(closed=False)
    probe.close = lambda: setattr(probe, "closed", True)
    widget._run, widget._deviceProbe = run, probe
    widget.cleanup()
    assert run.closed and probe.closed


def test_a_readable_checkpoint_goes_into_the_path_history(module):
    widget = make_widget(module)
    widget.enter()
    widget.onCheckpointChanged("/models/liver.safetensors")
    assert ("addCurrentPathToHistory",) in widget.ui.checkpointPathLineEdit.calls
    assert widget.logic.lesionLogic.card_read_with.parameterNode is widget.logic.node  # read where the node runs
    assert widget.logic.node.threshold == 0.4
    assert widget.logic.node.confidenceThreshold == pytest.approx(-0.405, abs=1e-3)  # logit(0.4) = ln(0.4 / 0.6)
    assert widget.ui.modelCardLabel.text == module.panel.model_card_text({"threshold": 0.4})


def test_an_unreadable_checkpoint_says_why_and_stays_out_of_the_history(module):
    widget = make_widget(module)
    widget.enter()

    def unreadable(path, node=None):
        raise module.errors.InputError(f"{path}: not a checkpoint")

    widget.logic.lesionLogic.read_model_card = unreadable
    widget.onCheckpointChanged("/models/notes.txt")
    assert widget._card is None and widget.ui.modelCardLabel.text == "Cannot use this checkpoint: /models/notes.txt: not a checkpoint"
    assert ("addCurrentPathToHistory",) not in widget.ui.checkpointPathLineEdit.calls
    assert widget.ui.applyButton.enabled is False  # no card: nothing to run


def test_the_result_buttons_are_connected_to_their_handlers(module):
    """setup() as Slicer runs it, on the stand-ins: the .ui's buttons get their slots (the .ui
    declares them; test_extension_layout checks that every self.ui name the module uses is there)."""
    widget = make_widget(module)
    # what setup() takes from Slicer and the engine, all stand-ins of this test's module object
    module.ScriptedLoadableModuleWidget.setup = lambda self: None
    module.slicer.util.loadUI = lambda path: FakeWidget()
    module.slicer.util.childWidgetVariables = lambda ui: widget.ui
    module.slicer.mrmlScene.GetFirstNodeByClass = lambda cls: None
    module.IWSegmentationLogic = FakeLogic
    module.model_choices = types.SimpleNamespace(ModelMenu=lambda *args, **kwargs: None)
    module.DeviceProbe = lambda *args, **kwargs: FakeWidget()
    module.qt.QComboBox = FakeWidget
    widget.resourcePath, widget.layout = lambda rel: rel, FakeWidget()
    widget.setup()
    slots = {name: getattr(widget.ui, name).calls for name in
             ("showMoreButton", "exportButton", "acceptLesionButton", "rejectLesionButton")}
    assert [c[:2] for c in slots["showMoreButton"]] == [("connect", "clicked(bool)")]
    assert slots["showMoreButton"][0][2] == widget.onShowMoreLesions
    assert slots["exportButton"][0][2] == widget.onExportButton
    verdicts = []
    widget.onVerdict = verdicts.append
    slots["acceptLesionButton"][0][2](False)
    slots["rejectLesionButton"][0][2](False)
    assert verdicts == ["accepted", "rejected"]
    headers = [c for c in widget.ui.lesionTableWidget.calls if c[0] == "setHorizontalHeaderLabels"]
    assert headers == [("setHorizontalHeaderLabels", list(module.panel.LESION_COLUMNS))]
