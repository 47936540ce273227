"""Datasets for training: phantoms (generated here) and real layouts (adapters).

Training cases are stored preprocessed on the model grid (``<cache>/<case>.npz`` with the
normalised input channels and the lesion label), made by the engine's own ``prepare`` so
that training sees exactly what inference sees. Validation and test cases are also kept
as case folders, because they are evaluated end to end on the acquired grid.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from strokeseg.image import Image, resample_to
from strokeseg.preprocess import prepare

from .config import DEFAULT_RUNS, REPO_ROOT, card_of, data_key

SPLIT_SEED_OFFSET = {"train": 0, "val": 500_000, "test": 900_000}


@dataclass
class Volume:
    name: str
    image: np.ndarray  # (C, z, y, x) float16, normalised
    label: np.ndarray  # (z, y, x) uint8


def label_on_grid(lesion: Image, grid: Image) -> np.ndarray:
    """Truth on the model grid: partial-volume resampling then >= 0.5."""
    frac = resample_to(lesion.with_array(lesion.array.astype(np.float32)), grid, linear=True)
    return (frac.array >= 0.5).astype(np.uint8)


def _library(cfg: dict[str, Any]) -> str | None:
    lib = cfg["data"].get("lesion_library")
    if not lib:
        return None
    p = Path(lib) if Path(lib).is_absolute() else (REPO_ROOT / lib).resolve()
    return str(p) if p.is_dir() else None


STRUCTURAL_PHANTOMS = ("t1", "siss")  # data.modality values made by strokeseg.phantom.simulate_structural
PERFUSION_PHANTOMS = ("ctp", "pwi")  # data.modality values made by strokeseg.phantom.perfusion.simulate_perfusion
REFUSED_SUFFIX = ".refused.txt"  # a phantom series the perfusion pipeline refuses: skipped, with the reason


def _cache_key(cfg: dict[str, Any], split: str) -> str:
    """``data_key``, plus the generator's version for structural and perfusion phantoms (DWI keys unchanged)."""
    modality = cfg["data"].get("modality")
    if modality in STRUCTURAL_PHANTOMS:
        from strokeseg.phantom import STRUCTURAL_VERSION as version

        tag = "_structural_generator"
    elif modality in PERFUSION_PHANTOMS:
        from strokeseg.phantom.perfusion import GENERATOR_VERSION as version

        tag = "_perfusion_generator"
    else:
        return data_key(cfg, split)
    return data_key({**cfg, "data": {**cfg["data"], tag: version}}, split)


def mark_refused(case: Any, folder: Path) -> str | None:
    """If the engine refused a perfusion phantom's series (e.g. motion beyond correction), as it
    would a user's: no maps, so no training case. Writes a marker with the reason into ``folder``
    (it keeps the seed from being simulated again) and returns the reason; None otherwise."""
    error = case.info.get("computed", {}).get("error")
    if error is None:
        return None
    reason = f"{case.case_id}: no perfusion maps ({error})"
    (folder / f"{case.case_id}{REFUSED_SUFFIX}").write_text(reason + "\n", encoding="utf-8")
    return reason


def report_refused(folder: Path, label: str, total: int | None = None) -> None:
    """Print how many phantoms in ``folder`` the engine refused (markers of ``mark_refused``)."""
    refused = sorted(folder.glob(f"*{REFUSED_SUFFIX}"))
    if refused:
        of = f" of {total}" if total is not None else ""
        print(f"{label}: {len(refused)}{of} phantoms left out, refused by the engine as a user's scan would be "
              f"(first: {refused[0].read_text(encoding='utf-8').strip()})")


def _simulate(cfg: dict[str, Any], split: str, seed: int, marker_dir: Path) -> tuple[Any, Any] | str:
    """One phantom of ``cfg``'s modality and the function that writes its case folder; or, for a
    perfusion series the engine refuses, the reason (marked in ``marker_dir``)."""
    modality = cfg["data"]["modality"]
    if modality in PERFUSION_PHANTOMS:  # the maps our deconvolution computes are the inputs; the label is the core
        from strokeseg.phantom.perfusion import simulate_perfusion, write_perfusion_case

        case = simulate_perfusion(seed, modality, _library(cfg), split, **cfg["data"].get("phantom_options", {}))
        reason = mark_refused(case, marker_dir)
        return reason if reason else (case, write_perfusion_case)
    from strokeseg.phantom import write_case

    if modality in STRUCTURAL_PHANTOMS:  # chronic T1 (ATLAS-like) / sub-acute T1-T2-FLAIR-DWI (SISS-like)
        from strokeseg.phantom import simulate_structural

        return simulate_structural(modality, seed, _library(cfg), split, **cfg["data"].get("phantom_options", {})), write_case
    from strokeseg.phantom import simulate_dwi

    return simulate_dwi(seed, lesion_library=_library(cfg), split=split, **cfg["data"].get("phantom_options", {})), write_case


