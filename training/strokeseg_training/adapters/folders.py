"""Plain folders: StrokeSeg phantom case folders, case folders of the DESIGN.md layout, and
``images/`` + ``masks/`` folders matched by file name (nnU-Net's ``imagesTr``/``labelsTr`` too)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

from strokeseg.errors import InputError
from strokeseg.io import image_suffix, strip_suffix
from strokeseg.modality import ACCEPT, MODALITY_KEYS, TRUTH_NAMES, detect_from_name, find_case_inputs

from .base import Adapter, Case, image_files

IMAGE_DIRS = ("images", "image", "imgs", "volumes", "inputs")
MASK_DIRS = ("masks", "mask", "labels", "label", "segmentations", "segmentation", "seg", "gt", "groundtruth", "ground_truth")
MASK_WORDS = ("mask", "masks", "msk", "lesion", "label", "labels", "seg", "segmentation", "gt", "roi", "ot")
_SEP = re.compile(r"[_.\-]")
_NNUNET_CHANNEL = re.compile(r"(?P<id>.+)_(?P<ch>\d{4})$")


def _truth(folder: Path) -> dict[str, Path]:
    return {strip_suffix(p.name).lower(): p for p in image_files(folder) if strip_suffix(p.name).lower() in TRUTH_NAMES}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(path, f"not readable JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def _case_folder(folder: Path, dataset: str) -> Case:
    meta: dict[str, Any] = {"dataset": dataset, "patient": folder.name, "folder": str(folder)}
    if (folder / "case.json").is_file():
        info = _read_json(folder / "case.json")
        meta.update({k: v for k, v in info.items() if k not in ("patient", "folder", "dataset")})
        meta["patient"] = str(info.get("patient", folder.name))
    return Case(folder.name, find_case_inputs(folder), _truth(folder), meta)


def _is_phantom(folder: Path) -> bool:
    f = folder / "case.json"
    return f.is_file() and _read_json(f).get("generator") == "strokeseg.phantom"


class Phantom(Adapter):
    """Case folders written by ``strokeseg phantom`` / ``strokeseg.phantom.write_case``: one file per
    modality key, ``lesion.nii.gz`` (+ ``core``/``penumbra``), and ``case.json`` with the simulation
    parameters (its ``lesion_volume_ml`` is used for volume-stratified folds). Patient = case."""

    name = "phantom"
    title = "StrokeSeg phantoms"
    layout = "<case>/{dwi,adc,b0,...}.nii.gz, lesion.nii.gz and case.json (generator strokeseg.phantom)"

    def _folders(self, root: Path) -> list[Path]:
        return [p for p in sorted(root.iterdir()) if p.is_dir() and _is_phantom(p)]

    def sniff(self, root: Path) -> bool:
        return any(_is_phantom(p) for p in root.iterdir() if p.is_dir())

    def list_cases(self, root: Path) -> list[Case]:
        return [_case_folder(p, self.title) for p in self._folders(root)]


def _modality_split(stem: str) -> tuple[str, str | None]:
    """'case01_dwi' -> ('case01', 'dwi'); 'case01_adc_map' -> ('case01', 'adc'); 'case01' -> ('case01', None).

    The shortest trailing part (after a separator) whose name gives a modality wins, so case
    ids may contain separators and modality words ('sub-01_T1w' -> 'sub-01'; 'dwi_study_7_adc'
    -> 'dwi_study_7').
    """
    cuts = [m.start() for m in _SEP.finditer(stem)]
    for cut in reversed(cuts):  # right to left = shortest suffix first
        det = detect_from_name(stem[cut + 1:])
        if det.key is not None and det.confidence >= ACCEPT and stem[:cut]:
            return stem[:cut], det.key
    return stem, None


def _mask_id(stem: str) -> str:
    """'case01_lesion_mask' -> 'case01'; 'case01' -> 'case01' (nnU-Net labels carry the bare id)."""
    parts = _SEP.split(stem)
    while len(parts) > 1 and parts[-1].lower() in MASK_WORDS:
        stem = stem[: len(stem) - len(parts[-1]) - 1]
        parts = parts[:-1]
    return stem


def _channel_names(root: Path, image_dir: Path) -> list[str] | None:
    """nnU-Net dataset.json: {"channel_names": {"0": "DWI", "1": "ADC"}} (v2) or {"modality": {...}} (v1)."""
    for f in (image_dir.parent / "dataset.json", root / "dataset.json"):
        if f.is_file():
            info = _read_json(f)
            names = info.get("channel_names") or info.get("modality")
            if isinstance(names, dict):
                out = []
                for i in range(len(names)):
                    det = detect_from_name(str(names.get(str(i), "")))
                    if det.key is None:
                        raise InputError(f, f"channel {i} '{names.get(str(i))}' names no modality; pass options {{'channels': [...]}}")
                    out.append(det.key)
                return out
    return None


def _named_dir(root: Path, words: Sequence[str]) -> list[tuple[Path, str]]:
    """Children named like one of ``words`` (case-insensitive), with the rest of the name ('Tr', 'Ts', '')."""
    out = []
    for p in sorted(root.iterdir()):
        if not p.is_dir():
            continue
        low = p.name.lower()
        for w in sorted(words, key=len, reverse=True):
            if low.startswith(w):
                out.append((p, low[len(w):]))
                break
    return out


class Generic(Adapter):
    """Any images + masks folder pair matched by name, or case folders of the DESIGN.md layout.

    * ``images/case01_dwi.nii.gz``, ``images/case01_adc.nii.gz`` + ``masks/case01.nii.gz`` (or
      ``case01_mask``/``_lesion``/``_seg``): the modality comes from the name after the case id;
    * nnU-Net ``imagesTr/case01_0000.nii.gz`` + ``labelsTr/case01.nii.gz``: channel indices map to
      keys through ``dataset.json`` or ``channels=["dwi", "adc"]``;
    * one image per case with no modality in its name: ``modality="t1"``;
    * ``label_values={"core": [1], "penumbra": [2]}`` for multi-label masks (``lesion`` = any label);
    * ``<case>/dwi.nii.gz ... lesion.nii.gz`` case folders.
    """

    name = "generic"
    title = "generic images + masks"
    layout = "images/ + masks/ (or imagesTr/ + labelsTr/) matched by name, or <case>/<key>.nii.gz + lesion.nii.gz"

    def sniff(self, root: Path) -> bool:
        if _named_dir(root, IMAGE_DIRS):
            return True
        for p in sorted(root.iterdir())[:50]:
            if p.is_dir() and any(strip_suffix(f.name).lower() in MODALITY_KEYS for f in p.iterdir() if image_suffix(f) or f.is_dir()):
                return True
        return False

    def list_cases(self, root: Path, channels: Sequence[str] | None = None, modality: str | None = None,
                   label_values: dict[str, Sequence[int]] | None = None) -> list[Case]:
        pairs = _named_dir(root, IMAGE_DIRS)
        if not pairs:
            folders = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
            return [_case_folder(p, self.title) for p in folders]
        masks = {rest: d for d, rest in _named_dir(root, MASK_DIRS)}
        cases = []
        for image_dir, rest in pairs:
            mask_dir = masks.get(rest)
            chans = list(channels) if channels else _channel_names(root, image_dir)
            inputs = self._inputs(image_dir, chans, modality)
            labels = {}
            for m in image_files(mask_dir) if mask_dir else []:
                stem = _mask_id(strip_suffix(m.name))
                cid = stem if stem in inputs else _modality_split(stem)[0]
                if cid not in inputs:
                    raise InputError(m, f"mask matches no image in {image_dir.name}/ (case id '{stem}')")
                labels[cid] = m
            for cid, files in inputs.items():
                lab = {}
                if cid in labels:
                    lab = {"lesion": labels[cid], **{k: labels[cid] for k in (label_values or {})}}
                meta = {"dataset": self.title, "patient": cid, "folder": str(image_dir)}
                if label_values:
                    meta["label_values"] = {k: [int(v) for v in vals] for k, vals in label_values.items()}
                cases.append(Case(cid, files, lab, meta))
        return cases

    @staticmethod
    def _inputs(image_dir: Path, channels: list[str] | None, modality: str | None) -> dict[str, dict[str, Path]]:
        out: dict[str, dict[str, Path]] = {}
        for f in image_files(image_dir):
            stem = strip_suffix(f.name)
            nn = _NNUNET_CHANNEL.fullmatch(stem)
            if nn and channels is not None:
                ch = int(nn.group("ch"))
                if ch >= len(channels):
                    raise InputError(f, f"channel {ch} but only {len(channels)} channel names ({', '.join(channels)})")
                cid, key = nn.group("id"), channels[ch]
            else:
                cid, key = _modality_split(stem)
                if key is None:
                    if nn:
                        raise InputError(f, "nnU-Net channel file without channel names; add dataset.json or pass "
                                            "options {'channels': [...]}")
                    if not modality:
                        raise InputError(f, "the name gives no modality; name it <case>_<key> (e.g. case01_dwi) or "
                                            "pass options {'modality': KEY}")
                    key = modality
            if key not in MODALITY_KEYS:
                raise InputError(f, f"unknown modality key '{key}'")
            files = out.setdefault(cid, {})
            if key in files:
                raise InputError(f, f"a second '{key}' image for case {cid} ({files[key].name})")
            files[key] = f
        return out
