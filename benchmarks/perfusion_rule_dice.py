"""Dice of the engine's rule-based core against the phantom truth, on a bundled perfusion model's
held-out test cases: the baseline the CTP and MR-perfusion networks are compared with.

The rule is `strokeseg perfusion` with its defaults (CT: rCBF < 30% of the healthy hemisphere;
MR: ADC < 620 x 10^-6 mm^2/s with the case's ADC), run on each case's raw 4D series. The cases are
the test split of the model's training config (generated on first use, as `strokeseg-train
generate` would), so they are the ones its card reports.

    python benchmarks/perfusion_rule_dice.py --config training/configs/ctp_unet.json \
        --out docs/models/perfusion_rules/ctp_rcbf30_test_dice.txt
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from strokeseg.errors import InputError
from strokeseg.io import read_image
from strokeseg.metrics import case_metrics
from strokeseg.perfusion import run_perfusion
from strokeseg.perfusion.series import load_series

RULES = {"ctp": "CT: rCBF < 30% of the healthy hemisphere, median-filtered 3 x 3 in-plane",
         "pwi": "MR: ADC < 620 x 10^-6 mm^2/s"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="a perfusion model's training config (its test split)")
    ap.add_argument("--out", required=True, help="text file: case, Dice, true core mL per line, then the median and mean")
    args = ap.parse_args(argv)
    from strokeseg_training.config import load_config
    from strokeseg_training.data import build_split

    cfg = load_config(args.config, [])
    modality = cfg["data"]["modality"]
    _, root = build_split(cfg, "test", workers=int(cfg["data"].get("workers", 2)))
    cases = sorted(p for p in root.iterdir() if p.is_dir())[: int(cfg["data"].get("n_test") or 10**6)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    lines, scores = [], []
    for case in tqdm(cases, desc="rule", unit="case"):
        truth = read_image(case / "core.nii.gz")
        adc = read_image(case / "adc.nii.gz") if modality == "pwi" and (case / "adc.nii.gz").exists() else None
        try:
            res = run_perfusion(load_series(case / f"{modality}.nii.gz"), adc=adc)
        except InputError as exc:  # a series the engine refuses is not scored (as in the card's evaluation)
            lines.append(f"# {case.name} refused: {exc}")
            continue
        d = case_metrics(res.core.array > 0, truth.array > 0, truth.spacing)["dice"]
        scores.append(d)
        lines.append(f"{case.name} {d:.3g} {float(truth.array.sum()) * truth.voxel_volume_ml:.1f}")
    head = (f"# Dice of the engine's rule-based core ({RULES[modality]}; strokeseg perfusion defaults) against the phantom's "
            f"true core, per held-out test case of {args.config} (the cases the bundled model's card reports). Columns: case, "
            f"Dice, true core mL. Both empty = Dice 1. Engine at commit {commit}; benchmarks/perfusion_rule_dice.py.")
    tail = f"median dice {np.median(scores):.4f} mean {np.mean(scores):.4f} ({len(scores)} cases)"
    Path(args.out).write_text("\n".join([head, *lines, tail]) + "\n")
    print(tail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
