"""Paper 002 (EDD Net + MUSCLE Net, acute thick-slice DWI): 2D ensemble DeconvNets and small-lesion re-evaluation.

What the recipe does (config ``training/configs/paper002_edd_muscle.json``):

1. DWI on a grid of 1.6 x 1.6 mm in plane (slices kept thick), z-scored; the card's network is
   ``strokeseg.SliceWise`` around ``strokeseg.EDDMuscle``, so the engine runs both stages slice
   by slice from the card alone (MUSCLE re-evaluation with Bayes fusion happens in the network's
   eval-mode forward: :func:`strokeseg.networks_zoo.muscle.muscle_refine`);
2. EDD Net on 64 x 64 in-plane patches, each placed so that a drawn lesion pixel falls at a random
   position in it (plus ``random_fraction`` of head patches), horizontal flips and small random
   rotations; multi-output cross-entropy over [H, h, g1, g2] with all lambda = 1 (Eq. 3); SGD
   (lr 0.05, momentum 0.9, no weight decay). Validation: whole-slice Dice of the EDD output alone;
3. MUSCLE Net: the best EDD Net predicts every training case, small 2D candidates (<= 60 px) of
   its thresholded output are cut out at three scales plus the EDD probability
   (:func:`~strokeseg.networks_zoo.muscle.muscle_training_samples`), labelled true / false
   positive, and the classifier is trained with class-balanced batches and cross-entropy; its
   last layer starts at zero, so an untrained (or candidate-less) MUSCLE Net answers q = 0.5 and
   the Bayes fusion leaves the EDD output unchanged;
4. the detection metrics of the paper (m#FP, m#FN, mean FP / FN size, detection rates, small /
   large strata) are in every evaluation summary (``strokeseg.metrics.aggregate``);
   ``train_summary.json`` also compares EDD alone with EDD + MUSCLE on the validation volumes.

Simplified: the MUSCLE Net learns from candidates of the EDD Net on its own training cases (the
paper does not say which cases fed it); one 2D network per slice, no 3D context, as the paper.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from strokeseg.inference import predict
from strokeseg.losses import CrossEntropy, MultiOutputLoss
from strokeseg.metrics import aggregate, case_metrics
from strokeseg.models import build_network, save_weights
from strokeseg.networks_zoo.muscle import EDDMuscle, muscle_training_samples

from ..sampling import SlicePatchSampler
from ..resume import settings_key
from ..train import fit, recipe_setup, validate, write_summary


def edd_muscle_module(net: nn.Module) -> EDDMuscle:
    """The EDDMuscle inside a card's network (itself, or the inner network of SliceWise)."""
    inner = getattr(net, "inner", net)
    if not isinstance(inner, EDDMuscle):
        raise ValueError(f"paper 002 needs network strokeseg.EDDMuscle (optionally inside SliceWise), got {type(inner).__name__}")
    return inner


class _EDDHeads(nn.Module):
    """EDD Net returning every head [H, h, g1..gN] for the multi-output loss (state keys ``edd.*``)."""

    def __init__(self, edd: nn.Module):
        super().__init__()
        self.edd = edd

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.edd(x, all_outputs=True)


