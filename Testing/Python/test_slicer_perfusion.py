"""The Slicer module's perfusion path: a 4D series in the scene -> maps, core/penumbra, table, export.

Headless on PyPI slicer-core (real MRML scenes, no mocks): a small CT perfusion phantom is written
as a ``.seq.nrrd`` by Slicer's volume sequence storage node, loaded through the Sequences logic,
run through StrokeSegLib's perfusion logic in its worker job, and compared with the engine's own
``run_perfusion`` on the same file.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict

import numpy as np
import pytest

from slicer_support import perfusion_series_file

import slicer  # noqa: E402

from strokeseg.errors import InputError, StrokeSegError  # noqa: E402
from strokeseg.io import read_image  # noqa: E402
from strokeseg.perfusion import PerfusionSettings, Thresholds, load_series, run_perfusion  # noqa: E402
from StrokeSegLib.headless import create_context  # noqa: E402
from StrokeSegLib.logic import StrokeSegLogic  # noqa: E402
from StrokeSegLib.parameters import (  # noqa: E402
    MAP_KEYS,
    PERFUSION_THRESHOLD_DEFAULTS,
    PERFUSION_THRESHOLDS,
    StrokeSegParameters,
    find_parameter_node,
    map_parameter_name,
)
from StrokeSegLib.perfusion import UNITS_ATTRIBUTE, grid_node  # noqa: E402
from StrokeSegLib.segmentation import EDITED_TAG, SEGMENTATIONS_LOGIC, ROLE_TAG, _oriented_image, get_tag, read_mask  # noqa: E402
from StrokeSegLib.statistics import table_as_rows  # noqa: E402
from StrokeSegLib.terminology import TYPE_INFARCT, TYPE_ISCHEMIA, parse_terminology  # noqa: E402
from StrokeSegLib.volumes import add_sequence_from_image, ijk_to_ras, ijk_to_ras_from_image  # noqa: E402

REPORT_KEYS = ("core_ml", "penumbra_ml", "hypoperfusion_ml", "mismatch_ml", "mismatch_ratio", "hir")
TABLE_LABELS = {"core_ml": "Infarct core volume", "penumbra_ml": "Penumbra volume (hypoperfused minus core)",
                "hypoperfusion_ml": "Hypoperfused volume", "mismatch_ml": "Mismatch volume",
                "mismatch_ratio": "Mismatch ratio", "hir": "Hypoperfusion intensity ratio"}


@pytest.fixture(scope="module")
def series_file(request, lesion_library):
    return perfusion_series_file(request.config.cache, lesion_library)


@pytest.fixture(scope="module")
def engine(series_file):
    """The engine on the same file, read by the engine's own reader."""
    series = load_series(series_file)
    return series, run_perfusion(series)


def _scene(tmp_path, series_file):
    ctx = create_context(tmp_path / "cache")
    sequence = ctx.load_sequence(series_file, "CT perfusion")
    return ctx, StrokeSegLogic(ctx.scene), sequence


@pytest.fixture(scope="module")
def computed(tmp_path_factory, series_file):
    """One run through the logic, as the widget does it: job in its thread, result applied after."""
    ctx, logic, sequence = _scene(tmp_path_factory.mktemp("computed"), series_file)
    found = logic.detect_inputs()
    job = logic.perfusion.create_job().start()
    assert job.wait(120) and job.error is None, job.error
    events = job.poll()
    report = logic.perfusion.apply_result(job.result, ctx.scene.GetNodeByID(job.series_node_id))
    return ctx, logic, sequence, job, events, report, found


def _artery_labelmap(ctx, series, expected):
    """A label map at the voxels the automatic arterial input search chose (on the series grid)."""
    aif = np.zeros(series.array.shape[1:], np.uint8)
    lps = np.asarray(expected.report["arterial_input"]["voxels_lps_mm"])
    xyz = np.rint(np.linalg.solve(series.direction_matrix * np.asarray(series.spacing), (lps - series.origin).T).T)
    aif[tuple(xyz[:, ::-1].astype(int).T)] = 1
    label = ctx.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "artery")
    slicer.util.updateVolumeFromArray(label, aif)
    label.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras_from_image(series.frame(0))))
    return label, aif


