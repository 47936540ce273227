"""Structural MR phantoms: chronic stroke on T1 (ATLAS R2.0 setting) and sub-acute stroke on
T1/T2/FLAIR/DWI (ISLES'15 SISS setting), built on the DWI phantom's machinery (head model, pose,
lesion library and split, territories, distractors, signal maps, grids, noise, writing).

Chronic infarct ("t1"): the library lesion becomes an old infarct (Allen et al., RadioGraphics
  2012 32:1285, "Sequence-specific MR imaging findings that are useful in dating ischemic stroke"):
  tissue loss with a cavity of CSF signal on every sequence (encephalomalacia), a gliotic rim of a
  few mm (T1 mildly hypointense: T1 15-45% above the tissue's, T2 130-220 ms so FLAIR-bright),
  ex-vacuo enlargement of the adjacent lateral ventricle, and more global atrophy than the
  acute cohort. Truth = cavity + rim, as the ATLAS R2.0 annotators traced it on T1 (Liew et al.,
  Sci Data 2022 9:320).
Sub-acute infarct ("siss", days 1-14): vasogenic oedema, T2 prolonged 30-90% (bright on T2 and
  FLAIR), T1 mildly prolonged (follows the water content), ADC still reduced 5-45% before it
  pseudonormalises at ~1-2 weeks, so DWI stays bright (Lansberg et al., AJNR 2001 22:637; Schlaug
  et al., Neurology 1997 49:113; Allen 2012). All four contrasts on one grid, as ISLES'15 SISS
  distributes them (co-registered, 1 mm, skull-stripped; Maier et al., Med Image Anal 2017 35:250).

Sequences (tissue T1/T2/PD ranges: mr_signal.draw_tissue_params, Stanisz 2005, Wansapura 1999):
  MPRAGE  inversion-prepared FLASH (Mugler & Brookeman, MRM 1990 15:152; signal model of Deichmann
          et al., NeuroImage 2000 12:112): 3 T TR 1900-2500, TI 850-1100 ms, flip 7-10 deg, echo
          spacing 6-8 ms, 160-192 readouts (ADNI: Jack et al., JMRI 2008 27:685); 1.5 T TR
          2000-2700, TI 900-1100, flip 8-12, echo spacing 8-10 ms. Gives GM/WM ~0.65-0.7, CSF
          ~0.15-0.3 of WM.
  SE T1   TR 400-700, TE 8-20 ms (clinical thick-slice T1): GM/WM ~0.8, CSF ~0.3-0.4 of WM.
  T2 TSE  TR 3000-6000, TE 80-120 ms. FLAIR TR 8000-11000, TE 80-125, TI 2200-2800 ms.
  DWI     as the DWI phantom (b = 1000 s/mm^2), band-limited to a 2 x 2 x 5 mm acquisition.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ..image import Image
from . import acquisition as acqm
from .anatomy import HeadModel, head_model
from .cases import _SPLIT_CODE, PhantomCase, case_id_for, distractor_info, lesion_info, lesion_on_grid
from .lesions import PATTERNS, AcuteLesions, Distractor, _deep_masks, heterogeneity, make_acute, make_distractors
from .library import Region, lesion_sources
from .mr_signal import B_VALUE, Contrast, TissueParams, draw_tissue_params, signal_maps

STRUCTURAL_VERSION = "structural-1.0"
STRUCTURAL_MODALITIES = ("t1", "siss")
STAGES = {"t1": "chronic", "siss": "subacute"}
_STREAMS = ("anatomy", "lesion", "distractor", "acquisition", "signal", "noise")
# Chronic cohorts (ATLAS) are mostly territorial and subcortical infarcts; no healthy controls there,
# a few here so that models also learn "no lesion".
PATTERN_P = {"t1": (0.55, 0.3, 0.12, 0.03), "siss": (0.6, 0.2, 0.17, 0.03)}
# Distractors that never carry the truth's label in that setting: chronic T1 truth is every old
# infarct, so only WMH remain; SISS labels the sub-acute lesion, so older infarcts stay unlabelled.
KEEP_DISTRACTORS = {"t1": ("wmh",), "siss": ("wmh", "old_infarct", "old_lacune")}
OVERRIDES = {"grid", "lesion_pattern", "spacing", "size", "thickness", "tilt_deg", "distractors", "snr",
             "field_strength", "atlas", "sequence", "skull_strip", "deface", "ex_vacuo", "contrasts"}


@dataclass
class MPRAGE(Contrast):
    """Magnetisation-prepared rapid gradient echo: inversion, then a FLASH readout train of
    ``n_readout`` pulses (flip, echo spacing) centred at TI, then recovery to TR; the signal is the
    steady-state longitudinal magnetisation at the k-space centre (linear ordering)."""

    flip_deg: float = 9.0
    echo_spacing: float = 7.0
    n_readout: int = 176

    def __call__(self, pd, t1, t2, adc):
        a = np.deg2rad(self.flip_deg)
        t1 = np.asarray(t1, dtype=np.float64)
        e1 = np.exp(-self.echo_spacing / t1)
        ec = e1 * np.cos(a)
        m_inf = (1 - e1) / (1 - ec)  # driven equilibrium during the train
        half = self.n_readout // 2
        t_a = max(self.ti - half * self.echo_spacing, 1.0)
        t_d = max(self.tr - self.ti - (self.n_readout - half) * self.echo_spacing, 0.0)
        m = np.ones_like(t1)
        for _ in range(12):  # fixed point of the TR cycle: converges in a few cycles (E^TR << 1)
            mz = 1 - (1 + m) * np.exp(-t_a / t1)
            mc = m_inf + (mz - m_inf) * ec**half
            me = m_inf + (mc - m_inf) * ec ** (self.n_readout - half)
            m = 1 - (1 - me) * np.exp(-t_d / t1)
        s = pd * np.abs(mc) * np.sin(a) * np.exp(-self.te / np.asarray(t2, dtype=np.float64))
        return s.astype(np.float32) if isinstance(s, np.ndarray) else float(s)


def _streams(seed: int, split: str | None, modality: str) -> dict[str, np.random.Generator]:
    if split not in _SPLIT_CODE:
        raise ValueError(f"split must be one of 'train', 'val', 'test' or None, got {split!r}")
    ss = np.random.SeedSequence([int(seed), _SPLIT_CODE[split], 0x57C7, STRUCTURAL_MODALITIES.index(modality)])
    return {name: np.random.default_rng(child) for name, child in zip(_STREAMS, ss.spawn(len(_STREAMS)))}


# -- chronic lesion: cavity, gliotic rim, ex-vacuo ventricle ---------------------------------------


def chronic_lesion(region: Region, rng: np.random.Generator) -> tuple[Distractor, dict]:
    """Split a lesion into a CSF cavity and a gliotic rim of ``rim_mm`` (thinner in small lesions)."""
    inside = region.values > 0.5
    depth = ndimage.distance_transform_edt(inside).astype(np.float32)  # mm to the lesion edge
    rim_mm = float(rng.uniform(1.5, 3.5))
    # Some small infarcts heal as a gliotic scar without a cavity (and a sliver has no interior).
    cavitated = bool(rng.random() < 0.9) and bool(inside.any())
    rim_eff = min(rim_mm, 0.6 * float(depth.max())) if cavitated else np.inf
    core = np.clip(depth - rim_eff + 0.5, 0, 1) * region.values if cavitated else np.zeros_like(region.values)
    params = {"gliosis_t1_scale": float(rng.uniform(1.15, 1.45)), "gliosis_t2_ms": float(rng.uniform(130, 220)),
              "gliosis_adc": float(rng.uniform(1.1e-3, 1.6e-3))}
    info = {"rim_mm": round(rim_mm, 3), "cavitated": cavitated,
            "cavity_volume_ml_1mm": round(float(core.sum()) / 1000.0, 4), **{k: round(v, 6) for k, v in params.items()}}
    return Distractor("old_infarct", region, core.astype(np.float32), params), info


def _side_of(region: Region, head: HeadModel) -> float:
    """+1 when most of the lesion is on the left (LPS x > 0), -1 on the right."""
    x_idx = np.arange(region.slices[2].start, region.slices[2].stop)
    x = head.grid.index_to_physical(np.stack([x_idx, 0 * x_idx, 0 * x_idx], 1).astype(float))[:, 0]
    per_x = region.values.sum(axis=(0, 1))
    return 1.0 if per_x[x > 0].sum() >= per_x[x < 0].sum() else -1.0


def ex_vacuo(region: Region, head: HeadModel, rng: np.random.Generator) -> tuple[Region | None, float]:
    """Enlarge the lateral ventricle on the lesion's side towards the lesion: parenchyma within
    ``growth(p)`` mm of the ventricle becomes CSF, where growth falls from its maximum next to
    the lesion to zero 40 mm away and scales with the lesion's size (cube root of its volume)."""
    grow_max = float(np.clip(0.9 * region.volume_ml ** (1 / 3), 1.0, 7.0) * rng.uniform(0.6, 1.3))
    g = head.grid
    vent = _deep_masks()["vent"]
    side = _side_of(region, head)
    xs = g.index_to_physical(np.stack([np.arange(g.shape[2]), np.zeros(g.shape[2]), np.zeros(g.shape[2])], 1))[:, 0]
    zs = g.index_to_physical(np.stack([np.zeros(g.shape[0]), np.zeros(g.shape[0]), np.arange(g.shape[0])], 1))[:, 2]
    lateral = np.broadcast_to((side * xs > 3.0)[None, None, :] & (zs > -10.0)[:, None, None], g.shape)  # not 3rd/4th
    objs = ndimage.find_objects((vent & lateral).astype(np.uint8))
    if not objs or objs[0] is None:
        return None, 0.0
    margin = int(np.ceil(grow_max)) + 2
    lo = [min(a.start, b.start) - margin for a, b in zip(objs[0], region.slices)]
    hi = [max(a.stop, b.stop) + margin for a, b in zip(objs[0], region.slices)]
    box = tuple(slice(max(a, 0), min(b, n)) for a, b, n in zip(lo, hi, g.shape))
    v = vent[box] & lateral[box]
    les = np.zeros(v.shape, bool)
    sub = tuple(slice(r.start - b.start, r.stop - b.start) for r, b in zip(region.slices, box))
    les[sub] = region.values > 0.25
    # Distances at 2 mm (smooth fields; enough for a growth of a few mm), upsampled.
    d_v = ndimage.distance_transform_edt(~v[::2, ::2, ::2], sampling=2.0).astype(np.float32)
    d_l = ndimage.distance_transform_edt(~les[::2, ::2, ::2], sampling=2.0).astype(np.float32)
    d_v = acqm.upsample_linear(d_v, 2, v.shape)
    d_l = acqm.upsample_linear(d_l, 2, v.shape)
    growth = grow_max * np.clip(1.0 - d_l / 40.0, 0.0, 1.0)
    frac = np.clip(growth - d_v + 0.5, 0.0, 1.0) * (~v)
    frac *= 1.0 - np.clip(les.astype(np.float32), 0, 1)
    tissue = head.gm[box] + head.wm[box]
    vol = float((frac * tissue).sum()) / 1000.0
    return (Region(box, frac.astype(np.float32)) if vol > 0 else None), vol


