"""Simulated CT perfusion (CTP) and DSC-MR perfusion (PWI) patients with known maps, core and penumbra.

Anatomy, subject pose, lesion shapes and arterial territories are those of the DWI phantoms
(``anatomy``, ``acquisition``, ``lesions``, ``library``); on top of them a tracer-kinetic model:

* arterial input: gamma variate (Thompson et al. 1964; Benner et al. 1997 for first-pass shapes)
  plus a dispersed recirculation pass;
* tissue: C(t) = rho/kH * CBF * (AIF (x) h_beta (x) R)(t - delay), with an exponential residue
  R(t) = exp(-t/MTT) (Ostergaard et al. 1996; gamma, linear or box residues on request, see
  ``residue_functions``), MTT = CBV/CBF, and a dispersion kernel
  h_beta(t) = exp(-t/beta)/beta that widens with the delay on collateral paths (Calamante et al.,
  MRM 2006); rho = 1.04 g/mL and kH = 0.55/0.75, as in the deconvolution;
* ischaemia in the arterial territory (atlas of Liu et al., Sci Data 2023) of the lesion: a
  severity field, 1 in the core and falling with the distance from it (plus a territory-wide
  floor for the collateral grade), sets the delay, the dispersion, the drop in CBF and the change
  in CBV. Core (the lesion): CBF 5-15% of the healthy tissue mean, CBV 30-60%; penumbra: delayed,
  CBF reduced but at least ~40% of the healthy mean, CBV preserved or raised; benign oligaemia
  (mild delay, CBF 70-95%) further out;
* vessels: internal carotid, middle/anterior/posterior cerebral and basilar arteries, sagittal,
  straight and transverse sinuses as tubes on the template, so the arterial input and venous
  output are found, with partial volume, where they are in a patient; arteries distal to the
  occlusion fill late and weakly through collaterals.

CT: Hounsfield units (grey matter ~35-42 HU, arterial peaks 200-500 HU above baseline), quantum
noise, 1-2 s sampling over 40-60 s, 5-10 mm slices and a 40-80 mm slab; optional head motion.
MR: gradient-echo EPI, S(t) = S0 exp(-TE dR2*(t)), Rician noise, ~1.5 s sampling, 50-60 volumes,
whole-brain coverage, plus DWI (b = 1000) and ADC of the same subject for the ADC core.

Ground truth: true CBF, CBV, MTT, Tmax (delay + peak of the dispersed residue) and TTP maps,
core (= lesion), penumbra (true Tmax > 6 s outside the core), and by default the maps our own
deconvolution computes from the simulated series (the inputs perfusion models are trained on).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..image import Image
from ..io import write_image, write_text
from ..perfusion.decision import decide, hemispheres
from . import acquisition as acqm
from .anatomy import head_model, mni_to_lps, upsample_linear
from .cases import PhantomCase
from .lesions import AcuteLesions, heterogeneity, make_acute
from .library import lesion_sources
from .mr_signal import B_VALUE, Contrast, draw_tissue_params, signal_maps

GENERATOR_VERSION = "perfusion-1.0"
MODALITIES = ("ctp", "pwi")
RHO = 1.04
KH = 0.55 / 0.75
_SPLIT_CODE = {None: 0, "train": 1, "val": 2, "test": 3}
_STREAMS = ("anatomy", "lesion", "kinetics", "acquisition", "noise", "motion", "dwi")

# Arterial territory groups of the atlas (short names without side) and the vessels feeding them.
GROUPS = {
    "MCA": ("MCAF", "MCAP", "MCAT", "MCAO", "MCAI", "LLS", "ACTP"),
    "ACA": ("ACA", "MLS"),
    "PCA": ("PCAT", "PCAO", "PCTP"),
    "VB": ("B", "SC", "IC"),
}
# Vessel centre lines in MNI (RAS) mm, approximate positions on the ICBM152 2009 brain; x > 0 is
# the right side and is mirrored for the left. (name, territory group fed, [points], radius mm).
_ARTERIES_R = [
    ("ICA", None, [(16, 4, -34), (15, 2, -22), (14, 0, -13)], 2.2),
    ("M1", "MCA", [(14, 0, -13), (26, 2, -12), (38, 4, -6)], 1.6),
    ("M2", "MCA", [(38, 4, -6), (42, -4, 6), (44, -16, 16)], 1.1),
    ("M2a", "MCA", [(38, 4, -6), (40, 14, 6), (40, 22, 16)], 1.0),
    ("A1", "ACA", [(14, 0, -13), (8, 10, -10), (3, 16, -8)], 1.1),
    ("A2", "ACA", [(3, 16, -8), (4, 30, 8), (4, 22, 32), (4, 0, 44), (4, -26, 46)], 1.0),
    ("P1", "PCA", [(0, -20, -22), (12, -24, -14), (24, -40, -6), (18, -70, 0)], 1.1),
]
_ARTERIES_MID = [("BA", "VB", [(0, -24, -46), (0, -21, -32), (0, -20, -22)], 1.6)]
_VEINS = [
    ("SSS", [(0, 62, 30), (0, 42, 64), (0, 6, 80), (0, -36, 76), (0, -72, 56), (0, -96, 26), (0, -102, 6)], 3.2),
    ("StS", [(0, -52, 10), (0, -80, 10), (0, -102, 6)], 2.2),
    ("TS_R", [(0, -102, 6), (28, -98, -2), (50, -78, -14), (56, -58, -30)], 3.0),
    ("TS_L", [(0, -102, 6), (-28, -98, -2), (-50, -78, -14), (-56, -58, -30)], 3.0),
]
CT_HU = {"gm": (36.0, 42.0), "wm": (26.0, 31.0), "csf": (4.0, 10.0), "blood": (38.0, 46.0), "muscle": (45.0, 60.0),
         "fat": (-100.0, -80.0), "bone": (900.0, 1500.0), "marrow": (250.0, 450.0)}


@dataclass
class PerfusionCase(PhantomCase):
    """A perfusion phantom: ``images`` holds the 4D series ("ctp" or "pwi"; "adc", "dwi" for MR)
    and, when computed, our deconvolution's maps ("cbf", "cbv", "mtt", "tmax", "ttp"); ``lesion``
    is the core; ``truth`` the core, penumbra, parenchyma mask, true maps and the arterial and
    venous blood fraction of each voxel."""

    truth: dict[str, Image] = field(default_factory=dict)

    def ct_rule_on_true_maps(self) -> tuple[np.ndarray, dict]:
        """The engine's CT core rule (default thresholds) applied to the true CBF and Tmax maps in
        the true parenchyma: the core mask and decision report an unbiased deconvolution would give."""
        t = self.truth
        tissue = t["tissue"].array > 0
        left = hemispheres(tissue.shape, t["cbf"].index_to_physical, tissue)
        core, _, _, report = decide(t["cbf"].array, t["tmax"].array, tissue, left, t["cbf"].voxel_volume_ml, kind="ct")
        return core, report


def _streams(seed: int, split: str | None, modality: str) -> dict[str, np.random.Generator]:
    if split not in _SPLIT_CODE:
        raise ValueError(f"split must be one of 'train', 'val', 'test' or None, got {split!r}")
    ss = np.random.SeedSequence([int(seed), _SPLIT_CODE[split], 0x9E4F, MODALITIES.index(modality)])
    return {name: np.random.default_rng(child) for name, child in zip(_STREAMS, ss.spawn(len(_STREAMS)))}


# -- anatomy adapters ------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _skull() -> tuple[np.ndarray, np.ndarray]:
    """(cortical bone, diploe) fractions on the template grid. The DWI head model has no bone map
    (bone gives no MR signal); what its skull band leaves unfilled is bone, and its diploic fat is
    trabecular bone with marrow for CT."""
    h = head_model()
    tissue = h.gm + h.wm + h.csf + h.muscle + h.fat
    icv = h.icv > 0
    d_out = ndimage.distance_transform_edt(~icv[::2, ::2, ::2], sampling=2.0).astype(np.float32)
    d_out = upsample_linear(d_out, 2, icv.shape)
    band = (~icv) & (d_out > 1.0) & (d_out < 11.0)
    envelope = ndimage.binary_fill_holes(tissue > 0.3)
    bone = np.clip(1.0 - tissue, 0.0, 1.0) * (envelope & (h.air == 0))
    marrow = np.where(band, h.fat, 0.0).astype(np.float32)
    # Skull base: the head model's neck block leaves a band of nothing under the brain: bone too.
    return bone.astype(np.float32), marrow


def _tube_fraction(crop: tuple[slice, slice, slice], segments: list[tuple[np.ndarray, np.ndarray, float]]) -> np.ndarray:
    """Partial-volume fraction of tubes (LPS points p0 -> p1, radius) on a crop of the template grid."""
    h = head_model()
    out = np.zeros(tuple(s.stop - s.start for s in crop), np.float32)
    lo_c = np.array([crop[2].start, crop[1].start, crop[0].start])
    hi_c = np.array([crop[2].stop, crop[1].stop, crop[0].stop])
    for p0, p1, r in segments:
        ends = h.grid.physical_to_index(np.stack([p0, p1]))  # (x, y, z) indices
        lo = np.maximum(np.floor(ends.min(0) - r - 2).astype(int), lo_c)
        hi = np.minimum(np.ceil(ends.max(0) + r + 3).astype(int), hi_c)
        if np.any(hi <= lo):
            continue
        zz, yy, xx = np.mgrid[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]]
        pts = h.grid.index_to_physical(np.stack([xx.ravel(), yy.ravel(), zz.ravel()], 1).astype(float))
        seg = p1 - p0
        u = np.clip(((pts - p0) @ seg) / max(float(seg @ seg), 1e-9), 0.0, 1.0)
        d = np.linalg.norm(pts - (p0 + u[:, None] * seg), axis=1)
        frac = np.clip(r - d + 0.5, 0.0, 1.0).reshape(zz.shape).astype(np.float32)
        sl = tuple(slice(a - c, b - c) for a, b, c in zip(lo[::-1], hi[::-1], lo_c[::-1]))
        np.maximum(out[sl], frac, out=out[sl])
    return out


def _sample(maps: list[np.ndarray], crop, pose, ref: Image, thickness: float) -> list[np.ndarray]:
    """Template maps (crops) -> the acquisition grid through the subject pose, averaged over the
    slice profile. Like ``acquisition.sample_on_grid`` but the pose transform (an affine and a
    displacement field) is evaluated once per sub-slice for all maps, and sub-slices every ~1.25 mm
    replace the through-plane blur: 4-5x faster for the dozen maps a perfusion case needs."""
    head = head_model()
    n_sub = int(max(3, np.ceil(thickness / 1.25)))
    offsets = (np.arange(n_sub) + 0.5) / n_sub * 1.1 * thickness - 0.55 * thickness
    weights = np.exp(-4 * np.log(2) * (offsets / thickness) ** 4)  # flat top, soft edges
    weights /= weights.sum()
    normal = ref.direction_matrix[:, 2]
    start = np.array([crop[0].start, crop[1].start, crop[2].start], float)
    zz, yy, xx = np.indices(ref.array.shape)
    base = ref.index_to_physical(np.stack([xx.ravel(), yy.ravel(), zz.ravel()], 1).astype(float))
    outs = [np.zeros(ref.array.shape, np.float32) for _ in maps]
    for u, w in zip(offsets, weights):
        origin = tuple(float(v) for v in np.asarray(ref.origin) + normal * u)
        field_img = sitk.TransformToDisplacementField(pose.transform, sitk.sitkVectorFloat64, ref.size, origin,
                                                      ref.spacing, ref.direction)
        q = base + normal * u + sitk.GetArrayViewFromImage(field_img).reshape(-1, 3)
        idx = (head.grid.physical_to_index(q)[:, ::-1] - start).T  # (z, y, x) in the crop
        for m, o in zip(maps, outs):
            o += np.float32(w) * ndimage.map_coordinates(m, idx, order=1, mode="constant", cval=0.0).reshape(o.shape)
    return outs


def _polyline(points_mni, radius: float, mirror: bool = False) -> list[tuple[np.ndarray, np.ndarray, float]]:
    pts = [mni_to_lps((-p[0] if mirror else p[0], p[1], p[2])) for p in points_mni]
    return [(pts[i], pts[i + 1], radius) for i in range(len(pts) - 1)]


def _embed(region, crop) -> np.ndarray:
    out = np.zeros(tuple(s.stop - s.start for s in crop), np.float32)
    if region is None:
        return out
    lo = [max(a.start, b.start) for a, b in zip(crop, region.slices)]
    hi = [min(a.stop, b.stop) for a, b in zip(crop, region.slices)]
    if any(h_ <= l_ for l_, h_ in zip(lo, hi)):
        return out
    dst = tuple(slice(l_ - c.start, h_ - c.start) for l_, h_, c in zip(lo, hi, crop))
    src = tuple(slice(l_ - r.start, h_ - r.start) for l_, h_, r in zip(lo, hi, region.slices))
    out[dst] = region.values[src]
    return out


def _affected_group(region, terr) -> tuple[str, str] | None:
    """The territory group and side holding most of the lesion."""
    if region is None:
        return None
    lab = terr.labels[region.slices][region.values > 0.5]
    if lab.size == 0:
        return None
    counts: dict[tuple[str, str], int] = {}
    for k, n in zip(*np.unique(lab[lab > 0], return_counts=True)):
        short = terr.short.get(int(k), "")
        base, side = short[:-1], short[-1:]
        for g, members in GROUPS.items():
            if base in members:
                counts[(g, side)] = counts.get((g, side), 0) + int(n)
    return max(counts, key=counts.get) if counts else None


# -- tracer kinetics -------------------------------------------------------------------------------


def gamma_variate(t: np.ndarray, t0: float, alpha: float, beta: float) -> np.ndarray:
    x = np.clip(t - t0, 0.0, None)
    g = x**alpha * np.exp(-x / beta)
    return g / g.max() if g.max() > 0 else g


def _convolve(a: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Causal discrete convolution (same length as ``a``) of batches along the last axis (FFT)."""
    n = a.shape[-1]
    size = 1 << int(np.ceil(np.log2(2 * n)))
    return np.fft.irfft(np.fft.rfft(a, size) * np.fft.rfft(k, size), size)[..., :n]


