"""data.py: COCO-panoptic reading, targets, augmentations, the sampler, the loader, and the
synthetic dataset."""
import hashlib
import itertools
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import synthetic
from config import DataConfig, SplitConfig, load_config
from conftest import COCO_SAMPLE, ROOT
from data import DataError, PanopticDataset

SYNTH_SPLIT = {split: SplitConfig(f"{split}/images", f"{split}/panoptic", f"{split}/panoptic.json",
                                  f"{split}/instances.json") for split in ("train", "val")}


@pytest.fixture(scope="module")
def coco():
    return PanopticDataset(SplitConfig("images", "panoptic", "panoptic.json"), COCO_SAMPLE)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synthetic.write_synthetic(out, train=200, val=20, size=128, seed=0)
    return out


def check_targets(sample, contiguous):
    """labels/masks are exactly the non-crowd segments with pixels, in segments_info order."""
    kept = [s for s in sample["segments"] if not s.get("iscrowd", 0) and (sample["ids"] == s["id"]).any()]
    H, W = sample["ids"].shape
    assert sample["labels"].dtype == torch.int64 and sample["masks"].dtype == torch.bool
    assert sample["masks"].shape == (len(kept), H, W)
    assert sample["labels"].tolist() == [contiguous[s["category_id"]] for s in kept]
    for mask, s in zip(sample["masks"], kept):
        assert torch.equal(mask, sample["ids"] == s["id"])
    assert sample["masks"].sum(0).max() <= 1  # disjoint
    return kept


# ---- the real COCO sample ---------------------------------------------------------------------


def test_coco_sample_categories(coco):
    assert coco.num_classes == 133 and len(coco.categories) == 133
    ids = [c["id"] for c in coco.categories]
    assert ids == sorted(ids)
    assert coco.contiguous == {i: k for k, i in enumerate(ids)}
    assert coco.thing_classes == list(range(80))  # COCO things (ids 1..90) come first
    assert coco.thing_classes == load_config(ROOT / "configs/coco/m2f_r50.yaml").model.thing_classes
    assert all(set(c) >= {"id", "name", "isthing"} and isinstance(c["isthing"], bool) for c in coco.categories)


def test_coco_sample_targets(coco):
    assert len(coco) == 2
    crowd_total = 0
    for i in range(len(coco)):
        s = coco[i]
        info = coco.images[i]
        assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, info["height"], info["width"])
        assert s["ids"].dtype == torch.int64 and s["ids"].shape == (info["height"], info["width"])
        assert (s["height"], s["width"], s["image_id"]) == (info["height"], info["width"], info["id"])
        kept = check_targets(s, coco.contiguous)
        assert ((s["labels"] >= 0) & (s["labels"] < coco.num_classes)).all()
        crowd = [seg for seg in s["segments"] if seg["iscrowd"]]
        crowd_total += len(crowd)
        assert len(kept) == len(s["segments"]) - len(crowd)  # every non-crowd segment has pixels here
        covered = s["masks"].any(0)
        for seg in crowd:  # crowd pixels exist but belong to no target
            assert (s["ids"] == seg["id"]).any() and not covered[s["ids"] == seg["id"]].any()
        for seg in s["segments"]:  # the JSON areas are the PNG's
            assert seg["area"] == int((s["ids"] == seg["id"]).sum())
    assert crowd_total == 3


def test_coco_test_resize(coco):
    """detectron2 ResizeShortestEdge(800, 1333): 427x640 -> 800x1199, 360x640 -> 750x1333
    (the long side caps it); height/width stay the original size."""
    ds = PanopticDataset(coco.split, COCO_SAMPLE, data.build_transform(DataConfig(), train=False))
    for i, size in enumerate([(800, 1199), (750, 1333)]):
        s = ds[i]
        assert s["image"].shape == (3, *size) and s["ids"].shape == size and s["masks"].shape[1:] == size
        assert (s["height"], s["width"]) == (coco.images[i]["height"], coco.images[i]["width"])
        check_targets(s, ds.contiguous)


def test_dataset_root(monkeypatch):
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    assert data.dataset_root("") == data.Path("datasets")
    monkeypatch.setenv("DETECTRON2_DATASETS", "/data/d2")
    assert data.dataset_root("") == data.Path("/data/d2")
    assert data.dataset_root("elsewhere") == data.Path("elsewhere")


