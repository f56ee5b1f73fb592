"""Quality: panoptic quality per image and over files, mask AP, mIoU, FPS, pictures, and the
evaluation of a whole split (`evaluate_dataset`, used by evaluate.py and by train.py's periodic
evaluation; `image_pq` is ECO-M2F's Step B score).
"""
import io
import json
import time
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import numpy as np
import torch
from panopticapi.evaluation import pq_compute, pq_compute_multi_core
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from config import atomic_write_text, config_to_dict, load_weights, with_classes
from data import build_dataset, check_device, collate, ids_to_rgb, read_panoptic_png
from encoders import check_exit
from flops import average_gflops
from model import autocast, build_model
from visualize import save_visualization

# ---- panoptic quality of one image, in memory (panopticapi semantics) ----------------------
#
# ECO-M2F's Step B needs the PQ of every training image at every exit: tens of thousands of
# single-image evaluations, where writing PNGs for panopticapi would dominate. `image_pq` is
# panopticapi's `pq_compute_single_core` followed by `PQStat.pq_average`, restricted to one image
# and working on id maps in memory; tests/test_evaluate.py checks it against `pq_compute` on files.
#
# The rules, as panopticapi has them:
#   - id 0 is VOID. Ground truth ids that no segment describes are not void: they are just pixels
#     that no ground-truth segment owns.
#   - a prediction and a non-crowd ground-truth segment of the same category match when
#     IoU > 0.5, where the prediction's void pixels are left out of the union (and so out of its
#     area); IoU > 0.5 makes every match unique, so no assignment step is needed.
#   - unmatched non-crowd ground truth: false negative. Crowd ground truth never matches.
#   - unmatched prediction: false positive, unless more than half of its area is void or lies in
#     the crowd region of its own category (panopticapi keeps one crowd segment per category,
#     the last one listed).
#   - per category PQ = Σ IoU / (TP + FP/2 + FN/2), SQ = Σ IoU / TP (0 without TP),
#     RQ = TP / (TP + FP/2 + FN/2); the image's values average the categories with TP+FP+FN > 0.
#
# One deliberate difference: panopticapi reads ground-truth areas from the JSON, we count them
# in the id map. For consistent annotations (COCO, Cityscapes: the JSON areas are the PNG pixel
# counts) the results are identical, and counting keeps them right when a map was resized.
#
# Nothing to evaluate (n == 0: no non-crowd ground truth and no prediction that counts) gives
# pq = sq = rq = 1.0, where panopticapi would divide by zero. Step B turns per-image PQ into a
# utility per exit: an empty image predicted empty is a perfect answer, and every exit should
# score the same on it (so the cheapest exit wins), which 1.0 does and nan would not.

VOID = 0
OFFSET = 256 * 256 * 256  # ids are 24-bit (RGB-encoded PNGs): gt · OFFSET + pred is a unique pair key


