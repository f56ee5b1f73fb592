"""train.py: a few iterations on one and two processes, exact resumption, safe checkpoints."""
import json
import os
import subprocess
import sys

import pytest
import torch

import config
import train
from config import load_config
from conftest import ROOT, TINY as CONFIG, free_port
from conftest import tiny_run as overrides


def losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_resume_continues_the_same_loss_curve(synthetic, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train.train(load_config(CONFIG, overrides(synthetic, **{"train.iterations": 4})), full)
    train.train(load_config(CONFIG, overrides(synthetic, **{"train.iterations": 2})), part)
    train.train(load_config(CONFIG, overrides(synthetic, **{"train.iterations": 4})), part, resume=True)
    expected, got = losses(full), losses(part)
    assert len(expected) == len(got) == 4
    assert got == expected  # bit for bit: same data, augmentation, matcher points and optimizer state
    assert (part / "model_final.pt").exists() and (part / "config.yaml").exists()
    final = torch.load(part / "model_final.pt", weights_only=True)
    reference = torch.load(full / "model_final.pt", weights_only=True)
    for k, v in reference["model"].items():
        assert torch.equal(final["model"][k], v), k


def test_resume_needs_no_config_the_checkpoint_stores_it(synthetic, tmp_path):
    run = tmp_path / "run"
    train.main(["--config", CONFIG, "--out", str(run), *overrides(synthetic, **{"train.iterations": 2})])
    train.main(["--out", str(run), "--resume", "train.iterations=3"])  # the stored config, one more iteration
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 3
    with pytest.raises(SystemExit):  # neither a config nor a run to resume
        train.parse_args(["--out", str(run)])


def test_killed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    config.atomic_save({"step": 1, "w": torch.ones(3)}, path)

    def dies_halfway(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt  # the process is killed mid-write

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        config.atomic_save({"step": 2, "w": torch.zeros(3)}, path)
    kept = torch.load(path, weights_only=True)
    assert kept["step"] == 1 and torch.equal(kept["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary files left


@pytest.mark.parametrize("where, message", [
    ("loss", "loss is nan at iteration 0"),  # a NaN loss
    ("matching", "non-finite matching cost.* at iteration 0"),  # NaN reaches the matcher first
])
def test_non_finite_loss_stops_with_a_clear_message(synthetic, tmp_path, monkeypatch, where, message):
    """NaN from the network (a NaN weight in the config is refused before: test_config_values_are_validated)."""
    import model

    if where == "loss":
        original = model.SetCriterion.forward
        monkeypatch.setattr(model.SetCriterion, "forward",
                            lambda self, *a: {k: v * float("nan") for k, v in original(self, *a).items()})
    else:
        original = model.HungarianMatcher.cost_matrix
        monkeypatch.setattr(model.HungarianMatcher, "cost_matrix", lambda self, *a: original(self, *a) * float("nan"))
    cfg = load_config(CONFIG, overrides(synthetic, **{"train.iterations": 2}))
    with pytest.raises(FloatingPointError, match=message):
        train.train(cfg, tmp_path / "run")


def test_optimizer_groups_follow_the_official_recipe():
    cfg = load_config(str(ROOT / "configs/coco/m2f_swin_t.yaml"))
    model = train.build_model(cfg)
    opt = train.build_optimizer(model, cfg.train)
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert group_of[id(named["backbone.features.1.0.attn.relative_position_bias_table"])]["weight_decay"] == 0
    assert group_of[id(named["backbone.features.1.0.attn.qkv.weight"])]["lr"] == pytest.approx(1e-5)
    assert group_of[id(named["backbone.norms.0.weight"])]["weight_decay"] == 0
    assert group_of[id(named["decoder.query_feat.weight"])]["weight_decay"] == 0  # nn.Embedding
    assert group_of[id(named["encoder.input_proj.level_embed"])]["weight_decay"] == 0.05  # a Parameter, as official
    assert group_of[id(named["encoder.layers.0.linear1.weight"])] == {**group_of[id(named["encoder.layers.0.linear1.weight"])], "lr": 1e-4, "weight_decay": 0.05}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)


def test_lr_schedules():
    cfg = load_config(CONFIG, ["train.iterations=100", "train.steps=[50,75]"]).train
    assert [train.lr_factor(s, cfg) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    cfg.schedule = "poly"
    assert train.lr_factor(50, cfg) == pytest.approx(0.5 ** 0.9)


def test_two_processes_with_torchrun_stay_identical(synthetic, tmp_path):
    """DDP on gloo: after a few iterations every rank holds exactly the same parameters."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests/ddp_worker.py"), CONFIG, str(out), *overrides(synthetic, **{"train.iterations": 3})]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for k, v in rank0.items():
        assert torch.equal(v, rank1[k]), k
    assert len(losses(out)) == 3