# ---- the synthetic dataset --------------------------------------------------------------------


def test_synthetic_categories(synth):
    for split in ("train", "val"):
        ds = PanopticDataset(SYNTH_SPLIT[split], synth)
        assert [c["id"] for c in ds.categories] == [1, 2, 3, 5, 7, 20, 21, 22]  # non-contiguous
        assert ds.contiguous == {1: 0, 2: 1, 3: 2, 5: 3, 7: 4, 20: 5, 21: 6, 22: 7}
        assert ds.thing_classes == [0, 1, 2, 3, 4] and ds.num_classes == 8
    demo = load_config(ROOT / "configs/demo/m2f_tiny.yaml").model
    assert (demo.num_classes, demo.thing_classes) == (ds.num_classes, ds.thing_classes)


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")  # pycocotools + numpy 2
def test_synthetic_files_agree(synth):
    """Panoptic JSON == PNG pixels (areas, bboxes); instances.json masks == the thing segments;
    the semantic PNG == the contiguous class of each pixel's segment."""
    from pycocotools.coco import COCO

    for split, n in (("train", 30), ("val", 20)):
        ds = PanopticDataset(SYNTH_SPLIT[split], synth)
        coco = COCO(str(synth / split / "instances.json"))
        assert sorted(coco.getCatIds()) == [1, 2, 3, 5, 7]
        for i in range(n):
            s = ds[i]
            ids = s["ids"]
            assert s["image"].shape == (3, 128, 128) and s["image"].dtype == torch.uint8
            for seg in s["segments"]:
                m = ids == seg["id"]
                ys, xs = torch.nonzero(m, as_tuple=True)
                assert seg["area"] == int(m.sum()) >= 8
                assert seg["bbox"] == [xs.min().item(), ys.min().item(),
                                       (xs.max() - xs.min() + 1).item(), (ys.max() - ys.min() + 1).item()]
                assert seg["iscrowd"] == 0
            check_targets(s, ds.contiguous)
            assert len(s["labels"]) == len(s["segments"])
            # instances.json: one annotation per thing segment, same pixels
            things = {seg["id"]: seg for seg in s["segments"] if seg["category_id"] < 20}
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[s["image_id"]]))
            assert len(anns) == len(things)
            for ann in anns:
                m = torch.from_numpy(coco.annToMask(ann)).bool()
                match = [sid for sid in things if torch.equal(m, ids == sid)]
                assert len(match) == 1 and things[match[0]]["category_id"] == ann["category_id"]
                assert ann["bbox"] == things[match[0]]["bbox"] and ann["area"] == things[match[0]]["area"]
            # semantic PNG
            semantic = torch.from_numpy(np.asarray(Image.open(synth / split / "semantic" / s["file_name"])).copy())
            expected = torch.full_like(ids, 255)
            for seg in s["segments"]:
                expected[ids == seg["id"]] = ds.contiguous[seg["category_id"]]
            assert torch.equal(semantic.long(), expected)


def test_synthetic_difficulty_spread(synth):
    """Images range from empty to crowded, and the thing classes are balanced enough to learn."""
    ds = json.loads((synth / "train" / "panoptic.json").read_text())
    counts = [sum(seg["category_id"] < 20 for seg in ann["segments_info"]) for ann in ds["annotations"]]
    assert min(counts) == 0 and max(counts) >= 10
    assert len(set(counts)) >= 10
    per_class = np.bincount([seg["category_id"] for ann in ds["annotations"] for seg in ann["segments_info"]])
    assert all(per_class[c] >= 100 for c in (1, 2, 3, 5, 7, 20, 21, 22))
    areas = [seg["area"] for ann in ds["annotations"] for seg in ann["segments_info"] if seg["category_id"] < 20]
    assert min(areas) < 50 and max(areas) > 1500  # small to large


