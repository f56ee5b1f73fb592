"""derive.py (ECO-M2F Step B): every image once, exact resumption, panopticapi's PQ, torchrun."""
import json
import os
import re
import subprocess
import sys
from contextlib import redirect_stdout
from io import StringIO

import pytest
import torch
from panopticapi.evaluation import pq_compute, pq_compute_multi_core

import data
import synthetic
import derive
from metrics import evaluate_dataset
import model as model_module
from config import load_config
from conftest import ROOT, free_port
from config import load_weights
from model import build_model

CONFIG = str(ROOT / "configs/demo/m2f_tiny.yaml")
EXITS = [1, 2, 3]  # the tiny config has 3 encoder layers


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Batch-1 forwards of a 64 px image are too small to share: a second thread only waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """6 training images of 64 px, and the weights of an untrained model that predicts something.

    A freshly initialised model predicts nothing (no class beats the 0.8 score threshold), so
    every PQ would be 0. Instead, with the decoder's residual updates zeroed, each query keeps its
    random content and a fixed stuff class (the class head, scaled up, sees only the 3 stuff
    classes), while its mask still comes from the image features at each exit; with the overlap
    threshold off, each image is split into stuff segments that sometimes match the ground truth.
    """
    tmp = tmp_path_factory.mktemp("derive")
    synthetic.write_synthetic(tmp / "synthetic", train=6, val=2, size=64, seed=0)
    overrides = [f"data.root={tmp}", "data.test_short_side=64", "data.test_max_size=128", "data.workers=0",
                 "model.inference.overlap_threshold=0.0"]
    torch.manual_seed(5)
    model = build_model(load_config(CONFIG, overrides))
    with torch.no_grad():
        decoder = model.decoder
        for layer in [*decoder.cross_attn, *decoder.self_attn]:
            layer.attn.out_proj.weight.zero_()
        for layer in decoder.ffn:
            layer.linear2.weight.zero_()
            layer.linear2.bias.zero_()
        head = decoder.class_embed  # contiguous classes 0-4 things, 5-7 stuff, 8 "no object"
        head.weight[:5], head.bias[:5], head.weight[8:], head.bias[8:] = 0, -100, 0, -100
        head.weight[5:8] *= 20
        head.bias[5:8] = 0
    weights = tmp / "weights.pt"
    torch.save({"model": model.state_dict()}, weights)
    return {"tmp": tmp, "weights": weights, "overrides": overrides}


def run(case, out, *extra):
    derive.main(["--config", CONFIG, "--weights", str(case["weights"]), "--out", str(out), "--device", "cpu",
                 *extra, *case["overrides"]])


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def shards(out):
    return sorted(out.parent.glob(out.name + ".rank*"))


@pytest.fixture(scope="module")
def reference(case):
    """The output of one uninterrupted run."""
    out = case["tmp"] / "reference" / "derived.jsonl"
    run(case, out)
    return out.read_bytes()


@pytest.fixture
def forward_calls(monkeypatch):
    """How many images went through the model (one forward_exits call each)."""
    calls = []
    original = model_module.Mask2Former.forward_exits

    def counted(self, images, exits, targets=None):
        calls.append(images.shape[0])
        return original(self, images, exits, targets)

    monkeypatch.setattr(model_module.Mask2Former, "forward_exits", counted)
    return calls


def test_every_image_once_at_every_exit(case, reference):
    lines = [json.loads(line) for line in reference.decode().splitlines()]
    dataset = data.build_dataset(load_config(CONFIG, case["overrides"]).data, split="train", train=False)
    assert [r["image_id"] for r in lines] == [img["id"] for img in dataset.images]
    assert [r["file_name"] for r in lines] == [img["file_name"] for img in dataset.images]
    assert all(list(r) == ["image_id", "file_name", "exits", "pq"] and r["exits"] == EXITS for r in lines)
    values = [q for r in lines for q in r["pq"]]
    assert len(values) == 6 * 3 and all(0.0 <= q <= 1.0 for q in values)
    assert len(set(values)) > 2  # not a constant: some images score at some exits
    assert not shards(case["tmp"] / "reference" / "derived.jsonl")


def test_resume_after_a_partial_run(case, reference, tmp_path, forward_calls, capsys):
    out = tmp_path / "derived.jsonl"
    run(case, out, "--max-images", "3")
    assert [r["image_id"] for r in records(out)] == [1, 2, 3] and len(forward_calls) == 3
    run(case, out)
    assert out.read_bytes() == reference
    assert len(forward_calls) == 6  # the first three were not computed again
    assert not shards(out)

    capsys.readouterr()
    mtime = out.stat().st_mtime_ns
    run(case, out)
    assert "all 6 images done" in capsys.readouterr().out
    assert len(forward_calls) == 6 and out.stat().st_mtime_ns == mtime and out.read_bytes() == reference


def test_resume_after_a_kill(case, reference, tmp_path, forward_calls):
    """Shards left by killed runs (one of an earlier 2-process run too), each with a last line cut
    short mid-write: the complete lines count, the cut ones are recomputed, nothing twice."""
    lines = reference.decode().splitlines(keepends=True)
    out = tmp_path / "derived.jsonl"
    derive.shard_path(out, 0).write_text(lines[0] + lines[1] + lines[2][:25])
    derive.shard_path(out, 1).write_text(lines[4] + lines[5][:-1])  # only the newline is missing
    run(case, out)
    assert out.read_bytes() == reference
    assert len(forward_calls) == 3  # images 3, 4 and 6
    assert not shards(out)


def panopticapi_pq(tmp_path, gt, gt_ann, pred_ann, gt_folder, pred_folder):
    """panopticapi's PQ ("All") of one image, from its files alone; None when it has nothing to
    average (n == 0: pq_compute divides by zero)."""
    gt_json, pred_json = tmp_path / "gt.json", tmp_path / "pred.json"
    image = next(img for img in gt["images"] if img["id"] == gt_ann["image_id"])
    gt_json.write_text(json.dumps({"images": [image], "annotations": [gt_ann], "categories": gt["categories"]}))
    pred_json.write_text(json.dumps({"annotations": [pred_ann]}))
    with redirect_stdout(StringIO()):
        try:
            return pq_compute(str(gt_json), str(pred_json), str(gt_folder), str(pred_folder))["All"]["pq"]
        except ZeroDivisionError:
            # Its "Things" or "Stuff" group may be empty while "All" is not: the same statistics
            # through pq_compute's own parts, averaged over all categories only.
            categories = {c["id"]: c for c in gt["categories"]}
            stat = pq_compute_multi_core([(gt_ann, pred_ann)], str(gt_folder), str(pred_folder), categories)
            try:
                return stat.pq_average(categories, None)[0]["pq"]
            except ZeroDivisionError:
                return None


@pytest.mark.parametrize("exit", [1, 3])
def test_pq_equals_panopticapi_on_evaluate_predictions(case, reference, tmp_path, exit):
    """For one exit: evaluate.py's predictions (PNG + JSON, through forward(exit=k)) scored image by
    image by panopticapi's pq_compute equal the derived pq[k]."""
    cfg = load_config(CONFIG, case["overrides"])
    cfg.model.inference.instance = cfg.model.inference.semantic = False
    model = build_model(cfg)
    load_weights(model, case["weights"], strict=True)
    dataset = data.build_dataset(cfg.data, split="train", train=False)
    evaluate_dataset(model, dataset, tmp_path / "eval", exit=exit, vis_images=0, fps_images=0,
                              flops=False, progress=False)
    predictions = {a["image_id"]: a for a in json.loads((tmp_path / "eval/predictions.json").read_text())["annotations"]}
    gt = json.loads(dataset.json_file.read_text())
    derived = {r["image_id"]: r["pq"][EXITS.index(exit)] for r in map(json.loads, reference.decode().splitlines())}
    compared = []
    for gt_ann in gt["annotations"]:
        expected = panopticapi_pq(tmp_path, gt, gt_ann, predictions[gt_ann["image_id"]], dataset.panoptic_dir,
                                  tmp_path / "eval/predictions")
        got = derived[gt_ann["image_id"]]
        if expected is None:
            assert got == 1.0  # image_pq's rule for an image with nothing to evaluate
        else:
            assert got == pytest.approx(expected, abs=1e-9), gt_ann["image_id"]
            compared.append(got)
    assert len(compared) == 6 and any(q > 0 for q in compared)  # some matches: the check has teeth


def test_two_processes_with_torchrun(case, reference, tmp_path):
    """2 ranks on gloo, resuming from a killed single-process run: the same merged file, no shards."""
    out = tmp_path / "derived.jsonl"
    lines = reference.decode().splitlines(keepends=True)
    derive.shard_path(out, 0).write_text(lines[0] + lines[1][:10])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "derive.py"), "--config", CONFIG, "--weights", str(case["weights"]), "--out", str(out),
           "--device", "cpu", *case["overrides"]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_bytes() == reference
    assert not shards(out)
    assert "6 images (5 computed now)" in proc.stdout


def test_bad_inputs(case, reference, tmp_path):
    out = tmp_path / "derived.jsonl"
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        derive.main(["--config", CONFIG, "--weights", str(tmp_path / "nowhere.pt"), "--out", str(out),
                     *case["overrides"]])
    other = tmp_path / "queries10.pt"  # the same names, other shapes
    torch.save({"model": build_model(load_config(CONFIG, ["model.decoder.queries=10"])).state_dict()}, other)
    with pytest.raises(ValueError, match="queries10.pt"):
        derive.main(["--config", CONFIG, "--weights", str(other), "--out", str(out), *case["overrides"]])
    with pytest.raises(ValueError, match=r"--exits must be in 1\.\.3, got \[2, 4\]"):
        run(case, out, "--exits", "2", "4")

    out.write_bytes(reference)  # derived at exits 1, 2, 3
    with pytest.raises(ValueError, match=rf"{re.escape(str(out))}: image 1 was derived at exits \[1, 2, 3\].*\[2, 3\]"):
        run(case, out, "--exits", "2", "3")

    lines = reference.decode().splitlines(keepends=True)
    out.write_text(lines[0] + "{not json\n" + lines[2])
    with pytest.raises(ValueError, match=rf"{re.escape(str(out))}: line 2 is not JSON"):
        run(case, out)

    out.write_text(lines[0].replace("000001.png", "elsewhere.png"))
    with pytest.raises(ValueError, match="not an image of this split"):
        run(case, out)

    out.unlink()
    proscale = [*case["overrides"], "model.encoder.name=proscale", "model.encoder.depths=[1,1,0]"]  # no stage-3 exits
    weights = tmp_path / "proscale.pt"
    torch.save({"model": build_model(load_config(CONFIG, proscale)).state_dict()}, weights)
    with pytest.raises(ValueError, match="encoder 'proscale' has no exits"):
        derive.main(["--config", CONFIG, "--weights", str(weights), "--out", str(out), "--device", "cpu", *proscale])
