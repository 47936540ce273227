"""The lesion segment in Slicer: geometry, slider recomputation, edit protection, undo, statistics,
exports (NIfTI, .seg.nrrd, report, DICOM SEG) and a full result through .mrb save/load.

Headless scenes of PyPI slicer-core; volumes are read by Slicer's volumes logic (NIfTI and a DICOM
series written from a phantom). The probability map is the phantom's smoothed truth, so these
tests do not depend on the bundled network (test_slicer_pipeline.py runs the network).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from slicer_support import phantom_case, synthetic_result

import slicer  # noqa: E402

from strokeseg.errors import InputError  # noqa: E402
from strokeseg.image import Image  # noqa: E402
from strokeseg.io import read_image, write_image  # noqa: E402
from strokeseg.postprocess import PostprocessSettings, postprocess  # noqa: E402
from StrokeSegLib.dicom import write_dicom_series  # noqa: E402
from StrokeSegLib.headless import create_context  # noqa: E402
from StrokeSegLib.logic import StrokeSegLogic  # noqa: E402
from StrokeSegLib.segmentation import (  # noqa: E402
    DIGEST_TAG,
    EDITED_TAG,
    _oriented_image,
    get_tag,
    read_mask,
)
from StrokeSegLib.statistics import table_as_rows  # noqa: E402
from StrokeSegLib.volumes import ijk_to_ras, image_from_volume  # noqa: E402

SEGMENTATIONS = slicer.vtkSlicerSegmentationsModuleLogic


@pytest.fixture(scope="module")
def case_dir(request, lesion_library):
    return phantom_case(request.config.cache, lesion_library)


def _rotation(deg_x: float, deg_z: float) -> np.ndarray:
    ax, az = np.deg2rad([deg_x, deg_z])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ rx


@pytest.fixture(scope="module")
def oblique_case(case_dir, tmp_path_factory):
    """The phantom's voxels on a strongly oblique, anisotropic grid (written as NIfTI)."""
    folder = tmp_path_factory.mktemp("oblique")
    dwi, truth = read_image(case_dir / "dwi.nii.gz"), read_image(case_dir / "lesion.nii.gz")
    geometry = dict(spacing=(1.7, 2.1, 5.5), origin=(97.0, 110.0, -60.0), direction=tuple(_rotation(17, 31).ravel()))
    write_image(Image(dwi.array, **geometry), folder / "dwi.nii.gz")
    write_image(Image(truth.array, **geometry), folder / "lesion.nii.gz")
    return folder


def _setup(tmp_path, folder):
    ctx = create_context(tmp_path / "cache")
    dwi = ctx.load_volume(folder / "dwi.nii.gz", name="DWI b1000")
    logic = StrokeSegLogic(ctx.scene)
    logic.params.inputDwi = dwi
    reference = image_from_volume(dwi)
    truth = read_image(folder / "lesion.nii.gz").array
    result = synthetic_result(reference, truth)
    logic.apply_result(result)
    return ctx, logic, dwi, result


@pytest.fixture
def scene(tmp_path, case_dir):
    return _setup(tmp_path, case_dir)


def paint(segmentation, segment_id, reference, voxels):
    """Add voxels to a segment as a Segment Editor effect does (merge into the segment's labelmap)."""
    brush = np.zeros(slicer.util.arrayFromVolume(reference).shape, np.uint8)
    brush[voxels] = 1
    image = _oriented_image(brush, ijk_to_ras(reference))
    assert SEGMENTATIONS.SetBinaryLabelmapToSegment(image, segmentation, segment_id, SEGMENTATIONS.MODE_MERGE_MAX,
                                                    image.GetExtent())
    return brush


def segment_names(segmentation) -> list[str]:
    seg = segmentation.GetSegmentation()
    return [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]


