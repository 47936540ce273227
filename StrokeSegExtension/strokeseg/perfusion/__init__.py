"""4D CT and DSC-MR perfusion: maps (CBF, CBV, MTT, Tmax, TTP), core, penumbra and a report.

``run_perfusion`` turns a 4D series into maps and decision volumes; ``write_perfusion`` writes
them (all files or none); ``load_series`` reads NIfTI / NRRD / DICOM series with their frame
times; ``read_perfusion_map`` reads ready-made maps with their units. Research use only.
"""

from importlib import import_module
from typing import Any

# Imported on first use, so that `strokeseg segment` (whose command line lists the perfusion
# sub-command) does not pay for the deconvolution's scipy imports (~0.3 s of a cold start).
_WHERE = {"Thresholds": ".decision", "read_perfusion_map": ".dicom4d", "OUTPUT_FILES": ".pipeline",
          "PerfusionResult": ".pipeline", "PerfusionSettings": ".pipeline", "run_perfusion": ".pipeline",
          "write_perfusion": ".pipeline", "load_series": ".series"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_WHERE[name], __name__), name)
