"""ECO-M2F Step C: the gate that picks each image's encoder exit.

    python gate.py --config CFG --weights CKPT --derived derived.jsonl --beta B [--loss hard-ce] --out gate.pt

The gate is a mean over the projected 1/32 tokens (after the input projection and GroupNorm,
before any encoder layer, without position embedding) followed by Linear(dim, number of exits)
(ECO-M2F Eq. 6). It learns from Step B's derived set: for image i with per-exit panoptic quality
q_k, the utility of exit k is u(k) = q_k - β·k (Eq. 4) and the target is t = argmax_k u(k) (Eq. 5),
ties going to the smallest k. Changing the compute budget means training the gate again for
another β (seconds: the pooled gate inputs of the training set are cached); the parent model
stays frozen. A smaller maximum exit retargets the gate to a smaller model.

At inference, `model(images, exit=gate)` lets the gate choose every image's exit; in a batch each
encoder layer runs only on the images that still need it.
"""
import argparse
import json
import pickle
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

LOSSES = ("hard-ce", "u-ce", "soft-ce", "soft-mse")


class Gate(nn.Module):
    """Linear(dim, len(exits)) on the mean of the projected 1/32 tokens (ECO-M2F Eq. 6)."""

    def __init__(self, dim=256, exits=(2, 3, 4, 5, 6)):
        super().__init__()
        self.head = nn.Linear(dim, len(exits))
        self.register_buffer("exits", torch.tensor(sorted(exits), dtype=torch.long))

    @staticmethod
    def pool(coarse):
        """(B, dim, h, w) projected 1/32 map -> (B, dim) mean over the tokens."""
        return coarse.mean(dim=(2, 3))

    def logits(self, pooled):
        """(B, dim) pooled features -> (B, E) exit logits."""
        return self.head(pooled)

    def forward(self, coarse):
        """(B, dim, h, w) projected 1/32 map -> (B,) the chosen exit of every image."""
        return self.exits[self.logits(self.pool(coarse)).argmax(-1)]


# ---- targets and losses (ECO-M2F Eqs. 4-5 and Table 5) --------------------------------------


def utilities(q, exits, beta):
    """u(k) = q_k - β·k for the exits of the gate: q (N, E) over those exits -> (N, E)."""
    return q - beta * torch.as_tensor(exits, dtype=q.dtype, device=q.device)


def exit_targets(q, exits, beta):
    """t = argmax_k u(k) as an index into `exits` (sorted ascending); ties -> the smallest exit,
    because torch.argmax returns the first maximal index."""
    return utilities(q, exits, beta).argmax(-1)  # (N,)


def gate_loss(logits, q, exits, beta, kind="hard-ce"):
    """The gate losses of ECO-M2F Table 5, averaged over the batch.

    logits (N, E); q (N, E) panoptic quality at each of the gate's exits.
      hard-ce:  cross-entropy with the one-hot target t (the paper's default)
      u-ce:     -Σ_k u(k) · log softmax(g)_k
      soft-ce:  -Σ_k softmax(u)_k · log softmax(g)_k
      soft-mse: Σ_k (softmax(u)_k - softmax(g)_k)²
    The paper prints u-CE and soft-CE without the minus sign of a cross-entropy; we minimise the
    cross-entropy, i.e. with the sign.
    """
    if kind == "hard-ce":
        return F.cross_entropy(logits, exit_targets(q, exits, beta))
    u = utilities(q, exits, beta)
    log_p = logits.log_softmax(-1)
    if kind == "u-ce":
        return -(u * log_p).sum(-1).mean()
    if kind == "soft-ce":
        return -(u.softmax(-1) * log_p).sum(-1).mean()
    if kind == "soft-mse":
        return ((u.softmax(-1) - log_p.exp()) ** 2).sum(-1).mean()
    raise ValueError(f"unknown gate loss {kind!r}; valid: {', '.join(LOSSES)}")


# ---- saving and loading -------------------------------------------------------------------------


def save_gate(gate, path, **info):
    """gate.pt: the gate's weights, its exits and how it was trained (β, loss, ...)."""
    from train import atomic_save

    atomic_save({"gate": gate.state_dict(), "dim": gate.head.in_features, "exits": gate.exits.tolist(), **info}, path)


def load_gate(path):
    """A Gate from gate.pt, in eval mode; its training info is in gate.info."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        gate = Gate(data["dim"], data["exits"])
        gate.load_state_dict(data["gate"])
    except (OSError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path}: not a gate file written by gate.py ({e})") from None
    gate.info = {k: v for k, v in data.items() if k not in ("gate",)}
    return gate.eval()


OFFICIAL_GATE = "sem_seg_head.pixel_decoder.transformer.encoder.gt.head."


def official_gate(state, exits=(2, 3, 4, 5, 6)):
    """The gate inside an official ECO-M2F checkpoint (`...transformer.encoder.gt.head`, its
    exits 2..6), e.g. from model.load_checkpoint_file(path)."""
    head = {k[len(OFFICIAL_GATE):]: v for k, v in state.items() if k.startswith(OFFICIAL_GATE)}
    if not head:
        raise ValueError("no ECO-M2F gate (transformer.encoder.gt.head) in this checkpoint")
    gate = Gate(head["weight"].shape[1], exits)
    gate.head.load_state_dict(head)
    return gate.eval()


# ---- Step C: training on the derived set -----------------------------------------------------


def read_derived(path):
    """Step B's file -> (image ids, exits, q (N, K) float64 tensor)."""
    ids, q, exits = [], [], None
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the derived set ({e.strerror})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ids.append(row["image_id"])
            q.append([float(v) for v in row["pq"]])
            exits = row["exits"] if exits is None else exits
            if row["exits"] != exits or len(row["pq"]) != len(exits):
                raise ValueError(f"exits {row['exits']} with {len(row['pq'])} values, expected {exits}")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}, line {n}: not a derived-set line ({e})") from None
    if not ids:
        raise ValueError(f"{path}: the derived set is empty")
    return ids, exits, torch.tensor(q, dtype=torch.float64)


