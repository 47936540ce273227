"""StrokeSeg's Slicer logic: MRML nodes <-> engine images, display, segments, statistics, export.

Imports ``slicer``, ``vtk`` and the ``strokeseg`` engine, never Qt, so that everything except
the widget runs headless (PyPI ``slicer-core``) and is tested in CI. The package itself imports
nothing heavy: ``StrokeSegLib.dependencies`` must work before PyTorch and the other engine
dependencies are installed, so import the submodules you need (``StrokeSegLib.logic`` ...).
"""
