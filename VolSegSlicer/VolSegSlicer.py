"""VolSegSlicer: AI segmentation of CT and MRI volumes in 3D Slicer.

The Slicer module: its description, the panel's wiring, a thin logic and the self-test. The
work is done by ``VolSegSlicerLib`` (running the engine, importing results as segments,
re-runs, exports), written against the scene and logics it is given and tested with pytest on
slicer-core, and by the engine ``volseg``, run as a background process so the GUI never waits.
"""

import logging
import os
import sys

import slicer

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if MODULE_DIR not in sys.path:  # Slicer adds it; keeps `import VolSegSlicerLib` working everywhere
    sys.path.insert(0, MODULE_DIR)

# First, before anything written for Python 3.10+: a Slicer older than 5.10 gets a clear message
# (in the log and, once Slicer has started, in a dialog) and the module is not loaded.
from VolSegSlicerLib.slicer_version import announce_refusal, refusal  # noqa: E402

_TOO_OLD = refusal(getattr(getattr(slicer, "app", None), "applicationVersion", ""))
if _TOO_OLD:
    announce_refusal(slicer, _TOO_OLD)
    raise ImportError(_TOO_OLD)

import tempfile  # noqa: E402
import unittest  # noqa: E402
from typing import Annotated, Any, Callable, Optional  # noqa: E402

