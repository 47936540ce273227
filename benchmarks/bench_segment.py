"""End-to-end DWI segmentation benchmark (issue target: clinical grid, 2-core CPU).

Case: a phantom DWI + b0 (ADC computed) on 256x256x30 at 0.9x0.9x5 mm. Prints and records:
- cold `strokeseg segment` wall time (process start to exit) and peak RSS of the whole process
  (median of N runs), and the same through ``strokeseg.cli.main`` as the baseline (MONAI imported
  whole, the interpreter's usual teardown; the console entry imports MONAI lean and skips the
  teardown, see strokeseg/cli.py and strokeseg/_lean_monai.py), alternating run by run;
- warm in-process `segment_case` wall time, split into read / preprocess / inference / postprocess;
- the ratio of the warm pipeline to a bare forward pass of the same network over the same input
  (its sliding-window windows forwarded back to back: pipeline overhead), in the same process.

    python benchmarks/bench_segment.py [--runs 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from strokeseg.io import write_image
from strokeseg.models import choose_model
from strokeseg.modality import find_case_inputs, load_inputs
from strokeseg.phantom import simulate_dwi
from strokeseg.pipeline import _networks, segment_case
from strokeseg.preprocess import prepare

RESULTS = Path(__file__).resolve().parent / "results"


def make_case(root: Path) -> Path:
    case = simulate_dwi(4242, lesion_library=None, spacing=(0.9, 0.9, 5.0), size=(256, 256, 30))
    folder = root / "clinical"
    folder.mkdir(parents=True, exist_ok=True)
    write_image(case.images["dwi"], folder / "dwi.nii.gz")
    write_image(case.images["b0"], folder / "b0.nii.gz")
    return folder


def cold_run(case: Path, out: Path, device: str, baseline: bool = False) -> tuple[float, float]:
    """Wall seconds (process start to exit, as a user waits for it) and peak RSS (MB) of one
    `strokeseg segment` process. ``baseline``: ``strokeseg.cli.main`` instead of the console entry,
    i.e. MONAI imported whole and the interpreter's usual teardown (the command before session 6)."""
    args = f"['segment',{str(case)!r},'--out',{str(out)!r},'--device',{device!r},'-q']"
    code = (f"import sys;from strokeseg.cli import main;sys.exit(main({args}))" if baseline
            else f"from strokeseg.cli import console;console({args})")
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"cold run failed (exit {p.returncode}): {code}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        case = make_case(tmp)
        cold, cold_plain = [], []
        for i in range(args.runs):  # alternating, so that both see the same machine load
            cold.append(cold_run(case, tmp / f"cold{i}", args.device))
            cold_plain.append(cold_run(case, tmp / f"plain{i}", args.device, baseline=True))

        segment_case(case, tmp / "warmup", device=args.device)  # loads the model once
        warm, parts = [], []
        for i in range(args.runs):
            t = time.perf_counter()
            res = segment_case(case, tmp / f"warm{i}", device=args.device)
            warm.append(time.perf_counter() - t)
            parts.append(res.timings)

        images = load_inputs(find_case_inputs(case))
        card = choose_model(images)
        prepared = prepare(images, card)
        net = _networks(card, args.device)[0]
        # The network's own work on this input: the sliding window's windows (patch-sized, batched
        # as the card says) forwarded back to back, without blending, padding or anything else.
        from strokeseg.inference import _count_windows

        inf = card.raw["inference"]
        roi = list(reversed(inf.get("roi_size", card.patch_size)))
        n_windows = _count_windows(prepared.array.shape[1:], roi, inf.get("overlap", 0.5))
        per_batch = int(inf.get("sw_batch_size", 1))
        n_batches = -(-n_windows // per_batch)
        x = torch.zeros((per_batch, prepared.array.shape[0], *roi), dtype=torch.float32).to(args.device)
        x[...] = torch.from_numpy(prepared.array[(slice(None),) + tuple(slice(0, r) for r in roi)])[None]
        bare = []
        with torch.inference_mode():
            net(x)
            for _ in range(args.runs):
                t = time.perf_counter()
                for _ in range(n_batches):
                    net(x)
                bare.append(time.perf_counter() - t)

    med = statistics.median
    result = {
        "case": "phantom DWI + b0, 256x256x30 at 0.9x0.9x5 mm (ADC computed)",
        "model": f"{card.id} {card.version}",
        "model_grid": list(prepared.model_grid.size),
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "runs": args.runs,
        "cold_cli_wall_s_median": round(med(w for w, _ in cold), 3),
        "cold_cli_peak_rss_mb_max": round(max(r for _, r in cold), 1),
        "cold_cli_baseline_wall_s_median": round(med(w for w, _ in cold_plain), 3),
        "cold_cli_over_baseline": round(med(w for w, _ in cold) / med(w for w, _ in cold_plain), 2),
        "warm_segment_case_s_median": round(med(warm), 3),
        "warm_parts_s_median": {k: round(med(p[k] for p in parts), 3) for k in parts[0]},
        "windows": n_windows,
        "window_zyx": roi,
        "bare_forward_s_median": round(med(bare), 3),
        "pipeline_over_bare_forward": round(med(warm) / med(bare), 2),
        "targets": {"cold_cli_wall_s": 5.0, "peak_rss_mb": 2048},
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
    }
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"segment_{args.device}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
