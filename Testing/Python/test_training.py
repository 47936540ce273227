"""A tiny CPU smoke run of the DWI recipe: generate -> train -> tune -> evaluate -> export -> segment.

Everything is real (phantoms, gradient steps, grid search, metrics, safetensors export, card
validation); only the sizes are small.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from strokeseg.models import get_card, load_registry
from strokeseg.phantom import simulate_dwi
from strokeseg.pipeline import segment_images
from strokeseg_training.cli import main as train_main
from strokeseg_training.config import load_config
from strokeseg_training.export import BUNDLED_MODELS, export_target

CONFIG = Path(__file__).resolve().parents[2] / "training" / "configs" / "dwi_unet.json"


def test_dwi_recipe_end_to_end_smoke(tmp_path, capsys):
    models = tmp_path / "models"
    overrides = [
        f"run_dir={tmp_path / 'run'}", f"models_dir={models}",
        f"data.cache_dir={tmp_path / 'cache'}", "data.lesion_library=null", "data.workers=1",
        "data.n_train=2", "data.n_val=1", "data.n_test=1",
        "train.steps=4", "train.val_every=2", "train.val_volumes=1", "train.batch_size=1", "train.warmup=1",
        "card.network.args.channels=[4,8,8,8]", "card.patch_size=[48,48,16]",
        'tune.grid={"threshold":[0.4,0.6],"closing_mm":[0.0,2.0],"min_lesion_ml":[0.0]}',
    ]
    args = ["all", "--config", str(CONFIG)] + [a for o in overrides for a in ("--set", o)]
    assert train_main(args) == 0

    run = tmp_path / "run"
    log = (run / "log.csv").read_text(encoding="utf-8").splitlines()
    assert log[0].startswith("step,loss") and len(log) >= 2
    assert (run / "curves.png").stat().st_size > 5000
    tuning = json.loads((run / "tuning.json").read_text(encoding="utf-8"))
    assert len(tuning["table"]) == 4 and tuning["best"]["threshold"] in (0.4, 0.6)
    assert (run / "test" / "summary.json").is_file() and (run / "test" / "bland_altman.png").is_file()

    # Resumed with more steps but no time left, it stops at its validated step 4 instead of
    # training step 5 and validating again.
    before = (run / "log.csv").read_text(encoding="utf-8")
    more = [a for o in overrides + ["train.steps=8", "train.max_minutes=0"] for a in ("--set", o)]
    assert train_main(["train", "--config", str(CONFIG)] + more) == 0
    assert (run / "log.csv").read_text(encoding="utf-8") == before
    assert json.loads((run / "train_summary.json").read_text(encoding="utf-8"))["steps_done"] == 4
    assert "resuming at step 4 of 8" in capsys.readouterr().out
    # Other settings are not a silent continuation of the old run: it trains again from step 1.
    assert train_main(["train", "--config", str(CONFIG)] + more + ["--set", "train.lr=0.001"]) == 0
    assert "written for other settings" in capsys.readouterr().out

    # The export is a valid, loadable model that the engine runs through its card alone.
    (card,) = load_registry(models)
    assert card.id == "dwi-unet" and card.training["command"].startswith("strokeseg-train all")
    assert card.postprocess == tuning["best"]
    assert card.validation["n_cases"] == 1
    case = simulate_dwi(3, lesion_library=None)
    res = segment_images({"dwi": case.images["dwi"], "b0": case.images["b0"]}, model=get_card("dwi-unet", models),
                         device="cpu")
    assert res.mask.same_grid(case.images["dwi"]) and np.isfinite(res.probability.array).all()

    # The run was since retrained with other settings: its weights may not replace the exported
    # ones under the same id and version (nothing is written); a new version exports, and
    # exporting the same weights again is harmless.
    card_before = (models / "dwi_unet" / "card.json").read_bytes()
    export_args = ["export", "--config", str(CONFIG)] + [a for o in overrides for a in ("--set", o)]
    assert train_main(export_args) == 2
    assert "already holds dwi-unet 1.0.0 with other weights" in capsys.readouterr().err
    assert (models / "dwi_unet" / "card.json").read_bytes() == card_before
    for _ in range(2):
        assert train_main(export_args + ["--set", "card.version=1.0.1"]) == 0
    assert get_card("dwi-unet", models).version == "1.0.1"

    # fit: the model on its own training cases (simulated again as case folders) beside validation.
    fit_args = ["fit", "--config", str(CONFIG), "--count", "2"] + [a for o in overrides for a in ("--set", o)]
    assert train_main(fit_args) == 0
    fit = json.loads((run / "fit.json").read_text(encoding="utf-8"))
    assert fit["train"]["n"] == 2 and fit["val"]["n"] == 1
    assert fit["gap_mean_dice"] == pytest.approx(fit["train"]["mean"] - fit["val"]["mean"])
    folders = sorted((tmp_path / "cache").glob("dwi-train-*/cases/*/case.json"))
    assert len(folders) == 2 and "training cases minus validation" in capsys.readouterr().out


def test_a_variant_run_is_not_exported_into_the_bundled_models(tmp_path, capsys):
    """An ablation (its name set with --set) that ends in export is refused before it trains,
    unless it exports elsewhere."""
    args = ["all", "--config", str(CONFIG), "--set", "name=dwi-variant", "--set", f"run_dir={tmp_path / 'run'}"]
    assert train_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "variant" in err and "models_dir" in err
    assert not (tmp_path / "run").exists()
    assert export_target(load_config(CONFIG, ["name=dwi-variant", f"models_dir={tmp_path}"])) == tmp_path
    assert export_target(load_config(CONFIG, ["train.max_minutes=100000"])) == BUNDLED_MODELS


def test_export_keeps_the_stage_records_of_runs_that_are_gone(tmp_path, monkeypatch):
    """A later stage trained on a machine without the earlier stages' run folders takes their
    records from the card it replaces; a stage whose run is here reads its own summary."""
    import strokeseg_training.config as config
    from strokeseg_training.export import stage_records

    monkeypatch.setattr(config, "DEFAULT_RUNS", tmp_path / "runs")
    stage10 = CONFIG.parent / "t1_unet_stage10_data.json"
    cfg = load_config(stage10, [f"models_dir={tmp_path / 'models'}"])
    bundled = json.loads((BUNDLED_MODELS / "t1_unet" / "card.json").read_text(encoding="utf-8"))
    (tmp_path / "models" / "t1_unet").mkdir(parents=True)
    (tmp_path / "models" / "t1_unet" / "card.json").write_text(json.dumps(bundled), encoding="utf-8")
    stage2 = load_config(CONFIG.parent / "t1_unet_stage2.json")
    for c, steps in ((cfg, 123), (stage2, 45)):
        (tmp_path / "runs" / c["name"]).mkdir(parents=True)
        (tmp_path / "runs" / c["name"] / "train_summary.json").write_text(
            json.dumps({"steps_done": steps, "duration_s": 6.0, "device": "cuda"}), encoding="utf-8")

    command, records = stage_records(cfg, "strokeseg-train all --config stage10")
    by_config = {r["config"]: r for r in bundled["training"]["stages"]}
    assert [r["config"] for r in records] == cfg["earlier_stages"] + ["training/configs/t1_unet_stage10_data.json"]
    assert records[0] == by_config["training/configs/t1_unet.json"] and records[0]["steps"] > 0
    assert records[1] == {"config": "training/configs/t1_unet_stage2.json", "steps": 45, "duration_s": 6.0, "device": "cuda"}
    assert records[-2] == by_config["training/configs/t1_unet_stage9_data.json"]
    assert records[-1]["steps"] == 123 and command.endswith("&& strokeseg-train all --config stage10")


def test_data_key_follows_the_cases_only():
    """Editing a description or generating with fewer processes reuses a dataset cache; a seed,
    a split, its own count or the model grid does not (another split's count does not either)."""
    from strokeseg_training.config import data_key

    cfg = load_config(CONFIG)
    key = data_key(cfg, "train")
    assert data_key(load_config(CONFIG, ["data.description=edited", "data.workers=1"]), "train") == key
    assert data_key(load_config(CONFIG, ["data.seed=12345"]), "train") != key
    assert data_key(cfg, "val") != key
    assert data_key(load_config(CONFIG, ["data.n_train=1000"]), "train") != key
    assert data_key(load_config(CONFIG, ["data.n_train=1000"]), "val") == data_key(cfg, "val")
    assert data_key(load_config(CONFIG, ["card.target_spacing=[3.0,3.0,3.0]"]), "train") != key


def test_every_config_names_its_own_model_version():
    """Export refuses other weights under a card id and version it already holds, so no two
    configs may share one (experiments that were not shipped carry a pre-release tag)."""
    import json

    seen: dict[tuple[str, str], str] = {}
    for path in sorted((Path(CONFIG).parent).glob("*.json")):
        card = json.loads(path.read_text(encoding="utf-8"))["card"]
        key = (card["id"], card["version"])
        assert key not in seen, f"{path.name} and {seen.get(key)} both export {key}"
        seen[key] = path.name
    assert len(seen) >= 20


def test_settings_key_follows_what_the_weights_learn():
    """A new card version (to export under it), name or description resumes the finished run;
    the card's grid or patch, a training setting or the data does not."""
    from strokeseg_training.resume import settings_key

    key = settings_key(load_config(CONFIG))
    renamed = ["card.version=9.9.9", "card.name=renamed", "card.description=edited", "train.steps=99999"]
    assert settings_key(load_config(CONFIG, renamed)) == key
    for change in ("card.patch_size=[32,32,16]", "card.postprocess.threshold=0.3", "train.lr=0.5", "data.seed=12345"):
        assert settings_key(load_config(CONFIG, [change])) != key, change


def test_perfusion_phantom_caches_follow_the_maps_pipeline(monkeypatch):
    """Perfusion phantoms' inputs are the maps our pipeline computes: a change of one modality's
    defaults (its MAPS_VERSION) makes new caches for that modality only; DWI caches do not
    depend on it."""
    import strokeseg.perfusion.pipeline as pipeline
    from strokeseg_training.config import data_key

    ctp, mrp, dwi = (load_config(CONFIG.parent / name) for name in ("ctp_unet.json", "mrp_unet.json", "dwi_unet.json"))
    before = [data_key(c, "train") for c in (ctp, mrp, dwi)]
    monkeypatch.setitem(pipeline.MAPS_VERSION, "ct", pipeline.MAPS_VERSION["ct"] + "-next")
    assert [data_key(c, "train") != b for c, b in zip((ctp, mrp, dwi), before)] == [True, False, False]
    monkeypatch.setitem(pipeline.MAPS_VERSION, "mr", pipeline.MAPS_VERSION["mr"] + "-next")
    assert data_key(mrp, "train") != before[1] and data_key(dwi, "train") == before[2]


def test_config_overrides_parse_json():
    cfg = load_config(CONFIG, ["train.steps=7", "card.patch_size=[8,8,8]", "data.note=plain text"])
    assert cfg["train"]["steps"] == 7 and cfg["card"]["patch_size"] == [8, 8, 8] and cfg["data"]["note"] == "plain text"


def _bad_training_call(tmp_path: Path, problem: str) -> tuple[list[str], str]:
    """A strokeseg-train call that must fail up front, and a word its error line must hold."""
    cfg = json.loads(CONFIG.read_text(encoding="utf-8"))
    path = tmp_path / "cfg.json"
    base = ["train", "--config", str(path), "--set", f"run_dir={tmp_path / 'run'}"]
    if problem == "missing-file":
        return ["train", "--config", str(tmp_path / "nope.json")], "nope.json: no such config file"
    if problem == "broken-json":
        path.write_text(CONFIG.read_text(encoding="utf-8")[:300], encoding="utf-8")
        return base, "cfg.json: is not valid JSON"
    if problem == "binary":
        path.write_bytes(bytes(range(256)))
        return base, "cfg.json: is not a text"
    if problem == "missing-section":
        del cfg["train"]
    elif problem == "unknown-recipe":
        cfg["recipe"] = "paper999"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    if problem == "set-wrong-type":
        return base + ["--set", "train.steps=abc"], "train.steps holds a number"
    if problem == "set-no-equals":
        return base + ["--set", "train.steps"], "expected KEY=VALUE"
    if problem == "set-into-value":
        return base + ["--set", "train.steps.x=1"], "train.steps is not a section"
    if problem == "tune-before-train":
        return ["tune", *base[1:]], "best.safetensors: not found: run `strokeseg-train train`"
    return base, {"missing-section": "lacks train", "unknown-recipe": "unknown recipe 'paper999'"}[problem]


@pytest.mark.parametrize("problem", ["missing-file", "broken-json", "binary", "missing-section", "unknown-recipe",
                                     "set-wrong-type", "set-no-equals", "set-into-value", "tune-before-train"])
def test_training_cli_bad_input_is_one_line_exit_2(problem, tmp_path, capsys):
    args, word = _bad_training_call(tmp_path, problem)
    assert train_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("strokeseg-train: error: ") and word in err and "\n" not in err, err
    assert not (tmp_path / "run" / "log.csv").exists()


def test_overrides_keep_their_type_but_numbers_may_become_per_axis_lists():
    cfg = load_config(CONFIG, ["card.inference.overlap=[0.5,0.5,0.25]", "data.lesion_library=null", "train.lr=1e-3"])
    assert cfg["card"]["inference"]["overlap"] == [0.5, 0.5, 0.25] and cfg["data"]["lesion_library"] is None
    assert cfg["train"]["lr"] == 0.001


def test_perfusion_phantoms_the_engine_refuses_are_skipped_once_with_the_reason(tmp_path, monkeypatch):
    """A phantom series the perfusion pipeline refuses (here: too few frames) is no training case:
    no npz, no case folder, a marker with the engine's reason, and no second simulation."""
    from strokeseg_training import data

    cfg = load_config(Path(CONFIG).with_name("ctp_unet.json"), [
        f"data.cache_dir={tmp_path / 'cache'}", "data.lesion_library=null", "data.n_val=2",
        'data.phantom_options={"size":[32,32,4],"frames":4,"motion":false}'])
    files, cases = data.build_split(cfg, "val", workers=1)
    assert files == [] and not any(cases.iterdir())
    markers = sorted(cases.parent.joinpath("npz").glob(f"*{data.REFUSED_SUFFIX}"))
    assert len(markers) == 2 and "no perfusion maps" in markers[0].read_text(encoding="utf-8")
    monkeypatch.setattr(data, "_make_one", lambda args: pytest.fail("a refused seed was simulated again"))
    assert data.build_split(cfg, "val", workers=1)[0] == []


def test_hard_negative_patches_centre_on_lesion_mimics():
    """hard_negative_fraction: background patches go to the brightest first-channel voxels away
    from the lesion (a T2 shine-through on DWI), which random patches mostly miss."""
    from monai.transforms import Compose

    from strokeseg_training.data import Volume
    from strokeseg_training.sampling import PatchSampler

    img = np.zeros((2, 24, 64, 64), np.float32)
    lab = np.zeros((24, 64, 64), np.uint8)
    lab[2:6, 2:8, 2:8] = 1
    img[0, 2:6, 2:8, 2:8] = 5.0  # the lesion is bright too, but never a mimic
    img[0, 16:19, 50:53, 50:53] = 4.0  # the mimic: bright, far from the lesion
    vol = Volume("v", img, lab)

    def mimic_share(fraction: float) -> float:
        s = PatchSampler([vol], (8, 8, 8), 0.0, Compose([]), np.random.default_rng(1), hard_negative_fraction=fraction)
        hits = [float(s.sample()["image"][0].max()) == 4.0 for _ in range(200)]
        return float(np.mean(hits))

    assert mimic_share(1.0) == 1.0
    assert mimic_share(0.0) < 0.2


def test_dark_asymmetry_mimics_are_where_the_image_and_its_mirror_differ_inside_the_head():
    """hard_negative_kind=dark_asymmetry (T1): mimics are voxels darker than the mirror channel (a
    CSF space on one side only), inside the head and away from the lesion; not the head's outline."""
    from monai.transforms import Compose

    from strokeseg_training.data import Volume
    from strokeseg_training.sampling import PatchSampler

    img = np.full((2, 32, 64, 64), -3.0, np.float32)  # air
    img[:, 2:30, 6:58, 6:58] = 1.0  # the head
    img[1, 2:30, 6:58, 6:10] = -3.0  # its mirror is misaligned at the outline
    lab = np.zeros((32, 64, 64), np.uint8)
    lab[10:14, 14:20, 14:20] = 1
    img[0, 10:14, 14:20, 14:20] = -2.0  # the lesion: asymmetric, never a mimic
    img[0, 20:24, 40:44, 40:44] = -1.5  # the mimic: a dark space the mirror does not have
    img[0, 20:24, 20:24, 20:24] = 3.0  # brighter than the mirror: not a T1 mimic
    s = PatchSampler([Volume("v", img, lab)], (8, 8, 8), 0.0, Compose([]), np.random.default_rng(0),
                     hard_negative_fraction=1.0, hard_negative_quantile=99.0, hard_negative_kind="dark_asymmetry")
    (mimics,) = s.mimics
    assert len(mimics)
    assert (mimics.min(0) >= (20, 40, 40)).all() and (mimics.max(0) < (24, 44, 44)).all()
    with pytest.raises(ValueError, match="hard_negative_kind"):
        PatchSampler([Volume("v", img, lab)], (8, 8, 8), 0.0, Compose([]), np.random.default_rng(0),
                     hard_negative_fraction=1.0, hard_negative_kind="dark")
    with pytest.raises(ValueError, match="second channel"):
        PatchSampler([Volume("v", img[:1], lab)], (8, 8, 8), 0.0, Compose([]), np.random.default_rng(0),
                     hard_negative_fraction=1.0, hard_negative_kind="dark_asymmetry")


def test_fit_does_not_validate_twice_when_the_budget_runs_out_during_a_validation(tmp_path):
    """The paper recipes' loop: a validation that outlasts the budget ends the run there."""
    import time

    import torch

    from strokeseg_training.train import fit

    net = torch.nn.Conv3d(1, 1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    calls = []

    def slow_validation(_net):
        calls.append(1)
        time.sleep(2.5)  # longer than the whole budget
        return float(len(calls))

    res = fit(net, lambda: (torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 2)), torch.nn.functional.mse_loss, opt,
              steps=10, out=tmp_path, device=torch.device("cpu"), val_fn=slow_validation, val_every=2,
              max_minutes=2.0 / 60)
    assert len(calls) == 1 and res["steps_done"] == 2
    assert (tmp_path / "best.safetensors").is_file()


class _Stop(Exception):
    pass


def _fit_run(out, key, stop_at=None, steps=6):
    """A tiny fit whose batches and dropout come from the generators a resume must restore."""
    import numpy as np
    import torch

    from strokeseg_training.train import fit

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 1), torch.nn.Dropout(0.5), torch.nn.Conv3d(4, 1, 1))
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    drawn = []

    def next_batch():
        if stop_at is not None and len(drawn) == stop_at:
            raise _Stop  # the process dies between two steps
        drawn.append(1)
        x = torch.from_numpy(rng.normal(size=(2, 1, 3, 3, 3)).astype(np.float32))
        return x, 2 * x

    fixed = torch.linspace(-1, 1, 27).reshape(1, 1, 3, 3, 3)
    res = fit(net, next_batch, torch.nn.functional.mse_loss, opt, steps=steps, out=out, device=torch.device("cpu"),
              val_fn=lambda m: -float(torch.nn.functional.mse_loss(m(fixed), 2 * fixed)), val_every=2,
              resume_key=key, rng=rng)
    return res, len(drawn)


