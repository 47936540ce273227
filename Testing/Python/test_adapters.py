"""Dataset adapters on tiny fabricated copies of each real layout, layout discovery, k-fold
splits, real-data caching into the training format, and fold-ensemble weights for a card."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from strokeseg.errors import InputError, ModelError
from strokeseg.image import Image
from strokeseg.io import read_image, write_image
from strokeseg.modality import find_case_inputs
from strokeseg.models import ModelCard, build_network, load_model, save_weights
from strokeseg_training.adapters import ADAPTERS, discover, get_adapter
from strokeseg_training.config import card_of, load_config
from strokeseg_training.data import load_volumes
from strokeseg_training.folds import (Fold, fold_config, fold_ensemble_weights, fold_weight_files, holdout_split,
                                      kfold_splits, run_folds, summarise_folds, volume_strata)

CONFIG = Path(__file__).resolve().parents[2] / "training" / "configs" / "dwi_unet.json"


def _img(path: Path, value: float = 100.0, shape=(4, 8, 8), mask: bool = False) -> Path:
    """A tiny volume (4D when ``shape`` has 4 axes) written with the engine's writer."""
    rng = np.random.default_rng(len(str(path)))
    if mask:
        arr = np.zeros(shape, np.uint8)
        arr[1:3, 2:5, 2:5] = 1
    else:
        arr = (value + rng.normal(0, 1, shape)).astype(np.float32)
    write_image(Image(arr, (2.0, 2.0, 5.0)), path)
    return path


def _smir(case: Path, prefix: str, seq: str, uid: int, mask: bool = False, shape=(4, 8, 8)) -> None:
    name = f"{prefix}.Brain.XX.O.{seq}.{uid}"
    _img(case / name / f"{name}.nii", mask=mask, shape=shape)


# -- fabricated layouts ------------------------------------------------------------------
def make_isles22(root: Path, n: int = 3, rawdata: bool = False, unlabelled: int = 1) -> Path:
    raw = root / "rawdata" if rawdata else root
    (root / "dataset_description.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text('{"Name": "ISLES22", "BIDSVersion": "1.6.0"}')
    for i in range(1, n + 1):
        sub, ses = f"sub-strokecase{i:04d}", "ses-0001"
        s = raw / sub / ses
        _img(s / "dwi" / f"{sub}_{ses}_dwi.nii.gz")
        (s / "dwi" / f"{sub}_{ses}_dwi.json").write_text("{}")
        _img(s / "dwi" / f"{sub}_{ses}_adc.nii.gz")
        _img(s / "anat" / f"{sub}_{ses}_FLAIR.nii.gz")
        if i <= n - unlabelled:
            _img(root / "derivatives" / sub / ses / f"{sub}_{ses}_msk.nii.gz", mask=True)
    return root


def make_atlas2(root: Path) -> Path:
    space = "space-MNI152NLin2009aSym"
    for split, site, sub, labelled in (("Training", "R001", "sub-r001s001", True), ("Training", "R001", "sub-r001s002", True),
                                       ("Training", "R034", "sub-r034s010", True), ("Testing", "R009", "sub-r009s101", False)):
        anat = root / "ATLAS_2" / split / site / sub / "ses-1" / "anat"
        _img(anat / f"{sub}_ses-1_{space}_T1w.nii.gz")
        (anat / f"{sub}_ses-1_{space}_T1w.json").parent.mkdir(parents=True, exist_ok=True)
        (anat / f"{sub}_ses-1_{space}_T1w.json").write_text("{}")
        if labelled:
            _img(anat / f"{sub}_ses-1_{space}_label-L_desc-T1lesion_mask.nii.gz", mask=True)
    return root


def make_isles18(root: Path) -> Path:
    uid = 345560
    for split, case, labelled in (("TRAINING", "case_1", True), ("TRAINING", "case_2", True), ("TRAINING", "case_10", True),
                                  ("TESTING", "case_1", False)):
        c = root / "ISLES2018" / split / case
        for seq in ("CT", "CT_4DPWI", "CT_CBF", "CT_CBV", "CT_MTT", "CT_Tmax") + (("OT",) if labelled else ()):
            uid += 1
            _smir(c, "SMIR", seq, uid, mask=seq == "OT", shape=(10, 4, 8, 8) if seq == "CT_4DPWI" else (4, 8, 8))
    return root


def make_isles15(root: Path) -> Path:
    uid = 70600
    for task, seqs in (("SISS2015_Training", ("MR_T1", "MR_T2", "MR_Flair", "MR_DWI", "OT")),
                       ("SPES2015_Training", ("MR_CBF", "MR_CBV", "MR_DWI", "MR_T1c", "MR_T2", "MR_TTP", "MR_Tmax", "OT"))):
        for n in (1, 2):
            for seq in seqs:
                uid += 1
                _smir(root / task / str(n), "VSD", seq, uid, mask=seq == "OT")
    return root


def make_isles17(root: Path) -> Path:
    uid = 127010
    for n in (1, 2, 4):
        for seq in ("MR_ADC", "MR_MTT", "MR_rCBF", "MR_rCBV", "MR_Tmax", "MR_TTP", "MR_4DPWI", "OT"):
            uid += 1
            _smir(root / "ISLES2017_Training" / f"training_{n}", "SMIR" if seq != "OT" else "VSD", seq, uid,
                  mask=seq == "OT", shape=(12, 4, 8, 8) if seq == "MR_4DPWI" else (4, 8, 8))
    return root


def make_generic(root: Path) -> Path:
    for cid in ("case01", "case02"):
        _img(root / "images" / f"{cid}_dwi.nii.gz")
        _img(root / "images" / f"{cid}_adc.nii.gz")
    _img(root / "masks" / "case01_mask.nii.gz", mask=True)
    _img(root / "masks" / "case02.nii.gz", mask=True)
    return root


def make_nnunet(root: Path) -> Path:
    (root).mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "DWI", "1": "ADC"}, "labels": {"background": 0, "lesion": 1}}))
    for cid in ("stroke_001", "stroke_002"):
        _img(root / "imagesTr" / f"{cid}_0000.nii.gz")
        _img(root / "imagesTr" / f"{cid}_0001.nii.gz")
        _img(root / "labelsTr" / f"{cid}.nii.gz", mask=True)
    _img(root / "imagesTs" / "stroke_101_0000.nii.gz")
    _img(root / "imagesTs" / "stroke_101_0001.nii.gz")
    return root


