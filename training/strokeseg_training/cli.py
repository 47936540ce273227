"""``strokeseg-train``: generate / train / tune / evaluate / export, each from a config file.

    strokeseg-train all --config training/configs/dwi_unet.json      # the whole recipe
    strokeseg-train fit --config training/configs/dwi_unet.json      # training cases vs validation
    torchrun --nproc_per_node 4 -m strokeseg_training.cli train --config ...   # multi-GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from strokeseg.errors import InputError, StrokeSegError
from strokeseg.models import build_network
from strokeseg.postprocess import PostprocessSettings

from .config import card_of, load_config, run_dir
from .data import build_split, training_case_folders
from .evaluate import ablate_postprocess, ablation_markdown, case_probabilities, score, summarise, tune
from .export import export_model, export_target, stage_records
from .recipes import prepare_data, train_recipe


def _net(cfg: dict, weights: Path, device: str = "cpu") -> torch.nn.Module:
    from safetensors.torch import load_file

    net = build_network(card_of(cfg))
    net.load_state_dict(load_file(str(weights)))
    return net.to(device).eval()


def _cases(cfg: dict, split: str) -> list[Path]:
    _, root = build_split(cfg, split, workers=int(cfg["data"].get("workers", 2)))
    cases = sorted(p for p in root.iterdir() if p.is_dir())
    n = cfg["data"].get(f"n_{split}")  # phantom configs fix the count; a real dataset's split is what it is
    return cases[: int(n)] if n else cases


def _weights(cfg: dict, out: Path) -> Path:
    """The checkpoint a run hands on to tune / evaluate / export: the best validation checkpoint,
    or the last weights when the config says ``"checkpoint": "last"`` (chosen on validation when
    the in-training validation Dice is too coarse to rank checkpoints)."""
    which = cfg.get("checkpoint", "best")
    if which not in ("best", "last"):
        raise InputError(cfg["_config_path"], f"checkpoint must be 'best' or 'last', not {which!r}")
    return _need(out / f"{which}.safetensors", "train")


def _need(path: Path, step: str) -> Path:
    """An earlier step's output, or a one-line error saying which step makes it."""
    if not path.is_file():
        raise InputError(path, f"not found: run `strokeseg-train {step}` with this config first")
    return path


def _read_json(path: Path, step: str) -> dict:
    return json.loads(_need(path, step).read_text(encoding="utf-8"))


def do_tune(cfg: dict) -> dict:
    out = run_dir(cfg)
    card = card_of(cfg)
    net = _net(cfg, _weights(cfg, out))  # before generating cases: a missing checkpoint fails at once
    probs = case_probabilities(_cases(cfg, "val"), [net], card)
    best, table = tune(probs, cfg["tune"]["grid"], cfg["tune"].get("objective", "dice+f1"))
    res = {"threshold": best.threshold, "closing_mm": best.closing_mm, "min_lesion_ml": best.min_lesion_ml}
    (out / "tuning.json").write_text(json.dumps({"best": res, "table": table}, indent=2))
    val_rows = score(probs, best)
    summarise(val_rows, out / "val", f"{cfg['name']} validation")
    print(f"tuned post-processing: {res}")
    return res


def do_evaluate(cfg: dict, settings: dict | None = None) -> dict:
    out = run_dir(cfg)
    tuning = None if settings else _read_json(out / "tuning.json", "tune")
    settings = settings or tuning["best"]
    net = _net(cfg, _weights(cfg, out))
    probs = case_probabilities(_cases(cfg, "test"), [net], card_of(cfg))
    chosen = PostprocessSettings(**settings)
    rows = score(probs, chosen)
    summary = summarise(rows, out / "test", f"{cfg['name']} held-out phantoms")
    if tuning and cfg["tune"].get("ablate_on_test"):
        ablation = ablate_postprocess(probs, tuning["table"], scored=(chosen, rows))
        (out / "test" / "postprocess_ablation.json").write_text(json.dumps(ablation, indent=2))
        (out / "test" / "postprocess_ablation.md").write_text(ablation_markdown(ablation, settings))
    m = summary["metrics"] if "metrics" in summary else summary
    print(json.dumps({k: m[k] for k in ("dice", "lesion_f1", "abs_volume_diff_ml") if k in m}, indent=2))
    return summary


def score_tuned(cfg: dict, case_dirs: list[Path]) -> list[dict[str, float]]:
    """The run's model with its tuned post-processing (``tuning.json``), scored on case folders."""
    out = run_dir(cfg)
    settings = PostprocessSettings(**_read_json(out / "tuning.json", "tune")["best"])
    net = _net(cfg, _weights(cfg, out))
    return score(case_probabilities(case_dirs, [net], card_of(cfg)), settings)