def tree_hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_deterministic(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        synthetic.write_synthetic(tmp_path / name, train=6, val=2, size=48, seed=seed)
    a, b, c = (tree_hashes(tmp_path / name) for name in "abc")
    assert len(a) == 2 * 2 + 3 * 8 and a == b
    assert a.keys() == c.keys() and a != c
    assert a["train/images/000001.png"] != c["train/images/000001.png"]


def test_synthetic_cli_non_square(tmp_path):
    synthetic.main(["--out", str(tmp_path), "--train", "2", "--val", "1", "--size", "40", "64"])
    ds = PanopticDataset(SYNTH_SPLIT["val"], tmp_path)
    assert ds[0]["image"].shape == (3, 40, 64)


# ---- transforms -------------------------------------------------------------------------------


def blocky_sample(H=160, W=224, block=16, seed=0):
    """ids in blocks of `block` px, the image a fixed colour per id: alignment is checkable."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(1, 40, (H // block + 1, W // block + 1), generator=g)
    ids = blocks.repeat_interleave(block, 0).repeat_interleave(block, 1)[:H, :W]  # (H, W)
    return {"image": colour_of(ids), "ids": ids, "segments": [], "height": H, "width": W}


def colour_of(ids):
    """(H, W) ids -> (3, H, W) uint8; id 0 (void, also the padding) is the pad colour 128."""
    lut = torch.stack([torch.arange(256) * 37 % 256, torch.arange(256) * 91 % 256, torch.arange(256) * 53 % 256], 1)
    lut[0] = 128
    return lut[ids].permute(2, 0, 1).to(torch.uint8)


def check_aligned(sample, radius=3):
    """Every pixel whose (2r+1)^2 id neighbourhood is uniform has exactly its id's colour."""
    ids = sample["ids"].float()[None, None]
    k = 2 * radius + 1
    hi = F.max_pool2d(ids, k, 1, radius)[0, 0]
    lo = -F.max_pool2d(-ids, k, 1, radius)[0, 0]
    uniform = (hi == lo)
    uniform[:radius], uniform[-radius:], uniform[:, :radius], uniform[:, -radius:] = False, False, False, False
    assert torch.equal(sample["image"][:, uniform], colour_of(sample["ids"])[:, uniform])
    return uniform.float().mean().item()


@pytest.mark.parametrize("augment", ["lsj", "cityscapes", "none"])
def test_augmentations_keep_image_and_ids_aligned(augment):
    cfg = DataConfig(augment=augment, crop_size=[128, 144], min_scale=0.5, max_scale=1.8, short_side=[128, 256],
                     max_size=1024)
    transform = data.build_transform(cfg, train=True)
    sample = blocky_sample()
    sizes = set()
    for seed in range(8):
        out = transform(dict(sample), torch.Generator().manual_seed(seed))
        assert out["image"].dtype == torch.uint8 and out["ids"].dtype == torch.int64
        assert out["image"].shape[1:] == out["ids"].shape
        assert set(out["ids"].unique().tolist()) <= set(sample["ids"].unique().tolist()) | {0}
        assert check_aligned(out) > 0.3
        sizes.add(tuple(out["ids"].shape))
        if augment != "none":
            assert out["ids"].shape == (128, 144)  # the crop size, padded if needed
    assert sizes == ({(160, 224)} if augment == "none" else {(128, 144)})


def test_lsj_pads_with_void_and_128():
    """A small scale leaves the crop partly empty: padding is void (id 0) and grey 128, at the
    bottom/right; ResizeScale(1, 1) of 480x640 to the 1024 box is 768x1024 (factor 1.6)."""
    sample = blocky_sample(480, 640, block=32)
    out = data.ResizeScale(1.0, 1.0, 1024, 1024)(dict(sample), torch.Generator().manual_seed(0))
    assert out["ids"].shape == (768, 1024)
    out = data.FixedSizeCrop((1024, 1024))(out, torch.Generator().manual_seed(0))
    assert out["ids"].shape == (1024, 1024)
    assert (out["ids"][768:] == 0).all() and (out["image"][:, 768:] == 128).all()
    assert (out["ids"][:768] > 0).all()


def test_flips_happen_for_some_seeds():
    sample = blocky_sample(64, 96)
    for transform in (data.build_transform(DataConfig(augment="none"), train=True),
                      data.build_transform(DataConfig(augment="lsj", crop_size=[64, 96], min_scale=1.0,
                                                      max_scale=1.0), train=True)):
        flipped = []
        for seed in range(20):
            out = transform(dict(sample), torch.Generator().manual_seed(seed))
            if torch.equal(out["ids"], sample["ids"]):
                flipped.append(False)
            else:
                assert torch.equal(out["ids"], sample["ids"].flip(-1))
                assert torch.equal(out["image"], sample["image"].flip(-1))
                flipped.append(True)
        assert 0 < sum(flipped) < 20


def test_resize_conventions_match_detectron2():
    """detectron2 resizes images with PIL BILINEAR and segmentations with PIL NEAREST; ours
    agree (ids exactly; image within 1 grey level), so image and ids stay on the same grid."""
    rng = np.random.default_rng(0)
    for (H, W), (h, w) in [((37, 53), (91, 120)), ((64, 64), (128, 128)), ((50, 70), (50, 140)), ((100, 160), (41, 67))]:
        ids = rng.integers(0, 1000, (H, W)).astype(np.int32)
        img = rng.integers(0, 256, (H, W, 3)).astype(np.uint8)
        out = data.resize({"image": torch.from_numpy(img).permute(2, 0, 1), "ids": torch.from_numpy(ids).long()}, (h, w))
        exact = F.interpolate(torch.from_numpy(ids)[None, None].double(), size=(h, w), mode="nearest-exact")[0, 0]
        assert torch.equal(out["ids"], exact.long())
        pil_ids = np.asarray(Image.fromarray(ids, mode="I").resize((w, h), Image.NEAREST))
        # PIL and torch break exact ties (an output centre on an input pixel edge) differently
        assert (pil_ids == out["ids"].numpy()).mean() > 0.97
        pil_img = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR)).astype(int)
        assert np.abs(pil_img - out["image"].permute(1, 2, 0).numpy().astype(int)).max() <= 1


