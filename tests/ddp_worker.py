"""Run by torchrun in tests/test_train.py: train, then save this rank's parameters."""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train  # noqa: E402
from config import load_config  # noqa: E402

if __name__ == "__main__":
    config, out, *overrides = sys.argv[1:]
    sampled = []  # the exits this rank trained with (ECO-M2F Step A)
    draw = train.sample_exit
    train.sample_exit = lambda *args: sampled.append(draw(*args)) or sampled[-1]
    model = train.train(load_config(config, overrides), out)
    rank = int(os.environ["RANK"])
    torch.save(sampled, Path(out) / f"exits{rank}.pt")
    # Parameters only: BatchNorm running statistics are broadcast from rank 0 at the start of each
    # forward (DDP's broadcast_buffers), so after the last step they hold each rank's own update.
    torch.save({k: p.detach() for k, p in model.named_parameters()}, Path(out) / f"rank{rank}.pt")
