"""BIDS datasets: ISLES'22 (DWI, ADC, FLAIR + derivatives masks) and ATLAS R2.0 (T1w + lesion masks)."""

from __future__ import annotations

from pathlib import Path

from strokeseg.io import strip_suffix

from .base import Adapter, Case, dirs_at_depth, image_files

# The BIDS suffix (last "_" entity of the file name) -> engine modality key.
BIDS_SUFFIX = {"dwi": "dwi", "adc": "adc", "flair": "flair", "t1w": "t1", "t2w": "t2"}


def bids_suffix(path: Path) -> str:
    return strip_suffix(path.name).rsplit("_", 1)[-1].lower()


def _sessions(subject: Path) -> list[Path]:
    return sorted(p for p in subject.glob("ses-*") if p.is_dir()) or [subject]


def _session_images(session: Path) -> list[Path]:
    """Images of a session: in its datatype folders (anat/, dwi/, ...) or directly in it."""
    files = image_files(session)
    for sub in sorted(p for p in session.iterdir() if p.is_dir()):
        files += image_files(sub)
    return files


def _inputs(files: list[Path]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in files:
        key = BIDS_SUFFIX.get(bids_suffix(f))
        if key and key not in out:
            out[key] = f
    return out


def _case_id(subject: Path, session: Path) -> str:
    return subject.name if session is subject else f"{subject.name}_{session.name}"


class ISLES22(Adapter):
    """ISLES'22 (Hernandez Petzsche et al., Sci Data 2022), as released on Zenodo:

    ``[rawdata/]sub-strokecaseXXXX/ses-0001/{dwi/*_dwi, dwi/*_adc, anat/*_FLAIR}.nii.gz`` and
    ``derivatives/sub-strokecaseXXXX/ses-0001/*_msk.nii.gz`` (the mask lies on the DWI grid;
    FLAIR is on its own grid and is resampled through physical space by ``prepare``).
    """

    name = "isles22"
    title = "ISLES'22"
    layout = "[rawdata/]sub-strokecase*/ses-*/dwi/*_dwi.nii.gz with derivatives/sub-strokecase*/ses-*/*_msk.nii.gz"

    def _subjects(self, root: Path) -> list[Path]:
        hits = dirs_at_depth(root, "sub-strokecase*", 2)
        return [p for p in hits if "derivatives" not in p.relative_to(root).parts]

    def sniff(self, root: Path) -> bool:
        return bool(self._subjects(root))

    def list_cases(self, root: Path) -> list[Case]:
        cases = []
        for subject in self._subjects(root):
            raw = subject.parent
            base = raw.parent if raw.name == "rawdata" else raw
            for session in _sessions(subject):
                rel = session.relative_to(raw)
                deriv = base / "derivatives" / rel
                masks = sorted(f for f in deriv.rglob("*") if f.is_file() and bids_suffix(f) == "msk") if deriv.is_dir() else []
                cases.append(Case(
                    _case_id(subject, session), _inputs(_session_images(session)),
                    {"lesion": masks[0]} if masks else {},
                    {"dataset": self.title, "patient": subject.name, "session": session.name if session is not subject else None,
                     "folder": str(session), "target": "acute/sub-acute infarct on DWI (expert mask, DWI grid)"}))
        return cases


class ATLAS2(Adapter):
    """ATLAS R2.0 (Liew et al., Sci Data 2022): ``Training/R*/sub-r*s*/ses-*/anat/`` with
    ``*_T1w.nii.gz`` and ``*_label-L_desc-T1lesion_mask.nii.gz`` (MNI152NLin2009aSym space).
    The encrypted/unlabelled test release has no masks and is left out of training lists."""

    name = "atlas2"
    title = "ATLAS R2.0"
    layout = "Training/R*/sub-r*s*/ses-*/anat/*_T1w.nii.gz with *_label-L_desc-T1lesion_mask.nii.gz"

    def _subjects(self, root: Path) -> list[Path]:
        return dirs_at_depth(root, "sub-r*s*", 4)

    def sniff(self, root: Path) -> bool:
        return bool(self._subjects(root))

    def list_cases(self, root: Path) -> list[Case]:
        cases = []
        for subject in self._subjects(root):
            for session in _sessions(subject):
                files = _session_images(session)
                masks = [f for f in files if bids_suffix(f) == "mask" and "label-l" in f.name.lower()]
                t1 = [f for f in files if bids_suffix(f) == "t1w"]
                site = subject.parent.name
                cases.append(Case(
                    _case_id(subject, session), {"t1": t1[0]} if t1 else {},
                    {"lesion": masks[0]} if masks else {},
                    {"dataset": self.title, "patient": subject.name, "site": site if site[:1] in "Rr" else None,
                     "split": "test" if any(p.lower().startswith("test") for p in subject.relative_to(root).parts) else "train",
                     "folder": str(session), "target": "chronic stroke lesion on T1w (manual tracing)"}))
        return cases
