"""Static checks of the Slicer module: .ui <-> code <-> parameters, CMake lists, requirements.

No Slicer application is needed: the .ui is parsed as XML and the Python sources as ASTs.
"""

from __future__ import annotations

import ast
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from slicer_support import MODULE_DIR, REPO_ROOT

UI_FILE = REPO_ROOT / "Resources" / "UI" / "StrokeSeg.ui"
MODULE_FILE = MODULE_DIR / "StrokeSeg.py"
LIB_DIR = MODULE_DIR / "StrokeSegLib"

# Widget class each parameter kind can be bound to (slicer.parameterNodeWrapper's GUI connectors).
CONNECTORS = {
    "float": {"ctkSliderWidget", "QDoubleSpinBox"},
    "bool": {"QCheckBox", "QPushButton"},
    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView"},
    "path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "str": {"QLineEdit", "QTextEdit", "QComboBox"},
}


def ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def ui_bindings() -> dict[str, ET.Element]:
    out = {}
    for widget in ui_widgets().values():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                out[prop.find("string").text] = widget
    return out


def ui_names_used_in_code() -> set[str]:
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        # self.ui.<name>
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui":
            names.add(node.attr)
    return names


def test_every_widget_the_code_uses_exists_in_the_ui():
    widgets = ui_widgets()
    used = ui_names_used_in_code()
    assert used, "StrokeSeg.py uses no self.ui widgets?"
    missing = sorted(used - set(widgets))
    assert not missing, f"StrokeSeg.py uses widgets missing from {UI_FILE.name}: {missing}"


def test_input_rows_the_code_builds_by_name_exist():
    # StrokeSeg.py reaches the slot widgets with getattr(self.ui, f"{name}Label" / f"{name}Selector").
    from StrokeSegLib.parameters import input_parameter_name
    from strokeseg.modality import MODALITY_KEYS

    source = MODULE_FILE.read_text(encoding="utf-8")
    assert 'f"{name}Label"' in source and 'f"{name}Selector"' in source
    widgets = ui_widgets()
    for key in MODALITY_KEYS:
        name = input_parameter_name(key)
        assert f"{name}Label" in widgets and f"{name}Selector" in widgets, key
        assert widgets[f"{name}Selector"].get("class") == "qMRMLNodeComboBox"


def test_every_ui_binding_maps_to_a_parameter_of_a_fitting_kind():
    from StrokeSegLib.parameters import PARAMETERS_BY_NAME

    bindings = ui_bindings()
    assert len(bindings) >= 10
    for name, widget in bindings.items():
        assert name in PARAMETERS_BY_NAME, f"{UI_FILE.name}: widget {widget.get('name')} binds unknown parameter {name}"
        kind = PARAMETERS_BY_NAME[name].kind
        assert widget.get("class") in CONNECTORS[kind], f"{name} ({kind}) bound to a {widget.get('class')}"
        if widget.get("class") == "QComboBox":
            assert PARAMETERS_BY_NAME[name].choices, f"{name}: a QComboBox binding needs choices"


def test_sliders_range_match_the_parameter_ranges():
    from StrokeSegLib.parameters import PARAMETERS_BY_NAME

    for name, widget in ui_bindings().items():
        if widget.get("class") != "ctkSliderWidget":
            continue
        props = {p.get("name"): p for p in widget.findall("property")}
        spec = PARAMETERS_BY_NAME[name]
        assert float(props["minimum"].find("double").text) == spec.minimum, name
        assert float(props["maximum"].find("double").text) == spec.maximum, name
        assert spec.minimum <= spec.default <= spec.maximum