def _id_map(ids, name):
    """An (H, W) id map (numpy or torch, any integer dtype) as int64 numpy, checked."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be an (H, W) integer id map, got shape {ids.shape} and dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= OFFSET):
        raise ValueError(f"{name}: segment ids must lie in [0, 2^24), got {ids.min()}..{ids.max()}")
    return ids


def pq_stats(gt_ids, gt_segments, pred_ids, pred_segments, categories) -> dict:
    """Per-category panoptic statistics of one image: {category_id: {"iou", "tp", "fp", "fn"}}.

    panopticapi's `pq_compute_single_core` for one image (see the section comment). gt_ids and
    pred_ids are (H, W) id maps; gt_segments are COCO segments_info dicts ("id", "category_id",
    "iscrowd"), pred_segments need "id" and "category_id"; both use the category ids of
    `categories` (category id -> dict with "isthing"). Like panopticapi, it raises if the
    prediction's map and segment list disagree or a prediction has an unknown category.
    """
    gt, pred = _id_map(gt_ids, "gt_ids"), _id_map(pred_ids, "pred_ids")
    if gt.shape != pred.shape:
        raise ValueError(f"gt_ids {gt.shape} and pred_ids {pred.shape} differ in size")
    gt_segms = {s["id"]: s for s in gt_segments}
    pred_segms = {s["id"]: s for s in pred_segments}
    pred_area = _predicted_areas(pred, pred_segms, categories)
    gt_area = dict(zip(*(a.tolist() for a in np.unique(gt, return_counts=True))))
    # Intersections of every (gt id, pred id) pair present in the image.
    pairs, counts = np.unique(gt * OFFSET + pred, return_counts=True)
    intersection = {(int(p) // OFFSET, int(p) % OFFSET): int(n) for p, n in zip(pairs, counts)}

    stats = {}

    def stat(category):
        return stats.setdefault(category, {"iou": 0.0, "tp": 0, "fp": 0, "fn": 0})

    gt_matched, pred_matched = set(), set()
    for (gt_label, pred_label), inter in intersection.items():
        if gt_label not in gt_segms or pred_label not in pred_segms:
            continue
        g, p = gt_segms[gt_label], pred_segms[pred_label]
        if g.get("iscrowd", 0) == 1 or g["category_id"] != p["category_id"]:
            continue
        union = pred_area[pred_label] + gt_area.get(gt_label, 0) - inter - intersection.get((VOID, pred_label), 0)
        iou = inter / union
        if iou > 0.5:
            s = stat(g["category_id"])
            s["tp"] += 1
            s["iou"] += iou
            gt_matched.add(gt_label)
            pred_matched.add(pred_label)
    _count_unmatched(stat, gt_segms, pred_segms, gt_matched, pred_matched, pred_area, intersection)
    return stats


def _predicted_areas(pred, pred_segms, categories):
    """{segment id: pixel count} of the predicted segments, with panopticapi's sanity checks."""
    pred_area = {}
    for label, count in zip(*np.unique(pred, return_counts=True)):
        label = int(label)
        if label not in pred_segms:
            if label == VOID:
                continue
            raise KeyError(f"segment id {label} is in the predicted id map but not in pred_segments")
        if pred_segms[label]["category_id"] not in categories:
            raise KeyError(f"predicted segment {label} has unknown category_id {pred_segms[label]['category_id']}")
        pred_area[label] = int(count)
    if len(pred_area) != len(pred_segms):
        absent = sorted(set(pred_segms) - set(pred_area))
        raise KeyError(f"pred_segments lists ids {absent} that the predicted id map does not contain")
    return pred_area


def _count_unmatched(stat, gt_segms, pred_segms, gt_matched, pred_matched, pred_area, intersection):
    """False negatives (unmatched non-crowd ground truth) and false positives (unmatched
    predictions, unless mostly void or crowd of their own category) into `stat(category)`."""
    crowd = {}  # category -> id of its crowd segment (the last listed, as in panopticapi)
    for gt_label, g in gt_segms.items():
        if gt_label in gt_matched:
            continue
        if g.get("iscrowd", 0) == 1:
            crowd[g["category_id"]] = gt_label
            continue
        stat(g["category_id"])["fn"] += 1

    for pred_label, p in pred_segms.items():
        if pred_label in pred_matched:
            continue
        ignored = intersection.get((VOID, pred_label), 0)
        if p["category_id"] in crowd:
            ignored += intersection.get((crowd[p["category_id"]], pred_label), 0)
        if ignored / pred_area[pred_label] > 0.5:
            continue  # mostly void or crowd of its own category: neither right nor wrong
        stat(p["category_id"])["fp"] += 1


def pq_average(stats, categories, isthing=None) -> dict:
    """panopticapi's `PQStat.pq_average`: {"pq", "sq", "rq", "n"} over the categories of
    `categories` (things only if isthing is True, stuff only if False) with TP+FP+FN > 0,
    on the [0, 1] scale; n == 0 gives 1.0 for all three (see the section comment)."""
    pq = sq = rq = 0.0
    n = 0
    for category, info in categories.items():
        if isthing is not None and (info["isthing"] == 1) != isthing:
            continue
        s = stats.get(category)
        if s is None or s["tp"] + s["fp"] + s["fn"] == 0:
            continue
        n += 1
        denominator = s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"]
        pq += s["iou"] / denominator
        sq += s["iou"] / s["tp"] if s["tp"] != 0 else 0
        rq += s["tp"] / denominator
    if n == 0:
        return {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 0}
    return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}


