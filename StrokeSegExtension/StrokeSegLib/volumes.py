"""Volume nodes <-> engine images, geometry exact.

Slicer keeps a volume's geometry as the IJK-to-RAS matrix; the engine keeps SimpleITK's LPS
spacing, origin and direction. Both index voxels the same way: ``arrayFromVolume`` gives
(k, j, i) = (z, y, x), the engine's order. RAS and LPS differ by the sign of the first two
axes, so ``ijkToLPS = diag(-1, -1, 1) @ ijkToRAS``. A linear parent transform is applied (the
engine sees the volume where the user sees it); a non-linear one must be hardened first.

4D inputs: a Sequence node of scalar volumes (time index values in s or ms), the proxy volume
of a sequence browser, or a multi-component MultiVolume node (frame labels in its
``MultiVolume.FrameLabels`` attribute) become a (t, z, y, x) image with ``meta["times"]``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import slicer
import vtk

from strokeseg.errors import InputError
from strokeseg.io import nifti_file_meta, slice_spacing_problem
from strokeseg.image import Image

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])

# Header fields copied into Image.meta, under the keys strokeseg.io uses for DICOM series.
_DICOM_META = {
    "SeriesDescription": "series_description",
    "Modality": "dicom_modality",
    "MagneticFieldStrength": "field_strength",
    "DiffusionBValue": "b_value",
    "EchoTime": "echo_time",
    "SeriesInstanceUID": "series_instance_uid",
    "StudyInstanceUID": "study_instance_uid",
}


def _node_label(node: Any) -> str:
    return node.GetName() or node.GetID() or "volume"


# -- geometry ----------------------------------------------------------------------------------
def ijk_to_ras(node: Any) -> np.ndarray:
    """4x4 IJK-to-world(RAS) matrix of a volume, its linear parent transform applied."""
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    matrix = slicer.util.arrayFromVTKMatrix(m)
    parent = node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise InputError(_node_label(node), "has a non-linear transform; harden it before segmenting")
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        matrix = slicer.util.arrayFromVTKMatrix(to_world) @ matrix
    return matrix


def geometry_from_ijk_to_ras(matrix: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """(spacing, origin, direction) in the engine's LPS conventions."""
    lps = RAS_FROM_LPS @ np.asarray(matrix, dtype=float)[:3]
    columns = lps[:, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0):
        raise ValueError("degenerate IJK-to-RAS matrix")
    direction = columns / spacing
    return tuple(spacing), tuple(lps[:, 3]), tuple(direction.ravel())


def ijk_to_ras_from_image(image: Image) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = RAS_FROM_LPS @ (image.direction_matrix * np.asarray(image.spacing)[None, :])
    m[:3, 3] = RAS_FROM_LPS @ np.asarray(image.origin)
    return m


def _set_ijk_to_ras(node: Any, matrix: np.ndarray) -> None:
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.asarray(matrix, dtype=float)))


# -- node -> image -----------------------------------------------------------------------------
def dicom_files(node: Any, file_for_instance: Callable[[str], str] | None = None) -> list[str]:
    """Source DICOM files of a volume loaded from DICOM, in the node's slice order ([] if none).

    Uses the ``DICOM.instanceUIDs`` attribute (set by Slicer's DICOM plugins) with
    ``file_for_instance`` (inside Slicer: ``slicer.dicomDatabase.fileForInstance``), else the
    file list of the node's storage node.
    """
    uids = (node.GetAttribute("DICOM.instanceUIDs") or "").split()
    if uids and file_for_instance is not None:
        files = [file_for_instance(uid) for uid in uids]
        if all(files):
            return [str(f) for f in files]
    storage = node.GetStorageNode()
    if storage is None or not uids:
        return []
    files = [storage.GetNthFileName(i) for i in range(storage.GetNumberOfFileNames())]
    files = files or [storage.GetFileName()]
    return [f for f in files if f and _is_dicom(f)]


