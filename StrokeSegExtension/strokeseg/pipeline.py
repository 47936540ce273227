"""One case from input images to probability map, lesion mask and report.

``segment_images`` is the engine's Python API (the Slicer module calls it from a worker);
``segment_case`` adds the case folder contract of DESIGN.md: read inputs by modality key,
write ``probability.nii.gz``, ``lesion.nii.gz`` and ``report.json`` atomically, with
``report.json`` written last so a batch can tell finished cases from interrupted ones.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from . import __version__
from .errors import InputError
from .image import Image
from .inference import mirror_axes, predict, resolve_device
from .io import check_overwrite, staged_outputs, write_image, write_text
from .modality import find_case_inputs, load_inputs, require_inputs
from .models import ModelCard, choose_model, get_card, load_model
from .postprocess import PostprocessSettings, postprocess
from .preprocess import prepare, to_reference
from .report import lesion_report

ProgressFn = Callable[[float, str], None]
OUTPUT_FILES = ("probability.nii.gz", "lesion.nii.gz", "report.json")


@dataclass
class SegmentationResult:
    probability: Image
    mask: Image
    report: dict[str, Any]
    card: ModelCard
    settings: PostprocessSettings
    timings: dict[str, float] = field(default_factory=dict)


def settings_from_card(card: ModelCard, **overrides: float | None) -> PostprocessSettings:
    """The card's tuned post-processing, with any user overrides that are not None."""
    pp = card.raw.get("postprocess", {})
    s = PostprocessSettings(
        threshold=float(pp.get("threshold", 0.5)),
        closing_mm=float(pp.get("closing_mm", 0.0)),
        min_lesion_ml=float(pp.get("min_lesion_ml", 0.0)),
    )
    for key, value in overrides.items():
        if value is not None:
            setattr(s, key, float(value))
    if not 0.0 < s.threshold < 1.0:
        raise InputError(None, f"threshold must be between 0 and 1, got {s.threshold}")
    if s.closing_mm < 0 or s.min_lesion_ml < 0:
        raise InputError(None, "closing radius and minimum lesion size must not be negative")
    return s


def pick_model(available: Mapping[str, Any], model: str | ModelCard = "auto", models_dir: Any = None) -> ModelCard:
    if isinstance(model, ModelCard):
        return model
    if model == "auto":
        return choose_model(available.keys(), models_dir=models_dir)
    return get_card(model, models_dir=models_dir)


_MODEL_CACHE: dict[tuple[str, str, str], list] = {}
_CACHE_LOCK = threading.Lock()


def _networks(card: ModelCard, device: str) -> list:
    """Loaded networks, cached per (model, version, device): the Slicer slider loop and batches reuse them."""
    key = (card.id, card.version, device)
    with _CACHE_LOCK:
        if key not in _MODEL_CACHE:
            _MODEL_CACHE[key] = load_model(card, device=device)
        return _MODEL_CACHE[key]


MIN_COVERAGE_MM = 20.0
SLAB_FAMILIES = ("ctp", "mrp")  # perfusion is acquired in slabs: ISLES 2018 has cases of 2 slices


def _check_coverage(images: Mapping[str, Image], family: str) -> None:
    """The models read anatomy around a lesion: one or two DWI slices (a 2D screenshot turned into
    a volume) gave ~100x the lesion of the full volume on those slices. Every input must span
    MIN_COVERAGE_MM along each axis; perfusion slabs need that in-plane and 2 slices through."""
    for key, im in images.items():
        extent = np.asarray(im.size, float) * np.asarray(im.spacing, float)
        thin = int(np.argmin(extent))
        if family in SLAB_FAMILIES and im.size[thin] >= 2:
            extent[thin] = np.inf
        if extent.min() < MIN_COVERAGE_MM:
            axis = int(np.argmin(extent))
            n = im.size[axis]
            raise InputError(im.meta.get("source") or key,
                             f"covers only {extent[axis]:.1f} mm along its {'xyz'[axis]} axis ({n} voxel"
                             f"{'' if n == 1 else 's'}); the {family.upper()} model needs at least "
                             f"{MIN_COVERAGE_MM:g} mm in every direction"
                             + (" (2 slices through a slab)" if family in SLAB_FAMILIES else ""))