def _count_nodes(scene) -> int:
    return scene.GetNumberOfNodes()


def _table(logic) -> dict[str, str]:
    return {row["Measure"]: row["Value"] for row in table_as_rows(logic.params.perfusionTable)}


def _as_number(text: str):
    return None if text == "n/a" else float(text)


# -- the run ---------------------------------------------------------------------------------------
def test_sequence_is_detected_and_runs_in_the_background_with_progress(computed):
    ctx, logic, sequence, job, events, _, found = computed
    assert {d.node.GetID(): d.key for d in found}[sequence.GetID()] == "ctp"
    assert logic.params.perfusionSeries.GetID() == sequence.GetID()
    assert job.series.is_4d and job.series.array.shape == (25, 6, 64, 64)
    fractions = [e.fraction for e in events]
    assert len(fractions) >= 5 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert job.finished and not job.cancelled


def test_maps_are_on_the_series_grid_with_the_engines_values(computed, engine):
    ctx, logic, sequence, *_ = computed
    _, expected = engine
    frame0 = sequence.GetNthDataNode(0)
    assert grid_node(ctx.scene, sequence) is frame0
    units = {"cbf": "mL/100g/min", "cbv": "mL/100g", "mtt": "s", "tmax": "s", "ttp": "s"}
    for key in MAP_KEYS:
        node = logic.params.get(map_parameter_name(key))
        assert node is not None and node.IsA("vtkMRMLScalarVolumeNode"), key
        assert np.array_equal(ijk_to_ras(node), ijk_to_ras(frame0)), key  # copied, not recomputed
        np.testing.assert_allclose(ijk_to_ras(node), ijk_to_ras_from_image(expected.maps[key]), atol=1e-6)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), expected.maps[key].array.astype(np.float32))
        assert node.GetAttribute(UNITS_ATTRIBUTE) == units[key] == expected.report["units"][key]
        assert units[key] in node.GetDescription()
        assert node.GetVoxelValueUnits().GetCodingSchemeDesignator() == "UCUM"
        assert node.GetAttribute("StrokeSeg.Output") == f"perfusion-{key}"  # never detected as an input
    display = {key: logic.params.get(map_parameter_name(key)).GetDisplayNode() for key in MAP_KEYS}
    # every map low = dark, high = red: a core is a hole in CBF/CBV, a delay a red patch in Tmax
    assert {display[k].GetColorNodeID() for k in ("cbf", "cbv", "mtt", "tmax", "ttp")} == {"vtkMRMLPETProceduralColorNodePET-Rainbow2"}
    windows = {key: (d.GetWindowLevelMin(), d.GetWindowLevelMax()) for key, d in display.items()}
    assert windows["cbf"] == (0.0, 60.0) and windows["cbv"] == (0.0, 6.0) and windows["tmax"] == (0.0, 12.0)
    assert not display["tmax"].GetAutoWindowLevel()
    lo, hi = windows["ttp"]
    assert 0 <= lo < hi <= expected.maps["ttp"].array.max()


def test_core_and_penumbra_segments_with_terminology_on_the_series_grid(computed, engine):
    ctx, logic, *_ = computed
    _, expected = engine
    segmentation = logic.params.perfusionSegmentation
    cbf = logic.params.perfusionCbf
    ref = segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())
    assert ref.GetID() == cbf.GetID()
    seg = segmentation.GetSegmentation()
    by_role = {get_tag(seg.GetNthSegment(i), ROLE_TAG): seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())}
    assert set(by_role) == {"core", "penumbra"}
    assert expected.core.array.sum() > 0 and expected.penumbra.array.sum() > 0  # the phantom has both
    for role, mask, code in (("core", expected.core, TYPE_INFARCT), ("penumbra", expected.penumbra, TYPE_ISCHEMIA)):
        segment = seg.GetSegment(by_role[role])
        assert parse_terminology(segment.GetTerminology())["type"] == code
        np.testing.assert_array_equal(read_mask(segmentation, by_role[role], cbf), mask.array)


