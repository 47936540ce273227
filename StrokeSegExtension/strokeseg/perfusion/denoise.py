"""Denoising of tissue concentration curves before deconvolution: in time (``temporal_pca``,
CT) and in space (``guided_bilateral``, or a masked Gaussian).

CT perfusion is noisy: a 1.5-2 mm pixel of a 5 mm slice carries 2-4 HU of quantum noise per
frame against a grey-matter bolus of ~10 HU, so curves are averaged over neighbours before the
deconvolution. A plain Gaussian does that across the grey/white matter and CSF boundaries too,
which mixes flows that differ 2-3 fold and flattens the CBF contrast the maps exist to show.

``guided_bilateral`` is a joint (cross) bilateral filter in the spirit of TIPS filtering (Mendrik
et al., Phys Med Biol 56:3857, 2011): each voxel's curve is a weighted mean of its in-plane
neighbours' curves, the weights a spatial Gaussian times a range term that only trusts neighbours
which look alike on two guides:

* anatomy: the pre-contrast (baseline-average) image, whose grey/white/CSF contrast is 10-30 HU
  at a noise of ~1-2 HU (the baseline frames are averaged), so tissue classes separate cleanly;
* perfusion: each curve's amplitude along the dominant bolus shape (the first principal
  component of all tissue curves), lightly pre-smoothed, so that ischaemic and healthy tissue of
  the same anatomy are not averaged together at the edge of the core.

Each guide's difference is measured in units of its own noise (estimated from neighbouring-voxel
differences, robustly), so the widths ``h_anatomy`` and ``h_perfusion`` are dimensionless and do
not depend on the scanner, dose or modality. Everything is in-plane: slices of 5-10 mm share
little anatomy with their neighbours.

On the CTP phantoms' val split (24 cases), against the 3 mm Gaussian it replaces: CBF rank
correlation with the truth 0.874 -> 0.894 (median), core within tolerance 71% -> 79%, Tmax error
0.56 -> 0.51 s. The anatomy guide alone sharpens CBF but lets the core borrow flow from the
penumbra of the same tissue class (core 58%); the wide perfusion guide (h = 4) prevents that.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def masked_gaussian(values: np.ndarray, mask: np.ndarray, sigma_px: list[float]) -> np.ndarray:
    """Gaussian smoothing restricted to ``mask`` (normalised convolution); outside it, ``values``."""
    num = ndimage.gaussian_filter(np.where(mask, values, 0.0).astype(np.float32), sigma_px, mode="nearest")
    den = ndimage.gaussian_filter(mask.astype(np.float32), sigma_px, mode="nearest")
    return np.where(mask, num / np.maximum(den, 1e-6), values)


def neighbour_noise(image: np.ndarray, mask: np.ndarray) -> float:
    """Noise SD of ``image`` inside ``mask`` from differences of in-plane neighbours (robust MAD;
    true structure inflates it slightly, which errs towards more smoothing)."""
    diffs = []
    for axis in (1, 2):
        a = np.moveaxis(image, axis, 0)
        m = np.moveaxis(mask, axis, 0)
        both = m[1:] & m[:-1]
        if both.any():
            diffs.append((a[1:] - a[:-1])[both])
    if not diffs:
        return 0.0
    d = np.concatenate(diffs).astype(np.float64)
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2.0))


def temporal_pca(curves: np.ndarray, fit_on: np.ndarray, components: int) -> np.ndarray:
    """Each curve (time x voxel) projected on the mean and the first ``components`` principal
    components of the curves selected by ``fit_on`` (a boolean over voxels: the parenchyma).

    Tissue curves are a few shapes (bolus arrival, width, recirculation) scaled per voxel, while
    quantum noise is white in time and spread evenly over all N temporal dimensions: keeping K of
    them removes about 1 - K/N of the noise variance with no spatial blur, which the spatial filter
    after it then needs less of. Series with too few frames are returned as they are."""
    n_t = curves.shape[0]
    if components <= 0 or components >= n_t - 1 or int(fit_on.sum()) <= components:
        return curves
    x = curves[:, fit_on].astype(np.float64)
    mean = x.mean(axis=1, keepdims=True)
    basis = np.linalg.svd(x - mean, full_matrices=False)[0][:, :components]
    return (mean + basis @ (basis.T @ (curves.astype(np.float64) - mean))).astype(np.float32)


def dominant_amplitude(curves: np.ndarray) -> np.ndarray:
    """Projection of each curve (time x voxel) on the first (uncentred) principal component of
    all of them, signed so that a bolus is positive."""
    x = curves.astype(np.float64)
    cov = x @ x.T / max(x.shape[1], 1)
    _w, v = np.linalg.eigh(cov)
    pc = v[:, -1]
    if pc.sum() < 0:
        pc = -pc
    return (pc.astype(np.float32) @ curves).astype(np.float32)


def guided_bilateral(
    curves: np.ndarray,
    search: np.ndarray,
    tissue: np.ndarray,
    anatomy: np.ndarray | None,
    spacing: tuple[float, float, float],
    sigma_mm: float,
    *,
    h_anatomy: float | None = 1.5,
    h_perfusion: float | None = 4.0,
    radius_sigmas: float = 2.0,
) -> np.ndarray:
    """Curves (time x search voxel) with the tissue voxels' curves replaced by their guided
    bilateral mean over tissue neighbours within ``radius_sigmas`` spatial sigmas; other voxels
    keep theirs. ``anatomy``: baseline image on the grid (z, y, x), or None; an ``h_*`` of None
    drops that guide (both None: a masked Gaussian)."""
    out = curves.copy()
    tis_s = tissue[search]
    if sigma_mm <= 0 or not tis_s.any():
        return out
    n_t = curves.shape[0]
    zz, yy, xx = np.nonzero(tissue)
    box = (slice(zz.min(), zz.max() + 1), slice(yy.min(), yy.max() + 1), slice(xx.min(), xx.max() + 1))
    tb = tissue[box]
    sy, sx = sigma_mm / spacing[1], sigma_mm / spacing[0]
    # Fine pixels (sigma of several pixels): neighbours are visited every ``step`` pixels after a
    # small Gaussian pre-average that covers the skipped ones, ~step^2 times fewer passes.
    step = max(1, int(round(min(sy, sx) / 2.0)))
    ry, rx = int(np.ceil(radius_sigmas * sy / step)) * step, int(np.ceil(radius_sigmas * sx / step)) * step

    # Guides in units of their own noise, scaled by their width: the range weight is
    # exp(-|dg|^2 / 4), |dg|^2 summed over guides (/4: a difference of two noisy values has twice
    # the variance, and a Gaussian's exponent halves it).
    guides = []
    if anatomy is not None and h_anatomy is not None:
        g = anatomy[box].astype(np.float32)
        sd = neighbour_noise(g, tb)
        if sd > 0:
            guides.append(np.where(tb, g / (sd * h_anatomy), 0.0).astype(np.float32))
    if h_perfusion is not None:
        amp = np.zeros(tb.shape, np.float32)
        amp[tb] = dominant_amplitude(curves[:, tis_s])
        amp = masked_gaussian(amp, tb, [0.0, 0.5 * sy, 0.5 * sx])  # pre-smoothed: a guide, not a copy of the noise
        sd = neighbour_noise(amp, tb)
        if sd > 0:
            guides.append(np.where(tb, amp / (sd * h_perfusion), 0.0).astype(np.float32))

    pad = ((0, 0), (ry, ry), (rx, rx))
    gp = [np.pad(g, pad) for g in guides]
    tp = np.pad(tb, pad)
    y = np.zeros((n_t,) + tb.shape, np.float32)
    y[:, tb] = curves[:, tis_s]
    if step > 1:
        pre = [0.0, 0.0, step / 2.0, step / 2.0]
        norm = ndimage.gaussian_filter(tb.astype(np.float32), pre[1:])
        y = ndimage.gaussian_filter(y, pre) / np.maximum(norm, 1e-6) * tb
    yp = np.pad(y, ((0, 0),) + pad)
    del y  # 4D arrays dominate the memory: keep three (padded input, sum, scratch)
    num = np.zeros((n_t,) + tb.shape, np.float32)
    den = np.zeros(tb.shape, np.float32)
    tmp = np.empty_like(num)
    ny, nx = tb.shape[1], tb.shape[2]
    cutoff = np.exp(-0.5 * radius_sigmas**2)
    for dy in range(-ry, ry + 1, step):
        for dx in range(-rx, rx + 1, step):
            ws = float(np.exp(-0.5 * ((dy / sy) ** 2 + (dx / sx) ** 2)))
            if ws < cutoff:
                continue
            ys, xs = slice(ry + dy, ry + dy + ny), slice(rx + dx, rx + dx + nx)
            d2 = np.zeros(tb.shape, np.float32)
            for g, g_pad in zip(guides, gp):
                d2 += (g_pad[:, ys, xs] - g) ** 2
            w = np.exp(-0.25 * d2) * np.float32(ws)
            w *= tp[:, ys, xs]
            den += w
            np.multiply(yp[:, :, ys, xs], w, out=tmp)
            num += tmp
    out[:, tis_s] = num[:, tb] / np.maximum(den[tb], 1e-12)
    return out