def _make_one(args: tuple[dict[str, Any], str, int, str, str]) -> str:
    cfg, split, seed, cache_dir, case_root = args
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    made = _simulate(cfg, split, seed, Path(cache_dir))
    if isinstance(made, str):
        return made
    case, write = made
    card = card_of(cfg)
    npz = Path(cache_dir) / f"{case.case_id}.npz"
    if split != "train":
        write(case, case_root)
    inputs = {k: v for k, v in case.images.items() if k in card.required or k in card.optional}
    prepared = prepare(inputs, card)
    label = label_on_grid(case.lesion, prepared.model_grid)
    tmp = npz.with_suffix(".tmp.npz")
    np.savez(tmp, image=prepared.array.astype(np.float16), label=label)
    os.replace(tmp, npz)
    return str(npz)


def _first_seed(cfg: dict[str, Any], split: str) -> int:
    return int(cfg["data"].get("seed", 0)) + SPLIT_SEED_OFFSET[split]


def _split_root(cfg: dict[str, Any], split: str) -> Path:
    data = cfg["data"]
    return Path(data.get("cache_dir") or DEFAULT_RUNS / "cache") / f"{data['modality']}-{split}-{_cache_key(cfg, split)}"


def build_split(cfg: dict[str, Any], split: str, *, workers: int = 2) -> tuple[list[Path], Path]:
    """Generate (or reuse) a split; returns the npz files and the case-folder root.

    A config with ``data.root`` names a real dataset folder instead: its adapter's cases are
    cached the same way (``realdata.build_real_split``)."""
    if cfg["data"].get("root"):
        from .realdata import build_real_split

        return build_real_split(cfg, split, workers=workers)
    data = cfg["data"]
    n = int(data[f"n_{split}"])
    seed0 = _first_seed(cfg, split)
    root = _split_root(cfg, split)
    cache_dir, case_root = root / "npz", root / "cases"
    cache_dir.mkdir(parents=True, exist_ok=True)
    case_root.mkdir(parents=True, exist_ok=True)
    todo = []
    for i in range(n):
        seed = seed0 + i
        if not any(cache_dir.glob(f"*-{seed:05d}.npz")) and not any(cache_dir.glob(f"*-{seed:05d}{REFUSED_SUFFIX}")):
            todo.append((cfg, split, seed, str(cache_dir), str(case_root)))
    if todo:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                list(tqdm(pool.map(_make_one, todo), total=len(todo), desc=f"phantoms ({split})", unit="case"))
        else:
            for t in tqdm(todo, desc=f"phantoms ({split})", unit="case"):
                _make_one(t)
    report_refused(cache_dir, split, n)
    files = sorted(cache_dir.glob("*.npz"))[:n]
    return files, case_root


def _make_folder(args: tuple[dict[str, Any], int, str]) -> str:
    cfg, seed, case_root = args
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    made = _simulate(cfg, "train", seed, Path(case_root))
    if isinstance(made, str):
        return made
    case, write = made
    return str(write(case, case_root))


def training_case_folders(cfg: dict[str, Any], count: int, *, workers: int = 2) -> list[Path]:
    """Case folders of the first ``count`` training cases, so that a model can be scored end to
    end on cases it learnt from (``strokeseg-train fit``). A phantom training split caches arrays
    only, so these few are simulated again from their seeds (the same cases) into the split's
    ``cases/``; a real dataset's training split has its folders already."""
    if cfg["data"].get("root"):
        _, root = build_split(cfg, "train", workers=workers)
        return sorted(p for p in root.iterdir() if p.is_dir())[:count]
    seed0 = _first_seed(cfg, "train")
    seeds = range(seed0, seed0 + min(count, int(cfg["data"]["n_train"])))
    case_root = _split_root(cfg, "train") / "cases"
    case_root.mkdir(parents=True, exist_ok=True)
    todo = [(cfg, seed, str(case_root)) for seed in seeds
            if not any(case_root.glob(f"*-{seed:05d}/case.json")) and not any(case_root.glob(f"*-{seed:05d}{REFUSED_SUFFIX}"))]
    if todo:
        with ProcessPoolExecutor(max(1, min(workers, len(todo)))) as pool:
            list(tqdm(pool.map(_make_folder, todo), total=len(todo), desc="phantoms (train, as case folders)", unit="case"))
    folders = [next(iter(case_root.glob(f"*-{seed:05d}")), None) for seed in seeds]
    return [f for f in folders if f is not None and (f / "case.json").is_file()]


def load_volumes(files: list[Path]) -> list[Volume]:
    vols = []
    for f in files:
        with np.load(f) as z:  # plain arrays only: np.load refuses pickled objects by default
            vols.append(Volume(f.stem, z["image"], z["label"]))
    return vols