def scanner_volume_ml(region: Region | None, pose: acqm.SubjectPose) -> float:
    """Volume (mL) of a template-space region in the subject, through the whole pose (scaling and
    the smooth, atrophy-driven deformation): its partial-volume fractions summed on a 1 mm grid."""
    if region is None:
        return 0.0
    head = head_model()
    sl = region.slices
    corners = np.array([[x, y, z] for x in (sl[2].start, sl[2].stop) for y in (sl[1].start, sl[1].stop)
                        for z in (sl[0].start, sl[0].stop)], float)
    pts = pose.to_scanner(head.grid.index_to_physical(corners))
    lo = pts.min(0) - pose.max_disp_mm - 3.0
    size = np.ceil(pts.max(0) + pose.max_disp_mm + 3.0 - lo).astype(int) + 1
    ref = Image(np.zeros(tuple(size[::-1]), np.uint8), (1.0, 1.0, 1.0), tuple(lo), tuple(np.eye(3).ravel()))
    return float(lesion_on_grid(region, pose, ref, 1.0).sum(dtype=np.float64)) / 1000.0


# -- skull stripping / defacing masks -----------------------------------------------------------


@lru_cache(maxsize=1)
def _face_mask() -> np.ndarray:
    """Template voxels a defacing tool removes: outside the intracranial volume (+4 mm) and in
    front of / below the plane through MNI (y=20, z=-80) and (y=90, z=20) (face, jaw, nose)."""
    h = head_model()
    g = h.grid
    ys = g.index_to_physical(np.stack([np.zeros(g.shape[1]), np.arange(g.shape[1]), np.zeros(g.shape[1])], 1))[:, 1]
    zs = g.index_to_physical(np.stack([np.zeros(g.shape[0]), np.zeros(g.shape[0]), np.arange(g.shape[0])], 1))[:, 2]
    y_mni = -ys  # LPS y = -MNI y
    below = zs[:, None] < -80.0 + (y_mni[None, :] - 20.0) * (100.0 / 70.0)
    keep = ndimage.binary_dilation(h.icv[::2, ::2, ::2] > 0, iterations=2)
    keep = acqm.upsample_linear(keep.astype(np.float32), 2, g.shape) > 0.5
    return (below[:, :, None] & ~keep).astype(np.float32)


