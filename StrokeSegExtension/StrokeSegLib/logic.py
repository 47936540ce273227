"""StrokeSeg's Slicer logic: from the volumes in a scene to an edited, exported lesion.

Qt-free (``slicer``, ``vtk`` and the engine only), so it runs inside Slicer and headless with
PyPI ``slicer-core``. The widget calls it on the main thread; only :class:`SegmentationJob`
(the engine run) works in a thread, on voxel copies taken here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from strokeseg.errors import InputError, StrokeSegError
from strokeseg.image import Image
from strokeseg.io import check_volume
from strokeseg.modality import FOUR_D_KEYS
from strokeseg.models import ModelCard, choose_model, get_card, load_registry
from strokeseg.postprocess import PostprocessSettings
from strokeseg.report import lesion_report

from . import detection, paths
from .display import set_probability_opacity, show_in_slice_views, style_probability, style_segmentation
from .export import ExportRequest, export_results
from .jobs import SegmentationJob
from .lesionmask import LesionMask, MaskUpdate, settings_from_parameters
from .parameters import StrokeSegParameters, get_parameter_node
from .perfusion import PerfusionLogic
from .segmentation import create_segmentation, managed_segments, read_mask, write_role_segment
from .statistics import read_report, update_tables, write_report
from .terminology import TERMS
from .volumes import (
    add_volume_from_image,
    geometry_from_ijk_to_ras,
    ijk_to_ras,
    image_from_node,
    proxy_for_sequence,
    update_volume_from_image,
)

REPORT_NODE_NAME = "StrokeSeg report"


class StrokeSegLogic:
    """All of StrokeSeg's scene work; ``file_for_instance`` maps DICOM SOP instance UIDs to files."""

    def __init__(self, scene: Any, *, file_for_instance: Callable[[str], str] | None = None) -> None:
        self.scene = scene
        self.file_for_instance = file_for_instance
        self._mask: LesionMask | None = None
        self._mask_key: tuple | None = None
        self.perfusion = PerfusionLogic(scene, file_for_instance=file_for_instance)  # the raw-4D path

    # -- parameters ----------------------------------------------------------------------
    @property
    def parameter_node(self) -> Any:
        return get_parameter_node(self.scene)

    @property
    def params(self) -> StrokeSegParameters:
        return StrokeSegParameters(self.parameter_node)

    # -- inputs and models ---------------------------------------------------------------
    def detect_inputs(self, overwrite: bool = False) -> list[detection.VolumeDetection]:
        """Detect every volume's modality and fill the input slots (empty ones unless ``overwrite``)."""
        found = detection.detect_scene(self.scene, self.file_for_instance)
        detection.fill_inputs(self.params, found, overwrite=overwrite)
        self.perfusion.fill_series()
        return found

    def input_nodes(self) -> dict[str, Any]:
        return detection.input_nodes(self.params)

    @staticmethod
    def models() -> list[ModelCard]:
        return load_registry(paths.models_dir())

    def selected_card(self) -> ModelCard:
        """The card of the selected model; "auto" picks the one that fits the filled slots."""
        model = self.params.model or "auto"
        if model == "auto":
            return choose_model(self.input_nodes().keys(), models_dir=paths.models_dir())
        return get_card(model, models_dir=paths.models_dir())

    def apply_model_defaults(self, card: ModelCard) -> None:
        """The card's tuned threshold, closing radius and minimum lesion size into the sliders."""
        params = self.params
        was = params.node.StartModify()
        try:
            params.threshold = min(max(card.threshold, 0.01), 0.99)
            params.closingMm = min(card.closing_mm, 10.0)
            params.minLesionMl = min(card.min_lesion_ml, 20.0)
            params.settingsFromModel = card.id
        finally:
            params.node.EndModify(was)

    def follow_model_defaults(self, card: ModelCard) -> bool:
        """Before the first result, the sliders follow the model that will run: when "auto" moves
        to another model (other inputs detected), its tuned settings replace the previous model's.
        Changes the user made for the current model are kept. True when the settings changed."""
        if self.has_result() or self.params.settingsFromModel == card.id:
            return False
        self.apply_model_defaults(card)
        return True

    def gather_images(self, card: ModelCard | None = None) -> dict[str, Image]:
        """Voxel copies of the inputs the model uses (main thread only: reads MRML)."""
        card = card or self.selected_card()
        nodes = self.input_nodes()
        wanted = card.plan(nodes.keys())  # raises ModelError naming what is missing
        keys = [k for k, derived in wanted.items() if derived is None]
        keys += [k for derived in wanted.values() if derived for k in derived]
        images = {}
        for key in dict.fromkeys(keys):
            image = image_from_node(self.scene, nodes[key], file_for_instance=self.file_for_instance)
            # The checks the command line applies to files, naming the volume as the user sees it.
            check_volume(image, nodes[key].GetName() or key, allow_4d=key in FOUR_D_KEYS)
            images[key] = image
        return images

    def settings(self) -> PostprocessSettings:
        return settings_from_parameters(self.params)

    def create_job(self, device: str | None = None) -> SegmentationJob:
        """A not-yet-started job on copies of the inputs (start it, poll it, then :meth:`apply_result`)."""
        card = self.selected_card()
        self.follow_model_defaults(card)
        images = self.gather_images(card)
        return SegmentationJob(images, model=card, device=device or self.params.device, settings=self.settings(),
                               models_dir=paths.models_dir())

    def segment(self, device: str | None = None):
        """Blocking segmentation (scripts, tests, the self-test): run the job and apply its result."""
        job = self.create_job(device).start()
        job.wait()
        if job.error:
            raise StrokeSegError(job.error)
        self.apply_result(job.result)
        return job.result

    # -- results into the scene ----------------------------------------------------------
    def apply_result(self, result: Any) -> MaskUpdate:
        """Probability volume, lesion segment, statistics and report from an engine result."""
        card = result.card
        nodes = self.input_nodes()
        reference = _reference_node(self.scene, card, nodes)
        params = self.params
        probability = params.probabilityVolume
        prob_image = result.probability.with_array(np.asarray(result.probability.array, dtype=np.float32))
        if probability is None or params.referenceVolume is None or params.referenceVolume.GetID() != reference.GetID():
            probability = add_volume_from_image(self.scene, prob_image, f"{reference.GetName()} lesion probability",
                                                reference=reference)
            probability.SetAttribute(detection.OUTPUT_ATTRIBUTE, "probability")
        else:
            update_volume_from_image(probability, prob_image, reference)
        style_probability(self.scene, probability)
        show_in_slice_views(self.scene, reference, probability, params.probabilityOpacity)

        segmentation = params.segmentation
        if segmentation is None or not _references(segmentation, reference):
            segmentation = create_segmentation(self.scene, reference, f"{reference.GetName()} StrokeSeg")
            segmentation.SetAttribute(detection.OUTPUT_ATTRIBUTE, "segmentation")
            params.lesionSegmentId = ""
        style_segmentation(segmentation)

        was = params.node.StartModify()
        try:
            params.referenceVolume = reference
            params.probabilityVolume = probability
            params.segmentation = segmentation
            params.threshold = min(max(result.settings.threshold, 0.01), 0.99)
            params.closingMm = min(result.settings.closing_mm, 10.0)
            params.minLesionMl = min(result.settings.min_lesion_ml, 20.0)
            params.fillHoles = bool(result.settings.fill_holes)
        finally:
            params.node.EndModify(was)
        self._mask = None
        update = self.lesion_mask().update(result.settings)
        for key, mask in (getattr(result, "masks", None) or {}).items():
            if key in TERMS and key != "lesion":
                self.write_fixed_segment(key, np.asarray(mask.array))
        report = dict(result.report)
        report["inputs"] = {k: n.GetName() for k, n in nodes.items() if k in card.input_keys}
        self._store_report(report)
        self.update_statistics()
        return update

    def write_fixed_segment(self, key: str, mask: np.ndarray) -> str:
        """A segment the sliders do not drive (perfusion core/penumbra); user-edited ones are kept."""
        params = self.params
        target, kept = write_role_segment(params.segmentation, TERMS[key], mask, params.referenceVolume)
        if kept:
            params.add_protected_segment(kept)
        return target

    # -- the slider loop -----------------------------------------------------------------
    def lesion_mask(self) -> LesionMask:
        """The slider controller for the current result (rebuilt after a new result or a scene load)."""
        params = self.params
        seg, ref, prob = params.segmentation, params.referenceVolume, params.probabilityVolume
        if seg is None or ref is None or prob is None:
            raise InputError(None, "no segmentation result yet: press Segment first")
        key = (seg.GetID(), ref.GetID(), prob.GetID())
        if self._mask is None or self._mask_key != key or self._mask.is_stale():
            self._mask = LesionMask(seg, ref, prob, params)
            self._mask_key = key
        return self._mask

    def has_result(self) -> bool:
        params = self.params
        return None not in (params.segmentation, params.referenceVolume, params.probabilityVolume)

    def recompute(self) -> MaskUpdate:
        """Threshold / closing / minimum size changed: new mask, user edits protected."""
        return self.lesion_mask().update()

    def set_opacity(self, opacity: float) -> None:
        self.params.probabilityOpacity = opacity
        set_probability_opacity(self.scene, self.params.probabilityVolume, opacity)

    def undo(self) -> bool:
        done = self.lesion_mask().undo()
        if done:
            self.update_statistics()
        return done

    def redo(self) -> bool:
        done = self.lesion_mask().redo()
        if done:
            self.update_statistics()
        return done

    # -- statistics and report -----------------------------------------------------------
    def stored_report(self) -> dict[str, Any]:
        return read_report(self.params.report)

    def _store_report(self, report: Mapping[str, Any]) -> None:
        node, created = write_report(self.scene, self.params.report, report, REPORT_NODE_NAME, "report")
        if created:
            self.params.report = node

    def update_statistics(self) -> dict[str, Any]:
        """Report of the lesion segment as it is now (edits included) into the tables; returns it."""
        params = self.params
        lm = self.lesion_mask()
        base = self.stored_report()
        reference = params.referenceVolume
        spacing, origin, direction = geometry_from_ijk_to_ras(ijk_to_ras(reference))
        meta = {}
        midline = (base.get("midline") or {}).get("x_ras_mm")
        if midline is not None:  # keep the mid-sagittal plane found on the scan at segmentation time
            meta["head_centre_lps"] = [-float(midline), 0.0, 0.0]
        mask = Image(lm.current_mask(), spacing, origin, direction, meta)
        probability = mask.with_array(lm.refiner.probability)
        settings = self.settings()
        report = lesion_report(
            mask, probability, model=base.get("model"),
            settings={"threshold": settings.threshold, "closing_mm": settings.closing_mm,
                      "min_lesion_ml": settings.min_lesion_ml, "fill_holes": settings.fill_holes},
            timings=base.get("timings"),
        )
        if midline is not None:
            report["midline"] = base["midline"]
        segment = params.segmentation.GetSegmentation().GetSegment(lm.segment_id)
        report["segment"] = segment.GetName() if segment is not None else ""
        report["edited"] = bool(lm.segment_id) and lm.is_edited(lm.segment_id)
        report["protected_segments"] = params.protected_segments()
        report["inputs"] = base.get("inputs", {})
        report.update(self._perfusion_volumes(mask.voxel_volume_ml))
        summary, lesions = update_tables(self.scene, report, params.summaryTable, params.statisticsTable)
        if params.summaryTable is None or params.statisticsTable is None:
            params.summaryTable, params.statisticsTable = summary, lesions
        self._store_report({**base, **report})
        return report

    def _perfusion_volumes(self, voxel_ml: float) -> dict[str, float]:
        """Core / penumbra volumes and mismatch from the core and penumbra segments, when present."""
        params = self.params
        masks: dict[str, np.ndarray] = {}
        for role in ("core", "penumbra"):
            for segment_id in managed_segments(params.segmentation, role):  # a segment left to the user is not counted
                mask = read_mask(params.segmentation, segment_id, params.referenceVolume) > 0
                masks[role] = masks[role] | mask if role in masks else mask
        out: dict[str, float] = {}
        if "core" in masks:
            out["core_ml"] = float(np.count_nonzero(masks["core"])) * voxel_ml
        if "penumbra" in masks:
            out["penumbra_ml"] = float(np.count_nonzero(masks["penumbra"])) * voxel_ml
        if "core" in masks and "penumbra" in masks:
            hypo = float(np.count_nonzero(masks["core"] | masks["penumbra"])) * voxel_ml  # edits may overlap them
            out["hypoperfusion_ml"] = hypo
            out["mismatch_ml"] = max(hypo - out["core_ml"], 0.0)
            if out["core_ml"] > 0:
                out["mismatch_ratio"] = hypo / out["core_ml"]
        return out

    # -- export --------------------------------------------------------------------------
    def export(self, out_dir: str | Path | None = None) -> dict[str, Path]:
        params = self.params
        folder = Path(out_dir) if out_dir is not None else params.exportDirectory
        if str(folder) in ("", "."):
            raise InputError(None, "choose an export folder first")
        report = self.update_statistics()
        from strokeseg import __version__

        return export_results(ExportRequest(
            Path(folder), params.referenceVolume, params.probabilityVolume, params.segmentation,
            self.lesion_mask().segment_id, report, params.exportDicomSeg, self.file_for_instance, __version__,
        ))


