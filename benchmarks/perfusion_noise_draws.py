"""Is a perfusion core miss the particular noise realisation, or a bias of the case?

Each held-out CT phantom is analysed with its own noise and with ``--draws`` other draws of the
same acquisition's noise (``simulate_perfusion(noise_draw=k)``: anatomy, lesion, kinetics, motion
and noise level unchanged). Per case: the core volumes, their spread, and in how many draws the
core is within 15% or 5 mL of the truth. A case that misses in every draw carries a bias a user
would meet on every scan like it; one that misses in some draws only is at the edge by chance.

    python benchmarks/perfusion_noise_draws.py [--split test|val] [--count 24] [--draws 3] [--out FILE]

Writes ``benchmarks/results/perfusion_noise_draws_<split>.json``.
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
from perfusion_accuracy import DEFAULT_LIBRARY, FIRST_SEED, analyse  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="test", choices=["test", "val"])
    ap.add_argument("--count", type=int, default=24)
    ap.add_argument("--draws", type=int, default=3, help="noise draws besides the case's own")
    ap.add_argument("--lesion-library", default=str(DEFAULT_LIBRARY) if DEFAULT_LIBRARY.is_dir() else None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = Path(args.out or HERE / "results" / f"perfusion_noise_draws_{args.split}.json")
    seed0 = FIRST_SEED[args.split]
    cases = []
    for k in range(args.count):
        rows = [analyse(seed0 + k, "ctp", args.lesion_library, args.split, noise_draw=d) for d in range(args.draws + 1)]
        if any("refused" in r for r in rows):
            print(f"{rows[0]['case']}: refused in {sum('refused' in r for r in rows)} of {len(rows)} draws", flush=True)
            cases.append({"case": rows[0]["case"], "refused_draws": sum("refused" in r for r in rows)})
            continue
        core = np.array([r["core_ml"] for r in rows])
        within = [bool(r["core_within"]) for r in rows]
        cases.append({"case": rows[0]["case"], "core_true_ml": rows[0]["core_true_ml"],
                      "core_ml": [round(float(v), 2) for v in core], "core_sd_ml": round(float(core.std(ddof=1)), 2),
                      "within": within, "within_draws": int(sum(within))})
        print(f"{rows[0]['case']}: true {rows[0]['core_true_ml']:.1f} mL, cores {np.round(core, 1).tolist()}, "
              f"SD {core.std(ddof=1):.1f} mL, within in {sum(within)}/{len(rows)}", flush=True)
    done = [c for c in cases if "core_ml" in c]
    n_draws = args.draws + 1
    summary = {
        "cases": len(done),
        "core_sd_ml_median": round(float(np.median([c["core_sd_ml"] for c in done])), 2) if done else None,
        "core_sd_ml_max": round(float(np.max([c["core_sd_ml"] for c in done])), 2) if done else None,
        "within_in_every_draw": sum(c["within_draws"] == n_draws for c in done),
        "within_in_no_draw": sum(c["within_draws"] == 0 for c in done),
        "within_in_some_draws": sum(0 < c["within_draws"] < n_draws for c in done),
        "core_within_fraction_by_draw": [round(float(np.mean([c["within"][d] for c in done])), 3) for d in range(n_draws)]
        if done else [],
    }
    results = {"engine_version": strokeseg.__version__, "split": args.split, "first_seed": seed0, "draws": n_draws,
               "date": time.strftime("%Y-%m-%d %H:%M"), "summary": summary, "cases": cases}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(summary))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
