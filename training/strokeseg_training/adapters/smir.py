"""The ISLES 2015, 2017 and 2018 challenge exports (SICAS Medical Image Repository naming).

Each case is a folder of ``{VSD|SMIR}.Brain.XX.O.<SEQUENCE>.<id>/`` sub-folders, each holding one
``.nii`` of the same name; ``...O.OT.<id>`` is the expert ground truth. Sequence tokens map to
engine keys through one table per challenge.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .base import Adapter, Case, map_smir, smir_case_dirs, smir_entries

SISS = {"MR_T1": "t1", "MR_T2": "t2", "MR_Flair": "flair", "MR_DWI": "dwi"}
# MR_T1c (contrast-enhanced T1) has no engine key; it stays in meta["other_inputs"].
SPES = {"MR_CBF": "cbf", "MR_CBV": "cbv", "MR_DWI": "dwi", "MR_T2": "t2", "MR_TTP": "ttp", "MR_Tmax": "tmax", "MR_T1c": None}
ISLES17_TABLE = {"MR_ADC": "adc", "MR_MTT": "mtt", "MR_rCBF": "cbf", "MR_rCBV": "cbv", "MR_Tmax": "tmax",
                 "MR_TTP": "ttp", "MR_4DPWI": "pwi"}
ISLES18_TABLE = {"CT": "ncct", "CT_4DPWI": "ctp", "CT_CBF": "cbf", "CT_CBV": "cbv", "CT_MTT": "mtt", "CT_Tmax": "tmax"}

_SPES_ONLY = {"MR_CBF", "MR_CBV", "MR_TTP", "MR_TMAX", "MR_T1C"}


def _seqs(case_dir: Path) -> set[str]:
    return set(smir_entries(case_dir))


class _SMIRAdapter(Adapter):
    case_pattern = re.compile(r".+")

    def _dirs(self, root: Path) -> list[Path]:
        return [d for d in smir_case_dirs(root, self.case_pattern) if self.accepts(_seqs(d))]

    def accepts(self, seqs: set[str]) -> bool:
        raise NotImplementedError

    def sniff(self, root: Path) -> bool:
        return bool(self._dirs(root))

    @staticmethod
    def _id(root: Path, folder: Path, stem: str | None = None) -> str:
        """Case ids stay unique when TRAINING/ and TESTING/ both hold a ``case_1``."""
        testing = any(p.lower().startswith("test") for p in folder.parent.relative_to(root).parts)
        name = stem or folder.name
        return f"test_{name}" if testing and not folder.name.lower().startswith("test") else name

    def _case(self, case_id: str, folder: Path, table: dict[str, str | None], labels: tuple[str, ...],
              meta: dict[str, Any]) -> Case:
        entries = smir_entries(folder)
        inputs, other = map_smir(entries, table)
        ot = entries.get("OT")
        return Case(case_id, inputs, {name: ot for name in labels} if ot else {},
                    {"dataset": self.title, "patient": case_id, "folder": str(folder),
                     "other_inputs": {k: str(v) for k, v in other.items()}, **meta})


class ISLES15(_SMIRAdapter):
    """ISLES 2015 (Maier et al., MedIA 2017): SISS (sub-acute; T1, T2, FLAIR, DWI; OT = lesion) and
    SPES (acute; CBF, CBV, DWI, T1c, T2, TTP, Tmax; OT = the penumbra label, i.e. the perfusion
    lesion outside the DWI core, as Clèrigues et al. 2019 describe it: no separate core mask is
    released). Case ids are ``siss_N`` / ``spes_N``; ``task="siss"|"spes"`` keeps one sub-task."""

    name = "isles15"
    title = "ISLES'15"
    layout = "<N>/VSD.Brain.XX.O.MR_{T1,T2,Flair,DWI | CBF,CBV,DWI,T1c,T2,TTP,Tmax}.<id>/*.nii and VSD.Brain.XX.O.OT.<id>/"
    case_pattern = re.compile(r"\d+")

    def accepts(self, seqs: set[str]) -> bool:
        return "MR_DWI" in seqs and "MR_ADC" not in seqs

    def list_cases(self, root: Path, task: str | None = None) -> list[Case]:
        if task not in (None, "siss", "spes"):
            raise ValueError(f"isles15 task must be 'siss' or 'spes', got {task!r}")
        cases = []
        for folder in self._dirs(root):
            kind = "spes" if _seqs(folder) & _SPES_ONLY else "siss"
            if task and kind != task:
                continue
            if kind == "siss":
                cases.append(self._case(self._id(root, folder, f"siss_{folder.name}"), folder, SISS, ("lesion",),
                                        {"task": "SISS", "target": "sub-acute ischaemic lesion (expert mask)"}))
            else:
                cases.append(self._case(self._id(root, folder, f"spes_{folder.name}"), folder, SPES, ("lesion", "penumbra"),
                                        {"task": "SPES", "target": "penumbra: perfusion lesion minus DWI core (expert)"}))
        return cases


class ISLES17(_SMIRAdapter):
    """ISLES 2017 (Winzeck et al., Front Neurol 2018): ADC and MR perfusion maps (MTT, rCBF, rCBV,
    Tmax, TTP; Olea Sphere) plus the raw 4D PWI; OT = the final infarct on the ~90-day follow-up
    (an outcome-prediction target). ISLES 2016 shares the layout and reads the same way."""

    name = "isles17"
    title = "ISLES'17"
    layout = "training_N/SMIR.Brain.XX.O.MR_{ADC,MTT,rCBF,rCBV,Tmax,TTP,4DPWI}.<id>/*.nii and ...O.OT.<id>/"

    def accepts(self, seqs: set[str]) -> bool:
        return "MR_ADC" in seqs and bool(seqs & {"MR_TMAX", "MR_RCBF", "MR_MTT"})

    def list_cases(self, root: Path) -> list[Case]:
        return [self._case(self._id(root, folder), folder, ISLES17_TABLE, ("lesion",),
                           {"target": "final infarct at ~90-day follow-up, mapped to the acute scan"})
                for folder in self._dirs(root)]


class ISLES18(_SMIRAdapter):
    """ISLES 2018 (Hakim et al., Stroke 2021): non-contrast CT, 4D CTP and its maps (CBF, CBV, MTT,
    Tmax); OT = the infarct core traced on DWI acquired shortly after the CTP. Some patients
    contributed two slabs as two cases and the release has no patient ids: pass
    ``patients={case_id: patient}`` when known, or folds are by case."""

    name = "isles18"
    title = "ISLES'18"
    layout = "case_N/SMIR.Brain.XX.O.CT{,_4DPWI,_CBF,_CBV,_MTT,_Tmax}.<id>/*.nii and ...O.OT.<id>/"
    case_pattern = re.compile(r"case_\d+")

    def accepts(self, seqs: set[str]) -> bool:
        return any(s == "CT" or s.startswith("CT_") for s in seqs)

    def list_cases(self, root: Path) -> list[Case]:
        return [self._case(self._id(root, folder), folder, ISLES18_TABLE, ("lesion", "core"),
                           {"target": "infarct core (DWI traced, registered to the CTP)"})
                for folder in self._dirs(root)]