def _reference_node(scene: Any, card: ModelCard, nodes: Mapping[str, Any]) -> Any:
    """The volume whose grid the results share: the card's reference input, or, when the engine
    derived it (perfusion maps from a raw 4D series, ADC from b0 + DWI), the volume it came from,
    which has the same grid; for a Sequence, the proxy volume its browser shows."""
    node = nodes.get(card.reference_input)
    if node is None:
        node = next((nodes[k] for k in card.derivable.get(card.reference_input, []) if k in nodes), None)
    if node is None:
        raise InputError(None, f"the reference input '{card.reference_input}' is no longer selected")
    if node.IsA("vtkMRMLSequenceNode"):
        proxy = proxy_for_sequence(scene, node)
        if proxy is None:
            raise InputError(node.GetName(), "4D series without a sequence browser: show it in the Sequences module first")
        node = proxy
    return node


def _references(segmentation: Any, reference: Any) -> bool:
    ref = segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())
    return ref is not None and ref.GetID() == reference.GetID()


def device_options() -> list[tuple[str, str, bool]]:
    """(key, label, available) for the device selector, with GPU memory where there is a GPU."""
    try:
        import torch
    except ImportError:
        return [("auto", "auto (PyTorch not installed)", False)]
    options = [("auto", "auto", True), ("cpu", "CPU", True)]
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        name = torch.cuda.get_device_name(0)
        options.append(("cuda", f"CUDA: {name} ({free / 2**30:.1f} of {total / 2**30:.1f} GiB free)", True))
    else:
        options.append(("cuda", "CUDA (no NVIDIA GPU found)", False))
    mps = getattr(torch.backends, "mps", None)
    available = bool(mps is not None and mps.is_available())
    options.append(("mps", "Apple MPS" if available else "Apple MPS (not available)", available))
    return options

