"""Exporting a result: NIfTI mask and probability, ``.seg.nrrd``, DICOM SEG, report CSV + JSON.

Everything is written into a hidden staging folder inside the destination first; only when
every file was written are they moved into place (``os.replace``, atomic per file). A failure (a
full disk, a reference volume that no longer matches its DICOM series) leaves the destination
as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import slicer

from strokeseg.errors import InputError, OutputError
from strokeseg.io import write_image, write_text
from strokeseg.report import report_to_csv

from .dicom import SegSegment, write_dicom_seg
from .segmentation import is_user_edited, read_mask
from .terminology import parse_terminology
from .volumes import dicom_files, image_from_volume

MASK_FILE = "lesion.nii.gz"
PROBABILITY_FILE = "probability.nii.gz"
SEGMENTATION_FILE = "lesion.seg.nrrd"
DICOM_SEG_FILE = "lesion-seg.dcm"
REPORT_JSON = "report.json"
REPORT_CSV = "report.csv"


@dataclass
class ExportRequest:
    out_dir: Path
    reference: Any  # reference volume node
    probability: Any | None  # probability volume node
    segmentation: Any  # segmentation node
    lesion_segment_id: str
    report: Mapping[str, Any]
    dicom_seg: bool = True
    file_for_instance: Callable[[str], str] | None = None
    algorithm_version: str = ""


def write_segmentation_file(segmentation_node: Any, path: str | Path) -> Path:
    """``.seg.nrrd`` through Slicer's segmentation storage node (all segments, tags, terminology)."""
    path = Path(path)
    tmp = path.with_name(f".{os.getpid()}.{path.name}")  # keeps the .seg.nrrd suffix for the writer
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(tmp))
    try:
        if not storage.WriteData(segmentation_node):
            raise OutputError(f"{path}: the segmentation could not be written")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _segments_for_dicom(request: ExportRequest) -> list[SegSegment]:
    segmentation = request.segmentation.GetSegmentation()
    segments = []
    for i in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(i)
        segment = segmentation.GetSegment(segment_id)
        codes = parse_terminology(segment.GetTerminology()) if segment.GetTerminology() else {}
        if not codes.get("category") or not codes.get("type"):
            continue  # a segment without standard codes cannot go into a DICOM SEG
        mask = read_mask(request.segmentation, segment_id, request.reference)
        edited = is_user_edited(request.segmentation, segment_id, request.reference, mask)
        segments.append(SegSegment(mask, segment.GetName(), codes["category"], codes["type"], codes.get("region"), edited))
    return segments


@contextmanager
def _staged(out_dir: Path) -> Iterator[tuple[Path, dict[str, Path]]]:
    """A temporary folder inside ``out_dir`` and a name -> file dict for the caller to fill. On
    success every file is moved into ``out_dir`` (the dict then points there); on any error none
    is, so an export appears whole or not at all, and the stage is removed either way."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".strokeseg-export-", dir=out_dir))
    except OSError as exc:
        raise OutputError(f"{out_dir}: output folder is not writable ({exc.strerror or exc})") from None
    written: dict[str, Path] = {}
    try:
        yield stage, written
        for key, path in written.items():
            target = out_dir / path.name
            os.replace(path, target)
            written[key] = target
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def export_results(request: ExportRequest) -> dict[str, Path]:
    """Write every output into ``request.out_dir``; returns name -> path of what was written."""
    with _staged(Path(request.out_dir)) as (stage, written):
        reference = image_from_volume(request.reference)
        mask = read_mask(request.segmentation, request.lesion_segment_id, request.reference)
        written["mask"] = write_image(reference.with_array(mask.astype(np.uint8)), stage / MASK_FILE)
        if request.probability is not None:
            probability = image_from_volume(request.probability)
            written["probability"] = write_image(probability.with_array(probability.array.astype(np.float32)),
                                                 stage / PROBABILITY_FILE)
        written["segmentation"] = write_segmentation_file(request.segmentation, stage / SEGMENTATION_FILE)
        written["report_json"] = write_text(json.dumps(request.report, indent=2), stage / REPORT_JSON)
        written["report_csv"] = write_text(report_to_csv(dict(request.report)), stage / REPORT_CSV)
        sources = dicom_files(request.reference, request.file_for_instance) if request.dicom_seg else []
        if sources:
            segments = _segments_for_dicom(request)
            if segments:
                model = request.report.get("model") or {}
                try:
                    written["dicom_seg"] = write_dicom_seg(
                        stage / DICOM_SEG_FILE, reference=reference, source_files=sources, segments=segments,
                        algorithm_name=f"StrokeSeg {model.get('id', '')}".strip(),
                        algorithm_version=str(model.get("version") or request.algorithm_version or "unknown"),
                    )
                except InputError as exc:  # name the volume the user knows
                    raise InputError(request.reference.GetName(), f"DICOM SEG not written: {exc.problem}") from None
    return written



# -- perfusion -----------------------------------------------------------------------------------
PERFUSION_SEGMENTATION_FILE = "perfusion.seg.nrrd"
# The measures of report.csv, with their units: the engine's perfusion report keys.
PERFUSION_CSV_ROWS = (("core_ml", "mL"), ("penumbra_ml", "mL"), ("hypoperfusion_ml", "mL"), ("mismatch_ml", "mL"),
                      ("mismatch_ratio", ""), ("hir", ""), ("tmax_severe_ml", "mL"))


def perfusion_csv(report: Mapping[str, Any]) -> str:
    """report.csv of a perfusion result: one row per measure (measure, value, unit), thresholds last."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["measure", "value", "unit"])
    for key, unit in PERFUSION_CSV_ROWS:
        if key in report:
            writer.writerow([key, "" if report[key] is None else report[key], unit])
    for key, value in (report.get("thresholds") or {}).items():
        writer.writerow([f"threshold_{key}", "" if value is None else value, ""])
    writer.writerow(["edited", bool(report.get("edited")), ""])
    return buf.getvalue()


def export_perfusion(out_dir: Path, maps: Mapping[str, Any], masks: Mapping[str, np.ndarray], segmentation: Any,
                     report: Mapping[str, Any]) -> dict[str, Path]:
    """Maps (``<key>.nii.gz``, float32), ``core``/``penumbra.nii.gz`` (uint8), ``perfusion.seg.nrrd``,
    ``report.json`` and ``report.csv`` into ``out_dir``: the command line's file names, staged and
    moved into place only when all were written."""
    with _staged(Path(out_dir)) as (stage, written):
        grid = None
        for key, node in maps.items():
            image = image_from_volume(node)
            grid = grid or image
            written[key] = write_image(image.with_array(image.array.astype(np.float32)), stage / f"{key}.nii.gz")
        for key, mask in masks.items():
            written[key] = write_image(grid.with_array((np.asarray(mask) > 0).astype(np.uint8)), stage / f"{key}.nii.gz")
        written["segmentation"] = write_segmentation_file(segmentation, stage / PERFUSION_SEGMENTATION_FILE)
        written["report_json"] = write_text(json.dumps(report, indent=2), stage / REPORT_JSON)
        written["report_csv"] = write_text(perfusion_csv(report), stage / REPORT_CSV)
    return written
