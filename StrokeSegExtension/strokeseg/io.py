"""Reading and writing images: NIfTI, NRRD, MHA and DICOM series through SimpleITK.

Every failure becomes an :class:`InputError` naming the file; writes are atomic
(a temporary file in the target folder, then ``os.replace``) so no half-written output
is ever left behind.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

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
    "0018|0080": "repetition_time",
    "0018|0082": "inversion_time",
    "0008|0008": "image_type",
    "0018|0024": "sequence_name",
    "0018|0020": "scanning_sequence",
    "0018|1030": "protocol_name",
    "0008|0070": "manufacturer",
    "0019|100c": "siemens_b_value",
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


class SliceSpacingProblem(NamedTuple):
    kind: str  # "repeated" (several volumes in one series) or "uneven" (e.g. a missing slice)
    message: str


def slice_spacing_problem(positions: np.ndarray, normal: np.ndarray) -> SliceSpacingProblem | None:
    """What is wrong with the slice positions of a DICOM series (ImagePositionPatient per file,
    (n, 3) mm, in any order) along the slice ``normal``, or None when they step evenly.

    ITK, and Slicer's DICOM loading without its acquisition-geometry regularisation, stack a
    series whose slices are unevenly spaced (a missing file, two volumes in one series) with one
    averaged spacing and only a console warning, which moves part of the volume by millimetres."""
    pos = np.asarray(positions, dtype=float)
    n = pos.shape[0]
    if n < 3 or pos.shape != (n, 3):
        return None
    along = np.sort(pos @ np.asarray(normal, dtype=float))
    steps = np.diff(along)
    step = float(np.median(steps))
    if np.unique(np.round(along, 2)).size < n:
        return SliceSpacingProblem("repeated", f"{n} images but repeated slice positions: several volumes in one series "
                                   "(b-values, echoes or time points?); export one volume per folder")
    k = int(np.argmax(np.abs(steps - step)))
    if abs(steps[k] - step) > max(0.1 * abs(step), 0.05):
        return SliceSpacingProblem("uneven", f"slices are not evenly spaced (step {abs(step):.2f} mm, but "
                                   f"{abs(steps[k]):.2f} mm after slice {k + 1} of {n}): a missing slice?")
    return None


def _series_spacing_problem(reader: sitk.ImageSeriesReader, img: sitk.Image, n: int) -> str | None:
    try:
        pos = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")] for i in range(n)])
    except (RuntimeError, ValueError):  # no ImagePositionPatient (secondary capture): nothing to check
        return None
    problem = slice_spacing_problem(pos, np.asarray(img.GetDirection()).reshape(3, 3)[:, 2])
    return problem.message if problem else None


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
    problem = _series_spacing_problem(reader, img, len(files))
    if problem:
        raise InputError(folder, problem)
    meta: dict[str, Any] = {"dicom_files": [str(f) for f in files]}
    for tag, key in _DICOM_TAGS.items():
        if reader.HasMetaDataKey(0, tag):
            meta[key] = reader.GetMetaData(0, tag).strip()
    return img, meta


def _nifti_truncation(path: Path) -> str | None:
    """ITK reads a truncated NIfTI without complaint (missing voxels come back as garbage),
    so compare the bytes present with what the header promises. The header is read by
    SimpleITK (header only), not nibabel: importing nibabel costs ~0.2 s of a cold `segment`."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO("NiftiImageIO")
    try:
        reader.ReadImageInformation()
        header = {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}
        ndim = int(header["dim[0]"])
        voxels = int(np.prod([int(header[f"dim[{i}]"]) for i in range(1, ndim + 1)], dtype=np.int64))
        expected = int(float(header["vox_offset"])) + voxels * int(header["bitpix"]) // 8
    except (RuntimeError, KeyError, ValueError):  # not parseable as NIfTI: SimpleITK's read will report it
        return None
    if not path.name.lower().endswith(".gz"):
        actual = path.stat().st_size
        return None if actual >= expected else f"file is truncated ({actual} of {expected} bytes)"
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        isize = int.from_bytes(fh.read(4), "little")  # gzip trailer: uncompressed size mod 2**32
        if isize == expected % 2**32:
            return None
        # Trailer disagrees (truncated, or padded/multi-member): decompress to be sure.
        fh.seek(0)
        actual, complete, d = 0, False, zlib.decompressobj(wbits=31)
        try:
            while chunk := fh.read(1 << 20):
                while chunk:
                    actual += len(d.decompress(chunk))
                    if d.eof:  # a member ended; another may follow
                        chunk, d = d.unused_data, zlib.decompressobj(wbits=31)
                        complete = True
                    else:
                        chunk, complete = b"", False
        except zlib.error:
            return "file is corrupt (bad gzip data)"
    if not complete or actual < expected:
        return f"file is truncated ({actual} of {expected} bytes after decompression)"
    return None


