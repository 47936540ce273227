"""Finding the cases of a batch: one sub-folder per case, or a BIDS dataset."""

from __future__ import annotations

from pathlib import Path

from .errors import InputError
from .io import image_suffix
from .modality import detect_from_name, find_case_inputs

TRUTH_WORDS = ("lesion", "mask", "label", "seg", "core", "penumbra", "msk")


def _is_bids(root: Path) -> bool:
    return (root / "dataset_description.json").is_file() or any(root.glob("sub-*/"))


def _bids_inputs(folder: Path) -> dict[str, Path]:
    """Image files below one BIDS subject/session (derivatives excluded), keyed by modality."""
    files: dict[str, Path] = {}
    for f in sorted(folder.rglob("*")):
        if not f.is_file() or not image_suffix(f) or "derivatives" in f.parts:
            continue
        if any(w in f.name.lower() for w in TRUTH_WORDS):
            continue
        det = detect_from_name(f.name)
        if det.key and det.key not in files:
            files[det.key] = f
    return files


def discover_cases(input_dir: str | Path) -> list[tuple[str, Path, dict[str, Path]]]:
    """(case id, folder, key -> input file) for every case below ``input_dir``."""
    root = Path(input_dir)
    if not root.is_dir():
        raise InputError(root, "input folder not found")
    cases: list[tuple[str, Path, dict[str, Path]]] = []
    if _is_bids(root):
        for sub in sorted(p for p in root.glob("sub-*") if p.is_dir()):
            sessions = sorted(p for p in sub.glob("ses-*") if p.is_dir()) or [sub]
            for ses in sessions:
                case_id = sub.name if ses is sub else f"{sub.name}_{ses.name}"
                cases.append((case_id, ses, _bids_inputs(ses)))
    else:
        for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                cases.append((sub.name, sub, find_case_inputs(sub)))
            except InputError:
                cases.append((sub.name, sub, {}))  # reported as that case's failure, batch goes on
    if not cases:
        raise InputError(root, "no case folders found (expected one sub-folder per case, or BIDS sub-*)")
    return cases