def _is_dicom(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def node_meta(node: Any, file_for_instance: Callable[[str], str] | None = None) -> dict[str, Any]:
    """Image.meta for a node: its name and, for DICOM-loaded volumes, the series header fields."""
    meta: dict[str, Any] = {"name": node.GetName() or "", "node_id": node.GetID()}
    storage = node.GetStorageNode()
    as_read = storage is None or not node.GetModifiedSinceRead()  # voxels still those of the source files
    files = dicom_files(node, file_for_instance)
    if files:
        import pydicom

        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        for keyword, key in _DICOM_META.items():
            value = getattr(ds, keyword, None)
            if value not in (None, ""):
                meta[key] = str(value)
        meta["dicom_files"] = files
        image_data = node.GetImageData()
        n_slices = image_data.GetDimensions()[2] if image_data is not None else 0
        # One file per slice, or per slice and frame (4D); a multi-frame file holds all slices: no check.
        if as_read and n_slices and len(files) % n_slices == 0:
            problem = _dicom_slice_problem(files, len(files) // n_slices)
            if problem:
                meta["placement_problem"] = problem
    if storage is not None and storage.GetFileName():
        meta["source"] = storage.GetFileName()
        if as_read:
            # Slicer reads NIfTI through ITK, which turns NaN/Inf into 0 and may take the qform
            # where FSL takes the sform: what the file really holds decides (check_volume refuses)
            meta.update(nifti_file_meta(meta["source"]))
    return meta


def _dicom_slice_problem(files: list[str], frames: int = 1) -> str | None:
    try:
        key = tuple((f, os.stat(f).st_mtime_ns) for f in files)
    except OSError:
        return None
    return _cached_slice_problem(key, frames)


@functools.lru_cache(maxsize=16)  # the module asks on every detection; a series' headers are read once
def _cached_slice_problem(key: tuple[tuple[str, int], ...], frames: int) -> str | None:
    """The engine's uneven-slice check (``strokeseg.io.slice_spacing_problem``) on the source files
    of a volume Slicer loaded from DICOM. Slicer stacks such a series with one averaged spacing
    unless its acquisition-geometry regularisation is on; a volume whose voxels were resampled
    since (the regularisation transform hardened) no longer matches the files and is not checked.
    A 4D volume's files (``frames`` per slice position) are checked on their distinct positions."""
    import pydicom

    try:
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f, _mtime in key]
        pos = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
        iop = np.array([float(v) for v in headers[0].ImageOrientationPatient])
    except (AttributeError, OSError, TypeError, ValueError, pydicom.errors.InvalidDicomError):
        return None  # no slice geometry in the headers (secondary capture): nothing to check
    if frames > 1:
        pos, counts = np.unique(np.round(pos, 2), axis=0, return_counts=True)
        if np.any(counts != frames):
            return None  # not the same slice stack in every frame: not something this check can judge
    problem = slice_spacing_problem(pos, np.cross(iop[:3], iop[3:]))
    if problem is None:
        return None
    if problem.kind == "uneven":
        return problem.message + " (in Slicer: turn on DICOM acquisition geometry regularization and harden its transform)"
    return problem.message


def image_from_volume(node: Any, *, file_for_instance: Callable[[str], str] | None = None, copy: bool = True) -> Image:
    """A scalar (3D) or MultiVolume (4D) node as an engine Image; voxels copied unless ``copy=False``
    (a view of the node's voxels: only for reading on the main thread while the node lives)."""
    if node is None or node.GetImageData() is None:
        raise InputError(None if node is None else _node_label(node), "volume has no voxels")
    spacing, origin, direction = geometry_from_ijk_to_ras(ijk_to_ras(node))
    array = slicer.util.arrayFromVolume(node)
    array = np.array(array, copy=True) if copy else array
    meta = node_meta(node, file_for_instance)
    if array.ndim == 4:  # multi-component: frames of a MultiVolume, (z, y, x, t) -> (t, z, y, x)
        array = np.moveaxis(array, -1, 0)
        meta["times"] = _multivolume_times(node, array.shape[0])
    return Image(array, spacing, origin, direction, meta)


def _multivolume_times(node: Any, n_frames: int) -> list[float]:
    labels = (node.GetAttribute("MultiVolume.FrameLabels") or "").split(",")
    unit = (node.GetAttribute("MultiVolume.FrameIdentifyingDICOMTagUnits") or "ms").strip().lower()
    try:
        times = [float(v) for v in labels if v.strip()]
    except ValueError:
        times = []
    if len(times) != n_frames:
        raise InputError(_node_label(node), f"4D volume has {n_frames} frames but no matching frame times")
    scale = 0.001 if unit == "ms" else 1.0
    return [t * scale for t in times]


def sequence_for_proxy(scene: Any, node: Any):
    """The Sequence node whose browser shows ``node`` as its proxy, or None."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode")):
        browser = scene.GetNthNodeByClass(i, "vtkMRMLSequenceBrowserNode")
        if browser.IsProxyNode(node.GetID()):
            return browser.GetSequenceNode(node)
    return None


def proxy_for_sequence(scene: Any, sequence: Any):
    """The volume a sequence browser shows for ``sequence`` (what the user sees of it), or None."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode")):
        browser = scene.GetNthNodeByClass(i, "vtkMRMLSequenceBrowserNode")
        if browser.IsSynchronizedSequenceNodeID(sequence.GetID(), True):
            proxy = browser.GetProxyNode(sequence)
            if proxy is not None:
                return proxy
    return None


