"""Paper 004 (Liu, ISLES 2018): CT perfusion -> synthetic DWI (generator, LSGAN) -> lesion (segmentator).

What the paper does, and where it lives here:

* inputs MTT, Tmax, CBV, CBF and the maximum over time of the 4D CTP, normalised -> the card's
  inputs ``mtt, tmax, cbv, cbf, ctp`` with ``"temporal_reduction": {"ctp": "max"}``: the engine
  reduces the raw series in preprocessing (:func:`strokeseg.derived.temporal_reduction`), and
  the card can declare the maps ``derivable`` from ``ctp`` (the engine's own deconvolution), so
  a raw 4D CTP alone runs the exported model;
* 2D slices (ISLES 2018 slabs are a few slices thick) -> ``strokeseg.SliceWise`` around
  ``strokeseg.CTPGenSeg`` (generator U-Net -> segmentator U-Net, GroupNorm of 16 channels per
  group, maxout head of 3 background maps + 1 foreground); a model grid with z = 1 patches;
* discriminator: ``strokeseg.LSGANDiscriminator`` (5x5 stride-2 convolutions, GroupNorm, ReLU,
  average pooling) on real vs synthetic DWI, trained only;
* losses: D, Eq. 2 (LSGAN); generator + segmentator, Eq. 6 = 0.002 * reconstruction (MSE to the
  real DWI, Eq. 1; ``recon_loss: "l1"`` for L1) + 0.5 * LSGAN generator term (Eq. 3) + 1 *
  (CE - log generalised Dice) (Eq. 5); both RMSprop (lr 1e-4, alpha 0.9), trained alternately,
  lr halved at 100, 300 and 500 of 700 epochs (here: the same fractions of the run), batch 6;
* on-the-fly scaling, flips, rotations and translations -> :func:`augment`;
* four-fold cross-validation -> ``data.folds = 4`` (patient-level, volume-stratified folds of
  :mod:`strokeseg_training.folds` through ``realdata``); ``train.cross_validate`` trains the
  other folds too and writes ``cv_summary.json``.

Data: a folder of cases with the inputs, ``dwi`` (the generator's target; not a model input)
and ``lesion``: ISLES 2018 through its adapter, or CTP phantoms with a DWI that this recipe
generates first when the config has ``data.phantom`` (``strokeseg.phantom.perfusion``,
``dwi=True``): ``data.root`` gets the cross-validation pool (train-split lesion shapes),
``data.test_root`` the held-out test cases (test-split shapes).
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from strokeseg.errors import InputError
from strokeseg.image import resample_to
from strokeseg.io import read_image, write_image, write_text
from strokeseg.losses import CEGeneralizedDiceLoss, lsgan_discriminator_loss, lsgan_generator_loss
from strokeseg.metrics import json_safe
from strokeseg.models import build_network, save_weights
from strokeseg.networks import build
from strokeseg.preprocess import canonical_grid, normalise

from ..config import card_of, phantoms_stamp, repo_path, run_dir
from ..data import REFUSED_SUFFIX, SPLIT_SEED_OFFSET, build_split, load_volumes, mark_refused, report_refused
from ..folds import fold_config, summarise_folds
from ..resume import generator_states, settings_key
from ..train import validate
from ._runloop import RunFolder

PHANTOMS_STAMP = "phantoms.json"  # in each phantom folder: what made its cases (phantoms_stamp)
LOSS_WEIGHTS = (0.002, 0.5, 1.0)  # generator reconstruction : adversarial : segmentation (paper)


# -- data ------------------------------------------------------------------------------------


def _phantom_one(args: tuple[int, str, str, str | None, dict[str, Any]]) -> str:
    """One CTP + DWI phantom as a case folder: inputs, dwi, lesion / core / penumbra, case.json
    (last). The true maps are left out: ``true_cbf`` etc. would read as a second ``cbf``."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from strokeseg.phantom.perfusion import simulate_perfusion

    seed, split, root, library, options = args
    (Path(root) / f"ctp-{split}-{seed:05d}" / "case.json").unlink(missing_ok=True)  # a stale case is not complete while remade
    case = simulate_perfusion(seed, "ctp", library, split, dwi=True, **options)
    reason = mark_refused(case, Path(root))
    if reason:
        return reason
    folder = Path(root) / case.case_id
    for key, img in case.images.items():
        write_image(img, folder / f"{key}.nii.gz")
    for name, img in (("lesion", case.lesion), ("core", case.truth["core"]), ("penumbra", case.truth["penumbra"])):
        write_image(img, folder / f"{name}.nii.gz")
    info = {**case.info, "truth_files": {n: f"{n}.nii.gz" for n in ("lesion", "core", "penumbra")}}
    write_text(json.dumps(json_safe(info), indent=2) + "\n", folder / "case.json")
    return str(folder)


