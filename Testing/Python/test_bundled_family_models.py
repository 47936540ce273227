"""The bundled CT-perfusion, MR-perfusion and T1 models on fresh phantoms they have never seen.

Their full held-out validation is recorded in each model card (made by ``strokeseg-train
evaluate``); these checks keep the shipped weights honest in CI: the registry entry and the
weights' integrity, a Dice floor on a few new held-out phantoms (seeds never used in training,
lesion shapes of the library's test split), and the card's metrics against the issue's targets.
Targets a model does not reach yet are strict xfails, so they fail loudly once a better model
reaches them and must then be promoted to plain tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest

from engine_fixtures import assert_bundled_card
from strokeseg.errors import InputError
from strokeseg.metrics import case_metrics
from strokeseg.models import MODELS_DIR, choose_model, get_card
from strokeseg.phantom import simulate_structural
from strokeseg.phantom.perfusion import simulate_perfusion
from strokeseg.pipeline import segment_images

pytestmark = pytest.mark.skipif(not (MODELS_DIR / "models.json").is_file(), reason="no bundled models.json")


@dataclass(frozen=True)
class Bundled:
    model: str
    family: str
    simulate: Callable[[int, Any], Any]
    inputs: tuple[str, ...]  # what a user would give (a subset of the phantom's images)
    seeds: tuple[int, ...]
    floor: float  # median Dice on ``seeds`` must stay at or above (regression floor, measured)
    floor_no_data: float  # the same without ../shared/data (procedural lesions and territories)
    target: float  # the issue's target for the held-out median Dice
    meets_target: bool  # does the card's held-out median reach it yet?


def _ctp(seed, lib):
    return simulate_perfusion(seed, "ctp", lib, "test" if lib else None)


def _pwi(seed, lib):
    return simulate_perfusion(seed, "pwi", lib, "test" if lib else None)


def _t1(seed, lib):  # territorial: the floor is about chronic infarcts the model can see (lacunes are a known gap)
    return simulate_structural("t1", seed, lib, "test" if lib else None, lesion_pattern="territorial")


BUNDLED = {
    b.model: b
    for b in (
        # ctp-unet 1.1.0 gives 0.85, 0.82, 0.79 on these seeds; held-out median 0.84 (24 cases).
        # Without ../shared/data: 0.85, 0.87, 0.66.
        Bundled("ctp-unet", "ctp", _ctp, ("cbf", "cbv", "mtt", "tmax"), (880001, 880002, 880003), floor=0.75,
                floor_no_data=0.75, target=0.70, meets_target=True),
        # mrp-unet 1.2.0 gives 0.83, 0.80, 0.77 on these seeds; held-out median 0.81 (19 cases).
        # Without ../shared/data: 0.73, 0.48, 0.79.
        Bundled("mrp-unet", "mrp", _pwi, ("adc", "cbf", "cbv", "mtt", "tmax"), (880011, 880012, 880013), floor=0.75,
                floor_no_data=0.70, target=0.70, meets_target=True),
        # t1-unet 1.4.0 gave 0.68, 0.34, 0.68 on these territorial seeds (1.3.0: 0.69, 0.36, 0.68); 1.5.0 to 1.7.0 pass the floor;
        # 1.7.0's held-out median is 0.57 (1.6.0: 0.62; 24 cases, 10 of them lacunes under 2 mL). Without ../shared/data: 0.73, 0.68, 0.92.
        Bundled("t1-unet", "t1", _t1, ("t1",), (880021, 880022, 880023), floor=0.60, floor_no_data=0.60,
                target=0.80, meets_target=False),
    )
}
IDS = list(BUNDLED)


def _run(b: Bundled, case) -> Any:
    return segment_images({k: case.images[k] for k in b.inputs}, model=b.model, device="cpu")


@pytest.mark.parametrize("model", IDS)
def test_registry_entry_weights_and_card(model):
    b = BUNDLED[model]
    card = get_card(model)
    assert card.family == b.family
    assert_bundled_card(card, min_cases=15)
    # A user's inputs of this kind pick this model.
    assert choose_model(b.inputs).id == model


@pytest.mark.parametrize("model", IDS)
def test_held_out_phantoms_dice_floor(model, lesion_library):
    b = BUNDLED[model]
    dice = []
    for seed in b.seeds:
        case = b.simulate(seed, lesion_library)
        res = _run(b, case)
        assert res.mask.same_grid(case.lesion)
        dice.append(case_metrics(res.mask.array, case.lesion.array, res.mask.spacing)["dice"])
    # The floors were measured on the library's lesion shapes and the arterial atlas; a checkout
    # without ../shared/data draws procedural ones, a different test set with its own floor.
    assert np.median(dice) >= (b.floor if lesion_library is not None else b.floor_no_data), dice


@pytest.mark.parametrize("model", [pytest.param(m, marks=() if BUNDLED[m].meets_target else pytest.mark.xfail(
    strict=True, reason=f"known gap: {m} held-out median Dice below the issue's target")) for m in IDS])
def test_card_meets_the_issue_target(model):
    b = BUNDLED[model]
    assert get_card(model).validation["metrics"]["dice_median"] >= b.target


def test_ctp_model_runs_from_the_raw_series_alone(lesion_library):
    """A user with only the 4D CTP: the engine computes the maps itself (the same deconvolution
    that made the phantom's maps), so the lesion mask is the one the maps give."""
    b = BUNDLED["ctp-unet"]
    case = b.simulate(b.seeds[0], lesion_library)
    from_maps = _run(b, case)
    from_series = segment_images({"ctp": case.images["ctp"]}, model="ctp-unet", device="cpu")
    assert from_series.mask.same_grid(from_maps.mask)
    assert np.abs(from_series.probability.array - from_maps.probability.array).max() < 1e-3
    assert choose_model(["ctp"]).id == "ctp-unet"


def test_time_maps_in_milliseconds_give_the_same_result(lesion_library):
    """MTT and Tmax exported in ms (some vendors) are read as seconds; before, every voxel read as
    > 30 s and the CTP model's Dice against its own seconds result fell to 0.19."""
    b = BUNDLED["ctp-unet"]
    case = b.simulate(b.seeds[0], lesion_library)
    base = _run(b, case)
    images = {k: case.images[k] for k in b.inputs}
    for key in ("mtt", "tmax"):
        images[key] = images[key].with_array(images[key].array.astype(np.float32) * 1000.0)
    res = segment_images(images, model=b.model, device="cpu")
    assert res.report["inputs_rescaled"] == {"mtt": "ms -> s", "tmax": "ms -> s"}
    assert np.abs(res.probability.array - base.probability.array).max() < 1e-3
    ambiguous = dict(images, tmax=images["tmax"].with_array(images["tmax"].array / 50.0))  # 20x seconds: neither
    with pytest.raises(InputError, match="tmax values .* are neither seconds nor milliseconds"):
        segment_images(ambiguous, model=b.model, device="cpu")

