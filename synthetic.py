"""The built-in synthetic shapes dataset, in COCO panoptic format, for the quick start and the tests.

    python synthetic.py --out datasets/synthetic [--train 200] [--val 50] [--size 128 | --size H W] [--seed 0]
        [--difficulty LO HI] [--objects LO HI] [--radius SMALL LARGE] [--occlusion LO HI]
        [--clutter LO HI] [--thin LO HI]

Images differ in difficulty the way real ones do. Each image draws a level t ~ U(difficulty LO, HI)
(default U(0, 1)), and each knob goes linearly from its first value at t = 0 (easy) to its second
at t = 1 (hard):

    objects    things asked for: LO + t (HI - LO), +-1 (default 0 -> 12). A crowded scene places
               fewer when no free spot is left.
    radius     object size, as fractions SMALL, LARGE of min(H, W): radii are log-uniform over the
               upper half of [SMALL, LARGE] (on a log scale) at t = 0, the lower half at t = 1
               (default 0.035 0.25: at 128, 12-32 px at t = 0, 4.5-12 px at t = 1).
    occlusion  the largest fraction of an earlier object that later ones may hide, also the
               chance that a new object is placed against an earlier one (default 0 -> 0.7;
               at 0 objects may only touch).
    clutter    0..1 (default 0 -> 1): distractor ellipses and thin wires that belong to the stuff
               they lie on (not targets), stuff texture up to twice as strong, the objects'
               colours pulled up to 35% towards the background, sensor noise from 3 to 10.
    thin       the chance that a ring or cross is drawn thin: 1.2-2.5 px wall or arms
               (default 0 -> 0.8).

With the defaults a third of the images (t < 1/3) are easy: 0-5 big objects (radius 9-32 px at
128), hiding at most 23% of each other, on nearly plain bands. A third (t > 2/3) are hard: 7-13
small objects (4.5-17 px), each of which later ones may hide by up to 47-70%, more than half the
rings and crosses thin, on clutter. A tiny model trained on CPU should get the first mostly right
and the second partly, so the per-image best ECO-M2F exit varies. Each image's knobs and what came
of them are recorded in its entry of "images" in panoptic.json, under "difficulty" (COCO readers
ignore extra fields): level, objects (asked), radius (px), occlusion, clutter, thin, things
(placed), distractors, wires, thin_ids (the thin segments), drawn_area (segment id -> the pixels
drawn for that thing before later ones covered part of it) and hidden (1 - visible / drawn, over
the things).

Every config that names no other dataset reads it from datasets/synthetic (config.DataConfig).
The output is a function of the arguments alone: the same arguments write the same bytes.
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
MIN_SEGMENT_AREA = 8  # px; smaller visible parts are not learnable targets
MIN_RADIUS = 3.0  # px; smaller shapes are a few pixels of aliasing

# The difficulty knobs and their defaults (the module docstring says what each does): the range
# of the level t, then each knob's value at t = 0 and at t = 1 (radius: SMALL, LARGE).
KNOBS = {"difficulty": (0.0, 1.0), "objects": (0.0, 12.0), "radius": (0.035, 0.25),
         "occlusion": (0.0, 0.7), "clutter": (0.0, 1.0), "thin": (0.0, 0.8)}


def draw_knobs(rng, H, W, knobs):
    """One image's difficulty: its level t and every knob's value at t (a dict, JSON-ready)."""
    t = float(rng.uniform(*knobs["difficulty"]))

    def at(name):
        lo, hi = knobs[name]
        return lo + t * (hi - lo)

    small, large = (math.log(f * min(H, W)) for f in knobs["radius"])
    middle = (small + large) / 2  # easy images take radii above it, hard ones below
    r_lo = max(MIN_RADIUS, math.exp(middle + t * (small - middle)))
    r_hi = max(r_lo, math.exp(large + t * (middle - large)))
    return {"level": t, "objects": max(0, math.floor(at("objects") + rng.uniform(-1, 1) + 0.5)),
            "radius": [r_lo, r_hi], "occlusion": at("occlusion"), "clutter": at("clutter"), "thin": at("thin")}


def synth_stuff(rng, H, W, texture=1.0):
    """1-3 stuff regions: bands (horizontal or vertical) with wavy boundaries, each textured,
    `texture` times the usual strength. Returns the category id per pixel (H, W), the image
    (H, W, 3) float and each stuff class's base colour."""
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
    colours = {}
    for c in classes:
        m = category == c["id"]
        base = np.array(c["color"], dtype=np.float64) + rng.uniform(-15, 15, size=3)
        colours[c["id"]] = base
        if c["name"] == "sky":  # a smooth vertical gradient, light at the bottom
            t = (yy[m] / H)[:, None]
            tex = base * (0.8 + 0.35 * t) + texture * rng.normal(0, 2, size=(m.sum(), 3))
        elif c["name"] == "grass":  # strong green-dominant pixel noise
            tex = base + texture * rng.normal(0, 22, size=(m.sum(), 1)) * np.array([0.5, 1.0, 0.4])
        else:  # wall: brick courses of two shades separated by light mortar lines
            period = rng.integers(6, 10)
            y = yy[m] + rng.integers(0, period)
            shade = np.where(y // period % 2 == 0, 1.0, 1.0 - 0.2 * texture)[:, None]
            mortar = (y % period < 1)[:, None]
            tex = np.where(mortar, np.array([200.0, 195, 185]), base * shade)
        image[m] = tex
    return category, image, colours


def draw_clutter(rng, image, clutter):
    """Distractors on the background, in place: ellipses (never round, so never a circle) of
    colours halfway between the stuff beneath and a random one, and straight wires 1-2 px wide.
    Both belong to the stuff they lie on. Returns (ellipses, wires) drawn."""
    H, W, _ = image.shape
    S = min(H, W)
    ellipses, wires = int(rng.poisson(10 * clutter)), int(rng.poisson(3 * clutter))
    for _ in range(ellipses):
        a = rng.uniform(0.03, 0.15) * S  # semi-axes a > b
        b = a * rng.uniform(0.2, 0.6)
        cy, cx, angle = rng.uniform(0, H), rng.uniform(0, W), rng.uniform(0, np.pi)
        y0, y1 = max(0, int(cy - a) - 1), min(H, int(cy + a) + 2)
        x0, x1 = max(0, int(cx - a) - 1), min(W, int(cx + a) + 2)
        dy, dx = np.mgrid[y0:y1, x0:x1] + 0.5
        dy, dx = dy - cy, dx - cx
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        m = (u / a) ** 2 + (v / b) ** 2 <= 1  # (h, w)
        under = image[min(int(cy), H - 1), min(int(cx), W - 1)]
        colour = 0.5 * under + 0.5 * rng.uniform(30, 230, size=3)
        image[y0:y1, x0:x1][m] = colour * (0.9 + 0.2 * (u[m] / a + 1) / 2)[:, None]  # a soft shade
    yy, xx = np.mgrid[0:H, 0:W] + 0.5
    for _ in range(wires):
        cy, cx, angle = rng.uniform(0, H), rng.uniform(0, W), rng.uniform(0, np.pi)
        m = np.abs(-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) <= rng.uniform(0.5, 1.0)  # (H, W)
        image[m] = rng.uniform(60, 200)  # grey
    return ellipses, wires


def synth_shape(kind, dy, dx, r, angle, width=None):
    """Boolean mask of a shape of size r centred at the origin, on pixel-centre offsets dy, dx.
    width: a ring's wall or a cross's arms, in px (None: the usual proportions)."""
    u = dx * np.cos(angle) + dy * np.sin(angle)  # rotated coordinates
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    d2 = dy**2 + dx**2
    if kind == "circle":
        return d2 <= r**2
    if kind == "ring":
        inner = 0.55 * r if width is None else r - width
        return (d2 <= r**2) & (d2 >= inner**2)
    if kind == "square":
        return (np.abs(u) <= 0.8 * r) & (np.abs(v) <= 0.8 * r)
    if kind == "triangle":  # equilateral, circumradius r: inside all three edges (inradius r / 2)
        normals = angle + np.pi / 3 + 2 * np.pi * np.arange(3) / 3
        return np.all(dx[..., None] * np.cos(normals) + dy[..., None] * np.sin(normals) <= r / 2, axis=-1)
    if kind == "cross":
        arm = 0.3 * r if width is None else width / 2
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


def synth_image(rng, H, W, knobs=KNOBS):
    """One synthetic image: (H, W, 3) uint8, (H, W) int64 segment ids, segments_info, and its
    difficulty (the knobs drawn for it and what came of them; the module docstring lists them)."""
    difficulty = draw_knobs(rng, H, W, knobs)
    occlusion, clutter = difficulty["occlusion"], difficulty["clutter"]
    category, image, stuff_colour = synth_stuff(rng, H, W, texture=1.0 + clutter)
    ellipses, wires = draw_clutter(rng, image, clutter)
    ids = category * 1000  # stuff segment id = category id * 1000
    owner = np.full((H, W), -1, dtype=np.int64)  # index of the thing on top of each pixel
    things = []  # per thing: (segment id, centre y, centre x, radius)
    drawn = np.zeros(0, dtype=np.int64)  # pixels drawn for each thing
    visible = np.zeros(0, dtype=np.int64)  # of those, the ones no later thing covers yet
    thin_ids = []
    per_class = {c["id"]: 0 for c in SYNTH_THINGS}
    log_r = [math.log(r) for r in difficulty["radius"]]
    for _ in range(difficulty["objects"]):
        cat = SYNTH_THINGS[int(rng.integers(len(SYNTH_THINGS)))]
        thin = cat["name"] in ("ring", "cross") and rng.random() < difficulty["thin"]
        width = rng.uniform(1.2, 2.5) if thin else None
        for _attempt in range(30):
            r = math.exp(rng.uniform(*log_r))
            if things and rng.random() < occlusion:  # against an earlier thing, so it likely overlaps
                _, y, x, r0 = things[int(rng.integers(len(things)))]
                d, phi = rng.uniform(0.3, 1.0) * (r + r0), rng.uniform(0, 2 * np.pi)
                cy, cx = y + d * math.sin(phi), x + d * math.cos(phi)
            else:
                cy, cx = rng.uniform(0, H), rng.uniform(0, W)
            angle = rng.uniform(0, 2 * np.pi)
            y0, y1 = max(0, int(cy - r) - 1), min(H, int(cy + r) + 2)
            x0, x1 = max(0, int(cx - r) - 1), min(W, int(cx + r) + 2)
            if y1 <= y0 or x1 <= x0:  # placed against a thing at the border, but outside the image
                continue
            dy, dx = np.mgrid[y0:y1, x0:x1] + 0.5
            dy, dx = dy - cy, dx - cx
            local = synth_shape(cat["name"], dy, dx, r, angle, width)  # (h, w) in the window
            area = int(local.sum())
            if area < max(12, MIN_SEGMENT_AREA):
                continue
            covered = owner[y0:y1, x0:x1][local]
            left = visible - np.bincount(covered[covered >= 0], minlength=len(things))
            # Every earlier thing keeps a learnable part, and at least 1 - occlusion of itself.
            if np.any(left < MIN_SEGMENT_AREA) or np.any(left < (1 - occlusion) * drawn):
                continue
            break
        else:
            continue  # no placement that keeps the earlier things visible enough
        per_class[cat["id"]] += 1
        seg_id = cat["id"] * 1000 + per_class[cat["id"]]
        # The class colour, jittered, and pulled towards the background under clutter (camouflage).
        background = stuff_colour[int(category[min(max(int(cy), 0), H - 1), min(max(int(cx), 0), W - 1)])]
        base = np.array(cat["color"], dtype=np.float64) * rng.uniform(0.85, 1.15) + rng.uniform(-20, 20, size=3)
        base = base + 0.35 * clutter * (background - base)
        window = (slice(y0, y1), slice(x0, x1))
        image[window][local] = synth_texture(cat["name"], dy, dx, r, angle, base)[local]
        ids[window][local] = seg_id
        owner[window][local] = len(things)
        things.append((seg_id, cy, cx, r))
        drawn, visible = np.append(drawn, area), np.append(left, area)
        if thin:
            thin_ids.append(seg_id)

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
    image = image + rng.normal(0, 3 + 7 * clutter, size=image.shape)  # sensor noise everywhere
    difficulty = {k: round(v, 4) if isinstance(v, float) else v for k, v in difficulty.items()}
    difficulty.update(radius=[round(r, 2) for r in difficulty["radius"]], things=len(things),
                      distractors=ellipses, wires=wires, thin_ids=thin_ids,
                      drawn_area={str(t[0]): int(a) for t, a in zip(things, drawn)},
                      hidden=round(1 - float(visible.sum()) / drawn.sum(), 4) if len(things) else 0.0)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), ids, segments, difficulty


