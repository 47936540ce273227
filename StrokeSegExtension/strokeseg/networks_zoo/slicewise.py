"""Run a 2D network on every z-slice of a 3D tensor, so 2D methods keep a 3D model card.

"strokeseg.SliceWise" with ``{"inner": {"name": ..., "args": ...}}`` folds z into the batch:
(N, C, z, y, x) -> (N*z, C, y, x) -> inner -> back to (N, C', z, y, x). The engine's sliding
window then works unchanged (use a patch / roi with z = 1 or a few slices). Keyword arguments
of ``forward`` are passed to the inner network; list and tuple outputs (deep-supervision heads,
a synthetic image) are unfolded element by element. 4D input goes to the inner network as is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .. import networks


def _unfold(out: Any, n: int, z: int) -> Any:
    if isinstance(out, torch.Tensor):
        if out.dim() == 4:  # (N*z, C, y, x) -> (N, C, z, y, x)
            return out.reshape(n, z, *out.shape[1:]).transpose(1, 2)
        return out.reshape(n, z, *out.shape[1:])  # e.g. one score per slice: (N, z, ...)
    if isinstance(out, (list, tuple)):
        return type(out)(_unfold(o, n, z) for o in out)
    return out


class SliceWise(nn.Module):
    per_slice = True  # the inner network sees one (y, x) slice at a time

    def __init__(self, inner: Mapping[str, Any], chunk: int = 0):
        super().__init__()
        if not isinstance(inner, Mapping) or "name" not in inner:
            raise ValueError("inner must be {'name': ..., 'args': {...}}")
        self.inner = networks.build(inner["name"], inner.get("args", {}))
        self.chunk = int(chunk)  # slices per call of the inner network; 0 = all at once

    def forward(self, x: torch.Tensor, **kwargs: Any) -> Any:
        if x.dim() == 4:
            return self.inner(x, **kwargs)
        if x.dim() != 5:
            raise ValueError(f"SliceWise expects (N, C, z, y, x) or (N, C, y, x), got shape {tuple(x.shape)}")
        n, c, z, h, w = x.shape
        flat = x.transpose(1, 2).reshape(n * z, c, h, w)
        if self.chunk <= 0 or n * z <= self.chunk:
            return _unfold(self.inner(flat, **kwargs), n, z)
        parts = [self.inner(flat[i : i + self.chunk], **kwargs) for i in range(0, n * z, self.chunk)]
        return _unfold(_concat(parts), n, z)


def _concat(parts: list[Any]) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts, dim=0)
    if isinstance(first, (list, tuple)):
        return type(first)(_concat([p[i] for p in parts]) for i in range(len(first)))
    raise TypeError(f"cannot join outputs of type {type(first).__name__}")


@networks.register_network("strokeseg.SliceWise")
def _slicewise(**args: Any) -> nn.Module:
    return SliceWise(**args)