def image_pq(gt_ids, gt_segments, pred_ids, pred_segments, categories, isthing=None) -> dict:
    """Panoptic quality of one image: {"pq", "sq", "rq", "n"}, on the [0, 1] scale.

    gt_ids, pred_ids: (H, W) integer id maps (numpy or torch), 0 = void. gt_segments: COCO
    segments_info dicts with "id", "category_id", "iscrowd"; pred_segments: dicts with "id" and
    "category_id" (postprocess.panoptic_inference's output, once its contiguous labels are mapped to
    the ids used here). categories: category id -> dict with "isthing" (1/0 or bool).
    isthing: None (all categories), True (things) or False (stuff).

    Exactly panopticapi's pq_compute restricted to this image (rules in the section comment);
    "n" is the number of categories averaged. When n == 0 (nothing in the ground truth and no
    prediction that counts) the image scores pq = sq = rq = 1.0: predicting nothing for an empty
    image is perfect, and ECO-M2F's Step B needs a finite utility for every exit.
    """
    return pq_average(pq_stats(gt_ids, gt_segments, pred_ids, pred_segments, categories), categories, isthing)


# ---- ground truth in other forms: instances for AP, semantic maps for mIoU -----------------


def encode_mask(mask) -> dict:
    """A binary (H, W) mask as COCO compressed RLE, JSON-ready (counts as str)."""
    rle = mask_util.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def instance_detections(instances, image_id, to_dataset) -> list:
    """COCO results of one image's instances (Mask2Former.inference): RLE mask, the dataset's
    category id (to_dataset[contiguous label]) and score, one dict per instance."""
    return [{"image_id": image_id, "category_id": to_dataset[int(label)], "segmentation": encode_mask(mask),
             "score": float(score)}
            for mask, score, label in zip(instances["masks"].bool().cpu().numpy(), instances["scores"].tolist(),
                                          instances["labels"].tolist())]


def panoptic_to_instances(panoptic, panoptic_folder, image_ids=None) -> dict:
    """COCO instance ground truth ("images", "annotations", "categories") from panoptic ground truth.

    panoptic: the panoptic JSON (a dict or a path); panoptic_folder: its PNG folder; image_ids:
    only these images (default all). Every thing segment becomes one instance with an RLE mask,
    its pixel area and its box; crowd segments keep iscrowd = 1, so COCOeval ignores the
    detections they absorb. Only thing categories are listed. Used for AP when a split has no
    instance JSON. (COCO's own instances_val2017.json is not exactly this: the panoptic masks
    had their overlaps resolved, so AP differs from the official figure by a little.)
    """
    if not isinstance(panoptic, dict):
        panoptic = json.loads(Path(panoptic).read_text())
    things = {c["id"]: c for c in panoptic["categories"] if c["isthing"] == 1}
    wanted = None if image_ids is None else set(image_ids)
    images = [im for im in panoptic["images"] if wanted is None or im["id"] in wanted]
    annotations = []
    for ann in panoptic["annotations"]:
        if wanted is not None and ann["image_id"] not in wanted:
            continue
        segments = [s for s in ann["segments_info"] if s["category_id"] in things]
        if not segments:
            continue
        ids = read_panoptic_png(Path(panoptic_folder) / ann["file_name"]).numpy()
        for s in segments:
            rle = encode_mask(ids == s["id"])
            area = int(mask_util.area(rle))
            if area == 0:
                continue  # a segment without pixels cannot be detected; COCO lists none
            annotations.append({"id": len(annotations) + 1, "image_id": ann["image_id"],
                                "category_id": s["category_id"], "segmentation": rle, "area": area,
                                "bbox": mask_util.toBbox(rle).tolist(), "iscrowd": int(s.get("iscrowd", 0))})
    return {"images": images, "annotations": annotations, "categories": list(things.values())}


