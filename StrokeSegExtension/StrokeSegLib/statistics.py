"""Lesion statistics as table nodes: a summary (volumes, count, mismatch) and one row per lesion.

The numbers come from the engine's :func:`strokeseg.report.lesion_report` on the segment as it
is now (edits included); tables are ordinary ``vtkMRMLTableNode`` s, so they show in Slicer's
table views, are saved with the scene and export to CSV/TSV.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import vtk

LESION_COLUMNS = (
    # (title, vtk array type, unit, description)
    ("Lesion", "int", "", "lesion number, largest first"),
    ("Volume", "double", "mL", "lesion volume"),
    ("Voxels", "int", "", "number of voxels"),
    ("Centroid R", "double", "mm", "centroid, RAS x"),
    ("Centroid A", "double", "mm", "centroid, RAS y"),
    ("Centroid S", "double", "mm", "centroid, RAS z"),
    ("Hemisphere", "string", "", "left / right / midline"),
    ("Max probability", "double", "", "highest lesion probability inside the lesion"),
    ("Mean probability", "double", "", "mean lesion probability inside the lesion"),
)
SUMMARY_COLUMNS = (("Measure", "string", "", ""), ("Value", "string", "", ""), ("Unit", "string", "", ""))

# Report keys shown in the summary when present; the perfusion ones are named as in the engine's
# perfusion report (strokeseg.perfusion): hypoperfusion includes the core, mismatch = hypo - core.
SUMMARY_ROWS = (
    ("total_volume_ml", "Total lesion volume", "mL"),
    ("lesion_count", "Lesion count", ""),
    ("core_ml", "Infarct core volume", "mL"),
    ("penumbra_ml", "Penumbra volume", "mL"),
    ("hypoperfusion_ml", "Hypoperfused volume", "mL"),
    ("mismatch_ml", "Mismatch volume", "mL"),
    ("mismatch_ratio", "Mismatch ratio", ""),
    ("hir", "Hypoperfusion intensity ratio", ""),
)

_ARRAYS = {"int": vtk.vtkIntArray, "double": vtk.vtkDoubleArray, "string": vtk.vtkStringArray}


def _fill(table_node: Any, columns: Sequence[tuple[str, str, str, str]], rows: Sequence[Sequence[Any]]) -> None:
    table = vtk.vtkTable()
    for title, kind, _, _ in columns:
        array = _ARRAYS[kind]()
        array.SetName(title)
        array.SetNumberOfValues(len(rows))
        table.AddColumn(array)
    for r, row in enumerate(rows):
        for c, ((_, kind, _, _), value) in enumerate(zip(columns, row)):
            array = table.GetColumn(c)
            if kind == "string":
                array.SetValue(r, "" if value is None else str(value))
            elif kind == "int":
                array.SetValue(r, int(value))
            else:
                array.SetValue(r, float("nan") if value is None else float(value))
    table_node.SetAndObserveTable(table)
    for title, _, unit, description in columns:
        if unit:
            table_node.SetColumnUnitLabel(title, unit)
        if description:
            table_node.SetColumnDescription(title, description)
    table_node.SetUseColumnTitleAsColumnHeader(True)
    table_node.Modified()


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def summary_rows(report: Mapping[str, Any]) -> list[list[str]]:
    rows = [[label, _format(report[key]), unit] for key, label, unit in SUMMARY_ROWS if report.get(key) is not None]
    model = report.get("model") or {}
    if model.get("id"):
        rows.append(["Model", f"{model['id']} {model.get('version', '')}".strip(), ""])
    settings = report.get("settings") or {}
    for key, label, unit in (("threshold", "Threshold", ""), ("closing_mm", "Closing radius", "mm"),
                             ("min_lesion_ml", "Minimum lesion size", "mL")):
        if key in settings:
            rows.append([label, _format(float(settings[key])), unit])
    if report.get("edited"):
        rows.append(["Edited by user", "yes", ""])
    return rows


def lesion_rows(report: Mapping[str, Any]) -> list[list[Any]]:
    rows = []
    for lesion in report.get("lesions", []):
        r, a, s = lesion["centroid_ras_mm"]
        rows.append([lesion["id"], lesion["volume_ml"], lesion["voxels"], r, a, s, lesion["hemisphere"],
                     lesion.get("max_probability"), lesion.get("mean_probability")])
    return rows


def update_tables(scene: Any, report: Mapping[str, Any], summary_node: Any = None, lesions_node: Any = None):
    """Fill (creating when None) the summary and per-lesion tables; returns both nodes."""
    if summary_node is None:
        summary_node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName("StrokeSeg summary"))
    if lesions_node is None:
        lesions_node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName("StrokeSeg lesions"))
    _fill(summary_node, SUMMARY_COLUMNS, summary_rows(report))
    _fill(lesions_node, LESION_COLUMNS, lesion_rows(report))
    return summary_node, lesions_node


def table_as_rows(table_node: Any) -> list[dict[str, str]]:
    """A table's content as dicts of strings (for tests and the self-test)."""
    table = table_node.GetTable()
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    return [
        {names[c]: table.GetValue(r, c).ToString() for c in range(len(names))} for r in range(table.GetNumberOfRows())
    ]


# -- perfusion ---------------------------------------------------------------------------------
# (report key, label, unit): the engine's perfusion report keys (strokeseg.perfusion.decision).
PERFUSION_ROWS = (
    ("core_ml", "Infarct core volume", "mL"),
    ("penumbra_ml", "Penumbra volume (hypoperfused minus core)", "mL"),
    ("hypoperfusion_ml", "Hypoperfused volume", "mL"),
    ("mismatch_ml", "Mismatch volume", "mL"),
    ("mismatch_ratio", "Mismatch ratio", ""),
    ("hir", "Hypoperfusion intensity ratio", ""),
    ("tmax_severe_ml", "Severely delayed volume", "mL"),
)


def perfusion_rows(report: Mapping[str, Any]) -> list[list[str]]:
    """Summary rows of a perfusion report; a ratio without a denominator shows as n/a."""
    rows = [[label, "n/a" if report.get(key) is None else _format(report[key]), unit]
            for key, label, unit in PERFUSION_ROWS if key in report]
    th = report.get("thresholds") or {}
    if "core_method" in report:
        rows.append(["Core", str(report["core_method"]), ""])
    by_rcbf = report.get("core_ml_by_rcbf") or {}
    if len(by_rcbf) > 1:  # the computed core at neighbouring rCBF thresholds: how firm the volume is
        for key, value in by_rcbf.items():
            rows.append([f"Core at rCBF < {100 * float(key):g}% (computed)", _format(value), "mL"])
    if "hypoperfusion_method" in report:
        rows.append(["Hypoperfusion", str(report["hypoperfusion_method"]), ""])
    if "tmax_severe_s" in th:
        rows.append(["HIR numerator", f"Tmax > {float(th['tmax_severe_s']):g} s", ""])
    kind = (report.get("input") or {}).get("kind")
    if kind:
        rows.append(["Modality", {"ct": "CT perfusion", "mr": "DSC-MR perfusion"}.get(kind, kind), ""])
    if report.get("healthy_hemisphere"):
        rows.append(["Reference hemisphere", str(report["healthy_hemisphere"]), ""])
    d3 = report.get("defuse3_style") or {}
    if "target_mismatch_profile" in d3:
        rows.append(["DEFUSE 3-style target mismatch (research use only)",
                     "yes" if d3["target_mismatch_profile"] else "no", ""])
    if report.get("edited"):
        rows.append(["Edited by user", "yes", ""])
    return rows


def update_perfusion_table(scene: Any, report: Mapping[str, Any], table_node: Any = None):
    """Fill (creating when None) the perfusion summary table; returns it."""
    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName("StrokeSeg perfusion"))
    _fill(table_node, SUMMARY_COLUMNS, perfusion_rows(report))
    return table_node


def read_report(node: Any) -> dict[str, Any]:
    """The JSON report kept in a text node; {} when there is none (or it is not JSON)."""
    if node is None or not node.GetText():
        return {}
    try:
        return json.loads(node.GetText())
    except json.JSONDecodeError:
        return {}


def write_report(scene: Any, node: Any, report: Mapping[str, Any], name: str, role: str) -> tuple[Any, bool]:
    """``report`` as JSON into ``node``, or into a new text node named ``name`` and marked as the
    module's output ``role`` (so detection skips it); returns (node, created)."""
    from . import detection

    created = node is None
    if created:
        node = scene.AddNewNodeByClass("vtkMRMLTextNode", scene.GenerateUniqueName(name))
        node.SetAttribute(detection.OUTPUT_ATTRIBUTE, role)
    node.SetText(json.dumps(report, indent=2))
    return node, created
