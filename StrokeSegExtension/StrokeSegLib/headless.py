"""A Slicer scene without the application: MRML, logics and file I/O from PyPI ``slicer-core``.

Inside Slicer the application owns the scene and the module logics; outside it (tests, batch
scripts run with plain Python) :func:`create_context` builds the same pieces the application
would: the scene, ``vtkSlicerApplicationLogic`` with the default colour nodes, the Colors,
Volumes, Segmentations and Sequences logics registered under their module names, and the
remote-IO/cache manager that ``.mrb`` reading needs. Files are read and written through
Slicer's logics and storage nodes, never through ``slicer.util.load*``/``save*`` (those need
the Qt application).
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import slicer
import vtk

from strokeseg.errors import InputError, OutputError


@dataclass
class SlicerContext:
    scene: Any
    app_logic: Any
    volumes_logic: Any
    segmentations_logic: Any
    _keep: list = field(default_factory=list, repr=False)  # logics that must outlive the scene users
    sequences_logic: Any = None

    # -- loading -------------------------------------------------------------------------
    def load_volume(self, path: str | Path, name: str | None = None):
        """A scalar volume node read by the Volumes logic (NIfTI, NRRD, MHA, ...)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "file not found")
        node = self.volumes_logic.AddArchetypeVolume(str(path), name or _node_name(path), 0, None)
        if node is None:
            raise InputError(path, "Slicer's volumes logic could not read this file")
        return node

    def load_sequence(self, path: str | Path, name: str | None = None, *, browse: bool = True):
        """A Sequence node read by the Sequences logic (``.seq.nrrd``: a 4D series), with a browser
        and its proxy volume as Slicer's Sequences reader sets them up when ``browse``."""
        path = Path(path)
        if not path.is_file():
            raise InputError(path, "file not found")
        sequence = self.sequences_logic.AddSequence(str(path))
        if sequence is None or sequence.GetNumberOfDataNodes() == 0:
            raise InputError(path, "Slicer's sequences logic could not read this file")
        if name:
            sequence.SetName(name)
        if browse:
            browser = self.scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode",
                                                   self.scene.GenerateUniqueName(f"{sequence.GetName()} browser"))
            browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
            self.sequences_logic.UpdateProxyNodesFromSequences(browser)
        return sequence

    def load_dicom_series(self, files: Sequence[str | Path], name: str | None = None):
        """A scalar volume node from the files of one DICOM series (see :func:`load_dicom_series`)."""
        return load_dicom_series(self.volumes_logic, files, name)

    def load_segmentation(self, path: str | Path, name: str | None = None):
        path = Path(path)
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or _node_name(path))
        storage = slicer.vtkMRMLSegmentationStorageNode()
        storage.SetFileName(str(path))
        if not storage.ReadData(node):
            self.scene.RemoveNode(node)
            raise InputError(path, "not a readable segmentation")
        node.CreateDefaultDisplayNodes()
        return node

    # -- scenes --------------------------------------------------------------------------
    def save_mrb(self, path: str | Path) -> Path:
        """Write the scene as a Slicer data bundle (``vtkMRMLScene::WriteToMRB``)."""
        path = Path(path).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.scene.SetRootDirectory(str(path.parent))
        with _keep_working_directory():
            ok = self.scene.WriteToMRB(str(path))
        if not ok:
            raise OutputError(f"{path}: could not write the scene bundle")
        return path

    def load_mrb(self, path: str | Path, clear: bool = True) -> None:
        path = Path(path).resolve()
        if not zipfile.is_zipfile(path):
            raise InputError(path, "not a readable Slicer scene bundle (not a zip archive)")
        with _keep_working_directory():
            ok = self.scene.ReadFromMRB(str(path), clear)
        if not ok:
            raise InputError(path, "not a readable Slicer scene bundle")


def write_sequence(sequence: Any, path: str | Path) -> Path:
    """A Sequence node of volumes as a ``.seq.nrrd`` file (Slicer's volume sequence storage node)."""
    path = Path(path)
    storage = slicer.vtkMRMLVolumeSequenceStorageNode()
    storage.SetFileName(str(path))
    if not storage.WriteData(sequence):
        raise OutputError(f"{path}: the sequence could not be written")
    return path


