"""``strokeseg demo``: simulate a DWI patient, segment it, print the report, write a PNG overlay."""

from __future__ import annotations

import json
from pathlib import Path

from .metrics import case_metrics
from .overlay import overlay_png
from .phantom import simulate_dwi, write_case
from .pipeline import segment_case
from .report import format_report


def run_demo(out: Path, *, seed: int = 7, device: str = "auto", lesion_library: str | None = None) -> dict:
    out = Path(out)
    case = simulate_dwi(seed, lesion_library=lesion_library, split="test" if lesion_library else None)
    case_dir = write_case(case, out / "cases")
    print(f"simulated {case.case_id}: true lesion volume {case.info.get('lesion_volume_ml', float('nan')):.2f} mL "
          f"-> {case_dir}")
    result = segment_case(case_dir, out / "result", device=device)
    print(format_report(result.report))
    m = case_metrics(result.mask.array, case.lesion.array, result.mask.spacing)
    print(f"against the phantom's truth: Dice {m['dice']:.3f}, lesion F1 {m['lesion_f1']:.3f}, "
          f"volume difference {m['volume_diff_ml']:+.2f} mL")
    png = overlay_png(case.images["dwi"], result.probability, result.mask, out / "overlay.png", truth=case.lesion,
                      title=f"{case.case_id}: DWI b1000, model {result.card.id} {result.card.version}")
    (out / "result" / "metrics_vs_truth.json").write_text(json.dumps(m, indent=2, default=float))
    print(f"overlay: {png}")
    return m
