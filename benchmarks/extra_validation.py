"""Break a validation tie between training runs on validation phantoms that tuned neither.

Each run keeps its own tuned post-processing (``tuning.json``); the cases are the validation
seeds after the config's ``n_val`` (generated on first use, as ``strokeseg-train generate``
would), so the test split stays unread. Prints and writes the tuning objective, mean and median
Dice and lesion F1 per run, and every case whose Dice differs by more than 0.04.

    python benchmarks/extra_validation.py training/configs/t1_unet_stage9_data.json \
        training/configs/t1_unet_stage10_data.json --extra 24 --out docs/models/t1_unet/extra_validation.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="+", help="training configs of finished, tuned runs on the same phantoms")
    ap.add_argument("--extra", type=int, default=24, help="validation phantoms beyond n_val")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    from strokeseg_training.cli import _cases, score_tuned
    from strokeseg_training.config import load_config, run_dir
    from strokeseg_training.evaluate import objective

    result = {}
    for path in args.configs:
        base = load_config(path, [])
        n_val = int(base["data"]["n_val"])
        cfg = load_config(path, [f"data.n_val={n_val + args.extra}"])
        run = run_dir(cfg)
        tuning = json.loads((run / "tuning.json").read_text(encoding="utf-8"))
        rows = score_tuned(cfg, _cases(cfg, "val")[n_val:])
        dice = [r["dice"] for r in rows]
        result[path] = {"run": run.name, "n": len(rows), "settings": tuning["best"],
                        "objective": objective(rows, base["tune"].get("objective", "dice+f1")),
                        "mean_dice": float(np.mean(dice)), "median_dice": float(np.median(dice)),
                        "mean_lesion_f1": float(np.mean([r["lesion_f1"] for r in rows])),
                        "per_case_dice": {r["case"]: r["dice"] for r in rows}}
        print(path, {k: v for k, v in result[path].items() if k != "per_case_dice"}, flush=True)
    first, *others = result.values()
    for other in others:
        for case, d in first["per_case_dice"].items():
            if abs(other["per_case_dice"].get(case, d) - d) > 0.04:
                print(f"{case}: {first['run']} {d:.2f}, {other['run']} {other['per_case_dice'][case]:.2f}")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
