"""Lesion library (real lesion shapes) and the arterial territory atlas, on the template grid.

The SOOP lesion maps and the arterial atlas of Liu et al. (Scientific Data 2023, CC BY-SA 4.0)
live in a 1 mm MNI-like space (157 x 189 x 136) that lines up with the ICBM152 template through
the images' affines; everything is resampled through physical space, never by array index.
When the atlas is missing, a coarse procedural territory map (nearest territory seed point) is
used so that the generator keeps working on a fresh machine.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import cKDTree

from ..errors import InputError
from .anatomy import head_model, mni_to_lps

LESION_GLOB = "*.nii*"
DEFAULT_ATLAS_NAME = "ArterialAtlas136.nii.gz"
SPLITS = ("train", "val", "test")

# Territory seed points (MNI RAS mm) for the procedural fallback atlas; short names follow the
# arterial atlas of Liu et al. so case.json reads the same with or without it.
_SEEDS = {
    "ACA": [(8, 35, 30), (6, 0, 55), (6, -30, 62), (8, 50, 5)],
    "MLS": [(10, 5, 0)],
    "LLS": [(22, 4, 4), (25, -5, 12)],
    "MCAF": [(40, 30, 25), (30, 45, 10)],
    "MCAP": [(42, -40, 40), (35, -20, 48)],
    "MCAT": [(52, -20, -5), (45, 5, -30)],
    "MCAO": [(42, -70, 15)],
    "MCAI": [(36, 0, 4)],
    "PCAT": [(30, -40, -12)],
    "PCAO": [(14, -85, 5), (10, -70, 25)],
    "PCTP": [(12, -20, 6)],
    "ACTP": [(20, -12, -6)],
    "B": [(5, -25, -35)],
    "SC": [(20, -65, -22)],
    "IC": [(25, -65, -48)],
}
_FULL = {
    "ACA": "anterior cerebral artery", "MLS": "medial lenticulostriate", "LLS": "lateral lenticulostriate",
    "MCAF": "frontal pars of middle cerebral artery", "MCAP": "parietal pars of middle cerebral artery",
    "MCAT": "temporal pars of middle cerebral artery", "MCAO": "occipital pars of middle cerebral artery",
    "MCAI": "insular pars of middle cerebral artery", "PCAT": "temporal pars of posterior cerebral artery",
    "PCAO": "occipital pars of posterior cerebral artery", "PCTP": "posterior choroidal and thalamoperforators",
    "ACTP": "anterior choroidal and thalamoperforators", "B": "basilar", "SC": "superior cerebellar",
    "IC": "inferior cerebellar",
}


def lesion_split(path: str | Path) -> str:
    """Deterministic 70/10/20 train/val/test split of a library file, from its name only."""
    name = Path(path).name
    stem = name.split(".nii")[0]
    h = int(hashlib.sha1(stem.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "train" if h < 70 else ("val" if h < 80 else "test")


@dataclass(frozen=True)
class LibraryEntry:
    path: Path
    split: str
    size_bytes: int  # compressed size: a free proxy for lesion extent (no decompression needed)


@lru_cache(maxsize=8)
def library_index(folder: str) -> tuple[LibraryEntry, ...]:
    root = Path(folder)
    if not root.is_dir():
        raise InputError(root, "lesion library folder not found")
    files = sorted(p for p in root.glob(LESION_GLOB) if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InputError(root, "lesion library folder holds no NIfTI lesion maps")
    return tuple(LibraryEntry(p, lesion_split(p), p.stat().st_size) for p in files)


def entries_for(folder: str, split: str | None) -> tuple[LibraryEntry, ...]:
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    return tuple(e for e in library_index(folder) if split is None or e.split == split)


@dataclass
class Region:
    """A sparse fractional map on the template grid: values inside a bounding box."""

    slices: tuple[slice, slice, slice]
    values: np.ndarray  # float32 0..1

    @property
    def volume_ml(self) -> float:
        return float(self.values.sum(dtype=np.float64)) / 1000.0


def _template_reference(slices=None) -> sitk.Image:
    h = head_model()
    sl = slices or tuple(slice(0, s) for s in h.grid.shape)
    shape = tuple(s.stop - s.start for s in sl)
    ref = h.grid.sitk_image(np.zeros(shape, np.uint8), (sl[0].start, sl[1].start, sl[2].start))
    return ref


def _read_lesion(path: str) -> sitk.Image:
    try:
        img = sitk.ReadImage(path, sitk.sitkFloat32)
    except RuntimeError:
        raise InputError(path, "lesion map is not a readable image") from None
    if img.GetDimension() != 3:
        raise InputError(path, "lesion map is not a 3D volume")
    return img


def load_library_lesion(path: Path, flip_lr: bool) -> Region | None:
    """Resample one library lesion onto the template grid (linear, so edges carry partial volume).

    ``flip_lr`` mirrors it through the mid-sagittal plane (x -> -x; the ICBM152 2009a *sym* template
    is left-right symmetric about x = 0). Results are cached (small: only the lesion's box)."""
    r = _library_region(str(path), bool(flip_lr))
    return None if r is None else Region(r.slices, r.values.copy())


@lru_cache(maxsize=512)
def _library_region(path: str, flip_lr: bool) -> Region | None:
    img = _read_lesion(path)
    arr = sitk.GetArrayViewFromImage(img)
    if not np.any(arr > 0.5):
        return None
    # Bounding box of the lesion in physical space -> template index box (with a margin).
    nz = np.argwhere(arr > 0.5)
    lo, hi = nz.min(0), nz.max(0)
    corners = np.array([[x, y, z] for x in (lo[2], hi[2]) for y in (lo[1], hi[1]) for z in (lo[0], hi[0])], float)
    pts = np.array([img.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in corners])
    if flip_lr:
        pts[:, 0] *= -1
    h = head_model()
    idx = h.grid.physical_to_index(pts)
    a = np.maximum(np.floor(idx.min(0)).astype(int) - 3, 0)
    b = np.minimum(np.ceil(idx.max(0)).astype(int) + 4, np.array(h.grid.shape[::-1]))
    if np.any(b <= a):
        return None
    sl = (slice(a[2], b[2]), slice(a[1], b[1]), slice(a[0], b[0]))
    ref = _template_reference(sl)
    tx = sitk.ScaleTransform(3, (-1.0, 1.0, 1.0)) if flip_lr else sitk.Transform()
    out = sitk.Resample(img, ref, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    vals = np.clip(sitk.GetArrayFromImage(out), 0, 1).astype(np.float32)
    if vals.sum() < 1.0:
        return None
    return Region(sl, vals)


# -- arterial territories --------------------------------------------------------------------


@dataclass
class Territories:
    labels: np.ndarray  # uint8 on the template grid (0 = none)
    names: dict[int, str]  # label -> full name, e.g. "frontal pars of middle cerebral artery left"
    short: dict[int, str]  # label -> short, e.g. "MCAFL"
    source: str  # "atlas" or "procedural"

    def ids(self, prefix: str) -> list[int]:
        return [k for k, s in self.short.items() if s[:-1] == prefix]


def _parse_atlas_txt(path: Path) -> tuple[dict[int, str], dict[int, str]]:
    names, short = {}, {}
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.strip().split("|")
        if len(parts) < 3 or not parts[0].strip().isdigit():
            continue
        idx, s, name = int(parts[0]), parts[1].strip(), parts[2].strip()
        # The distributed table repeats some left short names for the right side; fix from the name.
        side = "R" if name.endswith("right") else ("L" if name.endswith("left") else "")
        if side:
            s = re.sub(r"[LR]$", "", s) + side
        names[idx], short[idx] = name, s
    return names, short


@lru_cache(maxsize=4)
def territories(atlas: str | None) -> Territories:
    """Arterial territory labels on the template grid (real atlas if given and present)."""
    h = head_model()
    if atlas and Path(atlas).is_file() and Path(atlas).with_suffix("").with_suffix(".txt").is_file():
        img = sitk.ReadImage(str(atlas))
        out = sitk.Resample(img, _template_reference(), sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        labels = sitk.GetArrayFromImage(out).astype(np.uint8)
        names, short = _parse_atlas_txt(Path(atlas).with_suffix("").with_suffix(".txt"))
        return Territories(labels, names, short, "atlas")
    # Procedural: nearest seed inside the brain, on a 2 mm grid.
    names, short, pts, lab = {}, {}, [], []
    k = 0
    for s, seeds in _SEEDS.items():
        for side, sign in (("L", -1.0), ("R", 1.0)):
            k += 1
            names[k], short[k] = f"{_FULL[s]} {'left' if side == 'L' else 'right'}", s + side
            for p in seeds:
                pts.append(mni_to_lps((sign * p[0], p[1], p[2])))
                lab.append(k)
    tree = cKDTree(np.asarray(pts))
    sub = h.brain[::2, ::2, ::2] > 0
    zyx = np.argwhere(sub) * 2
    _, nn = tree.query(h.grid.index_to_physical(zyx[:, ::-1].astype(float)))
    small = np.zeros(sub.shape, np.uint8)
    small[sub] = np.asarray(lab, np.uint8)[nn]
    labels = np.repeat(np.repeat(np.repeat(small, 2, 0), 2, 1), 2, 2)[: h.grid.shape[0], : h.grid.shape[1], : h.grid.shape[2]]
    labels = labels * (h.brain > 0)
    return Territories(np.ascontiguousarray(labels), names, short, "procedural")


def default_atlas_for(library: str | Path | None) -> str | None:
    """The atlas that ships beside a SOOP lesion folder (``<lib>/../ArterialAtlas136.nii.gz``)."""
    candidates = []
    if library is not None:
        candidates.append(Path(library).parent / DEFAULT_ATLAS_NAME)
    candidates.append(Path(__file__).resolve().parents[3].parent / "shared" / "data" / "soop" / DEFAULT_ATLAS_NAME)
    for c in candidates:
        if c.is_file():
            return str(c)
    return None


def label_volumes(region: Region, terr: Territories) -> dict[str, float]:
    """mL of a region in each territory (full names)."""
    lab = terr.labels[region.slices]
    w = region.values
    out: dict[str, float] = {}
    for k in np.unique(lab[w > 0.25]):
        if k == 0:
            continue
        out[terr.names.get(int(k), str(k))] = float(w[lab == k].sum()) / 1000.0
    return out


def dilate_region(region: Region, iterations: int) -> np.ndarray:
    return ndimage.binary_dilation(region.values > 0.25, iterations=iterations)


def lesion_sources(lesion_library: str | Path | None, atlas: str | Path | bool | None = None) -> tuple[str | None, Territories]:
    """Every phantom's sources of lesions: the library folder (resolved, and validated first: a
    bad folder is an InputError naming it) and the arterial territories of ``atlas`` (None: the
    atlas beside the library if there is one; False: none, the procedural territories)."""
    library = str(Path(lesion_library).resolve()) if lesion_library is not None else None
    if library is not None:
        library_index(library)
    if atlas is None:
        atlas = default_atlas_for(library)
    return library, territories(str(atlas) if atlas else None)
