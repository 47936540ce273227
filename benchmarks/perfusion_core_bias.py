"""Where the CT core's volume errors come from: the relative CBF the pipeline reads, against the truth,
in each kind of tissue around the 30% threshold.

For each held-out CT perfusion phantom the pipeline runs as a user would (as generated, and with
the ideal acquisition of ``perfusion_noise_attribution.py``: no motion, almost no noise). Tissue
(true tissue and the pipeline's tissue mask) is split by truth and result:

  healthy   true Tmax <= 6 s, outside the true core
  penumbra  true Tmax > 6 s, outside the true core and outside the computed core
  ghost     in the computed core, outside the true core (the core's excess)
  found     in both cores
  missed    in the true core, outside the computed core

and in each the ratio (computed rCBF) / (true rCBF) is summarised by its median. True rCBF is the
true CBF over its mean in the healthy hemisphere's non-hypoperfused tissue, exactly as the
phantom's core truth is defined; computed rCBF is the pipeline's CBF over its reference (the
healthy-hemisphere mean times the regularisation gain, the report's figures). A ratio of 1 is an
unbiased reading. The rule calls a voxel core below 0.30, so a core voxel read at 1.3x and a
penumbral voxel read at 0.65x both land near the threshold from opposite sides.

It also puts each volume error in voxels of edge: a one-voxel in-plane shell of the true core
(the mean of what one in-plane dilation adds and one erosion removes, within the tissue) is
``shell_ml``. The issue's tolerance (15% or 5 mL) in shells says how far the whole core's edge may
move; the error in shells says how far it did move, on average around the core.

    python benchmarks/perfusion_core_bias.py [--split test|val] [--count 24]

Prints a line per case, writes ``benchmarks/results/perfusion_core_bias_<split>.json`` and a figure beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

import strokeseg
from strokeseg.errors import InputError
from strokeseg.perfusion import run_perfusion
from strokeseg.phantom.perfusion import simulate_perfusion

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from perfusion_accuracy import DEFAULT_LIBRARY, FIRST_SEED, tolerance_ml, within  # noqa: E402
from perfusion_noise_attribution import IDEAL  # noqa: E402

POPULATIONS = ("healthy", "penumbra", "ghost", "found", "missed")
ACQUISITIONS = {"as_generated": {}, "ideal": IDEAL["ctp"]}


def true_relative_cbf(case) -> np.ndarray:
    """True CBF over the flow the phantom's core truth is relative to (its healthy hemisphere's
    non-hypoperfused tissue)."""
    return case.truth["cbf"].array / float(case.info["core_reference_cbf"])


def populations(case, res) -> dict[str, np.ndarray]:
    t = case.truth
    tissue = (t["tissue"].array > 0) & (res.tissue.array > 0)
    true_core, core = t["core"].array > 0, res.core.array > 0
    slow = t["tmax"].array > 6.0
    return {"healthy": tissue & ~slow & ~true_core, "penumbra": tissue & slow & ~true_core & ~core,
            "ghost": tissue & core & ~true_core, "found": tissue & core & true_core, "missed": tissue & true_core & ~core}


IN_PLANE = ndimage.generate_binary_structure(2, 1)[None]  # a cross within the slice


def one_voxel_shell(mask: np.ndarray, tissue: np.ndarray) -> int:
    """Voxels in a one-voxel in-plane shell of ``mask``: mean of one dilation's gain and one erosion's loss."""
    mask = mask & tissue
    grown = np.count_nonzero(ndimage.binary_dilation(mask, IN_PLANE) & tissue) - np.count_nonzero(mask)
    shrunk = np.count_nonzero(mask) - np.count_nonzero(ndimage.binary_erosion(mask, IN_PLANE))
    return (grown + shrunk) // 2


def analyse(seed: int, split: str, library: str | None, overrides: dict) -> dict:
    case = simulate_perfusion(seed, "ctp", library, split, compute_maps=False, **overrides)
    try:
        res = run_perfusion(case.images["ctp"])
    except InputError as exc:
        return {"case": case.case_id, "refused": str(exc)}
    rep = res.report
    true_r = true_relative_cbf(case)
    read_r = res.maps["cbf"].array / (rep["reference_cbf_ml_100g_min"] * rep["reference_regularisation_gain"])
    voxel_ml = res.core.voxel_volume_ml
    true_ml = float(np.count_nonzero(case.truth["core"].array)) * voxel_ml
    row = {"case": case.case_id, "core_true_ml": round(true_ml, 2), "core_ml": rep["core_ml"],
           "core_within": within(rep["core_ml"], true_ml), "reference_gain": rep["reference_regularisation_gain"],
           "slice_mm": round(float(case.images["ctp"].spacing[2]), 2),
           "delay_max_s": (case.info.get("kinetics") or {}).get("delay_max_s")}
    shell_ml = one_voxel_shell(case.truth["core"].array > 0, case.truth["tissue"].array > 0) * voxel_ml
    if shell_ml > 0:
        row["shell_ml"] = round(shell_ml, 2)
        row["tolerance_shells"] = round(tolerance_ml(true_ml) / shell_ml, 2)
        row["error_shells"] = round((rep["core_ml"] - true_ml) / shell_ml, 2)
    for name, mask in populations(case, res).items():
        n = int(np.count_nonzero(mask))
        entry = {"ml": round(n * voxel_ml, 2)}
        if n >= 5:
            ratio = read_r[mask] / np.maximum(true_r[mask], 1e-3)
            entry.update(read_over_true=round(float(np.median(ratio)), 3),
                         true_rcbf=round(float(np.median(true_r[mask])), 3), read_rcbf=round(float(np.median(read_r[mask])), 3),
                         true_tmax_s=round(float(np.median(case.truth["tmax"].array[mask])), 2))
        row[name] = entry
    return row


def summarise(rows: list[dict]) -> dict:
    ok = [r for r in rows if "refused" not in r]
    out = {"cases": len(rows), "refused": len(rows) - len(ok),
           "core_within_fraction": round(float(np.mean([r.get("core_within", False) for r in rows])), 3)}
    for name in POPULATIONS:
        vals = [r[name]["read_over_true"] for r in ok if "read_over_true" in r[name]]
        out[f"{name}_read_over_true_median"] = round(float(np.median(vals)), 3) if vals else None
    edged = [r for r in ok if "tolerance_shells" in r]
    if edged:
        out["tolerance_shells_median"] = round(float(np.median([r["tolerance_shells"] for r in edged])), 2)
        out["abs_error_shells_median"] = round(float(np.median([abs(r["error_shells"]) for r in edged])), 2)
    missed = [r for r in ok if not r["core_within"]]
    out["misses_too_large"] = sum(r["core_ml"] > r["core_true_ml"] for r in missed)
    out["misses_too_small"] = sum(r["core_ml"] < r["core_true_ml"] for r in missed)
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False, sharey=True)
    for ax, (acq, rows) in zip(axes[0], results.items()):
        ok = [r for r in rows if "refused" not in r]
        data = [[r[p]["read_over_true"] for r in ok if "read_over_true" in r[p]] for p in POPULATIONS]
        ax.boxplot(data, showfliers=True)
        ax.set_xticks(range(1, len(POPULATIONS) + 1), POPULATIONS)
        ax.axhline(1.0, color="0.5", lw=0.8)
        within_n = sum(r.get("core_within", False) for r in rows)
        ax.set_title(f"{acq.replace('_', ' ')}: core within tolerance {within_n}/{len(rows)}", fontsize=10)
    axes[0][0].set_ylabel("read rCBF / true rCBF (median per case)")
    fig.suptitle("CT core: how the pipeline reads relative CBF around the 30% threshold", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=24)
    ap.add_argument("--split", default="test", choices=["test", "val"])
    ap.add_argument("--lesion-library", default=str(DEFAULT_LIBRARY) if DEFAULT_LIBRARY.is_dir() else None)
    ap.add_argument("--out", default=None, help="default: benchmarks/results/perfusion_core_bias_<split>.json")
    args = ap.parse_args(argv)
    seed0 = FIRST_SEED[args.split]
    out = Path(args.out) if args.out else HERE / "results" / f"perfusion_core_bias_{args.split}.json"
    results: dict[str, list[dict]] = {acq: [] for acq in ACQUISITIONS}
    for k in tqdm(range(args.count), desc=f"CT phantoms ({args.split})", unit="case"):
        for acq, overrides in ACQUISITIONS.items():
            row = analyse(seed0 + k, args.split, args.lesion_library, overrides)
            results[acq].append(row)
            if "refused" in row:
                tqdm.write(f"{row['case']} {acq}: refused: {row['refused']}")
                continue
            cells = " ".join(f"{p} {row[p].get('read_over_true', '-')}" for p in POPULATIONS)
            edge = f"; error {row['error_shells']:+.2f} shells (tolerance {row['tolerance_shells']:.2f})" if "error_shells" in row else ""
            tqdm.write(f"{row['case']} {acq}: core {row['core_ml']:.1f} / true {row['core_true_ml']:.1f} mL{edge}; read/true rCBF: {cells}")
    summary = {acq: summarise(rows) for acq, rows in results.items()}
    for acq, s in summary.items():
        print(acq, json.dumps(s))
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"engine_version": strokeseg.__version__, "split": args.split, "first_seed": seed0, "acquisitions": ACQUISITIONS,
           "date": time.strftime("%Y-%m-%d %H:%M"), "summary": summary, "cases": results}
    out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
