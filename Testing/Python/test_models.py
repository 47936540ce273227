"""Model registry, model cards, safe weight loading and the network registry."""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from strokeseg import models, networks
from strokeseg.errors import ModelError, OutputError

TINY_UNET = {
    "name": "monai.UNet",
    "args": {"spatial_dims": 3, "in_channels": 2, "out_channels": 1, "channels": [4, 8], "strides": [2]},
}
NO_WEIGHTS = [{"file": "fold0.safetensors", "sha256": "0" * 64}]  # for cards whose weights are never read


def card_dict(
    model_id: str = "dwi-unet",
    family: str = "dwi",
    required: tuple[str, ...] = ("dwi", "adc"),
    optional: tuple[str, ...] = (),
    derivable: dict[str, list[str]] | None = None,
    network: dict[str, Any] | None = None,
    weights: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    card: dict[str, Any] = {
        "id": model_id,
        "version": "1.2.0",
        "name": f"Test model {model_id}",
        "description": "Tiny network for the registry tests",
        "family": family,
        "inputs": {"required": list(required), "optional": list(optional)},
        "target_spacing": [1.5, 1.5, 1.5],
        "patch_size": [16, 16, 16],
        "normalisation": {k: {"method": "zscore"} for k in (*required, *optional)},
        "network": copy.deepcopy(network or TINY_UNET),
        "output": {"activation": "sigmoid", "channels": 1, "foreground_channel": 0},
        "inference": {"overlap": 0.5, "blend": "gaussian", "sw_batch_size": 2, "mirror_tta": False},
        "postprocess": {"threshold": 0.45, "closing_mm": 1.0, "min_lesion_ml": 0.05},
        "weights": weights if weights is not None else copy.deepcopy(NO_WEIGHTS),
        "training": {
            "data": "200 DWI phantoms",
            "command": "strokeseg-train --recipe dwi",
            "commit": "abc1234",
            "seed": 0,
            "duration_s": 12.5,
            "device": "cpu",
        },
        "validation": {"dataset": "50 DWI phantoms", "n_cases": 50, "metrics": {"dice": 0.8123, "lesion_f1": 0.7}},
        "licence": "Apache-2.0",
        "created": "2025-01-31",
    }
    if derivable:
        card["derivable"] = derivable
    return card


def write_json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
    return path


def write_registry(root: Path, cards: list[dict[str, Any]]) -> Path:
    for card in cards:
        write_json(root / card["id"] / "card.json", card)
    entries = [{"id": c["id"], "folder": c["id"], "family": c["family"]} for c in cards]
    write_json(root / "models.json", {"schema_version": 1, "models": entries})
    return root


def trained_model(root: Path, n_folds: int = 1, **kw: Any) -> models.ModelCard:
    """A registry with one model whose fold weights are real (random-initialised) networks."""
    folder = root / kw.get("model_id", "dwi-unet")
    spec = kw.get("network") or TINY_UNET
    weights = []
    for fold in range(n_folds):
        torch.manual_seed(fold)
        digest = models.save_weights(networks.build(spec["name"], spec["args"]), folder / f"fold{fold}.safetensors")
        weights.append({"file": f"fold{fold}.safetensors", "sha256": digest})
    write_registry(root, [card_dict(weights=weights, **kw)])
    return models.load_registry(root)[0]


def replace_weights(card: models.ModelCard, payload: bytes) -> Path:
    """Put ``payload`` where fold 0's weights were and record its true SHA-256 in the card."""
    path = card.folder / card.weights[0]["file"]
    path.write_bytes(payload)
    card.raw["weights"][0]["sha256"] = hashlib.sha256(payload).hexdigest()
    return path


@pytest.fixture()
def loading_spy(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every attempt to deserialise weights; any unpickling fails the test outright."""
    calls: list[str] = []
    real_load = safetensors.torch.load

    def spy(data: bytes) -> dict[str, torch.Tensor]:
        calls.append("safetensors")
        return real_load(data)

    def forbidden(*_a: Any, **_k: Any) -> None:
        calls.append("unpickle")
        raise AssertionError("weights loading must never unpickle")

    monkeypatch.setattr(safetensors.torch, "load", spy)
    monkeypatch.setattr(safetensors.torch, "load_file", forbidden)  # load() of the hashed bytes only
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    return calls


# -- round trip ----------------------------------------------------------------------------


def test_save_then_load_model_gives_identical_outputs(tmp_path: Path) -> None:
    card = trained_model(tmp_path, n_folds=2)
    x = torch.randn(1, 2, 16, 16, 16, generator=torch.Generator().manual_seed(7))
    expected = []
    for fold in range(2):
        torch.manual_seed(fold)
        net = networks.build(TINY_UNET["name"], TINY_UNET["args"]).eval()
        with torch.no_grad():
            expected.append(net(x))
    nets = models.load_model(card)
    assert len(nets) == 2
    assert all(not n.training and not any(p.requires_grad for p in n.parameters()) for n in nets)
    with torch.no_grad():
        got = [n(x) for n in nets]
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert not torch.equal(got[0], got[1])  # folds really are different networks
    assert models.sha256_file(card.folder / "fold1.safetensors") == card.weights[1]["sha256"]


def test_save_weights_is_atomic_and_refuses_unwritable_target(tmp_path: Path) -> None:
    net = networks.build(TINY_UNET["name"], TINY_UNET["args"])
    target = tmp_path / "w.safetensors"
    digest = models.save_weights(net, target)
    assert digest == hashlib.sha256(target.read_bytes()).hexdigest()
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary left behind
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError):
        models.save_weights(net, blocker / "sub" / "w.safetensors")


# -- refusing tampered and unsafe weights --------------------------------------------------


def test_tampered_weights_refused_before_anything_is_read(tmp_path: Path, loading_spy: list[str]) -> None:
    card = trained_model(tmp_path)
    path = card.folder / "fold0.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="SHA-256 mismatch") as err:
        models.load_model(card)
    assert str(path) in str(err.value)
    assert loading_spy == []


class _Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def _pickle_payload(marker: Path) -> bytes:
    return pickle.dumps({"model.0.conv.weight": _Payload(marker)})


def _torch_zip_payload(marker: Path) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"model.0.conv.weight": _Payload(marker)}, buf)
    return buf.getvalue()


def _torch_legacy_payload(marker: Path) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"model.0.conv.weight": _Payload(marker)}, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def _torch_load_unsafely(payload: bytes) -> None:
    import io

    torch.load(io.BytesIO(payload), weights_only=False)


@pytest.mark.parametrize(
    ("make", "unsafe_load"),
    [(_pickle_payload, pickle.loads), (_torch_zip_payload, _torch_load_unsafely),
     (_torch_legacy_payload, _torch_load_unsafely)],
)
def test_code_carrying_checkpoint_is_refused_without_running_it(tmp_path: Path, make: Any, unsafe_load: Any) -> None:
    # The payload is live: deserialising it the unsafe way does run its code.
    control = tmp_path / "control-marker"
    unsafe_load(make(control))
    assert control.read_text(encoding="utf-8") == "code ran"

    card = trained_model(tmp_path / "models")
    marker = tmp_path / "marker"
    path = replace_weights(card, make(marker))  # correct SHA-256: only the format check stands
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
        mp.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads called"))
        with pytest.raises(ModelError, match="not a safetensors file \\(refusing to unpickle\\)") as err:
            models.load_model(card)
    assert str(path) in str(err.value)
    assert not marker.exists()


def _truncated(data: bytes) -> bytes:
    return data[:-4]


def _long_header(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data[8:]


def _garbage(_data: bytes) -> bytes:
    return b"these are not the weights you are looking for"


def _overlapping(_data: bytes) -> bytes:
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    }
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(8)


def _wrong_shape(_data: bytes) -> bytes:
    raw = json.dumps({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(8)


@pytest.mark.parametrize("mangle", [_truncated, _long_header, _garbage, _overlapping, _wrong_shape])
def test_malformed_safetensors_refused(tmp_path: Path, mangle: Any, loading_spy: list[str]) -> None:
    card = trained_model(tmp_path)
    path = card.folder / "fold0.safetensors"
    replace_weights(card, mangle(path.read_bytes()))
    with pytest.raises(ModelError, match="not a safetensors file"):
        models.load_weights(card)
    assert loading_spy == []


def test_weights_that_do_not_fit_the_network_are_refused(tmp_path: Path) -> None:
    card = trained_model(tmp_path)
    card.raw["network"]["args"]["channels"] = [4, 16]
    with pytest.raises(ModelError, match="weights do not fit network monai.UNet .*shape"):
        models.load_model(card)
    card.raw["network"]["args"]["channels"] = [4, 8, 16]
    card.raw["network"]["args"]["strides"] = [2, 2]
    with pytest.raises(ModelError, match="missing"):
        models.load_model(card)


def test_missing_weights_file_and_bad_fold_index(tmp_path: Path) -> None:
    card = trained_model(tmp_path)
    with pytest.raises(ModelError, match="no weights entry 3"):
        models.load_weights(card, 3)
    (card.folder / "fold0.safetensors").unlink()
    with pytest.raises(ModelError, match="fold0.safetensors: weights file not found"):
        models.load_weights(card)


# -- networks ------------------------------------------------------------------------------


def test_unknown_network_names_card_and_known_networks(tmp_path: Path) -> None:
    card = trained_model(tmp_path)
    card.raw["network"]["name"] = "monai.Nope"
    with pytest.raises(ModelError) as err:
        models.load_model(card)
    msg = str(err.value)
    assert str(card.path) in msg and "unknown network 'monai.Nope'" in msg and "monai.UNet" in msg
    with pytest.raises(ModelError, match="bad arguments"):
        networks.build("monai.UNet", {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "nope": 1})


def test_per_window_normalised_network_must_run_on_its_training_patch(tmp_path: Path) -> None:
    """Instance/group norm statistics follow the window: a window other than the patch is refused."""
    card = trained_model(tmp_path / "instance")  # MONAI UNet: instance norm by default
    card.raw["inference"]["roi_size"] = [32, 32, 16]
    with pytest.raises(ModelError) as err:
        models.load_model(card)
    msg = str(err.value)
    assert str(card.path) in msg and "roi_size [32, 32, 16]" in msg and "patch_size [16, 16, 16]" in msg
    card.raw["inference"]["roi_size"] = [16, 16, 16]
    assert len(models.load_model(card)) == 1

    batch = {"name": "monai.UNet", "args": {**TINY_UNET["args"], "norm": "batch"}}  # running statistics
    card = trained_model(tmp_path / "batch", network=batch)
    card.raw["inference"]["roi_size"] = [32, 32, 16]
    assert len(models.load_model(card)) == 1

    # A slice-wise 2D network with group norm only sees the in-plane size of the window.
    inner = {"name": "monai.SegResNet", "args": {"spatial_dims": 2, "in_channels": 2, "out_channels": 1,
                                                 "init_filters": 4, "blocks_down": [1, 1], "blocks_up": [1],
                                                 "norm": ["GROUP", {"num_groups": 2}]}}
    card = trained_model(tmp_path / "slices", network={"name": "strokeseg.SliceWise", "args": {"inner": inner}})
    card.raw["patch_size"] = [16, 16, 1]
    card.raw["inference"]["roi_size"] = [16, 16, 4]
    assert len(models.load_model(card)) == 1
    card.raw["inference"]["roi_size"] = [32, 32, 1]
    with pytest.raises(ModelError, match="instance/group norm"):
        models.load_model(card)


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("monai.UNet", {"spatial_dims": 3, "in_channels": 2, "out_channels": 2, "channels": [4, 8], "strides": [2],
                        "num_res_units": 1, "act": ["LeakyReLU", {"negative_slope": 0.01}]}),
        ("monai.DynUNet", {"spatial_dims": 3, "in_channels": 2, "out_channels": 2, "kernel_size": [3, 3, 3],
                           "strides": [1, 2, 2], "upsample_kernel_size": [2, 2], "filters": [4, 8, 8]}),
        ("monai.SegResNet", {"spatial_dims": 3, "in_channels": 2, "out_channels": 2, "init_filters": 4,
                             "blocks_down": [1, 1], "blocks_up": [1], "norm": ["GROUP", {"num_groups": 2}]}),
        ("monai.BasicUNet", {"spatial_dims": 3, "in_channels": 2, "out_channels": 2, "features": [4, 4, 8, 8, 8, 4]}),
        ("monai.AttentionUnet", {"spatial_dims": 3, "in_channels": 2, "out_channels": 2, "channels": [4, 8],
                                 "strides": [2]}),
    ],
)
def test_builtin_networks_build_from_json_arguments(name: str, args: dict[str, Any]) -> None:
    net = models.build_network(json.loads(json.dumps({"network": {"name": name, "args": args}})))
    with torch.no_grad():
        out = net.eval()(torch.randn(1, 2, 32, 32, 32))  # BasicUNet pools 4 times: 32 -> 2
    assert tuple(out.shape) == (1, 2, 32, 32, 32)


def test_network_registry_is_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(networks, "_FACTORIES", dict(networks._FACTORIES))
    # A plugin module registers its architecture on first use, as strokeseg.networks_zoo will.
    (tmp_path / "fake_zoo.py").write_text(
        "import torch\nfrom strokeseg.networks import register_network\n"
        "@register_network('zoo.Conv')\ndef conv(in_channels, out_channels):\n"
        "    return torch.nn.Conv3d(in_channels, out_channels, 1)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(networks, "_PLUGIN_MODULES", ("fake_zoo", "module_that_does_not_exist"))
    monkeypatch.setattr(networks, "_plugins_loaded", False)
    net = networks.build("zoo.Conv", {"in_channels": 2, "out_channels": 3})
    assert isinstance(net, torch.nn.Conv3d) and "zoo.Conv" in networks.known_networks()
    with pytest.raises(ValueError, match="already registered"):
        networks.register_network("zoo.Conv")(lambda **a: torch.nn.Identity())
    networks.register_network("zoo.Bad")(lambda **a: "not a module")
    with pytest.raises(ModelError, match="not a torch module"):
        networks.build("zoo.Bad", {})
    sys.modules.pop("fake_zoo", None)


# -- cards and registry validation ---------------------------------------------------------


def _drop(key: str) -> Any:
    return lambda c: c.pop(key)


def _set(path: str, value: Any) -> Any:
    def apply(card: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = card
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[int(last) if last.isdigit() else last] = value

    return apply


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_drop("patch_size"), "'patch_size' is a required property"),
        (_set("target_spacing", "1mm"), "target_spacing: '1mm' is not of type 'array'"),
        (_set("target_spacing", [1, 1]), "target_spacing"),
        (_set("inputs.required", ["DWI"]), "inputs/required/0"),
        (_set("weights.0.file", "../../elsewhere.safetensors"), "weights/0/file"),
        (_set("weights.0.file", "fold0.pt"), "weights/0/file"),
        (_set("weights.0.sha256", "abc"), "weights/0/sha256"),
        (_set("weights", []), "weights"),
        (_set("postprocess.threshold", 1.5), "postprocess/threshold"),
        (_set("inference.overlapp", 0.5), "inference"),
        (_set("inference.tta_axes", ["lr"]), "inference/tta_axes/0"),
        (_set("postprocessing", {}), "'postprocessing' was unexpected"),
        (_set("normalisation.adc", {"method": "window", "low": 0}), "normalisation/adc"),
        (_set("created", "2025-13-45"), "created"),
        (_set("version", "1.2"), "version"),
        (_set("family", "ct"), "family"),
        (_set("normalisation", {"dwi": {"method": "zscore"}}), "normalisation: missing for adc"),
        (_set("inputs.optional", ["adc"]), "both required and optional"),
        (_set("derivable", {"flair": ["t1"]}), "'flair' is not an input"),
        (_set("output.foreground_channel", 1), "foreground_channel 1 >= channels 1"),
    ],
)
def test_card_violating_schema_names_the_card(tmp_path: Path, mutate: Any, expected: str) -> None:
    write_registry(tmp_path, [card_dict()])
    card = card_dict()
    mutate(card)
    write_json(tmp_path / "dwi-unet" / "card.json", card)
    with pytest.raises(ModelError) as err:
        models.load_registry(tmp_path)
    msg = str(err.value)
    assert msg.startswith(str(tmp_path / "dwi-unet" / "card.json") + ": ")
    assert expected in msg and "\n" not in msg


def test_registry_problems_name_models_json(tmp_path: Path) -> None:
    index = tmp_path / "models.json"
    with pytest.raises(ModelError, match="models.json: not found"):
        models.load_registry(tmp_path)
    write_registry(tmp_path, [card_dict("dwi-unet"), card_dict("dwi-unet")])
    with pytest.raises(ModelError, match="duplicate model id 'dwi-unet'") as err:
        models.load_registry(tmp_path)
    assert str(err.value).startswith(str(index))
    write_json(index, {"schema_version": 1, "models": [{"id": "x", "folder": "absent", "family": "dwi"}]})
    with pytest.raises(ModelError, match="folder 'absent' not found"):
        models.load_registry(tmp_path)
    write_json(index, {"schema_version": 2, "models": []})
    with pytest.raises(ModelError, match="schema_version"):
        models.load_registry(tmp_path)
    write_json(index, {"schema_version": 1, "models": [{"id": "other", "folder": "dwi-unet", "family": "dwi"}]})
    with pytest.raises(ModelError, match="id 'dwi-unet' differs from 'other'"):
        models.load_registry(tmp_path)
    index.write_text('{"schema_version": 1, "models": [}')
    with pytest.raises(ModelError, match="models.json: not valid JSON \\(line 1"):
        models.load_registry(tmp_path)


def test_bundled_schemas_are_valid_json_schemas(repo_root: Path) -> None:
    import jsonschema

    for name in ("model_card.schema.json", "models.schema.json"):
        jsonschema.Draft202012Validator.check_schema(json.loads((repo_root / "Resources/Models" / name).read_text(encoding="utf-8")))


def test_bundled_registry_if_present() -> None:
    if not (models.BUNDLED_DIR / "models.json").exists():
        pytest.skip("no models bundled yet")
    for card in models.load_registry(models.BUNDLED_DIR):
        assert card.describe()
        for entry in card.weights:
            assert models.sha256_file(card.folder / entry["file"]) == entry["sha256"], card.id


# -- lookup and model choice ---------------------------------------------------------------


@pytest.fixture()
def registry(tmp_path: Path) -> Path:
    return write_registry(
        tmp_path,
        [
            card_dict("dwi-adc", required=("dwi", "adc"), derivable={"adc": ["b0", "dwi"]}),
            card_dict("dwi-flair", required=("dwi", "adc"), optional=("flair",), derivable={"adc": ["b0", "dwi"]}),
            card_dict("dwi-basic", required=("dwi",)),
            card_dict("ctp-maps", family="ctp", required=("cbf", "cbv", "tmax"), optional=("mtt",)),
        ],
    )


def test_choose_model(registry: Path) -> None:
    assert models.choose_model({"dwi", "adc"}, registry).id == "dwi-adc"  # ties go to registry order
    assert models.choose_model(["dwi", "adc", "flair", "t1"], registry).id == "dwi-flair"  # uses the optional flair
    via_b0 = models.choose_model(["b0", "dwi"], registry)
    assert via_b0.id == "dwi-adc" and via_b0.plan(["b0", "dwi"]) == {"dwi": None, "adc": ["b0", "dwi"]}
    assert models.choose_model(["dwi"], registry).id == "dwi-basic"
    assert models.choose_model(["cbf", "cbv", "tmax", "dwi", "adc"], registry, family="ctp").id == "ctp-maps"
    with pytest.raises(ModelError) as err:
        models.choose_model(["t1"], registry)
    msg = str(err.value)
    assert "inputs present (t1)" in msg
    assert "dwi-adc needs dwi + adc (adc from b0 + dwi)" in msg and "ctp-maps needs cbf + cbv + tmax" in msg
    with pytest.raises(ModelError, match="no 't1' model installed"):
        models.choose_model(["t1"], registry, family="t1")


def test_get_card_and_env_override(registry: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(models.ENV_VAR, str(registry))
    assert models.resolve_models_dir() == registry
    card = models.get_card("ctp-maps")
    assert card.folder == registry / "ctp-maps" and card.reference_input == "cbf"
    assert card.target_spacing == (1.5, 1.5, 1.5) and card["network"]["name"] == "monai.UNet"
    with pytest.raises(ModelError, match="unknown model 'x' \\(available: dwi-adc, dwi-flair, dwi-basic, ctp-maps\\)"):
        models.get_card("x")


def test_describe(registry: Path) -> None:
    text = models.get_card("dwi-flair", registry).describe()
    for part in ("dwi-flair 1.2.0", "diffusion MRI", "adc can be computed from b0 + dwi", "flair (optional)",
                 "monai.UNet", "50 cases", "dice 0.812", "threshold 0.45", "Apache-2.0"):
        assert part in text, part
    assert "\n" not in text