def test_shortest_edge_sizes():
    assert data.shortest_edge_size(480, 640, 800, 1333) == (800, 1067)
    assert data.shortest_edge_size(427, 640, 800, 1333) == (800, 1199)
    assert data.shortest_edge_size(360, 640, 800, 1333) == (750, 1333)
    assert data.shortest_edge_size(640, 480, 800, 1333) == (1067, 800)
    assert data.shortest_edge_size(1024, 2048, 1024, 2048) == (1024, 2048)
    assert data.cityscapes_short_sides([512, 2048]) == [512, 614, 716, 819, 921, 1024, 1126, 1228, 1331, 1433,
                                                        1536, 1638, 1740, 1843, 1945, 2048]
    sides = data.cityscapes_short_sides([128, 256])
    assert len(sides) == 16 and sides[0] == 128 and sides[-1] == 256


def test_color_jitter():
    """The SSD photometric distortion changes colours only, and is a function of the seed."""
    sample = blocky_sample(64, 64)
    jitter = data.ColorAugSSD()
    outs = [jitter(dict(sample), torch.Generator().manual_seed(s)) for s in range(6)]
    assert all(o["ids"] is sample["ids"] and o["image"].dtype == torch.uint8 for o in outs)
    assert any(not torch.equal(o["image"], sample["image"]) for o in outs)
    assert torch.equal(jitter(dict(sample), torch.Generator().manual_seed(3))["image"], outs[3]["image"])
    rgb = torch.rand(3, 20, 30)
    assert torch.allclose(data.hsv_to_rgb(*data.rgb_to_hsv(rgb)), rgb, atol=1e-5)
    cfg = DataConfig(augment="cityscapes", color_jitter=True, crop_size=[64, 64], short_side=[64, 64])
    assert any(isinstance(t, data.ColorAugSSD) for t in data.build_transform(cfg, train=True).transforms)


def test_getitem_is_a_function_of_index_and_seed(synth):
    cfg = DataConfig(crop_size=[96, 96])
    ds = PanopticDataset(SYNTH_SPLIT["train"], synth, data.build_transform(cfg, train=True))
    a, b, c = ds[(3, 11)], ds[(3, 11)], ds[(3, 12)]
    for key in ("image", "ids", "labels", "masks"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["image"], c["image"])
    assert a["image"].shape == (3, 96, 96) and a["masks"].shape[1:] == (96, 96)
    check_targets(a, ds.contiguous)


def test_bad_config_values():
    with pytest.raises(DataError, match="data.augment"):
        data.build_transform(DataConfig(augment="mosaic"), train=True)
    with pytest.raises(ValueError, match="split"):
        data.build_dataset(DataConfig(), split="test", train=False)


