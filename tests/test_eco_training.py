"""ECO-M2F Step A (weighted stochastic depth in train.py) and Step C (the gate in gate.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import data
import gate
import train
from config import load_config
from conftest import ROOT, TINY as CONFIG
from conftest import tiny_run as settings
from model import build_model


def batch(synthetic, cfg, model):
    dataset = data.build_dataset(cfg.data, split="train", train=True)
    samples = [dataset[(i, 7)] for i in range(2)]
    images, _ = model.preprocess([s["image"] for s in samples])
    return images, train.make_targets(samples, images.shape[-2:], "cpu")


# ---- Step A ------------------------------------------------------------------------------------


def test_alpha_scales_the_whole_loss(synthetic):
    cfg = load_config(CONFIG, settings(synthetic, **{"train.exits": "[1,2,3]", "train.exit_alpha": "[2.0,3.0,5.0]"}))
    torch.manual_seed(0)
    model = build_model(cfg)
    images, targets = batch(synthetic, cfg, model)
    for step in range(4):
        k = train.sample_exit(cfg.train.exits, cfg.train.seed, step)
        torch.manual_seed(1)
        scaled, exit = train.training_losses(model, images, targets, cfg.train, step)
        torch.manual_seed(1)
        plain = model(images, targets, exit=k)
        assert exit == k
        assert scaled.keys() == plain.keys() and len(plain) == 12  # every deep-supervision term
        for name in plain:
            torch.testing.assert_close(scaled[name], {1: 2.0, 2: 3.0, 3: 5.0}[k] * plain[name])


def test_only_layers_up_to_the_exit_get_gradients(synthetic):
    cfg = load_config(CONFIG, settings(synthetic, **{"train.exits": "[1]"}))
    model = build_model(cfg)
    images, targets = batch(synthetic, cfg, model)
    losses, exit = train.training_losses(model, images, targets, cfg.train, 0)
    sum(losses.values()).backward()
    assert exit == 1
    layers = model.encoder.layers
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layers[0].parameters())
    assert all(p.grad is None for layer in layers[1:] for p in layer.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())


def test_all_mode_sums_alpha_weighted_exit_losses(synthetic):
    cfg = load_config(CONFIG, settings(synthetic, **{"train.exits": "[1,3]", "train.exit_mode": "all"}))
    model = build_model(cfg)
    images, targets = batch(synthetic, cfg, model)
    torch.manual_seed(2)
    total, _ = train.training_losses(train.EveryExit(model, cfg.train.exits), images, targets, cfg.train, 0)
    torch.manual_seed(2)  # the same random points: forward_exits meets the criterion in exit order
    separate = {k: model(images, targets, exit=k) for k in (1, 3)}
    for name in total:
        torch.testing.assert_close(total[name], 1 * separate[1][name] + 3 * separate[3][name])


def test_exit_sampling_is_uniform_and_deterministic():
    draws = [train.sample_exit([1, 2, 3, 4, 5, 6], 0, step) for step in range(600)]
    assert draws == [train.sample_exit([1, 2, 3, 4, 5, 6], 0, step) for step in range(600)]
    counts = [draws.count(k) for k in range(1, 7)]
    assert min(counts) > 70 and max(counts) < 130, counts


def test_two_ranks_sample_the_same_exits(synthetic, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29527",
           str(ROOT / "tests/ddp_worker.py"), CONFIG, str(out),
           *settings(synthetic, **{"train.iterations": 4, "train.exits": "[1,2,3]", "train.checkpoint_every": 4})]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(out / f"exits{r}.pt") for r in (0, 1))
    assert rank0 == rank1 and len(rank0) == 4
    logged = [json.loads(line)["exit"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == rank0
    params0, params1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(v, params1[k]) for k, v in params0.items())


# ---- Step C ------------------------------------------------------------------------------------


def test_targets_maximise_the_utility_with_ties_to_the_smallest_exit():
    exits = [2, 3, 4, 5, 6]
    q = torch.tensor([[0.50, 0.60, 0.70, 0.71, 0.72],   # u = q - 0.01 k: 0.48 0.57 0.66 0.66 0.66 -> tie: 4
                      [0.90, 0.90, 0.90, 0.90, 0.90],   # flat quality: the cheapest exit
                      [0.10, 0.20, 0.30, 0.40, 0.90]], dtype=torch.float64)
    assert gate.exit_targets(q, exits, 0.01).tolist() == [2, 0, 4]
    assert gate.exit_targets(q, exits, 0.0).tolist() == [4, 0, 4]
    for row in q:  # against a direct computation of u(k)
        u = [float(row[i]) - 0.01 * k for i, k in enumerate(exits)]
        assert gate.exit_targets(row[None], exits, 0.01).item() == u.index(max(u))


def test_each_gate_loss_against_its_formula():
    torch.manual_seed(0)
    exits, beta = [1, 2, 3], 0.05
    logits, q = torch.randn(4, 3), torch.rand(4, 3)
    u = q - beta * torch.tensor([1.0, 2.0, 3.0])
    log_p = torch.log(torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True))
    soft_u = torch.exp(u) / torch.exp(u).sum(1, keepdim=True)
    t = u.argmax(1)
    expected = {
        "hard-ce": -log_p[torch.arange(4), t].mean(),
        "u-ce": -(u * log_p).sum(1).mean(),
        "soft-ce": -(soft_u * log_p).sum(1).mean(),
        "soft-mse": ((soft_u - log_p.exp()) ** 2).sum(1).mean(),
    }
    for kind, value in expected.items():
        torch.testing.assert_close(gate.gate_loss(logits, q, exits, beta, kind), value)
    with pytest.raises(ValueError, match="valid: hard-ce"):
        gate.gate_loss(logits, q, exits, beta, "focal")


def test_the_gate_learns_a_separable_toy_problem():
    """Images of three kinds whose best exit differs; their pooled features differ by kind."""
    g = torch.Generator().manual_seed(0)
    kind = torch.randint(3, (300,), generator=g)
    features = torch.randn(300, 16, generator=g) * 0.3 + torch.eye(3, 16)[kind] * 2
    q = torch.full((300, 3), 0.2, dtype=torch.float64)
    q[torch.arange(300), kind] = 0.9  # kind j is best served by exit j + 1
    trained = gate.train_gate(features, q, [1, 2, 3], beta=0.0, epochs=30, lr=1e-2)
    chosen = trained.logits(features).argmax(-1)
    assert (chosen == kind).float().mean() > 0.97
    assert trained(features[:5]).tolist() == [k + 1 for k in kind[:5].tolist()]


def test_gate_file_roundtrip_and_bad_file(tmp_path):
    g = gate.Gate(dim=8, exits=(2, 4, 6))
    gate.save_gate(g, tmp_path / "gate.pt", beta=0.01, loss="hard-ce")
    loaded = gate.load_gate(tmp_path / "gate.pt")
    assert loaded.exits.tolist() == [2, 4, 6] and loaded.info["beta"] == 0.01
    assert torch.equal(loaded.head.weight, g.head.weight)
    (tmp_path / "junk.pt").write_bytes(b"not a gate")
    with pytest.raises(ValueError, match="junk.pt"):
        gate.load_gate(tmp_path / "junk.pt")


def test_gate_command_end_to_end(synthetic, tmp_path, capsys):
    cfg = load_config(CONFIG, settings(synthetic))
    torch.manual_seed(0)
    weights = tmp_path / "model.pt"
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    dataset = data.build_dataset(cfg.data, split="train", train=False)
    derived = tmp_path / "derived.jsonl"
    rows = [{"image_id": im["id"], "file_name": im["file_name"], "exits": [1, 2, 3],
             "pq": [0.6 if i % 2 else 0.1, 0.5, 0.55]} for i, im in enumerate(dataset.images)]
    derived.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--config", CONFIG, "--weights", str(weights), "--derived", str(derived),
            *settings(synthetic, **{"gate.epochs": 3}), "--exits", "1", "2", "3"]
    gate.main([*args, "--beta", "0.05", "--out", str(tmp_path / "a.pt")])
    out = capsys.readouterr().out
    # u = q - 0.05 k: (0.55, 0.40, 0.40) for odd images -> exit 1; (0.05, 0.40, 0.40) -> exit 2
    assert "target exits:  1: 4  2: 4  3: 0" in out
    assert (tmp_path / "derived.jsonl.gate_inputs.pt").exists()
    # a second β reuses the cached inputs: no image goes through the model
    real_inputs = gate.gate_inputs
    gate.gate_inputs = lambda *_: pytest.fail("the cache was not used")
    try:
        gate.main([*args, "--beta", "0.0", "--loss", "soft-ce", "--out", str(tmp_path / "b.pt")])
    finally:
        gate.gate_inputs = real_inputs
    assert "target exits:  1: 4  2: 0  3: 4" in capsys.readouterr().out  # β = 0: the best q
    assert gate.load_gate(tmp_path / "b.pt").info["loss"] == "soft-ce"


@pytest.mark.parametrize("name", ["eco_m2f_swin_t_beta0.0005_coco", "eco_m2f_swin_t_beta0.01_cityscapes"])
def test_official_eco_checkpoints_map_to_our_model_and_gate(official_keys, name):
    """Official ECO-M2F = Mask2Former + the gate head: every key maps to our model or to the gate."""
    shapes, _ = official_keys(name)
    dataset = "coco" if name.endswith("coco") else "cityscapes"
    with torch.device("meta"):
        net = build_model(load_config(str(ROOT / f"configs/{dataset}/eco_m2f.yaml")))
    fake = {k: torch.zeros(s) for k, s in shapes.items() if not k.endswith("relative_position_index")}
    converted, unused = __import__("config").convert_official_state_dict(fake, net)
    assert set(converted) == {k for k in net.state_dict() if not k.endswith("relative_position_index")}
    assert unused == [k for k in fake if k.startswith(gate.OFFICIAL_GATE)]
    g = gate.official_gate(fake)
    assert g.head.weight.shape == (5, 256) and g.exits.tolist() == [2, 3, 4, 5, 6]
