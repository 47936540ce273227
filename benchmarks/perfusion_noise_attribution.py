"""How much of the perfusion pipeline's error comes from noise and motion, and how much from the rest.

Each held-out phantom is analysed three times by ``run_perfusion``: as generated; regenerated
from the same seed without head motion (the same noise: each has its own random stream); and
with an ideal acquisition: no head motion and (almost) no noise. CT keeps the HU rounding of its
int16 series (SD 0.3 HU); MR gets a white-matter SNR of 10^5. Anatomy, lesion, kinetics, arterial
input and scanner levels are the same draws, so the differences between the results are what
motion and noise cost, and the ideal acquisition's error is what is left:
the deconvolution, the tissue masks, and the physics a deconvolution cannot undo (dispersion lowers
the peak of a residue, so the measured flow of heavily delayed tissue reads below its true CBF).

    python benchmarks/perfusion_noise_attribution.py [--split test|val] [--count 24]
        [--modality ctp pwi] [--out FILE]

Prints a line per case, writes ``benchmarks/results/perfusion_noise_attribution_<split>.json``
and a figure beside it (measured against true core volume, both acquisitions).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import strokeseg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from perfusion_accuracy import DEFAULT_LIBRARY, FIRST_SEED, TARGETS, analyse, summarise  # noqa: E402

# Ideal acquisition per modality: ``noise`` is CT's HU SD per voxel and MR's white-matter SNR.
IDEAL = {"ctp": {"noise": 1e-3, "motion": False}, "pwi": {"noise": 1e5, "motion": False}}
NO_MOTION = {"motion": False}


def change(pairs: list[tuple[dict, dict]]) -> dict | None:
    """Core volume change of each first result relative to its second (5 mL floor, like the tolerance)."""
    dev = np.array([(a["core_ml"] - b["core_ml"]) / max(b["core_ml"], TARGETS["volume_abs_ml"]) for a, b in pairs])
    return {"median": round(float(np.median(dev)), 3), "mean_abs": round(float(np.mean(np.abs(dev))), 3)} if dev.size else None


def plot(rows: dict[str, list[tuple[dict, dict, dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(5.2 * len(rows), 4.8), squeeze=False)
    for ax, (modality, pairs) in zip(axes[0], rows.items()):
        pairs = [t for t in pairs if not any("refused" in r for r in t)]
        true = np.array([a["core_true_ml"] for a, _, _ in pairs])
        top = max(10.0, float(true.max()) * 1.15) if true.size else 10.0
        line = np.linspace(0, top, 100)
        band = np.maximum(TARGETS["volume_abs_ml"], TARGETS["volume_rel"] * line)
        ax.fill_between(line, line - band, line + band, color="0.9", label="within 15% or 5 mL")
        ax.plot(line, line, color="0.5", lw=0.8)
        ax.scatter(true, [b["core_ml"] for _, b, _ in pairs], s=22, marker="o", facecolors="none", edgecolors="tab:blue",
                   label="ideal acquisition (no noise, no motion)")
        ax.scatter(true, [c["core_ml"] for _, _, c in pairs], s=18, marker="x", color="tab:green", lw=0.9,
                   label="without motion (noise as generated)")
        ax.scatter(true, [a["core_ml"] for a, _, _ in pairs], s=16, color="tab:red", label="as generated")
        for (a, b, c), t in zip(pairs, true):
            ax.plot([t, t], [min(a["core_ml"], b["core_ml"], c["core_ml"]), max(a["core_ml"], b["core_ml"], c["core_ml"])],
                    color="0.6", lw=0.6)
        ax.set_xlim(0, top), ax.set_ylim(0, top)
        ax.set_xlabel("true core (mL)"), ax.set_ylabel("measured core (mL)")
        ax.set_title(f"{modality}: core volume, {len(pairs)} held-out phantoms")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=24, help="cases per modality")
    ap.add_argument("--split", default="test", choices=["test", "val"])
    ap.add_argument("--modality", nargs="+", default=["ctp", "pwi"], choices=sorted(IDEAL))
    ap.add_argument("--lesion-library", default=str(DEFAULT_LIBRARY) if DEFAULT_LIBRARY.is_dir() else None)
    ap.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/perfusion_noise_attribution_<split>.json)")
    args = ap.parse_args(argv)
    out = Path(args.out or HERE / "results" / f"perfusion_noise_attribution_{args.split}.json")
    seed0 = FIRST_SEED[args.split]

    results: dict = {"engine_version": strokeseg.__version__, "split": args.split, "first_seed": seed0,
                     "ideal_acquisition": IDEAL, "without_motion": NO_MOTION, "date": time.strftime("%Y-%m-%d %H:%M"),
                     "modalities": {}}
    runs: dict[str, list[tuple[dict, dict, dict]]] = {}
    for modality in args.modality:
        runs[modality] = []
        for k in range(args.count):
            real = analyse(seed0 + k, modality, args.lesion_library, args.split)
            ideal = analyse(seed0 + k, modality, args.lesion_library, args.split, **IDEAL[modality])
            # the same case where it did not move (the motion draw is the only difference)
            still = analyse(seed0 + k, modality, args.lesion_library, args.split, **NO_MOTION) if real.get("motion_events") else real
            runs[modality].append((real, ideal, still))
            refused = [r["refused"] for r in (real, ideal, still) if "refused" in r]
            if refused:
                print(f"{modality} {real['case']}: refused ({refused[0]})", flush=True)
                continue
            print(f"{modality} {real['case']}: core {real['core_ml']:.1f} (no motion {still['core_ml']:.1f}, ideal "
                  f"{ideal['core_ml']:.1f}) / true {real['core_true_ml']:.1f} mL, "
                  f"rho {real['spearman_rcbf']:.3f} (ideal {ideal['spearman_rcbf']:.3f}), "
                  f"Tmax MAE {real['tmax_mae_s']:.2f} (ideal {ideal['tmax_mae_s']:.2f}) s", flush=True)
        kept = [t for t in runs[modality] if not any("refused" in r for r in t)]
        summary = {
            "as_generated": summarise([a for a, _, _ in runs[modality]]),
            "without_motion": summarise([c for _, _, c in runs[modality]]),
            "ideal_acquisition": summarise([b for _, b, _ in runs[modality]]),
            "core_change_from_noise_and_motion": change([(a, b) for a, b, _ in kept]),
            "core_change_from_motion": change([(a, c) for a, _, c in kept]),
        }
        results["modalities"][modality] = {"summary": summary,
                                           "cases": [{"as_generated": a, "without_motion": c, "ideal_acquisition": b}
                                                     for a, b, c in runs[modality]]}
        print(f"{modality}: {json.dumps(summary)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(runs, out.with_suffix(".png"))
    print(f"written {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
