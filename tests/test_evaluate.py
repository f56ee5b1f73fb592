"""Evaluation: per-image PQ against panopticapi, the dataset pipeline, the command line."""
import json
from contextlib import redirect_stdout
from io import StringIO

import numpy as np
import pytest
import torch
from PIL import Image
from panopticapi.evaluation import pq_compute

import evaluate
import flops
import synthetic
import metrics as quality  # the tests call their results `metrics`
from metrics import METRIC_KEYS, evaluate_dataset
from metrics import image_pq

# Non-contiguous ids, as in COCO: 3 thing and 3 stuff categories.
CATEGORIES = {1: {"id": 1, "name": "a", "isthing": 1}, 3: {"id": 3, "name": "b", "isthing": 1},
              7: {"id": 7, "name": "c", "isthing": 1}, 10: {"id": 10, "name": "d", "isthing": 0},
              12: {"id": 12, "name": "e", "isthing": 0}, 20: {"id": 20, "name": "f", "isthing": 0}}
THINGS, STUFF = [1, 3, 7], [10, 12, 20]


# ---- image_pq == panopticapi's pq_compute on files ----------------------------------------


def rgb(ids):
    ids = np.asarray(ids, dtype=np.uint32)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)


def segments_of(ids, category_of, crowd=()):
    return [{"id": int(i), "category_id": category_of[int(i)], "iscrowd": int(int(i) in crowd),
             "area": int((ids == i).sum())} for i in np.unique(ids) if i != 0]


def pq_compute_on_files(tmp_path, gt_ids, gt_segments, pred_ids, pred_segments):
    """panopticapi's own evaluation of one image, written out as files."""
    for name, ids, segments in (("gt", gt_ids, gt_segments), ("pred", pred_ids, pred_segments)):
        (tmp_path / name).mkdir(exist_ok=True)
        Image.fromarray(rgb(ids)).save(tmp_path / name / "img.png")
        data = {"images": [{"id": 5, "file_name": "img.jpg", "height": ids.shape[0], "width": ids.shape[1]}],
                "annotations": [{"image_id": 5, "file_name": "img.png", "segments_info": segments}],
                "categories": list(CATEGORIES.values())}
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    with redirect_stdout(StringIO()):
        return pq_compute(str(tmp_path / "gt.json"), str(tmp_path / "pred.json"),
                          str(tmp_path / "gt"), str(tmp_path / "pred"))


