"""From a trained model to pictures and files: `evaluate.py predict` and `evaluate.py export`.

    python evaluate.py predict --weights W --input a.jpg dir/ 'glob/*.png' --out DIR
                               [--exit K | --gate G] [--batch-size N] [--device D]
                               [--instances] [--semantic] [--config CFG] [key=value ...]

runs the network on images that have no annotations: each image is resized as the config's
test-time resize (data.test_short_side, data.test_max_size), predicted, and post-processed at
its own size. Per image it writes

    DIR/overlay/<name>.png     the image beside its panoptic segmentation, with class names and a legend
    DIR/panoptic/<name>.png    the COCO-panoptic PNG (segment id = R + 256 G + 256² B)
    DIR/semantic/<name>.png    with --semantic: the dataset category id of every pixel (8 or 16 bit)

and for all images DIR/panoptic.json (COCO panoptic: per image its segments with category ids,
names and scores, and the categories) and, with --instances, DIR/instances.json (COCO results:
RLE masks, category ids, scores). Class names, thing/stuff and colours come from the weights
(train.py stores the training set's categories in them); weights without them get numbered
classes. Images are batched by their resized size, so a batch holds no padding: batch N gives
batch 1's outputs.

    python evaluate.py export --weights W --size H W --format torch|onnx --out FILE [--exit K]

exports the network, a normalised-and-padded image batch (B, 3, H, W) in 0-255 RGB in, the final
class logits (B, Q, K+1) and mask logits (B, Q, H/4, W/4) out, at a fixed size: torch.export's
ExportedProgram (`torch.export.load(FILE).module()(images)`) or ONNX (opset 18, dynamo exporter;
needs the optional packages onnx and onnxscript, and onnxruntime to run it). Post-processing
(resize, panoptic merge) stays in Python: `Mask2Former.inference` on the outputs.
"""
import glob
import importlib.util
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from config import atomic_write, atomic_write_text, load_classes
from data import DataError, build_transform, ids_to_rgb, read_image
from encoders import check_exit
from metrics import instance_detections, run_model
from visualize import save_prediction

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm"}


# ---- the inputs ---------------------------------------------------------------------------------


def find_images(inputs):
    """Image files from files, folders (their image files, sorted) and glob patterns, in the
    order given, each once. Returns (paths, skipped): skipped are (path, why) of what was named
    or found but is not an image file; an input that matches nothing is a ValueError."""
    paths, skipped, seen = [], [], set()
    for spec in inputs:
        p = Path(spec)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file())
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(q) for q in glob.glob(spec, recursive=True) if Path(q).is_file())
            if not found:
                raise ValueError(f"--input {spec}: no such file or folder, and no file matches it as a pattern")
        for q in found:
            if q.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append((q, f"not an image file (suffix {q.suffix or 'none'})"))
            elif q.resolve() not in seen:
                seen.add(q.resolve())
                paths.append(q)
    return paths, skipped


def output_names(paths):
    """A file name stem per image, unique in the output folder: the image's stem, or for images
    of the same stem in different folders, the stem with _2, _3, ..."""
    count, names = Counter(), []
    for p in paths:
        count[p.stem] += 1
        names.append(p.stem if count[p.stem] == 1 else f"{p.stem}_{count[p.stem]}")
    return names


def test_resize(image, transform):
    """(3, H, W) uint8 -> the test-time resized image, as the evaluation resizes it: `transform` is
    data.build_transform(cfg.data, train=False) (shortest edge, bilinear with antialias), or None
    (data.test_short_side <= 0) for the original size."""
    if transform is None:
        return image
    sample = {"image": image, "ids": torch.zeros(image.shape[1:], dtype=torch.int32)}  # the transform resizes ids too
    return transform(sample, None)["image"]


# ---- the classes --------------------------------------------------------------------------------


def class_list(weights, model_cfg):
    """The model's classes in contiguous order, each {"id", "name", "isthing", "color"?}: the
    training set's categories stored in the weights, else numbered ones ("class k", id k)."""
    classes = load_classes(weights)
    if classes is not None:
        if len(classes) != model_cfg.num_classes:
            raise ValueError(f"{weights}: stores {len(classes)} classes but its model has "
                             f"model.num_classes={model_cfg.num_classes}")
        return classes
    things = set(model_cfg.thing_classes)
    return [{"id": k, "name": f"class {k}", "isthing": int(k in things)} for k in range(model_cfg.num_classes)]


