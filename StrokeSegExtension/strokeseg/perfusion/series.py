"""4D perfusion series in: NIfTI / NRRD / MHA through ``strokeseg.io``, DICOM through ``dicom4d``.

Frame times are what the deconvolution rests on, so they are checked hard: present, finite,
strictly increasing, one per frame. A NIfTI whose header leaves the frame interval unset would
come back from SimpleITK with a made-up 1 s step; here it is an error unless the caller gives
``dt`` or ``times``. Irregular sampling is kept as is (the deconvolution resamples it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..image import Image
from ..io import image_suffix, read_image

MIN_FRAMES = 12
MIN_DURATION_S = 20.0
DT_RANGE_S = (0.1, 10.0)  # plausible frame intervals for CT and MR perfusion


def _nifti_time_step(path: Path) -> float | None:
    """The frame interval the NIfTI header declares, in seconds (None when unset)."""
    import nibabel as nib

    hdr = nib.load(str(path)).header
    step = float(hdr["pixdim"][4])
    if not np.isfinite(step) or step == 0:
        return None
    if step < 0:  # not a NIfTI convention for time: a writer's bug, or frames stored last-first
        raise InputError(path, f"the header's frame interval is negative ({step:g}); give --dt or --times "
                               "(frames stored in reverse time order must be reordered first)")
    unit = hdr.get_xyzt_units()[1]
    return step / 1000.0 if unit == "msec" else step / 1e6 if unit == "usec" else step


def _read_vector_nrrd(path: Path) -> Image:
    """Slicer saves sequences as NRRD with the frames as pixel components ('list' axis):
    SimpleITK reads them as a vector image. Frame times come from the axis index values."""
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)  # (z, y, x, t)
    arr = np.moveaxis(arr, -1, 0)
    meta: dict = {"source": str(path)}
    for key in img.GetMetaDataKeys():
        if key.endswith("index values"):
            try:
                meta["times"] = [float(v) for v in img.GetMetaData(key).split()]
            except ValueError:
                pass
        if key.endswith(" unit") and "ms" in img.GetMetaData(key).lower():
            meta["time_unit_ms"] = True
    if meta.pop("time_unit_ms", False) and "times" in meta:
        meta["times"] = [t / 1000.0 for t in meta["times"]]
    return Image(np.ascontiguousarray(arr), img.GetSpacing(), img.GetOrigin(), img.GetDirection(), meta)


def load_series(path: str | Path, *, times: Sequence[float] | None = None, dt: float | None = None) -> Image:
    """Read a 4D perfusion series with its frame times (seconds, first frame at its own time).

    ``times`` (one per frame) or ``dt`` override what the file says. Raises InputError naming
    the file for anything unusable; the returned series has passed :func:`validate_series`.
    """
    path = Path(path)
    if path.is_dir() or (path.is_file() and image_suffix(path) == "" and _is_dicom(path)):
        from .dicom4d import read_dicom_series

        series = read_dicom_series(path)
    elif path.is_file() and image_suffix(path) in (".nrrd", ".nhdr") and _is_vector(path):
        series = _read_vector_nrrd(path)
    else:
        series = read_image(path)
        if series.is_4d and image_suffix(path) in (".nii", ".nii.gz") and times is None and dt is None:
            step = _nifti_time_step(path)
            if step is None:
                series.meta.pop("times", None)  # SimpleITK's 1 s is invented, not read
            else:
                t0 = float(series.meta["times"][0])
                series.meta["times"] = [t0 + k * step for k in range(series.array.shape[0])]
    if times is not None:
        series.meta["times"] = [float(t) for t in times]
    elif dt is not None:
        if not (np.isfinite(dt) and dt > 0):
            raise InputError(path, f"frame interval must be positive, got {dt}")
        n = series.array.shape[0] if series.is_4d else 1
        series.meta["times"] = [k * float(dt) for k in range(n)]
    series.meta.setdefault("source", str(path))
    validate_series(series, path)
    return series


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _is_vector(path: Path) -> bool:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return False
    return reader.GetNumberOfComponents() > 1


def validate_series(series: Image, where: str | Path | None = None, *, min_frames: int = MIN_FRAMES,
                    min_duration_s: float = MIN_DURATION_S) -> np.ndarray:
    """Check a 4D series for use; returns its frame times (float64, seconds)."""
    where = where if where is not None else series.meta.get("source")
    if not series.is_4d or series.array.shape[0] < 2:
        raise InputError(where, "3D volume where a 4D perfusion series (time x z x y x) is expected")
    n = series.array.shape[0]
    if sum(s > 1 for s in series.size) < 2:
        raise InputError(where, f"frames are not images (spatial size {series.size})")
    raw = series.meta.get("times")
    if raw is None:
        raise InputError(where, "frame times are missing (the header has no frame interval); give --dt or --times")
    t = np.asarray(raw, dtype=float)
    if t.shape != (n,):
        raise InputError(where, f"{t.size} frame times for {n} frames")
    if not np.all(np.isfinite(t)):
        raise InputError(where, "frame times contain NaN/Inf")
    steps = np.diff(t)
    if np.any(steps <= 0):
        k = int(np.argmax(steps <= 0)) + 1
        raise InputError(where, f"frame times are not strictly increasing (frame {k}: {t[k - 1]:.3f} s -> {t[k]:.3f} s)")
    if n < min_frames:
        raise InputError(where, f"series too short: {n} frames, at least {min_frames} needed")
    if t[-1] - t[0] < min_duration_s:
        raise InputError(where, f"series too short: {t[-1] - t[0]:.1f} s covered, at least {min_duration_s:.0f} s needed")
    lo, hi = DT_RANGE_S
    if steps.min() < lo or steps.max() > hi:
        raise InputError(where, f"implausible frame interval {steps.min():.3g}-{steps.max():.3g} s "
                                f"(expected {lo}-{hi} s; are the times in ms? give --dt)")
    # NIfTI: ITK reads NaN/Inf as 0, so read_image counted them in the file itself.
    if series.meta.get("nonfinite_voxels") or (np.issubdtype(series.array.dtype, np.floating)
                                               and not np.all(np.isfinite(series.array))):
        raise InputError(where, "series contains NaN/Inf voxels")
    if series.meta.get("placement_problem"):  # a NIfTI read by Slicer (StrokeSegLib.volumes.node_meta)
        raise InputError(where, series.meta["placement_problem"])
    return t


def uniform_grid(times: np.ndarray, max_samples: int = 120) -> tuple[np.ndarray, float]:
    """A uniform time grid over the series (step = the shortest interval, capped in count)."""
    span = float(times[-1] - times[0])
    dt = float(np.min(np.diff(times)))
    dt = max(dt, span / (max_samples - 1))
    n = int(np.floor(span / dt + 1e-6)) + 1
    return times[0] + dt * np.arange(n), dt


def resample_time(data: np.ndarray, times: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Linear interpolation of (T, ...) data onto ``grid``; a no-op when the grids agree."""
    if data.shape[0] == grid.size and np.allclose(times, grid, atol=1e-6):
        return data
    idx = np.clip(np.searchsorted(times, grid, side="right") - 1, 0, times.size - 2)
    w = ((grid - times[idx]) / (times[idx + 1] - times[idx])).astype(np.float32)
    shape = (-1,) + (1,) * (data.ndim - 1)
    return data[idx] * (1 - w).reshape(shape) + data[idx + 1] * w.reshape(shape)
