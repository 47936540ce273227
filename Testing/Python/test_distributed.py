"""Multi-process training on CPU: ``torchrun`` (torch.distributed.run) with two gloo ranks runs the
real ``strokeseg-train train`` entry point on tiny phantoms, and rank 0 saves weights that load
into the card's network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from safetensors.torch import load_file

from strokeseg.models import build_network
from strokeseg_training.config import load_config

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "training" / "configs" / "dwi_unet.json"


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_torchrun_two_cpu_ranks_train(tmp_path):
    cfg = load_config(CONFIG)
    cfg.pop("_config_path")
    cfg["name"] = "ddp-smoke"
    cfg["run_dir"] = str(tmp_path / "run")
    cfg["data"].update(lesion_library=None, n_train=2, n_val=1, n_test=1, workers=1, cache_dir=str(tmp_path / "cache"),
                       phantom_options={"spacing": [2.5, 2.5, 5.0], "size": [80, 80, 28]})
    cfg["train"].update(steps=2, batch_size=1, val_every=2, val_volumes=1, warmup=1)
    cfg["card"]["network"]["args"]["channels"] = [4, 8, 8, 8]
    cfg["card"]["patch_size"] = [48, 48, 16]
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg, indent=1))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "strokeseg_training.cli", "train", "--config", str(path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run = tmp_path / "run"
    summary = json.loads((run / "train_summary.json").read_text(encoding="utf-8"))
    assert summary["world_size"] == 2 and summary["steps_done"] == 2 and summary["device"] == "cpu"
    assert 0.0 <= summary["best_val_dice"] <= 1.0
    net = build_network(cfg["card"])
    net.load_state_dict(load_file(str(run / "best.safetensors")), strict=True)
    assert (run / "log.csv").read_text(encoding="utf-8").splitlines()[0].startswith("step,loss")
    # Each rank trained on its own shard: two phantom volumes for two ranks.
    assert len(list((tmp_path / "cache").glob("dwi-train-*/npz/*.npz"))) == 2
