"""Real datasets in the training cache format, so they train through the same loop as phantoms.

A config selects a dataset by its folder (and optionally its layout) instead of phantom counts::

    "data": {"source": "isles22", "root": "/data/ISLES-2022", "folds": 5, "fold": 0, "seed": 0,
             "label": "lesion", "test_fraction": 0.2, "options": {}, "exclude": [], "workers": 2}

* ``source``: an adapter name (``isles22``, ``atlas2``, ``isles18``, ``isles15``, ``isles17``,
  ``generic``, ``phantom``) or ``auto`` (layout sniffing); ``options`` go to the adapter
  (e.g. ``{"task": "spes"}`` for ISLES'15, ``{"channels": ["dwi", "adc"]}`` for nnU-Net folders,
  ``{"patients": {case: patient}}``).
* ``label``: which truth to train on (``lesion``, ``core``, ``penumbra``).
* splits: patient-level folds stratified by lesion-volume tertiles (``folds.kfold_splits``);
  ``train`` = the other folds, ``val`` = fold ``fold``; ``test`` = ``test_root`` (a separate
  labelled dataset) if given, else a stratified hold-out of ``test_fraction`` of the patients
  taken out before the folds, else the validation fold itself (out-of-fold evaluation, as the
  papers' cross-validations report). ``folds`` < 2: no CV, ``val_fraction`` (0.2) is held out.

Each case is read and checked by the engine's ``load_inputs`` and brought to the model grid by
its ``prepare`` (exactly what inference does); the label goes through ``data.label_on_grid``.
The cache holds ``npz/<case>.npz`` (``image`` (C, z, y, x) float16, ``label`` (z, y, x) uint8,
plus ``label_core``/``label_penumbra`` where the dataset has them) and ``cases/<case>/``, a
case folder of the DESIGN.md layout (inputs linked, not copied; ``lesion.nii.gz`` = the
training label on the reference input's grid) for whole-case validation and testing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from strokeseg.errors import InputError
from strokeseg.image import Image
from strokeseg.io import image_suffix, read_image, write_image, write_text
from strokeseg.metrics import json_safe
from strokeseg.modality import load_inputs
from strokeseg.preprocess import check_overlap, prepare

from .adapters import Case, discover, get_adapter
from .config import DEFAULT_RUNS, REPO_ROOT, card_of, data_key, phantoms_stamp
from .data import label_on_grid
from .folds import holdout_split, kfold_splits

REALDATA_VERSION = "real-2"  # real-2: ADC and time maps in the engine's units (in_standard_units)
SPLITS = ("train", "val", "test")


def is_real(cfg: dict[str, Any]) -> bool:
    """A config trains on a dataset folder (``data.root``) rather than generated phantoms."""
    return bool(cfg["data"].get("root"))


def _path(p: str | Path) -> Path:
    p = Path(p).expanduser()
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


def _label_name(cfg: dict[str, Any]) -> str:
    return str(cfg["data"].get("label", "lesion"))


def _list(cfg: dict[str, Any], root: Path, source: str | None) -> tuple[str, list[Case]]:
    source = source if source and source != "auto" else discover(root)
    return source, get_adapter(source).cases(root, **cfg["data"].get("options", {}))


def usable(cfg: dict[str, Any], cases: list[Case]) -> tuple[list[Case], dict[str, str]]:
    """Cases a recipe can train on, and why the others cannot (case id -> reason).

    A case needs the training label and every input of the card: required ones (or their
    sources when derivable) and optional ones too, because a network has a fixed channel count.
    """
    card = card_of(cfg)
    label = _label_name(cfg)
    excluded = set(cfg["data"].get("exclude", []))
    keep, skipped = [], {}
    for c in cases:
        missing = card.missing(c.inputs) + [k for k in card.optional if k not in c.inputs]
        if c.case_id in excluded:
            skipped[c.case_id] = "excluded by the config"
        elif label not in c.labels:
            skipped[c.case_id] = f"no '{label}' label"
        elif missing:
            skipped[c.case_id] = f"lacks input {', '.join(missing)}"
        else:
            keep.append(c)
    limit = cfg["data"].get("max_cases")
    return (keep[: int(limit)] if limit else keep), skipped


def dataset_cases(cfg: dict[str, Any]) -> list[Case]:
    """The usable labelled cases of ``data.root`` (sorted by id)."""
    _, cases = _list(cfg, _path(cfg["data"]["root"]), cfg["data"].get("source"))
    return usable(cfg, cases)[0]


def read_label(case: Case, name: str = "lesion") -> Image:
    """A case's truth as a 0/1 uint8 image: ``meta["label_values"][name]`` selects mask values;
    otherwise integer masks are > 0 and float masks >= 0.5 (0/1 masks saved as float)."""
    path = case.label(name)
    img = read_image(path)
    if img.is_4d:
        raise InputError(path, "mask is 4D; expected a 3D label volume")
    values = (case.meta.get("label_values") or {}).get(name)
    a = img.array
    mask = np.isin(a, values) if values else (a >= 0.5 if np.issubdtype(a.dtype, np.floating) else a > 0)
    return img.with_array(mask.astype(np.uint8))


def _key(cfg: dict[str, Any], source: str, root: Path) -> str:
    """Changes whenever a case's cached arrays would change (not with folds or seeds)."""
    card = cfg["card"]
    blob = json.dumps({"v": REALDATA_VERSION, "source": source, "root": str(root), "options": cfg["data"].get("options", {}),
                       "label": _label_name(cfg), "inputs": card["inputs"], "derivable": card.get("derivable", {}),
                       "spacing": card["target_spacing"], "norm": card.get("normalisation"),
                       **({"derived": card["derived_channels"]} if card.get("derived_channels") else {}),
                       # folders of phantoms made for the config: remade (same case ids) when their maker changes
                       **({"phantoms": phantoms_stamp(cfg)} if cfg["data"].get("phantom") else {})},
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)