# -- adapters ----------------------------------------------------------------------------
def test_isles22_bids_layout(tmp_path):
    root = make_isles22(tmp_path / "ISLES-2022")
    assert discover(root) == "isles22" and discover(tmp_path) == "isles22"  # the dataset or its parent
    cases = get_adapter("isles22").cases(root)
    assert [c.case_id for c in cases] == ["sub-strokecase0001_ses-0001", "sub-strokecase0002_ses-0001"]
    c = cases[0]
    assert set(c.inputs) == {"dwi", "adc", "flair"} and c.inputs["adc"].name.endswith("_adc.nii.gz")
    assert c.inputs["flair"].parent.name == "anat" and c.labels["lesion"].parts[-4] == "derivatives"
    assert c.patient == "sub-strokecase0001" and c.meta["dataset"] == "ISLES'22"
    everything = get_adapter("isles22").cases(root, labelled_only=False)
    assert len(everything) == 3 and not everything[2].labelled
    # the rawdata/ + derivatives/ variant of the release
    raw = get_adapter("isles22").cases(make_isles22(tmp_path / "v2", n=2, rawdata=True, unlabelled=0))
    assert [c.case_id for c in raw] == ["sub-strokecase0001_ses-0001", "sub-strokecase0002_ses-0001"]
    assert "rawdata" in raw[0].inputs["dwi"].parts and "derivatives" in raw[0].labels["lesion"].parts


def test_atlas2_layout(tmp_path):
    root = make_atlas2(tmp_path)
    assert discover(root) == "atlas2"
    cases = get_adapter("atlas2").cases(root)
    assert [c.case_id for c in cases] == ["sub-r001s001_ses-1", "sub-r001s002_ses-1", "sub-r034s010_ses-1"]
    assert all(set(c.inputs) == {"t1"} and c.labels["lesion"].name.endswith("_label-L_desc-T1lesion_mask.nii.gz")
               for c in cases)
    assert cases[2].meta["site"] == "R034" and cases[0].patient == "sub-r001s001"
    test = [c for c in get_adapter("atlas2").cases(root, labelled_only=False) if not c.labelled]
    assert [c.case_id for c in test] == ["sub-r009s101_ses-1"] and test[0].meta["split"] == "test"


