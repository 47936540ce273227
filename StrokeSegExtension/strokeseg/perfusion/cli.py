"""``strokeseg perfusion SERIES_4D --out OUT_DIR`` and the perfusion side of ``strokeseg phantom``.

Hooked into ``strokeseg.cli`` with ``add_perfusion_parser(sub)`` (the subcommand) and, in
``cmd_phantom``, ``run_phantom(args)`` for ``--modality ctp|pwi``. Every anticipated failure is a
StrokeSegError (one line, exit code 2, no partial output), as in the rest of the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import Cancelled, InputError, StrokeSegError

PHANTOM_MODALITIES = ("ctp", "pwi")


def _point(text: str) -> tuple[float, float, float]:
    parts = text.replace(";", ",").split(",")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y,Z in mm, got {text!r}") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected X,Y,Z in mm, got {text!r}")
    return values  # type: ignore[return-value]


def _times(text: str) -> list[float]:
    """Frame times: a comma-separated list, or a file with one time per line / comma-separated."""
    path = Path(text)
    raw = path.read_text(encoding="utf-8") if path.is_file() else text
    try:
        return [float(v) for v in raw.replace("\n", ",").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--times takes numbers (s) or a file of them, got {text[:40]!r}") from None


def _fractions(text: str) -> tuple[float, ...]:
    """Comma-separated numbers, or 'none' (their range is checked with the other thresholds)."""
    if text.strip().lower() == "none":
        return ()
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions such as 0.2,0.34, got {text[:40]!r}") from None


def add_perfusion_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``perfusion`` subcommand to ``strokeseg``'s sub-parsers."""
    from .decision import CORE_FLOWS, Thresholds

    d = Thresholds()
    p = subparsers.add_parser(
        "perfusion", help="4D CT or DSC-MR perfusion -> CBF/CBV/MTT/Tmax/TTP maps, core, penumbra (research use)",
        description="Perfusion maps, core and penumbra from a 4D series (NIfTI, NRRD or a DICOM folder). Research use only.")
    p.add_argument("series", help="4D series: .nii/.nii.gz/.nrrd/.mha, a DICOM folder or an enhanced multi-frame DICOM file")
    p.add_argument("--out", required=True, help="output folder (cbf, cbv, mtt, tmax, ttp, core, penumbra .nii.gz, report.json)")
    p.add_argument("--kind", choices=["auto", "ct", "mr"], default="auto", help="CT perfusion or DSC-MRI (default: from the data)")
    p.add_argument("--te-ms", type=float, default=None, help="MR echo time in ms (default: from the header)")
    p.add_argument("--adc", default=None, help="ADC map for the MR core (mm^2/s or 10^-6 mm^2/s)")
    p.add_argument("--dt", type=float, default=None, help="frame interval in s, when the header has none")
    p.add_argument("--times", type=_times, default=None, help="frame times in s (comma-separated or a file), for irregular sampling")
    p.add_argument("--aif-point", type=_point, default=None, metavar="X,Y,Z", help="arterial input at this LPS point (mm)")
    p.add_argument("--aif-mask", default=None, help="arterial input from this mask image")
    p.add_argument("--no-motion-correction", action="store_true", help="skip frame-to-frame registration")
    p.add_argument("--core-rcbf", type=float, default=d.core_rcbf, help=f"CT core: CBF below this fraction of the healthy hemisphere (default {d.core_rcbf})")
    p.add_argument("--core-rcbf-also", type=_fractions, default=d.core_rcbf_also, metavar="F,F,...",
                   help="CT core: also report the core volume at these rCBF fractions (default "
                        f"{','.join(f'{v:g}' for v in d.core_rcbf_also)}; 'none' for none)")
    p.add_argument("--core-median", type=int, default=d.core_median_voxels,
                   help=f"CT core: in-plane median of rCBF over this many voxels (odd) before its threshold; 1: off (default {d.core_median_voxels})")
    p.add_argument("--core-flow", choices=CORE_FLOWS, default=None,
                   help="rCBF core: the flow it reads, the oSVD CBF map (default) or tracer-kinetic fits per class of "
                        "curves (experimental: better on exponential-residue phantoms, worse on gamma-residue ones)")
    p.add_argument("--adc-core", type=float, default=d.adc_core, help=f"MR core: ADC below this, 10^-6 mm^2/s (default {d.adc_core:g})")
    p.add_argument("--tmax", type=float, default=d.tmax_hypo_s, help=f"hypoperfusion: Tmax above this, s (default {d.tmax_hypo_s:g})")
    p.add_argument("--tmax-severe", type=float, default=d.tmax_severe_s, help=f"HIR numerator: Tmax above this, s (default {d.tmax_severe_s:g})")
    p.add_argument("--min-core-ml", type=float, default=d.min_core_ml, help=f"smallest core component kept, mL (default {d.min_core_ml:g})")
    p.add_argument("--min-hypo-ml", type=float, default=d.min_hypo_ml, help=f"smallest hypoperfused component kept, mL (default {d.min_hypo_ml:g})")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_perfusion)
    return p


