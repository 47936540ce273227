"""Bringing a case's inputs into the network's space and the result back.

One place for this so that training and inference see exactly the same data:
1. missing derivable inputs are computed (ADC from b0 + b1000);
2. every input is resampled through physical space onto the *model grid*: the reference
   input's box, axes permuted/flipped to the nearest LPS orientation (obliquity kept), at the
   card's target spacing;
3. intensities are normalised per input as the card says.
The probability map comes back onto the reference grid by :func:`to_reference`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .image import Image, grid_with_spacing, resample_to
from .modality import in_standard_units

DEFAULT_B_VALUE = 1000.0
ADC_SCALE = 1e6  # ADC maps are stored in 10^-6 mm^2/s, as scanners write them
PERFUSION_MAPS = ("cbf", "cbv", "mtt", "tmax", "ttp")  # derivable from a raw ctp / pwi series


@dataclass
class ModelInput:
    """The network's input tensor (C, z, y, x) and the grids needed to map results back."""

    array: np.ndarray
    model_grid: Image
    reference: Image
    channels: tuple[str, ...]
    rescaled: dict[str, str] = field(default_factory=dict)  # input key -> the unit it was converted from


def _b_value(dwi: Image, b_value: float | None) -> float:
    if b_value is not None:
        return float(b_value)
    for key in ("b_value", "ge_b_value"):
        raw = str(dwi.meta.get(key, "")).split("\\")[0].strip()
        try:
            b = float(raw)
        except ValueError:
            continue
        if b > 1e9:  # GE stores 1000000000 + b in its private tag
            b -= 1e9
        if 100 <= b <= 5000:
            return b
    return DEFAULT_B_VALUE


def compute_adc(b0: Image, dwi: Image, b_value: float | None = None) -> Image:
    """ADC = ln(S0 / Sb) / b on the DWI grid, in 10^-6 mm^2/s (background 0)."""
    b = _b_value(dwi, b_value)
    s0 = b0 if b0.same_grid(dwi) else resample_to(b0, dwi)
    s0a = s0.array.astype(np.float32)
    sba = dwi.array.astype(np.float32)
    # Voxels with no signal in b0 are background: no meaningful diffusion there.
    floor = 0.02 * float(np.percentile(s0a, 99)) if s0a.size else 0.0
    valid = (s0a > max(floor, 0.0)) & (sba > 0)
    adc = np.zeros_like(s0a)
    adc[valid] = np.log(s0a[valid] / sba[valid]) / b * ADC_SCALE
    np.clip(adc, 0.0, 5000.0, out=adc)  # free water is ~3000; beyond 5000 is noise
    return dwi.with_array(adc, derived="adc from b0 and dwi", b_value=b)


def derive_missing(images: Mapping[str, Image], card: Any, b_value: float | None = None) -> dict[str, Image]:
    """Add inputs the card can derive (``derivable``) but the case lacks."""
    out = dict(images)
    perfusion: dict[str, dict[str, Image]] = {}  # one deconvolution per series, however many maps it gives
    for key, sources in (card.raw.get("derivable") or {}).items():
        if key in out or not all(s in out for s in sources):
            continue
        if key == "adc" and set(sources) == {"b0", "dwi"}:
            out["adc"] = compute_adc(out["b0"], out["dwi"], b_value)
        elif key in PERFUSION_MAPS and len(sources) == 1 and sources[0] in ("ctp", "pwi"):
            # Maps from the raw series by the engine's own deconvolution (the one that made the
            # phantoms' maps a CTP model is trained on), so the raw 4D series alone suffices.
            src = sources[0]
            if src not in perfusion:
                from .perfusion.pipeline import run_perfusion

                maps = run_perfusion(out[src], kind="ct" if src == "ctp" else "mr").maps
                perfusion[src] = {k: Image(v.array.astype(np.float32), v.spacing, v.origin, v.direction,
                                           {"derived": f"{k} from {src} (strokeseg perfusion)"}) for k, v in maps.items()}
            out[key] = perfusion[src][key]
        else:
            raise InputError(None, f"do not know how to derive '{key}' from {', '.join(sources)}")
    return out


def canonical_grid(reference: Image, spacing: tuple[float, float, float]) -> Image:
    """The reference box with axes in nearest-LPS order (obliquity kept) at ``spacing``."""
    ref = reference.to_sitk() if not reference.is_4d else reference.frame(0).to_sitk()
    oriented = sitk.DICOMOrient(_geometry_only(ref), "LPS")
    return grid_with_spacing(Image.from_sitk(oriented), spacing)


