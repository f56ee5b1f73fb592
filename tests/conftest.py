"""Shared test setup: the repository root on sys.path, a small CPU thread count, and paths.
Everything a test reads is in the repository (tests/data/): the suite runs from a plain clone."""
import gzip
import json
import socket
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)

from synthetic import write_synthetic  # noqa: E402  (after the path)

TINY = str(ROOT / "configs/demo/m2f_tiny.yaml")

DATA = ROOT / "tests" / "data"
COCO_SAMPLE = DATA / "coco_panoptic_sample"  # two COCO val images with their panoptic annotations
OFFICIAL_KEYS = DATA / "official_keys"


@pytest.fixture(scope="session")
def official_keys():
    """official_keys(name) -> (shapes, kinds) of an official model's state dict (see its README)."""
    def read(name):
        with gzip.open(OFFICIAL_KEYS / f"{name}.json.gz", "rt") as f:
            keys = json.load(f)
        return keys["shapes"], keys["kinds"]
    return read


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """A small synthetic dataset under <root>/synthetic: 8 train and 2 val images of 64x64."""
    root = tmp_path_factory.mktemp("datasets")
    write_synthetic(root / "synthetic", train=8, val=2, size=64, seed=0)
    return root


def tiny_run(root, **extra):
    """Overrides for a tiny, fast run of configs/demo/m2f_tiny.yaml on the dataset at `root`:
    64-px images, batch 2, a log line every iteration, no evaluation unless asked."""
    settings = {"data.root": str(root), "data.crop_size": "[64,64]", "data.workers": 0, "data.test_short_side": 64,
                "data.test_max_size": 128, "train.batch_size": 2, "train.log_every": 1, "train.checkpoint_every": 2,
                "train.evaluate": "false", "train.amp": "fp32", "model.loss.num_points": 256, **extra}
    return [f"{k}={v}" for k, v in settings.items()]


def free_port():
    """A free local TCP port, for a torchrun launch of its own."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
