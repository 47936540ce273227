"""Bundled models: the registry (``models.json``), model cards and safe weight loading.

A model is a folder under ``Resources/Models`` holding ``card.json`` (validated against
``model_card.schema.json``) and one safetensors file per fold. Loading never executes code
from a file: the SHA-256 in the card is checked first, pickle and zip (``torch.save``)
checkpoints are refused by their magic bytes before any parsing, the safetensors header is
checked for sanity, and only then are tensors read — from the very bytes that were hashed,
so the file cannot change between check and use.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import safetensors.torch
import torch

from . import networks
from .errors import ModelError
from .io import write_bytes

ENV_VAR = "STROKESEG_MODELS_DIR"


def _bundled_dir() -> Path:
    """Resources/Models beside the package in an installed Slicer extension (qt-scripted-modules/),
    else at the source tree's root (StrokeSegExtension/strokeseg -> <repo>/Resources)."""
    here = Path(__file__).resolve()
    installed = here.parents[1] / "Resources" / "Models"
    return installed if installed.is_dir() else here.parents[2] / "Resources" / "Models"


BUNDLED_DIR = _bundled_dir()
SCHEMA_DIR = BUNDLED_DIR  # the schemas always come from the bundled folder, whatever STROKESEG_MODELS_DIR says
MODELS_DIR: Path = Path(os.environ[ENV_VAR]) if os.environ.get(ENV_VAR) else BUNDLED_DIR

FAMILIES = {"dwi": "diffusion MRI", "ctp": "CT perfusion", "t1": "T1-weighted MRI", "mrp": "MR perfusion"}
MAX_WEIGHTS_BYTES = 4 * 1024**3
_MAX_HEADER_BYTES = 100 * 1024**2  # the safetensors format's own limit
_ST_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def resolve_models_dir(models_dir: str | Path | None = None) -> Path:
    """The models folder: the argument, else $STROKESEG_MODELS_DIR (read now), else the bundled one."""
    if models_dir is not None:
        return Path(models_dir)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else MODELS_DIR


# -- model card ----------------------------------------------------------------------------


@dataclass
class ModelCard:
    """A validated ``card.json`` (``raw``) and the folder holding it and its weights."""

    raw: dict[str, Any]
    folder: Path

    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    @property
    def path(self) -> Path:
        return self.folder / "card.json"

    @property
    def id(self) -> str:
        return self.raw["id"]

    @property
    def version(self) -> str:
        return self.raw["version"]

    @property
    def name(self) -> str:
        return self.raw["name"]

    @property
    def description(self) -> str:
        return self.raw["description"]

    @property
    def family(self) -> str:
        return self.raw["family"]

    @property
    def required(self) -> list[str]:
        return list(self.raw["inputs"]["required"])

    @property
    def optional(self) -> list[str]:
        return list(self.raw["inputs"].get("optional", []))

    @property
    def input_keys(self) -> list[str]:
        return self.required + self.optional

    @property
    def reference_input(self) -> str:
        """Outputs come back on this input's grid."""
        return self.required[0]

    @property
    def derivable(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.raw.get("derivable", {}).items()}

    @property
    def target_spacing(self) -> tuple[float, float, float]:
        x, y, z = self.raw["target_spacing"]
        return (float(x), float(y), float(z))

    @property
    def patch_size(self) -> tuple[int, int, int]:
        x, y, z = self.raw["patch_size"]
        return (int(x), int(y), int(z))

    @property
    def normalisation(self) -> dict[str, dict[str, Any]]:
        return self.raw["normalisation"]

    @property
    def network(self) -> dict[str, Any]:
        return self.raw["network"]

    @property
    def output(self) -> dict[str, Any]:
        return self.raw["output"]

    @property
    def inference(self) -> dict[str, Any]:
        return self.raw["inference"]

    @property
    def postprocess(self) -> dict[str, Any]:
        return self.raw["postprocess"]

    @property
    def threshold(self) -> float:
        return float(self.raw["postprocess"]["threshold"])

    @property
    def closing_mm(self) -> float:
        return float(self.raw["postprocess"]["closing_mm"])

    @property
    def min_lesion_ml(self) -> float:
        return float(self.raw["postprocess"]["min_lesion_ml"])

    @property
    def weights(self) -> list[dict[str, str]]:
        return self.raw["weights"]

    @property
    def n_folds(self) -> int:
        return len(self.raw["weights"])

    @property
    def training(self) -> dict[str, Any]:
        return self.raw["training"]

    @property
    def validation(self) -> dict[str, Any]:
        return self.raw["validation"]

    @property
    def licence(self) -> str:
        return self.raw["licence"]

    @property
    def citation(self) -> list[str]:
        return list(self.raw.get("citation", []))

    @property
    def created(self) -> str:
        return self.raw["created"]

    def missing(self, available: Iterable[str]) -> list[str]:
        """Required inputs neither present nor derivable from what is present."""
        have = set(available)
        derivable = self.derivable
        return [k for k in self.required if k not in have and not (k in derivable and set(derivable[k]) <= have)]

    def plan(self, available: Iterable[str]) -> dict[str, list[str] | None]:
        """The inputs this model will use: key -> None (present) or the keys it is derived from."""
        have = set(available)
        lacking = self.missing(have)
        if lacking:
            raise ModelError(f"model '{self.id}' needs {self.requirement_text()}; missing {', '.join(lacking)}")
        derivable = self.derivable
        out: dict[str, list[str] | None] = {}
        for key in self.input_keys:
            if key in have:
                out[key] = None
            elif key in derivable and set(derivable[key]) <= have:
                out[key] = derivable[key]
        return out

    def requirement_text(self) -> str:
        """'dwi + adc (adc from b0 + dwi)' for messages."""
        derived = [f"{k} from {' + '.join(v)}" for k, v in self.derivable.items() if k in self.required]
        text = " + ".join(self.required)
        return f"{text} ({'; '.join(derived)})" if derived else text

    def describe(self) -> str:
        """One paragraph for ``strokeseg models`` and the Slicer model selector."""
        derived = [f"{k} can be computed from {' + '.join(v)}" for k, v in self.derivable.items()]
        inputs = f"Inputs: {', '.join(self.required)} (required"
        inputs += f"; {'; '.join(derived)})" if derived else ")"
        if self.optional:
            inputs += f", {', '.join(self.optional)} (optional)"
        sx, sy, sz = self.target_spacing
        folds = f"{self.n_folds}-fold ensemble" if self.n_folds > 1 else "single network"
        val = self.validation
        metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in val["metrics"].items())
        pp = self.postprocess
        parts = [
            f"{self.name} ({self.id} {self.version}, {FAMILIES.get(self.family, self.family)}): {self.description.rstrip('.')}.",
            f"{inputs}.",
            f"Network {self.network['name']}, {folds}, at {_fmt(sx)} x {_fmt(sy)} x {_fmt(sz)} mm.",
            f"Validated on {val['n_cases']} cases of {val['dataset']}" + (f": {metrics}." if metrics else "."),
            f"Defaults: threshold {_fmt(pp['threshold'])}, closing {_fmt(pp['closing_mm'])} mm,"
            f" minimum lesion {_fmt(pp['min_lesion_ml'])} mL.",
            f"Trained on {self.training['data']}. Licence: {self.licence}.",
        ]
        return " ".join(parts)


