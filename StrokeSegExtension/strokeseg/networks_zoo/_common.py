"""Small helpers shared by the paper networks: N-d layer choice, padding to a size, channel padding."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_CONVT = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BN = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_IN = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_MAXPOOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_DROPOUT = {2: nn.Dropout2d, 3: nn.Dropout3d}


def check_dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return int(spatial_dims)


def conv(dims: int) -> type[nn.Module]:
    return _CONV[check_dims(dims)]


def conv_transpose(dims: int) -> type[nn.Module]:
    return _CONVT[check_dims(dims)]


def max_pool(dims: int) -> type[nn.Module]:
    return _MAXPOOL[check_dims(dims)]


def dropout(dims: int) -> type[nn.Module]:
    return _DROPOUT[check_dims(dims)]


def norm(kind: str | None, dims: int, channels: int, group_channels: int = 16) -> nn.Module:
    """'batch', 'instance', 'group' (``group_channels`` channels per group) or None (identity)."""
    if kind is None or kind == "none":
        return nn.Identity()
    if kind == "batch":
        return _BN[check_dims(dims)](channels)
    if kind == "instance":
        return _IN[check_dims(dims)](channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(max(1, channels // group_channels), channels)
    raise ValueError(f"unknown norm '{kind}' (use batch, instance, group or none)")


def as_tuple(value: int | Sequence[int], n: int, what: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    out = tuple(int(v) for v in value)
    if len(out) != n:
        raise ValueError(f"{what} needs {n} values, got {len(out)}")
    return out


def pad_to_multiple(x: torch.Tensor, multiple: Sequence[int], mode: str = "constant") -> tuple[torch.Tensor, tuple[int, ...]]:
    """Pad the spatial axes of (N, C, *spatial) at their far end up to multiples; returns the original size."""
    size = tuple(x.shape[2:])
    pads: list[int] = []
    for s, m in zip(reversed(size), reversed(tuple(multiple))):  # F.pad wants the last axis first
        pads += [0, (-s) % m]
    if any(pads):
        x = F.pad(x, pads, mode=mode) if mode != "constant" else F.pad(x, pads)
    return x, size


def crop_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Keep the first ``size`` voxels of each spatial axis (undoes :func:`pad_to_multiple`)."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    return x[(slice(None), slice(None)) + tuple(slice(0, int(s)) for s in size)]


def pad_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Zero channels appended so a residual of fewer channels can be added (as DeepMedic does)."""
    extra = channels - x.shape[1]
    if extra < 0:
        raise ValueError(f"residual has {x.shape[1]} channels, more than the {channels} it is added to")
    if extra == 0:
        return x
    return torch.cat([x, x.new_zeros((x.shape[0], extra, *x.shape[2:]))], dim=1)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
