"""Paper 002: EDD Net — an ensemble of two 2D DeconvNets plus refinement convolutions.

Each DeconvNet (Noh et al. 2015) has three stacks of 3x3 convolutions (batch norm, ReLU) with two
max-pooling layers between them that record the positions of their maxima; the mirrored
deconvolution stage up-samples with max-unpooling at exactly those positions
(``torch.nn.MaxUnpool2d``) and 3x3 deconvolutions. With two layers per stack the receptive
field is 60 pixels, about the 64 x 64 training patch the paper found best.

The naive ensemble h is the mean of the DeconvNets' logits; the refinement r concatenates the
input with h's probabilities and applies a few convolutions (Eq. 2: H(x) = r(h(x), x)). The
multi-output loss of Eq. 3 needs every head: ``forward(x, all_outputs=True)`` — or training
mode with ``deep_supervision=True`` — returns ``[H, h, g1, ..., gN]``; otherwise the refined
logits H alone. Fully convolutional: trained on patches, run on whole slices (any size >= 4).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..networks import register_network


def _conv_bn_relu(cin: int, cout: int, transpose: bool = False) -> nn.Sequential:
    layer = nn.ConvTranspose2d(cin, cout, 3, padding=1) if transpose else nn.Conv2d(cin, cout, 3, padding=1)
    return nn.Sequential(layer, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DeconvNet2D(nn.Module):
    """(N, C, y, x) -> logits (N, out_channels, y, x); unpooling by recorded pooling indices."""

    def __init__(self, in_channels: int, out_channels: int = 2, channels: Sequence[int] = (32, 64, 128),
                 convs_per_stack: int = 2):
        super().__init__()
        chans = [int(c) for c in channels]
        if len(chans) < 2 or convs_per_stack < 1:
            raise ValueError("a DeconvNet needs at least two stacks of at least one convolution")
        self.encoder = nn.ModuleList()
        cin = in_channels
        for c in chans:
            self.encoder.append(nn.Sequential(*[_conv_bn_relu(cin if i == 0 else c, c) for i in range(convs_per_stack)]))
            cin = c
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, 2)
        self.decoder = nn.ModuleList()
        for level in reversed(range(len(chans))):
            # The last deconvolution of a stack maps to the channels of the level above,
            # so that unpooling receives as many maps as were pooled there.
            cout = chans[level - 1] if level > 0 else chans[0]
            layers = [_conv_bn_relu(chans[level], chans[level] if i < convs_per_stack - 1 else cout, transpose=True)
                      for i in range(convs_per_stack)]
            self.decoder.append(nn.Sequential(*layers))
        self.head = nn.Conv2d(chans[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices: list[tuple[torch.Tensor, torch.Size]] = []
        for i, stack in enumerate(self.encoder):
            x = stack(x)
            if i < len(self.encoder) - 1:
                size = x.shape
                x, idx = self.pool(x)
                indices.append((idx, size))
        for stack in self.decoder:
            x = stack(x)
            if indices:
                idx, size = indices.pop()
                x = self.unpool(x, idx, output_size=size[-2:])
        return self.head(x)


class EDDNet(nn.Module):
    """Ensemble of DeconvNets + refinement; see the module docstring for the outputs."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 2,
        n_nets: int = 2,
        channels: Sequence[int] = (32, 64, 128),
        convs_per_stack: int = 2,
        refine_channels: Sequence[int] = (32, 32),
        deep_supervision: bool = False,
    ):
        super().__init__()
        if n_nets < 1:
            raise ValueError("n_nets must be >= 1")
        self.out_channels = out_channels
        self.deep_supervision = bool(deep_supervision)
        self.nets = nn.ModuleList(DeconvNet2D(in_channels, out_channels, channels, convs_per_stack) for _ in range(n_nets))
        layers: list[nn.Module] = []
        cin = in_channels + out_channels
        for c in refine_channels:
            layers.append(_conv_bn_relu(cin, int(c)))
            cin = int(c)
        layers.append(nn.Conv2d(cin, out_channels, 1))
        self.refine = nn.Sequential(*layers)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, 1) if self.out_channels > 1 else torch.sigmoid(logits)

    def forward(self, x: torch.Tensor, all_outputs: bool | None = None) -> torch.Tensor | list[torch.Tensor]:
        outs = [net(x) for net in self.nets]
        h = torch.stack(outs).mean(0)
        refined = self.refine(torch.cat([x, self.probabilities(h)], dim=1))
        if all_outputs is None:
            all_outputs = self.training and self.deep_supervision
        return [refined, h, *outs] if all_outputs else refined


@register_network("strokeseg.EDDNet")
def _edd(**args) -> nn.Module:
    return EDDNet(**args)


@register_network("strokeseg.DeconvNet2D")
def _deconvnet(**args) -> nn.Module:
    return DeconvNet2D(**args)
