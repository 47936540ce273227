"""Losses of the five papers, for the networks in :mod:`strokeseg.networks_zoo`.

Every segmentation loss takes logits (N, C, *spatial) and a label map (N, 1, *spatial) of 0/1
(what the training samplers produce). C = 1 means sigmoid, C >= 2 softmax over classes with
class 1 the lesion. Nothing here is needed at inference: it lives in the engine so that training
code and tests share one definition.

- :class:`FocalLoss` — paper 001 (gamma 2, alpha 0.25 background / 0.75 lesion), MONAI's.
- :class:`CEGeneralizedDiceLoss` — paper 004: CE - log(generalised Dice), MONAI's GDL inside.
- :class:`MultiOutputLoss` — paper 002: weighted sum of one loss over several heads.
- :func:`error_map`, :func:`error_weights`, :class:`VoxelWeightedLoss` — paper 000's error maps
  for fine-tuning (as sampling weights, or as per-voxel loss weights).
- :func:`lsgan_discriminator_loss`, :func:`lsgan_generator_loss`, :func:`gen_seg_loss` — paper
  004's least-squares GAN terms and its weighted total (Eq. 6).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._lean_monai import import_monai

import_monai()
from monai.losses import FocalLoss as _MonaiFocal  # noqa: E402
from monai.losses import GeneralizedDiceLoss  # noqa: E402


def _two_class(logits: torch.Tensor) -> torch.Tensor:
    """One sigmoid logit z -> softmax logits (0, z): softmax gives (1 - sigmoid(z), sigmoid(z))."""
    return torch.cat([torch.zeros_like(logits), logits], dim=1) if logits.shape[1] == 1 else logits


def _labels(target: torch.Tensor) -> torch.Tensor:
    """(N, 1, ...) 0/1 (any dtype) -> (N, ...) long class indices."""
    if target.dim() < 2 or target.shape[1] != 1:
        raise ValueError(f"target must be a (N, 1, ...) label map, got shape {tuple(target.shape)}")
    return target[:, 0].round().long()


class FocalLoss(nn.Module):
    """Mean over voxels of -alpha_t (1 - p_t)^gamma log p_t (Lin et al.; paper 001's defaults).

    ``alpha`` weighs the lesion class, 1 - alpha the background (0.75 / 0.25 in paper 001).
    """

    def __init__(self, gamma: float = 2.0, alpha: float | None = 0.75):
        super().__init__()
        self.softmax = _MonaiFocal(to_onehot_y=True, use_softmax=True, gamma=gamma, alpha=alpha, reduction="none")
        self.sigmoid = _MonaiFocal(gamma=gamma, alpha=alpha, reduction="none")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] == 1:
            return self.sigmoid(logits, target.float()).mean()
        # One-hot target: only the true class's channel is non-zero, so the channel sum is per voxel.
        return self.softmax(logits, _labels(target)[:, None]).sum(1).mean()


class CEGeneralizedDiceLoss(nn.Module):
    """Paper 004: cross-entropy - log(generalised Dice coefficient) (Sudre et al. 2017 weights).

    The generalised Dice is computed over background and lesion (the paper weighs both) across
    the whole batch; a single sigmoid channel is treated as the two classes (1 - p, p).
    """

    def __init__(self, w_type: str = "square", batch: bool = True, eps: float = 1e-6):
        super().__init__()
        self.gdl = GeneralizedDiceLoss(to_onehot_y=True, softmax=True, w_type=w_type, batch=batch)
        self.eps = eps

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = _two_class(logits)
        labels = _labels(target)
        ce = F.cross_entropy(logits, labels)
        dice = 1.0 - self.gdl(logits, labels[:, None])
        return ce - torch.log(dice.clamp_min(self.eps))


class MultiOutputLoss(nn.Module):
    """Paper 002 (Eq. 3): sum_i lambda_i * loss(output_i, target); lambda_i = 1 by default.

    A single tensor (a network in eval mode) gets the plain loss.
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float] | None = None):
        super().__init__()
        self.loss = loss
        self.weights = None if weights is None else [float(w) for w in weights]

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        weights = self.weights or [1.0] * len(outputs)
        if len(weights) != len(outputs):
            raise ValueError(f"{len(outputs)} outputs but {len(weights)} loss weights")
        return sum(w * self.loss(o, target) for w, o in zip(weights, outputs))


