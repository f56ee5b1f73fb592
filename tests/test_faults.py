"""Bad input and faults: every one either works or stops with one line naming the file or key and
the problem, and nothing already written is lost (README, "Failure behaviour")."""
import json
import os
import pickle
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import config
import data
import derive
import evaluate
import gate
import train
from config import ConfigError, load_config
from conftest import ROOT, TINY
from conftest import tiny_run as overrides
from data import DataError
from model import build_model


# ---- the config layer: every numeric setting is checked where the config is read -------------


@pytest.mark.parametrize("setting, key", [
    ("train.lr=0", "train.lr"), ("train.lr=-1e-4", "train.lr"), ("train.lr=.nan", "train.lr"),
    ("train.batch_size=0", "train.batch_size"), ("train.checkpoint_every=0", "train.checkpoint_every"),
    ("train.log_every=0", "train.log_every"), ("train.iterations=-5", "train.iterations"),
    ("model.encoder.layers=-1", "model.encoder.layers"), ("model.encoder.layers=0", "model.encoder.layers"),
    ("model.loss.class_weight=.nan", "model.loss.class_weight"), ("model.loss.dice_weight=-1", "model.loss.dice_weight"),
    ("model.encoder.heads=3", "model.encoder.heads"),  # 64 channels do not split into 3 heads
    ("model.encoder.depths=[1,1]", "model.encoder.depths"), ("model.thing_classes=[0,99]", "model.thing_classes"),
    ("data.max_scale=0.1", "data.max_scale"), ("data.workers=-1", "data.workers"),
    ("train.exits=[1,1]", "train.exits"), ("train.exit_alpha=[1.0]", "train.exit_alpha"),
    ("gate.beta=-0.1", "gate.beta"), ("gate.exits=[]", "gate.exits"), ("train.amp=fp8", "train.amp"),
    ("model.inference.overlap_threshold=1.5", "model.inference.overlap_threshold"),
])
def test_config_values_are_validated(setting, key):
    """Each value is refused at load time with the key and the file, before any model or data."""
    with pytest.raises(ConfigError, match=rf"m2f_tiny.yaml \+ command line: '{key}' must be"):
        load_config(TINY, [setting, "train.exits=[1,2]"] if key == "train.exit_alpha" else [setting])


def test_every_shipped_config_is_valid():
    for path in sorted(ROOT.glob("configs/*/*.yaml")):
        load_config(path)  # raises on the first broken rule


def test_a_base_cycle_names_the_files(tmp_path):
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match=r"include each other .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")


