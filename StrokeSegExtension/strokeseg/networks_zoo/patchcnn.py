"""Paper 003 (Bhavnani et al.): 3D patch CNN (5 convolutions + 2 FC) in fully convolutional form.

The paper classifies the centre voxel of a 25^3 cube with five convolutions (the first two followed
by max-pooling), ReLU, and two fully connected layers; it gives neither kernel sizes nor channel
counts. Here the kernels are chosen so the receptive field is exactly 25^3:
conv 4 -> pool 2 -> conv 4 -> pool 2 -> conv 3 -> conv 2 -> conv 1, then FC layers as 1x1x1
convolutions (a 25^3 cube shrinks 25 -> 22 -> 11 -> 8 -> 4 -> 2 -> 1 -> 1).

Dense form: evaluating that classifier at every voxel is done at once by the "a trous" rewrite —
pools with stride 1 and each later layer dilated by the product of the earlier pool strides —
on the input zero-padded by 12 voxels per side (the paper pads scans with zeros). The output is
the size of the input and, at every voxel, exactly the patch classifier applied to the 25^3 cube
centred there (:meth:`PatchCNN3D.classify_patches` is the patch form with the same weights).
The mirrored-hemisphere cube of the paper is an input channel made in preprocessing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..networks import register_network


class PatchCNN3D(nn.Module):
    """(N, C, z, y, x) -> logits (N, out_channels, z, y, x), receptive field ``patch_size``^3."""

    def __init__(
        self,
        in_channels: int = 2,
        out_channels: int = 2,
        channels: Sequence[int] = (32, 32, 64, 64, 128),
        kernel_sizes: Sequence[int] = (4, 4, 3, 2, 1),
        pool_after: Sequence[int] = (1, 2),
        fc_channels: int = 128,
        dropout: float = 0.5,
    ):
        super().__init__()
        if len(channels) != len(kernel_sizes):
            raise ValueError("channels and kernel_sizes need one value per convolution")
        self.kernel_sizes = tuple(int(k) for k in kernel_sizes)
        self.pool_after = tuple(int(p) for p in pool_after)  # 1-based convolutions followed by a 2x pool
        if any(not 1 <= p <= len(channels) for p in self.pool_after):
            raise ValueError("pool_after names a convolution that does not exist")
        chans = [in_channels, *[int(c) for c in channels]]
        self.convs = nn.ModuleList(nn.Conv3d(a, b, k) for a, b, k in zip(chans[:-1], chans[1:], self.kernel_sizes))
        self.fc1 = nn.Conv3d(chans[-1], fc_channels, 1)
        self.fc2 = nn.Conv3d(fc_channels, out_channels, 1)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Receptive field: each layer adds (k - 1) times the spacing of its input lattice.
        rf, step = 1, 1
        for i, k in enumerate(self.kernel_sizes, start=1):
            rf += (k - 1) * step
            if i in self.pool_after:
                rf += step
                step *= 2
        self.patch_size = rf

    def _run(self, x: torch.Tensor, dense: bool) -> torch.Tensor:
        step = 1
        for i, conv in enumerate(self.convs, start=1):
            x = F.relu(F.conv3d(x, conv.weight, conv.bias, dilation=step if dense else 1))
            if i in self.pool_after:
                x = F.max_pool3d(x, 2, stride=1, dilation=step) if dense else F.max_pool3d(x, 2, stride=2)
                step *= 2
        x = self.drop(F.relu(self.fc1(x)))
        return self.fc2(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo = (self.patch_size - 1) // 2
        hi = self.patch_size - 1 - lo
        return self._run(F.pad(x, (lo, hi) * 3), dense=True)

    def classify_patches(self, cubes: torch.Tensor) -> torch.Tensor:
        """Patch form: (N, C, P, P, P) cubes -> (N, out_channels) centre-voxel logits."""
        if tuple(cubes.shape[2:]) != (self.patch_size,) * 3:
            raise ValueError(f"cubes must be {self.patch_size}^3, got {tuple(cubes.shape[2:])}")
        out = self._run(cubes, dense=False)
        return out.reshape(out.shape[0], out.shape[1])


@register_network("strokeseg.PatchCNN3D")
def _patch_cnn(**args) -> nn.Module:
    return PatchCNN3D(**args)