def semantic_from_panoptic(ids, segments, contiguous, ignore) -> np.ndarray:
    """(H, W) semantic labels: the contiguous class of every segment's pixels, crowd segments
    included (a crowd of people is still person); void and undescribed ids -> `ignore`."""
    label_of = {s["id"]: contiguous[s["category_id"]] for s in segments}
    present, inverse = np.unique(ids, return_inverse=True)
    labels = np.array([label_of.get(int(i), ignore) for i in present], dtype=np.int64)
    return labels[inverse].reshape(ids.shape)


# ---- metrics over a dataset: PQ (panopticapi), AP (pycocotools), mIoU (detectron2's rule) ---


@contextmanager
def _quiet():
    """Silence panopticapi's and pycocotools' progress prints (forked pq_compute workers
    inherit the redirected sys.stdout too)."""
    with redirect_stdout(io.StringIO()):
        yield


def panoptic_metrics(gt_json, gt_folder, pred_json, pred_folder) -> dict:
    """PQ, SQ, RQ (0..100) for all categories, things (_th) and stuff (_st), by panopticapi's
    pq_compute on the files. A group with no category present (no things in the evaluated images,
    say) gets None, where pq_compute would divide by zero."""
    groups = {"": ("All", None), "_th": ("Things", True), "_st": ("Stuff", False)}
    with _quiet():
        try:
            results = pq_compute(str(gt_json), str(pred_json), str(gt_folder), str(pred_folder))
        except ZeroDivisionError:
            # Same statistics through pq_compute's own parts, averaging only the non-empty groups.
            gt, pred = json.loads(Path(gt_json).read_text()), json.loads(Path(pred_json).read_text())
            categories = {c["id"]: c for c in gt["categories"]}
            by_image = {a["image_id"]: a for a in pred["annotations"]}
            stat = pq_compute_multi_core([(a, by_image[a["image_id"]]) for a in gt["annotations"]],
                                         str(gt_folder), str(pred_folder), categories)
            results = {}
            for name, isthing in groups.values():
                present = [c for c, info in categories.items()
                           if (isthing is None or (info["isthing"] == 1) == isthing)
                           and stat[c].tp + stat[c].fp + stat[c].fn > 0]
                results[name] = stat.pq_average(categories, isthing)[0] if present else None
    metrics = {}
    for suffix, (name, _) in groups.items():
        for key in ("pq", "sq", "rq"):
            metrics[key.upper() + suffix] = None if results[name] is None else 100 * results[name][key]
    return metrics


