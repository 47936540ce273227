"""Import MONAI without the optional extras its package import would load and the engine never uses.

``import monai`` imports every MONAI submodule, and those import whatever optional packages are
installed: scikit-learn (a nilearn dependency, so always present here), pandas, matplotlib,
scipy.signal, nibabel and pydicom (the engine reads images with SimpleITK; its own DICOM code
imports pydicom when needed): 2.5 s of an 8.3 s cold ``strokeseg segment`` on a 2-core CPU.
MONAI imports them all through ``optional_import``, which treats a failed import as "not
installed", so hiding them while MONAI loads gives the same networks, inferers and losses, faster.
They are importable again right after (the engine's own plots import matplotlib as usual); only
MONAI features built on them (``monai.visualize``, its NIfTI and DICOM readers, the
embedding-collapse metric) report them missing in this process. Set ``STROKESEG_PLAIN_MONAI=1``
to import MONAI as usual (comparison, debugging). If MONAI ever needs one of them outright, the
import is retried plainly.
"""

from __future__ import annotations

import os
import sys
import types

HIDDEN = ("sklearn", "pandas", "matplotlib", "scipy.signal", "nibabel", "pydicom")


def import_monai() -> types.ModuleType:
    """The ``monai`` package, imported lean on first use (see the module docstring)."""
    if "monai" in sys.modules:
        return sys.modules["monai"]
    if os.environ.get("STROKESEG_PLAIN_MONAI") == "1":
        import monai

        return monai
    hidden = [name for name in HIDDEN if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # makes "import name" raise ImportError
    try:
        import monai
    except ImportError:
        monai = None
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
    if monai is None:  # a MONAI version that needs one of them: import it as usual
        for name in [m for m in sys.modules if m == "monai" or m.startswith("monai.")]:
            del sys.modules[name]
        import monai
    return monai

