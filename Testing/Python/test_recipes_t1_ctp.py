"""Recipes of papers 003 (T1 patch CNN) and 004 (CTP -> synthetic DWI GAN + segmentator).

Tiny CPU smoke runs of each recipe through ``strokeseg-train all`` (train -> tune -> evaluate ->
export into a temporary models folder -> the engine segmenting a case from the card alone), on
fabricated T1 volumes (images + masks folder) and fabricated CTP cases (case folders); and unit
tests of the pieces: histogram equalisation, background sub-sampling, the maxout head, the
temporal maximum of a 4D series, the GAN step, the optional DWI of the CTP phantom.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from strokeseg.image import Image
from strokeseg.io import write_image
from strokeseg.losses import lsgan_discriminator_loss, lsgan_generator_loss
from strokeseg.models import get_card, load_registry
from strokeseg.networks import build
from strokeseg.networks_zoo.ctp_gan import maxout_logits
from strokeseg.pipeline import segment_images
from strokeseg.preprocess import normalise, prepare
from strokeseg_training.cli import main as train_main
from strokeseg_training.config import card_of, load_config
from strokeseg_training.recipes import RECIPES, trainer
from strokeseg_training.recipes.paper003_t1_cnn import CubeSampler, subsample_background
from strokeseg_training.recipes.paper004_ctp_gan import augment, discriminator_step, generator_step

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"
DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _blob(shape, centre, radii) -> np.ndarray:
    zz, yy, xx = np.indices(shape)
    return (((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2
            + ((xx - centre[2]) / radii[2]) ** 2) <= 1.0


# -- fabricated data -------------------------------------------------------------------------


def _t1_case(rng: np.random.Generator, shape=(22, 26, 24), spacing=(2.0, 2.0, 2.0)) -> tuple[Image, Image]:
    """A T1-like head: bright ellipsoid 'brain', darker 'ventricles', a dark chronic lesion in one hemisphere."""
    brain = _blob(shape, np.array(shape) / 2, np.array(shape) * 0.42)
    t1 = np.where(brain, 600.0, 20.0) + rng.normal(0, 15, shape)
    t1[_blob(shape, np.array(shape) / 2, (2, 2, 3))] = 250.0
    side = 1 if rng.random() < 0.5 else -1
    c = np.array(shape) / 2 + np.array([rng.integers(-2, 3), rng.integers(-3, 4), side * 6])
    lesion = _blob(shape, c, rng.uniform(2.0, 3.5, 3)) & brain
    t1[lesion] = 180.0 + rng.normal(0, 15, int(lesion.sum()))
    origin = (-shape[2] * spacing[0] / 2, -shape[1] * spacing[1] / 2, -shape[0] * spacing[2] / 2)
    return (Image(t1.astype(np.float32), spacing, origin, DIRECTION),
            Image(lesion.astype(np.uint8), spacing, origin, DIRECTION))


def _t1_dataset(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(3)
    for i in range(n):
        t1, lesion = _t1_case(rng)
        write_image(t1, root / "images" / f"case{i:02d}_t1.nii.gz")
        write_image(lesion, root / "masks" / f"case{i:02d}.nii.gz")
    return root


def _ctp_case(rng: np.random.Generator, shape=(3, 36, 36), spacing=(2.0, 2.0, 5.0), frames=8) -> dict[str, Image]:
    """A CTP-like case: a 4D series whose lesion enhances late and weakly, maps with a low-CBF /
    long-Tmax core, and a DWI bright in the core."""
    brain = _blob(shape, (1, 18, 18), (5, 14, 13))
    c = (1, 18 + int(rng.integers(-3, 4)), 18 + int(rng.choice([-6, 6])))
    core = _blob(shape, c, (4, 4, 3.5)) & brain
    t = np.arange(frames, dtype=np.float32)
    healthy = 40 + 30 * np.exp(-((t - 3) / 1.5) ** 2)
    slow = 40 + 8 * np.exp(-((t - 6) / 2.0) ** 2)
    series = np.where(brain, 1.0, 0.0)[None] * healthy[:, None, None, None]
    series = np.where(core[None], slow[:, None, None, None], series) + rng.normal(0, 2, (frames, *shape))
    series[:, ~brain] = -1000.0
    origin = (-36.0, -36.0, -5.0)

    def img(a):
        return Image(a.astype(np.float32), spacing, origin, DIRECTION)

    maps = {
        "cbf": np.where(core, 8.0, 45.0), "cbv": np.where(core, 1.5, 4.0),
        "mtt": np.where(core, 9.0, 5.0), "tmax": np.where(core, 12.0, 1.0), "dwi": np.where(core, 900.0, 500.0),
    }
    out = {k: img(np.where(brain, v, 0.0) + rng.normal(0, 0.03 * float(v.max()), shape)) for k, v in maps.items()}
    out["ctp"] = Image(np.round(series).astype(np.int16), spacing, origin, DIRECTION, {"times": [float(x) for x in t * 1.5]})
    out["lesion"] = Image(core.astype(np.uint8), spacing, origin, DIRECTION)
    return out


def _ctp_dataset(root: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        for key, im in _ctp_case(rng).items():
            write_image(im, root / f"case{seed}{i:02d}" / f"{key}.nii.gz")
    return root


# -- unit tests --------------------------------------------------------------------------------


def test_recipes_are_registered():
    from strokeseg_training.recipes import paper003_t1_cnn, paper004_ctp_gan

    assert trainer("paper003_t1_cnn") is paper003_t1_cnn.train
    assert trainer("paper004_ctp_gan") is paper004_ctp_gan.train
    assert {"paper003_t1_cnn", "paper004_ctp_gan"} <= set(RECIPES)


def test_histeq_flattens_the_foreground_histogram():
    rng = np.random.default_rng(0)
    a = np.zeros((20, 30, 30), np.float32)
    head = _blob(a.shape, (10, 15, 15), (9, 13, 13))
    a[head] = rng.gamma(2.0, 100.0, int(head.sum()))  # skewed intensities
    out = normalise(a, {"method": "histeq"})
    assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    assert np.all(out[~head] == 0)  # air stays at 0
    hist, _ = np.histogram(out[head], bins=10, range=(0, 1))
    assert hist.min() > 0.8 * hist.mean() and hist.max() < 1.2 * hist.mean()  # uniform: equalised
    order = np.argsort(a[head])  # monotone: contrast order kept
    assert np.all(np.diff(out[head][order]) >= 0)


def test_background_subsampling_keeps_every_lesion_voxel_and_epsilon_of_the_rest():
    rng = np.random.default_rng(1)
    label = np.zeros((40, 50, 50), np.uint8)
    label[10:14, 20:25, 20:25] = 1
    centres = subsample_background(label, 0.01, rng)
    lab = label[tuple(centres.T)]
    assert lab.sum() == label.sum()  # all lesion voxels
    n_bg = int((lab == 0).sum())
    expected = 0.01 * (label.size - label.sum())
    assert abs(n_bg - expected) < 4 * np.sqrt(expected)  # binomial(N, 0.01)
    head = np.zeros_like(label, bool)
    head[:, :25] = True
    inside = subsample_background(label, 0.5, rng, region=head)
    assert head[tuple(inside.T)].all()
    with pytest.raises(ValueError):
        subsample_background(label, 1.5, rng)


def test_cube_sampler_balances_and_centres_cubes():
    from strokeseg_training.data import Volume

    label = np.zeros((12, 12, 12), np.uint8)
    label[5:8, 5:8, 5:8] = 1
    image = np.stack([np.arange(label.size, dtype=np.float16).reshape(label.shape) % 7, label.astype(np.float16)])
    s = CubeSampler([Volume("v", image, label)], 5, 0.02, np.random.default_rng(0))
    assert 0.3 < s.lesion_fraction < 1.0  # 27 lesion voxels vs ~34 sub-sampled background voxels
    x, y = s.batch(40)
    assert x.shape == (40, 2, 5, 5, 5)
    assert torch.equal(x[:, 1, 2, 2, 2] > 0.5, y.bool())  # cube centre = the labelled voxel


def test_maxout_head_takes_the_max_of_three_background_maps():
    pieces = torch.randn(2, 4, 5, 6)
    out = maxout_logits(pieces, 3)
    assert out.shape == (2, 2, 5, 6)
    assert torch.equal(out[:, 0], pieces[:, :3].amax(1)) and torch.equal(out[:, 1], pieces[:, 3])
    net = build("strokeseg.CTPGenSeg", {"in_channels": 5, "generator_channels": [4, 8], "segmentator_channels": [4, 8],
                                        "group_channels": 4}).eval()
    logits, dwi = net(torch.randn(1, 5, 12, 12), return_synthetic=True)
    assert logits.shape == (1, 2, 12, 12) and dwi.shape == (1, 1, 12, 12)
    assert net.segmentator.head.out_channels == 4  # 3 background + 1 lesion before the maxout


def test_temporal_max_of_4d_series_keeps_geometry_and_feeds_the_channel():
    from strokeseg.derived import temporal_reduction

    rng = np.random.default_rng(2)
    series = Image(rng.normal(40, 5, (6, 4, 10, 12)).astype(np.float32), (1.5, 1.2, 5.0), (10.0, -20.0, 3.0),
                   (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0), {"times": list(range(6))})
    series.array[3, 2, 5, 6] = 500.0
    mx = temporal_reduction(series, "max")
    assert mx.array.shape == (4, 10, 12) and mx.same_grid(series.frame(0)) and "times" not in mx.meta
    assert np.array_equal(mx.array, series.array.max(0)) and mx.array[2, 5, 6] == 500.0
    with pytest.raises(Exception, match="4D"):
        temporal_reduction(mx, "max")

    # Through prepare: the card's "ctp" channel is the windowed temporal max, on the same voxels as the maps.
    cfg = load_config(CONFIGS / "paper004_ctp_gan.json")
    cfg["card"]["target_spacing"] = [2.0, 2.0, 5.0]
    case = _ctp_case(np.random.default_rng(5))
    prepared = prepare({k: v for k, v in case.items() if k not in ("dwi", "lesion")}, card_of(cfg))
    assert prepared.channels == ("mtt", "tmax", "cbv", "cbf", "ctp")
    spec = cfg["card"]["normalisation"]["ctp"]
    expect = normalise(case["ctp"].array.max(0).astype(np.float32), spec)
    assert prepared.array.shape[1:] == case["cbf"].array.shape  # same grid as the maps here: no resampling
    assert np.allclose(prepared.array[4], expect, atol=1e-4)
    no_rule = {**cfg["card"], "temporal_reduction": {}}
    with pytest.raises(Exception, match="temporal_reduction"):
        prepare({k: v for k, v in case.items() if k not in ("dwi", "lesion")}, card_of({"card": no_rule}))


def test_gan_step_moves_both_losses_the_right_way():
    torch.manual_seed(0)
    net = build("strokeseg.CTPGenSeg", {"in_channels": 5, "generator_channels": [4, 8], "segmentator_channels": [4, 8],
                                        "group_channels": 4})
    disc = build("strokeseg.LSGANDiscriminator", {"in_channels": 1, "channels": [4], "group_channels": 4})
    x = torch.randn(4, 5, 16, 16)
    real = torch.randn(4, 1, 16, 16) + 2.0
    label = (torch.rand(4, 1, 16, 16) > 0.8).float()
    opt_d = torch.optim.RMSprop(disc.parameters(), lr=1e-3, alpha=0.9)
    opt_g = torch.optim.RMSprop(net.parameters(), lr=1e-3, alpha=0.9)

    with torch.no_grad():
        _, fake = net(x, return_synthetic=True)
        d0 = float(lsgan_discriminator_loss(disc(real), disc(fake)))
    for _ in range(6):
        discriminator_step(disc, opt_d, real, fake)
    with torch.no_grad():
        assert float(lsgan_discriminator_loss(disc(real), disc(fake))) < d0  # D learns real vs synthetic
        a0 = float(lsgan_generator_loss(disc(net(x, return_synthetic=True)[1])))
    d_params = [p.detach().clone() for p in disc.parameters()]
    first = None
    for _ in range(6):
        logits, fake = net(x, return_synthetic=True)
        parts = generator_step(disc, opt_g, logits, fake, real, label)
        first = first or parts
    assert all(torch.equal(p, q) for p, q in zip(d_params, disc.parameters()))  # D frozen in the G step
    with torch.no_grad():
        assert float(lsgan_generator_loss(disc(net(x, return_synthetic=True)[1]))) < a0  # G fools D more
    assert parts["total"] < first["total"] and parts["segmentation"] < first["segmentation"]
    assert all(p.requires_grad for p in disc.parameters())


def test_augment_moves_inputs_dwi_and_label_together():
    x = torch.zeros(3, 2, 20, 20)
    x[:, :, 4:9, 12:17] = 1.0
    d = x[:, :1].clone()
    y = x[:, :1].clone()
    gen = torch.Generator().manual_seed(0)
    xa, da, ya = augment(x, d, y, {"flip": 0.5, "rotate_deg": 30, "scale": 0.2, "translate": 0.1}, gen)
    assert xa.shape == x.shape and da.shape == d.shape and ya.shape == y.shape
    assert set(torch.unique(ya).tolist()) <= {0.0, 1.0}  # nearest for the label
    assert ((ya > 0.5) == (da > 0.5)).float().mean() > 0.97  # same transform
    assert not torch.equal(ya, y)


def test_ctp_phantom_dwi_is_optional_and_additive():
    from strokeseg.phantom.perfusion import simulate_perfusion

    kw = {"size": (40, 40, 4), "compute_maps": False, "motion": False}
    plain = simulate_perfusion(11, "ctp", **kw)
    with_dwi = simulate_perfusion(11, "ctp", dwi=True, **kw)
    assert "dwi" not in plain.images and "dwi" not in plain.info
    assert np.array_equal(plain.images["ctp"].array, with_dwi.images["ctp"].array)
    assert all(np.array_equal(plain.truth[k].array, with_dwi.truth[k].array) for k in plain.truth)
    dwi = with_dwi.images["dwi"]
    assert dwi.same_grid(plain.images["ctp"].frame(0)) and dwi.array.dtype == np.int16
    core, tissue = with_dwi.truth["core"].array > 0, with_dwi.truth["tissue"].array > 0
    if core.sum() > 5:  # restricted diffusion: the core is bright on b1000
        assert dwi.array[core].mean() > 1.2 * dwi.array[tissue & ~core].mean()
    assert with_dwi.info["dwi"]["b_value"] == 1000.0


def test_recipe_writes_ctp_dwi_phantoms_a_dataset_adapter_reads(tmp_path):
    from strokeseg_training.adapters import get_adapter
    from strokeseg_training.recipes.paper004_ctp_gan import ensure_phantoms

    cfg = {"data": {"root": str(tmp_path / "cv"), "workers": 1,
                    "phantom": {"seed": 7, "count": 1, "options": {"size": [32, 32, 4], "compute_maps": False, "motion": False}}}}
    ensure_phantoms(cfg)
    (case,) = get_adapter("generic").cases(tmp_path / "cv")
    assert case.case_id == "ctp-train-00007" and {"ctp", "dwi"} <= set(case.inputs) and "lesion" in case.labels
    stamp = (tmp_path / "cv" / case.case_id / "case.json").stat().st_mtime_ns
    ensure_phantoms(cfg)  # complete cases are kept, not regenerated
    assert (tmp_path / "cv" / case.case_id / "case.json").stat().st_mtime_ns == stamp


def test_phantoms_made_by_another_pipeline_are_made_again(tmp_path, monkeypatch):
    """The phantom folders hold the maps our pipeline computed: when its CT maps change
    (MAPS_VERSION), or the options do, the same case ids are made again, and the training cache
    built from the folders gets a new key."""
    import strokeseg.perfusion.pipeline as pipeline
    from strokeseg_training.config import load_config
    from strokeseg_training.realdata import _key
    from strokeseg_training.recipes.paper004_ctp_gan import PHANTOMS_STAMP, ensure_phantoms

    cfg = load_config(CONFIGS / "paper004_ctp_gan.json")
    cfg["data"].update(root=str(tmp_path / "cv"), workers=1, test_root=None,
                       phantom={"seed": 7, "count": 1, "options": {"size": [32, 32, 4], "compute_maps": False, "motion": False}})
    case_json = tmp_path / "cv" / "ctp-train-00007" / "case.json"
    ensure_phantoms(cfg)
    made, key = case_json.stat().st_mtime_ns, _key(cfg, "generic", tmp_path / "cv")
    assert "maps-" in (tmp_path / "cv" / PHANTOMS_STAMP).read_text(encoding="utf-8")
    monkeypatch.setitem(pipeline.MAPS_VERSION, "ct", "next")
    ensure_phantoms(cfg)
    assert case_json.stat().st_mtime_ns != made and _key(cfg, "generic", tmp_path / "cv") != key
    assert '"maps-next"' in (tmp_path / "cv" / PHANTOMS_STAMP).read_text(encoding="utf-8")
    made = case_json.stat().st_mtime_ns
    ensure_phantoms(cfg)
    assert case_json.stat().st_mtime_ns == made
    monkeypatch.setitem(pipeline.MAPS_VERSION, "mr", "other")  # MR maps are not in CTP phantoms
    ensure_phantoms(cfg)
    assert case_json.stat().st_mtime_ns == made


def test_phantoms_the_engine_refuses_are_left_out_with_a_reason(tmp_path, monkeypatch):
    import strokeseg.phantom.perfusion as perfusion_phantom
    from strokeseg_training.adapters import get_adapter
    from strokeseg_training.recipes.paper004_ctp_gan import ensure_phantoms

    real = perfusion_phantom.simulate_perfusion

    def refuse_seed_8(seed, *args, **kwargs):
        case = real(seed, *args, **kwargs)
        if seed == 8:  # as when the simulated head moved beyond what motion correction accepts
            case.info["computed"] = {"error": "motion beyond correction: frame 19 moved 10.8 mm (limit 10 mm)"}
        return case

    monkeypatch.setattr(perfusion_phantom, "simulate_perfusion", refuse_seed_8)
    cfg = {"data": {"root": str(tmp_path / "cv"), "workers": 1,
                    "phantom": {"seed": 7, "count": 2, "options": {"size": [32, 32, 4], "compute_maps": False, "motion": False}}}}
    ensure_phantoms(cfg)
    assert [c.case_id for c in get_adapter("generic").cases(tmp_path / "cv")] == ["ctp-train-00007"]
    marker = tmp_path / "cv" / "ctp-train-00008.refused.txt"
    assert "motion beyond correction" in marker.read_text(encoding="utf-8")
    monkeypatch.setattr(perfusion_phantom, "simulate_perfusion", None)  # nothing is simulated again
    ensure_phantoms(cfg)


def test_generate_command_writes_the_recipes_own_phantoms(tmp_path):
    """`strokeseg-train generate` prepares paper 004's CTP + DWI phantoms (not the shared splits)
    and caches the dataset's splits from them."""
    phantom = {"modality": "ctp", "seed": 7, "count": 3, "test_count": 1,
               "options": {"size": [32, 32, 4], "compute_maps": False, "motion": False}}
    data = {"source": "generic", "root": str(tmp_path / "cv"), "test_root": str(tmp_path / "test"), "folds": 2,
            "fold": 0, "seed": 0, "cache_dir": str(tmp_path / "cache"), "workers": 1, "n_val": 1, "n_test": 1,
            "phantom": phantom}
    overrides = [f"run_dir={tmp_path / 'run'}", f"data={json.dumps(data)}", "card.target_spacing=[4.0,4.0,5.0]",
                 'card.inputs={"required":["ctp"],"optional":[]}', "card.derivable={}"]
    assert train_main(["generate", "--config", str(CONFIGS / "paper004_ctp_gan.json"), *_sets(overrides)]) == 0
    assert sorted(p.name for p in (tmp_path / "cv").iterdir() if p.is_dir()) == ["ctp-train-00007", "ctp-train-00008", "ctp-train-00009"]
    assert (tmp_path / "test" / "ctp-test-900007" / "case.json").is_file()
    assert list((tmp_path / "cache").rglob("*.npz"))  # the splits were cached from them