def instance_metrics(gt: dict, detections: list, image_ids) -> dict:
    """COCO mask AP (0..100): AP, AP50, AP75, APs, APm, APl of `detections` (dicts with
    "image_id", "category_id", "segmentation" RLE, "score") against the COCO instance ground
    truth `gt` on `image_ids`. None where COCOeval has nothing to average (-1: no ground truth)."""
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    with _quiet():
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        wanted = set(image_ids)
        has_gt = any(a["image_id"] in wanted and not a.get("iscrowd", 0) for a in gt["annotations"])
        if not detections:
            # loadRes cannot take an empty list. No detections: AP 0 if there was anything to find.
            return {k: 0.0 if has_gt else None for k in keys}
        coco_dt = coco_gt.loadRes(detections)
        coco_eval = COCOeval(coco_gt, coco_dt, "segm")
        coco_eval.params.imgIds = list(image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {k: (100 * float(v) if v >= 0 else None) for k, v in zip(keys, coco_eval.stats[:6])}


def confusion_matrix(pred, gt, num_classes) -> np.ndarray:
    """(K+1, K+1) int64 counts [predicted class, true class]; true class K means ignored."""
    index = (num_classes + 1) * np.asarray(pred, dtype=np.int64).ravel() + np.asarray(gt, dtype=np.int64).ravel()
    return np.bincount(index, minlength=(num_classes + 1) ** 2).reshape(num_classes + 1, num_classes + 1)


def semantic_metrics(confusion) -> dict:
    """mIoU, fwIoU, mACC, pACC (0..100) from a confusion_matrix sum, as detectron2's
    SemSegEvaluator: ignored pixels are left out, and a class without ground-truth pixels is
    left out of the means (its false positives still lower the IoU of the true classes)."""
    tp = np.diag(confusion)[:-1].astype(np.float64)
    gt_pixels = confusion[:-1, :-1].sum(0).astype(np.float64)
    pred_pixels = confusion[:-1, :-1].sum(1).astype(np.float64)
    valid = gt_pixels > 0
    if not valid.any():
        return {"mIoU": None, "fwIoU": None, "mACC": None, "pACC": None}
    iou = tp[valid] / (gt_pixels + pred_pixels - tp)[valid]
    weights = gt_pixels[valid] / gt_pixels.sum()
    return {"mIoU": 100 * iou.mean(), "fwIoU": 100 * float((iou * weights).sum()),
            "mACC": 100 * (tp[valid] / gt_pixels[valid]).mean(), "pACC": 100 * tp.sum() / gt_pixels.sum()}



# ---- dataset evaluation ----------------------------------------------------------------------
#
# out_dir/
#   predictions/*.png    predicted panoptic ids, RGB-encoded (COCO panoptic format)
#   predictions.json     {"annotations": [{"image_id", "file_name", "segments_info"}]}, dataset category ids
#   gt_panoptic.json     the ground truth of the evaluated images, when that is not the whole split
#   vis/*.png            image | ground truth | prediction for the first few images
#   metrics.json         PQ/SQ/RQ (+_th, _st), AP..., mIoU..., GFLOPs, FPS; written last, atomically
#
# PQ, AP, mIoU and their variants are on the 0..100 scale; GFLOPs is the mean over the images of
# each one's cost (papers' convention, post-processing at the original size included); FPS is
# images per second at batch 1. A metric that is undefined (no thing in the ground truth for AP,
# FPS not measured, ...) is None, null in the JSON.
#
# ECO-M2F (a gate): "exit" is "gate", "gate" describes it (its exits and training info: β,
# loss, ...), "exit_histogram" counts the images per chosen exit, and GFLOPs is the mean of each
# image's cost at its own exit. With a fixed exit k the histogram is {k: images}; with all layers
# it is None. Histogram keys are strings ("2": 130), as JSON has them, so metrics.json reads back
# equal to the returned dict.


METRIC_KEYS = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st",
               "AP", "AP50", "AP75", "APs", "APm", "APl", "mIoU", "fwIoU", "mACC", "pACC",
               "GFLOPs", "GFLOPs_parts", "FPS", "images", "exit", "exit_histogram", "gate",
               "batch_size", "device", "amp", "source")


def gate_description(gate) -> dict:
    """JSON-ready facts about a gate for metrics.json: its exits and its training info (gate.info:
    β, loss, ... as gate.py saved them; values JSON cannot hold are written as text)."""
    info = {"exits": [int(k) for k in gate.exits.tolist()]} if hasattr(gate, "exits") else {}
    for key, value in getattr(gate, "info", {}).items():
        try:
            json.dumps(value)
        except TypeError:
            value = str(value)
        info.setdefault(key, value)
    return info


def exit_histogram(exits) -> dict:
    """{"k": number of images that exited after layer k}, in increasing k."""
    counts = {}
    for k in sorted(int(k) for k in exits):
        counts[str(k)] = counts.get(str(k), 0) + 1
    return counts


@torch.no_grad()
def run_model(model, images, exit=None, gate=None):
    """The model's predictions with every image at `exit`, or at the exit `gate` picks for it
    (then with "exits" (B,))."""
    return model(images, exit=exit) if gate is None else model.forward_gated(images, gate)


