"""The training loop: single process, or several with ``torchrun`` (gloo on CPU, nccl on GPU).

Checkpoints and resume, CSV log and PNG curves, periodic whole-volume validation with the
engine's own sliding-window inference, best-checkpoint selection on validation Dice.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from monai.losses import DiceCELoss, DiceFocalLoss
from tqdm import tqdm

from strokeseg.errors import ModelError
from strokeseg.inference import predict
from strokeseg.models import build_network, check_state, save_weights

from .config import card_of, repo_path, run_dir
from .data import build_split, load_volumes
from .resume import Checkpoint, generator_states, settings_key, truncate_log
from .sampling import PatchSampler, augmentation


def _dist_setup() -> tuple[int, int, torch.device]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if backend == "nccl" else torch.device("cpu")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return rank, world, dev
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _elapsed(t0: float, world: int, dev: torch.device) -> float:
    """Seconds since ``t0``, identical on every rank: the lr schedule and the stop decision
    depend on it, and ranks that disagree would drift apart (lr) or deadlock (one rank
    leaving the loop while the others wait in the gradient all-reduce)."""
    elapsed = time.time() - t0
    if world > 1:
        t = torch.tensor([elapsed], dtype=torch.float64, device=dev)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        elapsed = float(t.item())
    return elapsed


def make_loss(name: str, pos_weight: float | None = None) -> torch.nn.Module:
    """``pos_weight`` (> 1) weights lesion voxels in the BCE term: for models that find lesions
    precisely but miss their faint parts (T1's gliotic rim), it trades precision for recall."""
    if name not in ("dicece", "dicefocal"):
        raise ValueError(f"unknown loss {name!r} (dicece, dicefocal)")
    if name == "dicefocal":
        if pos_weight is not None:
            raise ValueError("pos_weight applies to the dicece loss")
        return DiceFocalLoss(sigmoid=True, batch=True)
    weight = None if pos_weight is None else torch.tensor([float(pos_weight)])
    return DiceCELoss(sigmoid=True, batch=True, weight=weight)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * np.logical_and(a, b).sum() / s)


def validate(net: torch.nn.Module, card: Any, vols: list, device: torch.device) -> float:
    net.eval()
    scores = [dice(predict(v.image.astype(np.float32), [net], card, device=device, mirror_tta=False) >= 0.5, v.label > 0)
              for v in vols]
    net.train()
    return float(np.mean(scores))


def plot_curves(log_csv: Path, png: Path, val_label: str = "validation Dice (whole volumes)") -> None:
    """Loss and validation curves of a training log (``val_dice`` or, from :func:`fit`, ``val``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(log_csv.open()))
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(steps, [float(r["loss"]) for r in rows])
    ax[0].set(xlabel="step", ylabel="training loss (smoothed)", yscale="log")
    column = "val_dice" if "val_dice" in rows[0] else "val"
    val = [(int(r["step"]), float(r[column])) for r in rows if r.get(column)]
    if val:
        ax[1].plot(*zip(*val), marker="o")
    ax[1].set(xlabel="step", ylabel=val_label)
    if all(0.0 <= v <= 1.0 for _, v in val):
        ax[1].set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def load_init_weights(net: torch.nn.Module, tc: dict[str, Any], network: dict[str, Any] | None = None) -> torch.nn.Module:
    """``train.init_weights``: a run that starts from an earlier run's weights (safetensors only;
    a relative path is from the repository root). With ``train.init_channels`` those weights are
    a narrower ``monai.UNet``'s (the card's ``network`` with these channels), widened so that the
    new net starts out computing the same function (``widen.widen_unet``)."""
    if tc.get("init_weights"):
        from safetensors.torch import load_file

        path = repo_path(tc["init_weights"])
        if not path.is_file():
            raise ModelError(f"{path}: no such weights file (train.init_weights)")
        state = load_file(str(path))
        if tc.get("init_channels"):
            from .widen import widen_unet

            if network is None or network.get("name") != "monai.UNet":
                raise ModelError("train.init_channels widens a monai.UNet; this network is not one")
            try:
                return widen_unet(net, state, {**network["args"], "channels": list(tc["init_channels"])}, network["args"])
            except ValueError as exc:
                raise ModelError(f"{path}: train.init_channels: {exc}") from None
        check_state(net, state, path, "of this config")
        net.load_state_dict(state)
    return net


def budget_spent_at_validation(validated_step: int, step: int, elapsed_s: float, budget_s: float) -> bool:
    """True when a loop is about to run ``step`` with its time budget gone and the weights of
    ``step`` already validated (the budget ran out during that validation, or a resume after it):
    stop there rather than train one step and validate again, which on a CPU can cost a
    whole-volume validation for nothing. Every training loop here asks this one question."""
    return validated_step == step > 0 and elapsed_s > budget_s


def train(cfg: dict[str, Any], *, resume: bool = True) -> Path:
    """Train the config's network; returns the run folder (best weights in best.safetensors)."""
    tc = cfg["train"]
    rank, world, dev = _dist_setup()
    torch.manual_seed(int(tc.get("seed", 0)) + rank)
    rng = np.random.default_rng(int(tc.get("seed", 0)) + 1000 * rank)
    out = run_dir(cfg)
    card = card_of(cfg)
    if rank == 0:
        build_split(cfg, "train", workers=int(cfg["data"].get("workers", 2)))
        build_split(cfg, "val", workers=int(cfg["data"].get("workers", 2)))
    if world > 1:
        dist.barrier()
    train_files, _ = build_split(cfg, "train", workers=1)
    val_files, _ = build_split(cfg, "val", workers=1)
    train_vols = load_volumes(train_files[rank::world])
    val_vols = load_volumes(val_files[: int(tc.get("val_volumes", 8))]) if rank == 0 else []

    patch_zyx = tuple(reversed(card.patch_size))
    sampler = PatchSampler(train_vols, patch_zyx, float(tc.get("pos_fraction", 0.5)),
                           augmentation(tc.get("augment", {}), len(card.required), patch_zyx), rng,
                           component_fraction=float(tc.get("component_fraction", 0.0)),
                           hard_negative_fraction=float(tc.get("hard_negative_fraction", 0.0)),
                           hard_negative_quantile=float(tc.get("hard_negative_quantile", 99.5)),
                           hard_negative_kind=str(tc.get("hard_negative_kind", "bright")))
    net = load_init_weights(build_network(card), tc, card.network).to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=float(tc.get("lr", 2e-3)), weight_decay=float(tc.get("weight_decay", 1e-4)))
    steps = int(tc["steps"])
    warm = int(tc.get("warmup", 100))
    base_lr = float(tc.get("lr", 2e-3))
    budget_s = float(tc.get("max_minutes", 1e9)) * 60

    def set_lr(step: int, elapsed: float) -> float:
        """Warm-up then cosine decay over the run's progress: steps done or time budget used,
        whichever is further, so a time-limited CPU run still anneals."""
        progress = min(1.0, max(step / steps, elapsed / budget_s if budget_s > 0 else 1.0))
        lr = base_lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = lr
        return lr
    loss_fn = make_loss(tc.get("loss", "dicece"), tc.get("pos_weight")).to(dev)
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda")

    start, best, smoothed, elapsed0 = 0, -1.0, None, 0.0
    # Not bit-exact on resume: MONAI's random transforms keep generators of their own.
    ckpt = Checkpoint(out / "checkpoint.pt", settings_key(cfg), {"net": net, "opt": opt})
    state = ckpt.load(dev) if resume else None
    if state is not None:
        start, best, elapsed0 = int(state["step"]), float(state["best"]), float(state["elapsed_s"])
        if rank == 0:
            print(f"resuming at step {start} of {steps} from {ckpt.path}")
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    module = net.module if world > 1 else net

    log_csv = out / "log.csv"
    if rank == 0 and (start == 0 or not log_csv.is_file()):
        log_csv.write_text("step,loss,lr,val_dice,elapsed_s\n")
    elif rank == 0:
        truncate_log(log_csv, start)  # the rows after the checkpoint are trained again
    t0 = time.time() - elapsed0
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="training", disable=rank != 0)
    net.train()
    done = start  # steps done; a resumed run that is already complete does no step
    validated = start  # checkpoints are written at validations only
    for step in bar:
        elapsed = _elapsed(t0, world, dev)
        if budget_spent_at_validation(validated, step, elapsed, budget_s):
            break
        x, y = sampler.batch(int(tc.get("batch_size", 2)))
        x, y = x.to(dev), y.to(dev)
        lr = set_lr(step, elapsed)
        with torch.autocast(dev.type, enabled=dev.type == "cuda"):
            loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        done = step + 1
        last = done == steps or elapsed > budget_s
        validating = done % int(tc.get("val_every", 250)) == 0 or last
        if validating:
            validated = done  # on every rank, so that all ranks take the same break above
        if rank == 0:
            bar.set_postfix(loss=f"{smoothed:.3f}", best=f"{best:.3f}")
            val = ""
            if validating:
                val_dice = validate(module, card, val_vols, dev)
                val = f"{val_dice:.4f}"
                if val_dice > best:
                    best = val_dice
                    save_weights(module, out / "best.safetensors")
                save_weights(module, out / "last.safetensors")
                ckpt.save(step=step + 1, best=best, elapsed_s=time.time() - t0)
                plot_curves(log_csv, out / "curves.png")
            if (step + 1) % 25 == 0 or val:
                with log_csv.open("a") as f:
                    f.write(f"{step + 1},{smoothed:.5f},{lr:.3e},{val},{time.time() - t0:.1f}\n")
        if last:
            break
    if rank == 0:
        plot_curves(log_csv, out / "curves.png")
        (out / "train_summary.json").write_text(json.dumps(
            {"steps_done": done, "best_val_dice": best, "duration_s": time.time() - t0,
             "device": str(dev), "world_size": world}, indent=2))
    if world > 1:
        dist.destroy_process_group()
    return out


