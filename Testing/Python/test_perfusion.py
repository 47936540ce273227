"""Perfusion engine and perfusion phantoms: deconvolution, AIF, concentration, motion, decisions,
bad input, DICOM (multi-temporal series and the Enhanced CT rCBF map of pydicom-data), outputs."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from strokeseg.errors import Cancelled, InputError, OutputError
from strokeseg.image import Image
from strokeseg.io import read_image, write_image
from strokeseg.perfusion import (
    OUTPUT_FILES,
    PerfusionSettings,
    Thresholds,
    load_series,
    read_perfusion_map,
    run_perfusion,
    write_perfusion,
)
from strokeseg.perfusion.concentration import bolus_timing, concentration_frame
from strokeseg.perfusion.decision import decide, formatted_volumes, hemispheres
from strokeseg.perfusion.deconvolution import KH, RHO, deconvolve, reference_gain
from strokeseg.perfusion.denoise import guided_bilateral, masked_gaussian, neighbour_noise, temporal_pca
from strokeseg.perfusion.kinetic_fit import best_curves, model_curves, model_flow
from strokeseg.perfusion.masks import ct_masks
from strokeseg.perfusion.motion import CT_REGISTRATION_HU, correct_motion, inplane_rigid
from strokeseg.perfusion.pipeline import frame_similarity
from strokeseg.perfusion.series import validate_series
from strokeseg.phantom.perfusion import (RESIDUES, KineticTable, arterial_input, gamma_variate, residue_functions,
                                        residue_peak_time, simulate_perfusion, write_perfusion_case)

SMALL = dict(size=(64, 64, 8), frames=40, dt=1.5, compute_maps=False, lesion=True)


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_ct(lesion_library):
    return simulate_perfusion(3, "ctp", lesion_library, "test", motion=False, **SMALL)


@pytest.fixture(scope="module")
def small_ct_result(small_ct):
    return run_perfusion(small_ct.images["ctp"])


def _synthetic_curves(dt: float, n: int, cases, residue: str = "exponential"):
    """Tissue curves C = rho/kH CBF (AIF (x) h_beta (x) R_MTT)(t - delay), fine grid then sampled;
    R exp(-t/MTT) unless ``residue`` names another family."""
    fine = 0.05
    tf = np.arange(0.0, n * dt + 40.0, fine)
    aif_f = 300.0 * gamma_variate(tf, 5.0, 3.0, 1.5)
    out = []
    for cbf, mtt, delay, beta in cases:
        h = aif_f if beta == 0 else np.convolve(aif_f, np.exp(-tf / beta) / beta * fine)[: tf.size]
        c = np.convolve(h, residue_functions(tf, np.array([mtt]), residue)[0])[: tf.size] * fine * (RHO / KH) * cbf / 6000.0
        out.append(np.interp(tf - delay, tf, c, left=0.0))
    idx = np.round(np.arange(n) * dt / fine).astype(int)
    return aif_f[idx], np.stack([c[idx] for c in out], axis=1).astype(np.float32)


# -- deconvolution ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dt,n", [(1.0, 50), (2.0, 26)])
def test_deconvolution_recovers_flow_volume_and_delay(dt, n):
    cases = [(cbf, mtt, delay, 1.0) for cbf in (20.0, 50.0) for mtt in (4.0, 8.0) for delay in (0.0, 4.0, 8.0)]
    aif, conc = _synthetic_curves(dt, n, cases)
    rng = np.random.default_rng(0)
    noisy = np.repeat(conc, 10, axis=1) + rng.normal(0, 0.2, (conc.shape[0], conc.shape[1] * 10)).astype(np.float32)
    maps = deconvolve(noisy, aif, dt)
    truth = np.repeat(np.array(cases), 10, axis=0)
    cbv_true = truth[:, 0] * truth[:, 1] / 60.0
    tmax_true = truth[:, 2] + residue_peak_time(truth[:, 1], truth[:, 3])
    # CBV is an area ratio: unbiased.
    assert np.median(np.abs(maps.cbv / cbv_true - 1)) < 0.05
    # oSVD underestimates CBF (regularisation, dispersion) but by a similar factor everywhere...
    ratio = maps.cbf / truth[:, 0]
    assert 0.5 < np.median(ratio) < 1.05
    # ...and delay-insensitively (block-circulant): the same tissue at 0, 4 and 8 s delay.
    by_delay = [np.median(ratio[truth[:, 2] == d]) for d in (0.0, 4.0, 8.0)]
    assert max(by_delay) - min(by_delay) < 0.06
    # Tmax follows the delay to within a second.
    assert np.median(np.abs(maps.tmax - tmax_true)) < 1.0
    for d in (0.0, 4.0, 8.0):
        sel = truth[:, 2] == d
        assert abs(np.median(maps.tmax[sel] - tmax_true[sel])) < 1.0
    # Central volume theorem.
    assert np.allclose(maps.mtt, np.where(maps.cbf > 1e-3, maps.cbv / maps.cbf * 60.0, 0.0), rtol=1e-4, atol=1e-3)


def test_deconvolution_ranks_flow():
    cases = [(cbf, mtt, 2.0, 0.5) for cbf in (5.0, 10.0, 20.0, 40.0, 60.0) for mtt in (4.0, 12.0)]
    aif, conc = _synthetic_curves(1.5, 40, cases)
    maps = deconvolve(conc, aif, 1.5)
    for mtt in (4.0, 12.0):
        sel = np.array([c[1] == mtt for c in cases])
        assert np.all(np.diff(maps.cbf[sel]) > 0)


@pytest.mark.parametrize("dt,n", [(1.0, 50), (2.0, 26)])
def test_relative_flow_does_not_depend_on_the_residue_family(dt, n):
    """CT core = CBF below 30% of the healthy mean. Regularisation lowers healthy flow more than
    the core's, by an amount that depends on the residue's shape; the reference gain is measured on
    the healthy mean curve, so core (10%) and penumbra (40%) read right whatever the family. (A gain
    tabulated for exponential residues read gamma-residue cores 40-70% too large on phantoms.)"""
    rng = np.random.default_rng(1)
    for family in RESIDUES:
        rel = {}
        aif, healthy = _synthetic_curves(dt, n, [(50.0, 4.0, 1.0, 0.5)], family)
        noisy = lambda c: np.repeat(c, 2000, axis=1) + rng.normal(0, 1.0, (n, 2000)).astype(np.float32)  # noqa: E731
        h = noisy(healthy)
        ref = deconvolve(h, aif, dt, min_cutoff=0.3)
        gain = reference_gain(h.mean(axis=1), aif, dt, float(np.median(ref.cutoff)))
        assert gain > 1.1, family  # regularisation costs healthy tissue a sizeable part of its peak
        for name, case in {"core": (5.0, 12.0, 6.0, 3.0), "penumbra": (20.0, 8.0, 4.0, 2.0)}.items():
            _, c = _synthetic_curves(dt, n, [case], family)
            rel[name] = float(np.median(deconvolve(noisy(c), aif, dt, min_cutoff=0.3).cbf)) / (float(ref.cbf.mean()) * gain)
        assert abs(rel["core"] - 0.10) < 0.05, (family, rel)
        assert abs(rel["penumbra"] - 0.40) < 0.10, (family, rel)
    assert reference_gain(np.zeros(n, np.float32), aif, dt, 0.3) == 1.0  # no signal: no correction


def test_kinetic_dictionary_finds_the_shape_of_a_clean_curve():
    """A curve made with the dictionary's own delay, dispersion and MTT is matched by exactly that
    model curve; dispersion never exceeds the MTT (the model is symmetric in the two)."""
    aif, _ = _synthetic_curves(1.5, 36, [(40.0, 8.0, 4.0, 2.0)])  # the input function only
    model = model_curves(aif, 1.5)
    assert np.all(model.params[:, 1] <= model.params[:, 2]) and model.curves.shape[1] == 36
    mtt8, mtt24 = (model.params[np.argmin(np.abs(model.params[:, 2] - m)), 2] for m in (8.0, 24.0))
    _, conc = _synthetic_curves(1.5, 36, [(40.0, mtt8, 4.0, 2.0), (10.0, mtt24, 10.0, 3.0)])
    best = model.params[best_curves(conc, model)]
    assert np.allclose(best, [[4.0, 2.0, mtt8], [10.0, 3.0, mtt24]], atol=0.26)  # one delay step


@pytest.mark.parametrize("dt,n", [(1.0, 50), (2.0, 26)])
def test_kinetic_flow_reads_a_truncated_core_and_dispersed_penumbra_right(dt, n):
    """The CT core rule's flow: a late, slow core curve still high when the series ends reads its
    10% of healthy flow and a dispersed penumbra its 45%; oSVD at CT's 30% floor, even with its
    reference gain, reads that penumbra below 40% (it measures the dispersed residue's peak)."""
    rng = np.random.default_rng(2)
    cases = {"healthy": (50.0, 4.0, 1.0, 0.5), "core": (5.0, 30.0, 10.0, 3.0), "penumbra": (22.5, 8.0, 5.0, 3.5)}
    aif, clean = _synthetic_curves(dt, n, list(cases.values()))
    conc = np.repeat(clean, 400, axis=1) + rng.normal(0, 0.1, (n, 1200)).astype(np.float32)
    tmax = np.repeat([2.0, 16.0, 9.0], 400)
    rcbf = np.repeat([1.0, 0.15, 0.35], 400)
    flow, classes = model_flow(conc, aif, dt, tmax, rcbf)
    assert classes == 3
    rel = {name: float(np.median(flow[400 * i: 400 * (i + 1)])) / float(np.median(flow[:400])) for i, name in enumerate(cases)}
    assert abs(rel["core"] - 0.10) < 0.02 and abs(rel["penumbra"] - 0.45) < 0.03, rel
    svd = deconvolve(conc, aif, dt, min_cutoff=0.3).cbf
    gain = reference_gain(conc[:, :400].mean(axis=1), aif, dt, 0.3)
    assert float(np.median(svd[800:])) / (float(np.median(svd[:400])) * gain) < 0.40


def test_kinetic_flow_gives_small_classes_their_tmax_class_shape():
    """Classes of fewer than MIN_CLASS_VOXELS voxels borrow the shape fitted to all voxels of
    their Tmax band, so a few voxels are still measured; no signal reads no flow."""
    aif, clean = _synthetic_curves(1.5, 36, [(50.0, 4.0, 1.0, 0.5)])
    conc = np.concatenate([np.repeat(clean, 60, axis=1), 0.5 * np.repeat(clean, 5, axis=1), np.zeros((36, 3), np.float32)], axis=1)
    rcbf = np.r_[np.full(60, 1.0), np.full(5, 0.45), np.zeros(3)]
    flow, classes = model_flow(conc, aif, 1.5, np.full(68, 2.0), rcbf)
    assert classes == 1
    assert flow[60:65] == pytest.approx(0.5 * flow[0], rel=1e-3) and np.all(flow[65:] == 0)


@pytest.mark.parametrize("family", RESIDUES)
def test_phantom_residue_families_keep_the_central_volume_theorem(family):
    """Every residue family starts at 1 and has area MTT (CBV = CBF x MTT), and the phantom's true
    Tmax is the peak of the dispersed residue."""
    tau = np.arange(0.0, 120.0, 0.05)
    mtts = np.array([2.0, 5.0, 12.0])
    r = residue_functions(tau, mtts, family)
    assert np.allclose(r[:, 0], 1.0)
    assert np.allclose(r.sum(axis=1) * 0.05, mtts, rtol=0.02)
    assert np.all(np.diff(r, axis=1) <= 1e-12)  # non-increasing
    aif, _ = arterial_input(np.arange(0.0, 90.0, 0.1), np.random.default_rng(0), 300.0)
    table = KineticTable(aif, 0.1, family)
    peaks = table.residue_peak_time(np.array([4.0, 8.0]), table.beta_index(np.array([0.0, 2.0])))
    assert peaks[0] == 0.0  # undispersed: the residue peaks at its onset
    if family == "exponential":
        assert abs(peaks[1] - residue_peak_time(np.array([8.0]), np.array([2.0]))[0]) < 0.15
    if family == "box":
        assert abs(peaks[1] - 8.0) < 0.15  # a dispersed plug flow peaks when its transit ends
    with pytest.raises(ValueError, match="residue"):
        residue_functions(tau, mtts, "triangle")
    with pytest.raises(ValueError, match="residue"):
        simulate_perfusion(0, "ctp", residue="triangle")


def test_cutoff_floor_steadies_the_flow_of_noisy_curves():
    """CT-like noise on replicates of a healthy and a core-like curve: plain oSVD scatters the
    replicates over cut-offs, and their CBF with them; a floor gives them one regularisation."""
    dt, n, reps = 1.5, 36, 300
    cases = [(50.0, 4.0, 1.0, 1.0), (5.0, 12.0, 6.0, 1.0)]
    aif, conc = _synthetic_curves(dt, n, cases)
    rng = np.random.default_rng(3)
    sigma = 0.08 * float(conc[:, 0].max())  # ~1 HU against a 10-15 HU grey-matter bolus
    noisy = np.repeat(conc, reps, axis=1) + rng.normal(0, sigma, (n, 2 * reps)).astype(np.float32)
    plain = deconvolve(noisy, aif, dt)
    floor = deconvolve(noisy, aif, dt, min_cutoff=0.3)
    assert plain.cutoff.min() < 0.3 <= floor.cutoff.min() + 1e-6
    healthy = slice(0, reps)
    cv = lambda m: np.std(m.cbf[healthy]) / np.mean(m.cbf[healthy])  # noqa: E731
    assert cv(floor) < 0.8 * cv(plain)
    # No floor is plain oSVD; a floor changes nothing for curves already regularised above it.
    same = deconvolve(noisy, aif, dt, min_cutoff=None)
    assert np.array_equal(same.cbf, plain.cbf)
    above = plain.cutoff >= 0.3 - 1e-6
    assert above.any() and np.allclose(floor.cbf[above], plain.cbf[above])
    with pytest.raises(ValueError, match="min_cutoff"):
        deconvolve(noisy, aif, dt, min_cutoff=1.5)


# -- denoising -------------------------------------------------------------------------------------


def _two_tissue_slab(noise: float, seed: int = 0):
    """A 2-slice slab, 'grey matter' (bolus amplitude 2, baseline 40 HU) left of x = 20 and 'white
    matter' (amplitude 1, 28 HU) right of it, a non-tissue column at x = 0; noisy curves."""
    rng = np.random.default_rng(seed)
    shape = (2, 24, 40)
    t = np.arange(30) * 1.5
    bolus = gamma_variate(t, 6.0, 3.0, 1.5).astype(np.float32)
    grey = np.zeros(shape, bool)
    grey[:, :, :20] = True
    amp = np.where(grey, 2.0, 1.0).astype(np.float32)
    anatomy = np.where(grey, 40.0, 28.0).astype(np.float32) + rng.normal(0, 1.0, shape).astype(np.float32)
    search = np.ones(shape, bool)
    tissue = search.copy()
    tissue[:, :, 0] = False
    clean = (bolus[:, None] * amp[search][None, :]).astype(np.float32)
    noisy = clean + rng.normal(0, noise, clean.shape).astype(np.float32)
    return noisy, clean, search, tissue, anatomy, grey


def test_guided_bilateral_keeps_tissue_edges_and_removes_noise():
    noisy, clean, search, tissue, anatomy, grey = _two_tissue_slab(noise=0.4)
    spacing = (1.8, 1.8, 5.0)
    bil = guided_bilateral(noisy, search, tissue, anatomy, spacing, 3.0)
    gauss = guided_bilateral(noisy, search, tissue, anatomy, spacing, 3.0, h_anatomy=None, h_perfusion=None)
    tis = tissue[search]
    # Voxels off the tissue mask keep their curves; sigma 0 changes nothing.
    assert np.array_equal(bil[:, ~tis], noisy[:, ~tis])
    assert np.array_equal(guided_bilateral(noisy, search, tissue, anatomy, spacing, 0.0), noisy)
    # The un-guided filter is the masked Gaussian of the pipeline's "gaussian" option.
    grid = np.zeros(search.shape, np.float32)
    grid[search] = noisy[10]
    ref = masked_gaussian(grid, tissue, [0.0, 3.0 / 1.8, 3.0 / 1.8])[search]
    inner = np.zeros(search.shape, bool)
    inner[:, 4:-4, 5:-4] = True  # away from the image border (where the Gaussian replicates the edge)
    inner = inner[search]
    assert np.allclose(gauss[10, inner], ref[inner], atol=0.05)  # 2 vs 4 sigma truncation
    # Noise: both filters remove most of it inside a tissue class.
    interior = (np.abs(np.arange(40) - 20) > 6)[None, None, :].repeat(24, 1).repeat(2, 0)[search] & tis
    for out in (bil, gauss):
        assert np.std((out - clean)[:, interior]) < 0.3 * np.std((noisy - clean)[:, interior])
    # Edge: within 2 voxels of the grey/white boundary the Gaussian mixes the classes' peaks,
    # the guided filter keeps each voxel's own class.
    edge = (np.abs(np.arange(40) - 19.5) < 2)[None, None, :].repeat(24, 1).repeat(2, 0)[search] & tis
    shape = clean[:, tis].mean(axis=1)

    def amplitude(c):  # least-squares bolus amplitude (unbiased, unlike a noisy peak)
        return shape @ c / (shape @ shape)

    err_b = np.abs(amplitude(bil) - amplitude(clean))[edge].mean()
    err_g = np.abs(amplitude(gauss) - amplitude(clean))[edge].mean()
    assert err_b < 0.5 * err_g and err_b < 0.15


def test_temporal_pca_removes_white_noise_and_keeps_delayed_dispersed_curves():
    """Curves of varied delay, width and height (one per voxel) plus white noise: K of N = 30
    components keep every curve (within the noise left) and about K/N of the noise variance."""
    rng = np.random.default_rng(3)
    t = np.arange(30) * 1.5
    n = 4000
    delay, width, height = rng.uniform(4, 12, n), rng.uniform(1.5, 4.0, n), rng.uniform(1, 20, n)
    clean = np.stack([h * gamma_variate(t, d, 3.0, w) for d, w, h in zip(delay, width, height)], axis=1).astype(np.float32)
    noisy = clean + rng.normal(0, 2.0, clean.shape).astype(np.float32)
    tissue = np.ones(n, bool)
    out = temporal_pca(noisy, tissue, 8)
    left = np.std(out - clean)
    assert 0.9 < left < 1.25  # the noise inside the mean + 8 directions: sqrt(9 / 30) * 2.0 = 1.1
    # The most delayed and widest curves (the penumbra's) are kept as well as the rest.
    late = delay > 10
    assert np.std((out - clean)[:, late]) < 1.2 * left
    area, true_area = out.sum(axis=0), clean.sum(axis=0)
    assert np.polyfit(true_area, area, 1)[0] == pytest.approx(1.0, abs=0.02)  # no curve is pulled towards the mean
    # Fitted on a subset (the parenchyma), applied to every voxel; too few frames: unchanged.
    assert temporal_pca(noisy, np.arange(n) < 2000, 8).shape == noisy.shape
    assert np.array_equal(temporal_pca(noisy[:8], tissue, 8), noisy[:8])
    assert temporal_pca(noisy, tissue, 0) is noisy


def test_neighbour_noise_estimates_white_noise():
    rng = np.random.default_rng(1)
    img = rng.normal(30.0, 2.0, (3, 50, 50)).astype(np.float32)
    mask = np.ones(img.shape, bool)
    assert neighbour_noise(img, mask) == pytest.approx(2.0, rel=0.1)
    assert neighbour_noise(img, np.zeros(img.shape, bool)) == 0.0


def test_denoise_setting_is_checked_and_reported(small_ct, small_ct_result):
    assert small_ct_result.report["settings"]["denoise"] == "bilateral"  # the CT default
    assert small_ct_result.report["settings"]["smooth_mm"] == 5.0
    with pytest.raises(InputError, match="denoise"):
        run_perfusion(small_ct.images["ctp"], settings=PerfusionSettings(denoise="median", motion_correction=False))
    res = run_perfusion(small_ct.images["ctp"], settings=PerfusionSettings(denoise="gaussian", motion_correction=False))
    assert res.report["settings"]["denoise"] == "gaussian" and res.report["settings"]["smooth_mm"] == 3.0
    assert small_ct_result.report["settings"]["min_cutoff"] == 0.3  # the CT default (MR: plain oSVD)
    with pytest.raises(InputError, match="min_cutoff"):
        run_perfusion(small_ct.images["ctp"], settings=PerfusionSettings(min_cutoff=1.2, motion_correction=False))



def test_core_flow_setting_is_checked_and_reported(small_ct, small_ct_result):
    """The rCBF core rule reads the oSVD CBF map by default (with its reference gain);
    core_flow="kinetic" reads tracer-kinetic flow instead (the report says so, with the number of
    curve classes fitted, and no gain) and leaves the maps as they were."""
    rep = small_ct_result.report
    assert rep["settings"]["core_flow"] == "svd" and rep["core_flow"] == {"method": "svd"}
    assert rep["reference_regularisation_gain"] > 1.0
    with pytest.raises(InputError, match="core_flow must be one of kinetic, svd"):
        run_perfusion(small_ct.images["ctp"], settings=PerfusionSettings(core_flow="fit", motion_correction=False))
    kin = run_perfusion(small_ct.images["ctp"], settings=PerfusionSettings(core_flow="kinetic"))
    assert kin.report["core_flow"]["method"] == "kinetic" and kin.report["core_flow"]["classes"] >= 2
    assert kin.report["reference_regularisation_gain"] == 1.0 and "tracer-kinetic" in kin.report["core_method"]
    assert np.array_equal(kin.maps["cbf"].array, small_ct_result.maps["cbf"].array)
    true_ml = small_ct.info["core_ml"]
    assert true_ml > 5.0 and abs(kin.report["core_ml"] - true_ml) <= max(5.0, 0.15 * true_ml), (kin.report["core_ml"], true_ml)


# -- concentration and timing ----------------------------------------------------------------------


def test_concentration_ct_and_mr():
    s0 = np.array([40.0, 35.0, 100.0], np.float32)
    assert np.allclose(concentration_frame(np.array([140.0, 35.0, 90.0]), s0, "ct", 0.03), [100.0, 0.0, -10.0])
    s0 = np.array([1000.0, 500.0, 0.0], np.float32)
    frame = np.array([500.0, 500.0, 10.0], np.float32)
    c = concentration_frame(frame, s0, "mr", 0.030)
    assert np.isclose(c[0], np.log(2.0) / 0.030, rtol=1e-5)  # dR2* = -ln(S/S0)/TE
    assert c[1] == 0.0
    assert c[2] == 0.0  # no baseline signal: no concentration


def test_bolus_timing_and_no_bolus():
    t = np.arange(40) * 1.5
    curve = 40.0 + 8.0 * gamma_variate(t, 9.0, 3.0, 1.5) + np.random.default_rng(1).normal(0, 0.05, t.size)
    timing = bolus_timing(curve, "ct")
    assert 5 <= timing.arrival <= 7  # arrival at 9 s = frame 6
    assert timing.baseline.stop == timing.arrival - 1
    drop = 1000.0 * (1.0 - 0.2 * gamma_variate(t, 9.0, 3.0, 1.5))
    assert 5 <= bolus_timing(drop, "mr").arrival <= 7
    with pytest.raises(InputError, match="no bolus found"):
        bolus_timing(40.0 + np.random.default_rng(2).normal(0, 0.3, 40), "ct", "x.nii.gz")
    with pytest.raises(InputError, match="no pre-contrast baseline"):
        bolus_timing(40.0 + 8.0 * gamma_variate(t, -1.0, 3.0, 1.5), "ct")


# -- motion ----------------------------------------------------------------------------------------


def _inplane_motion_transform(series: Image, angle: float, shift_mm) -> sitk.Transform:
    """Reference points -> where they are in a frame moved by ``_shifted`` (rotation about the slab's centre)."""
    ref = series.frame(0)
    centre = (np.asarray(ref.size[:2]) - 1) / 2.0 * np.asarray(ref.spacing[:2])
    return inplane_rigid(angle, shift_mm, centre, ref)


def _shifted(series: Image, frames: slice, angle: float, shift_mm) -> Image:
    """Move the head by a known in-plane rigid motion in some frames."""
    arr = series.array.astype(np.float32).copy()
    ref = series.frame(0)
    tx = _inplane_motion_transform(series, angle, shift_mm).GetInverse()
    for k in range(series.array.shape[0])[frames]:
        img = Image(arr[k], ref.spacing, ref.origin, ref.direction).to_sitk()
        arr[k] = sitk.GetArrayFromImage(sitk.Resample(img, img, tx, sitk.sitkLinear, -1000.0, sitk.sitkFloat32))
    return series.with_array(arr)


def test_motion_correction_recovers_a_known_shift(small_ct):
    series = small_ct.images["ctp"]
    moved = _shifted(series, slice(20, None), 0.0, (4.0, -3.0))
    head = ct_masks(series.array[0].astype(np.float32), series.spacing).head
    res = correct_motion(moved, clip=CT_REGISTRATION_HU, head_mask=head)
    assert res.mode == "in-plane"
    assert max(res.displacement_mm[:20]) < 0.5
    # A pure translation moves every point by 5 mm.
    assert np.all(np.abs(np.array(res.displacement_mm[20:]) - 5.0) < 0.6)
    offsets = np.array(res.matrices[25])[9:]
    d = series.direction_matrix
    assert np.allclose(d.T @ offsets, [4.0, -3.0, 0.0], atol=0.6)
    brain = head & (series.array[0] > 0) & (series.array[0] < 100)
    before = np.abs(moved.array[25] - series.array[25])[brain].mean()
    after = np.abs(res.series.array[25] - series.array[25])[brain].mean()
    assert after < 0.5 * before


def test_motion_correction_recovers_a_rotation_and_leaves_no_edge_residue(small_ct):
    """A 2 degree turn at frame 20 (6 mm at the head's edge) in a 3.7 mm-pixel slab: the whole-head
    CT window finds it to well under a pixel in every moved frame, the event frame included (the
    skull alone, > 150 HU, left ~4 mm), and only the change from the reference is resampled, so
    the subtraction images (what becomes concentration) carry no interpolated anatomy.
    Measured on 24 phantoms (seeds 3-14, with and without ../shared/data): residual at the head's
    bounding box median 0.70 / 0.94 mm, worst 1.9 / 2.4 mm. The correlation on a slab's coarse
    pixels is shallow in the rotation and its minimum sits up to ~1 degree off on some subjects,
    so the bound is sub-pixel, not an angle (a 0.25 degree bound held for seed 3 only)."""
    series = small_ct.images["ctp"]
    moved = _shifted(series, slice(20, None), np.deg2rad(2.0), (1.5, -1.0))
    head = ct_masks(series.array[0].astype(np.float32), series.spacing).head
    res = correct_motion(moved, clip=CT_REGISTRATION_HU, head_mask=head, resample_change=True)
    truth = _inplane_motion_transform(series, np.deg2rad(2.0), (1.5, -1.0))
    zz, yy, xx = np.nonzero(head)
    corners = series.index_to_physical(np.array([[x, y, z] for x in (xx.min(), xx.max()) for y in (yy.min(), yy.max())
                                                 for z in (zz.min(), zz.max())], float))
    expected = np.array([truth.TransformPoint(tuple(p)) for p in corners])
    for k in range(20, 40):
        a = np.array(res.matrices[k])
        recovered = corners @ a[:9].reshape(3, 3).T + a[9:]
        assert np.linalg.norm(recovered - expected, axis=1).max() < series.spacing[0], k
    assert max(res.displacement_mm[:20]) < 0.5
    brain = head & (series.array[0] > 0) & (series.array[0] < 100)
    true_change = series.array[25].astype(np.float32) - series.array[0]
    got = np.abs(res.series.array[25] - res.series.array[0] - true_change)[brain].mean()
    # The whole frame resampled through the same transform, for comparison.
    a = np.array(res.matrices[25])
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(tuple(a[:9]))
    tx.SetTranslation(tuple(a[9:]))
    ref = sitk.Cast(series.frame(0).to_sitk(), sitk.sitkFloat32)
    whole = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(moved.frame(25).to_sitk(), sitk.sitkFloat32), ref, tx,
                                                 sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    whole_err = np.abs(whole - res.series.array[0] - true_change)[brain].mean()
    assert got < 3.0 and got < 0.25 * whole_err


def test_motion_beyond_correction_is_refused(small_ct):
    moved = _shifted(small_ct.images["ctp"], slice(20, None), 0.0, (5.0, 0.0))
    with pytest.raises(InputError, match="motion beyond correction"):
        run_perfusion(moved, settings=PerfusionSettings(max_motion_mm=2.0))


# -- arterial input and the whole pipeline ----------------------------------------------------------


def test_aif_lands_in_an_artery(small_ct, small_ct_result):
    art = small_ct.truth["artery"]
    pts = np.asarray(small_ct_result.report["arterial_input"]["voxels_lps_mm"], float)
    idx = np.round(art.physical_to_index(pts)).astype(int)
    blood = np.array([art.array[z, y, x] for x, y, z in idx])
    assert np.mean(blood >= 0.1) >= 0.5  # most chosen voxels hold >= 10% arterial blood
    aif = np.asarray(small_ct_result.report["arterial_input"]["curve"])
    vof = np.asarray(small_ct_result.report["arterial_input"]["venous_curve"])
    assert np.argmax(aif) < np.argmax(vof)  # arteries peak before the veins
    assert small_ct_result.report["arterial_input"]["partial_volume_scale"] >= 1.0


def test_pipeline_outputs_on_a_small_ct_phantom(small_ct, small_ct_result):
    res = small_ct_result
    ref = small_ct.images["ctp"].frame(0)
    assert set(res.maps) == {"cbf", "cbv", "mtt", "tmax", "ttp"}
    for img in [*res.maps.values(), res.core, res.penumbra]:
        assert img.same_grid(ref)
    assert res.core.array.dtype == np.uint8 and not np.any(res.core.array & res.penumbra.array)
    rep = json.loads(json.dumps(res.report))
    assert rep["research_use_only"] and rep["defuse3_style"]["research_use_only"]
    assert rep["input"]["kind"] == "ct"
    assert rep["mismatch_ml"] == pytest.approx(max(rep["hypoperfusion_ml"] - rep["core_ml"], 0), abs=0.02)
    # Delayed tissue has long Tmax, healthy tissue short: the maps see the ischaemic territory.
    tissue = (small_ct.truth["tissue"].array > 0) & (res.tissue.array > 0)
    hypo = tissue & (small_ct.truth["penumbra"].array + small_ct.truth["core"].array > 0)
    healthy = tissue & (small_ct.truth["tmax"].array < 4)
    assert np.median(res.maps["tmax"].array[hypo]) > np.median(res.maps["tmax"].array[healthy]) + 4
    assert res.report["hypoperfusion_ml"] > 0.5 * small_ct.info["hypoperfusion_ml"]


def test_progress_and_cancel(small_ct):
    seen = []
    cancel = threading.Event()

    def progress(f, msg):
        seen.append(f)
        if f > 0.4:
            cancel.set()

    with pytest.raises(Cancelled):
        run_perfusion(small_ct.images["ctp"], progress=progress, cancel=cancel,
                      settings=PerfusionSettings(motion_correction=False))
    assert seen and all(b >= a for a, b in zip(seen, seen[1:]))


def test_mr_pipeline_uses_adc_and_echo_time(lesion_library):
    case = simulate_perfusion(4, "pwi", lesion_library, "test", motion=False, **SMALL)
    assert {"pwi", "adc", "dwi"} <= set(case.images)
    series = case.images["pwi"]
    assert series.meta["echo_time_ms"] == pytest.approx(case.info["acquisition"]["te_ms"], abs=0.01)
    res = run_perfusion(series, adc=case.images["adc"])
    assert res.report["input"]["kind"] == "mr"
    assert res.report["input"]["echo_time_ms"] == pytest.approx(series.meta["echo_time_ms"], abs=0.01)
    assert res.report["core_method"].startswith("ADC")
    assert res.report["core_ml"] == pytest.approx(case.info["core_ml"], abs=max(5.0, 0.5 * case.info["core_ml"]))


# -- decisions -------------------------------------------------------------------------------------


def test_decision_volumes_on_synthetic_maps():
    shape = (4, 40, 40)
    tissue = np.ones(shape, bool)
    geom = Image(np.zeros(shape, np.uint8), (2.0, 2.0, 5.0))  # 0.02 mL voxels
    left = hemispheres(shape, geom.index_to_physical, tissue)
    assert left[:, :, 30].all() and not left[:, :, 5].any()  # LPS: +x is the patient's left
    cbf = np.full(shape, 50.0, np.float32)
    tmax = np.full(shape, 1.0, np.float32)
    tmax[:, 5:35, 22:38] = 8.0  # hypoperfused, left hemisphere: 4 x 30 x 16 = 1920 voxels
    tmax[:, 10:20, 25:35] = 12.0  # severe: 400 voxels
    cbf[:, 10:20, 25:35] = 10.0  # core: rCBF 0.2 -> 400 voxels = 8 mL
    cbf[0, 0, 0] = 5.0  # a lone low-flow voxel in healthy tissue: not core
    raw = Thresholds(core_median_voxels=1)  # a square core: the in-plane median would round its corners
    core, hypo, pen, rep = decide(cbf, tmax, tissue, left, 0.02, kind="ct", thresholds=raw)
    assert rep["healthy_hemisphere"] == "right"
    assert rep["core_ml"] == pytest.approx(8.0)
    assert rep["hypoperfusion_ml"] == pytest.approx(38.4)
    assert rep["penumbra_ml"] == pytest.approx(30.4)
    assert rep["mismatch_ml"] == pytest.approx(30.4)
    assert rep["mismatch_ratio"] == pytest.approx(4.8)
    assert rep["hir"] == pytest.approx(8.0 / 38.4, abs=1e-3)
    assert rep["defuse3_style"]["target_mismatch_profile"] and rep["defuse3_style"]["research_use_only"]
    assert not core[0, 0, 0] and not np.any(core & pen)
    # Every threshold is a setting: a 15% core threshold drops the 20% core.
    _, _, _, rep2 = decide(cbf, tmax, tissue, left, 0.02, kind="ct", thresholds=Thresholds(core_rcbf=0.15, core_median_voxels=1))
    assert rep2["core_ml"] == 0.0 and rep2["mismatch_ratio"] is None
    # MR: the core comes from the ADC.
    adc = np.full(shape, 800.0, np.float32)
    adc[:, 12:16, 26:30] = 500.0
    _, _, _, rep3 = decide(cbf, tmax, tissue, left, 0.02, kind="mr", adc=adc)
    assert rep3["core_ml"] == pytest.approx(4 * 16 * 0.02) and rep3["core_method"].startswith("ADC")
    with pytest.raises(ValueError):
        decide(cbf, tmax, tissue, left, 0.02, kind="ct", thresholds=Thresholds(tmax_hypo_s=-1))


def test_core_volume_is_reported_at_further_rcbf_thresholds():
    """Nested flow levels: rCBF 0.1 (200 voxels), 0.25 (+200), 0.36 (+200) in a hypoperfused
    block; each further threshold counts the levels below it, the chosen one is the core."""
    shape = (4, 40, 40)
    tissue = np.ones(shape, bool)
    left = hemispheres(shape, Image(np.zeros(shape, np.uint8), (2.0, 2.0, 5.0)).index_to_physical, tissue)
    cbf = np.full(shape, 50.0, np.float32)
    tmax = np.full(shape, 1.0, np.float32)
    tmax[:, 5:35, 22:38] = 9.0
    cbf[:, 10:15, 25:35] = 5.0  # rCBF 0.10: 4 x 5 x 10 = 200 voxels = 4 mL
    cbf[:, 15:20, 25:35] = 12.5  # 0.25
    cbf[:, 20:25, 25:35] = 18.0  # 0.36
    th = Thresholds(core_median_voxels=1, core_rcbf_also=(0.38, 0.2, 0.05))
    core, _, _, rep = decide(cbf, tmax, tissue, left, 0.02, kind="ct", thresholds=th)
    assert rep["core_ml"] == pytest.approx(8.0)
    assert rep["core_ml_by_rcbf"] == {"0.05": 0.0, "0.2": 4.0, "0.3": 8.0, "0.38": 12.0}
    assert list(rep["core_ml_by_rcbf"]) == ["0.05", "0.2", "0.3", "0.38"]  # ascending, whatever the order given
    shown = formatted_volumes(rep)  # the wording of the command line, the summary figure and the module
    assert shown["core"] == "8.0 mL" and shown["tmax_hypo_s"] == "6"
    assert shown["core_by_rcbf"] == "< 5%: 0.0 mL, < 20%: 4.0 mL, < 30%: 8.0 mL, < 38%: 12.0 mL"
    assert shown["ratio"] == f"{rep['mismatch_ratio']:.2f}"
    assert formatted_volumes({"core_ml": 0.0, "mismatch_ratio": None, "hir": None})["ratio"] == "n/a"
    # An ADC core has no rCBF neighbours; none asked for, only the chosen threshold.
    adc = np.full(shape, 800.0, np.float32)
    assert decide(cbf, tmax, tissue, left, 0.02, kind="mr", adc=adc)[3]["core_ml_by_rcbf"] == {}
    _, _, _, none = decide(cbf, tmax, tissue, left, 0.02, kind="ct", thresholds=Thresholds(core_median_voxels=1, core_rcbf_also=()))
    assert none["core_ml_by_rcbf"] == {"0.3": 8.0}
    for bad in ((0.0,), (1.0,), (float("nan"),), ("0.2",)):
        with pytest.raises(ValueError, match="core_rcbf_also"):
            Thresholds(core_rcbf_also=bad).validate()


def test_ct_core_rcbf_is_median_filtered_in_plane():
    """Single noisy voxels do not flip across the rCBF line: a high voxel inside the core stays
    core, a low voxel in the penumbra stays penumbra; a round core keeps its volume."""
    shape = (3, 48, 48)
    tissue = np.ones(shape, bool)
    geom = Image(np.zeros(shape, np.uint8), (2.0, 2.0, 5.0))
    left = hemispheres(shape, geom.index_to_physical, tissue)
    cbf = np.full(shape, 50.0, np.float32)  # healthy right hemisphere (x < 24)
    tmax = np.full(shape, 1.0, np.float32)
    tmax[:, 4:44, 26:46] = 9.0
    cbf[:, 4:44, 26:46] = 20.0  # penumbra: rCBF 0.4
    yy, xx = np.mgrid[:48, :48]
    disc = (yy - 24) ** 2 + (xx - 36) ** 2 <= 6 ** 2
    cbf[:, disc] = 7.5  # core: rCBF 0.15
    cbf[1, 24, 36] = 18.0  # noise inside the core: rCBF 0.36
    cbf[1, 8, 30] = 12.0  # noise in the penumbra: rCBF 0.24
    core, _, _, rep = decide(cbf, tmax, tissue, left, 0.02, kind="ct")
    assert core[1, 24, 36] and not core[1, 8, 30]
    assert "median-filtered 3 x 3" in rep["core_method"] and rep["thresholds"]["core_median_voxels"] == 3
    # The median trims only the pixelated disc's four one-voxel nubs per slice (12 of 339 voxels).
    assert 3 * disc.sum() - 12 <= core.sum() <= 3 * disc.sum()
    raw, *_ = decide(cbf, tmax, tissue, left, 0.02, kind="ct", thresholds=Thresholds(core_median_voxels=1))
    assert not raw[1, 24, 36]  # without the median the noisy voxel punches a hole
    for bad in (2, 0, 2.5):
        with pytest.raises(ValueError, match="core_median_voxels"):
            Thresholds(core_median_voxels=bad).validate()


# -- bad input ---------------------------------------------------------------------------------------


def test_3d_given_as_4d_and_short_series(small_ct):
    series = small_ct.images["ctp"]
    with pytest.raises(InputError, match="3D volume where a 4D"):
        validate_series(series.frame(0), "vol.nii.gz")
    one = series.with_array(series.array[:1])
    one.meta["times"] = [0.0]
    with pytest.raises(InputError, match="3D volume where a 4D"):
        run_perfusion(one)
    short = Image(series.array[:8], series.spacing, series.origin, series.direction, {"times": list(np.arange(8) * 1.5)})
    with pytest.raises(InputError, match="series too short"):
        run_perfusion(short)


def test_missing_and_non_monotonic_times(small_ct, tmp_path):
    import nibabel as nib

    series = small_ct.images["ctp"]
    arr = np.transpose(series.array, (3, 2, 1, 0))  # (x, y, z, t) for NIfTI
    img = nib.Nifti1Image(arr, np.diag([*series.spacing, 1.0]))
    img.header["pixdim"][4] = 0.0  # no frame interval in the header
    path = tmp_path / "ctp.nii.gz"
    nib.save(img, str(path))
    with pytest.raises(InputError, match="frame times are missing"):
        load_series(path)
    assert load_series(path, dt=1.5).meta["times"][3] == pytest.approx(4.5)
    bad = series.with_array(series.array)
    bad.meta["times"] = [0.0, 1.5, 3.0, 3.0] + [4.5 + 1.5 * k for k in range(series.array.shape[0] - 4)]
    with pytest.raises(InputError, match="not strictly increasing"):
        run_perfusion(bad)
    with pytest.raises(InputError, match="implausible frame interval"):
        load_series(path, dt=1500.0)
    img.header["pixdim"][4] = -1.5  # a negative step: refused, not taken as unset or as 1.5 s
    nib.save(img, str(path))
    with pytest.raises(InputError, match=r"ctp.nii.gz: the header's frame interval is negative \(-1.5\)"):
        load_series(path)
    assert load_series(path, dt=1.5).meta["times"][-1] == pytest.approx(1.5 * (series.array.shape[0] - 1))


def test_nan_in_a_nifti_series(small_ct, tmp_path):
    """ITK reads a NIfTI's NaN voxels as 0: the series must still be refused, not deconvolved."""
    import nibabel as nib

    series = small_ct.images["ctp"]
    arr = np.transpose(series.array, (3, 2, 1, 0)).astype(np.float32)
    arr[10:20, 10:20, 3, 12] = np.nan
    img = nib.Nifti1Image(arr, np.diag([*series.spacing, 1.0]))
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = 1.5
    path = tmp_path / "ctp.nii.gz"
    nib.save(img, str(path))
    with pytest.raises(InputError, match="ctp.nii.gz: series contains NaN/Inf voxels"):
        load_series(path)


def test_no_bolus_and_saturation(small_ct, lesion_library):
    series = small_ct.images["ctp"]
    rng = np.random.default_rng(5)
    flat = np.repeat(series.array[:1].astype(np.float32), series.array.shape[0], axis=0)
    flat += rng.normal(0, 3, flat.shape).astype(np.float32)
    with pytest.raises(InputError, match="no bolus found"):
        run_perfusion(series.with_array(flat), settings=PerfusionSettings(motion_correction=False))
    # Exported through a narrow window. Whether the clipped arteries are among the early candidates
    # depends on the anatomy, so three subjects: the refusal must not hang on one of them.
    for case in (small_ct, *(simulate_perfusion(seed, "ctp", lesion_library, "test", motion=False, **SMALL) for seed in (4, 5))):
        clipped = case.images["ctp"].with_array(np.minimum(case.images["ctp"].array, 150))
        with pytest.raises(InputError, match="saturated"):
            run_perfusion(clipped, settings=PerfusionSettings(motion_correction=False))


def test_noise_is_refused_as_not_one_head(small_ct):
    series = small_ct.images["ctp"]
    head = ct_masks(series.array[0].astype(np.float32), series.spacing).head
    assert frame_similarity(series.array.astype(np.float32), head) > 0.95  # a real series, with its motion
    noise = np.random.default_rng(3).normal(40, 15, series.array.shape).astype(np.float32)
    with pytest.raises(InputError, match=r"do not show one head \(correlation between consecutive frames 0\.0"):
        run_perfusion(series.with_array(noise))


def test_arterial_input_outside_the_brain(small_ct, small_ct_result):
    series = small_ct.images["ctp"]
    corner = tuple(series.index_to_physical(np.array([[1.0, 1.0, 3.0]]))[0])  # air
    with pytest.raises(InputError, match="outside the brain"):
        run_perfusion(series, aif_point=corner, settings=PerfusionSettings(motion_correction=False))
    far = tuple(series.index_to_physical(np.array([[-50.0, 10.0, 3.0]]))[0])
    with pytest.raises(InputError, match="outside the image"):
        run_perfusion(series, aif_point=far, settings=PerfusionSettings(motion_correction=False))
    mask = series.frame(0).with_array(np.zeros(series.array.shape[1:], np.uint8))
    mask.array[:, :2, :2] = 1
    with pytest.raises(InputError, match="mask lies outside the brain"):
        run_perfusion(series, aif_mask=mask, settings=PerfusionSettings(motion_correction=False))
    # A point on the chosen artery works and is reported as the user's.
    p = tuple(small_ct_result.report["arterial_input"]["voxels_lps_mm"][0])
    res = run_perfusion(series, aif_point=p, settings=PerfusionSettings(motion_correction=False))
    assert res.report["arterial_input"]["source"] == "point"


def _perfusion_parser():
    """The `strokeseg` command line with its perfusion sub-command."""
    from strokeseg.cli import build_parser
    from strokeseg.perfusion.cli import add_perfusion_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    if "perfusion" not in sub.choices:
        add_perfusion_parser(sub)
    return parser


def test_cli_bad_input_leaves_no_output(tmp_path):
    parser = _perfusion_parser()
    vol = tmp_path / "vol.nii.gz"
    write_image(Image(np.random.default_rng(0).normal(40, 5, (4, 16, 16)).astype(np.float32), (1.0, 1.0, 5.0)), vol)
    args = parser.parse_args(["perfusion", str(vol), "--out", str(tmp_path / "out"), "-q"])
    with pytest.raises(InputError, match="vol.nii.gz: 3D volume"):
        args.func(args)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_to_replace_maps_it_did_not_write(small_ct, tmp_path):
    """A folder holding someone's maps (here a phantom case: cbf.nii.gz, core.nii.gz, ...) is
    refused as --out before the pipeline runs, and keeps its files."""
    folder = tmp_path / "case"
    write_image(small_ct.images["ctp"], folder / "ctp.nii.gz")
    (folder / "cbf.nii.gz").write_bytes(b"someone's map")
    args = _perfusion_parser().parse_args(["perfusion", str(folder / "ctp.nii.gz"), "--out", str(folder), "-q"])
    with pytest.raises(OutputError, match="cbf.nii.gz: exists and is not a StrokeSeg output"):
        args.func(args)
    assert (folder / "cbf.nii.gz").read_bytes() == b"someone's map"
    assert sorted(p.name for p in folder.iterdir()) == ["cbf.nii.gz", "ctp.nii.gz"]


def test_cli_core_median_option_reaches_the_engine(small_ct, tmp_path):
    parser = _perfusion_parser()
    series = tmp_path / "ctp.nii.gz"
    write_image(small_ct.images["ctp"], series)
    args = parser.parse_args(["perfusion", str(series), "--out", str(tmp_path / "out"), "-q", "--core-median", "2"])
    with pytest.raises(InputError, match="core_median_voxels must be an odd"):
        args.func(args)
    assert not (tmp_path / "out").exists()


def test_cli_core_flow_option_reaches_the_engine(small_ct, tmp_path, capsys):
    parser = _perfusion_parser()
    series = tmp_path / "ctp.nii.gz"
    write_image(small_ct.images["ctp"], series)
    args = parser.parse_args(["perfusion", str(series), "--out", str(tmp_path / "out"), "-q", "--core-flow", "kinetic"])
    assert args.func(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["core_flow"]["method"] == "kinetic" and report["settings"]["core_flow"] == "kinetic"
    assert "flow from tracer-kinetic fits" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["perfusion", str(series), "--out", str(tmp_path / "x"), "--core-flow", "fit"])


def test_cli_core_rcbf_also_option(small_ct, tmp_path, capsys):
    parser = _perfusion_parser()
    series = tmp_path / "ctp.nii.gz"
    write_image(small_ct.images["ctp"], series)
    out = tmp_path / "out"
    args = parser.parse_args(["perfusion", str(series), "--out", str(out), "-q", "--core-rcbf-also", "0.4,0.2"])
    assert args.func(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["core_ml_by_rcbf"]) == ["0.2", "0.3", "0.4"]
    assert report["core_ml_by_rcbf"]["0.3"] == report["core_ml"]
    assert report["core_ml_by_rcbf"]["0.2"] <= report["core_ml"] <= report["core_ml_by_rcbf"]["0.4"]
    assert "core by rCBF    < 20%:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["perfusion", str(series), "--out", str(out), "--core-rcbf-also", "a,b"])
    args = parser.parse_args(["perfusion", str(series), "--out", str(tmp_path / "bad"), "-q", "--core-rcbf-also", "0.2,1.5"])
    with pytest.raises(InputError, match="core_rcbf_also takes fractions between 0 and 1"):
        args.func(args)
    assert not (tmp_path / "bad").exists()
    assert parser.parse_args(["perfusion", str(series), "--out", str(out), "--core-rcbf-also", "none"]).core_rcbf_also == ()


# -- outputs ---------------------------------------------------------------------------------------


def test_write_perfusion_is_all_or_nothing(small_ct_result, tmp_path, monkeypatch):
    out = tmp_path / "result"
    write_perfusion(small_ct_result, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    rep = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert rep["core_ml"] == small_ct_result.report["core_ml"]
    tmax = read_image(out / "tmax.nii.gz")
    assert tmax.same_grid(small_ct_result.maps["tmax"]) and np.allclose(tmax.array, small_ct_result.maps["tmax"].array)

    import strokeseg.perfusion.pipeline as pp

    calls = {"n": 0}
    real = pp.write_image

    def failing(img, path, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OutputError(f"{path}: disk full")
        return real(img, path, **kw)

    monkeypatch.setattr(pp, "write_image", failing)
    fresh = tmp_path / "fresh"
    with pytest.raises(OutputError):
        write_perfusion(small_ct_result, fresh)
    assert not fresh.exists()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    calls["n"] = 0
    with pytest.raises(OutputError):
        write_perfusion(small_ct_result, out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # the old result is intact
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left


@pytest.mark.parametrize("direction", [
    (1, 0, 0, 0, 1, 0, 0, 0, 1),  # LPS
    (-1, 0, 0, 0, -1, 0, 0, 0, 1),  # RAS index order (NIfTI-like)
    (0, 1, 0, 1, 0, 0, 0, 0, -1),  # x and y swapped, slices running downwards
])
def test_summary_figure_shows_the_patients_left_on_the_right(direction):
    """Whatever the direction matrix, the figure's arrays run [S, P, L]: a marker at a known
    physical point lands where SimpleITK puts that point in the LPS-oriented image, and a marker on
    the patient's left (LPS +x) lands in the right half of the panel (radiological view)."""
    from strokeseg.perfusion.summary_figure import radiological

    arr = np.zeros((6, 20, 30), np.uint8)  # z, y, x
    img = Image(arr, (1.0, 2.0, 5.0), (3.0, -4.0, 7.0), direction)
    left_idx = (25, 10, 3) if direction[0] == 1 else ((4, 10, 3) if direction[0] == -1 else (10, 17, 3))
    arr[left_idx[2], left_idx[1], left_idx[0]] = 1
    point = img.to_sitk().TransformIndexToPhysicalPoint(left_idx)
    assert point[0] > img.to_sitk().TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.to_sitk().GetSize()])[0]
    shown, aspect = radiological(img)
    oriented = sitk.DICOMOrient(img.to_sitk(), "LPS")
    assert np.allclose(np.array(oriented.GetDirection()).reshape(3, 3), np.eye(3))
    i, j, k = oriented.TransformPhysicalPointToIndex(point)
    assert shown[k, j, i] == 1 and shown.sum() == 1
    assert i > shown.shape[2] / 2  # the patient's left: the right half of the picture
    assert aspect == pytest.approx(oriented.GetSpacing()[1] / oriented.GetSpacing()[0])


def test_summary_figure_is_written_with_the_result(small_ct_result, tmp_path):
    from matplotlib.image import imread

    from strokeseg.perfusion.summary_figure import CORE_RGB, HYPO_RGB

    out = tmp_path / "result"
    write_perfusion(small_ct_result, out)
    png = imread(out / "summary.png")
    assert png.ndim == 3 and png.shape[0] > 200 and png.shape[1] > 400

    def share(rgb):  # fraction of pixels close to a colour (drawn with alpha over grey: loose)
        d = np.abs(png[..., :3] - np.asarray(rgb)).max(axis=-1)
        return float((d < 0.25).mean())

    assert small_ct_result.report["core_ml"] > 0 and share(CORE_RGB) > 1e-4
    assert small_ct_result.report["penumbra_ml"] > 0 and share(HYPO_RGB) > 1e-4


def test_nifti_series_round_trip(small_ct, tmp_path):
    path = write_image(small_ct.images["ctp"], tmp_path / "ctp.nii.gz")
    series = load_series(path)
    assert series.array.shape == small_ct.images["ctp"].array.shape
    assert np.allclose(series.meta["times"], small_ct.images["ctp"].meta["times"])
    assert series.same_grid(small_ct.images["ctp"])


# -- DICOM -----------------------------------------------------------------------------------------


def _write_dicom_series(folder: Path, vol: np.ndarray, times: np.ndarray, slice_offsets: np.ndarray,
                        with_times: bool = True) -> None:
    """Classic single-frame CT files: one per (time, slice), per-slice acquisition times."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    series_uid, study_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    n_t, n_z, ny, nx = vol.shape
    k = 0
    for t in range(n_t):
        for z in range(n_z):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
            ds.Modality = "CT"
            ds.InstanceNumber = k + 1
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [-20.0, -30.0, 10.0 + 5.0 * z]
            ds.PixelSpacing = [1.5, 1.25]  # row spacing (y), column spacing (x)
            ds.SliceThickness = 5.0
            ds.Rows, ds.Columns = ny, nx
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
            if with_times:
                sec = 3600 * 10 + 60 * 30 + times[t] + slice_offsets[z]
                ds.AcquisitionTime = f"{int(sec // 3600):02d}{int(sec % 3600 // 60):02d}{sec % 60:09.6f}"
            ds.PixelData = (vol[t, z] + 1024).astype(np.int16).tobytes()
            ds.save_as(folder / f"IM{k:04d}.dcm", enforce_file_format=True)
            k += 1


def test_dicom_multitemporal_series(tmp_path):
    rng = np.random.default_rng(3)
    times = np.concatenate([np.arange(0, 20, 1.0), 20 + np.arange(10) * 2.0])  # irregular: 1 s then 2 s
    vol = rng.integers(0, 80, (times.size, 3, 6, 5)).astype(np.int16)
    vol[:, 1, 2, 3] = np.arange(times.size)  # a marker that tells frames apart
    offsets = np.array([0.0, 0.4, 0.2])  # interleaved slice acquisition within each volume
    order = rng.permutation(times.size * 3)
    folder = tmp_path / "dyn"
    _write_dicom_series(folder, vol, times, offsets)
    # Shuffle file names: the order must come from the headers.
    files = sorted(folder.iterdir())
    for i, j in enumerate(order):
        files[j].rename(folder / f"x{i:04d}.dcm")
    series = load_series(folder)
    assert series.array.shape == vol.shape
    assert np.allclose(series.array, vol.astype(np.float32) - 0)  # rescale applied: stored + 1024 - 1024
    assert np.allclose(series.array[:, 1, 2, 3], np.arange(times.size))
    assert np.allclose(series.meta["times"], times, atol=1e-3)  # mean over slices, relative to the first frame
    assert series.spacing == pytest.approx((1.25, 1.5, 5.0))
    assert series.origin == pytest.approx((-20.0, -30.0, 10.0))
    assert series.meta["dicom_modality"] == "CT"
    plain = tmp_path / "notimes"
    _write_dicom_series(plain, vol[:, :, :, :], times, offsets, with_times=False)
    with pytest.raises(InputError, match="frame times are missing"):
        load_series(plain)
    assert load_series(plain, dt=1.0).array.shape == vol.shape  # instance numbers order the frames


def test_enhanced_ct_rcbf_map_geometry_and_units():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("eCT_Supplemental.dcm")
    m = read_perfusion_map(path)
    assert m.array.shape == (2, 512, 512)
    assert m.spacing == pytest.approx((0.388672, 0.388672, 10.0))
    # Same voxels in space as SimpleITK's reading of the file (frames at z = -159 and -149 mm).
    ref = read_image(path)
    corners = np.array([[0, 0, 0], [511, 511, 1], [100, 200, 0]], float)
    pts = m.index_to_physical(corners)
    back = ref.physical_to_index(pts)
    assert np.allclose(np.round(back), back, atol=1e-4)
    for (x, y, z), (i, j, k) in zip(corners.astype(int), np.round(back).astype(int)):
        raw_m = m.array[z, y, x]
        raw_r = ref.array[k, j, i]
        assert raw_m == pytest.approx(max(raw_r, 0) * m.meta["unit_factor"], rel=1e-5, abs=1e-4)
    assert sorted(round(p[2], 3) for p in m.index_to_physical(np.array([[0, 0, 0], [0, 0, 1]], float))) == [-159.0, -149.0]
    # Units: the Real World Value Mapping says ml/100ml/s; brain values ~37 only make sense per
    # minute, which the reader notes, and converts to mL/100 g/min (brain density 1.04 g/mL).
    assert m.meta["map"] == "cbf" and m.meta["units"] == "mL/100g/min"
    assert m.meta["source_units"] == "ml/100ml/s" and "units_note" in m.meta
    brain = m.array[m.array > 0]
    assert 20 < np.median(brain) < 80
    assert m.meta["unit_factor"] == pytest.approx(1 / 1.04)


# -- phantoms --------------------------------------------------------------------------------------


def test_ct_phantom_states_the_flow_its_core_is_relative_to(small_ct):
    """info["core_reference_cbf"]: the mean true CBF of tissue that is not hypoperfused (healthy
    hemisphere), and every true core voxel is below 30% of it."""
    t = small_ct.truth
    ref = small_ct.info["core_reference_cbf"]
    core, cbf = t["core"].array > 0, t["cbf"].array
    normal = (t["tissue"].array > 0) & (t["tmax"].array <= 6.0)
    assert core.any() and np.all(cbf[core] < 0.3 * ref)
    assert 0.95 < ref / float(np.mean(cbf[normal])) < 1.05  # per voxel (CSF-diluted), not per 100 g of tissue


def test_ct_rule_on_the_phantoms_true_maps_finds_its_core(small_ct):
    """The phantom's core truth (the lesion) and the engine's CT rule (rCBF < 30% of the healthy
    hemisphere, its filters) agree on the true maps: the core's volume error on phantoms is the
    computed maps', not a mismatch between the truth and the rule."""
    t = small_ct.truth
    core, report = small_ct.ct_rule_on_true_maps()
    true_ml = float(np.count_nonzero(t["core"].array)) * t["cbf"].voxel_volume_ml
    assert true_ml > 1.0
    assert abs(report["core_ml"] - true_ml) <= max(5.0, 0.15 * true_ml)
    assert np.count_nonzero(core & (t["core"].array > 0)) >= 0.8 * np.count_nonzero(t["core"].array)


def test_phantom_noise_draw_changes_only_the_noise(lesion_library):
    """noise_draw=k: another realisation of the same acquisition's noise; the anatomy, lesion,
    kinetics and motion, and draw 0 (the default), are the case's own."""
    kw = dict(motion=True, **SMALL)
    own = simulate_perfusion(8, "ctp", lesion_library, "val", **kw)
    assert np.array_equal(simulate_perfusion(8, "ctp", lesion_library, "val", noise_draw=0, **kw).images["ctp"].array,
                          own.images["ctp"].array)
    other = simulate_perfusion(8, "ctp", lesion_library, "val", noise_draw=2, **kw)
    a, b = own.images["ctp"].array.astype(np.float32), other.images["ctp"].array.astype(np.float32)
    assert not np.array_equal(a, b)
    assert all(np.array_equal(own.truth[k].array, other.truth[k].array) for k in own.truth)
    assert own.info["motion"] == other.info["motion"] and other.info["acquisition"]["noise_draw"] == 2
    diff = (a - b)[:, own.truth["tissue"].array > 0]
    sd = np.sqrt(2) * own.info["acquisition"]["noise_hu"]  # two independent draws (plus HU rounding)
    assert abs(float(diff.mean())) < 0.1 * sd and 0.9 * sd < float(diff.std()) < 1.25 * sd


def test_phantom_is_deterministic_and_written(lesion_library, tmp_path):
    a = simulate_perfusion(8, "ctp", lesion_library, "val", motion=True, **{**SMALL, "compute_maps": True})
    b = simulate_perfusion(8, "ctp", lesion_library, "val", motion=True, **{**SMALL, "compute_maps": True})
    c = simulate_perfusion(9, "ctp", lesion_library, "val", **SMALL)
    assert np.array_equal(a.images["ctp"].array, b.images["ctp"].array)
    assert np.array_equal(a.truth["tmax"].array, b.truth["tmax"].array)
    assert a.info == b.info
    assert not np.array_equal(a.images["ctp"].array, c.images["ctp"].array)
    ct = a.images["ctp"].array
    assert ct.dtype == np.int16 and ct.min() >= -1024
    tissue = a.truth["tissue"].array > 0
    assert 25 <= np.median(ct[0][tissue]) <= 50  # parenchyma 25-50 HU before contrast
    folder = write_perfusion_case(a, tmp_path)
    names = {p.name for p in folder.iterdir()}
    assert {"ctp.nii.gz", "core.nii.gz", "penumbra.nii.gz", "lesion.nii.gz", "case.json",
            "cbf.nii.gz", "tmax.nii.gz", "true_cbf.nii.gz", "true_tmax.nii.gz"} <= names
    info = json.loads((folder / "case.json").read_text(encoding="utf-8"))
    assert info["core_ml"] == a.info["core_ml"] and "computed" in info
    series = load_series(folder / "ctp.nii.gz")
    assert np.allclose(series.meta["times"], a.images["ctp"].meta["times"])
