"""Stroke Lesion Segmentation: the 3D Slicer module of StrokeSeg.

Thin Qt layer over ``StrokeSegLib`` (the Qt-free Slicer logic, tested headless in CI) and the
``strokeseg`` engine. The engine's dependencies (PyTorch, MONAI, ...) are installed on first use
with the user's consent, so nothing here imports them before they exist.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys
import typing

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, Default, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# The engine package and the logic live next to this file (source tree and installed extension).
_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if _MODULE_DIR not in sys.path:
    sys.path.insert(0, _MODULE_DIR)

# Safe before the engine's dependencies are installed: the standard library, packaging, numpy and
# SimpleITK only (Testing/Python/test_slicer_static.py checks this import closure).
from StrokeSegLib import dependencies, paths  # noqa: E402
from StrokeSegLib.parameters import PARAMETERS, input_parameter_name  # noqa: E402
from strokeseg.modality import MODALITY_KEYS  # noqa: E402

#
# StrokeSeg
#

CITATIONS = (
    "Pérez Malla CU, Valdés Hernández MdC, Rachmadi MF, Komura T. Evaluation of enhanced learning techniques for "
    "segmenting ischaemic stroke lesions in brain magnetic resonance perfusion images using a convolutional neural "
    "network scheme. Front Neuroinform 2019;13:33. doi:10.3389/fninf.2019.00033",
    "Clèrigues A, Valverde S, Bernal J, Freixenet J, Oliver A, Lladó X. Acute and sub-acute stroke lesion "
    "segmentation from multimodal MRI. Comput Methods Programs Biomed 2020;194:105521.",
    "Chen L, Bentley P, Rueckert D. Fully automatic acute ischemic lesion segmentation in DWI using convolutional "
    "neural networks (EDD Net and MUSCLE Net). NeuroImage: Clinical 2017;15:633-643.",
    "Bhavnani H, Zheng M, Xiao Y, Fan Z. Stroke lesion segmentation with 3D convolutional neural networks. "
    "University of Pennsylvania.",
    "Liu P. Stroke lesion segmentation with 2D novel CNN pipeline and novel loss function. BrainLes 2018 "
    "(ISLES 2018), LNCS 11383, Springer.",
)


class StrokeSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Stroke Lesion Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations", "Sequences", "Terminologies"]
        self.parent.contributors = ["StrokeSeg contributors"]
        self.parent.helpText = _(
            "Segments ischaemic stroke lesions: pick the scans (detected automatically), press <b>Segment</b>, "
            "tune the threshold, closing radius and minimum lesion size, correct the mask in the embedded Segment "
            "Editor and export the lesion, its probability map, a DICOM SEG and the lesion report. "
            "Your manual edits are never overwritten by the sliders: they are kept and a new segment is made. "
            "Not a medical device; for research use. "
            'See the <a href="https://github.com/strokeseg/StrokeSeg">project page</a>.'
        ) + "<br><br>" + _("The bundled models and methods build on:") + "<ul>" + "".join(
            f"<li>{c}</li>" for c in CITATIONS) + "</ul>"
        self.parent.acknowledgementText = _(
            "StrokeSeg builds on 3D Slicer, PyTorch, MONAI, SimpleITK and highdicom. Lesion shapes of the phantoms "
            "come from the Stroke Outcome Optimization Project (SOOP, OpenNeuro ds004889, CC0); arterial territories "
            "from the digital arterial territory atlas of Liu et al., Scientific Data 2023 (CC BY-SA 4.0); anatomy "
            "from the MNI ICBM152 2009 templates."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Phantom cases in the Sample Data module, generated on this computer when first clicked (no download)."""
    import SampleData

    from StrokeSegLib.sampledata import SAMPLES

    for sample in SAMPLES:
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="Stroke Lesion Segmentation",
            sampleName=sample.name,
            thumbnailFileName=str(paths.icon_file()),
            customDownloader=lambda source, sample=sample: loadSampleCase(sample),
        )


def sampleCacheDirectory() -> str:
    return os.path.join(slicer.app.cachePath, "StrokeSeg")