@torch.no_grad()
def gate_inputs(model, dataset, image_ids, device="cpu"):
    """The pooled projected 1/32 tokens (N, dim) of the images `image_ids`, test-time resized."""
    index = {im["id"]: i for i, im in enumerate(dataset.images)}
    missing = [i for i in image_ids if i not in index]
    if missing:
        raise ValueError(f"{dataset.json_file}: images {missing[:5]} of the derived set are not in this split")
    model.eval()
    pooled = []
    for image_id in tqdm(image_ids, desc="gate inputs", dynamic_ncols=True):
        images, _ = model.preprocess([dataset[index[image_id]]["image"].to(device)])
        features = {k: v.float() for k, v in model.backbone(images).items()}
        pooled.append(Gate.pool(model.encoder.project(features)[0]).cpu())
    return torch.cat(pooled)


def train_gate(features, q, exits, beta, loss="hard-ce", epochs=2, lr=1e-3, batch_size=16, seed=0):
    """Adam on the gate's head with the parent model frozen (only cached features are seen).
    features (N, dim); q (N, E) at the gate's exits. Returns the trained Gate (eval mode)."""
    torch.manual_seed(seed)
    gate = Gate(features.shape[1], exits)
    optimizer = torch.optim.Adam(gate.parameters(), lr=lr)
    features, q = features.float(), q.float()
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="gate", dynamic_ncols=True):
        for batch in torch.randperm(len(features), generator=g).split(batch_size):
            value = gate_loss(gate.logits(features[batch]), q[batch], exits, beta, loss)
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
    return gate.eval()


def main(argv=None):
    from config import load_config
    from data import build_dataset
    from evaluate import load_weights_checked
    from model import build_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config of the parent model")
    parser.add_argument("--weights", required=True, help="the Step A checkpoint")
    parser.add_argument("--derived", required=True, help="Step B's derived.jsonl")
    parser.add_argument("--beta", type=float, help="trade-off β of u(k) = q_k - β·k (default gate.beta)")
    parser.add_argument("--loss", choices=LOSSES, help="gate loss (default gate.loss, hard-ce)")
    parser.add_argument("--exits", type=int, nargs="+", help="exits the gate chooses among (default gate.exits)")
    parser.add_argument("--out", required=True, help="where to write gate.pt")
    parser.add_argument("--cache", help="cache of the gate inputs (default <derived>.gate_inputs.pt)")
    parser.add_argument("--split", default="train", help="the split the derived set was made on")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    gc = cfg.gate
    beta = gc.beta if args.beta is None else args.beta
    loss = args.loss or gc.loss
    exits = sorted(args.exits or gc.exits)

    image_ids, derived_exits, q_all = read_derived(args.derived)
    if not set(exits) <= set(derived_exits):
        raise SystemExit(f"{args.derived}: the gate's exits {exits} are not all among the derived exits {derived_exits}")
    q = q_all[:, [derived_exits.index(k) for k in exits]]

    # The pooled inputs depend only on the parent model and the images: computed once, reused for
    # every β, loss and exit set.
    cache = Path(args.cache or f"{args.derived}.gate_inputs.pt")
    key = {"weights": str(Path(args.weights).resolve()), "mtime": Path(args.weights).stat().st_mtime,
           "image_ids": image_ids}
    features = None
    if cache.exists():
        cached = torch.load(cache, map_location="cpu", weights_only=True)
        if cached.get("key") == key:
            features = cached["features"]
    if features is None:
        model = build_model(cfg).to(args.device)
        load_weights_checked(model, args.weights, args.config)
        features = gate_inputs(model, build_dataset(cfg.data, args.split, train=False), image_ids, args.device)
        from train import atomic_save

        atomic_save({"key": key, "features": features}, cache)

    gate = train_gate(features, q, exits, beta, loss, gc.epochs, gc.lr, gc.batch_size, cfg.train.seed)
    targets = exit_targets(q, exits, beta)
    with torch.no_grad():
        chosen = gate.logits(features.float()).argmax(-1)
    histogram = Counter(exits[t] for t in targets.tolist())
    print(f"β = {beta}, loss {loss}, exits {exits}, {len(image_ids)} images")
    print("target exits:  " + "  ".join(f"{k}: {histogram.get(k, 0)}" for k in exits))
    chosen_histogram = Counter(exits[t] for t in chosen.tolist())
    print("gate's choice: " + "  ".join(f"{k}: {chosen_histogram.get(k, 0)}" for k in exits))
    print(f"accuracy on the derived set: {100 * (chosen == targets).double().mean():.1f}%")
    save_gate(gate, args.out, beta=beta, loss=loss, derived=str(args.derived), weights=str(args.weights))
    print(f"gate written to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
