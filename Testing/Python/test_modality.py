"""Modality detection (names, DICOM, intensities), case folders and input loading."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from engine_fixtures import write_dicom_series
from strokeseg import io
from strokeseg.errors import InputError
from strokeseg.image import Image
from strokeseg.modality import (
    FOUR_D_KEYS,
    MODALITY_KEYS,
    Detection,
    detect_from_dicom,
    detect_from_intensity,
    detect_from_name,
    detect_modality,
    find_case_inputs,
    load_inputs,
    require_inputs,
)

# -- synthetic heads ---------------------------------------------------------------------
# Tissue values per contrast: scalp, skull, CSF, GM, WM, lesion, background, noise SD.
# ADC in 1e-6 mm²/s (tissue 700-900, CSF ~3100, lesion ~0.5x); CT in HU.
TISSUE = {
    "adc": (0, 0, 3100, 850, 720, 420, 0, 40),
    "adc_1e3": (0, 0, 3.1, 0.85, 0.72, 0.42, 0, 0.04),
    "dwi": (40, 5, 22, 120, 100, 230, 3, 4),
    "b0": (90, 5, 700, 300, 250, 330, 3, 8),
    "t1": (700, 60, 150, 450, 650, 380, 4, 10),
    "flair": (400, 20, 40, 350, 280, 520, 4, 8),
    "ncct": (40, 1100, 8, 40, 28, 18, -1000, 4),
}
SHAPE = (18, 44, 44)
SPACING = (3.5, 3.5, 6.0)


def _labels(shape=SHAPE, lesion_radius=0.15) -> np.ndarray:
    """0 background, 1 scalp, 2 skull, 3 CSF (sulci + ventricles), 4 GM, 5 WM, 6 lesion."""
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt((x / 0.85) ** 2 + (y / 0.95) ** 2 + (z / 0.95) ** 2)
    lab = np.zeros(shape, np.uint8)
    for value, radius in ((1, 1.0), (2, 0.93), (3, 0.86), (4, 0.83), (5, 0.68)):
        lab[r < radius] = value
    ventricles = ((np.abs(x) - 0.14) / 0.08) ** 2 + (y / 0.35) ** 2 + (z / 0.45) ** 2 < 1
    lab[ventricles & (r < 0.68)] = 3
    lesion = ((x - 0.4) / lesion_radius) ** 2 + ((y + 0.1) / lesion_radius) ** 2 + (z / (2 * lesion_radius)) ** 2 < 1
    lab[lesion & (lab >= 4)] = 6
    return lab


def head(kind: str, seed: int = 0, lesion_radius: float = 0.15, tissue: tuple | None = None) -> Image:
    v = tissue or TISSUE[kind]
    lab = _labels(lesion_radius=lesion_radius)
    table = np.array([v[6], v[0], v[1], v[2], v[3], v[4], v[5]], np.float32)
    noise = np.random.default_rng(seed).normal(0.0, v[7], lab.shape).astype(np.float32)
    arr = table[lab] + noise
    if kind != "ncct":
        arr = np.abs(arr)  # MR magnitude
    if kind.startswith("adc"):
        arr[lab <= 2] = 0  # scanners mask ADC outside the brain
    return Image(arr.astype(np.float32), SPACING, (-70.0, -80.0, -50.0))


def series(kind: str, frames: int = 20) -> Image:
    """4D perfusion: CT (HU) gains up to 40 HU in brain, MR (DSC) loses up to 40% signal."""
    base = head("ncct" if kind == "ctp" else "b0")
    brain = _labels() >= 3
    t = np.arange(frames, dtype=np.float32)
    curve = (t / 6.0) ** 3 * np.exp(-(t - 6.0) / 2.0)  # gamma-variate bolus
    curve /= curve.max()
    out = []
    for c in curve:
        frame = base.array.copy()
        frame[brain] = frame[brain] + 40.0 * c if kind == "ctp" else frame[brain] * (1.0 - 0.4 * c)
        out.append(frame)
    return Image(np.stack(out), base.spacing, base.origin, base.direction, {"times": list(map(float, t * 1.5))})


# -- names ---------------------------------------------------------------------------------
NAMES = [
    ("dwi.nii.gz", "dwi"), ("DWI_b1000", "dwi"), ("ep2d_diff_TRACEW", "dwi"), ("ep2d_diff_3scan_trace_p2_TRACEW", "dwi"),
    ("AX DWI b=1000", "dwi"), ("sub-01_dwi", "dwi"), ("sub-strokecase0001_ses-0001_dwi.nii.gz", "dwi"),
    ("VSD.Brain.XX.O.MR_DWI.35512", "dwi"), ("dwi_b0_b1000", "dwi"),
    ("ADC", "adc"), ("dADC", "adc"), ("Apparent Diffusion Coefficient (mm²/s)", "adc"),
    ("Apparent Diffusion Coefficient (mm2/s)", "adc"), ("ep2d_diff_3scan_trace_p2_ADC", "adc"), ("dwi_adc", "adc"),
    ("sub-01_adc", "adc"), ("sub-strokecase0001_ses-0001_adc.nii.gz", "adc"), ("ADC_map", "adc"),
    ("b0", "b0"), ("DWI_b0", "b0"), ("ep_b0", "b0"),
    ("FLAIR", "flair"), ("sub-01_FLAIR", "flair"), ("sub-strokecase0001_ses-0001_flair.nii.gz", "flair"),
    ("T2_FLAIR", "flair"), ("t2_tirm_tra_dark-fluid", "flair"), ("VSD.Brain.XX.O.MR_Flair.1", "flair"),
    ("t1_mprage", "t1"), ("sub-01_T1w", "t1"), ("T1W_3D_TFE", "t1"), ("MPRAGE", "t1"),
    ("sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz", "t1"),
    ("t2_tse_tra", "t2"), ("sub-01_T2w", "t2"), ("VSD.Brain.XX.O.MR_T2.7", "t2"),
    ("CBF", "cbf"), ("rCBF", "cbf"), ("SMIR.Brain.XX.O.CT_CBF.345", "cbf"), ("SMIR.Brain.XX.O.CT_CBV.345", "cbv"),
    ("VSD.Brain.XX.O.MR_rCBV.2", "cbv"), ("SMIR.Brain.XX.O.CT_MTT.123456", "mtt"), ("Tmax", "tmax"),
    ("SMIR.Brain.XX.O.CT_Tmax.345", "tmax"), ("Tmax (s)", "tmax"), ("TTP", "ttp"), ("VSD.Brain.XX.O.MR_TTP.4", "ttp"),
    ("perf", "pwi"), ("ep2d_perf_p2", "pwi"), ("VSD.Brain.XX.O.MR_4DPWI.9", "pwi"), ("DSC_perfusion", "pwi"),
    ("CTP 4D", "ctp"), ("SMIR.Brain.XX.O.CT_4DPWI.345", "ctp"), ("CT perfusion", "ctp"),
    ("SMIR.Brain.XX.O.CT.345", "ncct"), ("NCCT", "ncct"), ("Head CT", "ncct"),
    # not inputs: masks, derived diffusion maps, contrast T1, susceptibility, angiography, unknown
    ("lesion", None), ("SMIR.Brain.XX.O.OT.345", None), ("sub-strokecase0001_ses-0001_msk", None),
    ("sub-01_label-L_desc-T1lesion_mask", None), ("ep2d_diff_3scan_trace_p2_eADC", None), ("FA", None),
    ("t1ce", None), ("T1C", None), ("t1_mprage_post", None), ("T2*", None), ("swi", None), ("CTA head", None),
    ("localizer_301", None), ("B0map", None),
]


@pytest.mark.parametrize("name,key", NAMES)
def test_detect_from_name(name, key):
    det = detect_from_name(name)
    assert isinstance(det, Detection)
    assert det.key == key, det.reason
    assert name in det.reason or name[:57] in det.reason
    if key is not None:
        assert det.confidence >= 0.7
    assert detect_from_name(name.upper()).key == key and detect_from_name(name.lower()).key == key


def test_name_confidence_and_case_insensitivity():
    assert detect_from_name("dwi").confidence == 1.0
    assert detect_from_name("dWi_AdC").key == "adc"
    assert detect_from_name("localizer").confidence == 0.0
    assert detect_from_name("lesion").confidence >= 0.9  # recognised as "not an input"
    assert detect_from_name("perf").confidence < detect_from_name("PWI").confidence
    assert set(MODALITY_KEYS) >= set(FOUR_D_KEYS)
    for key in MODALITY_KEYS:
        assert detect_from_name(f"{key}.nii.gz").key == key
        assert detect_from_name(key.upper()).key == key


# -- DICOM ---------------------------------------------------------------------------------
@pytest.mark.parametrize("meta,key", [
    ({"dicom_modality": "MR", "image_type": "DERIVED\\PRIMARY\\DIFFUSION\\ADC", "series_description": "ep2d_diff"}, "adc"),
    ({"dicom_modality": "MR", "image_type": "DERIVED\\PRIMARY\\DIFFUSION\\TRACEW", "b_value": "1000"}, "dwi"),
    ({"dicom_modality": "MR", "image_type": "DERIVED\\PRIMARY\\DIFFUSION\\TRACEW", "b_value": "0"}, "b0"),
    ({"dicom_modality": "MR", "series_description": "Apparent Diffusion Coefficient (mm2/s)"}, "adc"),
    ({"dicom_modality": "MR", "series_description": "dADC"}, "adc"),
    ({"dicom_modality": "MR", "series_description": "DWI", "ge_b_value": "1000000000\\8\\0\\0"}, "dwi"),
    ({"dicom_modality": "MR", "series_description": "AX DIFFUSION", "ge_b_value": "1000\\8\\0\\0"}, "dwi"),
    ({"dicom_modality": "MR", "series_description": "series 5", "b_value": "1000"}, "dwi"),
    ({"dicom_modality": "MR", "sequence_name": "*ep_b1000t"}, "dwi"),
    ({"dicom_modality": "MR", "siemens_b_value": "0"}, "b0"),
    ({"dicom_modality": "CT", "series_description": "Head 5mm"}, "ncct"),
    ({"dicom_modality": "CT", "series_description": "Perfusion 4D"}, "ctp"),
    ({"dicom_modality": "MR", "series_description": "AX 2", "repetition_time": "9000", "inversion_time": "2500",
      "echo_time": "90", "scanning_sequence": "SE\\IR"}, "flair"),
    ({"dicom_modality": "MR", "series_description": "sag 3", "repetition_time": "450", "echo_time": "12",
      "scanning_sequence": "SE"}, "t1"),
    ({"dicom_modality": "MR", "series_description": "survey"}, None),
    ({"dicom_modality": "MR", "image_type": "DERIVED\\PRIMARY\\DIFFUSION\\EADC"}, None),
])
def test_detect_from_dicom_meta(meta, key):
    det = detect_from_dicom(meta)
    assert det.key == key, det.reason
    assert det.reason and "\n" not in det.reason


def test_dicom_series_detection_end_to_end(tmp_path):
    adc = head("adc")
    write_dicom_series(adc, tmp_path / "series_7", {
        "0008|0060": "MR", "0008|103e": "ep2d_diff_3scan_trace_p2_ADC", "0008|0008": "DERIVED\\PRIMARY\\DIFFUSION\\ADC"})
    dwi = head("dwi")
    write_dicom_series(dwi, tmp_path / "series_6", {
        "0008|0060": "MR", "0008|103e": "ep2d_diff_3scan_trace_p2", "0018|9087": "1000"})
    img7 = io.read_image(tmp_path / "series_7")
    img6 = io.read_image(tmp_path / "series_6")
    assert detect_from_dicom(img7.meta).key == "adc"
    assert detect_from_dicom(img6.meta).key == "dwi"
    det = detect_modality(img7, "series_7")  # the folder name says nothing; DICOM does
    assert det.key == "adc" and det.confidence >= 0.9 and "ImageType" in det.reason
    # A DICOM folder given under the wrong key is refused on its tags.
    with pytest.raises(InputError, match="given as dwi but looks like adc") as e:
        load_inputs({"dwi": tmp_path / "series_7"})
    assert "series_7" in str(e.value) and "\n" not in str(e.value)
    images = load_inputs({"adc": tmp_path / "series_7", "dwi": tmp_path / "series_6"})
    assert images["adc"].meta["modality"] == "adc" and images["adc"].array.shape == SHAPE


# -- intensities ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind,key,min_conf", [
    ("adc", "adc", 0.8), ("adc_1e3", "adc", 0.8), ("ncct", "ncct", 0.9), ("dwi", "dwi", 0.3), ("t1", "dwi", 0.3),
])
def test_detect_from_intensity_3d(kind, key, min_conf):
    det = detect_from_intensity(head(kind))
    assert det.key == key, det.reason
    assert det.confidence >= min_conf
    assert det.reason.startswith("intensities:")


def test_intensity_is_unsure_about_mr_contrasts():
    for kind in ("dwi", "t1", "flair", "b0"):
        assert detect_from_intensity(head(kind)).confidence <= 0.5  # MR contrast: never sure
    tiny = Image(np.zeros((3, 4, 5), np.float32), (1, 1, 1))
    tiny.array[1, 1, 1] = 1.0
    assert detect_from_intensity(tiny) == Detection(None, 0.0, "intensities: too few voxels to judge")


def test_detect_from_intensity_4d():
    ctp = detect_from_intensity(series("ctp"))
    assert ctp.key == "ctp" and ctp.confidence >= 0.8, ctp.reason
    pwi = detect_from_intensity(series("pwi"))
    assert pwi.key == "pwi" and pwi.confidence < 0.8, pwi.reason  # MR: could be offset CT
    multi_b = Image(np.stack([head("b0").array, head("dwi").array]), SPACING)
    assert detect_from_intensity(multi_b).key is None


def test_detect_modality_combines_sources():
    adc, dwi, ct = head("adc"), head("dwi"), head("ncct")
    assert detect_modality(dwi, "dwi.nii.gz").key == "dwi"
    unknown = detect_modality(adc, "series_301.nii.gz")  # name says nothing: intensities decide
    assert unknown.key == "adc" and "intensities" in unknown.reason
    clash = detect_modality(ct, "t1.nii.gz")  # name wins but the clash lowers the confidence
    assert clash.key == "t1" and clash.confidence < 0.5 and "CT" in clash.reason
    four_d = detect_modality(series("ctp"), "dwi.nii.gz")  # a 3D key cannot name a 4D series
    assert four_d.key == "ctp" and "ignored" in four_d.reason
    assert detect_modality(dwi, "lesion.nii.gz").key is None
    assert detect_modality(Image(np.ones((3, 4, 5), np.float32), SPACING), "x").key is None


# -- case folders --------------------------------------------------------------------------
@pytest.fixture
def case(tmp_path):
    c = tmp_path / "case-001"
    c.mkdir()
    io.write_image(head("dwi"), c / "dwi.nii.gz")
    io.write_image(head("adc"), c / "adc.nrrd")
    io.write_image(head("b0"), c / "b0.mha")
    io.write_image(head("t1"), c / "sub-01_T1w.nii.gz")
    lesion = head("dwi").with_array((_labels() == 6).astype(np.uint8))
    for truth in ("lesion.nii.gz", "core.nii.gz", "penumbra.nii.gz"):
        io.write_image(lesion, c / truth)
    (c / "case.json").write_text('{"id": "case-001"}')
    (c / "notes.txt").write_text("not an image")
    (c / ".hidden.nii.gz").write_bytes(b"")
    return c


def test_find_case_inputs(case):
    (case / "flair").mkdir()  # a DICOM folder named by its key
    found = find_case_inputs(case)
    assert list(found) == ["dwi", "adc", "b0", "flair", "t1"]  # MODALITY_KEYS order
    assert found["adc"] == case / "adc.nrrd" and found["flair"] == case / "flair"
    assert found["t1"].name == "sub-01_T1w.nii.gz"


def test_find_case_inputs_ignores_phantom_true_maps(case):
    io.write_image(head("dwi"), case / "cbf.nii.gz")
    io.write_image(head("dwi"), case / "true_cbf.nii.gz")  # a perfusion phantom's true map, not a second cbf
    found = find_case_inputs(case)
    assert found["cbf"] == case / "cbf.nii.gz" and "true_cbf.nii.gz" not in {p.name for p in found.values()}


def test_find_case_inputs_duplicate_key(case):
    io.write_image(head("dwi"), case / "DWI_b1000.nii.gz")
    with pytest.raises(InputError) as e:
        find_case_inputs(case)
    msg = str(e.value)
    assert "DWI_b1000.nii.gz" in msg and "dwi.nii.gz" in msg and "'dwi'" in msg and "\n" not in msg
    assert msg.startswith(str(case))


def test_find_case_inputs_folder_problems(tmp_path):
    with pytest.raises(InputError, match="case folder not found") as e:
        find_case_inputs(tmp_path / "nope")
    assert "nope" in str(e.value)
    (tmp_path / "file.nii.gz").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        find_case_inputs(tmp_path / "file.nii.gz")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no images"):
        find_case_inputs(empty)
    truth = tmp_path / "truth_only"
    truth.mkdir()
    (truth / "lesion.nii.gz").write_bytes(b"x")
    (truth / "case.json").write_text("{}")
    with pytest.raises(InputError, match="only ground truth"):
        find_case_inputs(truth)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "scan1.nii.gz").write_bytes(b"x")
    with pytest.raises(InputError, match="no image is named by a modality") as e:
        find_case_inputs(odd)
    assert "scan1.nii.gz" in str(e.value)


# -- loading -------------------------------------------------------------------------------
def test_load_inputs(case):
    images = load_inputs(find_case_inputs(case))
    assert sorted(images) == ["adc", "b0", "dwi", "t1"]
    assert all(im.meta["modality"] == k for k, im in images.items())
    assert images["adc"].same_grid(images["dwi"])
    ctp = case.parent / "ctp.nii.gz"
    io.write_image(series("ctp"), ctp)
    loaded = load_inputs({"ctp": ctp})["ctp"]
    assert loaded.is_4d and loaded.array.shape[0] == 20
    np.testing.assert_allclose(loaded.meta["times"], np.arange(20) * 1.5)


def test_load_inputs_overrides(case, tmp_path):
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    io.write_image(head("adc"), swapped / "dwi.nii.gz")  # mislabelled by the user's export
    io.write_image(head("dwi"), swapped / "scan.nii.gz")
    with pytest.raises(InputError, match="given as dwi but"):
        load_inputs({"dwi": swapped / "dwi.nii.gz"})
    images = load_inputs({"dwi": swapped / "dwi.nii.gz"}, overrides={"dwi.nii.gz": "adc", str(swapped / "scan.nii.gz"): "dwi"})
    assert sorted(images) == ["adc", "dwi"] and images["adc"].meta["source"].endswith("dwi.nii.gz")
    with pytest.raises(InputError, match="unknown modality 'dwl'"):
        load_inputs({"dwi": case / "dwi.nii.gz"}, overrides={"dwi": "dwl"})
    with pytest.raises(InputError, match="names no input"):
        load_inputs({"dwi": case / "dwi.nii.gz"}, overrides={"missing.nii.gz": "adc"})
    with pytest.raises(InputError, match="a second input for 'dwi'"):
        load_inputs({"dwi": case / "dwi.nii.gz", "b0": case / "b0.mha"}, overrides={"b0": "dwi"})


def test_large_bright_dwi_lesion_is_not_mistaken_for_adc(tmp_path):
    """A DWI whose lesion is large and 2.5x brighter than tissue must still load as dwi."""
    bright = head("dwi", lesion_radius=0.4, tissue=(40, 5, 22, 120, 100, 330, 3, 4))
    assert np.mean(_labels(lesion_radius=0.4) == 6) > 0.03  # ~10% of the head
    io.write_image(bright, tmp_path / "dwi.nii.gz")
    assert load_inputs({"dwi": tmp_path / "dwi.nii.gz"})["dwi"].meta["modality"] == "dwi"


def _write(tmp_path, name: str, img: Image | None = None, raw: bytes | None = None):
    path = tmp_path / name
    if img is not None:
        io.write_image(img, path)
    if raw is not None:
        path.write_bytes(raw)
    return path


def _truncated(tmp_path):
    good = io.write_image(head("dwi"), tmp_path / "good.nii.gz")
    return good.read_bytes()[: good.stat().st_size // 2]


BAD_INPUTS = [
    # (key, file name, how to make it, expected problem)
    ("adc", "adc.nii.gz", lambda t: head("dwi"), "given as adc but looks like"),
    ("adc", "adc.nii.gz", lambda t: head("t1"), "given as adc but looks like DWI/T1/FLAIR"),
    ("t1", "t1.nii.gz", lambda t: head("ncct"), "given as t1 but looks like CT"),
    ("dwi", "dwi.nii.gz", lambda t: head("adc"), "given as dwi but looks like an ADC map"),
    ("flair", "flair.nii.gz", lambda t: head("adc_1e3"), "given as flair but looks like an ADC map"),
    ("ncct", "ncct.nii.gz", lambda t: head("t1"), "not Hounsfield units"),
    ("pwi", "pwi.nii.gz", lambda t: series("ctp"), "given as pwi but looks like CT perfusion"),
    ("dwi", "adc.nii.gz", lambda t: head("dwi"), "given as dwi but its name says adc"),
    ("dwi", "dwi.nii.gz", lambda t: series("ctp"), "4D series (20 frames) where a 3D volume is expected"),
    ("dwi", "dwi.nii.gz", lambda t: Image(np.stack([head("b0").array, head("dwi").array]), SPACING),
     "give the b1000 volume as dwi"),
    ("ctp", "ctp.nii.gz", lambda t: head("ncct"), "3D volume where a 4D series is expected"),
    ("dwi", "dwi.nii.gz", lambda t: head("dwi").with_array(np.zeros(SHAPE, np.float32)), "all zero"),
    # ITK's NIfTI reader turns NaN/Inf into 0; the NIfTI's own values are counted (nibabel)
    ("dwi", "dwi.nii.gz", lambda t: head("dwi").with_array(np.where(_labels() == 5, np.nan, head("dwi").array)), "NaN"),
    ("adc", "adc.nii", lambda t: head("adc").with_array(np.where(_labels() == 5, -np.inf, head("adc").array)), "NaN/Inf"),
    ("dwi", "dwi.nrrd", lambda t: head("dwi").with_array(np.where(_labels() == 5, np.nan, head("dwi").array)), "NaN"),
    ("dwi", "dwi.mha", lambda t: head("dwi").with_array(np.where(_labels() == 5, np.inf, head("dwi").array)), "NaN/Inf"),
    ("dwi", "dwi.nii.gz", lambda t: Image(head("dwi").array, (0.01, 0.01, 6.0)), "absurd voxel spacing"),
    ("dwi", "dwi.nii.gz", lambda t: Image(head("dwi").array, (1.0, 1.0, 60.0)), "absurd voxel spacing"),
    ("dwi", "dwi.nii.gz", lambda t: _truncated(t), "truncated"),
    ("dwi", "dwi.nii.gz", lambda t: b"patient notes, not an image\n", "not an image file"),
    ("dwi", "dwi.nii.gz", lambda t: gzip.compress(b"\x00" * 100), "not an image file"),
    ("dwi", "dwi.nrrd", lambda t: b"NRRD0004\ntype: float\ndimension: 3\nsizes: 4 5 6\nencoding: raw\n\n" + b"\x00" * 20,
     "not a readable image"),
    ("dwi", "dwi.nii.gz", lambda t: b"", "file is empty"),
    ("dwi", "dwi.nii.gz", lambda t: None, "file not found"),
    ("dwl", "dwi.nii.gz", lambda t: head("dwi"), "unknown modality key 'dwl'"),
]


@pytest.mark.parametrize("key,name,make,problem", BAD_INPUTS, ids=[f"{i:02d}-{b[3][:30]}" for i, b in enumerate(BAD_INPUTS)])
def test_load_inputs_errors_are_one_line_and_name_the_file(tmp_path, key, name, make, problem):
    content = make(tmp_path)
    path = _write(tmp_path, name, img=content if isinstance(content, Image) else None,
                  raw=content if isinstance(content, bytes) else None)
    with pytest.raises(InputError) as e:
        load_inputs({key: path})
    msg = str(e.value)
    assert problem in msg, msg
    assert str(path) in msg and "\n" not in msg
    assert e.value.path == str(path)


# -- required inputs -----------------------------------------------------------------------
def test_require_inputs():
    require_inputs(["dwi", "adc"], ["dwi", "adc"])
    require_inputs(["dwi", "b0"], ["dwi", "adc"], {"adc": ["b0", "dwi"]})  # adc computable
    with pytest.raises(InputError) as e:
        require_inputs(["dwi"], ["dwi", "adc"], {"adc": ["b0", "dwi"]}, where="case-7", model="dwi-unet")
    assert str(e.value) == ("case-7: missing input 'adc' (model dwi-unet needs dwi, adc; adc can be computed from "
                            "b0 + dwi, but b0 is missing too; found: dwi)")
    with pytest.raises(InputError) as e:
        require_inputs([], ["ctp"])
    assert str(e.value) == "missing input 'ctp' (needs ctp; found: nothing)"
    with pytest.raises(InputError, match="missing inputs 'flair', 't1'"):
        require_inputs({"dwi": 1, "adc": 2}, ["dwi", "flair", "t1"], where="c")
