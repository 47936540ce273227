"""DICOM perfusion data through pydicom: multi-temporal series and enhanced multi-frame files.

SimpleITK's series reader stacks every file of a series by position, which turns a dynamic
series (the same slice positions repeated at each time point) into nonsense, and it ignores the
Real World Value Mapping that gives a parametric map its units. Here each slice/frame becomes
a record (position, orientation, time, pixels); the records are grouped into frames by time at
each slice position (per-slice acquisition times of interleaved MR differ within a volume, so
times are ranked per position rather than matched exactly), and the volume geometry is built
from the positions along the slice normal, in SimpleITK's LPS conventions.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import InputError
from ..image import Image


@dataclass
class _Slice:
    position: np.ndarray  # ImagePositionPatient (LPS mm)
    orientation: np.ndarray  # ImageOrientationPatient (6,)
    spacing: tuple[float, float]  # (row spacing, column spacing) mm
    pixels: Callable[[], np.ndarray]  # stored values (rows, cols)
    slope: float = 1.0
    intercept: float = 0.0
    times: dict[str, float] = field(default_factory=dict)  # candidate time fields, seconds
    order: float | None = None  # a fallback ordering (temporal position / instance number)
    thickness: float | None = None


def _seconds(tm: Any, da: Any = None) -> float | None:
    """DICOM TM (+ optional DA) -> seconds (days counted so midnight does not break order)."""
    if tm in (None, ""):
        return None
    s = str(tm).strip()
    try:
        hh, mm = int(s[0:2]), int(s[2:4] or 0)
        ss = float(s[4:] or 0)
    except ValueError:
        return None
    days = 0
    if da not in (None, ""):
        try:
            days = _dt.date(int(str(da)[0:4]), int(str(da)[4:6]), int(str(da)[6:8])).toordinal()
        except ValueError:
            days = 0
    return days * 86400.0 + hh * 3600.0 + mm * 60.0 + ss


def _datetime_seconds(dtv: Any) -> float | None:
    """DICOM DT (YYYYMMDDHHMMSS.FFFFFF&ZZXX) -> seconds."""
    if dtv in (None, ""):
        return None
    s = str(dtv).strip()
    if len(s) >= 13 and s[-5] in "+-":  # UTC offset suffix
        s = s[:-5]
    return _seconds(s[8:], s[:8]) if len(s) > 8 else None


def _first(seq: Any, name: str) -> Any:
    """``seq[0].name`` for a functional-group sequence, or None."""
    if seq is None or len(seq) == 0:
        return None
    return getattr(seq[0], name, None)


def _group(fg: Any, shared: Any, seq_name: str) -> Any:
    """A functional group item from the per-frame item, else from the shared groups."""
    for src in (fg, shared):
        if src is not None and seq_name in src and len(src[seq_name].value):
            return src[seq_name].value[0]
    return None


def _classic_slices(files: list[Path]) -> tuple[list[_Slice], Any]:
    import pydicom

    slices: list[_Slice] = []
    first = None
    series_uids = set()
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=False)
        except Exception:
            continue  # not DICOM (DICOMDIR, notes): skipped like a DICOM viewer would
        if "PixelData" not in ds:
            continue
        if getattr(ds, "NumberOfFrames", 1) not in (None, "", 1, "1") and int(ds.NumberOfFrames) > 1:
            raise InputError(f, "folder mixes enhanced multi-frame and single-frame files; give the file itself")
        series_uids.add(str(getattr(ds, "SeriesInstanceUID", "")))
        first = first or ds
        try:
            ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
            iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
            ps = tuple(float(v) for v in ds.PixelSpacing)
        except (AttributeError, TypeError, ValueError):
            raise InputError(f, "DICOM file lacks image position/orientation/pixel spacing") from None
        times = {}
        for key, val in (
            ("acquisition", _datetime_seconds(getattr(ds, "AcquisitionDateTime", None))
             or _seconds(getattr(ds, "AcquisitionTime", None), getattr(ds, "AcquisitionDate", None))),
            ("content", _seconds(getattr(ds, "ContentTime", None), getattr(ds, "ContentDate", None))),
            ("trigger", float(ds.TriggerTime) / 1000.0 if getattr(ds, "TriggerTime", None) not in (None, "") else None),
        ):
            if val is not None:
                times[key] = float(val)
        tpi = getattr(ds, "TemporalPositionIdentifier", None)
        res = getattr(ds, "TemporalResolution", None)
        if tpi not in (None, "") and res not in (None, "") and float(res) > 0:
            times["temporal_position"] = (float(tpi) - 1) * float(res) / 1000.0
        order = float(tpi) if tpi not in (None, "") else (float(ds.InstanceNumber) if getattr(ds, "InstanceNumber", None) not in (None, "") else None)
        slices.append(_Slice(ipp, iop, ps, (lambda d=ds: d.pixel_array), float(getattr(ds, "RescaleSlope", 1) or 1),
                             float(getattr(ds, "RescaleIntercept", 0) or 0), times, order,
                             float(ds.SliceThickness) if getattr(ds, "SliceThickness", None) not in (None, "") else None))
    if len(series_uids) > 1:
        raise InputError(files[0].parent, f"folder holds {len(series_uids)} DICOM series; put one series per folder")
    return slices, first


def _enhanced_slices(ds: Any, path: Path) -> list[_Slice]:
    """One record per frame of an enhanced multi-frame object (functional groups)."""
    n = int(ds.NumberOfFrames)
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    per = ds.PerFrameFunctionalGroupsSequence if "PerFrameFunctionalGroupsSequence" in ds else [None] * n
    if len(per) != n:
        raise InputError(path, f"{len(per)} per-frame functional groups for {n} frames")
    cache: dict[str, np.ndarray] = {}

    def frame_pixels(k: int) -> np.ndarray:
        if "a" not in cache:
            arr = ds.pixel_array
            cache["a"] = arr if arr.ndim == 3 else arr[None]
        return cache["a"][k]

    out: list[_Slice] = []
    for k in range(n):
        fg = per[k]
        pos = _group(fg, shared, "PlanePositionSequence")
        ori = _group(fg, shared, "PlaneOrientationSequence")
        pm = _group(fg, shared, "PixelMeasuresSequence")
        if pos is None or ori is None or pm is None:
            raise InputError(path, f"frame {k + 1} lacks plane position/orientation/pixel measures")
        pvt = _group(fg, shared, "PixelValueTransformationSequence")
        content = _group(fg, None, "FrameContentSequence")
        times = {}
        if content is not None:
            t = _datetime_seconds(getattr(content, "FrameAcquisitionDateTime", None))
            if t is not None:
                times["acquisition"] = t
        order = None
        if content is not None and getattr(content, "TemporalPositionIndex", None) not in (None, ""):
            order = float(content.TemporalPositionIndex)
        out.append(_Slice(
            np.asarray([float(v) for v in pos.ImagePositionPatient]),
            np.asarray([float(v) for v in ori.ImageOrientationPatient]),
            tuple(float(v) for v in pm.PixelSpacing),
            (lambda k=k: frame_pixels(k)),
            float(getattr(pvt, "RescaleSlope", 1) or 1) if pvt is not None else float(getattr(ds, "RescaleSlope", 1) or 1),
            float(getattr(pvt, "RescaleIntercept", 0) or 0) if pvt is not None else float(getattr(ds, "RescaleIntercept", 0) or 0),
            times, order,
            float(pm.SliceThickness) if getattr(pm, "SliceThickness", None) not in (None, "") else None,
        ))
    return out


def _geometry(slices: list[_Slice], where: Path) -> tuple[np.ndarray, np.ndarray, list[list[int]], tuple, tuple, tuple]:
    """Positions grouped along the slice normal -> (projections, normal, groups, spacing, origin, direction)."""
    iop = slices[0].orientation
    if any(not np.allclose(s.orientation, iop, atol=1e-3) for s in slices):
        raise InputError(where, "slices have different orientations")
    if any(not np.allclose(s.spacing, slices[0].spacing, rtol=1e-4) for s in slices):
        raise InputError(where, "slices have different pixel spacings")
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    proj = np.array([float(s.position @ normal) for s in slices])
    keys = np.round(proj, 2)
    uniq = np.unique(keys)
    groups = [list(np.flatnonzero(keys == u)) for u in uniq]
    if len(uniq) > 1:
        gaps = np.diff(uniq)
        dz = float(np.median(gaps))
        if np.any(np.abs(gaps - dz) > max(0.01 * dz, 0.02)):
            raise InputError(where, f"slice spacing is not uniform ({gaps.min():.2f}-{gaps.max():.2f} mm)")
    else:
        dz = slices[0].thickness or 1.0
    first = slices[groups[0][0]]
    spacing = (first.spacing[1], first.spacing[0], dz)  # x = column spacing, y = row spacing
    direction = tuple(np.stack([row, col, normal], axis=1).ravel())  # columns = index axes
    return uniq, normal, groups, spacing, tuple(first.position), direction


def _frame_order(slices: list[_Slice], groups: list[list[int]], where: Path) -> tuple[list[list[int]], list[float] | None, str]:
    """For each slice position, its records in time order; and the frame times (None if unknown)."""
    counts = {len(g) for g in groups}
    if len(counts) != 1:
        raise InputError(where, f"slice positions have different numbers of time points {sorted(counts)}")
    n_t = counts.pop()
    for key in ("acquisition", "content", "temporal_position", "trigger"):
        if not all(key in slices[i].times for g in groups for i in g):
            continue
        ordered = [sorted(g, key=lambda i: slices[i].times[key]) for g in groups]
        t = np.array([[slices[i].times[key] for i in g] for g in ordered])  # (z, t)
        if n_t > 1 and np.any(np.diff(t, axis=1) <= 0):
            continue  # duplicate times at one position: this field does not resolve frames
        frame_t = t.mean(axis=0)
        return ordered, list(frame_t - frame_t[0]), key
    if all(slices[i].order is not None for g in groups for i in g):
        ordered = [sorted(g, key=lambda i: slices[i].order) for g in groups]
        return ordered, None, "order"
    if n_t == 1:
        return groups, None, "none"
    raise InputError(where, "frames cannot be told apart: no acquisition/content/trigger times or temporal positions")


def _assemble(slices: list[_Slice], where: Path) -> tuple[np.ndarray, tuple, tuple, tuple, list[float] | None, str]:
    uniq, normal, groups, spacing, origin, direction = _geometry(slices, where)
    ordered, times, key = _frame_order(slices, groups, where)
    n_z, n_t = len(ordered), len(ordered[0])
    rows, cols = slices[0].pixels().shape
    out = np.empty((n_t, n_z, rows, cols), np.float32)
    for z, g in enumerate(ordered):
        for t, i in enumerate(g):
            s = slices[i]
            px = s.pixels()
            if px.shape != (rows, cols):
                raise InputError(where, f"slices have different sizes {px.shape} vs {(rows, cols)}")
            out[t, z] = px.astype(np.float32) * s.slope + s.intercept
    return out, spacing, origin, direction, times, key


def read_dicom_series(path: str | Path) -> Image:
    """A DICOM folder (one multi-temporal series) or an enhanced multi-frame file -> 4D Image."""
    import pydicom

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        slices, first = _classic_slices(files)
        if not slices:
            raise InputError(path, "folder holds no DICOM images")
    else:
        try:
            first = pydicom.dcmread(str(path))
        except Exception:
            raise InputError(path, "not a readable DICOM file") from None
        if int(getattr(first, "NumberOfFrames", 1) or 1) < 2:
            raise InputError(path, "single-frame DICOM file; give the folder of the series")
        slices = _enhanced_slices(first, path)
    arr, spacing, origin, direction, times, key = _assemble(slices, path)
    meta: dict[str, Any] = {"source": str(path), "time_source": key}
    if times is not None:
        meta["times"] = times
    for attr, name in (("Modality", "dicom_modality"), ("SeriesDescription", "series_description"),
                       ("Manufacturer", "manufacturer")):
        if getattr(first, attr, None) not in (None, ""):
            meta[name] = str(getattr(first, attr))
    te = getattr(first, "EchoTime", None)
    if te in (None, "") and "SharedFunctionalGroupsSequence" in first:
        te = _first(getattr(first.SharedFunctionalGroupsSequence[0], "MREchoSequence", None), "EffectiveEchoTime")
    if te not in (None, ""):
        meta["echo_time_ms"] = float(te)
    if arr.shape[0] == 1:
        return Image(arr[0], spacing, origin, direction, meta)
    return Image(arr, spacing, origin, direction, meta)


# -- ready-made parametric maps ------------------------------------------------------------------

MAP_KINDS = {"RCBF": "cbf", "CBF": "cbf", "RCBV": "cbv", "CBV": "cbv", "MTT": "mtt", "TTP": "ttp",
             "TMAX": "tmax", "TIME TO MAXIMUM": "tmax", "TIME TO PEAK": "ttp"}
CANONICAL_UNITS = {"cbf": "mL/100g/min", "cbv": "mL/100g", "mtt": "s", "ttp": "s", "tmax": "s"}
BRAIN_DENSITY = 1.04  # g/mL: per-volume map units to per-mass units


def _unit_factor(kind: str, unit: str) -> float | None:
    """Factor from ``unit`` to the canonical unit of ``kind`` (None when not understood)."""
    u = unit.lower().replace(" ", "").replace("(", "").replace(")", "").replace(".", "")
    if kind == "cbf":
        per = {"s": 60.0, "sec": 60.0, "min": 1.0}
        for basis, f in (("ml/100ml/", 1.0 / BRAIN_DENSITY), ("ml/100g/", 1.0), ("ml/g/", 100.0), ("ml/ml/", 100.0 / BRAIN_DENSITY)):
            if u.startswith(basis) and u[len(basis):] in per:
                return f * per[u[len(basis):]]
        return None
    if kind == "cbv":
        return {"ml/100ml": 1.0 / BRAIN_DENSITY, "ml/100g": 1.0, "ml/g": 100.0, "%": 1.0 / BRAIN_DENSITY}.get(u)
    return {"s": 1.0, "sec": 1.0, "ms": 1e-3, "min": 60.0}.get(u)


def read_perfusion_map(path: str | Path, *, kind: str | None = None) -> Image:
    """A ready-made perfusion map with its geometry and units converted to StrokeSeg's
    (CBF mL/100g/min, CBV mL/100g, times s).

    DICOM (enhanced multi-frame or a folder): the Real World Value Mapping gives the values and
    units and the image type the map kind. Other formats carry no units: the values are taken
    as already canonical and ``meta["units_assumed"]`` says so.
    """
    import pydicom

    path = Path(path)
    from ..io import image_suffix, read_image

    if path.is_file() and image_suffix(path) and not path.name.lower().endswith(".dcm"):
        img = read_image(path)
        if img.is_4d:
            raise InputError(path, "4D series where a parametric map is expected")
        k = kind or _kind_from_name(path.name)
        img.meta.update({"map": k, "units": CANONICAL_UNITS.get(k or "", "unknown"), "units_assumed": True})
        return img
    img = read_dicom_series(path)
    if img.is_4d:
        raise InputError(path, "4D series where a parametric map is expected")
    ds_path = path if path.is_file() else next(p for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith("."))
    ds = pydicom.dcmread(str(ds_path), stop_before_pixels=True)
    rwv = None
    for src in ([ds.SharedFunctionalGroupsSequence[0]] if "SharedFunctionalGroupsSequence" in ds else []) + [ds]:
        if "RealWorldValueMappingSequence" in src and len(src.RealWorldValueMappingSequence):
            rwv = src.RealWorldValueMappingSequence[0]
            break
    image_type = [str(v).upper() for v in getattr(ds, "ImageType", [])]
    label = str(getattr(rwv, "LUTLabel", "") or "").upper() if rwv is not None else ""
    k = kind
    for cand in [label] + image_type[2:]:
        if k is None and cand in MAP_KINDS:
            k = MAP_KINDS[cand]
    if k is None:
        raise InputError(path, f"cannot tell which perfusion map this is (image type {'/'.join(image_type) or 'none'}); name it")
    arr = img.array
    meta = dict(img.meta)
    if rwv is not None and getattr(rwv, "RealWorldValueSlope", None) is not None:
        # The RWV mapping applies to stored values; undo the modality rescale applied on reading.
        stored = _stored_values(ds, arr, path)
        arr = stored * float(rwv.RealWorldValueSlope) + float(rwv.RealWorldValueIntercept)
        units_seq = getattr(rwv, "MeasurementUnitsCodeSequence", None)
        unit = str(_first(units_seq, "CodeValue") or "")
        meta["source_units"] = unit
        meta["lut_explanation"] = str(getattr(rwv, "LUTExplanation", "") or "")
    else:
        unit = ""
    factor = _unit_factor(k, unit) if unit else None
    if factor is None:
        meta.update({"units": CANONICAL_UNITS[k], "units_assumed": True})
    else:
        chosen = _plausible_factor(k, arr, factor)
        if chosen != factor:
            # A header unit that makes the map physiologically impossible is a labelling slip
            # (e.g. per second written for per minute); keep the factor that gives brain values.
            meta["units_note"] = (f"declared unit {unit!r} gives implausible {k} values; "
                                  f"read as {unit.rsplit('/', 1)[0]}/{'min' if chosen < factor else 's'}")
        arr = arr * chosen
        meta.update({"units": CANONICAL_UNITS[k], "units_assumed": False, "unit_factor": chosen})
    negative = int(np.count_nonzero(arr < 0))
    if negative:  # padding / background below zero: no perfusion quantity is negative
        arr = np.maximum(arr, 0)
        meta["negative_set_to_zero"] = negative
    meta["map"] = k
    return Image(arr.astype(np.float32), img.spacing, img.origin, img.direction, meta)


PLAUSIBLE_MEDIAN = {"cbf": (3.0, 300.0), "cbv": (0.3, 30.0), "mtt": (0.3, 60.0), "ttp": (0.3, 90.0), "tmax": (0.0, 60.0)}


def _plausible_factor(kind: str, arr: np.ndarray, factor: float) -> float:
    """The declared factor if it gives a plausible median over the positive voxels, else the
    per-minute/per-second alternative that does (the declared one when neither does)."""
    vals = arr[np.isfinite(arr) & (arr > 0)]
    if vals.size == 0:
        return factor
    med = float(np.median(vals))
    lo, hi = PLAUSIBLE_MEDIAN[kind]
    for f in (factor, factor / 60.0, factor * 60.0):
        if lo <= med * f <= hi:
            return f
    return factor


def _stored_values(ds: Any, arr: np.ndarray, path: Path) -> np.ndarray:
    """Invert the modality rescale (one slope/intercept for the object) to get stored values."""
    slope, intercept = 1.0, 0.0
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    pvt = _group(None, shared, "PixelValueTransformationSequence")
    src = pvt if pvt is not None else ds
    slope = float(getattr(src, "RescaleSlope", 1) or 1)
    intercept = float(getattr(src, "RescaleIntercept", 0) or 0)
    if "PerFrameFunctionalGroupsSequence" in ds:
        for fg in ds.PerFrameFunctionalGroupsSequence:
            p = _group(fg, None, "PixelValueTransformationSequence")
            if p is not None and (float(p.RescaleSlope) != slope or float(p.RescaleIntercept) != intercept):
                raise InputError(path, "frames have different rescale values and a real-world value map")
    return (arr.astype(np.float64) - intercept) / slope


def _kind_from_name(name: str) -> str | None:
    low = name.lower()
    for key in ("tmax", "ttp", "mtt", "cbf", "cbv"):
        if key in low:
            return key
    return None
