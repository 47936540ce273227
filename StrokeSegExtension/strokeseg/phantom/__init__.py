"""Simulated patients ("phantoms"): the demo data, test fixtures and training data of StrokeSeg.

``simulate_dwi`` builds one acute-stroke DWI examination (b0, b1000 trace, ADC, optional FLAIR and
the lesion truth on the DWI grid) from the MNI ICBM152 templates shipped with nilearn, real or
procedural lesion shapes and a physical signal and acquisition model. See DESIGN.md "Phantoms".
"""

from .cases import GENERATOR_VERSION, PhantomCase, generate_cases, simulate_dwi, write_case
from .library import lesion_split

__all__ = ["GENERATOR_VERSION", "PhantomCase", "generate_cases", "lesion_split", "simulate_dwi", "write_case"]
