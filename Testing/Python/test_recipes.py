"""Paper recipes 000-002: their specific parts, and a tiny end-to-end run of each
(train -> tune -> evaluate -> export -> the engine segmenting a case from the exported card)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from strokeseg.image import Image
from strokeseg.io import read_image, write_image

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "training" / "configs"


# -- fabricated cases --------------------------------------------------------------------------

# Intensity per input key: (tissue, lesion, ventricles) -- fluid as the engine's modality check expects.
CONTRAST = {"dwi": (100.0, 190.0, 30.0), "adc": (800.0, 450.0, 3000.0), "mtt": (4.0, 9.0, 4.0), "cbf": (50.0, 12.0, 50.0)}


def make_case(folder: Path, keys: list[str], seed: int, shape_zyx=(12, 28, 28), spacing=(3.0, 3.0, 4.0)) -> None:
    """A head (ellipsoid off the box centre) with one spherical lesion on one side, per input key."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape_zyx)
    cz, cy, cx = shape_zyx[0] / 2, shape_zyx[1] / 2, shape_zyx[2] / 2 + 1
    head = ((z - cz) / (shape_zyx[0] * 0.42)) ** 2 + ((y - cy) / (shape_zyx[1] * 0.4)) ** 2 + ((x - cx) / (shape_zyx[2] * 0.38)) ** 2 <= 1
    lz, ly, lx = cz + rng.integers(-1, 2), cy + rng.integers(-3, 4), cx + (-1) ** seed * rng.integers(4, 7)
    lesion = head & ((z - lz) ** 2 + (y - ly) ** 2 + (x - lx) ** 2 <= 2.5 ** 2 + rng.random() * 4)
    fluid = ~lesion & (((z - cz) / 2.5) ** 2 + ((y - cy) / 4) ** 2 + ((x - cx) / 1.5) ** 2 <= 1)
    geom = dict(spacing=spacing, origin=(-40.0, -40.0, -20.0), direction=tuple(np.eye(3).ravel()))
    for k in keys:
        healthy, les, csf = CONTRAST[k]
        a = np.where(head, healthy, 0.0) + np.where(lesion, les - healthy, 0.0) + np.where(fluid, csf - healthy, 0.0)
        a = a + head * rng.normal(0, 0.05 * healthy, shape_zyx)
        write_image(Image(a.astype(np.float32), **geom), folder / f"{k}.nii.gz")
    write_image(Image(lesion.astype(np.uint8), **geom), folder / "lesion.nii.gz")


def make_dataset(root: Path, keys: list[str], n: int = 4) -> Path:
    for i in range(n):
        make_case(root / f"case{i:02d}", keys, seed=i)
    return root


def tiny_config(tmp: Path, name: str, data_root: Path, card: dict, train: dict, tune: dict | None = None) -> Path:
    cfg = json.loads((CONFIGS / name).read_text(encoding="utf-8"))
    cfg["run_dir"] = str(tmp / "run")
    cfg["models_dir"] = str(tmp / "models")
    cfg["data"] = {"source": "generic", "root": str(data_root), "test_root": str(data_root), "folds": 1,
                   "val_fraction": 0.34, "seed": 0, "n_test": 2, "workers": 1, "cache_dir": str(tmp / "cache"),
                   "description": "fabricated test cases"}
    for k, v in card.items():
        cfg["card"][k] = v
    cfg["train"].update(train)
    if tune:
        cfg["tune"] = tune
    path = tmp / name
    path.write_text(json.dumps(cfg))
    return path


def run_all(config: Path) -> dict:
    from strokeseg_training.cli import main

    assert main(["all", "--config", str(config)]) == 0
    return json.loads(config.read_text(encoding="utf-8"))


