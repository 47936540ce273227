"""DICOM in and out: phantom series for testing and sample data, DICOM SEG of the result.

``write_dicom_series`` turns an engine image into a single-frame MR (or CT) series with exact
geometry (ImagePositionPatient / ImageOrientationPatient from the image's LPS geometry) so that
Slicer's DICOM reading and the SEG export can be exercised without patient data.

``write_dicom_seg`` writes a DICOM Segmentation (highdicom) that references the source
series: one frame per source slice, matched to the source instances by their position along
the slice normal, so every frame's derivation points at the right SOP instance.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from strokeseg.errors import InputError, OutputError
from strokeseg.image import Image

from .terminology import Code

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def write_dicom_series(
    image: Image,
    folder: str | Path,
    *,
    series_description: str,
    modality: str = "MR",
    patient_id: str = "STROKESEG-PHANTOM",
    patient_name: str = "StrokeSeg^Phantom",
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    b_value: float | None = None,
) -> list[Path]:
    """One file per slice (``IM0001.dcm``...) of a 3D image; returns the file paths in slice order."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    if image.is_4d:
        raise ValueError("write_dicom_series writes 3D images")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(image.array, dtype=np.float64)
    if modality == "CT":
        slope, intercept = 1.0, 0.0
        stored = np.clip(np.round(arr), -32768, 32767).astype(np.int16)
    else:
        peak = float(np.abs(arr).max()) or 1.0
        slope, intercept = peak / 30000.0, 0.0
        stored = np.round(arr / slope).astype(np.int16)
    sop_class = CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    frame_uid = frame_of_reference_uid or generate_uid()
    direction = image.direction_matrix
    now = datetime.datetime.now()
    nz, ny, nx = arr.shape
    paths = []
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.Modality = modality
        ds.Manufacturer = "StrokeSeg phantom"
        ds.SeriesDescription = series_description
        ds.SeriesNumber = series_number
        ds.InstanceNumber = k + 1
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [float(v) for v in image.index_to_physical([[0.0, 0.0, float(k)]])[0]]
        ds.ImageOrientationPatient = [float(v) for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [float(image.spacing[1]), float(image.spacing[0])]  # row spacing, column spacing
        ds.SliceThickness = float(image.spacing[2])
        ds.SpacingBetweenSlices = float(image.spacing[2])
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleSlope = f"{slope:.10g}"
        if modality == "CT":
            ds.RescaleType = "HU"
        if b_value is not None:
            ds.DiffusionBValue = float(b_value)
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        path = folder / f"IM{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@dataclass
class SegSegment:
    """One segment of a DICOM SEG: mask on the reference grid and its codes."""

    mask: np.ndarray  # (z, y, x) 0/1 on the reference volume's grid
    label: str
    category: Code
    type: Code
    region: Code | None = None
    edited: bool = False  # user-corrected: SEMIAUTOMATIC instead of AUTOMATIC


def _code(code: Code):
    from highdicom.sr import CodedConcept

    scheme, value, meaning = code
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def _match_slices(reference: Image, datasets: list) -> list[int]:
    """For each k of the reference grid, the index of the source dataset at that slice position."""
    direction = reference.direction_matrix
    try:
        iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    except AttributeError:
        raise InputError(None, "the source DICOM series has no ImageOrientationPatient") from None
    if not (np.allclose(iop[:3], direction[:, 0], atol=1e-3) and np.allclose(iop[3:], direction[:, 1], atol=1e-3)):
        raise InputError(None, "the reference volume's orientation differs from its DICOM series (was it resampled?)")
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    nx, ny, nz = reference.size
    if (rows, cols) != (ny, nx):
        raise InputError(None, f"DICOM slices are {rows}x{cols}, the reference volume {ny}x{nx}")
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=float) for ds in datasets])
    wanted = reference.index_to_physical(np.array([[0.0, 0.0, float(k)] for k in range(nz)]))
    tol = 0.05 * min(reference.spacing)
    order = []
    for k, point in enumerate(wanted):
        dist = np.linalg.norm(positions - point[None, :], axis=1)
        i = int(np.argmin(dist))
        if dist[i] > tol:
            raise InputError(None, f"no source DICOM slice at slice {k} of the reference volume (nearest {dist[i]:.2f} mm)")
        order.append(i)
    if len(set(order)) != len(order):
        raise InputError(None, "source DICOM slices do not map one-to-one onto the reference volume")
    return order


def write_dicom_seg(
    path: str | Path,
    *,
    reference: Image,
    source_files: Sequence[str | Path],
    segments: Sequence[SegSegment],
    algorithm_name: str,
    algorithm_version: str,
    series_description: str = "StrokeSeg lesion segmentation",
    series_number: int = 900,
) -> Path:
    """Write a binary DICOM SEG referencing ``source_files``; atomic (temp file, then rename)."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from strokeseg import __version__

    path = Path(path)
    if not segments:
        raise ValueError("no segments to write")
    try:
        datasets = [pydicom.dcmread(str(f)) for f in source_files]
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise InputError(None, f"source DICOM files cannot be read ({exc})") from None
    order = _match_slices(reference, datasets)
    sources = [datasets[i] for i in order]
    pixels = np.stack([np.asarray(s.mask, dtype=bool) for s in segments], axis=-1)  # (z, y, x, segments)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, version=algorithm_version, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = []
    for number, s in enumerate(segments, start=1):
        kind = hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC if s.edited else hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=s.label[:64],
                segmented_property_category=_code(s.category),
                segmented_property_type=_code(s.type),
                algorithm_type=kind,
                algorithm_identification=algorithm,
                anatomic_regions=[_code(s.region)] if s.region else None,
                tracking_uid=hd.UID(),
                tracking_id=s.label[:64],
            )
        )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="StrokeSeg",
        manufacturer_model_name="StrokeSeg 3D Slicer extension",
        software_versions=__version__,
        device_serial_number="0",
        series_description=series_description[:64],
        omit_empty_frames=False,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        seg.save_as(str(tmp))
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: could not be written ({exc.strerror or exc})") from None
    return path
