"""Metrics against hand-computed cases; every expected value is derived in a comment."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from strokeseg.errors import InputError
from strokeseg.image import Image
from strokeseg.io import write_image
from strokeseg.metrics import aggregate, bland_altman, case_metrics, evaluate_files, evaluate_images
from strokeseg.plots import bland_altman_plot, volume_scatter_plot

UNIT = (1.0, 1.0, 1.0)


def row(*values: int) -> np.ndarray:
    """A (1, 1, N) mask: a single row of voxels along x."""
    return np.asarray(values, dtype=np.uint8)[None, None, :]


# -- empty masks ---------------------------------------------------------------------------
def test_both_empty():
    m = case_metrics(np.zeros((4, 5, 6), np.uint8), np.zeros((4, 5, 6), np.uint8), UNIT)
    # Perfect agreement on "no lesion": Dice and lesion F1 are 1 (ISLES'22), HD95 0, MCC 1.
    assert m["dice"] == 1.0 and m["lesion_f1"] == 1.0 and m["hd95_mm"] == 0.0 and m["mcc"] == 1.0
    assert m["abs_volume_diff_ml"] == 0.0 and m["abs_lesion_count_diff"] == 0
    assert m["n_fp_lesions"] == 0 and m["n_fn_lesions"] == 0
    # 120 true negatives, no false positives: TNR = 120/120.
    assert m["tn_voxels"] == 120 and m["tnr"] == 1.0
    # No true and no predicted voxels/lesions: TPR, PPV, detection rate are undefined.
    for key in ("tpr", "ppv", "detection_rate", "lesion_detected", "mean_fp_lesion_size_ml"):
        assert math.isnan(m[key]), key


def test_prediction_empty_truth_not():
    truth = row(0, 1, 1, 0, 0, 1, 0)  # two 26-connected lesions: x=1..2 and x=5
    m = case_metrics(np.zeros_like(truth), truth, UNIT)
    # Dice 0; both lesions missed: TP 0, FN 2 -> F1 = 0/(0 + 2/2) = 0; |2 - 0| = 2 lesions.
    assert m["dice"] == 0.0 and m["lesion_f1"] == 0.0 and m["abs_lesion_count_diff"] == 2
    assert (m["lesion_tp"], m["lesion_fp"], m["lesion_fn"]) == (0, 0, 2)
    # No predicted surface: HD95 undefined (NaN by convention).
    assert math.isnan(m["hd95_mm"])
    # 3 true voxels of 1 mm^3, none predicted: |0 - 0.003| mL.
    assert m["abs_volume_diff_ml"] == pytest.approx(0.003)
    # TPR 0/3 = 0, PPV 0/0 undefined, MCC denominator 0 and not perfect -> 0.
    assert m["tpr"] == 0.0 and math.isnan(m["ppv"]) and m["mcc"] == 0.0
    # Missed lesions of 2 and 1 voxels: mean FN size 1.5 voxels; 0 of 2 detected.
    assert m["mean_fn_lesion_size_voxels"] == 1.5 and m["detection_rate"] == 0.0 and m["lesion_detected"] == 0.0


def test_truth_empty_prediction_not():
    pred = row(1, 0, 0, 1, 1, 1)  # two predicted components of 1 and 3 voxels
    m = case_metrics(pred, np.zeros_like(pred), (2.0, 1.0, 1.0))
    # Dice 0; both components are FP: F1 = 0/(0 + 2/2) = 0; |0 - 2| = 2.
    assert m["dice"] == 0.0 and m["lesion_f1"] == 0.0 and m["abs_lesion_count_diff"] == 2
    assert (m["lesion_tp"], m["lesion_fp"], m["lesion_fn"]) == (0, 2, 0)
    assert math.isnan(m["hd95_mm"])
    # 4 voxels of 2 mm^3 = 0.008 mL predicted, none true.
    assert m["pred_volume_ml"] == pytest.approx(0.008) and m["volume_diff_ml"] == pytest.approx(0.008)
    # Mean FP size (1 + 3)/2 = 2 voxels = 0.004 mL; no true lesion: detection undefined.
    assert m["mean_fp_lesion_size_voxels"] == 2.0 and m["mean_fp_lesion_size_ml"] == pytest.approx(0.004)
    assert math.isnan(m["detection_rate"]) and math.isnan(m["tpr"]) and m["ppv"] == 0.0


# -- lesion-wise (ISLES'22) ------------------------------------------------------------------
def test_blob_bridging_two_true_lesions():
    # One row along x: true lesions A x=1..2, B x=5..6, C x=13..14; predicted bar x=1..6
    # (bridges A and B) and a stray voxel at x=10.
    truth = row(0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0)
    pred = row(0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0)
    m = case_metrics(pred, truth, UNIT)
    # A and B both touch the bar -> 2 TP; C is missed -> 1 FN; the stray voxel touches no
    # truth -> 1 FP; the bar overlaps truth so it is no FP.
    assert (m["lesion_tp"], m["lesion_fp"], m["lesion_fn"]) == (2, 1, 1)
    # F1 = 2 / (2 + (1 + 1)/2) = 2/3.
    assert m["lesion_f1"] == pytest.approx(2 / 3)
    # 3 true components against 2 predicted: |3 - 2| = 1.
    assert (m["true_lesions"], m["pred_lesions"], m["abs_lesion_count_diff"]) == (3, 2, 1)
    # Voxels: TP 4 (A, B), FP 3 (x=3, 4, 10), FN 2 (C): Dice = 8 / (7 + 6).
    assert (m["tp_voxels"], m["fp_voxels"], m["fn_voxels"]) == (4, 3, 2)
    assert m["dice"] == pytest.approx(8 / 13)


def test_components_are_26_connected():
    truth = np.zeros((3, 3, 3), np.uint8)
    truth[0, 0, 0] = truth[1, 1, 1] = 1  # touch only at a corner: one lesion with 26-connectivity
    pred = np.zeros_like(truth)
    pred[2, 2, 2] = 1  # corner-touches (1,1,1) but overlaps nothing
    m = case_metrics(pred, truth, UNIT)
    # One true lesion, one predicted lesion; pred overlaps no true voxel -> FP 1, FN 1.
    assert (m["true_lesions"], m["pred_lesions"]) == (1, 1)
    assert (m["lesion_tp"], m["lesion_fp"], m["lesion_fn"]) == (0, 1, 1)


# -- distances and volumes -------------------------------------------------------------------
def test_hd95_plates_separated_along_z_anisotropic():
    truth = np.zeros((10, 8, 8), np.uint8)
    pred = np.zeros_like(truth)
    truth[2, 2:6, 2:6] = 1  # one-voxel-thick plates: every voxel is a surface voxel
    pred[4, 2:6, 2:6] = 1
    # Spacing (x, y, z) = (1, 1, 5): each pred voxel sits 2 slices = 10 mm above its truth voxel,
    # and vice versa, so every surface distance and hence HD95 is 10 mm (2 mm if z were mis-mapped).
    assert case_metrics(pred, truth, (1.0, 1.0, 5.0))["hd95_mm"] == pytest.approx(10.0)


def test_hd95_plates_separated_along_x_anisotropic():
    truth = np.zeros((6, 6, 8), np.uint8)
    pred = np.zeros_like(truth)
    truth[1:5, 1:5, 1] = 1
    pred[1:5, 1:5, 4] = 1
    # 3 columns apart along x at 2 mm: 6 mm.
    assert case_metrics(pred, truth, (2.0, 1.0, 1.0))["hd95_mm"] == pytest.approx(6.0)


def test_hd95_is_the_95th_percentile_not_the_maximum():
    truth = np.zeros((5, 3, 12), np.uint8)
    truth[0, 1, 0:10] = 1  # a 10-voxel line
    pred = truth.copy()
    pred[4, 1, 0] = 1  # one outlier 4 slices up: 4 * 2.5 = 10 mm from the line
    m = case_metrics(pred, truth, (1.0, 1.0, 2.5))
    # pred -> truth distances: ten 0s and one 10; 95th percentile (linear) at rank 0.95 * 10 = 9.5
    # lies halfway between the sorted values 0 and 10 -> 5 mm. truth -> pred: all 0. max = 5 mm.
    assert m["hd95_mm"] == pytest.approx(5.0)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI-internal deprecation notice
def test_hd95_matches_monai():
    # Reference check (not hand-derived): our definition must equal MONAI's compute_hausdorff_distance.
    torch = pytest.importorskip("torch")
    from monai.metrics import compute_hausdorff_distance

    zz, yy, xx = np.mgrid[:14, :30, :26]
    truth = ((zz - 6) * 2.0) ** 2 + (yy - 14) ** 2 + ((xx - 12) * 1.2) ** 2 < 70
    pred = ((zz - 7) * 2.0) ** 2 + ((yy - 16) * 1.1) ** 2 + (xx - 13) ** 2 < 60
    pred[1, 2, 3] = True
    spacing = (0.9, 0.7, 3.0)
    ours = case_metrics(pred, truth, spacing)["hd95_mm"]
    ref = compute_hausdorff_distance(
        torch.from_numpy(pred[None, None]),
        torch.from_numpy(truth[None, None]),
        include_background=True,
        percentile=95,
        spacing=spacing[::-1],
    )
    assert ours == pytest.approx(float(ref[0, 0]), rel=1e-4)


def test_volume_difference_non_unit_spacing():
    truth = np.zeros((10, 20, 20), np.uint8)
    pred = np.zeros_like(truth)
    truth[:, :10, :10] = 1  # 1000 voxels
    pred[:6, :10, :10] = 1  # 600 voxels, inside the truth
    m = case_metrics(pred, truth, (0.5, 2.0, 3.0))
    # Voxel = 0.5 * 2 * 3 = 3 mm^3 = 0.003 mL: truth 3 mL, pred 1.8 mL, |diff| 1.2 mL.
    assert m["true_volume_ml"] == pytest.approx(3.0) and m["pred_volume_ml"] == pytest.approx(1.8)
    assert m["abs_volume_diff_ml"] == pytest.approx(1.2) and m["volume_diff_ml"] == pytest.approx(-1.2)
    # Dice = 2 * 600 / 1600 = 0.75.
    assert m["dice"] == pytest.approx(0.75)


def test_confusion_metrics():
    truth = row(1, 1, 1, 1, 0, 0, 0, 0, 0, 0)
    pred = row(1, 1, 1, 0, 1, 1, 0, 0, 0, 0)
    m = case_metrics(pred, truth, UNIT)
    # TP 3 (x=0..2), FN 1 (x=3), FP 2 (x=4,5), TN 4 (x=6..9).
    assert (m["tp_voxels"], m["fn_voxels"], m["fp_voxels"], m["tn_voxels"]) == (3, 1, 2, 4)
    assert m["tpr"] == pytest.approx(3 / 4)  # TP / (TP + FN)
    assert m["tnr"] == pytest.approx(4 / 6)  # TN / (TN + FP)
    assert m["ppv"] == pytest.approx(3 / 5)  # TP / (TP + FP)
    # MCC = (3*4 - 2*1) / sqrt((3+2)(3+1)(4+2)(4+1)) = 10 / sqrt(600).
    assert m["mcc"] == pytest.approx(10 / math.sqrt(600))
    # Dice = 2*3 / (5 + 4) = 2/3.
    assert m["dice"] == pytest.approx(2 / 3)


def test_detection_metrics():
    truth = np.zeros((8, 12, 12), np.uint8)
    pred = np.zeros_like(truth)
    truth[1:3, 1:3, 1:3] = 1  # A: 8 voxels
    truth[1, 1, 7] = 1  # B: 1 voxel
    truth[4:7, 6:9, 6:9] = 1  # C: 27 voxels
    pred[1:3, 1:3, 1] = 1  # 4 voxels overlapping A
    pred[5:7, 1:3, 1] = 1  # FP1: 4 voxels, 2 slices clear of A
    pred[1, 10, 1:3] = 1  # FP2: 2 voxels
    m = case_metrics(pred, truth, (1.0, 1.0, 2.0))  # voxel = 2 mm^3 = 0.002 mL
    # A detected; B and C missed; FP1 and FP2 touch no truth.
    assert (m["n_fp_lesions"], m["n_fn_lesions"], m["lesion_tp"]) == (2, 2, 1)
    # Mean FP size (4 + 2)/2 = 3 voxels = 0.006 mL; mean FN size (1 + 27)/2 = 14 voxels = 0.028 mL.
    assert m["mean_fp_lesion_size_voxels"] == 3.0 and m["mean_fp_lesion_size_ml"] == pytest.approx(0.006)
    assert m["mean_fn_lesion_size_voxels"] == 14.0 and m["mean_fn_lesion_size_ml"] == pytest.approx(0.028)
    # 1 of 3 true lesions detected; the subject counts as detected (any TP).
    assert m["detection_rate"] == pytest.approx(1 / 3) and m["lesion_detected"] == 1.0
    # F1 = 1 / (1 + (2 + 2)/2) = 1/3; 3 true vs 3 predicted components.
    assert m["lesion_f1"] == pytest.approx(1 / 3) and m["abs_lesion_count_diff"] == 0
    # Mean true lesion size (8 + 1 + 27)/3 = 12 voxels = 0.024 mL.
    assert m["mean_true_lesion_size_ml"] == pytest.approx(0.024)


# -- sets ------------------------------------------------------------------------------------
def test_bland_altman_tiny_list():
    ba = bland_altman([2.0, 4.0, 6.0], [1.0, 4.0, 8.0])
    # Differences 1, 0, -2: bias -1/3; deviations 4/3, 1/3, -5/3 -> SD^2 = (16+1+25)/9/2 = 7/3.
    sd = math.sqrt(7 / 3)
    assert ba["n"] == 3
    assert ba["mean_difference_ml"] == pytest.approx(-1 / 3)
    assert ba["sd_difference_ml"] == pytest.approx(sd)
    assert ba["loa_lower_ml"] == pytest.approx(-1 / 3 - 1.96 * sd)
    assert ba["loa_upper_ml"] == pytest.approx(-1 / 3 + 1.96 * sd)
    with pytest.raises(ValueError):
        bland_altman([1.0, 2.0], [1.0])


def test_aggregate_over_a_small_set():
    cases = [
        case_metrics(row(0, 0, 0, 0, 0, 0), row(0, 0, 0, 0, 0, 0), UNIT),  # both empty
        case_metrics(row(1, 1, 0, 0, 0, 1), row(1, 1, 0, 0, 0, 0), UNIT),  # 1 TP lesion + 1 FP voxel
        case_metrics(row(0, 0, 0, 0, 0, 0), row(0, 0, 1, 1, 1, 0), UNIT),  # 3-voxel lesion missed
    ]
    s = aggregate(cases)
    assert s["n_cases"] == 3
    # Dice 1, 2*2/(3+2) = 0.8, 0: mean 0.6, median 0.8, SD sqrt((0.16 + 0.04 + 0.36)/2).
    d = s["metrics"]["dice"]
    assert d["mean"] == pytest.approx(0.6) and d["median"] == pytest.approx(0.8)
    assert d["std"] == pytest.approx(math.sqrt(0.28)) and d["n"] == 3
    # HD95: 0; case 2 pred->truth distances 0, 0, 4 -> percentile at rank 1.9 = 0.9 * 4 = 3.6
    # (truth->pred all 0); case 3 NaN is skipped: mean = median = 1.8 over n = 2.
    h = s["metrics"]["hd95_mm"]
    assert h["n"] == 2 and h["mean"] == pytest.approx(1.8) and h["median"] == pytest.approx(1.8)
    # Sums: 2 true lesions, 2 predicted, TP 1, FP 1, FN 1.
    sums = s["sums"]
    assert (sums["true_lesions"], sums["pred_lesions"], sums["lesion_tp"], sums["lesion_fp"], sums["lesion_fn"]) == (
        2,
        2,
        1,
        1,
        1,
    )
    det = s["detection"]
    # m#FP = (0 + 1 + 0)/3, m#FN = (0 + 0 + 1)/3; pooled FP size 1 voxel, FN size 3 voxels.
    assert det["m_fp"] == pytest.approx(1 / 3) and det["m_fn"] == pytest.approx(1 / 3)
    assert det["mean_fp_lesion_size_voxels"] == 1.0 and det["mean_fn_lesion_size_voxels"] == 3.0
    assert det["mean_fn_lesion_size_ml"] == pytest.approx(0.003)
    # 1 of 2 true lesions found; subjects with lesions: case 2 detected, case 3 not -> DR 0.5.
    assert det["lesion_detection_rate"] == 0.5 and det["subject_detection_rate"] == 0.5
    # Pooled F1 = 1 / (1 + (1 + 1)/2) = 0.5.
    assert det["pooled_lesion_f1"] == pytest.approx(0.5)
    # Volumes pred (0, 0.003, 0) vs true (0, 0.002, 0.003): differences 0, 0.001, -0.003 -> bias -0.002/3.
    assert s["bland_altman"]["mean_difference_ml"] == pytest.approx(-0.002 / 3)
    # Strata: mean true lesion sizes 0.002 and 0.003 mL -> threshold 0.0025: case 2 small, case 3 large.
    st = s["strata"]
    assert st["threshold_ml"] == pytest.approx(0.0025)
    assert st["small"]["n_cases"] == 1 and st["small"]["dice"] == pytest.approx(0.8)
    assert st["large"]["n_cases"] == 1 and st["large"]["subject_detection_rate"] == 0.0
    # Undefined values come out as None and the whole summary is strict JSON.
    assert s["metrics"]["tpr"]["n"] == 2
    json.dumps(s, allow_nan=False)


# -- images and files ------------------------------------------------------------------------
LPS_FLIP = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def test_evaluate_files_round_trip(tmp_path):
    geometry = dict(spacing=(0.9, 0.8, 3.0), origin=(-10.0, 5.0, 20.0), direction=LPS_FLIP)
    truth = np.zeros((12, 16, 16), np.uint8)
    truth[4:8, 4:8, 4:8] = 1  # 64 voxels
    prob = np.zeros(truth.shape, np.float32)
    prob[truth > 0] = 0.7
    prob[0:2, 12:16, 0:4] = 0.4  # below 0.5: background
    prob[10, 14, 14] = 0.5  # exactly 0.5: foreground, a stray FP lesion
    write_image(Image(truth, **geometry), tmp_path / "truth.nii.gz")
    write_image(Image(prob, **geometry), tmp_path / "pred.nii.gz")

    res = evaluate_files(tmp_path / "pred.nii.gz", tmp_path / "truth.nii.gz")
    json.dumps(res, allow_nan=False)
    assert res["resampled"] is False and res["pred"].endswith("pred.nii.gz")
    assert res["pred_thresholded_at"] == 0.5 and "truth_thresholded_at" not in res  # the report says how it read a map
    m = res["metrics"]
    # Pred mask = 64 lesion voxels + 1 stray: Dice = 128/129, one FP lesion.
    assert m["dice"] == pytest.approx(128 / 129) and m["lesion_fp"] == 1 and m["lesion_tp"] == 1
    # 65 voxels of 0.9*0.8*3 = 2.16 mm^3 -> 0.1404 mL.
    assert m["pred_volume_ml"] == pytest.approx(65 * 0.00216, rel=1e-5)
    # Identical to the array path, with NaN written as None.
    direct = case_metrics(prob >= 0.5, truth, geometry["spacing"])
    for key, value in direct.items():
        assert (m[key] is None) if math.isnan(value) else m[key] == pytest.approx(value, rel=1e-5), key
    # aggregate accepts evaluate_* results (nested, None for NaN).
    assert aggregate([res, res])["metrics"]["dice"]["mean"] == pytest.approx(128 / 129)

    with pytest.raises(InputError, match="missing.nii.gz"):
        evaluate_files(tmp_path / "missing.nii.gz", tmp_path / "truth.nii.gz")
    prob[0, 0, 0] = np.nan  # ITK reads it as 0: the file is checked
    write_image(Image(prob, **geometry), tmp_path / "nan.nii.gz")
    with pytest.raises(InputError, match=r"nan.nii.gz: segmentation contains NaN/Inf voxels"):
        evaluate_files(tmp_path / "nan.nii.gz", tmp_path / "truth.nii.gz")


def test_prediction_on_another_overlapping_grid_is_resampled():
    truth = np.zeros((20, 20, 20), np.uint8)
    truth[4:12, 4:12, 4:12] = 1
    pred = np.zeros((10, 10, 10), np.uint8)
    pred[2:6, 2:6, 2:6] = 1
    # A 2 mm grid over the same box: coarse voxel i (centre 0.5 + 2i mm) covers fine voxels 2i and 2i+1,
    # so coarse 2..5 maps exactly onto fine 4..11 and Dice is 1.
    res = evaluate_images(Image(pred, (2.0, 2.0, 2.0), (0.5, 0.5, 0.5)), Image(truth, UNIT))
    assert res["resampled"] is True and res["pred_spacing"] == [2.0, 2.0, 2.0]
    assert res["metrics"]["dice"] == pytest.approx(1.0)
    # 64 coarse voxels of 8 mm^3 = 0.512 mL = 512 fine voxels of 1 mm^3.
    assert res["pred_volume_ml_native"] == pytest.approx(0.512)
    assert res["metrics"]["pred_volume_ml"] == pytest.approx(0.512)
    assert res["truth_grid_fraction_covered"] == pytest.approx(1.0)
    # Shifted by 10 mm along x, the coarse grid covers about half the truth grid.
    half = evaluate_images(Image(pred, (2.0, 2.0, 2.0), (10.5, 0.5, 0.5)), Image(truth, UNIT))
    assert 0.4 < half["truth_grid_fraction_covered"] < 0.6


def test_non_overlapping_grids_raise(tmp_path):
    mask = np.zeros((6, 6, 6), np.uint8)
    mask[2:4, 2:4, 2:4] = 1
    write_image(Image(mask, UNIT, origin=(1000.0, 0.0, 0.0)), tmp_path / "far_pred.nii.gz")
    write_image(Image(mask, UNIT), tmp_path / "truth.nii.gz")
    with pytest.raises(InputError, match=r"far_pred\.nii\.gz: grid .* does not overlap .*truth\.nii\.gz"):
        evaluate_files(tmp_path / "far_pred.nii.gz", tmp_path / "truth.nii.gz")
    with pytest.raises(InputError, match="4D"):
        evaluate_images(Image(np.zeros((2, 6, 6, 6), np.uint8), UNIT), Image(mask, UNIT))


# -- plots -----------------------------------------------------------------------------------
def test_plots_write_pngs(tmp_path):
    import matplotlib.image as mpimg

    true_ml = [1.0, 5.5, 12.0, 30.0, 64.0]
    pred_ml = [1.4, 4.9, 13.1, 27.5, 70.2]
    paths = [
        bland_altman_plot(pred_ml, true_ml, tmp_path / "ba.png", title="test"),
        volume_scatter_plot(pred_ml, true_ml, tmp_path / "scatter.png"),
        bland_altman_plot([2.0], [1.0], tmp_path / "one.png"),  # one case: no limits, still a plot
    ]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
        pixels = mpimg.imread(p)
        assert pixels.shape[0] > 300 and pixels.std() > 0.01  # drawn, not blank
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
    with pytest.raises(ValueError):
        volume_scatter_plot([1.0, 2.0], [1.0], tmp_path / "bad.png")
