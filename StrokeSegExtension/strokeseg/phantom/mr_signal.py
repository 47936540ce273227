"""Tissue relaxation/diffusion parameters and noise-free signal maps on the template grid.

Signal equations (spin echo EPI / turbo spin echo, long TR):
  b0    S0 = PD (1 - exp(-TR/T1)) exp(-TE/T2)
  DWI   Sb = S0 exp(-b ADC)                              (isotropic trace, b = 1000 s/mm^2)
  FLAIR S  = PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)

Published ranges used for the per-subject draws (values in ms and 1e-3 mm^2/s):
  ADC: normal white matter 0.70-0.80, cortical grey matter 0.80-0.90, CSF ~3.0 (free water at
       37 C; Helenius et al., AJNR 2002 23:194; Sener, Comput Med Imaging Graph 2001 25:299;
       Le Bihan, Radiology 2013); skeletal muscle 1.3-1.6 (Kermarrec et al., Eur Radiol 2010);
       fat ~0.01-0.03 (lipid protons barely diffuse).
  T2:  1.5 T WM 72-80, GM 90-105; 3 T WM 60-75, GM 80-100 (Stanisz et al., MRM 2005 54:507;
       Wansapura et al., JMRI 1999 9:531); CSF > 1500 (Spijkerman et al., MAGMA 2018); muscle
       35-50; fat 80-130.
  T1:  1.5 T WM 600-700, GM 1000-1200; 3 T WM 800-900, GM 1300-1450; CSF ~4000 (same sources).
  PD:  WM 0.69, GM 0.80, CSF 1.0 (relative water content; e.g. Whittall et al., MRM 1997).
  TE:  DWI 60-95 ms at 3 T, 80-110 ms at 1.5 T; TR 3000-8000 ms. FLAIR TI 2200-2800 ms.
Pathology: acute infarct ADC 30-60% below normal with mild T2 prolongation (Schlaug et al.,
  Neurology 1997; Lansberg et al., AJNR 2001); WMH T2 110-180 ms and ADC raised 15-60% (Helenius
  2002; O'Sullivan, Neurology 2001); chronic infarct cavities CSF-like with a gliotic rim;
  T2 shine-through: T2 170-320 ms with normal-to-raised ADC (Burdette et al., Radiology 1999).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anatomy import HeadModel
from .lesions import AcuteLesions, Distractor
from .library import Region

TISSUES = ("gm", "wm", "csf", "muscle", "fat")
B_VALUE = 1000.0  # s/mm^2


@dataclass
class TissueParams:
    field_t: float
    pd: dict[str, float]
    t1: dict[str, float]  # ms
    t2: dict[str, float]  # ms
    adc: dict[str, float]  # mm^2/s
    fat_sat: float  # residual fat signal fraction after fat suppression (DWI)

    def as_dict(self) -> dict:
        return {"field_strength_t": self.field_t, "pd": self.pd, "t1_ms": self.t1, "t2_ms": self.t2,
                "adc_mm2_s": self.adc, "fat_suppression_residual": self.fat_sat}


def draw_tissue_params(rng: np.random.Generator, field_t: float) -> TissueParams:
    u = rng.uniform
    hi = field_t > 2.0
    t2 = {"wm": u(60, 75) if hi else u(72, 80), "gm": u(80, 100) if hi else u(90, 105),
          "csf": u(1500, 2500), "muscle": u(32, 45) if hi else u(38, 50), "fat": u(80, 130)}
    t1 = {"wm": u(800, 900) if hi else u(600, 700), "gm": u(1300, 1450) if hi else u(1000, 1200),
          "csf": u(3800, 4400), "muscle": u(1300, 1450) if hi else u(1000, 1100), "fat": u(300, 400) if hi else u(250, 300)}
    adc = {"wm": u(0.70e-3, 0.80e-3), "gm": u(0.80e-3, 0.90e-3), "csf": u(2.9e-3, 3.2e-3),
           "muscle": u(1.3e-3, 1.6e-3), "fat": u(0.01e-3, 0.03e-3)}
    pd = {"wm": u(0.66, 0.72), "gm": u(0.78, 0.84), "csf": 1.0, "muscle": u(0.7, 0.8), "fat": u(0.85, 0.95)}
    return TissueParams(field_t, pd, t1, t2, adc, fat_sat=float(u(0.03, 0.18)))


@dataclass
class Contrast:
    """A signal equation with its sequence timings."""

    kind: str  # "b0", "dwi", "flair"
    te: float
    tr: float
    ti: float = 0.0
    b: float = 0.0
    fat_factor: float = 1.0

    def __call__(self, pd, t1, t2, adc):
        if self.kind == "flair":
            mz = np.abs(1.0 - 2.0 * np.exp(-self.ti / t1) + np.exp(-self.tr / t1))
        else:
            mz = 1.0 - np.exp(-self.tr / t1)
        s = pd * mz * np.exp(-self.te / t2)
        if self.b:
            s = s * np.exp(-self.b * adc)
        return s


def _tissue_constant(tp: TissueParams, contrast: Contrast, name: str) -> float:
    pd = tp.pd[name] * (contrast.fat_factor if name == "fat" else 1.0)
    return float(contrast(pd, tp.t1[name], tp.t2[name], tp.adc[name]))


def _intersect(a: tuple[slice, ...], b: tuple[slice, ...]):
    lo = [max(x.start, y.start) for x, y in zip(a, b)]
    hi = [min(x.stop, y.stop) for x, y in zip(a, b)]
    if any(h <= l for l, h in zip(lo, hi)):
        return None
    in_a = tuple(slice(l - x.start, h - x.start) for l, h, x in zip(lo, hi, a))
    in_b = tuple(slice(l - y.start, h - y.start) for l, h, y in zip(lo, hi, b))
    return in_a, in_b


def signal_maps(head: HeadModel, crop: tuple[slice, ...], tp: TissueParams, contrasts: list[Contrast],
                acute: AcuteLesions, distractors: list[Distractor], atrophy: float,
                texture: tuple[float, float]) -> list[np.ndarray]:
    """Noise-free signal of each contrast on a crop of the template grid (float32)."""
    gm = head.gm[crop]
    wm = head.wm[crop]
    # Atrophy widens the sulci: a share of the cortex next to CSF becomes CSF.
    shift = head.sulcal[crop] * np.float32(atrophy)
    shift *= gm
    gm_a = gm - shift
    tex = head.texture[crop] * np.float32(texture[0])
    tex += 1.0
    outs = []
    for contrast in contrasts:
        k = {n: np.float32(_tissue_constant(tp, contrast, n)) for n in TISSUES}
        s = gm_a * k["gm"]
        s += wm * k["wm"]
        s += head.csf[crop] * k["csf"]
        s += shift * k["csf"]
        s += head.muscle[crop] * k["muscle"]
        s += head.fat[crop] * k["fat"]
        s *= tex  # microstructural texture (a few per cent)
        if contrast.b:  # ADC texture only affects diffusion weighting
            s *= 1.0 - np.float32(texture[1]) * head.texture2[crop]
        outs.append(s)

    def modify(region: Region, weight: np.ndarray, t2=None, t2_scale=None, adc=None, adc_scale=None,
               replace_csf=False, t1_scale=None):
        got = _intersect(crop, region.slices)
        if got is None:
            return
        in_crop, in_reg = got
        w = weight[in_reg]
        sel = w > 1e-3
        if not sel.any():
            return
        g = np.maximum(gm_a[in_crop][sel], 0)
        tot = g + wm[in_crop][sel]
        fg = g / np.maximum(tot, 1e-6)
        par = {q: fg * getattr(tp, q)["gm"] + (1 - fg) * getattr(tp, q)["wm"] for q in ("pd", "t1", "t2", "adc")}
        if not replace_csf:
            t2n = par["t2"] * (t2_scale[in_reg][sel] if t2_scale is not None else 1.0) if t2 is None else np.full_like(tot, t2)
            if adc is not None:
                adcn = np.full_like(tot, adc)
            elif isinstance(adc_scale, np.ndarray):
                adcn = par["adc"] * adc_scale[in_reg][sel]
            else:
                adcn = par["adc"] * (adc_scale or 1.0)
            # T1 rises with T2 in oedema and gliosis (both follow the water content), unless the
            # caller fixes it (the structural phantoms draw the gliotic T1 prolongation per case).
            t1n = par["t1"] * (t1_scale if t1_scale is not None else np.clip(t2n / par["t2"], 1.0, 1.6) ** 0.5)
        for s, contrast in zip(outs, contrasts):
            before = tot * contrast(par["pd"], par["t1"], par["t2"], par["adc"])
            if replace_csf:
                after = tot * _tissue_constant(tp, contrast, "csf")
            else:
                after = tot * contrast(par["pd"] * 1.02, t1n, t2n, adcn)
            view = s[in_crop]
            view[sel] += (w[sel] * (after - before)).astype(np.float32)

    for d in distractors:
        if d.kind in ("wmh", "t2_shine_through"):
            modify(d.region, d.region.values, t2=d.params["t2_ms"], adc_scale=d.params["adc_scale"])
        elif d.kind in ("old_infarct", "old_lacune"):
            modify(d.region, np.clip(d.region.values - d.core, 0, 1), t2=d.params["gliosis_t2_ms"], adc=d.params["gliosis_adc"],
                   t1_scale=d.params.get("gliosis_t1_scale"))
            modify(d.region, d.core, replace_csf=True)
        elif d.kind == "ex_vacuo":  # parenchyma lost to an enlarged ventricle / widened sulcus
            modify(d.region, d.region.values, replace_csf=True)
    if acute.region is not None:
        modify(acute.region, acute.region.values, t2_scale=acute.t2_scale, adc_scale=acute.adc_scale)
    for s in outs:
        np.maximum(s, 0, out=s)
    return outs