def ensure_phantoms(cfg: dict[str, Any], workers: int | None = None) -> None:
    """Write the config's CTP + DWI phantoms (``data.phantom``) into ``data.root`` (``count`` cases,
    train-split lesion shapes) and ``data.test_root`` (``test_count``, test-split shapes), keeping
    the complete cases already there (case.json is written last). A series the engine refuses
    (motion beyond correction) is left out, with a ``.refused.txt`` marker saying why."""
    d = cfg["data"]
    spec = d.get("phantom")
    if not spec:
        return
    if spec.get("modality", "ctp") != "ctp":
        raise ValueError("paper 004 phantoms are CT perfusion: data.phantom.modality must be 'ctp'")
    library = spec.get("lesion_library")
    library = str(repo_path(library)) if library and repo_path(library).is_dir() else None
    seed0 = int(spec.get("seed", 0))
    stamp = json.dumps(phantoms_stamp(cfg), sort_keys=True)
    todo, roots = [], []
    for root_key, count_key, split in (("root", "count", "train"), ("test_root", "test_count", "test")):
        if not d.get(root_key) or not int(spec.get(count_key, 0)):
            continue
        root = repo_path(d[root_key])
        root.mkdir(parents=True, exist_ok=True)
        roots.append(root)
        stamp_file = root / PHANTOMS_STAMP
        # Cases made by another simulator, pipeline or options (or before stamps) are made again.
        stale = not stamp_file.is_file() or stamp_file.read_text(encoding="utf-8") != stamp
        if stale:
            stamp_file.unlink(missing_ok=True)  # an interrupted remake stays stale
            for marker in root.glob(f"*{REFUSED_SUFFIX}"):
                marker.unlink()
        for k in range(int(spec[count_key])):
            seed = seed0 + SPLIT_SEED_OFFSET[split] + k
            name = f"ctp-{split}-{seed:05d}"
            if stale or not ((root / name / "case.json").is_file() or (root / f"{name}{REFUSED_SUFFIX}").is_file()):
                todo.append((seed, split, str(root), library, dict(spec.get("options", {}))))
    if not todo:
        return
    workers = int(workers or d.get("workers", 2))
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(tqdm(pool.map(_phantom_one, todo), total=len(todo), desc="CTP + DWI phantoms", unit="case"))
    else:
        for t in tqdm(todo, desc="CTP + DWI phantoms", unit="case"):
            _phantom_one(t)
    for root in roots:
        write_text(stamp, root / PHANTOMS_STAMP)
    for key in ("root", "test_root"):
        if d.get(key):
            report_refused(repo_path(d[key]), str(d[key]))



