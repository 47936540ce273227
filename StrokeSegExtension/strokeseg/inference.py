"""Running a model card's networks over a prepared input with MONAI's sliding window.

Gaussian-blended windows (overlap from the card), device auto-selection (CUDA > MPS > CPU),
mixed precision on CUDA, optional mirror test-time augmentation and fold ensembles.
Progress is reported per window and a cancel event is honoured between windows.
"""

from __future__ import annotations

import itertools
import math
import threading
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ._lean_monai import import_monai
from .errors import Cancelled, StrokeSegError

import_monai()  # first, so that the next line finds MONAI imported lean in the strokeseg command
from monai.inferers import sliding_window_inference  # noqa: E402

ProgressFn = Callable[[float, str], None]
# Mirror test-time augmentation averages the network over mirrored inputs. A mirroring it never saw
# in training (every recipe flips left-right only: axis x of the model grid) feeds it an
# upside-down or back-to-front head, so a card lists the axes it may be mirrored along.
TTA_AXES = {"z": 2, "y": 3, "x": 4}  # spatial axes of (N, C, z, y, x)
DEFAULT_TTA_AXES = ("x",)


def mirror_axes(card: Any, mirror_tta: bool | None = None) -> list[str]:
    """Axes the input is mirrored along at test time, [] without TTA: the card's ``inference.tta_axes``
    when TTA is on (``mirror_tta``, or the card's own ``inference.mirror_tta`` when None)."""
    inf = card.raw.get("inference", {})
    on = inf.get("mirror_tta", False) if mirror_tta is None else mirror_tta
    return sorted(inf.get("tta_axes", DEFAULT_TTA_AXES), key=TTA_AXES.get) if on else []


def available_devices() -> list[str]:
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs.insert(0, "cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devs.insert(0 if "cuda" not in devs else 1, "mps")
    return devs


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device(available_devices()[0])
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise StrokeSegError(f"unknown device '{device}' (use auto, cpu, cuda or mps)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StrokeSegError("device 'cuda' requested but no CUDA GPU is available (use --device cpu)")
    if device == "mps" and "mps" not in available_devices():
        raise StrokeSegError("device 'mps' requested but Apple MPS is not available (use --device cpu)")
    return torch.device(device)


def _count_windows(shape: Sequence[int], roi: Sequence[int], overlap: float | Sequence[float]) -> int:
    n = 1
    overlaps = overlap if isinstance(overlap, (tuple, list)) else [overlap] * len(shape)
    for s, r, o in zip(shape, roi, overlaps):
        r = min(r, s)
        step = max(int(r * (1 - o)), 1)
        n *= max(math.ceil((s - r) / step), 0) + 1
    return n


def _activate(logits: torch.Tensor, output: dict[str, Any]) -> torch.Tensor:
    """Network output (N, C, ...) -> foreground probability (N, 1, ...)."""
    if output.get("activation", "sigmoid") == "softmax":
        fg = int(output.get("foreground_channel", 1))
        return torch.softmax(logits.float(), dim=1)[:, fg : fg + 1]
    return torch.sigmoid(logits.float()[:, :1])


def predict(
    array: np.ndarray,
    networks: Sequence[torch.nn.Module],
    card: Any,
    *,
    device: str | torch.device = "auto",
    mirror_tta: bool | None = None,
    progress: ProgressFn | None = None,
    cancel: threading.Event | None = None,
) -> np.ndarray:
    """(C, z, y, x) normalised input -> (z, y, x) float32 foreground probability on the same grid."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    inf = card.raw.get("inference", {})
    output = card.raw.get("output", {})
    roi = tuple(int(v) for v in reversed(inf.get("roi_size", card.patch_size)))  # card is (x,y,z)
    raw_overlap = inf.get("overlap", 0.5)  # one fraction, or (x, y, z) per axis (dense steps, paper 001)
    overlap = tuple(float(v) for v in reversed(raw_overlap)) if isinstance(raw_overlap, list) else float(raw_overlap)
    axes = [TTA_AXES[a] for a in mirror_axes(card, mirror_tta)]
    flips = [f for n in range(len(axes) + 1) for f in itertools.combinations(axes, n)]  # [()] without TTA
    per_pass = _count_windows(array.shape[1:], roi, overlap)
    total = per_pass * len(flips) * len(networks)
    done = 0

    x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None].to(dev)
    acc = torch.zeros((1, 1, *array.shape[1:]), dtype=torch.float32, device=dev)
    amp = dev.type == "cuda"
    for net in networks:
        net.to(dev).eval()

        def window(batch: torch.Tensor, net: torch.nn.Module = net) -> torch.Tensor:
            nonlocal done
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled by the user")
            with torch.autocast(dev.type, enabled=amp):
                out = _activate(net(batch), output)
            done += batch.shape[0]
            if progress is not None:
                progress(min(done / total, 1.0), f"inference window {done}/{total}")
            return out

        for flip in flips:
            xi = torch.flip(x, flip) if flip else x
            with torch.inference_mode():
                prob = sliding_window_inference(
                    xi,
                    roi_size=roi,
                    sw_batch_size=int(inf.get("sw_batch_size", 1)),
                    predictor=window,
                    overlap=overlap,
                    mode=inf.get("blend", "gaussian"),
                    sw_device=dev,
                    device=dev,
                )
            acc += torch.flip(prob, flip) if flip else prob
    acc /= len(flips) * len(networks)
    return acc[0, 0].float().cpu().numpy()
