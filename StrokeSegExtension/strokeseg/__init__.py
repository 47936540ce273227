"""StrokeSeg engine: ischaemic stroke lesion segmentation without Slicer or Qt.

Layers below the Slicer module: io, modality, models, preprocess, inference,
postprocess, report, metrics, phantom, cli. Nothing here imports slicer or qt.
"""

__version__ = "0.1.0"
