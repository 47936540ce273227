"""Where the module's resources are, in the source tree and in an installed extension.

Source tree: ``<repo>/StrokeSegExtension/StrokeSeg.py`` with ``<repo>/Resources/``.
Installed (``slicerMacroBuildScriptedModule`` + the extension's CMake): ``StrokeSeg.py``,
``StrokeSegLib/`` and ``strokeseg/`` side by side in ``qt-scripted-modules/`` and the
resources copied next to them in ``qt-scripted-modules/Resources/``.
"""

from __future__ import annotations

import os
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1]  # the folder holding StrokeSeg.py
MODELS_ENV_VAR = "STROKESEG_MODELS_DIR"  # same variable as strokeseg.models


def resources_dir() -> Path:
    """The ``Resources`` folder holding ``UI/StrokeSeg.ui`` (installed layout first)."""
    for candidate in (MODULE_DIR / "Resources", MODULE_DIR.parent / "Resources"):
        if (candidate / "UI" / "StrokeSeg.ui").is_file():
            return candidate
    raise FileNotFoundError(
        f"StrokeSeg resources not found next to {MODULE_DIR} (looked for Resources/UI/StrokeSeg.ui "
        "in the module folder and its parent); reinstall the extension"
    )


def ui_file() -> Path:
    return resources_dir() / "UI" / "StrokeSeg.ui"


def icon_file() -> Path:
    return resources_dir() / "Icons" / "StrokeSeg.png"


def requirements_file() -> Path:
    return resources_dir() / "requirements.txt"


def models_dir() -> Path:
    """The models folder: $STROKESEG_MODELS_DIR if set, else the bundled ``Resources/Models``."""
    env = os.environ.get(MODELS_ENV_VAR)
    if env:
        return Path(env)
    return resources_dir() / "Models"


def has_bundled_models() -> bool:
    return (models_dir() / "models.json").is_file()
