"""Post-processing (threshold, closing, hole filling, minimum size) and the lesion report.

Geometry reminder: arrays are (z, y, x); spacings are (x, y, z).
"""

from __future__ import annotations

import csv
import io
import json

import cc3d
import numpy as np
import pytest
import scipy.ndimage as ndi
import SimpleITK as sitk

import strokeseg
from strokeseg.image import Image
from strokeseg.postprocess import (
    MaskRefiner,
    PostprocessSettings,
    ball_footprint,
    binary_closing,
    label_lesions,
    min_voxels,
    postprocess,
)
from strokeseg.report import CSV_COLUMNS, format_report, lesion_report, report_to_csv


def _naive(prob: np.ndarray, spacing, s: PostprocessSettings) -> np.ndarray:
    """Reference pipeline from scipy/cc3d primitives on the full (padded) volume."""
    m = prob >= s.threshold
    fp = ball_footprint(s.closing_mm, spacing)
    r = [n // 2 for n in fp.shape]
    if fp.sum() > 1:
        closed = ndi.binary_closing(np.pad(m, [(q, q) for q in r]), fp)
        m = closed[tuple(slice(q, q + n) for q, n in zip(r, m.shape))]
    if s.fill_holes:
        m = ndi.binary_fill_holes(m)
    mv = min_voxels(s.min_lesion_ml, spacing)
    if mv:
        m = cc3d.dust(m, mv, connectivity=26)
    return m.astype(np.uint8)


def _smooth_prob(rng, shape, sigma=1.5) -> np.ndarray:
    p = ndi.gaussian_filter(rng.random(shape), sigma)
    return ((p - p.min()) / np.ptp(p)).astype(np.float32)


# -- footprint -----------------------------------------------------------------------------
def test_ball_footprint_shapes_and_axis_order():
    iso = ball_footprint(3.0, (1.0, 1.0, 1.0))
    assert iso.shape == (7, 7, 7) and iso.sum() == 123 and iso[3, 3, 0] and not iso[0, 0, 3]
    # 5 mm slices (z) and r = 3 mm: one voxel thick in z; in-plane half-size floor(3 / 0.9) = 3.
    thin = ball_footprint(3.0, (0.9, 0.9, 5.0))
    assert thin.shape == (1, 7, 7)
    # Thick along x instead: the thin axis is the last array axis.
    assert ball_footprint(3.0, (5.0, 1.0, 1.0)).shape == (7, 7, 1)
    assert ball_footprint(0.0, (1.0, 1.0, 1.0)).shape == (1, 1, 1)
    with pytest.raises(ValueError):
        ball_footprint(3.0, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="centred"):  # the row decomposition needs a ball
        binary_closing(np.ones((3, 3, 3), bool), np.ones((1, 1, 2), bool))


# -- closing -------------------------------------------------------------------------------
def _two_slabs(gap: int, axis: int, shape=(30, 30, 30)) -> tuple[np.ndarray, tuple]:
    """Two blocks separated by ``gap`` empty voxels along array ``axis``; the gap's centre."""
    m = np.zeros(shape, dtype=bool)
    lo, hi = [slice(5, 25)] * 3, [slice(5, 25)] * 3
    start = 8
    lo[axis], hi[axis] = slice(2, start), slice(start + gap, start + gap + 6)
    m[tuple(lo)] = m[tuple(hi)] = True
    centre = [15, 15, 15]
    centre[axis] = start + gap // 2
    return m, tuple(centre)


@pytest.mark.parametrize("gap,bridged", [(6, True), (7, False)])
def test_closing_bridges_gap_up_to_twice_radius(gap, bridged):
    # 1 mm voxels, r = 3 mm: a gap is filled when every gap voxel is within 3 mm of a side.
    m, centre = _two_slabs(gap, axis=2)
    out = postprocess(m.astype(np.float32), (1.0, 1.0, 1.0), PostprocessSettings(closing_mm=3.0, fill_holes=False))
    assert bool(out[centre]) is bridged
    assert (out >= m).all()


def test_closing_honours_anisotropic_spacing():
    s = PostprocessSettings(closing_mm=3.0, fill_holes=False)
    # 5 mm slices: a one-slice (5 mm) gap along z is NOT bridged by r = 3 mm ...
    m, centre = _two_slabs(1, axis=0)
    assert postprocess(m, (1.0, 1.0, 5.0), s)[centre] == 0
    # ... but a 5 mm (5 voxel) gap in-plane is, and so is the z gap with r = 5 mm.
    m_xy, c_xy = _two_slabs(5, axis=1)
    assert postprocess(m_xy, (1.0, 1.0, 5.0), s)[c_xy] == 1
    assert postprocess(m, (1.0, 1.0, 5.0), PostprocessSettings(closing_mm=5.0))[centre] == 1
    # Thick voxels along x instead (spacing x = 5 mm): now the x gap survives, the z gap closes.
    m_x, c_x = _two_slabs(1, axis=2)
    assert postprocess(m_x, (5.0, 1.0, 1.0), s)[c_x] == 0
    m_z, c_z = _two_slabs(5, axis=0)
    assert postprocess(m_z, (5.0, 1.0, 1.0), s)[c_z] == 1


def test_closing_does_not_shrink_objects_at_the_border():
    m = np.zeros((12, 20, 20), dtype=bool)
    m[:5, :7, 10:] = True  # a box touching three array faces
    fp = ball_footprint(3.0, (1.0, 1.0, 1.0))
    assert not ndi.binary_closing(m, fp)[m].all()  # the pitfall we avoid: scipy erodes it
    np.testing.assert_array_equal(binary_closing(m, fp), m)  # a box is its own closing
    out = postprocess(m, (1.0, 1.0, 1.0), PostprocessSettings(closing_mm=3.0))
    np.testing.assert_array_equal(out, m)


@pytest.mark.parametrize("seed", range(6))
def test_closing_equals_scipy_on_padded_volume(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(8, 30, 3))
    spacing = tuple(float(s) for s in rng.choice([0.5, 0.9, 1.0, 2.0, 5.0], 3))
    m = _smooth_prob(rng, shape, 1.0) > 0.55
    fp = ball_footprint(float(rng.choice([1.0, 2.0, 3.0, 5.0])), spacing)
    r = [n // 2 for n in fp.shape]
    ref = ndi.binary_closing(np.pad(m, [(q, q) for q in r]), fp)[tuple(slice(q, q + n) for q, n in zip(r, shape))]
    np.testing.assert_array_equal(binary_closing(m, fp), ref)


# -- hole filling --------------------------------------------------------------------------
def test_fill_holes_3d():
    m = np.zeros((20, 20, 20), dtype=bool)
    m[3:12, 3:12, 3:12] = True
    m[5:10, 5:10, 5:10] = False  # enclosed cavity: filled
    m[14:19, 2:8, 2:8] = True
    m[14:19, 4:6, 4:6] = False  # a tube open at both ends: open in 3D, kept open
    filled = postprocess(m, (1.0, 1.0, 1.0), PostprocessSettings(fill_holes=True))
    assert filled[5:10, 5:10, 5:10].all()
    assert not filled[14:19, 4:6, 4:6].any()
    np.testing.assert_array_equal(filled, ndi.binary_fill_holes(m))
    kept = postprocess(m, (1.0, 1.0, 1.0), PostprocessSettings(fill_holes=False))
    np.testing.assert_array_equal(kept, m)


def test_fill_holes_cavity_open_at_array_border_is_not_filled():
    m = np.zeros((10, 10, 10), dtype=bool)
    m[:6, 2:8, 2:8] = True
    m[:4, 4:6, 4:6] = False  # the cavity reaches z = 0, i.e. outside the field of view
    out = postprocess(m, (1.0, 1.0, 1.0), PostprocessSettings(fill_holes=True))
    assert not out[:4, 4:6, 4:6].any()


# -- minimum size --------------------------------------------------------------------------
def test_min_size_in_ml_with_known_spacing():
    spacing = (0.5, 0.5, 2.0)  # 0.5 mm^3 = 0.0005 mL per voxel
    m = np.zeros((10, 40, 60), dtype=bool)
    m[1:3, 2:11, 2:12] = True  # 2*9*10 = 180 voxels = 0.09 mL
    m[1:3, 20:31, 2:12] = True  # 2*11*10 = 220 voxels = 0.11 mL
    m[6:8, 2:12, 30:40] = True  # 200 voxels = exactly 0.1 mL: kept (>=)
    # Two 100-voxel cubes touching only at a corner: one 26-connected lesion of 0.1 mL.
    m[5:7, 25:30, 30:40] = True
    m[7:9, 30:35, 40:50] = True
    out = postprocess(m, spacing, PostprocessSettings(min_lesion_ml=0.1, fill_holes=False))
    assert out.dtype == np.uint8
    assert not out[1:3, 2:11, 2:12].any()
    assert out[1:3, 20:31, 2:12].all() and out[6:8, 2:12, 30:40].all()
    assert out[5:7, 25:30, 30:40].all() and out[7:9, 30:35, 40:50].all()
    assert int(out.sum()) == 220 + 200 + 200
    assert min_voxels(0.1, spacing) == 200
    assert postprocess(m, spacing, PostprocessSettings(min_lesion_ml=0.0)).sum() == m.sum()


def test_label_lesions_is_26_connected():
    m = np.zeros((5, 5, 5), dtype=np.uint8)
    m[1, 1, 1] = m[2, 2, 2] = 1  # corner neighbours
    m[4, 4, 0] = 1
    labels, n = label_lesions(m)
    assert n == 2 and labels[1, 1, 1] == labels[2, 2, 2] != labels[4, 4, 0]


# -- threshold and input edge cases --------------------------------------------------------
def test_threshold_edge_cases():
    spacing = (1.0, 1.0, 1.0)
    p = np.full((6, 7, 8), 0.2, dtype=np.float32)
    full = PostprocessSettings(threshold=0.5, closing_mm=3.0, min_lesion_ml=0.01)
    out = postprocess(p, spacing, full)
    assert out.shape == p.shape and out.dtype == np.uint8 and out.sum() == 0
    assert MaskRefiner(p, spacing).mask(full).sum() == 0
    p[2, 3, 4] = 0.5  # equal to the threshold counts as lesion
    p[0, 0, 0] = np.nan  # NaN never does
    assert postprocess(p, spacing, PostprocessSettings(threshold=0.5)).sum() == 1
    assert postprocess(p, spacing, PostprocessSettings(threshold=0.1, closing_mm=2.0)).sum() == p.size - 1
    assert postprocess(np.zeros((1, 1, 1)), spacing).sum() == 0
    with pytest.raises(ValueError):
        postprocess(np.zeros((4, 4)), spacing)
    with pytest.raises(ValueError):
        postprocess(p, spacing, PostprocessSettings(closing_mm=-1.0))
    with pytest.raises(ValueError):
        postprocess(p, (1.0, 1.0), PostprocessSettings())


@pytest.mark.parametrize("seed", range(4))
def test_postprocess_equals_naive_full_volume_pipeline(seed):
    rng = np.random.default_rng(100 + seed)
    shape = tuple(int(n) for n in rng.integers(10, 36, 3))
    spacing = tuple(float(s) for s in rng.choice([0.5, 0.9, 1.0, 3.0], 3))
    prob = _smooth_prob(rng, shape)
    for s in (
        PostprocessSettings(0.55, 2.0, 0.0, True),
        PostprocessSettings(0.6, 3.0, 0.002, True),
        PostprocessSettings(0.5, 0.0, 0.001, False),
    ):
        np.testing.assert_array_equal(postprocess(prob, spacing, s), _naive(prob, spacing, s))


def test_mask_refiner_matches_postprocess_over_slider_moves():
    rng = np.random.default_rng(7)
    prob = _smooth_prob(rng, (14, 48, 52))
    spacing = (0.9, 0.9, 5.0)
    refiner = MaskRefiner(prob, spacing, cache_size=2)
    moves = [
        (0.5, 0.0, 0.0, True),
        (0.55, 0.0, 0.0, True),
        (0.55, 2.0, 0.0, True),
        (0.55, 3.0, 0.0, True),
        (0.55, 3.2, 0.0, True),  # same footprint as 3.0 mm: served from the cache
        (0.55, 3.0, 0.02, True),
        (0.55, 3.0, 0.2, True),
        (0.55, 3.0, 0.2, False),
        (0.6, 3.0, 0.2, False),
        (0.5, 0.0, 0.0, True),  # evicted by now: recomputed
        (0.55, 3.0, 0.02, True),
        (0.99, 3.0, 0.0, True),  # nothing passes
        (0.55, 3.0, 0.0, True),
    ]
    for t, r, v, f in moves:
        s = PostprocessSettings(threshold=t, closing_mm=r, min_lesion_ml=v, fill_holes=f)
        got = refiner.mask(s)
        np.testing.assert_array_equal(got, postprocess(prob, spacing, s), err_msg=str(s))
        got[:] = 1  # the caller may modify its mask; the cache must not see it
    s = PostprocessSettings(0.55, 3.0, 0.02, True)
    np.testing.assert_array_equal(refiner.mask(s), _naive(prob, spacing, s))


# -- report --------------------------------------------------------------------------------
def _oblique_image(array: np.ndarray) -> Image:
    rot = sitk.VersorTransform((0.3, -0.5, 0.8), 0.4)  # some oblique orientation
    return Image(array, (0.8, 0.9, 2.5), (-20.0, 35.0, -12.0), rot.GetMatrix())


def test_report_volume_count_centroid_on_oblique_grid():
    arr = np.zeros((12, 30, 40), dtype=np.uint8)
    arr[2:6, 3:10, 4:15] = 1  # 4*7*11 = 308 voxels
    arr[8:11, 20:25, 30:33] = 1  # 3*5*3 = 45 voxels
    mask = _oblique_image(arr)
    prob_arr = np.where(arr > 0, 0.6, 0.1).astype(np.float32)
    prob_arr[3, 5, 6] = 0.95
    prob = mask.with_array(prob_arr)
    rep = lesion_report(mask, prob, model={"id": "dwi-test", "version": "1.2"}, settings={"threshold": 0.5})
    voxel_ml = 0.8 * 0.9 * 2.5 / 1000
    assert rep["lesion_count"] == 2
    assert rep["total_volume_ml"] == pytest.approx(353 * voxel_ml)
    big, small = rep["lesions"]
    assert (big["id"], big["voxels"], small["id"], small["voxels"]) == (1, 308, 2, 45)
    assert big["volume_ml"] == pytest.approx(308 * voxel_ml)
    # Centroid: mean voxel index, (x, y, z) order, through SimpleITK's geometry.
    img = mask.to_sitk()
    for lesion, box in ((big, (slice(2, 6), slice(3, 10), slice(4, 15))), (small, (slice(8, 11), slice(20, 25), slice(30, 33)))):
        centre_xyz = [(s.start + s.stop - 1) / 2 for s in box[::-1]]
        expected = img.TransformContinuousIndexToPhysicalPoint(centre_xyz)
        np.testing.assert_allclose(lesion["centroid_lps_mm"], expected, atol=1e-6)
        np.testing.assert_allclose(lesion["centroid_ras_mm"], [-expected[0], -expected[1], expected[2]], atol=1e-6)
    assert big["max_probability"] == pytest.approx(0.95)
    assert big["mean_probability"] == pytest.approx((307 * 0.6 + 0.95) / 308, rel=1e-6)
    assert small["max_probability"] == pytest.approx(0.6)
    assert rep["model"] == {"id": "dwi-test", "version": "1.2"} and rep["settings"] == {"threshold": 0.5}
    assert rep["engine_version"] == strokeseg.__version__
    json.dumps(rep, allow_nan=False)


def test_report_hemisphere_from_midline_sources():
    # Identity orientation, 1 mm, origin x = -100: scanner x = 0 is far from the head centre.
    head = np.zeros((20, 40, 60), dtype=np.float32)
    zz, yy, xx = np.ogrid[:20, :40, :60]
    head[((xx - 30) / 25.0) ** 2 + ((yy - 20) / 18.0) ** 2 + ((zz - 10) / 9.0) ** 2 <= 1] = 100.0
    head[8:13, 15:25, 8:13] = 2000.0  # a very bright lesion (DWI) must not shift the head centre
    reference = Image(head, (1.0, 1.0, 1.0), (-100.0, 0.0, 0.0))
    arr = np.zeros(head.shape, dtype=np.uint8)
    arr[9:12, 18:22, 9:12] = 1  # index x = 10 -> LPS x = -90 -> RAS x = 90
    arr[9:12, 18:22, 49:52] = 1  # index x = 50 -> RAS x = 50
    arr[2:4, 18:22, 30:32] = 1  # index x = 30.5 -> RAS x = 69.5 (head centre: index 30, RAS 70)
    mask = reference.with_array(arr)
    by_x = lambda rep: {round(l["centroid_ras_mm"][0], 1): l["hemisphere"] for l in rep["lesions"]}  # noqa: E731

    rep = lesion_report(mask, reference=reference)
    assert rep["midline"]["source"] == "reference_foreground"
    assert rep["midline"]["x_ras_mm"] == pytest.approx(70.0, abs=0.5)
    assert by_x(rep) == {90.0: "right", 50.0: "left", 69.5: "midline"}

    # Metadata wins over the reference; scanner x = 0 is the last resort (everything "right").
    meta_mask = reference.with_array(arr, head_centre_lps=(-51.0, 0.0, 0.0))
    assert by_x(lesion_report(meta_mask, reference=reference)) == {90.0: "right", 50.0: "midline", 69.5: "right"}
    rep0 = lesion_report(mask)
    assert rep0["midline"]["source"] == "scanner_origin"
    assert set(by_x(rep0).values()) == {"right"}


def test_report_min_volume_nan_probability_csv_and_text():
    arr = np.zeros((10, 20, 20), dtype=np.uint8)
    arr[1:5, 1:6, 1:6] = 1  # 100 voxels = 0.1 mL at 1 mm
    arr[7:9, 15:17, 15:17] = 1  # 8 voxels
    mask = Image(arr, (1.0, 1.0, 1.0))
    prob = np.where(arr > 0, 0.7, 0.0).astype(np.float32)
    prob[2, 2, 2] = np.nan
    rep = lesion_report(mask, mask.with_array(prob), min_volume_ml=0.05, timings={"inference_s": np.float64(1.5)})
    assert rep["lesion_count"] == 1 and rep["total_volume_ml"] == pytest.approx(0.1)
    assert rep["below_min_volume"]["count"] == 1 and rep["below_min_volume"]["volume_ml"] == pytest.approx(0.008)
    assert rep["timings"] == {"inference_s": 1.5}
    assert lesion_report(mask, min_volume_ml=0.1)["lesion_count"] == 1  # exactly 0.1 mL is kept
    text = json.dumps(rep, allow_nan=False)  # NaN statistics become null, numpy scalars plain
    assert json.loads(text)["lesions"][0]["voxels"] == 100
    rows = list(csv.DictReader(io.StringIO(report_to_csv(rep))))
    assert len(rows) == 1 and tuple(rows[0]) == CSV_COLUMNS
    assert float(rows[0]["volume_ml"]) == pytest.approx(0.1) and rows[0]["hemisphere"] in ("left", "right", "midline")
    summary = format_report(rep)
    assert "0.10 mL in 1 lesion" in summary and "smaller than 0.05 mL" in summary


def test_report_empty_mask_and_grid_mismatch():
    mask = _oblique_image(np.zeros((4, 5, 6), dtype=np.uint8))
    rep = lesion_report(mask, mask.with_array(np.zeros((4, 5, 6), np.float32)), model=None)
    assert rep["lesion_count"] == 0 and rep["total_volume_ml"] == 0.0 and rep["lesions"] == []
    json.dumps(rep, allow_nan=False)
    assert report_to_csv(rep).strip() == ",".join(CSV_COLUMNS)
    assert "0.00 mL in 0 lesions" in format_report(rep)
    other = Image(np.zeros((4, 5, 6), np.float32), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="grid"):
        lesion_report(mask, other)
