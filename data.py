"""Data: COCO-panoptic datasets, Mask2Former's training augmentations, a resumable sampler, and
the processes that share the data out (torchrun). The built-in synthetic set is made by
synthetic.py.

Every dataset is read in COCO panoptic format: an image folder, a folder
of RGB-encoded id PNGs (id = R + 256 G + 256^2 B, 0 = void) and a JSON with `images`,
`annotations[].segments_info[]` and `categories[]`. Cityscapes is read after cityscapesscripts'
`createPanopticImgs` conversion (images may sit in per-city subfolders).

A sample is a dict:

    image     uint8 (3, H, W) RGB
    ids       int64 (H, W) panoptic segment ids, 0 = void (resized with nearest, never interpolated)
    segments  the segments_info entries of the JSON (id, category_id, iscrowd, area, bbox; area and
              bbox describe the stored image, not a transformed one)
    labels    int64 (n,) contiguous class of each non-crowd segment with pixels   (__getitem__ only)
    masks     bool (n, H, W) the pixels of those segments                         (__getitem__ only)
    image_id, file_name, pan_file_name, height, width (the ORIGINAL size, before any transform)

Augmentations are pure functions of (sample, torch.Generator): `TrainSampler` hands every item a
seed, so a training run's data is a function of (dataset, seed) alone, whatever the number of
loader workers, and resumes exactly from an item count.

`python data.py inspect --json X.json [--images DIR] [--panoptic DIR]` prints a split's classes,
image count and sizes, and one line per problem found in its files (exit status 1 if any).
"""
import argparse
import json
import os
import random
import sys
from pathlib import Path

from config import Config, DataConfig, SplitConfig, run_command, with_classes


def parse_args(argv=None):
    """The command line of `python data.py inspect`; needs no torch (see the __main__ line below)."""
    parser = argparse.ArgumentParser(description="Look at a COCO-panoptic dataset before training on it.")
    what = "a split's classes, image count and sizes, and one line per problem in its files (exit status 1 if any)"
    inspect = parser.add_subparsers(dest="command", required=True).add_parser("inspect", help=what, description=what)
    inspect.add_argument("--json", required=True, type=Path, help="the panoptic JSON")
    inspect.add_argument("--images", type=Path, help="image folder (default: images/ by the JSON, COCO's <split>/)")
    inspect.add_argument("--panoptic", type=Path, help="folder of the id PNGs (default: <JSON name>/ next to the "
                         "JSON or its folder, or panoptic/ next to it)")
    inspect.add_argument("--check-pngs", default="200", help="read the PNGs of this many images, spread evenly "
                         "(reading them is the slow part), or 'all' (default 200; 0: only check that they exist)")
    inspect.add_argument("--debug", action="store_true", help="show the whole traceback of an error")
    args = parser.parse_args(argv)
    if args.check_pngs != "all" and not args.check_pngs.isdigit():
        parser.error(f"--check-pngs: a number of images or 'all', got {args.check_pngs!r}")
    return args


if __name__ == "__main__":  # answer --help and argument errors before torch loads
    run_command(parse_args)

import numpy as np  # noqa: E402  (after the early answers above)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402
from tqdm import tqdm  # noqa: E402