def segment_with_export(tmp: Path, cfg: dict, case: Path) -> None:
    """The engine alone runs the exported model card on a case folder."""
    from strokeseg.models import get_card
    from strokeseg.pipeline import segment_case

    card = get_card(cfg["card"]["id"], models_dir=tmp / "models")
    assert card.raw["postprocess"]["threshold"] > 0
    res = segment_case(case, tmp / "seg", model=cfg["card"]["id"], device="cpu", models_dir=tmp / "models")
    ref = read_image(case / f"{card.reference_input}.nii.gz")
    prob = read_image(tmp / "seg" / "probability.nii.gz").array
    assert prob.shape == ref.array.shape
    assert np.isfinite(prob).all() and prob.min() >= 0 and prob.max() <= 1
    assert (tmp / "seg" / "report.json").is_file()
    assert res.report["model"]["id"] == cfg["card"]["id"]


# -- paper 000 ---------------------------------------------------------------------------------


def test_intensity_variance_changes_only_lesion_voxels():
    from strokeseg_training.data import Volume
    from strokeseg_training.recipes.paper000_deepmedic import intensity_variance_clone

    rng = np.random.default_rng(0)
    img = rng.normal(0, 1, (3, 8, 12, 12)).astype(np.float16)
    img[:, 2:5, 3:7, 3:7] += 4
    lab = np.zeros((8, 12, 12), np.uint8)
    lab[2:5, 3:7, 3:7] = 1
    clone = intensity_variance_clone(Volume("a", img, lab), np.random.default_rng(1))
    les = lab > 0
    assert np.array_equal(clone.image[:, ~les], img[:, ~les])
    assert np.array_equal(clone.label, lab) and clone.image.dtype == img.dtype
    changed = clone.image[:, les] != img[:, les]
    assert changed.mean() > 0.9
    for c in range(3):  # redrawn from the lesion's own mean and SD
        assert abs(float(clone.image[c][les].astype(np.float32).mean()) - float(img[c][les].astype(np.float32).mean())) < 0.5


def test_error_map_sampling_weights():
    from strokeseg_training.recipes.paper000_deepmedic import error_sampling_weights

    truth = np.zeros((4, 6, 6), np.uint8)
    truth[1:3, 2:4, 2:4] = 1
    prob = truth.astype(np.float32) * 0.9 + 0.05
    prob[0, 0, 0] = 0.95  # a confident false positive
    prob[1, 2, 2] = 0.1  # a missed lesion voxel
    w = error_sampling_weights(prob, truth, floor=0.1)
    assert w.min() == pytest.approx(0.1, abs=1e-6)
    assert w[0, 0, 0] > w[3, 5, 5] and w[1, 2, 2] > w[2, 3, 3]
    assert w[0, 0, 0] == w.max()
    flat = error_sampling_weights(np.full((2, 3, 3), 0.5, np.float32), np.zeros((2, 3, 3)), floor=0.1)
    assert np.allclose(flat, 0.1)  # equal error everywhere: uniform sampling


def test_weighted_sampler_follows_weights():
    from strokeseg_training.data import Volume
    from strokeseg_training.sampling import WeightedPatchSampler

    img = np.ones((1, 10, 10, 10), np.float16)
    img[:, :, :, :2] = 0  # background column outside the head
    lab = np.zeros((10, 10, 10), np.uint8)
    w = np.zeros((10, 10, 10), np.float32)
    w[5, 5, 8] = 1.0  # all background weight on one voxel
    s = WeightedPatchSampler([Volume("v", img, lab)], (3, 3, 3), 0.5, np.random.default_rng(0), weights=[w],
                             flip_lr=0.0, shift_sd=0.0, scale_sd=0.0)
    for _ in range(5):
        x, y = s.sample()
        assert x.shape == (1, 3, 3, 3) and y.shape == (1, 3, 3, 3)
        assert x[0, 1, 1, 1] == 1.0 and x[0].min() == 1.0  # always the patch around (5, 5, 8)


def test_tht0_tht1_on_a_hand_made_curve():
    from strokeseg_training.evaluate import curve_threshold

    # 3 lesion voxels (0.9, 0.9, 0.3), 3 distractors at 0.5 and 100 easy negatives at 0.01.
    p = np.array([0.9, 0.9, 0.3] + [0.5] * 3 + [0.01] * 100, np.float32)
    t = np.array([1, 1, 1] + [0] * 103)
    # PR: t in (0.5, 0.9] gives precision 1, recall 2/3 (product 0.667) > t in (0.01, 0.3]: 0.5 x 1.
    assert curve_threshold([(p, t)], "tht0") == pytest.approx(0.5001)
    # ROC: t in (0.01, 0.3] gives TPR 1 - FPR 3/103 = 0.971 > 2/3.
    assert curve_threshold([(p, t)], "tht1") == pytest.approx(0.0101)
    # pooled over cases exactly as one concatenated case
    assert curve_threshold([(p[:50], t[:50]), (p[50:], t[50:])], "tht0") == pytest.approx(0.5001)


