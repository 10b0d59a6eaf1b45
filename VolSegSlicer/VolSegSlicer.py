"""VolSegSlicer: AI segmentation of CT and MRI volumes in 3D Slicer.

A thin Slicer front end. Everything done to image data goes through the ``volseg`` command line
(the engine, in ``volseg/`` beside this file), run with Slicer's Python as a background process:

- the model list comes from ``volseg models --json``, the devices from ``volseg devices --json``;
- Segment writes the input volumes to a temporary folder, runs
  ``volseg segment ... -o segmentation.nrrd --progress json`` and reads its JSON lines from a
  timer, so the GUI stays responsive; Cancel stops the whole process tree;
- the labelmap that comes back becomes a segmentation node with the model card's names,
  colours and terminology, placed beside the input in the subject hierarchy.

The pieces that need neither Slicer nor Qt live in ``VolSegSlicerLib`` and are tested with pytest.
"""

import json
import logging
import os
import shutil
import sys
import tempfile
import time
import unittest
from typing import Annotated, Any, Callable, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if MODULE_DIR not in sys.path:  # Slicer adds it; keeps `import VolSegSlicerLib` working everywhere
    sys.path.insert(0, MODULE_DIR)

from VolSegSlicerLib.catalog import (  # noqa: E402
    MAX_INPUTS,
    duplicate_inputs,
    filter_models,
    import_segment_ids,
    input_titles,
    model_tooltip_html,
    parse_models_json,
    prefill_inputs,
    segment_rows,
)
from VolSegSlicerLib.command import (  # noqa: E402
    SegmentOptions,
    engine_command,
    engine_environment,
    segment_args,
    serve_request_line,
)
from VolSegSlicerLib.devices import DeviceChoices, device_choices, fallback_choices  # noqa: E402
from VolSegSlicerLib.jobs import EngineQuery, SegmentationJob  # noqa: E402
from VolSegSlicerLib.process import EngineProcess, python_executable  # noqa: E402
from VolSegSlicerLib.protocol import format_duration  # noqa: E402
from VolSegSlicerLib.resources import LogBuffer, missing_requirements, read_requirements, resource_dir  # noqa: E402

SETTINGS_PREFIX = "VolSegSlicer"
#: Parameter-node fields remembered across sessions (QSettings), besides model/checkpoint/device.
REMEMBERED_FIELDS = ("useModelSettings", "overlap", "roiX", "roiY", "roiZ", "swBatchSize", "flips", "amp",
                     "keepLargest", "fillHoles", "minIslandMm3", "keepWarm", "replaceOutput")
#: Segment tags written on every result segment (provenance).
TAG_LABEL_VALUE = "VolSegSlicer.LabelValue"
TAG_MODEL_ID = "VolSegSlicer.ModelId"


def moduleResourcePath(filename: str = "") -> str:
    """Path of a resource file, found both in the built extension (``<module dir>/Resources``)
    and in a source checkout added as a module path (``<module dir>/../Resources``)."""
    return os.path.join(str(resource_dir(MODULE_DIR)), filename)


def settingsValue(key: str, default: Any = None) -> Any:
    value = qt.QSettings().value(f"{SETTINGS_PREFIX}/{key}")
    return default if value is None or value == "" else value


def setSettingsValue(key: str, value: Any) -> None:
    qt.QSettings().setValue(f"{SETTINGS_PREFIX}/{key}", value)


#
# Module
#


