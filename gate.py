"""ECO-M2F's gate (Eq. 6) and Step C, its training on the derived set.

    python gate.py --config CFG --weights CKPT --derived derived.jsonl --beta B [--loss hard-ce] --out gate.pt

The gate is Linear(dim, number of exits) on z(s₁), the mean over the projected 1/32 tokens
(Mask2Former.gate_features: after the input projection and GroupNorm, before any encoder layer,
without position embedding). It learns from Step B's derived set: for image i with per-exit
panoptic quality q_k, the utility of exit k is u(k) = q_k - β·k (Eq. 4) and the target is
t = argmax_k u(k) (Eq. 5), ties going to the smallest k. Changing the compute budget means training
the gate again for another β (seconds: the gate features of the training set are cached); the
parent model stays frozen. A smaller maximum exit retargets the gate to a smaller model.

At inference, `model.forward_gated(images, gate)` lets the gate choose every image's exit; in a
batch each encoder layer runs only on the images that still need it.

Like data.py, this file is a module (the gate, its files) with a command (Step C): the evaluation
imports the gate from here, and this file imports nothing from the other scripts. The command's
argument parser comes first, before torch is imported, so that --help answers at once.
"""
import argparse
import json
import pickle
import sys
from collections import Counter
from pathlib import Path

from config import atomic_save, load_config, load_run_config, load_weights, run_command

LOSSES = ("hard-ce", "u-ce", "soft-ce", "soft-mse")


# ---- the command line of Step C (first, and light: --help and config errors answer before torch loads)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="the Step A checkpoint")
    parser.add_argument("--config", help="YAML config of the parent model (default: the one stored in the weights)")
    parser.add_argument("--derived", required=True, help="Step B's derived.jsonl")
    parser.add_argument("--beta", type=float, help="trade-off β of u(k) = q_k - β·k (default gate.beta)")
    parser.add_argument("--loss", choices=LOSSES, help="gate loss (default gate.loss, hard-ce)")
    parser.add_argument("--exits", type=int, nargs="+", help="exits the gate chooses among (default gate.exits)")
    parser.add_argument("--out", required=True, help="where to write gate.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing gate file at --out")
    parser.add_argument("--cache", help="cache of the gate inputs (default <derived>.gate_inputs.pt)")
    parser.add_argument("--split", default="train", help="the split the derived set was made on")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--debug", action="store_true", help="show the whole traceback of an error")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    args = parser.parse_args(argv)
    if args.config:  # its errors come before torch loads
        load_config(args.config, args.overrides)
    return args


if __name__ == "__main__":  # answer --help, a bad option or config at once, before torch loads
    run_command(parse_args)

import torch  # noqa: E402  (after the command line)
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data  # noqa: E402
from encoders import check_exit  # noqa: E402
from model import build_model  # noqa: E402


class Gate(nn.Module):
    """Linear(dim, number of exits) on z(s₁), the mean of the projected 1/32 tokens
    (`Mask2Former.gate_features`). Trained by gate.py (ECO-M2F Step C)."""

    def __init__(self, *, dim=256, exits=(2, 3, 4, 5, 6)):
        super().__init__()
        self.head = nn.Linear(dim, len(exits))
        self.register_buffer("exits", torch.tensor(sorted(exits), dtype=torch.long))

    def logits(self, z):
        """(B, dim) gate features -> (B, E) exit logits."""
        return self.head(z)

    def forward(self, z):
        """(B, dim) gate features -> (B,) the chosen exit of every image."""
        return self.exits[self.logits(z).argmax(-1)]


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
    atomic_save({"gate": gate.state_dict(), "dim": gate.head.in_features, "exits": gate.exits.tolist(), **info}, path)


