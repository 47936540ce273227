"""Paper 001 (Clèrigues et al. 2019): asymmetric residual 3D U-Net with symmetric modality augmentation.

What the recipe does (config ``training/configs/paper001_asymunet.json``):

1. symmetric modality augmentation: the card's ``derived_channels`` ``[{"kind": "mirror", ...}]``
   makes the engine append, for each listed input, its left-right flip rigidly registered to the
   original (:mod:`strokeseg.derived`) -- in ``prepare``, so the cached training volumes and every
   inference get the same channels;
2. a fixed balanced patch set (:class:`~strokeseg_training.sampling.BalancedPatchSet`):
   ``per_case`` patches of 24 x 24 x 16 per case, half on healthy head voxels at regular steps,
   half on lesion voxels with a random offset of up to half a patch, lesion patches augmented by a
   sagittal reflection or 90/180/270 degree axial rotation;
3. ``strokeseg.AsymResUNet`` (softmax over 2 classes), focal loss (gamma 2, alpha 0.25 healthy /
   0.75 lesion), Adadelta, batch 16, one epoch = one pass over the patch set; early stopping on
   the validation patches' L1 error + error rate with a patience of 8 epochs (best kept);
4. inference: dense overlapping windows averaged (card ``inference.overlap`` per axis, ``blend``
   constant = plain averaging; the paper's 4 x 4 x 1 step is overlap (0.833, 0.833, 0.9375));
5. tuning: threshold Th and minimum lesion size Smin grid-searched on the paper's DSC-HD score
   (objective ``dsc-hd-score`` of ``evaluate.tune``).

Simplified: one network (the paper averaged its 4 fold networks at test time); HD is HD95 (the
engine's metric) in the score.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from strokeseg.derived import derived_names
from strokeseg.losses import FocalLoss
from strokeseg.models import build_network

from ..sampling import BalancedPatchSet
from ..resume import settings_key
from ..train import fit, recipe_setup, write_summary


def expected_channels(card_raw: dict[str, Any]) -> int:
    """Inputs plus derived channels: what the network's ``in_channels`` must be."""
    inputs = card_raw["inputs"]
    return len(inputs["required"]) + len(inputs.get("optional", [])) + len(derived_names(card_raw.get("derived_channels")))


def patch_l1_error(net: torch.nn.Module, patches: BalancedPatchSet, device: torch.device, batch_size: int = 32) -> float:
    """Mean voxel L1 error |p - y| plus error rate (p >= 0.5 vs y) over a fixed patch set: the
    paper's early-stopping criterion (lower is better)."""
    l1 = err = n = 0.0
    with torch.no_grad():
        for x, y in patches.batches(batch_size, shuffle=False):
            logits = net(x.to(device))
            p = torch.softmax(logits.float(), 1)[:, -1:] if logits.shape[1] > 1 else torch.sigmoid(logits.float())
            y = y.to(device)
            l1 += float((p - y).abs().sum())
            err += float(((p >= 0.5).float() != y).sum())
            n += y.numel()
    return (l1 + err) / max(n, 1.0)


def train_asymunet(cfg: dict[str, Any], *, resume: bool = True) -> Path:
    """The recipe; returns the run folder (best.safetensors, train_summary.json)."""
    n_in = expected_channels(cfg["card"])
    given = cfg["card"]["network"]["args"].get("in_channels")
    if given != n_in:
        raise ValueError(f"card.network.args.in_channels is {given} but the inputs and derived channels make {n_in}")
    tc = cfg["train"]
    out, card, train_vols, val_vols, dev, rng = recipe_setup(cfg)
    patch = tuple(int(v) for v in reversed(card.patch_size))
    train_set = BalancedPatchSet(train_vols, patch, int(tc.get("patches_per_case", 1000)), rng, augment=True)
    val_set = BalancedPatchSet(val_vols, patch, int(tc.get("val_patches_per_case", 200)), rng, augment=False)
    net = build_network(card).to(dev)
    loss = FocalLoss(gamma=float(tc.get("gamma", 2.0)), alpha=float(tc.get("alpha", 0.75)))
    opt = torch.optim.Adadelta(net.parameters(), lr=float(tc.get("lr", 1.0)), rho=float(tc.get("rho", 0.9)),
                               eps=float(tc.get("eps", 1e-6)))  # PyTorch defaults (the paper used Torch)
    bs = int(tc.get("batch_size", 16))
    epoch_steps = math.ceil(len(train_set) / bs)

    def batches():
        while True:
            yield from train_set.batches(bs)

    it = batches()
    res = fit(net, lambda: next(it), loss, opt, steps=int(tc.get("max_epochs", 50)) * epoch_steps, out=out, device=dev,
              val_fn=lambda m: -patch_l1_error(m, val_set, dev), val_every=epoch_steps,
              patience=int(tc.get("patience", 8)), max_minutes=tc.get("max_minutes"), desc="AsymResUNet",
              resume_key=settings_key(cfg) if resume else None, rng=rng)
    write_summary(out, dev, res["steps_done"], res["duration_s"], -1.0,
                  best_val_l1_plus_error=-res["best_val"], epochs=res["steps_done"] / epoch_steps,
                  train_patches=len(train_set), val_patches=len(val_set),
                  lesion_patch_share=float(np.mean(train_set.labels.reshape(len(train_set), -1).max(1) > 0)))
    return out