def test_statistics_table_equals_the_engine_report(computed, engine):
    _, logic, _, _, _, report, _ = computed
    _, expected = engine
    table = _table(logic)
    for key in REPORT_KEYS:
        assert report[key] == expected.report[key], key
        value = _as_number(table[TABLE_LABELS[key]])
        assert value == pytest.approx(expected.report[key], abs=1e-3) if expected.report[key] is not None else value is None
    # penumbra = hypoperfused minus core; mismatch ratio = hypoperfused / core
    assert report["penumbra_ml"] == pytest.approx(report["hypoperfusion_ml"] - report["core_ml"], abs=0.011)
    assert report["edited"] is False
    assert table["Core"] == expected.report["core_method"]
    by_rcbf = expected.report["core_ml_by_rcbf"]
    assert len(by_rcbf) == 4  # the chosen 30% and the default 20, 34, 38%
    for key, value in by_rcbf.items():
        assert _as_number(table[f"Core at rCBF < {100 * float(key):g}% (computed)"]) == pytest.approx(value, abs=1e-3)
    assert json.loads(logic.params.perfusionReport.GetText())["core_ml"] == expected.report["core_ml"]


def test_multivolume_node_gives_the_engines_maps(tmp_path, engine):
    series, expected = engine
    ctx = create_context(tmp_path / "cache")
    node = ctx.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "ctp multivolume")
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(np.moveaxis(series.array, 0, -1)))
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras_from_image(series)))
    node.SetAttribute("MultiVolume.FrameLabels", ",".join(str(1000 * t) for t in series.meta["times"]))
    node.SetAttribute("MultiVolume.FrameIdentifyingDICOMTagUnits", "ms")
    logic = StrokeSegLogic(ctx.scene)
    logic.params.perfusionSeries = node
    logic.perfusion.compute()
    for key in ("cbf", "tmax"):
        out = logic.params.get(map_parameter_name(key))
        assert np.array_equal(ijk_to_ras(out), ijk_to_ras(node))
        np.testing.assert_allclose(slicer.util.arrayFromVolume(out), expected.maps[key].array, rtol=1e-5, atol=1e-4)
    assert logic.perfusion.stored_report()["core_ml"] == pytest.approx(expected.report["core_ml"], abs=0.02)


def test_a_raw_ctp_sequence_alone_runs_the_bundled_ctp_model_on_its_grid(tmp_path, series_file):
    """The lesion path with only a 4D CTP loaded: the CT-perfusion model is chosen, the engine
    derives its maps from the series, and the probability and lesion segment lie on the grid of
    the sequence's proxy volume (what the user sees), equal to the engine's own run."""
    from strokeseg.pipeline import segment_images
    from StrokeSegLib.volumes import proxy_for_sequence

    ctx, logic, sequence = _scene(tmp_path, series_file)
    logic.detect_inputs()
    card = logic.selected_card()
    assert card.family == "ctp" and set(logic.gather_images(card)) == {"ctp"}
    logic.segment(device="cpu")
    p = logic.params
    proxy = proxy_for_sequence(ctx.scene, sequence)
    assert p.referenceVolume.GetID() == proxy.GetID()
    assert np.array_equal(ijk_to_ras(p.probabilityVolume), ijk_to_ras(proxy))
    expected = segment_images({"ctp": load_series(series_file)}, model=card, device="cpu")
    np.testing.assert_allclose(slicer.util.arrayFromVolume(p.probabilityVolume), expected.probability.array, atol=1e-4)
    mask = read_mask(p.segmentation, p.lesionSegmentId, p.referenceVolume) > 0
    assert logic.settings() == expected.settings  # the card's tuned post-processing, as the engine applies it
    assert np.array_equal(mask, expected.mask.array > 0)