def case_volumes(cases: list[Case], label: str, cache_file: Path | None = None) -> dict[str, float]:
    """Lesion volume (mL) per case, for stratified folds: from the dataset's metadata when it
    states it (phantoms), else from the mask; cached by file size and time."""
    cached = json.loads(cache_file.read_text(encoding="utf-8")) if cache_file and cache_file.is_file() else {}
    out, changed = {}, False
    for c in cases:
        if label == "lesion" and isinstance(c.meta.get("lesion_volume_ml"), (int, float)):
            out[c.case_id] = float(c.meta["lesion_volume_ml"])
            continue
        path = c.label(label)
        st = path.stat()
        sig = f"{path}|{st.st_size}|{st.st_mtime_ns}|{json.dumps((c.meta.get('label_values') or {}).get(label))}"
        hit = cached.get(c.case_id)
        if hit and hit.get("sig") == sig:
            out[c.case_id] = float(hit["ml"])
            continue
        img = read_label(c, label)
        out[c.case_id] = float(img.array.sum()) * img.voxel_volume_ml
        cached[c.case_id] = {"sig": sig, "ml": out[c.case_id]}
        changed = True
    if cache_file and changed:
        write_text(json.dumps(cached, indent=1, sort_keys=True) + "\n", cache_file)
    return out


def split_cases(cfg: dict[str, Any], split: str, *, cache_dir: Path | None = None) -> list[Case]:
    """The cases of one split (see the module docstring for the rules)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    d = cfg["data"]
    seed = int(d.get("seed", 0))
    if split == "test" and d.get("test_root"):
        _, cases = _list(cfg, _path(d["test_root"]), d.get("test_source", d.get("source")))
        return usable(cfg, cases)[0]
    cases = dataset_cases(cfg)
    by_id = {c.case_id: c for c in cases}
    groups = {c.case_id: c.patient for c in cases}
    volumes = case_volumes(cases, _label_name(cfg), cache_dir / "volumes.json" if cache_dir else None)
    pool = sorted(by_id)
    frac = float(d.get("test_fraction", 0.0))
    if frac > 0 and not d.get("test_root"):
        pool, held = holdout_split(pool, frac, seed=seed, groups=groups, volumes=volumes)
        if split == "test":
            return [by_id[i] for i in held]
    k, index = int(d.get("folds", 5)), int(d.get("fold", 0))
    if k >= 2:
        if not 0 <= index < k:
            raise ValueError(f"data.fold {index} outside 0..{k - 1}")
        fold = kfold_splits(pool, k, seed=seed, groups=groups, volumes=volumes)[index]
        train, val = list(fold.train), list(fold.val)
    else:
        train, val = holdout_split(pool, float(d.get("val_fraction", 0.2)), seed=seed + 1, groups=groups, volumes=volumes)
    return [by_id[i] for i in (train if split == "train" else val)]


def _link(src: Path, dst: Path) -> None:
    """A symbolic link (a copy where the file system refuses links)."""
    if dst.exists() or dst.is_symlink():
        return
    try:
        os.symlink(src, dst, target_is_directory=src.is_dir())
    except OSError:
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)


def _on(reference: Image, label: Image) -> Image:
    ref = reference.frame(0) if reference.is_4d else reference
    if label.same_grid(ref):
        return Image(label.array, ref.spacing, ref.origin, ref.direction)
    return Image(label_on_grid(label, ref), ref.spacing, ref.origin, ref.direction)


def _prepare_case(args: tuple[dict[str, Any], Case, str, str]) -> tuple[str | None, tuple[str | None, str] | None]:
    """(npz, None) or (None, (file, problem)): an InputError does not survive pickling back
    from a worker process (its constructor takes two arguments), so it travels as data."""
    try:
        return _prepare_one(*args), None
    except InputError as exc:
        return None, (exc.path, exc.problem)


def _prepare_one(cfg: dict[str, Any], case: Case, npz_dir: str, cases_dir: str) -> str:
    """One case -> ``npz/<case>.npz`` + ``cases/<case>/`` (case.json written last = complete)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    card = card_of(cfg)
    wanted = set(card.required) | set(card.optional) | {s for srcs in card.derivable.values() for s in srcs}
    files = {k: p for k, p in case.inputs.items() if k in wanted}
    prepared = prepare(load_inputs(files), card)  # in the engine's units (ADC in mm²/s, maps in ms: converted)
    label_name = _label_name(cfg)
    truth = {label_name: read_label(case, label_name)}
    truth.update({n: read_label(case, n) for n in ("core", "penumbra") if n in case.labels and n != label_name})
    arrays: dict[str, np.ndarray] = {"image": prepared.array.astype(np.float16)}
    for name, img in truth.items():
        img.meta["source"] = str(case.label(name))  # named in the error if it lies elsewhere
        check_overlap(img, prepared.model_grid, f"{name} mask", card.reference_input)
        arrays["label" if name == label_name else f"label_{name}"] = label_on_grid(img, prepared.model_grid)
    npz = Path(npz_dir) / f"{_safe(case.case_id)}.npz"
    tmp = npz.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, npz)

    folder = Path(cases_dir) / _safe(case.case_id)
    folder.mkdir(parents=True, exist_ok=True)
    for key, src in files.items():
        _link(src.resolve(), folder / f"{key}{image_suffix(src)}")
    for name, img in truth.items():
        write_image(_on(prepared.reference, img), folder / f"{'lesion' if name == label_name else name}.nii.gz")
    info = {"case_id": case.case_id, "inputs": files, "labels": case.labels, "label": label_name, **case.meta}
    write_text(json.dumps(json_safe(info), indent=2) + "\n", folder / "case.json")
    return str(npz)