def random_gt(rng, H=40, W=56):
    """Stuff rectangles, thing boxes (some crowd), void blobs; ids random 24-bit numbers."""
    ids = np.zeros((H, W), np.int64)
    category_of, crowd = {}, set()
    fresh = iter(rng.choice(np.arange(1, 2 ** 24), size=64, replace=False).tolist())

    def paint(category, min_size=4):
        i = next(fresh)
        y, x = rng.integers(0, H - min_size), rng.integers(0, W - min_size)
        h, w = rng.integers(min_size, H // 2 + 1), rng.integers(min_size, W // 2 + 1)
        ids[y:y + h, x:x + w] = i
        category_of[i] = category
        return i

    for category in rng.choice(STUFF, size=rng.integers(2, 5)):  # a stuff class may appear twice: two ids
        paint(int(category), 10)
    for k in range(rng.integers(2, 7)):
        i = paint(int(rng.choice(THINGS)))
        if k > 0 and rng.random() < 0.25:  # the first one never, so that "Things" is never empty
            crowd.add(i)
    if rng.random() < 0.5:  # two crowd regions of one category: panopticapi uses the last one listed
        category = int(rng.choice(THINGS))
        crowd.update((paint(category), paint(category)))
    for _ in range(rng.integers(0, 4)):  # void blobs
        y, x = rng.integers(0, H - 3), rng.integers(0, W - 3)
        ids[y:y + rng.integers(2, 8), x:x + rng.integers(2, 8)] = 0
    segments = segments_of(ids, category_of, crowd)
    return ids, segments


def perturb(rng, gt_ids, gt_segments):
    """A prediction derived from the ground truth by random edits."""
    H, W = gt_ids.shape
    pred = gt_ids.copy()
    category_of = {s["id"]: s["category_id"] for s in gt_segments}
    new_id = iter(range(10_000, 20_000))
    for s in gt_segments:
        mask = gt_ids == s["id"]
        edit = rng.integers(0, 8)
        if edit == 1:  # class swap
            category_of[s["id"]] = int(rng.choice(list(CATEGORIES)))
        elif edit == 2:  # missed: void
            pred[mask] = 0
        elif edit == 3:  # shifted
            dy, dx = rng.integers(-4, 5, size=2)
            pred[mask] = 0
            pred[np.roll(mask, (dy, dx), axis=(0, 1))] = s["id"]
        elif edit == 4:  # eroded: drop the border rows / columns of its box
            ys, xs = np.nonzero(mask)
            if len(ys):
                inner = np.zeros_like(mask)
                inner[ys.min() + 2:ys.max() - 1, xs.min() + 2:xs.max() - 1] = True
                pred[mask & ~inner] = 0
        elif edit == 5:  # split in two halves
            ys, xs = np.nonzero(mask)
            if len(xs):
                i = next(new_id)
                category_of[i] = category_of[s["id"]]
                pred[mask & (np.arange(W)[None, :] < np.median(xs) + rng.integers(-2, 3))] = i
        elif edit == 6:  # merged into another segment
            other = gt_segments[rng.integers(len(gt_segments))]["id"]
            pred[mask] = other
    for _ in range(rng.integers(0, 4)):  # spurious segments, partly over void and crowd
        i = next(new_id)
        category_of[i] = int(rng.choice(list(CATEGORIES)))
        y, x = rng.integers(0, H - 2), rng.integers(0, W - 2)
        pred[y:y + rng.integers(2, 12), x:x + rng.integers(2, 12)] = i
    for s in gt_segments:  # a prediction of a crowd region's own category over it
        if s["iscrowd"] and rng.random() < 0.7:
            i = next(new_id)
            category_of[i] = s["category_id"]
            pred[(gt_ids == s["id"]) & (rng.random((H, W)) < 0.8)] = i
    if rng.random() < 0.3:  # void pixels scattered everywhere
        pred[rng.random((H, W)) < 0.1] = 0
    # Renumber to arbitrary 24-bit ids, as a real prediction would have.
    present = [int(i) for i in np.unique(pred) if i != 0]
    renumber = dict(zip(present, rng.choice(np.arange(1, 2 ** 24), size=len(present), replace=False).tolist()))
    out = np.zeros_like(pred)
    for old, new in renumber.items():
        out[pred == old] = new
    segments = [{"id": renumber[i], "category_id": category_of[i]} for i in present]
    return out, segments


@pytest.mark.parametrize("seed", range(20))
def test_image_pq_equals_pq_compute(tmp_path, seed):
    rng = np.random.default_rng(seed)
    gt_ids, gt_segments = random_gt(rng)
    pred_ids, pred_segments = perturb(rng, gt_ids, gt_segments)
    expected = pq_compute_on_files(tmp_path, gt_ids, gt_segments, pred_ids, pred_segments)
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        ours = image_pq(gt_ids, gt_segments, torch.from_numpy(pred_ids), pred_segments, CATEGORIES, isthing)
        assert ours["n"] == expected[name]["n"]
        for key in ("pq", "sq", "rq"):
            assert ours[key] == pytest.approx(expected[name][key], abs=1e-9), (name, key)


def test_image_pq_random_cases_are_not_trivial():
    """The random cases above cover matches, misses, false positives and ignored predictions."""
    tp = fp = fn = ignored = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        gt_ids, gt_segments = random_gt(rng)
        pred_ids, pred_segments = perturb(rng, gt_ids, gt_segments)
        stats = quality.pq_stats(gt_ids, gt_segments, pred_ids, pred_segments, CATEGORIES)
        tp += sum(s["tp"] for s in stats.values())
        fp += sum(s["fp"] for s in stats.values())
        fn += sum(s["fn"] for s in stats.values())
        ignored += len(pred_segments) - sum(s["tp"] + s["fp"] for s in stats.values())
    assert min(tp, fp, fn, ignored) >= 5


def test_image_pq_hand_cases():
    gt = np.array([[1, 1, 2, 2],
                   [1, 1, 2, 2],
                   [0, 3, 3, 3]])
    gt_segments = [{"id": 1, "category_id": 1, "iscrowd": 0}, {"id": 2, "category_id": 10, "iscrowd": 0},
                   {"id": 3, "category_id": 3, "iscrowd": 1}]
    pred_segments = [{"id": i, "category_id": s["category_id"]} for i, s in zip((7, 8, 9), gt_segments)]
    pred = np.select([gt == 1, gt == 2, gt == 3], [7, 8, 9], 0)
    # Perfect: two matched categories, the crowd prediction ignored.
    assert image_pq(gt, gt_segments, pred, pred_segments, CATEGORIES) == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 2}
    # Nothing in either (all void): n == 0 scores a perfect 1.0 (the documented choice).
    empty = np.zeros((3, 4), np.int64)
    assert image_pq(empty, [], empty, [], CATEGORIES) == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 0}
    # Only crowd in the ground truth and a prediction of the crowd's category over it: still n == 0.
    crowd_only = np.where(gt == 3, 3, 0)
    assert image_pq(crowd_only, gt_segments[2:], np.where(gt == 3, 9, 0), pred_segments[2:], CATEGORIES)["n"] == 0
    # No overlap at all: everything is a miss or a false positive.
    shifted = np.roll(np.where(gt == 1, 7, 0), 2, axis=1)
    result = image_pq(gt, gt_segments[:1], shifted, pred_segments[:1], CATEGORIES)
    assert result == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 1}
    # IoU exactly 0.5 does not match (> 0.5 is required); the void pixel leaves the union.
    half = np.where(gt == 1, 7, 0)
    half[:, 0] = 0
    assert image_pq(gt, gt_segments[:1], half, pred_segments[:1], CATEGORIES)["pq"] == 0.0
    # A spurious prediction exactly half on void is a false positive (more than half is required
    # to ignore it): category 7 enters the average with PQ 0.
    spurious = np.where(gt == 1, 7, 0)
    spurious[1:3, 0] = 5  # one pixel on void (2, 0), one on segment 1
    segments = pred_segments[:1] + [{"id": 5, "category_id": 7}]
    result = image_pq(gt, gt_segments[:1], spurious, segments, CATEGORIES)
    assert result["n"] == 2 and result["pq"] == pytest.approx((3 / 4) / 2)


