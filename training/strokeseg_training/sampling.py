"""Patch sampling and augmentation for 3D training (MONAI transforms on numpy arrays)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)

from .data import Volume


def augmentation(aug: dict[str, Any], n_channels: int, patch_zyx: Sequence[int]) -> Compose:
    """Online augmentation. Axis -1 of (C, z, y, x) on the LPS model grid is left-right."""
    keys = ["image", "label"]
    t = [SpatialPadd(keys, spatial_size=list(patch_zyx))]
    if aug.get("flip_lr", 0.5):
        t.append(RandFlipd(keys, prob=aug.get("flip_lr", 0.5), spatial_axis=2))
    if aug.get("flip_ap", 0.0):
        t.append(RandFlipd(keys, prob=aug["flip_ap"], spatial_axis=1))
    t += [
        RandScaleIntensityd("image", factors=aug.get("scale", 0.1), prob=0.5, channel_wise=True),
        RandShiftIntensityd("image", offsets=aug.get("shift", 0.1), prob=0.5, channel_wise=True),
        RandGaussianNoised("image", prob=aug.get("noise_prob", 0.2), std=aug.get("noise_std", 0.05)),
    ]
    if aug.get("gamma_prob", 0.0):
        t.append(RandAdjustContrastd("image", prob=aug["gamma_prob"], gamma=(0.8, 1.25)))
    return Compose(t)


MIMIC_KINDS = ("bright", "dark_asymmetry")


class PatchSampler:
    """Random patches with a fixed share centred on lesion voxels (balance for small lesions).

    With ``component_fraction`` > 0 that share of the lesion-centred patches first picks a lesion
    (26-connected component) uniformly, so lacunes are seen as often as the territorial infarct
    next to them instead of in proportion to their voxel count.

    With ``hard_negative_fraction`` > 0 that share of the other patches is centred on a lesion
    mimic 3+ voxels from the lesion, which random patches rarely hit because mimics are small and
    uncommon. ``hard_negative_kind`` says what a mimic is:
      ``bright``     the first channel above its ``hard_negative_quantile`` (DWI: T2 shine-through,
                     susceptibility artefacts, WMH);
      ``dark_asymmetry``  how much darker the first channel is than the second, the registered
                     mirror image, above that quantile inside the head (T1, where lesions are dark:
                     CSF spaces made asymmetric by deformation and atrophy). Signed on purpose: an
                     unsigned difference put up to 92% of the mimics on the healthy side facing a
                     lesion, which the mirror channel already makes easy.
    """

    def __init__(self, volumes: list[Volume], patch_zyx: Sequence[int], pos_fraction: float,
                 transform: Compose, rng: np.random.Generator, component_fraction: float = 0.0,
                 hard_negative_fraction: float = 0.0, hard_negative_quantile: float = 99.5,
                 hard_negative_kind: str = "bright"):
        self.volumes = volumes
        self.patch = np.asarray(patch_zyx)
        self.pos_fraction = pos_fraction
        self.component_fraction = component_fraction
        self.hard_negative_fraction = hard_negative_fraction
        self.transform = transform
        self.rng = rng
        self.fg = [np.argwhere(v.label > 0) for v in volumes]
        self.components = [self._components(v, fg) for v, fg in zip(volumes, self.fg)] \
            if component_fraction > 0 else []
        if hard_negative_kind not in MIMIC_KINDS:
            raise ValueError(f"hard_negative_kind must be one of {', '.join(MIMIC_KINDS)}, got {hard_negative_kind!r}")
        self.mimics = [self._mimics(v, hard_negative_quantile, hard_negative_kind) for v in volumes] \
            if hard_negative_fraction > 0 else []

    @staticmethod
    def _mimics(v: Volume, quantile: float, kind: str = "bright") -> np.ndarray:
        """(n, 3) mimic voxels (see the class docstring), 3+ voxels from the lesion."""
        from scipy import ndimage

        if kind == "dark_asymmetry":
            if v.image.shape[0] < 2:
                raise ValueError(f"{v.name}: asymmetry mimics need the mirror image as a second channel")
            # Dark spaces (ventricles, cavities) are holes in the Otsu mask: fill them slice by
            # slice (a cut head is open at the top and bottom). The head's outline never matches
            # its mirror exactly: only what lies 4+ voxels inside it counts.
            head = np.stack([ndimage.binary_fill_holes(sl) for sl in head_mask(v.image[0])])
            inside = ndimage.binary_erosion(head, iterations=4)
            score = np.where(inside, v.image[1].astype(np.float32) - v.image[0], 0.0)
            candidates = inside
        else:
            score, candidates = v.image[0], np.ones(v.label.shape, bool)
        if not candidates.any():
            return np.zeros((0, 3), np.int64)
        mimic = candidates & (score > np.percentile(score[candidates], quantile))
        if v.label.any():
            mimic &= ~ndimage.binary_dilation(v.label > 0, iterations=3)
        return np.argwhere(mimic)

    @staticmethod
    def _components(v: Volume, fg: np.ndarray) -> list[np.ndarray]:
        """Indices into ``fg`` of each lesion component."""
        if not len(fg):
            return []
        import cc3d
        labels = cc3d.connected_components(np.ascontiguousarray(v.label > 0), connectivity=26)
        ids = labels[tuple(fg.T)]
        order = np.argsort(ids, kind="stable")
        bounds = np.flatnonzero(np.diff(ids[order])) + 1
        return np.split(order, bounds)

    def _lesion_voxel(self, i: int) -> np.ndarray:
        fg = self.fg[i]
        if self.components and self.rng.random() < self.component_fraction:
            comp = self.components[i][self.rng.integers(len(self.components[i]))]
            return fg[comp[self.rng.integers(len(comp))]]
        return fg[self.rng.integers(len(fg))]

    def _jitter(self) -> np.ndarray:
        """A random offset of up to a quarter patch, so a chosen voxel is not always the centre."""
        return self.rng.integers(-self.patch // 4, self.patch // 4 + 1)

    def _crop(self, v: Volume, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shape = np.asarray(v.label.shape)
        start = np.clip(centre - self.patch // 2, 0, np.maximum(shape - self.patch, 0))
        sl = tuple(slice(int(s), int(s + p)) for s, p in zip(start, self.patch))
        return v.image[(slice(None),) + sl].astype(np.float32), v.label[sl][None].astype(np.float32)

    def sample(self) -> dict[str, np.ndarray]:
        i = int(self.rng.integers(len(self.volumes)))
        v, fg = self.volumes[i], self.fg[i]
        if len(fg) and self.rng.random() < self.pos_fraction:
            centre = self._lesion_voxel(i) + self._jitter()
        elif self.mimics and len(self.mimics[i]) and self.rng.random() < self.hard_negative_fraction:
            centre = self.mimics[i][self.rng.integers(len(self.mimics[i]))] + self._jitter()
        else:
            centre = np.array([self.rng.integers(s) for s in v.label.shape])
        img, lab = self._crop(v, centre)
        out = self.transform({"image": img, "label": lab})
        return {k: torch.as_tensor(np.asarray(out[k])) for k in ("image", "label")}

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self.sample() for _ in range(n)]
        return torch.stack([it["image"] for it in items]), torch.stack([it["label"] for it in items])


# -- samplers of the paper recipes (recipes/paper00*.py); the default trainer uses none of them --


def head_mask(image: np.ndarray) -> np.ndarray:
    """(z, y, x) head / brain mask of one normalised channel: Otsu threshold (SimpleITK), for
    drawing background patches inside the head (paper 000's intracranial mask, 001's brain)."""
    import SimpleITK as sitk

    a = np.asarray(image, dtype=np.float32)
    if float(a.max()) <= float(a.min()):
        return np.ones(a.shape, dtype=bool)
    mask = sitk.GetArrayFromImage(sitk.OtsuThreshold(sitk.GetImageFromArray(a), 0, 1)).astype(bool)
    return mask if mask.any() else np.ones(a.shape, dtype=bool)


def crop_padded(array: np.ndarray, centre: Sequence[int], size: Sequence[int], fill: float | Sequence[float] = 0.0) -> np.ndarray:
    """The ``size`` window of the last len(size) axes centred on ``centre`` (start = centre - size // 2),
    padded with ``fill`` (per leading channel when a sequence) where it leaves the array."""
    nd = len(size)
    lead = array.shape[: array.ndim - nd]
    shape = np.asarray(array.shape[-nd:])
    start = np.asarray(centre, dtype=np.int64) - np.asarray(size) // 2
    lo = np.maximum(start, 0)
    hi = np.minimum(start + np.asarray(size), shape)
    out = np.empty(lead + tuple(int(s) for s in size), dtype=np.float32)
    if np.ndim(fill) and lead:
        out[...] = np.asarray(fill, dtype=np.float32).reshape(lead + (1,) * nd)
    else:
        out[...] = float(np.asarray(fill).ravel()[0]) if np.ndim(fill) else float(fill)
    if np.all(hi > lo):
        src = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        dst = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, start))
        out[(Ellipsis,) + dst] = array[(Ellipsis,) + src]
    return out


def intensity_shift_scale(image: np.ndarray, rng: np.random.Generator, shift_sd: float = 0.05,
                          scale_sd: float = 0.01) -> np.ndarray:
    """Paper 000's online augmentation, per channel: I' = (I + s) m, s ~ N(0, 0.05), m ~ N(1, 0.01)."""
    c = image.shape[0]
    s = rng.normal(0.0, shift_sd, c).astype(np.float32).reshape((c,) + (1,) * (image.ndim - 1))
    m = rng.normal(1.0, scale_sd, c).astype(np.float32).reshape((c,) + (1,) * (image.ndim - 1))
    return (image + s) * m


class WeightedPatchSampler:
    """Paper 000 (DeepMedic): segments centred on a lesion voxel with probability ``pos_fraction``,
    else on a head voxel outside the lesion; within each class the centre is drawn with
    probability proportional to a per-voxel weight map (uniform without one: the baseline;
    error maps for the fine-tuning of experiment E2). Online: left-right flip (p = 0.5) and the
    intensity shift / scale of :func:`intensity_shift_scale`."""

    def __init__(self, volumes: list[Volume], patch_zyx: Sequence[int], pos_fraction: float, rng: np.random.Generator,
                 weights: list[np.ndarray] | None = None, flip_lr: float = 0.5, shift_sd: float = 0.05,
                 scale_sd: float = 0.01):
        self.volumes, self.patch, self.rng = volumes, tuple(int(p) for p in patch_zyx), rng
        self.pos_fraction, self.flip_lr, self.shift_sd, self.scale_sd = pos_fraction, flip_lr, shift_sd, scale_sd
        self.pools = []  # per volume: (fg indices, fg cumulative weights, bg indices, bg cumulative weights)
        for i, v in enumerate(volumes):
            w = None if weights is None else np.asarray(weights[i], dtype=np.float64)
            fg = v.label > 0
            bg = head_mask(v.image[0].astype(np.float32)) & ~fg
            self.pools.append(tuple(x for m in (fg, bg) for x in self._pool(m, w)))
        self.fill = [v.image.reshape(v.image.shape[0], -1).min(1).astype(np.float32) for v in volumes]

    @staticmethod
    def _pool(mask: np.ndarray, w: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        idx = np.flatnonzero(mask)
        if w is None or not len(idx):
            return idx, None
        ww = np.clip(w.ravel()[idx], 0.0, None)
        return idx, (np.cumsum(ww) if ww.sum() > 0 else None)

    def _draw(self, idx: np.ndarray, cum: np.ndarray | None) -> int:
        if cum is None:
            return int(idx[self.rng.integers(len(idx))])
        return int(idx[min(int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right")), len(idx) - 1)])

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        i = int(self.rng.integers(len(self.volumes)))
        v = self.volumes[i]
        fg, fgc, bg, bgc = self.pools[i]
        use_fg = len(fg) and (self.rng.random() < self.pos_fraction or not len(bg))
        flat = self._draw(fg, fgc) if use_fg else self._draw(bg, bgc) if len(bg) else int(self.rng.integers(v.label.size))
        centre = np.unravel_index(flat, v.label.shape)
        img = crop_padded(v.image.astype(np.float32), centre, self.patch, self.fill[i])
        lab = crop_padded(v.label.astype(np.float32), centre, self.patch)[None]
        if self.rng.random() < self.flip_lr:
            img, lab = img[..., ::-1], lab[..., ::-1]
        img = intensity_shift_scale(img, self.rng, self.shift_sd, self.scale_sd)
        return np.ascontiguousarray(img), np.ascontiguousarray(lab)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self.sample() for _ in range(n)]
        return torch.from_numpy(np.stack([a for a, _ in items])), torch.from_numpy(np.stack([b for _, b in items]))


# Paper 001's lesion-patch augmentations: identity, sagittal reflection, 90/180/270 degree axial rotations.
AXIAL_OPS = ("none", "flip_lr", "rot90", "rot180", "rot270")


def axial_op(a: np.ndarray, op: str) -> np.ndarray:
    """Apply one of :data:`AXIAL_OPS` to the last two axes (y, x) of ``a``."""
    if op == "none":
        return a
    if op == "flip_lr":
        return a[..., ::-1]
    k = {"rot90": 1, "rot180": 2, "rot270": 3}[op]
    return np.rot90(a, k, axes=(-2, -1))


class BalancedPatchSet:
    """Paper 001: a fixed set of ``per_case`` patches per case, half centred on healthy head voxels
    taken at regular spatial steps, half on lesion voxels plus a random offset of up to half the
    patch size (the oligaemic surroundings), lesion patches augmented by a random one of
    :data:`AXIAL_OPS` (axial rotations need a square y-x patch). Cases without lesion give only
    healthy patches. ``augment=False`` gives the validation patches of early stopping."""

    def __init__(self, volumes: list[Volume], patch_zyx: Sequence[int], per_case: int, rng: np.random.Generator,
                 augment: bool = True):
        self.patch = tuple(int(p) for p in patch_zyx)
        rot_ok = self.patch[1] == self.patch[2]
        images, labels = [], []
        for v in volumes:
            fill = v.image.reshape(v.image.shape[0], -1).min(1).astype(np.float32)
            fg = np.argwhere(v.label > 0)
            healthy = head_mask(v.image[0].astype(np.float32)) & (v.label == 0)
            n_les = per_case // 2 if len(fg) else 0
            centres = [(c, False) for c in self._regular(healthy, per_case - n_les)]
            half = np.asarray(self.patch) // 2
            for _ in range(n_les):
                c = fg[rng.integers(len(fg))] + rng.integers(-half, half + 1)
                centres.append((c, True))
            for c, lesion in centres:
                img = crop_padded(v.image.astype(np.float32), c, self.patch, fill)
                lab = crop_padded(v.label.astype(np.float32), c, self.patch)
                if augment and lesion:
                    op = AXIAL_OPS[rng.integers(len(AXIAL_OPS) if rot_ok else 2)]
                    img, lab = axial_op(img, op), axial_op(lab, op)
                images.append(np.ascontiguousarray(img, dtype=np.float16))
                labels.append(np.ascontiguousarray(lab, dtype=np.uint8))
        if not images:
            raise ValueError("no patches: the volumes have neither lesion nor head voxels")
        self.images, self.labels = np.stack(images), np.stack(labels)[:, None]
        self.rng = rng

    @staticmethod
    def _regular(mask: np.ndarray, n: int) -> list[np.ndarray]:
        """About ``n`` voxels of ``mask`` on a regular grid (the step chosen from the mask's size)."""
        pts = np.argwhere(mask)
        if n <= 0 or not len(pts):
            return []
        step = max(1, int(np.floor((len(pts) / n) ** (1.0 / 3.0))))
        while step > 1 and int(np.all(pts % step == 0, axis=1).sum()) < n:
            step -= 1
        grid = pts[np.all(pts % step == 0, axis=1)]
        keep = np.linspace(0, len(grid) - 1, num=min(n, len(grid))).round().astype(int)
        return list(grid[keep])

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int, shuffle: bool = True):
        """One epoch of (image, label) tensor batches."""
        order = self.rng.permutation(len(self)) if shuffle else np.arange(len(self))
        for s in range(0, len(order), batch_size):
            sel = order[s : s + batch_size]
            yield torch.from_numpy(self.images[sel].astype(np.float32)), torch.from_numpy(self.labels[sel].astype(np.float32))


class SlicePatchSampler:
    """Paper 002: 2D in-plane patches (``patch_yx``) of the model-grid slices. A lesion pixel is
    drawn and placed at a uniformly random position in the patch (so patches mix lesion and
    tissue); ``random_fraction`` of the patches are anywhere in the head instead (the phantoms
    have lesion-free slices and distractors the paper's lesion-centred sampling never shows).
    Online: horizontal flip (p = 0.5) and a random in-plane rotation of up to ``rotate_deg``."""

    def __init__(self, volumes: list[Volume], patch_yx: Sequence[int], rng: np.random.Generator,
                 random_fraction: float = 0.2, rotate_deg: float = 15.0, flip: float = 0.5):
        self.volumes, self.patch, self.rng = volumes, tuple(int(p) for p in patch_yx), rng
        self.random_fraction, self.rotate_deg, self.flip = random_fraction, rotate_deg, flip
        self.fg = [np.argwhere(v.label > 0) for v in volumes]
        self.head = [np.argwhere(head_mask(v.image[0].astype(np.float32))) for v in volumes]
        self.fill = [v.image.reshape(v.image.shape[0], -1).min(1).astype(np.float32) for v in volumes]

    def sample(self) -> tuple[np.ndarray, np.ndarray]:
        i = int(self.rng.integers(len(self.volumes)))
        v, fg = self.volumes[i], self.fg[i]
        py, px = self.patch
        if len(fg) and self.rng.random() >= self.random_fraction:
            z, y, x = fg[self.rng.integers(len(fg))]
            # the lesion pixel lands at (oy, ox) of the patch: crop centre = pixel - offset + half
            oy, ox = self.rng.integers(py), self.rng.integers(px)
            cy, cx = y - oy + py // 2, x - ox + px // 2
        else:
            z, cy, cx = self.head[i][self.rng.integers(len(self.head[i]))]
        img = crop_padded(v.image[:, z].astype(np.float32), (cy, cx), self.patch, self.fill[i])
        lab = crop_padded(v.label[z].astype(np.float32), (cy, cx), self.patch)[None]
        if self.rng.random() < self.flip:
            img, lab = img[..., ::-1], lab[..., ::-1]
        if self.rotate_deg > 0:
            from scipy import ndimage

            ang = float(self.rng.uniform(-self.rotate_deg, self.rotate_deg))
            img = np.stack([ndimage.rotate(c, ang, reshape=False, order=1, mode="nearest") for c in img])
            lab = ndimage.rotate(lab[0], ang, reshape=False, order=0, mode="constant")[None]
        return np.ascontiguousarray(img, dtype=np.float32), np.ascontiguousarray(lab, dtype=np.float32)

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self.sample() for _ in range(n)]
        return torch.from_numpy(np.stack([a for a, _ in items])), torch.from_numpy(np.stack([b for _, b in items]))