def build_real_split(cfg: dict[str, Any], split: str, *, workers: int = 2) -> tuple[list[Path], Path]:
    """Cache a real dataset's split; returns its npz files and a folder of its case folders.

    The same return as ``data.build_split``: the npz files feed ``load_volumes`` and the
    training loop, the folder holds one DESIGN.md case folder per case (links into the shared
    ``cases/``) for ``evaluate.case_probabilities``. Cases are prepared once and shared by
    every fold and split; calling again (other ranks, other folds) only reuses them.
    """
    d = cfg["data"]
    root = _path(d["root"])
    source, all_cases = _list(cfg, root, d.get("source"))
    base = Path(d.get("cache_dir") or DEFAULT_RUNS / "cache") / f"{source}-{_key(cfg, source, root)}"
    npz_dir, cases_dir = base / "npz", base / "cases"
    npz_dir.mkdir(parents=True, exist_ok=True)
    cases_dir.mkdir(parents=True, exist_ok=True)
    skipped = json.dumps(usable(cfg, all_cases)[1], indent=1, sort_keys=True) + "\n"
    note = base / "skipped.json"  # which cases this config cannot train on, and why
    if not note.is_file() or note.read_text(encoding="utf-8") != skipped:
        write_text(skipped, note)
    cases = split_cases(cfg, split, cache_dir=base)
    if split == "test" and d.get("test_root"):  # another dataset: its own cache
        test_root = _path(d["test_root"])
        test_source = d.get("test_source", d.get("source"))
        test_source = test_source if test_source and test_source != "auto" else discover(test_root)
        base = base.parent / f"{test_source}-{_key(cfg, test_source, test_root)}"
        npz_dir, cases_dir = base / "npz", base / "cases"
        npz_dir.mkdir(parents=True, exist_ok=True)
        cases_dir.mkdir(parents=True, exist_ok=True)
    todo = [(cfg, c, str(npz_dir), str(cases_dir)) for c in cases
            if not ((npz_dir / f"{_safe(c.case_id)}.npz").is_file() and (cases_dir / _safe(c.case_id) / "case.json").is_file())]
    if todo:
        desc = f"{source} cases ({split})"
        if workers > 1 and len(todo) > 1:
            with ProcessPoolExecutor(workers) as pool:
                results = list(tqdm(pool.map(_prepare_case, todo), total=len(todo), desc=desc, unit="case"))
        else:
            results = [_prepare_case(t) for t in tqdm(todo, desc=desc, unit="case")]
        errors = [e for _, e in results if e]
        if errors:  # every case was tried; the first problem is reported, the good cases stay cached
            raise InputError(*errors[0])
    split_dir = base / f"split-{split}-{data_key(cfg, split)}"
    split_dir.mkdir(parents=True, exist_ok=True)
    for c in cases:
        _link((cases_dir / _safe(c.case_id)).resolve(), split_dir / _safe(c.case_id))
    files = [npz_dir / f"{_safe(c.case_id)}.npz" for c in cases]
    return files, split_dir
