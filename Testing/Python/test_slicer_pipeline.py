"""From scans in a Slicer scene to a lesion: detection, model choice, the worker job, the network.

The job tests run the engine's real code path with a tiny random-weight model (fast, always
available); the last test runs the bundled DWI model on a phantom and scores it against the
phantom's truth (skipped until Resources/Models/models.json exists).
"""

from __future__ import annotations

import re
import shutil
import threading

import numpy as np
import pytest

from slicer_support import REPO_ROOT, phantom_case

from engine_fixtures import make_models_dir  # noqa: E402
import slicer  # noqa: E402

from strokeseg.errors import InputError, ModelError  # noqa: E402
from strokeseg.io import read_image  # noqa: E402
from strokeseg.metrics import case_metrics  # noqa: E402
from StrokeSegLib import paths  # noqa: E402
from StrokeSegLib.detection import OUTPUT_ATTRIBUTE, detect_scene  # noqa: E402
from StrokeSegLib.headless import create_context  # noqa: E402
from StrokeSegLib.logic import StrokeSegLogic  # noqa: E402
from StrokeSegLib.sampledata import NODE_NAMES, PhantomSample, case_folder, load_sample  # noqa: E402
from StrokeSegLib.segmentation import read_mask  # noqa: E402
from StrokeSegLib.volumes import ijk_to_ras  # noqa: E402

BUNDLED = REPO_ROOT / "Resources" / "Models" / "models.json"


@pytest.fixture(scope="module")
def case_dir(request, lesion_library):
    return phantom_case(request.config.cache, lesion_library)


@pytest.fixture
def tiny_models(tmp_path, monkeypatch):
    root = make_models_dir(tmp_path / "models")
    monkeypatch.setenv(paths.MODELS_ENV_VAR, str(root))
    return root


@pytest.fixture
def ctx(tmp_path):
    return create_context(tmp_path / "cache")


def load_nifti_case(ctx, case_dir, names=None):
    names = names or NODE_NAMES
    return {key: ctx.load_volume(case_dir / f"{key}.nii.gz", name=names[key]) for key in ("dwi", "adc", "b0")}


# -- detection -----------------------------------------------------------------------------
def test_dicom_sample_loads_and_is_detected_from_its_dicom_attributes(ctx, case_dir, tmp_path):
    sample = PhantomSample("test", seed=123, dicom=True)
    shutil.copytree(case_dir, case_folder(sample, tmp_path / "samples"))  # as if generated before
    generic = iter(["Series 1", "Series 2", "Series 3"])  # names say nothing: the headers must
    nodes = load_sample(sample, tmp_path / "samples", ctx.load_volume,
                        lambda files, name: ctx.load_dicom_series(files, name=next(generic)))
    assert all(n.GetAttribute("DICOM.instanceUIDs") for n in nodes.values())
    logic = StrokeSegLogic(ctx.scene)
    found = {d.node.GetID(): d for d in logic.detect_inputs()}
    assigned = {k: n.GetID() for k, n in logic.input_nodes().items()}
    assert assigned == {k: n.GetID() for k, n in nodes.items()}, {d.name: (d.key, d.reason) for d in found.values()}
    assert "series" in found[nodes["adc"].GetID()].reason.lower() or "dicom" in found[nodes["adc"].GetID()].reason.lower()


def test_detection_by_name_keeps_the_users_choice_and_skips_outputs(ctx, case_dir):
    nodes = load_nifti_case(ctx, case_dir)
    logic = StrokeSegLogic(ctx.scene)
    logic.params.inputDwi = nodes["b0"]  # the user's (odd) choice wins over detection
    logic.detect_inputs()
    chosen = logic.input_nodes()
    assert chosen["dwi"].GetID() == nodes["b0"].GetID()
    assert chosen["adc"].GetID() == nodes["adc"].GetID()
    assert "b0" not in chosen  # that volume is taken by the user's DWI slot
    logic.detect_inputs(overwrite=True)
    assert {k: n.GetID() for k, n in logic.input_nodes().items()} == {k: n.GetID() for k, n in nodes.items()}
    output = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "dwi lesion probability")
    output.SetAttribute(OUTPUT_ATTRIBUTE, "probability")
    output.SetAndObserveImageData(nodes["dwi"].GetImageData())
    assert output.GetID() not in {d.node.GetID() for d in detect_scene(ctx.scene)}