# -- geometry ----------------------------------------------------------------------------------
def test_segment_geometry_equals_the_oblique_anisotropic_reference(tmp_path, oblique_case):
    ctx, logic, dwi, result = _setup(tmp_path, oblique_case)
    params = logic.params
    segmentation, probability = params.segmentation, params.probabilityVolume
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()).GetID() == dwi.GetID()
    # The segment's labelmap lives on the reference grid: same IJK-to-RAS matrix, extent inside it.
    labelmap = slicer.vtkOrientedImageData()
    segmentation.GetBinaryLabelmapRepresentation(params.lesionSegmentId, labelmap)
    matrix = slicer.vtkMatrix4x4() if hasattr(slicer, "vtkMatrix4x4") else __import__("vtk").vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(matrix), ijk_to_ras(dwi), atol=1e-9)
    ext, dims = labelmap.GetExtent(), dwi.GetImageData().GetDimensions()
    assert all(0 <= ext[2 * a] <= ext[2 * a + 1] < dims[a] for a in range(3))
    # Voxel for voxel what the engine computed, and the probability volume on the same grid.
    np.testing.assert_array_equal(read_mask(segmentation, params.lesionSegmentId, dwi), result.mask.array)
    assert np.array_equal(ijk_to_ras(probability), ijk_to_ras(dwi))
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(probability), result.probability.array)
    # Displayed as a coloured foreground over the reference in every slice view.
    composites = [ctx.scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
                  for i in range(ctx.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]
    for composite in composites:
        assert composite.GetBackgroundVolumeID() == dwi.GetID()
        assert composite.GetForegroundVolumeID() == probability.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(params.probabilityOpacity)
    display = probability.GetDisplayNode()
    assert display.GetColorNodeID() != "vtkMRMLColorTableNodeGrey" and display.GetApplyThreshold()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)


def test_lesion_segment_has_standard_terminology(scene):
    _, logic, _, _ = scene
    segment = logic.params.segmentation.GetSegmentation().GetSegment(logic.params.lesionSegmentId)
    assert segment.GetName() == "Stroke lesion"
    entry = segment.GetTerminology()
    assert "SCT^49755003^Morphologically Altered Structure" in entry and "SCT^55641003^Infarct" in entry
    assert "SCT^12738006^Brain" in entry


# -- sliders -----------------------------------------------------------------------------------
@pytest.mark.parametrize("threshold, closing, minimum", [(0.3, 0.0, 0.0), (0.7, 3.0, 0.0), (0.45, 2.0, 0.5)])
def test_slider_recompute_equals_the_engine_postprocess(scene, threshold, closing, minimum):
    _, logic, dwi, result = scene
    params = logic.params
    params.threshold, params.closingMm, params.minLesionMl = threshold, closing, minimum
    segment_id = params.lesionSegmentId
    update = logic.recompute()
    expected = postprocess(result.probability.array, result.probability.spacing,
                           PostprocessSettings(threshold, closing, minimum))
    assert not update.created and update.segment_id == segment_id  # unedited: updated in place
    np.testing.assert_array_equal(read_mask(params.segmentation, segment_id, dwi), expected)
    assert update.voxels == int(expected.sum())
    assert segment_names(params.segmentation) == ["Stroke lesion"]


# -- edit protection and undo -------------------------------------------------------------------
def test_user_edits_are_never_overwritten_by_the_sliders(scene):
    _, logic, dwi, result = scene
    params = logic.params
    segmentation, original = params.segmentation, params.lesionSegmentId
    brush = paint(segmentation, original, dwi, (slice(10, 12), slice(60, 66), slice(60, 66)))
    edited = np.maximum(result.mask.array, brush)

    params.threshold = 0.35
    update = logic.recompute()
    assert update.created and update.kept_edited == original and update.segment_id != original
    np.testing.assert_array_equal(read_mask(segmentation, original, dwi), edited)  # edits intact
    kept = segmentation.GetSegmentation().GetSegment(original)
    assert get_tag(kept, EDITED_TAG) == "1" and kept.GetName() == "Stroke lesion (edited)"
    assert params.protected_segments() == [original] and params.lesionSegmentId == update.segment_id

    # Further slider moves drive the new segment only.
    params.threshold = 0.6
    again = logic.recompute()
    assert not again.created and again.segment_id == update.segment_id
    np.testing.assert_array_equal(read_mask(segmentation, original, dwi), edited)
    assert segment_names(segmentation) == ["Stroke lesion (edited)", "Stroke lesion"]


def test_edits_are_detected_after_the_scene_is_saved_and_reloaded(scene, tmp_path):
    ctx, logic, dwi, _ = scene
    params = logic.params
    paint(params.segmentation, params.lesionSegmentId, dwi, (slice(5, 6), slice(40, 44), slice(40, 44)))
    mrb = ctx.save_mrb(tmp_path / "edited.mrb")
    other = create_context(tmp_path / "cache2")
    other.load_mrb(mrb)
    restored = StrokeSegLogic(other.scene)  # no memory of what it wrote: only the digest tag
    before = restored.params.lesionSegmentId
    restored.params.threshold = 0.4
    update = restored.recompute()
    assert update.created and update.kept_edited == before