def test_image_pq_rejects_inconsistent_predictions():
    gt = np.ones((2, 2), np.int64)
    segments = [{"id": 1, "category_id": 1, "iscrowd": 0}]
    with pytest.raises(KeyError, match="not in pred_segments"):
        image_pq(gt, segments, gt * 5, segments, CATEGORIES)
    with pytest.raises(KeyError, match="does not contain"):
        image_pq(gt, segments, gt, segments + [{"id": 2, "category_id": 1}], CATEGORIES)
    with pytest.raises(KeyError, match="unknown category_id 99"):
        image_pq(gt, segments, gt, [{"id": 1, "category_id": 99}], CATEGORIES)
    with pytest.raises(ValueError, match="differ in size"):
        image_pq(gt, segments, np.ones((3, 2), np.int64), segments, CATEGORIES)


# ---- pieces of the dataset evaluation -----------------------------------------------------


def test_semantic_metrics_follow_detectron2():
    K = 3
    gt = np.array([0, 0, 1, 1, 3, 3])  # class 2 has no ground truth; 3 = K is ignored
    pred = np.array([0, 1, 1, 2, 2, 0])
    metrics = quality.semantic_metrics(quality.confusion_matrix(pred, gt, K))
    # class 0: tp 1, union 2 (the prediction on an ignored pixel does not count); class 1: tp 1,
    # union 3; class 2 (no ground truth) is left out of the mean.
    assert metrics["mIoU"] == pytest.approx(100 * (1 / 2 + 1 / 3) / 2)
    assert metrics["pACC"] == pytest.approx(100 * 2 / 4)


def test_semantic_ground_truth_keeps_crowds_and_ignores_void():
    ids = np.array([[0, 5, 5], [9, 9, 77]])  # 77: an id no segment describes
    segments = [{"id": 5, "category_id": 10, "iscrowd": 0}, {"id": 9, "category_id": 3, "iscrowd": 1}]
    contiguous = {3: 1, 10: 4}
    np.testing.assert_array_equal(quality.semantic_from_panoptic(ids, segments, contiguous, ignore=6),
                                  [[6, 4, 4], [1, 1, 6]])


