"""The common case description every dataset adapter produces, and helpers shared by adapters.

An adapter only *lists* files (no image is read), so discovering a 250-case dataset is
instant; reading, checking and preprocessing happen later with the engine's own
``load_inputs``/``prepare`` (``strokeseg_training.realdata``).
"""

from __future__ import annotations

import inspect
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from strokeseg.errors import InputError
from strokeseg.io import image_suffix, strip_suffix
from strokeseg.modality import MODALITY_KEYS


@dataclass
class Case:
    """One labelled (or unlabelled) examination of a dataset.

    ``inputs`` maps engine modality keys (``dwi``, ``adc``, ``t1``, ``cbf``, ...) to image
    files (or DICOM folders); ``labels`` maps truth names to mask files: ``lesion`` is always
    the dataset's segmentation target when the case is labelled, ``core``/``penumbra`` are
    added where the dataset says what its mask means. ``meta`` holds at least ``dataset``,
    ``patient`` (the unit of cross-validation splits) and ``folder``; optionally
    ``label_values`` ({label name: [mask values]}) for multi-label masks and
    ``lesion_volume_ml`` when the dataset states it.
    """

    case_id: str
    inputs: dict[str, Path]
    labels: dict[str, Path] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [k for k in self.inputs if k not in MODALITY_KEYS]
        if unknown:  # adapters must speak the engine's keys; anything else is a bug there
            raise ValueError(f"case {self.case_id}: unknown modality keys {unknown}")

    @property
    def patient(self) -> str:
        return str(self.meta.get("patient", self.case_id))

    @property
    def labelled(self) -> bool:
        return "lesion" in self.labels

    def label(self, name: str = "lesion") -> Path:
        if name not in self.labels:
            have = ", ".join(sorted(self.labels)) or "none"
            raise InputError(self.meta.get("folder", self.case_id), f"case {self.case_id} has no '{name}' label (has: {have})")
        return self.labels[name]


class Adapter:
    """A dataset layout: ``sniff`` says whether a folder holds it, ``cases`` lists its cases."""

    name = ""
    title = ""
    layout = ""  # one line shown in errors: what the adapter expects

    def sniff(self, root: Path) -> bool:
        raise NotImplementedError

    def list_cases(self, root: Path) -> list[Case]:
        """The adapter's cases; keyword parameters after ``root`` are its options."""
        raise NotImplementedError

    def cases(self, root: str | Path, *, labelled_only: bool = True, patients: dict[str, str] | None = None,
              **options: Any) -> list[Case]:
        """All cases below ``root`` sorted by id (only those with a lesion mask by default).

        ``patients`` ({case id: patient id}) groups cases of one patient where the layout does
        not say it (cross-validation keeps a patient's cases in one fold); other options are
        the adapter's own (e.g. ``task`` of isles15, ``channels`` of generic).
        """
        root = Path(root)
        if not root.is_dir():
            raise InputError(root, "dataset folder not found")
        takes = [p for p in inspect.signature(self.list_cases).parameters if p != "root"]
        unknown = sorted(set(options) - set(takes))
        if unknown:  # a misspelt option must not be ignored silently
            raise ValueError(f"the {self.name} adapter has no option {', '.join(unknown)} "
                             f"(options: {', '.join(takes) or 'none'})")
        found = self.list_cases(root, **options)
        for c in found:
            if patients and c.case_id in patients:
                c.meta["patient"] = str(patients[c.case_id])
        dup = sorted(i for i, n in Counter(c.case_id for c in found).items() if n > 1)
        if dup:
            raise InputError(root, f"{self.title}: case id {dup[0]} occurs twice")
        out = sorted((c for c in found if c.labelled or not labelled_only), key=lambda c: natural_key(c.case_id))
        if not out:
            what = "labelled cases" if labelled_only and found else "cases"
            raise InputError(root, f"no {what} of the {self.title} layout found (expected {self.layout})")
        return out


# -- helpers -----------------------------------------------------------------------------
def image_files(folder: Path) -> list[Path]:
    """Image files (any suffix the engine reads) directly in ``folder``, hidden files skipped."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and image_suffix(p) and not p.name.startswith("."))


def dirs_at_depth(root: Path, pattern: str, max_depth: int = 3) -> list[Path]:
    """Folders matching ``pattern`` at the shallowest depth (0..max_depth) below ``root`` that has any."""
    for depth in range(max_depth + 1):
        glob = "/".join(["*"] * depth + [pattern])
        hits = sorted(p for p in root.glob(glob) if p.is_dir() and not p.name.startswith("."))
        if hits:
            return hits
    return []


# SMIR / VSD export names of the ISLES 2015-2018 challenges:
#   VSD.Brain.XX.O.MR_DWI.70613   SMIR.Brain.XX.O.CT_4DPWI.345561   VSD.Brain.XX.O.OT.70618
# each a folder holding one image of the same name (.nii), sometimes the bare file.
_SMIR = re.compile(r"^(?:SMIR|VSD)\.Brain[^.]*\.XX\.(?:O|XX)\.(?P<seq>[A-Za-z0-9_]+?)\.(?P<id>\d+)(?:$|\.)")


def smir_sequence(name: str) -> str | None:
    m = _SMIR.match(name)
    return m.group("seq") if m else None


def smir_entries(case_dir: Path) -> dict[str, Path]:
    """{sequence token (upper case): image file} of one SMIR case folder."""
    out: dict[str, Path] = {}
    for child in sorted(case_dir.iterdir()):
        seq = smir_sequence(child.name)
        if seq is None:
            continue
        if child.is_dir():
            files = image_files(child)
            same = [f for f in files if strip_suffix(f.name) == child.name]
            files = same or files
            if len(files) != 1:
                if files:
                    raise InputError(child, f"holds {len(files)} images; expected one ({child.name}.nii)")
                continue
            path = files[0]
        elif image_suffix(child):
            path = child
        else:
            continue
        key = seq.upper()
        if key in out:
            raise InputError(case_dir, f"two {seq} images ({out[key].name}, {path.name})")
        out[key] = path
    return out


def smir_case_dirs(root: Path, name_pattern: re.Pattern[str], max_depth: int = 3) -> Iterator[Path]:
    """Folders named like ``name_pattern`` that hold SMIR entries, at the shallowest depth."""
    for depth in range(max_depth + 1):
        glob = "/".join(["*"] * (depth + 1))
        hits = [p for p in sorted(root.glob(glob)) if p.is_dir() and name_pattern.fullmatch(p.name)
                and any(smir_sequence(c.name) for c in p.iterdir())]
        if hits:
            yield from hits
            return


def map_smir(entries: dict[str, Path], table: dict[str, str | None]) -> tuple[dict[str, Path], dict[str, Path]]:
    """Split SMIR entries into engine inputs (by ``table``) and everything else (not OT)."""
    upper = {k.upper(): v for k, v in table.items()}
    inputs: dict[str, Path] = {}
    other: dict[str, Path] = {}
    for seq, path in entries.items():
        key = upper.get(seq)
        if key is not None:
            inputs[key] = path
        elif seq != "OT":
            other[seq] = path
    return inputs, other


def natural_key(text: str) -> tuple[Any, ...]:
    """'case_10' after 'case_9'."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))
