"""Render docs/bundled_models.png: every bundled model on one held-out phantom of its kind.

One row per model: its input channels on the axial slice with the most true lesion, then the
truth (green) and the model's lesion (red) outlined on the first input. The phantoms are fresh
(test split of the lesion library, seeds not used in training or evaluation; DWI and T1 with a
territorial infarct), run through the engine exactly as the command line runs a user's case, and
shown whatever the result: failures are part of the picture.

    python docs/make_bundled_models.py [--out docs/bundled_models.png] [--seed 881000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "StrokeSegExtension"))

SOOP_LESIONS = REPO_ROOT.parent / "shared" / "data" / "soop" / "lesions"
# model -> (phantom modality, the inputs a user would give, the channels to show)
ROWS = {
    "dwi-unet": ("dwi", ("dwi", "b0"), ("dwi", "adc")),
    "ctp-unet": ("ctp", ("cbf", "cbv", "mtt", "tmax"), ("cbf", "cbv", "tmax")),
    "mrp-unet": ("pwi", ("adc", "cbf", "cbv", "mtt", "tmax"), ("adc", "cbf", "tmax")),
    "t1-unet": ("t1", ("t1",), ("t1",)),
}
CMAPS = {"cbf": "magma", "cbv": "magma", "tmax": "jet", "mtt": "jet"}


def simulate(modality: str, seed: int, library: Path | None):
    split = "test" if library is not None else None
    if modality == "dwi":
        from strokeseg.phantom import simulate_dwi

        return simulate_dwi(seed, lesion_library=library, split=split, lesion_pattern="territorial")
    if modality in ("ctp", "pwi"):
        from strokeseg.phantom.perfusion import simulate_perfusion

        return simulate_perfusion(seed, modality, library, split, lesion=True)
    from strokeseg.phantom import simulate_structural

    return simulate_structural(modality, seed, library, split, lesion_pattern="territorial")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO_ROOT / "docs" / "bundled_models.png"))
    ap.add_argument("--seed", type=int, default=881000)
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from strokeseg.metrics import case_metrics
    from strokeseg.models import load_registry
    from strokeseg.pipeline import segment_images

    library = SOOP_LESIONS if SOOP_LESIONS.is_dir() else None
    bundled = {c.id: c for c in load_registry()}
    rows = [m for m in ROWS if m in bundled]
    ncols = 1 + max(len(ROWS[m][2]) for m in rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(3.0 * ncols, 3.1 * len(rows)), squeeze=False)
    for r, model in enumerate(rows):
        modality, given, shown = ROWS[model]
        case = simulate(modality, args.seed + r, library)
        res = segment_images({k: case.images[k] for k in given}, model=model, device="cpu")
        truth, pred = case.lesion.array > 0, res.mask.array > 0
        z = int(np.argmax(truth.sum(axis=(1, 2)))) if truth.any() else truth.shape[0] // 2
        m = case_metrics(pred, truth, res.mask.spacing)
        images = case.images
        for c, key in enumerate(shown):
            a = np.asarray(images[key].array[z], dtype=np.float32)
            lo, hi = np.percentile(a, [1, 99])
            axes[r, c].imshow(a, cmap=CMAPS.get(key, "gray"), vmin=lo, vmax=hi)
            axes[r, c].set_title(key.upper(), fontsize=9)
        base = np.asarray(images[shown[0]].array[z], dtype=np.float32)
        lo, hi = np.percentile(base, [1, 99])
        ax = axes[r, len(shown)]
        ax.imshow(base, cmap="gray", vmin=lo, vmax=hi)
        if truth[z].any():
            ax.contour(truth[z], levels=[0.5], colors="lime", linewidths=0.9)
        if pred[z].any():
            ax.contour(pred[z], levels=[0.5], colors="red", linewidths=0.9)
        ax.set_title(f"truth (green) / {model} (red)\nDice {m['dice']:.2f}, {res.report['total_volume_ml']:.1f} mL "
                     f"vs {float(truth.sum()) * case.lesion.voxel_volume_ml:.1f} mL", fontsize=8)
        for c in range(ncols):
            axes[r, c].axis("off")
        axes[r, 0].text(-0.08, 0.5, f"{model} {bundled[model].version}", transform=axes[r, 0].transAxes,
                        rotation=90, va="center", ha="right", fontsize=10)
    fig.suptitle("Bundled models on held-out phantoms (unseen seeds and lesion shapes)", fontsize=11)
    fig.tight_layout()
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}")
    fig.savefig(tmp, dpi=90, format="png")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