# -- end-to-end smoke runs ---------------------------------------------------------------------


def test_run_folder_knows_when_the_budget_ran_out_at_a_validated_step(tmp_path):
    """The check paper 003's and paper 004's loops share: only at the validated step, only with
    the budget gone, and a resume counts its checkpoint as validated."""
    from strokeseg_training.recipes._runloop import RunFolder

    net = torch.nn.Linear(2, 2)
    run = RunFolder(tmp_path, ["loss"], "key")
    assert run.resume({"net": net}, torch.device("cpu"), True) == 0
    assert not run.budget_spent_at_validation(0, -1.0)  # nothing validated yet
    run.checkpoint(3, net, 0.5)
    assert run.budget_spent_at_validation(3, -1.0) and not run.budget_spent_at_validation(3, 1e9)
    assert not run.budget_spent_at_validation(4, -1.0)
    again = RunFolder(tmp_path, ["loss"], "key")
    assert again.resume({"net": net}, torch.device("cpu"), True) == 3
    assert again.budget_spent_at_validation(3, -1.0)
    assert RunFolder(tmp_path, ["loss"], "other settings").resume({"net": net}, torch.device("cpu"), True) == 0


def test_paper003_stops_at_a_validated_step_when_the_budget_is_spent(tmp_path):
    """A run whose time budget ran out during a validation (or that is resumed after it) stops
    there: no second whole-volume validation one step later, and train_summary.json is written."""
    root = _t1_dataset(tmp_path / "t1data")
    data = {"source": "generic", "root": str(root), "folds": 2, "fold": 0, "test_fraction": 0.34, "seed": 0,
            "cache_dir": str(tmp_path / "cache"), "workers": 1, "n_val": 2, "n_test": 2}
    base = [f"run_dir={tmp_path / 'run'}", f"data={json.dumps(data)}", "card.target_spacing=[2.0,2.0,2.0]",
            "card.inference.roi_size=[32,32,32]", "card.network.args.channels=[3,3,4,4,4]",
            "card.network.args.fc_channels=4", "train.val_every=3", "train.batch_size=8", "train.lr=0.001",
            "train.epsilon=0.05"]
    assert train_main(["train", "--config", str(CONFIGS / "paper003_t1_cnn.json"), *_sets(base + ["train.steps=3"])]) == 0
    log = tmp_path / "run" / "log.csv"
    before = log.read_text(encoding="utf-8")
    assert before.splitlines()[-1].startswith("3,")  # validated at step 3
    # Resumed with more steps but no time left: it stops at step 3 instead of training and validating step 4.
    assert train_main(["train", "--config", str(CONFIGS / "paper003_t1_cnn.json"),
                       *_sets(base + ["train.steps=9", "train.max_minutes=0"])]) == 0
    assert log.read_text(encoding="utf-8") == before
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text(encoding="utf-8"))["steps_done"] == 3


