"""How fast the Slicer module's lesion mask follows the sliders, on a clinical DWI grid.

Headless (PyPI slicer-core), the real StrokeSegLib code path: a phantom DWI at 256 x 256 x 32
(0.9 x 0.9 x 4.5 mm) in a scene, a probability map on its grid (the phantom's smoothed truth:
the network is not what is timed here), then ``StrokeSegLogic.recompute()`` for threshold,
closing-radius and minimum-size moves: MaskRefiner + edit check + SetBinaryLabelmapToSegment
+ undo snapshot. Also timed: the statistics refresh (run when a slider rests), the first
``apply_result`` and an export.

    OMP_NUM_THREADS=1 python benchmarks/bench_slicer_slider.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "StrokeSegExtension"))
sys.path.insert(0, str(REPO_ROOT / "Testing" / "Python"))


def timed(fn, repeats: int) -> float:
    """Median wall time in ms."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "slicer_slider.json")
    args = parser.parse_args()

    from slicer_support import synthetic_result
    from strokeseg.phantom import simulate_dwi, write_case
    from StrokeSegLib.headless import create_context
    from StrokeSegLib.logic import StrokeSegLogic
    from StrokeSegLib.volumes import image_from_volume

    with tempfile.TemporaryDirectory() as tmp:
        case = simulate_dwi(11, lesion_pattern="territorial", size=(256, 256, 32), spacing=(0.9, 0.9, 4.5))
        folder = write_case(case, tmp)
        ctx = create_context(Path(tmp) / "cache")
        dwi = ctx.load_volume(folder / "dwi.nii.gz", name="DWI b1000")
        logic = StrokeSegLogic(ctx.scene)
        logic.params.inputDwi = dwi
        result = synthetic_result(image_from_volume(dwi), case.lesion.array, sigma=2.0)
        t = time.perf_counter()
        logic.apply_result(result)
        apply_ms = (time.perf_counter() - t) * 1000
        params = logic.params
        values = iter([0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7] * (args.repeats + 1))

        def threshold_move():
            params.threshold = next(values)
            logic.recompute()

        radii = iter([1.0, 2.0, 3.0, 4.0, 5.0, 1.5, 2.5, 3.5] * (args.repeats + 1))

        def closing_move():
            params.closingMm = next(radii)
            logic.recompute()

        sizes = iter([0.1, 0.5, 1.0, 2.0, 0.2, 0.8] * (args.repeats + 1))

        def minimum_move():
            params.minLesionMl = next(sizes)
            logic.recompute()

        params.closingMm = 0.0
        results = {
            "grid_xyz": list(result.mask.size),
            "voxels": int(result.mask.array.size),
            "lesion_ml": round(float(case.lesion.array.sum()) * case.lesion.voxel_volume_ml, 2),
            "apply_result_ms": round(apply_ms, 1),
            "threshold_move_ms": round(timed(threshold_move, args.repeats), 1),
            "closing_move_ms": round(timed(closing_move, args.repeats), 1),
        }
        params.closingMm = 2.0
        logic.recompute()
        results["min_size_move_ms"] = round(timed(minimum_move, args.repeats), 1)
        results["statistics_ms"] = round(timed(logic.update_statistics, args.repeats), 1)
        out = Path(tmp) / "export"
        results["export_ms"] = round(timed(lambda: logic.export(out), 1), 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