def test_panoptic_metrics_with_an_empty_group(tmp_path):
    """Only things in the ground truth and the prediction: pq_compute divides by zero for
    "Stuff"; panoptic_metrics reports PQ_st as None and the rest as pq_compute computes it."""
    gt = np.array([[1, 1, 2, 2], [1, 1, 2, 2]])
    gt_segments = [{"id": 1, "category_id": 1, "iscrowd": 0, "area": 4},
                   {"id": 2, "category_id": 3, "iscrowd": 0, "area": 4}]
    pred = np.array([[1, 1, 1, 0], [1, 1, 1, 0]])
    pred_segments = [{"id": 1, "category_id": 1}]
    with pytest.raises(ZeroDivisionError):
        pq_compute_on_files(tmp_path, gt, gt_segments, pred, pred_segments)
    metrics = quality.panoptic_metrics(tmp_path / "gt.json", tmp_path / "gt", tmp_path / "pred.json",
                                        tmp_path / "pred")
    expected = image_pq(gt, gt_segments, pred, pred_segments, CATEGORIES)  # (4/6 + 0) / 2 categories
    assert metrics["PQ"] == pytest.approx(100 * expected["pq"]) and metrics["PQ"] == pytest.approx(100 * 2 / 6)
    assert metrics["PQ_th"] == metrics["PQ"] and metrics["PQ_st"] is None


def test_instance_metrics_without_detections():
    gt = {"images": [{"id": 1, "height": 4, "width": 4}], "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 4,
                           "bbox": [0, 0, 2, 2], "segmentation": quality.encode_mask(np.eye(4) > 0)}]}
    assert quality.instance_metrics(gt, [], [1])["AP"] == 0.0


def test_panoptic_to_instances_on_coco_sample():
    from conftest import COCO_SAMPLE as sample

    panoptic = json.loads((sample / "panoptic.json").read_text())
    gt = quality.panoptic_to_instances(panoptic, sample / "panoptic")
    things = {c["id"] for c in panoptic["categories"] if c["isthing"]}
    expected = [s for a in panoptic["annotations"] for s in a["segments_info"] if s["category_id"] in things]
    assert len(gt["annotations"]) == len(expected)
    assert [a["iscrowd"] for a in gt["annotations"]] == [s["iscrowd"] for s in expected]
    assert sum(a["iscrowd"] for a in gt["annotations"]) >= 1
    assert [a["area"] for a in gt["annotations"]] == [s["area"] for s in expected]
    assert {c["id"] for c in gt["categories"]} == things
    # Only one image asked for: only its instances.
    one = quality.panoptic_to_instances(panoptic, sample / "panoptic", image_ids=[panoptic["images"][0]["id"]])
    assert {a["image_id"] for a in one["annotations"]} == {panoptic["images"][0]["id"]}


def test_average_gflops_counts_each_size_once(monkeypatch):
    calls = []

    def fake_flops(model, h, w, complete=False, output_size=None, **kwargs):
        calls.append((h, w, output_size, kwargs.get("exit")))
        return {"total": float(h * w), "backbone": 1.0}

    monkeypatch.setattr(flops, "model_flops", fake_flops)
    sizes = [((32, 48), (64, 96)), ((32, 48), (64, 96)), ((48, 32), (96, 64)), ((32, 48), (64, 96))]
    result = flops.average_gflops(None, sizes, exit=2)
    assert sorted(calls) == [(32, 48, (64, 96), 2), (48, 32, (96, 64), 2)]
    assert result == {"total": 32 * 48.0, "backbone": 1.0}


# ---- the dataset pipeline with a model that predicts the ground truth ---------------------


