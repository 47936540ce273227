"""Training configurations: one JSON file describes a run completely (with its seed)."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

from strokeseg.models import ModelCard

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RUNS = REPO_ROOT / "runs"


def load_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a config and apply ``section.key=value`` overrides (values parsed as JSON when possible)."""
    cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    cfg["_config_path"] = str(path)
    for item in overrides or []:
        key, _, raw = item.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return cfg


def card_of(cfg: dict[str, Any], folder: Path | None = None) -> ModelCard:
    """The (not yet exported) model card a run trains: preprocessing comes from it, as in the engine."""
    raw = copy.deepcopy(cfg["card"])
    raw.setdefault("weights", [])
    return ModelCard(raw=raw, folder=folder or REPO_ROOT / "Resources" / "Models")


def run_dir(cfg: dict[str, Any]) -> Path:
    d = Path(cfg.get("run_dir") or DEFAULT_RUNS / cfg["name"])
    d.mkdir(parents=True, exist_ok=True)
    return d


# Data fields that do not change the cases: free text, and how many processes generate them.
NOT_IN_DATA_KEY = ("description", "workers")


def data_key(cfg: dict[str, Any], split: str) -> str:
    """A cache key that changes whenever what the cases look like would change (and only then:
    editing a description or ``--set data.workers=1`` on a busy machine reuses the cache)."""
    from strokeseg.phantom import GENERATOR_VERSION

    data = {k: v for k, v in cfg["data"].items() if k not in NOT_IN_DATA_KEY}
    blob = json.dumps({"data": data, "split": split, "generator": GENERATOR_VERSION,
                       "spacing": cfg["card"]["target_spacing"], "norm": cfg["card"].get("normalisation"),
                       "inputs": cfg["card"]["inputs"],
                       # only when present, so caches of configs without derived channels stay valid
                       **({"derived": cfg["card"]["derived_channels"]} if cfg["card"].get("derived_channels") else {})},
                      sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]
