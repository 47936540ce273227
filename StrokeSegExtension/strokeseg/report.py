"""The lesion report: total volume, lesion count and a per-lesion table, as JSON, CSV or text.

Lesions are 26-connected components (as in the ISLES'22 evaluation), numbered 1..n by
decreasing volume. Centroids are the voxel centroids mapped through the image geometry
(``Image.index_to_physical``) and given in scanner LPS and RAS millimetres.

Hemisphere: a lesion is "left" or "right" by the RAS x of its centroid relative to the head's
mid-sagittal plane, "midline" when within ``midline_tolerance_mm`` of it. Scanner x = 0 need
not be the midline, so the plane's x is taken, in order of preference, from
``meta["head_centre_lps"]`` (an LPS point) of the mask or probability image, from the centroid
of the foreground (robust-range threshold) of a ``reference`` image (the scan the lesion was segmented on), or
else x = 0. The report says which source was used. This assumes the head is not strongly
rotated about the scanner's vertical axes (yaw/roll of a few degrees moves the plane little
near the centre); a lesion near the midline of a rotated head may be misassigned.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cc3d
import numpy as np

from . import __version__
from .image import Image
from .postprocess import bounding_box, label_lesions, min_voxels

MIDLINE_TOLERANCE_MM = 3.0

CSV_COLUMNS = (
    "id",
    "volume_ml",
    "voxels",
    "centroid_lps_x_mm",
    "centroid_lps_y_mm",
    "centroid_lps_z_mm",
    "centroid_ras_x_mm",
    "centroid_ras_y_mm",
    "centroid_ras_z_mm",
    "hemisphere",
    "max_probability",
    "mean_probability",
)


def _jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays to Python, NaN/inf to None, tuples to lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def _foreground_centre_lps(reference: Image) -> np.ndarray | None:
    """Physical centroid of a scan's foreground (the head), or None if it has none.

    Foreground: above 10 % of the robust 2nd-98th percentile range, as FSL BET's initial head
    mask does. Unlike Otsu, a very bright lesion on DWI or bone on CT cannot pull the
    threshold above normal tissue.
    """
    arr = reference.array.mean(axis=0) if reference.is_4d else reference.array
    arr = np.asarray(arr, dtype=np.float32)
    finite = np.isfinite(arr)
    sample = arr[::2, ::2, ::2] if arr.size > 2_000_000 else arr
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return None
    lo, hi = np.percentile(sample, [2.0, 98.0])
    if not hi > lo:
        return None
    fg = finite & (arr > lo + 0.1 * (hi - lo))
    total = np.count_nonzero(fg)
    if total == 0:
        return None
    # Centroid from the three marginal counts (no index arrays for millions of voxels).
    ijk_zyx = [
        float(np.dot(np.arange(fg.shape[axis]), fg.sum(axis=tuple(a for a in range(3) if a != axis)))) / total
        for axis in range(3)
    ]
    return reference.index_to_physical(np.array(ijk_zyx[::-1]))[0]


def _midline(mask: Image, probability: Image | None, reference: Image | None) -> tuple[float, str]:
    """x of the mid-sagittal plane in RAS mm, and where it came from."""
    for img in (mask, probability):
        centre = None if img is None else img.meta.get("head_centre_lps")
        if centre is not None and len(centre) == 3 and np.isfinite(np.asarray(centre, float)).all():
            return 0.0 - float(centre[0]), "metadata"
    if reference is not None:
        centre = _foreground_centre_lps(reference)
        if centre is not None:
            return 0.0 - float(centre[0]), "reference_foreground"
    return 0.0, "scanner_origin"


def _hemisphere(x_ras: float, midline_x_ras: float, tolerance_mm: float) -> str:
    dx = x_ras - midline_x_ras
    if abs(dx) <= tolerance_mm:
        return "midline"
    return "right" if dx > 0 else "left"  # RAS: +x points to the patient's right


def lesion_report(
    mask: Image,
    probability: Image | None = None,
    *,
    model: dict | None = None,
    settings: dict | None = None,
    timings: dict | None = None,
    min_volume_ml: float = 0.0,
    reference: Image | None = None,
    midline_tolerance_mm: float = MIDLINE_TOLERANCE_MM,
) -> dict:
    """JSON-serialisable report of a lesion mask (see the module docstring for hemispheres).

    Lesions smaller than ``min_volume_ml`` are left out of the table, the count and the total,
    and summarised under ``"below_min_volume"``. ``probability`` must be on the mask's grid.
    """
    if mask.is_4d:
        raise ValueError("lesion mask must be 3D")
    if probability is not None:
        if probability.is_4d or not probability.same_grid(mask):
            raise ValueError("probability map is not on the lesion mask's grid")
    # Work inside the mask's bounding box; centroids are shifted back to full-grid indices.
    box = bounding_box(np.asarray(mask.array) > 0)
    labels, n = label_lesions(mask.array[box]) if box is not None else (None, 0)
    voxel_ml = mask.voxel_volume_ml
    midline_x, midline_source = _midline(mask, probability, reference)

    lesions: list[dict] = []
    small_count, small_ml = 0, 0.0
    if n:
        stats = cc3d.statistics(labels)
        counts = np.asarray(stats["voxel_counts"])[1 : n + 1]
        centroids_zyx = np.asarray(stats["centroids"], dtype=float)[1 : n + 1] + [b.start for b in box]
        lps = mask.index_to_physical(centroids_zyx[:, ::-1])  # index order (x, y, z)
        ras = lps * np.array([-1.0, -1.0, 1.0])
        if probability is not None:
            fg = labels > 0
            lab, p = labels[fg], probability.array[box][fg].astype(np.float64)
            # numpy rather than scipy.ndimage.maximum: scipy's import is ~0.3 s of a cold `segment`
            p_max = np.zeros(n + 1)
            with np.errstate(invalid="ignore"):  # a NaN probability gives a NaN maximum, quietly
                np.maximum.at(p_max, lab, p)
            p_max = p_max[1:]
            p_mean = np.bincount(lab, weights=p, minlength=n + 1)[1:] / counts
        smallest = min_voxels(min_volume_ml, mask.spacing)  # same rounding as postprocess
        # Largest first; ties keep the (deterministic) label order.
        for i in np.argsort(-counts, kind="stable"):
            volume = float(counts[i]) * voxel_ml
            if counts[i] < smallest:
                small_count += 1
                small_ml += volume
                continue
            lesions.append(
                {
                    "id": len(lesions) + 1,
                    "volume_ml": volume,
                    "voxels": int(counts[i]),
                    "centroid_lps_mm": [float(v) for v in lps[i]],
                    "centroid_ras_mm": [float(v) for v in ras[i]],
                    "hemisphere": _hemisphere(float(ras[i, 0]), midline_x, midline_tolerance_mm),
                    "max_probability": None if probability is None else float(p_max[i]),
                    "mean_probability": None if probability is None else float(p_mean[i]),
                }
            )

    report = {
        "engine": "strokeseg",
        "engine_version": __version__,
        "total_volume_ml": float(sum(lesion["volume_ml"] for lesion in lesions)),
        "lesion_count": len(lesions),
        "lesions": lesions,
        "below_min_volume": {"min_volume_ml": float(min_volume_ml), "count": small_count, "volume_ml": small_ml},
        "midline": {"x_ras_mm": midline_x, "source": midline_source, "tolerance_mm": float(midline_tolerance_mm)},
        "grid": {
            "size_xyz": list(mask.size),
            "spacing_mm": list(mask.spacing),
            "voxel_volume_ml": voxel_ml,
        },
        "model": model,
        "settings": settings if settings is not None else {},
        "timings": timings if timings is not None else {},
    }
    return _jsonable(report)


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def report_to_csv(report: dict) -> str:
    """One row per lesion with the columns of ``CSV_COLUMNS`` (header only when none)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for lesion in report.get("lesions", []):
        lps, ras = lesion["centroid_lps_mm"], lesion["centroid_ras_mm"]
        row = [lesion["id"], lesion["volume_ml"], lesion["voxels"], *lps, *ras]
        row += [lesion["hemisphere"], lesion.get("max_probability"), lesion.get("mean_probability")]
        writer.writerow([_csv_value(v) for v in row])
    return buf.getvalue()