class VolSegSlicer(ScriptedLoadableModule):
    """Module description for Slicer's module list."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("VolSegSlicer")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["VolSegSlicer developers"]
        self.parent.helpText = _(
            "Segment CT and MRI volumes with volumetric networks (3D UX-Net, SegFormer3D, MedNeXt, "
            "MONAI networks). Pick a model card and a checkpoint, choose the input volumes, click "
            "Segment. The result is an ordinary, editable segmentation. "
            "See <a href='https://github.com/volsegslicer/VolSegSlicer'>the documentation</a>.")
        self.parent.acknowledgementText = _(
            "Built on 3D Slicer, PyTorch and MONAI. The networks are the work of their authors; "
            "see each model card for its references and licence.")
        # The base class looks for the icon in <module dir>/Resources only.
        try:
            iconPath = moduleResourcePath("Icons/VolSegSlicer.png")
            if os.path.isfile(iconPath):
                self.parent.icon = qt.QIcon(iconPath)
        except FileNotFoundError:
            logging.warning("VolSegSlicer: Resources folder not found")

    def resourcePath(self, filename: str) -> str:
        return moduleResourcePath(filename)


#
# Parameter node
#


@parameterNodeWrapper
class VolSegSlicerParameterNode:
    """The panel's state (saved with the scene). Field names match the .ui's SlicerParameterName."""

    inputVolume0: vtkMRMLScalarVolumeNode
    inputVolume1: vtkMRMLScalarVolumeNode
    inputVolume2: vtkMRMLScalarVolumeNode
    inputVolume3: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    replaceOutput: bool = False
    useModelSettings: bool = True
    overlap: Annotated[float, WithinRange(0.0, 0.95)] = 0.5
    roiX: Annotated[int, WithinRange(0, 1024)] = 0
    roiY: Annotated[int, WithinRange(0, 1024)] = 0
    roiZ: Annotated[int, WithinRange(0, 1024)] = 0
    swBatchSize: Annotated[int, WithinRange(0, 64)] = 0
    flips: bool = False
    amp: bool = True
    keepLargest: bool = False
    fillHoles: bool = False
    minIslandMm3: Annotated[float, WithinRange(0.0, 1000000.0)] = 0.0
    keepWarm: bool = False
    # Not bound to a widget by name (filled from the model list / path edit / device combo):
    modelId: str = ""
    checkpointPath: str = ""
    device: str = "auto"


#
# Widget
#


class VolSegSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: model list, inputs, device, advanced settings, output, Segment/Cancel, export."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[VolSegSlicerLogic] = None
        self._parameterNode: Optional[VolSegSlicerParameterNode] = None
        self._parameterNodeGuiTag = None
        self._models: list[dict] = []
        self._devices: DeviceChoices = fallback_choices("Asking the engine which devices it can use...")
        self._job: Optional[SegmentationJob] = None
        self._log = LogBuffer()
        self._dependenciesChecked = False

    def resourcePath(self, filename: str) -> str:
        return moduleResourcePath(filename)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VolSegSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = VolSegSlicerLogic()
        self.inputLabels = [self.ui.inputLabel0, self.ui.inputLabel1, self.ui.inputLabel2, self.ui.inputLabel3]
        self.inputSelectors = [self.ui.inputSelector0, self.ui.inputSelector1, self.ui.inputSelector2,
                               self.ui.inputSelector3]

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.modelSearchBox.connect("textChanged(QString)", self.onSearchChanged)
        self.ui.modelListWidget.connect("currentItemChanged(QListWidgetItem*,QListWidgetItem*)", self.onModelSelected)
        self.ui.refreshModelsButton.connect("clicked()", self.refreshModels)
        self.ui.checkpointPathLineEdit.connect("currentPathChanged(QString)", self.onCheckpointChanged)
        self.ui.cardsDirPathLineEdit.connect("currentPathChanged(QString)", self.onCardsDirChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        for selector in self.inputSelectors:
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateGUIState)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onOutputChanged)
        self.ui.useModelSettingsCheckBox.connect("toggled(bool)", self.updateGUIState)
        self.ui.keepWarmCheckBox.connect("toggled(bool)", self.onKeepWarmToggled)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.copyLogButton.connect("clicked()", self.onCopyLog)
        self.ui.installDependenciesButton.connect("clicked()", self.onInstallDependencies)
        self.ui.exportLabelmapButton.connect("clicked()", self.onExportLabelmap)
        self.ui.exportSegNrrdButton.connect("clicked()", self.onExportSegNrrd)
        self.ui.exportDicomSegButton.connect("clicked()", self.onExportDicomSeg)

        self.ui.cardsDirPathLineEdit.blockSignals(True)
        self.ui.cardsDirPathLineEdit.currentPath = settingsValue("CardsDir", "")
        self.ui.cardsDirPathLineEdit.blockSignals(False)
        self.ui.progressBar.setVisible(False)
        self.initializeParameterNode()
        self.showDevices(self._devices)
        self.refreshModels()
        self.refreshDevices()

    def cleanup(self) -> None:
        self.removeObservers()
        if self.logic:
            self.logic.shutdown()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------ parameter node
    def initializeParameterNode(self) -> None:
        node = self.logic.getParameterNode()
        if not node.parameterNode.GetAttribute("VolSegSlicer.SettingsRestored"):
            self.logic.restoreSettings(node)
            node.parameterNode.SetAttribute("VolSegSlicer.SettingsRestored", "1")
        self.setParameterNode(node)

    def setParameterNode(self, node: Optional[VolSegSlicerParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIState)
        self._parameterNode = node
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIState)
            self.updateGUIState()

    # ------------------------------------------------------------------ models
    def refreshModels(self) -> None:
        self.ui.modelInfoLabel.text = _("Reading the model cards...")
        self.logic.queryModels(self.ui.cardsDirPathLineEdit.currentPath, self.onModelsReady)

    def onModelsReady(self, models: Optional[list], error: str) -> None:
        if models is None:
            self._models = []
            self.ui.modelInfoLabel.text = _(
                "Could not read the model list: {error}\nIf a Python package is missing, click "
                "'Check Python packages' under Advanced.").format(error=error.splitlines()[-1] if error else "")
            self.appendLog(error)
        else:
            self._models = models
        self.showModels()

    def showModels(self) -> None:
        wanted = (self._parameterNode.modelId if self._parameterNode else "") or settingsValue("LastModel", "")
        listWidget = self.ui.modelListWidget
        listWidget.blockSignals(True)
        listWidget.clear()
        current = None
        for model in filter_models(self._models, self.ui.modelSearchBox.text):
            title = model.get("title") or model["id"]
            if model.get("demonstration"):
                title += " " + _("(demonstration)")
            item = qt.QListWidgetItem(title)
            item.setData(qt.Qt.UserRole, model["id"])
            item.setToolTip(model_tooltip_html(model))
            listWidget.addItem(item)
            if model["id"] == wanted:
                current = item
        listWidget.blockSignals(False)
        if current is not None:
            listWidget.setCurrentItem(current)  # calls onModelSelected
        elif not any(m["id"] == wanted for m in self._models):
            self.onModelSelected(None)  # the remembered model is gone; a search that hides it keeps it

    def onSearchChanged(self, text: str) -> None:
        self.showModels()

    def currentModel(self) -> Optional[dict]:
        modelId = self._parameterNode.modelId if self._parameterNode else ""
        return next((m for m in self._models if m["id"] == modelId), None)

    def onModelSelected(self, item, previous=None) -> None:
        if not self._parameterNode:
            return
        model = None
        if item is not None:
            modelId = item.data(qt.Qt.UserRole)
            model = next((m for m in self._models if m["id"] == modelId), None)
        self._parameterNode.modelId = model["id"] if model else ""
        if model is None:
            self.ui.modelInfoLabel.text = _("Select a model.") if self._models else self.ui.modelInfoLabel.text
            self.updateGUIState()
            return
        setSettingsValue("LastModel", model["id"])
        info = model.get("description") or ""
        if len(info) > 300:  # the whole card is in the list item's tooltip
            info = info[:300].rsplit(" ", 1)[0] + " ..."
        if model.get("demonstration"):
            info = _("Demonstration model: it only shows the software working and must not be used on patients.")
        self.ui.modelInfoLabel.text = info
        # Checkpoint remembered per model.
        remembered = settingsValue(f"Checkpoints/{model['id']}", "")
        self.ui.checkpointPathLineEdit.blockSignals(True)
        self.ui.checkpointPathLineEdit.currentPath = remembered
        self.ui.checkpointPathLineEdit.blockSignals(False)
        self._parameterNode.checkpointPath = remembered
        self.prefillInputs(model)
        self.updateGUIState()

    def prefillInputs(self, model: dict) -> None:
        volumes = [n for n in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                   if not n.IsA("vtkMRMLLabelMapVolumeNode")]
        picks = prefill_inputs(model, [n.GetName() for n in volumes])
        for i, pick in enumerate(picks):
            if getattr(self._parameterNode, f"inputVolume{i}") is None and pick is not None:
                setattr(self._parameterNode, f"inputVolume{i}", volumes[pick])

    def onCheckpointChanged(self, path: str) -> None:
        if not self._parameterNode:
            return
        self._parameterNode.checkpointPath = path
        if self._parameterNode.modelId:
            setSettingsValue(f"Checkpoints/{self._parameterNode.modelId}", path)

    def onCardsDirChanged(self, path: str) -> None:
        setSettingsValue("CardsDir", path)
        self.refreshModels()

    # ------------------------------------------------------------------ devices
    def refreshDevices(self) -> None:
        self.logic.queryDevices(self.onDevicesReady)

    def onDevicesReady(self, choices: DeviceChoices) -> None:
        self._devices = choices
        self.showDevices(choices)

    def showDevices(self, choices: DeviceChoices) -> None:
        combo = self.ui.deviceComboBox
        wanted = (self._parameterNode.device if self._parameterNode else "") or settingsValue("Device", "auto")
        combo.blockSignals(True)
        combo.clear()
        for deviceId, text in choices.items:
            combo.addItem(text, deviceId)
        index = max(0, combo.findData(wanted))
        combo.setCurrentIndex(index)
        combo.blockSignals(False)
        self.ui.deviceReasonLabel.text = choices.reason
        self.onDeviceChanged(index)

    def onDeviceChanged(self, index: int) -> None:
        if self._parameterNode is None or index < 0:
            return
        deviceId = self.ui.deviceComboBox.itemData(index) or "auto"
        self._parameterNode.device = deviceId
        setSettingsValue("Device", deviceId)

    # ------------------------------------------------------------------ state
    def selectedInputs(self) -> list:
        model = self.currentModel()
        count = len(input_titles(model)) if model else 1
        return [getattr(self._parameterNode, f"inputVolume{i}") for i in range(count)]

    def updateGUIState(self, *args) -> None:
        if not self._parameterNode or not hasattr(self, "ui"):
            return
        model = self.currentModel()
        titles = input_titles(model) if model else [_("Input volume")]
        for i in range(MAX_INPUTS):
            visible = i < len(titles)
            self.inputLabels[i].setVisible(visible)
            self.inputSelectors[i].setVisible(visible)
            if visible:
                self.inputLabels[i].text = titles[i] + ":"
        inputs = self.selectedInputs()
        duplicates = duplicate_inputs([n.GetID() if n else None for n in inputs])
        problems = []
        if duplicates:
            a, b = duplicates[0]
            problems.append(_("'{a}' and '{b}' are the same volume; each input needs its own.").format(
                a=titles[a], b=titles[b]))
        self.ui.inputWarningLabel.text = " ".join(problems)
        running = self._job is not None and not self._job.finished
        ready = model is not None and all(inputs) and not duplicates
        for name in ("overlapSliderWidget", "roiXSpinBox", "roiYSpinBox", "roiZSpinBox", "swBatchSizeSpinBox",
                     "flipsCheckBox", "ampCheckBox", "keepLargestCheckBox", "fillHolesCheckBox", "minIslandSpinBox"):
            getattr(self.ui, name).enabled = not self._parameterNode.useModelSettings
        self.ui.replaceOutputCheckBox.enabled = self._parameterNode.outputSegmentation is not None
        if running:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.enabled = not self._job.cancelRequested
            self.ui.applyButton.toolTip = _("Stop the segmentation; nothing is written")
        else:
            self.ui.applyButton.text = _("Segment")
            self.ui.applyButton.enabled = ready
            self.ui.applyButton.toolTip = (_("Run the model on the inputs") if ready
                                           else _("Select a model and its input volumes first"))
        hasOutput = self._parameterNode.outputSegmentation is not None
        for button in (self.ui.exportLabelmapButton, self.ui.exportSegNrrdButton, self.ui.exportDicomSegButton):
            button.enabled = hasOutput and not running
        if hasOutput:
            reference = self.logic.referenceVolume(self._parameterNode.outputSegmentation)
            self.ui.exportDicomSegButton.enabled = bool(reference and self.logic.isFromDicom(reference)) and not running

    def onOutputChanged(self, node) -> None:
        self.ui.show3DButton.setSegmentationNode(node)
        self.updateGUIState()

    def onKeepWarmToggled(self, on: bool) -> None:
        if not on and self.logic:
            self.logic.stopWarmWorker()

    # ------------------------------------------------------------------ running
    def appendLog(self, line: str) -> None:
        self._log.append(line)
        self.ui.logTextEdit.appendPlainText(line)

    def onApplyButton(self) -> None:
        if self._job is not None and not self._job.finished:
            self._job.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            self.updateGUIState()
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start the segmentation."), waitCursor=True):
            if not self._dependenciesChecked:
                if not self.logic.ensureDependencies():
                    return
                self._dependenciesChecked = True
            self.logic.saveSettings(self._parameterNode)
            self._log.clear()
            self.ui.logTextEdit.clear()
            self.ui.progressBar.setVisible(True)
            self.ui.progressBar.value = 0
            self.ui.timeLabel.text = ""
            self.ui.statusLabel.text = _("Starting...")
            self._job = self.logic.segment(
                self.currentModel(), self.selectedInputs(), self._parameterNode,
                onEvent=self.onJobEvent, onFinished=self.onJobFinished)
            self.updateGUIState()

    def onJobEvent(self, job: "SegmentationJob", line: Optional[str]) -> None:
        if line:
            self.appendLog(line)
        self.ui.progressBar.value = job.monitor.percent
        self.ui.statusLabel.text = job.monitor.status

    def onJobFinished(self, job: "SegmentationJob") -> None:
        monitor = job.monitor
        self.ui.progressBar.value = monitor.percent
        self.ui.timeLabel.text = _("Time taken: {t}").format(t=format_duration(job.elapsed))
        if job.segmentationNode is not None:
            self._parameterNode.outputSegmentation = job.segmentationNode
            segmentCount = job.segmentationNode.GetSegmentation().GetNumberOfSegments()
            self.ui.statusLabel.text = _(
                "Done: {n} segments in '{name}'. Review and edit them in Segment Editor.").format(
                n=segmentCount, name=job.segmentationNode.GetName())
        elif monitor.outcome == "cancelled":
            self.ui.statusLabel.text = _("Cancelled; nothing was changed.")
            self.ui.progressBar.setVisible(False)
        else:
            message = monitor.error + (f"\n{_('Hint')}: {monitor.hint}" if monitor.hint else "")
            self.ui.statusLabel.text = _("Failed: {error}").format(error=monitor.error)
            self.appendLog(message)
            slicer.util.errorDisplay(_("Segmentation failed:") + "\n" + message, detailedText=self._log.text())
        self.updateGUIState()

    def onInstallDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Installing Python packages failed."), waitCursor=True):
            if self.logic.ensureDependencies():
                self._dependenciesChecked = True
                slicer.util.infoDisplay(_("PyTorch and the packages the engine needs are installed."))
                self.refreshModels()
                self.refreshDevices()

    def onCopyLog(self) -> None:
        qt.QApplication.clipboard().setText(self.logic.diagnostics(self._log.text(), self._devices))

    # ------------------------------------------------------------------ export
    def _outputAndFile(self, caption: str, fileFilter: str, suffix: str):
        segNode = self._parameterNode.outputSegmentation
        if segNode is None:
            return None, None
        defaultPath = os.path.join(qt.QDir.homePath(), segNode.GetName() + suffix)
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), caption, defaultPath, fileFilter)
        return segNode, path or None

    def onExportLabelmap(self) -> None:
        segNode, path = self._outputAndFile(_("Export labelmap"), "NIfTI (*.nii.gz *.nii);;NRRD (*.nrrd)", ".nii.gz")
        if path:
            with slicer.util.tryWithErrorDisplay(_("Labelmap export failed."), waitCursor=True):
                model = self.logic.modelForSegmentation(segNode, self._models)
                written = self.logic.exportLabelmap(segNode, path, model)
                self.appendLog(_("Wrote {files}").format(files=", ".join(written)))

    def onExportSegNrrd(self) -> None:
        segNode, path = self._outputAndFile(_("Export segmentation"), "Segmentation (*.seg.nrrd)", ".seg.nrrd")
        if path:
            with slicer.util.tryWithErrorDisplay(_("Segmentation export failed."), waitCursor=True):
                self.logic.exportSegNrrd(segNode, path)
                self.appendLog(_("Wrote {files}").format(files=path))

    def onExportDicomSeg(self) -> None:
        segNode = self._parameterNode.outputSegmentation
        if segNode is None:
            return
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Folder for the DICOM SEG file"),
                                                     qt.QDir.homePath())
        if folder:
            with slicer.util.tryWithErrorDisplay(_("DICOM SEG export failed."), waitCursor=True):
                self.logic.exportDicomSeg(segNode, folder)
                self.appendLog(_("Wrote DICOM SEG into {folder}").format(folder=folder))


#
# Logic
#


class VolSegSlicerLogic(ScriptedLoadableModuleLogic):
    """Runs the engine, imports its results, exports segmentations. Usable without the GUI:

        logic = VolSegSlicerLogic()
        job = logic.segment(model, [volumeNode], logic.getParameterNode(), wait=True)
        job.segmentationNode
    """

    POLL_INTERVAL_MS = 100

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.jobs: list = []  # SegmentationJob or EngineQuery, polled by the timer
        self.warmWorker: Optional[EngineProcess] = None
        self._requestCounter = 0
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.pollJobs)
        self.models: list[dict] = []

    def getParameterNode(self) -> VolSegSlicerParameterNode:
        return VolSegSlicerParameterNode(super().getParameterNode())

    # ------------------------------------------------------------------ settings
    def restoreSettings(self, node: VolSegSlicerParameterNode) -> None:
        """Put the choices remembered in QSettings into a fresh parameter node."""
        saved = settingsValue("Advanced", "")
        values = json.loads(saved) if saved else {}
        for name in REMEMBERED_FIELDS:
            if name in values:
                try:
                    setattr(node, name, type(getattr(node, name))(values[name]))
                except (TypeError, ValueError):  # a value from another version: keep the default
                    logging.debug(f"VolSegSlicer: ignoring remembered {name}={values[name]!r}")
        node.device = settingsValue("Device", "auto")
        node.modelId = settingsValue("LastModel", "")

    def saveSettings(self, node: VolSegSlicerParameterNode) -> None:
        setSettingsValue("Advanced", json.dumps({name: getattr(node, name) for name in REMEMBERED_FIELDS}))
        setSettingsValue("Device", node.device)
        if node.modelId:
            setSettingsValue("LastModel", node.modelId)

    # ------------------------------------------------------------------ engine processes
    def engineEnvironment(self) -> dict:
        """Slicer's startup environment (what launchConsoleProcess uses) with the module dir on
        PYTHONPATH so that ``-m volseg`` finds the engine installed beside this file."""
        base = None
        startupEnvironment = getattr(slicer.util, "startupEnvironment", None)
        if startupEnvironment is not None:
            try:
                base = startupEnvironment()
            except Exception:  # outside the application (e.g. PythonSlicer): the current environment
                base = None
        return engine_environment(MODULE_DIR, base)

    def startEngine(self, args: list, stdinPipe: bool = False) -> EngineProcess:
        argv = engine_command(python_executable(), args)
        logging.info("VolSegSlicer: " + " ".join(argv))
        return EngineProcess(argv, env=self.engineEnvironment(), cwd=tempfile.gettempdir(),
                             stdin_pipe=stdinPipe).start()

    def _track(self, job) -> None:
        self.jobs.append(job)
        if not self._timer.isActive():
            self._timer.start()

    def pollJobs(self) -> None:
        """Timer slot: read new output of every running job (never blocks)."""
        for job in list(self.jobs):
            try:
                ended = job.poll()
            except Exception as exc:  # a bug must not leave the timer firing forever
                logging.exception("VolSegSlicer: polling failed")
                ended = True
                if isinstance(job, SegmentationJob):
                    job.monitor.outcome, job.monitor.error = "error", str(exc)
            if ended:
                self.jobs.remove(job)
                self._finish(job)
        if not self.jobs:
            self._timer.stop()

    def waitFor(self, job, timeout: float = 3600.0):
        """Block until ``job`` ends (scripts and self-tests), keeping the GUI painted."""
        end = time.monotonic() + timeout
        while job in self.jobs:
            self.pollJobs()
            slicer.app.processEvents()
            if time.monotonic() > end:
                job.cancel()
                raise TimeoutError(f"VolSegSlicer: the engine did not finish within {timeout} s")
            time.sleep(0.05)
        return job

    def _finish(self, job) -> None:
        if isinstance(job, EngineQuery):
            job.deliver()
            return
        try:
            if job.monitor.outcome == "done" and not job.cancelRequested:
                try:
                    job.segmentationNode = self.importResult(job)
                except Exception as exc:
                    logging.exception("VolSegSlicer: importing the result failed")
                    job.monitor.outcome, job.monitor.error = "error", f"importing the result failed: {exc}"
        finally:
            job.finished = True
            if job.ownsProcess:
                job.process.close()
            elif not job.process.is_running() and self.warmWorker is job.process:
                self.warmWorker = None  # the warm worker died or was killed: a new one starts next time
            if job.tempDir:
                shutil.rmtree(job.tempDir, ignore_errors=True)
            if job.onFinished:
                job.onFinished(job)

    # ------------------------------------------------------------------ queries
    def queryModels(self, cardsDir: str, callback: Callable) -> EngineQuery:
        """Run ``volseg models --json`` in the background; ``callback(models or None, error)``."""
        args = ["models", "--json"] + (["--cards-dir", cardsDir] if cardsDir else [])

        def parse(text):
            self.models = parse_models_json(text)
            return self.models

        query = EngineQuery(self.startEngine(args), parse, callback)
        self._track(query)
        return query

    def queryDevices(self, callback: Callable) -> EngineQuery:
        """Run ``volseg devices --json`` in the background; ``callback(DeviceChoices)``."""

        def deliver(result, error):
            callback(result if result is not None else fallback_choices(
                _("Could not ask the engine about devices ({error}); automatic choice is used.").format(error=error)))

        query = EngineQuery(self.startEngine(["devices", "--json"]), device_choices, deliver)
        self._track(query)
        return query

    # ------------------------------------------------------------------ segmentation
    def segmentOptions(self, model: dict, inputPaths: list, outputPath: str,
                       params: VolSegSlicerParameterNode, cardsDir: str = "") -> SegmentOptions:
        """The engine options for a run, from the card and the panel's parameters."""
        return SegmentOptions(
            model=model.get("card_path") or model["id"],
            inputs=list(inputPaths),
            output=outputPath,
            checkpoint=params.checkpointPath or "",
            device=params.device or "auto",
            use_model_settings=params.useModelSettings,
            overlap=params.overlap,
            roi_size=(params.roiX, params.roiY, params.roiZ),
            sw_batch_size=params.swBatchSize,
            flips=params.flips,
            amp=params.amp,
            keep_largest=params.keepLargest,
            fill_holes=params.fillHoles,
            min_island_mm3=params.minIslandMm3,
            cards_dir=cardsDir,
        )

    def segment(self, model: dict, inputVolumes: list, params: VolSegSlicerParameterNode,
                onEvent: Optional[Callable] = None, onFinished: Optional[Callable] = None,
                wait: bool = False) -> SegmentationJob:
        """Start a segmentation of ``inputVolumes`` (one per card input) with ``model`` (an entry of
        ``volseg models --json``). Returns at once unless ``wait``; the result is imported when
        the engine is done (``job.segmentationNode``)."""
        if not model:
            raise ValueError(_("Select a model first."))
        titles = input_titles(model)
        if len(inputVolumes) != len(titles) or not all(inputVolumes):
            raise ValueError(_("This model needs {n} input volume(s): {names}.").format(
                n=len(titles), names=", ".join(titles)))
        if duplicate_inputs([v.GetID() for v in inputVolumes]):
            raise ValueError(_("The same volume is selected for two inputs."))
        tempDir = tempfile.mkdtemp(prefix="VolSegSlicer-", dir=self.temporaryRoot())
        try:
            inputPaths = []
            for i, volume in enumerate(inputVolumes):
                path = os.path.join(tempDir, f"input{i}.nrrd")
                self.exportVolume(volume, path)
                inputPaths.append(path)
            outputPath = os.path.join(tempDir, "segmentation.nrrd")
            cardsDir = settingsValue("CardsDir", "")
            options = self.segmentOptions(model, inputPaths, outputPath, params, cardsDir)
            if params.keepWarm:
                worker = self.ensureWarmWorker()
                self._requestCounter += 1
                request = f"slicer-{self._requestCounter}"
                worker.send_line(serve_request_line(request, options))
                job = SegmentationJob(worker, request=request, ownsProcess=False,
                                      onEvent=onEvent, onFinished=onFinished)
            else:
                job = SegmentationJob(self.startEngine(segment_args(options)), onEvent=onEvent, onFinished=onFinished)
        except Exception:
            shutil.rmtree(tempDir, ignore_errors=True)
            raise
        job.tempDir, job.outputPath, job.model = tempDir, outputPath, model
        job.inputVolume = inputVolumes[0]
        job.outputSegmentation = params.outputSegmentation
        job.replace = params.replaceOutput
        self._track(job)
        if wait:
            self.waitFor(job)
        return job

    def ensureWarmWorker(self) -> EngineProcess:
        """The ``volseg serve`` process that keeps models loaded between runs (started on demand)."""
        if self.warmWorker is None or not self.warmWorker.is_running():
            self.warmWorker = self.startEngine(["serve"], stdinPipe=True)
        return self.warmWorker

    def stopWarmWorker(self) -> None:
        if self.warmWorker is not None:
            self.warmWorker.close()
            self.warmWorker = None

    def shutdown(self) -> None:
        """Stop everything this logic started (module cleanup / reload)."""
        for job in list(self.jobs):
            if isinstance(job, SegmentationJob):
                job.cancel()
            job.process.kill()
        self.jobs = []
        self._timer.stop()
        self.stopWarmWorker()

    @staticmethod
    def temporaryRoot() -> str:
        try:
            return slicer.app.temporaryPath
        except AttributeError:
            return tempfile.gettempdir()

    @staticmethod
    def exportVolume(volumeNode, path: str) -> None:
        """Write a volume to ``path`` (uncompressed NRRD, fast) without changing its storage node."""
        if not slicer.util.exportNode(volumeNode, path, {"useCompression": 0}):
            raise OSError(f"could not write '{volumeNode.GetName()}' to {path}")

    # ------------------------------------------------------------------ results
    def createColorTable(self, rows: list, name: str = "VolSegSlicer labels"):
        """A colour table with the card's label values, names, colours and terminology."""
        colorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode",
                                                       slicer.mrmlScene.GenerateUniqueName(name))
        colorNode.SetTypeToUser()
        colorNode.SetHideFromEditors(True)
        colorNode.SetNumberOfColors(max([r["value"] for r in rows] + [0]) + 1)
        colorNode.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
        for row in rows:
            r, g, b = row["color"]
            colorNode.SetColor(row["value"], row["name"], r, g, b, 1.0)
            if row.get("terminology_tag") and hasattr(colorNode, "SetTerminologyFromString"):
                colorNode.SetTerminologyFromString(row["value"], row["terminology_tag"])
        return colorNode

    def importResult(self, job: SegmentationJob):
        """Turn the engine's labelmap into segments (see :meth:`importLabelmap`)."""
        return self.importLabelmap(job.outputPath, job.model, job.inputVolume, job.outputSegmentation, job.replace)

    def importLabelmap(self, labelmapPath: str, model: dict, inputVolume, outputSegmentation=None,
                       replace: bool = False):
        """Load a labelmap file as segments with the card's names, colours and terminology.

        The result goes into a new segmentation node unless ``replace`` is set and
        ``outputSegmentation`` is given; then that node's segments of this model's labels are
        replaced and the user's other segments stay. Every card label gets a segment (empty when
        the network found nothing), tagged with its label value and the model id.
        """
        rows = segment_rows(model)
        colorNode = self.createColorTable(rows)
        labelmapNode = slicer.util.loadLabelVolume(labelmapPath, {"show": False, "name": "VolSegSlicer result"})
        try:
            if labelmapNode.GetDisplayNode():
                labelmapNode.GetDisplayNode().SetAndObserveColorNodeID(colorNode.GetID())
            # The file is in the input volume's local coordinates: give it the same transform.
            labelmapNode.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
            if outputSegmentation is not None and replace:
                segNode = outputSegmentation
                segmentation = segNode.GetSegmentation()
                for row in rows:
                    for segmentId in (row["id"], segmentation.GetSegmentIdBySegmentName(row["name"])):
                        if segmentId and segmentation.GetSegment(segmentId):
                            segmentation.RemoveSegment(segmentId)
            else:
                title = model.get("title") or model.get("id")
                segNode = slicer.mrmlScene.AddNewNodeByClass(
                    "vtkMRMLSegmentationNode",
                    slicer.mrmlScene.GenerateUniqueName(f"{inputVolume.GetName()} {title}"))
                segNode.CreateDefaultDisplayNodes()
            segNode.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
            segNode.SetNodeReferenceID(segNode.GetReferenceImageGeometryReferenceRole(), inputVolume.GetID())
            segNode.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
            segNode.SetAttribute(TAG_MODEL_ID, str(model.get("id", "")))
            segmentation = segNode.GetSegmentation()

            # One segment per card label, created first so that the import fills them by id.
            import vtkSegmentationCorePython as vtkSegmentationCore

            terminologyTag = vtkSegmentationCore.vtkSegment.GetTerminologyEntryTagName()
            idsByValue = {}
            for row in rows:
                segmentId = row["id"]  # Segment_<value>, as in the engine's own .seg.nrrd files
                if segmentation.GetSegment(segmentId):  # same id from an earlier model: keep both
                    segmentId = segmentation.GenerateUniqueSegmentID(segmentId)
                segmentation.AddEmptySegment(segmentId, row["name"], list(row["color"]))
                segment = segmentation.GetSegment(segmentId)
                if row.get("terminology_tag"):
                    segment.SetTag(terminologyTag, row["terminology_tag"])
                segment.SetTag(TAG_LABEL_VALUE, str(row["value"]))
                segment.SetTag(TAG_MODEL_ID, str(model.get("id", "")))
                idsByValue[row["value"]] = segmentId

            import numpy as np

            present = np.unique(slicer.util.arrayFromVolume(labelmapNode))
            importIds = import_segment_ids([dict(row, id=idsByValue[row["value"]]) for row in rows], present)
            if importIds:
                segmentIds = vtk.vtkStringArray()
                for segmentId in importIds:
                    segmentIds.InsertNextValue(segmentId)
                if not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(
                        labelmapNode, segNode, segmentIds):
                    raise RuntimeError("Slicer could not import the labelmap into the segmentation")
            self.placeInSubjectHierarchy(segNode, inputVolume)
            return segNode
        finally:
            slicer.mrmlScene.RemoveNode(labelmapNode)
            slicer.mrmlScene.RemoveNode(colorNode)

    @staticmethod
    def placeInSubjectHierarchy(segNode, inputVolume) -> None:
        """Put the segmentation in the input volume's study (needed for DICOM SEG export)."""
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        volumeItem = shNode.GetItemByDataNode(inputVolume)
        segItem = shNode.GetItemByDataNode(segNode)
        if volumeItem and segItem:
            shNode.SetItemParent(segItem, shNode.GetItemParent(volumeItem))

    @staticmethod
    def referenceVolume(segNode):
        return segNode.GetNodeReference(segNode.GetReferenceImageGeometryReferenceRole()) if segNode else None

    @staticmethod
    def isFromDicom(volumeNode) -> bool:
        return bool(volumeNode and volumeNode.GetAttribute("DICOM.instanceUIDs"))

    def modelForSegmentation(self, segNode, models: list) -> Optional[dict]:
        """The model card entry that made ``segNode`` (from its attribute), if known."""
        modelId = segNode.GetAttribute(TAG_MODEL_ID) if segNode else None
        return next((m for m in models or self.models if m["id"] == modelId), None)

    # ------------------------------------------------------------------ export
    def exportLabelmap(self, segNode, path: str, model: Optional[dict] = None) -> list:
        """Write the segmentation as a labelmap (NIfTI or NRRD by extension). With the model card,
        every segment keeps its card label value (matched by name); a colour table ``.csv`` with
        names, colours and terminology is written beside it. Returns the files written."""
        logic = slicer.modules.segmentations.logic()
        colorNode = self.createColorTable(segment_rows(model)) if model else None
        labelmapNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        try:
            segmentIds = vtk.vtkStringArray()
            segNode.GetSegmentation().GetSegmentIDs(segmentIds)
            import vtkSegmentationCorePython as vtkSegmentationCore

            if not logic.ExportSegmentsToLabelmapNode(segNode, segmentIds, labelmapNode, self.referenceVolume(segNode),
                                                      vtkSegmentationCore.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY,
                                                      colorNode):
                raise RuntimeError("Slicer could not convert the segmentation to a labelmap")
            written = [path]
            if not slicer.util.saveNode(labelmapNode, path):
                raise OSError(f"could not write {path}")
            if colorNode is not None:
                stem = path[: -len(".nii.gz")] if path.endswith(".nii.gz") else os.path.splitext(path)[0]
                colorPath = stem + ".csv"
                if slicer.util.saveNode(colorNode, colorPath):
                    written.append(colorPath)
            return written
        finally:
            slicer.mrmlScene.RemoveNode(labelmapNode)
            if colorNode is not None:
                slicer.mrmlScene.RemoveNode(colorNode)

    @staticmethod
    def exportSegNrrd(segNode, path: str) -> None:
        """Write ``.seg.nrrd`` (names, colours, terminology and the segments' tags kept)."""
        if not path.endswith(".seg.nrrd"):
            path += ".seg.nrrd"
        if not slicer.util.saveNode(segNode, path):
            raise OSError(f"could not write {path}")

    def exportDicomSeg(self, segNode, folder: str) -> None:
        """Write a DICOM SEG with the DICOMSegmentationPlugin (QuantitativeReporting extension).
        The input volume must come from the DICOM database."""
        reference = self.referenceVolume(segNode)
        if not self.isFromDicom(reference):
            raise ValueError(_("DICOM SEG needs an input volume loaded from DICOM."))
        try:
            import DICOMSegmentationPlugin
        except ImportError as exc:
            raise RuntimeError(_("DICOM SEG export needs the QuantitativeReporting extension; install it "
                                 "from the Extensions Manager, or use the DICOM module's Export.")) from exc
        self.placeInSubjectHierarchy(segNode, reference)
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        exporter = DICOMSegmentationPlugin.DICOMSegmentationPluginClass()
        exportables = exporter.examineForExport(shNode.GetItemByDataNode(segNode))
        if not exportables:
            raise RuntimeError(_("Slicer found nothing to export as DICOM SEG for this segmentation."))
        for exportable in exportables:
            exportable.directory = folder
        message = exporter.export(exportables)
        if message:
            raise RuntimeError(message)

    # ------------------------------------------------------------------ dependencies
    def ensureDependencies(self, askConfirmation: bool = True) -> bool:
        """Make sure PyTorch and the engine's packages are installed (asks before installing).

        PyTorch comes from the PyTorch extension's PyTorchUtils (it picks the CUDA build that fits
        the driver); the rest from ``Resources/requirements.txt`` with ``slicer.packaging.pip_ensure``
        (Slicer 5.12+) or ``slicer.util.pip_install``. Returns False if the user declined."""
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(_("VolSegSlicer needs PyTorch: install the 'PyTorch' extension from the "
                                     "Extensions Manager, restart Slicer and try again.")) from None
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                torch = torchLogic.installTorch(askConfirmation=askConfirmation, torchVersionRequirement=">=2.1")
                if torch is None:
                    return False
        requirementsPath = moduleResourcePath("requirements.txt")
        try:
            import slicer.packaging as packaging
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure(packaging.load_requirements(requirementsPath), requester="VolSegSlicer")
            return True
        missing = missing_requirements(read_requirements(requirementsPath))
        if not missing:
            return True
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("VolSegSlicer needs these Python packages:\n{packages}\n\nInstall them now?").format(
                    packages="\n".join(missing))):
            return False
        slicer.util.pip_install(missing)
        return True

    def diagnostics(self, logText: str, devices: DeviceChoices) -> str:
        """Text for bug reports: versions, devices and the log."""
        lines = [f"VolSegSlicer module: {MODULE_DIR}",
                 f"Slicer: {getattr(slicer.app, 'applicationVersion', '?')}",
                 f"Python: {sys.version.split()[0]}",
                 f"Engine Python: {python_executable()}",
                 "Devices: " + "; ".join(text for _id, text in devices.items),
                 f"Automatic device: {devices.auto} ({devices.reason})",
                 "", logText]
        return "\n".join(lines)