# -- model choice ------------------------------------------------------------------------------
def test_model_choice_follows_the_inputs_present(ctx, case_dir, tiny_models):
    nodes = load_nifti_case(ctx, case_dir)
    logic = StrokeSegLogic(ctx.scene)
    logic.params.inputB0 = nodes["b0"]
    with pytest.raises(ModelError, match="no bundled model fits"):
        logic.selected_card()
    logic.params.inputDwi = nodes["dwi"]  # dwi + b0: ADC can be derived
    card = logic.selected_card()
    assert card.id == "dwi-tiny"
    assert set(logic.gather_images(card)) == {"dwi", "b0"}
    logic.params.inputAdc = nodes["adc"]
    assert set(logic.gather_images()) == {"dwi", "adc"}
    logic.params.model = "no-such-model"
    with pytest.raises(ModelError, match="unknown model"):
        logic.selected_card()
    logic.params.model = "dwi-tiny"
    logic.apply_model_defaults(logic.selected_card())
    assert (logic.params.threshold, logic.params.closingMm) == (0.5, 2.0)


# -- the worker job ----------------------------------------------------------------------------
def test_job_runs_off_the_main_thread_and_its_result_lands_on_the_reference_grid(ctx, case_dir, tiny_models):
    nodes = load_nifti_case(ctx, case_dir)
    logic = StrokeSegLogic(ctx.scene)
    logic.detect_inputs()
    job = logic.create_job(device="cpu")
    seen_threads = []
    original = job._progress
    job._progress = lambda f, m: (seen_threads.append(threading.current_thread()), original(f, m))
    job.start()
    assert job.wait(120) and job.error is None, job.error
    events = job.poll()
    assert events and events[-1].fraction == 1.0
    assert [e.fraction for e in events] == sorted(e.fraction for e in events)
    assert seen_threads and all(t is not threading.main_thread() for t in seen_threads)
    update = logic.apply_result(job.result)
    params = logic.params
    assert params.referenceVolume.GetID() == nodes["dwi"].GetID()
    assert np.array_equal(ijk_to_ras(params.probabilityVolume), ijk_to_ras(nodes["dwi"]))
    np.testing.assert_array_equal(read_mask(params.segmentation, update.segment_id, nodes["dwi"]), job.result.mask.array)
    assert logic.stored_report()["model"]["id"] == "dwi-tiny"


def test_cancelled_job_leaves_the_scene_untouched(ctx, case_dir, tiny_models):
    load_nifti_case(ctx, case_dir)
    logic = StrokeSegLogic(ctx.scene)
    logic.detect_inputs()
    before = ctx.scene.GetNumberOfNodes()
    job = logic.create_job(device="cpu")
    job.cancel()
    job.start()
    assert job.wait(120)
    assert job.cancelled and job.result is None and job.error == "cancelled"
    assert ctx.scene.GetNumberOfNodes() == before and not logic.has_result()


def test_unusable_volumes_are_refused_before_the_job_naming_the_volume(ctx, case_dir, tiny_models):
    nodes = load_nifti_case(ctx, case_dir)
    logic = StrokeSegLogic(ctx.scene)
    logic.detect_inputs()
    slicer.util.arrayFromVolume(nodes["adc"])[:] = 0
    with pytest.raises(InputError, match="ADC map: volume is all zero"):
        logic.create_job(device="cpu")