def _kernel(tau: np.ndarray, beta: float) -> np.ndarray:
    if beta <= 0:
        k = np.zeros_like(tau)
        k[0] = 1.0
        return k
    k = np.exp(-tau / beta)
    return k / k.sum()


def arterial_input(tau: np.ndarray, rng: np.random.Generator, peak: float) -> tuple[np.ndarray, dict]:
    """First pass (gamma variate) + dispersed, delayed recirculation, scaled to ``peak``."""
    t0 = float(rng.uniform(4.0, 9.0))
    alpha = float(rng.uniform(2.5, 4.0))
    beta = float(rng.uniform(1.0, 1.7))
    first = gamma_variate(tau, t0, alpha, beta)
    rec_delay = float(rng.uniform(8.0, 12.0))
    rec_frac = float(rng.uniform(0.25, 0.45))  # of the first pass area, spread over ~10 s
    rec = np.interp(tau - rec_delay, tau, first, left=0.0)
    rec = _convolve(rec, _kernel(tau, float(rng.uniform(3.0, 5.0))))
    aif = first + rec_frac * rec / max(rec.max(), 1e-9) * 0.35
    aif *= peak / aif.max()
    return aif, {"arrival_s": round(t0, 3), "alpha": round(alpha, 3), "beta_s": round(beta, 3),
                 "peak": round(float(peak), 3), "recirculation_delay_s": round(rec_delay, 3)}


