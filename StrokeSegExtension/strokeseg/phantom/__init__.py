"""Simulated patients ("phantoms"): the demo data, test fixtures and training data of StrokeSeg.

``simulate_dwi`` builds one acute-stroke DWI examination (b0, b1000 trace, ADC, optional FLAIR and
the lesion truth on the DWI grid) from the MNI ICBM152 templates shipped with nilearn, real or
procedural lesion shapes and a physical signal and acquisition model. ``simulate_t1`` builds a
chronic-stroke T1 examination (ATLAS R2.0 setting) and ``simulate_siss`` a sub-acute T1/T2/FLAIR/DWI
one (ISLES'15 SISS setting) from the same machinery. See DESIGN.md "Phantoms".
"""

from .cases import GENERATOR_VERSION, PhantomCase, generate_cases, simulate_dwi, write_case
from .library import lesion_split
from .structural import STRUCTURAL_MODALITIES, STRUCTURAL_VERSION, simulate_siss, simulate_structural, simulate_t1

__all__ = ["GENERATOR_VERSION", "STRUCTURAL_MODALITIES", "STRUCTURAL_VERSION", "PhantomCase", "generate_cases",
           "lesion_split", "simulate_dwi", "simulate_siss", "simulate_structural", "simulate_t1", "write_case"]
