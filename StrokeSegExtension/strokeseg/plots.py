"""Evaluation plots as PNG: Bland-Altman volume agreement and predicted-vs-true volumes.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so plotting neither needs a
display nor touches the global backend other code may rely on. Files are written atomically.
"""

from __future__ import annotations

import io as _bytes_io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .io import write_bytes
from .metrics import bland_altman, volume_pairs

_DPI = 150


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``path``, atomically."""
    path = Path(path)
    buf = _bytes_io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return write_bytes(buf.getvalue(), path)  # OutputError when the folder cannot be written


def bland_altman_plot(pred_ml: Sequence[float], true_ml: Sequence[float], path: str | Path, title: str = "") -> Path:
    """Difference (pred - true) against mean volume, with bias and 1.96 SD limits of agreement."""
    p, t = volume_pairs(pred_ml, true_ml)
    ba = bland_altman(p, t)
    fig = Figure(figsize=(6.0, 4.5), dpi=_DPI)
    ax = fig.add_subplot()
    ax.scatter((p + t) / 2.0, p - t, s=18, alpha=0.75, color="tab:blue", edgecolors="none")
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.axhline(ba["mean_difference_ml"], color="tab:red", lw=1.2, label=f"bias {ba['mean_difference_ml']:.2f} mL")
    if np.isfinite(ba["sd_difference_ml"]):  # limits need at least two cases
        for key in ("loa_lower_ml", "loa_upper_ml"):
            ax.axhline(ba[key], color="tab:red", lw=1.0, ls="--")
        loa = f"95% LoA [{ba['loa_lower_ml']:.2f}, {ba['loa_upper_ml']:.2f}] mL"
        ax.plot([], [], color="tab:red", ls="--", label=loa)
    ax.set_xlabel("mean of predicted and true volume (mL)")
    ax.set_ylabel("predicted - true volume (mL)")
    ax.set_title(title or f"Bland-Altman volume agreement (n={ba['n']})")
    ax.legend(loc="best", fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def volume_scatter_plot(pred_ml: Sequence[float], true_ml: Sequence[float], path: str | Path, title: str = "") -> Path:
    """Predicted against true lesion volume, with the identity line and Pearson r."""
    p, t = volume_pairs(pred_ml, true_ml)
    fig = Figure(figsize=(5.0, 5.0), dpi=_DPI)
    ax = fig.add_subplot()
    ax.scatter(t, p, s=18, alpha=0.75, color="tab:blue", edgecolors="none")
    hi = float(max(p.max(), t.max(), 1e-3)) * 1.05
    ax.plot([0.0, hi], [0.0, hi], color="0.4", lw=1.0, ls="--", label="identity")
    if p.size > 1 and np.std(p) > 0 and np.std(t) > 0:
        r = float(np.corrcoef(t, p)[0, 1])
        ax.plot([], [], " ", label=f"Pearson r = {r:.3f}")
    ax.set_xlim(0.0, hi)
    ax.set_ylim(0.0, hi)
    ax.set_aspect("equal")
    ax.set_xlabel("true volume (mL)")
    ax.set_ylabel("predicted volume (mL)")
    ax.set_title(title or f"Lesion volume (n={p.size})")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
