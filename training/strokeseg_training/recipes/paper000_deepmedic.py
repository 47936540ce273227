"""Paper 000 (Pérez Malla et al., Front. Neuroinform. 2019): DeepMedic on MR perfusion maps + ADC.

What the recipe does (config ``training/configs/paper000_deepmedic.json``):

1. data: PWI phantoms (``strokeseg.phantom.perfusion``); the inputs are the maps our own
   deconvolution computes from the simulated series (MTT, CBF) and the ADC, resampled to an
   isotropic grid and z-scored (the paper: ISLES'17 ADC, MTT, rCBF at ~1.4 mm isotropic);
2. E1, offline "intensity variance" augmentation (Algorithm 2): ``n_clones`` clones of each
   training case whose lesion voxels, in every channel, are redrawn from a Gaussian with the
   mean and SD of that channel's lesion voxels (:func:`intensity_variance_clone`);
3. E0, DeepMedic (``strokeseg.DeepMedic``, two pathways, softmax over 2 classes) trained on
   segments centred on lesion / head voxels with equal probability (``pos_fraction``), online
   left-right flips (p 0.5) and I' = (I + s) m (s ~ N(0, 0.05), m ~ N(1, 0.01)); cross-entropy
   + L1 1e-6 and L2 1e-4 weight penalties; RMSprop (rho 0.9, eps 1e-4) with momentum rising
   linearly 0.6 -> 0.9 and a learning rate decaying exponentially 1e-3 -> 1e-4 (torch's RMSprop
   has classical, not Nesterov, momentum);
4. E2, fine-tuning with error maps: the best network predicts the training cases, the squared
   error (p - y)^2 is z-scored per case (:func:`strokeseg.losses.error_map`) and, shifted to be
   non-negative plus a floor, becomes the sampling weight of segment centres
   (:func:`error_sampling_weights`); the first ``freeze_layers`` convolutional layers of both
   pathways are frozen (8 = all: only the FC layers learn, as in E2) and the learning rate is
   5e-4. The weights kept are the best on validation Dice over both stages;
5. tuning (``evaluate.tune``): thresholds THT0 (max precision x recall on the pooled PR curve)
   and THT1 (max TPR - FPR on the ROC curve) and "filling holes", a closing with a 3-voxel ball
   whose iterations are grid-searched (``closing_iterations``), all on validation cases.

Simplified: the error maps come from the stage-1 network on its own training cases (the paper
used out-of-fold test predictions of its 5-fold CV); one train/val/test split, not 5 folds;
no CRF (the paper's DeepMedic had none enabled either in its reported pipeline).

``train.init_weights`` with ``train.steps`` 0 runs E2 alone on an earlier run's stage-1 weights
(scored once on validation, then fine-tuned).

Resume: each stage checkpoints at its validations (``log.ckpt``, ``log_finetune.ckpt``: see
:func:`~strokeseg_training.train.fit`) and a rerun continues where it stopped, exactly as the
uninterrupted run would have (CPU). Stage 1's checkpoint is keyed without the fine-tune's
settings, so a finished stage 1 is reused when only the fine-tune changes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from strokeseg.inference import predict
from strokeseg.losses import CrossEntropy, error_map
from strokeseg.models import build_network

from ..data import Volume
from ..sampling import WeightedPatchSampler
from ..resume import settings_key
from ..train import fit, load_init_weights, recipe_setup, validate, write_summary

ERROR_MAPS = "error_maps.npz"  # in the run folder: the stage-1 probabilities behind E2's error maps


def intensity_variance_clone(volume: Volume, rng: np.random.Generator, name: str | None = None) -> Volume:
    """Algorithm 2 of the paper: a copy whose lesion voxels, channel by channel, are drawn from
    N(mean, SD) of that channel's lesion intensities; every other voxel is unchanged."""
    image = volume.image.astype(np.float32, copy=True)
    lesion = volume.label > 0
    if lesion.any():
        for c in range(image.shape[0]):
            roi = image[c][lesion]
            image[c][lesion] = rng.normal(float(roi.mean()), float(roi.std()), int(lesion.sum()))
    return Volume(name or f"{volume.name}-clone", image.astype(volume.image.dtype), volume.label.copy())


