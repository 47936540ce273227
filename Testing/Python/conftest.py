"""Shared test fixtures. Tests run single-threaded so they behave the same on a 2-core CI box."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_SOOP = REPO_ROOT.parent / "shared" / "data" / "soop"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def lesion_library() -> Path | None:
    """Real SOOP lesion maps when ../shared/data is present; None makes phantoms procedural."""
    lib = SHARED_SOOP / "lesions"
    return lib if lib.is_dir() else None
