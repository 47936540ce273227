"""Segmentation quality: per-case metrics, set summaries and Bland-Altman volume agreement.

Per case (``case_metrics``), with the conventions spelled out because empty masks are common:

* ``dice``: 2|P∩T| / (|P|+|T|); both empty = 1, exactly one empty = 0.
* ``true_volume_ml``, ``pred_volume_ml``, ``volume_diff_ml`` (pred - true, signed) and
  ``abs_volume_diff_ml`` (ISLES'22 absolute volume difference), voxel volume from the spacing.
* Lesions are 26-connected components (cc3d), as in the ISLES'22 evaluation:
  a true lesion is a TP if it overlaps the prediction in at least one voxel, otherwise a FN;
  a predicted component overlapping no true voxel is a FP (a predicted component that does
  overlap is not counted, so one blob bridging two true lesions gives 2 TP, 0 FP).
  ``lesion_f1`` = TP / (TP + (FP + FN) / 2), 1 when both masks are empty;
  ``abs_lesion_count_diff`` = |#true components - #predicted components|.
* ``hd95_mm``: symmetric 95th-percentile Hausdorff distance in mm, defined as MONAI's
  ``compute_hausdorff_distance(percentile=95)``: edge voxels are mask XOR its 6-connected
  erosion, distances between edge-voxel centres honour the anisotropic spacing, and the
  result is the larger of the two directed 95th percentiles (linear interpolation).
  Both empty = 0; exactly one empty = NaN (undefined; a mean over a set skips it).
* Voxel-wise ``mcc``, ``tpr`` (sensitivity), ``tnr`` (specificity), ``ppv`` (precision).
  TPR is NaN without true voxels, PPV NaN without predicted voxels, TNR NaN if the truth
  fills the whole grid. MCC with a zero denominator is 1 for a perfect match (both empty)
  and 0 otherwise (scikit-learn's convention).
* Detection metrics of the DWI paper (Liu et al., EDD Net + MUSCLE Net): ``n_fp_lesions`` and
  ``n_fn_lesions`` (per case; their means over a set are m#FP and m#FN), mean FP/FN lesion
  size in voxels and mL (NaN when there is none; the paper's mS), ``detection_rate`` = fraction
  of true lesions detected (NaN without true lesions), ``lesion_detected`` = 1 if any true
  lesion is detected (NaN without true lesions); its mean over a set is the paper's subject-level
  detection rate DR = N_TP / N.

Arrays are (z, y, x) like :class:`strokeseg.image.Image`; spacing is (x, y, z) mm like
``Image.spacing``. Files: integer masks are foreground where > 0; floating-point files are read
as probability maps and thresholded at >= 0.5 (a 0/1 float mask gives the same mask).
Everything returned by ``evaluate_*`` and ``aggregate`` is JSON-serialisable (NaN -> None).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cc3d
import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from .errors import InputError
from .image import Image, resample_to
from .io import read_image

CONNECTIVITY = 26
HD_PERCENTILE = 95.0
PROBABILITY_THRESHOLD = 0.5
LOA_Z = 1.96
# Per-case counts whose sum over a set is meaningful (pooled lesion-wise scores).
COUNT_KEYS = (
    "true_lesions",
    "pred_lesions",
    "lesion_tp",
    "lesion_fp",
    "lesion_fn",
    "tp_voxels",
    "fp_voxels",
    "fn_voxels",
    "tn_voxels",
)


# -- per case ----------------------------------------------------------------------------
def _mask(array: np.ndarray) -> np.ndarray:
    arr = np.asarray(array)
    if arr.dtype == np.bool_:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        return arr >= PROBABILITY_THRESHOLD
    return arr > 0


def _union_bbox(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of a | b; every component and surface lies inside it, so cropping is exact."""
    union = a | b
    box = []
    for axis in range(union.ndim):
        other = tuple(i for i in range(union.ndim) if i != axis)
        hit = np.flatnonzero(union.any(axis=other))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _edges(mask: np.ndarray) -> np.ndarray:
    # scipy's default structure is 6-connected and the border counts as background (as in MONAI).
    return mask & ~ndimage.binary_erosion(mask)