def test_sliders_follow_the_auto_model_until_the_user_sets_them(tmp_path, series_file):
    from strokeseg.models import get_card

    ctx, logic, sequence = _scene(tmp_path, series_file)
    logic.detect_inputs()
    p, card = logic.params, logic.selected_card()
    assert p.settingsFromModel == "" and logic.follow_model_defaults(card)
    assert (p.threshold, p.closingMm, p.minLesionMl) == pytest.approx((card.threshold, card.closing_mm, card.min_lesion_ml))
    p.threshold = 0.42  # the user's choice for this model is kept
    assert not logic.follow_model_defaults(card) and p.threshold == pytest.approx(0.42)
    other = get_card("dwi-unet")  # other inputs, another model: its tuned settings
    assert logic.follow_model_defaults(other) and p.threshold == pytest.approx(other.threshold)


# -- settings --------------------------------------------------------------------------------------
def test_threshold_defaults_are_the_engines():
    engine_defaults = asdict(Thresholds())
    for name, field in PERFUSION_THRESHOLDS.items():
        assert PERFUSION_THRESHOLD_DEFAULTS[field] == engine_defaults[field], field


def test_thresholds_modality_and_arterial_input_reach_the_engine(tmp_path, series_file, engine):
    series, expected = engine
    ctx, logic, sequence = _scene(tmp_path, series_file)
    p = logic.params
    p.perfusionSeries = sequence
    p.perfusionKind = "ct"
    p.perfusionTmaxS = 8.0
    p.perfusionCoreRcbf = 0.25
    p.perfusionMotionCorrection = False
    # The arterial input by hand: a label map at the voxels the automatic search chose.
    label, aif = _artery_labelmap(ctx, series, expected)
    p.perfusionAif = label
    options = logic.perfusion.run_options(sequence)
    assert options["kind"] == "ct" and options["te_ms"] is None and "adc" not in options
    assert options["thresholds"].tmax_hypo_s == 8.0 and options["thresholds"].core_rcbf == 0.25
    assert not options["settings"].motion_correction
    np.testing.assert_array_equal(options["aif_mask"].array, aif)
    logic.perfusion.compute()
    mask_image = series.frame(0).with_array(aif)
    reference = run_perfusion(series, kind="ct", aif_mask=mask_image, thresholds=Thresholds(tmax_hypo_s=8.0, core_rcbf=0.25),
                              settings=PerfusionSettings(motion_correction=False))
    report = logic.perfusion.update_statistics()
    assert reference.report["arterial_input"]["source"] == report["arterial_input"]["source"] == "mask"
    for key in REPORT_KEYS:
        assert report[key] == reference.report[key], key
    assert report["thresholds"]["tmax_hypo_s"] == 8.0 and _table(logic)["Hypoperfusion"] == "Tmax > 8 s"
    # MR: echo time and the ADC slot go to the engine.
    p.perfusionKind = "mr"
    p.perfusionTeMs = 32.0
    adc = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "adc")
    slicer.util.updateVolumeFromArray(adc, np.full((6, 64, 64), 800.0, np.float32))
    p.inputAdc = adc
    options = logic.perfusion.run_options(sequence)
    assert options["te_ms"] == 32.0 and options["adc"].array.shape == (6, 64, 64)
    p.perfusionTmaxSevereS = 4.0  # below the hypoperfusion threshold: refused before any work
    with pytest.raises(InputError, match="tmax_severe_s"):
        logic.perfusion.create_job()