class OracleModel(torch.nn.Module):
    """preprocess / forward / inference like Mask2Former, returning the ground truth of the
    images in the order they come (batching included): panoptic ids and segments, every thing
    segment as an instance with score 1, one-hot semantic scores."""

    def __init__(self, dataset):
        super().__init__()
        self.dataset, self.next = dataset, 0

    def preprocess(self, images):
        return images, [tuple(img.shape[-2:]) for img in images]

    def forward(self, images, exit=None):
        return {"count": len(images)}

    def inference(self, outputs, image_sizes, output_sizes=None, semantic="scores"):
        results = []
        for k in range(outputs["count"]):
            sample = self.dataset.load(self.next)  # the original size, not the resized image's
            self.next += 1
            ids, segments = sample["ids"], sample["segments"]
            assert tuple(ids.shape) == tuple(output_sizes[k])
            labels = {s["id"]: self.dataset.contiguous[s["category_id"]] for s in segments}
            sem = torch.zeros(self.dataset.num_classes, *ids.shape)
            for i, label in labels.items():
                sem[label][ids == i] = 1
            things = [s for s in segments if labels[s["id"]] in self.dataset.thing_classes]
            results.append({
                "panoptic_seg": (ids.to(torch.int32), [{"id": s["id"], "category_id": labels[s["id"]],
                                                        "isthing": labels[s["id"]] in self.dataset.thing_classes}
                                                       for s in segments]),
                "instances": {"masks": torch.stack([(ids == s["id"]).float() for s in things]),
                              "scores": torch.ones(len(things)),
                              "labels": torch.tensor([labels[s["id"]] for s in things])},
                "sem_seg": sem})
        return results


def synthetic_split(tmp_path, val, size=64):
    synthetic.write_synthetic(tmp_path / "synth", train=0, val=val, size=size, seed=1)
    return tmp_path / "synth"


@pytest.mark.parametrize("instances", ["file", "derived"])
def test_perfect_predictions_score_100(tmp_path, instances):
    import data
    from config import DataConfig, SplitConfig

    root = synthetic_split(tmp_path, val=4)
    # One thing segment becomes a crowd region: the oracle still predicts it, and neither PQ
    # (its prediction lies on its own crowd) nor AP (a detection of a crowd is ignored) may suffer.
    panoptic = json.loads((root / "val/panoptic.json").read_text())
    crowd = next(s for a in panoptic["annotations"] for s in a["segments_info"] if s["category_id"] < 20)
    crowd["iscrowd"] = 1
    (root / "val/panoptic.json").write_text(json.dumps(panoptic))
    split = SplitConfig("val/images", "val/panoptic", "val/panoptic.json",
                        "val/instances.json" if instances == "file" else "")
    cfg = DataConfig(root=str(root), val=split, test_short_side=48, test_max_size=96)
    dataset = data.build_dataset(cfg, split="val", train=False)
    assert tuple(dataset[0]["image"].shape[-2:]) == (48, 48)  # the model sees resized images

    out = tmp_path / "eval"
    metrics = evaluate_dataset(OracleModel(dataset), dataset, out, batch_size=2, max_images=3,
                                        fps_images=0, flops=False, progress=False)
    assert metrics["images"] == 3
    for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "AP", "AP50", "AP75", "mIoU", "pACC"):
        assert metrics[key] == pytest.approx(100.0), key
    assert json.loads((out / "metrics.json").read_text()) == metrics
    # max_images: panopticapi got a ground truth JSON with exactly the evaluated images.
    assert [a["image_id"] for a in json.loads((out / "gt_panoptic.json").read_text())["annotations"]] == [1, 2, 3]
    predictions = json.loads((out / "predictions.json").read_text())["annotations"]
    assert {s["category_id"] for a in predictions for s in a["segments_info"]} <= {c["id"] for c in dataset.categories}
    assert len(list((out / "predictions").glob("*.png"))) == 3
    assert len(list((out / "vis").glob("*.png"))) == 3


def test_a_wrong_prediction_scores_less(tmp_path):
    """The oracle with two segments' classes swapped: PQ and mIoU drop below 100."""
    import data
    from config import DataConfig, SplitConfig

    root = synthetic_split(tmp_path, val=2)
    cfg = DataConfig(root=str(root), val=SplitConfig("val/images", "val/panoptic", "val/panoptic.json"),
                     test_short_side=64, test_max_size=128)
    dataset = data.build_dataset(cfg, split="val", train=False)
    oracle = OracleModel(dataset)
    inference = oracle.inference

    def swapped(*args, **kwargs):
        results = inference(*args, **kwargs)
        for r in results:
            r["panoptic_seg"][1][0]["category_id"] = (r["panoptic_seg"][1][0]["category_id"] + 1) % 8
            r["sem_seg"] = r["sem_seg"].roll(1, 0)
        return results

    oracle.inference = swapped
    metrics = evaluate_dataset(oracle, dataset, tmp_path / "eval", fps_images=0, flops=False,
                                        progress=False)
    assert metrics["PQ"] < 100 and metrics["mIoU"] < 100
    assert metrics["AP"] == pytest.approx(100.0)  # instances untouched


