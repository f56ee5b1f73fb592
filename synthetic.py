"""The built-in synthetic shapes dataset, in COCO panoptic format, for the quick start and the tests.

    python synthetic.py --out datasets/synthetic [--train 200] [--val 50] [--size 128 | --size H W] [--seed 0]

Every config that names no other dataset reads it from datasets/synthetic (config.DataConfig).
The output is a function of the arguments alone: the same seed writes the same bytes.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from config import run_command
from data import ids_to_rgb


# ---- the shapes -------------------------------------------------------------
#
# Five thing classes (shapes, each with its own colour and texture) and three stuff classes
# (textured backgrounds), with non-contiguous dataset ids so the id mapping is exercised:
# contiguous ids are circle 0, square 1, triangle 2, ring 3, cross 4, sky 5, grass 6, wall 7.
# Segment ids are category_id * 1000 (+ instance number for things), as Cityscapes numbers them.

SYNTH_CATEGORIES = [
    {"id": 1, "name": "circle", "isthing": 1, "color": [220, 40, 40], "supercategory": "shape"},
    {"id": 2, "name": "square", "isthing": 1, "color": [40, 40, 45], "supercategory": "shape"},
    {"id": 3, "name": "triangle", "isthing": 1, "color": [240, 210, 30], "supercategory": "shape"},
    {"id": 5, "name": "ring", "isthing": 1, "color": [200, 60, 210], "supercategory": "shape"},
    {"id": 7, "name": "cross", "isthing": 1, "color": [250, 140, 20], "supercategory": "shape"},
    {"id": 20, "name": "sky", "isthing": 0, "color": [120, 180, 240], "supercategory": "background"},
    {"id": 21, "name": "grass", "isthing": 0, "color": [60, 150, 50], "supercategory": "background"},
    {"id": 22, "name": "wall", "isthing": 0, "color": [150, 110, 80], "supercategory": "background"},
]
SYNTH_THINGS = [c for c in SYNTH_CATEGORIES if c["isthing"]]
SYNTH_STUFF = [c for c in SYNTH_CATEGORIES if not c["isthing"]]
# How many things an image asks for (0..12): mostly a handful, a tail of crowded scenes.
SYNTH_COUNT_WEIGHTS = np.array([4, 8, 10, 10, 10, 9, 8, 7, 6, 5, 4, 3, 2], dtype=np.float64)
MIN_SEGMENT_AREA = 8  # px; smaller visible parts are not learnable targets


def synth_stuff(rng, H, W):
    """1-3 stuff regions: bands (horizontal or vertical) with wavy boundaries, each textured.
    Returns the category id per pixel (H, W) and the image (H, W, 3) float."""
    k = int(rng.integers(1, 4))
    classes = [SYNTH_STUFF[j] for j in rng.permutation(len(SYNTH_STUFF))[:k]]
    vertical = rng.random() < 0.3
    L, A = (W, H) if vertical else (H, W)  # L: the axis the bands stack along, A: the other
    along = np.arange(A) + 0.5
    across = np.arange(L)[:, None] + 0.5  # (L, 1)
    region = np.zeros((L, A), dtype=np.int64)
    for b in np.sort(rng.uniform(0.2, 0.8, size=k - 1)) * L:
        wave = b + rng.uniform(0, 0.08 * L) * np.sin(2 * np.pi * along / rng.uniform(0.4, 1.5) / A
                                                     + rng.uniform(0, 2 * np.pi))  # (A,)
        region += across > wave[None, :]
    if vertical:
        region = region.T
    category = np.array([c["id"] for c in classes])[region]  # (H, W)

    yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
    image = np.zeros((H, W, 3))
    for c in classes:
        m = category == c["id"]
        base = np.array(c["color"], dtype=np.float64) + rng.uniform(-15, 15, size=3)
        if c["name"] == "sky":  # a smooth vertical gradient, light at the bottom
            t = (yy[m] / H)[:, None]
            tex = base * (0.8 + 0.35 * t) + rng.normal(0, 2, size=(m.sum(), 3))
        elif c["name"] == "grass":  # strong green-dominant pixel noise
            tex = base + rng.normal(0, 22, size=(m.sum(), 1)) * np.array([0.5, 1.0, 0.4])
        else:  # wall: brick courses of two shades separated by light mortar lines
            period = rng.integers(6, 10)
            y = yy[m] + rng.integers(0, period)
            shade = np.where(y // period % 2 == 0, 1.0, 0.8)[:, None]
            mortar = (y % period < 1)[:, None]
            tex = np.where(mortar, np.array([200.0, 195, 185]), base * shade)
        image[m] = tex
    return category, image


def synth_shape(kind, dy, dx, r, angle):
    """Boolean mask of a shape of size r centred at the origin, on pixel-centre offsets dy, dx."""
    u = dx * np.cos(angle) + dy * np.sin(angle)  # rotated coordinates
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    d2 = dy**2 + dx**2
    if kind == "circle":
        return d2 <= r**2
    if kind == "ring":
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if kind == "square":
        return (np.abs(u) <= 0.8 * r) & (np.abs(v) <= 0.8 * r)
    if kind == "triangle":  # equilateral, circumradius r: inside all three edges (inradius r / 2)
        normals = angle + np.pi / 3 + 2 * np.pi * np.arange(3) / 3
        return np.all(dx[..., None] * np.cos(normals) + dy[..., None] * np.sin(normals) <= r / 2, axis=-1)
    if kind == "cross":
        arm = 0.3 * r
        return ((np.abs(u) <= r) & (np.abs(v) <= arm)) | ((np.abs(v) <= r) & (np.abs(u) <= arm))
    raise ValueError(kind)


def synth_texture(kind, dy, dx, r, angle, base):
    """The colour of a shape's pixels (..., 3): the class's base colour with its texture."""
    u = dx * np.cos(angle) + dy * np.sin(angle)
    if kind == "circle":  # shaded like a ball
        return base * (1.15 - 0.35 * np.sqrt(dy**2 + dx**2)[..., None] / r)
    if kind == "square":  # a fine checkerboard
        check = ((np.floor(dy / 2) + np.floor(dx / 2)) % 2)[..., None]
        return base + 30 * check
    if kind == "cross":  # stripes along the rotated axis
        return base * (0.8 + 0.25 * (np.floor(u / 3) % 2))[..., None]
    return base + np.zeros(dy.shape + (3,))  # triangle, ring: flat


def synth_image(rng, H, W):
    """One synthetic image: (H, W, 3) uint8, (H, W) int64 segment ids, segments_info."""
    category, image = synth_stuff(rng, H, W)
    ids = category * 1000  # stuff segment id = category id * 1000
    owner = np.full((H, W), -1, dtype=np.int64)  # index of the thing on top of each pixel
    things = []  # per thing: (category, segment id, in-image area)
    visible = np.zeros(0, dtype=np.int64)  # visible pixels of each thing so far
    n = int(rng.choice(len(SYNTH_COUNT_WEIGHTS), p=SYNTH_COUNT_WEIGHTS / SYNTH_COUNT_WEIGHTS.sum()))
    # How much of an earlier thing a later one may hide: 0 (only touching) up to 70% of it.
    min_visible = rng.uniform(0.3, 1.0)
    S = min(H, W)
    per_class = {c["id"]: 0 for c in SYNTH_THINGS}
    for _ in range(n):
        cat = SYNTH_THINGS[int(rng.integers(len(SYNTH_THINGS)))]
        for _attempt in range(30):
            r = math.exp(rng.uniform(math.log(max(4.0, 0.04 * S)), math.log(0.25 * S)))  # small to large
            cy, cx = rng.uniform(0, H), rng.uniform(0, W)
            angle = rng.uniform(0, 2 * np.pi)
            y0, y1 = max(0, int(cy - r) - 1), min(H, int(cy + r) + 2)
            x0, x1 = max(0, int(cx - r) - 1), min(W, int(cx + r) + 2)
            dy, dx = np.mgrid[y0:y1, x0:x1] + 0.5
            dy, dx = dy - cy, dx - cx
            local = synth_shape(cat["name"], dy, dx, r, angle)  # (h, w) in the window
            area = int(local.sum())
            if area < max(12, MIN_SEGMENT_AREA):
                continue
            covered = owner[y0:y1, x0:x1][local]
            lost = np.bincount(covered[covered >= 0], minlength=len(things))
            left = visible - lost
            if len(things) and (np.any(left < MIN_SEGMENT_AREA) or
                                np.any(left < min_visible * np.array([t[2] for t in things]))):
                continue
            break
        else:
            continue  # no placement that keeps the earlier things visible enough
        per_class[cat["id"]] += 1
        seg_id = cat["id"] * 1000 + per_class[cat["id"]]
        base = np.array(cat["color"], dtype=np.float64) * rng.uniform(0.85, 1.15) + rng.uniform(-20, 20, size=3)
        window = (slice(y0, y1), slice(x0, x1))
        image[window][local] = synth_texture(cat["name"], dy, dx, r, angle, base)[local]
        ids[window][local] = seg_id
        owner[window][local] = len(things)
        things.append((cat["id"], seg_id, area))
        visible = np.append(left, area)

    # Stuff that things covered down to a sliver: void (0), not a target.
    segments = []
    for seg_id in np.unique(ids):
        m = ids == seg_id
        area = int(m.sum())
        if area < MIN_SEGMENT_AREA:
            ids[m] = 0
            continue
        ys, xs = np.nonzero(m)
        bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
        segments.append({"id": int(seg_id), "category_id": int(seg_id // 1000), "iscrowd": 0,
                         "area": area, "bbox": bbox})
    image = image + rng.normal(0, 3, size=image.shape)  # mild sensor noise everywhere
    return np.clip(np.round(image), 0, 255).astype(np.uint8), ids, segments


def write_synthetic(out, train=200, val=50, size=128, seed=0) -> None:
    """Write the synthetic shapes dataset under `out` in COCO panoptic format:

        out/{train,val}/images/000001.png     RGB images
        out/{train,val}/panoptic/000001.png   RGB-encoded segment ids
        out/{train,val}/panoptic.json         images, annotations (segments_info), categories
        out/{train,val}/instances.json        COCO instance format (RLE masks) of the things, for AP
        out/{train,val}/semantic/000001.png   contiguous class per pixel, 255 = void

    size: an int (square) or (height, width). The output is a function of the arguments alone
    (same seed -> same bytes); image i of a split draws from its own RNG stream (seed, split, i).
    """
    from pycocotools import mask as mask_util  # only the generator needs pycocotools

    H, W = (size, size) if isinstance(size, int) else tuple(size)
    contiguous = {c["id"]: k for k, c in enumerate(sorted(SYNTH_CATEGORIES, key=lambda c: c["id"]))}
    semantic_lut = np.full(max(contiguous) + 1, 255, dtype=np.uint8)  # category id -> contiguous
    for cat_id, k in contiguous.items():
        semantic_lut[cat_id] = k
    categories = [dict(c) for c in SYNTH_CATEGORIES]
    for split_code, (split, count) in enumerate((("train", train), ("val", val))):
        base = Path(out) / split
        for folder in ("images", "panoptic", "semantic"):
            (base / folder).mkdir(parents=True, exist_ok=True)
        images, annotations, instances = [], [], []
        for i in range(count):
            rng = np.random.default_rng([seed, split_code, i])
            image, ids, segments = synth_image(rng, H, W)
            name = f"{i + 1:06d}.png"
            Image.fromarray(image).save(base / "images" / name)
            Image.fromarray(ids_to_rgb(ids)).save(base / "panoptic" / name)
            Image.fromarray(np.where(ids > 0, semantic_lut[ids // 1000], 255).astype(np.uint8)).save(
                base / "semantic" / name)
            images.append({"id": i + 1, "file_name": name, "height": H, "width": W})
            annotations.append({"image_id": i + 1, "file_name": name, "segments_info": segments})
            for s in segments:
                if s["category_id"] not in {c["id"] for c in SYNTH_THINGS}:
                    continue
                rle = mask_util.encode(np.asfortranarray((ids == s["id"]).astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                instances.append({"id": len(instances) + 1, "image_id": i + 1, "category_id": s["category_id"],
                                  "segmentation": rle, "area": s["area"], "bbox": s["bbox"], "iscrowd": 0})
        info = {"description": f"synthetic shapes, {split}, seed {seed}", "version": "1.0"}
        with open(base / "panoptic.json", "w") as f:
            json.dump({"info": info, "images": images, "annotations": annotations, "categories": categories}, f)
        with open(base / "instances.json", "w") as f:
            json.dump({"info": info, "images": images, "annotations": instances,
                       "categories": [{k: c[k] for k in ("id", "name", "supercategory")} for c in SYNTH_THINGS]}, f)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (train/ and val/ are written inside)")
    parser.add_argument("--train", type=int, default=200, help="training images")
    parser.add_argument("--val", type=int, default=50, help="validation images")
    parser.add_argument("--size", type=int, nargs="+", default=[128], metavar="S", help="S (square) or H W")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if len(args.size) not in (1, 2) or min(args.size) < 16:
        parser.error(f"--size takes S or H W, each at least 16; got {args.size}")
    start = time.time()
    size = args.size[0] if len(args.size) == 1 else tuple(args.size)
    write_synthetic(Path(args.out), args.train, args.val, size, args.seed)
    print(f"wrote {args.train} train + {args.val} val images to {args.out} in {time.time() - start:.1f} s")


if __name__ == "__main__":
    sys.exit(run_command(main))