def test_mrml_widgets_get_the_scene():
    root = ET.parse(UI_FILE).getroot()
    receivers = {c.find("receiver").text for c in root.iter("connection")
                 if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"}
    mrml = {name for name, w in ui_widgets().items() if w.get("class", "").startswith("qMRML") and name != "StrokeSeg"}
    assert mrml <= receivers, f"qMRML widgets without setMRMLScene connection: {sorted(mrml - receivers)}"


def test_logic_never_imports_qt_or_the_application():
    forbidden_modules = {"qt", "ctk", "PythonQt", "slicer.ScriptedLoadableModule", "slicer.parameterNodeWrapper"}
    forbidden_attrs = re.compile(r"slicer\.(app|mrmlScene|modules)\b|slicer\.util\.(load|save)[A-Z]")
    for path in sorted(LIB_DIR.glob("*.py")):
        source = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not set(names) & forbidden_modules, f"{path.name} imports {names}"
        assert not forbidden_attrs.search(source), f"{path.name} uses the Slicer application ({forbidden_attrs.search(source).group(0)})"


def cmake_listed_scripts() -> list[str]:
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    block = re.search(r"set\(MODULE_PYTHON_SCRIPTS(.*?)\)", text, re.S).group(1)
    return [line.strip().replace("${MODULE_NAME}", "StrokeSeg") for line in block.splitlines() if line.strip()]


def test_cmake_lists_every_module_script_and_resource():
    listed = set(cmake_listed_scripts())
    on_disk = {"StrokeSeg.py"} | {f"StrokeSegLib/{p.name}" for p in LIB_DIR.glob("*.py")}
    assert listed == on_disk, f"CMake vs disk: missing {sorted(on_disk - listed)}, extra {sorted(listed - on_disk)}"
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "strokeseg/*.py" in text and "GLOB_RECURSE" in text  # the engine package is installed too
    block = re.search(r"set\(STROKESEG_RESOURCE_FILES(.*?)\)", text, re.S).group(1)
    resources = [line.strip().replace("${MODULE_NAME}", "StrokeSeg") for line in block.splitlines() if line.strip()]
    for resource in resources:
        assert (REPO_ROOT / resource).is_file(), resource
    assert {"Resources/UI/StrokeSeg.ui", "Resources/Icons/StrokeSeg.png", "Resources/requirements.txt"} <= set(resources)
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_root_cmake_is_an_extension():
    text = (REPO_ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for needle in ("EXTENSION_HOMEPAGE", 'EXTENSION_CATEGORY "Segmentation"', "EXTENSION_CONTRIBUTORS",
                   "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS",
                   "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(StrokeSegExtension)",
                   "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert needle in text, needle


def test_icon_is_128_square_png():
    from PIL import Image as PILImage

    with PILImage.open(REPO_ROOT / "Resources" / "Icons" / "StrokeSeg.png") as icon:
        assert icon.size == (128, 128) and icon.format == "PNG"


# -- requirements ------------------------------------------------------------------------------
SLICER_PROVIDES = {"numpy", "SimpleITK", "vtk", "vtkmodules", "slicer", "qt", "ctk", "packaging", "pip",
                   "SampleData", "DICOMLib", "PyTorchUtils", "StrokeSegLib", "strokeseg", "torch"}
IMPORT_TO_DISTRIBUTION = {"cc3d": "connected-components-3d", "PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            base = path.parent.name if path.parent.name in ("strokeseg", "StrokeSegLib", "phantom") else ""
            package = "strokeseg.phantom" if base == "phantom" else base
            if node.level == 2:
                package = "strokeseg"
            names.add(f"{package}.{node.module}" if node.module else package)
            names |= {f"{package}.{a.name}" for a in node.names}
    return names


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in ("strokeseg", "StrokeSegLib"):
        return None
    base = MODULE_DIR.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_requirements_cover_what_the_module_imports():
    from StrokeSegLib.dependencies import protected_in, read_requirements

    requirements = read_requirements(REPO_ROOT / "Resources" / "requirements.txt")
    assert not protected_in(requirements), "requirements.txt must not list numpy, SimpleITK or vtk"
    listed = {r.name.lower() for r in requirements}
    # Every module the Slicer module can reach: StrokeSeg.py, StrokeSegLib and the engine modules they import.
    todo = [MODULE_FILE, *LIB_DIR.glob("*.py")]
    seen: set[Path] = set()
    third_party: dict[str, str] = {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            local = _module_file(name)
            if local is not None:
                todo.append(local)
                continue
            top = name.split(".")[0]
            if top and top not in sys.stdlib_module_names and top not in SLICER_PROVIDES and top != "__future__":
                third_party.setdefault(top, path.name)
    assert any(p.parent.name == "strokeseg" for p in seen)
    missing = {top: where for top, where in third_party.items()
               if IMPORT_TO_DISTRIBUTION.get(top, top).lower() not in listed}
    assert not missing, f"imported but not in requirements.txt: {missing}"


def test_help_text_cites_the_five_seed_papers():
    source = MODULE_FILE.read_text(encoding="utf-8")
    tree = ast.parse(source)
    citations = next(ast.literal_eval(n.value) for n in ast.walk(tree)
                     if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "CITATIONS")
    assert len(citations) == 5
    for author in ("Pérez Malla", "Clèrigues", "Chen L, Bentley P, Rueckert D", "Bhavnani", "Liu P"):
        assert any(author in c for c in citations), author
    assert "helpText" in source and "acknowledgementText" in source
    assert 'self.parent.title = _("Stroke Lesion Segmentation")' in source


def test_terminology_file_resolves_in_slicer_terminologies():
    import slicer

    from StrokeSegLib.terminology import CONTEXT_NAME, TERMS

    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    name = logic.LoadTerminologyFromFile(str(REPO_ROOT / "Resources" / "Terminology" / "StrokeSeg.term.json"))
    assert name == CONTEXT_NAME
    for term in TERMS.values():
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(term.terminology, entry)
        assert logic.UpdateEntryFromLoadedTerminologies(entry, [CONTEXT_NAME], [])
        assert entry.GetTypeObject().GetCodeValue() == term.type[1]
        rgb = entry.GetTypeObject().GetRecommendedDisplayRGBValue()
        assert tuple(round(c * 255) for c in term.color) == tuple(rgb), term.key


@pytest.mark.parametrize("entry", ["", "only~two"])
def test_parse_terminology_rejects_non_entries(entry):
    from StrokeSegLib.terminology import parse_terminology

    with pytest.raises(ValueError):
        parse_terminology(entry)


def test_parse_terminology_round_trip():
    from StrokeSegLib.terminology import LESION, parse_terminology

    codes = parse_terminology(LESION.terminology)
    assert codes["category"] == LESION.category and codes["type"] == LESION.type and codes["region"] == LESION.region
    assert codes["type_modifier"] is None


# Slicer's own Python packages: all the module may import before its dependencies are installed.
SLICER_BUNDLED = {"numpy", "SimpleITK", "vtk", "vtkmodules", "slicer", "qt", "ctk", "packaging", "pip", "pydicom"}


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported when ``path`` is imported (module body, incl. top-level if/try; not functions)."""
    names: set[str] = set()
    package = {"strokeseg": "strokeseg", "StrokeSegLib": "StrokeSegLib", "phantom": "strokeseg.phantom"}.get(path.parent.name, "")

    def visit(statements):
        for node in statements:
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    names.add(node.module)
                    names.update(f"{node.module}.{a.name}" for a in node.names)
                else:
                    base = package if node.level == 1 else package.rsplit(".", 1)[0]
                    names.add(f"{base}.{node.module}" if node.module else base)
                    names.update(f"{base}.{node.module + '.' if node.module else ''}{a.name}" for a in node.names)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return names


def test_module_loads_before_its_dependencies_are_installed():
    """Slicer imports StrokeSeg.py at startup: only Slicer's own packages may be needed then,
    or the module (and its Install dependencies button) would not even appear."""
    todo, seen, needed = [MODULE_FILE], set(), {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _top_level_imports(path):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__, ...
                local = _module_file(".".join(parts[:i]))
                if local is not None:
                    todo.append(local)
            top = parts[0]
            if top not in sys.stdlib_module_names and top not in SLICER_BUNDLED | {"StrokeSegLib", "strokeseg", "__future__"}:
                needed.setdefault(top, path.name)
    assert MODULE_DIR / "StrokeSegLib" / "parameters.py" in seen
    assert not needed, f"imported at module load time but not shipped with Slicer: {needed}"


def test_dependency_checks(tmp_path):
    import importlib.metadata

    from StrokeSegLib import dependencies

    numpy_version = importlib.metadata.version("numpy")
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("# comment\nscipy>=1.0  # installed and new enough\nnumpy<1.0\nstrokeseg-no-such-package>=1\n"
                    "pydicom>=2; python_version < '3'\n")
    missing = {m.requirement: m.installed for m in dependencies.missing_requirements(reqs)}
    assert missing == {"numpy<1.0": numpy_version, "strokeseg-no-such-package>=1": None}
    assert dependencies.protected_in(dependencies.read_requirements(reqs)) == ["numpy"]
    assert not dependencies.is_ready(reqs)
    assert "strokeseg-no-such-package>=1" in dependencies.summary(reqs)
    assert f"numpy=={numpy_version}" in dependencies.constraints_text().splitlines()
    reqs.write_text("this is not a requirement!\n")
    with pytest.raises(dependencies.DependencyError, match="requirements.txt:1: invalid requirement"):
        dependencies.read_requirements(reqs)
    # the shipped requirements are satisfied in the test environment (as after a first-use install)
    assert dependencies.is_ready(REPO_ROOT / "Resources" / "requirements.txt")


def test_resources_are_found_in_the_installed_layout(tmp_path):
    """As slicerMacroBuildScriptedModule + our CMake install it: module, StrokeSegLib and Resources side by side."""
    import shutil
    import subprocess

    installed = tmp_path / "lib" / "Slicer-5.8" / "qt-scripted-modules"
    shutil.copytree(LIB_DIR, installed / "StrokeSegLib", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(MODULE_FILE, installed / "StrokeSeg.py")
    for resource in ("UI/StrokeSeg.ui", "Icons/StrokeSeg.png", "requirements.txt"):
        target = installed / "Resources" / resource
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO_ROOT / "Resources" / resource, target)
    code = "from StrokeSegLib import paths; print(paths.resources_dir()); print(paths.requirements_file())"
    out = subprocess.run([sys.executable, "-c", code], cwd=installed, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(installed), "PATH": ""})
    resources, requirements = out.stdout.split()
    assert Path(resources) == installed / "Resources" and Path(requirements).is_file()