def cmd_perfusion(args: argparse.Namespace) -> int:
    """Run the pipeline on one series and write its outputs; prints the decision summary."""
    from ..io import check_overwrite, read_image
    from .decision import Thresholds
    from .pipeline import OUTPUT_FILES, PerfusionSettings, run_perfusion, write_perfusion
    from .series import load_series

    check_overwrite(args.out, OUTPUT_FILES)  # before the work, not after it
    series = load_series(args.series, times=args.times, dt=args.dt)
    adc = read_image(args.adc) if args.adc else None
    mask = read_image(args.aif_mask) if args.aif_mask else None
    if mask is not None and mask.is_4d:
        raise InputError(args.aif_mask, "arterial input mask is 4D; a 3D mask is expected")
    thresholds = Thresholds(core_rcbf=args.core_rcbf, core_rcbf_also=args.core_rcbf_also, core_median_voxels=args.core_median, adc_core=args.adc_core, tmax_hypo_s=args.tmax,
                            tmax_severe_s=args.tmax_severe, min_core_ml=args.min_core_ml, min_hypo_ml=args.min_hypo_ml)
    settings = PerfusionSettings(motion_correction=not args.no_motion_correction, core_flow=args.core_flow)
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        # The step goes in {desc}: tqdm prefixes {postfix} with ", ".
        bar = tqdm(total=100, unit="%", file=sys.stderr, bar_format="perfusion: {percentage:3.0f}%|{bar}| {desc}")

    def progress(fraction: float, message: str) -> None:
        if bar is not None:
            bar.n = int(round(100 * fraction))
            bar.set_description_str(message, refresh=False)
            bar.refresh()

    try:
        result = run_perfusion(series, kind=args.kind, te_ms=args.te_ms, adc=adc, aif_point=args.aif_point, aif_mask=mask,
                               thresholds=thresholds, settings=settings, progress=progress)
    except KeyboardInterrupt:
        raise Cancelled(f"{args.series}: interrupted; no output written") from None
    finally:
        if bar is not None:
            bar.close()
    write_perfusion(result, args.out)
    print(format_summary(result.report))
    print(f"outputs in {args.out}")
    return 0


def format_summary(report: dict) -> str:
    """The decision volumes as a few lines of text."""
    from .decision import formatted_volumes

    f = formatted_volumes(report)
    d3 = report.get("defuse3_style", {})
    lines = [
        f"{report['input']['kind'].upper()} perfusion ({report['input']['frames']} frames, {report['input']['duration_s']:.0f} s)",
        f"core            {f['core']}   ({report['core_method']})",
        *([f"core by rCBF    {f['core_by_rcbf']}"] if f["core_by_rcbf"] else []),
        f"Tmax > {f['tmax_hypo_s']} s      {f['hypoperfusion']}",
        f"penumbra        {f['penumbra']}",
        f"mismatch        {f['mismatch']}, ratio {f['ratio']}",
        f"HIR             {f['hir']}",
        f"DEFUSE 3-style target mismatch: {'yes' if d3.get('target_mismatch_profile') else 'no'}  (research use only)",
    ]
    return "\n".join(lines)


def run_phantom(args: argparse.Namespace) -> list[Path]:
    """``strokeseg phantom --modality ctp|pwi``: write the cases, return their folders."""
    from ..phantom.perfusion import generate_perfusion_cases

    if args.modality not in PHANTOM_MODALITIES:
        raise StrokeSegError(f"perfusion phantoms are {PHANTOM_MODALITIES}, not {args.modality!r}")
    extra = {"residue": args.residue} if getattr(args, "residue", None) else {}
    return generate_perfusion_cases(args.modality, args.seed, args.out, count=args.count,
                                    lesion_library=args.lesion_library, split=args.split,
                                    progress=not getattr(args, "quiet", False), **extra)