def test_isles18_ctp_layout(tmp_path):
    root = make_isles18(tmp_path)
    assert discover(root) == "isles18"
    cases = get_adapter("isles18").cases(root)
    assert [c.case_id for c in cases] == ["case_1", "case_2", "case_10"]  # natural order; TESTING unlabelled
    c = cases[0]
    assert set(c.inputs) == {"ncct", "ctp", "cbf", "cbv", "mtt", "tmax"}
    assert c.inputs["ctp"].name.startswith("SMIR.Brain.XX.O.CT_4DPWI.") and c.inputs["ctp"].suffix == ".nii"
    assert c.inputs["ncct"].parent.name == c.inputs["ncct"].name[:-4]  # the .nii inside its own folder
    assert c.labels["lesion"] == c.labels["core"] and ".OT." in c.labels["core"].name
    assert read_image(c.inputs["ctp"]).is_4d
    ids = [c.case_id for c in get_adapter("isles18").cases(root, labelled_only=False)]
    assert "test_case_1" in ids and "case_1" in ids  # TRAINING/case_1 and TESTING/case_1 stay distinct
    grouped = get_adapter("isles18").cases(root, patients={"case_1": "p1", "case_2": "p1"})
    assert grouped[0].patient == grouped[1].patient == "p1"


def test_isles15_siss_and_spes(tmp_path):
    root = make_isles15(tmp_path)
    assert discover(root) == "isles15"
    cases = {c.case_id: c for c in get_adapter("isles15").cases(root)}
    assert sorted(cases) == ["siss_1", "siss_2", "spes_1", "spes_2"]
    assert set(cases["siss_1"].inputs) == {"t1", "t2", "flair", "dwi"} and set(cases["siss_1"].labels) == {"lesion"}
    spes = cases["spes_2"]
    assert set(spes.inputs) == {"cbf", "cbv", "dwi", "t2", "ttp", "tmax"} and spes.labels["penumbra"] == spes.labels["lesion"]
    assert "MR_T1C" in spes.meta["other_inputs"] and spes.meta["task"] == "SPES"  # contrast T1 has no engine key
    with pytest.raises(ValueError, match="has no option tsk"):
        get_adapter("isles15").cases(root, tsk="spes")  # a misspelt option is not ignored
    only = get_adapter("isles15").cases(root, task="spes")
    assert [c.case_id for c in only] == ["spes_1", "spes_2"]
    assert discover(root / "SISS2015_Training") == "isles15"


def test_isles17_mr_perfusion(tmp_path):
    root = make_isles17(tmp_path)
    assert discover(root) == "isles17"
    cases = get_adapter("isles17").cases(root)
    assert [c.case_id for c in cases] == ["training_1", "training_2", "training_4"]
    assert set(cases[0].inputs) == {"adc", "mtt", "cbf", "cbv", "tmax", "ttp", "pwi"}
    assert ".OT." in cases[0].labels["lesion"].name and "follow-up" in cases[0].meta["target"]


def test_generic_images_masks_nnunet_and_case_folders(tmp_path):
    g = get_adapter("generic").cases(make_generic(tmp_path / "g"))
    assert [(c.case_id, sorted(c.inputs)) for c in g] == [("case01", ["adc", "dwi"]), ("case02", ["adc", "dwi"])]
    assert g[0].labels["lesion"].name == "case01_mask.nii.gz"

    nn_root = make_nnunet(tmp_path / "nn")
    nn = get_adapter("generic").cases(nn_root)  # channels from dataset.json
    assert [c.case_id for c in nn] == ["stroke_001", "stroke_002"]
    assert nn[0].inputs["adc"].name == "stroke_001_0001.nii.gz" and nn[0].labels["lesion"].name == "stroke_001.nii.gz"
    assert [c.case_id for c in get_adapter("generic").cases(nn_root, labelled_only=False)][-1] == "stroke_101"
    swapped = get_adapter("generic").cases(nn_root, channels=["adc", "dwi"])
    assert swapped[0].inputs["adc"].name == "stroke_001_0000.nii.gz"

    one = tmp_path / "t1only"
    _img(one / "images" / "p7.nii.gz")
    _img(one / "labels" / "p7_lesion.nii.gz", mask=True)
    with pytest.raises(InputError, match="gives no modality"):
        get_adapter("generic").cases(one)
    multi = get_adapter("generic").cases(one, modality="t1", label_values={"core": [1], "penumbra": [2]})
    assert set(multi[0].labels) == {"lesion", "core", "penumbra"} and multi[0].meta["label_values"]["penumbra"] == [2]

    folders = tmp_path / "folders"
    for cid in ("a", "b"):
        _img(folders / cid / "dwi.nii.gz")
        _img(folders / cid / "adc.nii.gz")
        _img(folders / cid / "lesion.nii.gz", mask=True)
    assert discover(folders) == "generic"
    cf = get_adapter("generic").cases(folders)
    assert [c.case_id for c in cf] == ["a", "b"] and cf[0].labels["lesion"].name == "lesion.nii.gz"