def test_fit_resumes_as_the_uninterrupted_run(tmp_path, capsys):
    """Killed after its step-4 checkpoint, a rerun redoes step 5 on: same losses, same best and
    last weights as a run never interrupted; a finished run is not trained again; other settings
    (another key) start afresh."""
    losses = lambda run: [ln.split(",")[:4] for ln in (run / "log.csv").read_text().splitlines()]  # noqa: E731
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir(), cut.mkdir()
    expected, _ = _fit_run(whole, "k")
    with pytest.raises(_Stop):
        _fit_run(cut, "k", stop_at=5)
    assert [r[0] for r in losses(cut)][-1] == "5"  # the step after the checkpoint is logged, then lost
    capsys.readouterr()
    res, drawn = _fit_run(cut, "k")
    assert "resuming at step 4 of 6" in capsys.readouterr().out and drawn == 2
    assert losses(cut) == losses(whole)
    assert (cut / "best.safetensors").read_bytes() == (whole / "best.safetensors").read_bytes()
    assert res["steps_done"] == 6 and res["best_val"] == expected["best_val"]

    (cut / "best.safetensors").unlink()  # what recipe_setup does before every run
    res, drawn = _fit_run(cut, "k")
    assert drawn == 0 and "(finished)" in capsys.readouterr().out
    assert (cut / "best.safetensors").read_bytes() == (whole / "best.safetensors").read_bytes()
    assert res["steps_done"] == 6 and res["best_val"] == expected["best_val"]
    res, drawn = _fit_run(cut, "k", steps=8)  # a longer run continues
    assert drawn == 2 and res["steps_done"] == 8
    _res, drawn = _fit_run(cut, "other settings")
    assert drawn == 6 and "written for other settings" in capsys.readouterr().out


def test_pos_weight_makes_missed_lesion_voxels_cost_more():
    import torch

    from strokeseg_training.train import make_loss

    target = torch.zeros(1, 1, 4, 4, 4)
    target[..., :2, :, :] = 1.0
    logits = torch.where(target > 0, torch.tensor(-1.0), torch.tensor(-3.0))  # lesion under-called
    plain, weighted = make_loss("dicece")(logits, target), make_loss("dicece", 3.0)(logits, target)
    assert weighted > plain
    over = torch.where(target > 0, torch.tensor(3.0), torch.tensor(1.0))  # background over-called: unchanged
    assert make_loss("dicece", 3.0)(over, target) == pytest.approx(float(make_loss("dicece")(over, target)), rel=0.2)
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("dice")


def test_training_interrupted_says_how_to_resume(monkeypatch, capsys):
    import strokeseg_training.cli as train_cli

    def interrupted(args, argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cli, "_run", interrupted)
    assert train_main(["train", "--config", str(CONFIG)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resumes from the last checkpoint" in err[0]
