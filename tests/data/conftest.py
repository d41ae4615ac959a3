"""Shared fixtures for the data tests: the MXNet-written reference files and small generated sets."""
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


@pytest.fixture(scope="session")
def synthetic_small(tmp_path_factory) -> Path:
    """10 identities x 4 images (+ 20 verification pairs) from the synthetic generator."""
    from partial_fc.data import generate_synthetic

    root = tmp_path_factory.mktemp("synthetic_small")
    generate_synthetic(root, num_identities=10, images_per_identity=4, family_size=2,
                       num_heldout_identities=4, num_pairs=20, seed=3, workers=1, progress=False)
    return root
