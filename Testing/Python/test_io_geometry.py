"""Geometry of strokeseg.image / strokeseg.io checked against SimpleITK on awkward inputs:
oblique directions, anisotropic voxels, flipped and left-handed axes, non-zero origins."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from engine_fixtures import write_dicom_series
from strokeseg import io
from strokeseg.errors import InputError, OutputError
from strokeseg.image import Image, grid_with_spacing, resample_to


def _rot(axis: int, deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    i, j = [a for a in range(3) if a != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


DIRECTIONS = {
    "oblique": _rot(0, 23.0) @ _rot(2, -17.0),  # rotations about two axes
    "flipped": np.diag([-1.0, -1.0, 1.0]),  # RAS-style axes in LPS: negative diagonal
    "left_handed": np.diag([1.0, 1.0, -1.0]) @ _rot(1, 12.0),  # det = -1 (slices stored top-down)
}
SPACING = (0.7, 0.9, 5.5)
ORIGIN = (-91.3, 12.7, 40.2)


def _image(direction: np.ndarray, shape=(7, 13, 17), dtype=np.float32, seed=0) -> Image:
    rng = np.random.default_rng(seed)
    arr = (rng.random(shape) * 1000).astype(dtype)
    return Image(arr, SPACING, ORIGIN, tuple(direction.ravel()))


def _assert_geometry(a, b, tol=1e-5) -> None:
    """a, b: Image or sitk.Image."""
    def geo(x):
        if isinstance(x, Image):
            return x.spacing, x.origin, x.direction
        return x.GetSpacing()[:3], x.GetOrigin()[:3], np.asarray(x.GetDirection()).reshape(x.GetDimension(), -1)[:3, :3].ravel()

    for u, v in zip(geo(a), geo(b)):
        np.testing.assert_allclose(u, v, atol=tol)


@pytest.mark.parametrize("kind", sorted(DIRECTIONS))
def test_to_from_sitk_and_index_to_physical(kind):
    img = _image(DIRECTIONS[kind])
    s = img.to_sitk()
    assert s.GetSize() == img.size == (17, 13, 7)
    _assert_geometry(img, s, tol=0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(s), img.array)
    back = Image.from_sitk(s)
    assert back.same_grid(img) and np.array_equal(back.array, img.array)

    rng = np.random.default_rng(1)
    ijk = rng.uniform(-2, 18, size=(25, 3))
    ours = img.index_to_physical(ijk)
    ref = np.array([s.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in ijk])
    np.testing.assert_allclose(ours, ref, atol=1e-9)
    np.testing.assert_allclose(img.physical_to_index(ref), ijk, atol=1e-9)
    ref_idx = np.array([s.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in ref])
    np.testing.assert_allclose(img.physical_to_index(ref), ref_idx, atol=1e-9)


def test_voxel_volume_and_corners():
    img = _image(DIRECTIONS["oblique"])
    assert img.voxel_volume_ml == pytest.approx(0.7 * 0.9 * 5.5 / 1000)
    c = img.corners()
    # The box diagonal is the same in any orientation.
    ext = np.asarray(SPACING) * np.asarray(img.size)
    d = np.linalg.norm(c[:, None, :] - c[None, :, :], axis=-1).max()
    assert d == pytest.approx(float(np.linalg.norm(ext)))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"])
@pytest.mark.parametrize("kind", sorted(DIRECTIONS))
def test_round_trip_keeps_array_and_geometry(tmp_path, suffix, kind):
    img = _image(DIRECTIONS[kind], dtype=np.int16 if suffix == ".nrrd" else np.float32)
    path = io.write_image(img, tmp_path / f"vol{suffix}")
    back = io.read_image(path)
    direct = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(back.array, img.array)
    assert back.array.dtype == img.array.dtype
    _assert_geometry(back, direct, tol=0)  # read_image adds nothing to SimpleITK's geometry
    # NIfTI stores the rotation as a float32 quaternion: allow that precision.
    _assert_geometry(back, img, tol=2e-5 if suffix.startswith(".nii") else 1e-9)
    assert back.meta["source"] == str(path)


def test_mhd_writes_header_and_data_file_only(tmp_path):
    img = _image(DIRECTIONS["oblique"])
    io.write_image(img, tmp_path / "vol.mhd")
    io.write_image(img, tmp_path / "vol.mhd")  # overwrite leaves no orphan data file
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0] == "vol.mhd" and names[1].startswith("vol.")
    assert np.array_equal(io.read_image(tmp_path / "vol.mhd").array, img.array)


@pytest.mark.parametrize("linear", [True, False])
def test_resample_to_oblique_grid_equals_sitk(linear):
    src = _image(DIRECTIONS["oblique"], shape=(9, 15, 18))
    ref_dir = _rot(1, 31.0) @ _rot(0, -9.0)
    ref_sp = np.array([1.1, 1.3, 2.0])
    centre = src.index_to_physical(((np.asarray(src.size) - 1) / 2.0)[None])[0]
    ref_origin = centre - ref_dir @ (ref_sp * (np.array([14, 12, 11]) - 1) / 2.0) + 0.37  # off-centre a little
    ref = Image(np.zeros((11, 12, 14), np.uint8), tuple(ref_sp), tuple(ref_origin), tuple(ref_dir.ravel()))
    ours = resample_to(src, ref, linear=linear)

    s_ref = sitk.Image(14, 12, 11, sitk.sitkUInt8)
    s_ref.SetSpacing(ref.spacing)
    s_ref.SetOrigin(ref.origin)
    s_ref.SetDirection(ref.direction)
    interp = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
    expected = sitk.Resample(src.to_sitk(), s_ref, sitk.Transform(), interp, 0.0, sitk.sitkFloat32)
    assert ours.same_grid(ref)
    np.testing.assert_allclose(ours.array, sitk.GetArrayFromImage(expected), atol=1e-4)
    assert np.count_nonzero(ours.array) > 0.2 * ours.array.size  # the grids overlap: a real check


def test_resample_bool_mask_and_4d_series():
    src = _image(DIRECTIONS["flipped"])
    ref = grid_with_spacing(src, (1.5, 1.5, 3.0))
    mask = src.with_array(src.array > 500)
    out = resample_to(mask, ref, linear=False)
    assert out.same_grid(ref) and set(np.unique(out.array)) <= {0, 1}
    frames = np.stack([src.array, 2 * src.array, 3 * src.array])
    series = Image(frames, src.spacing, src.origin, src.direction, {"times": [0.0, 1.5, 3.0]})
    out4 = resample_to(series, ref)
    assert out4.is_4d and out4.array.shape[0] == 3 and out4.meta["times"] == [0.0, 1.5, 3.0]
    np.testing.assert_allclose(out4.array[1], resample_to(series.frame(1), ref).array, rtol=1e-6)


@pytest.mark.parametrize("new_spacing", [(1.4, 1.8, 2.75), (1.0, 1.0, 1.0), (2.3, 0.5, 7.0)])
def test_grid_with_spacing_covers_same_box(new_spacing):
    img = _image(DIRECTIONS["oblique"], shape=(8, 20, 24))
    grid = grid_with_spacing(img, new_spacing)
    assert grid.spacing == new_spacing and grid.direction == img.direction
    centre = lambda im: im.index_to_physical(((np.asarray(im.size) - 1) / 2.0)[None])[0]  # noqa: E731
    np.testing.assert_allclose(centre(grid), centre(img), atol=1e-9)
    # Per axis, the extent differs by less than one new voxel (rounding of the voxel count).
    old_ext = np.asarray(img.spacing) * img.size
    new_ext = np.asarray(grid.spacing) * grid.size
    assert np.all(np.abs(new_ext - old_ext) <= np.asarray(new_spacing) / 2 + 1e-9)
    if new_spacing == (1.4, 1.8, 2.75):  # exact multiples: identical box
        np.testing.assert_allclose(np.sort(grid.corners(), 0), np.sort(img.corners(), 0), atol=1e-9)


def test_4d_nifti_reads_as_4d_with_times(tmp_path):
    base = _image(DIRECTIONS["oblique"], shape=(4, 6, 5))
    times = [2.0, 3.5, 5.0, 6.5, 8.0]
    series = Image(np.stack([base.array + t for t in range(5)]), base.spacing, base.origin, base.direction,
                   {"times": times})
    back = io.read_image(io.write_image(series, tmp_path / "ctp.nii.gz"))
    assert back.is_4d and back.array.shape == (5, 4, 6, 5)
    np.testing.assert_allclose(back.meta["times"], times)
    _assert_geometry(back, base, tol=2e-5)
    np.testing.assert_array_equal(back.frame(3).array, series.array[3])


def test_4d_nifti_in_milliseconds_reads_seconds(tmp_path):
    nib = pytest.importorskip("nibabel")
    arr = np.random.default_rng(0).random((5, 4, 3, 6)).astype(np.float32)
    nimg = nib.Nifti1Image(arr, np.diag([2.0, 2.0, 3.0, 1.0]))
    nimg.header.set_xyzt_units("mm", "msec")
    nimg.header["pixdim"][4] = 1500.0
    nib.save(nimg, tmp_path / "pwi.nii.gz")
    back = io.read_image(tmp_path / "pwi.nii.gz")
    assert back.is_4d and back.array.shape == (6, 3, 4, 5)
    np.testing.assert_allclose(back.meta["times"], np.arange(6) * 1.5)


# -- DICOM ---------------------------------------------------------------------------------
def test_dicom_series_folder_reads_back_geometry_and_meta(tmp_path):
    img = _image(DIRECTIONS["oblique"], shape=(6, 14, 16), dtype=np.int16)
    tags = {"0008|0060": "MR", "0008|103e": "ep2d_diff_3scan_trace_p2_ADC",
            "0008|0008": "DERIVED\\PRIMARY\\DIFFUSION\\ADC", "0018|9087": "1000", "0018|0080": "5200", "0018|0081": "89"}
    write_dicom_series(img, tmp_path / "adc", tags)
    back = io.read_image(tmp_path / "adc")
    assert back.array.shape == img.array.shape
    np.testing.assert_array_equal(back.array, img.array)
    _assert_geometry(back, img, tol=1e-6)
    m = back.meta
    assert m["series_description"] == "ep2d_diff_3scan_trace_p2_ADC" and m["dicom_modality"] == "MR"
    assert float(m["b_value"]) == 1000 and "ADC" in m["image_type"].split("\\")
    assert float(m["repetition_time"]) == 5200 and float(m["echo_time"]) == 89
    assert len(m["dicom_files"]) == 6 and m["source"] == str(tmp_path / "adc")


def test_dicom_folder_problems(tmp_path):
    img = _image(DIRECTIONS["flipped"], shape=(3, 8, 8), dtype=np.int16)
    two = tmp_path / "two"
    write_dicom_series(img, two, {"0008|0060": "MR"}, uid_root="1.2.826.0.1.3680043.8.498.11")
    write_dicom_series(img, two / "tmp", {"0008|0060": "MR"}, uid_root="1.2.826.0.1.3680043.8.498.12")
    for f in (two / "tmp").iterdir():
        f.rename(two / f"b_{f.name}")
    with pytest.raises(InputError, match="2 DICOM series"):
        io.read_image(two)
    (tmp_path / "notdicom").mkdir()
    (tmp_path / "notdicom" / "readme.txt").write_text("hello")
    with pytest.raises(InputError, match="no DICOM series") as e:
        io.read_image(tmp_path / "notdicom")
    assert "notdicom" in str(e.value) and "\n" not in str(e.value)


def test_dicom_series_with_uneven_slices_is_refused(tmp_path):
    """ITK would stack a series with a missing file at one averaged spacing (5.5 -> 6.19 mm,
    half the volume moved by up to 4.8 mm) or interleave two volumes, with only a console warning."""
    img = _image(DIRECTIONS["oblique"], shape=(10, 8, 8), dtype=np.int16)
    gap = tmp_path / "gap"
    write_dicom_series(img, gap, {"0008|0060": "MR"}, uid_root="1.2.826.0.1.3680043.8.498.21")
    assert io.read_image(gap).same_grid(img)  # complete: reads back on its own grid
    (gap / "IM0005.dcm").unlink()
    with pytest.raises(InputError, match=r"gap: slices are not evenly spaced \(step 5.50 mm, but 11.00 mm after slice 5 of 9\)"):
        io.read_image(gap)
    twice = tmp_path / "twice"
    write_dicom_series(img, twice, {"0008|0060": "MR"}, uid_root="1.2.826.0.1.3680043.8.498.22")
    for k, f in enumerate(sorted(twice.iterdir())):  # a second volume (another b-value) at the same positions
        ds = sitk.ReadImage(str(f))
        ds.SetMetaData("0020|0013", str(100 + k))
        ds.SetMetaData("0008|0018", ds.GetMetaData("0008|0018") + ".9")
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(twice / f"B{k:04d}.dcm"))
        writer.Execute(ds)
    with pytest.raises(InputError, match="repeated slice positions: several volumes in one series"):
        io.read_image(twice)


# -- reading problems ----------------------------------------------------------------------
def test_nifti_whose_qform_and_sform_disagree_is_refused(tmp_path):
    """ITK reads the qform of this file, nibabel (and FSL) its sform, 10 mm away: ambiguous."""
    import nibabel as nib

    data = np.arange(10 * 12 * 8, dtype=np.float32).reshape(10, 12, 8)
    q = np.diag([1.0, 1.0, 2.0, 1.0])
    q[:3, 3] = [-5.0, -6.0, -8.0]
    agree = nib.Nifti1Image(data, None)
    agree.set_qform(q, code=1)
    agree.set_sform(q, code=2)
    nib.save(agree, str(tmp_path / "agree.nii.gz"))
    img = io.read_image(tmp_path / "agree.nii.gz")
    assert np.allclose(img.origin, (5.0, 6.0, -8.0))  # RAS (-5, -6, -8) in LPS
    shifted = q.copy()
    shifted[0, 3] += 10.0
    both = nib.Nifti1Image(data, None)
    both.set_qform(q, code=1)
    both.set_sform(shifted, code=2)
    nib.save(both, str(tmp_path / "both.nii.gz"))
    with pytest.raises(InputError, match=r"both.nii.gz: its qform and sform place the volume 10.0 mm apart"):
        io.read_image(tmp_path / "both.nii.gz")
    only_qform = nib.Nifti1Image(data, None)
    only_qform.set_qform(q, code=1)
    only_qform.set_sform(shifted, code=0)  # sform not in use: the qform is the only placement
    nib.save(only_qform, str(tmp_path / "qform.nii.gz"))
    assert io.read_image(tmp_path / "qform.nii.gz").same_grid(img)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_truncated_nifti_is_refused(tmp_path, suffix):
    """ITK reads a truncated NIfTI silently (garbage voxels); read_image must not."""
    path = io.write_image(_image(DIRECTIONS["oblique"], shape=(10, 30, 30)), tmp_path / f"dwi{suffix}")
    data = path.read_bytes()
    for frac in (0.5, 0.98):
        bad = tmp_path / f"cut{suffix}"
        bad.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(InputError, match="truncated") as e:
            io.read_image(bad)
        assert str(e.value).startswith(str(bad)) and "\n" not in str(e.value)
    assert io.read_image(path).array.shape == (10, 30, 30)  # the complete file still reads


def test_multi_member_gzip_nifti_reads(tmp_path):
    """A valid .nii.gz of two concatenated gzip members (trailer size mismatch) is accepted."""
    import gzip

    path = io.write_image(_image(DIRECTIONS["oblique"]), tmp_path / "raw.nii", compress=False)
    raw = path.read_bytes()
    cat = tmp_path / "cat.nii.gz"
    cat.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    np.testing.assert_array_equal(io.read_image(cat).array, io.read_image(path).array)


# -- writing problems ----------------------------------------------------------------------
def test_unwritable_output_folder_raises_output_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    img = _image(DIRECTIONS["oblique"])
    for target in (blocker / "out.nii.gz", blocker / "sub" / "out.nii.gz"):
        with pytest.raises(OutputError) as e:
            io.write_image(img, target)
        assert "a_file" in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(OutputError):
            io.write_text("{}", target.with_name("report.json"))
    assert blocker.read_text(encoding="utf-8") == "not a folder"


def test_read_only_folder_raises_output_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: permissions do not block writes")
        with pytest.raises(OutputError, match="not writable"):
            io.write_image(_image(DIRECTIONS["oblique"]), ro / "out.nii.gz")
    finally:
        ro.chmod(0o700)


def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    img = _image(DIRECTIONS["oblique"])
    with pytest.raises(OutputError, match="could not be written") as e:
        io.write_image(img, tmp_path / "out.unknownformat")
    assert "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []

    # A writer that dies half way (disk full, interrupted): partial files must vanish.
    def half_write(image, name, *args):
        Path(name).write_bytes(b"\x1f\x8b partial")
        Path(name).with_suffix(".raw").write_bytes(b"partial data")
        raise exc

    monkeypatch.setattr(io.sitk, "WriteImage", half_write)
    for exc, expected in ((RuntimeError("ITK ERROR: No space left on device"), OutputError), (KeyboardInterrupt(), KeyboardInterrupt)):
        with pytest.raises(expected):
            io.write_image(img, tmp_path / "out.mhd")
        assert list(tmp_path.iterdir()) == []


def test_written_files_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        t = io.write_text("{}", tmp_path / "report.json")
        i = io.write_image(_image(DIRECTIONS["oblique"]), tmp_path / "lesion.nii.gz")
    finally:
        os.umask(old)
    assert t.stat().st_mode & 0o777 == 0o644
    assert i.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lesion.nii.gz", "report.json"]


def test_bool_and_float16_arrays_write(tmp_path):
    img = _image(DIRECTIONS["oblique"])
    mask = img.with_array(img.array > 500)
    back = io.read_image(io.write_image(mask, tmp_path / "lesion.nii.gz"))
    assert back.array.dtype == np.uint8 and np.array_equal(back.array.astype(bool), mask.array)
    half = img.with_array(img.array.astype(np.float16))
    back = io.read_image(io.write_image(half, tmp_path / "half.nrrd"))
    np.testing.assert_allclose(back.array, half.array.astype(np.float32))


def test_5d_isles_pwi_with_singleton_axis_reads_as_4d(tmp_path):
    """ISLES'17/'18 store 4D PWI as (x, y, z, 1, t) NIfTI; the engine sees a 4D series."""
    import nibabel as nib

    data = np.random.default_rng(0).random((6, 5, 4, 1, 9)).astype(np.float32)  # x, y, z, 1, t
    path = tmp_path / "SMIR.Brain.XX.O.CT_4DPWI.1.nii"
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 5.0, 1.0])), str(path))
    img = io.read_image(path)
    assert img.is_4d and img.array.shape == (9, 4, 5, 6)
    np.testing.assert_allclose(img.array[3], data[..., 0, 3].transpose(2, 1, 0))
    np.testing.assert_allclose(img.spacing, (2.0, 2.0, 5.0))