def loadSampleCase(sample):
    """Generate (first time, ~20 s) and load a phantom case; returns modality key -> volume node."""
    if not dependencies.is_ready(paths.requirements_file()):
        slicer.util.errorDisplay(_("Install StrokeSeg's Python dependencies first (open the Stroke Lesion Segmentation module)."))
        return {}
    from StrokeSegLib.sampledata import load_sample

    def loadVolume(path, name):
        return slicer.util.loadVolume(str(path), {"name": name, "show": False})

    def loadDicomSeries(files, name):
        # As Slicer's DICOM scalar volume plugin loads a series (archetype reader + file list), without
        # needing a DICOM database; DICOM SEG export finds the source files through the storage node.
        from StrokeSegLib.headless import load_dicom_series

        return load_dicom_series(slicer.modules.volumes.logic(), files, name)

    with slicer.util.WaitCursor():
        nodes = load_sample(sample, sampleCacheDirectory(), loadVolume, loadDicomSeries)
    slicer.util.setSliceViewerLayers(background=nodes["dwi"], fit=True)
    return nodes


def _parameterNodeClass():
    """The parameterNodeWrapper class, built from StrokeSegLib.parameters.PARAMETERS (one spec)."""
    annotations = {}
    for p in PARAMETERS:
        if p.kind == "node":
            classes = tuple(getattr(slicer, c) for c in p.node_classes)
            annotations[p.name] = classes[0] if len(classes) == 1 else typing.Union[classes]
            continue
        if p.kind == "float":
            kind = typing.Annotated[float, WithinRange(p.minimum, p.maximum), Default(float(p.default))]
        elif p.kind == "bool":
            kind = typing.Annotated[bool, Default(bool(p.default))]
        elif p.kind == "path":
            kind = typing.Annotated[pathlib.Path, Default(pathlib.Path(p.default))]
        elif p.choices:
            kind = typing.Annotated[str, Choice(list(p.choices)), Default(p.default)]
        else:
            kind = typing.Annotated[str, Default(p.default)]
        annotations[p.name] = kind
    return parameterNodeWrapper(type("StrokeSegParameterNode", (), {"__annotations__": annotations}))


StrokeSegParameterNode = _parameterNodeClass()


def _fileForInstance(uid: str) -> str:
    """SOP instance UID -> file, through Slicer's DICOM database (DICOM SEG export)."""
    database = getattr(slicer, "dicomDatabase", None)
    return database.fileForInstance(uid) if database is not None and database.isOpen else ""


#
# StrokeSegWidget
#


class StrokeSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    POLL_MS = 100  # worker progress polling
    RECOMPUTE_DELAY_MS = 30  # coalesces slider moves
    STATISTICS_DELAY_MS = 400  # statistics follow once the slider rests

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._perfusionJob = None
        self._observedPerfusionSegmentation = None
        self._lastSettings = None
        self._lastInputs = None
        self._deviceAvailable = {}

    # -- construction --------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(str(paths.ui_file()))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_MS)
        self._pollTimer.timeout.connect(self._pollJob)
        self._recomputeTimer = self._singleShot(self.RECOMPUTE_DELAY_MS, self._recompute)
        self._statisticsTimer = self._singleShot(self.STATISTICS_DELAY_MS, self._updateStatistics)
        self._detectTimer = self._singleShot(500, self._autoDetect)
        self._perfusionPollTimer = qt.QTimer()
        self._perfusionPollTimer.setInterval(self.POLL_MS)
        self._perfusionPollTimer.timeout.connect(self._pollPerfusionJob)
        self._perfusionStatisticsTimer = self._singleShot(self.STATISTICS_DELAY_MS, self._updatePerfusionStatistics)

        self.ui.installDependenciesButton.clicked.connect(self.onInstallDependencies)
        self.ui.detectButton.clicked.connect(lambda: self.onDetect(overwrite=True))
        self.ui.showAllInputsCheckBox.toggled.connect(lambda checked: self._updateModelDescription())
        self.ui.modelComboBox.currentIndexChanged.connect(self.onModelChanged)
        self.ui.deviceComboBox.currentIndexChanged.connect(self.onDeviceChanged)
        self.ui.segmentButton.clicked.connect(self.onSegmentButton)
        self.ui.undoButton.clicked.connect(self.onUndo)
        self.ui.redoButton.clicked.connect(self.onRedo)
        self.ui.exportButton.clicked.connect(self.onExport)
        self.ui.perfusionButton.clicked.connect(self.onPerfusionButton)
        self.ui.perfusionExportButton.clicked.connect(self.onPerfusionExport)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)

        self._setupSegmentEditor()
        self._updateDependencyState()

    def _singleShot(self, ms, callback):
        timer = qt.QTimer()
        timer.setSingleShot(True)
        timer.setInterval(ms)
        timer.timeout.connect(callback)
        return timer

    def _setupSegmentEditor(self) -> None:
        """Embedded Segment Editor sharing Slicer's singleton editor node (same effects and settings)."""
        editor = self.ui.segmentEditorWidget
        editor.setMRMLScene(slicer.mrmlScene)
        tag = "SegmentEditor"
        node = slicer.mrmlScene.GetSingletonNode(tag, "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            node.UnRegister(None)
            node.SetSingletonTag(tag)
            node = slicer.mrmlScene.AddNode(node)
        editor.setMRMLSegmentEditorNode(node)

    def _updateDependencyState(self) -> bool:
        ready = dependencies.is_ready(paths.requirements_file())
        self.ui.dependenciesGroupBox.setVisible(not ready)
        for widget in (self.ui.inputsCollapsibleButton, self.ui.modelCollapsibleButton, self.ui.segmentButton,
                       self.ui.refineCollapsibleButton, self.ui.exportCollapsibleButton,
                       self.ui.perfusionCollapsibleButton):
            widget.setEnabled(ready)
        if ready and self.logic is None:
            self._initializeLogic()
        return ready

    def _initializeLogic(self) -> None:
        self.logic = StrokeSegLogic()
        self._fillModels()
        self._fillDevices()
        self.initializeParameterNode()

    # -- module enter/exit and scene events ----------------------------------------------
    def cleanup(self) -> None:
        for job in (self._job, self._perfusionJob):
            if job is not None:
                job.cancel()
        self._pollTimer.stop()
        self._perfusionPollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        if self.logic is not None:
            self.initializeParameterNode()
        self.ui.segmentEditorWidget.installKeyboardShortcuts()

    def exit(self) -> None:
        self.ui.segmentEditorWidget.setActiveEffect(None)
        self.ui.segmentEditorWidget.uninstallKeyboardShortcuts()
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        for job in (self._job, self._perfusionJob):
            if job is not None:
                job.cancel()
        self._observePerfusionSegmentation(None)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered and self.logic is not None:
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event) -> None:
        # A scene (.mrb) was loaded: its parameter node replaces ours; the logic rebuilds its caches.
        if self.logic is not None:
            self.initializeParameterNode()
            self._refreshResultViews()
            self._refreshPerfusionViews()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAdded(self, caller, event, node) -> None:
        if self._parameterNode and self._parameterNode.autoDetectInputs and node.IsA("vtkMRMLVolumeNode"):
            self._detectTimer.start()  # after loading settles (several volumes arrive at once)

    # -- parameter node ------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if self._parameterNode.autoDetectInputs:
            self._detectTimer.start()

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._lastSettings = self._settingsTuple()
            self._lastInputs = None
            self._syncComboBoxes()
            self._onParameterNodeModified()

    def _settingsTuple(self):
        p = self._parameterNode
        return (p.threshold, p.closingMm, p.minLesionMl, p.fillHoles)

    def _inputsTuple(self):
        p = self._parameterNode
        return (p.model, tuple(k for k in MODALITY_KEYS if p.getValue(input_parameter_name(k)) is not None))

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        if self._parameterNode is None:
            return
        inputs = self._inputsTuple()
        if inputs != self._lastInputs:  # the registry is only read when model or inputs change
            self._lastInputs = inputs
            self._updateModelDescription()
        settings = self._settingsTuple()
        if settings != self._lastSettings:
            self._lastSettings = settings
            if self.logic.core.has_result() and self._job is None:
                self._recomputeTimer.start()
        if self.logic.core.has_result():
            from StrokeSegLib.display import set_probability_opacity

            set_probability_opacity(slicer.mrmlScene, self._parameterNode.probabilityVolume,
                                    self._parameterNode.probabilityOpacity)
        self._observePerfusionSegmentation(self._parameterNode.perfusionSegmentation)
        self._updateButtons()

    # -- inputs, models, devices ---------------------------------------------------------
    def onDetect(self, overwrite=False) -> None:
        with slicer.util.tryWithErrorDisplay(_("Modality detection failed."), waitCursor=True):
            found = self.logic.core.detect_inputs(overwrite=overwrite)
            lines = [f"{d.name}: {d.key or '-'} ({d.confidence:.2f}; {d.reason})" for d in found]
            self.ui.detectionLabel.text = "\n".join(lines) if lines else _("No volumes in the scene.")
            self._updateModelDescription()

    def _autoDetect(self) -> None:
        if self._parameterNode is not None and self._job is None:
            self.onDetect(overwrite=False)

    def _fillModels(self) -> None:
        combo = self.ui.modelComboBox
        combo.blockSignals(True)
        combo.clear()
        combo.addItem(_("Automatic (fits the inputs)"), "auto")
        try:
            for card in self.logic.core.models():
                combo.addItem(f"{card.name} ({card.id} {card.version})", card.id)
                combo.setItemData(combo.count - 1, card.describe(), qt.Qt.ToolTipRole)
        except Exception as exc:  # noqa: BLE001 - a broken models folder must not break the module
            self._log(_("No models available: {error}").format(error=exc))
        combo.blockSignals(False)

    def _fillDevices(self) -> None:
        from StrokeSegLib.logic import device_options

        combo = self.ui.deviceComboBox
        combo.blockSignals(True)
        combo.clear()
        self._deviceAvailable = {}
        for key, label, available in device_options():
            combo.addItem(label, key)
            self._deviceAvailable[key] = available
        combo.blockSignals(False)

    def _syncComboBoxes(self) -> None:
        for combo, value in ((self.ui.modelComboBox, self._parameterNode.model),
                             (self.ui.deviceComboBox, self._parameterNode.device)):
            index = combo.findData(value)
            combo.blockSignals(True)
            combo.setCurrentIndex(max(index, 0))
            combo.blockSignals(False)
        self._updateModelDescription()

    def onModelChanged(self, index) -> None:
        if self._parameterNode is None:
            return
        self._parameterNode.model = self.ui.modelComboBox.itemData(index) or "auto"
        self._updateModelDescription()

    def onDeviceChanged(self, index) -> None:
        if self._parameterNode is None:
            return
        device = self.ui.deviceComboBox.itemData(index) or "auto"
        if device != "auto" and not self._deviceAvailable.get(device, False):
            slicer.util.warningDisplay(self.ui.deviceComboBox.itemText(index), windowTitle=_("Device not available"))
            device = "auto"
            self.ui.deviceComboBox.setCurrentIndex(max(self.ui.deviceComboBox.findData(device), 0))
        self._parameterNode.device = device

    def _updateModelDescription(self):
        try:
            card = self.logic.core.selected_card()
        except Exception as exc:  # noqa: BLE001 - shown to the user as the reason
            self.ui.modelDescriptionLabel.text = str(exc)
            self._updateInputRows(None)
            return None
        self.ui.modelDescriptionLabel.text = card.describe()
        self._updateInputRows(card)
        self.logic.core.follow_model_defaults(card)  # sliders show the tuned settings of the model that will run
        return card

    def _updateInputRows(self, card) -> None:
        """Show the slots of the selected model (and filled ones); all of them on request."""
        if card is not None:
            wanted = set(card.input_keys) | {k for sources in card.derivable.values() for k in sources}
        else:
            wanted = set(MODALITY_KEYS)
        showAll = self.ui.showAllInputsCheckBox.checked
        for key in MODALITY_KEYS:
            name = input_parameter_name(key)
            filled = self._parameterNode is not None and self._parameterNode.getValue(name) is not None
            visible = showAll or key in wanted or filled
            getattr(self.ui, f"{name}Label").setVisible(visible)
            getattr(self.ui, f"{name}Selector").setVisible(visible)

    # -- dependencies --------------------------------------------------------------------
    def onInstallDependencies(self) -> bool:
        requirements = paths.requirements_file()
        plan = dependencies.summary(requirements)
        if plan and not slicer.util.confirmOkCancelDisplay(
            _("StrokeSeg will install these Python packages into Slicer (a few minutes, needs internet):") + "\n\n" + plan
            + "\n\n" + _("Slicer's own numpy, SimpleITK and VTK are not changed."), windowTitle=_("Install dependencies")
        ):
            return False
        try:
            with slicer.util.WaitCursor():
                dependencies.install(requirements, log=self._log)
        except dependencies.DependencyError as exc:
            slicer.util.errorDisplay(str(exc), windowTitle=_("Installation failed"))
            return False
        return self._updateDependencyState()

    # -- segmentation --------------------------------------------------------------------
    def onSegmentButton(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self._log(_("Cancelling..."))
            self.ui.segmentButton.enabled = False
            return
        if not dependencies.is_ready(paths.requirements_file()) and not self.onInstallDependencies():
            return
        try:
            job = self.logic.core.create_job()  # voxel copies taken here, on the main thread
        except Exception as exc:  # noqa: BLE001 - StrokeSegError messages are one line for the user
            slicer.util.errorDisplay(str(exc), windowTitle=_("Cannot segment"))
            return
        self._job = job.start()
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.value = 0
        self.ui.logTextEdit.clear()
        self._log(_("Segmenting with {model} on {device}...").format(model=job.model.id, device=job.device))
        self._updateButtons()
        self._pollTimer.start()

    def _pollJob(self) -> None:
        job = self._job
        if job is None:
            self._pollTimer.stop()
            return
        for event in job.poll():
            self.ui.progressBar.value = int(round(100 * event.fraction))
            self._log(f"{100 * event.fraction:3.0f}%  {event.message}")
        if not job.finished:
            return
        self._pollTimer.stop()
        self._job = None
        self.ui.progressBar.setVisible(False)
        if job.cancelled:
            self._log(_("Cancelled."))
        elif job.error:
            if job.details:
                logging.error(job.details)
            self._log(job.error)
            slicer.util.errorDisplay(job.error, windowTitle=_("Segmentation failed"))
        else:
            with slicer.util.tryWithErrorDisplay(_("Could not show the result."), waitCursor=True):
                self.ui.segmentEditorWidget.saveStateForUndo()
                update = self.logic.core.apply_result(job.result)
                self._lastSettings = self._settingsTuple()
                self._recomputeTimer.stop()  # the sliders were set to the result's settings: nothing to redo
                report = self.logic.core.stored_report()
                self._log(_("Done in {seconds:.1f} s: {volume:.2f} mL in {count} lesion(s).").format(
                    seconds=job.finished_at - job.started_at, volume=report.get("total_volume_ml", 0.0),
                    count=report.get("lesion_count", 0)))
                self._reportUpdate(update)
                self._refreshResultViews()
        self._updateButtons()

    def _recompute(self) -> None:
        if not self.logic.core.has_result() or self._job is not None:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not update the lesion mask."), waitCursor=False):
            self.ui.segmentEditorWidget.saveStateForUndo()
            update = self.logic.core.recompute()
            self._reportUpdate(update)
            if update.created:
                self._refreshResultViews()
            self._statisticsTimer.start()
        self._updateButtons()

    def _reportUpdate(self, update) -> None:
        if update.kept_edited:
            segmentation = self._parameterNode.segmentation.GetSegmentation()
            edited = segmentation.GetSegment(update.kept_edited)
            message = _("Your edits in '{edited}' were kept; the new mask is in segment '{new}'.").format(
                edited=edited.GetName() if edited else update.kept_edited,
                new=segmentation.GetSegment(update.segment_id).GetName())
            self.ui.editStatusLabel.text = message
            slicer.util.showStatusMessage(message, 5000)

    def _updateStatistics(self) -> None:
        if self.logic.core.has_result():
            with slicer.util.tryWithErrorDisplay(_("Could not compute the lesion statistics."), waitCursor=False):
                self.logic.core.update_statistics()

    def _refreshResultViews(self) -> None:
        p = self._parameterNode
        if p is None or p.segmentation is None:
            return
        editor = self.ui.segmentEditorWidget
        editor.setSegmentationNode(p.segmentation)
        if hasattr(editor, "setSourceVolumeNode"):
            editor.setSourceVolumeNode(p.referenceVolume)
        else:  # Slicer < 5.2
            editor.setMasterVolumeNode(p.referenceVolume)
        if p.segmentation.GetSegmentation().GetSegment(p.lesionSegmentId) is not None:
            editor.setCurrentSegmentID(p.lesionSegmentId)
        self.ui.summaryTableView.setMRMLTableNode(p.summaryTable)
        self.ui.statisticsTableView.setMRMLTableNode(p.statisticsTable)

    # -- perfusion (raw 4D series) -------------------------------------------------------
    def onPerfusionButton(self) -> None:
        if self._perfusionJob is not None:
            self._perfusionJob.cancel()
            self.ui.perfusionStatusLabel.text = _("Cancelling...")
            self.ui.perfusionButton.enabled = False
            return
        if not dependencies.is_ready(paths.requirements_file()) and not self.onInstallDependencies():
            return
        try:
            job = self.logic.core.perfusion.create_job()  # voxel copies taken here, on the main thread
        except Exception as exc:  # noqa: BLE001 - StrokeSegError messages are one line for the user
            slicer.util.errorDisplay(str(exc), windowTitle=_("Cannot compute perfusion"))
            return
        self._perfusionJob = job.start()
        self.ui.perfusionProgressBar.setVisible(True)
        self.ui.perfusionProgressBar.value = 0
        self.ui.perfusionStatusLabel.text = _("Computing perfusion maps...")
        self._updateButtons()
        self._perfusionPollTimer.start()

    def _pollPerfusionJob(self) -> None:
        job = self._perfusionJob
        if job is None:
            self._perfusionPollTimer.stop()
            return
        for event in job.poll():
            self.ui.perfusionProgressBar.value = int(round(100 * event.fraction))
            self.ui.perfusionStatusLabel.text = event.message
        if not job.finished:
            return
        self._perfusionPollTimer.stop()
        self._perfusionJob = None
        self.ui.perfusionProgressBar.setVisible(False)
        if job.cancelled:
            self.ui.perfusionStatusLabel.text = _("Cancelled.")
        elif job.error:
            if job.details:
                logging.error(job.details)
            self.ui.perfusionStatusLabel.text = job.error
            slicer.util.errorDisplay(job.error, windowTitle=_("Perfusion failed"))
        else:
            with slicer.util.tryWithErrorDisplay(_("Could not show the perfusion result."), waitCursor=True):
                series = slicer.mrmlScene.GetNodeByID(job.series_node_id)
                report = self.logic.core.perfusion.apply_result(job.result, series)
                self._log(_("Perfusion done in {seconds:.1f} s").format(seconds=job.finished_at - job.started_at))
                self._showPerfusionSummary(report)
                self._refreshPerfusionViews()
        self._updateButtons()

    def _showPerfusionSummary(self, report) -> None:
        from strokeseg.perfusion.decision import formatted_volumes

        f = formatted_volumes(report)
        self.ui.perfusionStatusLabel.text = _(
            "Core {core}, penumbra {penumbra}, mismatch {mismatch} (ratio {ratio}), HIR {hir}. Research use only.").format(
            core=f["core"], penumbra=f["penumbra"], mismatch=f["mismatch"], ratio=f["ratio"], hir=f["hir"])

    def _refreshPerfusionViews(self) -> None:
        p = self._parameterNode
        if p is None:
            return
        self.ui.perfusionTableView.setMRMLTableNode(p.perfusionTable)
        self._observePerfusionSegmentation(p.perfusionSegmentation)

    def _observePerfusionSegmentation(self, node) -> None:
        """Statistics follow edits of the core and penumbra segments (after the editing rests)."""
        if node is self._observedPerfusionSegmentation:
            return
        if self._observedPerfusionSegmentation is not None:
            self.removeObserver(self._observedPerfusionSegmentation, slicer.vtkSegmentation.SegmentModified,
                                self._onPerfusionSegmentModified)
        self._observedPerfusionSegmentation = node
        if node is not None:
            self.addObserver(node, slicer.vtkSegmentation.SegmentModified, self._onPerfusionSegmentModified)

    def _onPerfusionSegmentModified(self, caller=None, event=None) -> None:
        if self._perfusionJob is None:
            self._perfusionStatisticsTimer.start()

    def _updatePerfusionStatistics(self) -> None:
        if self.logic is not None and self.logic.core.perfusion.has_result():
            with slicer.util.tryWithErrorDisplay(_("Could not compute the perfusion statistics."), waitCursor=False):
                self._showPerfusionSummary(self.logic.core.perfusion.update_statistics())

    def onPerfusionExport(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            folder = self._parameterNode.exportDirectory
            if str(folder) in ("", "."):
                raise ValueError(_("Choose an export folder first (Export section)."))
            written = self.logic.core.perfusion.export(folder / "perfusion")
            self._log(_("Exported: ") + ", ".join(str(p) for p in written.values()))
            slicer.util.showStatusMessage(_("Perfusion results exported to {folder}").format(folder=folder / "perfusion"),
                                          5000)

    def onUndo(self) -> None:
        self._restoreHistory(self.logic.core.undo)

    def onRedo(self) -> None:
        self._restoreHistory(self.logic.core.redo)

    def _restoreHistory(self, step) -> None:
        if self.logic.core.has_result() and step():
            # The sliders moved back with the mask: not a slider move, nothing to recompute.
            self._lastSettings = self._settingsTuple()
            self._recomputeTimer.stop()
            self._refreshResultViews()
        self._updateButtons()

    def onExport(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Export failed."), waitCursor=True):
            written = self.logic.core.export()
            self._log(_("Exported: ") + ", ".join(str(p) for p in written.values()))
            slicer.util.showStatusMessage(_("Results exported to {folder}").format(
                folder=self._parameterNode.exportDirectory), 5000)

    def _updateButtons(self) -> None:
        running = self._job is not None
        hasResult = self.logic is not None and self.logic.core.has_result()
        self.ui.segmentButton.text = _("Cancel") if running else _("Segment")
        self.ui.segmentButton.enabled = True
        for widget in (self.ui.inputsCollapsibleButton, self.ui.modelCollapsibleButton):
            widget.enabled = not running
        self.ui.refineCollapsibleButton.enabled = hasResult and not running
        self.ui.exportCollapsibleButton.enabled = hasResult and not running
        canUndo = canRedo = False
        if hasResult and not running:
            try:
                mask = self.logic.core.lesion_mask()
                canUndo, canRedo = mask.can_undo(), mask.can_redo()
            except Exception as exc:  # noqa: BLE001 - e.g. the probability volume was replaced by hand
                self.ui.editStatusLabel.text = str(exc)
        self.ui.undoButton.enabled = canUndo
        self.ui.redoButton.enabled = canRedo
        perfusionRunning = self._perfusionJob is not None
        self.ui.perfusionButton.text = _("Cancel") if perfusionRunning else _("Compute perfusion")
        self.ui.perfusionButton.enabled = True
        hasPerfusion = self.logic is not None and self.logic.core.perfusion.has_result()
        self.ui.perfusionExportButton.enabled = hasPerfusion and not perfusionRunning
        for widget in (self.ui.perfusionSeriesSelector, self.ui.perfusionKindComboBox, self.ui.perfusionTeSpinBox,
                       self.ui.perfusionAifSelector, self.ui.perfusionThresholdsGroupBox):
            widget.enabled = not perfusionRunning

    def _log(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)
        logging.info(f"StrokeSeg: {text}")


#
# StrokeSegLogic
#


class StrokeSegLogic(ScriptedLoadableModuleLogic):
    """Slicer's module logic; the work is done by ``StrokeSegLib.logic.StrokeSegLogic`` (``self.core``)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        from StrokeSegLib.logic import StrokeSegLogic as CoreLogic
        from StrokeSegLib.terminology import CONTEXT_NAME

        self.core = CoreLogic(slicer.mrmlScene, file_for_instance=_fileForInstance)
        terminologies = slicer.modules.terminologies.logic()
        names = vtk.vtkStringArray()
        terminologies.GetLoadedTerminologyNames(names)
        if CONTEXT_NAME not in [names.GetValue(i) for i in range(names.GetNumberOfValues())]:
            terminologies.LoadTerminologyFromFile(str(paths.resources_dir() / "Terminology" / "StrokeSeg.term.json"))

    def getParameterNode(self):
        return StrokeSegParameterNode(super().getParameterNode())


#
# StrokeSegTest
#


class StrokeSegTest(ScriptedLoadableModuleTest):
    """Self-test users run inside Slicer: sample data -> segment -> lesion volume -> export, then a
    CT perfusion phantom -> Sequence -> perfusion maps, core/penumbra and volumes against its truth."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentSampleAndExport()
        self.setUp()
        self.test_PerfusionPhantom()

    def test_SegmentSampleAndExport(self):
        import tempfile

        import numpy as np

        self.delayDisplay("Checking dependencies")
        if not dependencies.is_ready(paths.requirements_file()):
            dependencies.install(paths.requirements_file(), log=self.delayDisplay)
        if not paths.has_bundled_models():
            self.skipTest("no bundled models (Resources/Models/models.json missing)")

        from strokeseg.io import read_image
        from strokeseg.metrics import case_metrics
        from StrokeSegLib.sampledata import SAMPLES, load_sample, truth_file
        from StrokeSegLib.segmentation import read_mask

        self.delayDisplay("Generating and loading the phantom sample (first time ~20 s)")
        sample = SAMPLES[0]
        nodes = load_sample(sample, sampleCacheDirectory(),
                            lambda path, name: slicer.util.loadVolume(str(path), {"name": name}))
        logic = StrokeSegLogic()
        core = logic.core
        found = core.detect_inputs(overwrite=True)
        self.assertEqual(core.input_nodes()["dwi"].GetID(), nodes["dwi"].GetID(), [(d.name, d.key) for d in found])

        self.delayDisplay("Segmenting")
        result = core.segment(device="cpu")
        params = core.params
        mask = read_mask(params.segmentation, params.lesionSegmentId, params.referenceVolume)
        np.testing.assert_array_equal(mask, result.mask.array)
        truth = read_image(truth_file(sample, sampleCacheDirectory())).array > 0
        score = case_metrics(mask > 0, truth, result.mask.spacing)["dice"]
        volume = core.stored_report()["total_volume_ml"]
        truthVolume = truth.sum() * result.mask.voxel_volume_ml
        self.delayDisplay(f"Lesion {volume:.2f} mL (truth {truthVolume:.2f} mL), Dice {score:.3f}")
        self.assertGreater(score, 0.5)
        self.assertLess(abs(volume - truthVolume), 0.5 * truthVolume)

        self.delayDisplay("Moving the threshold")
        params.threshold = 0.9
        update = core.recompute()
        self.assertLessEqual(update.voxels, int(mask.sum()))

        self.delayDisplay("Exporting")
        with tempfile.TemporaryDirectory() as folder:
            written = core.export(folder)
            for key in ("mask", "probability", "segmentation", "report_json", "report_csv"):
                self.assertTrue(written[key].is_file(), key)
            exported = read_image(written["mask"]).array
            np.testing.assert_array_equal(exported, read_mask(params.segmentation, params.lesionSegmentId,
                                                              params.referenceVolume))
        self.delayDisplay("Test passed")

    def test_PerfusionPhantom(self):
        import tempfile

        self.delayDisplay("Checking dependencies")
        if not dependencies.is_ready(paths.requirements_file()):
            dependencies.install(paths.requirements_file(), log=self.delayDisplay)

        # The steps (phantom, checks) are StrokeSegLib.selftest's, which CI runs headless on the same
        # phantom; here the series goes through Slicer's own Sequences reader.
        from StrokeSegLib.selftest import run_perfusion_selftest

        def loadSequence(path, name):
            return slicer.util.loadSequence(str(path), {"name": name, "show": False})

        logic = StrokeSegLogic()
        with tempfile.TemporaryDirectory() as folder:
            figures = run_perfusion_selftest(slicer.mrmlScene, folder, loadSequence, logic=logic.core,
                                             log=self.delayDisplay)
        self.delayDisplay(f"Core {figures['core_ml']:.1f} mL (truth {figures['truth_core_ml']:.1f} mL), hypoperfused "
                          f"{figures['hypoperfusion_ml']:.1f} mL (truth {figures['truth_hypoperfusion_ml']:.1f} mL)")
        slicer.util.setSliceViewerLayers(background=logic.core.params.perfusionTmax, fit=True)
        self.delayDisplay("Test passed")