def error_sampling_weights(probability: np.ndarray, label: np.ndarray, floor: float = 0.1) -> np.ndarray:
    """Sampling weights from a case's error map: the z-scored squared error (paper 000) shifted so
    that its minimum is 0, plus ``floor`` (so that well-predicted regions are still drawn)."""
    z = np.asarray(error_map(probability, label, standardise=True), dtype=np.float32)
    return (z - float(z.min()) + float(floor)).astype(np.float32)


def stage1_probabilities(path: Path, stage1: str, net: torch.nn.Module, card: Any, vols: list[Volume],
                         device: torch.device) -> list[np.ndarray]:
    """The stage-1 network's probabilities on the training cases, the source of the error maps.

    Cached in the run folder (``error_maps.npz``, float16, under the identity ``stage1`` of the
    stage-1 run: its settings key, steps and best validation Dice), so that a resumed or
    lengthened fine-tune samples by the same maps without predicting every training case again
    (about 25 CPU minutes for the 40 PWI phantoms)."""
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["stage1"]) == stage1 and [str(n) for n in z["names"]] == [v.name for v in vols]:
                    return [z[f"p{i}"].astype(np.float32) for i in range(len(vols))]
        except (OSError, KeyError, ValueError):
            pass  # unreadable or older: predicted again
    net.eval()
    # float16 from the start: a fine-tune from the cache samples exactly as the first one did
    probs = [predict(v.image.astype(np.float32), [net], card, device=device, mirror_tta=False).astype(np.float16)
             for v in tqdm(vols, desc="error maps (stage-1 predictions)", unit="case")]
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, stage1=np.array(stage1), names=np.array([v.name for v in vols]),
                        **{f"p{i}": p for i, p in enumerate(probs)})
    tmp.replace(path)
    return [p.astype(np.float32) for p in probs]


def _l1(net: torch.nn.Module) -> torch.Tensor:
    return sum(p.abs().sum() for p in net.parameters() if p.requires_grad and p.dim() > 1)


def _rmsprop(params: Any, tc: dict[str, Any], lr: float) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(params, lr=lr, alpha=float(tc.get("rho", 0.9)), eps=float(tc.get("eps", 1e-4)),
                               momentum=float(tc.get("momentum", 0.6)), weight_decay=float(tc.get("l2", 1e-4)))


def _schedule(opt: torch.optim.Optimizer, lr0: float, lr1: float, m0: float, m1: float):
    """Exponential learning-rate decay lr0 -> lr1 and linear momentum m0 -> m1 over the run."""

    def set_(step: int, progress: float) -> None:
        p = min(max(progress, 0.0), 1.0)
        for g in opt.param_groups:
            g["lr"] = lr0 * (lr1 / lr0) ** p
            g["momentum"] = m0 + (m1 - m0) * p

    return set_


