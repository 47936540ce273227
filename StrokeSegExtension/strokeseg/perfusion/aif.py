"""Arterial input (AIF) and venous output (VOF) function selection.

Automatic choice, after the criteria of Mouridsen et al. (MRM 55:524, 2006) and Peruzzo et al.
(2011), reduced to what is robust and cheap: among the intracranial voxels with the highest peak
concentration, arteries are the earliest, with the tallest and narrowest bolus; large veins
(sinuses) peak later, with the largest area. Saturated voxels (CT values clipped at the scale's
ceiling, MR signal fallen to the noise floor) are never chosen, and a series whose arteries are
mostly saturated is refused.

Partial volume: arteries are small, so their voxels mix blood with tissue and under-read the
arterial concentration; the sagittal sinus is large. Tracer conservation makes the areas under
the arterial and venous curves equal, so the AIF is scaled up by area(VOF) / area(AIF) when that
is above one (Knutsson et al. 2010).

The user may instead give a point (LPS mm; the tallest voxel of its in-plane 3x3 neighbourhood
is used) or a mask; either must lie in the brain.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from ..image import Image, resample_to

N_AIF = 6
N_VOF = 3
MAX_PV_SCALE = 4.0
CT_VESSEL_HU = 50.0  # CT enhancement (HU) only vessels reach: the voxels whose clipping matters


@dataclass
class InputFunctions:
    aif: np.ndarray  # concentration on the analysis time grid, partial-volume scaled
    vof: np.ndarray | None
    aif_voxels: np.ndarray  # (k, 3) z, y, x indices
    vof_voxels: np.ndarray
    pv_scale: float
    source: str  # "auto", "point", "mask"
    notes: list[str] = field(default_factory=list)


def _roughness(curves: np.ndarray) -> np.ndarray:
    """Second-difference energy relative to the peak: noise spikes are rough, boluses smooth."""
    d2 = np.diff(curves, 2, axis=0)
    return np.sqrt((d2**2).mean(axis=0)) / np.maximum(curves.max(axis=0), 1e-9)


def _vof(conc: np.ndarray, peak: np.ndarray, ttp: np.ndarray, auc: np.ndarray, cand: np.ndarray) -> np.ndarray:
    late = cand[ttp[cand] >= np.percentile(ttp[cand], 60)]
    if late.size == 0:
        return np.zeros(0, int)
    return late[np.argsort(-auc[late])[:N_VOF]]


def select_input_functions(
    conc: np.ndarray,
    coords: np.ndarray,
    saturated: np.ndarray,
    dt: float,
    *,
    where: str | None = None,
    kind: str = "ct",
    series: Image | None = None,
    search_mask: np.ndarray | None = None,
    point: tuple[float, float, float] | None = None,
    mask: Image | None = None,
    pv_correction: bool = True,
    tissue_peak: int | None = None,
) -> InputFunctions:
    """Pick AIF and VOF from search-region curves ``conc`` (time x voxel) at ``coords`` (voxel x zyx).

    ``tissue_peak``: sample index at which the parenchyma's average curve peaks (arteries peak
    before it)."""
    peak = conc.max(axis=0)
    ttp = np.argmax(conc, axis=0)
    auc = np.maximum(conc, 0).sum(axis=0) * dt
    rough = _roughness(conc)
    top = np.flatnonzero(peak >= np.percentile(peak, 99.0))
    notes: list[str] = []

    if point is not None or mask is not None:
        chosen, source = _user_voxels(conc, coords, peak, where=where, series=series, search_mask=search_mask,
                                      point=point, mask=mask)
        if saturated[chosen].all():
            raise InputError(where, "arterial input given is saturated (signal clipped); choose another point")
        chosen = chosen[~saturated[chosen]]
    else:
        source = "auto"
        # Arteries fill first: they peak before the parenchyma (the head-average curve), veins
        # after it. Of the tallest curves, the earliest 30% that peak before the tissue do.
        early = top[ttp[top] <= np.percentile(ttp[top], 30)]
        if tissue_peak is not None:
            early = early[ttp[early] < tissue_peak]
        # CT clipped at the top of its scale (an export through a narrow window): the clipped
        # arteries are the tallest curves of all, and the unclipped voxels left among the early
        # candidates are partial-volume arteries whose peaks under-read the input. So a CT series
        # is also refused when a tenth of its vessels (enhancing > 50 HU) are clipped (clipped at
        # 150 HU: 5-43% of the early candidates but 21-45% of the vessels on 9 small phantoms; an
        # unclipped series has none). MR arteries often reach the noise floor, and the unsaturated
        # smaller branches are the usual DSC input, so MR keeps the first rule only.
        sat_frac = float(saturated[early].mean()) if early.size else 0.0
        vessels = peak > CT_VESSEL_HU
        sat_vessels = float(saturated[vessels].mean()) if kind == "ct" and vessels.any() else 0.0
        if sat_frac > 0.3 or sat_vessels > 0.1:
            what = "clipped at the top of the CT scale" if kind == "ct" else "dropped to the noise floor"
            share = f"{100 * sat_frac:.0f}% of the arterial voxels" if sat_frac > 0.3 else f"{100 * sat_vessels:.0f}% of the vessel voxels"
            raise InputError(where, f"arterial signal saturated: {share} are {what}")
        early = early[~saturated[early]]
        early = early[rough[early] <= np.percentile(rough[early], 75)] if early.size > 4 else early
        if early.size == 0:
            raise InputError(where, "no arterial input found: no early, tall bolus curve in the brain")
        width = auc[early] / np.maximum(peak[early], 1e-9)
        score = peak[early] / np.maximum(width, dt)
        chosen = early[np.argsort(-score)[:N_AIF]]
    aif = conc[:, chosen].mean(axis=1)
    if aif.max() <= 0:
        raise InputError(where, "arterial input has no bolus")

    vof_idx = _vof(conc, peak, ttp, auc, top[~saturated[top]])
    vof = conc[:, vof_idx].mean(axis=1) if vof_idx.size else None
    scale = 1.0
    if pv_correction and vof is not None:
        ratio = float(np.maximum(vof, 0).sum() / max(np.maximum(aif, 0).sum(), 1e-9))
        if ratio > 1.0:
            scale = min(ratio, MAX_PV_SCALE)
            if ratio > MAX_PV_SCALE:
                notes.append(f"venous/arterial area ratio {ratio:.2f} capped at {MAX_PV_SCALE}")
    return InputFunctions(aif * scale, vof, coords[chosen], coords[vof_idx], scale, source, notes)


def _user_voxels(conc, coords, peak, *, where, series, search_mask, point, mask) -> tuple[np.ndarray, str]:
    if series is None or search_mask is None:
        raise ValueError("a user arterial input needs the series geometry and the search mask")
    lookup = -np.ones(search_mask.shape, dtype=np.int64)
    lookup[tuple(coords.T)] = np.arange(coords.shape[0])
    if point is not None:
        where_pt = "(" + ", ".join(f"{float(v):.1f}" for v in point) + ") mm"
        idx = np.round(series.physical_to_index(np.asarray(point, float))[0]).astype(int)  # x, y, z
        size = np.asarray(series.size)
        if np.any(idx < 0) or np.any(idx >= size):
            raise InputError(where, f"arterial input point {where_pt} is outside the image")
        x, y, z = idx
        if not search_mask[z, y, x]:
            raise InputError(where, f"arterial input point {where_pt} lies outside the brain")
        # Snap to the tallest curve of the in-plane 3x3 neighbourhood (the vessel's centre).
        ys = slice(max(y - 1, 0), y + 2)
        xs = slice(max(x - 1, 0), x + 2)
        near = lookup[z, ys, xs].ravel()
        near = near[near >= 0]
        return near[[int(np.argmax(peak[near]))]], "point"
    m = resample_to(mask, series.frame(0), linear=False).array > 0 if not mask.same_grid(series) else mask.array > 0
    inside = lookup[m & search_mask]
    if inside.size == 0:
        raise InputError(where, "arterial input mask lies outside the brain")
    return inside, "mask"