def _geometry_only(img: sitk.Image) -> sitk.Image:
    empty = sitk.Image(img.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(img)
    return empty


MIN_OVERLAP = 0.5  # an input covering less than half of the reference's box is a different scan


def check_overlap(image: Image, grid: Image, key: str, reference_key: str) -> None:
    """Inputs on other grids are resampled; inputs that do not share the reference's space are errors."""
    ones = Image(np.ones(image.array.shape[-3:], np.uint8), image.spacing, image.origin, image.direction)
    covered = float(resample_to(ones, grid, linear=False).array.mean())
    if covered < MIN_OVERLAP:
        what = "does not overlap" if covered == 0 else f"covers only {covered:.0%} of"
        raise InputError(image.meta.get("source", key),
                         f"{key} {what} the {reference_key} volume's field of view (not the same patient/scan?)")


def normalise(array: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """Intensity normalisation named by a model card (per input)."""
    a = array.astype(np.float32, copy=False)
    method = spec.get("method", "zscore")
    if method == "zscore":
        # Statistics over the head, not the air around it (clinical DWI is not skull-stripped).
        hi = float(np.percentile(a, 99.5))
        fg = a > spec.get("foreground_fraction", 0.1) * hi
        if fg.sum() < 10:
            fg = np.ones_like(a, dtype=bool)
        mu, sd = float(a[fg].mean()), float(a[fg].std()) + 1e-6
        out = (a - mu) / sd
        return np.clip(out, -spec.get("clip", 6.0), spec.get("clip", 6.0)).astype(np.float32)
    if method == "scale":
        out = a * float(spec["factor"])
        lo, hi = spec.get("clip", (None, None))
        return np.clip(out, lo, hi).astype(np.float32) if lo is not None else out.astype(np.float32)
    if method == "percentile":
        lo, hi = np.percentile(a, [spec.get("low", 0.5), spec.get("high", 99.5)])
        return np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)
    if method == "window":
        lo, hi = float(spec["low"]), float(spec["high"])
        return np.clip((a - lo) / (hi - lo), 0, 1).astype(np.float32)
    if method == "histeq":
        fg = a > np.percentile(a, spec.get("background_percentile", 1.0))
        vals = np.sort(a[fg].ravel())
        out = np.searchsorted(vals, a, side="right").astype(np.float32) / max(len(vals), 1)
        return np.where(fg, out, 0.0).astype(np.float32)
    if method == "relative":
        # Perfusion maps relative to typical parenchyma (the median over the map's non-zero voxels,
        # i.e. the pipeline's tissue mask): CBF and CBV scale with the arterial input's partial
        # volume and differ between scanners and tools, while the clinical rules are relative
        # (core: CBF < 30% of healthy tissue), so the network should see rCBF / rCBV.
        tissue = np.isfinite(a) & (a > 0)
        if tissue.sum() < 10:
            return np.zeros_like(a)
        ref = float(np.median(a[tissue])) or 1.0
        return np.clip(np.nan_to_num(a / ref), 0.0, float(spec.get("clip", 4.0))).astype(np.float32)
    raise ValueError(f"unknown normalisation method '{method}'")


def prepare(images: Mapping[str, Image], card: Any, *, b_value: float | None = None) -> ModelInput:
    """Inputs of one case -> the network's input on the model grid, as the card prescribes.

    Inputs are brought to the units models are trained in first (ADC 1e-6 mm²/s, time maps in s:
    ``modality.in_standard_units``), here, so that inference, training caches, tuning and
    evaluation cannot disagree on them."""
    images = {k: in_standard_units(k, im) for k, im in images.items()}
    rescaled = {k: im.meta["rescaled_from"] for k, im in images.items() if "rescaled_from" in im.meta}
    images = derive_missing(images, card, b_value)
    channels = tuple(card.required) + tuple(k for k in card.optional if k in images)
    reference = images[card.reference_input]
    grid = canonical_grid(reference, tuple(card.target_spacing))
    norm = card.raw.get("normalisation", {})
    arrays = []
    temporal = card.raw.get("temporal_reduction") or {}
    for key in channels:
        img = images[key]
        if key != card.reference_input:
            check_overlap(img, grid, key, card.reference_input)
        if img.is_4d:  # a 4D series enters as one channel, reduced over time as the card says (paper 004)
            if key not in temporal:
                raise InputError(img.meta.get("source", key), f"{key} is 4D but the model card declares no temporal_reduction for it")
            from .derived import temporal_reduction

            img = temporal_reduction(img, temporal[key])
        if img.array.dtype not in (np.float32, np.float64):
            img = img.with_array(img.array.astype(np.float32))
        on_grid = resample_to(img, grid, linear=True)
        arrays.append(normalise(on_grid.array, norm.get(key, {"method": "zscore"})))
    if card.raw.get("derived_channels"):  # e.g. mirrored inputs (paper 001): strokeseg.derived
        from .derived import derive_channels

        extra = derive_channels(dict(zip(channels, arrays)), grid, card.raw["derived_channels"])
        arrays += list(extra.values())
        channels += tuple(extra)
    return ModelInput(np.stack(arrays), grid, reference, channels, rescaled)


def to_reference(array: np.ndarray, model_grid: Image, reference: Image, *, linear: bool = True) -> Image:
    """A (z, y, x) map on the model grid -> an Image on the reference grid, voxel for voxel."""
    ref = reference if not reference.is_4d else reference.frame(0)
    out = resample_to(model_grid.with_array(array.astype(np.float32)), ref, linear=linear)
    out.meta = {}
    return out