def _hd95(pred: np.ndarray, truth: np.ndarray, spacing_zyx: np.ndarray) -> float:
    p_pts = np.argwhere(_edges(pred)) * spacing_zyx
    t_pts = np.argwhere(_edges(truth)) * spacing_zyx
    if len(p_pts) == 0 and len(t_pts) == 0:
        return 0.0
    if len(p_pts) == 0 or len(t_pts) == 0:
        return math.nan
    d_pt = cKDTree(t_pts, leafsize=32).query(p_pts, k=1)[0]
    d_tp = cKDTree(p_pts, leafsize=32).query(t_pts, k=1)[0]
    return float(max(np.percentile(d_pt, HD_PERCENTILE), np.percentile(d_tp, HD_PERCENTILE)))


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    labels, n = cc3d.connected_components(mask, connectivity=CONNECTIVITY, return_N=True, out_dtype=np.uint32)
    return labels, int(n)


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else math.nan


def _mean_or_nan(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


def _check_spacing(spacing: Sequence[float]) -> np.ndarray:
    sp = np.asarray(spacing, dtype=float)
    if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise ValueError(f"spacing must be three positive (x, y, z) values in mm, got {spacing!r}")
    return sp


def case_metrics(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float]) -> dict[str, float]:
    """All per-case metrics of two masks on the same grid (arrays (z,y,x), spacing (x,y,z) mm)."""
    p_full, t_full = _mask(pred), _mask(truth)
    if p_full.shape != t_full.shape or p_full.ndim != 3:
        raise ValueError(f"pred {p_full.shape} and truth {t_full.shape} must be 3D arrays of one shape")
    sp_xyz = _check_spacing(spacing)
    sp_zyx = sp_xyz[::-1]  # array axis 0 is z
    voxel_ml = float(np.prod(sp_xyz)) / 1000.0

    box = _union_bbox(p_full, t_full)
    empty = np.zeros((1, 1, 1), dtype=bool)
    p, t = (p_full[box], t_full[box]) if box is not None else (empty, empty)

    # Voxel confusion counts (python ints: products below overflow nothing).
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(t)) - tp
    tn = int(p_full.size) - tp - fp - fn
    n_pred, n_true = tp + fp, tp + fn

    # Lesions: 26-connected components, ISLES'22 matching (any overlap).
    t_lab, n_t = _components(t)
    p_lab, n_p = _components(p)
    t_sizes = np.bincount(t_lab.ravel(), minlength=n_t + 1)[1:]
    p_sizes = np.bincount(p_lab.ravel(), minlength=n_p + 1)[1:]
    t_detected = np.bincount(t_lab[p], minlength=n_t + 1)[1:] > 0
    p_overlaps = np.bincount(p_lab[t], minlength=n_p + 1)[1:] > 0
    l_tp = int(t_detected.sum())
    l_fn = n_t - l_tp
    l_fp = int(n_p - p_overlaps.sum())
    fp_sizes = p_sizes[~p_overlaps]
    fn_sizes = t_sizes[~t_detected]

    denom = math.sqrt(float(n_pred) * n_true * (tn + fp) * (tn + fn))
    if denom:
        mcc = (float(tp) * tn - float(fp) * fn) / denom
    else:
        mcc = 1.0 if fp + fn == 0 else 0.0

    return {
        "dice": 1.0 if n_pred + n_true == 0 else 2.0 * tp / (n_pred + n_true),
        "true_volume_ml": n_true * voxel_ml,
        "pred_volume_ml": n_pred * voxel_ml,
        "volume_diff_ml": (n_pred - n_true) * voxel_ml,
        "abs_volume_diff_ml": abs(n_pred - n_true) * voxel_ml,
        "true_lesions": n_t,
        "pred_lesions": n_p,
        "lesion_tp": l_tp,
        "lesion_fp": l_fp,
        "lesion_fn": l_fn,
        "lesion_f1": 1.0 if l_tp + l_fp + l_fn == 0 else l_tp / (l_tp + (l_fp + l_fn) / 2.0),
        "abs_lesion_count_diff": abs(n_t - n_p),
        "hd95_mm": _hd95(p, t, sp_zyx),
        "mcc": mcc,
        "tpr": _ratio(tp, n_true),
        "tnr": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, n_pred),
        "tp_voxels": tp,
        "fp_voxels": fp,
        "fn_voxels": fn,
        "tn_voxels": tn,
        "n_fp_lesions": l_fp,
        "n_fn_lesions": l_fn,
        "fp_lesion_voxels": int(fp_sizes.sum()),
        "fn_lesion_voxels": int(fn_sizes.sum()),
        "mean_fp_lesion_size_voxels": _mean_or_nan(fp_sizes),
        "mean_fn_lesion_size_voxels": _mean_or_nan(fn_sizes),
        "mean_fp_lesion_size_ml": _mean_or_nan(fp_sizes) * voxel_ml,
        "mean_fn_lesion_size_ml": _mean_or_nan(fn_sizes) * voxel_ml,
        "detection_rate": _ratio(l_tp, n_t),
        "lesion_detected": (1.0 if l_tp else 0.0) if n_t else math.nan,
        "mean_true_lesion_size_ml": _mean_or_nan(t_sizes) * voxel_ml,
    }