def test_paper003_continued_is_the_uninterrupted_run(tmp_path):
    """3 steps, then the same command with 6: the log and weights of one 6-step run (the sampler's
    place in its shuffled pass and the generators are checkpointed); other settings start afresh."""
    root = _t1_dataset(tmp_path / "t1data")
    data = {"source": "generic", "root": str(root), "folds": 2, "fold": 0, "test_fraction": 0.34, "seed": 0,
            "cache_dir": str(tmp_path / "cache"), "workers": 1, "n_val": 2, "n_test": 2}
    base = [f"data={json.dumps(data)}", "card.target_spacing=[2.0,2.0,2.0]", "card.inference.roi_size=[32,32,32]",
            "card.network.args.channels=[3,3,4,4,4]", "card.network.args.fc_channels=4", "train.val_every=3",
            "train.batch_size=8", "train.lr=0.001", "train.epsilon=0.05"]
    config = str(CONFIGS / "paper003_t1_cnn.json")
    assert train_main(["train", "--config", config, *_sets(base + [f"run_dir={tmp_path / 'whole'}", "train.steps=6"])]) == 0
    cut = [f"run_dir={tmp_path / 'cut'}"]
    assert train_main(["train", "--config", config, *_sets(base + cut + ["train.steps=3"])]) == 0
    assert train_main(["train", "--config", config, *_sets(base + cut + ["train.steps=6"])]) == 0
    rows = lambda run: [r.split(",")[:4] for r in (tmp_path / run / "log.csv").read_text(encoding="utf-8").splitlines()]  # noqa: E731
    assert rows("cut") == rows("whole") and len(rows("whole")) == 3
    assert (tmp_path / "cut" / "last.safetensors").read_bytes() == (tmp_path / "whole" / "last.safetensors").read_bytes()
    assert train_main(["train", "--config", config, *_sets(base + cut + ["train.steps=6", "train.lr=0.002"])]) == 0
    assert rows("cut")[1] != rows("whole")[1]  # trained again from step 1 with the new rate


