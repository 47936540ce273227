"""The five papers' networks (strokeseg.networks_zoo) and losses (strokeseg.losses).

Every network builds by name from JSON arguments, keeps the input's spatial size, back-propagates,
and survives save_weights -> card -> load_model with a strict state dict. Method-specific checks:
the asymmetric U-Net's 75/25 parameter split, DeepMedic's context pathway and freezing,
max-unpooling at the recorded indices, SliceWise == per-slice application, the dense patch CNN ==
its patch classifier, MUSCLE's Bayes fusion, GroupNorm/maxout heads, and loss values computed by
hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from strokeseg import losses, models, networks
from strokeseg.errors import ModelError
from strokeseg.inference import predict
from strokeseg.networks_zoo.ctp_gan import maxout_logits
from strokeseg.networks_zoo.muscle import bayes_fuse, find_candidates, muscle_patches, muscle_refine, muscle_training_samples

torch.set_num_threads(1)

TINY_EDD = {"in_channels": 1, "channels": [4, 8, 8], "convs_per_stack": 1, "refine_channels": [4]}
TINY_MUSCLE = {"scales": [8, 16], "patch_size": 8, "channels": [4, 4, 8, 8], "fc_channels": [16, 8]}
TINY_CTP = {"in_channels": 5, "generator_channels": [4, 8], "segmentator_channels": [4, 8], "group_channels": 4}

# name, JSON args, input shape (odd sizes on purpose: internal padding and cropping), output channels
SPECS: list[tuple[str, dict[str, Any], tuple[int, ...], int]] = [
    ("strokeseg.DeepMedic", {"in_channels": 2, "channels": [4, 4, 6, 6, 6, 6, 8, 8], "fc_channels": [12, 16]},
     (2, 2, 10, 11, 13), 2),
    ("strokeseg.AsymResUNet", {"in_channels": 2, "base_channels": 4, "levels": 3}, (2, 2, 9, 12, 14), 2),
    ("strokeseg.AsymResUNet", {"in_channels": 1, "out_channels": 1, "base_channels": 4, "levels": 3,
                               "strides": [[1, 2, 2], [2, 2, 2]], "norm": "instance", "dropout": 0.1}, (2, 1, 5, 12, 10), 1),
    ("strokeseg.DeconvNet2D", {"in_channels": 1, "channels": [4, 8], "convs_per_stack": 1}, (2, 1, 13, 15), 2),
    ("strokeseg.EDDNet", TINY_EDD, (2, 1, 13, 16), 2),
    ("strokeseg.SliceWise", {"inner": {"name": "strokeseg.EDDNet", "args": TINY_EDD}}, (1, 1, 3, 12, 16), 2),
    ("strokeseg.SliceWise", {"inner": {"name": "strokeseg.EDDMuscle", "args": {"edd": TINY_EDD, "muscle": TINY_MUSCLE}}},
     (1, 1, 2, 16, 16), 2),
    ("strokeseg.PatchCNN3D", {"in_channels": 2, "channels": [4, 4, 6, 6, 8], "fc_channels": 8}, (1, 2, 7, 9, 8), 2),
    ("strokeseg.CTPGenSeg", TINY_CTP, (2, 5, 13, 10), 2),
    ("strokeseg.CTPGenSeg", {**TINY_CTP, "spatial_dims": 3, "segment_maps": True}, (1, 5, 5, 6, 7), 2),
    ("strokeseg.SliceWise", {"inner": {"name": "strokeseg.CTPGenSeg", "args": TINY_CTP}}, (1, 5, 2, 12, 12), 2),
    ("strokeseg.GNUNet", {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [4, 8], "group_channels": 2},
     (1, 1, 5, 6, 7), 3),
]
CLASSIFIERS = [  # not dense: one output per sample
    ("strokeseg.MuscleNet", TINY_MUSCLE, (3, 3, 8, 8), (3, 2)),
    ("strokeseg.LSGANDiscriminator", {"channels": [4, 4, 4, 4], "group_channels": 2}, (2, 1, 125, 127), (2, 1)),
]


def _build(name: str, args: dict[str, Any]) -> torch.nn.Module:
    return networks.build(name, json.loads(json.dumps(args)))  # exactly what a card file gives


def _card(name: str, args: dict[str, Any], channels: int, sha: str) -> dict[str, Any]:
    return {
        "id": "zoo-test", "version": "0.1.0", "name": "zoo test", "description": "tiny paper network", "family": "dwi",
        "inputs": {"required": ["dwi"]}, "target_spacing": [1.0, 1.0, 1.0], "patch_size": [16, 12, 2],
        "normalisation": {"dwi": {"method": "zscore"}}, "network": {"name": name, "args": args},
        "output": {"activation": "softmax" if channels > 1 else "sigmoid", "channels": channels,
                   "foreground_channel": 1 if channels > 1 else 0},
        "inference": {"overlap": 0.25, "blend": "constant", "sw_batch_size": 1, "mirror_tta": False},
        "postprocess": {"threshold": 0.5, "closing_mm": 0.0, "min_lesion_ml": 0.0},
        "weights": [{"file": "fold0.safetensors", "sha256": sha}],
        "training": {"data": "none", "command": "pytest", "commit": "n/a", "seed": 0, "duration_s": 0, "device": "cpu"},
        "validation": {"dataset": "none", "n_cases": 1, "metrics": {}}, "licence": "Apache-2.0", "created": "2026-01-01",
    }


def _round_trip(tmp_path: Path, name: str, args: dict[str, Any], net: torch.nn.Module, channels: int) -> torch.nn.Module:
    sha = models.save_weights(net, tmp_path / "fold0.safetensors")
    (tmp_path / "card.json").write_text(json.dumps(_card(name, args, channels, sha)))
    (loaded,) = models.load_model(models.load_card(tmp_path))
    return loaded


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (list, tuple)) else out


@pytest.mark.parametrize("name,args,shape,channels", SPECS, ids=[f"{s[0]}-{i}" for i, s in enumerate(SPECS)])
def test_dense_networks_build_run_backprop_and_round_trip(tmp_path, name, args, shape, channels):
    torch.manual_seed(0)
    net = _build(name, args)
    x = torch.randn(shape)
    out = net.train()(x)
    assert out.shape == (shape[0], channels, *shape[2:])
    out.float().square().mean().backward()
    # EDD + MUSCLE trains as the EDD Net; its MUSCLE Net is trained on candidate patches separately.
    grads = [p.grad for n, p in net.named_parameters() if p.requires_grad and "muscle." not in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0

    net.eval()
    for m in net.modules():  # non-trivial batch-norm statistics must survive the round trip too
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.1, 0.1)
    loaded = _round_trip(tmp_path, name, args, net, channels)
    with torch.no_grad():
        assert torch.allclose(loaded(x), net(x), atol=1e-5)


@pytest.mark.parametrize("name,args,shape,out_shape", CLASSIFIERS, ids=[c[0] for c in CLASSIFIERS])
def test_classifiers_build_run_backprop_and_round_trip(tmp_path, name, args, shape, out_shape):
    torch.manual_seed(0)
    net = _build(name, args)
    x = torch.randn(shape)
    out = net.train()(x)
    assert out.shape == out_shape
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    net.eval()
    loaded = _round_trip(tmp_path, name, args, net, 1)
    with torch.no_grad():
        assert torch.allclose(loaded(x), net(x), atol=1e-5)


# Parameter counts of the default configurations (in_channels as the papers use them). Bundled
# weights must stay <= 50 MB (float32), which every default does.
DEFAULT_COUNTS = {
    ("strokeseg.DeepMedic", json.dumps({"in_channels": 3})): 1_051_082,
    ("strokeseg.AsymResUNet", json.dumps({"in_channels": 8})): 7_036_386,
    ("strokeseg.EDDNet", json.dumps({"in_channels": 1})): 1_177_062,
    ("strokeseg.MuscleNet", json.dumps({})): 1_148_226,
    ("strokeseg.PatchCNN3D", json.dumps({"in_channels": 2})): 182_978,
    ("strokeseg.CTPGenSeg", json.dumps({"in_channels": 5})): 3_888_149,
    ("strokeseg.LSGANDiscriminator", json.dumps({})): 1_083_841,
}


def test_default_parameter_counts_and_size_budget():
    counts = {key: sum(p.numel() for p in _build(key[0], json.loads(key[1])).parameters()) for key in DEFAULT_COUNTS}
    assert counts == DEFAULT_COUNTS
    assert all(4 * n <= 50e6 for n in counts.values())


def test_asymmetric_unet_puts_three_quarters_of_parameters_in_the_encoder():
    net = _build("strokeseg.AsymResUNet", {"in_channels": 8})  # paper: 4 levels, 32 base filters
    enc, dec = net.parameter_split()
    assert enc + dec == sum(p.numel() for p in net.parameters())
    assert abs(enc / (enc + dec) - 0.75) < 0.02
    assert net.channels == [32, 64, 128, 256]


def test_unknown_or_bad_arguments_are_model_errors():
    with pytest.raises(ModelError, match="bad arguments"):
        networks.build("strokeseg.AsymResUNet", {"in_channels": 1, "levels": 1})
    with pytest.raises(ModelError, match="bad arguments"):
        networks.build("strokeseg.SliceWise", {"net": "strokeseg.EDDNet"})
    with pytest.raises(ModelError, match="unknown network"):
        networks.build("strokeseg.SliceWise", {"inner": {"name": "strokeseg.Nope"}})
    with pytest.raises(ValueError, match="at least 125"):
        _build("strokeseg.LSGANDiscriminator", {})(torch.zeros(1, 1, 64, 64))


# -- paper 000 -----------------------------------------------------------------------------


def test_deepmedic_context_pathway_sees_beyond_the_normal_receptive_field_and_freezes():
    torch.manual_seed(0)
    net = _build("strokeseg.DeepMedic", {"in_channels": 1, "channels": [4] * 8, "fc_channels": [8, 8]}).eval()
    x = torch.randn(1, 1, 9, 33, 33)
    far = x.clone()
    far[0, 0, 4, 4, 4] += 10.0  # 12 voxels in-plane from the probe: outside the normal pathway's +-9
    with torch.no_grad():
        normal = lambda t: net.normal(t)[0, :, 4, 16, 16]  # noqa: E731
        assert torch.equal(normal(x), normal(far))
        assert not torch.allclose(net(x)[0, :, 4, 16, 16], net(far)[0, :, 4, 16, 16])

    net.freeze(8)  # paper 000 E2: all convolutional layers frozen, FC layers tuned
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("fc1", "fc2", "classifier")) for n in trainable)
    stats = net.normal.layers[0].bn.running_mean.clone()
    net.train()(torch.randn(2, 1, 9, 9, 9))
    assert torch.equal(net.normal.layers[0].bn.running_mean, stats)  # frozen BN keeps its statistics
    assert not torch.equal(net.fc1.bn.running_mean, torch.zeros(8))
    net.freeze(0)
    assert all(p.requires_grad for p in net.parameters())


# -- paper 002 -----------------------------------------------------------------------------


def test_deconvnet_unpools_at_the_recorded_maxima():
    torch.manual_seed(0)
    net = _build("strokeseg.DeconvNet2D", {"in_channels": 1, "channels": [3, 4, 5], "convs_per_stack": 1}).eval()
    pooled, unpooled = [], []
    net.pool.register_forward_hook(lambda m, i, o: pooled.append((i[0].shape, o[1])))
    net.unpool.register_forward_hook(lambda m, i, o: unpooled.append(o))
    with torch.no_grad():
        net(torch.randn(2, 1, 13, 15))
    assert len(pooled) == len(unpooled) == 2
    for (size, idx), up in zip(reversed(pooled), unpooled):
        assert up.shape == size  # odd sizes restored exactly
        flat = up.flatten(2)
        for n in range(up.shape[0]):
            for c in range(up.shape[1]):
                nonzero = set(torch.nonzero(flat[n, c]).flatten().tolist())
                assert nonzero <= set(idx[n, c].flatten().tolist())
        assert (up != 0).any()  # values were placed back (a ReLU-dead channel may be all zero)


def test_edd_returns_every_head_for_the_multi_output_loss():
    torch.manual_seed(0)
    net = _build("strokeseg.EDDNet", {**TINY_EDD, "deep_supervision": True})
    x = torch.randn(2, 1, 16, 16)
    heads = net.train()(x)
    assert isinstance(heads, list) and len(heads) == 4  # H (refined), h (ensemble), g1, g2
    assert all(h.shape == (2, 2, 16, 16) for h in heads)
    assert torch.allclose(heads[1], (heads[2] + heads[3]) / 2)
    target = (torch.rand(2, 1, 16, 16) > 0.7).float()
    loss = losses.MultiOutputLoss(losses.CrossEntropy())(heads, target)
    assert torch.isclose(loss, sum(losses.CrossEntropy()(h, target) for h in heads))
    loss.backward()
    net.eval()
    assert torch.is_tensor(net(x)) and torch.equal(net(x), net(x, all_outputs=True)[0])


def test_slicewise_equals_the_2d_network_on_each_slice():
    torch.manual_seed(0)
    wrapped = _build("strokeseg.SliceWise", {"inner": {"name": "strokeseg.EDDNet", "args": TINY_EDD}, "chunk": 2}).eval()
    x = torch.randn(2, 1, 3, 12, 16)
    with torch.no_grad():
        out = wrapped(x)
        per_slice = torch.stack([wrapped.inner(x[:, :, k]) for k in range(3)], dim=2)
        heads = wrapped(x, all_outputs=True)
    assert torch.allclose(out, per_slice, atol=1e-6)
    assert len(heads) == 4 and torch.allclose(heads[0], out, atol=1e-6)
    assert torch.allclose(heads[2][:, :, 1], wrapped.inner.nets[0](x[:, :, 1]), atol=1e-6)
    assert torch.equal(wrapped(x[:, :, 0]), wrapped.inner(x[:, :, 0]))  # 4D passes straight through


def _constant_muscle(q: float) -> torch.nn.Module:
    """A MUSCLE Net whose lesion probability is q for any patch."""
    net = _build("strokeseg.MuscleNet", TINY_MUSCLE).eval()
    last = net.classifier[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, math.log(q / (1 - q))]))
    return net


def test_bayes_fusion_of_small_candidates():
    prob = np.zeros((2, 32, 32), dtype=np.float32)
    prob[0, 5:15, 5:15] = 0.9  # 100 px: not small, never re-evaluated
    prob[1, 10:13, 20:23] = 0.8  # 9 px candidate
    prob[1, 0:2, 0:2] = 0.6  # 4 px candidate in the corner (patches padded with zeros)
    prob[1, 30, 30] = 0.3  # below threshold
    image = np.random.default_rng(0).normal(size=prob.shape).astype(np.float32)
    small = np.zeros_like(prob, dtype=bool)
    small[1, 10:13, 20:23] = small[1, 0:2, 0:2] = True

    for q, prior in [(0.9, 0.5), (0.2, 0.5), (0.5, 0.5), (0.7, 0.3)]:
        refined = muscle_refine(prob, image, _constant_muscle(q), threshold=0.5, max_pixels=60, prior=prior)
        assert isinstance(refined, np.ndarray) and refined.shape == prob.shape
        p = prob[small]
        expected = p * q * (1 - prior) / (p * q * (1 - prior) + (1 - p) * (1 - q) * prior)
        np.testing.assert_allclose(refined[small], expected, atol=1e-5)
        np.testing.assert_array_equal(refined[~small], prob[~small])
    # By hand: p 0.8 with q 0.9 -> 0.72 / 0.74; with q 0.2 -> 0.16 / 0.32 = 0.5 (below 0.8).
    assert math.isclose(float(bayes_fuse(0.8, 0.9)), 0.72 / 0.74, rel_tol=1e-6)
    assert math.isclose(float(bayes_fuse(0.8, 0.2)), 0.5, rel_tol=1e-6)
    as_tensor = muscle_refine(torch.from_numpy(prob), torch.from_numpy(image), _constant_muscle(0.9))
    assert torch.is_tensor(as_tensor)


def test_candidates_are_per_slice_8_connected_and_patches_are_centred():
    prob = np.zeros((2, 20, 20), dtype=np.float32)
    prob[0, 4, 4] = prob[0, 5, 5] = 0.9  # diagonal neighbours: one candidate
    prob[1, 4, 4] = 0.9  # same pixel on the next slice: a separate candidate
    prob[0, 10:19, 10:19] = 0.9  # 81 px: too large
    c = find_candidates(prob, 0.5, 60)
    assert len(c.ids) == 2
    assert sorted(map(tuple, c.centres.tolist())) == [(0, 4, 4), (1, 4, 4)]  # centroid (4.5, 4.5) rounds to even
    image = torch.arange(2 * 20 * 20, dtype=torch.float32).reshape(2, 20, 20)
    patches = muscle_patches(torch.from_numpy(prob), image, np.array([[1, 10, 9]]), scales=[8, 16], patch_size=8)
    assert patches.shape == (1, 3, 8, 8)
    assert torch.equal(patches[0, 0], image[1, 6:14, 5:13])  # the scale equal to the patch size is an exact crop
    truth = np.zeros_like(prob)
    truth[1, 4, 4] = 1
    samples, labels = muscle_training_samples(prob, image.numpy(), truth, scales=[8, 16], patch_size=8)
    assert samples.shape == (2, 3, 8, 8) and sorted(labels.tolist()) == [0, 1]


def test_edd_muscle_trains_as_edd_and_infers_with_fusion():
    torch.manual_seed(0)
    net = _build("strokeseg.EDDMuscle", {"edd": TINY_EDD, "muscle": TINY_MUSCLE, "threshold": 0.5})
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(net.train()(x), net.edd(x))
    net.eval()
    with torch.no_grad():
        p_edd = torch.softmax(net.edd(x), 1)[:, 1]
        expected = muscle_refine(p_edd, x[:, 0], net.muscle, threshold=0.5)
        fused = torch.softmax(net(x), 1)[:, 1]
    assert len(find_candidates(p_edd.numpy(), 0.5, 60).ids) > 0  # the random EDD Net leaves small candidates
    assert torch.allclose(fused, expected.clamp(1e-6, 1 - 1e-6), atol=1e-5)
    assert not torch.allclose(fused, p_edd, atol=1e-4)  # and the MUSCLE stage changed them


def test_engine_sliding_window_runs_two_stage_2d_model_from_its_card(tmp_path):
    torch.manual_seed(0)
    spec = {"inner": {"name": "strokeseg.EDDMuscle", "args": {"edd": TINY_EDD, "muscle": TINY_MUSCLE}}}
    loaded = _round_trip(tmp_path, "strokeseg.SliceWise", spec, _build("strokeseg.SliceWise", spec), 2)
    card = models.load_card(tmp_path)
    prob = predict(np.random.default_rng(0).normal(size=(1, 5, 20, 30)).astype(np.float32), [loaded], card, device="cpu")
    assert prob.shape == (5, 20, 30) and np.isfinite(prob).all() and 0 <= prob.min() <= prob.max() <= 1


# -- paper 003 -----------------------------------------------------------------------------


def test_dense_patch_cnn_equals_the_25_cube_classifier_at_every_voxel():
    torch.manual_seed(0)
    net = _build("strokeseg.PatchCNN3D", {"in_channels": 2, "channels": [3, 4, 4, 5, 6], "fc_channels": 6}).eval()
    assert net.patch_size == 25
    vol = torch.randn(1, 2, 14, 27, 30)
    with torch.no_grad():
        dense = net(vol)
        padded = torch.nn.functional.pad(vol, (12,) * 6)
        for z, y, x in [(7, 13, 15), (0, 26, 3), (13, 0, 29)]:  # centre and borders (zero-padded cubes)
            cube = padded[:, :, z : z + 25, y : y + 25, x : x + 25]
            assert torch.allclose(dense[0, :, z, y, x], net.classify_patches(cube)[0], atol=1e-5)


# -- paper 004 -----------------------------------------------------------------------------


def test_ctp_gen_seg_maxout_head_and_synthetic_dwi():
    pieces = torch.tensor([[[0.1], [2.0], [-1.0], [0.5]]])  # 3 background maps + 1 lesion map
    assert torch.equal(maxout_logits(pieces, 3), torch.tensor([[[2.0], [0.5]]]))
    torch.manual_seed(0)
    net = _build("strokeseg.CTPGenSeg", TINY_CTP).eval()
    x = torch.randn(2, 5, 16, 16)
    with torch.no_grad():
        logits, dwi = net(x, return_synthetic=True)
        seg = net.segmentator(net.generator(x))
    assert dwi.shape == (2, 1, 16, 16) and logits.shape == (2, 2, 16, 16)
    assert torch.equal(logits[:, 0], seg[:, :3].amax(1)) and torch.equal(logits[:, 1], seg[:, 3])
    assert torch.equal(net(x), logits)
    assert all(isinstance(m, torch.nn.GroupNorm) for m in net.modules() if "Norm" in type(m).__name__)


# -- losses --------------------------------------------------------------------------------


def test_focal_loss_against_hand_computation():
    # Two voxels, softmax logits (0, ln 3) -> p(lesion) = 0.75; labels lesion, background.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), math.log(3)]]])  # (N=1, C=2, 2 voxels)
    target = torch.tensor([[[1.0, 0.0]]])
    fl_lesion = -0.75 * (1 - 0.75) ** 2 * math.log(0.75)
    fl_background = -0.25 * (1 - 0.25) ** 2 * math.log(0.25)
    expected = (fl_lesion + fl_background) / 2
    assert math.isclose(float(losses.FocalLoss(gamma=2, alpha=0.75)(logits, target)), expected, rel_tol=1e-5)
    # One sigmoid channel with logit ln 3 is the same two-class problem.
    assert math.isclose(float(losses.FocalLoss()(logits[:, 1:], target)), expected, rel_tol=1e-5)
    # gamma 0 without alpha is plain cross-entropy.
    assert math.isclose(float(losses.FocalLoss(gamma=0, alpha=None)(logits, target)),
                        float(losses.CrossEntropy()(logits, target)), rel_tol=1e-5)


def test_ce_minus_log_generalised_dice_against_hand_computation():
    p = torch.tensor([0.8, 0.1, 0.2, 0.1])
    logits = torch.logit(p).reshape(1, 1, 4)
    target = torch.tensor([1.0, 0.0, 0.0, 0.0]).reshape(1, 1, 4)
    ce = -(math.log(0.8) + math.log(0.9) + math.log(0.8) + math.log(0.9)) / 4
    w_bg, w_fg = 1 / 3**2, 1 / 1**2  # Sudre: 1 / (reference volume)^2 per class
    inter = w_bg * (0.9 + 0.8 + 0.9) + w_fg * 0.8
    total = w_bg * (3 + 2.8) + w_fg * (1 + 1.2)
    expected = ce - math.log(2 * inter / total)
    assert math.isclose(float(losses.CEGeneralizedDiceLoss()(logits, target)), expected, rel_tol=1e-4)
    two = torch.cat([torch.zeros_like(logits), logits], 1)
    assert math.isclose(float(losses.CEGeneralizedDiceLoss()(two, target)), expected, rel_tol=1e-4)
    perfect = torch.tensor([-20.0, 20.0])[target.long()].reshape(1, 1, 4)
    assert float(losses.CEGeneralizedDiceLoss()(perfect, target)) < 1e-4


def test_error_map_weights_and_weighted_loss():
    prob = np.array([0.9, 0.2, 0.6, 0.0])
    truth = np.array([1, 0, 0, 0])
    np.testing.assert_allclose(losses.error_map(prob, truth, standardise=False), [0.01, 0.04, 0.36, 0.0], atol=1e-6)
    z = losses.error_map(prob, truth)
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-5
    np.testing.assert_allclose(losses.error_weights(prob, truth, strength=2.0), [1.02, 1.08, 1.72, 1.0], atol=1e-6)

    logits = torch.tensor([[[0.0, 1.0, -2.0]]])  # sigmoid logits, 3 voxels
    target = torch.tensor([[[1.0, 0.0, 0.0]]])
    weights = torch.tensor([[[0.0, 1.0, 0.0]]])
    only_second = -math.log(1 - 1 / (1 + math.exp(-1.0)))
    assert math.isclose(float(losses.VoxelWeightedLoss()(logits, target, weights)), only_second, rel_tol=1e-5)
    with pytest.raises(ValueError, match=">= 0"):
        losses.VoxelWeightedLoss()(logits, target, -weights - 1)


def test_lsgan_and_multi_output_losses():
    real, fake = torch.tensor([[1.0], [0.5]]), torch.tensor([[0.0], [0.5]])
    assert math.isclose(float(losses.lsgan_discriminator_loss(real, fake)), 0.125 + 0.125)
    assert math.isclose(float(losses.lsgan_generator_loss(fake)), (1 + 0.25) / 2)
    logits = torch.tensor([[[0.0, 2.0]]])
    target = torch.tensor([[[1.0, 0.0]]])
    dwi, syn = torch.zeros(1, 1, 2), torch.tensor([[[1.0, -1.0]]])
    total, parts = losses.gen_seg_loss(logits, target, syn, dwi, fake)
    assert parts["generator_mse"] == 1.0 and math.isclose(parts["adversarial"], 0.625)
    assert math.isclose(float(total), 0.002 * 1.0 + 0.5 * 0.625 + parts["segmentation"], rel_tol=1e-6)
    ce = losses.CrossEntropy()
    multi = losses.build_loss("ce", output_weights=[1.0, 0.5])
    assert math.isclose(float(multi([logits, -logits], target)), float(ce(logits, target) + 0.5 * ce(-logits, target)), rel_tol=1e-6)
    assert isinstance(losses.build_loss("multi:focal", {"alpha": 0.25}), losses.MultiOutputLoss)
    with pytest.raises(ValueError, match="outputs but"):
        multi([logits], target)
    with pytest.raises(ValueError, match="unknown loss"):
        losses.build_loss("dice")