def test_parameters_and_result_survive_mrb_save_and_load(tmp_path, series_file, engine):
    ctx, logic, sequence = _scene(tmp_path, series_file)
    p = logic.params
    p.perfusionSeries = sequence
    p.perfusionKind = "ct"
    p.perfusionTeMs = 25.0
    p.perfusionTmaxS = 7.0
    p.perfusionMinCoreMl = 1.5
    p.perfusionUseAdc = False
    artery, aif = _artery_labelmap(ctx, *engine)
    p.perfusionAif = artery
    logic.perfusion.compute()
    assert logic.perfusion.stored_report()["arterial_input"]["source"] == "mask"
    before = logic.perfusion.update_statistics()
    maps_before = {k: slicer.util.arrayFromVolume(p.get(map_parameter_name(k))).copy() for k in MAP_KEYS}
    matrix = ijk_to_ras(p.perfusionCbf)
    mrb = ctx.save_mrb(tmp_path / "perfusion.mrb")

    other = create_context(tmp_path / "cache2")
    other.load_mrb(mrb)
    q = StrokeSegParameters(find_parameter_node(other.scene))
    assert (q.perfusionKind, q.perfusionTeMs, q.perfusionTmaxS, q.perfusionMinCoreMl, q.perfusionUseAdc) == \
        ("ct", 25.0, 7.0, 1.5, False)
    assert q.perfusionSeries is not None and q.perfusionSeries.GetNumberOfDataNodes() == 25
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(q.perfusionAif), aif)
    for key in MAP_KEYS:
        node = q.get(map_parameter_name(key))
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), maps_before[key])
        assert node.GetAttribute(UNITS_ATTRIBUTE)
    np.testing.assert_allclose(ijk_to_ras(q.perfusionCbf), matrix, atol=1e-9)
    again = StrokeSegLogic(other.scene)
    assert again.perfusion.has_result()
    after = again.perfusion.update_statistics()
    for key in REPORT_KEYS:
        assert after[key] == before[key], key
    assert q.perfusionTable is not None and _table(again)["Infarct core volume"] == _table(logic)["Infarct core volume"]