# -- a plain single-process loop for the paper recipes (recipes/paper00*.py) ------------------


def fit(net: torch.nn.Module, next_batch: Any, loss_fn: Any, opt: torch.optim.Optimizer, *, steps: int, out: Path,
        device: torch.device, val_fn: Any, val_every: int = 250, schedule: Any = None, max_minutes: float | None = None,
        patience: int | None = None, best: float = -math.inf, log_name: str = "log.csv",
        weights_name: str = "best.safetensors", desc: str = "training", resume_key: str | None = None,
        rng: np.random.Generator | None = None) -> dict[str, Any]:
    """Train ``net`` for ``steps`` steps: ``next_batch() -> (x, y)``, ``loss_fn(net(x), y)``;
    every ``val_every`` steps ``val_fn(net)`` (higher is better) and the weights are saved to
    ``out/weights_name`` when it beats ``best``; ``schedule(step, progress)`` may set learning rate
    or momentum; ``patience`` validation rounds without improvement stop early (paper 001's early
    stopping); ``max_minutes`` caps the time. The log is ``out/log_name`` (step, loss, lr, val).

    With ``resume_key`` (:func:`~strokeseg_training.resume.settings_key`) the loop checkpoints at
    every validation and a later call with the same key continues from the last one (up to the
    new ``steps`` and budget); a loop stopped early by ``patience`` is not run again.
    ``rng`` is the generator ``next_batch`` draws from: restored with the checkpoint, the resumed
    run is the uninterrupted one, provided ``next_batch`` holds no other state between
    validations (paper 001's epochs end at validations, paper 000/002 draw every batch afresh)."""
    log = out / log_name
    ckpt = (Checkpoint(log.with_suffix(".ckpt"), resume_key, {"net": net, "opt": opt, **generator_states(rng)})
            if resume_key is not None else None)
    state = ckpt.load(device) if ckpt is not None else None
    loop: dict[str, Any] = {"step": 0, "best": best, "smoothed": None, "rounds_without": 0, "best_state": None,
                            "finished": False, "elapsed_s": 0.0}
    if state is None:
        log.write_text("step,loss,lr,val,elapsed_s\n")
    else:
        loop.update(state)
        if loop["best_state"] is not None:
            save_weights(loop["best_state"], out / weights_name)
        truncate_log(log, loop["step"])
        done_note = " (finished)" if loop["finished"] or loop["step"] >= steps else ""
        print(f"{desc}: resuming at step {loop['step']} of {steps}{done_note} from {ckpt.path}")
    t0 = time.time() - float(loop["elapsed_s"])
    budget = float(max_minutes) * 60 if max_minutes else math.inf

    def validate_and_keep() -> float:
        """Score the network; keep its weights (file and checkpoint copy) when they are the best."""
        net.eval()
        with torch.no_grad():
            score = float(val_fn(net))
        net.train()
        if score > loop["best"]:
            loop.update(best=score, rounds_without=0)
            save_weights(net, out / weights_name)
            if ckpt is not None:
                loop["best_state"] = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        else:
            loop["rounds_without"] += 1
        return score

    def log_row(step: int, score: float | None) -> None:
        loss = float("nan") if loop["smoothed"] is None else loop["smoothed"]
        with log.open("a") as f:
            f.write(f"{step},{loss:.5f},{opt.param_groups[0]['lr']:.3e},{'' if score is None else f'{score:.5f}'},"
                    f"{time.time() - t0:.1f}\n")

    def checkpoint() -> None:
        if ckpt is not None:
            ckpt.save(**{**loop, "elapsed_s": time.time() - t0})

    net.to(device).train()
    if steps == 0 and state is None:  # no training: score the weights it was given (train.init_weights)
        log_row(0, validate_and_keep())
        checkpoint()  # a rerun does not score them again
    validated = done = int(loop["step"])  # checkpoints are written at validations only
    bar = tqdm(range(done, done if loop["finished"] else steps), initial=done, total=steps, desc=desc, leave=False)
    for step in bar:
        if budget_spent_at_validation(validated, step, time.time() - t0, budget):
            break
        if schedule is not None:
            schedule(step, max(step / max(steps, 1), (time.time() - t0) / budget))
        x, y = next_batch()
        loss = loss_fn(net(x.to(device)), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loop["smoothed"] = loss.item() if loop["smoothed"] is None else 0.95 * loop["smoothed"] + 0.05 * loss.item()
        done = loop["step"] = step + 1
        last = done == steps or time.time() - t0 > budget
        if done % max(int(val_every), 1) == 0 or last:
            validated = done
            log_row(done, validate_and_keep())
            if patience is not None and loop["rounds_without"] >= patience:
                last = loop["finished"] = True
            checkpoint()
        else:
            log_row(done, None)
        bar.set_postfix(loss=f"{loop['smoothed']:.3f}", best=f"{loop['best']:.3f}")
        if last:
            break
    if not (out / weights_name).is_file():  # never validated better than the given best: keep the last
        save_weights(net, out / weights_name)
    plot_curves(log, out / (log.stem.replace("log", "curves", 1) + ".png"), "validation score (higher is better)")
    return {"steps_done": done, "best_val": loop["best"], "duration_s": time.time() - t0}


def recipe_setup(cfg: dict[str, Any]) -> tuple[Path, Any, list, list, torch.device, np.random.Generator]:
    """What every paper recipe starts with: run folder (stale best weights removed; a recipe that
    resumes restores its own), card, training and validation volumes, device, seeded generator."""
    tc = cfg["train"]
    torch.manual_seed(int(tc.get("seed", 0)))
    rng = np.random.default_rng(int(tc.get("seed", 0)))
    out = run_dir(cfg)
    (out / "best.safetensors").unlink(missing_ok=True)
    workers = int(cfg["data"].get("workers", 2))
    train_files, _ = build_split(cfg, "train", workers=workers)
    val_files, _ = build_split(cfg, "val", workers=workers)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return (out, card_of(cfg), load_volumes(train_files), load_volumes(val_files[: int(tc.get("val_volumes", 8))]),
            dev, rng)


def write_summary(out: Path, device: torch.device, steps_done: int, duration_s: float, best: float, **extra: Any) -> None:
    """``train_summary.json``, the file tune / evaluate / export read (same keys as :func:`train`)."""
    (out / "train_summary.json").write_text(json.dumps(
        {"steps_done": int(steps_done), "best_val_dice": best, "duration_s": duration_s, "device": str(device),
         "world_size": 1, **extra}, indent=2, default=float))
