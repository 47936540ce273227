"""End to end through the engine and the `strokeseg` command: outputs, geometry, batches, bad input.

A tiny random-weight model (same recipe as the bundled DWI model) keeps these fast; the bundled
model's accuracy is tested in test_bundled_model.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from engine_fixtures import make_models_dir
from strokeseg.cli import main
from strokeseg.image import Image
from strokeseg.io import read_image, write_image
from strokeseg.phantom import simulate_dwi, write_case
from strokeseg.pipeline import OUTPUT_FILES, segment_case, segment_images


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    return make_models_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    # A small procedural case keeps the suite fast; geometry is clinical (oblique, 5 mm slices).
    return simulate_dwi(11, lesion_library=None, lesion_pattern="territorial")


@pytest.fixture()
def case_dir(tmp_path, phantom) -> Path:
    return write_case(phantom, tmp_path / "cases")


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run the real console entry point in a subprocess (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "strokeseg.cli", *args], capture_output=True, text=True,
                       encoding="utf-8", errors="replace", env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    return p.returncode, p.stdout, p.stderr


def sitk_grid(path: Path) -> tuple:
    img = sitk.ReadImage(str(path))
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def assert_same_grid(a: Path, b: Path) -> None:
    ga, gb = sitk_grid(a), sitk_grid(b)
    assert ga[0] == gb[0]
    for x, y in zip(ga[1:], gb[1:]):
        np.testing.assert_allclose(x, y, atol=1e-4)


def no_temp_files(root: Path) -> bool:
    return not [p for p in root.rglob(".*") if p.name not in (".", "..")]


def test_segment_case_writes_contract_outputs_on_reference_grid(case_dir, tmp_path, models_dir):
    out = tmp_path / "out"
    res = segment_case(case_dir, out, device="cpu", models_dir=models_dir)
    assert sorted(p.name for p in out.iterdir()) == ["lesion.nii.gz", "probability.nii.gz", "report.json"]
    for name in ("lesion.nii.gz", "probability.nii.gz"):
        assert_same_grid(out / name, case_dir / "dwi.nii.gz")
    prob = sitk.ReadImage(str(out / "probability.nii.gz"))
    lesion = sitk.ReadImage(str(out / "lesion.nii.gz"))
    assert prob.GetPixelID() == sitk.sitkFloat32 and lesion.GetPixelID() == sitk.sitkUInt8
    p = sitk.GetArrayFromImage(prob)
    assert 0.0 <= p.min() and p.max() <= 1.0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["model"]["id"] == "dwi-tiny" and report["model"]["mirror_tta_axes"] == []
    assert report["settings"]["closing_mm"] == 2.0
    vox_ml = np.prod(prob.GetSpacing()) / 1000
    assert report["total_volume_ml"] == pytest.approx(sitk.GetArrayFromImage(lesion).sum() * vox_ml, rel=1e-6)
    assert {"preprocess_s", "inference_s", "postprocess_s", "total_s"} <= set(report["timings"])
    assert res.mask.same_grid(read_image(case_dir / "dwi.nii.gz"))


def test_adc_is_computed_from_b0_when_missing(phantom, tmp_path, models_dir):
    images = {"dwi": phantom.images["dwi"], "b0": phantom.images["b0"]}
    res = segment_images(images, device="cpu", models_dir=models_dir, mirror_tta=True)
    assert res.report["model"]["inputs"] == ["dwi", "adc"]
    assert res.report["model"]["mirror_tta_axes"] == ["x"]  # what the report says was averaged
    # The derived ADC follows the phantom's scanner-like ADC closely inside the brain.
    from strokeseg.preprocess import compute_adc

    adc = compute_adc(phantom.images["b0"], phantom.images["dwi"]).array
    ref = phantom.images["adc"].array
    brain = (ref > 300) & (ref < 1200)
    assert np.median(np.abs(adc[brain] - ref[brain])) < 30


def test_adc_in_other_units_gives_the_same_result(phantom, models_dir):
    """FSL/MRtrix write ADC in mm²/s, some scanners in 1e-3 or 1e-5 mm²/s: as is, a model fed
    1e-6 mm²/s reads them as zero everywhere (Dice 0.001 measured before the fix)."""
    base = segment_images({"dwi": phantom.images["dwi"], "adc": phantom.images["adc"]}, device="cpu", models_dir=models_dir)
    assert "inputs_rescaled" not in base.report
    for scale, unit in ((1e-6, "mm²/s"), (1e-3, "1e-3 mm²/s"), (0.1, "1e-5 mm²/s")):
        adc = phantom.images["adc"]
        other = adc.with_array(adc.array.astype(np.float64) * scale)
        res = segment_images({"dwi": phantom.images["dwi"], "adc": other}, device="cpu", models_dir=models_dir)
        assert res.report["inputs_rescaled"] == {"adc": f"{unit} -> 1e-6 mm²/s"}
        assert np.abs(res.probability.array - base.probability.array).max() < 1e-3


def _reoriented(img: Image, flip: tuple[bool, bool, bool], perm: tuple[int, int, int]) -> Image:
    """The same physical image stored with other axis order/directions (SimpleITK does the bookkeeping)."""
    s = sitk.PermuteAxes(sitk.Flip(img.to_sitk(), list(flip)), list(perm))
    return Image.from_sitk(s)


@pytest.mark.parametrize("flip,perm", [((True, False, False), (0, 1, 2)),      # RAS-style x flip
                                       ((True, True, False), (1, 0, 2)),       # LPS->RAS and swapped rows
                                       ((False, False, True), (0, 2, 1))])     # slices along y (coronal storage)
def test_output_follows_input_storage_and_physical_space(phantom, models_dir, flip, perm):
    base = segment_images({k: phantom.images[k] for k in ("dwi", "adc")}, device="cpu", models_dir=models_dir)
    moved = {k: _reoriented(phantom.images[k], flip, perm) for k in ("dwi", "adc")}
    res = segment_images(moved, device="cpu", models_dir=models_dir)
    assert res.probability.same_grid(moved["dwi"]) and res.mask.same_grid(moved["dwi"])
    # Same physical content -> same probabilities, compared in the original storage.
    back = sitk.Resample(res.probability.to_sitk(), phantom.images["dwi"].to_sitk(), sitk.Transform(),
                         sitk.sitkNearestNeighbor)
    diff = np.abs(sitk.GetArrayFromImage(back) - base.probability.array)
    assert np.percentile(diff, 99) < 0.05


def test_oblique_anisotropic_adc_on_other_grid_is_resampled_not_rejected(phantom, tmp_path, models_dir):
    case = tmp_path / "case"
    case.mkdir()
    write_image(phantom.images["dwi"], case / "dwi.nii.gz")
    adc = sitk.Resample(phantom.images["adc"].to_sitk(), sitk.Euler3DTransform(), sitk.sitkLinear, 0.0)
    # ADC on a coarser, differently rotated grid that still covers the head.
    ref = phantom.images["adc"].to_sitk()
    rot = sitk.Euler3DTransform((0, 0, 0), 0.1, -0.05, 0.2)
    direction = np.asarray(rot.GetMatrix()).reshape(3, 3) @ np.asarray(ref.GetDirection()).reshape(3, 3)
    grid = sitk.Image([int(s * 0.8) for s in ref.GetSize()], sitk.sitkFloat32)
    grid.SetSpacing([sp * 1.25 for sp in ref.GetSpacing()])
    grid.SetDirection(direction.ravel().tolist())
    grid.SetOrigin(ref.GetOrigin())
    adc = sitk.Resample(ref, grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    sitk.WriteImage(adc, str(case / "adc.nrrd"))
    res = segment_case(case, tmp_path / "out", device="cpu", models_dir=models_dir)
    assert res.mask.same_grid(read_image(case / "dwi.nii.gz"))


# --- the command line ----------------------------------------------------------------------------

def test_cli_models_and_evaluate(models_dir, case_dir, tmp_path, capsys):
    assert main(["models", "--models-dir", str(models_dir)]) == 0
    assert "dwi-tiny" in capsys.readouterr().out
    assert main(["evaluate", "--pred", str(case_dir / "lesion.nii.gz"), "--truth", str(case_dir / "lesion.nii.gz")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metrics"]["dice"] == 1.0


def _bad_case(tmp_path: Path, phantom, problem: str) -> tuple[Path, str]:
    """A case folder with one specific defect; returns it and a word the error must contain."""
    case = tmp_path / f"bad-{problem}"
    case.mkdir()
    dwi, adc = phantom.images["dwi"], phantom.images["adc"]
    write_image(dwi, case / "dwi.nii.gz")
    if problem == "corrupt":
        data = (case / "dwi.nii.gz").read_bytes()
        (case / "dwi.nii.gz").write_bytes(data[: len(data) // 3])
        write_image(adc, case / "adc.nii.gz")
        return case, "dwi.nii.gz"
    if problem == "not-image":
        (case / "adc.nii.gz").write_text("this is a text file, not an image\n")
        return case, "adc.nii.gz"
    if problem == "4d":
        four = Image(np.stack([adc.array] * 4), adc.spacing, adc.origin, adc.direction)
        write_image(four, case / "adc.nii.gz")
        return case, "adc.nii.gz"
    if problem == "zero":
        write_image(adc.with_array(np.zeros_like(adc.array)), case / "adc.nii.gz")
        return case, "adc.nii.gz"
    if problem == "nan":
        a = adc.array.astype(np.float32).copy()
        a[3, 10:20, 10:20] = np.nan
        write_image(adc.with_array(a), case / "adc.nrrd")
        return case, "adc.nrrd"
    if problem == "wrong-modality":  # the DWI given as ADC
        write_image(dwi, case / "adc.nii.gz")
        return case, "adc.nii.gz"
    if problem == "far-away":
        write_image(Image(adc.array, adc.spacing, tuple(o + 2000.0 for o in adc.origin), adc.direction), case / "adc.nii.gz")
        return case, "adc.nii.gz"
    if problem == "spacing":
        write_image(Image(adc.array, (0.9, 0.9, 500.0), adc.origin, adc.direction), case / "adc.nii.gz")
        return case, "adc.nii.gz"
    if problem == "missing":
        return case, "adc"
    if problem == "one-slice":  # a single slice: a 3D model would invent lesions (~100x the volume's)
        write_image(Image(adc.array[3:4], adc.spacing, adc.origin, adc.direction), case / "adc.nii.gz")
        return case, "adc.nii.gz: covers only"
    raise AssertionError(problem)


@pytest.mark.parametrize("family, slices, refused", [("dwi", 1, True), ("dwi", 2, True), ("dwi", 5, False),
                                                     ("ctp", 1, True), ("ctp", 2, False), ("mrp", 2, False)])
def test_coverage_rule_thin_volumes(family, slices, refused):
    """A 5 mm slice or two is too little anatomy for the DWI/T1 models; perfusion slabs of 2 slices
    (ISLES 2018 has them) are accepted, a single perfusion slice is not."""
    from strokeseg.errors import InputError
    from strokeseg.pipeline import _check_coverage
    im = Image(np.zeros((slices, 64, 64), np.float32), (2.0, 2.0, 5.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    if refused:
        with pytest.raises(InputError, match="covers only"):
            _check_coverage({"cbf": im}, family)
    else:
        _check_coverage({"cbf": im}, family)


@pytest.mark.parametrize("problem", ["corrupt", "not-image", "4d", "zero", "nan", "wrong-modality", "far-away",
                                     "spacing", "missing", "one-slice"])
def test_cli_bad_input_one_line_exit_2_no_output(problem, phantom, tmp_path, models_dir):
    case, word = _bad_case(tmp_path, phantom, problem)
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("segment", str(case), "--out", str(out), "--device", "cpu",
                                   "--models-dir", str(models_dir))
    assert code == 2, stderr
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert word in lines[0]
    assert not out.exists() or not any(out.iterdir())
    assert no_temp_files(tmp_path)


def test_cli_missing_case_folder_and_unwritable_output(tmp_path, case_dir, models_dir):
    code, _, err = run_cli("segment", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--models-dir", str(models_dir))
    assert code == 2 and "nope" in err and len(err.strip().splitlines()) == 1
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_cli("segment", str(case_dir), "--out", str(blocker / "out"), "--device", "cpu",
                           "--models-dir", str(models_dir))
    assert code == 2 and "file" in err and "Traceback" not in err


def test_cli_never_replaces_files_it_did_not_write(tmp_path, case_dir, models_dir):
    """--out pointed at the case folder would replace its lesion.nii.gz (a reference or a
    hand-edited mask): refused before any work; StrokeSeg's own earlier outputs are replaced."""
    case = tmp_path / "case"
    shutil.copytree(case_dir, case)
    mask_bytes = (case / "lesion.nii.gz").read_bytes()
    code, _, err = run_cli("segment", str(case), "--out", str(case), "--device", "cpu", "--models-dir", str(models_dir))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "lesion.nii.gz: exists and is not a StrokeSeg output" in err
    assert (case / "lesion.nii.gz").read_bytes() == mask_bytes and not (case / "report.json").exists()
    out = tmp_path / "out"
    for _ in range(2):  # a re-run replaces its own outputs
        code, _, err = run_cli("segment", str(case), "--out", str(out), "--device", "cpu", "--models-dir", str(models_dir))
        assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)


