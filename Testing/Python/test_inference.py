"""Sliding-window inference: TTA, fold ensembles, progress, cancel, devices, ADC derivation, model grid."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from engine_fixtures import tiny_card
from strokeseg.errors import Cancelled, StrokeSegError
from strokeseg.image import Image
from strokeseg.inference import predict, resolve_device
from strokeseg.models import ModelCard, build_network
from strokeseg.preprocess import canonical_grid, compute_adc, normalise


@pytest.fixture(scope="module")
def card() -> ModelCard:
    raw = tiny_card()
    raw["patch_size"] = [32, 32, 8]
    raw["inference"] = {"overlap": 0.25, "blend": "gaussian", "sw_batch_size": 1, "mirror_tta": False,
                        "roi_size": [32, 32, 8]}
    return ModelCard(raw=raw, folder=None)


def nets(card: ModelCard, n: int) -> list[torch.nn.Module]:
    out = []
    for i in range(n):
        torch.manual_seed(i)
        out.append(build_network(card).eval())
    return out


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(2, 12, 40, 36)).astype(np.float32)


def test_fold_ensemble_is_the_mean_of_its_folds(card, x):
    a, b = nets(card, 2)
    pa = predict(x, [a], card, device="cpu")
    pb = predict(x, [b], card, device="cpu")
    pab = predict(x, [a, b], card, device="cpu")
    np.testing.assert_allclose(pab, (pa + pb) / 2, atol=1e-5)
    assert pab.shape == x.shape[1:] and pab.dtype == np.float32


def test_mirror_tta_mirrors_left_right_unless_the_card_lists_more_axes(card, x):
    """By default only the mirroring every recipe trains with (x, left-right): two passes."""
    (net,) = nets(card, 1)
    tta = predict(x, [net], card, device="cpu", mirror_tta=True)
    plain = predict(x, [net], card, device="cpu", mirror_tta=False)
    flipped = np.flip(predict(np.flip(x, 3).copy(), [net], card, device="cpu", mirror_tta=False), 2)
    np.testing.assert_allclose(tta, (plain + flipped) / 2, atol=1e-5)


def test_mirror_tta_averages_the_eight_mirrorings_of_three_listed_axes(card, x):
    import copy

    (net,) = nets(card, 1)
    three = ModelCard(raw=copy.deepcopy(card.raw), folder=None)
    three.raw["inference"]["tta_axes"] = ["z", "y", "x"]
    tta = predict(x, [net], three, device="cpu", mirror_tta=True)
    manual = np.zeros_like(tta)
    for fz in (False, True):
        for fy in (False, True):
            for fx in (False, True):
                axes = [a for a, f in zip((1, 2, 3), (fz, fy, fx)) if f]
                xi = np.flip(x, axes).copy() if axes else x
                p = predict(xi, [net], card, device="cpu", mirror_tta=False)
                manual += np.flip(p, [a - 1 for a in axes]) if axes else p
    np.testing.assert_allclose(tta, manual / 8, atol=1e-5)


def test_progress_is_reported_and_cancel_stops(card, x):
    (net,) = nets(card, 1)
    seen: list[float] = []
    predict(x, [net], card, device="cpu", progress=lambda f, msg: seen.append(f))
    assert seen and seen[-1] == pytest.approx(1.0) and all(b >= a for a, b in zip(seen, seen[1:]))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        predict(x, [net], card, device="cpu", cancel=cancel)


def test_device_selection_errors_are_clear():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(StrokeSegError, match="no CUDA"):
            resolve_device("cuda")
    with pytest.raises(StrokeSegError, match="unknown device"):
        resolve_device("tpu")


def test_adc_from_b0_and_b1000_uses_the_b_value():
    adc_true = np.full((4, 8, 8), 800.0, np.float32)  # 10^-6 mm^2/s
    s0 = np.full_like(adc_true, 1000.0)
    b0 = Image(s0, (1, 1, 1))
    for b in (1000.0, 800.0):
        dwi = Image(s0 * np.exp(-b * adc_true * 1e-6), (1, 1, 1), meta={"b_value": str(b)})
        np.testing.assert_allclose(compute_adc(b0, dwi).array, 800.0, rtol=1e-4)
    # An explicit argument wins over the header.
    dwi = Image(s0 * np.exp(-1000 * adc_true * 1e-6), (1, 1, 1), meta={"b_value": "500"})
    np.testing.assert_allclose(compute_adc(b0, dwi, b_value=1000).array, 800.0, rtol=1e-4)


def test_canonical_grid_is_nearest_lps_and_covers_the_same_box():
    flip = (-1.0, 0, 0, 0, 0, 1.0, 0, -1.0, 0)  # x reversed, y/z swapped (coronal storage)
    ref = Image(np.zeros((20, 30, 40), np.float32), (0.9, 5.0, 1.1), (10.0, -20.0, 30.0), flip)
    grid = canonical_grid(ref, (2.0, 2.0, 4.0))
    np.testing.assert_allclose(np.abs(grid.direction_matrix), np.eye(3), atol=1e-9)
    assert np.all(np.diag(grid.direction_matrix) > 0)
    lo_r, hi_r = ref.corners().min(0), ref.corners().max(0)
    lo_g, hi_g = grid.corners().min(0), grid.corners().max(0)
    np.testing.assert_allclose(lo_g, lo_r, atol=2.0)
    np.testing.assert_allclose(hi_g, hi_r, atol=2.0)


def test_normalisation_methods():
    a = np.concatenate([np.zeros(1000), np.random.default_rng(1).normal(100, 10, 5000)]).astype(np.float32)
    z = normalise(a, {"method": "zscore"})
    fg = a > 10
    assert abs(z[fg].mean()) < 0.05 and abs(z[fg].std() - 1) < 0.05
    s = normalise(np.array([0, 1000, 9000], np.float32), {"method": "scale", "factor": 0.001, "clip": [0, 4]})
    np.testing.assert_allclose(s, [0, 1, 4])
    w = normalise(np.array([-100, 40, 200], np.float32), {"method": "window", "low": 0, "high": 80})
    np.testing.assert_allclose(w, [0, 0.5, 1])
    with pytest.raises(ValueError):
        normalise(a, {"method": "nope"})


def test_relative_normalisation_gives_flow_relative_to_typical_tissue_whatever_the_scale():
    """CBF maps of one brain from two tools (absolute scales differ by 2.7x): the same relative map,
    healthy tissue ~1, a core at 20% of normal flow ~0.2; outside the tissue mask stays 0."""
    rng = np.random.default_rng(3)
    cbf = np.zeros((8, 32, 32), np.float32)
    cbf[:, 4:28, 4:28] = rng.normal(50.0, 3.0, (8, 24, 24))  # healthy parenchyma, mL/100 g/min
    cbf[:, 8:14, 8:14] = 10.0  # core
    r1 = normalise(cbf, {"method": "relative", "clip": 4.0})
    r2 = normalise(2.7 * cbf, {"method": "relative", "clip": 4.0})
    np.testing.assert_allclose(r1, r2, atol=1e-5)
    assert abs(np.median(r1[:, 16:28, 16:28]) - 1.0) < 0.05 and abs(r1[0, 10, 10] - 0.2) < 0.02
    assert (r1[:, :4] == 0).all()
    assert (normalise(np.zeros((4, 4, 4), np.float32), {"method": "relative"}) == 0).all()
