"""Export a trained run into Resources/Models: weights, a complete model card, models.json."""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from strokeseg.errors import InputError
from strokeseg.models import load_registry, sha256_file

from .config import REPO_ROOT, load_config, run_dir

BUNDLED_MODELS = REPO_ROOT / "Resources" / "Models"


def export_target(cfg: dict[str, Any]) -> Path:
    """The models folder a run exports into (``models_dir``, default the bundled one), checked
    before any training: a variant of a config (its ``name`` changed with ``--set``, as the
    ablations are) would otherwise register itself in the bundled models under the config's own
    card id, beside or in place of the shipped model."""
    target = Path(cfg["models_dir"]) if cfg.get("models_dir") else BUNDLED_MODELS
    if "name" in cfg.get("_set_keys", []) and target.resolve() == BUNDLED_MODELS.resolve():
        raise InputError(cfg["_config_path"], f"run {cfg['name']!r} is a variant (its name set with --set) and would be "
                         f"exported into Resources/Models as {cfg['card']['id']!r}; give it --set models_dir=runs/exports "
                         "(or a config file of its own), or run train, tune and evaluate only")
    return target


def export_folder(cfg: dict[str, Any], models_dir: Path | None = None) -> Path:
    """The folder of a config's model in ``models_dir`` (default: where the config exports)."""
    return (models_dir or export_target(cfg)) / cfg.get("export_folder", cfg["card"]["id"].replace("-", "_"))


def _check_version_is_new(folder: Path, card: dict[str, Any], weights: list[Path]) -> None:
    """A card's id and version name one set of weights: other weights need a new version."""
    old_path = folder / "card.json"
    if not old_path.is_file():
        return
    try:
        old = json.loads(old_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return  # unreadable: the export replaces it
    if old.get("id") != card["id"] or old.get("version") != card.get("version"):
        return
    old_sha = [w.get("sha256") for w in old.get("weights", [])]
    if old_sha != [sha256_file(w) for w in weights]:
        raise InputError(old_path, f"already holds {card['id']} {card.get('version')} with other weights; "
                         "raise card.version in the config (or --set card.version=...) to export a new model")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _bundled_stage_records(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The stage records of the card this export will replace, by config path: a later stage is
    usually trained where the earlier stages' run folders no longer exist (another machine, a
    clean clone), and their records must not turn into null steps on the new card."""
    card_path = export_folder(cfg) / "card.json"
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    if card.get("id") != cfg["card"]["id"]:
        return {}
    training = card.get("training", {})
    return {r["config"]: r for r in training.get("stages", []) if isinstance(r, dict) and "config" in r}


def stage_records(cfg: dict[str, Any], command: str) -> tuple[str, list[dict[str, Any]]]:
    """The chain of runs behind a multi-stage model (a config's ``earlier_stages``, oldest first):
    the command that reproduces all of them and one record per stage, from its run's
    ``train_summary.json`` or, for an earlier stage whose run folder is gone, from the bundled card."""
    earlier = list(cfg.get("earlier_stages", []))
    if not earlier:
        return command, []
    this = Path(cfg["_config_path"]).resolve()
    this = this.relative_to(REPO_ROOT) if this.is_relative_to(REPO_ROOT) else this
    bundled = _bundled_stage_records(cfg)
    records = []
    for path in [*earlier, this]:
        stage_cfg = cfg if path == this else load_config(REPO_ROOT / path)
        summary = run_dir(stage_cfg) / "train_summary.json"
        if not summary.is_file() and path != this and str(path) in bundled:
            records.append(dict(bundled[str(path)]))
            continue
        tsum = json.loads(summary.read_text(encoding="utf-8")) if summary.is_file() else {}
        records.append({"config": str(path), "steps": tsum.get("steps_done"),
                        "duration_s": round(float(tsum.get("duration_s", 0.0)), 1), "device": tsum.get("device", "unknown")})
    chain = " && ".join(f"strokeseg-train all --config {p}" for p in earlier)
    return f"{chain} && {command}", records


def export_model(cfg: dict[str, Any], weights: list[Path], *, postprocess: dict[str, float],
                 validation: dict[str, Any], training: dict[str, Any], models_dir: Path | None = None) -> Path:
    models_dir = models_dir or BUNDLED_MODELS
    card = json.loads(json.dumps(cfg["card"]))
    folder = export_folder(cfg, models_dir)
    _check_version_is_new(folder, card, weights)
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, w in enumerate(weights):
        dst = folder / f"fold{i}.safetensors"
        shutil.copyfile(w, dst)
        entries.append({"file": dst.name, "sha256": sha256_file(dst)})
    card.update(weights=entries, postprocess=postprocess, validation=validation,
                training={"commit": git_commit(), **training}, created=datetime.date.today().isoformat())
    (folder / "card.json").write_text(json.dumps(card, indent=2) + "\n")

    index = models_dir / "models.json"
    reg = json.loads(index.read_text(encoding="utf-8")) if index.is_file() else {"schema_version": 1, "models": []}
    entry = {"id": card["id"], "folder": folder.name, "family": card["family"]}
    ids = [m["id"] for m in reg["models"]]
    if card["id"] in ids:  # a new version keeps its place in the registry (and in the module's list)
        reg["models"][ids.index(card["id"])] = entry
    else:
        reg["models"].append(entry)
    index.write_text(json.dumps(reg, indent=2) + "\n")
    load_registry(models_dir)  # the exported card must pass the engine's own validation
    return folder