def dwi_targets(cfg: dict[str, Any], npz_files: Sequence[Path]) -> list[np.ndarray]:
    """The real DWI of each cached training case on its model grid, normalised as
    ``train.target_normalisation`` says (z-score by default); cached beside the npz files."""
    from ..realdata import _safe, dataset_cases

    card = card_of(cfg)
    spec = cfg["train"].get("target_normalisation", {"method": "zscore", "clip": 6.0})
    cases = {_safe(c.case_id): c for c in dataset_cases(cfg)}
    tag = hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]  # new normalisation, new cache
    out = []
    for f in npz_files:
        target = f.parent.parent / f"dwi_target-{tag}" / f"{f.stem}.npy"
        if not target.is_file():
            case = cases.get(f.stem)
            if case is None or "dwi" not in case.inputs:
                raise InputError(f, "no DWI for this case: the generator of paper 004 needs the real DWI as target")
            ref = read_image(case.inputs[card.reference_input])
            grid = canonical_grid(ref, card.target_spacing)
            dwi = read_image(case.inputs["dwi"])
            on = resample_to(dwi.with_array(dwi.array.astype(np.float32)), grid, linear=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp.npy")
            np.save(tmp, normalise(on.array, spec).astype(np.float16))
            os.replace(tmp, target)
        out.append(np.load(target))
    return out


class SliceSampler:
    """2D training slices (inputs, real DWI, label), cropped or padded in-plane to ``(H, W)``;
    padding uses each channel's minimum (the background of a normalised map)."""

    def __init__(self, images: Sequence[np.ndarray], dwis: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                 size_hw: tuple[int, int], rng: np.random.Generator, lesion_slice_fraction: float = 0.0):
        for i, (a, d, y) in enumerate(zip(images, dwis, labels)):
            if a.shape[1:] != d.shape or d.shape != y.shape:
                raise ValueError(f"case {i}: inputs {a.shape[1:]}, DWI {d.shape} and label {y.shape} differ")
        self.images, self.dwis, self.labels = list(images), list(dwis), list(labels)
        self.size = size_hw
        self.rng = rng
        self.lesion_slice_fraction = lesion_slice_fraction
        self.lesion_slices = [np.flatnonzero(y.reshape(y.shape[0], -1).any(1)) for y in labels]

    def _fit(self, a: np.ndarray, fill: np.ndarray, starts: tuple[int, int]) -> np.ndarray:
        """(C, h, w) -> (C, H, W): a crop at ``starts`` where larger, centred padding where smaller."""
        out = np.broadcast_to(fill[:, None, None], (a.shape[0], *self.size)).copy()
        src, dst = [], []
        for n, size, s in zip(a.shape[1:], self.size, starts):
            if n >= size:
                src.append(slice(s, s + size))
                dst.append(slice(0, size))
            else:
                off = (size - n) // 2
                src.append(slice(0, n))
                dst.append(slice(off, off + n))
        out[(slice(None), *dst)] = a[(slice(None), *src)]
        return out

    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        i = int(self.rng.integers(len(self.images)))
        z_pool = self.lesion_slices[i] if len(self.lesion_slices[i]) and self.rng.random() < self.lesion_slice_fraction \
            else np.arange(self.labels[i].shape[0])
        z = int(z_pool[self.rng.integers(len(z_pool))])
        a = self.images[i][:, z].astype(np.float32)
        d = self.dwis[i][z][None].astype(np.float32)
        y = self.labels[i][z][None].astype(np.float32)
        starts = tuple(int(self.rng.integers(n - s + 1)) if n > s else 0 for n, s in zip(a.shape[1:], self.size))
        return (self._fit(a, a.reshape(a.shape[0], -1).min(1), starts), self._fit(d, d.reshape(1, -1).min(1), starts),
                self._fit(y, np.zeros(1, np.float32), starts))

    def batch(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        items = [self.sample() for _ in range(n)]
        return tuple(torch.from_numpy(np.stack([it[k] for it in items])) for k in range(3))  # type: ignore[return-value]


def augment(x: torch.Tensor, dwi: torch.Tensor, y: torch.Tensor, aug: dict[str, Any],
            gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same random flip / rotation / scaling / translation of each sample's inputs, DWI
    (bilinear) and label (nearest): ``flip`` (probability per in-plane axis), ``rotate_deg``,
    ``scale`` (relative), ``translate`` (fraction of the size)."""
    n = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    ang = torch.deg2rad(u(-1, 1) * float(aug.get("rotate_deg", 15.0)))
    s = 1.0 + u(-1, 1) * float(aug.get("scale", 0.1))
    fx = torch.where(torch.rand(n, generator=gen) < float(aug.get("flip", 0.5)), -1.0, 1.0)
    fy = torch.where(torch.rand(n, generator=gen) < float(aug.get("flip", 0.5)), -1.0, 1.0)
    t = float(aug.get("translate", 0.05))
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = s * torch.cos(ang) * fx, -s * torch.sin(ang) * fy
    theta[:, 1, 0], theta[:, 1, 1] = s * torch.sin(ang) * fx, s * torch.cos(ang) * fy
    theta[:, 0, 2], theta[:, 1, 2] = u(-t, t) * 2, u(-t, t) * 2
    theta = theta.to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    both = F.grid_sample(torch.cat([x, dwi], 1), grid, mode="bilinear", padding_mode="border", align_corners=False)
    lab = F.grid_sample(y, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return both[:, : x.shape[1]], both[:, x.shape[1] :], lab


# -- the GAN step ----------------------------------------------------------------------------


def discriminator_step(disc: torch.nn.Module, opt_d: torch.optim.Optimizer, real: torch.Tensor,
                       fake: torch.Tensor) -> float:
    """One update of the discriminator with Eq. 2 (real DWI -> 1, synthetic -> 0)."""
    disc.requires_grad_(True)
    loss = lsgan_discriminator_loss(disc(real), disc(fake.detach()))
    opt_d.zero_grad(set_to_none=True)
    loss.backward()
    opt_d.step()
    return float(loss.detach())


def generator_step(disc: torch.nn.Module, opt_g: torch.optim.Optimizer, logits: torch.Tensor, fake: torch.Tensor,
                   real: torch.Tensor, label: torch.Tensor, *, weights: Sequence[float] = LOSS_WEIGHTS,
                   recon: str = "mse", seg_loss: torch.nn.Module | None = None) -> dict[str, float]:
    """One joint update of generator and segmentator with Eq. 6; the discriminator is frozen."""
    wg, wd, ws = (float(w) for w in weights)
    disc.requires_grad_(False)
    try:
        rec = F.l1_loss(fake, real) if recon == "l1" else F.mse_loss(fake, real)
        adv = lsgan_generator_loss(disc(fake))
        seg = (seg_loss or CEGeneralizedDiceLoss())(logits, label)
        total = wg * rec + wd * adv + ws * seg
        opt_g.zero_grad(set_to_none=True)
        total.backward()
        opt_g.step()
    finally:
        disc.requires_grad_(True)
    return {"total": float(total.detach()), "recon": float(rec.detach()), "adversarial": float(adv.detach()),
            "segmentation": float(seg.detach())}


def gan_step(net: torch.nn.Module, disc: torch.nn.Module, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
             x: torch.Tensor, real: torch.Tensor, label: torch.Tensor, **kw: Any) -> dict[str, float]:
    """Discriminator then generator + segmentator on one batch (one forward pass of the generator)."""
    logits, fake = net(x, return_synthetic=True)
    d = discriminator_step(disc, opt_d, real, fake)
    return {"discriminator": d, **generator_step(disc, opt_g, logits, fake, real, label, **kw)}


# -- the recipe ------------------------------------------------------------------------------


def _lr_factor(progress: float, milestones: Sequence[float], gamma: float) -> float:
    return gamma ** sum(progress >= m for m in milestones)


def _train_one(cfg: dict[str, Any], resume: bool) -> Path:
    tc = cfg["train"]
    seed = int(tc.get("seed", 0))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = run_dir(cfg)
    card = card_of(cfg)
    px, py, pz = card.patch_size
    if pz != 1:
        raise ValueError(f"paper 004 trains on 2D slices: card patch_size z must be 1, got {pz}")
    workers = int(cfg["data"].get("workers", 2))
    train_files, _ = build_split(cfg, "train", workers=workers)
    val_files, _ = build_split(cfg, "val", workers=workers)
    vols = load_volumes(train_files)
    sampler = SliceSampler([v.image for v in vols], dwi_targets(cfg, train_files), [v.label for v in vols], (py, px), rng,
                           float(tc.get("lesion_slice_fraction", 0.0)))
    val_vols = load_volumes(val_files[: int(tc.get("val_volumes", 8))])

    net = build_network(card).to(dev)
    disc = build("strokeseg.LSGANDiscriminator", {"in_channels": 1, "spatial_dims": 2, **tc.get("discriminator", {})}).to(dev)
    if disc.min_size > min(px, py):
        raise ValueError(f"the discriminator needs slices of at least {disc.min_size} pixels; the card's patch is {px} x {py}")
    lr = float(tc.get("lr", 1e-4))
    alpha = float(tc.get("rms_alpha", 0.9))
    opt_g = torch.optim.RMSprop(net.parameters(), lr=lr, alpha=alpha)
    opt_d = torch.optim.RMSprop(disc.parameters(), lr=float(tc.get("lr_discriminator", lr)), alpha=alpha)
    base = [g["lr"] for g in (*opt_g.param_groups, *opt_d.param_groups)]
    milestones = [float(m) for m in tc.get("lr_milestones", [100 / 700, 300 / 700, 500 / 700])]
    gamma = float(tc.get("lr_gamma", 0.5))
    steps = int(tc["steps"])
    budget_s = float(tc.get("max_minutes", 1e9)) * 60
    batch = int(tc.get("batch_size", 6))
    val_every = int(tc.get("val_every", 250))
    weights = tuple(float(w) for w in tc.get("loss_weights", LOSS_WEIGHTS))
    recon = str(tc.get("recon_loss", "mse"))
    if recon not in ("mse", "l1"):
        raise ValueError(f"train.recon_loss must be 'mse' or 'l1', got {recon!r}")
    seg_loss = CEGeneralizedDiceLoss()
    aug = tc.get("augment", {})

    columns = ["total", "discriminator", "recon", "adversarial", "segmentation"]
    run = RunFolder(out, columns, settings_key(cfg))
    start = run.resume({"net": net, "disc": disc, "opt_g": opt_g, "opt_d": opt_d, **generator_states(rng, gen)}, dev, resume)
    net.train()
    disc.train()
    smoothed: dict[str, float] = dict(run.resumed.get("smoothed", {}))
    step = start - 1
    for step in tqdm(range(start, steps), initial=start, total=steps, desc="training (004)"):
        if run.budget_spent_at_validation(step, budget_s):
            step -= 1
            break
        factor = _lr_factor(max(step / steps, run.elapsed() / budget_s), milestones, gamma)
        for g, b in zip((*opt_g.param_groups, *opt_d.param_groups), base):
            g["lr"] = b * factor
        x, d, y = sampler.batch(batch)
        if aug:
            x, d, y = augment(x, d, y, aug, gen)
        parts = gan_step(net, disc, opt_g, opt_d, x.to(dev), d.to(dev), y.to(dev), weights=weights, recon=recon,
                         seg_loss=seg_loss)
        smoothed = {k: v if k not in smoothed else 0.98 * smoothed[k] + 0.02 * v for k, v in parts.items()}
        last = step + 1 == steps or run.elapsed() > budget_s
        if (step + 1) % val_every == 0 or last:
            val_dice = validate(net, card, val_vols, dev)
            run.row(step + 1, smoothed, lr * factor, val_dice)
            run.checkpoint(step + 1, net, val_dice, smoothed=smoothed)
        elif (step + 1) % 25 == 0:
            run.row(step + 1, smoothed, lr * factor)
        if last:
            break
    save_weights(disc, out / "discriminator.safetensors")  # training only; never in the card
    return run.finish(step + 1, dev, {"recipe": "paper004_ctp_gan", "fold": cfg["data"].get("fold"),
                                      "final_losses": smoothed})


def train(cfg: dict[str, Any], *, resume: bool = True) -> Path:
    """Train fold ``data.fold`` (the exported model) and, with ``train.cross_validate``, the other
    folds too; returns the exported fold's run folder. The phantoms (``ensure_phantoms``) are
    written first by ``recipes.train_recipe`` / ``generate``."""
    out = _train_one(cfg, resume)
    if cfg["train"].get("cross_validate"):
        k, main = int(cfg["data"].get("folds", 4)), int(cfg["data"].get("fold", 0))
        results = {main: json.loads((out / "train_summary.json").read_text(encoding="utf-8"))}
        for f in range(k):
            if f != main:
                results[f] = json.loads((_train_one(fold_config(cfg, f), resume) / "train_summary.json").read_text(encoding="utf-8"))
        cv = {"folds": {str(f): {"best_val_dice": r["best_val_dice"], "steps_done": r["steps_done"]}
                        for f, r in sorted(results.items())},
              "summary": summarise_folds({f: {"best_val_dice": r["best_val_dice"]} for f, r in results.items()})}
        write_text(json.dumps(json_safe(cv), indent=2) + "\n", out / "cv_summary.json")
    return out