def test_curve_thresholds_agree_with_scikit_learn():
    sklearn = pytest.importorskip("sklearn.metrics")
    from strokeseg_training.evaluate import curve_threshold

    rng = np.random.default_rng(3)
    t = rng.random(3000) < 0.1
    p = np.clip(np.round(rng.normal(0.3 + 0.35 * t, 0.15), 3), 0.001, 0.999).astype(np.float32)
    pr, rc, th = sklearn.precision_recall_curve(t, p)
    best_pr = float(np.max(pr[:-1] * rc[:-1]))
    fpr, tpr, _ = sklearn.roc_curve(t, p)
    best_j = float(np.max(tpr - fpr))
    for rule, best in (("tht0", best_pr), ("tht1", best_j)):
        thr = curve_threshold([(p, t)], rule)
        pred = p >= thr
        tp, fp = int((pred & t).sum()), int((pred & ~t).sum())
        value = (tp / max(tp + fp, 1)) * (tp / t.sum()) if rule == "tht0" else tp / t.sum() - fp / (~t).sum()
        assert value == pytest.approx(best, abs=1e-9)


def test_tune_closing_iterations_and_threshold_rules():
    from strokeseg_training.evaluate import CaseProbability, tune

    truth = np.zeros((10, 20, 20), bool)
    truth[3:7, 5:15, 5:15] = True
    prob = np.where(truth, 0.8, 0.05).astype(np.float32)
    prob[4:6, 9:11, 9:11] = 0.3  # a hole inside the lesion that closing / filling repairs
    case = CaseProbability("c", Image(prob, (1.0, 1.0, 1.0)), truth)
    best, table = tune([case], {"threshold": ["tht0", 0.5], "closing_iterations": [0, 1], "closing_ball_voxels": 3,
                                "closing_voxel_mm": 1.0, "min_lesion_ml": [0.0]}, "dice")
    assert {row["closing_mm"] for row in table} == {0.0, 3.0}
    assert {row.get("threshold_rule") for row in table} == {"tht0", None}
    rule_rows = [r for r in table if r.get("threshold_rule") == "tht0"]
    assert all(0.05 < r["threshold"] <= 0.3 for r in rule_rows)  # the hole's voxels are lesion: PR optimum keeps them
    assert best is not None and max(r["objective"] for r in table) == pytest.approx(1.0)


# -- paper 001 ---------------------------------------------------------------------------------


def test_dsc_hd_score():
    from strokeseg_training.evaluate import dsc_hd_score, objective

    assert dsc_hd_score(0.8, 0.0, 10.0) == pytest.approx(0.8 / 1.8)
    assert dsc_hd_score(0.8, 5.0, 10.0) == pytest.approx(0.8 * 0.5 / 1.3)
    assert dsc_hd_score(0.0, 0.0, 10.0) == 0.0
    assert dsc_hd_score(0.9, 25.0, 10.0) == 0.0  # beyond HDmax counts as HDmax
    rows_a = [{"dice": 0.7, "hd95_mm": 4.0}, {"dice": 0.7, "hd95_mm": float("nan")}]  # NaN HD = HDmax
    assert objective(rows_a, "dsc-hd-score", hd_max=10.0) == pytest.approx(dsc_hd_score(0.7, 7.0, 10.0))
    with pytest.raises(ValueError):
        objective(rows_a, "no-such-objective")