def test_without_edits_the_check_is_free_and_nothing_is_created(scene, monkeypatch):
    _, logic, _, _ = scene
    import StrokeSegLib.lesionmask as lesionmask

    calls = []

    def read_mask_spy(*args):
        calls.append(args)
        raise AssertionError("voxels compared although the segment was not modified")

    monkeypatch.setattr(lesionmask, "read_mask", read_mask_spy)
    for t in (0.4, 0.5, 0.6):
        logic.params.threshold = t
        assert not logic.recompute().created
    assert not calls  # the modification-time check short-circuits the voxel comparison


def test_undo_and_redo_restore_segments_and_tags(scene):
    _, logic, dwi, result = scene
    params = logic.params
    segmentation, original = params.segmentation, params.lesionSegmentId
    first = read_mask(segmentation, original, dwi)
    params.threshold = 0.8
    logic.recompute()
    smaller = read_mask(segmentation, original, dwi)
    assert smaller.sum() < first.sum()
    assert logic.undo()
    np.testing.assert_array_equal(read_mask(segmentation, original, dwi), first)
    assert not logic.lesion_mask().is_edited(original)  # the digest tag came back with the voxels
    assert params.threshold == 0.5  # and the sliders with the settings of the restored mask
    assert logic.redo()
    np.testing.assert_array_equal(read_mask(segmentation, original, dwi), smaller)
    assert params.threshold == 0.8

    # Undo of a protection step brings back the edited segment as it was; the next move still protects it.
    paint(segmentation, original, dwi, (slice(3, 4), slice(30, 33), slice(30, 33)))
    params.threshold = 0.5
    protected = logic.recompute()
    assert protected.created
    assert logic.undo()
    assert segment_names(segmentation) == ["Stroke lesion"]
    params.threshold = 0.55
    assert logic.recompute().created  # edits still never overwritten


# -- statistics --------------------------------------------------------------------------------
def test_statistics_tables_follow_the_current_segment(scene):
    _, logic, dwi, result = scene
    params = logic.params
    report = logic.update_statistics()
    voxel_ml = result.mask.voxel_volume_ml
    assert report["total_volume_ml"] == pytest.approx(result.mask.array.sum() * voxel_ml)
    summary = {r["Measure"]: r for r in table_as_rows(params.summaryTable)}
    assert float(summary["Total lesion volume"]["Value"]) == pytest.approx(report["total_volume_ml"], abs=1e-3)
    assert summary["Total lesion volume"]["Unit"] == "mL"
    assert int(summary["Lesion count"]["Value"]) == report["lesion_count"]
    rows = table_as_rows(params.statisticsTable)
    assert len(rows) == report["lesion_count"] >= 1
    first = report["lesions"][0]
    assert float(rows[0]["Volume"]) == pytest.approx(first["volume_ml"], rel=1e-5)
    assert rows[0]["Hemisphere"] == first["hemisphere"] and float(rows[0]["Centroid R"]) == pytest.approx(first["centroid_ras_mm"][0], abs=1e-3)
    assert params.statisticsTable.GetColumnUnitLabel("Volume") == "mL"
    # edits show in the statistics
    paint(params.segmentation, params.lesionSegmentId, dwi, (slice(2, 3), slice(20, 30), slice(20, 30)))
    edited = logic.update_statistics()
    assert edited["edited"] and edited["total_volume_ml"] > report["total_volume_ml"]
    assert json.loads(params.report.GetText())["total_volume_ml"] == pytest.approx(edited["total_volume_ml"])


