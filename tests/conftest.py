"""Shared test setup: the repository root on sys.path, a small CPU thread count, and paths."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)

import data  # noqa: E402  (after the path)

TINY = str(ROOT / "configs/demo/m2f_tiny.yaml")

SHARED = ROOT.parent / "shared"
OFFICIAL_KEYS = SHARED / "data" / "official_checkpoint_keys"


@pytest.fixture(scope="session")
def official_keys():
    if not OFFICIAL_KEYS.is_dir():
        pytest.fail(f"{OFFICIAL_KEYS} is missing: the tests need ../shared beside the checkout")
    return OFFICIAL_KEYS


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """A small synthetic dataset under <root>/synthetic: 8 train and 2 val images of 64x64."""
    root = tmp_path_factory.mktemp("datasets")
    data.write_synthetic(root / "synthetic", train=8, val=2, size=64, seed=0)
    return root


def tiny_run(root, **extra):
    """Overrides for a tiny, fast run of configs/demo/m2f_tiny.yaml on the dataset at `root`:
    64-px images, batch 2, a log line every iteration, no evaluation unless asked."""
    settings = {"data.root": str(root), "data.crop_size": "[64,64]", "data.workers": 0, "data.test_short_side": 64,
                "data.test_max_size": 128, "train.batch_size": 2, "train.log_every": 1, "train.checkpoint_every": 2,
                "train.evaluate": "false", "train.amp": "fp32", "model.loss.num_points": 256, **extra}
    return [f"{k}={v}" for k, v in settings.items()]
