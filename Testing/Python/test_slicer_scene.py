"""Slicer scene <-> engine: loading through Slicer's own logics, exact geometry, 4D, parameters, .mrb.

Runs headless on PyPI slicer-core: a real vtkMRMLScene with the Volumes, Segmentations and
Sequences logics registered (StrokeSegLib.headless), no mocks of MRML.
"""

from __future__ import annotations

import numpy as np
import pytest

from slicer_support import REPO_ROOT  # noqa: F401  (puts StrokeSegLib on sys.path)

import slicer  # noqa: E402

from strokeseg.errors import InputError  # noqa: E402
from strokeseg.image import Image  # noqa: E402
from strokeseg.io import read_image, write_image  # noqa: E402
from StrokeSegLib.dicom import write_dicom_series  # noqa: E402
from StrokeSegLib.headless import create_context  # noqa: E402
from StrokeSegLib.parameters import PARAMETERS, StrokeSegParameters, find_parameter_node, get_parameter_node  # noqa: E402
from StrokeSegLib.volumes import (  # noqa: E402
    add_volume_from_image,
    dicom_files,
    ijk_to_ras,
    ijk_to_ras_from_image,
    image_from_node,
    image_from_volume,
    sequence_for_proxy,
)


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    ax, ay, az = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_image(seed: int = 0, shape=(9, 30, 40)) -> Image:
    rng = np.random.default_rng(seed)
    arr = (rng.random(shape) * 1000).astype(np.float32)
    return Image(arr, (0.9, 1.3, 5.5), (-20.0, 31.5, 12.25), tuple(rotation(12, -7, 25).ravel()))


@pytest.fixture
def ctx(tmp_path):
    return create_context(tmp_path / "cache")


def test_nifti_through_slicer_volumes_logic_has_the_engines_geometry(ctx, tmp_path):
    path = write_image(oblique_image(), tmp_path / "oblique.nii.gz")
    node = ctx.load_volume(path)
    assert node.IsA("vtkMRMLScalarVolumeNode") and node.GetStorageNode() is not None
    from_slicer = image_from_volume(node)
    from_engine = read_image(path)
    assert from_slicer.same_grid(from_engine, tol=1e-5)
    np.testing.assert_array_equal(from_slicer.array, from_engine.array)
    np.testing.assert_allclose(ijk_to_ras(node), ijk_to_ras_from_image(from_engine), atol=1e-4)
    # RAS <-> LPS: Slicer's first two axes are the engine's negated.
    np.testing.assert_allclose(ijk_to_ras(node)[:3, 3], np.array(from_engine.origin) * [-1, -1, 1], atol=1e-4)


def test_image_to_node_and_back_is_exact(ctx):
    image = oblique_image(1)
    node = add_volume_from_image(ctx.scene, image, "round trip")
    back = image_from_volume(node)
    assert back.same_grid(image, tol=1e-9)
    np.testing.assert_array_equal(back.array, image.array)
    assert back.array.dtype == image.array.dtype


def test_result_on_a_reference_grid_copies_its_matrix_bit_for_bit(ctx, tmp_path):
    reference = ctx.load_volume(write_image(oblique_image(2), tmp_path / "ref.nii.gz"))
    probability = image_from_volume(reference).with_array(np.zeros((9, 30, 40), np.float32))
    node = add_volume_from_image(ctx.scene, probability, "probability", reference=reference)
    assert np.array_equal(ijk_to_ras(node), ijk_to_ras(reference))


def test_linear_parent_transform_is_applied_and_nonlinear_refused(ctx):
    node = add_volume_from_image(ctx.scene, oblique_image(3), "moved")
    transform = ctx.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = (10.0, -5.0, 2.5)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    before = ijk_to_ras(node)
    node.SetAndObserveTransformNodeID(transform.GetID())
    np.testing.assert_allclose(ijk_to_ras(node)[:3, 3], before[:3, 3] + shift[:3, 3])
    grid = ctx.scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(InputError, match="non-linear transform"):
        image_from_volume(node)


def test_dicom_series_loads_like_slicers_dicom_plugin(ctx, tmp_path):
    image = oblique_image(4)
    files = write_dicom_series(image, tmp_path / "dwi", series_description="ep2d_diff_TRACEW b1000", b_value=1000)
    node = ctx.load_dicom_series(list(reversed(files)))  # any file order
    loaded = image_from_volume(node)
    assert loaded.same_grid(image, tol=1e-4)
    np.testing.assert_allclose(loaded.array, image.array, atol=0.02)  # int16 storage with a rescale slope
    assert loaded.meta["series_description"] == "ep2d_diff_TRACEW b1000"
    assert float(loaded.meta["b_value"]) == 1000.0
    assert [str(p) for p in files] == dicom_files(node)
    assert "placement_problem" not in loaded.meta  # evenly spaced slices
    import pydicom

    uids = node.GetAttribute("DICOM.instanceUIDs").split()
    assert uids == [pydicom.dcmread(f).SOPInstanceUID for f in files]


