"""Mirror test-time augmentation: what it buys, and what mirroring along axes the network never saw costs.

Every recipe trains with left-right flips only (axis x of the model grid), so the card's
``inference.tta_axes`` defaults to ``["x"]``: two passes. Before, ``--tta`` averaged all eight
mirrorings of z, y and x, six of them heads the network had never seen upside down or back to
front. This runs a bundled model on held-out phantoms (the model's own test seeds) without TTA,
with the trained mirroring (x) and with all three axes, and prints Dice and time ratios against
the run without TTA (same process).

    python benchmarks/bench_tta.py [--model dwi-unet|t1-unet] [--count 12]

Writes ``benchmarks/results/tta_<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import strokeseg
from strokeseg.metrics import case_metrics
from strokeseg.models import get_card
from strokeseg.phantom import simulate_dwi, simulate_structural
from strokeseg.pipeline import segment_images

HERE = Path(__file__).resolve().parent
LIBRARY = HERE.parent.parent / "shared" / "data" / "soop" / "lesions"
# The models' held-out seeds (training data.seed + 900000, strokeseg_training.data.SPLIT_SEED_OFFSET).
MODELS = {
    "dwi-unet": (901000, lambda seed, lib: simulate_dwi(seed, lesion_library=lib, split="test"), ("dwi", "adc")),
    "t1-unet": (907000, lambda seed, lib: simulate_structural("t1", seed, lib, "test"), ("t1",)),
}
VARIANTS = {"none": None, "x (trained)": ["x"], "z, y, x (all)": ["z", "y", "x"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dwi-unet", choices=sorted(MODELS))
    ap.add_argument("--count", type=int, default=12)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    seed0, simulate, inputs = MODELS[args.model]
    lib = str(LIBRARY) if LIBRARY.is_dir() else None
    card = get_card(args.model)
    base_inference = dict(card.raw.get("inference", {}))
    rows = []
    for k in tqdm(range(args.count), desc=f"{args.model} held-out phantoms", unit="case"):
        case = simulate(seed0 + k, lib)
        images = {key: case.images[key] for key in inputs}
        row = {"case": case.case_id, "true_ml": round(float(case.lesion.array.sum()) * case.lesion.voxel_volume_ml, 3)}
        for name, axes in VARIANTS.items():
            card.raw["inference"] = {**base_inference, "mirror_tta": axes is not None, **({"tta_axes": axes} if axes else {})}
            t0 = time.perf_counter()
            res = segment_images(images, model=card, device="cpu")
            row[name] = {"dice": round(float(case_metrics(res.mask.array, case.lesion.array, res.mask.spacing)["dice"]), 4),
                         "s": round(time.perf_counter() - t0, 2)}
        card.raw["inference"] = base_inference
        rows.append(row)
        tqdm.write(f"{row['case']} ({row['true_ml']:.1f} mL): " + ", ".join(f"{n} {row[n]['dice']:.3f}" for n in VARIANTS))
    summary = {}
    base_s = np.sum([r["none"]["s"] for r in rows])
    for name in VARIANTS:
        d = np.array([r[name]["dice"] for r in rows])
        summary[name] = {"dice_median": round(float(np.median(d)), 4), "dice_mean": round(float(np.mean(d)), 4),
                         "time_ratio": round(float(np.sum([r[name]["s"] for r in rows]) / base_s), 2)}
        print(f"{name:15s} Dice median {summary[name]['dice_median']:.3f} mean {summary[name]['dice_mean']:.3f}, "
              f"time x{summary[name]['time_ratio']:.2f}")
    out = Path(args.out) if args.out else HERE / "results" / f"tta_{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"engine_version": strokeseg.__version__, "model": f"{card.id} {card.version}",
                               "date": time.strftime("%Y-%m-%d %H:%M"), "summary": summary, "cases": rows}, indent=1) + "\n",
                   encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