@pytest.mark.parametrize("problem", ["nan", "qform-sform"])
def test_what_slicers_nifti_reader_hides_is_refused(problem, ctx, case_dir, tiny_models, tmp_path):
    """Slicer reads NIfTI through ITK: NaN voxels arrive as 0 and a qform/sform disagreement is
    settled one way silently. The file decides while the node is as read; an edited node is the
    user's data and is taken as it is."""
    import nibabel as nib

    img = nib.load(str(case_dir / "adc.nii.gz"))
    data = np.asarray(img.dataobj, dtype=np.float32)
    bad = tmp_path / "adc.nii.gz"
    if problem == "nan":
        data[:, :, data.shape[2] // 2] = np.nan
        out = nib.Nifti1Image(data, img.affine)
        word = f"ADC map: volume contains {data.shape[0] * data.shape[1]} NaN/Inf voxels"
    else:
        out = nib.Nifti1Image(data, None)
        shifted = img.affine.copy()
        shifted[0, 3] += 10.0
        out.set_qform(img.affine, code=1)
        out.set_sform(shifted, code=2)
        word = "ADC map: its qform and sform place the volume 10.0 mm apart"
    nib.save(out, str(bad))
    nodes = {key: ctx.load_volume(case_dir / f"{key}.nii.gz", name=NODE_NAMES[key]) for key in ("dwi", "b0")}
    nodes["adc"] = ctx.load_volume(bad, name=NODE_NAMES["adc"])
    if problem == "nan":
        assert not np.isnan(slicer.util.arrayFromVolume(nodes["adc"])).any()  # what ITK made of it
    logic = StrokeSegLogic(ctx.scene)
    logic.detect_inputs()
    logic.params.inputAdc = nodes["adc"]
    with pytest.raises(InputError, match=re.escape(word)):
        logic.create_job(device="cpu")
    if problem == "nan":  # the user filled the NaN slice in Slicer: the node now holds their data
        slicer.util.arrayFromVolume(nodes["adc"])[:, :, :] += 0.0
        slicer.util.arrayFromVolumeModified(nodes["adc"])
        logic.create_job(device="cpu")


def test_job_errors_come_back_as_one_line(ctx, case_dir, tiny_models):
    load_nifti_case(ctx, case_dir)
    logic = StrokeSegLogic(ctx.scene)
    logic.detect_inputs()
    job = logic.create_job(device="cpu")
    del job.images["dwi"]  # e.g. the engine refuses what it was given
    job.start()
    assert job.wait(120)
    assert job.result is None and job.error and "\n" not in job.error and not job.cancelled
    assert "dwi" in job.error


# -- the bundled model -------------------------------------------------------------------------
@pytest.mark.skipif(not BUNDLED.is_file(), reason="no bundled model yet (Resources/Models/models.json missing)")
def test_bundled_dwi_model_segments_the_phantom_in_slicer(ctx, case_dir, monkeypatch):
    monkeypatch.delenv(paths.MODELS_ENV_VAR, raising=False)
    nodes = load_nifti_case(ctx, case_dir)
    logic = StrokeSegLogic(ctx.scene)
    logic.detect_inputs()
    assert logic.selected_card().family == "dwi"
    result = logic.segment(device="cpu")
    params = logic.params
    mask = read_mask(params.segmentation, params.lesionSegmentId, nodes["dwi"])
    np.testing.assert_array_equal(mask, result.mask.array)
    assert np.array_equal(ijk_to_ras(params.probabilityVolume), ijk_to_ras(nodes["dwi"]))
    truth = read_image(case_dir / "lesion.nii.gz")
    metrics = case_metrics(mask, truth.array, truth.spacing)
    truth_ml = float(truth.array.sum()) * truth.voxel_volume_ml
    report = logic.stored_report()
    assert metrics["dice"] >= 0.5, metrics
    assert abs(report["total_volume_ml"] - truth_ml) <= 0.5 * truth_ml, (report["total_volume_ml"], truth_ml)