def test_paper003_recipe_end_to_end_smoke(tmp_path):
    root = _t1_dataset(tmp_path / "t1data")
    models = tmp_path / "models"
    data = {"source": "generic", "root": str(root), "folds": 2, "fold": 0, "test_fraction": 0.34, "seed": 0,
            "cache_dir": str(tmp_path / "cache"), "workers": 1, "n_val": 2, "n_test": 2}
    overrides = [
        f"run_dir={tmp_path / 'run'}", f"models_dir={models}", f"data={json.dumps(data)}",
        "card.target_spacing=[2.0,2.0,2.0]", "card.inference.roi_size=[32,32,32]",
        "card.network.args.channels=[3,3,4,4,4]", "card.network.args.fc_channels=4",
        "train.steps=6", "train.val_every=3", "train.batch_size=8", "train.lr=0.001", "train.epsilon=0.05",
        'tune.grid={"threshold":[0.3,0.5],"closing_mm":[0.0],"min_lesion_ml":[0.0]}',
    ]
    assert train_main(["all", "--config", str(CONFIGS / "paper003_t1_cnn.json"), *_sets(overrides)]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "train_summary.json").read_text(encoding="utf-8"))
    assert summary["steps_done"] == 6 and summary["recipe"] == "paper003_t1_cnn"
    assert 0.0 < summary["lesion_fraction_of_centres"] < 1.0
    assert (run / "log.csv").read_text(encoding="utf-8").startswith("step,loss,lr,val_dice")
    (card,) = load_registry(models)
    assert card.id == "t1-patchcnn-paper003" and card.raw["derived_channels"][0]["kind"] == "mirror"
    t1, _ = _t1_case(np.random.default_rng(99))
    res = segment_images({"t1": t1}, model=get_card(card.id, models), device="cpu")
    assert res.mask.same_grid(t1) and np.isfinite(res.probability.array).all()
    assert res.report["model"]["inputs"] == ["t1", "t1_mirror"]


