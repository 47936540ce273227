"""Which modality is an image? Case folders, input loading and plausibility checks.

Three sources of evidence, in the order they are trusted:

1. the name: a file or DICOM series name ("dwi.nii.gz", "ep2d_diff_3scan_trace_p2_ADC",
   "sub-01_T1w", "SMIR.Brain.XX.O.CT_Tmax.345");
2. DICOM attributes: ImageType, b-value, modality, sequence timing;
3. intensities: CT Hounsfield units, and whether fluid (CSF) is brighter than tissue
   (ADC, b0, T2) or darker (DWI b1000, T1, FLAIR).

Intensities cannot name an MR contrast reliably, but they can tell when a file contradicts
the key it was given (an ADC map given as DWI, a CT given as T1); :func:`load_inputs` refuses
those with a one-line error instead of running a model on the wrong image.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import io
from .errors import InputError
from .image import Image

MODALITY_KEYS: tuple[str, ...] = (
    "dwi", "adc", "b0", "flair", "t1", "t2", "ctp", "pwi", "cbf", "cbv", "mtt", "tmax", "ttp", "ncct",
)
FOUR_D_KEYS = ("ctp", "pwi")
MAP_KEYS = ("cbf", "cbv", "mtt", "tmax", "ttp")
TRUTH_NAMES = ("lesion", "core", "penumbra")  # ground truth in a case folder, never an input
TRUTH_PREFIX = "true_"  # phantoms' true maps (true_cbf, ...): ground truth too, not a second cbf
METADATA_NAMES = ("case.json",)

ACCEPT = 0.5  # lowest confidence at which a name alone assigns a key
STRONG = 0.8  # evidence at or above this is trusted over weaker evidence / contradicts a given key


@dataclass
class Detection:
    key: str | None
    confidence: float
    reason: str


# -- names -------------------------------------------------------------------------------
_B_VALUE = re.compile(r"(?<![a-z0-9])b[ _=\-]*(\d{1,4})(?![0-9])")
_MASK_WORDS = {"lesion", "lesions", "mask", "msk", "seg", "segmentation", "label", "labels", "ot", "roi", "gt",
               "groundtruth", "truth", "core", "penumbra", "probability", "prob"}
_DERIVED_DIFFUSION = {"eadc", "exp", "fa", "colfa", "cfa", "tensor", "dti"}
_SUSCEPTIBILITY = {"t2star", "t2s", "swi", "swan", "hemo", "minip"}
_MAP_WORDS = {"cbf": "cbf", "rcbf": "cbf", "cbv": "cbv", "rcbv": "cbv", "mtt": "mtt", "tmax": "tmax", "ttp": "ttp"}
_CT_PERF = {"ctp", "pct", "vpct", "ctperf", "ctperfusion"}
_MR_PERF = {"pwi", "dsc", "perf", "perfusion", "4dpwi"}
_DWI_STRONG = {"dwi", "dw", "isodwi", "trace", "tracew", "dwi1000"}
_DWI_WEAK = {"diff", "diffusion", "resolve"}
_FLAIR = {"flair", "tirm", "darkfluid", "t2flair", "flair3d", "t2f", "spcir"}
_T1 = {"t1", "t1w", "t1wi"}
_T1_SEQ = {"mprage", "mp2rage", "spgr", "fspgr", "bravo", "tfe", "mpr"}
_CONTRAST = {"t1c", "t1ce", "t1gd", "t1post", "gd", "gad", "ce", "post", "contrast", "c", "postcontrast"}
_T2 = {"t2", "t2w", "t2wi", "t2tse", "t2fse"}
_CT = {"ct", "ncct", "nect", "cct", "noncontrast"}
_CTA = {"cta", "angio", "angiography"}


def _tokens(name: str) -> tuple[str, list[str]]:
    """Lower-case name without image suffix or folders, and its alphanumeric words."""
    s = name.strip()
    if io.image_suffix(s) or s.lower().endswith((".dcm", ".json")):
        s = re.split(r"[\\/]", s)[-1]  # a path: only the file name speaks
        suffix = io.image_suffix(s) or Path(s).suffix
        s = s[: len(s) - len(suffix)]
    low = s.lower()
    return low, [t for t in re.split(r"[^a-z0-9]+", low) if t]


def detect_from_name(name: str) -> Detection:
    """Modality from a file or DICOM series name (case-insensitive); key None when unknown.

    A key None with high confidence means "recognised, and not an input" (masks, eADC, T1+C).
    """
    low, toks = _tokens(name)
    words = set(toks)
    joined = " ".join(toks)
    shown = name if len(name) <= 60 else name[:57] + "..."

    def hit(key: str | None, conf: float, why: str) -> Detection:
        return Detection(key, conf, f"name '{shown}': {why}")

    if not toks:
        return Detection(None, 0.0, f"name '{shown}' has no words to go by")
    if low in MODALITY_KEYS:
        return hit(low, 1.0, "is a modality key")
    if words & _MASK_WORDS:
        return hit(None, 0.95, f"'{sorted(words & _MASK_WORDS)[0]}' marks a mask or ground truth, not an input")
    if words & _DERIVED_DIFFUSION or "exponential" in words:
        return hit(None, 0.9, "derived diffusion map (eADC/FA/tensor), not an input")
    # ADC before DWI: "dwi_adc", "ep2d_diff_3scan_trace_p2_ADC" are ADC maps.
    adc = [t for t in toks if re.fullmatch(r"d?adc(map)?\d*|adcs", t)]
    if adc:
        return hit("adc", 0.95, f"ADC keyword '{adc[0]}'")
    if "apparent diffusion" in joined:
        return hit("adc", 0.95, "'apparent diffusion coefficient'")
    maps = [t for t in toks if t in _MAP_WORDS]
    if maps:
        return hit(_MAP_WORDS[maps[0]], 0.9, f"perfusion map keyword '{maps[0]}'")
    if "time to peak" in joined:
        return hit("ttp", 0.9, "'time to peak'")
    if re.search(r"\bt max\b|time to max", joined):
        return hit("tmax", 0.9, "'Tmax'")
    if words & _SUSCEPTIBILITY or "t2*" in low:
        return hit(None, 0.9, "susceptibility-weighted (T2*/SWI), not an input")
    ct = bool(words & _CT)
    if words & _CTA:
        return hit(None, 0.9, "CT angiography, not an input")
    if words & _CT_PERF or (ct and (words & _MR_PERF or "4d" in words)):
        return hit("ctp", 0.9, "CT perfusion keyword")
    if words & _MR_PERF:
        strong = words & {"pwi", "dsc", "4dpwi"}
        return hit("pwi", 0.9 if strong else 0.7, f"perfusion keyword '{sorted(words & _MR_PERF)[0]}'")
    # b-values: a name may list several (a TRACEW series can hold b0 and b1000 images;
    # a high b-value means the diffusion-weighted image).
    bvals = [int(b) for b in _B_VALUE.findall(low)]
    if bvals and max(bvals) >= 400:
        return hit("dwi", 0.9, f"b-value {max(bvals)}")
    if bvals and max(bvals) <= 50 and (words & (_DWI_STRONG | _DWI_WEAK) or f"b{bvals[0]}" in words or "b" in words):
        return hit("b0", 0.9, f"b-value {max(bvals)}")
    dwi = words & _DWI_STRONG
    if dwi:
        return hit("dwi", 0.9, f"diffusion keyword '{sorted(dwi)[0]}'")
    if words & _FLAIR or "dark fluid" in joined:
        return hit("flair", 0.9, "FLAIR keyword")
    if words & _DWI_WEAK:
        return hit("dwi", 0.7, f"diffusion keyword '{sorted(words & _DWI_WEAK)[0]}'")
    t1 = words & (_T1 | _T1_SEQ)
    if words & {"t1c", "t1ce", "t1gd", "t1post"} or (t1 and words & _CONTRAST):
        return hit(None, 0.9, "contrast-enhanced T1; key 't1' means a non-contrast T1")
    if words & _T1:
        return hit("t1", 0.9, f"T1 keyword '{sorted(words & _T1)[0]}'")
    if t1:
        return hit("t1", 0.8, f"T1 sequence '{sorted(t1)[0]}'")
    if words & _T2:
        return hit("t2", 0.9, f"T2 keyword '{sorted(words & _T2)[0]}'")
    if ct:
        return hit("ncct", 0.95 if words & {"ncct", "nect", "noncontrast"} else 0.8, "CT keyword")
    return Detection(None, 0.0, f"name '{shown}': no modality keyword")


# -- DICOM -------------------------------------------------------------------------------
def _float(value: object) -> float | None:
    """First number of a DICOM value ("1000", "1000\\8\\0\\0", "5000.0")."""
    if value is None:
        return None
    m = re.match(r"\s*([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)", str(value))
    return float(m.group(1)) if m else None


def _b_value(meta: dict) -> float | None:
    b = _float(meta.get("b_value"))
    if b is None:
        b = _float(meta.get("siemens_b_value"))
    if b is None:
        ge = _float(meta.get("ge_b_value"))
        if ge is not None:
            b = ge % 1e5 if ge >= 1e9 else ge  # GE adds 1e9 to the b-value in some versions
    if b is None:
        m = re.search(r"ep_b(\d+)", str(meta.get("sequence_name", "")))  # Siemens "*ep_b1000t"
        b = float(m.group(1)) if m else None
    return b


def detect_from_dicom(meta: dict) -> Detection:
    """Modality from DICOM attributes (``Image.meta`` of a series read by :func:`io.read_image`)."""
    image_type = {p.strip().upper() for p in str(meta.get("image_type", "")).split("\\")}
    modality = str(meta.get("dicom_modality", "")).strip().upper()
    desc = str(meta.get("series_description", "")).strip() or str(meta.get("protocol_name", "")).strip()

    if "ADC" in image_type:
        return Detection("adc", 0.95, "DICOM ImageType says ADC")
    if image_type & {"EADC", "FA", "EXP"}:
        return Detection(None, 0.9, "DICOM ImageType says a derived diffusion map (eADC/FA), not an input")
    b = _b_value(meta)
    if "TRACEW" in image_type:
        # Siemens TRACEW: the trace-weighted images. Some protocols put the b0 and the b1000
        # images in one series (the tags read are the first slice's; not split here), others
        # give each b-value its own series.
        if b is not None and b <= 50:
            return Detection("b0", 0.7, f"DICOM ImageType TRACEW with b-value {b:g} (a b0 series, or b0 + b1000 in one)")
        return Detection("dwi", 0.9, "DICOM ImageType TRACEW" + (f", b-value {b:g}" if b is not None else ""))
    by_name = detect_from_name(desc) if desc else None
    if by_name is not None and by_name.confidence >= STRONG:
        why = by_name.reason.split("': ", 1)[-1]
        return Detection(by_name.key, by_name.confidence, f"series description '{desc}': {why}")
    if modality == "CT":
        if by_name is not None and by_name.key in (*FOUR_D_KEYS, *MAP_KEYS):
            key = "ctp" if by_name.key == "pwi" else by_name.key  # perfusion on a CT is CT perfusion
            return Detection(key, 0.8, f"DICOM modality CT and {by_name.reason}")
        return Detection("ncct", 0.75, "DICOM modality CT")
    if modality == "MR" and b is not None:
        if b >= 400:
            return Detection("dwi", 0.85, f"DICOM b-value {b:g}")
        if b <= 50:
            return Detection("b0", 0.75, f"DICOM b-value {b:g}")
    if by_name is not None and by_name.key is not None:
        return by_name
    tr, te, ti = (_float(meta.get(k)) for k in ("repetition_time", "echo_time", "inversion_time"))
    echo_planar = "EP" in str(meta.get("scanning_sequence", "")).upper()
    if modality == "MR" and not echo_planar and tr is not None:
        if ti is not None and ti >= 1200 and tr >= 4000:
            return Detection("flair", 0.6, f"DICOM timing TR {tr:g} ms, TI {ti:g} ms (fluid-attenuated inversion recovery)")
        if te is not None and tr <= 1000 and te <= 30:
            return Detection("t1", 0.55, f"DICOM timing TR {tr:g} ms, TE {te:g} ms (T1-weighted)")
        if te is not None and tr >= 2000 and te >= 70:
            return Detection("t2", 0.55, f"DICOM timing TR {tr:g} ms, TE {te:g} ms (T2-weighted)")
    return Detection(None, 0.0, "DICOM attributes do not name a modality")


# -- intensities ---------------------------------------------------------------------------
@dataclass
class _Look:
    """What the intensities say: a detection plus the keys the image is incompatible with."""

    detection: Detection
    label: str  # "CT (Hounsfield units)", "fluid brighter than tissue (ADC/T2/b0-like)", ...
    strength: float  # confidence that the image is of this kind
    conflicts: frozenset[str]


_MAX_SAMPLE = 1 << 21


def _sample(arr: np.ndarray) -> np.ndarray:
    """A strided subsample (statistics only): at most ~2 M voxels, finite values, float32."""
    step = 1
    while arr[..., ::step, ::step, ::step].size > _MAX_SAMPLE:
        step += 1
    a = np.asarray(arr[..., ::step, ::step, ::step], dtype=np.float32).ravel()
    return a[np.isfinite(a)]


# ADC is stored in one of these units (scale relative to 1e-6 mm²/s). Brain tissue is
# 600-1000e-6 mm²/s and free water (CSF) 3000-3400e-6 mm²/s, so in the right unit the
# median of a head lies in 300-1500 and its 99th percentile (CSF) in 2000-4500.
_ADC_UNITS = ((1.0, "1e-6 mm²/s"), (1e-3, "1e-3 mm²/s"), (1e-6, "mm²/s"), (0.1, "1e-5 mm²/s"))


def adc_unit(image: Image) -> tuple[float, str] | None:
    """(scale relative to 1e-6 mm²/s, name) of the unit an ADC map's values fit, or None when
    none fits clearly (the map is then taken as given)."""
    a = _sample(image.array)
    pos = a[a > 0]
    if pos.size < 500:
        return None
    fg = pos[pos > 0.1 * np.percentile(pos, 99.5)]
    if fg.size < 500:
        return None
    m, p99 = float(np.median(fg)), float(np.percentile(fg, 99))
    fits = [(u, name) for u, name in _ADC_UNITS if 300 * u <= m <= 1500 * u and 2000 * u <= p99 <= 4500 * u]
    return fits[0] if len(fits) == 1 else None


def _look(image: Image) -> _Look:
    a = _sample(image.array)
    unknown = _Look(Detection(None, 0.0, "intensities: too few voxels to judge"), "unknown", 0.0, frozenset())
    if a.size < 500:
        return unknown
    air = float(np.mean(a < -500))
    if image.is_4d:
        n = image.array.shape[0]
        if n < 8:
            return _Look(Detection(None, 0.5, f"intensities: 4D with only {n} volumes (a multi-b-value diffusion "
                                   "series? perfusion has many more)"), "multi-volume", 0.5, frozenset())
        if air >= 0.02:
            return _Look(Detection("ctp", 0.9, f"intensities: 4D in Hounsfield units ({air:.0%} air near -1000)"),
                         "CT perfusion (Hounsfield units)", 0.9, frozenset({"pwi"}))
        return _Look(Detection("pwi", 0.6, "intensities: 4D without air at -1000 HU (MR-like)"),
                     "MR perfusion", 0.6, frozenset({"ctp"}))
    bone = float(np.mean(a > 300))
    if air >= 0.02 and float(a.min()) <= -800:
        strength = 0.9 if bone >= 0.001 else 0.8
        why = f"{air:.0%} air near -1000" + (f", {bone:.1%} bone above 300" if bone >= 0.001 else "")
        return _Look(Detection("ncct", strength, f"intensities: Hounsfield units ({why})"),
                     "CT (Hounsfield units)", strength, frozenset({"dwi", "adc", "b0", "flair", "t1", "t2"}))
    pos = a[a > 0]
    if pos.size < 500:
        return unknown
    fg = pos[pos > 0.1 * np.percentile(pos, 99.5)]  # head/brain: above background noise
    if fg.size < 500:
        return unknown
    m = float(np.median(fg))
    r99 = float(np.percentile(fg, 99)) / m
    f_bright = float(np.mean(fg > 2.5 * m))  # fluid in ADC/T2/b0 is ~3-4x tissue
    f_2 = float(np.mean(fg > 2.0 * m))
    # Fluid in DWI/T1/FLAIR (0.1-0.4x tissue; may lie below the foreground threshold), above
    # the background noise floor. ADC maps have next to none.
    head = pos[pos > 0.05 * m]
    f_dark = float(np.mean(head < 0.4 * m))
    stats = (f"median {m:.4g}, 99th percentile {r99:.1f}x median, {f_bright:.0%} above 2.5x median, "
             f"{f_dark:.0%} below 0.4x")
    bright_label = "a T2-like image (ADC/b0/T2: fluid brighter than tissue)"
    dark_label = "DWI/T1/FLAIR (no fluid brighter than tissue)"
    tail = f_bright >= 0.015 and r99 >= 2.5
    p99 = r99 * m
    units = [name for u, name in _ADC_UNITS if 300 * u <= m <= 1500 * u and 2000 * u <= p99 <= 4500 * u]
    # A DWI with a large, very bright lesion can have a bright tail too; the lack of dark
    # voxels (DWI's CSF) and, failing the ADC value range, a heavy tail make it strong evidence.
    if tail and f_dark < 0.1 and (units or (f_bright >= 0.06 and r99 >= 3.0)):
        det = (Detection("adc", 0.8, f"intensities: bright fluid, no dark fluid, values fit ADC in {units[0]} ({stats})")
               if units else Detection(None, 0.4, f"intensities: fluid brighter than tissue (b0/T2-like; {stats})"))
        return _Look(det, "an ADC map" if units else bright_label, 0.85, frozenset({"dwi", "t1", "flair"}))
    if f_2 < 0.005 and r99 < 1.6:
        return _Look(Detection("dwi", 0.5, f"intensities: no bright fluid (DWI, T1 or FLAIR; {stats})"),
                     dark_label, 0.85, frozenset({"adc", "b0", "t2"}))
    if (f_dark >= 0.25 and f_bright < 0.02) or (f_bright < 0.01 and r99 < 2.0):
        # An ADC map of a brain always shows CSF at ~3x tissue and little below half of it.
        return _Look(Detection("dwi", 0.4, f"intensities: little bright fluid (not ADC-like; {stats})"),
                     "not an ADC map (too little fluid brighter than tissue)", 0.8, frozenset({"adc"}))
    if tail:
        return _Look(Detection(None, 0.3, f"intensities: some bright voxels (b0/T2/ADC-like?; {stats})"),
                     bright_label, 0.6, frozenset({"dwi", "t1", "flair"}))
    return _Look(Detection(None, 0.2, f"intensities: inconclusive ({stats})"), "unknown", 0.2, frozenset())


def _not_hounsfield(image: Image) -> str | None:
    """Why a CT series is not in Hounsfield units (raw stored values, or an MR), else None."""
    a = _sample(image.array)
    if a.size == 0 or float(a.min()) <= -200:
        return None
    pos = a[a > 0]
    if pos.size == 0:
        return None
    m = float(np.median(pos[pos > 0.1 * np.percentile(pos, 99.5)]))
    # Skull-stripped CT in HU has brain near 20-50; a median far above is raw values or MR.
    return None if m <= 150 else f"no air near -1000 and tissue median {m:.4g}: not Hounsfield units"


def detect_from_intensity(image: Image) -> Detection:
    """Modality from intensity statistics alone: CT vs MR, ADC-like vs DWI-like, 4D CT vs MR.

    MR contrasts other than ADC cannot be told apart reliably from intensities, so those
    detections carry low confidence.
    """
    return _look(image).detection


def _fits_dims(key: str, image: Image) -> bool:
    return (key in FOUR_D_KEYS) == image.is_4d


def detect_modality(image: Image, name: str) -> Detection:
    """Best detection from the name, then DICOM attributes, then intensities, with the reason.

    The first source at or above STRONG confidence wins; otherwise the most confident.
    Keys whose dimensionality does not fit the image (3D vs 4D) are not considered, and an
    intensity contradiction lowers the confidence of the answer.
    """
    look = _look(image)
    sources: list[Detection] = []
    if name:
        sources.append(detect_from_name(name))
    if any(k in image.meta for k in ("dicom_modality", "series_description", "image_type")):
        sources.append(detect_from_dicom(image.meta))
    sources.append(look.detection)
    if sources[0].key is None and sources[0].confidence >= STRONG:
        return sources[0]  # the name says "not an input" (a mask, eADC, T1+C)
    notes: list[str] = []
    usable: list[Detection] = []
    for d in sources:
        if d.key is not None and not _fits_dims(d.key, image):
            notes.append(f"{d.reason} ignored: {'4D' if image.is_4d else '3D'} image")
        elif d.key is not None:
            usable.append(d)
    if not usable:
        return Detection(None, 0.0, "; ".join([*notes, *(d.reason for d in sources if d.key is None)]))
    best = next((d for d in usable if d.confidence >= STRONG), max(usable, key=lambda d: d.confidence))
    if best.key in look.conflicts and look.strength >= STRONG:
        return Detection(best.key, min(best.confidence, 0.4), f"{best.reason}, but intensities look like {look.label}")
    return Detection(best.key, best.confidence, "; ".join([best.reason, *notes]))


# -- case folders --------------------------------------------------------------------------
def _is_image_entry(p: Path) -> bool:
    return p.is_dir() or bool(io.image_suffix(p.name))


def find_case_inputs(case_dir: str | Path) -> dict[str, Path]:
    """Input files of a case folder by modality key (in MODALITY_KEYS order).

    Files (or DICOM folders) named by a key are taken as such; other image names go through
    :func:`detect_from_name`. Ground truth (lesion/core/penumbra and phantoms' ``true_*`` maps),
    case.json, hidden and non-image files are ignored.
    """
    case = Path(case_dir)
    if not case.exists():
        raise InputError(case, "case folder not found")
    if not case.is_dir():
        raise InputError(case, "is not a folder (a case is a folder of images named by modality, e.g. dwi.nii.gz)")
    found: dict[str, Path] = {}
    unrecognised: list[str] = []
    truth: list[str] = []
    for p in sorted(case.iterdir()):
        if p.name.startswith(".") or p.name.lower() in METADATA_NAMES or not _is_image_entry(p):
            continue
        stem = io.strip_suffix(p.name).lower()
        if stem in TRUTH_NAMES or stem.startswith(TRUTH_PREFIX):
            truth.append(p.name)
            continue
        det = detect_from_name(p.name)
        if det.key is None or det.confidence < ACCEPT:
            unrecognised.append(p.name)
            continue
        if det.key in found:
            raise InputError(case, f"both {found[det.key].name} and {p.name} look like '{det.key}'; keep one")
        found[det.key] = p
    if not found:
        if unrecognised:
            listed = ", ".join(unrecognised[:5]) + (", ..." if len(unrecognised) > 5 else "")
            raise InputError(case, f"no image is named by a modality ({listed}); name files by key, "
                             f"e.g. dwi.nii.gz, adc.nii.gz")
        what = f"only ground truth ({', '.join(truth)})" if truth else "no images"
        raise InputError(case, f"holds {what}; expected files named by modality, e.g. dwi.nii.gz, adc.nii.gz")
    return {k: found[k] for k in MODALITY_KEYS if k in found}


def _resolve_overrides(files: dict[str, Path], overrides: dict[str, str] | None) -> list[tuple[str, Path, bool]]:
    """(key, path, user-asserted) for every input after the user's overrides.

    An override names a file by its given key, path or file name; an existing path that is
    not among the inputs (a file whose name said nothing) is added under its key.
    """
    asserted: dict[Path, str] = {}
    for target, key in (overrides or {}).items():
        if key not in MODALITY_KEYS:
            raise InputError(target, f"unknown modality '{key}' (known: {', '.join(MODALITY_KEYS)})")
        match = [p for k, p in files.items() if target in (k, str(p), p.name)]
        if not match and not Path(target).exists():
            listed = ", ".join(p.name for p in files.values()) or "none"
            raise InputError(target, f"override names no input and no existing file (inputs: {listed})")
        asserted[match[0] if match else Path(target)] = key
    out = [(asserted.get(p, k), p, p in asserted) for k, p in files.items()]
    out += [(k, p, True) for p, k in asserted.items() if p not in files.values()]
    return out


def _check_content(key: str, path: Path, image: Image) -> None:
    """Refuse an image whose name, DICOM tags or intensities clearly say it is something else."""
    by_name = detect_from_name(path.name)
    if by_name.key is not None and by_name.key != key and by_name.confidence >= 0.9:
        raise InputError(path, f"given as {key} but its name says {by_name.key} ({by_name.reason})")
    if "dicom_modality" in image.meta or "image_type" in image.meta:
        d = detect_from_dicom(image.meta)
        if d.key is not None and d.key != key and d.confidence >= 0.9:
            raise InputError(path, f"given as {key} but looks like {d.key} ({d.reason})")
    if key in ("ncct", "ctp"):
        why = _not_hounsfield(image)
        if why:
            raise InputError(path, f"given as {key} but {why}")
    look = _look(image)
    if key in look.conflicts and look.strength >= STRONG:
        why = look.detection.reason.removeprefix("intensities: ")
        raise InputError(path, f"given as {key} but looks like {look.label} ({why})")


def adc_in_standard_units(image: Image) -> Image:
    """ADC maps come in 1e-6, 1e-5 or 1e-3 mm²/s or plain mm²/s (FSL, MRtrix); models and the MR
    core threshold expect 1e-6 mm²/s, and an ADC in mm²/s fed as is reads as zero everywhere
    (a DWI model then finds nothing, silently). Rescaled when the values clearly fit one unit."""
    unit = adc_unit(image)
    if unit is None or unit[0] == 1.0:
        return image
    scaled = image.with_array((image.array.astype(np.float64) / unit[0]).astype(np.float32))
    scaled.meta["rescaled_from"] = unit[1]
    return scaled


# Time maps: the median over the brain in seconds stays below these (MTT ~3-12 s, Tmax ~0-10 s,
# TTP from the series start ~10-40 s); in milliseconds it is above 300. Between: neither.
_TIME_MAP_MAX_MEDIAN_S = {"mtt": 30.0, "tmax": 30.0, "ttp": 80.0}


def time_map_in_seconds(key: str, image: Image) -> Image:
    """MTT, Tmax and TTP maps exported in milliseconds (some vendors) are rescaled to seconds, which
    models and decision thresholds expect; as is, every voxel would read as > 30 s (a CTP model's
    Dice fell from 0.80 to 0.19, silently). A median between the two ranges is refused."""
    a = _sample(image.array)
    pos = a[a > 0]
    if pos.size < 100:
        return image
    med = float(np.median(pos))
    if med <= _TIME_MAP_MAX_MEDIAN_S[key]:
        return image
    if med < 300.0:
        raise InputError(image.meta.get("source"), f"{key} values (median {med:.4g}) are neither seconds nor milliseconds")
    scaled = image.with_array((image.array.astype(np.float64) / 1000.0).astype(np.float32))
    scaled.meta["rescaled_from"] = "ms"
    return scaled


def in_standard_units(key: str, image: Image) -> Image:
    """ADC in 1e-6 mm²/s and time maps in seconds, as models and thresholds expect (see the two
    functions above); other inputs unchanged. ``meta["rescaled_from"]`` says what was converted."""
    if key == "adc":
        return adc_in_standard_units(image)
    if key in _TIME_MAP_MAX_MEDIAN_S:
        return time_map_in_seconds(key, image)
    return image


def load_inputs(files: dict[str, Path | str], *, overrides: dict[str, str] | None = None) -> dict[str, Image]:
    """Read and check every input; the result maps modality key -> Image (meta["modality"] set).

    Each file must be a readable, sane volume (3D, or 4D for ctp/pwi) whose content does not
    clearly contradict its key. ``overrides`` ({file path, file name or given key: key}) is the
    user saying what a file is: the key changes and the content check is skipped.
    """
    paths = {k: Path(p) for k, p in files.items()}
    for k, p in paths.items():
        if k not in MODALITY_KEYS:
            raise InputError(p, f"unknown modality key '{k}' (known: {', '.join(MODALITY_KEYS)})")
    out: dict[str, Image] = {}
    for key, path, asserted in _resolve_overrides(paths, overrides):
        if key in out:
            raise InputError(path, f"a second input for '{key}' ({out[key].meta.get('source')} is one already)")
        image = io.read_image(path)
        if key in FOUR_D_KEYS and not image.is_4d:
            raise InputError(path, "3D volume where a 4D series is expected")
        if image.is_4d and key not in FOUR_D_KEYS:
            n = image.array.shape[0]
            hint = "; give the b1000 volume as dwi and the b=0 volume as b0" if key in ("dwi", "b0", "adc") and n < 8 else ""
            raise InputError(path, f"4D series ({n} frames) where a 3D volume is expected{hint}")
        io.check_volume(image, path, allow_4d=key in FOUR_D_KEYS)
        if not asserted:
            _check_content(key, path, image)
        image.meta["modality"] = key
        out[key] = image
    return out


def require_inputs(
    available: Iterable[str],
    required: Sequence[str],
    derivable: dict[str, Sequence[str]] | None = None,
    *,
    where: str | Path | None = None,
    model: str | None = None,
) -> None:
    """Raise InputError naming exactly what is missing; inputs that can be derived from
    available ones (``derivable`` = {key: sources}, e.g. {"adc": ["b0", "dwi"]}) are not missing."""
    have = set(available)
    derivable = dict(derivable or {})
    missing = [k for k in required if k not in have and not (k in derivable and set(derivable[k]) <= have)]
    if not missing:
        return
    quoted = ", ".join(f"'{k}'" for k in missing)
    parts = [f"{'model ' + model + ' ' if model else ''}needs {', '.join(required)}"]
    for k in missing:
        if k in derivable:
            lacking = [s for s in derivable[k] if s not in have]
            parts.append(f"{k} can be computed from {' + '.join(derivable[k])}, but {', '.join(lacking)} "
                         f"{'is' if len(lacking) == 1 else 'are'} missing too")
    parts.append(f"found: {', '.join(sorted(have)) if have else 'nothing'}")
    raise InputError(where, f"missing input{'s' if len(missing) > 1 else ''} {quoted} ({'; '.join(parts)})")