class DataError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file."""


def dataset_root(root: str) -> Path:
    """DataConfig.root as a path: "" means $DETECTRON2_DATASETS, or ./datasets when that is unset."""
    if root:
        return Path(root)
    return Path(os.environ.get("DETECTRON2_DATASETS") or "datasets")


# ---- reading files ----------------------------------------------------------------------------


def read_json(path):
    path = Path(path)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: JSON file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read JSON file ({e.strerror or e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None


def read_image(path):
    """An image file as uint8 (3, H, W) RGB. Grayscale is replicated to 3 channels (16-bit grayscale
    scaled to 8 bits), alpha is dropped, palettes are expanded; the EXIF orientation is applied, as
    detectron2's read_image does (the annotations are in the orientation the image is displayed in)."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode == "P":  # a palette may carry transparency; expand it before dropping alpha
                img = img.convert("RGBA")
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: PIL's convert clips it to white
                gray = np.asarray(img, dtype=np.int64)
                if gray.size and (gray.min() < 0 or gray.max() > 65535):
                    raise DataError(f"{path}: {img.mode} image with values outside 0..65535; save it as 8 or 16 bit")
                array = np.repeat(((gray + 128) // 257).astype(np.uint8)[..., None], 3, axis=2)  # 0..65535 -> 0..255
            elif img.mode == "F":
                raise DataError(f"{path}: a floating-point image (mode F); save it as 8 or 16 bit")
            else:
                array = np.asarray(img.convert("RGB"))  # (H, W, 3)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))  # (3, H, W)


def read_panoptic_png(path):
    """A COCO panoptic PNG as int64 (H, W) segment ids: R + 256 G + 256^2 B."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("RGB", "RGBA"):
                raise DataError(f"{path}: panoptic PNG must be RGB-encoded ids (mode RGB), got mode {img.mode}")
            array = np.asarray(img.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{path}: panoptic PNG not found") from None
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read panoptic PNG ({e})") from None
    rgb = torch.from_numpy(array.astype(np.int64))  # (H, W, 3)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def ids_to_rgb(ids):
    """int (H, W) segment ids -> uint8 (H, W, 3) numpy, the inverse of read_panoptic_png."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


# ---- the dataset ------------------------------------------------------------------------------


def parse_categories(categories, where):
    """The `categories` of a panoptic JSON in contiguous order (sorted by id, the project's rule),
    each {"id", "name", "isthing"} plus "color" when the JSON has one."""
    parsed = []
    for n, c in enumerate(categories):
        if not isinstance(c, dict) or any(k not in c for k in ("id", "name", "isthing")):
            raise DataError(f"{where}: categories[{n}] needs 'id', 'name' and 'isthing', got {c!r}")
        entry = {"id": int(c["id"]), "name": str(c["name"]), "isthing": bool(c["isthing"])}
        if "color" in c:
            entry["color"] = c["color"]
        parsed.append(entry)
    if len({c["id"] for c in parsed}) != len(parsed):
        raise DataError(f"{where}: duplicate category ids")
    return sorted(parsed, key=lambda c: c["id"])


def dataset_classes(json_path):
    """The classes of a panoptic JSON file, in contiguous order (see parse_categories)."""
    data = read_json(json_path)
    if not isinstance(data, dict) or not isinstance(data.get("categories"), list):
        raise DataError(f"{json_path}: no 'categories' list (COCO panoptic format needs one)")
    return parse_categories(data["categories"], json_path)


class PanopticDataset(torch.utils.data.Dataset):
    """One split in COCO panoptic format.

    Attributes: categories (contiguous order = sorted by dataset id; each {"id", "name",
    "isthing"} plus "color" when the JSON has one), contiguous (dataset id -> contiguous id),
    thing_classes (contiguous ids of the things), num_classes, images (the JSON image entries
    in JSON order), json_file, image_dir, panoptic_dir, instances_json (None when not set).

    An image that has no entry in `annotations` is kept, with no segments and all pixels void
    (its PNG is not read). Annotations of image ids not in `images` are ignored.
    """

    def __init__(self, split: SplitConfig, root, transform=None):
        root = Path(root)
        if not split.json:
            raise DataError(f"split {split}: the panoptic JSON path ('json') is empty")
        self.split = split
        self.transform = transform
        self.json_file = root / split.json
        self.image_dir = root / split.images
        self.panoptic_dir = root / split.panoptic
        self.instances_json = root / split.instances if split.instances else None

        data = read_json(self.json_file)
        where = self.json_file
        if not isinstance(data, dict):
            raise DataError(f"{where}: the top level must be an object with images, annotations, categories")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise DataError(f"{where}: missing or non-list key '{key}' (COCO panoptic format needs it)")
        for folder, what in ((self.image_dir, "image folder"), (self.panoptic_dir, "panoptic PNG folder")):
            if not folder.is_dir():
                raise DataError(f"{folder}: {what} of {where} does not exist")

        self.categories = parse_categories(data["categories"], where)
        self.contiguous = {c["id"]: k for k, c in enumerate(self.categories)}
        self.thing_classes = [k for k, c in enumerate(self.categories) if c["isthing"]]
        self.num_classes = len(self.categories)

        self.images = data["images"]
        if not self.images:
            raise DataError(f"{where}: the split has no images")
        first = {}  # image id -> its index in `images`: two entries of one id would mix their labels
        for n, img in enumerate(self.images):
            if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
                raise DataError(f"{where}: images[{n}] needs 'id' and 'file_name', got {img!r}")
            if img["id"] in first:
                raise DataError(f"{where}: images[{first[img['id']]}] and images[{n}] have the same id {img['id']}")
            first[img["id"]] = n
        by_image = {}
        for n, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("segments_info"), list):
                raise DataError(f"{where}: annotations[{n}] needs 'image_id' and a 'segments_info' list")
            if ann["image_id"] in by_image:
                raise DataError(f"{where}: two annotations for image_id {ann['image_id']}")
            for s in ann["segments_info"]:
                if not isinstance(s, dict) or "id" not in s or "category_id" not in s:
                    raise DataError(f"{where}: a segment of image_id {ann['image_id']} needs 'id' and "
                                    f"'category_id', got {s!r}")
                if s["category_id"] not in self.contiguous:
                    raise DataError(f"{where}: segment {s['id']} of image_id {ann['image_id']} has "
                                    f"category_id {s['category_id']}, which is not in categories")
                if s["id"] == 0:
                    raise DataError(f"{where}: image_id {ann['image_id']} has a segment with id 0 (0 is void)")
            by_image[ann["image_id"]] = ann
        self.annotations = [by_image.get(img["id"]) for img in self.images]  # aligned with images; None = none

    def __len__(self):
        return len(self.images)

    def find_image(self, file_name):
        """images/<file_name>, else images/<city>/<file_name> (Cityscapes: the city is the file
        name's first '_' field)."""
        path = self.image_dir / file_name
        if path.is_file():
            return path
        city = self.image_dir / file_name.split("_")[0] / file_name
        if city.is_file():
            return city
        raise DataError(f"{path}: image file not found (also looked for {city}); listed in {self.json_file}")

    def load(self, i) -> dict:
        """Sample i as stored: the image, the id map and the segments, no transform, no targets."""
        info = self.images[i]
        ann = self.annotations[i]
        path = self.find_image(info["file_name"])
        image = read_image(path)  # (3, H, W)
        H, W = image.shape[1:]
        if (info.get("height", H), info.get("width", W)) != (H, W):
            raise DataError(f"{path}: image is {H}x{W} but {self.json_file} says "
                            f"{info.get('height')}x{info.get('width')} (height x width)")
        if ann is None:
            pan_file_name, segments = "", []
            ids = torch.zeros(H, W, dtype=torch.int64)
        else:
            pan_file_name = ann.get("file_name") or Path(info["file_name"]).stem + ".png"
            png = self.panoptic_dir / pan_file_name
            ids = read_panoptic_png(png)  # (H, W)
            if tuple(ids.shape) != (H, W):
                raise DataError(f"{png}: panoptic PNG is {ids.shape[0]}x{ids.shape[1]} but its image {path} "
                                f"is {H}x{W}")
            segments = [dict(s) for s in ann["segments_info"]]
            known = {s["id"] for s in segments}
            if len(known) != len(segments):
                raise DataError(f"{self.json_file}: image_id {info['id']} lists a segment id twice")
            unknown = sorted(set(torch.unique(ids).tolist()) - known - {0})
            if unknown:
                raise DataError(f"{png}: segment id(s) {unknown[:10]} are in the PNG but not in the "
                                f"segments_info of image_id {info['id']} in {self.json_file}")
            # segments_info ids absent from the PNG are allowed: they have no pixels, no target.
        return {"image": image, "ids": ids, "segments": segments, "image_id": info["id"],
                "file_name": info["file_name"], "pan_file_name": pan_file_name, "height": H, "width": W}

    def __getitem__(self, item) -> dict:
        """item: an index, or (index, seed) from TrainSampler. The seed drives the augmentation, so
        the output is a function of (index, seed) alone. A bare index augments with a seed drawn
        from the global torch RNG (the usual PyTorch behaviour)."""
        i, seed = item if isinstance(item, (tuple, list)) else (item, None)
        sample = self.load(int(i))
        if self.transform is not None:
            if seed is None:
                seed = int(torch.randint(0, 2**62, ()))
            sample = self.transform(sample, torch.Generator().manual_seed(int(seed)))
        sample["labels"], sample["masks"] = panoptic_targets(sample["ids"], sample["segments"], self.contiguous)
        return sample


def panoptic_targets(ids, segments, contiguous):
    """Training targets from an id map: (n,) contiguous labels and (n, H, W) bool masks of the
    non-crowd segments that have pixels (crowd regions are ignored in training, as officially)."""
    kept = [s for s in segments if not s.get("iscrowd", 0)]
    seg_ids = torch.tensor([s["id"] for s in kept], dtype=torch.int64)  # (n,)
    labels = torch.tensor([contiguous[s["category_id"]] for s in kept], dtype=torch.int64)  # (n,)
    masks = ids[None] == seg_ids[:, None, None]  # (n, H, W)
    present = masks.flatten(1).any(1)  # a crop or a resize can remove a segment entirely
    return labels[present], masks[present]


# ---- transforms -------------------------------------------------------------------------------
#
# Each transform is `t(sample, generator) -> sample` on the "image" (3, H, W) uint8 and the "ids"
# (H, W) int64 of a sample; everything else passes through. Random numbers come only from the
# generator. Geometry follows detectron2 (the official Mask2Former data pipeline): bilinear with
# antialiasing (= PIL's BILINEAR, which detectron2 uses) for the image, PIL-style nearest (the
# input pixel under each output pixel's centre) for the ids, so both stay aligned.


def uniform(generator, low, high):
    return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()


def randint(generator, low, high):
    """An integer in [low, high)."""
    return int(torch.randint(low, high, (), generator=generator))


def nearest_index(n_in, n_out):
    """For each of n_out output pixels, the input pixel under its centre (PIL NEAREST, torch
    'nearest-exact'): (n_out,) int64."""
    centres = (torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out)
    return centres.floor().long().clamp(max=n_in - 1)


def resize(sample, size):
    """Resize to size = (h, w): bilinear image, nearest ids."""
    h, w = size
    H, W = sample["ids"].shape
    if (h, w) == (H, W):
        return sample
    image = F.interpolate(sample["image"][None].float(), size=(h, w), mode="bilinear",
                          align_corners=False, antialias=True)[0]  # (3, h, w)
    rows, cols = nearest_index(H, h), nearest_index(W, w)
    ids = sample["ids"][rows[:, None], cols[None, :]]  # (h, w)
    return {**sample, "image": image.round().clamp(0, 255).to(torch.uint8), "ids": ids}


def crop(sample, y0, x0, h, w):
    """The window [y0, y0 + h) x [x0, x0 + w), clipped to the image."""
    return {**sample, "image": sample["image"][:, y0:y0 + h, x0:x0 + w], "ids": sample["ids"][y0:y0 + h, x0:x0 + w]}


def pad(sample, h, w, image_value=128, ids_value=0):
    """Pad at the bottom/right to at least (h, w). The ids are padded with 0 = void, so padded
    pixels belong to no segment."""
    H, W = sample["ids"].shape
    if H >= h and W >= w:
        return sample
    h, w = max(h, H), max(w, W)
    image = sample["image"].new_full((3, h, w), image_value)
    image[:, :H, :W] = sample["image"]
    ids = sample["ids"].new_full((h, w), ids_value)
    ids[:H, :W] = sample["ids"]
    return {**sample, "image": image, "ids": ids}


def hflip(sample):
    return {**sample, "image": sample["image"].flip(-1), "ids": sample["ids"].flip(-1)}


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, sample, generator):
        for t in self.transforms:
            sample = t(sample, generator)
        return sample

    def __repr__(self):
        return f"Compose({self.transforms})"