def test_perfusion_core_and_penumbra_segments_and_mismatch(scene):
    _, logic, _, result = scene
    core = np.zeros_like(result.mask.array)
    core[14:16, 50:60, 50:60] = 1
    penumbra = np.zeros_like(core)
    penumbra[12:18, 45:70, 45:70] = 1
    penumbra[core > 0] = 0
    logic.write_fixed_segment("core", core)
    logic.write_fixed_segment("penumbra", penumbra)
    report = logic.update_statistics()
    voxel_ml = result.mask.voxel_volume_ml
    assert report["core_ml"] == pytest.approx(core.sum() * voxel_ml)
    assert report["penumbra_ml"] == pytest.approx(penumbra.sum() * voxel_ml)
    assert report["mismatch_ml"] == pytest.approx(penumbra.sum() * voxel_ml)
    assert report["mismatch_ratio"] == pytest.approx((core.sum() + penumbra.sum()) / core.sum())
    names = {r["Measure"] for r in table_as_rows(logic.params.summaryTable)}
    assert {"Infarct core volume", "Penumbra volume", "Hypoperfused volume", "Mismatch volume", "Mismatch ratio"} <= names
    seg = logic.params.segmentation.GetSegmentation()
    assert "SCT^52674009^Ischemia" in seg.GetSegment(seg.GetSegmentIdBySegmentName("Penumbra")).GetTerminology()


def test_an_edited_core_segment_is_left_to_the_user_and_out_of_the_statistics(scene):
    """The rule of the lesion segment and of the perfusion module: a re-run keeps the user's core
    as "... (edited)" and writes a new one; the statistics count the new one only (not the union)."""
    _, logic, dwi, result = scene
    core = np.zeros_like(result.mask.array)
    core[14:16, 50:60, 50:60] = 1
    first = logic.write_fixed_segment("core", core)
    edited = core.copy()
    edited[14:16, 60:66, 50:60] = 1  # the user extends it, as a Segment Editor effect writes
    image = _oriented_image(edited, ijk_to_ras(dwi))
    SEGMENTATIONS.SetBinaryLabelmapToSegment(image, logic.params.segmentation, first, SEGMENTATIONS.MODE_REPLACE,
                                             image.GetExtent())
    second = logic.write_fixed_segment("core", core)
    seg = logic.params.segmentation.GetSegmentation()
    assert second != first and seg.GetSegment(first).GetName() == "Infarct core (edited)"
    assert get_tag(seg.GetSegment(first), EDITED_TAG) == "1" and first in logic.params.protected_segments()
    assert logic.update_statistics()["core_ml"] == pytest.approx(core.sum() * result.mask.voxel_volume_ml)
    assert logic.write_fixed_segment("core", core) == second  # unedited: written in place


# -- exports -----------------------------------------------------------------------------------
def _sitk_array_and_grid(path):
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), (img.GetSpacing(), img.GetOrigin(), img.GetDirection())


def test_exports_read_back_voxel_exact(tmp_path, oblique_case):
    ctx, logic, dwi, result = _setup(tmp_path, oblique_case)
    params = logic.params
    paint(params.segmentation, params.lesionSegmentId, dwi, (slice(4, 5), slice(10, 14), slice(10, 14)))
    current = read_mask(params.segmentation, params.lesionSegmentId, dwi)
    written = logic.export(tmp_path / "out")
    assert set(written) == {"mask", "probability", "segmentation", "report_json", "report_csv"}  # not DICOM
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in written.values())
    reference = read_image(oblique_case / "dwi.nii.gz")
    for key, expected, dtype in (("mask", current, np.uint8), ("probability", result.probability.array, np.float32)):
        image = read_image(written[key])
        assert image.same_grid(reference, tol=1e-5), key
        assert image.array.dtype == dtype
        np.testing.assert_array_equal(image.array, expected)
    # .seg.nrrd: read with SimpleITK (not Slicer), on the reference grid, voxel for voxel.
    seg_array, (spacing, origin, direction) = _sitk_array_and_grid(written["segmentation"])
    assert seg_array.shape == current.shape
    np.testing.assert_allclose(spacing, reference.spacing, atol=1e-5)
    np.testing.assert_allclose(origin, reference.origin, atol=1e-4)
    np.testing.assert_allclose(direction, reference.direction, atol=1e-6)
    np.testing.assert_array_equal(seg_array > 0, current > 0)
    header = written["segmentation"].read_bytes()[:8000].decode("latin-1")
    assert "SCT^55641003^Infarct" in header and DIGEST_TAG in header
    report = json.loads(written["report_json"].read_text(encoding="utf-8"))
    assert report["edited"] is True and report["total_volume_ml"] == pytest.approx(current.sum() * reference.voxel_volume_ml)
    csv_lines = written["report_csv"].read_text(encoding="utf-8").splitlines()
    assert csv_lines[0].startswith("id,volume_ml") and len(csv_lines) == report["lesion_count"] + 1


