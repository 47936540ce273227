"""Modality, bolus timing and signal-to-concentration conversion.

CT: iodine raises attenuation linearly, so concentration is the rise over baseline, dHU.
MR (DSC): gadolinium shortens T2*, so dR2*(t) = -ln(S(t) / S0) / TE (1/s). Only ratios of
concentrations enter CBF, CBV and MTT, so TE scales dR2* but not the maps; without TE from the
header or the caller a typical 30 ms is used and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError

DEFAULT_TE_S = 0.030


@dataclass
class BolusTiming:
    baseline: slice  # frames averaged for the pre-contrast signal S0
    arrival: int  # first frame the bolus is seen in the global curve
    peak: int  # frame of the global curve's peak
    amplitude: float  # peak rise of the global curve (HU, or fractional signal drop for MR)
    noise: float  # noise of the global curve (same unit)


def detect_kind(array: np.ndarray, meta: dict, head_curve: np.ndarray | None = None) -> str:
    """'ct' or 'mr': the DICOM modality if known; otherwise CT numbers go well below zero (air
    is -1000 HU) while MR magnitudes do not, and a CT bolus raises the signal where MR's drops."""
    mod = str(meta.get("dicom_modality", "")).upper()
    if mod in ("CT", "MR"):
        return mod.lower()
    if float(np.min(array)) < -200.0:
        return "ct"
    if head_curve is not None and head_curve.size > 3:
        dev = head_curve - np.median(head_curve[:3])
        return "ct" if dev.max() > -dev.min() else "mr"
    return "mr"


def _noise(curve: np.ndarray) -> float:
    """Robust noise SD from second differences (insensitive to the smooth bolus shape)."""
    d2 = np.diff(curve, 2)
    return float(1.4826 * np.median(np.abs(d2 - np.median(d2))) / np.sqrt(6.0)) if d2.size else 0.0


def bolus_timing(curve: np.ndarray, kind: str, where: str | None = None, *, min_baseline: int = 2) -> BolusTiming:
    """Arrival and baseline from the head-average curve; InputError when there is no usable bolus."""
    c = np.asarray(curve, dtype=float)
    first = float(np.median(c[:3]))
    if kind == "mr":
        if first <= 0:
            raise InputError(where, "no signal in the first frames")
        e = (first - c) / first  # fractional drop
        floor = 0.005  # a 0.5% mean drop over the head is the least a DSC bolus produces
    else:
        e = c - first
        floor = 0.5  # HU
    smooth = np.convolve(np.pad(e, 1, mode="edge"), np.ones(3) / 3.0, mode="valid")
    noise = _noise(e)
    peak = int(np.argmax(smooth))
    amp = float(smooth[peak])
    if amp < max(8.0 * noise, floor):
        unit = "signal drop" if kind == "mr" else "HU rise"
        raise InputError(where, f"no bolus found: the head-average curve peaks at {amp:.3g} {unit} "
                                f"(noise {noise:.2g}); is this a contrast perfusion series?")
    below = np.flatnonzero(smooth[: peak + 1] < 0.1 * amp)
    arrival = int(below[-1]) + 1 if below.size else 0
    n_base = arrival - 1  # the frame just before arrival may already hold the leading edge
    if n_base < min_baseline:
        raise InputError(where, f"no pre-contrast baseline: the bolus arrives at frame {arrival + 1}, "
                                f"at least {min_baseline + 1} frames before it are needed")
    if peak >= c.size - 2 or smooth[-1] > 0.85 * amp:
        raise InputError(where, "series too short: it ends before the bolus has passed "
                                f"(head-average curve still at {100 * smooth[-1] / amp:.0f}% of its peak)")
    return BolusTiming(slice(0, n_base), arrival, peak, amp, noise)


def concentration_frame(frame: np.ndarray, s0: np.ndarray, kind: str, te_s: float) -> np.ndarray:
    """One frame (or any array broadcastable with ``s0``) to concentration."""
    if kind == "ct":
        return (frame - s0).astype(np.float32)
    s0_safe = np.maximum(s0, 1e-6)
    ratio = np.clip(frame / s0_safe, 1e-3, None)
    out = (-np.log(ratio) / te_s).astype(np.float32)
    out[s0 <= 0] = 0.0
    return out