def image_from_sequence(sequence: Any, max_frames: int | None = None) -> Image:
    """A Sequence node of scalar volumes as a (t, z, y, x) Image with frame times in seconds
    (the first ``max_frames`` frames only, when given: enough to classify a series)."""
    n = sequence.GetNumberOfDataNodes()
    label = _node_label(sequence)
    if n < 2:
        raise InputError(label, f"4D series needs at least 2 frames, has {n}")
    unit = (sequence.GetIndexUnit() or "s").strip().lower()
    scale = {"ms": 0.001, "s": 1.0, "sec": 1.0, "min": 60.0}.get(unit)
    if scale is None:
        raise InputError(label, f"sequence index unit '{unit}' is not a time unit (s or ms)")
    frames, times, first = [], [], None
    for i in range(n if max_frames is None else min(n, max(2, max_frames))):
        frame = sequence.GetNthDataNode(i)
        if frame is None or not frame.IsA("vtkMRMLScalarVolumeNode"):
            raise InputError(label, f"frame {i} is not a scalar volume")
        geometry = geometry_from_ijk_to_ras(ijk_to_ras(frame))
        if first is None:
            first = geometry
        elif not all(np.allclose(a, b, atol=1e-4) for a, b in zip(geometry, first)):
            raise InputError(label, f"frame {i} is not on the grid of frame 0")
        frames.append(np.array(slicer.util.arrayFromVolume(frame), copy=True))
        try:
            times.append(float(sequence.GetNthIndexValue(i)) * scale)
        except ValueError:
            raise InputError(label, f"frame {i} has a non-numeric index value") from None
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise InputError(label, f"frames have different sizes {sorted(shapes)}")
    spacing, origin, direction = first
    meta = {"name": sequence.GetName() or "", "node_id": sequence.GetID(), "times": times}
    return Image(np.stack(frames), spacing, origin, direction, meta)


def image_from_node(scene: Any, node: Any, *, file_for_instance: Callable[[str], str] | None = None,
                    preview: bool = False) -> Image:
    """Any supported input node (scalar volume, sequence or its proxy, MultiVolume) as an Image.

    ``preview``: for classification only, without copying voxels (views of 3D volumes, the first
    two frames of a 4D series).
    """
    if node.IsA("vtkMRMLSequenceNode"):
        return image_from_sequence(node, max_frames=2 if preview else None)
    sequence = sequence_for_proxy(scene, node)
    if sequence is not None and sequence.GetNumberOfDataNodes() > 1:
        return image_from_sequence(sequence, max_frames=2 if preview else None)
    return image_from_volume(node, file_for_instance=file_for_instance, copy=not preview)


# -- image -> node -----------------------------------------------------------------------------
def update_volume_from_image(node: Any, image: Image, reference: Any = None) -> Any:
    """Put a 3D image's voxels and geometry into ``node``.

    With a ``reference`` volume whose grid the image is on, the reference's IJK-to-RAS matrix
    is copied as is (no round trip through spacing/direction), so the result lines up with the
    reference voxel for voxel.
    """
    if image.is_4d:
        raise ValueError("update_volume_from_image takes a 3D image")
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(image.array))
    matrix = ijk_to_ras_from_image(image)
    if reference is not None and reference.GetParentTransformNode() is None and reference.GetImageData() is not None:
        if _same_grid(reference, ijk_to_ras(reference), image, matrix):
            _copy_geometry(reference, node)
            return node
    _set_ijk_to_ras(node, matrix)
    return node


def _copy_geometry(source: Any, target: Any) -> None:
    """Origin, spacing and directions copied value for value (CopyOrientation recomputes them)."""
    directions = vtk.vtkMatrix4x4()
    source.GetIJKToRASDirectionMatrix(directions)
    target.SetIJKToRASDirectionMatrix(directions)
    target.SetSpacing(source.GetSpacing())
    target.SetOrigin(source.GetOrigin())


def _same_grid(reference: Any, ref_matrix: np.ndarray, image: Image, matrix: np.ndarray) -> bool:
    dims = reference.GetImageData().GetDimensions()
    return tuple(dims) == tuple(image.size) and np.allclose(ref_matrix, matrix, atol=1e-4)


def add_volume_from_image(
    scene: Any, image: Image, name: str, *, reference: Any = None, class_name: str = "vtkMRMLScalarVolumeNode"
) -> Any:
    node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name))
    update_volume_from_image(node, image, reference)
    node.CreateDefaultDisplayNodes()
    return node



def add_sequence_from_image(scene: Any, image: Image, name: str) -> Any:
    """A 4D image (frame times in ``meta["times"]``, seconds) as a Sequence node of scalar volumes."""
    if not image.is_4d:
        raise ValueError("add_sequence_from_image takes a 4D image")
    times = image.meta.get("times")
    if times is None or len(times) != image.array.shape[0]:
        raise InputError(image.meta.get("source") or name, "4D image without one frame time per frame")
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", scene.GenerateUniqueName(name))
    sequence.SetIndexName("time")
    sequence.SetIndexUnit("s")
    sequence.SetIndexType(sequence.NumericIndex)
    matrix = ijk_to_ras_from_image(image)
    for k, t in enumerate(times):
        frame = slicer.vtkMRMLScalarVolumeNode()
        slicer.util.updateVolumeFromArray(frame, np.ascontiguousarray(image.array[k]))
        _set_ijk_to_ras(frame, matrix)
        sequence.SetDataNodeAtValue(frame, repr(float(t)))
    return sequence
