"""Block-circulant SVD deconvolution with oscillation-index regularisation (oSVD).

Wu, Ostergaard, Benner, Rosen, Sorensen: "Tracer arrival timing-insensitive technique for
estimating flow in MR perfusion-weighted imaging using singular value decomposition with a
block-circulant deconvolution matrix", MRM 50:164-174 (2003).

The tissue curve is C(t) = F (Ca (x) R)(t). Zero-padding both curves to L = 2N samples and
writing the convolution with a circulant matrix makes the estimate insensitive to a delay
between the arterial input and the tissue (a delay only rotates R). The AIF matrix uses the
linear-interpolation (Simpson-like) weights of Ostergaard et al. 1996. Regularisation: per voxel,
the smallest SVD cut-off P (fraction of the largest singular value, stepped from 5% to 95%)
whose residue F R(t) has an oscillation index
    O = 1/(L f_max) * sum_k |f(k) - 2 f(k-1) + f(k-2)|
below the threshold (Wu et al.'s 0.035, raised to 5/L for short series). Implemented for all
voxels at once: the SVD is done once, the residue is built up singular vector by singular vector
(a rank-one update per step) and each voxel keeps the values of its last passing cut-off.

A floor on the cut-off (``min_cutoff``): with CT's per-frame SNR the oscillation index of a
single voxel's residue is itself noisy, so neighbouring voxels of the same tissue end on cut-offs
from 5% to 40%, and the peak loss that comes with each (20-40% for healthy tissue) turns into
voxel-to-voxel noise in CBF. Below the floor no cut-off is tried: the parenchyma shares one
regularisation (one low-pass filter, whose peak loss on healthy tissue ``reference_gain`` measures
for the CT core reference), and only curves that still oscillate at the floor are regularised further.
On the CTP phantoms' val split a 30% floor raised the CBF rank correlation with the truth from
0.894 to 0.911 (median of 23 cases; flat between 25% and 40%), core volumes unchanged.

Tmax: the truncated SVD of a circulant matrix is a fixed low-pass filter, which moves the peak of
a residue later by an amount that depends on the cut-off and the residue's shape but not on the
delay; that shift is tabulated once per AIF and subtracted (``correct_tmax_bias``), which takes
the Tmax error on phantoms from ~1.5-2.5 s to well under 1 s.

Maps: CBF = kH/rho max(F R) (mL/100 g/min), CBV = kH/rho int C / int Ca (mL/100 g),
MTT = CBV / CBF (central volume theorem), Tmax = argmax of F R (s, delay + dispersion).
kH = (1 - Hct_large) / (1 - Hct_small) = 0.55 / 0.75 corrects for the different haematocrit
of large vessels and capillaries; rho = 1.04 g/mL is the density of brain tissue.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.linalg import circulant

from ..errors import Cancelled

RHO = 1.04  # g/mL
KH = (1.0 - 0.45) / (1.0 - 0.25)
DEFAULT_OI = 0.035
CUTOFFS = tuple(np.round(np.arange(0.95, 0.0, -0.05), 2))  # most regularised first


@dataclass
class DeconvolutionMaps:
    cbf: np.ndarray  # (n,) mL/100g/min
    cbv: np.ndarray  # mL/100g
    mtt: np.ndarray  # s
    tmax: np.ndarray  # s
    cutoff: np.ndarray  # the SVD cut-off each voxel ended with (fraction of s_max)


# Reference residues for the bias table carry a 1 s exponential dispersion: real tissue
# always sees some arterial-to-capillary dispersion relative to a large-artery input, and the
# table then errs by well under a second both for sharp (healthy) and dispersed (delayed) residues.
BIAS_DISPERSION_S = 1.0


# The Tmax tables assume exponential residues; on phantoms with gamma-distributed transit times
# (benchmarks/perfusion_accuracy.py --residue gamma) the Tmax error is 0.57 s instead of 0.49 s.
def _regularisation_tables(v: np.ndarray, ks: list[tuple[int, float]], n: int, dt: float) -> tuple[np.ndarray, np.ndarray]:
    """What truncating the SVD at k does to the peak time of a residue, as a function of the MTT
    that would be observed (CBV / regularised CBF): (observed MTT, Tmax shift) per cut-off and MTT.

    The matrix is circulant, so keeping the first k singular vectors is a fixed, shift-invariant
    low-pass filter V_k V_k^T: it moves the peak of a residue later by an amount that depends only
    on k and the residue's shape, never on the delay. Tabulated for exponential residues of
    0.5-40 s carrying a 1 s dispersion (``BIAS_DISPERSION_S``), relative to the true peak of the
    dispersed residue."""
    L = v.shape[0]
    mtts = np.geomspace(0.5, 40.0, 48)
    onset = n // 2
    t = (np.arange(L) - onset) * dt
    r = np.where(t[:, None] >= 0, np.exp(-np.maximum(t, 0)[:, None] / mtts[None, :]), 0.0)
    truth = np.zeros(mtts.size)
    if BIAS_DISPERSION_S > 0:
        b = BIAS_DISPERSION_S
        fine = np.arange(0, L * dt, dt / 20.0)
        kern = np.exp(-fine / b)
        kern /= kern.sum()
        for j, m in enumerate(mtts):
            rf = np.convolve(np.exp(-fine / m), kern)[: fine.size]
            truth[j] = fine[np.argmax(rf)]
            r[:, j] = np.interp(t, fine, rf, left=0.0)
    area = r.sum(axis=0) * dt
    obs = np.zeros((len(ks), mtts.size))
    bias = np.zeros((len(ks), mtts.size))
    for j, (k, _p) in enumerate(ks):
        f = v[:, :k] @ (v[:, :k].T @ r)
        fm, pos = _peak(f, L, 1.0)
        fm = np.maximum(fm, 1e-9)
        obs[j] = area / fm
        bias[j] = (pos - onset) * dt - truth
    return obs, bias


def aif_matrix(aif: np.ndarray, dt: float) -> np.ndarray:
    """dt * the block-circulant (L = 2N) convolution matrix of ``aif`` with linear-interpolation weights."""
    a = np.asarray(aif, dtype=float)
    n = a.size
    col = np.zeros(2 * n)
    col[0] = a[0]
    col[1 : n - 1] = (a[: n - 2] + 4.0 * a[1 : n - 1] + a[2:]) / 6.0
    col[n - 1] = (a[n - 2] + 4.0 * a[n - 1]) / 6.0
    col[n] = a[n - 1] / 6.0
    return dt * circulant(col)


def _peak(f: np.ndarray, n: int, dt: float) -> tuple[np.ndarray, np.ndarray]:
    """Max and sub-sample argmax time of residues f (L, m); indices past the series' own length
    are negative delays (the circulant wrap) and read as 0."""
    L = f.shape[0]
    i = np.argmax(f, axis=0)
    cols = np.arange(f.shape[1])
    fm = f[i, cols]
    a, b = f[(i - 1) % L, cols], f[(i + 1) % L, cols]
    den = a - 2.0 * fm + b
    with np.errstate(divide="ignore", invalid="ignore"):
        off = np.where(den < 0, 0.5 * (a - b) / den, 0.0)
    off = np.clip(off, -0.5, 0.5)
    pos = i.astype(np.float32) + off
    pos = np.where(i >= n, 0.0, np.maximum(pos, 0.0))
    return fm, pos * dt


def deconvolve(
    conc: np.ndarray,
    aif: np.ndarray,
    dt: float,
    *,
    oi: float | None = None,
    cutoffs: tuple[float, ...] = CUTOFFS,
    chunk: int = 32768,
    correct_tmax_bias: bool = True,
    min_cutoff: float | None = None,
    cancel: threading.Event | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> DeconvolutionMaps:
    """oSVD of tissue curves ``conc`` (N samples x n voxels, uniform step ``dt`` s) by ``aif`` (N).

    ``oi`` None: Wu's 0.035, raised to 5/L for short series. The onset of a clean residue (a step
    from zero to its peak) and the ringing any truncation puts around it contribute ~2.5-5/L to
    the oscillation index, so with few samples (e.g. 25 frames at 2 s) a fixed 0.035 regularises
    even noise-free curves and halves CBF; 5/L keeps the criterion about noise.

    ``min_cutoff``: the least regularisation any voxel gets (fraction of the largest singular
    value; None: none, plain oSVD); cut-offs below it are not tried."""
    conc = np.asarray(conc, dtype=np.float32)
    n_t, n_vox = conc.shape
    if aif.shape != (n_t,):
        raise ValueError(f"AIF has {aif.shape} samples, tissue curves {n_t}")
    L = 2 * n_t
    oi = max(DEFAULT_OI, 5.0 / L) if oi is None else oi
    if min_cutoff is not None:
        if not 0.0 < min_cutoff < 1.0:
            raise ValueError(f"min_cutoff must lie in (0, 1), got {min_cutoff}")
        kept = tuple(p for p in cutoffs if p >= min_cutoff - 1e-9)
        cutoffs = kept if kept else (float(min_cutoff),)
    u, s, vt = np.linalg.svd(aif_matrix(aif, dt))
    ks = []
    for p in sorted(cutoffs, reverse=True):
        k = int(np.count_nonzero(s >= p * s[0]))
        if k > (ks[-1][0] if ks else 0):
            ks.append((k, p))
    u_top = u[:n_t].T.astype(np.float32)  # only the first N rows meet the unpadded curves
    v = vt.T.astype(np.float32)
    inv_s = (1.0 / s).astype(np.float32)
    cbf = np.zeros(n_vox, np.float32)
    tmax = np.zeros(n_vox, np.float32)
    cut = np.zeros(n_vox, np.float32)
    kidx = np.zeros(n_vox, np.int16)
    for start in range(0, n_vox, chunk):
        if cancel is not None and cancel.is_set():
            raise Cancelled("perfusion: cancelled during deconvolution")
        if progress is not None:
            progress(start / n_vox, "deconvolution")
        c = conc[:, start : start + chunk]
        y = (u_top @ c) * inv_s[:, None]  # (L, m): projections on the singular vectors
        f = np.zeros((L, c.shape[1]), np.float32)
        k_prev = 0
        best_f = best_t = best_j = None
        for j, (k, p) in enumerate(ks):
            f += v[:, k_prev:k] @ y[k_prev:k]
            k_prev = k
            fm, tm = _peak(f, n_t, dt)
            d2 = np.abs(f[2:] - 2.0 * f[1:-1] + f[:-2]).sum(axis=0)
            with np.errstate(divide="ignore", invalid="ignore"):
                osc = d2 / (L * fm)
            ok = (fm > 0) & (osc < oi)
            if j == 0:  # the most regularised cut-off is the fallback for voxels that never pass
                best_f, best_t, best_j = fm.copy(), tm.copy(), np.zeros(fm.shape, np.int16)
            best_f = np.where(ok, fm, best_f)
            best_t = np.where(ok, tm, best_t)
            best_j = np.where(ok, j, best_j)
        sl = slice(start, start + c.shape[1])
        cbf[sl], tmax[sl], kidx[sl] = best_f, best_t, best_j
    cut = np.asarray([p for _k, p in ks], np.float32)[kidx]
    auc = np.maximum(conc.sum(axis=0), 0.0) * dt
    if correct_tmax_bias:
        obs_tab, bias_tab = _regularisation_tables(v.astype(np.float64), ks, n_t, dt)
        with np.errstate(divide="ignore", invalid="ignore"):
            mtt_obs = np.where(cbf > 0, auc / np.float32(np.sum(aif) * dt) / cbf, 0.0)
        for j in range(len(ks)):
            sel = kidx == j
            if sel.any():
                tmax[sel] -= np.interp(mtt_obs[sel], obs_tab[j], bias_tab[j]).astype(np.float32)
        np.maximum(tmax, 0.0, out=tmax)
    scale = KH / RHO
    cbf_map = np.maximum(cbf, 0.0) * scale * 6000.0  # 1/s -> mL/100g/min
    auc_a = float(np.sum(aif))
    cbv_map = np.maximum(conc.sum(axis=0), 0.0) * (scale * 100.0 / auc_a) if auc_a > 0 else np.zeros(n_vox, np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        mtt = np.where(cbf_map > 1e-3, cbv_map / cbf_map * 60.0, 0.0)
    return DeconvolutionMaps(cbf_map.astype(np.float32), cbv_map.astype(np.float32),
                             np.clip(mtt, 0.0, 60.0).astype(np.float32), tmax, cut)


def reference_gain(curve: np.ndarray, aif: np.ndarray, dt: float, cutoff: float, oi: float | None = None) -> float:
    """How much the regularisation at ``cutoff`` lowers the flow of tissue whose mean curve is
    ``curve`` (N samples): peak of its residue with plain oSVD (the least regularisation whose
    residue passes the oscillation index, down to 5%) / peak at ``cutoff``; 1 when undefined.

    Measured on the data rather than tabulated for a model residue: the loss depends on the
    residue's shape (an exponential residue, sharp at its onset, loses more of its peak than a
    flat-topped one), which a patient does not tell. A mean over thousands of healthy voxels has
    the SNR that lets oSVD go down to a low cut-off, where little of the peak is lost."""
    c = np.asarray(curve, np.float32)[:, None]
    low = deconvolve(c, aif, dt, oi=oi, correct_tmax_bias=False).cbf[0]
    reg = deconvolve(c, aif, dt, oi=oi, cutoffs=(float(cutoff),), correct_tmax_bias=False).cbf[0]
    gain = float(low / reg) if reg > 0 and low > 0 else 1.0
    return max(gain, 1.0)  # less regularisation never lowers a clean residue's peak


def time_to_peak(conc: np.ndarray, dt: float) -> np.ndarray:
    """Time of the concentration peak from the first sample (s), with sub-sample interpolation."""
    n = conc.shape[0]
    i = np.argmax(conc, axis=0)
    cols = np.arange(conc.shape[1])
    fm = conc[i, cols]
    a = conc[np.maximum(i - 1, 0), cols]
    b = conc[np.minimum(i + 1, n - 1), cols]
    den = a - 2.0 * fm + b
    with np.errstate(divide="ignore", invalid="ignore"):
        off = np.where((den < 0) & (i > 0) & (i < n - 1), 0.5 * (a - b) / den, 0.0)
    return ((i + np.clip(off, -0.5, 0.5)) * dt).astype(np.float32)