# -- sequences ----------------------------------------------------------------------------------


def draw_sequences(rs: np.random.Generator, tp: TissueParams, keys: tuple[str, ...], t1_kind: str) -> dict[str, Contrast]:
    """Sequence timings of each contrast (ranges in the module docstring)."""
    hi = tp.field_t > 2.0
    out: dict[str, Contrast] = {}
    if t1_kind == "mprage":
        out["t1"] = MPRAGE("mprage", te=float(rs.uniform(2.5, 4.0)),
                           tr=float(rs.uniform(1900, 2500) if hi else rs.uniform(2000, 2700)),
                           ti=float(rs.uniform(850, 1100) if hi else rs.uniform(900, 1100)),
                           flip_deg=float(rs.uniform(7, 10) if hi else rs.uniform(8, 12)),
                           echo_spacing=float(rs.uniform(6, 8) if hi else rs.uniform(8, 10)),
                           n_readout=int(rs.integers(160, 193)))
    else:
        out["t1"] = Contrast("se_t1", te=float(rs.uniform(8, 20)), tr=float(rs.uniform(400, 700)))
    # Drawn in a fixed order whether or not used, so adding a contrast changes no other draw.
    t2 = Contrast("t2", te=float(rs.uniform(80, 120)), tr=float(rs.uniform(3000, 6000)))
    fl = Contrast("flair", te=float(rs.uniform(80, 125)), tr=float(rs.uniform(8000, 11000)), ti=float(rs.uniform(2200, 2800)))
    te_dwi = float(rs.uniform(60, 95) if hi else rs.uniform(80, 110))
    tr_dwi = float(rs.uniform(3000, 8000))
    if "t2" in keys:
        out["t2"] = t2
    if "flair" in keys:
        out["flair"] = fl
    if "dwi" in keys:
        out["b0"] = Contrast("b0", te_dwi, tr_dwi, fat_factor=tp.fat_sat)  # EPI is fat-suppressed
        out["dwi"] = Contrast("dwi", te_dwi, tr_dwi, b=B_VALUE, fat_factor=tp.fat_sat)
    return out