def format_report(report: dict, max_rows: int = 20) -> str:
    """A short plain-text summary and lesion table for the terminal."""

    def prob(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}"

    model = report.get("model") or {}
    head = f"StrokeSeg {report.get('engine_version', '?')}"
    if model:
        head += f" | model {model.get('id', '?')} {model.get('version', '')}".rstrip()
    n = report["lesion_count"]
    lines = [head, f"Total lesion volume: {report['total_volume_ml']:.2f} mL in {n} lesion{'s' if n != 1 else ''}"]
    small = report.get("below_min_volume") or {}
    if small.get("count"):
        lines.append(
            f"({small['count']} smaller than {small['min_volume_ml']:g} mL not listed, {small['volume_ml']:.2f} mL)"
        )
    if n:
        lines.append(f"{'#':>3} {'volume mL':>10} {'voxels':>8}  {'side':<8} {'centroid RAS mm':<24} {'max p':>5} {'mean p':>6}")
        for lesion in report["lesions"][:max_rows]:
            c = "({:.1f}, {:.1f}, {:.1f})".format(*lesion["centroid_ras_mm"])
            lines.append(
                f"{lesion['id']:>3} {lesion['volume_ml']:>10.2f} {lesion['voxels']:>8}  {lesion['hemisphere']:<8} "
                f"{c:<24} {prob(lesion.get('max_probability')):>5} {prob(lesion.get('mean_probability')):>6}"
            )
        if n > max_rows:
            lines.append(f"... {n - max_rows} more")
    return "\n".join(lines)