class RandomFlip:
    """Horizontal flip with probability `prob`."""

    def __init__(self, prob=0.5):
        self.prob = prob

    def __call__(self, sample, generator):
        return hflip(sample) if uniform(generator, 0.0, 1.0) < self.prob else sample

    def __repr__(self):
        return f"RandomFlip({self.prob})"


class ResizeScale:
    """detectron2 ResizeScale: draw s ~ U(min_scale, max_scale) and resize, keeping the aspect
    ratio, to the largest size that fits in the box (s * target_h, s * target_w)."""

    def __init__(self, min_scale, max_scale, target_h, target_w):
        self.min_scale, self.max_scale, self.target_h, self.target_w = min_scale, max_scale, target_h, target_w

    def __call__(self, sample, generator):
        s = uniform(generator, self.min_scale, self.max_scale)
        H, W = sample["ids"].shape
        factor = min(s * self.target_h / H, s * self.target_w / W)
        # round() is round-half-even, as detectron2's np.round.
        return resize(sample, (max(1, round(H * factor)), max(1, round(W * factor))))

    def __repr__(self):
        return f"ResizeScale({self.min_scale}, {self.max_scale}, {self.target_h}, {self.target_w})"


class FixedSizeCrop:
    """detectron2 FixedSizeCrop: if the image is larger than crop_size, crop a window at offset
    round(u * (size - crop)) with ONE u ~ U(0, 1) shared by both axes (as detectron2 does); then
    pad the bottom/right up to crop_size (image 128, ids 0 = void)."""

    def __init__(self, crop_size, pad_value=128):
        self.crop_h, self.crop_w = crop_size
        self.pad_value = pad_value

    def __call__(self, sample, generator):
        H, W = sample["ids"].shape
        u = uniform(generator, 0.0, 1.0)
        y0, x0 = round(max(H - self.crop_h, 0) * u), round(max(W - self.crop_w, 0) * u)
        sample = crop(sample, y0, x0, self.crop_h, self.crop_w)
        return pad(sample, self.crop_h, self.crop_w, self.pad_value)

    def __repr__(self):
        return f"FixedSizeCrop(({self.crop_h}, {self.crop_w}))"