def _nifti_nonfinite(path: Path, img: sitk.Image | sitk.ImageFileReader) -> int:
    """NaN/Inf voxels of a floating-point NIfTI. ITK's NIfTI reader (SimpleITK <= 2.5) silently
    turns them into 0 (fixed only in ITK 6, InsightSoftwareConsortium/ITK#6683), which would make a
    NaN slice of a DWI or ADC read as real zeros; nibabel reads the stored values."""
    if sitk.GetPixelIDValueAsString(img.GetPixelID()) not in ("32-bit float", "64-bit float", "vector of 32-bit float",
                                                              "vector of 64-bit float"):
        return 0
    import nibabel  # here only: its import costs ~0.2 s of a cold `segment` on integer files

    try:
        data = np.asanyarray(nibabel.load(str(path)).dataobj)
    except (OSError, ValueError, EOFError, nibabel.filebasedimages.ImageFileError):
        return 0  # nibabel cannot read what ITK could: ITK's reading stands
    return int(np.count_nonzero(~np.isfinite(data)))


def _nifti_sform_disagrees(img: sitk.Image | sitk.ImageFileReader, tolerance_mm: float = 1.0) -> str | None:
    """A NIfTI carries two placements, qform and sform. ITK (and so Slicer) may take the qform
    where FSL, nibabel and most Python tools take the sform; where both are set and place the
    volume differently, a mask made with one tool lands elsewhere in the other, so the file is
    refused rather than read one way silently."""
    try:
        if int(img.GetMetaData("sform_code")) <= 0:
            return None
        srow = np.array([[float(v) for v in img.GetMetaData(f"srow_{a}").split()] for a in "xyz"])
    except (RuntimeError, ValueError):
        return None
    if srow.shape != (3, 4):
        return None
    dim = img.GetDimension()
    size = np.array(img.GetSize()[:3], float) - 1.0
    corners = np.array([[i, j, k] for i in (0, size[0]) for j in (0, size[1]) for k in (0, size[2])])
    direction = np.asarray(img.GetDirection()).reshape(dim, dim)[:3, :3]
    itk_lps = np.asarray(img.GetOrigin()[:3]) + corners * np.asarray(img.GetSpacing()[:3]) @ direction.T
    sform_lps = (corners @ srow[:, :3].T + srow[:, 3]) * np.array([-1.0, -1.0, 1.0])  # RAS -> LPS
    off = float(np.max(np.linalg.norm(itk_lps - sform_lps, axis=1)))
    if off > tolerance_mm:
        return (f"its qform and sform place the volume {off:.1f} mm apart (ITK/Slicer read one, FSL/nibabel the "
                "other); fix the header so that they agree")
    return None


def nifti_file_meta(path: str | Path) -> dict[str, Any]:
    """What the NIfTI reader hides, read from the file itself: ``nonfinite_voxels`` (NaN/Inf that
    ITK turned into 0) and ``placement_problem`` (qform and sform disagree). For volumes that were
    read elsewhere from ``path`` (Slicer's own loading of a NIfTI goes through the same ITK reader);
    ``check_volume`` refuses either. Empty for anything that is not a readable NIfTI."""
    path = Path(path)
    if image_suffix(path) not in (".nii", ".nii.gz") or not path.is_file():
        return {}
    st = path.stat()
    return dict(_nifti_file_meta(str(path), st.st_mtime_ns, st.st_size))  # a copy: callers may edit it


@functools.lru_cache(maxsize=64)  # the Slicer module asks again on every detection; a file is read once
def _nifti_file_meta(path: str, _mtime_ns: int, _size: int) -> dict[str, Any]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return {}
    # the reader answers the header questions an Image does (pixel type, geometry, metadata)
    meta: dict[str, Any] = {"nonfinite_voxels": _nifti_nonfinite(Path(path), reader)}
    placement = _nifti_sform_disagrees(reader)
    if placement:
        meta["placement_problem"] = placement
    return meta


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
            if image_suffix(path) in (".nii", ".nii.gz"):
                problem = _nifti_truncation(path)
                if problem:
                    raise InputError(path, problem)
            img = sitk.ReadImage(str(path))
            meta = {k: img.GetMetaData(k) for k in img.GetMetaDataKeys() if k in ("descrip", "intent_name")}
            if image_suffix(path) in (".nii", ".nii.gz"):
                meta["nonfinite_voxels"] = _nifti_nonfinite(path, img)
                problem = _nifti_sform_disagrees(img)
                if problem:
                    raise InputError(path, problem)
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
    if image.meta.get("placement_problem"):
        raise InputError(path, image.meta["placement_problem"])
    bad = int(image.meta.get("nonfinite_voxels", 0))  # NIfTI: counted in the file (see _nifti_nonfinite)
    if np.issubdtype(arr.dtype, np.floating):
        bad = max(bad, int(np.count_nonzero(~np.isfinite(arr))))
    if bad:
        raise InputError(path, f"volume contains {bad} NaN/Inf voxels")
    if not np.any(arr):
        raise InputError(path, "volume is all zero")
    if float(arr.max()) == float(arr.min()):
        raise InputError(path, "volume is constant")