# -- images and files --------------------------------------------------------------------
def json_safe(value: Any) -> Any:
    """Plain JSON types: numpy scalars -> int/float, NaN/inf -> None, tuples -> lists."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def _name(image: Image, role: str) -> str:
    return str(image.meta.get("source", role))


def _segmentation_mask(image: Image, role: str) -> np.ndarray:
    if image.is_4d:
        frames = image.array.shape[0]
        raise InputError(_name(image, role), f"4D series ({frames} frames) where a 3D segmentation is expected")
    arr = image.array
    # a NIfTI's NaN/Inf arrive as 0 from ITK: read_image counted them in the file
    if image.meta.get("nonfinite_voxels") or (np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr))):
        raise InputError(_name(image, role), "segmentation contains NaN/Inf voxels")
    return _mask(arr)


def evaluate_images(pred: Image, truth: Image) -> dict:
    """Metrics of a predicted against a reference segmentation, on the truth's grid.

    A prediction on another grid is resampled (nearest neighbour, through physical space) onto
    the truth grid, and the result says so; grids that do not overlap at all raise InputError.
    """
    p_mask = _segmentation_mask(pred, "prediction")
    t_mask = _segmentation_mask(truth, "truth")
    result: dict[str, Any] = {
        "pred": _name(pred, "prediction"),
        "truth": _name(truth, "truth"),
        "size": list(truth.size),
        "spacing": list(truth.spacing),
        "resampled": False,
    }
    for role, im in (("pred", pred), ("truth", truth)):
        a = im.array
        if np.issubdtype(a.dtype, np.floating) and np.any(np.abs(a - np.round(a)) > 1e-3):
            result[f"{role}_thresholded_at"] = PROBABILITY_THRESHOLD  # a probability map: say how it was read
    if not pred.same_grid(truth):
        # Labels shifted by one so that 0 after resampling means "outside the prediction grid".
        coded = pred.with_array(p_mask.astype(np.uint8) + 1)
        out = resample_to(coded, truth, linear=False, default=0).array
        covered = out > 0
        if not covered.any():
            raise InputError(
                result["pred"],
                f"grid (size {pred.size}, spacing {tuple(round(s, 3) for s in pred.spacing)}) does not overlap "
                f"the truth grid of {result['truth']}",
            )
        result.update(
            resampled=True,
            pred_size=list(pred.size),
            pred_spacing=list(pred.spacing),
            pred_volume_ml_native=float(np.count_nonzero(p_mask)) * pred.voxel_volume_ml,
            truth_grid_fraction_covered=float(covered.mean()),
        )
        p_mask = out == 2
    result["metrics"] = case_metrics(p_mask, t_mask, truth.spacing)
    return json_safe(result)


def evaluate_files(pred_path: str | Path, truth_path: str | Path) -> dict:
    """Read two segmentation files (any format read_image takes) and evaluate them."""
    return evaluate_images(read_image(pred_path), read_image(truth_path))


# -- sets --------------------------------------------------------------------------------
def _summary(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if v.size == 0:
        return {"n": 0, "mean": math.nan, "median": math.nan, "std": math.nan, "min": math.nan, "max": math.nan}
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "std": float(v.std(ddof=1)) if v.size > 1 else math.nan,
        "min": float(v.min()),
        "max": float(v.max()),
    }


def volume_pairs(pred_ml: Sequence[float], true_ml: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true volumes as two equally long, finite float arrays (ValueError otherwise)."""
    p = np.asarray(pred_ml, dtype=float)
    t = np.asarray(true_ml, dtype=float)
    if p.ndim != 1 or p.shape != t.shape or p.size == 0:
        raise ValueError(f"need two equally long, non-empty volume lists (got {p.shape} and {t.shape})")
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(t))):
        raise ValueError("volumes must be finite")
    return p, t


