"""4D CT and DSC-MR perfusion: maps (CBF, CBV, MTT, Tmax, TTP), core, penumbra and a report.

``run_perfusion`` turns a 4D series into maps and decision volumes; ``write_perfusion`` writes
them (all files or none); ``load_series`` reads NIfTI / NRRD / DICOM series with their frame
times; ``read_perfusion_map`` reads ready-made maps with their units. Research use only.
"""

from .decision import Thresholds
from .dicom4d import read_perfusion_map
from .pipeline import OUTPUT_FILES, PerfusionResult, PerfusionSettings, run_perfusion, write_perfusion
from .series import load_series

__all__ = ["OUTPUT_FILES", "PerfusionResult", "PerfusionSettings", "Thresholds", "load_series", "read_perfusion_map",
           "run_perfusion", "write_perfusion"]
