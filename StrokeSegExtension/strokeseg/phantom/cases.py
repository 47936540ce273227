"""Simulated acute-stroke DWI patients: one call = one case (b0, DWI, ADC, optional FLAIR, truth)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cc3d
import numpy as np
from scipy import ndimage
from ..image import Image
from ..io import write_image, write_text
from . import acquisition as acqm
from .anatomy import head_model, mni_to_lps
from .lesions import PATTERN_P, PATTERNS, AcuteLesions, make_acute, make_distractors
from .library import Region, label_volumes, lesion_sources
from .mr_signal import B_VALUE, Contrast, draw_tissue_params, signal_maps

GENERATOR_VERSION = "dwi-1.2"
MODALITIES = ("dwi",)
_SPLIT_CODE = {None: 0, "train": 1, "val": 2, "test": 3}
_STREAMS = ("anatomy", "lesion", "distractor", "acquisition", "signal", "noise", "flair")


@dataclass
class PhantomCase:
    case_id: str
    images: dict[str, Image]  # "dwi", "b0", "adc" (+ "flair")
    lesion: Image  # uint8 on images["dwi"]'s grid
    info: dict  # what goes into case.json


def case_id_for(seed: int, split: str | None, modality: str = "dwi") -> str:
    return f"{modality}-{seed:05d}" if split is None else f"{modality}-{split}-{seed:05d}"


def _streams(seed: int, split: str | None) -> dict[str, np.random.Generator]:
    if split not in _SPLIT_CODE:
        raise ValueError(f"split must be one of 'train', 'val', 'test' or None, got {split!r}")
    # Each split gets its own seed space, and each part of the simulation its own stream, so that
    # e.g. switching distractors off leaves the lesion and the grid unchanged.
    ss = np.random.SeedSequence([int(seed), _SPLIT_CODE[split], 0x5712])
    return {name: np.random.default_rng(child) for name, child in zip(_STREAMS, ss.spawn(len(_STREAMS)))}


def lesion_on_grid(region: Region | None, pose: acqm.SubjectPose, ref: Image, thickness: float) -> np.ndarray:
    """Partial-volume fraction of each voxel of ``ref`` covered by the 1 mm truth (sub-sampled in
    plane and through the nominal slice thickness), computed only around the lesion."""
    frac = np.zeros(ref.array.shape, np.float32)
    if region is None:
        return frac
    head = head_model()
    sl = region.slices
    corners = np.array([[x, y, z] for x in (sl[2].start, sl[2].stop) for y in (sl[1].start, sl[1].stop)
                        for z in (sl[0].start, sl[0].stop)], float)
    pts = pose.to_scanner(head.grid.index_to_physical(corners))
    idx = ref.physical_to_index(pts)
    margin = (pose.max_disp_mm + 2.0) / np.asarray(ref.spacing) + 1
    lo = np.maximum(np.floor(idx.min(0) - margin).astype(int), 0)
    hi = np.minimum(np.ceil(idx.max(0) + margin).astype(int) + 1, np.array(ref.size))
    if np.any(hi <= lo):
        return frac
    ns = [2 if s > 1.3 else 1 for s in ref.spacing[:2]]
    nzs = int(max(3, np.ceil(thickness / 1.0)))
    sub_sp = (ref.spacing[0] / ns[0], ref.spacing[1] / ns[1], ref.spacing[2])
    size = ((hi[0] - lo[0]) * ns[0], (hi[1] - lo[1]) * ns[1], hi[2] - lo[2])
    first = np.array([lo[0] - 0.5 + 0.5 / ns[0], lo[1] - 0.5 + 0.5 / ns[1], lo[2]], float)
    origin = ref.index_to_physical(first[None])[0]
    sub = Image(np.zeros(size[::-1], np.uint8), sub_sp, tuple(origin), ref.direction)
    offsets = (np.arange(nzs) + 0.5) / nzs * thickness - thickness / 2
    weights = np.full(nzs, 1.0 / nzs)
    (acc,) = acqm.sample_on_grid([region.values], sl, head, pose, sub, offsets, weights)
    acc = acc.reshape(size[2], size[1] // ns[1], ns[1], size[0] // ns[0], ns[0]).mean(axis=(2, 4))
    frac[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] = acc
    return frac


def territory_summary(region: Region | None, terr) -> tuple[list[str], dict[str, float]]:
    """Arterial territories a lesion lies in: (names holding >= 5% of it, largest first; mL per
    territory at template scale). Ventricle labels of the atlas are not arterial territories."""
    terr_ml = label_volumes(region, terr) if region is not None else {}
    terr_ml = {k: v for k, v in terr_ml.items() if "ventricle" not in k}
    named = sorted((k for k, v in terr_ml.items() if v >= max(0.02, 0.05 * sum(terr_ml.values()))),
                   key=lambda k: -terr_ml[k])
    return named, terr_ml


def lesion_info(acute, mask: np.ndarray, ref: Image, total_1mm: float, terr, pose) -> dict[str, Any]:
    """case.json's lesion fields (shapes used, volumes on the acquired grid and at 1 mm, counts,
    territories, hemispheres), shared by every phantom made from the lesion library."""
    named, terr_ml = territory_summary(acute.region, terr)
    return {
        "library_files": list(acute.files),
        "library_files_flipped_lr": list(acute.flipped),
        "lesion_source": acute.source if acute.region is not None else "none",
        "pattern": acute.pattern if acute.region is not None else "none",
        "lesion_volume_ml": round(float(mask.sum()) * ref.voxel_volume_ml, 4),
        "lesion_volume_ml_1mm": round(float(total_1mm), 4),
        "n_lesions": int(cc3d.connected_components(mask, connectivity=26, return_N=True)[1]) if mask.any() else 0,
        "n_lesions_1mm": int(acute.components),
        "territories": named,
        "territory_volumes_ml": {k: round(v * pose.volume_factor, 4) for k, v in terr_ml.items()},
        "territory_atlas": terr.source,
        "hemispheres": _hemispheres(acute.region),
    }


def distractor_info(distractors, pose) -> list[dict[str, Any]]:
    """case.json's description of the non-acute look-alikes (kind, volume in mL, parameters)."""
    return [{"kind": d.kind, "volume_ml": round(d.region.volume_ml * pose.volume_factor, 3),
             **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.params.items()}} for d in distractors]


