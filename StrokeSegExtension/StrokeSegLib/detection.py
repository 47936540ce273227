"""Which scan in the scene is which modality, and which slot each one fills.

Every scalar volume and every 4D series of the scene goes through the engine's
:func:`strokeseg.modality.detect_modality` (its name, DICOM attributes and intensities). The
most confident volume per modality key fills the key's input slot; a volume fills at most one
slot, and slots the user filled are left alone unless asked. StrokeSeg's own outputs (tagged
with the ``StrokeSeg.Output`` attribute) and label maps are skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from strokeseg.errors import StrokeSegError
from strokeseg.modality import ACCEPT, MODALITY_KEYS, detect_modality

from .parameters import StrokeSegParameters, input_parameter_name
from .volumes import image_from_node, sequence_for_proxy

OUTPUT_ATTRIBUTE = "StrokeSeg.Output"


@dataclass
class VolumeDetection:
    node: Any
    key: str | None
    confidence: float
    reason: str

    @property
    def name(self) -> str:
        return self.node.GetName() or ""


def candidate_nodes(scene: Any) -> list[Any]:
    """Scalar volumes (not label maps, not our outputs, not sequence proxies) and sequences of volumes."""
    nodes = []
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
        if node.IsA("vtkMRMLLabelMapVolumeNode") or node.GetAttribute(OUTPUT_ATTRIBUTE):
            continue
        if node.GetImageData() is None or node.GetHideFromEditors():
            continue
        if sequence_for_proxy(scene, node) is not None:
            continue  # the sequence itself is the candidate
        nodes.append(node)
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSequenceNode")):
        sequence = scene.GetNthNodeByClass(i, "vtkMRMLSequenceNode")
        if sequence.GetNumberOfDataNodes() > 1 and sequence.GetDataNodeClassName() == "vtkMRMLScalarVolumeNode":
            nodes.append(sequence)
    return nodes


def detect_node(scene: Any, node: Any, file_for_instance: Callable[[str], str] | None = None) -> VolumeDetection:
    try:
        image = image_from_node(scene, node, file_for_instance=file_for_instance, preview=True)
    except StrokeSegError as exc:
        return VolumeDetection(node, None, 0.0, f"not usable: {exc}")
    found = detect_modality(image, node.GetName() or "")
    return VolumeDetection(node, found.key, float(found.confidence), found.reason)


def detect_scene(scene: Any, file_for_instance: Callable[[str], str] | None = None) -> list[VolumeDetection]:
    return [detect_node(scene, node, file_for_instance) for node in candidate_nodes(scene)]


def assign(detections: Iterable[VolumeDetection]) -> dict[str, Any]:
    """Key -> node: the most confident detection per key (>= ACCEPT), each node used once."""
    ranked = sorted((d for d in detections if d.key and d.confidence >= ACCEPT), key=lambda d: -d.confidence)
    out: dict[str, Any] = {}
    used: set[str] = set()
    for d in ranked:
        if d.key in out or d.node.GetID() in used:
            continue
        out[d.key] = d.node
        used.add(d.node.GetID())
    return out


def fill_inputs(params: StrokeSegParameters, detections: Iterable[VolumeDetection], overwrite: bool = False) -> dict[str, Any]:
    """Put detected volumes into the input slots (empty ones only unless ``overwrite``); returns what was set."""
    chosen = assign(detections)
    taken = {params.get(input_parameter_name(k)).GetID() for k in MODALITY_KEYS
             if params.get(input_parameter_name(k)) is not None}
    changed: dict[str, Any] = {}
    for key, node in chosen.items():
        name = input_parameter_name(key)
        current = params.get(name)
        if current is not None and not overwrite:
            continue
        if node.GetID() in taken and (current is None or current.GetID() != node.GetID()) and not overwrite:
            continue  # already the user's choice for another slot
        if current is None or current.GetID() != node.GetID():
            params.set(name, node)
            changed[key] = node
    return changed


def input_nodes(params: StrokeSegParameters) -> dict[str, Any]:
    """Key -> node of the filled input slots."""
    return {k: params.get(input_parameter_name(k)) for k in MODALITY_KEYS if params.get(input_parameter_name(k)) is not None}
