"""evaluate.py predict and export, end to end on a model trained for two iterations."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import train
from conftest import ROOT, TINY, tiny_run
from config import load_config
from data import read_panoptic_png
from model import build_model


@pytest.fixture(scope="module")
def trained(synthetic, tmp_path_factory):
    """A tiny model trained for 2 iterations (its model_final.pt stores config and classes), and
    a folder of three val-size images plus a file that is not an image."""
    out = tmp_path_factory.mktemp("run")
    cfg = load_config(TINY, tiny_run(synthetic, **{"train.iterations": 2}))
    train.train(cfg, out / "m2f")
    images = out / "images"
    images.mkdir()
    for k, src in enumerate(sorted((synthetic / "synthetic" / "train" / "images").iterdir())[:3]):
        shutil.copy(src, images / f"img{k}{src.suffix}")
    (images / "notes.txt").write_text("not an image")
    return out / "m2f" / "model_final.pt", images


def predict(weights, images, out, *extra):
    """evaluate.py predict; returns the per-image records of the panoptic.json it wrote."""
    evaluate.main(["predict", "--weights", str(weights), "--input", str(images), "--out", str(out),
                   "--device", "cpu", *extra])
    return json.loads((out / "panoptic.json").read_text())["annotations"]


def test_predict_writes_pictures_pngs_and_json_that_agree(trained, tmp_path, capsys):
    weights, images = trained
    records = predict(weights, images, tmp_path / "p", "--semantic", "--instances")
    printed = capsys.readouterr().out
    assert "notes.txt" in printed and "not an image" in printed  # named, and the run went on
    assert [r["image_id"] for r in records] == ["img0", "img1", "img2"]
    stored = json.loads((tmp_path / "p" / "panoptic.json").read_text())
    names = {c["id"]: c["name"] for c in stored["categories"]}
    assert names[1] == "circle" and len(names) == 8  # the training set's classes, from the weights
    for record in stored["annotations"]:
        ids = read_panoptic_png(tmp_path / "p" / "panoptic" / record["file_name"])
        H, W = np.asarray(Image.open(next(images.glob(record["image_id"] + ".*")))).shape[:2]
        assert ids.shape == (H, W)  # post-processed at the original size
        present = {int(i): int(n) for i, n in zip(*np.unique(ids, return_counts=True)) if i != 0}
        assert present == {s["id"]: s["area"] for s in record["segments_info"]}
        for s in record["segments_info"]:
            assert s["category_name"] == names[s["category_id"]]
        assert (tmp_path / "p" / "overlay" / f"{record['image_id']}.png").is_file()
        semantic = np.asarray(Image.open(tmp_path / "p" / "semantic" / f"{record['image_id']}.png"))
        assert semantic.shape == (H, W) and set(np.unique(semantic)) <= set(names)
    detections = json.loads((tmp_path / "p" / "instances.json").read_text())
    assert all(d["image_id"] in {"img0", "img1", "img2"} and d["category_id"] in names for d in detections)


def test_batch_of_three_equals_batch_of_one(trained, tmp_path):
    weights, images = trained
    one = predict(weights, images, tmp_path / "b1", "--batch-size", "1")
    three = predict(weights, images, tmp_path / "b3", "--batch-size", "3")
    assert [r["segments_info"] for r in one] == [r["segments_info"] for r in three]
    for r in one:
        a = read_panoptic_png(tmp_path / "b1" / "panoptic" / r["file_name"])
        b = read_panoptic_png(tmp_path / "b3" / "panoptic" / r["file_name"])
        assert np.array_equal(a, b)


def test_predict_keeps_an_earlier_prediction(trained, tmp_path):
    weights, images = trained
    one = next(images.glob("img0.*"))
    predict(weights, one, tmp_path / "p")
    with pytest.raises(ValueError, match="earlier prediction"):
        predict(weights, one, tmp_path / "p")
    predict(weights, one, tmp_path / "p", "--overwrite")


def test_weights_without_classes_get_numbered_classes(trained, tmp_path):
    weights, images = trained
    bare = tmp_path / "bare.pt"
    torch.save({"model": torch.load(weights, weights_only=True)["model"]}, bare)  # a state dict alone
    records = predict(bare, images, tmp_path / "p", "--config", TINY, "data.test_short_side=64",
                      "data.test_max_size=128")
    stored = json.loads((tmp_path / "p" / "panoptic.json").read_text())
    assert stored["categories"][0]["name"] == "class 0"
    assert all(s["category_name"].startswith("class ") for r in records for s in r["segments_info"])


def test_torch_export_equals_eager(trained, tmp_path):
    weights, _ = trained
    out = tmp_path / "net.pt2"
    evaluate.main(["export", "--weights", str(weights), "--size", "64", "96", "--out", str(out)])
    cfg = load_config(TINY)
    model = build_model(cfg).eval()
    model.load_state_dict(torch.load(weights, weights_only=True)["model"])
    images = torch.rand(1, 3, 64, 96) * 255
    with torch.no_grad():
        expected = model((images - model.pixel_mean) / model.pixel_std)
        logits, masks = torch.export.load(out).module()(images)
    assert torch.equal(logits, expected["pred_logits"]) and torch.equal(masks, expected["pred_masks"])


def test_export_refuses_a_size_the_model_cannot_take(trained, tmp_path):
    weights, _ = trained
    with pytest.raises(ValueError, match="multiples of model.size_divisibility"):
        evaluate.main(["export", "--weights", str(weights), "--size", "60", "96", "--out", str(tmp_path / "x.pt2")])


def test_onnx_export_runs_in_onnxruntime(trained, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is an optional dependency")
    pytest.importorskip("onnxscript", reason="the ONNX exporter needs onnxscript (optional)")
    weights, _ = trained
    out = tmp_path / "net.onnx"
    evaluate.main(["export", "--weights", str(weights), "--size", "64", "64", "--format", "onnx", "--out", str(out)])
    model = build_model(load_config(TINY)).eval()
    model.load_state_dict(torch.load(weights, weights_only=True)["model"])
    images = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        expected = model((images - model.pixel_mean) / model.pixel_std)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits, masks = session.run(None, {"images": images.numpy()})
    assert np.abs(logits - expected["pred_logits"].numpy()).max() < 1e-4
    assert np.abs(masks - expected["pred_masks"].numpy()).max() < 1e-4


@pytest.mark.parametrize("argv", [["evaluate.py", "--help"], ["evaluate.py", "predict", "--help"],
                                  ["evaluate.py", "export", "--help"], ["derive.py", "--help"],
                                  ["gate.py", "--help"]])
def test_help_answers_without_importing_torch(argv):
    code = ("import runpy, sys; sys.argv = %r\n"
            "try:\n    runpy.run_path(%r, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('torch loaded' if 'torch' in sys.modules else 'no torch')") % (argv, str(ROOT / argv[0]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "usage:" in result.stdout and result.stdout.strip().endswith("no torch"), result.stdout + result.stderr


def test_a_config_error_is_one_line_before_torch(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("_base_: %s\nmodel: {encoderr: {}}\n" % TINY)
    code = ("import runpy, sys; sys.argv = ['evaluate.py', '--weights', 'w.pt', '--config', %r]\n"
            "try:\n    runpy.run_path(%r, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print('torch loaded' if 'torch' in sys.modules else 'no torch')") % (str(bad), str(ROOT / "evaluate.py"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.stdout.strip() == "no torch"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "encoderr" in lines[0], result.stderr