# ---- sampler and loader -----------------------------------------------------------------------


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_train_sampler_stream():
    size, seed = 7, 5
    stream = take(data.TrainSampler(size, seed), 30)
    assert stream == take(data.TrainSampler(size, seed), 30)  # deterministic
    for e in range(4):  # epoch e is randperm under seed + e
        expected = torch.randperm(size, generator=torch.Generator().manual_seed(seed + e)).tolist()
        assert [i for i, _ in stream[e * size:(e + 1) * size]][: 30 - e * size] == expected[: 30 - e * size]
    assert [s for _, s in stream] == [seed * 1_000_003 + k for k in range(30)]
    assert take(data.TrainSampler(size, seed + 1), 30) != stream


def test_train_sampler_ranks_and_resume():
    size, seed = 7, 2
    stream = take(data.TrainSampler(size, seed), 60)
    ranks = [take(data.TrainSampler(size, seed, rank=r, world_size=3), 20) for r in range(3)]
    for r in range(3):
        assert ranks[r] == stream[r::3]  # rank r gets global items r, r + 3, ...
    for world_size in (1, 3):
        for rank in range(world_size):
            full = take(data.TrainSampler(size, seed, rank, world_size), 20)
            for start in (1, 2, 5, 7, 9, 13):  # across epoch boundaries
                assert take(data.TrainSampler(size, seed, rank, world_size, start=start), 20 - start) == full[start:]


def batches(loader, n):
    return list(itertools.islice(iter(loader), n))


def test_loader_workers_give_the_same_batches(synth):
    cfg = DataConfig(crop_size=[64, 64], workers=0)
    ds = PanopticDataset(SYNTH_SPLIT["train"], synth, data.build_transform(cfg, train=True))
    serial = batches(data.build_train_loader(cfg, ds, batch_size_per_rank=3, seed=1, rank=0, world_size=1, start=0), 3)
    cfg.workers = 2
    parallel = batches(data.build_train_loader(cfg, ds, batch_size_per_rank=3, seed=1, rank=0, world_size=1, start=0), 3)
    resumed = batches(data.build_train_loader(DataConfig(workers=0), ds, batch_size_per_rank=3, seed=1, rank=0, world_size=1, start=3), 2)
    assert all(isinstance(b, list) and len(b) == 3 for b in serial)
    for x, y in zip(sum(serial, []), sum(parallel, [])):
        assert x["image_id"] == y["image_id"]
        for key in ("image", "ids", "labels", "masks"):
            assert torch.equal(x[key], y[key])
    for x, y in zip(sum(serial[1:], []), sum(resumed, [])):  # start = 3 items = one batch in
        assert x["image_id"] == y["image_id"] and torch.equal(x["image"], y["image"])


# ---- bad input --------------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path):
    """A 3-image synthetic split to break in various ways; returns (root, split, json dict)."""
    synthetic.write_synthetic(tmp_path, train=3, val=0, size=32, seed=1)
    return tmp_path, SYNTH_SPLIT["train"], json.loads((tmp_path / "train/panoptic.json").read_text())


def save_json(root, content):
    (root / "train/panoptic.json").write_text(json.dumps(content))


def test_invalid_json(small):
    root, split, _ = small
    (root / "train/panoptic.json").write_text("{not json")
    with pytest.raises(DataError, match=re.escape(str(root / "train/panoptic.json")) + ".*invalid JSON"):
        PanopticDataset(split, root)
    with pytest.raises(DataError, match="JSON file not found"):
        PanopticDataset(SplitConfig("train/images", "train/panoptic", "train/nope.json"), root)
    save_json(root, {"images": [], "annotations": []})
    with pytest.raises(DataError, match=re.escape(str(root / "train/panoptic.json")) + ".*categories"):
        PanopticDataset(split, root)


def test_missing_and_corrupt_files(small):
    root, split, _ = small
    ds = PanopticDataset(split, root)
    image = root / "train/images/000001.png"
    image.unlink()
    with pytest.raises(DataError, match=re.escape(str(image)) + ".*not found"):
        ds.load(0)
    image = root / "train/images/000002.png"
    image.write_bytes(b"\x89PNG garbage, not an image")
    with pytest.raises(DataError, match=re.escape(str(image)) + ".*cannot read image"):
        ds.load(1)
    png = root / "train/panoptic/000003.png"
    png.unlink()
    with pytest.raises(DataError, match=re.escape(str(png)) + ".*not found"):
        ds.load(2)


