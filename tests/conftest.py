"""Fixtures shared by every test package. The tests are packages (``tests/__init__.py``), so
pytest puts the repository root on ``sys.path`` and helpers import as ``tests.helpers.<module>``."""
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"


@pytest.fixture
def fixtures_dir() -> Path:
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(f"MXNet-written fixtures not found at {SHARED_FIXTURES}")
    return SHARED_FIXTURES


@pytest.fixture(scope="session")
def synthetic_small(tmp_path_factory) -> Path:
    """10 identities x 4 images (+ 20 verification pairs) from the synthetic generator."""
    from partial_fc.data import generate_synthetic

    root = tmp_path_factory.mktemp("synthetic_small")
    generate_synthetic(root, num_identities=10, images_per_identity=4, family_size=2,
                       num_heldout_identities=4, num_pairs=20, seed=3, workers=1, progress=False)
    return root


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)
