"""The module self-test's perfusion step as a plain function, run both inside Slicer and headless.

:func:`run_perfusion_selftest` simulates a small CT perfusion phantom on this computer (no
download), writes its 4D series as a ``.seq.nrrd`` with Slicer's volume sequence storage node,
loads it back with the caller's loader (inside Slicer the application's Sequences reader; headless
``SlicerContext.load_sequence``), detects it, runs the perfusion logic to the end and checks what a
user would look at: the five maps on the series' voxel grid, the *Infarct core* and *Penumbra*
segments, and the table's core and hypoperfused volumes against the phantom's truth. The loader is
passed in because loading files through the application is not allowed in this Qt-free library.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import slicer

from strokeseg.io import write_image

from .headless import write_sequence
from .parameters import MAP_KEYS, map_parameter_name
from .perfusion import grid_node
from .segmentation import managed_segments, read_mask
from .statistics import PERFUSION_ROWS, table_as_rows
from .volumes import add_sequence_from_image, ijk_to_ras, sequence_for_proxy

# A phantom whose CT core and Tmax > 6 s volumes the pipeline recovers to within a few percent
# (64 x 64 x 6 voxels, 25 frames 2 s apart: seconds to simulate and analyse).
SELFTEST_SEED = 6
SELFTEST_OVERRIDES: dict[str, Any] = dict(size=(64, 64, 6), frames=25, dt=2.0, motion=False, lesion=True,
                                          compute_maps=False)
SERIES_NAME = "CT perfusion phantom"
RELATIVE_TOLERANCE = 0.15  # a table volume passes within 15% of the truth ...
ABSOLUTE_TOLERANCE_ML = 5.0  # ... or within 5 mL (small volumes)
TABLE_LABELS = {key: label for key, label, _ in PERFUSION_ROWS}


class SelfTestFailure(AssertionError):
    """A self-test check failed; the message says which and by how much (one line)."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise SelfTestFailure(message)


def volume_within_tolerance(measured_ml: float, truth_ml: float) -> bool:
    """Within 15% of the truth or within 5 mL of it, whichever is looser."""
    return abs(measured_ml - truth_ml) <= max(RELATIVE_TOLERANCE * truth_ml, ABSOLUTE_TOLERANCE_ML)


def write_phantom(workdir: str | Path, seed: int = SELFTEST_SEED) -> tuple[Path, dict[str, float]]:
    """Simulate the phantom; write ``ctp.seq.nrrd`` (Slicer's sequence format), ``core.nii.gz`` and
    ``penumbra.nii.gz`` into ``workdir``; return the series file and the truth volumes (mL)."""
    from strokeseg.phantom.perfusion import simulate_perfusion

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    case = simulate_perfusion(seed, "ctp", **SELFTEST_OVERRIDES)
    # A private scene: writing the file must not add nodes to the user's scene.
    sequence = add_sequence_from_image(slicer.vtkMRMLScene(), case.images["ctp"], "ctp")
    path = write_sequence(sequence, workdir / "ctp.seq.nrrd")
    write_image(case.truth["core"], workdir / "core.nii.gz")
    write_image(case.truth["penumbra"], workdir / "penumbra.nii.gz")
    core = np.asarray(case.truth["core"].array) > 0
    hypo = core | (np.asarray(case.truth["penumbra"].array) > 0)
    voxel_ml = case.truth["core"].voxel_volume_ml
    truth = {"core_ml": float(core.sum()) * voxel_ml, "hypoperfusion_ml": float(hypo.sum()) * voxel_ml,
             "penumbra_ml": float((hypo & ~core).sum()) * voxel_ml}
    return path, truth


def _as_sequence(scene: Any, node: Any) -> Any:
    """The Sequence node behind what a loader returned (the sequence, its browser or its proxy)."""
    if node is None:
        return None
    if node.IsA("vtkMRMLSequenceBrowserNode"):
        return node.GetMasterSequenceNode()
    if node.IsA("vtkMRMLSequenceNode"):
        return node
    return sequence_for_proxy(scene, node)


def run_perfusion_selftest(
    scene: Any,
    workdir: str | Path,
    load_sequence: Callable[[Path, str], Any],
    *,
    logic: Any = None,
    log: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Phantom -> Sequence in ``scene`` -> perfusion logic -> checks; returns the measured figures.

    ``load_sequence(path, name)`` loads a ``.seq.nrrd`` into ``scene`` and returns the Sequence
    node (or its browser or proxy volume). ``logic`` is StrokeSegLib's ``StrokeSegLogic`` on
    ``scene`` (made when None). Raises :class:`SelfTestFailure` naming the first failed check.
    """
    from .logic import StrokeSegLogic

    log = log or (lambda message: None)
    started = time.monotonic()
    log("Generating the CT perfusion phantom (no download)")
    path, truth = write_phantom(workdir)

    log("Loading the phantom as a Sequence")
    sequence = _as_sequence(scene, load_sequence(path, SERIES_NAME))
    _check(sequence is not None, f"{path.name}: loading gave no Sequence node")
    frames = sequence.GetNumberOfDataNodes()
    _check(frames == SELFTEST_OVERRIDES["frames"], f"{path.name}: {frames} frames loaded, "
                                                   f"{SELFTEST_OVERRIDES['frames']} written")

    logic = logic or StrokeSegLogic(scene)
    logic.detect_inputs()
    series = logic.perfusion.fill_series()
    _check(series is not None and _as_sequence(scene, series) is sequence,
           f"the loaded phantom was not detected as the perfusion series (got {series.GetName() if series else None})")

    log("Computing perfusion maps")
    logic.perfusion.compute()
    p = logic.params

    log("Checking maps, segments and volumes")
    grid = grid_node(scene, sequence)
    dims, matrix = grid.GetImageData().GetDimensions(), ijk_to_ras(grid)
    for key in MAP_KEYS:
        node = p.get(map_parameter_name(key))
        _check(node is not None and node.GetScene() is scene, f"no {key} map in the scene")
        _check(node.GetImageData().GetDimensions() == dims and np.allclose(ijk_to_ras(node), matrix, atol=1e-6),
               f"{node.GetName()} is not on the series' voxel grid")

    segmentation = p.perfusionSegmentation
    _check(segmentation is not None, "no perfusion segmentation in the scene")
    voxels = {}
    for role in ("core", "penumbra"):
        for segment_id in managed_segments(segmentation, role):
            voxels[role] = int(np.count_nonzero(read_mask(segmentation, segment_id, p.perfusionCbf)))
    for role in ("core", "penumbra"):
        _check(voxels.get(role, 0) > 0, f"the {role} segment is missing or empty")

    _check(p.perfusionTable is not None, "no perfusion statistics table in the scene")
    table = {row["Measure"]: row["Value"] for row in table_as_rows(p.perfusionTable)}
    figures: dict[str, Any] = {"series_file": path, "frames": frames, "segment_voxels": voxels}
    for key in ("core_ml", "hypoperfusion_ml"):
        label = TABLE_LABELS[key]
        _check(label in table, f"the perfusion table has no '{label}' row")
        measured = float(table[label])
        _check(volume_within_tolerance(measured, truth[key]),
               f"{label}: {measured:.1f} mL, phantom truth {truth[key]:.1f} mL (allowed: 15% or 5 mL)")
        figures[key] = measured
        figures[f"truth_{key}"] = truth[key]
    figures["truth_penumbra_ml"] = truth["penumbra_ml"]
    figures["seconds"] = time.monotonic() - started
    return figures