# ---- prediction -----------------------------------------------------------------------------------


def batches_by_size(images, batch_size):
    """Index lists of at most batch_size images that share one size, in input order per size:
    a batch then has no padding, and gives what each image gives alone."""
    by_size = defaultdict(list)
    for i, image in enumerate(images):
        by_size[tuple(image.shape[1:])].append(i)
    return [idx[k: k + batch_size] for idx in by_size.values() for k in range(0, len(idx), batch_size)]


@torch.no_grad()
def predict_images(model, images, originals, *, batch_size=1, exit=None, gate=None, device="cpu"):
    """Post-processed predictions (Mask2Former.inference) of test-resized `images` ((3, h, w)
    uint8 each), at the `originals` sizes (H, W), in input order; each result also has "exit"."""
    results = [None] * len(images)
    for idx in batches_by_size(images, batch_size):
        batch, sizes = model.preprocess([images[i].to(device) for i in idx])
        outputs = run_model(model, batch, exit, gate)
        exits = outputs["exits"].tolist() if gate is not None else [exit] * len(idx)
        done = model.inference(outputs, sizes, output_sizes=[originals[i] for i in idx], semantic="labels")
        for i, result, k in zip(idx, done, exits):
            results[i] = {**result, "exit": k}
    return results


def panoptic_record(name, result, classes):
    """The COCO-panoptic annotation of one prediction, and its (H, W) int64 id map."""
    ids, segments = result["panoptic_seg"]
    ids = ids.cpu().numpy().astype(np.int64)
    areas = Counter(ids.ravel().tolist())
    info = []
    for s in segments:
        c = classes[int(s["category_id"])]
        entry = {"id": int(s["id"]), "category_id": c["id"], "category_name": c["name"],
                 "isthing": int(bool(s["isthing"])), "area": areas[int(s["id"])]}
        if "score" in s:
            entry["score"] = round(float(s["score"]), 5)
        info.append(entry)
    return {"image_id": name, "file_name": f"{name}.png", "segments_info": info}, ids


def semantic_labels(result, classes):
    """(H, W) dataset category ids of the semantic prediction, uint8 or uint16 as they fit."""
    labels = result["sem_seg_labels"].cpu().numpy()  # contiguous ids
    to_dataset = np.array([c["id"] for c in classes])
    return to_dataset[labels].astype(np.uint8 if to_dataset.max() < 256 else np.uint16)


def save_png(path, array):
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"), binary=True)


def summary_line(path, record, exit):
    """"a.jpg: 7 segments (2 person, sky, grass, ...) at exit 3"."""
    names = Counter(s["category_name"] for s in record["segments_info"])
    listed = ", ".join(n if k == 1 else f"{k} {n}" for n, k in names.most_common(6))
    more = ", ..." if len(names) > 6 else ""
    where = "" if exit is None else f" at exit {exit}"
    return f"{path}: {len(record['segments_info'])} segments ({listed or 'none'}{more}){where}"


def check_prediction_folder(out, overwrite):
    """An earlier prediction in `out` is kept unless --overwrite."""
    earlier = Path(out) / "panoptic.json"
    if earlier.exists() and not overwrite:
        raise ValueError(f"{out}: holds an earlier prediction ({earlier}); pass --overwrite to replace it, "
                         "or choose another --out")


