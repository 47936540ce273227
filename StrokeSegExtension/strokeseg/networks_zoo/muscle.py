"""Paper 002: MUSCLE Net, the second stage that re-evaluates small candidate lesions.

The EDD Net's probability map is thresholded; 2D connected components (8-connected, per slice) of
at most 60 pixels — where ~99 % of the EDD Net's false positives lie — are candidates. Around each
candidate, DWI patches at several scales plus the EDD probability patch are resized to one patch
size and stacked as channels; the MUSCLE Net (a mini VGG: four 3x3 convolutions, one max-pool,
three fully connected layers) outputs the probability that the candidate is a lesion.

Fusion (the paper says only "fused using Bayes' theorem"; this is the standard combination of
two posteriors under conditional independence of their evidence given the class). With the
EDD pixel posterior p = P(lesion | pixel evidence), the MUSCLE instance posterior
q = P(lesion | patch evidence) and the prior pi = P(lesion):

    P(lesion | both) = p q / pi / (p q / pi + (1 - p)(1 - q) / (1 - pi))
                     = p q (1 - pi) / (p q (1 - pi) + (1 - p)(1 - q) pi)

With pi = 0.5 (the MUSCLE Net is trained on balanced candidates): p q / (p q + (1 - p)(1 - q)),
so q > 0.5 raises the candidate's pixels, q < 0.5 lowers them, q = 0.5 leaves them unchanged.
Pixels outside small candidates are left as the EDD Net gave them.

``EDDMuscle`` ("strokeseg.EDDMuscle") puts both stages in one module so a model card runs the
whole method: in training mode it is the EDD Net (train the MUSCLE Net separately on
:func:`muscle_training_samples`), in eval mode its output is the fused probability as logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from ..networks import register_network
from .edd import EDDNet

# In-plane 8-connectivity, nothing across slices: the method is 2D.
_SLICE_8 = np.zeros((3, 3, 3), dtype=bool)
_SLICE_8[1] = True


class MuscleNet(nn.Module):
    """(K, len(scales) + 1, patch_size, patch_size) -> logits (K, num_classes) per candidate."""

    def __init__(
        self,
        scales: Sequence[int] = (16, 32, 48),
        patch_size: int = 16,
        channels: Sequence[int] = (32, 32, 64, 64),
        pool_after: int = 2,
        fc_channels: Sequence[int] = (256, 128),
        num_classes: int = 2,
        dropout: float = 0.5,
    ):
        super().__init__()
        self.scales = tuple(int(s) for s in scales)
        self.patch_size = int(patch_size)
        self.num_classes = int(num_classes)
        if not self.scales or min(self.scales) < 1 or self.patch_size < 2:
            raise ValueError("MUSCLE Net needs positive scales and a patch size >= 2")
        if not 1 <= pool_after <= len(channels):
            raise ValueError("pool_after must name one of the convolutions")
        layers: list[nn.Module] = []
        cin = len(self.scales) + 1
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(cin, int(c), 3, padding=1), nn.BatchNorm2d(int(c)), nn.ReLU(inplace=True)]
            if i + 1 == pool_after:
                layers.append(nn.MaxPool2d(2))
            cin = int(c)
        self.features = nn.Sequential(*layers)
        flat = cin * (self.patch_size // 2) ** 2
        fc: list[nn.Module] = [nn.Flatten()]
        for c in fc_channels:
            fc += [nn.Linear(flat, int(c)), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            flat = int(c)
        fc.append(nn.Linear(flat, self.num_classes))
        self.classifier = nn.Sequential(*fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def lesion_probability(self, x: torch.Tensor) -> torch.Tensor:
        logits = self(x)
        return torch.softmax(logits, 1)[:, -1] if self.num_classes > 1 else torch.sigmoid(logits[:, 0])


def bayes_fuse(p: torch.Tensor | np.ndarray, q: torch.Tensor | np.ndarray | float, prior: float = 0.5):
    """Posterior from two conditionally independent posteriors p and q with a shared prior."""
    if not 0.0 < prior < 1.0:
        raise ValueError("prior must be in (0, 1)")
    yes = p * q * (1.0 - prior)
    no = (1.0 - p) * (1.0 - q) * prior
    return yes / (yes + no + 1e-12)


@dataclass
class Candidates:
    """Small connected components: a label map and, per candidate, its label, slice and centre."""

    labels: np.ndarray  # (n, y, x) int32, 0 = none
    ids: np.ndarray  # (K,) label of each small candidate
    centres: np.ndarray  # (K, 3) integer (slice, row, column) of each candidate's centroid


def find_candidates(probability: np.ndarray, threshold: float = 0.5, max_pixels: int = 60) -> Candidates:
    """2D components (8-connected, per slice) of ``probability >= threshold`` with <= ``max_pixels``."""
    prob = np.asarray(probability)
    if prob.ndim == 2:
        prob = prob[None]
    if prob.ndim != 3:
        raise ValueError(f"probability must be (y, x) or a (n, y, x) stack of slices, got shape {prob.shape}")
    labels, n = ndimage.label(prob >= threshold, structure=_SLICE_8)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    ids = np.nonzero((sizes <= max_pixels) & (np.arange(n + 1) > 0))[0]
    if len(ids):
        centres = np.rint(np.asarray(ndimage.center_of_mass(np.ones_like(labels), labels, ids))).astype(np.int64)
    else:
        centres = np.zeros((0, 3), dtype=np.int64)
    return Candidates(labels.astype(np.int32), ids.astype(np.int32), centres.reshape(-1, 3))


def muscle_patches(probability: torch.Tensor, image: torch.Tensor, centres: np.ndarray,
                   scales: Sequence[int], patch_size: int) -> torch.Tensor:
    """(K, len(scales) + 1, P, P): image windows of side ``s`` for each scale, then the probability
    window of the smallest scale, each centred on a candidate and resized to P x P (zero outside)."""
    if len(centres) == 0:
        return image.new_zeros((0, len(scales) + 1, patch_size, patch_size))
    margin = max(max(scales), 1)
    pad = (margin, margin, margin, margin)
    img = F.pad(image.float(), pad)
    prb = F.pad(probability.float(), pad)
    channels = []
    sources = [(img, s) for s in scales] + [(prb, min(scales))]
    for src, s in sources:
        crops = []
        for z, cy, cx in centres.tolist():
            y0, x0 = cy - s // 2 + margin, cx - s // 2 + margin
            crops.append(src[z, y0 : y0 + s, x0 : x0 + s])
        stack = torch.stack(crops)[:, None]
        if s != patch_size:
            stack = F.interpolate(stack, size=(patch_size, patch_size), mode="bilinear", align_corners=False,
                                  antialias=s > patch_size)
        channels.append(stack)
    return torch.cat(channels, dim=1)


def _as_tensor(a: Any, device: torch.device) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().to(device=device, dtype=torch.float32)
    return torch.as_tensor(np.asarray(a, dtype=np.float32), device=device)


def muscle_refine(
    probability: torch.Tensor | np.ndarray,
    image: torch.Tensor | np.ndarray,
    net: MuscleNet,
    *,
    threshold: float = 0.5,
    max_pixels: int = 60,
    prior: float = 0.5,
    batch_size: int = 256,
) -> torch.Tensor | np.ndarray:
    """Re-evaluate small candidates of a (n, y, x) probability stack with the MUSCLE Net.

    ``image`` is the (n, y, x) DWI the EDD Net saw. Each candidate's pixels get
    ``bayes_fuse(p, q, prior)`` with q the MUSCLE lesion probability; everything else is kept.
    Returns the same type (numpy or torch, on the same device) and shape as ``probability``.
    """
    as_numpy = not isinstance(probability, torch.Tensor)
    device = next(net.parameters()).device
    prob = _as_tensor(probability, device)
    img = _as_tensor(image, device)
    squeeze = prob.dim() == 2
    if squeeze:
        prob, img = prob[None], img[None]
    if prob.shape != img.shape or prob.dim() != 3:
        raise ValueError(f"probability {tuple(prob.shape)} and image {tuple(img.shape)} must be matching (n, y, x) stacks")
    cands = find_candidates(prob.cpu().numpy(), threshold, max_pixels)
    out = prob.clone()
    if len(cands.ids):
        patches = muscle_patches(prob, img, cands.centres, net.scales, net.patch_size)
        was_training = net.training
        net.eval()
        with torch.no_grad():
            q = torch.cat([net.lesion_probability(patches[i : i + batch_size]) for i in range(0, len(patches), batch_size)])
        net.train(was_training)
        lut = torch.full((int(cands.labels.max()) + 1,), float("nan"), device=device)
        lut[torch.as_tensor(cands.ids, device=device, dtype=torch.long)] = q.float()
        qmap = lut[torch.as_tensor(cands.labels, device=device, dtype=torch.long)]
        hit = ~torch.isnan(qmap)
        out[hit] = bayes_fuse(prob[hit], qmap[hit], prior)
    if squeeze:
        out = out[0]
    if as_numpy:
        return out.cpu().numpy()
    return out.to(probability.device)


def muscle_training_samples(
    probability: np.ndarray,
    image: np.ndarray,
    truth: np.ndarray,
    *,
    scales: Sequence[int] = (16, 32, 48),
    patch_size: int = 16,
    threshold: float = 0.5,
    max_pixels: int = 60,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MUSCLE training data from an EDD output: patches of each small candidate and its label
    (1 = true positive, i.e. it overlaps the reference lesion; 0 = false positive)."""
    cands = find_candidates(probability, threshold, max_pixels)
    truth = np.asarray(truth).reshape(cands.labels.shape) > 0
    hits = np.bincount(cands.labels[truth].ravel(), minlength=int(cands.labels.max()) + 1)
    targets = torch.as_tensor((hits[cands.ids] > 0).astype(np.int64))
    prob = torch.as_tensor(np.asarray(probability, dtype=np.float32).reshape(cands.labels.shape))
    img = torch.as_tensor(np.asarray(image, dtype=np.float32).reshape(cands.labels.shape))
    return muscle_patches(prob, img, cands.centres, scales, patch_size), targets