#
# Test
#


class VolSegSlicerTest(ScriptedLoadableModuleTest):
    """Self-test: the demo model on the sample chest CT, through the real background process."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_ResourcesFound()
        try:
            self.test_DemoModelOnSampleCT()
        except unittest.SkipTest as reason:
            self.delayDisplay(f"Skipped: {reason}")

    def test_ResourcesFound(self) -> None:
        for name in ("UI/VolSegSlicer.ui", "Icons/VolSegSlicer.png", "requirements.txt"):
            self.assertTrue(os.path.isfile(moduleResourcePath(name)), name)

    def loadSampleCT(self):
        """slicerio's CTChest4.nrrd when slicerio is installed, else Slicer's CTChest sample."""
        try:
            import slicerio

            path = os.path.join(os.path.dirname(slicerio.__file__), "data", "CTChest4.nrrd")
            if os.path.isfile(path):
                return slicer.util.loadVolume(path)
        except ImportError:
            pass
        import SampleData

        return SampleData.downloadSample("CTChest")

    def test_DemoModelOnSampleCT(self) -> None:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            self.skipTest("PyTorch is not installed in this Slicer: install the PyTorch extension, "
                          "then click 'Check Python packages' in the VolSegSlicer panel")
        self.delayDisplay("Loading the sample CT")
        volume = self.loadSampleCT()
        self.assertIsNotNone(volume)
        logic = VolSegSlicerLogic()
        self.delayDisplay("Reading the model list")
        found = {}
        logic.waitFor(logic.queryModels("", lambda models, error: found.update(models=models, error=error)),
                      timeout=300)
        self.assertIsNotNone(found["models"], found.get("error"))
        demo = next((m for m in found["models"] if m["id"] == "demo"), None)
        self.assertIsNotNone(demo, "the 'demo' model card is missing")

        self.delayDisplay("Running the demo model in the background")
        params = logic.getParameterNode()
        params.device = "cpu"
        params.keepWarm = False
        events = []
        job = logic.segment(demo, [volume], params, onEvent=lambda j, line: events.append(line), wait=True)
        self.assertEqual(job.monitor.outcome, "done", job.monitor.error)
        self.assertTrue(any(line and line.startswith("[infer]") for line in events), "no progress was reported")
        self.assertEqual(job.monitor.percent, 100)
        self.assertIsNotNone(job.segmentationNode)
        self.assertFalse(os.path.exists(job.tempDir), "temporary files were left behind")

        segmentation = job.segmentationNode.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        self.assertEqual(names, [lbl["name"] for lbl in demo["labels"]])
        segBounds, volBounds = [0.0] * 6, [0.0] * 6
        job.segmentationNode.GetRASBounds(segBounds)
        volume.GetRASBounds(volBounds)
        for axis in range(3):
            self.assertLess(segBounds[2 * axis], volBounds[2 * axis + 1] + 1e-3)
            self.assertGreater(segBounds[2 * axis + 1], volBounds[2 * axis] - 1e-3)
        self.assertEqual(logic.referenceVolume(job.segmentationNode), volume)
        logic.shutdown()
        self.delayDisplay("Test passed")