def do_fit(cfg: dict, count: int | None = None) -> dict:
    """The run's model, with its tuned post-processing, on its first training cases beside its
    validation cases: a model much better on what it trained on than on validation has learnt
    its cases rather than the task, and wants more data rather than more steps."""
    out = run_dir(cfg)
    val = _read_json(out / "val" / "summary.json", "tune")
    count = int(count or cfg["data"].get("n_val") or 12)
    rows = score_tuned(cfg, training_case_folders(cfg, count, workers=int(cfg["data"].get("workers", 2))))
    train = summarise(rows, out / "fit_train", f"{cfg['name']} on {len(rows)} of its training cases")

    def dice(summary: dict) -> dict:
        d = summary.get("metrics", summary)["dice"]
        return {"n": d["n"], "median": d["median"], "mean": d["mean"]}

    report = {"train": dice(train), "val": dice(val)}
    report["gap_mean_dice"] = report["train"]["mean"] - report["val"]["mean"]
    (out / "fit.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for split in ("train", "val"):
        r = report[split]
        print(f"{split:>5}: {r['n']} cases, Dice median {r['median']:.3f}, mean {r['mean']:.3f}")
    print(f"mean Dice on training cases minus validation: {report['gap_mean_dice']:+.3f}")
    return report


def do_export(cfg: dict, command: str) -> Path:
    out = run_dir(cfg)
    tuned = _read_json(out / "tuning.json", "tune")["best"]
    test = _read_json(out / "test" / "summary.json", "evaluate")
    tsum = _read_json(out / "train_summary.json", "train")
    metrics = test.get("metrics", test)
    flat = {}
    for k in ("dice", "lesion_f1", "abs_volume_diff_ml", "hd95_mm", "abs_lesion_count_diff", "ppv", "tpr"):
        if k in metrics and isinstance(metrics[k], dict):
            flat[f"{k}_median"] = metrics[k].get("median")
            flat[f"{k}_mean"] = metrics[k].get("mean")
    validation = {"dataset": f"held-out phantoms (test split: seeds {cfg['data'].get('seed', 0) + 900000}+, "
                             f"lesion shapes never used in training)",
                  # the cases actually evaluated: perfusion phantoms the engine refuses are not test cases
                  "n_cases": int(test.get("n_cases", cfg["data"]["n_test"])),
                  "metrics": {k: v for k, v in flat.items() if v is not None}}
    # What reproduces the model: the same config and overrides through every step.
    command = command.replace("strokeseg-train export ", "strokeseg-train all ", 1)
    command, stages = stage_records(cfg, command)
    training = {"data": cfg["data"].get("description", "StrokeSeg phantoms"), "command": command,
                "seed": int(cfg["train"].get("seed", 0)), "duration_s": round(float(tsum["duration_s"]), 1),
                "device": tsum["device"], "steps": tsum["steps_done"], "checkpoint": cfg.get("checkpoint", "best"),
                **({"stages": stages} if stages else {})}
    folder = export_model(cfg, [_weights(cfg, out)], postprocess=tuned, validation=validation, training=training,
                          models_dir=export_target(cfg))
    print(f"exported to {folder}")
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="strokeseg-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["generate", "train", "tune", "evaluate", "fit", "export", "all"],
                   help="fit: after tune, the model on its first training cases beside validation (does it overfit?)")
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config entry, e.g. train.steps=100")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--count", type=int, help="fit: how many training cases (default: as many as validation has)")
    args = p.parse_args(argv)
    try:
        return _run(args, argv)
    except StrokeSegError as exc:
        print(f"strokeseg-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("strokeseg-train: interrupted; the same command resumes from the last checkpoint", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    cfg = load_config(args.config, args.set)
    command = "strokeseg-train " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    t0 = time.time()
    if args.command in ("export", "all"):
        export_target(cfg)  # refuse a variant's export into the bundled models before hours of training
    if args.command in ("generate",):
        prepare_data(cfg)
        for split in ("train", "val", "test"):
            build_split(cfg, split, workers=int(cfg["data"].get("workers", 2)))
    if args.command in ("train", "all"):
        train_recipe(cfg, resume=not args.no_resume)
        if int(os.environ.get("RANK", "0")) != 0:
            return 0  # under torchrun only rank 0 tunes, evaluates and exports
    if args.command in ("tune", "all"):
        do_tune(cfg)
    if args.command in ("evaluate", "all"):
        do_evaluate(cfg)
    if args.command == "fit":
        do_fit(cfg, args.count)
    if args.command in ("export", "all"):
        do_export(cfg, command)
    print(f"{args.command} finished in {time.time() - t0:.0f} s")
    return 0

if __name__ == "__main__":
    sys.exit(main())