def test_discovery_refuses_unknown_layouts(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("nothing here")
    with pytest.raises(InputError, match="no known dataset layout"):
        discover(tmp_path)
    with pytest.raises(InputError, match="not found"):
        discover(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown dataset source"):
        get_adapter("isles99")
    with pytest.raises(InputError, match="no cases of the ATLAS R2.0 layout"):
        get_adapter("atlas2").cases(tmp_path)
    assert list(ADAPTERS) == ["phantom", "isles22", "atlas2", "isles18", "isles17", "isles15", "generic"]


# -- folds -------------------------------------------------------------------------------
def test_kfold_patient_level_stratified_deterministic():
    ids = [f"c{i:02d}" for i in range(30)]
    volumes = {c: float(i) for i, c in enumerate(ids)}  # tertiles: c00-c09, c10-c19, c20-c29
    groups = {c: f"p{i // 2}" for i, c in enumerate(ids)}  # two cases per patient
    folds = kfold_splits(ids, 5, seed=3, groups=groups, volumes=volumes)
    assert [f.index for f in folds] == list(range(5))
    seen = [c for f in folds for c in f.val]
    assert sorted(seen) == ids  # every case validated exactly once
    for f in folds:
        assert not set(f.train) & set(f.val) and sorted(f.train + f.val) == ids
        assert {groups[c] for c in f.train}.isdisjoint({groups[c] for c in f.val})  # patients never split
        strata = volume_strata({c: volumes[c] for c in ids})
        per = np.bincount([strata[c] for c in f.val], minlength=3)
        assert per.max() - per.min() <= 2 and len(f.val) == 6  # each fold: small, medium and large lesions
    shuffled = kfold_splits(list(reversed(ids)), 5, seed=3, groups=groups, volumes=volumes)
    assert shuffled == folds
    assert kfold_splits(ids, 5, seed=4, groups=groups, volumes=volumes) != folds
    # Without volumes: still patient-level and balanced.
    plain = kfold_splits(ids, 4, seed=0, groups=groups)
    assert sorted(len(f.val) for f in plain) == [6, 8, 8, 8]
    rest, held = holdout_split(ids, 0.2, seed=0, groups=groups, volumes=volumes)
    assert len(held) == 6 and sorted(rest + held) == ids
    with pytest.raises(ValueError, match="cannot fill"):
        kfold_splits(ids[:4], 5)
    # Many lesion-free cases (ties at 0 mL) still make equal tertiles.
    ties = volume_strata({**{f"z{i}": 0.0 for i in range(6)}, "a": 1.0, "b": 2.0, "c": 3.0})
    assert sorted(np.bincount(list(ties.values()))) == [3, 3, 3] and ties["c"] == 2


def test_run_folds_resumes_and_summarises(tmp_path):
    folds = kfold_splits([f"c{i}" for i in range(6)], 3)
    calls = []

    def fn(fold: Fold) -> dict:
        calls.append(fold.index)
        return {"dice": 0.5 + 0.1 * fold.index, "n_val": len(fold.val), "name": f"f{fold.index}"}

    out = run_folds(folds, fn, results_json=tmp_path / "cv.json", only=[0, 2])
    assert calls == [0, 2] and sorted(out) == [0, 2]
    out = run_folds(folds, fn, results_json=tmp_path / "cv.json")  # resumes: only fold 1 runs
    assert calls == [0, 2, 1] and sorted(out) == [0, 1, 2]
    s = summarise_folds(out)
    assert s["dice"]["mean"] == pytest.approx(0.6) and s["dice"]["n"] == 3 and "name" not in s
    cfg = load_config(CONFIG, [f"run_dir={tmp_path / 'run'}"])
    f2 = fold_config(cfg, 2)
    assert f2["data"]["fold"] == 2 and f2["name"].endswith("-fold2") and f2["run_dir"].endswith("fold2")
    assert "fold" not in cfg["data"]  # the original is untouched
    cfg["data"]["folds"] = 3
    assert fold_weight_files(cfg) == [tmp_path / "run" / f"fold{k}" / "best.safetensors" for k in range(3)]


# -- fold-ensemble weights -----------------------------------------------------------------
def _tiny_card() -> dict:
    cfg = load_config(CONFIG, ["card.network.args.channels=[2,4,4,4]", "card.patch_size=[32,32,16]",
                               "card.inference.roi_size=[32,32,16]"])
    return cfg["card"]


def test_fold_ensemble_weights_load_and_average_in_engine(tmp_path):
    card_raw = _tiny_card()
    srcs = []
    for i in range(3):
        torch.manual_seed(i)
        srcs.append(tmp_path / "runs" / f"fold{i}" / "best.safetensors")
        save_weights(build_network(card_raw), srcs[-1])
    folder = tmp_path / "model"
    entries = fold_ensemble_weights(srcs, folder, card=card_raw)
    assert [e["file"] for e in entries] == ["fold0.safetensors", "fold1.safetensors", "fold2.safetensors"]
    assert len({e["sha256"] for e in entries}) == 3
    card = ModelCard(raw={**card_raw, "weights": entries}, folder=folder)
    nets = load_model(card)  # SHA-256 and strict loading, as the engine does for bundled models
    assert len(nets) == 3

    from strokeseg.inference import predict

    x = np.random.default_rng(0).normal(size=(2, 16, 32, 32)).astype(np.float32)
    together = predict(x, nets, card, device="cpu")
    alone = [predict(x, [n], card, device="cpu") for n in nets]
    np.testing.assert_allclose(together, np.mean(alone, axis=0), atol=1e-5)  # the engine averages the folds

    other = dict(card_raw, network={**card_raw["network"], "args": {**card_raw["network"]["args"], "channels": [2, 4, 4, 8]}})
    save_weights(build_network(other), tmp_path / "odd.safetensors")
    with pytest.raises(ModelError, match="does not match fold 0"):
        fold_ensemble_weights([srcs[0], tmp_path / "odd.safetensors"], tmp_path / "bad")
    with pytest.raises(ModelError, match="does not fit the card's network"):
        fold_ensemble_weights([tmp_path / "odd.safetensors"], tmp_path / "bad", card=card_raw)
    torch.save({"x": torch.zeros(1)}, tmp_path / "pickle.safetensors")
    with pytest.raises(ModelError, match="not a readable safetensors"):
        fold_ensemble_weights([tmp_path / "pickle.safetensors"], tmp_path / "bad")


# -- real data into the training cache ---------------------------------------------------
SMALL = {"spacing": (2.5, 2.5, 5.0), "size": (80, 80, 28)}


@pytest.fixture(scope="module")
def phantom_isles22(tmp_path_factory):
    """An ISLES'22-layout dataset whose images are DWI phantoms (real content for the engine's checks)."""
    from strokeseg.phantom import simulate_dwi

    root = tmp_path_factory.mktemp("isles22phantoms") / "ISLES-2022"
    volumes = {}
    for i in range(1, 7):
        case = simulate_dwi(200 + i, split="train", **SMALL)
        sub, ses = f"sub-strokecase{i:04d}", "ses-0001"
        s = root / "rawdata" / sub / ses
        write_image(case.images["dwi"], s / "dwi" / f"{sub}_{ses}_dwi.nii.gz")
        write_image(case.images["adc"], s / "dwi" / f"{sub}_{ses}_adc.nii.gz")
        write_image(case.images["b0"], s / "anat" / f"{sub}_{ses}_FLAIR.nii.gz")  # a T2-weighted stand-in (unused by the card)
        write_image(case.lesion, root / "derivatives" / sub / ses / f"{sub}_{ses}_msk.nii.gz")
        volumes[f"{sub}_{ses}"] = float(case.lesion.array.sum()) * case.lesion.voxel_volume_ml
    return root, volumes


def _real_cfg(tmp_path: Path, root: Path, **data) -> dict:
    cfg = load_config(CONFIG, [f"data.cache_dir={tmp_path / 'cache'}", "card.target_spacing=[3.0,3.0,5.0]",
                               f"run_dir={tmp_path / 'run'}"])
    cfg["data"] = {"source": "isles22", "root": str(root), "folds": 3, "fold": 0, "seed": 0, "workers": 1, **data}
    return cfg


def test_real_isles22_into_training_cache(tmp_path, phantom_isles22):
    from strokeseg_training.realdata import build_real_split, case_volumes, dataset_cases, is_real, split_cases

    root, volumes = phantom_isles22
    cfg = _real_cfg(tmp_path, root)
    assert is_real(cfg)
    cases = dataset_cases(cfg)
    assert len(cases) == 6
    vols = case_volumes(cases, "lesion", tmp_path / "volumes.json")
    assert vols == pytest.approx(volumes)
    assert case_volumes(cases, "lesion", tmp_path / "volumes.json") == vols  # second time from the cache

    train, case_root = build_real_split(cfg, "train", workers=1)
    val, val_root = build_real_split(cfg, "val", workers=1)
    assert len(train) == 4 and len(val) == 2 and not {f.stem for f in train} & {f.stem for f in val}
    vol = load_volumes(train)[0]
    assert vol.image.dtype == np.float16 and vol.image.ndim == 4 and vol.image.shape[0] == 2  # dwi, adc
    assert vol.label.dtype == np.uint8 and vol.label.shape == vol.image.shape[1:] and set(np.unique(vol.label)) <= {0, 1}
    assert abs(float(vol.image[0].astype(np.float32).mean())) < 2.0  # normalised by the card's recipe
    assert sum(int(v.label.sum()) for v in load_volumes(train)) > 0

    # Case folders of the DESIGN.md layout for whole-case validation (inputs linked, truth on the DWI grid).
    folders = sorted(p for p in val_root.iterdir() if p.is_dir())
    assert [p.name for p in folders] == sorted(f.stem for f in val)
    files = find_case_inputs(folders[0])
    assert set(files) == {"dwi", "adc"} and files["dwi"].is_symlink()
    truth, dwi = read_image(folders[0] / "lesion.nii.gz"), read_image(files["dwi"])
    assert truth.same_grid(dwi)
    np.testing.assert_array_equal(truth.array > 0, read_image(next(c for c in cases if c.case_id == folders[0].name)
                                                              .labels["lesion"]).array > 0)

    # Reuse: nothing is prepared again; every fold partitions the same cases.
    stamp = train[0].stat().st_mtime_ns
    assert build_real_split(cfg, "train", workers=1)[0] == train and train[0].stat().st_mtime_ns == stamp
    val_ids = [c.case_id for f in range(3) for c in split_cases({**cfg, "data": {**cfg["data"], "fold": f}}, "val")]
    assert sorted(val_ids) == sorted(c.case_id for c in cases)
    # A held-out test set taken out before the folds.
    held = _real_cfg(tmp_path, root, test_fraction=0.34, folds=2)
    test = [c.case_id for c in split_cases(held, "test")]
    assert len(test) == 2 and not set(test) & {c.case_id for c in split_cases(held, "train") + split_cases(held, "val")}


def test_real_data_in_other_units_trains_on_the_same_inputs(tmp_path, phantom_isles22):
    """An ADC exported in mm²/s (FSL, MRtrix) is the same training input as the 1e-6 mm²/s original,
    as it is at inference: before, the network learnt from ADC ~0.0008 where it later sees ~800."""
    from strokeseg_training.realdata import build_real_split

    root, _ = phantom_isles22
    other = tmp_path / "ISLES-2022"
    shutil.copytree(root, other)
    for adc in other.glob("rawdata/*/*/dwi/*_adc.nii.gz"):
        im = read_image(adc)
        write_image(Image(im.array.astype(np.float32) * 1e-6, im.spacing, im.origin, im.direction), adc)
    cfg_a, cfg_b = _real_cfg(tmp_path / "a", root), _real_cfg(tmp_path / "b", other)
    (npz_a, cases_a), (npz_b, cases_b) = build_real_split(cfg_a, "val", workers=1), build_real_split(cfg_b, "val", workers=1)
    a, b = load_volumes(npz_a), load_volumes(npz_b)
    assert len(a) == len(b) == 2
    for va, vb in zip(a, b):
        np.testing.assert_allclose(vb.image.astype(np.float32), va.image.astype(np.float32), atol=2e-2)
    # Tuning and evaluation read the linked originals from the case folders: the same inputs too
    # (before, they saw the ADC in mm²/s as it was and tuned the post-processing on garbage).
    from strokeseg_training.evaluate import case_probabilities

    card = card_of(cfg_a)
    torch.manual_seed(0)
    net = build_network(card).eval()
    folders = lambda root: sorted(p for p in root.iterdir() if p.is_dir())  # noqa: E731
    pa, pb = case_probabilities(folders(cases_a), [net], card), case_probabilities(folders(cases_b), [net], card)
    for qa, qb in zip(pa, pb):
        np.testing.assert_allclose(qb.probability.array, qa.probability.array, atol=2e-3)


def test_real_data_skips_unusable_cases_and_phantom_folders(tmp_path, phantom_isles22):
    from strokeseg.phantom import simulate_dwi, write_case
    from strokeseg_training.realdata import build_real_split, usable

    root, _ = phantom_isles22
    cfg = _real_cfg(tmp_path, root, exclude=["sub-strokecase0002_ses-0001"])
    cfg["card"]["inputs"] = {"required": ["dwi", "adc"], "optional": ["t2"]}
    from strokeseg_training.adapters import get_adapter

    keep, skipped = usable(cfg, get_adapter("isles22").cases(root))
    assert keep == [] and skipped["sub-strokecase0002_ses-0001"] == "excluded by the config"
    assert skipped["sub-strokecase0001_ses-0001"] == "lacks input t2"

    ph = tmp_path / "phantoms"
    for seed in (1, 2, 3):
        write_case(simulate_dwi(seed, split="val", **SMALL), ph)
    pcfg = _real_cfg(tmp_path, ph, source="auto", folds=3, fold=1)
    files, root_dir = build_real_split(pcfg, "val", workers=1)
    assert len(files) == 1 and files[0].stem.startswith("dwi-val-")
    case_dir = next(p for p in root_dir.iterdir())
    assert json.loads((case_dir / "case.json").read_text(encoding="utf-8"))["generator"] == "strokeseg.phantom"
    assert files[0].parent.parent.name.startswith("phantom-")

    # A mask from another scan (outside the inputs' field of view) is refused, naming the file.
    bad = tmp_path / "bad"
    src = sorted(p for p in ph.iterdir() if p.is_dir())
    for i, case_dir in enumerate(src[:2]):
        for key in ("dwi", "adc"):
            write_image(read_image(case_dir / f"{key}.nii.gz"), bad / f"c{i}" / f"{key}.nii.gz")
        lesion = read_image(case_dir / "lesion.nii.gz")
        if i == 1:
            lesion.origin = tuple(o + 500.0 for o in lesion.origin)
        write_image(lesion, bad / f"c{i}" / "lesion.nii.gz")
    bcfg = _real_cfg(tmp_path, bad, source="generic", folds=2)
    with pytest.raises(InputError, match=r"c1/lesion.nii.gz: lesion mask does not overlap"):
        for split in ("train", "val"):
            build_real_split(bcfg, split, workers=1)


def test_read_label_values_and_field_of_view_check(tmp_path):
    from strokeseg_training.adapters import Case
    from strokeseg_training.realdata import read_label

    arr = np.zeros((4, 8, 8), np.uint8)
    arr[1, 2:4, 2:4] = 1
    arr[2, 2:4, 2:4] = 2
    m = write_image(Image(arr, (2.0, 2.0, 5.0)), tmp_path / "m.nii.gz")
    case = Case("x", {}, {"lesion": m, "core": m, "penumbra": m}, {"label_values": {"core": [1], "penumbra": [2]}})
    assert int(read_label(case, "lesion").array.sum()) == 8
    assert int(read_label(case, "core").array[1].sum()) == 4 and int(read_label(case, "core").array[2].sum()) == 0
    assert int(read_label(case, "penumbra").array[2].sum()) == 4
    with pytest.raises(InputError, match="no 'flair' label"):
        read_label(case, "flair")
    os.remove(m)