def load_dicom_series(volumes_logic: Any, files: Sequence[str | Path], name: str | None = None):
    """A scalar volume from the files of one DICOM series, loaded as Slicer's DICOM plugin does.

    Slices sorted along the slice normal, read by the volumes logic's archetype reader with the
    file list (kept by the storage node), and the ``DICOM.instanceUIDs`` attribute set like
    ``DICOMScalarVolumePlugin`` sets it, so DICOM SEG export finds the source instances.
    """
    import pydicom

    files = [str(f) for f in files]
    if not files:
        raise InputError(None, "no DICOM files given")
    try:
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise InputError(files[0], f"not a readable DICOM series ({exc})") from None
    files, headers = _sort_slices(files, headers)
    file_list = vtk.vtkStringArray()
    for f in files:
        file_list.InsertNextValue(f)
    series_name = name or str(getattr(headers[0], "SeriesDescription", "") or "DICOM series")
    node = volumes_logic.AddArchetypeScalarVolume(files[0], series_name, 0, file_list)
    if node is None:
        raise InputError(files[0], "Slicer's volumes logic could not read this DICOM series")
    node.SetAttribute("DICOM.instanceUIDs", " ".join(str(h.SOPInstanceUID) for h in headers))
    return node


@contextmanager
def _keep_working_directory():
    """vtkArchive changes the process's working directory while it (un)zips a bundle and does not
    always change it back (a failed unzip leaves it in a deleted folder): restore it."""
    cwd = os.getcwd()
    try:
        yield
    finally:
        os.chdir(cwd)


def _node_name(path: Path) -> str:
    from strokeseg.io import strip_suffix

    return strip_suffix(path)


def _sort_slices(files: list[str], headers: list) -> tuple[list[str], list]:
    """Order slices along the slice normal (ImagePositionPatient . normal), as Slicer's DICOM plugin."""
    import numpy as np

    try:
        iop = np.asarray(headers[0].ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        dist = [float(np.dot(np.asarray(h.ImagePositionPatient, dtype=float), normal)) for h in headers]
    except AttributeError:
        return files, headers
    order = sorted(range(len(files)), key=lambda i: dist[i])
    return [files[i] for i in order], [headers[i] for i in order]


def create_context(cache_dir: str | Path | None = None) -> SlicerContext:
    """A new scene with the logics registered as the Slicer application registers them."""
    from vtkmodules.vtkCommonCore import vtkCollection

    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = app.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    app.SetModuleLogic("Colors", colors)
    app.SetSliceLogics(vtkCollection())
    app.SetViewLogics(vtkCollection())
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)

    keep: list = []

    def register(logic, name: str | None):
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app)
        if name:
            app.SetModuleLogic(name, logic)
        keep.append(logic)
        return logic

    volumes = register(slicer.vtkSlicerVolumesLogic(), "Volumes")
    segmentations = register(slicer.vtkSlicerSegmentationsModuleLogic(), "Segmentations")
    sequences = register(slicer.vtkSlicerSequencesLogic(), "Sequences")
    register(slicer.vtkSlicerSubjectHierarchyModuleLogic(), "SubjectHierarchy")

    # Remote IO and the cache manager: vtkMRMLScene::ReadFromMRB unpacks into the cache folder.
    cache = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="strokeseg-slicer-cache-"))
    remote = slicer.vtkMRMLRemoteIOLogic()
    remote.SetMRMLScene(scene)
    remote.SetMRMLApplicationLogic(app)
    remote.GetCacheManager().SetRemoteCacheDirectory(str(cache))
    data_io = slicer.vtkDataIOManagerLogic()
    data_io.SetMRMLScene(scene)
    data_io.SetMRMLApplicationLogic(app)
    data_io.SetAndObserveDataIOManager(remote.GetDataIOManager())
    remote.AddDataIOToScene()
    keep += [remote, data_io]
    return SlicerContext(scene, app, volumes, segmentations, keep, sequences)
