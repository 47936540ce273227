"""Sample data without downloads: simulated DWI patients generated on this computer.

The Sample Data module lists "StrokeSeg DWI phantom" (NIfTI volumes) and "StrokeSeg DWI phantom
(DICOM)" (the same kind of case as DICOM series, so DICOM SEG export can be tried). Cases are
generated once by the engine's phantom simulator into a cache folder (keyed by generator
version and seed) and loaded from there afterwards.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

INPUT_KEYS = ("dwi", "adc", "b0")
# Node names and DICOM series descriptions as a scanner would label them (detection reads them).
NODE_NAMES = {"dwi": "DWI b1000 trace", "adc": "ADC map", "b0": "DWI b0"}
SERIES_DESCRIPTIONS = {"dwi": "ep2d_diff_TRACEW b1000", "adc": "ep2d_diff_ADC", "b0": "ep2d_diff_b0"}
B_VALUES = {"dwi": 1000.0, "b0": 0.0}


@dataclass(frozen=True)
class PhantomSample:
    name: str
    seed: int
    dicom: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)


SAMPLES = (
    PhantomSample("StrokeSeg DWI phantom", 7, False, {"lesion_pattern": "territorial"}),
    PhantomSample("StrokeSeg DWI phantom (DICOM)", 13, True, {"lesion_pattern": "territorial"}),
)


def case_folder(sample: PhantomSample, cache_dir: str | Path) -> Path:
    from strokeseg.phantom import GENERATOR_VERSION

    return Path(cache_dir) / "phantoms" / f"seed{sample.seed:05d}-{GENERATOR_VERSION}"


def ensure_case(sample: PhantomSample, cache_dir: str | Path, lesion_library: str | Path | None = None) -> Path:
    """The case folder (dwi/adc/b0/lesion .nii.gz + case.json), simulated on first use."""
    from strokeseg.phantom import simulate_dwi, write_case

    folder = case_folder(sample, cache_dir)
    if (folder / "case.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    case = simulate_dwi(sample.seed, lesion_library=lesion_library, **sample.overrides)
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        written = write_case(case, tmp)
        shutil.rmtree(folder, ignore_errors=True)
        written.rename(folder)
    return folder


def ensure_dicom(case_dir: str | Path) -> dict[str, list[Path]]:
    """DICOM series of the case's inputs (one study, one frame of reference), written on first use."""
    from pydicom.uid import generate_uid

    from strokeseg.io import read_image

    from .dicom import write_dicom_series

    case_dir = Path(case_dir)
    root = case_dir / "dicom"
    if not (root / "complete").is_file():
        shutil.rmtree(root, ignore_errors=True)
        study, frame = generate_uid(), generate_uid()
        for number, key in enumerate(INPUT_KEYS, start=1):
            write_dicom_series(
                read_image(case_dir / f"{key}.nii.gz"), root / key, series_description=SERIES_DESCRIPTIONS[key],
                study_uid=study, frame_of_reference_uid=frame, series_number=number, b_value=B_VALUES.get(key),
            )
        (root / "complete").write_text("ok\n")
    return {key: sorted((root / key).glob("*.dcm")) for key in INPUT_KEYS}


def load_sample(
    sample: PhantomSample,
    cache_dir: str | Path,
    load_volume: Callable[[Path, str], Any],
    load_dicom_series: Callable[[list[Path], str], Any] | None = None,
    lesion_library: str | Path | None = None,
) -> dict[str, Any]:
    """Generate (first time) and load a sample case; returns modality key -> volume node."""
    folder = ensure_case(sample, cache_dir, lesion_library)
    if sample.dicom:
        if load_dicom_series is None:
            raise ValueError("loading the DICOM sample needs a DICOM series loader")
        series = ensure_dicom(folder)
        return {key: load_dicom_series(series[key], NODE_NAMES[key]) for key in INPUT_KEYS}
    return {key: load_volume(folder / f"{key}.nii.gz", NODE_NAMES[key]) for key in INPUT_KEYS}


def truth_file(sample: PhantomSample, cache_dir: str | Path) -> Path:
    return case_folder(sample, cache_dir) / "lesion.nii.gz"
