"""The `strokeseg` command imports MONAI without the parts it never uses; library use imports it as usual."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from strokeseg._lean_monai import HIDDEN


def _run(code: str, *args: str, **env: str) -> dict:
    full = {**os.environ, **env}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                         env=full, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


PROBE = f"""
    import importlib, json, sys
    from strokeseg import _lean_monai
    if "--lean" in sys.argv:
        _lean_monai.use_lean_import()  # what the strokeseg command does first
    import strokeseg.inference  # imports MONAI
    loaded = {{m: m in sys.modules for m in {HIDDEN!r}}}
    from strokeseg.models import build_network, get_card
    net = build_network(get_card("dwi-unet"))
    blocked = [m for m in {HIDDEN!r} if m in sys.modules and sys.modules[m] is None]
    for m in {HIDDEN!r}:
        importlib.import_module(m)  # still importable afterwards
    print(json.dumps({{"loaded": loaded, "blocked": blocked, "net": type(net).__name__}}))
"""


def test_command_imports_monai_without_unused_parts():
    res = _run(PROBE, "--lean", STROKESEG_PLAIN_MONAI="0")
    assert res["net"] == "UNet"
    assert not any(res["loaded"].values()), res["loaded"]
    assert res["blocked"] == []


def test_library_use_imports_monai_as_usual():
    """Without the command's opt-in (Slicer, notebooks, training) nothing is hidden: another MONAI
    user in the same process must find MONAI whole."""
    res = _run(PROBE, STROKESEG_PLAIN_MONAI="0")
    assert res["net"] == "UNet"
    assert res["loaded"]["sklearn"] and res["loaded"]["scipy"] and res["loaded"]["monai.apps.detection"]


def test_plain_monai_import_on_request():
    res = _run(PROBE, "--lean", STROKESEG_PLAIN_MONAI="1")
    assert res["net"] == "UNet"
    assert res["loaded"]["sklearn"]  # MONAI's own import pulls it in


def test_console_entry_point_opts_in_and_exits_with_mains_code():
    code = """
        import json, sys, strokeseg._lean_monai as lean
        from strokeseg import cli
        before = lean._lean
        def fake_main(argv):
            print(json.dumps({"before": before, "during": lean._lean, "argv": argv}))  # flushed by console
            return 3
        cli.main = fake_main
        cli.console(["models"])
        print("not reached")
    """
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                       env={**os.environ, "STROKESEG_PLAIN_MONAI": "0"})
    assert p.returncode == 3, p.stderr
    assert json.loads(p.stdout.strip()) == {"before": False, "during": True, "argv": ["models"]}


SLIDING_WINDOW = """
    import hashlib, json, sys
    import numpy as np
    from strokeseg import _lean_monai
    if "--lean" in sys.argv:
        _lean_monai.use_lean_import()
    from strokeseg.inference import predict
    from strokeseg.models import get_card, load_model
    card = get_card("dwi-unet")
    x = np.random.default_rng(0).normal(size=(card.network["args"]["in_channels"], 30, 120, 110)).astype(np.float32)
    p = predict(x, load_model(card), card, device="cpu")
    print(json.dumps({"sum": float(p.astype(np.float64).sum()), "sha": hashlib.sha256(p.tobytes()).hexdigest()}))
"""


def test_lean_and_plain_monai_give_identical_outputs():
    """The same bundled network through the same sliding window, bit for bit."""
    assert _run(SLIDING_WINDOW, "--lean") == _run(SLIDING_WINDOW)


def test_a_monai_that_needs_a_hidden_module_is_imported_plainly(tmp_path):
    fake = tmp_path / "monai"
    fake.mkdir()
    (fake / "__init__.py").write_text("import pandas\nFAKE = True\n")
    code = """
        import json, sys
        from strokeseg._lean_monai import import_monai, use_lean_import
        use_lean_import()
        m = import_monai()
        print(json.dumps({"fake": getattr(m, "FAKE", False), "pandas": sys.modules.get("pandas") is not None}))
    """
    res = _run(code, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]), STROKESEG_PLAIN_MONAI="0")
    assert res == {"fake": True, "pandas": True}
