"""CT and DSC-MR perfusion in the scene: a 4D series -> maps, core and penumbra, statistics, export.

The 4D series (a Sequence node, the proxy volume of a sequence browser, or a MultiVolume node) is
copied out of the scene on the main thread and handed to :func:`strokeseg.perfusion.run_perfusion`
in a :class:`PerfusionJob` (worker thread, progress, cancel). Its result comes back into the scene
on the main thread, all or nothing:

* CBF, CBV, MTT, Tmax and TTP as scalar volumes on the series' own voxel grid (the IJK-to-RAS
  matrix of the series' first frame, copied), with Slicer's colour maps, physiological windows and
  their units (``StrokeSeg.Units`` attribute, voxel value units as UCUM codes, description);
* a segmentation on that grid with an *Infarct core* and a *Penumbra* segment (SNOMED CT terms
  of :mod:`terminology`), edits protected as in the lesion workflow;
* a summary table (core, penumbra = hypoperfused minus core, mismatch volume and ratio, HIR),
  recomputed from the segments as they are now, so it equals the engine's report until the
  user edits them; the engine's report itself in a text node.

Settings (modality, echo time, arterial input, thresholds) live in the module's parameter node.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import slicer

from strokeseg.errors import InputError, StrokeSegError
from strokeseg.image import Image
from strokeseg.perfusion import PerfusionResult, PerfusionSettings, Thresholds
from strokeseg.perfusion.decision import decision_volumes

from . import detection
from .display import show_in_slice_views, style_perfusion_map, style_segmentation
from .export import export_perfusion
from .jobs import PerfusionJob
from .parameters import MAP_KEYS, PERFUSION_THRESHOLDS, StrokeSegParameters, get_parameter_node, map_parameter_name
from .segmentation import create_segmentation, is_user_edited, managed_segments, read_mask, write_role_segment
from .statistics import read_report, update_perfusion_table, write_report
from .terminology import TERMS
from .volumes import (
    add_volume_from_image,
    geometry_from_ijk_to_ras,
    ijk_to_ras,
    image_from_node,
    image_from_volume,
    sequence_for_proxy,
    update_volume_from_image,
)

SERIES_ATTRIBUTE = "StrokeSeg.PerfusionSeries"  # id of the series a map was computed from
MAP_ATTRIBUTE = "StrokeSeg.PerfusionMap"  # cbf, cbv, mtt, tmax, ttp
UNITS_ATTRIBUTE = "StrokeSeg.Units"
REPORT_NODE_NAME = "StrokeSeg perfusion report"
MAP_NAMES = {
    "cbf": ("CBF", "cerebral blood flow"),
    "cbv": ("CBV", "cerebral blood volume"),
    "mtt": ("MTT", "mean transit time"),
    "tmax": ("Tmax", "time to maximum of the residue function"),
    "ttp": ("TTP", "time to peak"),
}
DEFAULT_UNITS = {"cbf": "mL/100g/min", "cbv": "mL/100g", "mtt": "s", "tmax": "s", "ttp": "s"}
# Units as UCUM codes (what DICOM and Slicer's voxel value units use).
UCUM = {"mL/100g/min": ("mL/(100.g)/min", "mL/100g/min"), "mL/100g": ("mL/(100.g)", "mL/100g"), "s": ("s", "second")}
ROLES = ("core", "penumbra")


def grid_node(scene: Any, series: Any) -> Any:
    """The volume whose voxel grid is the series' (first frame of a sequence, else the node itself)."""
    if series.IsA("vtkMRMLSequenceNode"):
        return series.GetNthDataNode(0)
    sequence = sequence_for_proxy(scene, series)
    if sequence is not None and sequence.GetNumberOfDataNodes() > 1:
        return sequence.GetNthDataNode(0)
    return series


def _name(node: Any) -> str:
    return node.GetName() or node.GetID() or "node"


