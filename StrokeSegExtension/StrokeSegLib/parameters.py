"""The module's settings: one spec, stored in the singleton parameter node of the scene.

The widget binds these with ``slicer.parameterNodeWrapper`` (built from :data:`PARAMETERS`
in ``StrokeSeg.py``); this module reads and writes the very same ``vtkMRMLScriptedModuleNode``
values without Qt, using the wrapper's serialisation (numbers as ``str(value)``, booleans as
``"True"``/``"False"``, nodes as a node reference plus an empty parameter of the same name),
so the logic, the GUI and a scene saved to ``.mrb`` all agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strokeseg.modality import FOUR_D_KEYS, MODALITY_KEYS

MODULE_NAME = "StrokeSeg"

VOLUME_CLASS = "vtkMRMLScalarVolumeNode"
SEQUENCE_CLASS = "vtkMRMLSequenceNode"
DEVICES = ("auto", "cpu", "cuda", "mps")
PERFUSION_KINDS = ("auto", "ct", "mr")
# An arterial input given by hand: a point (markups, inside Slicer) or a mask (label map, segmentation).
AIF_CLASSES = ("vtkMRMLMarkupsFiducialNode", "vtkMRMLLabelMapVolumeNode", "vtkMRMLSegmentationNode")
MAP_KEYS = ("cbf", "cbv", "mtt", "tmax", "ttp")
# Threshold parameter -> (strokeseg.perfusion.Thresholds field, default).
PERFUSION_THRESHOLDS = {
    "perfusionCoreRcbf": "core_rcbf",
    "perfusionAdcCore": "adc_core",
    "perfusionTmaxS": "tmax_hypo_s",
    "perfusionTmaxSevereS": "tmax_severe_s",
    "perfusionMinCoreMl": "min_core_ml",
    "perfusionMinHypoMl": "min_hypo_ml",
}
PERFUSION_THRESHOLD_DEFAULTS = {"core_rcbf": 0.30, "adc_core": 620.0, "tmax_hypo_s": 6.0, "tmax_severe_s": 10.0,
                                "min_core_ml": 0.5, "min_hypo_ml": 1.0}


def map_parameter_name(key: str) -> str:
    """``tmax`` -> ``perfusionTmax``: the parameter holding a computed perfusion map."""
    return "perfusion" + key[:1].upper() + key[1:]


@dataclass(frozen=True)
class Parameter:
    name: str
    kind: str  # "node", "float", "bool", "str" or "path"
    default: Any = None
    node_classes: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    doc: str = ""


def input_parameter_name(key: str) -> str:
    """``dwi`` -> ``inputDwi``: the parameter holding the volume of a modality slot."""
    return "input" + key[:1].upper() + key[1:]


def _input_parameters() -> list[Parameter]:
    params = []
    for key in MODALITY_KEYS:
        classes = (SEQUENCE_CLASS, VOLUME_CLASS) if key in FOUR_D_KEYS else (VOLUME_CLASS,)
        params.append(Parameter(input_parameter_name(key), "node", None, classes, doc=f"input volume for '{key}'"))
    return params


def _perfusion_parameters() -> list[Parameter]:
    """Settings of the raw-4D perfusion pipeline and its results. The threshold defaults are those of
    ``strokeseg.perfusion.Thresholds``, written out because this module must import without the
    engine's dependencies (SciPy, cc3d); a test checks that they agree."""
    th = PERFUSION_THRESHOLD_DEFAULTS
    return [
        Parameter("perfusionSeries", "node", None, (SEQUENCE_CLASS, VOLUME_CLASS), doc="4D CT/MR perfusion series"),
        Parameter("perfusionKind", "str", "auto", choices=PERFUSION_KINDS, doc="CT perfusion, DSC-MR or from the data"),
        Parameter("perfusionTeMs", "float", 0.0, minimum=0.0, maximum=200.0, doc="MR echo time in ms (0: from the header)"),
        Parameter("perfusionAif", "node", None, AIF_CLASSES, doc="arterial input by hand: point or mask (empty: automatic)"),
        Parameter("perfusionUseAdc", "bool", True, doc="MR: core from the ADC slot when it is filled"),
        Parameter("perfusionMotionCorrection", "bool", True, doc="register the frames before the analysis"),
        Parameter("perfusionCoreRcbf", "float", th["core_rcbf"], minimum=0.0, maximum=1.0,
                  doc="CT core: CBF below this fraction of the healthy hemisphere"),
        Parameter("perfusionAdcCore", "float", th["adc_core"], minimum=0.0, maximum=3000.0,
                  doc="MR core: ADC below this (10^-6 mm^2/s)"),
        Parameter("perfusionTmaxS", "float", th["tmax_hypo_s"], minimum=0.0, maximum=30.0, doc="hypoperfusion: Tmax above this (s)"),
        Parameter("perfusionTmaxSevereS", "float", th["tmax_severe_s"], minimum=0.0, maximum=30.0,
                  doc="HIR numerator: Tmax above this (s)"),
        Parameter("perfusionMinCoreMl", "float", th["min_core_ml"], minimum=0.0, maximum=50.0, doc="smallest core component (mL)"),
        Parameter("perfusionMinHypoMl", "float", th["min_hypo_ml"], minimum=0.0, maximum=50.0,
                  doc="smallest hypoperfused component (mL)"),
        *[Parameter(map_parameter_name(k), "node", None, (VOLUME_CLASS,), doc=f"computed {k.upper()} map") for k in MAP_KEYS],
        Parameter("perfusionSegmentation", "node", None, ("vtkMRMLSegmentationNode",), doc="core and penumbra"),
        Parameter("perfusionTable", "node", None, ("vtkMRMLTableNode",), doc="core, penumbra, mismatch, HIR"),
        Parameter("perfusionReport", "node", None, ("vtkMRMLTextNode",), doc="perfusion report (JSON)"),
    ]


