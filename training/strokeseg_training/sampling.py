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


class PatchSampler:
    """Random patches with a fixed share centred on lesion voxels (balance for small lesions).

    With ``component_fraction`` > 0 that share of the lesion-centred patches first picks a lesion
    (26-connected component) uniformly, so lacunes are seen as often as the territorial infarct
    next to them instead of in proportion to their voxel count.
    """

    def __init__(self, volumes: list[Volume], patch_zyx: Sequence[int], pos_fraction: float,
                 transform: Compose, rng: np.random.Generator, component_fraction: float = 0.0):
        self.volumes = volumes
        self.patch = np.asarray(patch_zyx)
        self.pos_fraction = pos_fraction
        self.component_fraction = component_fraction
        self.transform = transform
        self.rng = rng
        self.fg = [np.argwhere(v.label > 0) for v in volumes]
        self.components = [self._components(v, fg) for v, fg in zip(volumes, self.fg)] \
            if component_fraction > 0 else []

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

    def _crop(self, v: Volume, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shape = np.asarray(v.label.shape)
        start = np.clip(centre - self.patch // 2, 0, np.maximum(shape - self.patch, 0))
        sl = tuple(slice(int(s), int(s + p)) for s, p in zip(start, self.patch))
        return v.image[(slice(None),) + sl].astype(np.float32), v.label[sl][None].astype(np.float32)

    def sample(self) -> dict[str, np.ndarray]:
        i = int(self.rng.integers(len(self.volumes)))
        v, fg = self.volumes[i], self.fg[i]
        if len(fg) and self.rng.random() < self.pos_fraction:
            centre = self._lesion_voxel(i) + self.rng.integers(-self.patch // 4, self.patch // 4 + 1)
        else:
            centre = np.array([self.rng.integers(s) for s in v.label.shape])
        img, lab = self._crop(v, centre)
        out = self.transform({"image": img, "label": lab})
        return {k: torch.as_tensor(np.asarray(out[k])) for k in ("image", "label")}

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self.sample() for _ in range(n)]
        return torch.stack([it["image"] for it in items]), torch.stack([it["label"] for it in items])