def _corrupt_model_dir(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    w = next(dst.rglob("fold0.safetensors"))
    if how == "tampered":
        data = bytearray(w.read_bytes())
        data[-10] ^= 0xFF
        w.write_bytes(bytes(data))
    else:  # a pickle payload that would create a marker file if unpickled, with its hash in the card
        import hashlib
        import pickle

        marker = dst / "PWNED"

        class Payload:
            def __reduce__(self):
                return (Path.touch, (marker,))

        w.write_bytes(pickle.dumps(Payload()))
        card_path = w.parent / "card.json"
        card = json.loads(card_path.read_text(encoding="utf-8"))
        card["weights"][0]["sha256"] = hashlib.sha256(w.read_bytes()).hexdigest()
        card_path.write_text(json.dumps(card))
    return dst


@pytest.mark.parametrize("how,word", [("tampered", "SHA-256"), ("pickle", "refusing to unpickle")])
def test_cli_refuses_tampered_or_pickled_model(how, word, models_dir, case_dir, tmp_path):
    bad = _corrupt_model_dir(models_dir, tmp_path / "models", how)
    out = tmp_path / "out"
    code, _, err = run_cli("segment", str(case_dir), "--out", str(out), "--device", "cpu", "--models-dir", str(bad))
    assert code == 2 and word in err and "fold0.safetensors" in err and len(err.strip().splitlines()) == 1
    assert not (bad / "PWNED").exists()
    assert not out.exists() or not any(out.iterdir())


def _batch_dir(tmp_path: Path, phantom, n_good: int, broken: bool) -> Path:
    root = tmp_path / "batch"
    for i in range(n_good):
        c = root / f"case{i:02d}"
        c.mkdir(parents=True)
        for k in ("dwi", "adc"):
            write_image(phantom.images[k], c / f"{k}.nii.gz")
    if broken:
        c = root / "case-broken"
        c.mkdir(parents=True)
        write_image(phantom.images["dwi"], c / "dwi.nii.gz")
        (c / "adc.nii.gz").write_text("garbage")
    return root


def test_batch_progress_failures_and_resume(phantom, tmp_path, models_dir):
    root = _batch_dir(tmp_path, phantom, 2, broken=True)
    out = tmp_path / "out"
    code, stdout, err = run_cli("segment", "--input-dir", str(root), "--out", str(out), "--device", "cpu",
                                "--models-dir", str(models_dir))
    assert code == 1, err  # a failed case is reported, the others are done
    assert "case-broken: FAILED" in err and "adc.nii.gz" in err
    summary = json.loads((out / "batch_summary.json").read_text(encoding="utf-8"))
    assert summary["finished"] == 2 and summary["failed"][0]["case"] == "case-broken"
    assert (out / "case00" / "report.json").is_file() and (out / "case01" / "report.json").is_file()
    assert not (out / "case-broken").exists()
    before = (out / "case00" / "report.json").stat().st_mtime_ns
    code, stdout, err = run_cli("segment", "--input-dir", str(root), "--out", str(out), "--device", "cpu",
                                "--models-dir", str(models_dir))
    assert "0 segmented, 2 already done, 1 failed" in stdout
    assert (out / "case00" / "report.json").stat().st_mtime_ns == before


def test_batch_bids_layout(phantom, tmp_path, models_dir):
    root = tmp_path / "bids"
    (root / "dataset_description.json").parent.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.8.0"}')
    d = root / "sub-01" / "ses-01" / "dwi"
    d.mkdir(parents=True)
    write_image(phantom.images["dwi"], d / "sub-01_ses-01_dwi.nii.gz")
    write_image(phantom.images["adc"], d / "sub-01_ses-01_adc.nii.gz")
    deriv = root / "derivatives" / "sub-01" / "ses-01"
    deriv.mkdir(parents=True)
    write_image(phantom.lesion, deriv / "sub-01_ses-01_msk.nii.gz")
    code, stdout, err = run_cli("segment", "--input-dir", str(root), "--out", str(tmp_path / "out"), "--device", "cpu",
                                "--models-dir", str(models_dir), "-q")
    assert code == 0, err
    assert (tmp_path / "out" / "sub-01_ses-01" / "lesion.nii.gz").is_file()


def test_batch_ctrl_c_keeps_finished_cases_and_no_partial_files(phantom, tmp_path, models_dir):
    root = _batch_dir(tmp_path, phantom, 6, broken=False)
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "strokeseg.cli", "segment", "--input-dir", str(root), "--out", str(out),
                          "--device", "cpu", "--models-dir", str(models_dir)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                         errors="replace", env={**os.environ, "OMP_NUM_THREADS": "1"},
                         # as from a terminal: a test run started in the background (`cmd &`) ignores
                         # SIGINT, and an ignored SIGINT is inherited and never reaches Python
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "case00" / "report.json").exists():
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2, err
    assert "interrupted" in err and "resume" in err and "Traceback" not in err
    finished = [c for c in out.iterdir() if c.is_dir() and (c / "report.json").exists()]
    assert finished, "the case finished before Ctrl-C must be kept"
    for c in out.iterdir():
        if c.is_dir():  # every case folder is complete: all three outputs or nothing
            assert sorted(f.name for f in c.iterdir()) == ["lesion.nii.gz", "probability.nii.gz", "report.json"]
    assert no_temp_files(out)