def test_mirror_channel_geometry():
    """A blob left of an off-centre head appears, in the mirror channel, right of the head's own
    mid-plane (registration), not mirrored about the box centre (a plain flip)."""
    from strokeseg.derived import derive_channels

    shape = (16, 32, 40)
    z, y, x = np.indices(shape)
    cx = 17.0  # head centre: 2.5 voxels left of the box centre (19.5)
    head = ((z - 8) / 6.5) ** 2 + ((y - 16) / 12) ** 2 + ((x - cx) / 11) ** 2 <= 1
    img = head * (1.0 + 0.3 * np.sin(y / 3.0)) + 0.0
    img = img.astype(np.float32)
    img[7:10, 14:18, 9:12] = 3.0  # blob centred at x = 10, i.e. 7 voxels left of the head centre
    grid = Image(np.zeros(shape, np.float32), (2.0, 2.0, 3.0))
    out = derive_channels({"dwi": img}, grid, [{"kind": "mirror", "of": "dwi"}])
    assert list(out) == ["dwi_mirror"]
    m = out["dwi_mirror"]
    assert m.shape == img.shape
    bright = np.argwhere(m > 2.0)
    assert len(bright)
    assert abs(bright[:, 2].mean() - (2 * cx - 10)) < 1.0  # mirrored about the head: x = 24
    plain = derive_channels({"dwi": img}, grid, [{"kind": "mirror", "of": "dwi", "register": "none"}])["dwi_mirror"]
    assert abs(np.argwhere(plain > 2.0)[:, 2].mean() - (shape[2] - 1 - 10)) < 0.01  # box flip: x = 29


def test_prepare_appends_mirror_channels(tmp_path):
    from strokeseg.models import ModelCard
    from strokeseg.preprocess import prepare

    make_case(tmp_path / "c", ["dwi", "adc"], seed=1)
    cfg = json.loads((CONFIGS / "paper001_asymunet.json").read_text(encoding="utf-8"))
    card = ModelCard(raw={**cfg["card"], "weights": []}, folder=tmp_path)
    images = {k: read_image(tmp_path / "c" / f"{k}.nii.gz") for k in ("dwi", "adc")}
    prepared = prepare(images, card)
    assert prepared.channels == ("dwi", "adc", "dwi_mirror", "adc_mirror")
    assert prepared.array.shape[0] == 4 == cfg["card"]["network"]["args"]["in_channels"]


def test_balanced_patches_contain_their_lesion_voxel():
    from strokeseg_training.data import Volume
    from strokeseg_training.sampling import BalancedPatchSet

    img = np.zeros((1, 20, 30, 30), np.float16)
    img[:, 2:18, 3:27, 3:27] = 1
    lab = np.zeros((20, 30, 30), np.uint8)
    lab[9:11, 14:16, 14:16] = 1
    ps = BalancedPatchSet([Volume("v", img, lab)], (8, 12, 12), 40, np.random.default_rng(0))
    assert len(ps) == 40
    has_lesion = ps.labels.reshape(40, -1).max(1) > 0
    assert has_lesion.sum() >= 20  # half centred near lesion voxels (offset <= half a patch keeps them in)


# -- paper 002 ---------------------------------------------------------------------------------


def test_bayes_fusion_and_muscle_refinement():
    from strokeseg.networks_zoo.muscle import EDDMuscle, bayes_fuse, muscle_refine
    from strokeseg_training.recipes.paper002_edd_muscle import neutral_muscle

    assert bayes_fuse(0.7, 0.5) == pytest.approx(0.7)
    assert bayes_fuse(0.7, 0.9) > 0.7 > bayes_fuse(0.7, 0.1)
    assert bayes_fuse(0.6, 0.8) == pytest.approx(0.6 * 0.8 / (0.6 * 0.8 + 0.4 * 0.2))
    model = EDDMuscle(edd={"in_channels": 1, "channels": [4, 8], "refine_channels": [4]},
                      muscle={"scales": [8, 16], "patch_size": 8, "channels": [4, 4], "fc_channels": [8]})
    neutral_muscle(model)
    prob = np.zeros((1, 32, 32), np.float32)
    prob[0, 4:7, 4:7] = 0.8  # a small candidate (9 px)
    prob[0, 12:24, 12:24] = 0.9  # a large lesion (144 px), never re-evaluated
    img = np.random.default_rng(0).normal(0, 1, prob.shape).astype(np.float32)
    assert np.allclose(muscle_refine(prob, img, model.muscle, max_pixels=60), prob, atol=1e-6)  # q = 0.5: unchanged
    with torch.no_grad():
        model.muscle.classifier[-1].bias.copy_(torch.tensor([6.0, -6.0]))  # q ~ 0: "false positive"
    out = muscle_refine(prob, img, model.muscle, max_pixels=60)
    assert out[0, 5, 5] < 0.05 and np.allclose(out[0, 12:24, 12:24], 0.9)