def train_deepmedic(cfg: dict[str, Any], *, resume: bool = True) -> Path:
    """The recipe; returns the run folder (best.safetensors, train_summary.json)."""
    tc = cfg["train"]
    out, card, train_vols, val_vols, dev, rng = recipe_setup(cfg)
    patch = tuple(int(v) for v in reversed(card.patch_size))
    clones = [intensity_variance_clone(v, rng, f"{v.name}-clone{k}")
              for k in range(int(tc.get("n_clones", 1))) for v in train_vols if (v.label > 0).any()]
    net = load_init_weights(build_network(card), tc).to(dev)  # steps 0: the fine-tune of earlier weights
    loss_ce = CrossEntropy()
    l1 = float(tc.get("l1", 1e-6))

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_ce(logits, y) + l1 * _l1(net)

    def val_fn(m: torch.nn.Module) -> float:
        return validate(m, card, val_vols, dev)

    aug = tc.get("augment", {})
    sampler = WeightedPatchSampler(train_vols + clones, patch, float(tc.get("pos_fraction", 0.5)), rng,
                                   flip_lr=float(aug.get("flip_lr", 0.5)), shift_sd=float(aug.get("shift_sd", 0.05)),
                                   scale_sd=float(aug.get("scale_sd", 0.01)))
    lr0 = float(tc.get("lr", 1e-3))
    bs = int(tc.get("batch_size", 8))
    opt = _rmsprop(net.parameters(), tc, lr0)
    s1 = fit(net, lambda: sampler.batch(bs), loss_fn, opt, steps=int(tc["steps"]), out=out, device=dev,
             val_fn=val_fn, val_every=int(tc.get("val_every", 250)), max_minutes=tc.get("max_minutes"),
             schedule=_schedule(opt, lr0, float(tc.get("lr_final", 1e-4)), float(tc.get("momentum", 0.6)),
                                float(tc.get("momentum_final", 0.9))), desc="DeepMedic",
             resume_key=settings_key(cfg, drop_train=("finetune",)) if resume else None, rng=rng)
    summary: dict[str, Any] = {"stage1": s1, "n_clones": len(clones)}
    best, steps, duration = s1["best_val"], s1["steps_done"], s1["duration_s"]

    ft = tc.get("finetune", {})
    if int(ft.get("steps", 0)) > 0:
        from safetensors.torch import load_file

        # Stage 1's best even on a rerun after the fine-tune improved: recipe_setup removed the old
        # best.safetensors and stage 1's fit restored its own best from log.ckpt just above.
        net.load_state_dict(load_file(str(out / "best.safetensors")))
        stage1 = json.dumps([settings_key(cfg, drop_train=("finetune",)), s1["steps_done"], s1["best_val"]])
        probs = stage1_probabilities(out / ERROR_MAPS, stage1, net, card, train_vols, dev)
        # error maps of the original cases (clones share their geometry)
        weights = [error_sampling_weights(p, v.label, float(ft.get("floor", 0.1))) for p, v in zip(probs, train_vols)]
        clone_w = [weights[[v.name for v in train_vols].index(c.name.rsplit("-clone", 1)[0])] for c in clones]
        ft_sampler = WeightedPatchSampler(train_vols + clones, patch, float(tc.get("pos_fraction", 0.5)), rng,
                                          weights=weights + clone_w, flip_lr=float(aug.get("flip_lr", 0.5)),
                                          shift_sd=float(aug.get("shift_sd", 0.05)), scale_sd=float(aug.get("scale_sd", 0.01)))
        net.freeze(int(ft.get("freeze_layers", 8)))
        lr_ft = float(ft.get("lr", 5e-4))
        opt = _rmsprop([p for p in net.parameters() if p.requires_grad], tc, lr_ft)
        s2 = fit(net, lambda: ft_sampler.batch(bs), loss_fn, opt, steps=int(ft["steps"]), out=out, device=dev,
                 val_fn=val_fn, val_every=int(ft.get("val_every", tc.get("val_every", 250))), best=best,
                 max_minutes=ft.get("max_minutes"), log_name="log_finetune.csv",
                 schedule=_schedule(opt, lr_ft, float(ft.get("lr_final", lr_ft / 10)), float(tc.get("momentum", 0.6)),
                                    float(tc.get("momentum_final", 0.9))), desc="error-map fine-tuning",
                 resume_key=settings_key(cfg) if resume else None, rng=rng)
        net.freeze(0)
        summary["finetune"] = s2
        best, steps, duration = max(best, s2["best_val"]), steps + s2["steps_done"], duration + s2["duration_s"]
    write_summary(out, dev, steps, duration, best if math.isfinite(best) else -1.0, **summary)
    return out
