"""ECO-M2F's image-adaptive inference in evaluate.py: per-image exits in a batch, gated evaluation
and its GFLOPs, the exit/gate sweep with its table and plot, `flops --exit`, and bad input.

Everything runs on the tiny demo model (3 encoder layers, untrained but seeded) and 4 synthetic
64x64 validation images, offline on the CPU.
"""
import json
from contextlib import redirect_stdout
from io import StringIO
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import evaluate
import flops
import synthetic
import visualize
from metrics import METRIC_KEYS, evaluate_dataset
from conftest import ROOT

TINY = ROOT / "configs/demo/m2f_tiny.yaml"


@pytest.fixture(scope="module")
def eco(tmp_path_factory):
    """Synthetic data, seeded weights, and a gate whose choices differ between the val images."""
    import data
    import gate as gates
    from config import load_config
    from model import build_model

    tmp = tmp_path_factory.mktemp("eco")
    synthetic.write_synthetic(tmp / "synthetic", train=4, val=4, size=64, seed=0)
    overrides = [f"data.root={tmp}", "data.test_short_side=64", "data.test_max_size=128", "data.workers=0"]
    cfg = load_config(TINY, overrides)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    weights = tmp / "tiny.pt"
    torch.save({"model": model.state_dict()}, weights)
    dataset = data.build_dataset(cfg.data, split="val", train=False)
    images, _ = model.preprocess([dataset[i]["image"] for i in range(len(dataset))])

    # Random heads with a large scale until the 4 images do not all take the same exit: the pooled
    # features differ little between images, so the scale turns small differences into choices.
    gate = gates.Gate(dim=64, exits=(1, 2, 3)).eval()
    for seed in range(50):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            gate.head.weight.copy_(100 * torch.randn(gate.head.weight.shape, generator=generator))
            gate.head.bias.zero_()
            exits = model.forward_gated(images, gate)["exits"]
        if len(set(exits.tolist())) >= 2:
            break
    else:
        pytest.fail("no seed gave the gate mixed exits on the synthetic val images")
    gate_path = tmp / "gate_b001.pt"
    gates.save_gate(gate, gate_path, beta=0.01)
    return SimpleNamespace(tmp=tmp, overrides=overrides, cfg=cfg, model=model, weights=weights, dataset=dataset,
                           images=images, gate=gate, gate_path=gate_path, exits=exits)


def predictions(outputs, i=None):
    picked = slice(None) if i is None else slice(i, i + 1)
    return outputs["pred_logits"][picked], outputs["pred_masks"][picked]


# ---- inference: mixed exits in one batch == each image alone --------------------------------