def test_muscle_training_needs_both_classes():
    from strokeseg.networks_zoo.muscle import EDDMuscle
    from strokeseg_training.recipes.paper002_edd_muscle import train_muscle

    model = EDDMuscle(edd={"in_channels": 1, "channels": [4, 8], "refine_channels": [4]},
                      muscle={"scales": [8, 16], "patch_size": 8, "channels": [4, 4], "fc_channels": [8]})
    x = torch.randn(6, 3, 8, 8)
    rng = np.random.default_rng(0)
    one_class = train_muscle(model, x, torch.zeros(6, dtype=torch.long), {"steps": 2, "batch_size": 4}, rng, torch.device("cpu"))
    assert one_class["trained"] is False
    both = train_muscle(model, x, torch.tensor([0, 1, 0, 1, 0, 1]), {"steps": 2, "batch_size": 4}, rng, torch.device("cpu"))
    assert both["trained"] is True and both["true_positive"] == 3


def test_slice_patches_hold_lesion_pixels():
    from strokeseg_training.data import Volume
    from strokeseg_training.sampling import SlicePatchSampler

    img = np.ones((1, 4, 40, 40), np.float16)
    lab = np.zeros((4, 40, 40), np.uint8)
    lab[2, 20:23, 20:23] = 1
    s = SlicePatchSampler([Volume("v", img, lab)], (16, 16), np.random.default_rng(0), random_fraction=0.0,
                          rotate_deg=0.0, flip=0.0)
    x, y = s.batch(10)
    assert x.shape == (10, 1, 16, 16) and y.shape == (10, 1, 16, 16)
    assert bool((y.flatten(1).max(1).values > 0).all())


# -- tiny end-to-end runs ----------------------------------------------------------------------


def tiny_deepmedic(tmp_path: Path, finetune: dict) -> tuple[Path, Path]:
    """(data root, config) of a tiny paper 000 run on fabricated MTT/CBF/ADC cases."""
    root = make_dataset(tmp_path / "data", ["mtt", "cbf", "adc"])
    config = tiny_config(tmp_path, "paper000_deepmedic.json", root, card={
        "target_spacing": [4.0, 4.0, 4.0], "patch_size": [9, 9, 9],
        "network": {"name": "strokeseg.DeepMedic", "args": {"in_channels": 3, "out_channels": 2,
                    "channels": [4, 4, 4, 4, 4, 4, 6, 6], "fc_channels": [8, 12], "dropout": 0.1}},
        "inference": {"overlap": 0.25, "blend": "gaussian", "sw_batch_size": 1, "mirror_tta": False, "roi_size": [16, 16, 16]},
    }, train={"steps": 4, "batch_size": 2, "val_every": 2, "val_volumes": 1, "max_minutes": 2, "finetune": finetune})
    return root, config


