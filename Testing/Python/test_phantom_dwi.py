"""Simulated acute-stroke DWI patients: determinism, geometry, contrast, truth, splits, writing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from strokeseg.errors import InputError
from strokeseg.io import read_image
from strokeseg.phantom import PhantomCase, generate_cases, lesion_split, simulate_dwi, write_case
from strokeseg.phantom.library import entries_for
from strokeseg.phantom.mr_signal import B_VALUE, Contrast, draw_tissue_params

# Small, fast grids keep the whole file quick; the contrast test uses a high SNR.
SMALL = {"spacing": (2.0, 2.0, 5.0), "size": (112, 112, 26)}


@pytest.fixture(scope="module")
def case_proc() -> PhantomCase:
    return simulate_dwi(7, lesion_pattern="territorial", **SMALL)


@pytest.fixture(scope="module")
def case_lib(lesion_library) -> PhantomCase | None:
    if lesion_library is None:
        return None
    return simulate_dwi(3, lesion_library=lesion_library, split="train", lesion_pattern="territorial")


def test_deterministic_per_seed(case_proc):
    a = simulate_dwi(7, lesion_pattern="territorial", **SMALL)
    for key in ("dwi", "b0", "adc"):
        assert a.images[key].array.tobytes() == case_proc.images[key].array.tobytes()
        assert a.images[key].same_grid(case_proc.images[key], tol=0)
    assert a.lesion.array.tobytes() == case_proc.lesion.array.tobytes()
    assert a.info == case_proc.info
    c = simulate_dwi(8, lesion_pattern="territorial", **SMALL)
    assert a.images["dwi"].array.tobytes() != c.images["dwi"].array.tobytes()


def test_grids_consistent_and_oblique(case_proc):
    dwi = case_proc.images["dwi"]
    for key in ("b0", "adc"):
        assert case_proc.images[key].same_grid(dwi, tol=0)
    assert case_proc.lesion.same_grid(dwi, tol=0)
    assert case_proc.lesion.array.dtype == np.uint8
    assert dwi.size == SMALL["size"] and np.allclose(dwi.spacing, SMALL["spacing"])
    # A random clinical grid: oblique direction cosines, 20-40 slices, 3-6 mm thick.
    c = simulate_dwi(5, lesion_pattern="none", distractors=False)
    assert not np.allclose(c.images["dwi"].direction, np.eye(3).ravel(), atol=1e-3)
    d = np.asarray(c.images["dwi"].direction).reshape(3, 3)
    assert np.allclose(d.T @ d, np.eye(3), atol=1e-6) and np.linalg.det(d) > 0
    acq = c.info["acquisition"]
    assert 20 <= acq["slices"] <= 40 and 3.0 <= acq["slice_thickness_mm"] <= 6.0
    assert 0.9 <= acq["spacing_mm"][0] <= 2.0


def test_adc_contrast_lesion_and_csf():
    c = simulate_dwi(21, lesion_pattern="territorial", snr=400, artefacts=False, distractors=False,
                     spacing=(1.8, 1.8, 4.0), size=(128, 128, 36))
    les = c.lesion.array > 0
    assert les.sum() > 50
    adc = c.images["adc"].array.astype(float)
    dwi = c.images["dwi"].array.astype(float)
    b0 = c.images["b0"].array.astype(float)
    # Normal parenchyma: ADC in the brain range, away from the lesion (dilated) and from CSF.
    from scipy import ndimage

    near = ndimage.binary_dilation(les, iterations=3)
    normal = (adc > 550) & (adc < 1000) & ~near
    med_normal = np.median(adc[normal])
    assert 650 < med_normal < 950
    core = ndimage.binary_erosion(les, iterations=1)
    core = core if core.sum() > 20 else les
    ratio = np.median(adc[core]) / med_normal
    # Drawn reductions are 30-60%; the softer rim and partial volume with CSF make it a bit milder.
    assert 0.35 < ratio < 0.8, ratio
    assert all(0.3 <= r <= 0.6 for r in c.info["adc_reduction"])
    assert abs(ratio - (1 - np.mean(c.info["adc_reduction"]))) < 0.2
    assert np.median(dwi[core]) > 1.3 * np.median(dwi[normal])  # bright on b1000
    # CSF: the brightest b0 voxels inside the head have free-water ADC (~3000e-6 mm^2/s).
    csf = b0 > np.percentile(b0[b0 > 0], 99.0)
    assert np.median(adc[csf]) > 2200
    assert 700 < c.info["tissue"]["adc_mm2_s"]["wm"] * 1e6 < 800


def test_distractor_and_lesion_contrast_physics():
    """Signal model: acute lesion bright on DWI with low ADC; T2 shine-through and WMH bright on
    DWI but with normal-to-high ADC; a chronic cavity dark on DWI with CSF-like ADC."""
    rng = np.random.default_rng(0)
    for field in (1.5, 3.0):
        tp = draw_tissue_params(rng, field)
        b0c, dwic = Contrast("b0", 90.0, 5000.0), Contrast("dwi", 90.0, 5000.0, b=B_VALUE)

        def sig(t2_scale=1.0, adc_scale=1.0, t2=None, adc=None):
            args = (tp.pd["wm"], tp.t1["wm"], t2 or tp.t2["wm"] * t2_scale, adc or tp.adc["wm"] * adc_scale)
            s0, sb = b0c(*args), dwic(*args)
            return sb, np.log(s0 / sb) / B_VALUE

        wm_dwi, wm_adc = sig()
        acute_dwi, acute_adc = sig(t2_scale=1.1, adc_scale=0.55)
        shine_dwi, shine_adc = sig(t2=250.0, adc_scale=1.1)
        wmh_dwi, wmh_adc = sig(t2=150.0, adc_scale=1.3)
        csf_dwi, csf_adc = dwic(1.0, tp.t1["csf"], tp.t2["csf"], tp.adc["csf"]), tp.adc["csf"]
        assert acute_dwi > 1.3 * wm_dwi and acute_adc < 0.7 * wm_adc
        assert shine_dwi > 1.3 * wm_dwi and shine_adc >= wm_adc
        assert wmh_dwi > wm_dwi and wmh_adc > wm_adc
        assert csf_dwi < wm_dwi and csf_adc > 3 * wm_adc


def test_volume_in_case_json_matches_mask(case_proc, tmp_path):
    folder = write_case(case_proc, tmp_path)
    info = json.loads((folder / "case.json").read_text(encoding="utf-8"))
    mask = read_image(folder / "lesion.nii.gz")
    vol = float(mask.array.sum()) * mask.voxel_volume_ml
    assert info["lesion_volume_ml"] == pytest.approx(vol, rel=1e-3, abs=1e-3)
    assert info["lesion_volume_ml"] > 0 and info["lesion_volume_ml_1mm"] > 0
    # Partial-volume voxelisation at >= 0.5 keeps the volume close to the exact 1 mm volume.
    assert info["lesion_volume_ml"] == pytest.approx(info["lesion_volume_ml_1mm"], rel=0.35)
    assert info["pattern"] == "territorial" and info["territories"] and info["hemispheres"]
    assert info["n_lesions"] >= 1 and info["seed"] == 7 and info["generator_version"]


def test_written_folder_reads_back(case_proc, tmp_path):
    folder = write_case(case_proc, tmp_path)
    assert folder.name == case_proc.case_id == "dwi-00007"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["adc.nii.gz", "b0.nii.gz", "case.json", "dwi.nii.gz", "lesion.nii.gz"]
    dwi = read_image(folder / "dwi.nii.gz")
    assert dwi.same_grid(case_proc.images["dwi"])
    assert np.array_equal(dwi.array, case_proc.images["dwi"].array)
    les = read_image(folder / "lesion.nii.gz")
    assert les.same_grid(dwi) and np.array_equal(les.array, case_proc.lesion.array)


def test_procedural_mode_and_healthy_control(case_proc):
    assert case_proc.info["lesion_source"] == "procedural" and case_proc.info["library_files"] == []
    assert case_proc.info["territory_atlas"] in ("atlas", "procedural")
    healthy = simulate_dwi(3, lesion_pattern="none", **SMALL)
    assert not healthy.lesion.array.any()
    assert healthy.info["lesion_volume_ml"] == 0 and healthy.info["pattern"] == "none"
    assert healthy.info["n_lesions"] == 0 and healthy.info["hemispheres"] == []
    assert healthy.images["dwi"].array.any()


def test_procedural_territories_without_atlas():
    c = simulate_dwi(13, lesion_pattern="territorial", atlas=False, distractors=False, **SMALL)
    assert c.info["territory_atlas"] == "procedural"
    assert c.lesion.array.any() and c.info["territories"]
    assert all(t.endswith(("left", "right")) for t in c.info["territories"])


def test_embolic_pattern_and_distractors_leave_truth_unchanged():
    kw = dict(lesion_pattern="embolic", **SMALL)
    with_d = simulate_dwi(11, **kw)
    without = simulate_dwi(11, distractors=False, **kw)
    assert with_d.info["pattern"] == "embolic" and with_d.info["n_lesions_1mm"] >= 2
    kinds = {d["kind"] for d in with_d.info["distractors"]}
    assert "wmh" in kinds and len(kinds) >= 2
    assert without.info["distractors"] == []
    # Distractors change the image, never the truth.
    assert np.array_equal(with_d.lesion.array, without.lesion.array)
    assert with_d.lesion.array.any()
    assert not np.array_equal(with_d.images["b0"].array, without.images["b0"].array)


def test_lesion_split_deterministic_and_proportions(lesion_library):
    assert lesion_split("bwsrsub-1001_lesion.nii.gz") == lesion_split("/elsewhere/bwsrsub-1001_lesion.nii.gz")
    names = [f"bwsrsub-{i}_lesion.nii.gz" for i in range(2000)]
    frac = {s: sum(lesion_split(n) == s for n in names) / len(names) for s in ("train", "val", "test")}
    assert abs(frac["train"] - 0.7) < 0.05 and abs(frac["val"] - 0.1) < 0.04 and abs(frac["test"] - 0.2) < 0.04


def test_split_exclusivity(lesion_library, case_lib):
    if lesion_library is None:
        pytest.skip("no lesion library (../shared/data absent)")
    lib = str(lesion_library.resolve())
    val_test = {e.path.name for e in entries_for(lib, "val") + entries_for(lib, "test")}
    train = {e.path.name for e in entries_for(lib, "train")}
    assert val_test and train and not (val_test & train)
    assert case_lib.info["lesion_source"] == "library" and case_lib.info["library_files"]
    assert all(lesion_split(f) == "train" for f in case_lib.info["library_files"])
    for s in range(2):
        c = simulate_dwi(s, lesion_library=lesion_library, split="val", **SMALL)
        assert all(f not in train for f in c.info["library_files"])
        assert c.case_id == f"dwi-val-{s:05d}"
    assert case_lib.lesion.array.any() and case_lib.info["lesion_volume_ml"] > 0


def test_split_seed_spaces_independent():
    a = simulate_dwi(2, split="train", lesion_pattern="none", **SMALL)
    b = simulate_dwi(2, split="val", lesion_pattern="none", **SMALL)
    assert a.images["b0"].array.tobytes() != b.images["b0"].array.tobytes()


def test_flair_on_its_own_grid_and_generate_cases(tmp_path):
    paths = generate_cases("dwi", 40, tmp_path, count=2, progress=False, flair=True, lesion_pattern="lacunar", **SMALL)
    assert [p.name for p in paths] == ["dwi-00040", "dwi-00041"]
    fl = read_image(paths[0] / "flair.nii.gz")
    dwi = read_image(paths[0] / "dwi.nii.gz")
    assert fl.array.any() and not fl.same_grid(dwi)
    with pytest.raises(ValueError, match="not available yet"):
        generate_cases("ctp", 0, tmp_path)
    with pytest.raises(ValueError):
        simulate_dwi(0, lesion_pattern="giant")
    with pytest.raises(TypeError):
        simulate_dwi(0, not_an_option=1)
    with pytest.raises(InputError, match="missing"):
        simulate_dwi(0, lesion_library=tmp_path / "missing")
    with pytest.raises(ValueError):
        simulate_dwi(0, split="training")