def _fmt(v: float) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


# -- reading and validating JSON ------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: cannot be read ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None


@lru_cache(maxsize=None)
def _validator(schema_name: str) -> jsonschema.protocols.Validator:
    schema = _read_json(SCHEMA_DIR / schema_name)
    cls = jsonschema.Draft202012Validator
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def _validate(instance: Any, schema_name: str, path: Path) -> None:
    error = jsonschema.exceptions.best_match(_validator(schema_name).iter_errors(instance))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "top level"
        message = " ".join(error.message.split())
        raise ModelError(f"{path}: {where}: {message[:200]}")


def _check_card(raw: dict[str, Any], path: Path) -> None:
    """Consistency rules a JSON schema cannot express."""
    inputs = raw["inputs"]
    required, optional = inputs["required"], inputs.get("optional", [])
    both = set(required) & set(optional)
    if both:
        raise ModelError(f"{path}: inputs: {', '.join(sorted(both))} both required and optional")
    keys = set(required) | set(optional)
    for key, sources in raw.get("derivable", {}).items():
        if key not in keys:
            raise ModelError(f"{path}: derivable: '{key}' is not an input of this model")
        if key in sources:
            raise ModelError(f"{path}: derivable: '{key}' cannot be derived from itself")
    norm = set(raw["normalisation"])
    if norm != keys:
        problem = [f"missing for {', '.join(sorted(keys - norm))}"] if keys - norm else []
        problem += [f"given for non-input {', '.join(sorted(norm - keys))}"] if norm - keys else []
        raise ModelError(f"{path}: normalisation: {'; '.join(problem)}")
    out = raw["output"]
    if out["foreground_channel"] >= out["channels"]:
        raise ModelError(f"{path}: output: foreground_channel {out['foreground_channel']} >= channels {out['channels']}")
    if out["activation"] == "softmax" and out["channels"] < 2:
        raise ModelError(f"{path}: output: softmax needs at least 2 channels")
    files = [w["file"] for w in raw["weights"]]
    if len(set(files)) != len(files):
        raise ModelError(f"{path}: weights: a file is listed twice")