def test_a_command_prints_one_line_and_exits_2(tmp_path):
    """A ConfigError through the script: one line on stderr, no traceback; M2F_DEBUG shows it."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", TINY, "--out", str(tmp_path / "run"), "train.lr=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {TINY} + command line: 'train.lr' must be a positive, finite learning rate, got 0.0"]
    debug = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "M2F_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert not (tmp_path / "run").exists()  # nothing written


# ---- runs are never overwritten silently ---------------------------------------------------------


def test_a_folder_holding_a_run_is_refused_before_anything_is_written(synthetic, tmp_path):
    run = tmp_path / "run"
    train.train(load_config(TINY, overrides(synthetic, **{"train.iterations": 2})), run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(FileExistsError, match=rf"{run}: already holds a run .*--resume.*--overwrite"):
        train.train(load_config(TINY, overrides(synthetic, **{"train.iterations": 1, "train.lr": 1e-3})), run)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # metrics, config, weights
    train.train(load_config(TINY, overrides(synthetic, **{"train.iterations": 1})), run, overwrite=True)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # replaced, as asked


def test_an_interrupted_run_prints_the_resume_command(synthetic, tmp_path, capsys):
    run = tmp_path / "run"
    train.train(load_config(TINY, overrides(synthetic, **{"train.iterations": 2})), run)
    args = SimpleNamespace(config=TINY, overrides=["train.iterations=4"])
    train.print_resume_hint(run, args)
    err = capsys.readouterr().err
    assert "holds iteration 2" in err and f"--out {run} --resume train.iterations=4" in err


# ---- files that are read: datasets, images, weights, derived sets, caches -----------------------


def write_split(folder, images, annotations=()):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "panoptic").mkdir(exist_ok=True)
    categories = [{"id": 1, "name": "a", "isthing": 1}]
    (folder / "panoptic.json").write_text(json.dumps({"images": images, "annotations": list(annotations),
                                                      "categories": categories}))
    return data.PanopticDataset(config.SplitConfig("images", "panoptic", "panoptic.json"), folder)


def test_two_images_with_one_id_are_refused(tmp_path):
    images = [{"id": 7, "file_name": "a.png"}, {"id": 8, "file_name": "b.png"}, {"id": 7, "file_name": "c.png"}]
    with pytest.raises(DataError, match=r"panoptic.json: images\[0\] and images\[2\] have the same id 7"):
        write_split(tmp_path, images)


def test_an_empty_split_names_its_file(tmp_path):
    with pytest.raises(DataError, match=r"panoptic.json: the split has no images"):
        write_split(tmp_path, [])


def test_a_16_bit_grayscale_png_keeps_its_values(tmp_path):
    gray = np.array([[0, 257 * 100], [65535, 257 * 10]], dtype=np.uint16)
    Image.fromarray(gray).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    image = data.read_image(tmp_path / "g16.png")
    assert image.shape == (3, 2, 2) and image.dtype == torch.uint8
    np.testing.assert_array_equal(image[0].numpy(), [[0, 100], [255, 10]])  # not all white
    assert torch.equal(image[0], image[2])


def test_a_float_image_is_refused(tmp_path):
    Image.fromarray(np.zeros((2, 2), dtype=np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(DataError, match=r"f.tif: a floating-point image"):
        data.read_image(tmp_path / "f.tif")


def test_an_extreme_aspect_ratio_keeps_a_pixel_and_runs():
    assert data.shortest_edge_size(3, 2000, 128, 256) == (1, 256)
    model = build_model(load_config(TINY)).eval()
    images, sizes = model.preprocess([torch.randint(0, 256, (3, 1, 256)).float()])
    with torch.no_grad():
        result = model.inference(model(images), sizes, output_sizes=[(3, 2000)])[0]
    assert result["panoptic_seg"][0].shape == (3, 2000) and result["sem_seg"].shape[1:] == (3, 2000)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    config.atomic_save({"model": build_model(load_config(TINY)).state_dict()}, path)
    return path


def test_weights_problems_name_the_file(weights, tmp_path):
    model = build_model(load_config(TINY))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(weights.read_bytes()[:1000])
    strings = tmp_path / "strings.pkl"
    strings.write_bytes(pickle.dumps({"model": {"backbone.conv1.weight": "not an array"}}))
    other = tmp_path / "other.pt"
    config.atomic_save({"model": build_model(load_config(TINY, ["model.decoder.queries=10"])).state_dict()}, other)
    for path, problem in ((truncated, "not a readable checkpoint"), (strings, "a value of the state dict is not a tensor"),
                          (other, "does not fit this model")):
        with pytest.raises(ValueError, match=rf"{path}: {problem}"):
            config.load_weights(model, path)
    with pytest.raises(FileNotFoundError, match="nowhere.pt: weights file not found"):
        config.load_weights(model, tmp_path / "nowhere.pt")


def test_init_weights_through_train_name_the_file(synthetic, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=rf"{bad}: not a readable checkpoint"):
        train.train(load_config(TINY, overrides(synthetic)), tmp_path / "run", init=bad)


def test_a_derived_set_with_a_duplicate_or_a_nan_is_refused(tmp_path):
    good = {"image_id": 1, "file_name": "a.png", "exits": [1, 2], "pq": [0.5, 0.6]}
    path = tmp_path / "derived.jsonl"
    for rows, problem in (([good, good], "image 1 is already on line 1"),
                          ([good, {**good, "image_id": 2, "pq": [float("nan"), 0.1]}], r"not all in \[0, 1\]")):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(ValueError, match=rf"{path}, line 2: .*{problem}"):
            gate.read_derived(path)
        with pytest.raises(ValueError, match=rf"{path}: image \d"):  # Step B does not continue it either
            derive.read_done(path, [1, 2], {1: "a.png", 2: "a.png"})


def test_a_derived_set_is_continued_only_with_its_own_weights(synthetic, weights, tmp_path):
    out = tmp_path / "derived.jsonl"
    args = ["--config", TINY, "--out", str(out), "--device", "cpu", "--max-images", "1",
            f"data.root={synthetic}", "data.workers=0", "data.test_short_side=64", "data.test_max_size=64"]
    derive.main(["--weights", str(weights), *args])
    other = tmp_path / "other.pt"
    other.write_bytes(weights.read_bytes())  # the same bytes in another file still count as another source
    with pytest.raises(ValueError, match=rf"{out}: derived from {weights}.*not from {other}"):
        derive.main(["--weights", str(other), *args])
    assert len(out.read_text().splitlines()) == 1  # untouched


def test_a_corrupt_gate_cache_is_computed_again(synthetic, weights, tmp_path, capsys):
    cfg = load_config(TINY, overrides(synthetic))
    derived = tmp_path / "derived.jsonl"
    derived.write_text("")
    cache = tmp_path / "cache.pt"
    cache.write_bytes(b"PK\x03\x04 broken zip")
    ids = [im["id"] for im in data.build_dataset(cfg.data, split="train", train=False).images[:2]]
    args = SimpleNamespace(cache=str(cache), derived=str(derived), weights=str(weights), device="cpu", split="train")
    features = gate.cached_gate_inputs(cfg, args, ids)
    assert features.shape == (2, 64) and "unreadable cache" in capsys.readouterr().out
    assert torch.equal(torch.load(cache, weights_only=True)["features"], features)  # rewritten, now readable


def test_evaluate_refuses_a_wrong_exit_before_reading_data(weights, tmp_path):
    with pytest.raises(ValueError, match=r"--exit must be in 1..3, got 0"):
        evaluate.main(["--config", TINY, "--weights", str(weights), "--exit", "0", f"data.root={tmp_path}/none"])


def test_sweep_reuses_only_rows_of_the_same_weights_and_config(tmp_path, weights):
    cfg = load_config(TINY)
    source = evaluate.evaluation_source(cfg, weights)
    folder = tmp_path / "exit_1"
    folder.mkdir()
    row = {"images": 2, "GFLOPs": 1.0, "exit": 1, "source": source}
    (folder / "metrics.json").write_text(json.dumps(row))
    assert evaluate._reusable(folder, 2, 1, None, source) == json.loads(json.dumps(row))
    other = evaluate.evaluation_source(load_config(TINY, ["model.inference.overlap_threshold=0.5"]), weights)
    assert evaluate._reusable(folder, 2, 1, None, other) is None  # another config
    os.utime(weights, (1, 1))
    assert evaluate._reusable(folder, 2, 1, None, evaluate.evaluation_source(cfg, weights)) is None  # weights changed
    (folder / "metrics.json").write_text("{broken")
    assert evaluate._reusable(folder, 2, 1, None, source) is None


# ---- files that are written: atomic, never left half-written ------------------------------------


def test_a_killed_write_leaves_no_temporary_file_behind(tmp_path):
    path = tmp_path / "checkpoint.pt"
    config.atomic_save({"step": 1}, path)
    leftover = tmp_path / ".checkpoint.pt.abc123.tmp"  # what a kill -9 inside a write leaves
    leftover.write_bytes(b"x" * 1000)
    config.atomic_save({"step": 2}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert torch.load(path, weights_only=True) == {"step": 2}


def test_a_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path):
    path = tmp_path / "metrics.json"
    config.atomic_write_text(path, "old")

    def no_space(f):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=rf"{path}: could not write it .*No space left.*previous file, if any, is intact"):
        config.atomic_write(path, no_space)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        config.atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_an_evaluation_of_another_model_is_not_overwritten(tmp_path, weights):
    cfg = load_config(TINY)
    source = evaluate.evaluation_source(cfg, weights)
    (tmp_path / "metrics.json").write_text(json.dumps({"PQ": 50.0, "source": source}))
    evaluate.check_evaluation_folder(tmp_path, source, overwrite=False)  # the same model: allowed again
    other = evaluate.evaluation_source(load_config(TINY, ["model.inference.object_mask_threshold=0.5"]), weights)
    with pytest.raises(FileExistsError, match=r"metrics.json: holds an evaluation of other weights .*--overwrite"):
        evaluate.check_evaluation_folder(tmp_path, other, overwrite=False)
    evaluate.check_evaluation_folder(tmp_path, other, overwrite=True)


def test_a_gate_file_is_not_overwritten(tmp_path, weights):
    out = tmp_path / "gate.pt"
    out.write_bytes(b"an earlier gate")
    with pytest.raises(FileExistsError, match=rf"{out}: a gate file is already there; pass --overwrite"):
        gate.main(["--config", TINY, "--weights", str(weights), "--derived", str(tmp_path / "none.jsonl"),
                   "--out", str(out)])
    assert out.read_bytes() == b"an earlier gate"


def test_a_device_the_machine_lacks_is_named():
    assert data.check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device 'gpu0': not a device name"):
        data.check_device("gpu0")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ValueError, match=rf"--device cuda:{count}: this machine has {count} CUDA device"):
        data.check_device(f"cuda:{count}")