RESIDUES = ("exponential", "gamma", "linear", "box")
GAMMA_RESIDUE_SHAPE = 3.0  # transit times gamma-distributed with this shape (Mouridsen et al., MRM 2006)


def residue_functions(tau: np.ndarray, mtt: np.ndarray, family: str = "exponential") -> np.ndarray:
    """Residue functions R(tau) (len(mtt) x len(tau)), R(0) = 1 and area MTT, so that CBV = CBF x
    MTT holds for every family (Ostergaard et al., MRM 1996, used the first, linear and box forms
    to show that SVD does not depend on the residue's shape):

    * exponential: exp(-t/MTT) (one well-mixed compartment, the default);
    * gamma: 1 - CDF of gamma-distributed transit times of shape 3 and mean MTT;
    * linear: 1 - t/(2 MTT) until 2 MTT (transit times uniform on [0, 2 MTT]);
    * box: 1 until MTT (plug flow, every transit time equal)."""
    t = np.asarray(tau, float)[None, :]
    m = np.asarray(mtt, float)[:, None]
    if family == "exponential":
        return np.exp(-t / m)
    if family == "gamma":
        from scipy.special import gammaincc

        return gammaincc(GAMMA_RESIDUE_SHAPE, GAMMA_RESIDUE_SHAPE * t / m)
    if family == "linear":
        return np.clip(1.0 - t / (2.0 * m), 0.0, None)
    if family == "box":
        return (t < m).astype(float)
    raise ValueError(f"residue must be one of {RESIDUES}, got {family!r}")


class KineticTable:
    """Tissue curves K(tau; MTT, beta) = (AIF (x) h_beta (x) R_MTT)(tau) on a fine grid, so each
    voxel's curve is a lookup: linear in MTT (which keeps its area exact), nearest in beta, linear in
    time after the delay. ``residue``: the family of R (``residue_functions``)."""

    BETAS = np.arange(0.0, 4.01, 0.25)
    MTTS = np.geomspace(0.8, 40.0, 40)

    def __init__(self, aif: np.ndarray, dtau: float, residue: str = "exponential"):
        self.dtau = dtau
        n = aif.size
        tau = np.arange(n) * dtau
        kernels = np.stack([_kernel(tau, b) for b in self.BETAS])  # (B, n)
        self.dispersed = _convolve(aif[None, :], kernels)  # (B, n)
        res = residue_functions(tau, self.MTTS, residue)  # (M, n)
        self.table = (_convolve(self.dispersed[None, :, :], res[:, None, :]) * dtau).astype(np.float32)  # (M, B, n)
        # Peak time of the dispersed residue h_beta (x) R (the true Tmax after the delay), (M, B).
        self.residue_peaks = np.argmax(_convolve(kernels[None, :, :], res[:, None, :]), axis=-1) * dtau

    def beta_index(self, beta: np.ndarray) -> np.ndarray:
        return np.clip(np.round(beta / 0.25), 0, len(self.BETAS) - 1).astype(np.int64)

    def curves(self, times: np.ndarray, delay: np.ndarray, mtt: np.ndarray, beta_idx: np.ndarray) -> np.ndarray:
        """(T, n) unit-flow tissue curves (multiply by rho/kH CBF/6000)."""
        m = np.clip(mtt, self.MTTS[0], self.MTTS[-1] * 0.999)
        m0 = np.clip(np.searchsorted(self.MTTS, m) - 1, 0, len(self.MTTS) - 2)
        wm = ((m - self.MTTS[m0]) / (self.MTTS[m0 + 1] - self.MTTS[m0])).astype(np.float32)
        pos = (times[:, None] - delay[None, :]) / self.dtau
        n = self.table.shape[-1]
        valid = pos >= 0
        pos = np.clip(pos, 0, n - 1.001)
        i0 = np.floor(pos).astype(np.int64)
        wt = (pos - i0).astype(np.float32)
        flat = self.table.reshape(-1)
        out = np.zeros(pos.shape, np.float32)
        for mm, w in ((m0, 1.0 - wm), (m0 + 1, wm)):
            base = (mm * len(self.BETAS) + beta_idx) * n
            out += w[None, :] * ((1 - wt) * flat[base[None, :] + i0] + wt * flat[base[None, :] + i0 + 1])
        return np.where(valid, out, 0.0)

    def residue_peak_time(self, mtt: np.ndarray, beta_idx: np.ndarray) -> np.ndarray:
        """Peak time of h_beta (x) R_MTT, linear in MTT between the table's (exact for the box)."""
        m = np.clip(mtt, self.MTTS[0], self.MTTS[-1] * 0.999)
        m0 = np.clip(np.searchsorted(self.MTTS, m) - 1, 0, len(self.MTTS) - 2)
        wm = (m - self.MTTS[m0]) / (self.MTTS[m0 + 1] - self.MTTS[m0])
        return ((1 - wm) * self.residue_peaks[m0, beta_idx] + wm * self.residue_peaks[m0 + 1, beta_idx]).astype(np.float32)

    def peak_after_delay(self, mtt: np.ndarray, beta_idx: np.ndarray) -> np.ndarray:
        """Time from the delay to the tissue curve's peak (for the true TTP)."""
        mi = np.clip(np.searchsorted(self.MTTS, mtt), 0, len(self.MTTS) - 1)
        return np.argmax(self.table, axis=-1)[mi, beta_idx] * self.dtau