@torch.no_grad()
def test_a_batch_with_mixed_exits_equals_one_image_at_a_time(eco):
    model, images = eco.model, eco.images
    exits = torch.tensor([3, 1, 2, 1])
    batched = model(images, exit=exits)
    assert batched["exits"].tolist() == exits.tolist()
    for i, k in enumerate(exits.tolist()):
        alone = model(images[i: i + 1], exit=k)
        for got, want in zip(predictions(batched, i), predictions(alone)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # The exits matter: the same image at another exit predicts something else.
    assert not torch.allclose(model(images[:1], exit=1)["pred_logits"], batched["pred_logits"][:1], atol=1e-5)


@torch.no_grad()
def test_a_gated_batch_equals_one_image_at_a_time(eco):
    model, images, gate = eco.model, eco.images, eco.gate
    batched = model.forward_gated(images, gate)
    exits = batched["exits"].tolist()
    assert exits == eco.exits.tolist() and len(set(exits)) >= 2
    for i, k in enumerate(exits):
        assert model.forward_gated(images[i: i + 1], gate)["exits"].tolist() == [k]  # the gate decides per image
        alone = model(images[i: i + 1], exit=k)
        for got, want in zip(predictions(batched, i), predictions(alone)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ---- gated evaluation ----------------------------------------------------------------------


def test_gated_evaluation_costs_each_image_its_own_exit(eco, capsys):
    """The command with --gate (batch 2, default folder) against evaluate_dataset at batch 1: the
    same exits and predictions, and GFLOPs = the per-exit costs weighted by the exit histogram."""
    evaluate.main(["--config", str(TINY), "--weights", str(eco.weights), "--gate", str(eco.gate_path),
                   "--device", "cpu", "--batch-size", "2", "--fps-images", "1", "--vis", "0", *eco.overrides])
    report = capsys.readouterr().out
    out = eco.tmp / "eval_val_gate_gate_b001"  # next to the weights, named after the gate file
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == set(METRIC_KEYS)
    assert metrics["exit"] == "gate" and metrics["gate"]["beta"] == 0.01 and metrics["gate"]["exits"] == [1, 2, 3]
    histogram = {int(k): n for k, n in metrics["exit_histogram"].items()}
    expected = {k: eco.exits.tolist().count(k) for k in set(eco.exits.tolist())}
    assert histogram == expected and len(histogram) >= 2 and sum(histogram.values()) == 4
    assert "gate (β=0.01)" in report and "exits chosen by the gate" in report
    assert metrics["FPS"] > 0  # timed with the gate inside the forward

    # Every image is 64x64 and stays so: the mean cost is the histogram-weighted mean per exit.
    per_exit = {k: flops.model_flops(eco.model, 64, 64, output_size=(64, 64), exit=k) for k in histogram}
    for part, value in metrics["GFLOPs_parts"].items():
        weighted = sum(n * per_exit[k][part] for k, n in histogram.items()) / 4
        assert value == pytest.approx(weighted, rel=1e-12, abs=1e-15), part
    assert metrics["GFLOPs"] == metrics["GFLOPs_parts"]["total"]
    assert min(g["total"] for g in per_exit.values()) < metrics["GFLOPs"] < max(g["total"] for g in per_exit.values())

    # Batch 1 through the function: the same exits, segments and scores (GFLOPs follow from the exits).
    single = evaluate_dataset(eco.model, eco.dataset, eco.tmp / "gate_batch1", batch_size=1, gate=eco.gate,
                                       fps_images=0, vis_images=0, flops=False, progress=False)
    assert single["exit_histogram"] == metrics["exit_histogram"]
    for key in ("PQ", "SQ", "RQ", "AP", "mIoU"):
        assert single[key] == pytest.approx(metrics[key], abs=1e-9), key
    batched = json.loads((out / "predictions.json").read_text())
    assert json.loads((eco.tmp / "gate_batch1" / "predictions.json").read_text()) == batched
    assert json.loads((eco.tmp / "gate_batch1" / "metrics.json").read_text()) == single


def test_average_gflops_with_per_image_exits(monkeypatch):
    calls = []

    def fake_flops(model, h, w, complete=False, output_size=None, **kwargs):
        calls.append((h, w, output_size, kwargs.get("exit")))
        return {"total": float(h * w + 1000 * kwargs.get("exit", 9)), "encoder": float(kwargs.get("exit", 9))}

    monkeypatch.setattr(flops, "model_flops", fake_flops)
    sizes = [((32, 48), (64, 96))] * 3 + [((48, 32), (96, 64))]
    result = flops.average_gflops(None, sizes, exit=torch.tensor([1, 3, 1, 1]))
    assert sorted(calls) == [(32, 48, (64, 96), 1), (32, 48, (64, 96), 3), (48, 32, (96, 64), 1)]
    assert result == {"total": (4 * 32 * 48 + 6000) / 4, "encoder": 6 / 4}
    with pytest.raises(ValueError, match="3 exits for 4 images"):
        flops.average_gflops(None, sizes, exit=[1, 2, 3])


# ---- the sweep ------------------------------------------------------------------------------


def test_sweep_end_to_end(eco, capsys):
    out = eco.tmp / "sweep"
    args = ["sweep", "--config", str(TINY), "--weights", str(eco.weights), "--exits", "1", "2", "3",
            "--gates", str(eco.gate_path), "--out", str(out), "--max-images", "4", "--split", "val",
            "--batch-size", "4", "--device", "cpu", "--fps-images", "1", *eco.overrides]
    evaluate.main(args)
    printed = capsys.readouterr().out

    for folder in ("exit_1", "exit_2", "exit_3", "gate_gate_b001"):
        assert (out / folder / "metrics.json").is_file(), folder
    summary = json.loads((out / "sweep.json").read_text())
    rows = summary["rows"]
    assert summary["images"] == 4 and summary["split"] == "val"
    assert [r["name"] for r in rows] == ["exit 1", "exit 2", "exit 3", "β=0.01"]
    assert [r["kind"] for r in rows] == ["exit", "exit", "exit", "gate"]
    assert [r["exit"] for r in rows] == [1, 2, 3, None] and [r["beta"] for r in rows] == [None, None, None, 0.01]
    assert all(set(r) == set(evaluate.SWEEP_ROW_KEYS) for r in rows)
    for r in rows:
        assert r["images"] == 4 and r["FPS"] > 0 and 0 <= r["PQ"] <= 100 and r["mIoU"] is not None
        assert sum(r["exit_histogram"].values()) == 4
        metrics = json.loads((out / r["dir"] / "metrics.json").read_text())
        assert r["total_GFLOPs"] == metrics["GFLOPs"] and r["encoder_GFLOPs"] == metrics["GFLOPs_parts"]["encoder"]
    fixed, gated = rows[:3], rows[3]
    assert [r["exit_histogram"] for r in fixed] == [{"1": 4}, {"2": 4}, {"3": 4}]
    encoder = [r["encoder_GFLOPs"] for r in fixed]
    assert encoder[0] < encoder[1] < encoder[2]
    assert fixed[0]["total_GFLOPs"] < fixed[1]["total_GFLOPs"] < fixed[2]["total_GFLOPs"]
    assert fixed[0]["encoder_GFLOPs"] <= gated["encoder_GFLOPs"] <= fixed[2]["encoder_GFLOPs"]
    assert gated["gate"] == str(eco.gate_path)

    table = (out / "sweep.md").read_text().strip().splitlines()
    assert len(table) == 2 + 4
    assert [c.strip() for c in table[0].strip("|").split("|")][:7] == [
        "model", "PQ", "AP", "mIoU", "encoder GFLOPs", "total GFLOPs", "FPS"]
    assert table[-1].startswith("| β=0.01 |")
    assert "\n".join(table) in printed  # the table is printed too

    with Image.open(out / "sweep.png") as picture:
        assert picture.size == visualize.SWEEP_PLOT_SIZE and picture.mode == "RGB"
        colours = {colour for _, colour in picture.getcolors(maxcolors=1 << 20)}
    assert (31, 119, 180) in colours and (214, 39, 40) in colours  # blue exits, red gate

    # --reuse: nothing evaluated again, the same rows.
    evaluate.main([*args, "--reuse"])
    assert capsys.readouterr().out.count("reusing") == 4
    assert json.loads((out / "sweep.json").read_text())["rows"] == rows


def test_plot_handles_flat_and_missing_values(tmp_path):
    """An untrained model may score PQ 0 everywhere; rows without PQ are left out."""
    rows = [evaluate.sweep_row(f"exit {k}", "exit", {"PQ": 0.0, "GFLOPs": 0.1 * k, "GFLOPs_parts": {"encoder": k}},
                               f"exit_{k}", exit=k) for k in (1, 2)]
    rows.append(evaluate.sweep_row("g", "gate", {"PQ": None, "GFLOPs": 0.15}, "gate_g"))
    visualize.plot_sweep(rows, tmp_path / "flat.png")
    visualize.plot_sweep([], tmp_path / "empty.png")
    for name in ("flat.png", "empty.png"):
        with Image.open(tmp_path / name) as picture:
            assert picture.size == visualize.SWEEP_PLOT_SIZE
    low, high, step = visualize.nice_axis([0.0512, 0.0563])
    assert low <= 0.0512 and high >= 0.0563 and step in (0.001, 0.002, 0.0005)
    assert visualize.nice_axis([0.0, 0.0], minimum=0)[0] == 0  # a flat PQ of 0 does not go negative


# ---- flops --exit ---------------------------------------------------------------------------


def flops_command(*args):
    out = StringIO()
    with redirect_stdout(out):
        evaluate.main(["flops", "--config", str(TINY), "--size", "64", "96", "--json", *args])
    return json.loads(out.getvalue())["gflops"]


def test_flops_command_honours_the_exit():
    from config import load_config
    from model import build_model

    full = flops_command()
    by_exit = {k: flops_command("--exit", str(k)) for k in (1, 2, 3)}
    assert by_exit[1]["encoder"] < by_exit[2]["encoder"] < by_exit[3]["encoder"] == full["encoder"]
    for k, gflops in by_exit.items():
        assert gflops["backbone"] == full["backbone"] and gflops["decoder"] == full["decoder"]
    # The command counts on the meta device without the layers past k: the same as exit=k on a real model.
    model = build_model(load_config(TINY))
    for k in (1, 2):
        assert by_exit[k] == pytest.approx(flops.model_flops(model, 64, 96, exit=k), rel=1e-12)
    with pytest.raises(ValueError, match="exits 1..3"):
        flops_command("--exit", "4")


# ---- bad input ------------------------------------------------------------------------------


def test_bad_gate_input(eco, tmp_path, capsys):
    args = ["--config", str(TINY), "--weights", str(eco.weights), "--device", "cpu", "--out", str(tmp_path / "eval"),
            *eco.overrides]
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        evaluate.main([*args, "--gate", str(tmp_path / "nowhere.pt")])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a gate")
    with pytest.raises(ValueError, match="garbage.pt"):
        evaluate.main([*args, "--gate", str(garbage)])
    with pytest.raises(ValueError, match="tiny.pt: not a gate file"):  # a model checkpoint is no gate
        evaluate.main([*args, "--gate", str(eco.weights)])

    import gate as gates

    wide = tmp_path / "wide.pt"  # a gate for a 256-channel encoder
    gates.save_gate(gates.Gate(dim=256, exits=(1, 2, 3)), wide, beta=0.01)
    with pytest.raises(ValueError, match="wide.pt.*256 channels"):
        evaluate.main([*args, "--gate", str(wide)])
    deep = tmp_path / "deep.pt"  # exits the 3-layer encoder does not have
    gates.save_gate(gates.Gate(dim=64, exits=(2, 4, 6)), deep)
    with pytest.raises(ValueError, match="deep.pt.*exits 1..3"):
        evaluate.main([*args, "--gate", str(deep)])
    with pytest.raises(ValueError, match="deep.pt"):
        evaluate.main(["sweep", "--config", str(TINY), "--weights", str(eco.weights), "--gates", str(deep),
                       "--out", str(tmp_path / "sweep"), *eco.overrides])

    with pytest.raises(SystemExit) as error:
        evaluate.main([*args, "--gate", str(eco.gate_path), "--exit", "2"])
    assert error.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_report_row_names_may_contain_equals_signs(tmp_path, capsys):
    folder = tmp_path / "gate"
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"PQ": 50.0, "GFLOPs": 1.5, "GFLOPs_parts": {"encoder": 0.5}}))
    (folder / "predictions.json").write_text(json.dumps({"annotations": [{"image_id": 1}, {"image_id": 2}]}))
    evaluate.main(["report", f"gate, β=0.02={folder}", "--out", str(tmp_path / "report.md"), "--speed-images", "0"])
    assert "| gate, β=0.02 | 2 | 50.00 |" in capsys.readouterr().out
    assert (tmp_path / "report.md").exists()
