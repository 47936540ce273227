"""Helpers shared by the Slicer tests (test_slicer_*.py): paths, headless scenes, phantom cases.

The Slicer logic (StrokeSegLib) lives next to StrokeSeg.py, outside the installed engine
package, so it is put on sys.path here. Phantom cases are simulated once and kept in pytest's
cache folder (``.pytest_cache``), keyed by generator version, seed and lesion source.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO_ROOT / "StrokeSegExtension"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

# Seeds giving a mid-sized territorial lesion (tens of mL, like a typical acute infarct) with the
# real SOOP lesion shapes and with the procedural shapes used when ../shared/data is absent.
PHANTOM_SEEDS = {"soop": 6, "procedural": 4}
PHANTOM_OVERRIDES = {"lesion_pattern": "territorial"}


def phantom_case(cache, lesion_library: Path | None) -> Path:
    """A DWI phantom case folder (dwi, adc, b0, lesion .nii.gz + case.json), simulated once per cache."""
    from strokeseg.phantom import GENERATOR_VERSION, simulate_dwi, write_case

    source = "soop" if lesion_library is not None else "procedural"
    seed = PHANTOM_SEEDS[source]
    root = Path(cache.mkdir(f"strokeseg-slicer-phantom-{GENERATOR_VERSION}-{source}-{seed}"))
    folders = [p for p in root.iterdir() if (p / "case.json").is_file()]
    if folders:
        return folders[0]
    split = "test" if lesion_library is not None else None
    case = simulate_dwi(seed, lesion_library=lesion_library, split=split, **PHANTOM_OVERRIDES)
    return write_case(case, root)


def synthetic_result(reference, truth, *, sigma: float = 1.0, settings=None):
    """An engine SegmentationResult whose probability map is the smoothed truth (no network needed).

    The slider, edit, export and geometry tests exercise the Slicer side with it; the tests
    with the bundled model check the real network separately.
    """
    import numpy as np
    import scipy.ndimage as ndi

    from strokeseg.models import ModelCard
    from strokeseg.pipeline import SegmentationResult
    from strokeseg.postprocess import PostprocessSettings, postprocess
    from strokeseg.report import lesion_report

    settings = settings or PostprocessSettings(threshold=0.5, closing_mm=0.0, min_lesion_ml=0.0)
    sigma_vox = [sigma / s for s in reference.spacing[::-1]]  # (z, y, x) voxels for sigma mm
    prob = np.clip(1.3 * ndi.gaussian_filter((np.asarray(truth) > 0).astype(np.float32), sigma_vox), 0, 1)
    probability = reference.with_array(prob.astype(np.float32))
    mask = reference.with_array(postprocess(prob, reference.spacing, settings))
    card = ModelCard(raw={"id": "synthetic", "version": "0", "inputs": {"required": ["dwi"], "optional": ["adc"]}},
                     folder=Path("."))
    report = lesion_report(mask, probability, reference=reference, model={"id": "synthetic", "version": "0"},
                           settings=dict(settings.__dict__))
    return SegmentationResult(probability, mask, report, card, settings)


# A small CT perfusion phantom (64 x 64 x 6 voxels, 25 frames, 2 s apart): seconds to analyse.
PERFUSION_SEED = 3
PERFUSION_OVERRIDES = dict(size=(64, 64, 6), frames=25, dt=2.0, motion=False, lesion=True, compute_maps=False)


def perfusion_series_file(cache, lesion_library: Path | None) -> Path:
    """The phantom's 4D series as a ``.seq.nrrd`` written by Slicer's volume sequence storage node
    (what saving a Sequence in Slicer writes), simulated once per cache."""
    from strokeseg.phantom.perfusion import GENERATOR_VERSION, simulate_perfusion

    from StrokeSegLib.headless import create_context, write_sequence
    from StrokeSegLib.volumes import add_sequence_from_image

    source = "soop" if lesion_library is not None else "procedural"
    root = Path(cache.mkdir(f"strokeseg-slicer-ctp-{GENERATOR_VERSION}-{source}-{PERFUSION_SEED}"))
    path = root / "ctp.seq.nrrd"
    if path.is_file():
        return path
    case = simulate_perfusion(PERFUSION_SEED, "ctp", lesion_library, "test" if lesion_library is not None else None,
                              **PERFUSION_OVERRIDES)
    ctx = create_context(root / "cache")
    sequence = add_sequence_from_image(ctx.scene, case.images["ctp"], "ctp")
    tmp = root / f".{path.name}"
    write_sequence(sequence, tmp)
    tmp.replace(path)  # complete files only, for the next run
    return path