import qt  # noqa: E402
import vtk  # noqa: E402
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode  # noqa: E402
from slicer.i18n import tr as _  # noqa: E402
from slicer.i18n import translate  # noqa: E402
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper  # noqa: E402
from slicer.ScriptedLoadableModule import (  # noqa: E402
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin  # noqa: E402

from VolSegSlicerLib import bundle_trust, catalog, dicom, export, mrml, panel, remote, resources, results, settings, testing  # noqa: E402
from VolSegSlicerLib.devices import DeviceChoices, fallback_choices  # noqa: E402
from VolSegSlicerLib.jobs import SegmentationJob  # noqa: E402
from VolSegSlicerLib.process import python_executable  # noqa: E402
from VolSegSlicerLib.runner import EngineRunner  # noqa: E402

def moduleResourcePath(filename: str = "") -> str:
    """A resource file, in the built extension (``<module dir>/Resources``) or a source checkout."""
    return os.path.join(str(resources.resource_dir(MODULE_DIR)), filename)


def settingsValue(key: str, default: Any = None) -> Any:
    value = qt.QSettings().value(f"VolSegSlicer/{key}")
    return default if value is None or value == "" else value


def setSettingsValue(key: str, value: Any) -> None:
    qt.QSettings().setValue(f"VolSegSlicer/{key}", value)


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
        iconPath = moduleResourcePath("Icons/VolSegSlicer.png")  # the base class looks in <module dir> only
        if os.path.isfile(iconPath):
            self.parent.icon = qt.QIcon(iconPath)

    def resourcePath(self, filename: str) -> str:
        return moduleResourcePath(filename)


@parameterNodeWrapper
class VolSegSlicerParameterNode:
    """The panel's state (saved with the scene). Field names match the .ui's SlicerParameterName
    and :class:`VolSegSlicerLib.settings.RunSettings`."""

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
    runOn: str = "computer"  # or "server" (its URL and token are in the application settings only)


class VolSegSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: model list, inputs, device, advanced settings, output, Segment/Cancel, export.
    What it shows is decided by :mod:`VolSegSlicerLib.panel`; the work is done by the logic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[VolSegSlicerLogic] = None
        self._parameterNode: Optional[VolSegSlicerParameterNode] = None
        self._parameterNodeGuiTag = None
        self._models: list[dict] = []
        self._devices: DeviceChoices = fallback_choices("Asking the engine which devices it can use...")
        self._job: Optional[SegmentationJob] = None
        self._log = resources.LogBuffer()
        self._dependenciesChecked = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(moduleResourcePath("UI/VolSegSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = VolSegSlicerLogic()
        self.inputLabels = [self.ui.inputLabel0, self.ui.inputLabel1, self.ui.inputLabel2, self.ui.inputLabel3]
        self.inputSelectors = [self.ui.inputSelector0, self.ui.inputSelector1, self.ui.inputSelector2,
                               self.ui.inputSelector3]
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        ui = self.ui
        ui.modelSearchBox.connect("textChanged(QString)", lambda text: self.showModels())
        ui.modelListWidget.connect("currentItemChanged(QListWidgetItem*,QListWidgetItem*)", self.onModelSelected)
        ui.refreshModelsButton.connect("clicked()", self.refreshModels)
        self.addBundleButton = qt.QToolButton()  # Add model... from a MONAI bundle folder or zip
        self.addBundleButton.text = _("Add model...")
        self.addBundleButton.toolTip = _("Add a MONAI bundle (folder or .zip) to your model cards folder")
        self.addBundleButton.popupMode = qt.QToolButton.InstantPopup
        addMenu = qt.QMenu(self.addBundleButton)
        addMenu.addAction(_("from a MONAI bundle folder..."), lambda: self.onAddBundle(folder=True))
        addMenu.addAction(_("from a MONAI bundle zip..."), lambda: self.onAddBundle(folder=False))
        self.addBundleButton.setMenu(addMenu)
        ui.refreshModelsButton.parentWidget().layout().addWidget(self.addBundleButton)
        ui.checkpointPathLineEdit.connect("currentPathChanged(QString)", self.onCheckpointChanged)
        ui.cardsDirPathLineEdit.connect("currentPathChanged(QString)", self.onCardsDirChanged)
        ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        ui.runOnComboBox.addItem(_("This computer"), "computer")
        ui.runOnComboBox.addItem(_("A server (shared GPU)"), "server")
        target = remote.load_server_target(settingsValue)
        ui.serverUrlLineEdit.text, ui.serverTokenLineEdit.text = target.url, target.token
        ui.serverCaCertPathLineEdit.currentPath = target.caCert
        self.logic.runner.server = target
        ui.runOnComboBox.connect("currentIndexChanged(int)", self.onRunOnChanged)
        ui.serverUrlLineEdit.connect("editingFinished()", self.onServerChanged)
        ui.serverTokenLineEdit.connect("editingFinished()", self.onServerChanged)
        ui.serverCaCertPathLineEdit.connect("currentPathChanged(QString)", lambda path: self.onServerChanged())
        for selector in self.inputSelectors:
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateGUIState)
        ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onOutputChanged)
        ui.useModelSettingsCheckBox.connect("toggled(bool)", self.updateGUIState)
        ui.keepWarmCheckBox.connect("toggled(bool)", lambda on: on or self.logic.runner.stop_warm_worker())
        ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        ui.copyLogButton.connect("clicked()", self.onCopyLog)
        ui.installDependenciesButton.connect("clicked()", self.onInstallDependencies)
        ui.exportLabelmapButton.connect("clicked()", self.onExportLabelmap)
        ui.exportSegNrrdButton.connect("clicked()", self.onExportSegNrrd)
        ui.exportDicomSegButton.connect("clicked()", self.onExportDicomSeg)
        ui.cardsDirPathLineEdit.blockSignals(True)
        ui.cardsDirPathLineEdit.currentPath = settingsValue("CardsDir", "")
        ui.cardsDirPathLineEdit.blockSignals(False)
        ui.progressBar.setVisible(False)
        self.initializeParameterNode()
        self.showDevices(self._devices)
        self.refreshModels()
        self.logic.runner.query_devices(self.showDevices)

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

    def runsOnServer(self) -> bool:
        return bool(self._parameterNode and self._parameterNode.runOn == "server")

    def refreshModels(self) -> None:
        self.ui.modelInfoLabel.text = _("Reading the model cards...")
        try:
            self.logic.runner.query_models(self.ui.cardsDirPathLineEdit.currentPath, self.onModelsReady,
                                           on_server=self.runsOnServer())
        except ValueError as exc:  # Run on = server without an address or token yet
            self._models = []
            self.showModels()
            self.ui.modelInfoLabel.text = str(exc)

    def onRunOnChanged(self, index: int) -> None:
        if self._parameterNode:
            self._parameterNode.runOn = self.ui.runOnComboBox.itemData(index) or "computer"
        self.updateGUIState()
        self.refreshModels()

    def onServerChanged(self) -> None:
        target = remote.ServerTarget(self.ui.serverUrlLineEdit.text.strip(), self.ui.serverTokenLineEdit.text.strip(),
                                     self.ui.serverCaCertPathLineEdit.currentPath)
        remote.save_server_target(setSettingsValue, target)  # application settings, not the scene
        self.logic.runner.server = target
        if self.runsOnServer():
            self.refreshModels()

    def onModelsReady(self, models: Optional[list], error: str) -> None:
        self._models = models or []
        if models is None:
            self.ui.modelInfoLabel.text = _(
                "Could not read the model list: {error}\nIf a Python package is missing, click "
                "'Check Python packages' under Advanced.").format(error=error.splitlines()[-1] if error else "")
            self.appendLog(error)
        self.showModels()

    def showModels(self) -> None:
        wanted = (self._parameterNode.modelId if self._parameterNode else "") or settingsValue("LastModel", "")
        listWidget, current = self.ui.modelListWidget, None
        listWidget.blockSignals(True)
        listWidget.clear()
        for model in catalog.filter_models(self._models, self.ui.modelSearchBox.text):
            item = qt.QListWidgetItem(bundle_trust.list_title(panel.model_list_title(model), model, self.logic.trust))
            item.setData(qt.Qt.UserRole, model["id"])
            item.setToolTip(catalog.model_tooltip_html(model))
            listWidget.addItem(item)
            current = item if model["id"] == wanted else current
        listWidget.blockSignals(False)
        if current is not None:
            listWidget.setCurrentItem(current)  # calls onModelSelected
        elif not any(m["id"] == wanted for m in self._models):
            self.onModelSelected(None)  # the remembered model is gone; a search that hides it keeps it

    def currentModel(self) -> Optional[dict]:
        modelId = self._parameterNode.modelId if self._parameterNode else ""
        return next((m for m in self._models if m["id"] == modelId), None)

    def onModelSelected(self, item, previous=None) -> None:
        if not self._parameterNode:
            return
        modelId = item.data(qt.Qt.UserRole) if item is not None else None
        model = next((m for m in self._models if m["id"] == modelId), None)
        self._parameterNode.modelId = model["id"] if model else ""
        if model is not None:
            setSettingsValue("LastModel", model["id"])
            self.ui.modelInfoLabel.text = panel.model_summary(model)
            remembered = settingsValue(f"Checkpoints/{model['id']}", "")  # checkpoint remembered per model
            self.ui.checkpointPathLineEdit.blockSignals(True)
            self.ui.checkpointPathLineEdit.currentPath = remembered
            self.ui.checkpointPathLineEdit.blockSignals(False)
            self._parameterNode.checkpointPath = remembered
            volumes = mrml.scalar_volumes(self.logic.context)
            for i, pick in enumerate(catalog.prefill_inputs(model, [n.GetName() for n in volumes])):
                if getattr(self._parameterNode, f"inputVolume{i}") is None and pick is not None:
                    setattr(self._parameterNode, f"inputVolume{i}", volumes[pick])
        elif self._models:
            self.ui.modelInfoLabel.text = _("Select a model.")
        self.updateGUIState()

    def onCheckpointChanged(self, path: str) -> None:
        if self._parameterNode:
            self._parameterNode.checkpointPath = path
            if self._parameterNode.modelId:
                setSettingsValue(f"Checkpoints/{self._parameterNode.modelId}", path)

    def onAddBundle(self, folder: bool) -> None:
        from VolSegSlicerLib.bundles import BUNDLE_FILE_FILTER, add_bundle

        window = slicer.util.mainWindow()
        source = (qt.QFileDialog.getExistingDirectory(window, _("MONAI bundle folder"), qt.QDir.homePath()) if folder
                  else qt.QFileDialog.getOpenFileName(window, _("MONAI bundle zip"), qt.QDir.homePath(), BUNDLE_FILE_FILTER))
        if not source:
            return
        with slicer.util.tryWithErrorDisplay(_("Adding the bundle failed."), waitCursor=True):
            added = add_bundle(source, self.ui.cardsDirPathLineEdit.currentPath)
            self.appendLog(_("Added the MONAI bundle {path}").format(path=added))
            self.refreshModels()
            self.askBundleTrust(str(added))

    def askBundleTrust(self, path: str, then: Optional[Callable] = None) -> None:
        """Ask the engine which of the bundle's own code a trusted run would run; if any, show it
        and ask Trust / Cancel; remember the answer (VolSegSlicerLib.bundle_trust). ``then`` runs
        once the bundle may run."""

        def answered(report, error: str) -> None:  # the dialog opens outside the engine's polling
            qt.QTimer.singleShot(0, lambda: decide(report, error))

        def decide(report, error: str) -> None:
            self.ui.statusLabel.text = ""
            if report is None:
                slicer.util.errorDisplay(_("Could not check the bundle's code:") + "\n" + error)
                return
            trusted = report.needs_trust and self.confirmBundleTrust(report)
            self.logic.trust.record(report, trusted)
            if report.needs_trust:
                self.appendLog((_("Trusted the code of {path}") if trusted else
                                _("Not trusted: {path} needs trust to run")).format(path=report.bundle))
            self.showModels()
            if then is not None and (trusted or not report.needs_trust):
                then()

        self.ui.statusLabel.text = _("Checking the bundle's code...")
        self.logic.runner.query_bundle_code(path, answered)

    def confirmBundleTrust(self, report) -> bool:
        """The confirmation dialog: the engine's list of the bundle's code; True only on Trust."""
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setIcon(qt.QMessageBox.Warning)
        box.setWindowTitle(bundle_trust.QUESTION_TITLE)
        box.setText(bundle_trust.trust_question(report))
        box.setTextInteractionFlags(qt.Qt.TextSelectableByMouse)
        trust = box.addButton(_("Trust"), qt.QMessageBox.AcceptRole)
        cancel = box.addButton(_("Cancel"), qt.QMessageBox.RejectRole)
        box.setDefaultButton(cancel)
        box.setEscapeButton(cancel)
        box.exec_()
        return box.clickedButton() == trust

    def onCardsDirChanged(self, path: str) -> None:
        setSettingsValue("CardsDir", path)
        self.refreshModels()

    def showDevices(self, choices: DeviceChoices) -> None:
        self._devices, combo = choices, self.ui.deviceComboBox
        wanted = (self._parameterNode.device if self._parameterNode else "") or settingsValue("Device", "auto")
        combo.blockSignals(True)
        combo.clear()
        for deviceId, text in choices.items:
            combo.addItem(text, deviceId)
        combo.setCurrentIndex(max(0, combo.findData(wanted)))
        combo.blockSignals(False)
        self.ui.deviceReasonLabel.text = choices.reason
        self.onDeviceChanged(combo.currentIndex)

    def onDeviceChanged(self, index: int) -> None:
        if self._parameterNode is not None and index >= 0:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index) or "auto"
            setSettingsValue("Device", self._parameterNode.device)

    def selectedInputs(self) -> list:
        model = self.currentModel()
        count = len(catalog.input_titles(model)) if model else 1
        return [getattr(self._parameterNode, f"inputVolume{i}") for i in range(count)]

    def updateGUIState(self, *args) -> None:
        if not self._parameterNode or not hasattr(self, "ui"):
            return
        output = self._parameterNode.outputSegmentation
        state = panel.panel_state(self.currentModel(), [n.GetID() if n else None for n in self.selectedInputs()],
                                  running=self._job is not None and not self._job.finished,
                                  cancel_requested=bool(self._job and self._job.cancelRequested),
                                  use_model_settings=self._parameterNode.useModelSettings,
                                  has_output=output is not None,
                                  output_from_dicom=dicom.is_from_dicom(mrml.reference_volume(output)))
        for i in range(catalog.MAX_INPUTS):
            self.inputLabels[i].setVisible(state.input_visible(i))
            self.inputSelectors[i].setVisible(state.input_visible(i))
            if state.input_visible(i):
                self.inputLabels[i].text = state.input_titles[i] + ":"
        self.ui.inputWarningLabel.text = state.input_warning
        onServer = self.runsOnServer()
        self.ui.runOnComboBox.blockSignals(True)
        self.ui.runOnComboBox.currentIndex = 1 if onServer else 0
        self.ui.runOnComboBox.blockSignals(False)
        self.ui.serverFrame.setVisible(onServer)
        self.ui.deviceComboBox.enabled = not onServer  # the server picks its device
        self.ui.checkpointPathLineEdit.enabled = not onServer  # the server uses its own weights
        for name in ("overlapSliderWidget", "roiXSpinBox", "roiYSpinBox", "roiZSpinBox", "swBatchSizeSpinBox",
                     "flipsCheckBox", "ampCheckBox", "keepLargestCheckBox", "fillHolesCheckBox", "minIslandSpinBox"):
            getattr(self.ui, name).enabled = state.advanced_enabled
        self.ui.replaceOutputCheckBox.enabled = state.replace_enabled
        self.ui.applyButton.text = _(state.apply_text)
        self.ui.applyButton.enabled = state.apply_enabled
        self.ui.applyButton.toolTip = _(state.apply_tooltip)
        for button in (self.ui.exportLabelmapButton, self.ui.exportSegNrrdButton):
            button.enabled = state.export_enabled
        self.ui.exportDicomSegButton.enabled = state.dicom_export_enabled

    def onOutputChanged(self, node) -> None:
        self.ui.show3DButton.setSegmentationNode(node)
        self.updateGUIState()

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
            model = self.currentModel()
            if model is not None and not self.runsOnServer():  # a bundle's own code runs only once trusted
                decision = bundle_trust.trust_decision(model, self.logic.trust)
                if decision.action == "ask":
                    self.appendLog(decision.reason)
                    self.askBundleTrust(decision.path, then=self.onApplyButton)
                    return
            self.logic.saveSettings(self._parameterNode)
            self._log.clear()
            self.ui.logTextEdit.clear()
            self.ui.progressBar.setVisible(True)
            self.ui.progressBar.value = 0
            self.ui.timeLabel.text = ""
            self.ui.statusLabel.text = _("Starting...")
            self._job = self.logic.segment(self.currentModel(), self.selectedInputs(), self._parameterNode,
                                           onEvent=self.onJobEvent, onFinished=self.onJobFinished)
            self.updateGUIState()

    def onJobEvent(self, job: SegmentationJob, line: Optional[str]) -> None:
        if line:
            self.appendLog(line)
        self.ui.progressBar.value = job.monitor.percent
        self.ui.statusLabel.text = job.monitor.status

    def onJobFinished(self, job: SegmentationJob) -> None:
        end = panel.run_end(job)
        self.ui.progressBar.value = job.monitor.percent
        self.ui.progressBar.setVisible(end.progress_visible)
        self.ui.timeLabel.text = _("Time taken: {t}").format(t=panel.format_duration(job.elapsed))
        self.ui.statusLabel.text = end.status
        if job.segmentationNode is not None:
            self._parameterNode.outputSegmentation = job.segmentationNode
        if end.error:
            self.appendLog(end.error)
            slicer.util.errorDisplay(_("Segmentation failed:") + "\n" + end.error, detailedText=self._log.text())
        self.updateGUIState()

    def onInstallDependencies(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Installing Python packages failed."), waitCursor=True):
            if self.logic.ensureDependencies():
                self._dependenciesChecked = True
                slicer.util.infoDisplay(_("PyTorch and the packages the engine needs are installed.") + "\n\n" +
                                        getattr(self.logic, "installReport", ""))
                self.refreshModels()
                self.logic.runner.query_devices(self.showDevices)

    def onCopyLog(self) -> None:
        qt.QApplication.clipboard().setText(resources.diagnostics_text(
            MODULE_DIR, str(getattr(slicer.app, "applicationVersion", "?")), python_executable(), self._devices,
            self._log.text()))

    def _askPath(self, caption: str, fileFilter: str, suffix: str) -> Optional[str]:
        """A file name from the save dialog (which itself asks before replacing a file)."""
        defaultPath = os.path.join(qt.QDir.homePath(), self._parameterNode.outputSegmentation.GetName() + suffix)
        return qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), caption, defaultPath, fileFilter) or None

    def _export(self, what: str, write: Callable[[], Any]) -> None:
        with slicer.util.tryWithErrorDisplay(_("{what} export failed.").format(what=what), waitCursor=True):
            self.appendLog(_("Wrote {files}").format(files=", ".join(str(f) for f in write())))

    def onExportLabelmap(self) -> None:
        path = self._askPath(_("Export labelmap"), "NIfTI (*.nii.gz *.nii);;NRRD (*.nrrd)", ".nii.gz")
        if path:
            segNode = self._parameterNode.outputSegmentation
            self._export(_("Labelmap"), lambda: self.logic.exportLabelmap(segNode, path, self._models))

    def onExportSegNrrd(self) -> None:
        path = self._askPath(_("Export segmentation"), "Segmentation (*.seg.nrrd)", ".seg.nrrd")
        if path:
            segNode = self._parameterNode.outputSegmentation
            self._export(_("Segmentation"), lambda: [self.logic.exportSegmentation(segNode, path)])

    def onExportDicomSeg(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Folder for the DICOM SEG file"),
                                                     qt.QDir.homePath())
        segNode = self._parameterNode.outputSegmentation
        if folder:
            self._export(_("DICOM SEG"), lambda: self.logic.exportDicomSeg(segNode, folder) or [folder])


