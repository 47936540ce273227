"""Python dependencies on first use, with the user's consent, without breaking Slicer.

PyTorch comes first and separately: through the PyTorch extension's ``PyTorchUtils`` when it is
installed (it picks the CUDA build that matches the GPU driver), else plain pip. The rest comes
from ``Resources/requirements.txt``. Slicer's own numpy, SimpleITK and VTK must never be
replaced (other modules and Slicer itself are built against them): they are not in the
requirements, and every pip call gets a constraints file pinning the installed versions, so a
package that would need a different one makes pip fail instead of silently replacing it.

Only the standard library (and ``packaging``, which pip itself vendors) is imported here: this
module runs before the engine's dependencies exist. :func:`install` needs the Slicer
application (``slicer.util.pip_install``); the checks work anywhere.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

try:
    from packaging.requirements import InvalidRequirement, Requirement
except ImportError:  # pragma: no cover - older Slicer Python without packaging
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement  # type: ignore[no-redef]

# Provided by Slicer and never to be replaced (distribution names as pip knows them).
PROTECTED = ("numpy", "SimpleITK", "vtk")
TORCH_REQUIREMENT = ">=2.2"  # as in pyproject.toml


class DependencyError(RuntimeError):
    """Installation failed; the message says what to do (and to restart Slicer)."""


@dataclass
class Missing:
    requirement: str  # the line from requirements.txt
    installed: str | None  # installed version that does not satisfy it, or None


def read_requirements(path: str | Path) -> list[Requirement]:
    reqs = []
    for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            reqs.append(Requirement(line))
        except InvalidRequirement as exc:
            raise DependencyError(f"{path}:{number}: invalid requirement '{line}' ({exc})") from None
    return reqs


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_requirements(path: str | Path) -> list[Missing]:
    """Requirements that are not installed or whose installed version does not satisfy them."""
    out = []
    for req in read_requirements(path):
        if req.marker is not None and not req.marker.evaluate():
            continue
        version = installed_version(req.name)
        if version is None or (req.specifier and not req.specifier.contains(version, prereleases=True)):
            out.append(Missing(str(req), version))
    return out


def torch_installed() -> bool:
    return importlib.util.find_spec("torch") is not None


def constraints_text(protected: Iterable[str] = PROTECTED) -> str:
    """pip constraints pinning the installed versions of Slicer's own packages."""
    lines = []
    for name in protected:
        version = installed_version(name)
        if version is not None:
            lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


def protected_in(requirements: Iterable[Requirement]) -> list[str]:
    """Requirement names that would touch Slicer's own packages (must be empty)."""
    protected = {p.lower() for p in PROTECTED}
    return [r.name for r in requirements if r.name.lower() in protected]


def summary(path: str | Path) -> str:
    """What would be installed, for the consent dialog."""
    parts = []
    if not torch_installed():
        parts.append("PyTorch (through the PyTorch extension when installed, else pip; CPU or the CUDA build for your GPU)")
    parts += [m.requirement + (f" (installed: {m.installed})" if m.installed else "") for m in missing_requirements(path)]
    return "\n".join(parts)


def is_ready(path: str | Path) -> bool:
    return torch_installed() and not missing_requirements(path)


def install(path: str | Path, log: Callable[[str], None] = print) -> None:
    """Install PyTorch and the missing requirements into Slicer's Python (Slicer application only)."""
    import slicer  # the application's slicer package: pip_install runs PythonSlicer -m pip

    reqs = read_requirements(path)
    touched = protected_in(reqs)
    if touched:
        raise DependencyError(f"{path}: must not list Slicer's own packages ({', '.join(touched)})")
    with tempfile.TemporaryDirectory(prefix="strokeseg-pip-") as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text(constraints_text(), encoding="utf-8")
        try:
            if not torch_installed():
                log("Installing PyTorch...")
                _install_torch(constraints, log)
            missing = missing_requirements(path)
            if missing:
                log("Installing " + ", ".join(m.requirement for m in missing) + "...")
                slicer.util.pip_install(f'-r "{path}" -c "{constraints}"')
        except Exception as exc:  # noqa: BLE001 - pip errors come in many types
            raise DependencyError(
                f"Installing StrokeSeg's Python dependencies failed ({exc.__class__.__name__}: {exc}). "
                "Restart Slicer and try again; if it keeps failing, install them from Slicer's Python console "
                f"with slicer.util.pip_install('-r \"{path}\"') and report the error."
            ) from exc
    if not is_ready(path):
        raise DependencyError("Some dependencies are still missing after installation: restart Slicer and try again.")
    log("Dependencies installed.")


def _install_torch(constraints: Path, log: Callable[[str], None]) -> None:
    import slicer

    try:
        import PyTorchUtils  # the PyTorch extension: picks the CUDA build matching the driver
    except ImportError:
        log("PyTorch extension not installed: installing the default PyTorch build with pip.")
        slicer.util.pip_install(f'"torch{TORCH_REQUIREMENT}" -c "{constraints}"')
        return
    torch_logic = PyTorchUtils.PyTorchUtilsLogic()
    if not torch_logic.torchInstalled():
        if torch_logic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT) is None:
            raise DependencyError("the PyTorch extension could not install PyTorch")