# ---- command line -------------------------------------------------------------------------

TINY = "configs/demo/m2f_tiny.yaml"


def data_overrides(root, size):
    return [f"data.root={root}", "data.val.images=val/images", "data.val.panoptic=val/panoptic",
            "data.val.json=val/panoptic.json", "data.val.instances=val/instances.json",
            f"data.test_short_side={size}", f"data.test_max_size={2 * size}", "data.workers=0"]


def save_weights(path, overrides=()):
    from config import load_config
    from model import build_model
    from conftest import ROOT

    torch.manual_seed(0)
    model = build_model(load_config(ROOT / TINY, list(overrides)))
    torch.save({"model": model.state_dict()}, path)
    return path


def test_eval_command_end_to_end(tmp_path, capsys):
    from conftest import ROOT

    root = synthetic_split(tmp_path, val=2, size=64)
    weights = save_weights(tmp_path / "tiny.pt")
    out = tmp_path / "eval"
    evaluate.main(["--config", str(ROOT / TINY), "--weights", str(weights), "--out", str(out), "--device", "cpu",
                   "--fps-images", "1", "--batch-size", "2", *data_overrides(root, 64)])
    report = capsys.readouterr().out
    assert "PQ" in report and "GFLOPs" in report and "FPS" in report
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == set(METRIC_KEYS)
    assert metrics["images"] == 2 and metrics["exit"] is None
    assert metrics["PQ"] is not None and 0 <= metrics["PQ"] <= 100  # an untrained model: any value
    assert metrics["mIoU"] is not None and metrics["GFLOPs"] > 0 and metrics["FPS"] > 0
    predictions = json.loads((out / "predictions.json").read_text())["annotations"]
    assert [a["image_id"] for a in predictions] == [1, 2]
    assert all((out / "predictions" / a["file_name"]).is_file() for a in predictions)
    assert len(list((out / "vis").glob("*.png"))) == 2

    # An exit: fewer encoder layers, fewer GFLOPs; the default output folder sits by the weights.
    evaluate.main(["eval", "--config", str(ROOT / TINY), "--weights", str(weights), "--exit", "1",
                   "--device", "cpu", "--fps-images", "0", "--vis", "0", *data_overrides(root, 64)])
    exit_metrics = json.loads((tmp_path / "eval_val_exit1" / "metrics.json").read_text())
    assert exit_metrics["exit"] == 1 and exit_metrics["GFLOPs"] < metrics["GFLOPs"]
    assert exit_metrics["FPS"] is None


def test_eval_command_bad_weights(tmp_path):
    from conftest import ROOT

    root = synthetic_split(tmp_path, val=1, size=32)
    args = ["--config", str(ROOT / TINY), "--device", "cpu", "--out", str(tmp_path / "eval"),
            *data_overrides(root, 32)]
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        evaluate.main(["--weights", str(missing), *args])
    for name, overrides in (("queries.pt", ["model.decoder.queries=10"]),  # same names, other shapes
                            ("layers.pt", ["model.encoder.layers=2"])):  # missing keys
        path = save_weights(tmp_path / name, overrides)
        with pytest.raises(ValueError, match=name):
            evaluate.main(["--weights", str(path), *args])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        evaluate.main(["--weights", str(garbage), *args])


def test_eval_command_rejects_a_config_for_other_classes(tmp_path):
    from conftest import ROOT

    root = synthetic_split(tmp_path, val=1, size=32)
    weights = save_weights(tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match="num_classes"):
        evaluate.main(["--config", str(ROOT / TINY), "--weights", str(weights), "--device", "cpu",
                       *data_overrides(root, 32), "model.num_classes=9"])