def segment_images(
    images: Mapping[str, Image],
    *,
    model: str | ModelCard = "auto",
    device: str = "auto",
    settings: PostprocessSettings | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    models_dir: Any = None,
    b_value: float | None = None,
    mirror_tta: bool | None = None,
    where: str | Path | None = None,
) -> SegmentationResult:
    """Segment one case given as modality key -> Image. Output on the reference input's grid."""
    t0 = time.perf_counter()
    report_progress = progress or (lambda f, msg: None)
    card = pick_model(images, model, models_dir)
    require_inputs(images.keys(), card.required, card.raw.get("derivable"), where=where)
    settings = settings or settings_from_card(card)
    dev = resolve_device(device)
    timings: dict[str, float] = {}

    report_progress(0.0, "preparing inputs")
    _check_coverage(images, card.family)
    prepared = prepare(images, card, b_value=b_value)
    timings["preprocess_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    nets = _networks(card, str(dev))
    timings["model_load_s"] = time.perf_counter() - t

    t = time.perf_counter()
    prob_model = predict(
        prepared.array, nets, card, device=dev, mirror_tta=mirror_tta, cancel=cancel,
        progress=lambda f, msg: report_progress(0.05 + 0.85 * f, msg),
    )
    timings["inference_s"] = time.perf_counter() - t

    t = time.perf_counter()
    report_progress(0.9, "resampling to the reference grid")
    probability = to_reference(prob_model, prepared.model_grid, prepared.reference)
    np.clip(probability.array, 0.0, 1.0, out=probability.array)
    mask_arr = postprocess(probability.array, probability.spacing, settings)
    mask = probability.with_array(mask_arr.astype(np.uint8))
    timings["postprocess_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    report = lesion_report(
        mask, probability, reference=prepared.reference,
        model={"id": card.id, "version": card.version, "inputs": list(prepared.channels), "device": str(dev),
               "mirror_tta_axes": mirror_axes(card, mirror_tta)},
        settings={"threshold": settings.threshold, "closing_mm": settings.closing_mm,
                  "min_lesion_ml": settings.min_lesion_ml, "fill_holes": settings.fill_holes},
        timings={k: round(v, 4) for k, v in timings.items()},
    )
    rescaled = {k: f"{unit} -> {'1e-6 mm²/s' if k == 'adc' else 's'}" for k, unit in prepared.rescaled.items()}
    if rescaled:
        report["inputs_rescaled"] = rescaled
    report_progress(1.0, "done")
    return SegmentationResult(probability, mask, report, card, settings, timings)


def is_finished(out_dir: str | Path) -> bool:
    """A case is finished when all outputs exist (report.json is written last)."""
    out_dir = Path(out_dir)
    return all((out_dir / f).is_file() for f in OUTPUT_FILES)


def write_result(result: SegmentationResult, out_dir: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write the three outputs; all appear or none (staged in a sibling temp folder)."""
    with staged_outputs(out_dir, OUTPUT_FILES) as stage:  # report.json last: it marks the case finished
        write_image(result.probability.with_array(result.probability.array.astype(np.float32)),
                    stage / "probability.nii.gz")
        write_image(result.mask, stage / "lesion.nii.gz")
        write_text(json.dumps({**result.report, **(dict(extra) if extra else {})}, indent=2), stage / "report.json")
    return out_dir


def segment_case(
    case_dir: str | Path,
    out_dir: str | Path,
    *,
    model: str = "auto",
    device: str = "auto",
    threshold: float | None = None,
    closing_mm: float | None = None,
    min_lesion_ml: float | None = None,
    overrides: Mapping[str, str] | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
    models_dir: Any = None,
    b_value: float | None = None,
    mirror_tta: bool | None = None,
    files: Mapping[str, Path] | None = None,
) -> SegmentationResult:
    """Case folder (or explicit key -> file map) in, DESIGN.md outputs written to ``out_dir``."""
    t0 = time.perf_counter()
    check_overwrite(out_dir, OUTPUT_FILES)  # before the work, not after it
    files = dict(files) if files else find_case_inputs(case_dir)
    images = load_inputs(files, overrides=overrides)
    load_s = time.perf_counter() - t0
    card = pick_model(images, model, models_dir)
    settings = settings_from_card(card, threshold=threshold, closing_mm=closing_mm, min_lesion_ml=min_lesion_ml)
    result = segment_images(
        images, model=card, device=device, settings=settings, progress=progress, cancel=cancel,
        models_dir=models_dir, b_value=b_value, mirror_tta=mirror_tta, where=case_dir,
    )
    result.timings["read_s"] = load_s
    result.report["timings"]["read_s"] = round(load_s, 4)
    result.report["case"] = {"folder": str(case_dir), "inputs": {k: str(v) for k, v in files.items()}}
    result.report["engine_version"] = __version__
    write_result(result, out_dir)
    return result