def test_png_inconsistent_with_json(small):
    root, split, content = small
    png = root / "train/panoptic/000001.png"
    removed = content["annotations"][0]["segments_info"].pop()  # a PNG id the JSON no longer lists
    content["annotations"][1]["segments_info"].append(
        {"id": 999999, "category_id": 1, "iscrowd": 0, "area": 0, "bbox": [0, 0, 0, 0]})  # no pixels: fine
    save_json(root, content)
    ds = PanopticDataset(split, root)
    with pytest.raises(DataError, match=re.escape(str(png)) + f".*{removed['id']}"):
        ds.load(0)
    s = ds[1]
    assert 999999 not in s["ids"].unique().tolist() and len(s["labels"]) == len(s["segments"]) - 1
    Image.fromarray(np.zeros((20, 32, 3), np.uint8)).save(root / "train/panoptic/000002.png")
    with pytest.raises(DataError, match=re.escape(str(root / "train/panoptic/000002.png")) + ".*20x32"):
        ds.load(1)


def test_image_modes_load_as_rgb(small):
    root, split, _ = small
    ds = PanopticDataset(split, root)
    original = ds.load(0)["image"]
    path = root / "train/images/000001.png"
    rgb = Image.open(path).convert("RGB")
    for mode in ("L", "RGBA", "P", "LA"):
        rgb.convert(mode).save(path)
        image = ds.load(0)["image"]
        assert image.shape == original.shape and image.dtype == torch.uint8
        if mode in ("L", "LA"):
            assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
        if mode == "RGBA":
            assert torch.equal(image, original)
    jpg = root / "train/images/000001.jpg"
    rgb.convert("L").save(jpg)
    content = json.loads((root / "train/panoptic.json").read_text())
    content["images"][0]["file_name"] = "000001.jpg"
    save_json(root, content)
    assert PanopticDataset(split, root).load(0)["image"].shape == (3, 32, 32)


def test_images_without_segments(small):
    root, split, content = small
    content["annotations"][0]["segments_info"] = []
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "train/panoptic/000001.png")
    del content["annotations"][1]  # no annotation entry at all: no segments, all void
    save_json(root, content)
    ds = PanopticDataset(split, root)
    for i in (0, 1):
        s = ds[i]
        assert s["segments"] == [] and (s["ids"] == 0).all()
        assert s["labels"].shape == (0,) and s["masks"].shape == (0, 32, 32) and s["masks"].dtype == torch.bool
    assert ds[(1, 5)]["labels"].shape == (0,)


def test_cityscapes_city_subfolders(small):
    """Cityscapes images sit in images/<city>/, the city being the first '_' field."""
    root, split, content = small
    (root / "train/images/frankfurt").mkdir()
    (root / "train/images/000001.png").rename(root / "train/images/frankfurt/frankfurt_000000_000294_leftImg8bit.png")
    content["images"][0]["file_name"] = "frankfurt_000000_000294_leftImg8bit.png"
    save_json(root, content)
    ds = PanopticDataset(split, root)
    assert ds.load(0)["image"].shape == (3, 32, 32)
    content["images"][0]["file_name"] = "bremen_000000_000294_leftImg8bit.png"
    save_json(root, content)
    with pytest.raises(DataError, match="bremen_000000_000294_leftImg8bit.png.*not found"):
        PanopticDataset(split, root).load(0)


def test_build_dataset(synth):
    cfg = DataConfig(root=str(synth), train=SYNTH_SPLIT["train"], val=SYNTH_SPLIT["val"], test_short_side=64,
                     test_max_size=1000)
    train, val = data.build_dataset(cfg, split="train", train=True), data.build_dataset(cfg, split="val", train=False)
    assert (len(train), len(val)) == (200, 20)
    assert val[0]["image"].shape == (3, 64, 64) and (val[0]["height"], val[0]["width"]) == (128, 128)
    assert train[(0, 1)]["image"].shape == (3, 1024, 1024)  # the default LSJ crop
    assert val.instances_json == synth / "val/instances.json"
