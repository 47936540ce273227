"""Training configurations: one JSON file describes a run completely (with its seed)."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

from strokeseg.errors import InputError
from strokeseg.models import ModelCard

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RUNS = REPO_ROOT / "runs"


REQUIRED_SECTIONS = ("name", "card", "data", "train", "tune")


def load_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a config and apply ``section.key=value`` overrides (values parsed as JSON when possible).

    A missing or malformed file, an unknown recipe or an override of the wrong type is an
    ``InputError`` naming the file: the CLI prints it as one line, before any data or training."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such config file" + ("" if not path.is_dir() else " (it is a folder)"))
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError(path, "is not a text (UTF-8 JSON) config file") from None
    except json.JSONDecodeError as exc:
        raise InputError(path, f"is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    if not isinstance(cfg, dict):
        raise InputError(path, "must hold a JSON object (name, card, data, train, tune)")
    missing = [k for k in REQUIRED_SECTIONS if k not in cfg]
    if missing:
        raise InputError(path, f"lacks {', '.join(missing)}; see training/README.md for the config layout")
    cfg["_config_path"] = str(path)
    cfg["_set_keys"] = [item.partition("=")[0] for item in overrides or []]  # what --set changed (export's guard)
    for item in overrides or []:
        _apply_override(cfg, item, path)
    _check_recipe(cfg, path)
    return cfg


def _apply_override(cfg: dict[str, Any], item: str, path: Path) -> None:
    """``--set a.b=VALUE``: VALUE is JSON where it parses, text otherwise; it must fit the type
    the config already holds there (``train.steps=abc`` would fail an hour in, not now)."""
    key, eq, raw = item.partition("=")
    if not eq or not key or any(not part for part in key.split(".")):
        raise InputError(None, f"--set {item!r}: expected KEY=VALUE, e.g. train.steps=100")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    node = cfg
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise InputError(path, f"--set {item}: {'.'.join(parts[:i + 1])} is not a section")
    old = node.get(parts[-1])
    if old is not None and not _same_kind(old, value):
        raise InputError(path, f"--set {item}: {key} holds {_kind(old)} ({json.dumps(old)}), not {_kind(value)}")
    node[parts[-1]] = value


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return "true/false"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "text"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a section"
    return "null"


def _same_kind(old: Any, new: Any) -> bool:
    if new is None or _kind(old) == _kind(new):
        return True
    # a number may become a per-axis list of numbers (inference.overlap=[0.5,0.5,0.25])
    return _kind(old) == "a number" and isinstance(new, list) and all(_kind(v) == "a number" for v in new)


def _check_recipe(cfg: dict[str, Any], path: Path) -> None:
    from .recipes import RECIPES  # the registry only: importing it loads no recipe module

    name = cfg.get("recipe", "unet3d")
    if name not in RECIPES:
        raise InputError(path, f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")


def card_of(cfg: dict[str, Any], folder: Path | None = None) -> ModelCard:
    """The (not yet exported) model card a run trains: preprocessing comes from it, as in the engine."""
    raw = copy.deepcopy(cfg["card"])
    raw.setdefault("weights", [])
    return ModelCard(raw=raw, folder=folder or REPO_ROOT / "Resources" / "Models")


def repo_path(p: str | Path) -> Path:
    """A path from a config: relative paths are from the repository root (as the configs write them)."""
    p = Path(p).expanduser()
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


def run_dir(cfg: dict[str, Any]) -> Path:
    d = Path(cfg.get("run_dir") or DEFAULT_RUNS / cfg["name"])
    d.mkdir(parents=True, exist_ok=True)
    return d


# Data fields that do not change the cases: free text, and how many processes generate them.
NOT_IN_DATA_KEY = ("description", "workers")


def perfusion_phantoms_made_by(modality: str) -> list[str]:
    """What a perfusion phantom's files depend on beyond its seed and options: the simulator and
    the maps our own pipeline computes from its series (the models' inputs)."""
    from strokeseg.perfusion.pipeline import MAPS_VERSION
    from strokeseg.phantom.perfusion import GENERATOR_VERSION as PERFUSION_VERSION

    return [PERFUSION_VERSION, f"maps-{MAPS_VERSION['ct' if modality == 'ctp' else 'mr']}"]


def phantoms_stamp(cfg: dict[str, Any]) -> dict[str, Any]:
    """What the phantom folders' contents depend on besides their case ids (which carry the
    seeds): options, lesion library, simulator and maps pipeline. Kept in each folder, and part
    of the training cache key of those folders (``realdata``). Paper 004 writes such folders (``data.phantom``)."""
    spec = cfg["data"]["phantom"]
    return {"options": spec.get("options", {}), "lesion_library": spec.get("lesion_library"),
            "made_by": perfusion_phantoms_made_by("ctp")}


def data_key(cfg: dict[str, Any], split: str) -> str:
    """A cache key that changes whenever what the cases look like would change (and only then:
    editing a description or ``--set data.workers=1`` on a busy machine reuses the cache)."""
    from strokeseg.phantom import GENERATOR_VERSION

    # Seeds are per split (seed + offset), so another split's count never changes this split's cases:
    # adding training phantoms keeps the validation and test caches.
    data = {k: v for k, v in cfg["data"].items()
            if k not in NOT_IN_DATA_KEY and not (k.startswith("n_") and k != f"n_{split}")}
    if data.get("source") == "phantom" and data.get("modality") in ("ctp", "pwi"):
        data["generated_by"] = perfusion_phantoms_made_by(data["modality"])
    blob = json.dumps({"data": data, "split": split, "generator": GENERATOR_VERSION,
                       "spacing": cfg["card"]["target_spacing"], "norm": cfg["card"].get("normalisation"),
                       "inputs": cfg["card"]["inputs"],
                       # only when present, so caches of configs without derived channels stay valid
                       **({"derived": cfg["card"]["derived_channels"]} if cfg["card"].get("derived_channels") else {})},
                      sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]
