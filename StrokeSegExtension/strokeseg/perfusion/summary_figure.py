"""One-page PNG of a perfusion result, as a reader would want it beside the numbers.

Axial slices in radiological view (the patient's right on the image's left), two rows: the core
(magenta) on the CBF map, and the penumbra (hypoperfused outside the core, green) on the Tmax map
with the core's outline, and the decision volumes as the title. Any grid is first
brought to the axis order closest to LPS (SimpleITK ``DICOMOrient``), so a flipped or permuted
direction matrix cannot mirror the picture; an oblique (tilted) slab is shown in its own planes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from ..image import Image
from ..plots import save_figure
from .decision import formatted_volumes

CORE_RGB = (0.93, 0.18, 0.78)  # magenta, as RAPID shows the core
HYPO_RGB = (0.15, 0.85, 0.25)  # green for Tmax above threshold


def radiological(image: Image) -> tuple[np.ndarray, float]:
    """(array indexed [inferior->superior, anterior->posterior, right->left], row/column pixel
    aspect): drawn row by row with ``imshow`` this is the radiological view of each axial slice."""
    oriented = sitk.DICOMOrient(image.to_sitk(), "LPS")
    sx, sy = oriented.GetSpacing()[:2]
    return sitk.GetArrayFromImage(oriented), sy / sx


def _pick_slices(weight: np.ndarray, brain: np.ndarray, n: int) -> list[int]:
    """Up to ``n`` slices spread evenly over those with hypoperfusion (else over those with brain),
    inferior to superior."""
    area = weight.reshape(weight.shape[0], -1).sum(1)
    candidates = [int(z) for z in np.flatnonzero(area)] or [int(z) for z in np.flatnonzero(brain.reshape(brain.shape[0], -1).any(1))]
    if not candidates:
        candidates = list(range(weight.shape[0]))
    if len(candidates) <= n:
        return candidates
    return sorted(int(candidates[round(i)]) for i in np.linspace(0, len(candidates) - 1, n))


def _title(report: dict[str, Any]) -> str:
    f = formatted_volumes(report)
    lines = [f"core {f['core']}   Tmax > {f['tmax_hypo_s']} s {f['hypoperfusion']}   "
             f"mismatch {f['mismatch']}, ratio {f['ratio']}   HIR {f['hir']}",
             f"core: {report.get('core_method', '')}"]
    if f["core_by_rcbf"]:
        lines.append(f"core at rCBF {f['core_by_rcbf']}")
    lines.append("research use only: not a medical device")
    return "\n".join(lines)


def perfusion_summary_png(maps: dict[str, Image], core: Image, penumbra: Image, tissue: Image | None,
                          report: dict[str, Any], path: str | Path, n_slices: int = 6) -> Path:
    """Write the summary figure of one perfusion result (its maps, core and penumbra masks,
    parenchyma and report) to ``path``, atomically; returns the path."""
    cbf, aspect = radiological(maps["cbf"])
    tmax, _ = radiological(maps["tmax"])
    core_a = radiological(core)[0] > 0
    penumbra_a = radiological(penumbra)[0] > 0
    brain = radiological(tissue)[0] > 0 if tissue is not None else cbf > 0
    slices = _pick_slices(penumbra_a | core_a, brain, n_slices)
    # The head's in-plane bounding box (plus a margin): the panels show tissue, not the scan's air.
    if brain.any():
        ys, xs = np.flatnonzero(brain.any(axis=(0, 2))), np.flatnonzero(brain.any(axis=(0, 1)))
        m = 2
        box = (slice(max(ys[0] - m, 0), ys[-1] + m + 1), slice(max(xs[0] - m, 0), xs[-1] + m + 1))
        cbf, tmax, core_a, penumbra_a, brain = (a[(slice(None), *box)] for a in (cbf, tmax, core_a, penumbra_a, brain))
    cbf_hi = float(np.percentile(cbf[brain], 99)) if brain.any() else float(cbf.max() or 1.0)
    th = report.get("thresholds") or {}
    tmax_hi = 2.0 * float(th.get("tmax_severe_s", 10.0))
    core_cmap, hypo_cmap = ListedColormap([CORE_RGB]), ListedColormap([HYPO_RGB])

    panel = 2.1  # inches per slice panel; the title needs ~0.9 inch above them
    height = 2 * panel * min(max(aspect * cbf.shape[1] / max(cbf.shape[2], 1), 0.5), 1.5) + 0.9
    fig = Figure(figsize=(panel * len(slices) + 0.4, height), dpi=110, facecolor="black")
    axes = fig.subplots(2, len(slices), squeeze=False)
    for col, z in enumerate(slices):
        top, bottom = axes[0, col], axes[1, col]
        top.imshow(np.where(brain[z], cbf[z], 0.0), cmap="gray", vmin=0.0, vmax=max(cbf_hi, 1e-6), aspect=aspect,
                   interpolation="nearest")
        top.imshow(np.ma.masked_where(~core_a[z], core_a[z]), cmap=core_cmap, alpha=0.7, aspect=aspect, interpolation="nearest")
        bottom.imshow(np.where(brain[z], tmax[z], 0.0), cmap="gray", vmin=0.0, vmax=tmax_hi, aspect=aspect, interpolation="nearest")
        bottom.imshow(np.ma.masked_where(~penumbra_a[z], penumbra_a[z]), cmap=hypo_cmap, alpha=0.6, aspect=aspect, interpolation="nearest")
        if core_a[z].any():
            bottom.contour(core_a[z].astype(np.uint8), levels=[0.5], colors=[CORE_RGB], linewidths=0.8)
        top.set_title(f"slice {z + 1}/{cbf.shape[0]}", color="w", fontsize=8)
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
    axes[0, 0].set_ylabel("CBF, core", color=CORE_RGB, fontsize=9)
    axes[1, 0].set_ylabel(f"Tmax, > {th.get('tmax_hypo_s', 6):g} s", color=HYPO_RGB, fontsize=9)
    for row in (0, 1):  # the view's sides, once per row
        axes[row, 0].text(0.02, 0.5, "R", color="w", fontsize=8, transform=axes[row, 0].transAxes, va="center")
        axes[row, -1].text(0.98, 0.5, "L", color="w", fontsize=8, transform=axes[row, -1].transAxes, va="center", ha="right")
    fig.suptitle(_title(report), color="w", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.9 / height), pad=0.3)
    return save_figure(fig, path)
