"""Whole-case evaluation of a trained network through the engine, on the acquired grid.

Probability maps are computed once per case; post-processing tuning (grid search) and the
held-out test evaluation both work from them.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from strokeseg.image import Image
from strokeseg.inference import predict
from strokeseg.io import read_image
from strokeseg.metrics import aggregate, case_metrics, json_safe
from strokeseg.modality import find_case_inputs, load_inputs
from strokeseg.postprocess import PostprocessSettings, postprocess
from strokeseg.preprocess import prepare, to_reference


@dataclass
class CaseProbability:
    name: str
    probability: Image
    truth: np.ndarray


def case_probabilities(case_dirs: Sequence[Path], nets: list[torch.nn.Module], card: Any,
                       device: str = "cpu", mirror_tta: bool | None = None) -> list[CaseProbability]:
    out = []
    for case in tqdm(case_dirs, desc="inference", unit="case"):
        files = find_case_inputs(case)
        images = load_inputs({k: v for k, v in files.items() if k in (*card.required, *card.optional, "b0")})
        prepared = prepare(images, card)
        prob = predict(prepared.array, nets, card, device=device, mirror_tta=mirror_tta)
        prob_img = to_reference(prob, prepared.model_grid, prepared.reference)
        truth = read_image(case / "lesion.nii.gz").array > 0
        out.append(CaseProbability(case.name, prob_img, truth))
    return out


def score(cases: list[CaseProbability], s: PostprocessSettings) -> list[dict[str, float]]:
    rows = []
    for c in cases:
        m = case_metrics(postprocess(c.probability.array, c.probability.spacing, s), c.truth, c.probability.spacing)
        rows.append({"case": c.name, **m})
    return rows


def dsc_hd_score(dice: float, hd: float, hd_max: float) -> float:
    """Paper 001's combined score (Eq. 2): DSC (1 - HD/HDmax) / (DSC + (1 - HD/HDmax)), 0 when both are 0.

    Half the harmonic mean of the Dice and the normalised closeness 1 - HD/HDmax; HD beyond
    HDmax counts as HDmax."""
    h = 1.0 - min(max(float(hd), 0.0), float(hd_max)) / float(hd_max) if hd_max > 0 else 0.0
    d = float(dice)
    return 0.0 if d + h <= 0 else d * h / (d + h)


def _hd_values(rows: list[dict[str, float]], hd_max: float) -> np.ndarray:
    """Per-case HD95 with an undefined distance (one mask empty) counted as the worst, HDmax."""
    hd = np.array([r["hd95_mm"] for r in rows], dtype=float)
    return np.where(np.isfinite(hd), np.minimum(hd, hd_max), hd_max)


OBJECTIVES = ("dice+f1", "dice", "dice-hd", "dsc-hd-score", "lesion_f1", "mcc")


def objective(rows: list[dict[str, float]], name: str = "dice+f1", *, hd_max: float | None = None) -> float:
    """A setting's score over validation cases; higher is better. ``dsc-hd-score`` needs ``hd_max``
    (:func:`tune` takes it from the grid's ``hd_max_mm`` or the largest HD95 it met)."""
    dice = float(np.mean([r["dice"] for r in rows]))
    if name == "dice":
        return dice
    if name == "dice-hd":  # a linear DSC-HD trade-off, HD in cm penalising
        hd = np.nanmean([r["hd95_mm"] for r in rows]) / 10.0
        return dice - 0.02 * float(hd)
    if name == "dsc-hd-score":  # paper 001, Eq. 2, on the set's mean DSC and mean HD
        if hd_max is None:
            raise ValueError("objective 'dsc-hd-score' needs hd_max")
        return dsc_hd_score(dice, float(np.mean(_hd_values(rows, hd_max))), hd_max)
    if name in ("lesion_f1", "mcc"):
        return float(np.nanmean([r[name] for r in rows]))
    if name == "dice+f1":
        return dice + float(np.mean([r["lesion_f1"] for r in rows]))
    raise ValueError(f"unknown tuning objective '{name}' (known: {', '.join(OBJECTIVES)})")


# -- threshold tuning on the PR and ROC curves (paper 000) -----------------------------------

CURVE_BINS = 10_000  # threshold resolution 1e-4: exact curves would sort every voxel of the set


def confusion_curve(cases: Sequence[CaseProbability] | Sequence[tuple[np.ndarray, np.ndarray]],
                    bins: int = CURVE_BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """(thresholds, TP, FP, P, N) of ``p >= threshold`` over all voxels of all cases pooled
    (paper 000 concatenates the validation subjects before computing its curves)."""
    pos = np.zeros(bins + 1, np.int64)
    neg = np.zeros(bins + 1, np.int64)
    for c in cases:
        prob, truth = (c.probability.array, c.truth) if isinstance(c, CaseProbability) else c
        p = np.clip(np.nan_to_num(np.asarray(prob, dtype=np.float32), nan=0.0), 0.0, 1.0)
        t = np.asarray(truth) > 0
        idx = np.floor(p * bins).astype(np.int64)  # bin k holds p in [k/bins, (k+1)/bins)
        pos += np.bincount(idx[t], minlength=bins + 1)
        neg += np.bincount(idx[~t], minlength=bins + 1)
    tp = np.cumsum(pos[::-1])[::-1]  # predicted positive at threshold k/bins: bins k..end
    fp = np.cumsum(neg[::-1])[::-1]
    return np.arange(bins + 1) / bins, tp, fp, int(pos.sum()), int(neg.sum())


def curve_threshold(cases: Sequence[CaseProbability] | Sequence[tuple[np.ndarray, np.ndarray]], rule: str,
                    bins: int = CURVE_BINS) -> float:
    """``tht0``: the threshold maximising precision x recall on the PR curve; ``tht1``: the one
    maximising TPR - FPR (Youden / bookmaker informedness) on the ROC curve. Ties: the lowest."""
    th, tp, fp, n_pos, n_neg = confusion_curve(cases, bins)
    if n_pos == 0:
        raise ValueError(f"{rule}: the validation cases have no lesion voxels")
    valid = th > 0  # a threshold of 0 calls every voxel lesion; the card needs 0 < threshold < 1
    recall = tp / n_pos
    if rule == "tht0":
        with np.errstate(invalid="ignore", divide="ignore"):
            precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        score = precision * recall
    elif rule == "tht1":
        score = recall - (fp / n_neg if n_neg else 0.0)
    else:
        raise ValueError(f"unknown threshold rule '{rule}' (use tht0 or tht1)")
    score = np.where(valid, score, -np.inf)
    return float(np.clip(th[int(np.argmax(score))], 1.0 / bins, 1.0 - 1.0 / bins))


THRESHOLD_RULES = ("tht0", "tht1")


def _closing_values(grid: dict[str, Any]) -> list[tuple[float, float | None]]:
    """(closing_mm, iterations or None). ``closing_iterations`` with ``closing_ball_voxels`` (3) and
    ``closing_voxel_mm`` (paper 000's "filling holes": a closing with a 3-voxel ball, iterated):
    n iterations of a ball of r voxels dilate, then erode, by the n-fold sum of the ball, i.e. a
    ball of n r voxels, here n r x voxel size in mm for the engine's physical closing radius."""
    if "closing_iterations" in grid:
        r = float(grid.get("closing_ball_voxels", 3))
        vox = float(grid.get("closing_voxel_mm", 1.0))
        return [(float(n) * r * vox, float(n)) for n in grid["closing_iterations"]]
    return [(float(c), None) for c in grid.get("closing_mm", [0.0])]


def tune(cases: list[CaseProbability], grid: dict[str, Any], obj: str = "dice+f1") -> tuple[PostprocessSettings, list[dict]]:
    """Grid search of threshold x closing x minimum lesion size on validation cases.

    ``grid``: ``threshold`` (a list; entries may be the curve rules "tht0"/"tht1", or the whole
    entry one rule), ``closing_mm`` or ``closing_iterations`` (+ ``closing_ball_voxels``,
    ``closing_voxel_mm``), ``min_lesion_ml``, and for ``dsc-hd-score`` optionally ``hd_max_mm``
    (default: the largest finite HD95 met in the search). ``obj``: one of :data:`OBJECTIVES`.
    """
    if obj not in OBJECTIVES:
        raise ValueError(f"unknown tuning objective '{obj}' (known: {', '.join(OBJECTIVES)})")
    ths = grid["threshold"]
    ths = [ths] if isinstance(ths, str) else list(ths)
    resolved = []
    for th in ths:
        if isinstance(th, str):
            resolved.append((curve_threshold(cases, th), th))
        else:
            resolved.append((float(th), None))
    combos = list(itertools.product(resolved, _closing_values(grid), [float(m) for m in grid.get("min_lesion_ml", [0.0])]))
    evaluated = []
    for (th, rule), (cl, iters), mn in tqdm(combos, desc="tuning", unit="setting"):
        s = PostprocessSettings(threshold=th, closing_mm=cl, min_lesion_ml=mn)
        evaluated.append((s, rule, iters, score(cases, s)))
    hd_max = grid.get("hd_max_mm")
    if obj == "dsc-hd-score" and hd_max is None:
        finite = [r["hd95_mm"] for *_, rows in evaluated for r in rows if np.isfinite(r["hd95_mm"])]
        hd_max = max(finite) if finite else 1.0
    table = []
    best, best_s = -np.inf, None
    for s, rule, iters, rows in evaluated:
        val = objective(rows, obj, hd_max=None if hd_max is None else float(hd_max))
        entry = {"threshold": s.threshold, "closing_mm": s.closing_mm, "min_lesion_ml": s.min_lesion_ml, "objective": val,
                 "mean_dice": float(np.mean([r["dice"] for r in rows])),
                 "mean_lesion_f1": float(np.mean([r["lesion_f1"] for r in rows]))}
        if rule:
            entry["threshold_rule"] = rule
        if iters is not None:
            entry["closing_iterations"] = iters
        if obj == "dsc-hd-score":
            entry["mean_hd95_mm"] = float(np.mean(_hd_values(rows, float(hd_max))))
            entry["hd_max_mm"] = float(hd_max)
        table.append(entry)
        if val > best:
            best, best_s = val, s
    return best_s, table


def ablate_postprocess(cases: list[CaseProbability], table: list[dict],
                       scored: tuple[PostprocessSettings, list[dict]] | None = None) -> list[dict]:
    """Every post-processing setting of a tuning table scored on other cases (the test split).

    Tuning picks one setting on validation; a paper's post-processing ablation (paper 000: THT0
    vs THT1, with and without "filling holes") asks how each alternative fares on held-out cases.
    Each row keeps the setting's validation figures and adds its test medians and means.
    ``scored``: a setting already scored on these cases, and its rows (the chosen one), reused."""
    rows = []
    for entry in tqdm(table, desc="post-processing ablation", unit="setting"):
        s = PostprocessSettings(threshold=entry["threshold"], closing_mm=entry["closing_mm"],
                                min_lesion_ml=entry["min_lesion_ml"])
        case_rows = scored[1] if scored is not None and scored[0] == s else score(cases, s)
        metrics = json_safe(aggregate(case_rows))["metrics"]
        test = {f"{k}_{stat}": metrics[k][stat] for k in ("dice", "lesion_f1", "abs_volume_diff_ml", "tpr", "ppv")
                for stat in ("median", "mean")}
        rows.append({**{k: v for k, v in entry.items() if not k.startswith("mean_")},
                     "val_mean_dice": entry.get("mean_dice"), "val_mean_lesion_f1": entry.get("mean_lesion_f1"),
                     "test": test})
    return rows


def ablation_markdown(rows: list[dict], chosen: dict) -> str:
    """The ablation as a Markdown table, the validation-chosen setting marked."""
    lines = ["| threshold | closing | val mean Dice | test median Dice | test mean Dice | test median lesion F1 "
             "| test median abs. vol. diff (mL) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        th = f"{r['threshold_rule'].upper()} ({r['threshold']:.3f})" if r.get("threshold_rule") else f"{r['threshold']:.3f}"
        cl = (f"{r['closing_iterations']:g} iteration{'' if r['closing_iterations'] == 1 else 's'} ({r['closing_mm']:g} mm)" if "closing_iterations" in r
              else f"{r['closing_mm']:g} mm")
        if r.get("min_lesion_ml"):
            cl += f", min {r['min_lesion_ml']:g} mL"
        mark = " (chosen)" if all(abs(float(r[k]) - float(chosen[k])) < 1e-9
                                  for k in ("threshold", "closing_mm", "min_lesion_ml")) else ""
        t = r["test"]
        lines.append(f"| {th}{mark} | {cl} | {r['val_mean_dice']:.3f} | {t['dice_median']:.3f} | {t['dice_mean']:.3f} "
                     f"| {t['lesion_f1_median']:.2f} | {t['abs_volume_diff_ml_median']:.1f} |")
    return "\n".join(lines) + "\n"


def summarise(rows: list[dict], out_dir: Path, title: str) -> dict:
    """Aggregate metrics, write per-case CSV, summary JSON and plots."""
    from strokeseg.plots import bland_altman_plot, volume_scatter_plot

    out_dir.mkdir(parents=True, exist_ok=True)
    summary = json_safe(aggregate(rows))
    keys = [k for k in rows[0] if k != "case"]
    with (out_dir / "per_case.csv").open("w") as f:
        f.write("case," + ",".join(keys) + "\n")
        for r in rows:
            f.write(r["case"] + "," + ",".join(f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    pred = [r["pred_volume_ml"] for r in rows]
    true = [r["true_volume_ml"] for r in rows]
    bland_altman_plot(pred, true, out_dir / "bland_altman.png", title=title)
    volume_scatter_plot(pred, true, out_dir / "volumes.png", title=title)
    return summary
