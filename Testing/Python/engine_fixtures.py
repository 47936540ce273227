"""Helpers shared by the engine's end-to-end tests: a tiny model folder and phantom cases."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from strokeseg.image import Image
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


def write_dicom_series(img: Image, folder, tags: dict[str, str], uid_root: str = "1.2.826.0.1.3680043.8.498.77") -> None:
    """One file per slice with the geometry tags SimpleITK/GDCM need (int16 pixels)."""
    folder.mkdir(parents=True, exist_ok=True)
    vol = img.to_sitk()
    vol = sitk.Cast(vol, sitk.sitkInt16)
    d = img.direction_matrix
    series_uid = f"{uid_root}.{int(time.time() * 1e3) % 10**9}.{abs(hash(str(folder))) % 10**6}"
    common = {
        "0008|0021": "20240101", "0008|0031": "120000", "0020|000d": f"{series_uid}.1", "0020|000e": f"{series_uid}.2",
        "0020|0037": "\\".join(f"{v:.10f}" for v in (*d[:, 0], *d[:, 1])), **tags,
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(vol.GetSize()[2]):
        sl = vol[:, :, k]
        for tag, value in common.items():
            sl.SetMetaData(tag, value)
        sl.SetMetaData("0020|0032", "\\".join(f"{v:.10f}" for v in vol.TransformIndexToPhysicalPoint((0, 0, k))))
        sl.SetMetaData("0020|0013", str(k + 1))
        sl.SetMetaData("0008|0018", f"{series_uid}.3.{k}")
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(sl)
