"""Helpers shared by the engine's end-to-end tests: a tiny model folder and phantom cases."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch

from strokeseg.models import build_network, save_weights

REPO_ROOT = Path(__file__).resolve().parents[2]
DWI_CONFIG = REPO_ROOT / "training" / "configs" / "dwi_unet.json"


def tiny_card(model_id: str = "dwi-tiny") -> dict:
    """The bundled DWI recipe's card with a very small network: real code path, fast tests."""
    card = copy.deepcopy(json.loads(DWI_CONFIG.read_text(encoding="utf-8"))["card"])
    card["id"] = model_id
    card["network"]["args"]["channels"] = [4, 8, 16, 16]
    card["postprocess"] = {"threshold": 0.5, "closing_mm": 2.0, "min_lesion_ml": 0.0}
    card["training"] = {"data": "none (random weights, tests only)", "command": "tests", "commit": "n/a", "seed": 0, "duration_s": 0, "device": "cpu"}
    card["validation"] = {"dataset": "none (untrained)", "n_cases": 1, "metrics": {}}
    card["created"] = "2026-11-22"
    return card


def make_models_dir(root: Path, card: dict | None = None, seed: int = 0) -> Path:
    """A models folder (models.json + one model) with random but deterministic weights."""
    card = card or tiny_card()
    torch.manual_seed(seed)
    net = build_network(card)
    # Bias the output so the random net yields a mix of probabilities, not all ~0.5.
    folder = root / card["id"].replace("-", "_")
    folder.mkdir(parents=True, exist_ok=True)
    sha = save_weights(net, folder / "fold0.safetensors")
    card = {**card, "weights": [{"file": "fold0.safetensors", "sha256": sha}]}
    (folder / "card.json").write_text(json.dumps(card, indent=2))
    (root / "models.json").write_text(json.dumps(
        {"schema_version": 1, "models": [{"id": card["id"], "folder": folder.name, "family": card["family"]}]}))
    return root


def lesion_blob_case(dwi: np.ndarray) -> np.ndarray:
    return (dwi > np.percentile(dwi, 99.5)).astype(np.uint8)


def assert_bundled_card(card, min_cases: int) -> None:
    """A shipped model: in the registry, weights within 50 MB matching the card's SHA-256, and
    held-out metrics on at least ``min_cases`` cases."""
    from strokeseg.models import load_registry, sha256_file

    assert card.id in [c.id for c in load_registry()]
    for w in card.weights:
        path = card.folder / w["file"]
        assert path.stat().st_size <= 50 * 1024**2
        assert sha256_file(path) == w["sha256"]
    m = card.validation["metrics"]
    assert card.validation["n_cases"] >= min_cases
    assert 0.0 <= m["dice_median"] <= 1.0 and m["abs_volume_diff_ml_median"] >= 0.0
