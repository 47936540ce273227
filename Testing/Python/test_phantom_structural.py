"""Structural phantoms: chronic stroke on T1 (ATLAS-like) and sub-acute T1/T2/FLAIR/DWI (SISS-like)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from strokeseg.image import resample_to
from strokeseg.io import read_image
from strokeseg.phantom import (GENERATOR_VERSION, STRUCTURAL_VERSION, generate_cases, lesion_split, simulate_siss,
                               simulate_t1, write_case)
from strokeseg.phantom.acquisition import rotation
from strokeseg.phantom.mr_signal import Contrast, draw_tissue_params
from strokeseg.phantom.structural import MPRAGE

# A 2 mm isotropic grid keeps every case at a second or two; high SNR for the contrast checks.
SMALL = {"grid": "iso", "spacing": (2.0, 2.0, 2.0), "size": (100, 110, 80)}
CLEAN = {"snr": 300, "distractors": False, "skull_strip": False, "sequence": "mprage"}


@pytest.fixture(scope="module")
def chronic():
    return simulate_t1(11, lesion_pattern="territorial", **SMALL, **CLEAN)


def _wm_level(img: np.ndarray, away: np.ndarray) -> float:
    """White matter: the brightest 40% of brain-intensity voxels away from the lesion (MPRAGE, no fat)."""
    v = img[away & (img > 0.5 * np.percentile(img[img > 0], 90)) & (img < 1.5 * np.percentile(img[img > 0], 90))]
    return float(np.median(v[v > np.percentile(v, 60)]))


def test_deterministic_per_seed_and_versions(chronic):
    a = simulate_t1(11, lesion_pattern="territorial", **SMALL, **CLEAN)
    assert a.images["t1"].array.tobytes() == chronic.images["t1"].array.tobytes()
    assert a.images["t1"].same_grid(chronic.images["t1"], tol=0)
    assert a.lesion.array.tobytes() == chronic.lesion.array.tobytes() and a.info == chronic.info
    b = simulate_t1(12, lesion_pattern="territorial", **SMALL, **CLEAN)
    assert b.images["t1"].array.tobytes() != a.images["t1"].array.tobytes()
    assert a.info["generator_version"] == STRUCTURAL_VERSION and GENERATOR_VERSION == "dwi-1.2"
    assert a.case_id == "t1-00011" and list(a.images) == ["t1"] and a.info["stage"] == "chronic"
    with pytest.raises(TypeError):
        simulate_t1(0, not_an_option=1)
    with pytest.raises(ValueError):
        simulate_t1(0, contrasts=("dwi",))


def test_signal_model_cavity_rim_wm_order():
    """Both T1 contrasts at both field strengths: CSF (cavity) < gliotic rim < WM, GM/WM realistic."""
    rng = np.random.default_rng(1)
    for field in (1.5, 3.0):
        tp = draw_tissue_params(rng, field)
        for c in (MPRAGE("mprage", te=3.0, tr=2300.0, ti=900.0), Contrast("se_t1", te=12.0, tr=550.0)):
            def s(name, t1_scale=1.0):
                return c(tp.pd[name], tp.t1[name] * t1_scale, tp.t2[name], tp.adc[name])

            wm, gm, csf = s("wm"), s("gm"), s("csf")
            rim_lo, rim_hi = s("wm", 1.45), s("wm", 1.15)
            assert csf < 0.5 * wm and csf < 0.7 * rim_lo  # SE T1: CSF ~0.3-0.45 of WM; MPRAGE ~0.15-0.3
            assert rim_lo <= rim_hi < 0.95 * wm
            assert 0.55 < gm / wm < 0.9, (field, c.kind, gm / wm)


def test_chronic_lesion_is_csf_dark_with_a_darker_than_wm_rim(chronic):
    # The same patient, scanner and noise without the infarct (every part of the simulation has
    # its own random stream): the lesion's effect is measured voxel by voxel against it.
    twin = simulate_t1(11, lesion_pattern="none", **SMALL, **CLEAN)
    assert not twin.lesion.array.any() and twin.info["subject"] == chronic.info["subject"]
    t1 = chronic.images["t1"].array.astype(float)
    before = np.maximum(twin.images["t1"].array.astype(float), 1.0)
    m = chronic.lesion.array > 0
    assert m.sum() > 200 and chronic.info["cavitated"]
    sp = chronic.images["t1"].spacing[0]
    depth = ndimage.distance_transform_edt(m) * sp  # mm from the lesion edge, inside the truth
    cavity = depth > chronic.info["rim_mm"] + sp
    rim = (depth > 0) & (depth <= sp)
    assert cavity.sum() > 20 and rim.sum() > 20
    wm = _wm_level(t1, ~ndimage.binary_dilation(m, iterations=5))
    assert np.median(t1[cavity]) < 0.5 * wm, np.median(t1[cavity]) / wm  # CSF-like (MPRAGE CSF 0.15-0.3 of WM)
    assert np.median(t1[cavity]) < 0.8 * np.median(t1[rim]) < 0.97 * wm
    # Against the same voxels before the infarct: the rim lost some signal, the cavity most.
    rim_change, cavity_change = np.median((t1 / before)[rim]), np.median((t1 / before)[cavity])
    assert cavity_change < 0.6 and cavity_change < rim_change < 0.97, (cavity_change, rim_change)
    assert 1.5 <= chronic.info["rim_mm"] <= 3.5 and chronic.info["cavity_volume_ml_1mm"] > 0


def test_ex_vacuo_ventricle_enlarges_on_the_lesion_side(chronic):
    assert chronic.info["ventricle_enlargement_ml"] > 0.3
    plain = simulate_t1(11, lesion_pattern="territorial", ex_vacuo=False, **SMALL, **CLEAN)
    assert plain.info["ventricle_enlargement_ml"] == 0 and np.array_equal(plain.lesion.array, chronic.lesion.array)
    img = chronic.images["t1"]
    diff = plain.images["t1"].array.astype(float) - img.array.astype(float)
    darker = diff > 0.3 * np.percentile(img.array[img.array > 0], 90)  # parenchyma turned CSF
    assert darker.sum() >= 5
    assert not (darker & (chronic.lesion.array > 0)).any()  # the ventricle grows outside the truth
    # Left-right position in the head (physical x; the head is rotated by only a few degrees).
    head = np.argwhere(img.array > 0)[:, ::-1].astype(float)
    centre_x = img.index_to_physical(head.mean(0, keepdims=True))[0, 0]
    les_x = img.index_to_physical(np.argwhere(chronic.lesion.array)[:, ::-1].astype(float))[:, 0].mean() - centre_x
    dark_x = img.index_to_physical(np.argwhere(darker)[:, ::-1].astype(float))[:, 0] - centre_x
    ipsi = np.sum(np.sign(dark_x) == np.sign(les_x))
    assert ipsi >= 0.9 * darker.sum(), (ipsi, darker.sum())


def test_truth_volume_in_case_json_matches_mask(chronic, tmp_path):
    folder = write_case(chronic, tmp_path)
    info = json.loads((folder / "case.json").read_text(encoding="utf-8"))
    mask = read_image(folder / "lesion.nii.gz")
    assert mask.same_grid(read_image(folder / "t1.nii.gz"))
    assert info["lesion_volume_ml"] == pytest.approx(float(mask.array.sum()) * mask.voxel_volume_ml, rel=1e-3, abs=1e-3)
    assert info["lesion_volume_ml"] == pytest.approx(info["lesion_volume_ml_1mm"], rel=0.35)
    assert info["seed"] == 11 and info["modality"] == "t1" and info["inputs"] == ["t1"]
    assert info["territories"] and info["hemispheres"] and info["pattern"] == "territorial"
    assert info["acquisition"]["series"]["t1"]["sequence"] == "mprage"


def test_oblique_thick_slice_grid_agrees_with_the_1mm_truth():
    thick = simulate_t1(5, lesion_pattern="territorial", grid="clinical", spacing=(0.9, 0.9, 5.0), tilt_deg=15.0,
                        size=(200, 200, 26), **CLEAN)
    img = thick.images["t1"]
    assert img.size == (200, 200, 26) and np.allclose(img.spacing, (0.9, 0.9, 5.0))
    assert np.allclose(np.asarray(img.direction).reshape(3, 3), rotation(15.0, 0.0, 0.0), atol=1e-9)
    assert thick.lesion.same_grid(img, tol=0) and thick.lesion.array.dtype == np.uint8
    assert thick.info["acquisition"]["oblique_deg"] == pytest.approx(15.0, abs=0.01)
    # The same patient on a 1 mm-class isotropic grid: the truths overlap in physical space.
    iso = simulate_t1(5, lesion_pattern="territorial", grid="iso", spacing=(1.5, 1.5, 1.5), size=(112, 124, 92), **CLEAN)
    assert iso.info["lesion_volume_ml_1mm"] == thick.info["lesion_volume_ml_1mm"]
    on_thick = resample_to(iso.lesion.with_array(iso.lesion.array.astype(np.float32)), img).array >= 0.5
    a, b = on_thick, thick.lesion.array > 0
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice > 0.7, dice
    # A random clinical grid: oblique, 3-6 mm slices, 0.65-1 mm in plane.
    c = simulate_t1(6, lesion_pattern="none", grid="clinical", distractors=False)
    acq = c.info["acquisition"]
    assert 3.0 <= acq["slice_thickness_mm"] <= 6.0 and 0.6 <= acq["spacing_mm"][0] <= 1.0
    d = np.asarray(c.images["t1"].direction).reshape(3, 3)
    assert np.allclose(d.T @ d, np.eye(3), atol=1e-6) and np.linalg.det(d) > 0
    assert not c.lesion.array.any() and c.info["lesion_volume_ml"] == 0


def test_cli_writes_a_case_folder_the_engine_loads(tmp_path):
    from strokeseg.cli import main
    from strokeseg.modality import find_case_inputs, load_inputs

    assert main(["phantom", "--modality", "t1", "--seed", "4", "--out", str(tmp_path), "--grid", "clinical",
                 "--no-skull-strip", "--deface", "-q"]) == 0
    folder = tmp_path / "t1-00004"
    assert sorted(p.name for p in folder.iterdir()) == ["case.json", "lesion.nii.gz", "t1.nii.gz"]
    files = find_case_inputs(folder)
    assert list(files) == ["t1"]
    images = load_inputs(files)  # passes the modality content checks (T1: fluid darker than tissue)
    info = json.loads((folder / "case.json").read_text(encoding="utf-8"))
    assert info["acquisition"]["defaced"] and not info["acquisition"]["skull_stripped"]
    assert read_image(folder / "lesion.nii.gz").same_grid(images["t1"])
    assert main(["phantom", "--modality", "dwi", "--seed", "4", "--out", str(tmp_path), "--deface"]) == 2


def test_siss_four_inputs_on_one_grid_lesion_bright_on_flair(tmp_path):
    from strokeseg.modality import find_case_inputs, load_inputs

    case = simulate_siss(8, lesion_pattern="territorial", **SMALL, snr=300, distractors=False)
    assert list(case.images) == ["t1", "t2", "flair", "dwi"] and case.info["stage"] == "subacute"
    ref = case.images["flair"]
    for img in [*case.images.values(), case.lesion]:
        assert img.same_grid(ref, tol=0)
    m = case.lesion.array > 0
    assert m.sum() > 100
    core = ndimage.binary_erosion(m, iterations=1)
    away = ~ndimage.binary_dilation(m, iterations=4)
    assert case.info["acquisition"]["skull_stripped"]  # as SISS distributes it
    assert case.info["acquisition"]["series"]["t1"]["sequence"] == "mprage"
    t1 = case.images["t1"].array.astype(float)
    wm_t1 = _wm_level(t1, away)
    wm = away & (t1 > 0.9 * wm_t1)  # normal white matter: the brightest tissue on MPRAGE

    def ratio(key: str) -> float:
        a = case.images[key].array.astype(float)
        return float(np.median(a[core])) / float(np.median(a[wm]))

    assert ratio("flair") > 1.2 and ratio("t2") > 1.2 and ratio("dwi") > 1.1  # oedema; DWI still bright
    assert 0.4 < ratio("t1") < 0.97  # mildly hypointense, not a cavity
    folder = write_case(case, tmp_path)
    assert set(load_inputs(find_case_inputs(folder))) == {"t1", "t2", "flair", "dwi"}


def test_library_shapes_respect_the_split(lesion_library):
    if lesion_library is None:
        pytest.skip("no lesion library on this machine")
    case = simulate_t1(2, lesion_library=lesion_library, split="val", lesion_pattern="lacunar", **SMALL)
    assert case.info["lesion_source"] == "library" and case.info["split"] == "val"
    assert case.info["library_files"] and all(lesion_split(f) == "val" for f in case.info["library_files"])
    assert case.case_id == "t1-val-00002"


def test_training_data_layer_builds_t1_phantoms(tmp_path):
    from strokeseg_training.data import build_split, load_volumes

    cfg = {
        "name": "t1-test",
        "card": {"id": "t1-test", "version": "0.0.1", "family": "t1", "inputs": {"required": ["t1"], "optional": []},
                 "target_spacing": [3.0, 3.0, 3.0], "patch_size": [16, 16, 16],
                 "normalisation": {"t1": {"method": "zscore", "clip": 6.0}},
                 "network": {"name": "monai.UNet", "args": {}}, "output": {"activation": "sigmoid", "channels": 1}},
        "data": {"source": "phantom", "modality": "t1", "seed": 7, "n_train": 1, "n_val": 1, "cache_dir": str(tmp_path),
                 "phantom_options": {**SMALL, "lesion_pattern": "territorial"}},
    }
    files, case_root = build_split(cfg, "val", workers=1)
    assert len(files) == 1 and files[0].name.startswith("t1-")
    (vol,) = load_volumes(files)
    assert vol.image.shape[0] == 1 and vol.image.shape[1:] == vol.label.shape and vol.label.any()
    assert [p.name for p in case_root.iterdir()] == [files[0].stem]
    assert (case_root / files[0].stem / "t1.nii.gz").is_file()
    with pytest.raises(ValueError):
        generate_cases("ncct", 0, tmp_path)
