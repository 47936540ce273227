"""Paper 003 (Bhavnani et al., UPenn): chronic stroke lesions on T1 with a 3D patch CNN.

What the paper does, and where it lives here:

* voxel-wise classification of the centre of a 25^3 cube by 5 convolutions (the first two
  followed by max-pooling) + 2 fully connected layers, ReLU, softmax, cross-entropy, Adam at
  1e-5, one epoch (more over-fitted) -> ``strokeseg.PatchCNN3D``, trained here in its patch
  form (:meth:`~strokeseg.networks_zoo.patchcnn.PatchCNN3D.classify_patches` on 25^3 cubes, zero
  padding outside the scan as the paper pads with zeros) and run by the engine in its equivalent
  dense, fully convolutional form;
* histogram equalisation instead of z-scores -> the card's ``{"method": "histeq"}``
  normalisation (``strokeseg.preprocess.normalise``), so inference equalises exactly as training;
* the mirrored-hemisphere cube appended -> a card-derived input channel (``derived_channels``:
  the T1 mirrored across the mid-sagittal plane, :mod:`strokeseg.derived`) instead of a second
  cube concatenated along an axis: the same voxels side by side, in channel form so the dense
  network sees them at every position;
* background sub-sampling: every lesion voxel is a training centre and each non-lesion voxel is
  one with probability epsilon (0.01) -> :func:`subsample_background`; validation and testing use
  whole scans, not the balanced set, as in the paper.

Inference window: the dense form is exact, so the sliding window only has to hold the head. The
config's one large window (176 x 176 x 128 voxels at 1.5 mm; overlap 0.25 for larger heads)
replaces 48 overlapping 64^3 windows of a ~160 x 160 x 100 head, each computing a 12-voxel margin
of its own: ~5x fewer voxel evaluations, and no window seams where zero padding stands in for
real neighbours.

Config (``train``): ``epochs`` (1), ``steps`` (cap), ``max_minutes``, ``batch_size``, ``lr``
(1e-5), ``epsilon`` (0.01), ``background`` ("all" voxels as the paper, or "head": only voxels with
signal), ``val_every``, ``val_volumes``, ``seed``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm import tqdm

from strokeseg.losses import CrossEntropy
from strokeseg.models import build_network

from ..config import card_of, run_dir
from ..data import Volume, build_split, load_volumes
from ..resume import generator_states, settings_key
from ..train import validate
from ._runloop import RunFolder


def subsample_background(label: np.ndarray, epsilon: float, rng: np.random.Generator,
                         region: np.ndarray | None = None) -> np.ndarray:
    """Training centres (N, 3) as (z, y, x): every lesion voxel, plus each non-lesion voxel (of
    ``region`` when given) independently with probability ``epsilon`` (the paper's 0.01)."""
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must lie in [0, 1], got {epsilon}")
    lesion = label > 0
    fg = np.flatnonzero(lesion)
    candidates = ~lesion if region is None else (~lesion & region)
    bg = np.flatnonzero(candidates)
    bg = bg[rng.random(bg.size) < epsilon]
    idx = np.sort(np.concatenate([fg, bg]))
    return np.stack(np.unravel_index(idx, label.shape), axis=1).astype(np.int32)


class CubeSampler:
    """Balanced 25^3 training cubes: an epoch is one shuffled pass over the sub-sampled centres of
    every training volume; cubes reaching outside the scan are zero-padded."""

    def __init__(self, volumes: Sequence[Volume], patch: int, epsilon: float, rng: np.random.Generator,
                 background: str = "all"):
        if background not in ("all", "head"):
            raise ValueError(f"background must be 'all' or 'head', got {background!r}")
        self.half = patch // 2
        self.patch = patch
        self.rng = rng
        pad = ((0, 0),) + ((self.half, patch - 1 - self.half),) * 3
        self.images = [np.pad(v.image, pad) for v in volumes]
        self.labels = [v.label for v in volumes]
        centres = []
        for i, v in enumerate(volumes):
            region = (v.image[0] != 0) if background == "head" else None
            c = subsample_background(v.label, epsilon, rng, region)
            centres.append(np.concatenate([np.full((len(c), 1), i, np.int32), c], axis=1))
        self.centres = np.concatenate(centres) if centres else np.zeros((0, 4), np.int32)
        if not len(self.centres):
            raise ValueError("no training centres: the training volumes hold no lesion and epsilon is 0")
        self.lesion_fraction = sum(int((y > 0).sum()) for y in self.labels) / len(self.centres)  # all lesion voxels are centres
        self._order = np.zeros(0, np.int64)
        self._pos = 0

    def __len__(self) -> int:
        return len(self.centres)

    def state_dict(self) -> dict[str, Any]:
        """Where the sampler is in its shuffled pass (checkpointed, so a resume continues it)."""
        return {"order": torch.from_numpy(self._order), "pos": self._pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._order, self._pos = state["order"].numpy().astype(np.int64), int(state["pos"])

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, C, P, P, P) cubes and their (n,) centre labels, from a reshuffled pass over the set."""
        picks = []
        while len(picks) < n:
            if self._pos >= len(self._order):
                self._order, self._pos = self.rng.permutation(len(self.centres)), 0
            take = self._order[self._pos : self._pos + n - len(picks)]
            self._pos += len(take)
            picks.extend(take.tolist())
        p = self.patch
        cubes, labels = [], []
        for i, z, y, x in self.centres[picks]:
            cubes.append(self.images[i][:, z : z + p, y : y + p, x : x + p])  # padded: centre at +half
            labels.append(self.labels[i][z, y, x])
        return (torch.from_numpy(np.stack(cubes).astype(np.float32)),
                torch.as_tensor(np.asarray(labels) > 0, dtype=torch.long))


def train(cfg: dict[str, Any], *, resume: bool = True) -> Path:
    """Train paper 003's patch CNN on the config's T1 data; returns the run folder."""
    tc = cfg["train"]
    seed = int(tc.get("seed", 0))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = run_dir(cfg)
    card = card_of(cfg)
    workers = int(cfg["data"].get("workers", 2))
    train_files, _ = build_split(cfg, "train", workers=workers)
    val_files, _ = build_split(cfg, "val", workers=workers)
    val_vols = load_volumes(val_files[: int(tc.get("val_volumes", 8))])

    net = build_network(card).to(dev)
    patch = int(net.patch_size)
    if tuple(card.patch_size) != (patch,) * 3:
        raise ValueError(f"card patch_size {card.patch_size} differs from the network's receptive field {patch}^3")
    sampler = CubeSampler(load_volumes(train_files), patch, float(tc.get("epsilon", 0.01)), rng,
                          str(tc.get("background", "all")))
    batch = int(tc.get("batch_size", 64))
    steps = min(int(tc.get("steps", 10**9)), math.ceil(float(tc.get("epochs", 1)) * len(sampler) / batch))
    lr = float(tc.get("lr", 1e-5))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = CrossEntropy()
    budget_s = float(tc.get("max_minutes", 1e9)) * 60
    val_every = int(tc.get("val_every", 500))

    run = RunFolder(out, ["loss"], settings_key(cfg))
    start = run.resume({"net": net, "opt": opt, "sampler": sampler, **generator_states(rng)}, dev, resume)
    print(f"paper 003: {len(sampler)} balanced centres ({sampler.lesion_fraction:.1%} lesion), {steps} steps of {batch}")
    net.train()
    step, smoothed = start - 1, run.resumed.get("smoothed")
    for step in tqdm(range(start, steps), initial=start, total=steps, desc="training (003)"):
        if run.budget_spent_at_validation(step, budget_s):
            step -= 1
            break
        x, y = sampler.batch(batch)
        x, y = x.to(dev), y.to(dev)
        logits = net.classify_patches(x)  # (N, 2): the centre voxel's classes
        loss = loss_fn(logits, y[:, None].float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        last = step + 1 == steps or run.elapsed() > budget_s
        if (step + 1) % val_every == 0 or last:
            val_dice = validate(net, card, val_vols, dev)
            run.row(step + 1, {"loss": smoothed}, lr, val_dice)
            run.checkpoint(step + 1, net, val_dice, smoothed=smoothed)
        elif (step + 1) % 25 == 0:
            run.row(step + 1, {"loss": smoothed}, lr)
        if last:
            break
    return run.finish(step + 1, dev, {"recipe": "paper003_t1_cnn", "balanced_centres": len(sampler),
                                      "lesion_fraction_of_centres": sampler.lesion_fraction})
