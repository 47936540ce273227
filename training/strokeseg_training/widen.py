"""Warm-start a wider MONAI U-Net from a narrower one's weights, computing the same function.

A stage that has run out of capacity (training and validation Dice alike, see
``strokeseg-train fit``) needs more channels, and retraining a wider net from scratch costs
hours on a CPU. Instead every old channel keeps its weights in the same place, each new channel
computes a freshly initialised function of all channels, and the weights by which old channels
would read the new ones are zero. Old activations are then exactly the narrow net's (instance
norm without affine parameters is per channel), so the wide net starts at the narrow net's
output and its loss; gradients reach the zero weights at once, so the new channels join in as
training goes.

The one irregular spot is the U-Net's skip connection: an up-sampling layer reads the
concatenation of its level's down-sampled features and the level below, so its old input
channels sit in two blocks (``_concat_blocks``).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

CONVS = (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)


def _concat_blocks(name: str, channels: list[int]) -> list[int]:
    """The widths of the blocks that an up-sampling (transposed) convolution reads: its level's
    features and what the level below returns (the bottom layer's width, or the level's own)."""
    depth = name.count("submodule")
    below = channels[depth + 1] if depth == len(channels) - 2 else channels[depth]
    return [channels[depth], below]


def _old_input_index(module: torch.nn.Module, name: str, old: list[int], new: list[int]) -> torch.Tensor:
    """Where each of the narrow module's input channels sits among the wide module's inputs."""
    if module.transposed:
        old_blocks, new_blocks = _concat_blocks(name, old), _concat_blocks(name, new)
        offsets = [0, new_blocks[0]]
        return torch.cat([torch.arange(w) + o for w, o in zip(old_blocks, offsets)])
    return torch.arange(module.in_channels)


def widen_unet(wide: torch.nn.Module, narrow_state: Mapping[str, torch.Tensor], narrow_args: Mapping[str, Any],
               wide_args: Mapping[str, Any]) -> torch.nn.Module:
    """Fill ``wide`` (a freshly built ``monai.UNet`` with ``wide_args``) from the state of the same
    U-Net built with ``narrow_args``, which differ only in ``channels``; returns ``wide``."""
    from monai.networks.nets import UNet

    if {k: v for k, v in narrow_args.items() if k != "channels"} != {k: v for k, v in wide_args.items() if k != "channels"}:
        raise ValueError("widening changes only 'channels'; the other network arguments must match")
    old, new = list(narrow_args["channels"]), list(wide_args["channels"])
    if len(old) != len(new) or any(o > n for o, n in zip(old, new)):
        raise ValueError(f"cannot widen channels {old} to {new}: same depth, no level narrower")
    narrow = UNet(**dict(narrow_args))
    try:
        narrow.load_state_dict(dict(narrow_state))  # strict: the weights are the narrow net's
    except RuntimeError:
        raise ValueError(f"the weights are not those of this U-Net with channels {old}") from None
    narrow_modules = dict(narrow.named_modules())
    with torch.no_grad():
        for name, w in wide.named_modules():
            n = narrow_modules[name]
            if isinstance(w, CONVS):
                # Seen as (out, in, ...): a transposed convolution stores (in, out, ...).
                wide_w, narrow_w = (w.weight, n.weight) if not w.transposed else (w.weight.transpose(0, 1), n.weight.transpose(0, 1))
                rows, cols = torch.arange(n.out_channels), _old_input_index(n, name, old, new)
                wide_w[: n.out_channels].zero_()  # old outputs read nothing new...
                wide_w[rows[:, None], cols[None, :]] = narrow_w  # ...and the old inputs as before
            elif isinstance(w, torch.nn.PReLU):  # MONAI's is one slope shared by all channels
                w.weight[: n.weight.numel()] = n.weight
            elif list(w.parameters(recurse=False)):  # e.g. a group norm, which would mix new channels into old ones
                raise ValueError(f"widening cannot carry {type(w).__name__} ({name}) over")
            else:
                continue
            if getattr(w, "bias", None) is not None:
                w.bias[: n.bias.numel()] = n.bias
    return wide