class PerfusionLogic:
    """Raw-4D perfusion in a scene: :meth:`create_job` (main thread), the job in a thread,
    :meth:`apply_result` (main thread); :meth:`compute` does all three, blocking."""

    def __init__(self, scene: Any, *, file_for_instance: Callable[[str], str] | None = None) -> None:
        self.scene = scene
        self.file_for_instance = file_for_instance

    @property
    def params(self) -> StrokeSegParameters:
        return StrokeSegParameters(get_parameter_node(self.scene))

    # -- inputs --------------------------------------------------------------------------
    def series_node(self) -> Any:
        """The chosen series, else the detected CT or MR perfusion input."""
        p = self.params
        return p.perfusionSeries or p.inputCtp or p.inputPwi

    def fill_series(self) -> Any:
        """Put the detected perfusion series into the perfusion selector when it is empty."""
        p = self.params
        if p.perfusionSeries is None and (p.inputCtp or p.inputPwi) is not None:
            p.perfusionSeries = p.inputCtp or p.inputPwi
        return p.perfusionSeries

    def thresholds(self) -> Thresholds:
        p = self.params
        return Thresholds(**{field: float(p.get(name)) for name, field in PERFUSION_THRESHOLDS.items()})

    def _is_mr(self, series: Any) -> bool:
        p = self.params
        if p.perfusionKind != "auto":
            return p.perfusionKind == "mr"
        return p.inputPwi is not None and p.inputPwi.GetID() == series.GetID()

    def _aif(self, node: Any, series: Any) -> dict[str, Any]:
        """run_perfusion's aif_point (LPS mm) or aif_mask from a markups point, segmentation or label map."""
        label = _name(node)
        if node.IsA("vtkMRMLMarkupsNode"):
            if node.GetNumberOfControlPoints() < 1:
                raise InputError(label, "the arterial input point list has no point")
            ras = [0.0, 0.0, 0.0]
            node.GetNthControlPointPositionWorld(0, ras)
            return {"aif_point": (-float(ras[0]), -float(ras[1]), float(ras[2]))}
        if node.IsA("vtkMRMLSegmentationNode"):
            grid = grid_node(self.scene, series)
            segmentation = node.GetSegmentation()
            if segmentation.GetNumberOfSegments() == 0:
                raise InputError(label, "the arterial input segmentation has no segment")
            mask = np.zeros(grid.GetImageData().GetDimensions()[::-1], np.uint8)
            for i in range(segmentation.GetNumberOfSegments()):
                mask |= read_mask(node, segmentation.GetNthSegmentID(i), grid)
            spacing, origin, direction = geometry_from_ijk_to_ras(ijk_to_ras(grid))
            return {"aif_mask": Image(mask, spacing, origin, direction, {"source": label})}
        if node.IsA("vtkMRMLScalarVolumeNode"):
            image = image_from_volume(node)
            if image.is_4d:
                raise InputError(label, "the arterial input mask is 4D; a 3D label map is expected")
            image.meta["source"] = label
            return {"aif_mask": image.with_array((np.asarray(image.array) > 0).astype(np.uint8))}
        raise InputError(label, f"a {node.GetClassName()} cannot give the arterial input")

    def run_options(self, series: Any) -> dict[str, Any]:
        """run_perfusion's keyword arguments from the parameter node (images copied: main thread)."""
        p = self.params
        options: dict[str, Any] = {
            "kind": p.perfusionKind,
            "te_ms": float(p.perfusionTeMs) if p.perfusionTeMs > 0 else None,
            "thresholds": self.thresholds(),
            "settings": PerfusionSettings(motion_correction=bool(p.perfusionMotionCorrection)),
        }
        try:
            options["thresholds"].validate()
        except ValueError as exc:
            raise InputError(None, str(exc)) from None
        if p.perfusionAif is not None:
            options.update(self._aif(p.perfusionAif, series))
        if p.perfusionUseAdc and p.inputAdc is not None and self._is_mr(series):
            options["adc"] = image_from_volume(p.inputAdc, file_for_instance=self.file_for_instance)
        return options

    def series_image(self, series: Any) -> Image:
        """A voxel copy of the series, named as the user sees it (the engine's errors name it)."""
        image = image_from_node(self.scene, series, file_for_instance=self.file_for_instance)
        if not image.is_4d:
            raise InputError(_name(series), "is a 3D volume; a 4D perfusion series (Sequence or MultiVolume) is expected")
        image.meta["source"] = _name(series)
        return image

    def create_job(self) -> PerfusionJob:
        """A not-yet-started job on copies of the series and its options (main thread)."""
        series = self.series_node()
        if series is None:
            raise InputError(None, "choose a 4D perfusion series first")
        job = PerfusionJob(self.series_image(series), **self.run_options(series))
        job.series_node_id = series.GetID()
        return job

    def compute(self) -> PerfusionResult:
        """Blocking run (scripts, tests): job, wait, result into the scene."""
        job = self.create_job().start()
        job.wait()
        if job.error:
            raise StrokeSegError(job.error)
        self.apply_result(job.result, self.scene.GetNodeByID(job.series_node_id))
        return job.result

    # -- results into the scene ----------------------------------------------------------
    def apply_result(self, result: PerfusionResult, series: Any = None) -> dict[str, Any]:
        """Maps, core/penumbra segments, report and table from an engine result (all or nothing)."""
        created: list[Any] = []
        try:
            return self._apply(result, series, created)
        except Exception:
            for node in created:  # no partial results in the scene
                if node is not None and node.GetScene() is not None:
                    self.scene.RemoveNode(node)
            raise

    def _apply(self, result: PerfusionResult, series: Any, created: list[Any]) -> dict[str, Any]:
        p = self.params
        grid = grid_node(self.scene, series) if series is not None else None
        series_id = series.GetID() if series is not None else ""
        base = _name(series) if series is not None else "Perfusion"
        units = {**DEFAULT_UNITS, **(result.report.get("units") or {})}
        nodes: dict[str, Any] = {}
        for key in MAP_KEYS:
            image = result.maps[key]
            image = image.with_array(np.asarray(image.array, dtype=np.float32))
            node = p.get(map_parameter_name(key))
            if node is None or node.GetAttribute(SERIES_ATTRIBUTE) != series_id:
                node = add_volume_from_image(self.scene, image, f"{base} {MAP_NAMES[key][0]}", reference=grid)
                created += [node, node.GetDisplayNode()]
            else:
                update_volume_from_image(node, image, grid)
            _annotate_map(node, key, units[key], series_id)
            style_perfusion_map(self.scene, node, key)
            nodes[key] = node
        reference = nodes["cbf"]  # on the series' grid, in the scene: the segmentation's geometry

        segmentation = p.perfusionSegmentation
        if segmentation is None or not _references(segmentation, reference):
            segmentation = create_segmentation(self.scene, reference, f"{base} perfusion")
            segmentation.SetAttribute(detection.OUTPUT_ATTRIBUTE, "perfusion-segmentation")
            created += [segmentation, segmentation.GetDisplayNode()]
        style_segmentation(segmentation)
        for role, mask in (("core", result.core.array), ("penumbra", result.penumbra.array)):
            write_role_segment(segmentation, TERMS[role], np.asarray(mask), reference)

        report_node, new = write_report(self.scene, p.perfusionReport, {**result.report, "series": base},
                                        REPORT_NODE_NAME, "perfusion-report")
        if new:
            created.append(report_node)

        was = p.node.StartModify()
        try:
            for key, node in nodes.items():
                p.set(map_parameter_name(key), node)
            p.perfusionSegmentation = segmentation
            p.perfusionReport = report_node
            if series is not None and p.perfusionSeries is None:
                p.perfusionSeries = series
        finally:
            p.node.EndModify(was)
        table_existed = p.perfusionTable is not None
        report = self.update_statistics()
        if not table_existed:
            created.append(p.perfusionTable)
        show_in_slice_views(self.scene, nodes["tmax"])
        return report

    # -- statistics ----------------------------------------------------------------------
    def has_result(self) -> bool:
        p = self.params
        return None not in (p.perfusionSegmentation, p.perfusionCbf, p.perfusionTmax) and bool(self.stored_report())

    def stored_report(self) -> dict[str, Any]:
        """The engine's report of the last run (with the series name)."""
        return read_report(self.params.perfusionReport)

    def current_masks(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """(core, penumbra, edited) from the segments as they are now; penumbra excludes the core."""
        p = self.params
        segmentation, reference = p.perfusionSegmentation, p.perfusionCbf
        shape = reference.GetImageData().GetDimensions()[::-1]
        masks = {role: np.zeros(shape, bool) for role in ROLES}
        edited = False
        for role in ROLES:
            for segment_id in managed_segments(segmentation, role):  # a segment left to the user is not counted
                mask = read_mask(segmentation, segment_id, reference)
                masks[role] |= mask > 0
                edited = edited or is_user_edited(segmentation, segment_id, reference, mask)
        return masks["core"], masks["penumbra"] & ~masks["core"], edited

    def update_statistics(self) -> dict[str, Any]:
        """The report with the volumes of the segments as they are now, into the table; returns it."""
        if not self.has_result():
            raise InputError(None, "no perfusion result yet: press Compute perfusion first")
        p = self.params
        base = self.stored_report()
        core, penumbra, edited = self.current_masks()
        tmax = slicer.util.arrayFromVolume(p.perfusionTmax)
        voxel_ml = image_from_volume(p.perfusionCbf, copy=False).voxel_volume_ml
        stored = base.get("thresholds") or {}
        thresholds = Thresholds(**{k: v for k, v in stored.items() if k in asdict(Thresholds())})
        volumes = decision_volumes(core, core | penumbra, tmax, voxel_ml, thresholds)
        volumes["defuse3_style"] = {**(base.get("defuse3_style") or {}), **volumes["defuse3_style"]}
        report = {**base, **volumes, "edited": edited}
        p.perfusionTable = update_perfusion_table(self.scene, report, p.perfusionTable)
        return report

    # -- export --------------------------------------------------------------------------
    def export(self, out_dir: str | Path) -> dict[str, Path]:
        """Maps, core and penumbra (NIfTI), segmentation (.seg.nrrd), report (JSON and CSV); all or none."""
        report = self.update_statistics()
        p = self.params
        core, penumbra, _ = self.current_masks()
        maps = {key: p.get(map_parameter_name(key)) for key in MAP_KEYS}
        return export_perfusion(Path(out_dir), maps, {"core": core, "penumbra": penumbra}, p.perfusionSegmentation,
                                report)


def _annotate_map(node: Any, key: str, unit: str, series_id: str) -> None:
    """Which map, of which series, in which unit: attributes, voxel value units, description."""
    node.SetAttribute(detection.OUTPUT_ATTRIBUTE, f"perfusion-{key}")
    node.SetAttribute(MAP_ATTRIBUTE, key)
    node.SetAttribute(SERIES_ATTRIBUTE, series_id)
    node.SetAttribute(UNITS_ATTRIBUTE, unit)
    if unit in UCUM:
        code, meaning = UCUM[unit]
        entry = slicer.vtkCodedEntry()
        entry.SetValueSchemeMeaning(code, "UCUM", meaning)
        node.SetVoxelValueUnits(entry)
    label, meaning = MAP_NAMES[key]
    node.SetDescription(f"{label} ({meaning}) in {unit}, computed by StrokeSeg (research use only)")


def _references(segmentation: Any, reference: Any) -> bool:
    ref = segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())
    return ref is not None and ref.GetID() == reference.GetID()
