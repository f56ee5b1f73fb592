"""Training on a dataset of one's own: the classes come from the training JSON (and are stored in
the checkpoints), a wrong explicit value fails before the model is built, scripts read the
config stored in weights, `data.py inspect` finds the problems of a split, and the command lines
answer --help and config errors before torch loads."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

import config
import data
import train
from config import ConfigError, load_config, load_run_config
from conftest import COCO_SAMPLE, ROOT
from data import DataError

EXAMPLE = ROOT / "configs/own_data_example.yaml"
COCO_THINGS = list(range(80))


def tiny(**extra):
    """configs/own_data_example.yaml on the COCO sample, shrunk to run 2 iterations in seconds."""
    settings = {"data.root": str(COCO_SAMPLE.parent), "data.crop_size": "[64,64]", "data.workers": 0,
                "data.test_short_side": 64, "data.test_max_size": 128, "train.batch_size": 1, "train.iterations": 2,
                "train.checkpoint_every": 1, "train.evaluate": "false", "train.amp": "fp32",
                "model.loss.num_points": 64, "model.encoder.dim": 32, "model.encoder.heads": 2,
                "model.encoder.ffn_dim": 64, "model.encoder.layers": 1, "model.decoder.queries": 8,
                "model.decoder.layers": 1, "model.decoder.dim": 32, "model.decoder.heads": 2,
                "model.decoder.ffn_dim": 64, **extra}
    return [f"{k}={v}" for k, v in settings.items()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The example config trained for 2 iterations on the COCO sample."""
    out = tmp_path_factory.mktemp("own") / "run"
    train.train(load_config(EXAMPLE, tiny()), out)
    return out


def test_the_example_leaves_the_classes_to_the_json():
    cfg = load_config(EXAMPLE)
    assert cfg.model.num_classes is None and cfg.model.thing_classes is None
    assert (ROOT / cfg.data.root / cfg.data.train.json).is_file()  # runs as shipped, from the repository root


def test_training_takes_the_classes_from_the_json_and_stores_them(run):
    expected = data.dataset_classes(COCO_SAMPLE / "panoptic.json")
    for name in ("model_final.pt", "checkpoint.pt"):
        saved = torch.load(run / name, map_location="cpu", weights_only=True)
        assert saved["config"]["model"]["num_classes"] == 133
        assert saved["config"]["model"]["thing_classes"] == COCO_THINGS
        assert saved["classes"] == expected, name
        assert saved["model"]["decoder.class_embed.weight"].shape[0] == 134  # 133 + no object
    assert config.load_classes(run / "model_final.pt")[0] == {"id": 1, "name": "person", "isthing": True,
                                                              "color": [220, 20, 60]}
    assert load_config(run / "config.yaml").model.num_classes == 133  # the resolved config


def test_dataset_classes_are_in_contiguous_order(tmp_path):
    classes = data.dataset_classes(COCO_SAMPLE / "panoptic.json")
    assert [c["id"] for c in classes] == sorted(c["id"] for c in classes)
    assert [k for k, c in enumerate(classes) if c["isthing"]] == COCO_THINGS
    shuffled = json.loads((COCO_SAMPLE / "panoptic.json").read_text())
    shuffled["categories"].reverse()
    (tmp_path / "p.json").write_text(json.dumps(shuffled))
    assert data.dataset_classes(tmp_path / "p.json") == classes  # sorted by id, not in file order
    with pytest.raises(DataError, match=r"nowhere\.json: JSON file not found"):
        data.dataset_classes(tmp_path / "nowhere.json")
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(DataError, match=r"bad\.json: no 'categories' list"):
        data.dataset_classes(tmp_path / "bad.json")