def _hemispheres(region: Region | None) -> list[str]:
    if region is None:
        return []
    head = head_model()
    x_idx = np.arange(region.slices[2].start, region.slices[2].stop)
    x_lps = head.grid.index_to_physical(np.stack([x_idx, np.zeros_like(x_idx), np.zeros_like(x_idx)], 1).astype(float))[:, 0]
    per_x = region.values.sum(axis=(0, 1))
    left, right = float(per_x[x_lps > 0].sum()), float(per_x[x_lps < 0].sum())
    tot = left + right
    out = []
    if left > 0.05 * tot:
        out.append("left")
    if right > 0.05 * tot:
        out.append("right")
    return out


def _float_list(a) -> list[float]:
    return [round(float(v), 5) for v in a]


def simulate_dwi(seed: int, lesion_library: str | Path | None = None, split: str | None = None, flair: bool = False,
                 **overrides: Any) -> PhantomCase:
    """One simulated acute-stroke DWI examination (deterministic per ``seed`` and ``split``).

    Overrides: ``grid`` ("clinical" | "iso"), ``lesion_pattern`` (territorial | lacunar | embolic |
    none), ``spacing`` (x, y, z mm of the reconstructed grid), ``size`` (x, y, z voxels),
    ``thickness`` (mm), ``tilt_deg``, ``distractors`` (bool), ``artefacts`` (bool: susceptibility,
    ghost), ``snr`` (b0 white-matter SNR at the acquired resolution), ``field_strength`` (1.5 | 3.0),
    ``atlas`` (path of the arterial territory atlas; False = the procedural territory map that
    is used anyway when the atlas is not on this machine).
    """
    known = {"grid", "lesion_pattern", "spacing", "size", "thickness", "tilt_deg", "distractors", "artefacts",
             "snr", "field_strength", "atlas"}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"simulate_dwi got unknown overrides: {sorted(unknown)}")
    rng = _streams(seed, split)
    library, terr = lesion_sources(lesion_library, overrides.get("atlas"))
    head = head_model()

    # Subject: anatomy variation.
    ra = rng["anatomy"]
    atrophy = float(ra.uniform(0.0, 0.6) if ra.random() < 0.8 else ra.uniform(0.6, 1.0))
    pose = acqm.draw_pose(head, ra, atrophy)

    # Lesions (truth) and distractors (not truth), each from its own stream.
    rl = rng["lesion"]
    pattern = overrides.get("lesion_pattern") or str(rl.choice(PATTERNS, p=PATTERN_P))
    if pattern not in PATTERNS:
        raise ValueError(f"lesion_pattern must be one of {PATTERNS}, got {pattern!r}")
    acute: AcuteLesions = make_acute(pattern, terr, rl, library, split, atrophy)
    distractors = make_distractors(terr, rng["distractor"], acute.region, healthy=acute.region is None) \
        if overrides.get("distractors", True) else []

    # Sequence and tissue properties.
    rs = rng["signal"]
    field_t = float(overrides.get("field_strength") or rs.choice([1.5, 3.0]))
    tp = draw_tissue_params(rs, field_t)
    te = float(rs.uniform(60, 95) if field_t > 2 else rs.uniform(80, 110))
    tr = float(rs.uniform(3000, 8000))
    texture = (float(rs.uniform(0.01, 0.04)), float(rs.uniform(0.01, 0.03)))

    # Acquisition grid.
    racq = rng["acquisition"]
    acq = acqm.draw_acquisition(pose, racq, overrides.get("grid", "clinical"), overrides.get("spacing"),
                                overrides.get("size"), overrides.get("thickness"), overrides.get("tilt_deg"), "dwi")
    ref_acq = acq.reference(recon=False)
    ref = acq.reference(recon=True)
    # Coverage: does the slice stack reach the vertex / the cerebellar floor (partial FOV)?
    landmarks = pose.to_scanner(mni_to_lps(np.array([[0.0, -25.0, 72.0], [0.0, -60.0, -52.0]])))
    kz = ref.physical_to_index(landmarks)[:, 2]
    coverage = {"vertex": bool(-0.5 <= kz[0] <= acq.n_slices - 0.5), "cerebellum": bool(-0.5 <= kz[1] <= acq.n_slices - 0.5)}
    offsets, weights, blur = acqm.slice_profile(acq.thickness)
    crop = acqm.template_crop(head, pose, ref_acq, float(np.abs(offsets).max()))

    # Noise-free signals -> acquired grid (slice profile) -> artefacts -> noise -> reconstruction.
    c_b0 = Contrast("b0", te, tr, fat_factor=tp.fat_sat)
    c_dwi = Contrast("dwi", te, tr, b=B_VALUE, fat_factor=tp.fat_sat)
    maps = signal_maps(head, crop, tp, [c_b0, c_dwi], acute, distractors, atrophy, texture)
    # Band-limit before sampling: through-plane part of the slice profile, and the in-plane point
    # spread of a k-space acquisition at the acquired resolution (template axes ~ scanner axes).
    sxy = 0.3 * acq.acq_spacing[0]
    maps = [ndimage.gaussian_filter(m, (blur, sxy, sxy), truncate=2.5) for m in maps]
    s0, sb = acqm.sample_on_grid(maps, crop, head, pose, ref_acq, offsets, weights)
    del maps
    rn = rng["noise"]
    artefacts = bool(overrides.get("artefacts", True))
    art_info: dict[str, Any] = {}
    if artefacts:
        (s0, sb), art_info = acqm.epi_distortion([s0, sb], ref_acq, acq, pose, field_t, rn, head.air_pockets)
    bias = acqm.bias_field(s0.shape, rn, float(rn.uniform(0.05, 0.2)))
    wm_b0 = float(c_b0(tp.pd["wm"], tp.t1["wm"], tp.t2["wm"], tp.adc["wm"]))
    level = float(rn.uniform(250, 1200))  # scanner scaling of white matter on b0
    gain = level / wm_b0
    s0 *= bias * gain
    sb *= bias * gain
    vox = float(np.prod(acq.acq_spacing[:2]) * acq.thickness)
    snr = float(overrides.get("snr") or np.clip(rn.uniform(18, 45) * (vox / 16.0) ** 0.7, 8, 90))
    sigma = level / snr
    nex = int(rn.choice([1, 2, 2, 3, 4]))
    ghost = float(rn.uniform(0.0, 0.03)) if artefacts else 0.0
    t2s = float(rn.uniform(0.1, 0.6))
    b0 = acqm.reconstruct(s0, sigma, acq, rn, ghost, t2s)
    # Trace image = geometric mean of three orthogonal directions, each a magnitude average of NEX
    # (so its Rician noise floor is that of one direction). Eddy currents / motion shift each
    # direction a little against b0: the edge artefacts of real ADC maps.
    eddy = float(rn.uniform(0.05, 0.4)) if rn.random() < 0.5 else 0.0
    pe_ax = 0 if acq.pe_axis == 1 else 1
    log_dwi = np.zeros_like(b0)
    for _ in range(3):
        shift = [0.0, 0.0]
        shift[pe_ax] = float(rn.normal(0, eddy))  # eddy-current shift is mostly along PE
        shift[1 - pe_ax] = float(rn.normal(0, 0.3 * eddy))
        d = acqm.reconstruct(sb, sigma / np.sqrt(nex), acq, rn, ghost, t2s, tuple(shift))
        log_dwi += np.log(np.maximum(d, 1e-3))
    dwi = np.exp(log_dwi / 3.0)
    adc = acqm.adc_map(b0, dwi, B_VALUE, threshold=max(5.0 * sigma, 0.15 * level))

    images = {
        "b0": ref.with_array(np.clip(np.round(b0), 0, 32767).astype(np.int16)),
        "dwi": ref.with_array(np.clip(np.round(dwi), 0, 32767).astype(np.int16)),
        "adc": ref.with_array(np.round(adc).astype(np.int16)),
    }
    frac = lesion_on_grid(acute.region, pose, ref, acq.thickness)
    mask = (frac >= 0.5).astype(np.uint8)
    lesion = ref.with_array(mask)

    # FLAIR (turbo spin echo: no EPI distortion) on its own grid.
    flair_info = None
    if flair:
        rf = rng["flair"]
        facq = acqm.draw_acquisition(pose, rf, overrides.get("grid", "clinical"), None, None, None, None, "flair")
        fref_acq, fref = facq.reference(recon=False), facq.reference(recon=True)
        fo, fw, fblur = acqm.slice_profile(facq.thickness)
        fcrop = acqm.template_crop(head, pose, fref_acq, float(np.abs(fo).max()))
        c_fl = Contrast("flair", float(rf.uniform(80, 125)), float(rf.uniform(8000, 11000)), ti=float(rf.uniform(2200, 2800)))
        (fmap,) = signal_maps(head, fcrop, tp, [c_fl], acute, distractors, atrophy, texture)
        fxy = 0.3 * facq.acq_spacing[0]
        fmap = ndimage.gaussian_filter(fmap, (fblur, fxy, fxy), truncate=2.5)
        (sf,) = acqm.sample_on_grid([fmap], fcrop, head, pose, fref_acq, fo, fw)
        wm_f = float(c_fl(tp.pd["wm"], tp.t1["wm"], tp.t2["wm"], tp.adc["wm"]))
        flevel = float(rf.uniform(200, 900))
        sf *= acqm.bias_field(sf.shape, rf, float(rf.uniform(0.05, 0.2))) * (flevel / wm_f)
        fl = acqm.reconstruct(sf, flevel / float(rf.uniform(15, 40)), facq, rf, 0.0)
        images["flair"] = fref.with_array(np.clip(np.round(fl), 0, 32767).astype(np.int16))
        flair_info = {**facq.as_dict(), "te_ms": round(c_fl.te, 2), "tr_ms": round(c_fl.tr, 1), "ti_ms": round(c_fl.ti, 1)}

    total_1mm = acute.region.volume_ml * pose.volume_factor if acute.region is not None else 0.0
    info = {
        "case_id": case_id_for(seed, split),
        "modality": "dwi",
        "generator": "strokeseg.phantom",
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "split": split,
        "lesion_library": library,
        **lesion_info(acute, mask, ref, total_1mm, terr, pose),
        "adc_reduction": _float_list(acute.adc_reduction),
        "distractors": distractor_info(distractors, pose),
        "subject": pose.info,
        "tissue": tp.as_dict(),
        "acquisition": {**acq.as_dict(), "b_value": B_VALUE, "te_ms": round(te, 2), "tr_ms": round(tr, 1),
                         "snr_b0_wm": round(snr, 2), "nex": nex, "directions": 3, "eddy_shift_px": round(eddy, 3), "grid": overrides.get("grid", "clinical"),
                         "nyquist_ghost": round(ghost, 4), "covers": coverage, **art_info},
        "flair": flair_info,
    }
    for im in images.values():
        im.meta.clear()
    lesion.meta.clear()
    return PhantomCase(info["case_id"], images, lesion, info)


