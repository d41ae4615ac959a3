import sys
from pathlib import Path

import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # shared helpers (dist_harness, references) live here
    sys.path.insert(0, str(TESTS_DIR))

REPO_ROOT = TESTS_DIR.parent
SHARED_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"


@pytest.fixture
def fixtures_dir() -> Path:
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(f"MXNet-written fixtures not found at {SHARED_FIXTURES}")
    return SHARED_FIXTURES


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)