@pytest.mark.parametrize("setting, message", [
    ("model.num_classes=10", r"model.num_classes=10, but .*panoptic.json has 133 categories"),
    ("model.thing_classes=[0,1]", r"model.thing_classes=\[0, 1\], but the things of .*panoptic.json are \[0, 1, 2,"),
])
def test_a_wrong_explicit_class_setting_fails_before_the_model_is_built(setting, message, tmp_path, monkeypatch):
    def no_model(cfg):
        raise AssertionError("the model was built before the classes were checked")

    monkeypatch.setattr(train, "build_model", no_model)
    with pytest.raises(ConfigError, match=message):
        train.train(load_config(EXAMPLE, tiny(**{setting.split("=")[0]: setting.split("=")[1]})), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_explicit_classes_that_agree_are_kept():
    cfg = load_config(EXAMPLE, ["model.num_classes=133"])
    resolved = config.with_classes(cfg, data.dataset_classes(COCO_SAMPLE / "panoptic.json"), "x", "y")
    assert (resolved.model.num_classes, resolved.model.thing_classes) == (133, COCO_THINGS)
    with pytest.raises(ConfigError, match=r"'model.thing_classes' must be distinct class ids"):
        load_config(EXAMPLE, ["model.thing_classes=[3,3]"])  # checked even with num_classes unset
    with pytest.raises(ConfigError, match="not set"):
        config.require_classes(cfg.model)


def test_scripts_without_training_resolve_the_classes_from_a_split():
    """What evaluate.py and friends use when a config leaves the classes unset and nothing stores them."""
    cfg = load_config(EXAMPLE, [f"data.root={COCO_SAMPLE.parent}"])
    assert data.with_dataset_classes(cfg, split="val").model.thing_classes == COCO_THINGS
    dataset = data.build_dataset(cfg.data, split="val", train=False)
    data.check_classes(dataset, cfg.model, "x.yaml")  # unset: the dataset's
    with pytest.raises(ConfigError, match=r"x\.yaml: model.num_classes=8, but .*panoptic.json has 133"):
        data.check_classes(dataset, load_config(EXAMPLE, ["model.num_classes=8"]).model, "x.yaml")
    with pytest.raises(DataError, match=r"nowhere/.*panoptic.json: JSON file not found"):
        data.with_dataset_classes(load_config(EXAMPLE, [f"data.root={COCO_SAMPLE.parent}/nowhere"]))


def test_the_run_config_comes_from_the_weights(run, tmp_path):
    cfg = load_run_config(None, run / "model_final.pt", ["data.workers=3"])
    assert (cfg.model.num_classes, cfg.data.workers) == (133, 3)
    assert cfg.model == load_config(run / "config.yaml").model
    with pytest.raises(ConfigError, match=r"stored config\) \+ command line: unknown key 'train.nope'"):
        load_run_config(None, run / "model_final.pt", ["train.nope=1"])
    # A YAML given wins; the classes it leaves unset come from the weights.
    assert load_run_config(EXAMPLE, run / "model_final.pt").model.num_classes == 133
    assert load_run_config(EXAMPLE, None).model.num_classes is None
    bare = tmp_path / "bare.pt"
    torch.save({"model": torch.load(run / "model_final.pt", weights_only=True)["model"]}, bare)
    assert config.load_classes(bare) is None
    with pytest.raises(ConfigError, match=r"bare\.pt: stores no config .*give --config"):
        load_run_config(None, bare)
    with pytest.raises(ConfigError, match="give --config"):
        load_run_config(None, None)
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pt: weights file not found"):
        load_run_config(None, tmp_path / "nowhere.pt")


# ---- python data.py inspect ---------------------------------------------------------------------


def test_inspect_a_clean_split(capsys):
    assert data.main(["inspect", "--json", str(COCO_SAMPLE / "panoptic.json")]) == 0
    out = capsys.readouterr().out
    assert "133 classes (80 things, 53 stuff), 2 images, 50 segments" in out
    assert "      0      1  thing         28  person" in out  # contiguous id, dataset id, kind, segments, name
    assert "height 360 / 427 / 427, width 640 / 640 / 640" in out
    assert out.rstrip().endswith("no problem(s) found")


def test_inspect_lists_every_problem(tmp_path, capsys):
    root = tmp_path / "split"
    shutil.copytree(COCO_SAMPLE, root)
    pan = json.loads((root / "panoptic.json").read_text())
    first, second = pan["annotations"]
    first["segments_info"][0]["id"] += 1  # now in the JSON, not the PNG, and the PNG's id not in the JSON
    second["segments_info"][0]["category_id"] = 999
    pan["images"].append({"id": 5, "file_name": "nowhere.jpg", "height": 2, "width": 2})
    pan["images"].append(dict(pan["images"][0], id=6, height=99))  # no annotation, wrong height
    (root / "panoptic.json").write_text(json.dumps(pan))
    (root / "panoptic" / second["file_name"]).unlink()
    assert data.main(["inspect", "--json", str(root / "panoptic.json"), "--check-pngs", "all"]) == 1
    problems = [line for line in capsys.readouterr().out.splitlines() if line.startswith("problem: ")]
    segment = first["segments_info"][0]["id"]
    assert problems == [
        f"problem: {root}/panoptic/{first['file_name']}: segment ids [{segment - 1}] are in the PNG, not in the JSON",
        f"problem: {root}/panoptic/{first['file_name']}: segment ids [{segment}] of the JSON have no pixels",
        f"problem: segment {second['segments_info'][0]['id']} of image_id {second['image_id']} in the JSON: "
        "category_id 999 is not in categories",
        f"problem: {root}/panoptic/{second['file_name']}: panoptic PNG not found (image_id {second['image_id']})",
        f"problem: {root}/images/nowhere.jpg: image file not found (image_id 5)",
        f"problem: {root}/images/{pan['images'][0]['file_name']}: image is 427x640 but the JSON says 99x640",
        f"problem: {root}/images/{pan['images'][0]['file_name']}: empty image: no segments in the JSON (image_id 6)",
    ]
    # Only a sample of the PNGs is read: with none, the PNG-content problems are not seen.
    data.main(["inspect", "--json", str(root / "panoptic.json"), "--check-pngs", "0"])
    assert "have no pixels" not in capsys.readouterr().out
    with pytest.raises(DataError, match=r"nowhere: no such folder; give --images"):
        data.main(["inspect", "--json", str(root / "panoptic.json"), "--images", str(tmp_path / "nowhere")])


# ---- command lines: answers before torch loads ---------------------------------------------------


def run_script(script, *args):
    """Run `script` as __main__ in a fresh interpreter; (exit status, stderr, whether torch was imported)."""
    probe = ("import runpy, sys\n"
             f"sys.argv = [{script!r}, *{list(args)!r}]\n"
             "try:\n"
             f"    runpy.run_path({str(ROOT / script)!r}, run_name='__main__')\n"
             "except SystemExit as e:\n"
             "    code = e.code\n"
             "print('torch' in sys.modules, code)\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=ROOT)
    torch_loaded, code = proc.stdout.splitlines()[-1].split()
    return int(code), proc.stderr, torch_loaded == "True"


@pytest.mark.parametrize("script, args", [("train.py", ["--help"]), ("data.py", ["inspect", "--help"])])
def test_help_answers_before_torch_loads(script, args):
    code, _, torch_loaded = run_script(script, *args)
    assert code == 0 and not torch_loaded


def test_a_bad_config_answers_in_one_line_before_torch_loads(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_base_: {EXAMPLE}\nmodel:\n  num_clases: 3\n")
    code, stderr, torch_loaded = run_script("train.py", "--config", str(bad), "--out", str(tmp_path / "run"))
    assert (code, torch_loaded) == (2, False)
    assert stderr.splitlines() == [f"error: {bad}: unknown key 'model.num_clases' (valid keys here: num_classes, "
                                   "thing_classes, size_divisibility, pixel_mean, pixel_std, backbone, encoder, "
                                   "decoder, loss, inference)"]
    debug = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(bad), "--debug"],
                           capture_output=True, text=True, timeout=60)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr
