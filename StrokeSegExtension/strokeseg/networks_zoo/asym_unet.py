"""Paper 001 (Clèrigues et al. 2019): asymmetric residual 3D U-Net.

Four resolution levels, 32 base filters doubling per level; residual blocks of two convolutions in
the encoder and one in the decoder (short residuals), encoder features added to the up-sampled
decoder features (long residuals), PReLU, down-sampling by concatenating a max-pool with a
strided convolution (Szegedy et al.), up-sampling by transposed convolutions. With 3x3x3 kernels
(transposed ones included) the encoder holds ~75 % of the parameters and the decoder ~25 %, the
split the paper reports; :meth:`AsymResUNet.parameter_split` measures it.

Inputs whose size is not a multiple of the total stride are padded internally and the output is
cropped back: the output always has the input's spatial size. The symmetric-modality channels
of the paper are made in preprocessing; this network just takes ``in_channels`` channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..networks import register_network
from ._common import as_tuple, check_dims, conv, conv_transpose, crop_to, max_pool, norm, pad_to_multiple
from ._common import dropout as dropout_cls


class _ResBlock(nn.Module):
    """x + conv(...conv(x)) with PReLU after each convolution and after the sum."""

    def __init__(self, dims: int, channels: int, n_convs: int, kernel: int, norm_kind: str | None):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(n_convs):
            layers += [conv(dims)(channels, channels, kernel, padding=kernel // 2), norm(norm_kind, dims, channels)]
            if i < n_convs - 1:
                layers.append(nn.PReLU(channels))
        self.body = nn.Sequential(*layers)
        self.act = nn.PReLU(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class _Down(nn.Module):
    """concat(max-pool(x), strided conv(x)) -> norm -> PReLU: cin -> cout channels, size / stride."""

    def __init__(self, dims: int, cin: int, cout: int, stride: tuple[int, ...], kernel: int, norm_kind: str | None):
        super().__init__()
        if cout <= cin:
            raise ValueError("each level must have more channels than the one above it")
        self.pool = max_pool(dims)(stride, stride)
        self.conv = conv(dims)(cin, cout - cin, kernel, stride=stride, padding=kernel // 2)
        self.post = nn.Sequential(norm(norm_kind, dims, cout), nn.PReLU(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(torch.cat([self.pool(x), self.conv(x)], dim=1))


def _up(dims: int, cin: int, cout: int, stride: tuple[int, ...], kernel: int) -> nn.Module:
    """Transposed convolution that multiplies each axis exactly by its stride."""
    ks, pads, outs = [], [], []
    for s in stride:
        k = kernel if s > 1 else 3
        p = (k - 1) // 2
        op = s + 2 * p - k
        if not 0 <= op < s:
            raise ValueError(f"up-sampling kernel {kernel} does not fit stride {s}")
        ks.append(k)
        pads.append(p)
        outs.append(op)
    return conv_transpose(dims)(cin, cout, tuple(ks), stride=stride, padding=tuple(pads), output_padding=tuple(outs))


class AsymResUNet(nn.Module):
    """(N, C, *spatial) -> logits (N, out_channels, *spatial)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 2,
        base_channels: int = 32,
        levels: int = 4,
        spatial_dims: int = 3,
        kernel_size: int = 3,
        up_kernel_size: int = 3,
        strides: Sequence[int | Sequence[int]] | None = None,
        encoder_convs: int = 2,
        decoder_convs: int = 1,
        norm: str | None = "batch",
        dropout: float = 0.0,
    ):
        super().__init__()
        dims = check_dims(spatial_dims)
        if levels < 2:
            raise ValueError("levels must be >= 2")
        strides = strides if strides is not None else [2] * (levels - 1)
        if len(strides) != levels - 1:
            raise ValueError(f"strides needs {levels - 1} entries (one per down-sampling)")
        self.strides = [as_tuple(s, dims, "stride") for s in strides]
        self.multiple = tuple(math.prod(s[d] for s in self.strides) for d in range(dims))  # pad inputs to these
        chans = [base_channels * 2**i for i in range(levels)]
        self.channels = chans

        self.stem = nn.Sequential(conv(dims)(in_channels, chans[0], kernel_size, padding=kernel_size // 2), nn.PReLU(chans[0]))
        self.enc = nn.ModuleList(_ResBlock(dims, c, encoder_convs, kernel_size, norm) for c in chans)
        self.down = nn.ModuleList(
            _Down(dims, chans[i], chans[i + 1], self.strides[i], kernel_size, norm) for i in range(levels - 1)
        )
        self.up = nn.ModuleList(_up(dims, chans[i + 1], chans[i], self.strides[i], up_kernel_size) for i in range(levels - 1))
        self.up_act = nn.ModuleList(nn.PReLU(chans[i]) for i in range(levels - 1))
        self.dec = nn.ModuleList(_ResBlock(dims, chans[i], decoder_convs, kernel_size, norm) for i in range(levels - 1))
        self.head = nn.Sequential(dropout_cls(dims)(dropout) if dropout > 0 else nn.Identity(),
                                  conv(dims)(chans[0], out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, size = pad_to_multiple(x, self.multiple)
        skips = []
        y = self.stem(x)
        for i, block in enumerate(self.enc):
            y = block(y)
            if i < len(self.down):
                skips.append(y)
                y = self.down[i](y)
        for i in reversed(range(len(self.up))):
            y = self.up_act[i](self.up[i](y)) + skips[i]  # long residual
            y = self.dec[i](y)
        return crop_to(self.head(y), size)

    def encoder_modules(self) -> list[nn.Module]:
        return [self.stem, self.enc, self.down]

    def decoder_modules(self) -> list[nn.Module]:
        return [self.up, self.up_act, self.dec, self.head]

    def parameter_split(self) -> tuple[int, int]:
        """(encoder, decoder) parameter counts; the paper's design puts ~75 % in the encoder."""

        def n(mods: list[nn.Module]) -> int:
            return sum(p.numel() for m in mods for p in m.parameters())

        return n(self.encoder_modules()), n(self.decoder_modules())


@register_network("strokeseg.AsymResUNet")
def _asym_res_unet(**args) -> nn.Module:
    return AsymResUNet(**args)