def run_predict(model, cfg, args, gate=None):
    """The predict command (module docstring) for a loaded model; returns the panoptic records."""
    # Only the post-processing asked for (the model reads its inference config at each call).
    inference = model.cfg.inference
    inference.panoptic, inference.instance, inference.semantic = True, args.instances, args.semantic
    check_exit(model.encoder, args.exit, "--exit")
    out = Path(args.out)
    check_prediction_folder(out, args.overwrite)
    paths, skipped = find_images(args.input)
    for path, why in skipped:
        print(f"skipped {path}: {why}")
    classes = class_list(args.weights, cfg.model)
    categories = {c["id"]: c for c in classes}
    transform = build_transform(cfg.data, train=False)
    records, detections, bar = [], [], tqdm(total=len(paths), desc="predict", unit="image")
    names = output_names(paths)
    chunk = max(args.batch_size, 1) * 8  # images read at a time: a few batches
    for start in range(0, len(paths), chunk):
        originals, images, ok = [], [], []
        for i in range(start, min(start + chunk, len(paths))):
            try:
                image = read_image(paths[i])
            except DataError as e:
                tqdm.write(f"skipped {e}")
                bar.update(1)
                continue
            ok.append(i)
            originals.append(tuple(image.shape[1:]))
            images.append(image)
        resized = [test_resize(image, transform) for image in images]
        results = predict_images(model, resized, originals, batch_size=args.batch_size, exit=args.exit, gate=gate,
                                 device=args.device)
        for i, image, result in zip(ok, images, results):
            record, ids = panoptic_record(names[i], result, classes)
            save_png(out / "panoptic" / f"{names[i]}.png", ids_to_rgb(ids))
            save_prediction(out / "overlay" / f"{names[i]}.png", image, ids, record["segments_info"], categories)
            if args.semantic and "sem_seg_labels" in result:
                save_png(out / "semantic" / f"{names[i]}.png", semantic_labels(result, classes))
            if args.instances and "instances" in result:
                detections += instance_detections(result["instances"], names[i], [c["id"] for c in classes])
            records.append({**record, "source": str(paths[i]), "exit": result["exit"]})
            tqdm.write(summary_line(paths[i], record, result["exit"]))
            bar.update(1)
    bar.close()
    atomic_write_text(out / "panoptic.json", json.dumps({"annotations": records, "categories": classes}, indent=1))
    if args.instances:
        atomic_write_text(out / "instances.json", json.dumps(detections))
    print(f"{len(records)} images predicted into {out}/ (overlay/, panoptic/, panoptic.json"
          + (", semantic/" if args.semantic else "") + (", instances.json" if args.instances else "") + ")")
    return records


# ---- export ---------------------------------------------------------------------------------------


class ExportedNetwork(torch.nn.Module):
    """The network as an exporter sees it: one tensor in, two out, no Python-side lists.

    forward(images (B, 3, H, W) float RGB 0-255, H and W multiples of the model's
    size_divisibility) -> (class logits (B, Q, K+1), mask logits (B, Q, H/s, W/s)), the final
    decoder round of Mask2Former.forward at `exit`."""

    def __init__(self, model, exit=None):
        super().__init__()
        self.model, self.exit = model, exit

    def forward(self, images):
        x = (images - self.model.pixel_mean) / self.model.pixel_std  # (B, 3, H, W)
        outputs = self.model(x, exit=self.exit)
        return outputs["pred_logits"], outputs["pred_masks"]


def export_network(model, *, size, fmt, out, exit=None):
    """Export `model` at one image size to `out`: fmt "torch" (torch.export, .pt2) or "onnx"
    (opset 18). Returns the example input used (a deterministic random image batch of 1)."""
    H, W = size
    d = model.size_divisibility
    if H % d or W % d:
        raise ValueError(f"--size {H} {W}: both must be multiples of model.size_divisibility={d} "
                         f"(pad the image as Mask2Former.preprocess does)")
    net = ExportedNetwork(model.eval(), exit).eval()
    example = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(0)) * 255
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torch":
        program = torch.export.export(net, (example,))
        atomic_write(out, lambda f: torch.export.save(program, f), binary=True)
    elif fmt == "onnx":
        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]  # the exporter's
        if missing:
            raise ValueError(f"--format onnx needs the optional packages onnx and onnxscript ({', '.join(missing)} "
                             "missing): pip install onnx onnxscript onnxruntime")
        program = torch.onnx.export(net, (example,), dynamo=True, opset_version=18,
                                    input_names=["images"], output_names=["pred_logits", "pred_masks"])
        atomic_write(out, lambda f: f.write(program.model_proto.SerializeToString()), binary=True)
    else:
        raise ValueError(f"--format {fmt!r}: use torch or onnx")
    return example