def shortest_edge_size(h, w, short, max_size):
    """detectron2 ResizeShortestEdge.get_output_shape: the short side to `short`, unless the long
    side would then exceed max_size, in which case the long side to max_size. Never below 1 pixel:
    a 3x2000 strip would otherwise lose its short side entirely."""
    scale = short / min(h, w)
    newh, neww = (short, scale * w) if h < w else (scale * h, short)
    if max(newh, neww) > max_size:
        scale = max_size / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return max(1, int(newh + 0.5)), max(1, int(neww + 0.5))


class ResizeShortestEdge:
    """detectron2 ResizeShortestEdge with "choice" sampling: the short side is one of `shorts`,
    chosen uniformly (one value = deterministic, the test-time resize)."""

    def __init__(self, shorts, max_size):
        self.shorts, self.max_size = list(shorts), max_size

    def __call__(self, sample, generator):
        short = self.shorts[0] if len(self.shorts) == 1 else self.shorts[randint(generator, 0, len(self.shorts))]
        H, W = sample["ids"].shape
        return resize(sample, shortest_edge_size(H, W, short, self.max_size))

    def __repr__(self):
        return f"ResizeShortestEdge({self.shorts}, {self.max_size})"


class RandomCrop:
    """detectron2 RandomCrop("absolute", crop_size): a uniformly placed window of
    min(crop, size) per axis; a smaller image is then padded bottom/right to crop_size."""

    def __init__(self, crop_size, pad_value=128):
        self.crop_h, self.crop_w = crop_size
        self.pad_value = pad_value

    def __call__(self, sample, generator):
        H, W = sample["ids"].shape
        h, w = min(H, self.crop_h), min(W, self.crop_w)
        y0 = randint(generator, 0, H - h + 1)
        x0 = randint(generator, 0, W - w + 1)
        return pad(crop(sample, y0, x0, h, w), self.crop_h, self.crop_w, self.pad_value)

    def __repr__(self):
        return f"RandomCrop(({self.crop_h}, {self.crop_w}))"


