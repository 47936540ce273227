"""Standard terminology of the segments StrokeSeg writes (so DICOM SEG export is meaningful).

Segments carry Slicer terminology entries, the ``~``-separated string Slicer stores in the
segment's ``TerminologyEntry`` tag::

    context~category~type~typeModifier~anatomicContext~region~regionModifier

with each code as ``scheme^value^meaning``. The codes are SNOMED CT: category
"Morphologically Altered Structure" (49755003, DICOM CID 7150), type "Infarct" (55641003, the
morphologic abnormality) for the lesion and the perfusion core, "Ischemia" (52674009) for the
penumbra (tissue at risk, hypoperfused but not infarcted), anatomic region "Brain" (12738006).
The types are declared in ``Resources/Terminology/StrokeSeg.term.json`` (dcmqi segment-context
format), which the module loads into Slicer's Terminologies logic so the terminology selector
shows them with their recommended colours.
"""

from __future__ import annotations

from dataclasses import dataclass

CONTEXT_NAME = "StrokeSeg - ischaemic stroke lesions"
ANATOMIC_CONTEXT_NAME = "Anatomic codes - DICOM master list"

Code = tuple[str, str, str]  # (coding scheme designator, code value, code meaning)

CATEGORY_ALTERED: Code = ("SCT", "49755003", "Morphologically Altered Structure")
TYPE_INFARCT: Code = ("SCT", "55641003", "Infarct")
TYPE_ISCHEMIA: Code = ("SCT", "52674009", "Ischemia")
REGION_BRAIN: Code = ("SCT", "12738006", "Brain")


@dataclass(frozen=True)
class SegmentTerm:
    """What a segment is: its default name, colour and standard codes."""

    key: str
    name: str
    category: Code
    type: Code
    region: Code | None
    color: tuple[float, float, float]

    @property
    def terminology(self) -> str:
        return terminology_string(self.category, self.type, self.region)


LESION = SegmentTerm("lesion", "Stroke lesion", CATEGORY_ALTERED, TYPE_INFARCT, REGION_BRAIN, (216 / 255, 40 / 255, 40 / 255))
CORE = SegmentTerm("core", "Infarct core", CATEGORY_ALTERED, TYPE_INFARCT, REGION_BRAIN, (216 / 255, 40 / 255, 40 / 255))
PENUMBRA = SegmentTerm("penumbra", "Penumbra", CATEGORY_ALTERED, TYPE_ISCHEMIA, REGION_BRAIN, (245 / 255, 180 / 255, 40 / 255))
TERMS = {t.key: t for t in (LESION, CORE, PENUMBRA)}


def _code(code: Code | None) -> str:
    return "^".join(code) if code else "^^"


def terminology_string(category: Code, type_: Code, region: Code | None = None) -> str:
    return "~".join(
        [CONTEXT_NAME, _code(category), _code(type_), "^^", ANATOMIC_CONTEXT_NAME if region else "", _code(region), "^^"]
    )


def parse_terminology(entry: str) -> dict[str, Code | None]:
    """Codes of a Slicer terminology string: category, type, type_modifier, region, region_modifier."""
    parts = (entry or "").split("~")
    if len(parts) < 3:
        raise ValueError(f"not a Slicer terminology entry: {entry!r}")
    parts += [""] * (7 - len(parts))

    def code(text: str) -> Code | None:
        fields = (text.split("^") + ["", "", ""])[:3]
        return tuple(fields) if fields[0] and fields[1] else None  # type: ignore[return-value]

    return {
        "category": code(parts[1]),
        "type": code(parts[2]),
        "type_modifier": code(parts[3]),
        "region": code(parts[5]),
        "region_modifier": code(parts[6]),
    }