def test_dicom_series_with_a_missing_slice_is_refused_until_resampled(ctx, tmp_path):
    """Slicer stacks unevenly spaced DICOM slices with one averaged spacing (its geometry
    regularisation off): the engine's uneven-slice check runs on the node's source files too."""
    from strokeseg.io import check_volume

    files = write_dicom_series(oblique_image(4, shape=(8, 10, 12)), tmp_path / "dwi", series_description="dwi b1000")
    del files[3]  # a file lost in the transfer: slices 3 and 5 now 2 steps apart
    node = ctx.load_dicom_series(files)
    image = image_from_volume(node)
    assert image.array.shape[0] == 7
    with pytest.raises(InputError, match="not evenly spaced.*after slice 3 of 7.*regularization"):
        check_volume(image, node.GetName())
    # Resampled since it was read (e.g. the regularisation transform hardened): no longer the files' geometry.
    node.GetImageData().Modified()
    assert node.GetModifiedSinceRead()
    assert "placement_problem" not in image_from_volume(node).meta


def test_4d_dicom_node_is_checked_on_its_distinct_slice_positions(ctx, tmp_path):
    """A 4D node's source files repeat every slice position once per frame (MultiVolume from DICOM):
    the uneven-slice check runs on the distinct positions, and a stack missing a slice is refused."""
    import pydicom

    from StrokeSegLib.volumes import node_meta

    base = oblique_image(7, shape=(6, 10, 12))
    frames = [write_dicom_series(base.with_array(base.array * (t + 1)), tmp_path / f"t{t}", series_description=f"ctp t{t}")
              for t in range(3)]
    for files in frames:
        del files[2]  # the same slice lost from every frame: 5 slices, one gap
    by_uid = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): str(f) for files in frames for f in files}
    node = ctx.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "ctp multivolume")
    slicer.util.updateVolumeFromArray(node, np.zeros((5, 10, 12, 3), np.float32))
    node.SetAttribute("DICOM.instanceUIDs", " ".join(by_uid))
    assert "placement_problem" not in node_meta(node)  # no way to find the files: nothing to check
    meta = node_meta(node, file_for_instance=by_uid.get)
    assert len(meta["dicom_files"]) == 15
    assert "not evenly spaced" in meta["placement_problem"] and "after slice 2 of 5" in meta["placement_problem"]
    # Frames whose slice stacks differ are not something this check can judge.
    del by_uid[next(iter(by_uid))]
    node.SetAttribute("DICOM.instanceUIDs", " ".join(by_uid))
    slicer.util.updateVolumeFromArray(node, np.zeros((7, 10, 12, 2), np.float32))
    assert "placement_problem" not in node_meta(node, file_for_instance=by_uid.get)


def _sequence(ctx, frames: int = 4, unit: str = "s", shift_frame: int | None = None):
    base = oblique_image(5, shape=(4, 12, 16))
    sequence = ctx.scene.AddNewNodeByClass("vtkMRMLSequenceNode", "ctp series")
    sequence.SetIndexName("time")
    sequence.SetIndexUnit(unit)
    for t in range(frames):
        frame = base.with_array(base.array + 100 * t)
        if t == shift_frame:
            frame = Image(frame.array, frame.spacing, (0.0, 0.0, 0.0), frame.direction)
        node = slicer.vtkMRMLScalarVolumeNode()
        from StrokeSegLib.volumes import update_volume_from_image

        update_volume_from_image(node, frame)
        sequence.SetDataNodeAtValue(node, str(1.5 * t * (1000 if unit == "ms" else 1)))
    return base, sequence


@pytest.mark.parametrize("unit", ["s", "ms"])
def test_sequence_node_becomes_a_4d_image(ctx, unit):
    base, sequence = _sequence(ctx, unit=unit)
    image = image_from_node(ctx.scene, sequence)
    assert image.is_4d and image.array.shape == (4, 4, 12, 16)
    assert image.same_grid(base, tol=1e-6)
    np.testing.assert_allclose(image.meta["times"], [0.0, 1.5, 3.0, 4.5])
    np.testing.assert_array_equal(image.array[2], base.array + 200)


def test_sequence_proxy_volume_resolves_to_its_sequence(ctx):
    base, sequence = _sequence(ctx)
    browser = ctx.scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    proxy = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ctp proxy")
    browser.AddProxyNode(proxy, sequence, False)
    assert sequence_for_proxy(ctx.scene, proxy).GetID() == sequence.GetID()
    assert image_from_node(ctx.scene, proxy).array.shape == (4, 4, 12, 16)


