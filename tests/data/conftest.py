"""Fixtures of the data tests: the MXNet-written reference files (``synthetic_small`` is in
``tests/conftest.py``, shared with ``tests/tools/``)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
RECORDIO = FIXTURES / "recordio"


@pytest.fixture(scope="session")
def recordio_fixtures() -> Path:
    if not (RECORDIO / "insightface" / "train.rec").is_file():
        pytest.skip(f"MXNet-written fixtures not found at {RECORDIO} (shared/ must lie beside the repo)")
    return RECORDIO


@pytest.fixture()
def insightface_copy(recordio_fixtures, tmp_path) -> Path:
    """A writable copy of the InsightFace-layout fixture."""
    dst = tmp_path / "insightface"
    shutil.copytree(recordio_fixtures / "insightface", dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst
