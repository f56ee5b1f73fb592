"""evaluate.py report: one image list per table, speed as interleaved ratios, the findings."""
import json

import pytest
import torch

import evaluate
import report
from config import config_to_dict, load_config
from conftest import TINY, tiny_run
from encoders import M2FEncoder
from model import build_model


def write_row(folder, image_ids, **metrics):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "predictions.json").write_text(json.dumps({"annotations": [{"image_id": i} for i in image_ids]}))
    return folder


def test_rows_on_different_images_are_refused(tmp_path):
    a = write_row(tmp_path / "a", [1, 2, 3], PQ=50.0)
    b = write_row(tmp_path / "b", [1, 2], PQ=60.0)
    with pytest.raises(ValueError, match="not the same ones"):
        evaluate.main(["report", f"A={a}", f"B={b}", "--speed-images", "0"])


def test_the_gate_is_judged_against_the_fixed_exits_line(tmp_path):
    source = {"weights": "eco.pt"}
    rows = [report.read_row(f"exit {k}={write_row(tmp_path / f'e{k}', [1], PQ=pq, GFLOPs=g, exit=k, source=source)}")
            for k, (pq, g) in enumerate([(40.0, 1.0), (50.0, 2.0), (56.0, 3.0)], start=1)]
    above = write_row(tmp_path / "g1", [1], PQ=47.0, GFLOPs=1.5, exit="gate", source=source, exit_histogram={"1": 1})
    below = write_row(tmp_path / "g2", [1], PQ=52.0, GFLOPs=2.5, exit="gate", source=source)
    rows += [report.read_row(f"gate a={above}"), report.read_row(f"gate b={below}")]
    text = "\n".join(report.eco_findings(rows))
    assert "gate a: 1.5 GFLOPs" in text and "gives PQ 45.00" in text and "is above it (+2.00)" in text
    assert "gives PQ 53.00" in text and "is not above it (-1.00)" in text  # halfway between 50 and 56
    assert "barely matters" not in text
    flat = [report.read_row(f"exit {k}={write_row(tmp_path / f'f{k}', [1], PQ=50 + 0.1 * k, GFLOPs=k, exit=k, source=source)}")
            for k in (1, 2)]
    assert "barely matters" in "\n".join(report.eco_findings(flat))


def test_speed_ratios_time_each_row_model_in_one_process(synthetic, tmp_path, monkeypatch):
    cfg = load_config(TINY, tiny_run(synthetic))
    torch.manual_seed(0)
    weights = tmp_path / "w.pt"
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    source = {"weights": str(weights), "config": json.loads(json.dumps(config_to_dict(cfg))), "split": "val"}
    ids = [1, 2]  # the synthetic val images
    rows = [report.read_row(f"full={write_row(tmp_path / 'full', ids, PQ=50.0, exit=None, source=source)}"),
            report.read_row(f"exit 1={write_row(tmp_path / 'exit1', ids, PQ=45.0, exit=1, source=source)}")]
    timed, real = [], report.interleaved_times
    monkeypatch.setattr(report, "interleaved_times", lambda fns, rounds: timed.append(fns) or real(fns, rounds=rounds))
    exits_run, forward = [], M2FEncoder.forward
    monkeypatch.setattr(M2FEncoder, "forward", lambda self, f, exit=None: exits_run.append(exit) or forward(self, f, exit))
    threads = torch.get_num_threads()
    speed = report.speed_ratios(rows, images=2, rounds=2)
    assert [sorted(fns) for fns in timed] == [["exit 1", "full"]] * 2  # the whole models, then the encoders
    for fns in timed:  # each row's callables run its own exit
        for name, exit in (("full", None), ("exit 1", 1)):
            exits_run.clear()
            fns[name]()
            assert set(exits_run) == {exit}
    assert speed["images"] == 2 and speed["threads"] == 1 and torch.get_num_threads() == threads  # restored
    assert speed["rows"]["full"]["model"][0] == 1.0  # the reference against itself, round by round
    median, (low, high) = speed["rows"]["exit 1"]["encoder"]
    assert 0 < low <= median <= high


def test_step_b_histogram_counts_the_best_exit_per_image(tmp_path):
    lines = [{"image_id": 1, "exits": [1, 2, 3], "pq": [0.5, 0.5, 0.4]},  # a tie: the smallest exit
             {"image_id": 2, "exits": [1, 2, 3], "pq": [0.1, 0.2, 0.9]},
             {"image_id": 3, "exits": [1, 2, 3], "pq": [0.3, 0.6, 0.5]}]
    path = tmp_path / "derived.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    text = report.derived_findings(path)[0]
    assert "is 1: 1 2: 1 3: 1 (exit: images)" in text and "differ" in text
    path.write_text(json.dumps(lines[1]) + "\n")
    assert "no per-image difference" in report.derived_findings(path)[0]