class VolSegSlicerLogic(ScriptedLoadableModuleLogic):
    """A thin adapter over the library for the running Slicer (its scene and Segmentations logic, a
    timer polling the engine, settings, installers). Scripts: ``job = VolSegSlicerLogic().segment(model,
    [volumeNode], logic.getParameterNode(), wait=True)``, then ``job.segmentationNode``."""

    POLL_INTERVAL_MS = 100

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.context = mrml.MRMLContext.from_application(slicer)
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.poll)
        self.runner = EngineRunner(self.context, MODULE_DIR, temp_root=slicer.app.temporaryPath,
                                   base_environment=slicer.util.startupEnvironment, on_activity=self._timer.start)
        #: The user's decisions about bundles' own code, in the application settings.
        self.trust = bundle_trust.TrustStore(settingsValue, setSettingsValue)

    def getParameterNode(self) -> VolSegSlicerParameterNode:
        return VolSegSlicerParameterNode(super().getParameterNode())

    def restoreSettings(self, node: VolSegSlicerParameterNode) -> None:
        settings.restore_settings(node, settingsValue)

    def saveSettings(self, node: VolSegSlicerParameterNode) -> None:
        settings.save_settings(node, setSettingsValue)

    def poll(self) -> None:
        if not self.runner.poll():
            self._timer.stop()

    def segment(self, model: dict, inputVolumes: list, params, onEvent: Optional[Callable] = None,
                onFinished: Optional[Callable] = None, wait: bool = False) -> SegmentationJob:
        """Start a segmentation (see :meth:`EngineRunner.segment`); ``wait`` blocks until imported."""
        job = self.runner.segment(model, inputVolumes, params, settingsValue("CardsDir", ""), onEvent, onFinished,
                                  trust=self.trust)
        if wait:
            self.runner.wait_for(job, process_events=slicer.app.processEvents)
        return job

    def exportLabelmap(self, segNode, path: str, models: Optional[list] = None) -> list:
        model = results.model_for_segmentation(segNode, models or self.runner.models)
        return export.export_labelmap(self.context, segNode, path, model, overwrite=True)

    def exportSegmentation(self, segNode, path: str):
        if not path.lower().endswith(".seg.nrrd"):
            path += ".seg.nrrd"
        return export.export_segmentation_file(self.context, segNode, path, overwrite=True)

    def exportDicomSeg(self, segNode, folder: str) -> None:
        dicom.export_dicom_seg(self.context, segNode, folder)

    def ensureDependencies(self) -> bool:
        """PyTorch (from the PyTorch extension) and the engine's packages; False if declined."""
        def report(text: str) -> None:
            self.installReport = text
            logging.info(text)

        return resources.ensure_requirements(moduleResourcePath("requirements.txt"), slicer.util.confirmOkCancelDisplay,
                                             slicer.util.pip_install, report=report)

    def shutdown(self) -> None:
        self._timer.stop()
        self.runner.shutdown()


class VolSegSlicerTest(ScriptedLoadableModuleTest):
    """The user's chain (``VolSegSlicerLib.testing.run_user_chain``: segment, correct, re-run, export)
    through the module's logic in the running Slicer; pytest runs the same chain on slicer-core."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_ResourcesFound()
        try:
            self.test_SegmentCorrectRerunExport()
        except unittest.SkipTest as reason:
            self.delayDisplay(f"Skipped: {reason}")

    def test_ResourcesFound(self) -> None:
        for name in ("UI/VolSegSlicer.ui", "Icons/VolSegSlicer.png", "requirements.txt"):
            self.assertTrue(os.path.isfile(moduleResourcePath(name)), name)

    def test_SegmentCorrectRerunExport(self) -> None:
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            self.skipTest("PyTorch is not installed in this Slicer: install the PyTorch extension, "
                          "then click 'Check Python packages' in the VolSegSlicer panel")
        logic = VolSegSlicerLogic()
        try:
            self.delayDisplay("Segment the sample CT, correct, re-run, export; then a 4x finer copy of it")
            testing.run_module_chain(self, logic, slicer.util.loadVolume, slicer.app.processEvents,
                                     tempfile.mkdtemp(prefix="VolSegSlicerTest-"))
        finally:
            logic.shutdown()
        self.delayDisplay("Test passed")