def _prepare_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a parent is a file, read-only filesystem, no permission
        raise OutputError(f"{folder}: output folder cannot be created ({exc.strerror or exc})") from None
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise OutputError(f"{folder}: output folder is not writable")


def _atomic_target(path: Path) -> Path:
    """A temporary file beside ``path`` to write and then ``os.replace`` onto it."""
    _prepare_folder(path.parent)
    suffix = image_suffix(path) or path.suffix
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise OutputError(f"{path.parent}: output folder is not writable ({exc.strerror or exc})") from None
    os.close(fd)
    # mkstemp makes the file private (0600); outputs get the usual permissions instead.
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return Path(tmp)


def write_image(image: Image, path: str | Path, *, compress: bool = True) -> Path:
    """Write atomically; the file appears complete or not at all.

    SimpleITK writes into a private temporary folder beside the target under the final
    name, so two-file formats (.mhd + .raw, .nhdr + .raw) keep their data-file reference;
    the files are then moved into place, the header last.
    """
    path = Path(path)
    _prepare_folder(path.parent)
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as exc:
        raise OutputError(f"{path.parent}: output folder is not writable ({exc.strerror or exc})") from None
    try:
        tmp = tmp_dir / path.name
        try:
            sitk.WriteImage(image.to_sitk(), str(tmp), compress)
        except RuntimeError as exc:
            raise OutputError(f"{path}: could not be written ({str(exc).strip().splitlines()[-1][:120]})") from None
        for extra in sorted(tmp_dir.iterdir()):
            if extra.name != path.name:
                os.replace(extra, path.parent / extra.name)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"{path}: could not be written ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def write_bytes(data: bytes, path: str | Path) -> Path:
    """Atomic write of a whole file (reports, JSON, PNG)."""
    path = Path(path)
    tmp = _atomic_target(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"{path}: could not be written ({exc.strerror or exc})") from None
        raise
    return path


def write_text(text: str, path: str | Path) -> Path:
    """Atomic text write (reports, JSON)."""
    return write_bytes(text.encode("utf-8"), path)


def check_overwrite(out_dir: str | Path, names: Sequence[str]) -> None:
    """Outputs may replace StrokeSeg's own earlier outputs (a folder whose report.json carries
    ``engine_version``), never someone's files: ``--out`` pointed at a case folder would
    otherwise replace its ``lesion.nii.gz`` (a reference or hand-edited mask) or its maps."""
    out_dir = Path(out_dir)
    existing = [n for n in names if (out_dir / n).exists()]
    if not existing:
        return
    try:
        report = json.loads((out_dir / "report.json").read_text())
        ours = isinstance(report, dict) and "engine_version" in report
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise OutputError(f"{out_dir / existing[0]}: exists and is not a StrokeSeg output (a mask or map of yours?); "
                          "choose another --out folder")


@contextmanager
def staged_outputs(out_dir: str | Path, names: Sequence[str]) -> Iterator[Path]:
    """Write a result's files into a temporary sibling folder, then move them into ``out_dir``.

    All files appear or none: on any error (or Ctrl-C) nothing is moved and the stage is
    removed. ``names`` are moved in order, so the last one (a report) marks completion.
    Files that StrokeSeg did not write are never replaced (:func:`check_overwrite`).
    """
    out_dir = Path(out_dir)
    check_overwrite(out_dir, names)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    except OSError as exc:
        raise OutputError(f"{out_dir}: output folder is not writable ({exc.strerror or exc})") from None
    try:
        yield stage
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            (out_dir / name).unlink(missing_ok=True)
        for name in names:
            shutil.move(str(stage / name), str(out_dir / name))
    except OSError as exc:
        raise OutputError(f"{out_dir}: could not write results ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
