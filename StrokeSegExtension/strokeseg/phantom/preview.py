"""Montage of simulated cases (b0, DWI, ADC with the truth contour) for docs and eyeballing."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..image import resample_to
from .cases import PhantomCase


def _slices(case: PhantomCase, n: int) -> list[int]:
    m = case.lesion.array
    nz = m.shape[0]
    if m.any():
        area = m.sum(axis=(1, 2))
        best = int(np.argmax(area))
        other = int(np.clip(best + (nz // 5 if best < nz // 2 else -nz // 5), 0, nz - 1))
        ks = [best, other]
    else:
        ks = [nz // 2, int(nz * 0.3)]
    return ks[:n]


def render_montage(cases: list[PhantomCase], path: str | Path, slices_per_case: int = 2) -> Path:
    """Rows = cases; columns = (b0, DWI, ADC) for each chosen slice; truth contour in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("b0", "dwi", "adc") + (("flair",) if any("flair" in c.images for c in cases) else ())
    ncol = len(keys) * slices_per_case
    fig, axes = plt.subplots(len(cases), ncol, figsize=(2.2 * ncol, 2.3 * len(cases)), squeeze=False)
    fig.patch.set_facecolor("black")
    for r, case in enumerate(cases):
        for s, k in enumerate(_slices(case, slices_per_case)):
            for c, key in enumerate(keys):
                ax = axes[r, s * len(keys) + c]
                if key not in case.images:
                    ax.set_axis_off()
                    continue
                img = case.images[key]
                if not img.same_grid(case.images["dwi"]):  # e.g. FLAIR on its own grid
                    img = resample_to(img, case.images["dwi"])
                a = img.array[k].astype(np.float32)
                brain = case.images["b0"].array[k] > 0
                hi = np.percentile(a[brain], 99.5) if brain.any() else a.max()
                if key == "adc":
                    hi = 3200
                elif key == "flair":
                    hi = np.percentile(a[a > 0], 99.5) if (a > 0).any() else 1
                sx, sy = img.spacing[0], img.spacing[1]
                ax.imshow(a, cmap="gray", vmin=0, vmax=max(hi, 1), aspect=sy / sx, interpolation="nearest")
                m = case.lesion.array[k]
                if m.any() and key != "b0":
                    ax.contour(m, levels=[0.5], colors="r", linewidths=0.6)
                ax.set_xticks([])
                ax.set_yticks([])
                for sp in ax.spines.values():
                    sp.set_visible(False)
                if r == 0:
                    ax.set_title(f"{key} (slice {s + 1})", color="w", fontsize=8)
        info = case.info
        axes[r, 0].set_ylabel(f"{case.case_id}\n{info['pattern']} {info['lesion_volume_ml']:.1f} mL\n"
                              f"{info['acquisition']['spacing_mm'][0]:.1f}x{info['acquisition']['spacing_mm'][2]:.1f} mm "
                              f"{info['tissue']['field_strength_t']}T", color="w", fontsize=7)
    fig.tight_layout(pad=0.2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, facecolor="black")
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m strokeseg.phantom.preview OUT.png [--lesion-library DIR]``: the docs montage."""
    import argparse

    from .cases import simulate_dwi

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("out")
    ap.add_argument("--lesion-library", default=None)
    ap.add_argument("--seeds", default="1,2,3,4,5")
    args = ap.parse_args(argv)
    patterns = ["territorial", "lacunar", "embolic", "territorial", "none"]
    cases = [simulate_dwi(int(s), lesion_library=args.lesion_library, split="train" if args.lesion_library else None,
                          flair=True, lesion_pattern=patterns[i % len(patterns)])
             for i, s in enumerate(args.seeds.split(","))]
    render_montage(cases, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