class CrossEntropy(nn.Module):
    """Cross-entropy on logits with 0/1 labels: softmax CE for C >= 2, binary CE for C = 1."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(_two_class(logits), _labels(target))


# -- paper 000: error maps -----------------------------------------------------------------


def error_map(probability: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor,
              standardise: bool = True) -> np.ndarray | torch.Tensor:
    """Squared error (p - y)^2 of a case's predicted lesion probability, z-scored over the case
    when ``standardise`` (paper 000 normalises each error map to zero mean and unit variance)."""
    if isinstance(probability, torch.Tensor):
        err = (probability.float() - torch.as_tensor(truth, device=probability.device).float()) ** 2
        return (err - err.mean()) / err.std(unbiased=False).clamp_min(1e-8) if standardise else err
    err = (np.asarray(probability, dtype=np.float32) - (np.asarray(truth) > 0).astype(np.float32)) ** 2
    return (err - err.mean()) / max(float(err.std()), 1e-8) if standardise else err


def error_weights(probability: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor,
                  strength: float = 1.0) -> np.ndarray | torch.Tensor:
    """Non-negative per-voxel weights 1 + strength * (p - y)^2 — usable as sampling or loss weights."""
    return 1.0 + strength * error_map(probability, truth, standardise=False)


class VoxelWeightedLoss(nn.Module):
    """sum(w * CE_voxel) / sum(w): cross-entropy weighted by a (N, 1, *spatial) map of weights >= 0."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(_two_class(logits), _labels(target), reduction="none")
        w = weights.reshape(ce.shape).to(ce.dtype)
        if bool((w < 0).any()):
            raise ValueError("voxel weights must be >= 0 (use error_weights, not the z-scored error map)")
        return (w * ce).sum() / w.sum().clamp_min(1e-8)


# -- paper 004: least-squares GAN ----------------------------------------------------------


def lsgan_discriminator_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """Eq. 2: MSE(D(real DWI), 1) + MSE(D(synthetic DWI), 0); pass synthetic images detached."""
    return F.mse_loss(real_scores, torch.ones_like(real_scores)) + F.mse_loss(fake_scores, torch.zeros_like(fake_scores))


def lsgan_generator_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """Eq. 3: MSE(D(synthetic DWI), 1) — the generator tries to pass as real."""
    return F.mse_loss(fake_scores, torch.ones_like(fake_scores))


def gen_seg_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    synthetic: torch.Tensor,
    real_dwi: torch.Tensor,
    fake_scores: torch.Tensor,
    weights: Sequence[float] = (0.002, 0.5, 1.0),
    seg_loss: nn.Module | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 6: w_g MSE(synthetic, DWI) + w_d LSGAN generator loss + w_s (CE - log GD); paper 004's
    weights 0.002 : 0.5 : 1. Returns the total and its parts (floats, for logging)."""
    wg, wd, ws = (float(w) for w in weights)
    g = F.mse_loss(synthetic, real_dwi)
    d = lsgan_generator_loss(fake_scores)
    s = (seg_loss or CEGeneralizedDiceLoss())(logits, target)
    total = wg * g + wd * d + ws * s
    return total, {"generator_mse": float(g.detach()), "adversarial": float(d.detach()), "segmentation": float(s.detach())}


LOSSES: dict[str, type[nn.Module]] = {
    "focal": FocalLoss,
    "ce_gdl": CEGeneralizedDiceLoss,
    "ce": CrossEntropy,
}


def build_loss(name: str, args: dict[str, Any] | None = None, output_weights: Sequence[float] | None = None) -> nn.Module:
    """A loss from a recipe: ``build_loss("focal", {"alpha": 0.75})``; with ``output_weights``
    (or ``name`` prefixed "multi:") wrapped in :class:`MultiOutputLoss` for deep supervision."""
    multi = name.startswith("multi:")
    key = name.removeprefix("multi:")
    if key not in LOSSES:
        raise ValueError(f"unknown loss '{key}' (known: {', '.join(sorted(LOSSES))})")
    loss = LOSSES[key](**(args or {}))
    return MultiOutputLoss(loss, output_weights) if multi or output_weights is not None else loss
