"""Paper 000 (Pérez Malla et al. 2019): DeepMedic-style two-pathway 3D CNN.

As in the paper's DeepMedic v0.6.1 baseline: 8 convolutional layers of 3x3x3 kernels per pathway
(feature maps 30, 30, 40, 40, 40, 40, 50, 50 — DeepMedic's default; the paper's list omits one
40), residual connections adding the input of layers 3, 5, 7 to the output of layers 4, 6, 8
(zero-padded channels, as DeepMedic does), batch normalisation after every convolution, PReLU,
a second pathway on the input down-sampled by 3 whose features are up-sampled back (nearest, as
DeepMedic repeats them), then two fully connected layers of 150 maps as convolutions (the first
3x3x3, combining the two scales; the second 1x1x1 with a residual from the first's input),
dropout 0.5 before the second FC and the classification layer.

Unlike DeepMedic's "valid" convolutions, every convolution is zero-padded ("same") and the input
is padded to a multiple of the down-sampling factor internally, so the network is fully
convolutional with an output the size of its input — what the engine's sliding window expects.
The normal pathway's receptive field is 17 voxels (the paper's validation segment size), the
context pathway's 17 x 3 = 51.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..networks import register_network
from ._common import crop_to, pad_channels, pad_to_multiple

DEFAULT_CHANNELS = (30, 30, 40, 40, 40, 40, 50, 50)


class _ConvBlock(nn.Module):
    """conv -> BN -> (+ residual) -> PReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, dropout: float = 0.0):
        super().__init__()
        self.drop = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.conv = nn.Conv3d(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm3d(cout)
        self.act = nn.PReLU(cout)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        y = self.bn(self.conv(self.drop(x)))
        if residual is not None:
            y = y + pad_channels(residual, y.shape[1])
        return self.act(y)


class _Pathway(nn.Module):
    def __init__(self, cin: int, channels: Sequence[int], residual_layers: Sequence[int]):
        super().__init__()
        chans = [cin, *channels]
        self.layers = nn.ModuleList(_ConvBlock(a, b, 3) for a, b in zip(chans[:-1], chans[1:]))
        # 1-based layer L receives the input of layer L-1 (a two-layer residual block).
        self.residual = {int(L) - 1 for L in residual_layers}
        for L in self.residual:
            if not 2 <= L + 1 <= len(channels):
                raise ValueError(f"residual layer {L + 1} outside 2..{len(channels)}")
            if chans[L - 1] > chans[L + 1]:
                raise ValueError(f"residual into layer {L + 1} would have more channels than its output")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs = []
        for i, layer in enumerate(self.layers):
            inputs.append(x)
            x = layer(x, inputs[i - 1] if i in self.residual else None)
        return x


class DeepMedic(nn.Module):
    """Two-pathway 3D CNN; (N, C, z, y, x) -> logits (N, out_channels, z, y, x), any input size."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int = 2,
        channels: Sequence[int] = DEFAULT_CHANNELS,
        context_channels: Sequence[int] | None = None,
        residual_layers: Sequence[int] = (4, 6, 8),
        downsample: int = 3,
        fc_channels: Sequence[int] = (150, 150),
        fc1_kernel: int = 3,
        dropout: float = 0.5,
    ):
        super().__init__()
        if len(fc_channels) != 2:
            raise ValueError("fc_channels needs two values (the two FC layers)")
        if downsample < 1:
            raise ValueError("downsample must be >= 1")
        context_channels = tuple(context_channels or channels)
        self.downsample = int(downsample)
        self.normal = _Pathway(in_channels, channels, residual_layers)
        self.context = _Pathway(in_channels, context_channels, residual_layers)
        joined = channels[-1] + context_channels[-1]
        if joined > fc_channels[1]:
            raise ValueError("the FC residual needs fc_channels[1] >= the two pathways' channels together")
        self.fc1 = _ConvBlock(joined, fc_channels[0], fc1_kernel)
        self.fc2 = _ConvBlock(fc_channels[0], fc_channels[1], 1, dropout=dropout)
        self.classifier = nn.Sequential(nn.Dropout3d(dropout) if dropout > 0 else nn.Identity(),
                                        nn.Conv3d(fc_channels[1], out_channels, 1))
        self._frozen: list[nn.Module] = []
        for m in self.modules():  # He initialisation for PReLU networks, as DeepMedic
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, a=0.25)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        normal = self.normal(x)
        f = self.downsample
        if f > 1:
            # Replicate padding so the border block's average is not pulled towards zero.
            xp, _ = pad_to_multiple(x, (f, f, f), mode="replicate")
            ctx = self.context(F.avg_pool3d(xp, f))
            ctx = crop_to(F.interpolate(ctx, scale_factor=f, mode="nearest"), size)
        else:
            ctx = self.context(x)
        joined = torch.cat([normal, ctx], dim=1)
        y = self.fc2(self.fc1(joined), residual=joined)
        return self.classifier(y)

    # -- fine-tuning with frozen layers (paper 000, experiments E2-E5) -------------------------

    def freeze(self, conv_layers: int) -> None:
        """Freeze the first ``conv_layers`` layers of both pathways (all of them: only FC layers train).

        Frozen layers also keep their batch-norm statistics fixed (they stay in eval mode).
        ``freeze(0)`` unfreezes everything.
        """
        n = len(self.normal.layers)
        if not 0 <= conv_layers <= n:
            raise ValueError(f"conv_layers must be in 0..{n}")
        self.requires_grad_(True)
        self._frozen = [*self.normal.layers[:conv_layers], *self.context.layers[:conv_layers]]
        for m in self._frozen:
            m.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "DeepMedic":
        super().train(mode)
        for m in self._frozen:
            m.eval()
        return self


@register_network("strokeseg.DeepMedic")
def _deepmedic(**args) -> nn.Module:
    return DeepMedic(**args)
