"""How visible is each T1 phantom's lesion to the T1 model, and does its Dice follow?

The T1 model sees the T1 and its mirror image, rigidly registered (the card's derived channel),
so a chronic lesion shows as asymmetry: mirror minus T1 is positive where tissue is darker than
its counterpart. Normal tissue is asymmetric too (anatomy, noise, registration), so per case this
measures the asymmetry in a 10 mm shell around the lesion (the lesion itself left out) and counts
the lesion voxels whose asymmetry exceeds the shell's 95th percentile: the share of the lesion
that stands out from the tissue around it. The inputs are the engine's own (``prepare`` with the
model's card) on the model grid, the truth as the training labels are made (``label_on_grid``).

The per-case Dice and TPR are the run's own evaluation (``test/per_case.csv``, and with
``--split train`` the ``fit_train/per_case.csv`` of ``strokeseg-train fit``), so rerun those first.

    python benchmarks/t1_lesion_visibility.py --config training/configs/t1_unet_stage10_data.json \
        --plot docs/models/t1_unet/visibility.png

Writes ``benchmarks/results/t1_lesion_visibility.json`` (``_train.json`` for ``--split train``): per case
and the Spearman correlations.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
from pathlib import Path

import numpy as np
from scipy import ndimage, stats
from tqdm import tqdm

from strokeseg.io import read_image
from strokeseg.preprocess import prepare

HERE = Path(__file__).resolve().parent
SHELL_MM = 10.0


def visibility(case: Path, card) -> dict[str, float]:
    """Share of the lesion whose asymmetry stands out from the shell around it, and the lesion's
    median asymmetry in units of the shell's spread (a contrast-to-noise ratio)."""
    from strokeseg_training.data import label_on_grid

    prepared = prepare({"t1": read_image(case / "t1.nii.gz")}, card)
    label = label_on_grid(read_image(case / "lesion.nii.gz"), prepared.model_grid).astype(bool)
    if not label.any():
        return {"visible_fraction": float("nan"), "cnr": float("nan")}
    asym = prepared.array[1].astype(np.float32) - prepared.array[0].astype(np.float32)
    spacing = np.array(prepared.model_grid.spacing)[::-1]  # (z, y, x) like the array
    radius = np.maximum(1, np.round(SHELL_MM / spacing)).astype(int)
    box = np.ones(2 * radius + 1, bool)  # the shell's half-widths as a box: cheaper than a ball and near enough
    shell = ndimage.binary_dilation(label, structure=box) & ~label
    shell &= prepared.array[0] > np.percentile(prepared.array[0], 5)  # inside the head, not the air around it
    ref = asym[shell]
    q25, q50, q75, q95 = np.percentile(ref, [25, 50, 75, 95])
    spread = max((q75 - q25) / 1.349, 1e-6)  # robust standard deviation
    lesion = asym[label]
    return {"visible_fraction": float(np.mean(lesion > q95)), "cnr": float((np.median(lesion) - q50) / spread)}


def _per_case(path: Path) -> dict[str, dict[str, float]]:
    with path.open(encoding="utf-8") as f:
        return {r["case"]: {k: float(r[k]) for k in ("dice", "tpr", "true_volume_ml")} for r in csv.DictReader(f)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="a T1 model's training config (its run and its cases)")
    ap.add_argument("--split", choices=["test", "train"], default="test",
                    help="train: the training cases that `strokeseg-train fit` scored")
    ap.add_argument("--out", help="default benchmarks/results/t1_lesion_visibility.json (_train.json for --split train)")
    ap.add_argument("--plot", help="PNG: Dice against the visible share of each lesion")
    args = ap.parse_args(argv)
    from strokeseg_training.config import card_of, load_config, run_dir
    from strokeseg_training.data import build_split, training_case_folders

    cfg = load_config(args.config, [])
    run = run_dir(cfg)
    if args.split == "test":
        _, root = build_split(cfg, "test", workers=int(cfg["data"].get("workers", 2)))
        scores = _per_case(run / "test" / "per_case.csv")
        cases = [root / name for name in sorted(scores)]
    else:
        scores = _per_case(run / "fit_train" / "per_case.csv")
        cases = [c for c in training_case_folders(cfg, len(scores)) if c.name in scores]
    card = card_of(cfg)
    rows = []
    for case in tqdm(cases, desc="visibility", unit="case"):
        rows.append({"case": case.name, **scores[case.name], **visibility(case, card)})
    ok = [r for r in rows if np.isfinite(r["visible_fraction"])]
    vis = [r["visible_fraction"] for r in ok]
    corr = {f"spearman_{m}_vs_visible_fraction": float(stats.spearmanr(vis, [r[m] for r in ok])[0]) for m in ("dice", "tpr")}
    corr["spearman_dice_vs_cnr"] = float(stats.spearmanr([r["cnr"] for r in ok], [r["dice"] for r in ok])[0])
    corr["spearman_visible_fraction_vs_volume"] = float(stats.spearmanr(vis, [r["true_volume_ml"] for r in ok])[0])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"config": args.config, "split": args.split, "model_run": str(run.name), "commit": commit or "unknown",
              "shell_mm": SHELL_MM, "correlations": corr, "cases": rows}
    out = Path(args.out or HERE / "results" / f"t1_lesion_visibility{'_train' if args.split == 'train' else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for r in rows:
        print(f"{r['case']:>16}  Dice {r['dice']:.2f}  TPR {r['tpr']:.2f}  {r['true_volume_ml']:7.2f} mL  "
              f"visible {r['visible_fraction']:.2f}  CNR {r['cnr']:+.2f}")
    print(json.dumps(corr, indent=1))
    if args.plot:
        _plot(ok, Path(args.plot), f"{run.name}, {args.split} phantoms")
    return 0


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    vis = np.array([r["visible_fraction"] for r in rows])
    size = 20 + 4 * np.sqrt([r["true_volume_ml"] for r in rows]) ** 1.5
    for ax, metric in zip(axes, ("dice", "tpr")):
        ax.scatter(vis, [r[metric] for r in rows], s=size, alpha=0.6, edgecolor="k")
        ax.set_xlabel("share of the lesion above the shell's 95th percentile of asymmetry")
        ax.set_ylabel({"dice": "Dice", "tpr": "TPR (lesion voxels found)"}[metric])
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    fig.suptitle(f"T1 lesion visibility against the model's result ({title}; marker area ~ volume)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
