"""What makes a checkpoint resumable: a key of the settings it was written under, and the random
generators' states, so that a resumed CPU run draws what the uninterrupted one would have.

Every training loop keys its checkpoint with :func:`settings_key`; a checkpoint written under
another key is not resumed (a rerun with a changed learning rate must not silently continue the
old run). How long a run is (``steps``, ``max_minutes``, at any depth) is left out of the key: a
rerun with more steps or minutes continues the run instead of starting again. So are the card's
words (id, version, name, description, licence): raising ``card.version`` to export a model
under a new version must not train it again.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from strokeseg.io import write_bytes

from .config import NOT_IN_DATA_KEY, repo_path

NOT_IN_TRAIN_KEY = ("steps", "max_minutes")  # how long, not what: a longer rerun continues
NOT_IN_CARD_KEY = ("id", "version", "name", "description", "licence")  # what the model is called, not what it learns


def _without_length(settings: Any) -> Any:
    if isinstance(settings, dict):
        return {k: _without_length(v) for k, v in settings.items() if k not in NOT_IN_TRAIN_KEY}
    return settings


def settings_key(cfg: dict[str, Any], drop_train: tuple[str, ...] = ()) -> str:
    """What a run's weights depend on: the card (not its words), the data (not free text or worker counts), the
    training settings other than ``drop_train`` (a later stage's own block) and the run's length,
    and the content of ``train.init_weights`` when a run starts from earlier weights."""
    train = {k: v for k, v in cfg["train"].items() if k not in drop_train}
    init = train.get("init_weights")
    if init:
        path = repo_path(init)
        train["init_weights_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
    blob = json.dumps({"card": {k: v for k, v in cfg["card"].items() if k not in NOT_IN_CARD_KEY},
                       "data": {k: v for k, v in cfg["data"].items() if k not in NOT_IN_DATA_KEY},
                       "train": _without_length(train)}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def truncate_log(log: Path, step: int) -> None:
    """Keep a CSV log's header and its rows up to ``step``: a resumed loop redoes the rest."""
    lines = log.read_text(encoding="utf-8").splitlines() if log.is_file() else []
    kept = lines[:1] + [ln for ln in lines[1:] if ln and int(ln.split(",", 1)[0]) <= step]
    log.write_text("\n".join(kept) + "\n")


class NumpyGeneratorState:
    """A numpy ``Generator`` with ``state_dict`` / ``load_state_dict``, to checkpoint it as a module."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def state_dict(self) -> dict[str, str]:
        return {"state": json.dumps(self.rng.bit_generator.state)}  # 128-bit integers: JSON keeps them

    def load_state_dict(self, state: dict[str, str]) -> None:
        self.rng.bit_generator.state = json.loads(state["state"])


class TorchGeneratorState:
    """A torch generator (the global CPU one when None: dropout, ``torch.rand``) as a module."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"state": (self.generator.get_state() if self.generator is not None else torch.get_rng_state())}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        s = state["state"].cpu()
        if self.generator is not None:
            self.generator.set_state(s)
        else:
            torch.set_rng_state(s)


def generator_states(rng: np.random.Generator | None, *generators: torch.Generator) -> dict[str, Any]:
    """The stateful objects a loop checkpoints beside its modules: the numpy generator it draws
    batches from, the global torch generator, and any torch generators of its own."""
    states: dict[str, Any] = {"torch_rng": TorchGeneratorState()}
    if rng is not None:
        states["numpy_rng"] = NumpyGeneratorState(rng)
    for i, g in enumerate(generators):
        states[f"torch_generator{i}"] = TorchGeneratorState(g)
    return states


class Checkpoint:
    """One training loop's checkpoint file: the ``state_dict`` of each stateful object (networks,
    optimisers, generators, a sampler with a position), the loop's own values, and the settings
    key. Our own file, written atomically and read back with ``weights_only`` (no code runs)."""

    def __init__(self, path: Path, key: str, stateful: dict[str, Any]):
        self.path, self.key, self.stateful = Path(path), key, stateful

    def save(self, **loop: Any) -> None:
        buffer = io.BytesIO()
        torch.save({"key": self.key, "objects": {k: o.state_dict() for k, o in self.stateful.items()},
                    "loop": loop}, buffer)
        write_bytes(buffer.getvalue(), self.path)  # a crash while saving keeps the previous checkpoint

    def load(self, device: torch.device) -> dict[str, Any] | None:
        """Restore every object and return the loop's values; None (and a message) when there is
        no checkpoint of these settings to resume."""
        if not self.path.is_file():
            return None
        state = torch.load(self.path, map_location=device, weights_only=True)
        if not isinstance(state, dict) or state.get("key") != self.key:
            print(f"{self.path}: written for other settings (or by an older version); training from the start")
            return None
        for k, o in self.stateful.items():
            o.load_state_dict(state["objects"][k])
        return state["loop"]