class Evaluation:
    """Collects one split's predictions image by image (`add`), writing the panoptic PNGs as it
    goes, then scores them (`metrics`): PQ by panopticapi on the files, AP by pycocotools, mIoU."""

    def __init__(self, dataset, out_dir, vis_images=4):
        self.out_dir, self.vis_images = Path(out_dir), vis_images
        self.pred_folder = self.out_dir / "predictions"
        self.pred_folder.mkdir(parents=True, exist_ok=True)
        self.gt_json, self.gt_folder = Path(dataset.json_file), Path(dataset.panoptic_dir)
        self.instances_json = dataset.instances_json
        if self.instances_json is not None and not Path(self.instances_json).is_file():
            self.instances_json = None  # derived from the panoptic ground truth instead
        self.gt = json.loads(self.gt_json.read_text())
        self.gt_anns = {a["image_id"]: a for a in self.gt["annotations"]}
        self.contiguous = dataset.contiguous
        self.to_dataset = {c: d for d, c in dataset.contiguous.items()}  # contiguous class -> dataset id
        self.K = dataset.num_classes
        self.categories = dataset.categories  # names and colours for the pictures
        self.annotations, self.detections, self.image_ids, self.produced = [], [], [], set()
        self.confusion = np.zeros((self.K + 1, self.K + 1), dtype=np.int64)

    def ground_truth(self, sample):
        """(annotation, (H, W) id map) at the original size, read as pq_compute reads it (the
        sample's "ids" went through the test-time resize). An image without an annotation is all
        void, and pq_compute, which follows the ground truth's annotations, skips it."""
        H, W = int(sample["height"]), int(sample["width"])
        ann = self.gt_anns.get(sample["image_id"]) or {"file_name": Path(sample["file_name"]).stem + ".png",
                                                       "segments_info": []}
        if not ann["segments_info"]:
            return ann, np.zeros((H, W), dtype=np.int64)
        return ann, read_panoptic_png(self.gt_folder / ann["file_name"]).numpy()

    def add(self, sample, result):
        """One image's post-processed result (Mask2Former.inference) against its ground truth."""
        self.produced.update(result)
        image_id = sample["image_id"]
        self.image_ids.append(image_id)
        gt_ann, gt_ids = self.ground_truth(sample)
        if "panoptic_seg" in result:
            ids, segments = result["panoptic_seg"]
            pred_ids = ids.cpu().numpy().astype(np.int64)
            pred_segments = [{"id": int(s["id"]), "category_id": self.to_dataset[int(s["category_id"])],
                              "isthing": bool(s["isthing"]), "iscrowd": 0} for s in segments]
            png = self.pred_folder / gt_ann["file_name"]
            png.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(ids_to_rgb(pred_ids)).save(png)
            self.annotations.append({"image_id": image_id, "file_name": gt_ann["file_name"],
                                     "segments_info": pred_segments})
            if len(self.image_ids) <= self.vis_images:
                stem = Path(gt_ann["file_name"]).stem
                save_visualization(self.out_dir / "vis" / f"{stem}.png", sample["image"], gt_ids,
                                   gt_ann["segments_info"], pred_ids, pred_segments, categories=self.categories,
                                   title=stem)
        if "sem_seg" in result or "sem_seg_labels" in result:  # (K, H, W) scores or their (H, W) argmax
            labels = result["sem_seg_labels"] if "sem_seg_labels" in result else result["sem_seg"].argmax(0)
            classes = result["sem_seg"].shape[0] if "sem_seg" in result else int(labels.max()) + 1
            if classes > self.K or ("sem_seg" in result and classes != self.K):
                raise ValueError(f"the model predicts {classes} classes, the dataset has {self.K}")
            truth = semantic_from_panoptic(gt_ids, gt_ann["segments_info"], self.contiguous, self.K)
            self.confusion += confusion_matrix(labels.cpu().numpy(), truth, self.K)
        if "instances" in result:
            self.detections += instance_detections(result["instances"], image_id, self.to_dataset)

    def metrics(self):
        """PQ (panopticapi, against the ground truth of exactly the evaluated images), AP (the
        split's instance file, or instances derived from the panoptic ground truth), mIoU."""
        metrics = {}
        if self.annotations:
            predictions = self.out_dir / "predictions.json"
            atomic_write_text(predictions, json.dumps({"annotations": self.annotations}))
            gt_json = self.gt_json
            if set(self.image_ids) != set(self.gt_anns):
                wanted = set(self.image_ids)
                subset = {**self.gt, "images": [im for im in self.gt["images"] if im["id"] in wanted],
                          "annotations": [a for a in self.gt["annotations"] if a["image_id"] in wanted]}
                gt_json = self.out_dir / "gt_panoptic.json"
                atomic_write_text(gt_json, json.dumps(subset))
            metrics.update(panoptic_metrics(gt_json, self.gt_folder, predictions, self.pred_folder))
        if "instances" in self.produced:
            if self.instances_json is not None:
                instance_gt = json.loads(Path(self.instances_json).read_text())
            else:
                instance_gt = panoptic_to_instances(self.gt, self.gt_folder, self.image_ids)
            metrics.update(instance_metrics(instance_gt, self.detections, self.image_ids))
        if self.confusion.any():
            metrics.update(semantic_metrics(self.confusion))
        return metrics