def bland_altman(pred_ml: Sequence[float], true_ml: Sequence[float]) -> dict:
    """Bias (mean of pred - true) and 95 % limits of agreement (bias ± 1.96 SD, SD with ddof=1)."""
    p, t = volume_pairs(pred_ml, true_ml)
    d = p - t
    bias = float(d.mean())
    sd = float(d.std(ddof=1)) if d.size > 1 else math.nan
    return {
        "n": int(d.size),
        "mean_difference_ml": bias,
        "sd_difference_ml": sd,
        "loa_lower_ml": bias - LOA_Z * sd,
        "loa_upper_ml": bias + LOA_Z * sd,
    }


def _nan(x: Any) -> float:
    return math.nan if x is None else float(x)


def _strata(rows: list[Mapping[str, Any]], small_lesion_ml: float | None) -> dict | None:
    """Subjects split by mean true-lesion size, as in the DWI paper (threshold: the set's mean)."""
    sizes = [_nan(r.get("mean_true_lesion_size_ml")) for r in rows]
    with_lesions = [s for s in sizes if math.isfinite(s)]
    if not with_lesions:
        return None
    thr = float(np.mean(with_lesions)) if small_lesion_ml is None else float(small_lesion_ml)
    out: dict[str, Any] = {"threshold_ml": thr}
    for name, keep in (("small", lambda s: s < thr), ("large", lambda s: s >= thr)):
        sub = [r for r, s in zip(rows, sizes) if math.isfinite(s) and keep(s)]
        out[name] = {
            "n_cases": len(sub),
            "dice": _summary([_nan(r.get("dice")) for r in sub])["mean"],
            "lesion_f1": _summary([_nan(r.get("lesion_f1")) for r in sub])["mean"],
            "detection_rate": _summary([_nan(r.get("detection_rate")) for r in sub])["mean"],
            "subject_detection_rate": _summary([_nan(r.get("lesion_detected")) for r in sub])["mean"],
        }
    return out


def aggregate(per_case: list[dict], small_lesion_ml: float | None = None) -> dict:
    """Summaries over a set of cases (outputs of case_metrics or evaluate_*).

    Per metric: n (finite values), mean, median, std (ddof=1), min, max, NaNs skipped. Also
    sums of counts, pooled lesion scores, the DWI paper's detection figures (m#FP, m#FN, pooled
    mean FP/FN lesion size, subject detection rate), Bland-Altman volume agreement and
    small/large-lesion strata.
    """
    rows = [r["metrics"] if isinstance(r.get("metrics"), Mapping) else r for r in per_case]
    if not rows:
        raise ValueError("aggregate needs at least one case")
    keys = [k for k, v in rows[0].items() if v is None or isinstance(v, (int, float, np.number))]
    summary = {k: _summary([_nan(r.get(k)) for r in rows]) for k in keys}
    sums = {k: int(sum(int(r.get(k) or 0) for r in rows)) for k in COUNT_KEYS if k in rows[0]}

    l_tp, l_fp, l_fn = sums["lesion_tp"], sums["lesion_fp"], sums["lesion_fn"]
    fp_vox = sum(int(r["fp_lesion_voxels"]) for r in rows)
    fn_vox = sum(int(r["fn_lesion_voxels"]) for r in rows)
    fp_ml = sum(_nan(r["mean_fp_lesion_size_ml"]) * r["n_fp_lesions"] for r in rows if r["n_fp_lesions"])
    fn_ml = sum(_nan(r["mean_fn_lesion_size_ml"]) * r["n_fn_lesions"] for r in rows if r["n_fn_lesions"])
    detection = {
        "m_fp": summary["n_fp_lesions"]["mean"],
        "m_fn": summary["n_fn_lesions"]["mean"],
        # Pooled over all FP (FN) lesions of the set, not a mean of per-case means.
        "mean_fp_lesion_size_voxels": _ratio(fp_vox, l_fp),
        "mean_fn_lesion_size_voxels": _ratio(fn_vox, l_fn),
        "mean_fp_lesion_size_ml": _ratio(fp_ml, l_fp),
        "mean_fn_lesion_size_ml": _ratio(fn_ml, l_fn),
        "lesion_detection_rate": _ratio(l_tp, sums["true_lesions"]),
        "subject_detection_rate": summary["lesion_detected"]["mean"],
        "pooled_lesion_f1": 1.0 if l_tp + l_fp + l_fn == 0 else l_tp / (l_tp + (l_fp + l_fn) / 2.0),
    }
    result = {
        "n_cases": len(rows),
        "metrics": summary,
        "sums": sums,
        "detection": detection,
        "bland_altman": bland_altman([r["pred_volume_ml"] for r in rows], [r["true_volume_ml"] for r in rows]),
        "strata": _strata(rows, small_lesion_ml),
    }
    return json_safe(result)