def rgb_to_hsv(rgb):
    """float (3, H, W) RGB in [0, 1] -> hue (in turns, [0, 1)), saturation, value, each (H, W)."""
    r, g, b = rgb
    v = rgb.amax(0)
    delta = v - rgb.amin(0)
    s = torch.where(v > 0, delta / v.clamp(min=1e-12), torch.zeros_like(v))
    d = delta.clamp(min=1e-12)
    h = torch.where(v == r, ((g - b) / d) % 6, torch.where(v == g, (b - r) / d + 2, (r - g) / d + 4))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    return h, s, v


def hsv_to_rgb(h, s, v):
    """The inverse of rgb_to_hsv: (3, H, W) RGB in [0, 1]."""
    h6 = (h % 1.0) * 6
    sector = h6.floor().long().clamp(max=5)  # (H, W) in 0..5
    f = h6 - sector
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))

    def pick(*per_sector):  # the value of each pixel's sector
        return torch.stack(per_sector).gather(0, sector[None])[0]

    return torch.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)])


class ColorAugSSD:
    """The SSD photometric distortion of Mask2Former's ColorAugSSDTransform (Cityscapes): a
    brightness shift (delta 32), then contrast (0.5-1.5) before or after (coin flip) saturation
    (x 0.5-1.5) and a hue shift (+-18 in OpenCV's 0-180 hue units, i.e. +-36 degrees); each step
    happens with probability 0.5. The official code goes through OpenCV's 8-bit HSV; we convert in
    float and quantise to uint8 after every step, as it does (brightness/contrast truncate)."""

    def __init__(self, brightness_delta=32, contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue_delta=18):
        self.brightness_delta, self.contrast_range = brightness_delta, contrast
        self.saturation_range, self.hue_delta = saturation, hue_delta

    def __call__(self, sample, generator):
        img = sample["image"].float()  # (3, H, W) 0-255
        def coin():
            return randint(generator, 0, 2) == 1

        if coin():
            img = (img + uniform(generator, -self.brightness_delta, self.brightness_delta)).clamp(0, 255).floor()
        if coin():
            steps = (self.contrast, self.saturation, self.hue)
        else:
            steps = (self.saturation, self.hue, self.contrast)
        for step in steps:
            if coin():
                img = step(img, generator)
        return {**sample, "image": img.to(torch.uint8)}

    def contrast(self, img, generator):
        return (img * uniform(generator, *self.contrast_range)).clamp(0, 255).floor()

    def saturation(self, img, generator):
        h, s, v = rgb_to_hsv(img / 255)
        s = (s * uniform(generator, *self.saturation_range)).clamp(0, 1)
        return (hsv_to_rgb(h, s, v) * 255).round()

    def hue(self, img, generator):
        h, s, v = rgb_to_hsv(img / 255)
        shift = randint(generator, -self.hue_delta, self.hue_delta + 1) / 180  # OpenCV units -> turns
        return (hsv_to_rgb(h + shift, s, v) * 255).round()

    def __repr__(self):
        return "ColorAugSSD()"


def cityscapes_short_sides(short_side):
    """The short-side choices of the Cityscapes recipe. The official list is
    [int(x * 0.1 * 1024) for x in range(5, 21)] = 512, 614, ..., 2048 (16 values); for another
    [low, high] we take 16 evenly spaced values (rounded, duplicates removed)."""
    low, high = short_side
    if (low, high) == (512, 2048):
        return [int(x * 0.1 * 1024) for x in range(5, 21)]
    return sorted({round(low + (high - low) * k / 15) for k in range(16)})


def build_transform(cfg: DataConfig, *, train: bool):
    """The augmentation of the official recipes.

    train, augment "lsj" (COCO): RandomFlip, ResizeScale(min_scale, max_scale, crop), FixedSizeCrop(crop).
    train, "cityscapes": ResizeShortestEdge(short sides, max_size), RandomCrop(crop),
        ColorAugSSD (if color_jitter), RandomFlip -- the order of the official mapper.
    train, "none": RandomFlip.
    test: ResizeShortestEdge(test_short_side, test_max_size); None when test_short_side <= 0.
    """
    if len(cfg.crop_size) != 2 or min(cfg.crop_size) <= 0:
        raise DataError(f"data.crop_size must be [height, width] > 0, got {cfg.crop_size}")
    if not train:
        return ResizeShortestEdge([cfg.test_short_side], cfg.test_max_size) if cfg.test_short_side > 0 else None
    if cfg.augment == "lsj":
        return Compose([RandomFlip(), ResizeScale(cfg.min_scale, cfg.max_scale, *cfg.crop_size),
                        FixedSizeCrop(cfg.crop_size)])
    if cfg.augment == "cityscapes":
        if len(cfg.short_side) != 2 or not 0 < cfg.short_side[0] <= cfg.short_side[1]:
            raise DataError(f"data.short_side must be [low, high] with 0 < low <= high, got {cfg.short_side}")
        return Compose([ResizeShortestEdge(cityscapes_short_sides(cfg.short_side), cfg.max_size),
                        RandomCrop(cfg.crop_size), *([ColorAugSSD()] if cfg.color_jitter else []), RandomFlip()])
    if cfg.augment == "none":
        return RandomFlip()
    raise DataError(f"data.augment must be lsj, cityscapes or none, got {cfg.augment!r}")


# ---- sampling and loading ---------------------------------------------------------------------


class TrainSampler(torch.utils.data.Sampler):
    """An infinite, deterministic stream of (dataset index, sample seed) for iteration-based
    training that resumes exactly.

    The global stream is epoch 0, 1, 2, ... where epoch e is torch.randperm(size) under a
    generator seeded with seed + e. Element k of the global stream goes to rank k % world_size,
    with sample seed = seed * 1_000_003 + k (unique per element of a run; it seeds the
    augmentation of that element). `start` is the number of items this rank has already
    consumed: the stream restarts exactly at its next item, across epoch boundaries.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        if size <= 0:
            raise ValueError(f"TrainSampler: the dataset is empty (size {size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"TrainSampler: rank {rank} is not in [0, world_size={world_size})")
        if start < 0:
            raise ValueError(f"TrainSampler: start must be >= 0, got {start}")
        self.size, self.seed, self.rank, self.world_size, self.start = size, seed, rank, world_size, start

    def __iter__(self):
        k = self.start * self.world_size + self.rank  # global position of this rank's next item
        epoch, order = -1, None
        while True:
            e, pos = divmod(k, self.size)
            if e != epoch:
                epoch, order = e, torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + e))
            yield int(order[pos]), self.seed * 1_000_003 + k
            k += self.world_size


def collate(batch: list[dict]) -> list[dict]:
    """The list of samples as is: images differ in size and the model pads them itself."""
    return batch


def seed_worker(worker_id):
    """Seed numpy and `random` in a loader worker from torch's per-worker seed (which the
    DataLoader derives from its generator). Our augmentation does not use any of them: this only
    keeps third-party code in a transform deterministic."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def build_dataset(cfg: DataConfig, *, split: str, train: bool) -> PanopticDataset:
    """The dataset of data.<split> (split "train" or "val") under dataset_root(cfg.root), with the
    training augmentation (train=True) or the test-time resize (train=False)."""
    if split not in ("train", "val"):
        raise ValueError(f"build_dataset: split must be 'train' or 'val', got {split!r}")
    return PanopticDataset(getattr(cfg, split), dataset_root(cfg.root), build_transform(cfg, train=train))