def load_card(folder: str | Path) -> ModelCard:
    """Read and validate ``<folder>/card.json`` (also for models outside the registry)."""
    folder = Path(folder)
    path = folder / "card.json"
    raw = _read_json(path)
    _validate(raw, "model_card.schema.json", path)
    _check_card(raw, path)
    return ModelCard(raw=raw, folder=folder)


def load_registry(models_dir: str | Path | None = None) -> list[ModelCard]:
    """All models listed in ``models.json``, every card validated, in the registry's order."""
    root = resolve_models_dir(models_dir)
    index = root / "models.json"
    registry = _read_json(index)
    _validate(registry, "models.schema.json", index)
    seen: set[str] = set()
    for entry in registry["models"]:
        if entry["id"] in seen:
            raise ModelError(f"{index}: duplicate model id '{entry['id']}'")
        seen.add(entry["id"])
    cards = []
    for entry in registry["models"]:
        folder = root / entry["folder"]
        if not folder.is_dir():
            raise ModelError(f"{index}: model '{entry['id']}': folder '{entry['folder']}' not found")
        card = load_card(folder)
        for field in ("id", "family"):
            if card.raw[field] != entry[field]:
                raise ModelError(f"{card.path}: {field} '{card.raw[field]}' differs from '{entry[field]}' in {index}")
        cards.append(card)
    return cards


def get_card(model_id: str, models_dir: str | Path | None = None) -> ModelCard:
    cards = load_registry(models_dir)
    for card in cards:
        if card.id == model_id:
            return card
    raise ModelError(f"unknown model '{model_id}' (available: {', '.join(c.id for c in cards) or 'none'})")


def choose_model(
    available_keys: Iterable[str], models_dir: str | Path | None = None, family: str | None = None
) -> ModelCard:
    """The bundled model that fits the inputs present best.

    A model fits when each required input is present or derivable from present ones. Among
    those, the one using the most inputs wins, then the one deriving fewer, then registry order.
    """
    have = set(available_keys)
    cards = load_registry(models_dir)
    if family is not None:
        cards = [c for c in cards if c.family == family]
    if not cards:
        where = resolve_models_dir(models_dir) / "models.json"
        raise ModelError(f"{where}: no {'' if family is None else repr(family) + ' '}model installed")
    best: ModelCard | None = None
    best_score: tuple[int, int, int] | None = None
    for order, card in enumerate(cards):
        if card.missing(have):
            continue
        plan = card.plan(have)
        score = (len(plan), -sum(v is not None for v in plan.values()), -order)
        if best_score is None or score > best_score:
            best, best_score = card, score
    if best is None:
        needs = "; ".join(f"{c.id} needs {c.requirement_text()}" for c in cards)
        raise ModelError(f"no bundled model fits the inputs present ({', '.join(sorted(have)) or 'none'}): {needs}")
    return best


# -- weights -------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _weights_path(card: ModelCard, index: int) -> tuple[Path, str]:
    if not 0 <= index < card.n_folds:
        raise ModelError(f"{card.path}: no weights entry {index} (the card lists {card.n_folds})")
    entry = card.weights[index]
    return card.folder / entry["file"], entry["sha256"].lower()


def _check_safetensors(data: bytes, path: Path) -> None:
    """Refuse anything but a well-formed safetensors file, without parsing more than its JSON header."""
    if data[:1] == b"\x80" or data[:4] == b"PK\x03\x04":  # pickle protocol >= 2 / torch.save zip
        raise ModelError(f"{path}: not a safetensors file (refusing to unpickle)")

    def bad(problem: str) -> ModelError:
        return ModelError(f"{path}: not a safetensors file ({problem})")

    if len(data) < 10:
        raise bad("too short")
    n = int.from_bytes(data[:8], "little")
    if n < 2 or n > min(_MAX_HEADER_BYTES, len(data) - 8) or data[8:9] != b"{":
        raise bad("no header")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("header is not an object")
    body = len(data) - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise bad("malformed metadata")
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            size = math.prod(shape) * _ST_ITEMSIZE[dtype]
            ints = all(type(v) is int and v >= 0 for v in (*shape, begin, end))
        except (TypeError, KeyError, ValueError):
            raise bad(f"malformed entry for tensor '{name}'") from None
        if not ints or not begin <= end <= body or end - begin != size:
            raise bad(f"tensor '{name}': shape and data offsets disagree")
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise bad("tensor data overlaps or leaves gaps")
        position = end
    if position != body:
        raise bad("data beyond the last tensor")


