"""Paper 004 (Liu, ISLES 2018): CTP maps -> synthetic DWI (generator) -> lesion (segmentator).

Generator and segmentator are U-Nets (two 3x3 convolutions per level, max-pooling down,
transposed-convolution "up-conv" up, skip concatenation) with group normalisation of 16 channels
per group. The segmentator's head predicts three background maps and one foreground map; their
maxout — the maximum of the three background maps — becomes the background logit, so the
output is ordinary two-class logits (background, lesion) for softmax. The discriminator is five
5x5 convolutions of stride 2 without padding, group norm and ReLU, then average pooling, scored
with the least-squares (LSGAN) losses in :mod:`strokeseg.losses`.

The paper works on 2D slices (``spatial_dims=2``, wrap in "strokeseg.SliceWise" for the engine);
``spatial_dims=3`` gives the same design in 3D. The input channels are the CTP maps the card lists
(the paper: MTT, Tmax, CBV, CBF and the temporal maximum of the 4D series).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..networks import register_network
from ._common import check_dims, conv, conv_transpose, crop_to, max_pool, norm, pad_to_multiple


def _double_conv(dims: int, cin: int, cout: int, group_channels: int) -> nn.Sequential:
    return nn.Sequential(
        conv(dims)(cin, cout, 3, padding=1), norm("group", dims, cout, group_channels), nn.ReLU(inplace=True),
        conv(dims)(cout, cout, 3, padding=1), norm("group", dims, cout, group_channels), nn.ReLU(inplace=True),
    )


class GNUNet(nn.Module):
    """U-Net with group normalisation; (N, C, *spatial) -> (N, out_channels, *spatial), any size."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 channels: Sequence[int] = (32, 64, 128, 256, 512), group_channels: int = 16):
        super().__init__()
        dims = check_dims(spatial_dims)
        chans = [int(c) for c in channels]
        if len(chans) < 2:
            raise ValueError("a U-Net needs at least two levels")
        self.multiple = (2 ** (len(chans) - 1),) * dims
        self.enc = nn.ModuleList()
        cin = in_channels
        for c in chans:
            self.enc.append(_double_conv(dims, cin, c, group_channels))
            cin = c
        self.pool = max_pool(dims)(2)
        self.up = nn.ModuleList(conv_transpose(dims)(chans[i + 1], chans[i], 2, stride=2) for i in range(len(chans) - 1))
        self.dec = nn.ModuleList(_double_conv(dims, 2 * chans[i], chans[i], group_channels) for i in range(len(chans) - 1))
        self.head = conv(dims)(chans[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, size = pad_to_multiple(x, self.multiple)
        skips = []
        for i, block in enumerate(self.enc):
            x = block(x)
            if i < len(self.enc) - 1:
                skips.append(x)
                x = self.pool(x)
        for i in reversed(range(len(self.up))):
            x = self.dec[i](torch.cat([self.up[i](x), skips[i]], dim=1))
        return crop_to(self.head(x), size)


def maxout_logits(pieces: torch.Tensor, background_pieces: int) -> torch.Tensor:
    """(N, B + F, ...) -> (N, 1 + F, ...): the maximum of the B background maps, then the F others."""
    background = pieces[:, :background_pieces].amax(dim=1, keepdim=True)
    return torch.cat([background, pieces[:, background_pieces:]], dim=1)


class CTPGenSeg(nn.Module):
    """Generator + segmentator; forward gives segmentation logits (N, 2, ...).

    ``forward(x, return_synthetic=True)`` (or the attribute ``return_synthetic``) also returns
    the synthetic DWI: ``(logits, dwi)`` for the generator's MSE and the LSGAN losses.
    """

    def __init__(
        self,
        in_channels: int = 5,
        spatial_dims: int = 2,
        generator_channels: Sequence[int] = (16, 32, 64, 128, 256),
        segmentator_channels: Sequence[int] = (16, 32, 64, 128, 256),
        group_channels: int = 16,
        background_pieces: int = 3,
        segment_maps: bool = False,
        return_synthetic: bool = False,
    ):
        super().__init__()
        if background_pieces < 1:
            raise ValueError("background_pieces must be >= 1")
        self.background_pieces = int(background_pieces)
        self.segment_maps = bool(segment_maps)  # False: segment the synthetic DWI alone, as the paper
        self.return_synthetic = bool(return_synthetic)
        self.generator = GNUNet(spatial_dims, in_channels, 1, generator_channels, group_channels)
        seg_in = 1 + (in_channels if segment_maps else 0)
        self.segmentator = GNUNet(spatial_dims, seg_in, self.background_pieces + 1, segmentator_channels, group_channels)

    def forward(self, x: torch.Tensor, return_synthetic: bool | None = None):
        dwi = self.generator(x)
        seg_in = torch.cat([dwi, x], dim=1) if self.segment_maps else dwi
        logits = maxout_logits(self.segmentator(seg_in), self.background_pieces)
        if self.return_synthetic if return_synthetic is None else return_synthetic:
            return logits, dwi
        return logits


class LSGANDiscriminator(nn.Module):
    """(N, C, *spatial) -> (N, 1) realness score (least-squares GAN: real -> 1, synthetic -> 0).

    ``len(channels) + 1`` convolutions of ``kernel_size`` / ``stride`` without padding: all but
    the last followed by group norm and ReLU, the last giving one map that is averaged. With the
    default five layers the input must be at least 125 pixels per axis.
    """

    def __init__(self, in_channels: int = 1, spatial_dims: int = 2, channels: Sequence[int] = (32, 64, 128, 256),
                 kernel_size: int = 5, stride: int = 2, group_channels: int = 16):
        super().__init__()
        dims = check_dims(spatial_dims)
        layers: list[nn.Module] = []
        cin = in_channels
        for c in channels:
            layers += [conv(dims)(cin, int(c), kernel_size, stride=stride), norm("group", dims, int(c), group_channels),
                       nn.ReLU(inplace=True)]
            cin = int(c)
        layers.append(conv(dims)(cin, 1, kernel_size, stride=stride))
        self.body = nn.Sequential(*layers)
        n = len(channels) + 1
        size = 1
        for _ in range(n):  # smallest input giving one output voxel
            size = (size - 1) * stride + kernel_size
        self.min_size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[2:]) < self.min_size:
            raise ValueError(f"discriminator input must be at least {self.min_size} voxels per axis, got {tuple(x.shape[2:])}")
        return self.body(x).flatten(2).mean(2)


@register_network("strokeseg.CTPGenSeg")
def _ctp_gen_seg(**args) -> nn.Module:
    return CTPGenSeg(**args)


@register_network("strokeseg.GNUNet")
def _gn_unet(**args) -> nn.Module:
    return GNUNet(**args)


@register_network("strokeseg.LSGANDiscriminator")
def _lsgan_discriminator(**args) -> nn.Module:
    return LSGANDiscriminator(**args)
