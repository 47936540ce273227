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


def objective(rows: list[dict[str, float]], name: str = "dice+f1") -> float:
    dice = float(np.mean([r["dice"] for r in rows]))
    f1 = float(np.mean([r["lesion_f1"] for r in rows]))
    if name == "dice":
        return dice
    if name == "dice-hd":  # paper 001's DSC-HD trade-off, HD in cm penalising
        hd = np.nanmean([r["hd95_mm"] for r in rows]) / 10.0
        return dice - 0.02 * float(hd)
    return dice + f1


def tune(cases: list[CaseProbability], grid: dict[str, list[float]], obj: str = "dice+f1") -> tuple[PostprocessSettings, list[dict]]:
    """Grid search of threshold x closing radius x minimum lesion size on validation cases."""
    table = []
    best, best_s = -np.inf, None
    combos = list(itertools.product(grid["threshold"], grid["closing_mm"], grid["min_lesion_ml"]))
    for th, cl, mn in tqdm(combos, desc="tuning", unit="setting"):
        s = PostprocessSettings(threshold=th, closing_mm=cl, min_lesion_ml=mn)
        rows = score(cases, s)
        val = objective(rows, obj)
        table.append({"threshold": th, "closing_mm": cl, "min_lesion_ml": mn, "objective": val,
                      "mean_dice": float(np.mean([r["dice"] for r in rows])),
                      "mean_lesion_f1": float(np.mean([r["lesion_f1"] for r in rows]))})
        if val > best:
            best, best_s = val, s
    return best_s, table


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
