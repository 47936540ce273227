"""Widening a trained U-Net (train.init_channels): the wide net starts out computing exactly the
narrow net's function, and its new channels can learn."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet
from safetensors.torch import save_file

from strokeseg.errors import ModelError
from strokeseg_training.train import load_init_weights
from strokeseg_training.widen import widen_unet

BASE = {"spatial_dims": 3, "in_channels": 2, "out_channels": 1, "strides": [[2, 2, 2], [2, 2, 1], [2, 2, 2]],
        "norm": "instance"}


def _trained_like(args: dict) -> UNet:
    """A narrow net whose weights are not the default initialisation (biases too)."""
    torch.manual_seed(1)
    net = UNet(**args)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("res_units", [0, 1, 2])
def test_widened_unet_computes_the_narrow_function(res_units: int) -> None:
    narrow_args = {**BASE, "channels": [8, 16, 24, 32], "num_res_units": res_units}
    wide_args = {**narrow_args, "channels": [8, 24, 48, 64]}
    narrow = _trained_like(narrow_args)
    wide = widen_unet(UNet(**wide_args), narrow.state_dict(), narrow_args, wide_args)
    x = torch.randn(2, 2, 32, 24, 16)
    for mode in (True, False):
        narrow.train(mode), wide.train(mode)
        with torch.no_grad():
            assert torch.allclose(wide(x), narrow(x), atol=1e-5)
    # A plain wide net (no widening) computes something else: the check above can fail.
    with torch.no_grad():
        assert not torch.allclose(UNet(**wide_args).eval()(x), narrow(x), atol=1e-3)


def test_new_channels_learn() -> None:
    narrow_args = {**BASE, "channels": [8, 16, 24, 32], "num_res_units": 1}
    wide_args = {**narrow_args, "channels": [8, 16, 48, 64]}
    wide = widen_unet(UNet(**wide_args), _trained_like(narrow_args).state_dict(), narrow_args, wide_args)
    bottom = dict(wide.named_modules())["model.1.submodule.1.submodule.2.0.conv"]  # reads [24 | 32] -> [48 | 64]
    assert bottom.weight[24:48].abs().sum() == 0  # old outputs do not read the new channels yet
    opt = torch.optim.SGD(wide.parameters(), lr=0.1)
    loss = wide(torch.randn(2, 2, 32, 24, 16)).square().mean()
    loss.backward()
    opt.step()
    assert bottom.weight[24:48].abs().sum() > 0


def test_widening_refuses_what_it_cannot_preserve() -> None:
    narrow_args = {**BASE, "channels": [8, 16, 24, 32], "num_res_units": 1}
    state = UNet(**narrow_args).state_dict()
    with pytest.raises(ValueError, match="narrower"):
        widen_unet(UNet(**{**narrow_args, "channels": [8, 8, 24, 32]}), state, narrow_args,
                   {**narrow_args, "channels": [8, 8, 24, 32]})
    other = {**narrow_args, "num_res_units": 2, "channels": [8, 16, 32, 64]}
    with pytest.raises(ValueError, match="only 'channels'"):
        widen_unet(UNet(**other), state, narrow_args, other)
    group = {**narrow_args, "norm": ("group", {"num_groups": 1})}
    wide_group = {**group, "channels": [8, 16, 32, 64]}
    with pytest.raises(ValueError, match="cannot carry"):
        widen_unet(UNet(**wide_group), UNet(**group).state_dict(), group, wide_group)


def test_init_channels_in_a_training_config(tmp_path) -> None:
    narrow_args = {**BASE, "channels": [8, 16, 24, 32], "num_res_units": 1}
    narrow = _trained_like(narrow_args)
    save_file(narrow.state_dict(), str(tmp_path / "narrow.safetensors"))
    network = {"name": "monai.UNet", "args": {**narrow_args, "channels": [8, 24, 32, 48]}}
    tc = {"init_weights": str(tmp_path / "narrow.safetensors"), "init_channels": [8, 16, 24, 32]}
    wide = load_init_weights(UNet(**network["args"]), tc, network).eval()
    x = torch.randn(1, 2, 32, 24, 16)
    with torch.no_grad():
        assert torch.allclose(wide(x), narrow.eval()(x), atol=1e-5)
    with pytest.raises(ModelError, match="monai.UNet"):
        load_init_weights(UNet(**network["args"]), tc, {"name": "monai.DynUNet", "args": {}})


def test_init_weights_that_do_not_fit_fail_in_one_line(tmp_path) -> None:
    """Wrong init_channels, weights of another net, or no file: one line naming the file."""
    narrow_args = {**BASE, "channels": [8, 16, 24, 32], "num_res_units": 1}
    weights = tmp_path / "narrow.safetensors"
    save_file(UNet(**narrow_args).state_dict(), str(weights))
    wide_args = {**narrow_args, "channels": [8, 24, 32, 48]}
    network = {"name": "monai.UNet", "args": wide_args}
    cases = [
        ({"init_weights": str(weights), "init_channels": [8, 16, 16, 32]}, "channels \\[8, 16, 16, 32\\]"),
        ({"init_weights": str(weights)}, "do not fit network of this config .*shape"),
        ({"init_weights": str(tmp_path / "none.safetensors")}, "no such weights file"),
    ]
    for tc, problem in cases:
        with pytest.raises(ModelError, match=problem) as err:
            load_init_weights(UNet(**wide_args), tc, network)
        assert "\n" not in str(err.value) and "safetensors" in str(err.value)