def write_case(case: PhantomCase, out_dir: str | Path) -> Path:
    """Write ``out_dir/<case_id>/`` with one file per image, lesion.nii.gz and case.json (atomic
    per file; case.json last, so a folder with case.json is complete)."""
    folder = Path(out_dir) / case.case_id
    for key, img in case.images.items():
        write_image(img, folder / f"{key}.nii.gz")
    write_image(case.lesion, folder / "lesion.nii.gz")
    write_text(json.dumps(case.info, indent=2, sort_keys=False) + "\n", folder / "case.json")
    return folder


def generate_cases(modality: str, seed: int, out_dir: str | Path, count: int = 1, lesion_library=None,
                   split: str | None = None, progress: bool = True, **kw: Any) -> list[Path]:
    """Write ``count`` cases; case k uses seed + k. ``modality``: "dwi" (acute DWI), "t1" (chronic
    T1, ATLAS-like) or "siss" (sub-acute T1/T2/FLAIR/DWI, ISLES'15 SISS-like); perfusion phantoms
    have their own ``generate_perfusion_cases``."""
    from .structural import STRUCTURAL_MODALITIES, simulate_structural

    if modality not in MODALITIES + STRUCTURAL_MODALITIES:
        raise ValueError(f"phantom modality {modality!r} is not available yet in generate_cases (choose from "
                         f"{', '.join(MODALITIES + STRUCTURAL_MODALITIES)}; perfusion: generate_perfusion_cases)")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    from tqdm import tqdm

    out = []
    for k in tqdm(range(count), desc=f"phantom {modality}", unit="case", disable=not progress):
        if modality == "dwi":
            case = simulate_dwi(seed + k, lesion_library=lesion_library, split=split, **kw)
        else:
            case = simulate_structural(modality, seed + k, lesion_library=lesion_library, split=split, **kw)
        out.append(write_case(case, out_dir))
    return out

