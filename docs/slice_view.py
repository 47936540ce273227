"""Slicer's own slice pipeline, headless, for the docs figures (make_slicer_overlay.py, make_slicer_perfusion.py)."""

from __future__ import annotations

import numpy as np


def axial_view(ctx, size: int):
    """A slice logic with one axial "Red" slice node of ``size`` x ``size`` pixels in the context's scene."""
    import slicer

    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLApplicationLogic(ctx.app_logic)
    logic.SetMRMLScene(ctx.scene)
    node = logic.AddSliceNode("Red")
    node.SetOrientation("Axial")
    node.SetDimensions(size, size, 1)
    return logic


def view_rgba(logic, offset: float) -> np.ndarray:
    """The blended view at this offset (mm along the slice normal), rows top to bottom."""
    from vtk.util import numpy_support

    logic.SetSliceOffset(offset)
    logic.UpdatePipeline()
    producer = logic.GetImageDataConnection().GetProducer()
    producer.Update()
    image = producer.GetOutputDataObject(0)
    nx, ny, _ = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(ny, nx, -1)[::-1].copy()
