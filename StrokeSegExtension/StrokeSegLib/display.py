"""How results look: probability map as a coloured foreground over the reference volume.

The probability volume gets a red-to-yellow colour table on a fixed 0..1 window and a display threshold
(voxels below :data:`DISPLAY_FLOOR` are transparent, so the scan shows through where the
model sees nothing); every slice view shows the reference volume as background and the
probability map as foreground at the chosen opacity (what ``slicer.util.setSliceViewerLayers``
does in the application, done here on the slice composite nodes so it works headless too).
"""

from __future__ import annotations

from typing import Any

import numpy as np

DISPLAY_FLOOR = 0.05
COLOR_TABLE_NAME = "StrokeSeg lesion probability"
COLOR_TABLE_ATTRIBUTE = "StrokeSeg.ColorTable"
# Dark red -> red -> orange -> yellow: stands out on grey scans, and unlike heat maps that end in
# white, a certain lesion never looks like bright DWI signal.
_COLOR_STOPS = ((0.0, (0.45, 0.0, 0.0)), (0.4, (0.95, 0.1, 0.0)), (0.75, (1.0, 0.6, 0.0)), (1.0, (1.0, 1.0, 0.25)))


def probability_color_node(scene: Any) -> Any:
    """The module's probability colour table (created once per scene, saved with it)."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode")
        if node.GetAttribute(COLOR_TABLE_ATTRIBUTE):
            return node
    node = scene.CreateNodeByClass("vtkMRMLColorTableNode")
    node.UnRegister(None)
    node.SetName(COLOR_TABLE_NAME)
    node.SetAttribute(COLOR_TABLE_ATTRIBUTE, "probability")
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    positions = [p for p, _ in _COLOR_STOPS]
    for i in range(256):
        t = i / 255.0
        r, g, b = (float(np.interp(t, positions, [c[k] for _, c in _COLOR_STOPS])) for k in range(3))
        node.SetColor(i, f"p{t:.3f}", r, g, b, 1.0)
    return scene.AddNode(node)


def style_probability(scene: Any, probability_node: Any) -> None:
    display = probability_node.GetDisplayNode()
    if display is None:
        probability_node.CreateDefaultDisplayNodes()
        display = probability_node.GetDisplayNode()
    display.SetAndObserveColorNodeID(probability_color_node(scene).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.SetApplyThreshold(True)
    display.SetLowerThreshold(DISPLAY_FLOOR)
    display.SetUpperThreshold(1.0)
    display.SetInterpolate(True)


def show_in_slice_views(scene: Any, background: Any, foreground: Any = None, opacity: float = 0.5) -> None:
    """Background/foreground volumes and foreground opacity in every slice view of the scene."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        composite.SetBackgroundVolumeID(background.GetID() if background is not None else None)
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetForegroundOpacity(float(opacity))


def set_probability_opacity(scene: Any, probability_node: Any, opacity: float) -> None:
    """Change the foreground opacity of the views that show the probability map."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        if probability_node is not None and composite.GetForegroundVolumeID() == probability_node.GetID():
            composite.SetForegroundOpacity(float(opacity))


def style_segmentation(segmentation_node: Any) -> None:
    """Outlined, lightly filled segments in 2D so the probability map stays readable under them."""
    display = segmentation_node.GetDisplayNode()
    if display is None:
        segmentation_node.CreateDefaultDisplayNodes()
        display = segmentation_node.GetDisplayNode()
    display.SetVisibility2DFill(True)
    display.SetVisibility2DOutline(True)
    display.SetOpacity2DFill(0.25)
    display.SetOpacity2DOutline(1.0)


# -- perfusion maps ------------------------------------------------------------------------------
# Slicer's built-in colour nodes, as perfusion software shows the maps: a PET-style rainbow on
# black for flow and volume (low = dark, so a core reads as a hole) and for the times too (long =
# red, so delay stands out; Slicer's "Rainbow" table runs the other way, red = low, and would paint
# the 0 s background red). Fixed physiological windows, so maps of different patients
# look alike: healthy grey matter CBF ~50-60 mL/100g/min, CBV ~4-5 mL/100g, MTT ~4 s, Tmax < 2 s
# (hypoperfusion from 6 s, severe from 10 s). TTP depends on the injection, so its window comes
# from the data. (colour node ids in preference order, window minimum, window maximum)
MAP_DISPLAY = {
    "cbf": (("vtkMRMLPETProceduralColorNodePET-Rainbow2", "vtkMRMLColorTableNodeRainbow"), 0.0, 60.0),
    "cbv": (("vtkMRMLPETProceduralColorNodePET-Rainbow2", "vtkMRMLColorTableNodeRainbow"), 0.0, 6.0),
    "mtt": (("vtkMRMLPETProceduralColorNodePET-Rainbow2", "vtkMRMLColorTableNodeRainbow"), 0.0, 12.0),
    "tmax": (("vtkMRMLPETProceduralColorNodePET-Rainbow2", "vtkMRMLColorTableNodeRainbow"), 0.0, 12.0),
    "ttp": (("vtkMRMLPETProceduralColorNodePET-Rainbow2", "vtkMRMLColorTableNodeRainbow"), None, None),
}


def style_perfusion_map(scene: Any, node: Any, key: str) -> tuple[float, float]:
    """Colour map and window of a perfusion map volume; returns the (min, max) window."""
    colors, lo, hi = MAP_DISPLAY[key]
    display = node.GetDisplayNode()
    if display is None:
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
    color = next((scene.GetNodeByID(c) for c in colors if scene.GetNodeByID(c) is not None), None)
    if color is not None:
        display.SetAndObserveColorNodeID(color.GetID())
    if lo is None or hi is None:
        import slicer

        values = slicer.util.arrayFromVolume(node)
        inside = values[values > 0]
        lo, hi = (float(np.percentile(inside, 2)), float(np.percentile(inside, 98))) if inside.size else (0.0, 1.0)
        hi = max(hi, lo + 1e-3)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(float(lo), float(hi))
    display.SetInterpolate(False)  # voxels as computed: the maps are read value by value
    return float(lo), float(hi)