def test_paper000_end_to_end(tmp_path):
    root, config = tiny_deepmedic(tmp_path, {"steps": 2, "val_every": 2, "freeze_layers": 8})
    cfg = run_all(config)
    run = Path(cfg["run_dir"])
    summary = json.loads((run / "train_summary.json").read_text(encoding="utf-8"))
    assert summary["n_clones"] >= 1 and summary["finetune"]["steps_done"] == 2
    assert (run / "curves.png").is_file() and (run / "curves_finetune.png").is_file()
    tuning = json.loads((run / "tuning.json").read_text(encoding="utf-8"))
    assert {r.get("threshold_rule") for r in tuning["table"]} == {"tht0", "tht1"}
    # The paper's post-processing ablation: every tuned setting scored on the test split, and the
    # validation-chosen one agreeing with the evaluation itself.
    ablation = json.loads((run / "test" / "postprocess_ablation.json").read_text(encoding="utf-8"))
    assert len(ablation) == len(tuning["table"])
    best = tuning["best"]
    chosen = [r for r in ablation if all(r[k] == best[k] for k in ("threshold", "closing_mm", "min_lesion_ml"))]
    test_summary = json.loads((run / "test" / "summary.json").read_text(encoding="utf-8"))
    assert chosen and chosen[0]["test"]["dice_median"] == pytest.approx(test_summary["metrics"]["dice"]["median"])
    assert "(chosen)" in (run / "test" / "postprocess_ablation.md").read_text(encoding="utf-8")
    segment_with_export(tmp_path, cfg, root / "case00")


def test_paper000_resumes_after_stage_1(tmp_path, capsys, monkeypatch):
    """A run that dies in the fine-tune before its first checkpoint restarts at the fine-tune, as
    the uninterrupted run went on (same weights, same fine-tuning losses), from the cached
    stage-1 predictions (not predicted again); changing a stage-1 setting, or --no-resume,
    trains stage 1 again."""
    from strokeseg_training.cli import main
    from strokeseg_training.recipes import paper000_deepmedic

    _root, config = tiny_deepmedic(tmp_path, {"steps": 3, "val_every": 1, "freeze_layers": 6})
    run = tmp_path / "run"
    assert main(["train", "--config", str(config)]) == 0
    first = ((run / "best.safetensors").read_bytes(), (run / "log_finetune.csv").read_text(encoding="utf-8"))
    (run / "log_finetune.ckpt").unlink()
    (run / "log_finetune.csv").unlink()
    capsys.readouterr()

    assert (run / paper000_deepmedic.ERROR_MAPS).is_file()
    real_predict = paper000_deepmedic.predict
    monkeypatch.setattr(paper000_deepmedic, "predict", None)  # the error maps come from the cache
    assert main(["train", "--config", str(config)]) == 0
    monkeypatch.setattr(paper000_deepmedic, "predict", real_predict)
    out = capsys.readouterr().out
    assert "DeepMedic: resuming at step 4 of 4 (finished)" in out and "fine-tuning: resuming" not in out
    losses = lambda text: [line.split(",")[:4] for line in text.splitlines()]  # noqa: E731 (not the times)
    assert losses((run / "log_finetune.csv").read_text(encoding="utf-8")) == losses(first[1])
    assert (run / "best.safetensors").read_bytes() == first[0]

    assert main(["train", "--config", str(config), "--set", "train.lr=0.002"]) == 0
    assert "resuming" not in capsys.readouterr().out
    assert main(["train", "--config", str(config), "--no-resume"]) == 0
    assert "resuming" not in capsys.readouterr().out