def test_sequence_frames_off_grid_are_refused(ctx):
    _, sequence = _sequence(ctx, shift_frame=2)
    with pytest.raises(InputError, match="frame 2 is not on the grid"):
        image_from_node(ctx.scene, sequence)


def test_multivolume_node_becomes_a_4d_image(ctx):
    base = oblique_image(6, shape=(3, 10, 12))
    frames = np.stack([base.array * (t + 1) for t in range(5)], axis=-1)  # (z, y, x, t) components
    node = ctx.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "pwi multivolume")
    slicer.util.updateVolumeFromArray(node, frames)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras_from_image(base)))
    node.SetAttribute("MultiVolume.FrameLabels", ",".join(str(1500 * t) for t in range(5)))
    node.SetAttribute("MultiVolume.FrameIdentifyingDICOMTagUnits", "ms")
    image = image_from_volume(node)
    assert image.array.shape == (5, 3, 10, 12) and image.same_grid(base, tol=1e-6)
    np.testing.assert_allclose(image.meta["times"], [0, 1.5, 3.0, 4.5, 6.0])
    np.testing.assert_allclose(image.array[3], base.array * 4)


# -- parameters ----------------------------------------------------------------------------
def test_parameter_node_is_a_singleton_with_every_default(ctx):
    assert find_parameter_node(ctx.scene) is None
    node = get_parameter_node(ctx.scene)
    assert get_parameter_node(ctx.scene) is node
    assert node.GetSingletonTag() == "StrokeSeg" and node.GetAttribute("ModuleName") == "StrokeSeg"
    for p in PARAMETERS:
        assert node.HasParameter(p.name), p.name
    params = StrokeSegParameters(node)
    assert params.threshold == 0.5 and params.model == "auto" and params.fillHoles is True
    # stored the way slicer.parameterNodeWrapper stores them
    assert node.GetParameter("threshold") == "0.5" and node.GetParameter("fillHoles") == "True"
    with pytest.raises(ValueError):
        params.threshold = 1.5
    with pytest.raises(ValueError):
        params.device = "tpu"
    with pytest.raises(AttributeError):
        params.notAParameter = 1


def test_parameters_survive_an_mrb_save_and_load(ctx, tmp_path):
    dwi = ctx.load_volume(write_image(oblique_image(7), tmp_path / "dwi.nii.gz"), name="my dwi")
    params = StrokeSegParameters(get_parameter_node(ctx.scene))
    params.inputDwi = dwi
    params.threshold = 0.37
    params.closingMm = 2.5
    params.fillHoles = False
    params.model = "dwi-unet"
    params.device = "cpu"
    params.exportDirectory = tmp_path / "exports"
    params.add_protected_segment("Segment_1")
    mrb = ctx.save_mrb(tmp_path / "scene.mrb")

    other = create_context(tmp_path / "cache2")
    other.load_mrb(mrb)
    restored = StrokeSegParameters(find_parameter_node(other.scene))
    assert restored.inputDwi is not None and restored.inputDwi.GetName() == "my dwi"
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(restored.inputDwi), slicer.util.arrayFromVolume(dwi))
    assert (restored.threshold, restored.closingMm, restored.fillHoles) == (0.37, 2.5, False)
    assert (restored.model, restored.device) == ("dwi-unet", "cpu")
    assert restored.exportDirectory == tmp_path / "exports"
    assert restored.protected_segments() == ["Segment_1"]
    assert restored.inputAdc is None


def test_bad_files_are_refused_with_the_file_named(ctx, tmp_path):
    import os
    import zipfile

    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match="broken.nii.gz"):
        ctx.load_volume(bad)
    with pytest.raises(InputError, match="not a readable Slicer scene bundle"):
        ctx.load_mrb(bad)
    empty = tmp_path / "empty.mrb"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("readme.txt", "no scene in here")
    cwd = os.getcwd()
    with pytest.raises(InputError, match="empty.mrb: not a readable Slicer scene bundle"):
        ctx.load_mrb(empty)
    assert os.getcwd() == cwd  # vtkArchive's directory change is undone


def test_volume_without_voxels_is_refused(ctx):
    node = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="no voxels"):
        image_from_volume(node)


def test_4d_series_are_detection_candidates_and_their_proxies_are_not(ctx):
    from StrokeSegLib.detection import candidate_nodes, detect_node

    _, sequence = _sequence(ctx)
    browser = ctx.scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    proxy = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ctp proxy")
    browser.AddProxyNode(proxy, sequence, False)
    slicer.util.updateVolumeFromArray(proxy, slicer.util.arrayFromVolume(sequence.GetNthDataNode(0)))
    ids = [n.GetID() for n in candidate_nodes(ctx.scene)]
    assert sequence.GetID() in ids and proxy.GetID() not in ids
    found = detect_node(ctx.scene, sequence)
    assert found.key == "ctp", found.reason