def test_export_without_a_folder_is_refused(scene):
    _, logic, _, _ = scene
    with pytest.raises(InputError, match="export folder"):
        logic.export()


# -- DICOM -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dicom_case(case_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dicom")
    dwi = read_image(case_dir / "dwi.nii.gz")
    files = write_dicom_series(dwi, folder / "dwi", series_description="ep2d_diff_TRACEW b1000", b_value=1000)
    return files, read_image(case_dir / "lesion.nii.gz").array


def _result_on_dicom(tmp_path, dicom_case):
    """(logic, DWI node, source files) with a result on the DICOM-loaded DWI, in a scene of its own."""
    files, truth = dicom_case
    ctx = create_context(tmp_path / "cache")
    dwi = ctx.load_dicom_series(files, name="Series 1")
    logic = StrokeSegLogic(ctx.scene)
    logic.params.inputDwi = dwi
    logic.apply_result(synthetic_result(image_from_volume(dwi), truth))
    return logic, dwi, files


def test_dicom_seg_references_the_source_instances(tmp_path, dicom_case):
    import highdicom as hd
    import pydicom

    logic, dwi, files = _result_on_dicom(tmp_path, dicom_case)
    params = logic.params
    mask = read_mask(params.segmentation, params.lesionSegmentId, dwi)
    written = logic.export(tmp_path / "out")

    seg = hd.seg.segread(written["dicom_seg"])
    sources = {str(pydicom.dcmread(f).SOPInstanceUID): k for k, f in enumerate(files)}  # k: slice index
    source = pydicom.dcmread(files[0])
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(sources)
    description = seg.SegmentSequence[0]
    assert description.SegmentLabel == "Stroke lesion"
    assert description.SegmentedPropertyTypeCodeSequence[0].CodeValue == "55641003"
    assert description.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert description.SegmentAlgorithmType == "AUTOMATIC"
    # Every frame points at its source slice and carries that slice of the mask.
    pixels = seg.pixel_array
    assert pixels.shape[0] == len(files)
    for frame, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        np.testing.assert_array_equal(pixels[frame] > 0, mask[sources[uid]] > 0)
    assert pixels.sum() == mask.sum() > 0


def test_dicom_seg_refused_when_the_reference_no_longer_matches_its_series(tmp_path, dicom_case):
    logic, dwi, _ = _result_on_dicom(tmp_path, dicom_case)
    matrix = ijk_to_ras(dwi)
    matrix[:3, 3] += 7.0  # the user moved the volume
    dwi.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(matrix))
    out = tmp_path / "out"
    with pytest.raises(InputError, match="Series 1: DICOM SEG not written: no source DICOM slice"):
        logic.export(out)
    assert not out.exists() or not list(out.iterdir())  # nothing written, no staging folder left


# -- a whole result through .mrb ---------------------------------------------------------------
def test_result_survives_mrb_and_sliders_work_after_loading(scene, tmp_path):
    ctx, logic, dwi, result = scene
    params = logic.params
    params.threshold, params.closingMm = 0.6, 2.0
    logic.recompute()
    logic.update_statistics()
    saved = read_mask(params.segmentation, params.lesionSegmentId, dwi)
    mrb = ctx.save_mrb(tmp_path / "result.mrb")

    other = create_context(tmp_path / "cache2")
    other.load_mrb(mrb)
    restored = StrokeSegLogic(other.scene)
    p = restored.params
    assert (p.threshold, p.closingMm) == (0.6, 2.0)
    assert restored.has_result()
    np.testing.assert_array_equal(read_mask(p.segmentation, p.lesionSegmentId, p.referenceVolume), saved)
    assert restored.stored_report()["lesion_count"] == logic.stored_report()["lesion_count"]
    assert table_as_rows(p.summaryTable) == table_as_rows(params.summaryTable)
    p.threshold = 0.3
    update = restored.recompute()
    expected = postprocess(result.probability.array, result.probability.spacing, PostprocessSettings(0.3, 2.0, 0.0))
    assert not update.created
    np.testing.assert_array_equal(read_mask(p.segmentation, p.lesionSegmentId, p.referenceVolume), expected)