def residue_peak_time(mtt: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Peak time of h_beta (x) exp(-t/MTT): ln(MTT/beta) MTT beta / (MTT - beta); 0 without dispersion."""
    m = np.asarray(mtt, float)
    b = np.asarray(beta, float)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(np.abs(m - b) > 1e-6, np.log(m / np.maximum(b, 1e-9)) * m * b / (m - b), m)
    return np.where(b > 0, t, 0.0).astype(np.float32)


# -- acquisition -----------------------------------------------------------------------------------


def _acquisition(pose, rng: np.random.Generator, modality: str, centre: np.ndarray, ov: dict) -> acqm.Acquisition:
    """CT: an axial slab (gantry tilt) of 5-10 mm slices over 40-80 mm, centred near the lesion.
    MR: 5 mm EPI slices over the whole brain."""
    if ov.get("tilt_deg") is not None:
        direction = acqm.rotation(float(ov["tilt_deg"]), 0.0, 0.0)
    elif rng.random() < 0.6:
        direction = pose.rot @ acqm.rotation(*rng.normal(0, 2.5, 3))
    else:
        direction = acqm.rotation(rng.uniform(0, 20) if modality == "ctp" else rng.uniform(-10, 10), rng.normal(0, 2), rng.normal(0, 2))
    if modality == "ctp":
        thickness = float(ov.get("thickness") or rng.choice([5.0, 5.0, 5.0, 8.0, 10.0, 10.0]))
        coverage = rng.uniform(40.0, 80.0)
        nz = max(4, int(round(coverage / thickness)))
        gap = 0.0
    else:
        thickness = float(ov.get("thickness") or 5.0)
        gap = float(rng.choice([0.0, 0.5, 1.0]))
        nz = int(np.ceil(float(rng.uniform(105, 125)) * float(np.mean(pose.scale)) / (thickness + gap)))
    fov = float(rng.uniform(200, 240) if modality == "ctp" else rng.uniform(220, 240))
    nx = ny = 128
    if ov.get("size") is not None:
        nx, ny, nz = (int(s) for s in ov["size"])
    if ov.get("spacing") is not None:
        sx, sy, sz = (float(s) for s in ov["spacing"])
        fov_xy = (nx * sx, ny * sy)
        thickness = float(ov.get("thickness") or sz)
        gap = max(0.0, sz - thickness)
    else:
        fov_xy = (fov, fov)
    pitch = thickness + gap
    half = np.array([(nx - 1) * fov_xy[0] / nx, (ny - 1) * fov_xy[1] / ny, (nz - 1) * pitch]) / 2
    origin = centre + direction[:, :2] @ rng.normal(0, 4, 2) - direction @ half
    return acqm.Acquisition(direction, origin, fov_xy, (nx, ny), (nx, ny), nz, thickness, gap, 1)


def _slab_centre(pose, region, modality: str, rng: np.random.Generator) -> np.ndarray:
    if modality == "pwi" or region is None:
        zlo, zhi = acqm.BRAIN_Z_RANGE_MNI
        c = mni_to_lps((0.0, -18.0, (zlo + zhi) / 2 + (20.0 if modality == "ctp" else 0.0)))
        return pose.to_scanner(c)[0] + (rng.normal(0, 4, 3) if modality == "ctp" else 0.0)
    h = head_model()
    zyx = np.argwhere(region.values > 0.5) + [s.start for s in region.slices]
    c = h.grid.index_to_physical(zyx.mean(0)[::-1][None].astype(float))[0]
    # Clinically the slab sits on the basal ganglia; here it is placed to cover the lesion.
    c = c + mni_to_lps((0.0, 0.0, float(rng.uniform(-10, 10))))
    return pose.to_scanner(c)[0]


def _inplane_motion(frames: np.ndarray, ref: Image, rng: np.random.Generator) -> tuple[np.ndarray, list]:
    """Head motion as in-plane rigid jumps (a thick slab cannot show through-plane motion)."""
    from ..perfusion.motion import inplane_rigid

    n = frames.shape[0]
    events = []
    params = np.zeros((n, 3))
    for _ in range(int(rng.integers(1, 4))):
        k = int(rng.integers(3, n))
        jump = np.array([rng.normal(0, 1.0), rng.normal(0, 1.5), rng.normal(0, 1.5)])
        back = int(rng.integers(k + 1, n + 4))  # transient: the head comes back (or not, past the end)
        params[k:back] += jump
        events.append({"frame": k, "until": min(back, n), "rotation_deg": round(float(jump[0]), 3),
                       "shift_mm": [round(float(jump[1]), 3), round(float(jump[2]), 3)]})
    img = Image(frames[0], ref.spacing, ref.origin, ref.direction).to_sitk()
    centre = (np.asarray(ref.size[:2]) - 1) / 2.0 * np.asarray(ref.spacing[:2])
    out = frames.copy()
    for k in range(n):
        if not np.any(params[k]):
            continue
        tx = inplane_rigid(np.deg2rad(params[k, 0]), params[k, 1:], centre, ref)
        # The head moved by tx: the scanner sees the frame sampled through its inverse.
        mov = Image(frames[k], ref.spacing, ref.origin, ref.direction).to_sitk()
        res = sitk.Resample(mov, img, tx.GetInverse(), sitk.sitkLinear, float(frames[k].min()), sitk.sitkFloat32)
        out[k] = sitk.GetArrayFromImage(res)
    return out, events


# -- the case --------------------------------------------------------------------------------------


def simulate_perfusion(seed: int, modality: str, lesion_library: str | Path | None = None, split: str | None = None,
                       **overrides: Any) -> PerfusionCase:
    """One simulated acute-stroke perfusion examination, deterministic per (seed, split, modality).

    Overrides: ``size`` (x, y, z voxels), ``spacing`` (x, y, z mm), ``thickness`` (mm),
    ``frames``, ``dt`` (s), ``tilt_deg``, ``motion`` (bool), ``noise`` (CT: HU SD per voxel; MR:
    baseline white-matter SNR), ``lesion`` (True | False: a core or a healthy control),
    ``te_ms`` (MR), ``atlas``, ``compute_maps`` (bool, default True: run our deconvolution),
    ``dwi`` (CT only, bool, default False: add a b1000 DWI of the same subject and core on the
    CT grid, the target of CTP -> DWI synthesis as in ISLES 2018; every other output unchanged),
    ``residue`` (one of ``RESIDUES``, default exponential: the tissue residue family; the others
    test that the analysis does not rely on the generator's own model), ``noise_draw`` (int,
    default 0: the case's own noise; k > 0 draws the noise from another stream, everything else
    unchanged: how much of an analysis' error is the particular noise realisation).
    """
    if modality not in MODALITIES:
        raise ValueError(f"perfusion phantom modality must be one of {MODALITIES}, got {modality!r}")
    if overrides.get("residue", "exponential") not in RESIDUES:
        raise ValueError(f"residue must be one of {RESIDUES}, got {overrides['residue']!r}")
    known = {"size", "spacing", "thickness", "frames", "dt", "tilt_deg", "motion", "noise", "lesion", "te_ms",
             "atlas", "compute_maps", "dwi", "residue", "noise_draw"}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"simulate_perfusion got unknown overrides: {sorted(unknown)}")
    ct = modality == "ctp"
    rng = _streams(seed, split, modality)
    draw = int(overrides.get("noise_draw") or 0)
    # Another realisation of the noise field only: the "noise" stream also draws the scanner's
    # levels and the noise SD, which stay the case's own.
    field_rng = np.random.default_rng(
        np.random.SeedSequence([int(seed), _SPLIT_CODE[split], 0x9E4F, MODALITIES.index(modality), 0xD4A7, draw])) if draw else None
    head = head_model()
    library, terr = lesion_sources(lesion_library, overrides.get("atlas"))

    ra = rng["anatomy"]
    atrophy = float(ra.uniform(0.0, 0.6))
    pose = acqm.draw_pose(head, ra, atrophy)

    # Lesion (the core) and its territory: large-vessel strokes, drawn until one lands in a
    # supplied territory group.
    rl = rng["lesion"]
    want_lesion = overrides.get("lesion")
    has_lesion = bool(rl.random() >= 0.08) if want_lesion is None else bool(want_lesion)
    acute, group = None, None
    if has_lesion:
        for _ in range(6):
            acute = make_acute("territorial", terr, rl, library, split)
            group = _affected_group(acute.region, terr)
            if group is not None:
                break
        if group is None:
            acute = None
    region = acute.region if acute is not None else None
    if acute is not None and not ct:
        # The core of a large-vessel stroke in the first hours: ADC 40-60% below normal (rADC
        # ~0.4-0.6; Purushotham et al., Int J Stroke 2015), stronger than the DWI phantoms' range,
        # which covers every stroke type and age.
        red = float(rl.uniform(0.42, 0.6))
        acute.adc_scale, acute.t2_scale = heterogeneity(acute.region, red, float(rl.uniform(0.03, 0.2)), rl)
        acute.adc_reduction = [red]

    # Acquisition grid.
    racq = rng["acquisition"]
    acq = _acquisition(pose, racq, modality, _slab_centre(pose, region, modality, racq), overrides)
    ref = acq.reference(recon=True)
    crop = acqm.template_crop(head, pose, ref, 0.55 * acq.thickness)

    # Template maps -> acquisition grid (slice profile, partial volume).
    terr_map = np.zeros(tuple(s.stop - s.start for s in crop), np.float32)
    extra_groups: list[str] = []
    if group is not None:
        gname, side = group
        names = list(GROUPS[gname])
        if gname == "MCA" and rl.random() < 0.15:  # carotid-T occlusion: the ACA territory too
            names += list(GROUPS["ACA"])
            extra_groups.append("ACA")
        ids = [k for k, s in terr.short.items() if s[:-1] in names and s[-1:] == side]
        terr_map = np.isin(terr.labels[crop], ids).astype(np.float32)
    arteries_ok: list = []
    arteries_aff: list = []
    for _name, feeds, pts, r in _ARTERIES_R:
        for mirror, side in ((False, "R"), (True, "L")):
            segs = _polyline(pts, r, mirror)
            affected = group is not None and side == group[1] and feeds is not None and (feeds == group[0] or feeds in extra_groups)
            (arteries_aff if affected else arteries_ok).extend(segs)
    for _name, feeds, pts, r in _ARTERIES_MID:
        segs = _polyline(pts, r)
        (arteries_aff if group is not None and feeds == group[0] else arteries_ok).extend(segs)
    veins = [s for _n, pts, r in _VEINS for s in _polyline(pts, r)]
    bone, marrow = _skull()
    maps_t = [head.gm[crop], head.wm[crop], head.csf[crop], head.muscle[crop], head.fat[crop] - marrow[crop],
              marrow[crop], bone[crop], _embed(region, crop), terr_map,
              _tube_fraction(crop, arteries_ok), _tube_fraction(crop, arteries_aff), _tube_fraction(crop, veins)]
    (gm, wm, csf, muscle, fat, marrow_g, bone_g, lesion_f, terr_f, art_ok, art_aff, vein) = _sample(
        maps_t, crop, pose, ref, acq.thickness)
    del maps_t
    vessel = np.clip(art_ok + art_aff + vein, 0.0, 1.0)
    keep = 1.0 - vessel
    gm, wm, csf, muscle, fat, marrow_g, bone_g = (a * keep for a in (gm, wm, csf, muscle, fat, marrow_g, bone_g))
    tissue_f = gm + wm
    spacing_zyx = np.asarray(ref.spacing[::-1])

    # Perfusion parameters per voxel.
    rk = rng["kinetics"]
    cbf_gm, cbf_wm = float(rk.uniform(45, 65)), float(rk.uniform(18, 26))
    cbv_gm, cbv_wm = float(rk.uniform(3.8, 5.0)), float(rk.uniform(1.8, 2.6))
    texture = ndimage.gaussian_filter(rk.standard_normal(ref.array.shape).astype(np.float32), [0.5, 3.0, 3.0])
    texture /= max(float(texture.std()), 1e-6)
    frac_g = np.where(tissue_f > 1e-3, gm / np.maximum(tissue_f, 1e-3), 0.5)
    cbf_n = (frac_g * cbf_gm + (1 - frac_g) * cbf_wm) * (1.0 + 0.08 * texture)  # per 100 g of tissue
    cbv_n = (frac_g * cbv_gm + (1 - frac_g) * cbv_wm) * (1.0 + 0.06 * texture)
    healthy_mean = float(np.mean(cbf_n[tissue_f > 0.5])) if np.any(tissue_f > 0.5) else cbf_gm
    wobble = ndimage.gaussian_filter(rk.standard_normal(ref.array.shape).astype(np.float32), [0.5, 6.0, 6.0])
    delay0 = np.clip(float(rk.uniform(0.3, 1.5)) + 0.25 * wobble / max(float(wobble.std()), 1e-6), 0.0, None)
    beta0 = float(rk.uniform(0.4, 1.0))
    core = lesion_f >= 0.5
    if group is not None:
        terr_s = np.clip(ndimage.gaussian_filter(terr_f, [0.5, 4.0 / ref.spacing[1], 4.0 / ref.spacing[0]]) * 1.3, 0, 1)
        lam = float(rk.uniform(10.0, 35.0))
        floor = float(rk.uniform(0.05, 0.5))
        dist = ndimage.distance_transform_edt(~core, sampling=spacing_zyx) if core.any() else np.full(core.shape, 1e3)
        sev = terr_s * (floor + (1 - floor) * np.exp(-dist / lam))
        sev = np.maximum(sev, np.clip(2.0 * lesion_f, 0, 1))
        sev = np.clip(sev, 0.0, 1.0).astype(np.float32)
        delay_max = float(rk.uniform(6.0, 14.0))
        f_edge = float(rk.uniform(0.35, 0.6))
        g_pen = float(rk.uniform(0.95, 1.35))
        f_core = float(rk.uniform(0.05, 0.15))
        h_core = float(rk.uniform(0.3, 0.6))
    else:
        sev = np.zeros(ref.array.shape, np.float32)
        lam = floor = delay_max = f_edge = g_pen = f_core = h_core = 0.0
    delay = (delay0 + sev * delay_max).astype(np.float32)
    beta = (beta0 + 0.18 * sev * delay_max).astype(np.float32)
    # Outside the core, flow stays above ~40% of the healthy mean (penumbral flow, Astrup 1981),
    # so that the core is the lesion and nothing else.
    cbf_t = cbf_n * (1.0 - sev * (1.0 - f_edge))
    cbf_t = np.where(sev > 0, np.minimum(np.maximum(cbf_t, 0.42 * healthy_mean), cbf_n), cbf_n)
    cbv_t = cbv_n * (1.0 + sev * (g_pen - 1.0))
    lf = np.clip(lesion_f, 0, 1)
    cbf_t = (1 - lf) * cbf_t + lf * f_core * healthy_mean
    cbv_t = (1 - lf) * cbv_t + lf * h_core * cbv_n
    mtt = np.where(cbf_t > 0, cbv_t / np.maximum(cbf_t, 1e-6) * 60.0, 0.0).astype(np.float32)
    # Voxel values (per 100 g of the voxel: CSF and vessels dilute the tissue).
    cbf_v = (cbf_t * tissue_f).astype(np.float32)
    cbv_v = (cbv_t * tissue_f).astype(np.float32)

    # Time axis and the arterial input.
    dt = float(overrides.get("dt") or (rk.choice([1.0, 1.5, 2.0]) if ct else rk.uniform(1.3, 1.7)))
    n_frames = int(overrides.get("frames") or (int(rk.uniform(40, 60) / dt) + 1 if ct else rk.integers(50, 61)))
    times = np.arange(n_frames) * dt
    dtau = 0.1
    tau = np.arange(0.0, times[-1] + 30.0, dtau)
    te_s = None
    if ct:
        peak = float(rk.uniform(200.0, 500.0))  # HU above baseline in a large artery
    else:
        field_t = float(rk.choice([1.5, 3.0]))
        te_s = float(overrides.get("te_ms") or (rk.uniform(25, 35) if field_t > 2 else rk.uniform(40, 50))) / 1000.0
        peak = float(rk.uniform(1.8, 2.6)) / te_s  # dR2* (1/s): full-blood voxels drop to 7-17% of S0
    aif, aif_info = arterial_input(tau, rk, peak)
    residue = overrides.get("residue") or "exponential"
    table = KineticTable(aif, dtau, residue)
    tissue_vox = tissue_f > 0.02
    idx = np.flatnonzero(tissue_vox)
    bidx = table.beta_index(beta.ravel()[idx])
    conc = np.zeros((n_frames, ref.array.size), np.float32)
    unit = table.curves(times, delay.ravel()[idx], mtt.ravel()[idx], bidx)
    conc[:, idx] = unit * ((RHO / KH) * cbf_v.ravel()[idx] / 6000.0)[None, :]
    # Vessels: healthy arteries carry the input itself (small delays), occluded-side arteries fill
    # late and weakly through collaterals, veins carry the input after the brain's transit.
    a_ok = np.interp(times - 0.2, tau, aif, left=0.0)
    b_idx_aff = int(table.beta_index(np.array([3.0]))[0])
    a_aff = 0.3 * np.interp(times - (0.5 * delay_max + 1.0), tau, table.dispersed[b_idx_aff], left=0.0)
    v_delay, v_tau = float(rk.uniform(3.0, 5.0)), float(rk.uniform(2.5, 4.0))
    vk = np.where(tau >= v_delay, np.exp(-(tau - v_delay) / v_tau), 0.0)
    vof = _convolve(aif, vk / vk.sum())
    v_c = np.interp(times, tau, vof, left=0.0)
    conc += art_ok.ravel()[None, :] * a_ok[:, None].astype(np.float32)
    conc += art_aff.ravel()[None, :] * a_aff[:, None].astype(np.float32)
    conc += vein.ravel()[None, :] * v_c[:, None].astype(np.float32)
    conc = conc.reshape((n_frames,) + ref.array.shape)

    # Signal: noise-free frames, then head motion, then noise (CT) / complex noise and
    # reconstruction (MR).
    rn = rng["noise"]
    images: dict[str, Image] = {}
    acq_info: dict[str, Any] = {**acq.as_dict(), "frames": n_frames, "dt_s": round(dt, 4), "duration_s": round(float(times[-1]), 3)}
    if ct:
        hu = {k: float(rn.uniform(*v)) for k, v in CT_HU.items()}
        base = (gm * hu["gm"] + wm * hu["wm"] + csf * hu["csf"] + vessel * hu["blood"] + muscle * hu["muscle"]
                + fat * hu["fat"] + marrow_g * hu["marrow"] + bone_g * hu["bone"])
        matter = gm + wm + csf + vessel + muscle + fat + marrow_g + bone_g
        base += np.clip(1.0 - matter, 0.0, 1.0) * -1000.0  # air
        base *= 1.0 + 0.01 * texture
        frames = base[None] + conc
    else:
        tp = draw_tissue_params(rn, field_t)
        tr_ms = dt * 1000.0
        ratio = float(rn.uniform(0.55, 0.7))  # T2* / T2 of tissue at these fields

        def s0_of(pd, t1, t2s):
            return pd * (1.0 - np.exp(-tr_ms / t1)) * np.exp(-te_s * 1000.0 / t2s)

        k = {n: s0_of(tp.pd[n], tp.t1[n], tp.t2[n] * ratio) for n in ("gm", "wm", "muscle")}
        k["csf"] = s0_of(1.0, tp.t1["csf"], 400.0)
        k["fat"] = s0_of(tp.pd["fat"], tp.t1["fat"], tp.t2["fat"] * ratio) * tp.fat_sat
        k["blood"] = s0_of(0.85, 1650.0 if field_t > 2 else 1400.0, 45.0)
        s0 = gm * k["gm"] + wm * k["wm"] + csf * k["csf"] + vessel * k["blood"] + muscle * k["muscle"] + (fat + marrow_g) * k["fat"]
        s0 *= (1.0 + 0.02 * texture) * acqm.bias_field(s0.shape, rn, float(rn.uniform(0.05, 0.15)))
        level = float(rn.uniform(300, 1000))
        s0 *= level / k["wm"]
        frames = s0[None] * np.exp(-te_s * conc)
    del conc
    motion_events: list = []
    rm = rng["motion"]
    if overrides.get("motion", rm.random() < (0.4 if ct else 0.3)):
        frames, motion_events = _inplane_motion(frames, ref, rm)
    if ct:
        vox = float(np.prod(ref.spacing))
        # Quantum noise ~8-15 HU in a 1 mm^3 voxel (e.g. 0.45 x 0.45 x 5 mm at 80 kVp), falling with
        # the square root of the voxel volume.
        sigma = float(overrides.get("noise") or rn.uniform(8.0, 15.0) / np.sqrt(vox))
        noise = (field_rng or rn).standard_normal(frames.shape).astype(np.float32)
        noise = ndimage.gaussian_filter(noise, [0, 0, 0.6, 0.6]) * np.float32(1.0 / 0.42)  # reconstruction kernel
        frames += np.float32(sigma) * noise
        del noise
        series = np.clip(np.round(frames), -1024, 3071).astype(np.int16)
        acq_info.update({"noise_hu": round(sigma, 3), "hu": {k: round(v, 2) for k, v in hu.items()}})
    else:
        snr = float(overrides.get("noise") or rn.uniform(35.0, 80.0))
        sigma = level / snr
        for t in range(n_frames):
            frames[t] = acqm.reconstruct(frames[t], sigma, acq, field_rng or rn, 0.0)
        series = np.clip(np.round(frames), 0, 32767).astype(np.int16)
        acq_info.update({"te_ms": round(te_s * 1000.0, 2), "tr_ms": round(tr_ms, 1), "field_strength_t": field_t,
                         "snr_wm": round(snr, 2)})
    del frames
    key = modality
    images[key] = Image(series, ref.spacing, ref.origin, ref.direction, {"times": [float(t) for t in times]})
    if not ct:
        images[key].meta["echo_time_ms"] = te_s * 1000.0

    # MR: DWI and ADC of the same subject (and lesion), on their own EPI grid.
    if not ct:
        rd = rng["dwi"]
        dacq = acqm.Acquisition(acq.direction, acq.origin, acq.fov, acq.acq_matrix, acq.recon_matrix, acq.n_slices,
                                acq.thickness, acq.gap, 1)
        dref = dacq.reference(recon=True)
        te_d, tr_d = float(rd.uniform(60, 95) if field_t > 2 else rd.uniform(80, 110)), float(rd.uniform(3000, 8000))
        c_b0 = Contrast("b0", te_d, tr_d, fat_factor=tp.fat_sat)
        c_dwi = Contrast("dwi", te_d, tr_d, b=B_VALUE, fat_factor=tp.fat_sat)
        les = acute if acute is not None else AcuteLesions(None, None, None, "none", 0)
        sm = signal_maps(head, crop, tp, [c_b0, c_dwi], les, [], atrophy, (0.02, 0.02))
        sb0, sdw = _sample(sm, crop, pose, dref, dacq.thickness)
        del sm
        lvl = float(rd.uniform(300, 1000))
        wm_b0 = float(c_b0(tp.pd["wm"], tp.t1["wm"], tp.t2["wm"], tp.adc["wm"]))
        sig = lvl / float(rd.uniform(25, 45))
        b0 = acqm.reconstruct(sb0 * lvl / wm_b0, sig, dacq, rd, 0.0)
        dwi = acqm.reconstruct(sdw * lvl / wm_b0, sig / np.sqrt(3.0), dacq, rd, 0.0)
        adc = acqm.adc_map(b0, dwi, B_VALUE, threshold=max(5.0 * sig, 0.15 * lvl))
        with np.errstate(divide="ignore", invalid="ignore"):
            adc_true = np.nan_to_num(np.log(np.maximum(sb0, 1e-9) / np.maximum(sdw, 1e-9)) / B_VALUE * 1e6, nan=0.0)
        images["dwi"] = dref.with_array(np.clip(np.round(dwi), 0, 32767).astype(np.int16))
        images["adc"] = dref.with_array(np.round(adc).astype(np.int16))

    # CT with ``dwi``: the follow-up DWI of ISLES 2018, on the CT grid. Drawn from the otherwise
    # unused "dwi" stream after everything else, so every other output stays bit-identical.
    dwi_info = _ct_dwi(images, rng["dwi"], head, crop, pose, ref, acq, acute, atrophy) if ct and overrides.get("dwi") else None

    # Truth on the series grid.
    tissue_truth = (tissue_f >= 0.5) & (vessel < 0.2)
    if residue == "exponential":  # closed form (and the nominal dispersion, not its 0.25 s table step)
        tmax_true = np.where(tissue_vox, delay + residue_peak_time(mtt, beta), 0.0).astype(np.float32)
    else:
        tmax_true = np.zeros(ref.array.shape, np.float32)
        tmax_true.ravel()[idx] = delay.ravel()[idx] + table.residue_peak_time(mtt.ravel()[idx], bidx)
    ttp_true = np.zeros(ref.array.shape, np.float32)
    ttp_true.ravel()[idx] = delay.ravel()[idx] + table.peak_after_delay(mtt.ravel()[idx], bidx)
    # The core is the lesion as the decision rule sees it on the noise-free truth: CT, true CBF
    # below 30% of the healthy-hemisphere mean; MR, true ADC below 620 x 10^-6 mm^2/s (partial
    # volume with CSF lifts the ADC of lesion voxels next to sulci and ventricles).
    if ct:
        left = hemispheres(ref.array.shape, ref.index_to_physical, tissue_truth)
        side = ~left if (group is None or group[1] == "L") else left
        ref_cbf = float(np.mean(cbf_v[tissue_truth & side & (tmax_true <= 6.0)])) if np.any(tissue_truth & side) else healthy_mean
        core_truth = core & (tissue_f >= 0.25) & (cbf_v < 0.3 * ref_cbf)
    else:
        core_truth = core & (tissue_f >= 0.25) & (adc_true < 620.0)
    hypo_truth = (tissue_truth & (tmax_true > 6.0)) | core_truth
    penumbra_truth = hypo_truth & ~core_truth
    geom = ref
    mk = lambda a, dtype=np.float32: geom.with_array(np.where(tissue_vox, a, 0).astype(dtype))  # noqa: E731
    truth = {
        "core": geom.with_array(core_truth.astype(np.uint8)),
        "penumbra": geom.with_array(penumbra_truth.astype(np.uint8)),
        "tissue": geom.with_array(tissue_truth.astype(np.uint8)),
        "artery": geom.with_array((art_ok + art_aff).astype(np.float32)),  # blood fraction of each voxel
        "vein": geom.with_array(vein.astype(np.float32)),
        "cbf": mk(cbf_v), "cbv": mk(cbv_v), "mtt": mk(mtt), "tmax": mk(tmax_true), "ttp": mk(ttp_true),
    }
    voxel_ml = ref.voxel_volume_ml

    info: dict[str, Any] = {
        "case_id": f"{modality}-{seed:05d}" if split is None else f"{modality}-{split}-{seed:05d}",
        "modality": modality,
        "generator": "strokeseg.phantom.perfusion",
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "split": split,
        "lesion_library": library,
        "library_files": list(acute.files) if acute is not None else [],
        "lesion_source": acute.source if acute is not None else "none",
        "territory_atlas": terr.source,
        "occluded_territory": None if group is None else {"group": group[0], "side": "right" if group[1] == "R" else "left",
                                                           "extra": extra_groups},
        "core_ml": round(float(core_truth.sum()) * voxel_ml, 3),
        "hypoperfusion_ml": round(float(hypo_truth.sum()) * voxel_ml, 3),
        "penumbra_ml": round(float(penumbra_truth.sum()) * voxel_ml, 3),
        "tmax_severe_ml": round(float((hypo_truth & (tmax_true > 10.0)).sum()) * voxel_ml, 3),
        "lesion_volume_ml": round(float(core_truth.sum()) * voxel_ml, 3),
        "kinetics": {"cbf_gm": round(cbf_gm, 2), "cbf_wm": round(cbf_wm, 2), "cbv_gm": round(cbv_gm, 3), "cbv_wm": round(cbv_wm, 3),
                     "healthy_mean_cbf": round(healthy_mean, 2), "delay0_s": round(float(np.mean(delay0)), 3), "dispersion0_s": round(beta0, 3),
                     "delay_max_s": round(delay_max, 3), "severity_length_mm": round(lam, 2), "collateral_floor": round(floor, 3),
                     "penumbra_cbf_factor": round(f_edge, 3), "penumbra_cbv_factor": round(g_pen, 3),
                     "core_cbf_fraction_of_healthy": round(f_core, 3), "core_cbv_factor": round(h_core, 3),
                     "rho_g_ml": RHO, "kh": round(KH, 4), "residue": residue},
        "arterial_input": aif_info,
        "venous_output": {"delay_s": round(v_delay, 3), "transit_s": round(v_tau, 3)},
        "acquisition": {**acq_info, **({"noise_draw": draw} if draw else {})},
        "motion": motion_events,
        "subject": pose.info,
        "times_s": [round(float(t), 4) for t in times],
    }
    if ct:  # the flow the core truth is relative to (true CBF < 30% of it)
        info["core_reference_cbf"] = ref_cbf
    if dwi_info is not None:
        info["dwi"] = dwi_info
    case = PerfusionCase(info["case_id"], images, truth["core"], info, truth)
    if overrides.get("compute_maps", True):
        _add_computed_maps(case)
    return case


def _ct_dwi(images: dict[str, Image], rd: np.random.Generator, head, crop, pose, ref: Image, acq: acqm.Acquisition,
            acute: AcuteLesions | None, atrophy: float) -> dict[str, Any]:
    """Add ``images["dwi"]`` (b = 1000 trace, int16) of the CT subject on the CT grid: the same
    diffusion signal model as the MR phantoms (``mr_signal``), the core's ADC drop from its
    lesion model, Rician noise; returns its parameters for case.json."""
    field_t = float(rd.choice([1.5, 3.0]))
    tp = draw_tissue_params(rd, field_t)
    te, tr = float(rd.uniform(60, 95) if field_t > 2 else rd.uniform(80, 110)), float(rd.uniform(3000, 8000))
    c_b0 = Contrast("b0", te, tr, fat_factor=tp.fat_sat)
    c_dwi = Contrast("dwi", te, tr, b=B_VALUE, fat_factor=tp.fat_sat)
    les = acute if acute is not None else AcuteLesions(None, None, None, "none", 0)
    (sdw,) = _sample(signal_maps(head, crop, tp, [c_dwi], les, [], atrophy, (0.02, 0.02)), crop, pose, ref, acq.thickness)
    lvl = float(rd.uniform(300, 1000))
    wm_b0 = float(c_b0(tp.pd["wm"], tp.t1["wm"], tp.t2["wm"], tp.adc["wm"]))
    snr = float(rd.uniform(25, 45))
    dwi = acqm.reconstruct(sdw * lvl / wm_b0, lvl / snr / np.sqrt(3.0), acq, rd, 0.0)
    images["dwi"] = ref.with_array(np.clip(np.round(dwi), 0, 32767).astype(np.int16))
    return {"grid": "ct", "field_strength_t": field_t, "te_ms": round(te, 2), "tr_ms": round(tr, 1), "b_value": B_VALUE,
            "snr_b0_wm": round(snr, 2)}


def _add_computed_maps(case: PerfusionCase) -> None:
    """Run our own pipeline on the simulated series: its maps are the perfusion models' inputs."""
    from ..errors import InputError
    from ..perfusion.pipeline import run_perfusion

    key = case.info["modality"]
    try:
        res = run_perfusion(case.images[key], kind="ct" if key == "ctp" else "mr", adc=case.images.get("adc"))
    except InputError as exc:  # e.g. an unlucky simulated motion: keep the case, say why no maps
        case.info["computed"] = {"error": str(exc)}
        return
    for name, img in res.maps.items():
        case.images[name] = img.with_array(img.array.astype(np.float32))
        case.images[name].meta.clear()
    case.truth["computed_core"] = res.core
    case.truth["computed_penumbra"] = res.penumbra
    rep = res.report
    case.info["computed"] = {k: rep[k] for k in ("core_ml", "hypoperfusion_ml", "penumbra_ml", "mismatch_ml", "mismatch_ratio", "hir")}
    case.info["computed"]["arterial_input_lps_mm"] = rep["arterial_input"]["voxels_lps_mm"]


def write_perfusion_case(case: PerfusionCase, out_dir: str | Path) -> Path:
    """``out_dir/<case_id>/``: the series (ctp or pwi, + dwi, adc), computed maps, core.nii.gz,
    penumbra.nii.gz, lesion.nii.gz (= core), true_<map>.nii.gz and case.json (written last)."""
    folder = Path(out_dir) / case.case_id
    for key, img in case.images.items():
        write_image(img, folder / f"{key}.nii.gz")
    write_image(case.truth["core"], folder / "core.nii.gz")
    write_image(case.truth["penumbra"], folder / "penumbra.nii.gz")
    write_image(case.lesion, folder / "lesion.nii.gz")
    for name in ("cbf", "cbv", "mtt", "tmax", "ttp"):
        write_image(case.truth[name], folder / f"true_{name}.nii.gz")
    info = dict(case.info)
    info["truth_files"] = {"core": "core.nii.gz", "penumbra": "penumbra.nii.gz", "lesion": "lesion.nii.gz",
                           **{f"true_{m}": f"true_{m}.nii.gz" for m in ("cbf", "cbv", "mtt", "tmax", "ttp")}}
    write_text(json.dumps(info, indent=2) + "\n", folder / "case.json")
    return folder


def generate_perfusion_cases(modality: str, seed: int, out_dir: str | Path, count: int = 1, lesion_library=None,
                             split: str | None = None, progress: bool = True, **kw: Any) -> list[Path]:
    """Write ``count`` perfusion cases; case k uses seed + k."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    from tqdm import tqdm

    out = []
    for k in tqdm(range(count), desc=f"phantom {modality}", unit="case", disable=not progress):
        out.append(write_perfusion_case(simulate_perfusion(seed + k, modality, lesion_library, split, **kw), out_dir))
    return out
