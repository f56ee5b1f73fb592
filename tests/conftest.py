"""Shared test setup: the repository root on sys.path, a small CPU thread count, and paths."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)

SHARED = ROOT.parent / "shared"
OFFICIAL_KEYS = SHARED / "data" / "official_checkpoint_keys"


@pytest.fixture(scope="session")
def official_keys():
    if not OFFICIAL_KEYS.is_dir():
        pytest.fail(f"{OFFICIAL_KEYS} is missing: the tests need ../shared beside the checkout")
    return OFFICIAL_KEYS