PARAMETERS: tuple[Parameter, ...] = (
    *_input_parameters(),
    Parameter("autoDetectInputs", "bool", True, doc="fill empty input slots from modality detection"),
    Parameter("model", "str", "auto", doc="'auto' or a bundled model id"),
    Parameter("device", "str", "auto", choices=DEVICES, doc="inference device"),
    Parameter("threshold", "float", 0.5, minimum=0.01, maximum=0.99, doc="probability threshold"),
    Parameter("closingMm", "float", 0.0, minimum=0.0, maximum=10.0, doc="closing radius (mm)"),
    Parameter("minLesionMl", "float", 0.0, minimum=0.0, maximum=20.0, doc="minimum lesion volume (mL)"),
    Parameter("fillHoles", "bool", True, doc="fill enclosed holes of lesions"),
    Parameter("settingsFromModel", "str", "", doc="model whose tuned post-processing the sliders were last set to"),
    Parameter("probabilityOpacity", "float", 0.5, minimum=0.0, maximum=1.0, doc="probability overlay opacity"),
    Parameter("referenceVolume", "node", None, (VOLUME_CLASS,), doc="grid of the current result"),
    Parameter("probabilityVolume", "node", None, (VOLUME_CLASS,), doc="lesion probability map (0..1)"),
    Parameter("segmentation", "node", None, ("vtkMRMLSegmentationNode",), doc="lesion segmentation"),
    Parameter("lesionSegmentId", "str", "", doc="segment the sliders write to"),
    Parameter("protectedSegmentIds", "str", "", doc="segments kept because the user edited them"),
    Parameter("statisticsTable", "node", None, ("vtkMRMLTableNode",), doc="per-lesion statistics"),
    Parameter("summaryTable", "node", None, ("vtkMRMLTableNode",), doc="volumes, counts, mismatch"),
    Parameter("report", "node", None, ("vtkMRMLTextNode",), doc="full report (JSON)"),
    Parameter("exportDirectory", "path", Path(""), doc="folder for exported results"),
    Parameter("exportDicomSeg", "bool", True, doc="also write DICOM SEG when the reference came from DICOM"),
    *_perfusion_parameters(),
)
PARAMETERS_BY_NAME = {p.name: p for p in PARAMETERS}


def find_parameter_node(scene: Any):
    """The module's singleton parameter node, or None (same lookup as ScriptedLoadableModuleLogic)."""
    return scene.GetSingletonNode(MODULE_NAME, "vtkMRMLScriptedModuleNode")


def get_parameter_node(scene: Any):
    """The module's parameter node, created with every default when missing."""
    node = find_parameter_node(scene)
    if node is None:
        node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)
        node.SetSingletonTag(MODULE_NAME)
        node.SetAttribute("ModuleName", MODULE_NAME)
        node.SetName(scene.GenerateUniqueName(MODULE_NAME))
        node = scene.AddNode(node)
    params = StrokeSegParameters(node)
    params.fill_defaults()
    return node


class StrokeSegParameters:
    """Typed attribute access to the parameter node: ``params.threshold = 0.4``."""

    def __init__(self, node: Any) -> None:
        object.__setattr__(self, "node", node)

    # -- one value -----------------------------------------------------------------------
    def get(self, name: str) -> Any:
        p = _spec(name)
        node = self.node
        if p.kind == "node":
            return node.GetNodeReference(p.name)
        if not node.HasParameter(p.name):
            return p.default
        text = node.GetParameter(p.name)
        if p.kind == "float":
            try:
                return float(text)
            except ValueError:
                return p.default
        if p.kind == "bool":
            return text == "True"
        if p.kind == "path":
            return Path(text)
        return text

    def set(self, name: str, value: Any) -> None:
        p = _spec(name)
        node = self.node
        if p.kind == "node":
            node.SetParameter(p.name, "")
            node.SetNodeReferenceID(p.name, value.GetID() if value is not None else None)
            return
        if p.kind == "float":
            value = float(value)
            if p.minimum is not None and value < p.minimum or p.maximum is not None and value > p.maximum:
                raise ValueError(f"{p.name} must be within [{p.minimum}, {p.maximum}], got {value}")
            node.SetParameter(p.name, str(value))
        elif p.kind == "bool":
            node.SetParameter(p.name, "True" if value else "False")
        elif p.kind == "str" and p.choices and value not in p.choices:
            raise ValueError(f"{p.name} must be one of {', '.join(p.choices)}, got {value!r}")
        else:
            node.SetParameter(p.name, str(value))

    def fill_defaults(self) -> None:
        """Write the default of every parameter that is not in the node yet (as the wrapper does)."""
        was = self.node.StartModify()
        try:
            for p in PARAMETERS:
                if not self.node.HasParameter(p.name):
                    self.set(p.name, p.default)
        finally:
            self.node.EndModify(was)

    # -- attribute sugar -----------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name in PARAMETERS_BY_NAME:
            return self.get(name)
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in PARAMETERS_BY_NAME:
            raise AttributeError(f"unknown StrokeSeg parameter '{name}'")
        self.set(name, value)

    # -- lists kept as comma-separated strings -------------------------------------------
    def protected_segments(self) -> list[str]:
        return [s for s in self.protectedSegmentIds.split(",") if s]

    def add_protected_segment(self, segment_id: str) -> None:
        ids = self.protected_segments()
        if segment_id not in ids:
            self.protectedSegmentIds = ",".join([*ids, segment_id])


def _spec(name: str) -> Parameter:
    try:
        return PARAMETERS_BY_NAME[name]
    except KeyError:
        raise AttributeError(f"unknown StrokeSeg parameter '{name}'") from None