def test_paper000_new_fine_tune_starts_from_stage_1_weights(tmp_path, monkeypatch):
    """A fine-tune that improved replaces best.safetensors; a later fine-tune with other settings
    (same stage 1) still starts from stage 1's best, not from the earlier fine-tune's."""
    import itertools

    from strokeseg_training.cli import main
    from strokeseg_training.recipes import paper000_deepmedic

    scores = itertools.count(1)
    monkeypatch.setattr(paper000_deepmedic, "validate", lambda *a, **k: float(next(scores)))  # every round improves
    seen = []
    real = paper000_deepmedic.stage1_probabilities

    def spy(path, stage1, net, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        return real(path, stage1, net, *args, **kwargs)

    monkeypatch.setattr(paper000_deepmedic, "stage1_probabilities", spy)
    _root, config = tiny_deepmedic(tmp_path, {"steps": 2, "val_every": 1, "freeze_layers": 6})
    assert main(["train", "--config", str(config)]) == 0
    from safetensors.torch import load_file

    fine_tuned = load_file(str(tmp_path / "run" / "best.safetensors"))
    assert any(not torch.equal(fine_tuned[k], seen[0][k]) for k in seen[0])  # the fine-tune's weights won
    assert main(["train", "--config", str(config), "--set", "train.finetune.lr=0.002"]) == 0
    assert len(seen) == 2 and all(torch.equal(seen[0][k], seen[1][k]) for k in seen[0])


def test_paper000_fine_tunes_earlier_weights(tmp_path, capsys):
    """train.init_weights + train.steps 0: stage 1 only scores the given weights (once, also
    when run again), then E2 fine-tunes them."""
    import shutil

    from strokeseg_training.cli import main

    _root, config = tiny_deepmedic(tmp_path, {"steps": 2, "val_every": 2, "freeze_layers": 8})
    assert main(["train", "--config", str(config), "--set", "train.finetune.steps=0"]) == 0
    shutil.copyfile(tmp_path / "run" / "best.safetensors", tmp_path / "stage1.safetensors")
    e2 = ["--set", f"train.init_weights={tmp_path / 'stage1.safetensors'}", "--set", "train.steps=0",
          "--set", f"run_dir={tmp_path / 'e2'}"]
    assert main(["train", "--config", str(config), *e2]) == 0
    log = (tmp_path / "e2" / "log.csv").read_text(encoding="utf-8").splitlines()
    assert len(log) == 2 and log[1].startswith("0,nan,")
    first = json.loads((tmp_path / "run" / "train_summary.json").read_text(encoding="utf-8"))
    summary = json.loads((tmp_path / "e2" / "train_summary.json").read_text(encoding="utf-8"))
    assert summary["stage1"]["best_val"] == pytest.approx(first["best_val_dice"])  # the same weights, scored again
    assert summary["finetune"]["steps_done"] == 2
    capsys.readouterr()
    assert main(["train", "--config", str(config), *e2]) == 0
    assert "DeepMedic: resuming at step 0 of 0 (finished)" in capsys.readouterr().out


def test_paper001_end_to_end(tmp_path):
    root = make_dataset(tmp_path / "data", ["dwi", "adc"])
    config = tiny_config(tmp_path, "paper001_asymunet.json", root, card={
        "target_spacing": [4.0, 4.0, 4.0], "patch_size": [8, 8, 8],
        "network": {"name": "strokeseg.AsymResUNet", "args": {"in_channels": 4, "out_channels": 2, "base_channels": 4,
                    "levels": 2, "spatial_dims": 3}},
        "inference": {"overlap": [0.5, 0.5, 0.5], "blend": "constant", "sw_batch_size": 4, "mirror_tta": False},
    }, train={"patches_per_case": 8, "val_patches_per_case": 4, "batch_size": 4, "max_epochs": 2, "patience": 8},
        tune={"objective": "dsc-hd-score", "grid": {"threshold": [0.3, 0.5], "closing_mm": [0.0], "min_lesion_ml": [0.0, 0.1]}})
    cfg = run_all(config)
    run = Path(cfg["run_dir"])
    assert json.loads((run / "train_summary.json").read_text(encoding="utf-8"))["train_patches"] == 16
    card = json.loads((tmp_path / "models" / "paper001_asymunet" / "card.json").read_text(encoding="utf-8"))
    assert card["derived_channels"][0]["kind"] == "mirror"
    segment_with_export(tmp_path, cfg, root / "case00")
    _rerun_resumes(config, run, "AsymResUNet", "best.safetensors")


def _rerun_resumes(config: Path, run: Path, desc: str, weights: str, *overrides: str) -> None:
    """Training a finished run again (with ``overrides`` outside the resumed loop's key) trains
    nothing: the loop resumes finished and its best weights come back unchanged."""
    import contextlib
    import io

    from strokeseg_training.cli import main

    before = (run / weights).read_bytes()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["train", "--config", str(config), *(a for o in overrides for a in ("--set", o))]) == 0
    assert f"{desc}: resuming at step" in printed.getvalue() and "(finished)" in printed.getvalue()
    assert (run / weights).read_bytes() == before


