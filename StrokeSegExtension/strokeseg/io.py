"""Reading and writing images: NIfTI, NRRD, MHA and DICOM series through SimpleITK.

Every failure becomes an :class:`InputError` naming the file; writes are atomic
(a temporary file in the target folder, then ``os.replace``) so no half-written output
is ever left behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputError
from .image import Image

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
MAX_VOXELS = 1024**3 // 2  # ~537 M voxels: beyond this a "volume" is a mistake, not a scan
# DICOM tags copied into Image.meta (used by modality detection and ADC computation).
_DICOM_TAGS = {
    "0008|103e": "series_description",
    "0008|0060": "dicom_modality",
    "0018|0087": "field_strength",
    "0018|9087": "b_value",
    "0043|1039": "ge_b_value",
    "0018|0081": "echo_time",
    "0020|000e": "series_instance_uid",
    "0020|000d": "study_instance_uid",
}


def image_suffix(path: str | Path) -> str:
    name = Path(path).name.lower()
    for suf in IMAGE_SUFFIXES:
        if name.endswith(suf):
            return suf
    return ""


def strip_suffix(path: str | Path) -> str:
    """File name without its image suffix (``dwi.nii.gz`` -> ``dwi``)."""
    name = Path(path).name
    suf = image_suffix(name)
    return name[: len(name) - len(suf)] if suf else name


def _read_dicom_series(folder: Path) -> tuple[sitk.Image, dict[str, Any]]:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(folder, "folder holds no DICOM series")
    if len(series) > 1:
        raise InputError(folder, f"folder holds {len(series)} DICOM series; put one series per folder")
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.LoadPrivateTagsOn()
    img = reader.Execute()
    meta: dict[str, Any] = {"dicom_files": [str(f) for f in files]}
    for tag, key in _DICOM_TAGS.items():
        if reader.HasMetaDataKey(0, tag):
            meta[key] = reader.GetMetaData(0, tag).strip()
    return img, meta


def read_image(path: str | Path) -> Image:
    """Read a 3D or 4D image (file or DICOM folder) with its geometry.

    Raises InputError naming the file for anything that is not a readable image.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    try:
        if path.is_dir():
            img, meta = _read_dicom_series(path)
        else:
            if path.stat().st_size == 0:
                raise InputError(path, "file is empty")
            img = sitk.ReadImage(str(path))
            meta = {k: img.GetMetaData(k) for k in img.GetMetaDataKeys() if k in ("descrip", "intent_name")}
    except InputError:
        raise
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        hint = "not a readable image (corrupt or unsupported format)"
        if any("Unable to determine ImageIO" in line or "Could not create IO" in line for line in first):
            hint = "not an image file SimpleITK can read"
        raise InputError(path, hint) from None
    meta["source"] = str(path)
    n = int(np.prod(img.GetSize()))
    if n > MAX_VOXELS:
        raise InputError(path, f"volume is implausibly large ({img.GetSize()} voxels)")
    try:
        return Image.from_sitk(img, meta)
    except ValueError as exc:
        raise InputError(path, str(exc)) from None


def check_volume(image: Image, path: str | Path, *, allow_4d: bool = False) -> None:
    """Reject volumes no model should see: 4D, empty, constant, non-finite, absurd spacing."""
    if image.is_4d and not allow_4d:
        raise InputError(path, f"4D series ({image.array.shape[0]} frames) where a 3D volume is expected")
    if not image.is_4d and allow_4d is True and image.meta.get("require_4d"):
        raise InputError(path, "3D volume where a 4D series is expected")
    arr = image.array
    if min(image.size) < 1 or arr.size == 0:
        raise InputError(path, "volume has no voxels")
    if sum(s > 1 for s in image.size) < 2:
        raise InputError(path, f"volume is not 3D (size {image.size})")
    sp = np.asarray(image.spacing)
    if not np.all(np.isfinite(sp)) or np.any(sp < 0.05) or np.any(sp > 20.0):
        raise InputError(path, f"absurd voxel spacing {tuple(round(s, 4) for s in image.spacing)} mm")
    if np.issubdtype(arr.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise InputError(path, f"volume contains {bad} NaN/Inf voxels")
    if not np.any(arr):
        raise InputError(path, "volume is all zero")
    if float(arr.max()) == float(arr.min()):
        raise InputError(path, "volume is constant")


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(path.parent, os.W_OK):
        raise OutputError(f"{path.parent}: output folder is not writable")
    suffix = image_suffix(path) or path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_image(image: Image, path: str | Path, *, compress: bool = True) -> Path:
    """Write atomically; the file appears complete or not at all."""
    path = Path(path)
    try:
        tmp = _atomic_target(path)
    except PermissionError as exc:
        raise OutputError(f"{path.parent}: output folder is not writable") from exc
    try:
        sitk.WriteImage(image.to_sitk(), str(tmp), compress)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, RuntimeError):
            raise OutputError(f"{path}: could not be written ({str(exc).strip().splitlines()[-1][:120]})") from None
        raise
    return path


def write_text(text: str, path: str | Path) -> Path:
    """Atomic text write (reports, JSON)."""
    path = Path(path)
    try:
        tmp = _atomic_target(path)
    except PermissionError as exc:
        raise OutputError(f"{path.parent}: output folder is not writable") from exc
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
