"""Run by torchrun (2 processes, gloo) in tests/test_ddp.py. The first argument names the job:

    criterion OUT_DIR                         SetCriterion's mask normaliser over ranks -> OUT_DIR/criterion{rank}.json
    train CONFIG OUT_DIR RESUME [key=value]   train.train(..., resume=RESUME == "1")
"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
import train  # noqa: E402
from config import load_config  # noqa: E402
from model import HungarianMatcher, SetCriterion  # noqa: E402

NUM_CLASSES, QUERIES, SIZE, POINTS = 4, 8, 16, 64
# Target masks per image, per rank, for each scenario: (rank 0's images, rank 1's images).
SCENARIOS = {
    "5_and_7": ([2, 3], [7]),  # mean (5 + 7) / 2 = 6
    "5_and_0": ([2, 3], [0]),  # mean 2.5: no clamp to 1 before the average
    "0_and_1": ([0], [1]),  # mean 0.5, clamped to 1
    "0_and_2": ([0], [2]),  # mean 1 (clamping each rank first would give 1.5)
}
LOSS_SCENARIO = "5_and_7"


def make_targets(counts, seed):
    g = torch.Generator().manual_seed(seed)
    return [{"labels": torch.randint(NUM_CLASSES, (n,), generator=g),
             "masks": torch.rand(n, SIZE, SIZE, generator=g) > 0.5} for n in counts]


def make_outputs(batch, seed):
    """Hand-made predictions with one auxiliary round, the same on every rank for a given batch size."""
    g = torch.Generator().manual_seed(seed)

    def one():
        return {"pred_logits": torch.randn(batch, QUERIES, NUM_CLASSES + 1, generator=g),
                "pred_masks": torch.randn(batch, QUERIES, SIZE // 4, SIZE // 4, generator=g)}

    return {**one(), "aux_outputs": [one()]}


def criterion_losses(targets):
    criterion = SetCriterion(num_classes=NUM_CLASSES, matcher=HungarianMatcher(num_points=POINTS), num_points=POINTS)
    torch.manual_seed(0)  # the matcher's and the point sampler's draws: the same with and without DDP
    return {k: v.item() for k, v in criterion(make_outputs(len(targets), seed=1), targets).items()}


def criterion_job(out):
    rank = int(os.environ["RANK"])
    targets = {name: make_targets(counts[rank], seed=10 + rank) for name, counts in SCENARIOS.items()}
    # This rank's losses on one process: normalised by its own number of masks.
    local = criterion_losses(targets[LOSS_SCENARIO])
    got_rank, world_size, device = data.setup_distributed()
    assert (got_rank, world_size) == (rank, 2), (got_rank, world_size)
    result = {"rank": rank,
              "local_masks": sum(len(t["labels"]) for t in targets[LOSS_SCENARIO]),
              "num_masks": {name: SetCriterion.average_num_masks(t, torch.device("cpu")) for name, t in targets.items()},
              "local_losses": local,
              "ddp_losses": criterion_losses(targets[LOSS_SCENARIO])}
    torch.distributed.destroy_process_group()
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"criterion{rank}.json").write_text(json.dumps(result))


def train_job(config, out, resume, *overrides):
    train.train(load_config(config, list(overrides)), out, resume=resume == "1")


if __name__ == "__main__":
    job, *args = sys.argv[1:]
    {"criterion": criterion_job, "train": train_job}[job](*args)