# -- edits and export ------------------------------------------------------------------------------
def test_edits_change_the_statistics_and_a_rerun_keeps_them(tmp_path, series_file, engine):
    _, expected = engine
    ctx, logic, sequence = _scene(tmp_path, series_file)
    logic.params.perfusionSeries = sequence
    logic.perfusion.compute()
    p = logic.params
    seg = p.perfusionSegmentation.GetSegmentation()
    core_id = next(seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())
                   if get_tag(seg.GetNthSegment(i), ROLE_TAG) == "core")
    core = read_mask(p.perfusionSegmentation, core_id, p.perfusionCbf)
    edited = core.copy()
    voxels = np.argwhere(core)
    edited[tuple(voxels[: len(voxels) // 2].T)] = 0  # the user erases half of the core
    # As a Segment Editor effect writes (no StrokeSeg fingerprint update).
    image = _oriented_image(edited, ijk_to_ras(p.perfusionCbf))
    SEGMENTATIONS_LOGIC.SetBinaryLabelmapToSegment(image, p.perfusionSegmentation, core_id,
                                                   SEGMENTATIONS_LOGIC.MODE_REPLACE, image.GetExtent())
    report = logic.perfusion.update_statistics()
    voxel_ml = expected.core.voxel_volume_ml
    assert report["edited"] is True
    assert report["core_ml"] == round(float(edited.sum()) * voxel_ml, 2) < expected.report["core_ml"]
    # the erased voxels are no longer hypoperfused; the penumbra is as computed
    assert report["hypoperfusion_ml"] == round(float(edited.sum() + expected.penumbra.array.sum()) * voxel_ml, 2)
    assert report["penumbra_ml"] == expected.report["penumbra_ml"]
    assert _table(logic)["Edited by user"] == "yes"
    # Compute again: the edited core is kept under a new name, a fresh core is written.
    logic.perfusion.compute()
    names = [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]
    assert "Infarct core (edited)" in names and "Infarct core" in names
    np.testing.assert_array_equal(read_mask(p.perfusionSegmentation, core_id, p.perfusionCbf), edited)
    kept = seg.GetSegment(core_id)
    assert get_tag(kept, EDITED_TAG) == "1" and get_tag(kept, ROLE_TAG) == "core"  # the lesion module's rule
    assert logic.perfusion.update_statistics()["core_ml"] == expected.report["core_ml"]


def test_export_writes_maps_masks_segmentation_and_report(computed, engine, tmp_path):
    ctx, logic, *_ = computed
    _, expected = engine
    written = logic.perfusion.export(tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "cbf.nii.gz", "cbv.nii.gz", "mtt.nii.gz", "tmax.nii.gz", "ttp.nii.gz", "core.nii.gz", "penumbra.nii.gz",
        "perfusion.seg.nrrd", "report.json", "report.csv"}
    tmax = read_image(written["tmax"])
    assert tmax.same_grid(expected.maps["tmax"], tol=1e-5)
    np.testing.assert_array_equal(tmax.array, expected.maps["tmax"].array.astype(np.float32))
    np.testing.assert_array_equal(read_image(written["core"]).array, expected.core.array)
    np.testing.assert_array_equal(read_image(written["penumbra"]).array, expected.penumbra.array)
    report = json.loads(written["report_json"].read_text(encoding="utf-8"))
    rows = {r["measure"]: r["value"] for r in csv.DictReader(io.StringIO(written["report_csv"].read_text(encoding="utf-8")))}
    for key in REPORT_KEYS:
        assert report[key] == expected.report[key]
        assert (float(rows[key]) if rows[key] else None) == expected.report[key]
    assert float(rows["threshold_tmax_hypo_s"]) == 6.0
    seg = ctx.load_segmentation(written["segmentation"]).GetSegmentation()
    types = {parse_terminology(seg.GetNthSegment(i).GetTerminology())["type"] for i in range(seg.GetNumberOfSegments())}
    assert types == {TYPE_INFARCT, TYPE_ISCHEMIA}


# -- bad input -------------------------------------------------------------------------------------
def _short_sequence(ctx, series, frames: int):
    short = series.with_array(series.array[:frames])
    short.meta["times"] = list(series.meta["times"][:frames])
    return add_sequence_from_image(ctx.scene, short, "short series")


def test_too_few_frames_is_one_line_and_leaves_no_nodes(tmp_path, engine):
    series, _ = engine
    ctx = create_context(tmp_path / "cache")
    logic = StrokeSegLogic(ctx.scene)
    logic.params.perfusionSeries = _short_sequence(ctx, series, 8)
    nodes = _count_nodes(ctx.scene)
    with pytest.raises(StrokeSegError) as err:
        logic.perfusion.compute()
    message = str(err.value)
    assert "\n" not in message and "short series" in message and "8 frames" in message
    assert _count_nodes(ctx.scene) == nodes
    assert not logic.perfusion.has_result() and logic.params.perfusionCbf is None


def test_3d_volume_no_bolus_and_cancel_leave_no_nodes(tmp_path, engine):
    series, _ = engine
    ctx = create_context(tmp_path / "cache")
    logic = StrokeSegLogic(ctx.scene)
    volume = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "plain CT")
    slicer.util.updateVolumeFromArray(volume, series.array[0])
    logic.params.perfusionSeries = volume
    with pytest.raises(InputError, match="plain CT: is a 3D volume"):
        logic.perfusion.create_job()
    # No contrast arrives: the engine refuses it in the worker thread.
    flat = series.with_array(np.repeat(series.array[:1], series.array.shape[0], axis=0))
    flat.meta["times"] = list(series.meta["times"])
    logic.params.perfusionSeries = add_sequence_from_image(ctx.scene, flat, "flat series")
    nodes = _count_nodes(ctx.scene)
    job = logic.perfusion.create_job().start()
    job.wait(60)
    assert job.error and "\n" not in job.error and "flat series" in job.error and job.result is None
    assert _count_nodes(ctx.scene) == nodes
    # Cancelled before any result.
    logic.params.perfusionSeries = add_sequence_from_image(ctx.scene, series, "to cancel")
    nodes = _count_nodes(ctx.scene)
    job = logic.perfusion.create_job()
    job.cancel()
    job.start().wait(60)
    assert job.cancelled and job.result is None
    assert _count_nodes(ctx.scene) == nodes and logic.params.perfusionCbf is None


# -- the module's self-test (its perfusion step, run headless for real) ----------------------------
def test_module_selftest_perfusion_step_passes_headless(tmp_path):
    from StrokeSegLib.selftest import SERIES_NAME, run_perfusion_selftest, volume_within_tolerance

    ctx = create_context(tmp_path / "cache")
    logic = StrokeSegLogic(ctx.scene)
    messages = []
    figures = run_perfusion_selftest(ctx.scene, tmp_path / "work", ctx.load_sequence, logic=logic,
                                     log=messages.append)
    assert messages == ["Generating the CT perfusion phantom (no download)", "Loading the phantom as a Sequence",
                        "Computing perfusion maps", "Checking maps, segments and volumes"]
    # The series went through the file and Slicer's Sequences logic; the phantom's private scene left nothing behind.
    assert ctx.scene.GetNumberOfNodesByClass("vtkMRMLSequenceNode") == 1
    sequence = ctx.scene.GetFirstNodeByClass("vtkMRMLSequenceNode")
    assert sequence.GetName() == SERIES_NAME and sequence.GetNumberOfDataNodes() == figures["frames"] == 25
    assert sequence.GetStorageNode().GetFileName() == str(figures["series_file"])
    # Truth volumes are those of the written truth masks; the figures are the table's, as the statistics say.
    core, penumbra = (read_image(tmp_path / "work" / f"{k}.nii.gz") for k in ("core", "penumbra"))
    voxel_ml = core.voxel_volume_ml
    assert figures["truth_core_ml"] == pytest.approx(core.array.sum() * voxel_ml)
    assert figures["truth_hypoperfusion_ml"] == pytest.approx(((core.array > 0) | (penumbra.array > 0)).sum() * voxel_ml)
    report = logic.perfusion.update_statistics()
    assert figures["core_ml"] == report["core_ml"] and figures["hypoperfusion_ml"] == report["hypoperfusion_ml"]
    for key in ("core_ml", "hypoperfusion_ml"):
        assert volume_within_tolerance(figures[key], figures[f"truth_{key}"]), key
    assert min(figures["segment_voxels"].values()) > 0 and figures["truth_penumbra_ml"] > 0


def test_module_selftest_fails_on_wrong_volumes_and_on_a_non_sequence(tmp_path):
    from StrokeSegLib.selftest import SelfTestFailure, run_perfusion_selftest, volume_within_tolerance

    assert volume_within_tolerance(114.0, 100.0) and not volume_within_tolerance(116.0, 100.0)
    assert volume_within_tolerance(8.9, 4.0) and not volume_within_tolerance(9.1, 4.0)  # 5 mL for small volumes
    # Tmax > 12 s instead of 6 s: the hypoperfused volume no longer matches the phantom's Tmax > 6 s truth.
    ctx = create_context(tmp_path / "cache")
    logic = StrokeSegLogic(ctx.scene)
    logic.params.perfusionTmaxSevereS = 16.0
    logic.params.perfusionTmaxS = 12.0
    with pytest.raises(SelfTestFailure, match=r"^Hypoperfused volume: [\d.]+ mL, phantom truth [\d.]+ mL"):
        run_perfusion_selftest(ctx.scene, tmp_path / "work", ctx.load_sequence, logic=logic)
    # A loader that gives a plain 3D volume instead of a Sequence.
    other = create_context(tmp_path / "cache2")
    with pytest.raises(SelfTestFailure, match="ctp.seq.nrrd: loading gave no Sequence node"):
        run_perfusion_selftest(other.scene, tmp_path / "work2",
                               lambda path, name: other.load_volume(path.parent / "core.nii.gz"))
