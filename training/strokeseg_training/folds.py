"""k-fold cross-validation: deterministic patient-level folds stratified by lesion volume, a
per-fold runner that collects (and resumes) results, and fold-ensemble weights for a model card.

The engine averages the networks of all ``weights`` entries of a card at inference
(``strokeseg.inference.predict`` over ``load_model``'s list), so a fold ensemble is simply the
fold weights listed in one card.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

import numpy as np

from strokeseg.errors import ModelError
from strokeseg.io import write_text
from strokeseg.metrics import json_safe

T = TypeVar("T")


@dataclass(frozen=True)
class Fold:
    index: int
    k: int
    train: tuple[str, ...]
    val: tuple[str, ...]


def volume_strata(volumes: Mapping[str, float], n_bins: int = 3) -> dict[str, int]:
    """Stratum (0 = smallest) of each item by lesion-volume rank: tertiles by default.

    Ranks rather than quantile edges, so ties (many lesion-free cases at 0 mL) still give
    strata of equal size; ties are ordered by id, which keeps the result deterministic."""
    order = sorted(volumes, key=lambda k: (float(volumes[k]), k))
    return {k: i * n_bins // len(order) for i, k in enumerate(order)}


def _groups(case_ids: Sequence[str], groups: Mapping[str, str] | None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for cid in sorted(set(case_ids)):
        out.setdefault(str(groups.get(cid, cid)) if groups else cid, []).append(cid)
    return out


def kfold_splits(case_ids: Sequence[str], k: int = 5, *, seed: int = 0, groups: Mapping[str, str] | None = None,
                 volumes: Mapping[str, float] | None = None) -> list[Fold]:
    """``k`` folds over ``case_ids``: every case is validated exactly once.

    * patient-level: cases sharing a ``groups`` value (patient id) always fall in one fold;
    * stratified: with ``volumes`` (lesion volume per case, mL) patients are split by the
      tertiles of their mean lesion volume and each tertile is dealt across the folds, so
      every fold sees small, medium and large lesions (cases without a volume form a stratum
      of their own);
    * balanced: each patient goes to the fold with the fewest cases in its stratum, then
      overall, so fold sizes differ by at most a patient's case count per stratum;
    * deterministic: the same ids, groups, volumes and seed give the same folds, whatever the
      input order.
    """
    by_group = _groups(case_ids, groups)
    if k < 2:
        raise ValueError(f"cross-validation needs k >= 2 folds, got {k}")
    if len(by_group) < k:
        raise ValueError(f"{len(by_group)} patients cannot fill {k} folds")
    strata: dict[str, int] = {g: -1 for g in by_group}
    if volumes:
        known = {g: float(np.mean([volumes[c] for c in cs])) for g, cs in by_group.items() if all(c in volumes for c in cs)}
        strata.update(volume_strata(known))
    rng = np.random.default_rng(seed)
    fold_cases = [0] * k
    members: list[list[str]] = [[] for _ in range(k)]
    for stratum in sorted(set(strata.values())):
        names = sorted(g for g, s in strata.items() if s == stratum)
        in_stratum = [0] * k
        for g in (names[i] for i in rng.permutation(len(names))):
            f = min(range(k), key=lambda i: (in_stratum[i], fold_cases[i], i))
            in_stratum[f] += len(by_group[g])
            fold_cases[f] += len(by_group[g])
            members[f] += by_group[g]
    everything = sorted(c for cs in by_group.values() for c in cs)
    folds = []
    for i, val in enumerate(members):
        val_set = set(val)
        folds.append(Fold(i, k, tuple(c for c in everything if c not in val_set), tuple(sorted(val))))
    return folds


def holdout_split(case_ids: Sequence[str], fraction: float, *, seed: int = 0, groups: Mapping[str, str] | None = None,
                  volumes: Mapping[str, float] | None = None) -> tuple[list[str], list[str]]:
    """(rest, held out): about ``fraction`` of the patients (1/round(1/fraction)), stratified and
    patient-level like :func:`kfold_splits` (it is that function's first fold, on its own seed)."""
    if not 0 < fraction < 1:
        raise ValueError(f"hold-out fraction must lie in (0, 1), got {fraction}")
    fold = kfold_splits(case_ids, max(2, round(1 / fraction)), seed=seed + 104729, groups=groups, volumes=volumes)[0]
    return list(fold.train), list(fold.val)


def fold_config(cfg: dict[str, Any], fold: int) -> dict[str, Any]:
    """A copy of a run config for one fold: ``data.fold`` set, name and run folder suffixed."""
    k = int(cfg["data"].get("folds", 5))
    if not 0 <= fold < k:
        raise ValueError(f"fold {fold} outside 0..{k - 1}")
    out = copy.deepcopy(cfg)
    out["data"]["fold"] = fold
    out["name"] = f"{cfg['name']}-fold{fold}"
    if cfg.get("run_dir"):
        out["run_dir"] = str(Path(cfg["run_dir"]) / f"fold{fold}")
    return out


def fold_weight_files(cfg: dict[str, Any], name: str = "best.safetensors") -> list[Path]:
    """The weights every fold run of ``cfg`` writes (``fold_config``'s run folders), in fold order."""
    from .config import DEFAULT_RUNS

    out = []
    for k in range(int(cfg["data"].get("folds", 5))):
        fc = fold_config(cfg, k)
        out.append(Path(fc.get("run_dir") or DEFAULT_RUNS / fc["name"]) / name)
    return out


def run_folds(folds: Iterable[Fold], fn: Callable[[Fold], T], *, results_json: str | Path | None = None,
              only: Iterable[int] | None = None) -> dict[int, T]:
    """Run ``fn`` on each fold and collect the results by fold index.

    With ``results_json`` every result is saved as soon as its fold finishes (results must be
    JSON-serialisable) and folds already there are not run again, so an interrupted
    cross-validation resumes where it stopped.
    """
    wanted = set(only) if only is not None else None
    path = Path(results_json) if results_json else None
    done: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path and path.is_file() else {}
    results: dict[int, T] = {int(i): r for i, r in done.items()}
    for fold in folds:
        if (wanted is not None and fold.index not in wanted) or fold.index in results:
            continue
        results[fold.index] = fn(fold)
        if path:
            done[str(fold.index)] = json_safe(results[fold.index])
            write_text(json.dumps(done, indent=2, sort_keys=True) + "\n", path)
    return dict(sorted(results.items()))


def summarise_folds(results: Mapping[int, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, standard deviation, min and max over folds of every numeric entry of the results."""
    keys = sorted({k for r in results.values() for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    out = {}
    for key in keys:
        v = np.asarray([float(r[key]) for r in results.values() if isinstance(r.get(key), (int, float))])
        out[key] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                    "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}
    return out


def fold_ensemble_weights(weights: Sequence[str | Path], folder: str | Path, *, card: Any = None,
                          prefix: str = "fold") -> list[dict[str, str]]:
    """Write N fold weights into ``folder`` as ``<prefix><i>.safetensors`` and return the card's
    ``weights`` list ([{"file", "sha256"}, ...]).

    Every file is read as safetensors (never unpickled), must hold the same tensors (names,
    shapes, dtypes) as the first, and, given ``card`` (a ModelCard or raw card dict), must load
    strictly into the card's network, so the engine can average the folds at inference.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from strokeseg.models import build_network, save_weights, sha256_file

    if not weights:
        raise ValueError("a fold ensemble needs at least one weights file")
    folder = Path(folder)
    net = build_network(card if not isinstance(card, Mapping) else dict(card)) if card is not None else None
    layout: dict[str, tuple] | None = None
    entries = []
    for i, src in enumerate(weights):
        src = Path(src)
        try:
            state = load_file(str(src))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(f"{src}: not a readable safetensors file ({str(exc).strip()[:100]})") from None
        this = {k: (tuple(v.shape), str(v.dtype)) for k, v in state.items()}
        if layout is None:
            layout = this
        elif this != layout:
            diff = sorted(set(this.items()) ^ set(layout.items()))[:3]
            raise ModelError(f"{src}: fold {i} does not match fold 0's tensors ({diff})")
        if net is not None:
            try:
                net.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise ModelError(f"{src}: does not fit the card's network ({str(exc).splitlines()[0][:160]})") from None
        dst = folder / f"{prefix}{i}.safetensors"
        digest = save_weights(state, dst)
        if sha256_file(dst) != digest:  # the file on disk must be exactly what was written
            raise ModelError(f"{dst}: SHA-256 changed after writing")
        entries.append({"file": dst.name, "sha256": digest})
    return entries
