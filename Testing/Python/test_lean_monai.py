"""The engine imports MONAI without its unused optional extras, and leaves them importable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from strokeseg._lean_monai import HIDDEN


def _run(code: str, **env: str) -> dict:
    full = {**os.environ, **env}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


PROBE = f"""
    import importlib, json, sys
    import strokeseg.inference  # imports MONAI (lean)
    from strokeseg.models import build_network, get_card
    net = build_network(get_card("dwi-unet"))
    loaded = {{m: m in sys.modules for m in {HIDDEN!r}}}
    blocked = [m for m in {HIDDEN!r} if m in sys.modules and sys.modules[m] is None]
    for m in {HIDDEN!r}:
        importlib.import_module(m)  # still importable afterwards
    print(json.dumps({{"loaded": loaded, "blocked": blocked, "net": type(net).__name__}}))
"""


def test_engine_imports_monai_without_unused_extras():
    res = _run(PROBE, STROKESEG_PLAIN_MONAI="0")
    assert res["net"] == "UNet"
    assert not any(res["loaded"].values()), res["loaded"]
    assert res["blocked"] == []


def test_plain_monai_import_on_request():
    res = _run(PROBE, STROKESEG_PLAIN_MONAI="1")
    assert res["net"] == "UNet"
    assert res["loaded"]["sklearn"]  # MONAI's own import pulls it in


def test_a_monai_that_needs_a_hidden_module_is_imported_plainly(tmp_path):
    fake = tmp_path / "monai"
    fake.mkdir()
    (fake / "__init__.py").write_text("import pandas\nFAKE = True\n")
    code = """
        import json, sys
        from strokeseg._lean_monai import import_monai
        m = import_monai()
        print(json.dumps({"fake": getattr(m, "FAKE", False), "pandas": sys.modules.get("pandas") is not None}))
    """
    res = _run(code, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]), STROKESEG_PLAIN_MONAI="0")
    assert res == {"fake": True, "pandas": True}
