"""PNG overlays of a segmentation: what a clinician would see, for the terminal and the README."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .image import Image


def _pick_slices(mask: np.ndarray, prob: np.ndarray, n: int) -> list[int]:
    """Axial slices through the lesion (largest first), else through the probability peak or centre."""
    area = mask.reshape(mask.shape[0], -1).sum(1)
    if area.any():
        order = [int(z) for z in np.argsort(-area) if area[z] > 0][: n * 3]
        return sorted(order[:: max(len(order) // n, 1)][:n])
    z = int(np.argmax(prob.reshape(prob.shape[0], -1).max(1))) if prob.any() else mask.shape[0] // 2
    return sorted({max(0, min(mask.shape[0] - 1, z + d)) for d in range(-(n // 2), n - n // 2)})


def overlay_png(
    background: Image,
    probability: Image,
    mask: Image,
    path: str | Path,
    *,
    truth: Image | None = None,
    title: str = "",
    n_slices: int = 4,
) -> Path:
    """Axial slices of ``background`` with the probability map (heat) and the mask outline (and truth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bg, pr, mk = background.array.astype(np.float32), probability.array, mask.array > 0
    tr = truth.array > 0 if truth is not None else None
    slices = _pick_slices(mk, pr, n_slices)
    lo, hi = np.percentile(bg, [1, 99.5])
    aspect = background.spacing[1] / background.spacing[0]
    fig, axes = plt.subplots(1, len(slices), figsize=(3.2 * len(slices), 3.6), squeeze=False)
    for ax, z in zip(axes[0], slices):
        # Array rows run along +y (LPS posterior) and columns along +x (LPS left): radiological view.
        ax.imshow(bg[z], cmap="gray", vmin=lo, vmax=hi, aspect=aspect)
        ax.imshow(np.ma.masked_less(pr[z], 0.05), cmap="hot", vmin=0, vmax=1, alpha=0.45, aspect=aspect)
        if mk[z].any():
            ax.contour(mk[z], levels=[0.5], colors="cyan", linewidths=1.0)
        if tr is not None and tr[z].any():
            ax.contour(tr[z], levels=[0.5], colors="lime", linewidths=0.8, linestyles="dashed")
        ax.set_title(f"slice {z}", fontsize=9)
        ax.axis("off")
    legend = "heat: lesion probability   cyan: StrokeSeg mask" + ("   green dashed: truth" if tr is not None else "")
    fig.suptitle(f"{title}\n{legend}" if title else legend, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