def neutral_muscle(model: EDDMuscle) -> None:
    """Zero the MUSCLE Net's last layer: q = 0.5 for every candidate, the fusion's identity."""
    last = model.muscle.classifier[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


def _edd_only(net: nn.Module, card: Any, image: np.ndarray, device: torch.device) -> np.ndarray:
    model = edd_muscle_module(net)
    keep, model.max_pixels = model.max_pixels, 0  # no candidate is small enough: MUSCLE skipped
    try:
        return predict(image.astype(np.float32), [net], card, device=device, mirror_tta=False)
    finally:
        model.max_pixels = keep


def detection_summary(net: nn.Module, card: Any, vols: list, device: torch.device, threshold: float = 0.5,
                      muscle: bool = True) -> dict[str, Any]:
    """The paper's detection figures on model-grid volumes, with or without the MUSCLE stage."""
    rows = []
    for v in vols:
        prob = (predict(v.image.astype(np.float32), [net], card, device=device, mirror_tta=False) if muscle
                else _edd_only(net, card, v.image, device))
        rows.append(case_metrics(prob >= threshold, v.label > 0, card.target_spacing))
    agg = aggregate(rows)
    return {"dice_mean": agg["metrics"]["dice"]["mean"], **agg["detection"]}


def train_muscle(model: EDDMuscle, patches: torch.Tensor, targets: torch.Tensor, tc: dict[str, Any],
                 rng: np.random.Generator, device: torch.device) -> dict[str, Any]:
    """Class-balanced CE training of the MUSCLE Net on candidate patches (flips as augmentation)."""
    pos, neg = np.flatnonzero(targets.numpy() == 1), np.flatnonzero(targets.numpy() == 0)
    if not len(pos) or not len(neg):
        return {"trained": False, "candidates": int(len(targets)), "true_positive": int(len(pos))}
    net = model.muscle.to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=float(tc.get("lr", 0.01)), momentum=float(tc.get("momentum", 0.9)))
    ce = nn.CrossEntropyLoss()
    bs, losses = int(tc.get("batch_size", 32)), []
    for _ in range(int(tc.get("steps", 500))):
        sel = np.concatenate([rng.choice(pos, bs // 2), rng.choice(neg, bs - bs // 2)])
        x = patches[sel].clone()
        flip = torch.from_numpy(rng.random(len(sel)) < 0.5)
        x[flip] = x[flip].flip(-1)
        loss = ce(net(x.to(device)), targets[sel].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    net.eval()
    return {"trained": True, "candidates": int(len(targets)), "true_positive": int(len(pos)),
            "final_loss": float(np.mean(losses[-20:]))}


def train_edd_muscle(cfg: dict[str, Any], *, resume: bool = True) -> Path:
    """The recipe; returns the run folder (best.safetensors, train_summary.json)."""
    from safetensors.torch import load_file

    tc = cfg["train"]
    out, card, train_vols, val_vols, dev, rng = recipe_setup(cfg)
    net = build_network(card).to(dev)
    model = edd_muscle_module(net)
    neutral_muscle(model)
    heads = _EDDHeads(model.edd)
    loss = MultiOutputLoss(CrossEntropy(), tc.get("output_weights"))
    px, py, _ = card.patch_size
    aug = tc.get("augment", {})
    sampler = SlicePatchSampler(train_vols, (py, px), rng, random_fraction=float(tc.get("random_fraction", 0.2)),
                                rotate_deg=float(aug.get("rotate_deg", 15.0)), flip=float(aug.get("flip_lr", 0.5)))
    opt = torch.optim.SGD(model.edd.parameters(), lr=float(tc.get("lr", 0.05)), momentum=float(tc.get("momentum", 0.9)),
                          weight_decay=float(tc.get("weight_decay", 0.0)))
    bs = int(tc.get("batch_size", 16))

    def val_fn(_: nn.Module) -> float:
        keep, model.max_pixels = model.max_pixels, 0
        try:
            return validate(net, card, val_vols, dev)
        finally:
            model.max_pixels = keep

    res = fit(heads, lambda: sampler.batch(bs), loss, opt, steps=int(tc["steps"]), out=out, device=dev, val_fn=val_fn,
              val_every=int(tc.get("val_every", 250)), max_minutes=tc.get("max_minutes"),
              weights_name="edd_best.safetensors", desc="EDD Net",
              resume_key=settings_key(cfg, drop_train=("muscle",)) if resume else None, rng=rng)
    heads.load_state_dict(load_file(str(out / "edd_best.safetensors")))
    net.eval()

    mc = tc.get("muscle", {})
    samples = [muscle_training_samples(_edd_only(net, card, v.image, dev), v.image[0].astype(np.float32), v.label,
                                       scales=model.muscle.scales, patch_size=model.muscle.patch_size,
                                       threshold=model.threshold, max_pixels=model.max_pixels) for v in train_vols]
    patches = torch.cat([p for p, _ in samples]) if samples else torch.zeros(0)
    targets = torch.cat([t for _, t in samples]) if samples else torch.zeros(0, dtype=torch.long)
    muscle = train_muscle(model, patches, targets, mc, rng, dev)
    net.eval()
    detection = {"edd": detection_summary(net, card, val_vols, dev, muscle=False),
                 "edd_muscle": detection_summary(net, card, val_vols, dev, muscle=True)}
    save_weights(net, out / "best.safetensors")
    write_summary(out, dev, res["steps_done"], res["duration_s"], res["best_val"], muscle=muscle,
                  validation_detection=detection)
    return out
