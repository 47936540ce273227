"""Template head model: the MNI ICBM152 2009a templates that nilearn ships, plus a synthetic head.

The nilearn T1 template is skull-stripped (brain and ventricles only, cut at the lower medulla), so
everything outside the intracranial volume is synthesised here from the distance to its surface:
subarachnoid CSF, skull (tables + fatty diploe), scalp (skin/muscle + fat), a neck/skull-base soft
tissue block below the brain, the globes of the eyes, the air of the paranasal sinuses and mastoid
cells (which drive the susceptibility artefacts), and a spinal-cord continuation below the template.

All arrays live on one padded 1 mm template grid in SimpleITK (LPS) convention, index order
(z, y, x), built once per process (``head_model()`` is cached).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

PAD_INFERIOR = 44  # mm of extra grid below the template's floor (MNI z = -72) for skull base and neck
TEMPLATE_NAMES = {k: f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}

# Air spaces in MNI (RAS) mm: centre, semi-axes. Approximate positions of the frontal, ethmoid,
# sphenoid and maxillary sinuses and the mastoid air cells / external ear canals relative to the
# ICBM152 brain; they only need to sit where real ones sit closely enough to put the
# susceptibility artefacts on the orbitofrontal cortex, gyrus rectus and inferior temporal lobes.
AIR_POCKETS_MNI = {
    "frontal_sinus": ((0.0, 80.0, 4.0), (17.0, 6.0, 11.0)),
    "ethmoid": ((0.0, 48.0, -36.0), (9.0, 17.0, 10.0)),
    "sphenoid": ((0.0, 18.0, -44.0), (12.0, 11.0, 9.0)),
    "maxillary_l": ((-30.0, 46.0, -62.0), (12.0, 16.0, 14.0)),
    "maxillary_r": ((30.0, 46.0, -62.0), (12.0, 16.0, 14.0)),
    "mastoid_l": ((-54.0, -34.0, -44.0), (9.0, 12.0, 10.0)),
    "mastoid_r": ((54.0, -34.0, -44.0), (9.0, 12.0, 10.0)),
    "ear_canal_l": ((-66.0, -20.0, -40.0), (7.0, 5.0, 5.0)),
    "ear_canal_r": ((66.0, -20.0, -40.0), (7.0, 5.0, 5.0)),
}
EYES_MNI = {"eye_l": (-33.0, 56.0, -40.0), "eye_r": (33.0, 56.0, -40.0)}
EYE_RADIUS = 12.0


def nilearn_data_dir() -> Path:
    import nilearn

    return Path(nilearn.__file__).resolve().parent / "datasets" / "data"


def mni_to_lps(p) -> np.ndarray:
    p = np.asarray(p, dtype=float)
    return p * np.array([-1.0, -1.0, 1.0])


@dataclass
class Grid:
    """Geometry of the padded 1 mm template grid (LPS; axis-aligned with flips)."""

    shape: tuple[int, int, int]  # (z, y, x)
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    def index_to_physical(self, ijk: np.ndarray) -> np.ndarray:
        d = np.asarray(self.direction).reshape(3, 3)
        return np.atleast_2d(ijk) @ d.T + np.asarray(self.origin)

    def physical_to_index(self, pts: np.ndarray) -> np.ndarray:
        d = np.asarray(self.direction).reshape(3, 3)
        return (np.atleast_2d(pts) - np.asarray(self.origin)) @ d  # d orthonormal

    def sitk_image(self, array: np.ndarray, start_zyx=(0, 0, 0)) -> sitk.Image:
        """Wrap a (sub-)array whose first voxel is template index ``start_zyx``."""
        img = sitk.GetImageFromArray(np.ascontiguousarray(array))
        img.SetSpacing((1.0, 1.0, 1.0))
        img.SetOrigin(tuple(self.index_to_physical(np.array(start_zyx[::-1], float))[0]))
        img.SetDirection(self.direction)
        return img


@dataclass
class HeadModel:
    grid: Grid
    gm: np.ndarray  # tissue fractions (float32, 0..1), sum <= 1 per voxel
    wm: np.ndarray
    csf: np.ndarray  # ventricles + sulci + subarachnoid shell + vitreous of the eyes
    muscle: np.ndarray  # scalp skin/muscle and skull-base/neck soft tissue
    fat: np.ndarray  # subcutaneous fat and fatty marrow of the diploe (fat-suppressed in DWI)
    air: np.ndarray  # sinus and mastoid air (uint8 mask)
    brain: np.ndarray  # parenchyma mask (gm + wm > 0.5), uint8
    icv: np.ndarray  # intracranial volume mask, uint8
    sulcal: np.ndarray  # cortical GM next to CSF (0..1): where atrophy turns GM into CSF
    texture: np.ndarray  # smooth zero-mean unit-variance noise (cached tissue microstructure texture)
    texture2: np.ndarray
    brain_bbox: tuple[slice, slice, slice]  # bounding box of the brain on the grid
    head_bbox: tuple[slice, slice, slice]  # bounding box of everything with signal
    air_pockets: list  # per sinus/mastoid air space: (centre LPS, extent mm, spheres (n, 4))


def _ellipsoid(grid: Grid, centre_mni, semi) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    c_idx = grid.physical_to_index(mni_to_lps(centre_mni)[None])[0]  # (x, y, z) index
    semi = np.asarray(semi, float)
    lo = np.maximum(np.floor(c_idx - semi - 1).astype(int), 0)
    hi = np.minimum(np.ceil(c_idx + semi + 2).astype(int), np.array(grid.shape[::-1]))
    zz, yy, xx = np.mgrid[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]].astype(np.float32)
    r = ((xx - c_idx[0]) / semi[0]) ** 2 + ((yy - c_idx[1]) / semi[1]) ** 2 + ((zz - c_idx[2]) / semi[2]) ** 2
    return r <= 1.0, (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))


def _ramp(d: np.ndarray, a: float, b: float) -> np.ndarray:
    """Fraction of a 1 mm voxel between distances a and b (linear partial volume at both edges)."""
    return (np.clip(d - a + 0.5, 0, 1) - np.clip(d - b + 0.5, 0, 1)).astype(np.float32)


def upsample_linear(a: np.ndarray, factor, shape) -> np.ndarray:
    """Separable linear upsampling by integer factor(s) per axis (sample i of ``a`` sits at
    i * factor), cropped/edge-clamped to ``shape``; much faster than ndimage.zoom on big volumes."""
    out = a.astype(np.float32)
    factors = [factor] * a.ndim if np.isscalar(factor) else list(factor)
    for ax, n in enumerate(shape):
        if factors[ax] == 1 and out.shape[ax] == n:
            continue
        pos = np.arange(n, dtype=np.float32) / factors[ax]
        i0 = np.clip(np.floor(pos).astype(int), 0, out.shape[ax] - 1)
        i1 = np.clip(i0 + 1, 0, out.shape[ax] - 1)
        w = (pos - i0).astype(np.float32)
        bshape = [1] * out.ndim
        bshape[ax] = n
        w = w.reshape(bshape)
        out = np.take(out, i0, axis=ax) * (1 - w) + np.take(out, i1, axis=ax) * w
    return out


def _smooth_noise(shape, sigma: float, seed: int) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian random field of correlation length ~sigma mm."""
    rng = np.random.default_rng(seed)
    f = int(max(1, min(4, sigma // 1.5)))
    small = [s // f + 2 for s in shape]
    n = ndimage.gaussian_filter(rng.standard_normal(small).astype(np.float32), sigma / f)
    n = upsample_linear(n, f, shape)
    return ((n - n.mean()) / (n.std() + 1e-6)).astype(np.float32)


def _pocket_spheres(grid: Grid, zyx: np.ndarray, cell: float = 11.0) -> tuple[np.ndarray, float, np.ndarray]:
    """An air space as a set of spheres (one per 11 mm cell, same volume and centroid), so its
    dipole field follows its shape: (centroid LPS, bounding radius, (n, 4) [x, y, z, radius])."""
    key = np.floor(zyx / cell).astype(int)
    _, inv, counts = np.unique(key, axis=0, return_inverse=True, return_counts=True)
    inv = inv.ravel()
    sums = np.zeros((len(counts), 3))
    np.add.at(sums, inv, zyx)
    cent = grid.index_to_physical((sums / counts[:, None])[:, ::-1])
    radii = (3 * counts / (4 * np.pi)) ** (1 / 3)
    centre = grid.index_to_physical(zyx.mean(0)[::-1][None].astype(float))[0]
    extent = float(np.max(np.linalg.norm(cent - centre, axis=1) + radii))
    return centre, extent, np.column_stack([cent, radii])


@lru_cache(maxsize=1)
def head_model() -> HeadModel:
    """Build (once) the 1 mm head model on the padded template grid."""
    data = nilearn_data_dir()
    imgs = {k: sitk.ReadImage(str(data / name), sitk.sitkFloat32) for k, name in TEMPLATE_NAMES.items()}
    t1, gm, wm = (sitk.GetArrayFromImage(imgs[k]) * np.float32(1 / 255.0) for k in ("t1", "gm", "wm"))
    ref = imgs["t1"]
    direction = ref.GetDirection()
    if not np.allclose(np.abs(np.asarray(direction).reshape(3, 3)), np.eye(3)) or direction[8] < 0:
        raise RuntimeError("unexpected MNI template orientation")
    origin = np.array(ref.GetOrigin()) - np.array([0.0, 0.0, PAD_INFERIOR])  # z axis points superior
    pad = ((PAD_INFERIOR, 0), (0, 0), (0, 0))
    t1, gm, wm = (np.pad(a, pad) for a in (t1, gm, wm))
    del imgs, ref
    grid = Grid(t1.shape, tuple(origin), direction)

    brain_any = t1 > 0.02
    # Spinal cord below the template floor: continue the medulla as a tapering cylinder.
    floor = brain_any[PAD_INFERIOR]
    if floor.any():
        yy, xx = np.nonzero(floor)
        cy, cx = yy.mean(), xx.mean()
        Y, X = np.mgrid[: t1.shape[1], : t1.shape[2]]
        for k in range(PAD_INFERIOR):
            depth = PAD_INFERIOR - k
            r = max(6.0, 11.0 - 0.12 * depth)
            disc = ((Y - cy) / (r * 0.85)) ** 2 + ((X - cx) / r) ** 2
            wm[k][disc <= 0.55] = 0.95  # cord white matter
            brain_any[k] = disc <= 1.0  # with its CSF sleeve
    icv = ndimage.binary_closing(brain_any, structure=ndimage.generate_binary_structure(3, 1), iterations=3)
    icv = ndimage.binary_fill_holes(icv)
    # Signed distance to the intracranial surface (positive outside), on a 2 mm grid for speed.
    outside = ~icv
    d_out = ndimage.distance_transform_edt(outside[::2, ::2, ::2], sampling=2.0).astype(np.float32)
    d_out = upsample_linear(d_out, 2, t1.shape)
    d_out[icv] = 0.0
    del outside, brain_any

    del t1
    shape = gm.shape
    # Tissue fractions inside the ICV; CSF is what GM and WM leave.
    tot = gm + wm
    np.maximum(tot, 1.0, out=tot)
    gm /= tot
    wm /= tot
    del tot
    gm *= icv
    wm *= icv
    csf = icv.astype(np.float32)
    csf -= gm
    csf -= wm
    np.clip(csf, 0, 1, out=csf)

    # Shells outside the ICV (mm from its surface): subarachnoid CSF, skull (tables + fatty
    # diploe), scalp (skin/muscle + subcutaneous fat). Computed only on the voxels near the surface.
    # Skull and scalp thickness vary smoothly over the head.
    csf_t = 1.5
    flat_d = d_out.ravel()
    idx = np.flatnonzero((flat_d > 0) & (flat_d < 26.0))
    d = flat_d[idx]
    skull_t = np.clip(6.0 + 1.2 * _smooth_noise(shape, 18.0, 11).ravel()[idx], 3.5, 9.0)
    scalp_t = np.clip(6.0 + 1.5 * _smooth_noise(shape, 20.0, 12).ravel()[idx], 3.0, 10.0)
    shell = d - csf_t
    bone_all = np.clip(shell + 0.5, 0, 1) - np.clip(shell - skull_t + 0.5, 0, 1)
    marrow = bone_all * np.clip(1.0 - np.abs(shell / skull_t - 0.5) / 0.22, 0, 1) * 0.8
    sc = shell - skull_t
    scalp = np.clip(sc + 0.5, 0, 1) - np.clip(sc - scalp_t + 0.5, 0, 1)
    csf.ravel()[idx] += _ramp(d, 0.0, csf_t)
    fat = np.zeros(shape, np.float32)
    fat.ravel()[idx] = marrow + scalp * 0.45
    muscle = np.zeros(shape, np.float32)
    muscle.ravel()[idx] = scalp * 0.55
    hard = np.zeros(shape, bool)  # voxels that are mostly skull or scalp
    hard.ravel()[idx] = (bone_all >= 0.5) | (scalp >= 0.5)
    head_out = icv.copy()
    head_out.ravel()[idx] = d <= csf_t + skull_t + scalp_t
    del skull_t, scalp_t, shell, bone_all, marrow, sc, scalp, d

    # Skull base and neck: below the temporal lobes the head is a solid block of soft tissue and
    # bone; extrude the head outline of MNI z = -38 downwards (a little narrower with depth).
    z_ref = int(round(grid.physical_to_index(np.array([[0.0, 0.0, -38.0]]))[0, 2]))
    base2d = ndimage.binary_erosion(head_out[z_ref], iterations=2)
    dist2d = ndimage.distance_transform_edt(base2d).astype(np.float32)
    block = np.zeros(shape, bool)
    for k in range(0, z_ref):
        block[k] = dist2d > 0.18 * (z_ref - k)
    block &= ~icv
    # Skull base bone (no signal): a band of the block hugging the ICV floor.
    base_bone = block & (d_out > csf_t) & (d_out < csf_t + 9.0)
    base_bone[z_ref + 4 :] = False
    neck_soft = block & ~hard & ~base_bone
    del block, hard, base_bone, head_out
    texture = _smooth_noise(shape, 3.0, 21)
    t_neck = texture[neck_soft]
    muscle[neck_soft] += np.clip(0.75 + 0.12 * t_neck, 0.4, 1.0)
    fat[neck_soft] += np.clip(0.15 - 0.1 * t_neck, 0.0, 0.3)
    del neck_soft, t_neck

    # Air spaces (signal void), and the eyes (vitreous ~ CSF contrast).
    air = np.zeros(shape, bool)
    pockets = []
    keep_out = ndimage.binary_dilation(icv, iterations=2)
    for c, sm in AIR_POCKETS_MNI.values():
        m, sl = _ellipsoid(grid, c, sm)
        m &= ~keep_out[sl]
        air[sl] |= m
        if m.any():
            pockets.append(_pocket_spheres(grid, np.argwhere(m) + [s_.start for s_ in sl]))
    for c in EYES_MNI.values():
        m, sl = _ellipsoid(grid, c, (EYE_RADIUS,) * 3)
        m &= ~icv[sl]
        csf[sl][m] = 1.0
        muscle[sl][m] = 0.0
        fat[sl][m] = 0.0
    del keep_out
    for arr in (muscle, fat, csf):
        arr[air] = 0.0
        np.clip(arr, 0, 1, out=arr)

    brain = (gm + wm) > 0.5
    sulcal = csf * icv
    sulcal[d_out > 0] = 0.0
    sulcal = ndimage.gaussian_filter(sulcal, 1.2)
    sulcal *= gm
    sulcal *= 2.5
    np.clip(sulcal, 0, 1, out=sulcal)
    del d_out
    bb = ndimage.find_objects(brain.astype(np.uint8))[0]
    anything = (csf > 0.01) | (muscle > 0.01) | (fat > 0.01) | (wm > 0.01)
    head_bb = ndimage.find_objects(anything.astype(np.uint8))[0]
    del anything
    return HeadModel(
        grid=grid,
        gm=gm,
        wm=wm,
        csf=csf,
        muscle=muscle,
        fat=fat,
        air=air.astype(np.uint8),
        brain=brain.astype(np.uint8),
        icv=icv.astype(np.uint8),
        sulcal=sulcal.astype(np.float32),
        texture=texture,
        texture2=_smooth_noise(shape, 2.0, 22),
        brain_bbox=bb,
        head_bbox=head_bb,
        air_pockets=pockets,
    )