def check_classes(dataset, model_cfg, where):
    """The model's classes (of the config `where`) must be the dataset's; unset ones are (with_classes)."""
    with_classes(Config(model=model_cfg), dataset.categories, where, dataset.json_file)


def with_dataset_classes(cfg, split="train"):
    """`cfg` with the classes it leaves unset taken from data.<split>.json (config.with_classes)."""
    path = dataset_root(cfg.data.root) / getattr(cfg.data, split).json
    return with_classes(cfg, dataset_classes(path), "the config", path)


def setup_distributed():
    """(rank, world_size, device) for a plain run or a torchrun launch (nccl on GPU, gloo on CPU):
    the processes that share out a dataset (TrainSampler, derive.py's shards)."""
    import torch.distributed as dist

    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def check_device(name):
    """A --device value as a torch.device, or a ValueError saying what this machine has."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device name (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise ValueError(f"--device {name}: this machine has {count} CUDA device(s); use cpu"
                             + (f" or cuda:0..{count - 1}" if count else ""))
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda are supported")
    return device


def distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def build_train_loader(cfg: DataConfig, dataset, *, batch_size_per_rank: int, seed: int, rank: int,
                       world_size: int, start: int) -> torch.utils.data.DataLoader:
    """An infinite loader of lists of samples for this rank; `start` = items this rank has
    consumed (iteration x batch_size_per_rank) to resume exactly."""
    sampler = TrainSampler(len(dataset), seed, rank, world_size, start)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size_per_rank, sampler=sampler, num_workers=cfg.workers, collate_fn=collate,
        persistent_workers=cfg.workers > 0, worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(seed * 1_000_003 + rank))


# ---- python data.py inspect ---------------------------------------------------------------------


def image_problems(info, ann, image_dir, panoptic_dir, read_png, counts):
    """One image of inspect_dataset: its (height, width) or None, and its problems; counts its segments."""
    name = info["file_name"]
    path = next((p for p in (image_dir / name, image_dir / name.split("_")[0] / name) if p.is_file()), None)
    if path is None:
        return None, [f"{image_dir / name}: image file not found (image_id {info['id']})"]
    try:
        with Image.open(path) as img:  # the header only; as displayed (90-degree EXIF orientations swap h and w)
            size = img.size if img.getexif().get(0x0112) in (5, 6, 7, 8) else img.size[::-1]
    except (OSError, SyntaxError, ValueError) as e:
        return None, [f"{path}: cannot read image ({e})"]
    found = [] if (info.get("height", size[0]), info.get("width", size[1])) == size else [
        f"{path}: image is {size[0]}x{size[1]} but the JSON says {info.get('height')}x{info.get('width')}"]
    if ann is None or not ann["segments_info"]:
        return size, found + [f"{path}: empty image: no segments in the JSON (image_id {info['id']})"]
    for seg in ann["segments_info"]:
        if seg.get("category_id") in counts:
            counts[seg["category_id"]] += 1
        else:
            found.append(f"segment {seg.get('id')} of image_id {info['id']} in the JSON: category_id "
                         f"{seg.get('category_id')} is not in categories")
    png = panoptic_dir / (ann.get("file_name") or Path(name).stem + ".png")
    if not png.is_file() or not read_png:
        return size, found + ([] if png.is_file() else [f"{png}: panoptic PNG not found (image_id {info['id']})"])
    ids = read_panoptic_png(png)  # a DataError if unreadable
    in_png, in_json = set(torch.unique(ids).tolist()) - {0}, {seg.get("id") for seg in ann["segments_info"]}
    if tuple(ids.shape) != size:
        found.append(f"{png}: the PNG is {ids.shape[0]}x{ids.shape[1]}, its image {size[0]}x{size[1]}")
    if in_png - in_json:
        found.append(f"{png}: segment ids {sorted(in_png - in_json)[:10]} are in the PNG, not in the JSON")
    if in_json - in_png:
        found.append(f"{png}: segment ids {sorted(in_json - in_png)[:10]} of the JSON have no pixels")
    return size, found


def usual_folders(j, image_dir=None, panoptic_dir=None):
    """The image and PNG folders of the JSON `j`: given, or the first usual one (images/, panoptic/, COCO's)."""
    usual = {"--images": [j.parent / "images", j.parent.parent / j.stem.removeprefix("panoptic_")],
             "--panoptic": [j.parent / j.stem, j.parent.parent / j.stem, j.parent / "panoptic"]}
    folders = []
    for option, given in (("--images", image_dir), ("--panoptic", panoptic_dir)):
        candidates = [Path(given)] if given else usual[option]
        folders.append(next((f for f in candidates if f.is_dir()), None))
        if folders[-1] is None:
            raise DataError(f"{' or '.join(map(str, candidates))}: no such folder; give {option}")
    return folders


def inspect_dataset(json_path, image_dir=None, panoptic_dir=None, check_pngs=None):
    """Print a panoptic split's classes, image count and sizes, and one line per problem found in
    its files; return the problems. The folders: see usual_folders. check_pngs: read the PNGs of
    this many images, spread evenly, and compare them with the JSON (None: all of them)."""
    json_path, data = Path(json_path), read_json(json_path)
    image_dir, panoptic_dir = usual_folders(json_path, image_dir, panoptic_dir)
    if not (isinstance(data, dict) and all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories"))):
        raise DataError(f"{json_path}: needs 'images', 'annotations' and 'categories' lists (COCO panoptic format)")
    classes, images = parse_categories(data["categories"], json_path), data["images"]
    if any(not isinstance(img, dict) or "id" not in img or "file_name" not in img for img in images):
        raise DataError(f"{json_path}: every entry of 'images' needs 'id' and 'file_name'")
    problems, by_image, seen = [], {}, {img["id"] for img in images}
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or not isinstance(ann.get("segments_info"), list):
            problems.append(f"{json_path}: an annotation without a 'segments_info' list: {str(ann)[:80]}")
        elif ann.get("image_id") in by_image:
            problems.append(f"{json_path}: two annotations for image_id {ann['image_id']}")
        else:
            by_image[ann.get("image_id")] = ann
    if len(seen) < len(images):
        problems.append(f"{json_path}: {len(images) - len(seen)} entries of 'images' repeat an id")
    problems += [f"{json_path}: annotations of image_id {i}, which is not in 'images'" for i in set(by_image) - seen]
    n = min(len(images), len(images) if check_pngs is None else check_pngs)
    read = {round(k * (len(images) - 1) / max(n - 1, 1)) for k in range(n)}  # n images spread evenly
    counts, sizes = {c["id"]: 0 for c in classes}, []
    for i, info in enumerate(tqdm(images, desc=f"inspect {json_path.name}", unit="image", dynamic_ncols=True)):
        try:
            size, found = image_problems(info, by_image.get(info["id"]), image_dir, panoptic_dir, i in read, counts)
        except DataError as e:  # an unreadable PNG
            size, found = None, [str(e)]
        sizes, problems = sizes + [size] * (size is not None), problems + found
    things = sum(c["isthing"] for c in classes)
    print(f"{json_path}: {len(classes)} classes ({things} things, {len(classes) - things} stuff), {len(images)} "
          f"images, {sum(counts.values())} segments\n  class     id  kind   segments  name")
    for k, c in enumerate(classes):
        print(f"  {k:5d} {c['id']:6d}  {'thing' if c['isthing'] else 'stuff'} {counts[c['id']]:10d}  {c['name']}")
    if sizes:
        (h, w), mid = map(sorted, zip(*sizes)), len(sizes) // 2
        print(f"image sizes (min / median / max): height {h[0]} / {h[mid]} / {h[-1]}, width {w[0]} / {w[mid]} / {w[-1]}")
    print(f"PNGs read and compared with the JSON: those of {len(read)} of {len(images)} images")
    print("".join(f"problem: {line}\n" for line in problems) + f"{len(problems) or 'no'} problem(s) found")
    return problems


def main(argv=None):
    args = parse_args(argv)
    check = None if args.check_pngs == "all" else int(args.check_pngs)
    return 1 if inspect_dataset(args.json, args.images, args.panoptic, check) else 0


if __name__ == "__main__":
    sys.exit(run_command(main))