def load_gate(path, model=None):
    """A Gate from gate.pt, in eval mode, its training info in gate.info. With `model`, the gate
    is checked against it: it must read the encoder's channels and choose exits the encoder has."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        gate = Gate(dim=data["dim"], exits=data["exits"])
        gate.load_state_dict(data["gate"])
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: gate file not found") from None
    except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path}: not a gate file written by gate.py ({type(e).__name__}: {e})") from None
    gate.info = {k: v for k, v in data.items() if k != "gate"}
    if model is not None:
        if gate.head.in_features != model.encoder.dim:
            raise ValueError(f"{path}: the gate reads {gate.head.in_features} channels, but this model's encoder "
                             f"has dim {model.encoder.dim} (was the gate trained for another model?)")
        try:
            check_exit(model.encoder, gate.exits.tolist(), "the gate's exits")
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
    return gate.eval()


OFFICIAL_GATE = "sem_seg_head.pixel_decoder.transformer.encoder.gt.head."


def official_gate(state, exits=(2, 3, 4, 5, 6)):
    """The gate inside an official ECO-M2F checkpoint (`...transformer.encoder.gt.head`, its
    exits 2..6), e.g. from load_checkpoint_file(path)."""
    head = {k[len(OFFICIAL_GATE):]: v for k, v in state.items() if k.startswith(OFFICIAL_GATE)}
    if not head:
        raise ValueError("no ECO-M2F gate (transformer.encoder.gt.head) in this checkpoint")
    gate = Gate(dim=head["weight"].shape[1], exits=exits)
    gate.head.load_state_dict(head)
    return gate.eval()


# ---- Step C: training on the derived set -----------------------------------------------------


def read_derived(path):
    """Step B's file -> (image ids, exits, q (N, K) float64 tensor). Refuses, naming the file and
    line, anything Step C must not train on: a duplicated image, non-finite or out-of-range PQ."""
    ids, q, exits, seen = [], [], None, {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the derived set ({e.strerror})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            values = [float(v) for v in row["pq"]]
            exits = row["exits"] if exits is None else exits
            if row["exits"] != exits or len(values) != len(exits):
                raise ValueError(f"exits {row['exits']} with {len(values)} values, expected {exits}")
            if not all(0.0 <= v <= 1.0 for v in values):  # also false for NaN
                raise ValueError(f"PQ values {values} are not all in [0, 1]")
            if row["image_id"] in seen:
                raise ValueError(f"image {row['image_id']} is already on line {seen[row['image_id']]}")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}, line {n}: not a derived-set line ({e})") from None
        seen[row["image_id"]] = n
        ids.append(row["image_id"])
        q.append(values)
    if not ids:
        raise ValueError(f"{path}: the derived set is empty")
    return ids, exits, torch.tensor(q, dtype=torch.float64)


@torch.no_grad()
def gate_inputs(model, dataset, image_ids, device="cpu"):
    """The gate features z(s₁) (N, dim) of the images `image_ids`, test-time resized, one by one
    (as the derived set was made)."""
    index = {im["id"]: i for i, im in enumerate(dataset.images)}
    missing = [i for i in image_ids if i not in index]
    if missing:
        raise ValueError(f"{dataset.json_file}: images {missing[:5]} of the derived set are not in this split")
    model.eval()
    z = []
    for image_id in tqdm(image_ids, desc="gate inputs", dynamic_ncols=True):
        images, _ = model.preprocess([dataset[index[image_id]]["image"].to(device)])
        z.append(model.gate_features(images).cpu())
    return torch.cat(z)


def train_gate(features, q, exits, beta, loss="hard-ce", epochs=2, lr=1e-3, batch_size=16, seed=0):
    """Adam on the gate's head with the parent model frozen (only cached features are seen).
    features (N, dim); q (N, E) at the gate's exits. Returns the trained Gate (eval mode)."""
    torch.manual_seed(seed)
    gate = Gate(dim=features.shape[1], exits=exits)
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


def cached_gate_inputs(cfg, args, image_ids):
    """The gate features of the derived set's images, from the cache when it was made from the same
    weights file (path and modification time) and the same images, else computed and cached."""
    cache = Path(args.cache or f"{args.derived}.gate_inputs.pt")
    weights = Path(args.weights)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: weights file not found")
    key = {"weights": str(weights.resolve()), "mtime": weights.stat().st_mtime, "image_ids": image_ids}
    if cache.exists():
        try:
            cached = torch.load(cache, map_location="cpu", weights_only=True)
        except Exception as e:  # any unreadable cache is recomputed, never trusted
            print(f"{cache}: unreadable cache ({type(e).__name__}), computing the gate inputs again")
            cached = {}
        if isinstance(cached, dict) and cached.get("key") == key:
            return cached["features"]
    model = build_model(cfg).to(args.device)
    load_weights(model, args.weights)
    features = gate_inputs(model, data.build_dataset(cfg.data, split=args.split, train=False), image_ids, args.device)
    atomic_save({"key": key, "features": features}, cache)
    return features


def print_summary(gate, features, q, exits, beta, loss):
    """Target and chosen exit histograms over the derived set, and the gate's accuracy."""
    targets = exit_targets(q, exits, beta)
    with torch.no_grad():
        chosen = gate.logits(features.float()).argmax(-1)
    print(f"β = {beta}, loss {loss}, exits {exits}, {len(q)} images")
    for title, picks in (("target exits: ", targets), ("gate's choice:", chosen)):
        histogram = Counter(exits[t] for t in picks.tolist())
        print(f"{title} " + "  ".join(f"{k}: {histogram.get(k, 0)}" for k in exits))
    print(f"accuracy on the derived set: {100 * (chosen == targets).double().mean():.1f}%")


def main(argv=None):
    args = parse_args(argv)
    cfg = load_run_config(args.config, args.weights, args.overrides)
    args.device = data.check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    beta = cfg.gate.beta if args.beta is None else args.beta
    loss = args.loss or cfg.gate.loss
    args.exits = sorted(args.exits or cfg.gate.exits)
    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out}: a gate file is already there; pass --overwrite to replace it")
    if loss not in LOSSES:
        raise ValueError(f"{args.config or args.weights}: gate.loss {loss!r} is not one of {', '.join(LOSSES)}")
    image_ids, derived_exits, q_all = read_derived(args.derived)
    if not set(args.exits) <= set(derived_exits):
        raise ValueError(f"{args.derived}: the gate's exits {args.exits} are not all among the derived exits "
                         f"{derived_exits}")
    q = q_all[:, [derived_exits.index(k) for k in args.exits]]
    with torch.device("meta"):  # shapes only, in a moment: are these exits the model's?
        check_exit(build_model(cfg).encoder, args.exits, "the gate's exits")
    # The gate features depend only on the parent model and the images: computed once, reused for
    # every β, loss and exit set.
    features = cached_gate_inputs(cfg, args, image_ids)
    gc = cfg.gate
    gate = train_gate(features, q, args.exits, beta, loss, gc.epochs, gc.lr, gc.batch_size, cfg.train.seed)
    print_summary(gate, features, q, args.exits, beta, loss)
    save_gate(gate, args.out, beta=beta, loss=loss, derived=str(args.derived), weights=str(args.weights))
    print(f"gate written to {args.out}")


if __name__ == "__main__":
    sys.exit(run_command(main))
