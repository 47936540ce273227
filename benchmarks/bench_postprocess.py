"""Benchmark of lesion post-processing: how fast the mask follows the threshold / closing sliders.

Targets (threshold + 3 mm closing + hole filling + minimum size, on this machine's CPU):
a clinical DWI grid 256 x 256 x 30 at 0.9 x 0.9 x 5 mm within 100 ms, the 1 mm MNI grid
197 x 233 x 189 within 500 ms. Compared in the same process with a naive full-volume pipeline
(scipy closing on the padded volume, scipy hole filling, cc3d.dust) and, for the closing alone,
with scipy and SimpleITK on the full volume and on the bounding box.

Probability maps: a real lesion shape (SOOP, ``--lesion-library``; a procedural blob without
it) blurred into a probability, plus scattered false-positive blobs (they stretch the bounding
box over the brain, as a real model's stray detections do) and sub-threshold noise; a large
multi-focal lesion; and a worst case, a smooth random field that crosses the threshold
everywhere (bounding box = the whole volume).

    python benchmarks/bench_postprocess.py [--lesion-library DIR] [--repeats 7]

Prints a table and writes benchmarks/results/postprocess.json and postprocess.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import cc3d
import numpy as np
import scipy
import scipy.ndimage as ndi
import SimpleITK as sitk

import strokeseg
from strokeseg.image import Image, resample_to
from strokeseg.io import read_image
from strokeseg.postprocess import (
    MaskRefiner,
    PostprocessSettings,
    _close_box,
    ball_footprint,
    binary_closing,
    min_voxels,
    postprocess,
)
from strokeseg.report import lesion_report

HERE = Path(__file__).resolve().parent
DEFAULT_LIBRARY = HERE.parent.parent / "shared" / "data" / "soop" / "lesions"
SETTINGS = PostprocessSettings(threshold=0.5, closing_mm=3.0, min_lesion_ml=0.1, fill_holes=True)
TARGET_MS = {"dwi_5mm": 100.0, "mni_1mm": 500.0}
LESIONS = {"lesion": "bwsrsub-1007_lesion.nii.gz", "large": "bwsrsub-1011_lesion.nii.gz"}


# -- inputs ----------------------------------------------------------------------------------
def mni_template() -> Image:
    import nilearn

    path = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    return read_image(path)


def grids(template: Image) -> dict[str, Image]:
    """The 1 mm MNI grid and an axial clinical DWI grid centred on the same head."""
    size = np.array(template.size)
    centre = template.index_to_physical(((size - 1) / 2.0)[None])[0]
    dwi_size, dwi_sp = np.array([256, 256, 30]), np.array([0.9, 0.9, 5.0])
    origin = centre - (dwi_size - 1) / 2.0 * dwi_sp  # identity direction
    dwi = Image(np.zeros(dwi_size[::-1], np.float32), tuple(dwi_sp), tuple(origin))
    return {"dwi_5mm": dwi, "mni_1mm": template.with_array(np.zeros(template.array.shape, np.float32))}


def procedural_lesion(template: Image, rng: np.random.Generator, radius_mm: float) -> Image:
    """An irregular blob in the left hemisphere, on the template grid."""
    field = ndi.gaussian_filter(rng.random(template.array.shape), 4.0)
    zz, yy, xx = np.ogrid[tuple(slice(0, n) for n in template.array.shape)]
    cz, cy, cx = (np.array(template.array.shape) * np.array([0.55, 0.55, 0.65])).astype(int)
    dist = np.sqrt((zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2)
    blob = dist + 40 * (field - field.mean()) / field.std() * 0.25 < radius_mm
    return template.with_array(blob.astype(np.float32))


def lesion_on_template(name: str, library: Path | None, template: Image, rng) -> tuple[Image, str]:
    if library is not None and (library / LESIONS[name]).is_file():
        lesion = read_image(library / LESIONS[name])
        lesion = lesion.with_array((lesion.array > 0).astype(np.float32))
        return resample_to(lesion, template, linear=True), f"SOOP {LESIONS[name]}"
    return procedural_lesion(template, rng, 14.0 if name == "lesion" else 28.0), "procedural"


def probability_map(grid: Image, kind: str, lesion: Image | None, brain: Image, rng) -> np.ndarray:
    shape = grid.array.shape
    sigma_vox = [1.5 / s for s in grid.spacing[::-1]]
    if kind == "diffuse":  # worst case: above threshold in small patches all over the volume
        p = ndi.gaussian_filter(rng.random(shape).astype(np.float32), [3.0 / s for s in grid.spacing[::-1]])
        p = (p - p.min()) / np.ptp(p)
        return np.clip((p - np.quantile(p, 0.94)) * 4 + 0.5, 0, 1).astype(np.float32)
    in_brain = resample_to(brain, grid, linear=False).array > 0
    frac = resample_to(lesion, grid, linear=True).array
    p = np.clip(ndi.gaussian_filter(frac, sigma_vox) * 1.1, 0, 0.98)
    # Sub-threshold noise and a few stray detections across the brain.
    noise = ndi.gaussian_filter(rng.random(shape).astype(np.float32), sigma_vox)
    p = np.maximum(p, 0.35 * (noise - noise.min()) / np.ptp(noise))
    candidates = np.argwhere(in_brain)
    zz, yy, xx = np.ogrid[tuple(slice(0, n) for n in shape)]
    for _ in range(8):
        cz, cy, cx = candidates[rng.integers(len(candidates))]
        r2 = sum(((a - c) * s) ** 2 for a, c, s in zip((zz, yy, xx), (cz, cy, cx), grid.spacing[::-1]))
        p = np.maximum(p, rng.uniform(0.55, 0.8) * np.exp(-r2 / (2 * 2.5**2)))
    return (p * in_brain).astype(np.float32)


# -- timing ----------------------------------------------------------------------------------
def timed(fn, repeats: int) -> tuple[dict, object]:
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "n": repeats}, result


def naive_pipeline(prob: np.ndarray, spacing, s: PostprocessSettings) -> np.ndarray:
    """Full-volume baseline from library calls: scipy closing (padded), fill, cc3d.dust."""
    m = prob >= s.threshold
    fp = ball_footprint(s.closing_mm, spacing)
    r = [n // 2 for n in fp.shape]
    m = ndi.binary_closing(np.pad(m, [(q, q) for q in r]), fp)[tuple(slice(q, q + n) for q, n in zip(r, prob.shape))]
    if s.fill_holes:
        m = ndi.binary_fill_holes(m)
    return cc3d.dust(m, min_voxels(s.min_lesion_ml, spacing), connectivity=26).astype(np.uint8)


def sitk_closing(mask: np.ndarray, footprint: np.ndarray) -> np.ndarray:
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    radius = [n // 2 for n in footprint.shape[::-1]]  # (x, y, z)
    out = sitk.BinaryMorphologicalClosing(img, radius, sitk.sitkBall, 1, True)  # safeBorder=True
    return sitk.GetArrayFromImage(out).astype(bool)


def bench_closing(mask: np.ndarray, spacing, repeats: int) -> dict:
    fp = ball_footprint(SETTINGS.closing_mm, spacing)
    r = [n // 2 for n in fp.shape]
    if not mask.any():
        return {"times": {}, "differing_voxels_vs_scipy": {}}
    zs, ys, xs = (np.flatnonzero(mask.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    box = (slice(zs[0], zs[-1] + 1), slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
    crop = mask[box]

    def scipy_padded(m):
        out = ndi.binary_closing(np.pad(m, [(q, q) for q in r]), fp)
        return out[tuple(slice(q, q + n) for q, n in zip(r, m.shape))]

    def in_box(fn):
        def run():
            out = np.zeros(mask.shape, bool)
            out[box] = fn(crop)
            return out

        return run

    few = max(1, repeats // 3)
    res: dict = {}
    res["strokeseg (bbox)"], ours = timed(lambda: binary_closing(mask, fp), repeats)
    res["strokeseg (full volume)"], _ = timed(lambda: _close_box(mask, fp), repeats)
    res["scipy (full volume, padded)"], ref = timed(lambda: scipy_padded(mask), few)
    res["scipy (bbox)"], _ = timed(in_box(scipy_padded), few)
    res["SimpleITK (full volume, safe border)"], sk = timed(lambda: sitk_closing(mask, fp), few)
    res["SimpleITK (bbox, safe border)"], _ = timed(in_box(lambda c: sitk_closing(c, fp)), few)
    return {
        "times": res,
        "differing_voxels_vs_scipy": {"strokeseg": int((ours != ref).sum()), "SimpleITK": int((sk != ref).sum())},
    }


def bench_slider(prob: np.ndarray, spacing, repeats: int) -> dict:
    """Slider moves on one MaskRefiner, as the Slicer module makes them."""
    out: dict = {}
    out["init"], refiner = timed(lambda: MaskRefiner(prob, spacing), 1)
    refiner = MaskRefiner(prob, spacing, cache_size=4)
    refiner.mask(SETTINGS)
    moves = {
        "threshold": [PostprocessSettings(0.40 + 0.02 * i, 3.0, 0.1) for i in range(repeats + 1)],
        "closing": [PostprocessSettings(0.5, c, 0.1) for c in (1.0, 1.5, 2.0, 2.5, 3.5, 4.0, 5.0)],
        "min_size": [PostprocessSettings(0.5, 3.0, v) for v in (0.0, 0.05, 0.2, 0.5, 1.0, 2.0, 0.1)],
    }
    for name, seq in moves.items():
        times = []
        for s in seq:
            t0 = time.perf_counter()
            refiner.mask(s)
            times.append((time.perf_counter() - t0) * 1000.0)
        out[name] = {"median_ms": statistics.median(times), "max_ms": max(times), "n": len(times)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lesion-library", type=Path, default=DEFAULT_LIBRARY)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    library = args.lesion_library if args.lesion_library and args.lesion_library.is_dir() else None
    rng = np.random.default_rng(args.seed)

    template = mni_template()
    brain = template.with_array((template.array > np.percentile(template.array, 60)).astype(np.uint8))
    results = {
        "benchmark": "postprocess",
        "settings": SETTINGS.__dict__,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "load_average_at_start": list(os.getloadavg()),
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "SimpleITK": sitk.Version.VersionString(),
            "SimpleITK_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
            "strokeseg": strokeseg.__version__,
        },
        "targets_ms": TARGET_MS,
        "scenarios": [],
    }
    lesions = {name: lesion_on_template(name, library, template, rng) for name in LESIONS}
    for grid_name, grid in grids(template).items():
        for kind in ("lesion", "large", "diffuse"):
            lesion, source = lesions.get(kind, (None, "random field"))
            prob = probability_map(grid, kind, lesion, brain, rng)
            spacing = grid.spacing
            thresholded = prob >= SETTINGS.threshold
            box_fraction = float(np.prod([np.ptp(ix) + 1 for ix in np.nonzero(thresholded)]) / prob.size)
            row: dict = {
                "grid": grid_name,
                "map": kind,
                "source": source,
                "shape_zyx": list(prob.shape),
                "spacing_xyz": list(spacing),
                "thresholded_voxels": int(thresholded.sum()),
                "bbox_fraction_of_volume": box_fraction,
            }
            t_pp, mask = timed(lambda: postprocess(prob, spacing, SETTINGS), args.repeats)
            t_naive, naive = timed(lambda: naive_pipeline(prob, spacing, SETTINGS), max(1, args.repeats // 3))
            assert np.array_equal(mask, naive), "postprocess differs from the naive pipeline"
            img_mask = grid.with_array(mask)
            t_rep, rep = timed(lambda: lesion_report(img_mask, grid.with_array(prob), settings=SETTINGS.__dict__), 3)
            row.update(
                {
                    "lesion_volume_ml": rep["total_volume_ml"],
                    "lesion_count": rep["lesion_count"],
                    "postprocess": t_pp,
                    "naive_full_volume": t_naive,
                    "speedup_vs_naive": t_naive["median_ms"] / t_pp["median_ms"],
                    "target_ms": TARGET_MS[grid_name],
                    "meets_target": t_pp["median_ms"] <= TARGET_MS[grid_name],
                    "closing_only": bench_closing(thresholded, spacing, args.repeats),
                    "slider": bench_slider(prob, spacing, args.repeats),
                    "lesion_report": t_rep,
                }
            )
            results["scenarios"].append(row)
            print(
                f"{grid_name:8s} {kind:8s} bbox {box_fraction:5.1%}  postprocess {t_pp['median_ms']:7.1f} ms "
                f"(target {TARGET_MS[grid_name]:.0f})  naive {t_naive['median_ms']:8.1f} ms  "
                f"x{row['speedup_vs_naive']:5.1f}  slider thr/close/min "
                + "/".join(f"{row['slider'][k]['median_ms']:.1f}" for k in ("threshold", "closing", "min_size"))
                + " ms",
                flush=True,
            )
            for name, t in row["closing_only"]["times"].items():
                print(f"    closing {name:38s} {t['median_ms']:8.1f} ms")
            print(f"    differing voxels vs scipy: {row['closing_only']['differing_voxels_vs_scipy']}")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "postprocess.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "postprocess.md").write_text(markdown(results))
    print(f"wrote {args.out / 'postprocess.json'} and postprocess.md")
    return 0


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Post-processing benchmark",
        "",
        f"threshold {SETTINGS.threshold}, closing {SETTINGS.closing_mm} mm, hole filling, min lesion "
        f"{SETTINGS.min_lesion_ml} mL. {m['cpu_count']} CPUs, load at start {m['load_average_at_start'][0]:.2f}; "
        "median ms (`python benchmarks/bench_postprocess.py`).",
        "",
        "| grid | map | bbox | postprocess | target | naive full volume | speed-up | slider: threshold | closing | min size |"
        " closing: ours | scipy full | SimpleITK full |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["scenarios"]:
        c = r["closing_only"]["times"]
        lines.append(
            f"| {r['grid']} | {r['map']} | {r['bbox_fraction_of_volume']:.0%} | {r['postprocess']['median_ms']:.1f} "
            f"| {r['target_ms']:.0f} | {r['naive_full_volume']['median_ms']:.0f} | {r['speedup_vs_naive']:.0f}x "
            f"| {r['slider']['threshold']['median_ms']:.1f} | {r['slider']['closing']['median_ms']:.1f} "
            f"| {r['slider']['min_size']['median_ms']:.1f} | {c['strokeseg (bbox)']['median_ms']:.1f} "
            f"| {c['scipy (full volume, padded)']['median_ms']:.0f} | {c['SimpleITK (full volume, safe border)']['median_ms']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