def ids_to_rgb(ids):
    """int (H, W) segment ids -> uint8 (H, W, 3), id = R + 256 G + 256^2 B: data.ids_to_rgb's
    encoding, repeated here so that this command (and its --help) does not import torch."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def write_synthetic(out, train=200, val=50, size=128, seed=0, knobs=None) -> None:
    """Write the synthetic shapes dataset under `out` in COCO panoptic format:

        out/{train,val}/images/000001.png     RGB images
        out/{train,val}/panoptic/000001.png   RGB-encoded segment ids
        out/{train,val}/panoptic.json         images (with their "difficulty"), annotations, categories
        out/{train,val}/instances.json        COCO instance format (RLE masks) of the things, for AP
        out/{train,val}/semantic/000001.png   contiguous class per pixel, 255 = void

    size: an int (square) or (height, width). knobs: {name: (lo, hi)} over KNOBS (the defaults).
    The output is a function of the arguments alone (same arguments -> same bytes); image i of a
    split draws from its own RNG stream (seed, split, i).
    """
    from pycocotools import mask as mask_util  # only the generator needs pycocotools

    knobs = {**KNOBS, **{k: tuple(float(x) for x in v) for k, v in (knobs or {}).items()}}
    if set(knobs) != set(KNOBS):
        raise ValueError(f"unknown difficulty knobs {sorted(set(knobs) - set(KNOBS))}; known: {list(KNOBS)}")
    H, W = (size, size) if isinstance(size, int) else tuple(size)
    contiguous = {c["id"]: k for k, c in enumerate(sorted(SYNTH_CATEGORIES, key=lambda c: c["id"]))}
    semantic_lut = np.full(max(contiguous) + 1, 255, dtype=np.uint8)  # category id -> contiguous
    for cat_id, k in contiguous.items():
        semantic_lut[cat_id] = k
    categories = [dict(c) for c in SYNTH_CATEGORIES]
    thing_ids = {c["id"] for c in SYNTH_THINGS}
    for split_code, (split, count) in enumerate((("train", train), ("val", val))):
        base = Path(out) / split
        for folder in ("images", "panoptic", "semantic"):
            (base / folder).mkdir(parents=True, exist_ok=True)
        images, annotations, instances = [], [], []
        for i in range(count):
            rng = np.random.default_rng([seed, split_code, i])
            image, ids, segments, difficulty = synth_image(rng, H, W, knobs)
            name = f"{i + 1:06d}.png"
            Image.fromarray(image).save(base / "images" / name)
            Image.fromarray(ids_to_rgb(ids)).save(base / "panoptic" / name)
            Image.fromarray(np.where(ids > 0, semantic_lut[ids // 1000], 255).astype(np.uint8)).save(
                base / "semantic" / name)
            images.append({"id": i + 1, "file_name": name, "height": H, "width": W, "difficulty": difficulty})
            annotations.append({"image_id": i + 1, "file_name": name, "segments_info": segments})
            for s in segments:
                if s["category_id"] not in thing_ids:
                    continue
                rle = mask_util.encode(np.asfortranarray((ids == s["id"]).astype(np.uint8)))
                rle["counts"] = rle["counts"].decode("ascii")
                instances.append({"id": len(instances) + 1, "image_id": i + 1, "category_id": s["category_id"],
                                  "segmentation": rle, "area": s["area"], "bbox": s["bbox"], "iscrowd": 0})
        info = {"description": f"synthetic shapes, {split}, seed {seed}", "version": "2.0",
                "knobs": {k: list(v) for k, v in knobs.items()}}
        with open(base / "panoptic.json", "w") as f:
            json.dump({"info": info, "images": images, "annotations": annotations, "categories": categories}, f)
        with open(base / "instances.json", "w") as f:
            json.dump({"info": info, "images": images, "annotations": instances,
                       "categories": [{k: c[k] for k in ("id", "name", "supercategory")} for c in SYNTH_THINGS]}, f)


# Bounds of each knob's two values on the command line.
KNOB_BOUNDS = {"difficulty": (0, 1), "objects": (0, 100), "radius": (0.005, 0.5), "occlusion": (0, 0.95),
               "clutter": (0, 1), "thin": (0, 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[2:5]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (train/ and val/ are written inside)")
    parser.add_argument("--train", type=int, default=200, help="training images")
    parser.add_argument("--val", type=int, default=50, help="validation images")
    parser.add_argument("--size", type=int, nargs="+", default=[128], metavar="S", help="S (square) or H W")
    parser.add_argument("--seed", type=int, default=0)
    meaning = {"difficulty": "range of the per-image level t", "objects": "things asked for at t=0, t=1",
               "radius": "smallest, largest radius as fractions of min(H, W)",
               "occlusion": "largest hidden fraction at t=0, t=1", "clutter": "clutter at t=0, t=1",
               "thin": "chance of a thin ring or cross at t=0, t=1"}
    for name, default in KNOBS.items():
        parser.add_argument(f"--{name}", type=float, nargs=2, default=list(default), metavar=("A", "B"),
                            help=f"{meaning[name]} (default {default[0]:g} {default[1]:g})")
    args = parser.parse_args(argv)
    if len(args.size) not in (1, 2) or min(args.size) < 16:
        parser.error(f"--size takes S or H W, each at least 16; got {args.size}")
    for name, (lo, hi) in KNOB_BOUNDS.items():
        a, b = getattr(args, name)
        if not (lo <= a <= hi and lo <= b <= hi) or (name in ("difficulty", "radius") and a > b):
            order = ", the first at most the second" if name in ("difficulty", "radius") else ""
            parser.error(f"--{name} takes two values in [{lo:g}, {hi:g}]{order}; got {a:g} {b:g}")
    start = time.time()
    size = args.size[0] if len(args.size) == 1 else tuple(args.size)
    write_synthetic(Path(args.out), args.train, args.val, size, args.seed,
                    knobs={name: getattr(args, name) for name in KNOBS})
    print(f"wrote {args.train} train + {args.val} val images to {args.out} in {time.time() - start:.1f} s")


if __name__ == "__main__":
    sys.exit(run_command(main))
