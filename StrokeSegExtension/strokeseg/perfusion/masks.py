"""Brain and tissue masks of a perfusion series, from its pre-contrast (baseline) average.

CT: Hounsfield windows. Bone (and the voxels next to it, which carry its partial volume) is cut
away, the largest soft-tissue component inside the skull is the intracranial space (where the
arterial input is searched), and parenchyma is its 15-65 HU part (CSF below, bone partial volume
and calcification above). Vessels are excluded later, from their blood volume.
MR: no Hounsfield scale; Otsu's threshold on the baseline signal separates head from background,
the largest component with its holes filled is the brain, one voxel is eroded off its rim.
Everything is done per slice in-plane where slices are thick (a 5-10 mm slab has no useful 3D
neighbourhood).
"""

from __future__ import annotations

from dataclasses import dataclass

import cc3d
import numpy as np
from scipy import ndimage

CT_BONE_HU = 120.0
CT_SOFT_HU = (-30.0, 120.0)
CT_TISSUE_HU = (15.0, 65.0)


@dataclass
class Masks:
    head: np.ndarray  # everything that is not air/background (registration, bounding boxes)
    search: np.ndarray  # where arterial input / venous output voxels may be found
    tissue: np.ndarray  # parenchyma: where maps and decisions are made


def _inplane(structure_2d: np.ndarray) -> np.ndarray:
    return structure_2d[None]


def _largest(mask: np.ndarray) -> np.ndarray:
    if not mask.any():
        return mask
    lab = cc3d.connected_components(mask.astype(np.uint8), connectivity=6)
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    return lab == int(np.argmax(counts))


def _fill_slices(mask: np.ndarray) -> np.ndarray:
    return np.stack([ndimage.binary_fill_holes(m) for m in mask])


def ct_masks(baseline: np.ndarray, spacing: tuple[float, float, float]) -> Masks:
    """Masks from the baseline-average CT (HU), array (z, y, x)."""
    sigma = [0.0, 0.6, 0.6]
    b = ndimage.gaussian_filter(baseline.astype(np.float32), sigma)
    head = _largest(b > -300.0)
    head = _fill_slices(head)
    bone = b > CT_BONE_HU
    cross = _inplane(ndimage.generate_binary_structure(2, 1))
    near_bone = ndimage.binary_dilation(bone, structure=cross, iterations=1)
    soft = (b > CT_SOFT_HU[0]) & (b < CT_SOFT_HU[1]) & ~near_bone & head
    # The intracranial space: soft tissue that is enclosed by the skull. The scalp and neck are
    # soft tissue too, but the skull separates them; the largest component inside is the brain.
    inner = _largest(ndimage.binary_erosion(soft, structure=cross, iterations=1))
    inner = ndimage.binary_dilation(inner, structure=cross, iterations=1) & soft
    search = _fill_slices(inner) & ~bone
    tissue = search & (b >= CT_TISSUE_HU[0]) & (b <= CT_TISSUE_HU[1]) & ~near_bone
    return Masks(head=head, search=search, tissue=tissue)


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    w = np.cumsum(hist).astype(float)
    mu = np.cumsum(hist * centres)
    total, mt = w[-1], mu[-1]
    w1 = total - w
    valid = (w > 0) & (w1 > 0)
    between = np.zeros_like(w)
    between[valid] = (mt * w[valid] - mu[valid] * total) ** 2 / (w[valid] * w1[valid] * total)
    return float(centres[int(np.argmax(between))])


def mr_masks(baseline: np.ndarray, spacing: tuple[float, float, float]) -> Masks:
    """Masks from the baseline-average MR signal, array (z, y, x)."""
    b = ndimage.gaussian_filter(baseline.astype(np.float32), [0.0, 0.7, 0.7])
    positive = b[b > 0]
    if positive.size == 0:
        empty = np.zeros(b.shape, bool)
        return Masks(empty, empty, empty)
    # Otsu on the upper part of the histogram: background noise would otherwise dominate.
    thr = _otsu(positive[positive > np.percentile(positive, 5)])
    head = _fill_slices(_largest(b > 0.5 * thr))
    brain = _fill_slices(_largest(b > thr))
    cross = _inplane(ndimage.generate_binary_structure(2, 1))
    tissue = ndimage.binary_erosion(brain, structure=cross, iterations=1)
    return Masks(head=head, search=brain, tissue=tissue)
