"""Two processes on gloo (torchrun): the loss normaliser over ranks, and exact resumption under DDP."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY as CONFIG, free_port
from conftest import tiny_run as overrides

WORKER = str(ROOT / "tests/ddp_criterion_worker.py")


def torchrun(*args):
    """Run the worker on 2 processes, each launch on a port of its own."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), WORKER, *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stderr (tail) ---\n{proc.stderr[-4000:]}"


def losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_mask_normaliser_is_the_mean_over_ranks(tmp_path):
    torchrun("criterion", tmp_path)
    ranks = [json.loads((tmp_path / f"criterion{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        # Rank 0 has 2 + 3 masks in its batch, rank 1 has 7, 0, 1 or 2 depending on the scenario.
        assert r["num_masks"] == {"5_and_7": 6.0, "5_and_0": 2.5, "0_and_1": 1.0, "0_and_2": 1.0}, r["rank"]
    # The normaliser reaches every mask loss, auxiliary rounds included: each rank's loss under DDP is
    # its single-process loss (divided by its own count) times local / mean. The CE is not normalised.
    for r, local_masks in zip(ranks, (5, 7)):
        assert r["local_masks"] == local_masks
        local, ddp = r["local_losses"], r["ddp_losses"]
        assert set(local) == set(ddp) == {f"loss_{k}{s}" for k in ("ce", "mask", "dice") for s in ("", "_0")}
        for name in local:
            factor = 1.0 if name.startswith("loss_ce") else local_masks / 6.0
            assert local[name] > 0 and ddp[name] == pytest.approx(local[name] * factor, rel=1e-5), (r["rank"], name)


def test_resumed_two_process_run_equals_an_uninterrupted_one(synthetic, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    torchrun("train", CONFIG, full, 0, *overrides(synthetic, **{"train.iterations": 4}))
    torchrun("train", CONFIG, part, 0, *overrides(synthetic, **{"train.iterations": 2}))
    assert len(losses(part)) == 2
    torchrun("train", CONFIG, part, 1, *overrides(synthetic, **{"train.iterations": 4}))
    expected, got = losses(full), losses(part)
    assert len(expected) == len(got) == 4
    assert got == expected  # bit for bit: every rank's data, augmentation, sampled points and optimizer state
    final = torch.load(part / "model_final.pt", weights_only=True)["model"]
    reference = torch.load(full / "model_final.pt", weights_only=True)["model"]
    assert final.keys() == reference.keys()
    for k, v in reference.items():
        assert torch.equal(final[k], v), k
