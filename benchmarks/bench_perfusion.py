"""Benchmark of the perfusion pipeline: a 256 x 256 x 16 x 40 CT perfusion series, end to end.

Target (issue 4): <= 30 s on this machine's CPU (2 cores) from the 4D file to the written maps,
core, penumbra and report. The series is a perfusion phantom (MCA-territory stroke, 5 mm slices,
~0.9 mm pixels, 1.5 s sampling, with head motion so that the registration has work to do);
the stages are timed separately (read, motion correction, masks, concentration, arterial input,
deconvolution, decision, write) and peak Python-side memory is traced.

    python benchmarks/bench_perfusion.py [--repeats 2] [--lesion-library DIR] [--denoise bilateral|gaussian]

Prints a table and writes benchmarks/results/perfusion.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import scipy
import SimpleITK as sitk

import strokeseg
from strokeseg.io import write_image
from strokeseg.perfusion import PerfusionSettings, load_series, run_perfusion, write_perfusion
from strokeseg.phantom.perfusion import simulate_perfusion

HERE = Path(__file__).resolve().parent
DEFAULT_LIBRARY = HERE.parent.parent / "shared" / "data" / "soop" / "lesions"
TARGET_S = 30.0
SHAPE = (256, 256, 16)
FRAMES = 40


def make_series(library: str | None, seed: int) -> tuple:
    case = simulate_perfusion(seed, "ctp", library, "test", size=SHAPE, spacing=(0.9, 0.9, 5.0), thickness=5.0,
                              frames=FRAMES, dt=1.5, motion=True, compute_maps=False)
    return case


def run_once(path: Path, out: Path, settings: PerfusionSettings | None = None) -> dict:
    t0 = time.perf_counter()
    series = load_series(path)
    t_read = time.perf_counter() - t0
    res = run_perfusion(series, settings=settings)
    t1 = time.perf_counter()
    write_perfusion(res, out)
    t_write = time.perf_counter() - t1
    total = time.perf_counter() - t0
    stages = {"read_s": t_read, **{k: v for k, v in res.report["timings"].items() if k != "total_s"},
              "pipeline_s": res.report["timings"]["total_s"], "write_s": t_write, "total_s": total}
    return {"stages": {k: round(v, 3) for k, v in stages.items()}, "core_ml": res.report["core_ml"],
            "hypoperfusion_ml": res.report["hypoperfusion_ml"], "motion": res.report["motion"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=7001)
    ap.add_argument("--lesion-library", default=str(DEFAULT_LIBRARY) if DEFAULT_LIBRARY.is_dir() else None)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--denoise", default=None, choices=["bilateral", "gaussian"], help="curve denoising (default: the engine's)")
    args = ap.parse_args(argv)
    settings = PerfusionSettings(denoise=args.denoise)

    load0 = os.getloadavg()
    t = time.perf_counter()
    case = make_series(args.lesion_library, args.seed)
    gen_s = time.perf_counter() - t
    series = case.images["ctp"]
    print(f"series {series.size} x {series.array.shape[0]} frames, spacing {series.spacing}, "
          f"generated in {gen_s:.1f} s; motion events {len(case.info['motion'])}")
    work = Path(tempfile.mkdtemp(prefix="bench_perfusion_"))
    try:
        path = write_image(series, work / "ctp.nii.gz")
        runs = []
        for k in range(args.repeats):
            r = run_once(path, work / f"out{k}", settings)
            runs.append(r)
            print(f"run {k + 1}: total {r['stages']['total_s']:.2f} s  " +
                  "  ".join(f"{name} {v:.2f}" for name, v in r["stages"].items() if name != "total_s"))
        tracemalloc.start()
        run_once(path, work / "out_mem", settings)
        _cur, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    best = min(runs, key=lambda r: r["stages"]["total_s"])
    total = best["stages"]["total_s"]
    results = {
        "benchmark": "perfusion",
        "series": {"shape_xyzt": [*SHAPE, FRAMES], "spacing_mm": list(series.spacing), "dt_s": 1.5,
                   "motion_events": case.info["motion"], "generate_s": round(gen_s, 2)},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "load_average_at_start": list(load0),
                    "python": platform.python_version(), "numpy": np.__version__, "scipy": scipy.__version__,
                    "SimpleITK": sitk.Version_VersionString(), "SimpleITK_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
                    "strokeseg": strokeseg.__version__},
        "settings": {"denoise": args.denoise or "engine default"},
        "target_s": TARGET_S,
        "best_total_s": total,
        "ratio_to_target": round(total / TARGET_S, 3),
        "meets_target": total <= TARGET_S,
        "stage_share": {k: round(v / total, 3) for k, v in best["stages"].items() if k not in ("total_s", "pipeline_s")},
        "peak_traced_memory_mb": round(peak / 2**20, 1),
        "runs": runs,
        "truth": {"core_ml": case.info["core_ml"], "hypoperfusion_ml": case.info["hypoperfusion_ml"]},
    }
    print(f"best end-to-end {total:.2f} s for {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]}x{FRAMES} "
          f"(target {TARGET_S:.0f} s, ratio {total / TARGET_S:.2f}); peak traced memory {peak / 2**20:.0f} MB")
    print("stage share: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in results["stage_share"].items()))
    print(f"core {best['core_ml']:.1f} mL (truth {case.info['core_ml']:.1f}), Tmax>6 {best['hypoperfusion_ml']:.1f} mL "
          f"(truth {case.info['hypoperfusion_ml']:.1f})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "perfusion.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out / 'perfusion.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