def test_paper004_recipe_end_to_end_smoke(tmp_path):
    root = _ctp_dataset(tmp_path / "cv", 4, seed=1)
    test_root = _ctp_dataset(tmp_path / "test", 1, seed=2)
    models = tmp_path / "models"
    data = {"source": "generic", "root": str(root), "test_root": str(test_root), "folds": 2, "fold": 0, "seed": 0,
            "cache_dir": str(tmp_path / "cache"), "workers": 1, "n_val": 2, "n_test": 1}
    inner = {"in_channels": 5, "spatial_dims": 2, "generator_channels": [4, 8], "segmentator_channels": [4, 8],
             "group_channels": 4, "background_pieces": 3}
    overrides = [
        f"run_dir={tmp_path / 'run'}", f"models_dir={models}", f"data={json.dumps(data)}",
        "card.target_spacing=[2.0,2.0,5.0]", "card.patch_size=[32,32,1]", "card.inference.roi_size=[32,32,2]",
        f'card.network.args={json.dumps({"inner": {"name": "strokeseg.CTPGenSeg", "args": inner}})}',
        'train.discriminator={"channels":[4],"group_channels":4}',
        "train.steps=4", "train.val_every=2", "train.batch_size=2", "train.lr=0.001", "train.cross_validate=true",
        'tune.grid={"threshold":[0.4,0.6],"closing_mm":[0.0],"min_lesion_ml":[0.0]}',
    ]
    assert train_main(["all", "--config", str(CONFIGS / "paper004_ctp_gan.json"), *_sets(overrides)]) == 0
    run = tmp_path / "run"
    summary = json.loads((run / "train_summary.json").read_text(encoding="utf-8"))
    assert summary["steps_done"] == 4 and summary["fold"] == 0
    assert set(summary["final_losses"]) == {"discriminator", "total", "recon", "adversarial", "segmentation"}
    assert (run / "discriminator.safetensors").is_file()
    cv = json.loads((run / "cv_summary.json").read_text(encoding="utf-8"))
    assert set(cv["folds"]) == {"0", "1"} and cv["summary"]["best_val_dice"]["n"] == 2
    assert len(list((tmp_path / "cache").glob("*/dwi_target-*/*.npy"))) >= 2  # the generator's targets

    (card,) = load_registry(models)
    assert card.id == "ctp-gan-paper004" and card.raw["temporal_reduction"] == {"ctp": "max"}
    assert not any("disc" in k for k in load_file(str(card.folder / "fold0.safetensors")))  # D is training only
    case = _ctp_case(np.random.default_rng(42))
    images = {k: v for k, v in case.items() if k not in ("dwi", "lesion")}
    res = segment_images(images, model=get_card(card.id, models), device="cpu")
    assert res.mask.same_grid(case["mtt"]) and np.isfinite(res.probability.array).all()
    assert res.report["model"]["inputs"] == ["mtt", "tmax", "cbv", "cbf", "ctp"]
