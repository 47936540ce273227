"""Bookkeeping shared by the paper 003 / 004 recipes: checkpoint + resume, CSV log, best weights,
``train_summary.json`` (the run-folder contract ``tune`` / ``evaluate`` / ``export`` rely on).

The loops themselves differ (patch classifier vs GAN), so only this part is shared; validation
Dice, curves and whole-volume inference are those of :mod:`strokeseg_training.train`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from strokeseg.models import save_weights

from ..resume import Checkpoint, truncate_log
from ..train import budget_spent_at_validation, plot_curves


class RunFolder:
    """One run's folder: ``log.csv``, ``checkpoint.pt`` (every module, optimiser and other
    stateful object, under the settings ``key``: :class:`~strokeseg_training.resume.Checkpoint`),
    ``best.safetensors`` / ``last.safetensors`` of the network the card runs, ``curves.png`` and
    ``train_summary.json``."""

    def __init__(self, out: Path, columns: list[str], key: str):
        self.out = out
        self.columns = ["step", *columns, "lr", "val_dice", "elapsed_s"]
        self.ckpt_path = out / "checkpoint.pt"
        self.key = key
        self.ckpt: Checkpoint | None = None
        self.resumed: dict[str, Any] = {}  # the loop values saved with the checkpoint resumed from
        self.log = out / "log.csv"
        self.best = -1.0
        self.validated_step = 0  # the step of the last validation (= of the checkpoint)
        self.t0 = time.time()

    def resume(self, stateful: dict[str, Any], device: torch.device, enabled: bool) -> int:
        """Restore ``stateful`` (modules, optimisers, generators, a sampler: anything with
        ``state_dict`` / ``load_state_dict``) from the checkpoint when ``enabled`` and written
        under this run's key; returns the step to start from."""
        self.ckpt = Checkpoint(self.ckpt_path, self.key, stateful)
        state = self.ckpt.load(device) if enabled else None
        start, elapsed = 0, 0.0
        if state is not None:
            start, self.best, elapsed = int(state["step"]), float(state["best"]), float(state["elapsed_s"])
            self.resumed = state
            print(f"resuming at step {start} from {self.ckpt_path}")
        if start == 0 or not self.log.is_file():
            self.log.write_text(",".join(self.columns) + "\n")
        else:
            truncate_log(self.log, start)
        self.t0 = time.time() - elapsed
        self.validated_step = start  # checkpoints are written at validations only
        return start

    def budget_spent_at_validation(self, step: int, budget_s: float) -> bool:
        """:func:`~strokeseg_training.train.budget_spent_at_validation` for this run."""
        return budget_spent_at_validation(self.validated_step, step, self.elapsed(), budget_s)

    def elapsed(self) -> float:
        return time.time() - self.t0

    def row(self, step: int, values: dict[str, float], lr: float, val: float | None = None) -> None:
        cells = [str(step), *(f"{values.get(c, float('nan')):.5f}" for c in self.columns[1:-3]),
                 f"{lr:.3e}", "" if val is None else f"{val:.4f}", f"{self.elapsed():.1f}"]
        with self.log.open("a") as f:
            f.write(",".join(cells) + "\n")

    def checkpoint(self, step: int, net: torch.nn.Module, val_dice: float, **loop: Any) -> None:
        """After a validation and its :meth:`row`: best/last weights of the card's network, then
        the full checkpoint with the loop's own values (``loop``, back in :attr:`resumed`)."""
        self.validated_step = step
        if val_dice > self.best:
            self.best = val_dice
            save_weights(net, self.out / "best.safetensors")
        save_weights(net, self.out / "last.safetensors")
        assert self.ckpt is not None, "resume() first"
        self.ckpt.save(step=step, best=self.best, elapsed_s=self.elapsed(), **loop)
        self._plot()

    def _plot(self) -> None:
        # plot_curves reads the "loss" column: give it the first loss column under that name.
        lines = self.log.read_text(encoding="utf-8").splitlines()
        if len(lines) < 2:
            return
        head = lines[0].split(",")
        head[1] = "loss"
        tmp = self.out / "log_plot.csv"
        tmp.write_text("\n".join([",".join(head), *lines[1:]]) + "\n")
        try:
            plot_curves(tmp, self.out / "curves.png")
        finally:
            tmp.unlink(missing_ok=True)

    def finish(self, steps_done: int, device: torch.device, extra: dict[str, Any] | None = None) -> Path:
        if not (self.out / "best.safetensors").is_file():
            raise RuntimeError(f"{self.out}: training ended before its first validation; no weights saved")
        self._plot()
        summary = {"steps_done": steps_done, "best_val_dice": self.best, "duration_s": self.elapsed(),
                   "device": str(device), "world_size": 1, **(extra or {})}
        (self.out / "train_summary.json").write_text(json.dumps(summary, indent=2))
        return self.out