def probability_to_logits(p: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, ...) probability -> (N, channels, ...) logits whose sigmoid/softmax gives p back."""
    p = p.clamp(1e-6, 1 - 1e-6)
    if channels == 1:
        return torch.logit(p)[:, None]
    if channels == 2:
        return torch.stack([torch.log1p(-p), torch.log(p)], dim=1)
    raise ValueError("EDD + MUSCLE is a two-class method: 1 (sigmoid) or 2 (softmax) output channels")


class EDDMuscle(nn.Module):
    """EDD Net then MUSCLE re-evaluation; 2D: (N, C, y, x) -> logits (N, edd out_channels, y, x)."""

    def __init__(self, edd: Mapping[str, Any], muscle: Mapping[str, Any] | None = None, threshold: float = 0.5,
                 max_pixels: int = 60, prior: float = 0.5, image_channel: int = 0):
        super().__init__()
        self.edd = EDDNet(**dict(edd))
        self.muscle = MuscleNet(**dict(muscle or {}))
        if self.edd.out_channels > 2:
            raise ValueError("EDD + MUSCLE is a two-class method: edd out_channels must be 1 or 2")
        self.threshold, self.max_pixels, self.prior = float(threshold), int(max_pixels), float(prior)
        self.image_channel = int(image_channel)

    def forward(self, x: torch.Tensor, all_outputs: bool | None = None, refine: bool | None = None):
        if refine is None:
            refine = not self.training
        if all_outputs or not refine:
            return self.edd(x, all_outputs=all_outputs)
        logits = self.edd(x, all_outputs=False)
        p = self.edd.probabilities(logits.float())[:, -1]
        fused = muscle_refine(p, x[:, self.image_channel], self.muscle, threshold=self.threshold,
                              max_pixels=self.max_pixels, prior=self.prior)
        return probability_to_logits(fused, self.edd.out_channels).to(logits.dtype)


@register_network("strokeseg.MuscleNet")
def _muscle(**args) -> nn.Module:
    return MuscleNet(**args)


@register_network("strokeseg.EDDMuscle")
def _edd_muscle(**args) -> nn.Module:
    return EDDMuscle(**args)
