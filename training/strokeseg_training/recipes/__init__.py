"""Training recipes: how a config's model is trained, chosen by the config's ``"recipe"``.

The default ``unet3d`` is the patch trainer of :mod:`strokeseg_training.train`; each paper's
method lives in its own module here and is registered below as ``"module:function"`` so that
importing the package stays cheap. A recipe function takes the loaded config and ``resume`` and
returns the run folder holding ``best.safetensors`` and ``train_summary.json`` (the contract
``tune``/``evaluate``/``export`` rely on).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

Trainer = Callable[..., Path]

RECIPES: dict[str, str] = {
    "unet3d": "strokeseg_training.train:train",
    "paper000_deepmedic": "strokeseg_training.recipes.paper000_deepmedic:train_deepmedic",
    "paper001_asymunet": "strokeseg_training.recipes.paper001_asymunet:train_asymunet",
    "paper002_edd_muscle": "strokeseg_training.recipes.paper002_edd_muscle:train_edd_muscle",
    "paper003_t1_cnn": "strokeseg_training.recipes.paper003_t1_cnn:train",
    "paper004_ctp_gan": "strokeseg_training.recipes.paper004_ctp_gan:train",
}

# Recipes whose data is not the shared phantom splits prepare it themselves; ``generate`` and
# ``train_recipe`` run this first.
DATA_PREPARERS: dict[str, str] = {
    "paper004_ctp_gan": "strokeseg_training.recipes.paper004_ctp_gan:ensure_phantoms",
}


def prepare_data(cfg: dict[str, Any]) -> None:
    """Run the config's recipe-specific data preparation, if its recipe has one."""
    spec = DATA_PREPARERS.get(cfg.get("recipe", "unet3d"))
    if spec is not None:
        module, func = spec.split(":")
        getattr(importlib.import_module(module), func)(cfg)


def trainer(name: str) -> Trainer:
    """The training function of recipe ``name``; a clear error lists the known ones."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    module, func = RECIPES[name].split(":")
    return getattr(importlib.import_module(module), func)


def train_recipe(cfg: dict[str, Any], *, resume: bool = True) -> Path:
    prepare_data(cfg)
    return trainer(cfg.get("recipe", "unet3d"))(cfg, resume=resume)