def load_weights(card: ModelCard, index: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of fold ``index``, after SHA-256 and format checks (never unpickles)."""
    path, expected = _weights_path(card, index)
    try:
        if path.stat().st_size > MAX_WEIGHTS_BYTES:
            raise ModelError(f"{path}: implausibly large weights file ({path.stat().st_size} bytes)")
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{path}: weights file not found") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot be read ({exc.strerror})") from None
    if hashlib.sha256(data).hexdigest() != expected:
        raise ModelError(f"{path}: SHA-256 mismatch (tampered or corrupt weights)")
    _check_safetensors(data, path)
    try:
        return safetensors.torch.load(data)
    except Exception as exc:  # safetensors raises its own error types; any failure is a bad file
        raise ModelError(f"{path}: not a valid safetensors file ({str(exc).strip()[:120]})") from None


def _normalises_per_window(net: torch.nn.Module) -> bool:
    """True when a layer normalises by the statistics of the input it is given (instance or
    group norm without running statistics), so its output depends on the sliding window's size."""
    for m in net.modules():
        if isinstance(m, torch.nn.GroupNorm):
            return True
        if isinstance(m, torch.nn.modules.instancenorm._InstanceNorm) and not m.track_running_stats:
            return True
    return False


def check_inference_window(card: ModelCard, net: torch.nn.Module) -> None:
    """Refuse a sliding window other than the training patch for per-window-normalised networks.

    Instance / group norm statistics over a larger window (more background, a smaller lesion
    fraction) are not the ones the network was trained with: the bundled DWI U-Net lost a 47 mL
    lesion entirely with a 144x144x40 window on 80x80x24 patches (median Dice 0.46 -> 0.86 with
    the patch-sized window on ten held-out phantoms). Networks run slice by slice
    (``per_slice``) only see the in-plane size.
    """
    roi = card.raw.get("inference", {}).get("roi_size")
    if not roi or not _normalises_per_window(net):
        return
    axes = 2 if getattr(net, "per_slice", False) else 3
    if list(roi[:axes]) != list(card.patch_size[:axes]):
        raise ModelError(f"{card.path}: inference.roi_size {list(roi)} differs from patch_size {list(card.patch_size)}, "
                         "but the network normalises each window by its own statistics (instance/group norm): "
                         "use the training patch size as the window")


def build_network(card_or_spec: ModelCard | Mapping[str, Any]) -> torch.nn.Module:
    """Instantiate the network a card (or a ``{"name", "args"}`` spec, or a raw card dict) names.

    For a card, the inference window is checked against the network (``check_inference_window``)."""
    if isinstance(card_or_spec, ModelCard):
        try:
            net = networks.build(card_or_spec.network["name"], card_or_spec.network["args"])
        except ModelError as exc:
            raise ModelError(f"{card_or_spec.path}: {exc}") from None
        check_inference_window(card_or_spec, net)
        return net
    spec = card_or_spec.get("network", card_or_spec) if isinstance(card_or_spec, Mapping) else None
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ModelError("network specification needs a 'name' (and 'args')")
    return networks.build(spec["name"], spec.get("args", {}))


def check_state(net: torch.nn.Module, state: Mapping[str, torch.Tensor], path: Path, name: str) -> None:
    """One-line ModelError naming the weights file when ``state`` does not fit ``net``: missing,
    unexpected and mis-shaped tensors, the first few of each."""
    expected = net.state_dict()

    def few(items: list[str]) -> str:
        return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")

    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = [f"missing {few(missing)}"] if missing else []
    problems += [f"unexpected {few(unexpected)}"] if unexpected else []
    problems += [f"shape {few(shapes)}"] if shapes else []
    if problems:
        raise ModelError(f"{path}: weights do not fit network {name} ({'; '.join(problems)})")


def load_model(card: ModelCard, device: str | torch.device = "cpu") -> list[torch.nn.Module]:
    """One network per weights entry (fold), weights loaded strictly, in eval mode on ``device``."""
    nets = []
    for index in range(card.n_folds):
        net = build_network(card)
        state = load_weights(card, index)
        path, _ = _weights_path(card, index)
        check_state(net, state, path, card.network["name"])
        net.load_state_dict(state, strict=True)
        net.requires_grad_(False)
        nets.append(net.to(device).eval())
    return nets


def save_weights(module: torch.nn.Module | Mapping[str, torch.Tensor], path: str | Path) -> str:
    """Write a module's state dict as safetensors, atomically; returns the file's SHA-256."""
    path = Path(path)
    if isinstance(module, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        module = module.module
    module = getattr(module, "_orig_mod", module)  # torch.compile wrapper
    state = module.state_dict() if isinstance(module, torch.nn.Module) else dict(module)
    # Contiguous CPU copies: safetensors refuses views and tensors sharing storage.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    data = safetensors.torch.save(tensors, metadata={"format": "pt"})
    write_bytes(data, path)  # atomic; OutputError when the folder cannot be written
    return hashlib.sha256(data).hexdigest()
