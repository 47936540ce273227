"""Acute lesions (ground truth) and distractors (not ground truth) on the template grid.

Acute patterns (clinical stroke phenotypes):
  territorial - one large cortico-subcortical infarct in an arterial territory (3-300 mL),
  lacunar     - 1-3 small deep infarcts (basal ganglia, thalamus, pons, deep white matter;
                0.05-1.5 mL each: the lacune size range of STRIVE, Wardlaw et al. Lancet Neurol 2013),
  embolic     - a shower of small cortical/subcortical foci in one or several territories,
  none        - healthy control (distractors only).
Shapes come from the real lesion library when one is given (restricted to the requested split),
otherwise from thresholded smoothed noise inside a territory / ellipsoids with ragged edges.

Distractors change the image but never the truth: chronic (old) infarcts with cavitation,
white-matter hyperintensities, and T2 shine-through. They are kept away from the acute lesion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import cc3d
import numpy as np
from scipy import ndimage

from .anatomy import head_model
from .library import Region, Territories, entries_for, load_library_lesion

PATTERNS = ("territorial", "lacunar", "embolic", "none")
PATTERN_P = (0.45, 0.22, 0.28, 0.05)
LARGE_TERRITORIES = ("MCAF", "MCAP", "MCAT", "MCAI", "MCAO", "ACA", "PCAO", "PCAT", "SC", "IC")
LARGE_P = (0.18, 0.16, 0.12, 0.08, 0.06, 0.1, 0.1, 0.06, 0.08, 0.06)
DEEP_TERRITORIES = ("LLS", "MLS", "PCTP", "ACTP", "B")
CORTICAL_TERRITORIES = ("MCAF", "MCAP", "MCAT", "MCAO", "ACA", "PCAO", "PCAT", "SC", "IC")


@dataclass
class AcuteLesions:
    region: Region | None  # lesion fraction on the template grid (before restriction to tissue)
    adc_scale: np.ndarray | None  # per-voxel ADC multiplier in the lesion (0.4-0.7, softer rim)
    t2_scale: np.ndarray | None  # per-voxel T2 multiplier (mild prolongation)
    pattern: str
    components: int
    files: list[str] = field(default_factory=list)
    flipped: list[bool] = field(default_factory=list)
    source: str = "procedural"
    adc_reduction: list[float] = field(default_factory=list)


@dataclass
class Distractor:
    kind: str  # "old_infarct" | "old_lacune" | "wmh" | "t2_shine_through"
    region: Region
    core: np.ndarray | None = None  # cavitation fraction (old infarcts): CSF-like inside
    params: dict = field(default_factory=dict)


def merge(regions: list[Region]) -> Region | None:
    regions = [r for r in regions if r is not None]
    if not regions:
        return None
    lo = np.min([[s.start for s in r.slices] for r in regions], 0)
    hi = np.max([[s.stop for s in r.slices] for r in regions], 0)
    out = np.zeros(tuple(hi - lo), np.float32)
    for r in regions:
        sl = tuple(slice(s.start - a, s.stop - a) for s, a in zip(r.slices, lo))
        np.maximum(out[sl], r.values, out=out[sl])
    return Region(tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)), out)


def _smooth_noise(shape, sigma: float, rng: np.random.Generator) -> np.ndarray:
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return n / (n.std() + 1e-6)


def blob(centre_zyx, radii_zyx, rng: np.random.Generator, ragged: float = 0.25) -> Region:
    """An ellipsoid with a ragged, noise-perturbed edge; soft (partial-volume) boundary."""
    h = head_model()
    radii = np.maximum(np.asarray(radii_zyx, float), 0.8)
    m = np.ceil(radii * (1 + 2 * ragged) + 2).astype(int)
    c = np.asarray(centre_zyx, float)
    lo = np.maximum(np.floor(c).astype(int) - m, 0)
    hi = np.minimum(np.floor(c).astype(int) + m + 1, np.array(h.grid.shape))
    zz, yy, xx = np.meshgrid(*[np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi)], indexing="ij")
    # Random orientation: rotate the coordinate frame.
    q = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    d = np.stack([zz - c[0], yy - c[1], xx - c[2]], -1) @ q.T.astype(np.float32)
    r = np.sqrt(((d / radii.astype(np.float32)) ** 2).sum(-1))
    if ragged > 0 and min(r.shape) > 2:
        r = r + ragged * _smooth_noise(r.shape, max(1.0, radii.min() / 2), rng)
    frac = np.clip((1.0 - r) * radii.min() + 0.5, 0, 1).astype(np.float32)
    return Region(tuple(slice(int(a), int(b)) for a, b in zip(lo, hi)), frac)


def _radii_for_volume(ml: float, rng: np.random.Generator, elong: float = 1.6) -> np.ndarray:
    shape = np.exp(rng.uniform(-np.log(elong), np.log(elong), 3))
    shape /= np.prod(shape) ** (1 / 3)
    r = (ml * 1000.0 * 3 / (4 * np.pi)) ** (1 / 3)
    return r * shape


def _pick_voxel(mask: np.ndarray, rng: np.random.Generator, offset=(0, 0, 0)) -> np.ndarray | None:
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return None
    k = idx[rng.integers(idx.size)]
    return np.array(np.unravel_index(k, mask.shape)) + np.asarray(offset)


def _territory_mask(terr: Territories, prefix: str, side: str) -> tuple[np.ndarray, tuple[slice, ...]] | None:
    ids = [k for k, s in terr.short.items() if s == prefix + side]
    if not ids:
        return None
    m = np.isin(terr.labels, ids)
    objs = ndimage.find_objects(m.astype(np.uint8))
    if not objs or objs[0] is None:
        return None
    return m[objs[0]], objs[0]


def territorial_blob(terr: Territories, prefix: str, side: str, ml: float, rng: np.random.Generator) -> Region | None:
    """Thresholded smoothed noise inside a territory, seeded at a random point of it."""
    h = head_model()
    got = _territory_mask(terr, prefix, side)
    if got is None:
        return None
    tm, sl = got
    pad = 4
    sl = tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(sl, h.grid.shape))
    tm = np.isin(terr.labels[sl], [k for k, s in terr.short.items() if s == prefix + side])
    tissue = (h.gm[sl] + h.wm[sl]) > 0.5
    allowed = ndimage.binary_dilation(tm, iterations=3) & tissue
    seed = _pick_voxel(tm & tissue, rng)
    if seed is None:
        return None
    # Work at 2 mm for speed, then upsample.
    sub = allowed[::2, ::2, ::2]
    noise = _smooth_noise(sub.shape, rng.uniform(2.0, 4.0), rng)
    zz, yy, xx = np.indices(sub.shape, dtype=np.float32)
    s2 = seed / 2.0
    dist = np.sqrt((zz - s2[0]) ** 2 + (yy - s2[1]) ** 2 + (xx - s2[2]) ** 2) * 2.0
    target_vox = ml * 1000.0 / 8.0
    scale = max(6.0, (ml * 1000 * 3 / (4 * np.pi)) ** (1 / 3))
    field_ = noise - dist / scale * 1.2
    field_[~sub] = -np.inf
    n_allowed = int(sub.sum())
    if n_allowed == 0:
        return None
    k = int(min(target_vox, 0.9 * n_allowed))
    if k < 1:
        return None
    thr = np.partition(field_[sub], n_allowed - k)[n_allowed - k]
    m = field_ >= thr
    lab = cc3d.connected_components(m.astype(np.uint8), connectivity=26)
    s2i = tuple(np.clip(np.round(s2).astype(int), 0, np.array(sub.shape) - 1))
    keep = lab[s2i] if lab[s2i] > 0 else np.argmax(np.bincount(lab.ravel())[1:]) + 1
    m = lab == keep
    up = ndimage.zoom(ndimage.gaussian_filter(m.astype(np.float32), 0.6), 2, order=1)
    up = up[: allowed.shape[0], : allowed.shape[1], : allowed.shape[2]]
    up = np.pad(up, [(0, a - b) for a, b in zip(allowed.shape, up.shape)])
    frac = np.clip((up - 0.5) * 3 + 0.5, 0, 1) * ndimage.binary_dilation(allowed, iterations=1)
    if frac.sum() < 20:
        return None
    return Region(sl, frac.astype(np.float32))


@lru_cache(maxsize=1)
def _deep_masks() -> dict[str, np.ndarray]:
    """Candidate masks: deep WM (centrum semiovale), periventricular WM, ventricles, cortex ribbon."""
    h = head_model()
    inner = ndimage.binary_erosion(h.icv > 0, iterations=12)
    vent = (h.csf > 0.6) & inner
    vent = cc3d.dust(vent.astype(np.uint8), threshold=300, connectivity=26) > 0
    near_vent = ndimage.binary_dilation(vent, iterations=7)
    pv = near_vent & ~ndimage.binary_dilation(vent, iterations=1) & (h.wm > 0.5)
    deep_wm = (h.wm > 0.92) & ndimage.binary_erosion(h.icv > 0, iterations=18)
    cortex = (h.gm > 0.5) & (h.brain > 0)
    return {"vent": vent, "pv": pv, "deep_wm": deep_wm, "cortex": cortex}


def _deep_candidates(terr: Territories, prefix: str, side: str) -> np.ndarray:
    h = head_model()
    if prefix == "DWM":
        m = _deep_masks()["deep_wm"].copy()
        x = h.grid.index_to_physical(np.array([[0, 0, 0], [h.grid.shape[2] - 1, 0, 0]], float))[:, 0]
        xs = np.linspace(x[0], x[1], h.grid.shape[2])  # LPS x: + is left
        m &= ((xs > 0) if side == "L" else (xs < 0))[None, None, :]
        return m
    ids = [k for k, s in terr.short.items() if s == prefix + side]
    return np.isin(terr.labels, ids) & (h.brain > 0)


def acute_procedural(pattern: str, terr: Territories, rng: np.random.Generator) -> list[Region]:
    sides = ["L", "R"]
    if pattern == "territorial":
        for _ in range(8):
            prefix = str(rng.choice(LARGE_TERRITORIES, p=LARGE_P))
            side = str(rng.choice(sides))
            ml = float(np.exp(rng.uniform(np.log(3.0), np.log(250.0))))
            r = territorial_blob(terr, prefix, side, ml, rng)
            if r is not None:
                out = [r]
                # Large MCA infarcts often extend into a neighbouring branch territory.
                if prefix.startswith("MCA") and rng.random() < 0.35:
                    r2 = territorial_blob(terr, str(rng.choice(["MCAF", "MCAP", "MCAT", "MCAI"])), side, ml * 0.5, rng)
                    out += [r2] if r2 is not None else []
                return out
        return []
    if pattern == "lacunar":
        n = int(rng.choice([1, 1, 1, 2, 3]))
        out = []
        for _ in range(n * 4):
            if len(out) >= n:
                break
            prefix = str(rng.choice(list(DEEP_TERRITORIES) + ["DWM", "DWM"]))
            cand = _deep_candidates(terr, prefix, str(rng.choice(sides)))
            c = _pick_voxel(cand, rng)
            if c is None:
                continue
            ml = float(np.exp(rng.uniform(np.log(0.05), np.log(1.5))))
            radii = _radii_for_volume(ml, rng, elong=1.8)
            radii[0] *= 1.3  # perforator infarcts are elongated along the vessel (roughly S-I)
            out.append(blob(c, radii, rng, ragged=0.15))
        return out
    if pattern == "embolic":
        h = head_model()
        n = int(rng.integers(2, 16))
        n_terr = int(rng.choice([1, 1, 2, 3]))
        terrs = [(str(rng.choice(CORTICAL_TERRITORIES)), str(rng.choice(sides))) for _ in range(n_terr)]
        cortex = _deep_masks()["cortex"]
        out = []
        for i in range(n * 3):
            if len(out) >= n:
                break
            prefix, side = terrs[i % n_terr]
            got = _territory_mask(terr, prefix, side)
            if got is None:
                continue
            tm, sl = got
            # Emboli lodge in cortical branches / at the grey-white junction.
            c = _pick_voxel(tm & (cortex[sl] | (h.wm[sl] > 0.3) & (h.gm[sl] > 0.3)), rng, [s.start for s in sl])
            if c is None:
                continue
            ml = float(np.exp(rng.uniform(np.log(0.02), np.log(4.0 if i == 0 else 1.5))))
            out.append(blob(c, _radii_for_volume(ml, rng), rng, ragged=0.3))
        return out
    return []


def _classify(region: Region) -> tuple[str, int]:
    """Pattern of a lesion map: several foci without a dominant one = embolic; small = lacunar."""
    m = region.values > 0.5
    lab, n = cc3d.connected_components(m.astype(np.uint8), connectivity=26, return_N=True)
    n = int(n)
    vol = region.volume_ml
    if n >= 3:
        sizes = np.bincount(lab.ravel())[1:]
        if sizes.max() < 0.7 * sizes.sum() or vol < 20.0:
            return "embolic", n
    if vol <= 1.5 and n <= 2:
        return "lacunar", n
    return "territorial", n


def acute_from_library(library: str, split: str | None, pattern: str, rng: np.random.Generator,
                       tries: int = 10) -> tuple[list[Region], list[str], list[bool], str]:
    """Draw real lesion shapes of the split until one fits ``pattern`` (file size guides the draw)."""
    entries = entries_for(library, split)
    if not entries:
        return [], [], [], pattern
    sizes = np.array([e.size_bytes for e in entries], float)
    q25, q50 = np.quantile(sizes, [0.25, 0.5])
    if pattern == "lacunar":
        pool = [e for e, s in zip(entries, sizes) if s <= q25]
    elif pattern == "territorial":
        pool = [e for e, s in zip(entries, sizes) if s >= q50 * 0.8]
    else:
        pool = list(entries)
    pool = pool or list(entries)
    best = None
    for _ in range(tries):
        e = pool[int(rng.integers(len(pool)))]
        flip = bool(rng.random() < 0.5)
        r = load_library_lesion(e.path, flip)
        if r is None or not 0.05 <= r.volume_ml <= 300.0:  # the clinical range we simulate
            continue
        got, _n = _classify(r)
        if got == pattern:
            return [r], [e.path.name], [flip], got
        best = best or (r, e, flip, got)
    if best is None:
        return [], [], [], pattern
    r, e, flip, got = best
    return [r], [e.path.name], [flip], got


def heterogeneity(region: Region, reduction: float, t2_prolong: float, rng: np.random.Generator):
    """ADC and T2 multipliers inside a lesion: full effect in the core, softer rim, patchy inside."""
    v = region.values
    core = ndimage.gaussian_filter((v > 0.5).astype(np.float32), 1.5)
    core = np.clip(core * 1.6, 0, 1)  # ~1 in the interior, falls off within ~2 mm of the edge
    patchy = 1.0 + 0.18 * _smooth_noise(v.shape, 2.0, rng) if min(v.shape) > 2 else 1.0
    red = np.clip(reduction * (0.7 + 0.3 * core) * patchy, 0.1, 0.75)
    adc_scale = (1.0 - red).astype(np.float32)
    t2_scale = (1.0 + t2_prolong * (0.5 + 0.5 * core)).astype(np.float32)
    return adc_scale, t2_scale


def make_acute(pattern: str, terr: Territories, rng: np.random.Generator, library: str | None,
               split: str | None, atrophy: float = 0.0) -> AcuteLesions:
    if pattern == "none":
        return AcuteLesions(None, None, None, "none", 0)
    files: list[str] = []
    flips: list[bool] = []
    source = "procedural"
    if library is not None:
        regions, files, flips, pattern_got = acute_from_library(library, split, pattern, rng)
        source = "library"
        if not regions:
            regions, source = acute_procedural(pattern, terr, rng), "procedural"
        else:
            pattern = pattern_got
            if rng.random() < 0.12:  # second, independent event on the other side (bilateral)
                more, f2, fl2, _ = acute_from_library(library, split, str(rng.choice(["lacunar", "embolic"])), rng, tries=4)
                regions += more
                files += f2
                flips += fl2
    else:
        regions = acute_procedural(pattern, terr, rng)
        if regions and rng.random() < 0.1:
            regions += acute_procedural(str(rng.choice(["lacunar", "embolic"])), terr, rng)
    regions = [r for r in regions if r is not None and r.values.sum() >= 1]
    if not regions:
        return AcuteLesions(None, None, None, "none", 0, source=source)
    # Every lesion gets its own ADC reduction, 30-60% below normal (acute ischaemia: Schlaug et al.,
    # Neurology 1997; Lansberg et al., AJNR 2001: rADC ~0.4-0.7 in the first day), and T2 rise
    # (grows over hours: hyperacute lesions are FLAIR-negative, the DWI-FLAIR mismatch).
    h = head_model()
    reductions, red_maps, t2_maps = [], [], []
    for r in regions:
        # Restrict to parenchyma: the truth is the injured tissue (expert masks graze CSF), after
        # the subject's sulcal widening (the same atrophy the signal model applies).
        gm = h.gm[r.slices] * (1.0 - np.float32(atrophy) * h.sulcal[r.slices])
        r.values *= np.clip(gm + h.wm[r.slices], 0, 1)
        red = float(rng.uniform(0.30, 0.60))
        a, t = heterogeneity(r, red, float(rng.uniform(0.03, 0.25)), rng)
        reductions.append(red)
        red_maps.append(Region(r.slices, (1.0 - a) * (r.values > 0)))
        t2_maps.append(Region(r.slices, (t - 1.0) * (r.values > 0)))
    region = merge(regions)
    adc_scale = 1.0 - merge(red_maps).values
    t2_scale = 1.0 + merge(t2_maps).values
    _, n = _classify(region)
    return AcuteLesions(region, adc_scale.astype(np.float32), t2_scale.astype(np.float32), pattern, n, files, flips,
                        source, reductions)


def make_distractors(terr: Territories, rng: np.random.Generator, avoid: Region | None,
                     healthy: bool = False) -> list[Distractor]:
    """Old infarcts, WMH and T2 shine-through, none overlapping the (dilated) acute lesion."""
    masks = _deep_masks()
    out: list[Distractor] = []
    # White-matter hyperintensities (very common over 60): periventricular caps/bands + deep foci.
    if rng.random() < 0.65:
        grade = int(rng.choice([1, 1, 2, 2, 3]))
        pv_noise_thr = {1: 1.4, 2: 0.8, 3: 0.2}[grade]
        pv = masks["pv"]
        bb = ndimage.find_objects(pv.astype(np.uint8))[0]
        noise = _smooth_noise(tuple(s.stop - s.start for s in bb), 2.5, rng)
        m = pv[bb] & (noise > pv_noise_thr)
        # Caps at the frontal and occipital horns are the most constant finding.
        frac = ndimage.gaussian_filter(m.astype(np.float32), 0.8)
        regions = [Region(bb, np.clip(frac * 1.5, 0, 1))]
        for _ in range(int(rng.integers(0, 4 + 6 * grade))):
            c = _pick_voxel(masks["deep_wm"], rng)
            if c is not None:
                ml = float(np.exp(rng.uniform(np.log(0.01), np.log(0.5 * grade))))
                regions.append(blob(c, _radii_for_volume(ml, rng), rng, ragged=0.3))
        out.append(Distractor("wmh", merge(regions), params={"fazekas": grade,
                                                            "t2_ms": float(rng.uniform(110, 180)),
                                                            "adc_scale": float(rng.uniform(1.15, 1.6))}))
    # Old (chronic) territorial infarct: cavitated core (CSF) with a gliotic rim.
    if rng.random() < 0.2:
        r = territorial_blob(terr, str(rng.choice(CORTICAL_TERRITORIES)), str(rng.choice(["L", "R"])),
                             float(np.exp(rng.uniform(np.log(2.0), np.log(60.0)))), rng)
        if r is not None:
            core = np.clip(ndimage.gaussian_filter((r.values > 0.5).astype(np.float32), 1.0) * 1.3 - 0.3, 0, 1)
            core = ndimage.grey_erosion(core, size=(3, 3, 3))
            out.append(Distractor("old_infarct", r, core.astype(np.float32),
                                  {"gliosis_t2_ms": float(rng.uniform(130, 220)), "gliosis_adc": float(rng.uniform(1.2e-3, 1.8e-3))}))
    # Old lacunes: small CSF-filled cavities in the basal ganglia / deep WM.
    for _ in range(int(rng.choice([0, 0, 0, 1, 1, 2, 3]))):
        c = _pick_voxel(_deep_candidates(terr, str(rng.choice(["LLS", "MLS", "PCTP", "DWM"])), str(rng.choice(["L", "R"]))), rng)
        if c is not None:
            r = blob(c, _radii_for_volume(float(rng.uniform(0.03, 0.5)), rng), rng, ragged=0.1)
            out.append(Distractor("old_lacune", r, np.clip(r.values * 1.2 - 0.2, 0, 1),
                                  {"gliosis_t2_ms": float(rng.uniform(120, 180)), "gliosis_adc": float(rng.uniform(1.3e-3, 2.0e-3))}))
    # T2 shine-through: a late-subacute lesion, bright on DWI from its long T2 but with a raised ADC.
    if rng.random() < (0.2 if not healthy else 0.3):
        prefix = str(rng.choice(CORTICAL_TERRITORIES + ("LLS",)))
        r = territorial_blob(terr, prefix, str(rng.choice(["L", "R"])), float(np.exp(rng.uniform(np.log(0.5), np.log(30.0)))), rng)
        if r is not None:
            out.append(Distractor("t2_shine_through", r, params={"t2_ms": float(rng.uniform(170, 320)),
                                                                 "adc_scale": float(rng.uniform(1.0, 1.35))}))
    if avoid is not None:
        keep_out = Region(avoid.slices, ndimage.binary_dilation(avoid.values > 0.05, iterations=3).astype(np.float32))
        for d in out:
            _subtract(d, keep_out)
    return [d for d in out if d.region.values.sum() > 1]


def _subtract(d: Distractor, keep_out: Region) -> None:
    a, b = d.region.slices, keep_out.slices
    lo = [max(x.start, y.start) for x, y in zip(a, b)]
    hi = [min(x.stop, y.stop) for x, y in zip(a, b)]
    if any(h <= l for l, h in zip(lo, hi)):
        return
    sa = tuple(slice(l - x.start, h - x.start) for l, h, x in zip(lo, hi, a))
    sb = tuple(slice(l - y.start, h - y.start) for l, h, y in zip(lo, hi, b))
    d.region.values[sa] *= 1.0 - keep_out.values[sb]
    if d.core is not None:
        d.core[sa] *= 1.0 - keep_out.values[sb]


def files_used(acute: AcuteLesions) -> list[str]:
    return [Path(f).name for f in acute.files]
