"""The ``strokeseg`` command: models, phantom, segment (one case or a batch), evaluate, demo.

Every anticipated failure is a StrokeSegError: one line naming the file and the problem on
stderr, exit code 2, no partial output. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import NoReturn, Sequence

from . import __version__
from .errors import Cancelled, StrokeSegError

log = logging.getLogger("strokeseg")
DEFAULT_LIBRARY = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "soop" / "lesions"


def _parse_overrides(values: Sequence[str] | None) -> dict[str, str]:
    out = {}
    for v in values or []:
        if "=" not in v:
            raise StrokeSegError(f"--as takes FILE=KEY or KEY=KEY pairs, got '{v}'")
        a, b = v.split("=", 1)
        out[a] = b
    return out


def cmd_models(args: argparse.Namespace) -> int:
    from .models import load_registry

    cards = load_registry(args.models_dir)
    if args.json:
        print(json.dumps([c.raw for c in cards], indent=2))
        return 0
    for card in cards:
        print(card.describe())
        print()
    return 0


def cmd_phantom(args: argparse.Namespace) -> int:
    from .phantom import generate_cases

    library = args.lesion_library
    if library is not None and not Path(library).is_dir():
        raise StrokeSegError(f"{library}: lesion library folder not found")
    if args.count < 1:
        raise StrokeSegError(f"--count must be at least 1, got {args.count}")
    if args.seed < 0:
        raise StrokeSegError(f"--seed must be 0 or more, got {args.seed}")
    if Path(args.out).exists() and not Path(args.out).is_dir():  # found before minutes of simulation, not after
        raise StrokeSegError(f"{args.out}: --out is a file, not a folder")
    if args.residue is not None and args.modality not in ("ctp", "pwi"):
        raise StrokeSegError(f"phantom --modality {args.modality}: --residue applies to ctp and pwi phantoms")
    if args.modality in ("ctp", "pwi"):
        if args.grid is not None or args.skull_strip is not None or args.deface is not None:
            raise StrokeSegError(f"phantom --modality {args.modality}: --grid/--skull-strip/--deface do not apply to perfusion")
        from .perfusion.cli import run_phantom

        for p in run_phantom(args):
            print(p)
        return 0
    options = {}
    if args.grid is not None:
        options["grid"] = args.grid
    if args.modality in ("t1", "siss"):
        for name in ("skull_strip", "deface"):
            if getattr(args, name) is not None:
                options[name] = getattr(args, name)
    elif args.skull_strip is not None or args.deface is not None:
        raise StrokeSegError(f"phantom --modality {args.modality}: --skull-strip/--deface apply to t1 and siss phantoms")
    try:
        paths = generate_cases(args.modality, args.seed, args.out, count=args.count, lesion_library=library,
                               split=args.split, progress=not args.quiet, **options)
    except ValueError as exc:  # e.g. a modality whose phantoms are not available yet
        raise StrokeSegError(f"phantom --modality {args.modality}: {exc}") from None
    for p in paths:
        print(p)
    return 0


def _segment_one(args: argparse.Namespace, case: Path, out: Path, files: dict | None = None, bar=None):
    from .pipeline import segment_case

    return segment_case(
        case, out, model=args.model, device=args.device, threshold=args.threshold,
        closing_mm=args.closing_mm, min_lesion_ml=args.min_lesion_ml, overrides=_parse_overrides(args.as_),
        models_dir=args.models_dir, b_value=args.b_value, mirror_tta=args.tta, files=files,
    )


def _segment_batch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .batch import discover_cases
    from .pipeline import is_finished

    out_root = Path(args.out)
    cases = discover_cases(args.input_dir)
    failures: list[dict[str, str]] = []
    done = skipped = 0
    current = None
    bar = tqdm(cases, desc="segmenting", unit="case", disable=args.quiet)
    try:
        for case_id, folder, files in bar:
            current = case_id
            out = out_root / case_id
            if is_finished(out) and not args.overwrite:
                skipped += 1
                continue
            bar.set_postfix_str(case_id)
            try:
                if not files:
                    raise StrokeSegError(f"{folder}: no input images found")
                res = _segment_one(args, folder, out, files)
                done += 1
                tqdm.write(f"{case_id}: {res.report['total_volume_ml']:.2f} mL in "
                           f"{res.report['lesion_count']} lesion(s)", file=sys.stderr) if not args.quiet else None
            except StrokeSegError as exc:
                failures.append({"case": case_id, "error": str(exc)})
                tqdm.write(f"{case_id}: FAILED: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        raise Cancelled(f"{args.input_dir}: interrupted at case {current}; {done} finished case(s) kept, "
                        "run the same command again to resume") from None
    finally:
        bar.close()
        if failures or done:
            from .io import write_text

            summary = {"finished": done, "skipped_already_done": skipped, "failed": failures,
                       "engine_version": __version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            try:
                write_text(json.dumps(summary, indent=2), out_root / "batch_summary.json")
            except StrokeSegError:
                pass
    print(f"{done} segmented, {skipped} already done, {len(failures)} failed (see {out_root / 'batch_summary.json'})")
    return 0 if not failures else 1


def cmd_segment(args: argparse.Namespace) -> int:
    if args.input_dir:
        if args.case:
            raise StrokeSegError("give either CASE_DIR or --input-dir, not both")
        return _segment_batch(args)
    if not args.case:
        raise StrokeSegError("segment needs CASE_DIR or --input-dir DIR")
    try:
        res = _segment_one(args, Path(args.case), Path(args.out))
    except KeyboardInterrupt:
        raise Cancelled(f"{args.case}: interrupted; no output written") from None
    from .report import format_report

    print(format_report(res.report))
    print(f"outputs in {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .metrics import evaluate_files

    print(json.dumps(evaluate_files(args.pred, args.truth), indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), seed=args.seed, device=args.device, lesion_library=args.lesion_library)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="strokeseg", description="Ischaemic stroke lesion segmentation (StrokeSeg engine)")
    p.add_argument("--version", action="version", version=f"strokeseg {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="list bundled models and their inputs")
    m.add_argument("--json", action="store_true", help="print the model cards as JSON")
    m.add_argument("--models-dir", default=None, help=argparse.SUPPRESS)
    m.set_defaults(func=cmd_models)

    ph = sub.add_parser("phantom", help="simulate patients with known lesions")
    ph.add_argument("--modality", required=True, choices=["dwi", "t1", "siss", "pwi", "ctp"],
                    help="dwi: acute DWI (b0, dwi, adc); t1: chronic infarct on T1 (ATLAS-like); siss: sub-acute "
                         "infarct on t1, t2, flair and dwi, one grid (ISLES'15 SISS-like); pwi/ctp: perfusion")
    ph.add_argument("--seed", type=int, default=0)
    ph.add_argument("--out", required=True)
    ph.add_argument("--count", type=int, default=1)
    ph.add_argument("--lesion-library", default=None, help="folder of real lesion maps (e.g. ../shared/data/soop/lesions)")
    ph.add_argument("--split", choices=["train", "val", "test"], default=None, help="library shapes of one split only")
    ph.add_argument("--grid", choices=["clinical", "iso"], default=None,
                    help="dwi/t1/siss: oblique thick-slice clinical grid or isotropic (t1/siss: 1 mm 3D); default: drawn per case")
    ph.add_argument("--skull-strip", action=argparse.BooleanOptionalAction, default=None,
                    help="t1/siss: brain-extracted images (default: drawn per case for t1, always for siss)")
    ph.add_argument("--deface", action=argparse.BooleanOptionalAction, default=None,
                    help="t1/siss: remove the face (when not skull-stripped; default: drawn per case)")
    ph.add_argument("--residue", choices=["exponential", "gamma", "linear", "box"], default=None,
                    help="ctp/pwi: tissue residue family (default exponential; the others test an analysis against "
                         "a model it does not assume)")
    ph.add_argument("-q", "--quiet", action="store_true")
    ph.set_defaults(func=cmd_phantom)

    s = sub.add_parser("segment", help="segment one case folder or a batch")
    s.add_argument("case", nargs="?", help="case folder (inputs named by modality key)")
    s.add_argument("--input-dir", help="batch: one sub-folder per case, or a BIDS dataset")
    s.add_argument("--out", required=True)
    s.add_argument("--model", default="auto")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    s.add_argument("--threshold", type=float, default=None, help="probability threshold (default: the model card's)")
    s.add_argument("--closing-mm", type=float, default=None, help="closing radius in mm (default: card)")
    s.add_argument("--min-lesion-ml", type=float, default=None, help="smallest lesion kept, mL (default: card)")
    s.add_argument("--b-value", type=float, default=None, help="b-value of the DWI when ADC is computed (default: header or 1000)")
    s.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="mirror test-time augmentation along the axes the model was trained to mirror (card inference.tta_axes; left-right by default)")
    s.add_argument("--as", dest="as_", action="append", metavar="FILE=KEY", help="say what an input is (repeatable)")
    s.add_argument("--overwrite", action="store_true", help="batch: redo cases that are already finished")
    s.add_argument("-q", "--quiet", action="store_true")
    s.add_argument("--models-dir", default=None, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_segment)

    e = sub.add_parser("evaluate", help="compare a predicted mask with the truth (JSON)")
    e.add_argument("--pred", required=True)
    e.add_argument("--truth", required=True)
    e.set_defaults(func=cmd_evaluate)

    from .perfusion.cli import add_perfusion_parser

    add_perfusion_parser(sub)

    d = sub.add_parser("demo", help="simulate a DWI case, segment it, print the report, write a PNG overlay")
    d.add_argument("--out", default="strokeseg-demo")
    d.add_argument("--seed", type=int, default=7)
    d.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    d.add_argument("--lesion-library", default=None)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except StrokeSegError as exc:
        print(f"strokeseg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("strokeseg: error: interrupted; no partial output written", file=sys.stderr)
        return 2


def console(argv: Sequence[str] | None = None) -> NoReturn:
    """The ``strokeseg`` command (console script and ``python -m strokeseg.cli``): ``main`` in a
    process of its own, which can therefore import MONAI lean (strokeseg/_lean_monai.py) and
    leave without the interpreter's teardown: with torch loaded that takes ~0.5 s on a 2-core CPU
    (a tenth of a cold ``segment``) and does nothing for us, since every output file is written
    atomically and closed before ``main`` returns."""
    from ._lean_monai import use_lean_import

    use_lean_import()
    rc = main(argv)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    console()