def test_paper002_end_to_end(tmp_path):
    root = make_dataset(tmp_path / "data", ["dwi"])
    inner = {"edd": {"in_channels": 1, "out_channels": 2, "n_nets": 2, "channels": [4, 8], "convs_per_stack": 1,
                     "refine_channels": [4]},
             "muscle": {"scales": [8, 16], "patch_size": 8, "channels": [4, 4], "pool_after": 1, "fc_channels": [8]},
             "threshold": 0.5, "max_pixels": 60, "prior": 0.5, "image_channel": 0}
    config = tiny_config(tmp_path, "paper002_edd_muscle.json", root, card={
        "target_spacing": [3.0, 3.0, 4.0], "patch_size": [16, 16, 1],
        "network": {"name": "strokeseg.SliceWise", "args": {"inner": {"name": "strokeseg.EDDMuscle", "args": inner}}},
        "inference": {"overlap": 0.25, "blend": "constant", "sw_batch_size": 4, "mirror_tta": False, "roi_size": [32, 32, 1]},
    }, train={"steps": 4, "batch_size": 4, "val_every": 2, "val_volumes": 1, "muscle": {"steps": 3, "batch_size": 4}})
    cfg = run_all(config)
    run = Path(cfg["run_dir"])
    summary = json.loads((run / "train_summary.json").read_text(encoding="utf-8"))
    assert set(summary["validation_detection"]) == {"edd", "edd_muscle"}
    assert "m_fp" in summary["validation_detection"]["edd"]
    test_summary = json.loads((run / "test" / "summary.json").read_text(encoding="utf-8"))
    assert "m_fp" in test_summary["detection"] and "subject_detection_rate" in test_summary["detection"]
    segment_with_export(tmp_path, cfg, root / "case00")
    _rerun_resumes(config, run, "EDD Net", "edd_best.safetensors", "train.muscle.steps=2")  # MUSCLE is not in the EDD's key


# -- the comparison tables of training/README.md ------------------------------------------------

# (paper recipe's config, the bundled model's config) that share a comparison table: the held-out
# phantoms are the seeds data.seed + the test offset, so equal modality, seed, test count and lesion
# library mean the same cases.
COMPARED = [("paper000_deepmedic.json", "mrp_unet.json"), ("paper001_asymunet.json", "dwi_unet.json"),
            ("paper002_edd_muscle.json", "dwi_unet.json"), ("paper003_t1_cnn.json", "t1_unet.json")]


def _held_out(name: str) -> tuple:
    data = json.loads((CONFIGS / name).read_text(encoding="utf-8"))["data"]
    if data.get("phantom"):  # a recipe writing its own phantoms (paper 004)
        p = data["phantom"]
        return p["modality"], p["seed"], p["test_count"], p["lesion_library"]
    return data["modality"], data["seed"], data["n_test"], data["lesion_library"]


@pytest.mark.parametrize("paper, bundled", COMPARED + [("paper004_ctp_gan.json", "ctp_unet.json")])
def test_compared_recipes_meet_the_same_held_out_phantoms(paper, bundled):
    assert _held_out(paper) == _held_out(bundled)


def test_ablation_reuses_the_chosen_settings_scores(monkeypatch):
    """evaluate scores the chosen post-processing once: the ablation takes its rows as given and
    scores only the other settings of the tuning table."""
    from strokeseg.image import Image
    from strokeseg.postprocess import PostprocessSettings
    from strokeseg_training import evaluate

    prob = np.zeros((8, 16, 16), np.float32)
    prob[3:6, 4:10, 4:10] = 0.8
    truth = prob > 0.5
    cases = [evaluate.CaseProbability("c0", Image(prob, (1.0, 1.0, 2.0)), truth)]
    table = [{"threshold": t, "closing_mm": 0.0, "min_lesion_ml": 0.0, "mean_dice": 1.0} for t in (0.5, 0.9)]
    chosen = PostprocessSettings(threshold=0.5)
    rows = evaluate.score(cases, chosen)
    scored = []
    real_score = evaluate.score
    monkeypatch.setattr(evaluate, "score", lambda c, s: scored.append(s.threshold) or real_score(c, s))
    out = evaluate.ablate_postprocess(cases, table, scored=(chosen, rows))
    assert scored == [0.9]
    assert [r["test"]["dice_median"] for r in out] == [pytest.approx(1.0), pytest.approx(0.0)]