def evaluation_source(cfg, weights, split=None, gate_file=None) -> dict:
    """What an evaluation was made from, stored in its metrics.json: the weights file (path, size,
    modification time), the whole resolved config, as JSON reads it back (so that a stored source
    compares equal), the split and the gate file. `sweep --reuse` reuses only an exact match; the
    report rebuilds the model from it to time it."""
    stat = Path(weights).stat()
    source = {"weights": str(Path(weights).resolve()), "weights_size": stat.st_size,
              "weights_mtime": stat.st_mtime, "config": config_to_dict(cfg), "split": split,
              "gate_file": None if gate_file is None else str(Path(gate_file).resolve())}
    return json.loads(json.dumps(source))


@torch.no_grad()
def evaluate_dataset(model, dataset, out_dir, *, batch_size=1, exit=None, gate=None, max_images=None,
                     device="cpu", amp="fp32", workers=0, vis_images=4, fps_images=10, flops=True,
                     progress=True, source=None) -> dict:
    """Evaluate `model` on `dataset` (a test-time data.PanopticDataset); returns the metrics.

    model: a Mask2Former already on `device`. dataset: its samples carry the test-resized "image"
    and the original "height" / "width"; the ground truth is read from its files at the original
    size, as pq_compute reads it. exit: the encoder exit of every image (None = all layers); gate:
    an ECO-M2F gate (gate.Gate) that picks each image's exit instead (Mask2Former.forward_gated).
    max_images: only the first N images. amp: fp32, fp16 or bf16 autocast. workers: data loader
    processes. vis_images: pictures to draw. fps_images: images timed at batch 1 (0 = no FPS).
    flops: count GFLOPs (one forward per distinct image size and exit). source: what the model was
    made from (evaluate.py's weights file and config), kept in metrics.json. Writes the files
    listed in the section comment into out_dir.

    Batching does not change the results: in a batch with per-image exits every encoder layer
    runs only on the images that still need it, so batch_size > 1 gives batch 1's predictions,
    exits and GFLOPs (up to float tolerance) when the images share a size. Images of different
    sizes are zero-padded to a common one in a batch, which changes what every model sees (the
    gate's mean over the 1/32 map included), as in any batched Mask2Former evaluation.
    """
    if exit is not None:
        check_exit(model.encoder, exit)
    device = torch.device(device)
    model.eval()
    if gate is not None:
        gate = gate.to(device).eval()
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    if n == 0:
        raise ValueError(f"{dataset.json_file}: no images to evaluate")
    evaluation = Evaluation(dataset, out_dir, vis_images)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size,
                                         collate_fn=collate, num_workers=workers)
    sizes, exits = [], []
    for batch in tqdm(loader, desc="evaluate", total=len(loader), disable=not progress):
        images, image_sizes = model.preprocess([s["image"].to(device, non_blocking=True) for s in batch])
        with autocast(device.type, amp):
            outputs = run_model(model, images, exit, gate)
        exits += outputs["exits"].tolist() if gate is not None else [exit] * len(batch)
        originals = [(int(s["height"]), int(s["width"])) for s in batch]
        # Labels alone for mIoU: no (K, H, W) score map at the original size.
        results = model.inference(outputs, image_sizes, output_sizes=originals, semantic="labels")
        for sample, result in zip(batch, results):
            evaluation.add(sample, result)
        sizes += [(tuple(size), original) for size, original in zip(image_sizes, originals)]

    metrics = dict.fromkeys(METRIC_KEYS)
    metrics.update({"images": n, "exit": "gate" if gate is not None else exit,
                    "exit_histogram": None if exit is None and gate is None else exit_histogram(exits),
                    "gate": gate_description(gate) if gate is not None else None,
                    "batch_size": batch_size, "device": str(device), "amp": amp, "source": source})
    metrics.update(evaluation.metrics())
    if flops:
        # Each image at its own exit (all the same one without a gate). The gate itself is not
        # counted: its mean over the 1/32 tokens is free in the papers' convention and its
        # Linear(256, 5) is 1280 FLOPs, nothing next to a model's hundred-odd GFLOPs.
        gflops = average_gflops(model, sizes, exits)
        metrics["GFLOPs"], metrics["GFLOPs_parts"] = gflops["total"], gflops
    if fps_images:
        samples = [dataset[i] for i in range(min(fps_images, n))]
        metrics["FPS"] = measure_fps(model, samples, device, exit, gate, amp)
    atomic_write_text(Path(out_dir) / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def load_evaluation(cfg, config_path, weights, split, device):
    """The test-time dataset of `split` and the model of `cfg` with `weights` (strict), on
    `device`, checked against each other (classes) and against the config (weights)."""
    device = check_device(device)
    dataset = build_dataset(cfg.data, split=split, train=False)
    cfg = with_classes(cfg, dataset.categories, config_path, dataset.json_file)  # unset ones from the dataset
    model = build_model(cfg)
    load_weights(model, weights)
    return dataset, model.to(device)


@torch.no_grad()
def end_to_end(model, sample, exit=None, gate=None, device="cpu", amp="fp32"):
    """One dataset sample from its uint8 image on the host to the post-processed outputs at its
    original size (transfer, normalisation and padding, forward, inference): what is timed."""
    device = torch.device(device)
    images, sizes = model.preprocess([sample["image"].to(device)])
    with autocast(device.type, amp):
        outputs = run_model(model, images, exit, gate)
    return model.inference(outputs, sizes, output_sizes=[(int(sample["height"]), int(sample["width"]))],
                           semantic="labels")


@torch.no_grad()
def measure_fps(model, samples, device="cpu", exit=None, gate=None, amp="fp32", warmup=2) -> float | None:
    """Images per second at batch 1: the median over `samples` (dataset samples with "image",
    "height", "width") of the time from the uint8 image on the host to the post-processed
    outputs (transfer, normalisation and padding, forward, inference), after `warmup` untimed
    runs, synchronised on CUDA. None if there are no samples.

    exit, gate: as in evaluate_dataset; a gate runs inside every timed forward and picks each image's
    exit, so its (small) cost and its choices are both in the timing."""
    if not samples:
        return None
    device = torch.device(device)

    def run(sample):
        end_to_end(model, sample, exit, gate, device, amp)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        run(samples[0])
    times = []
    for sample in samples:
        sync()
        start = time.perf_counter()
        run(sample)
        sync()
        times.append(time.perf_counter() - start)
    return 1.0 / float(np.median(times))


def interleaved_times(fns, rounds=5, warmup=1, clock=time.process_time) -> dict:
    """Time each callable of `fns` ({name: fn()}) once per round, `rounds` rounds, in an order
    rotated every round, after `warmup` untimed calls of each: {name: [seconds per round]}.

    Interleaving makes every variant see the same drift of a shared machine (other processes,
    frequency, caches), so per-round ratios are steadier than ratios of separate runs. The default
    clock is this process's CPU time (all its threads), not wall time."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        shift = r % max(len(names), 1)
        for name in names[shift:] + names[:shift]:
            start = clock()
            fns[name]()
            times[name].append(clock() - start)
    return times


def ratio_summary(times, baseline) -> dict:
    """Per name of `times` (interleaved_times' output): the median and the (min, max) over rounds
    of time / the baseline's time in the same round, {name: (median, (min, max))}."""
    base = times[baseline]
    summary = {}
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, base)]
        summary[name] = (float(np.median(ratios)), (min(ratios), max(ratios)))
    return summary
