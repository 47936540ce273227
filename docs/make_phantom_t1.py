"""Make docs/phantom_t1.png: structural phantoms with their truth contour (red).

Rows: a chronic-stroke T1 on a 1 mm isotropic grid (MPRAGE, ATLAS-like), the same kind of patient
on an oblique 0.9 x 0.9 x 5 mm clinical grid (spin-echo T1), and a sub-acute ISLES'15 SISS-like
case (T1, T2, FLAIR, DWI on one grid). Columns: axial slices through the lesion, plus a sagittal
or coronal reformat for the 1 mm case.

    python docs/make_phantom_t1.py [--lesion-library ../shared/data/soop/lesions] [--out docs/phantom_t1.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from strokeseg.phantom import simulate_siss, simulate_t1

ROOT = Path(__file__).resolve().parents[1]


def _window(a: np.ndarray) -> tuple[float, float]:
    v = a[a > 0]
    return 0.0, float(np.percentile(v, 99.5)) if v.size else 1.0


def _show(ax, img: np.ndarray, mask: np.ndarray, aspect: float, title: str) -> None:
    lo, hi = _window(img)
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest", origin="upper")
    if mask.any():
        ax.contour(mask.astype(float), levels=[0.5], colors="r", linewidths=0.7)
    ax.set_title(title, color="w", fontsize=8)
    ax.set_axis_off()


def _best_slice(mask: np.ndarray, axis: int) -> int:
    other = tuple(i for i in range(3) if i != axis)
    area = mask.sum(axis=other)
    return int(np.argmax(area)) if mask.any() else mask.shape[axis] // 2


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_lib = ROOT.parent / "shared" / "data" / "soop" / "lesions"
    ap.add_argument("--lesion-library", default=str(default_lib) if default_lib.is_dir() else None)
    ap.add_argument("--out", default=str(ROOT / "docs" / "phantom_t1.png"))
    args = ap.parse_args(argv)
    lib = args.lesion_library
    split = "train" if lib else None
    iso = simulate_t1(4, lesion_library=lib, split=split, lesion_pattern="territorial", grid="iso", skull_strip=False,
                      deface=True)
    thick = simulate_t1(4, lesion_library=lib, split=split, lesion_pattern="territorial", grid="clinical",
                        spacing=(0.9, 0.9, 5.0), sequence="se", skull_strip=False, deface=False)
    siss = simulate_siss(8, lesion_library=lib, split=split, lesion_pattern="territorial", grid="iso")

    fig, axes = plt.subplots(3, 4, figsize=(12, 9.4))
    fig.patch.set_facecolor("black")
    # Row 1: 1 mm isotropic MPRAGE (axial x2, coronal, sagittal).
    t1, m = iso.images["t1"].array, iso.lesion.array
    k = _best_slice(m, 0)
    sp = iso.images["t1"].spacing
    for j, kk in enumerate((k, int(np.clip(k + 12, 0, m.shape[0] - 1)))):
        _show(axes[0, j], t1[kk], m[kk], sp[1] / sp[0], f"1 mm T1 ({iso.info['acquisition']['series']['t1']['sequence']}) axial")
    y = _best_slice(m, 1)
    _show(axes[0, 2], t1[::-1, y, :], m[::-1, y, :], sp[2] / sp[0], "1 mm T1 coronal")
    x = _best_slice(m, 2)
    _show(axes[0, 3], t1[::-1, :, x], m[::-1, :, x], sp[2] / sp[1], "1 mm T1 sagittal (defaced)")
    # Row 2: oblique thick-slice clinical T1.
    t1c, mc = thick.images["t1"].array, thick.lesion.array
    k = _best_slice(mc, 0)
    spc = thick.images["t1"].spacing
    for j, kk in enumerate((k - 1, k, k + 1, int(np.clip(k - 5, 0, mc.shape[0] - 1)))):
        kk = int(np.clip(kk, 0, mc.shape[0] - 1))
        _show(axes[1, j], t1c[kk], mc[kk], spc[1] / spc[0],
              f"{spc[0]:.1f}x{spc[1]:.1f}x{spc[2]:.0f} mm SE T1, {thick.info['acquisition']['oblique_deg']:.0f} deg oblique")
    # Row 3: sub-acute SISS-like case, one grid.
    ms = siss.lesion.array
    k = _best_slice(ms, 0)
    sps = siss.images["t1"].spacing
    for j, key in enumerate(("t1", "t2", "flair", "dwi")):
        _show(axes[2, j], siss.images[key].array[k], ms[k], sps[1] / sps[0], f"sub-acute (SISS-like) {key}")
    for row, case in enumerate((iso, thick, siss)):
        info = case.info
        extra = f", ventricle +{info['ventricle_enlargement_ml']:.1f} mL" if "ventricle_enlargement_ml" in info else ""
        axes[row, 0].text(0.02, 0.02, f"{case.case_id}: {info['lesion_volume_ml']:.1f} mL{extra}, "
                          f"{info['tissue']['field_strength_t']} T", color="y", fontsize=7, transform=axes[row, 0].transAxes)
    fig.tight_layout(pad=0.3)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, facecolor="black")
    plt.close(fig)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