def test_cli_phantom_writes_deterministic_case_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["phantom", "--modality", "dwi", "--seed", "5", "--out", str(a), "--count", "2", "-q"]) == 0
    assert main(["phantom", "--modality", "dwi", "--seed", "6", "--out", str(b), "-q"]) == 0
    cases = sorted(p.name for p in a.iterdir())
    assert cases == ["dwi-00005", "dwi-00006"]
    for name in ("dwi.nii.gz", "b0.nii.gz", "adc.nii.gz", "lesion.nii.gz", "case.json"):
        assert (a / "dwi-00006" / name).is_file()
    info = json.loads((a / "dwi-00006" / "case.json").read_text(encoding="utf-8"))
    assert info["seed"] == 6
    # case k of a batch is the same patient as a single case with seed + k
    np.testing.assert_array_equal(read_image(a / "dwi-00006" / "dwi.nii.gz").array,
                                  read_image(b / "dwi-00006" / "dwi.nii.gz").array)


def test_cli_phantom_option_that_does_not_apply_is_a_clear_error(tmp_path, capsys):
    assert main(["phantom", "--modality", "dwi", "--skull-strip", "--seed", "1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dwi" in err[0] and "--skull-strip" in err[0]
    assert not (tmp_path / "x").exists()
    assert main(["phantom", "--modality", "t1", "--residue", "gamma", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--residue applies to ctp and pwi" in err[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("modality", ["dwi", "ctp"])
@pytest.mark.parametrize("problem, word", [("seed", "--seed must be 0 or more"), ("out-file", "--out is a file")])
def test_cli_phantom_bad_arguments_fail_before_simulating(modality, problem, word, tmp_path, capsys):
    out = tmp_path / "taken.nii.gz"
    out.write_bytes(b"the user's file")
    args = ["phantom", "--modality", modality, "-q", "--seed", "-5" if problem == "seed" else "1",
            "--out", str(out if problem == "out-file" else tmp_path / "x")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and word in err[0], err  # -q: no progress bar either, so nothing was simulated
    assert out.read_bytes() == b"the user's file" and not (tmp_path / "x").exists()


def test_cli_phantom_residue_reaches_the_perfusion_generator(tmp_path, monkeypatch):
    import strokeseg.phantom.perfusion as pp
    from strokeseg.cli import build_parser

    # The parser lists the families literally (it must not import the simulator to start up).
    phantom = next(a for a in build_parser()._subparsers._group_actions[0].choices["phantom"]._actions if a.dest == "residue")
    assert tuple(phantom.choices) == pp.RESIDUES

    seen = {}
    monkeypatch.setattr(pp, "generate_perfusion_cases", lambda *a, **kw: seen.update(kw) or [])
    assert main(["phantom", "--modality", "ctp", "--residue", "box", "-q", "--out", str(tmp_path / "x")]) == 0
    assert seen["residue"] == "box"
    seen.clear()
    assert main(["phantom", "--modality", "pwi", "-q", "--out", str(tmp_path / "x")]) == 0
    assert "residue" not in seen  # the generator's default
