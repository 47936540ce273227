"""Import MONAI without the parts the engine never uses, in the `strokeseg` command's own process.

``import monai`` imports every MONAI submodule (most of them twice: ``load_submodules`` imports,
then re-executes each), and those import whatever optional packages are installed:
scikit-learn (a nilearn dependency, so always present here), pandas, matplotlib, scipy (ndimage,
signal, stats), nibabel and pydicom. On this 2-core CPU that was over half of a cold
``strokeseg segment`` beside torch itself. MONAI imports the extras through ``optional_import``,
which treats a failed import as "not installed", and ``load_submodules`` skips any submodule
already present in ``sys.modules``; so hiding them (``sys.modules[name] = None``) while MONAI loads
gives the same networks, inferers and losses, faster. Hidden are:

- ``EXTRAS``: the optional third-party packages. They import normally right after (the engine's
  own metrics, plots and DICOM code import them as usual), but MONAI features built on them
  (``monai.visualize``, its NIfTI/DICOM readers, distance transforms, the Hausdorff metric) stay
  "not installed" for the rest of that process.
- ``UNUSED_MONAI``: MONAI's own application packages (auto3dseg, detection, pathology, ...) and
  engines/optimizers, which nothing the engine imports depends on.

That side effect is why the lean import is opt-in: only the ``strokeseg`` command (our own
process, where cold start is the speed target) calls ``use_lean_import()``. As a library (the
Slicer module, notebooks, training) the engine imports MONAI as usual, so other MONAI users in the
same process (e.g. another Slicer extension) are unaffected. ``STROKESEG_PLAIN_MONAI=1`` turns the
lean import off in the command too (comparison, debugging). If a MONAI version needs a hidden
module outright, the import is retried plainly.
"""

from __future__ import annotations

import os
import sys
import types

EXTRAS = ("sklearn", "pandas", "matplotlib", "scipy", "nibabel", "pydicom")
UNUSED_MONAI = (
    "monai.apps.auto3dseg", "monai.apps.deepedit", "monai.apps.deepgrow", "monai.apps.detection",
    "monai.apps.generation", "monai.apps.nuclick", "monai.apps.pathology", "monai.apps.reconstruction",
    "monai.apps.vista3d", "monai.auto3dseg", "monai.engines", "monai.optimizers",
)
HIDDEN = EXTRAS + UNUSED_MONAI

_lean = False


def use_lean_import() -> None:
    """Import MONAI lean from now on in this process (the `strokeseg` command calls this first)."""
    global _lean
    _lean = os.environ.get("STROKESEG_PLAIN_MONAI") != "1"


def import_monai() -> types.ModuleType:
    """The ``monai`` package: imported lean if ``use_lean_import()`` was called, else as usual."""
    if "monai" in sys.modules:
        return sys.modules["monai"]
    if not _lean:
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