def _contrast_info(c: Contrast) -> dict:
    d = {"sequence": c.kind, "te_ms": round(c.te, 2), "tr_ms": round(c.tr, 1)}
    if c.ti:
        d["ti_ms"] = round(c.ti, 1)
    if isinstance(c, MPRAGE):
        d.update(flip_deg=round(c.flip_deg, 2), echo_spacing_ms=round(c.echo_spacing, 3), readouts=c.n_readout)
    if c.b:
        d["b_value"] = c.b
    return d


def _wm_signal(c: Contrast, tp: TissueParams) -> float:
    return float(c(tp.pd["wm"], tp.t1["wm"], tp.t2["wm"], tp.adc["wm"]))


# -- the simulation -------------------------------------------------------------------------------


def simulate_structural(modality: str, seed: int, lesion_library: str | Path | None = None, split: str | None = None,
                        **overrides: Any) -> PhantomCase:
    """One structural examination, deterministic per (modality, seed, split).

    ``modality``: "t1" (chronic infarct on T1; ``contrasts`` may add "flair" and "t2" on the same
    grid) or "siss" (sub-acute infarct; t1, t2, flair and dwi on one grid). Overrides: ``grid``
    ("iso": 1 mm isotropic 3D, or ``spacing``; "clinical": oblique thick-slice 2D),
    ``lesion_pattern``, ``spacing``, ``size``, ``thickness``, ``tilt_deg``, ``distractors``
    (bool), ``snr`` (white-matter SNR), ``field_strength`` (1.5 | 3.0), ``atlas``, ``sequence``
    ("mprage" | "se": the T1 contrast), ``skull_strip`` (bool), ``deface`` (bool), ``ex_vacuo``
    (bool, chronic only), ``contrasts`` (t1 only: extra keys among "flair", "t2").
    """
    if modality not in STRUCTURAL_MODALITIES:
        raise ValueError(f"structural phantom modality must be one of {STRUCTURAL_MODALITIES}, got {modality!r}")
    unknown = set(overrides) - OVERRIDES
    if unknown:
        raise TypeError(f"simulate_structural got unknown overrides: {sorted(unknown)}")
    stage = STAGES[modality]
    if modality == "siss":
        keys: tuple[str, ...] = ("t1", "t2", "flair", "dwi")
    else:
        extra = tuple(overrides.get("contrasts") or ())
        bad = [k for k in extra if k not in ("flair", "t2")]
        if bad:
            raise ValueError(f"contrasts for t1 phantoms may add 'flair' and 't2', not {bad}")
        keys = ("t1",) + tuple(k for k in ("t2", "flair") if k in extra)
    rng = _streams(seed, split, modality)
    library, terr = lesion_sources(lesion_library, overrides.get("atlas"))
    head = head_model()

    # Subject: chronic stroke patients carry more global atrophy (older, and post-stroke loss).
    ra = rng["anatomy"]
    atrophy = float(ra.uniform(0.15, 0.75) if stage == "chronic" else ra.uniform(0.0, 0.6))
    pose = acqm.draw_pose(head, ra, atrophy)

    # Lesion (truth) and its stage-specific tissue changes.
    rl = rng["lesion"]
    pattern = overrides.get("lesion_pattern") or str(rl.choice(PATTERNS, p=PATTERN_P[modality]))
    if pattern not in PATTERNS:
        raise ValueError(f"lesion_pattern must be one of {PATTERNS}, got {pattern!r}")
    acute: AcuteLesions = make_acute(pattern, terr, rl, library, split, atrophy)
    lesion_changes: list[Distractor] = []
    stage_info: dict[str, Any] = {"stage": stage}
    signal_lesion = AcuteLesions(None, None, None, "none", 0)
    if acute.region is not None and stage == "chronic":
        chronic, cinfo = chronic_lesion(acute.region, rl)
        lesion_changes.append(chronic)
        vent, vent_ml = ex_vacuo(acute.region, head, rl)
        use_vent = bool(overrides.get("ex_vacuo", True)) and vent is not None
        if use_vent:
            lesion_changes.append(Distractor("ex_vacuo", vent))
        # Parenchyma turned CSF (template mL x head size; the smooth deformation is not counted).
        stage_info.update(cinfo, ventricle_enlargement_ml=round(vent_ml * pose.volume_factor if use_vent else 0.0, 4))
    elif acute.region is not None:
        # Sub-acute: ADC recovering (reduction 5-45%), T2 prolonged 30-90% by vasogenic oedema.
        red = float(rl.uniform(0.05, 0.45))
        t2p = float(rl.uniform(0.3, 0.9))
        acute.adc_scale, acute.t2_scale = heterogeneity(acute.region, red, t2p, rl)
        acute.adc_reduction = [red]
        signal_lesion = acute
        stage_info.update(adc_reduction=round(red, 4), t2_prolongation=round(t2p, 4))
    distractors = []
    if overrides.get("distractors", True):
        distractors = [d for d in make_distractors(terr, rng["distractor"], acute.region, healthy=acute.region is None)
                       if d.kind in KEEP_DISTRACTORS[modality]]

    # Scanner, sequences and tissue properties.
    rs = rng["signal"]
    field_drawn = float(rs.choice([1.5, 3.0]))
    field_t = float(overrides.get("field_strength") or field_drawn)
    tp = draw_tissue_params(rs, field_t)
    texture = (float(rs.uniform(0.01, 0.04)), float(rs.uniform(0.01, 0.03)))
    racq = rng["acquisition"]
    # Every draw happens whether or not an override replaces it, so overrides change nothing else.
    grid_drawn = "iso" if racq.random() < (0.55 if modality == "t1" else 0.6) else "clinical"
    grid = overrides.get("grid") or grid_drawn
    if grid not in ("iso", "clinical"):
        raise ValueError(f"grid must be 'iso' or 'clinical', got {grid!r}")
    # 3D acquisitions are MPRAGE; thick-slice clinical T1 is mostly spin echo.
    se_drawn = rs.random() >= 0.3
    t1_kind = overrides.get("sequence") or ("se" if grid == "clinical" and se_drawn else "mprage")
    if t1_kind not in ("mprage", "se"):
        raise ValueError(f"sequence must be 'mprage' or 'se', got {t1_kind!r}")
    contrasts = draw_sequences(rs, tp, keys, t1_kind)

    # Acquisition grid (shared by every contrast: co-registered, as ATLAS/SISS distribute them).
    spacing = overrides.get("spacing") or ((1.0, 1.0, 1.0) if grid == "iso" else None)
    acq = acqm.draw_acquisition(pose, racq, grid, spacing, overrides.get("size"), overrides.get("thickness"),
                                overrides.get("tilt_deg"), "t1")
    ref_acq, ref = acq.reference(recon=False), acq.reference(recon=True)
    three_d = grid == "iso"
    if three_d:  # 3D acquisition: no slice profile, a point spread of ~0.3 voxel in every direction
        offsets, weights, blur_z = np.zeros(1), np.ones(1), 0.3 * acq.thickness
    else:
        offsets, weights, blur_z = acqm.slice_profile(acq.thickness)
    crop = acqm.template_crop(head, pose, ref_acq, float(np.abs(offsets).max()) + 1.0)
    names = list(contrasts)
    maps = signal_maps(head, crop, tp, [contrasts[k] for k in names], signal_lesion, distractors + lesion_changes,
                       atrophy, texture)
    sxy = 0.3 * acq.acq_spacing[0]
    for i, k in enumerate(names):
        # DWI (b0, b1000) is acquired at ~2 x 2 x 5 mm and resampled onto the structural grid.
        sig = (max(blur_z, 0.42 * 5.0), max(sxy, 0.84), max(sxy, 0.84)) if k in ("b0", "dwi") else (blur_z, sxy, sxy)
        maps[i] = ndimage.gaussian_filter(maps[i], sig, truncate=2.5)
    skull_strip = bool(overrides.get("skull_strip", rs.random() < (0.5 if modality == "t1" else 1.0)))
    deface = bool(overrides.get("deface", rs.random() < 0.5)) and not skull_strip
    masks = []
    if skull_strip:
        masks.append(head.icv[crop].astype(np.float32))
    if deface:
        masks.append(_face_mask()[crop])
    signals = dict(zip(names, acqm.sample_on_grid(maps, crop, head, pose, ref_acq, offsets, weights)))
    del maps
    # Masks apply to the reconstructed images (the acquired matrix may be zero-filled to a finer one).
    masks = acqm.sample_on_grid(masks, crop, head, pose, ref, np.zeros(1), np.ones(1)) if masks else []
    brain_mask = masks[0] >= 0.5 if skull_strip else None
    face = masks[-1] >= 0.5 if deface else None

    # Receive bias, scanner scaling, noise and reconstruction per series.
    rn = rng["noise"]
    images: dict[str, Image] = {}
    acq_info: dict[str, Any] = {}
    bias_strength = (0.1, 0.3) if field_t > 2 else (0.05, 0.15)
    vox = float(np.prod(acq.acq_spacing[:2]) * acq.thickness)
    b0_gain = b0_sigma = b0_level = b0_snr = None
    for k in names:
        c = contrasts[k]
        if k == "dwi":  # the b1000 trace shares its b0's coil field, scaling and noise
            s = signals[k] * b0_gain
            level, snr, sigma = b0_level, b0_snr, b0_sigma
        else:
            gain = acqm.bias_field(signals[k].shape, rn, float(rn.uniform(*bias_strength)))
            level = float(rn.uniform(200, 2000))  # scanner scaling of white matter
            gain *= np.float32(level / _wm_signal(c, tp))
            s = signals[k] * gain
            # White-matter SNR of a 1 mm^3 voxel 15-35, growing with the square root of voxel volume.
            snr = float(overrides.get("snr") or np.clip(rn.uniform(15, 35) * vox**0.5, 10, 120))
            sigma = level / snr
            if k == "b0":
                b0_gain, b0_sigma, b0_level, b0_snr = gain, sigma, level, snr
        img = acqm.reconstruct(s, sigma, acq, rn, 0.0)
        if brain_mask is not None:
            img *= brain_mask
        if face is not None:
            img[face] = 0.0
        images[k] = ref.with_array(np.clip(np.round(img), 0, 32767).astype(np.int16))
        acq_info[k] = {**_contrast_info(c), "snr_wm": round(snr, 2), "scale_wm": round(level, 1)}
    images.pop("b0", None)  # SISS provides the trace DWI only
    acq_info.pop("b0", None)

    frac = lesion_on_grid(acute.region, pose, ref, acq.thickness)
    mask = (frac >= 0.5).astype(np.uint8)
    lesion = ref.with_array(mask)
    total_1mm = scanner_volume_ml(acute.region, pose)
    info = {
        "case_id": case_id_for(seed, split, modality),
        "modality": modality,
        "inputs": list(images),
        "generator": "strokeseg.phantom",
        "generator_version": STRUCTURAL_VERSION,
        "seed": int(seed),
        "split": split,
        "lesion_library": library,
        **lesion_info(acute, mask, ref, total_1mm, terr, pose),
        **stage_info,
        "distractors": distractor_info(distractors, pose),
        "subject": pose.info,
        "tissue": tp.as_dict(),
        "acquisition": {**acq.as_dict(), "grid": grid, "three_d": three_d, "field_strength_t": field_t,
                        "skull_stripped": skull_strip, "defaced": deface, "series": acq_info},
    }
    for im in images.values():
        im.meta.clear()
    return PhantomCase(info["case_id"], images, lesion, info)


def simulate_t1(seed: int, lesion_library: str | Path | None = None, split: str | None = None, **overrides: Any) -> PhantomCase:
    """A chronic-stroke T1 examination (ATLAS R2.0 setting); see :func:`simulate_structural`."""
    return simulate_structural("t1", seed, lesion_library, split, **overrides)


def simulate_siss(seed: int, lesion_library: str | Path | None = None, split: str | None = None, **overrides: Any) -> PhantomCase:
    """A sub-acute stroke T1/T2/FLAIR/DWI examination (ISLES'15 SISS setting)."""
    return simulate_structural("siss", seed, lesion_library, split, **overrides)


__all__ = ["MPRAGE", "STRUCTURAL_MODALITIES", "STRUCTURAL_VERSION", "chronic_lesion", "ex_vacuo", "simulate_siss",
           "simulate_structural", "simulate_t1"]
