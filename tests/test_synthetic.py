"""synthetic.py: the difficulty knobs do what they claim, measured from the written annotations
and images; the output is a function of the arguments; --help answers without torch."""
import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import synthetic
from conftest import ROOT


def generate(root, n=8, size=64, seed=0, **knobs):
    """Write n train images with the given knobs (pairs); returns [(image entry, segments_info)]."""
    synthetic.write_synthetic(root, train=n, val=0, size=size, seed=seed, knobs=knobs)
    panoptic = json.loads((root / "train" / "panoptic.json").read_text())
    return [(im, ann["segments_info"]) for im, ann in zip(panoptic["images"], panoptic["annotations"])]


def things(segments):
    return [s for s in segments if s["category_id"] < 20]


def test_difficulty_record_agrees_with_the_annotations(tmp_path):
    """Each image's "difficulty" names exactly its thing segments, thin ones among them, and its
    hidden fraction is 1 - visible / drawn computed from the segment areas."""
    for im, segments in generate(tmp_path, n=12, thin=(1, 1), occlusion=(0.7, 0.7), objects=(8, 8)):
        d = im["difficulty"]
        areas = {str(s["id"]): s["area"] for s in things(segments)}
        assert d["things"] == len(areas) and set(d["drawn_area"]) == set(areas)
        assert set(map(str, d["thin_ids"])) <= set(areas)
        assert all(d["drawn_area"][k] >= a for k, a in areas.items())  # covered, never grown
        drawn = sum(d["drawn_area"].values())
        assert d["hidden"] == pytest.approx(1 - sum(areas.values()) / drawn if drawn else 0.0, abs=1e-4)
        assert 0 <= d["level"] <= 1


def test_objects_knob_sets_the_thing_count(tmp_path):
    few = generate(tmp_path / "few", objects=(1, 1))
    many = generate(tmp_path / "many", objects=(7, 7))
    for images, asked in ((few, 1), (many, 7)):
        for im, segments in images:
            assert abs(im["difficulty"]["objects"] - asked) <= 1  # asked: the knob, +-1
            assert len(things(segments)) <= im["difficulty"]["objects"]
    assert np.mean([len(things(s)) for _, s in few]) <= 2
    assert np.mean([len(things(s)) for _, s in many]) >= 5


def test_radius_knob_sets_the_segment_areas(tmp_path):
    knobs = {"objects": (3, 3), "occlusion": (0, 0)}  # nothing hidden: an area is the shape's
    small = [s["area"] for _, seg in generate(tmp_path / "s", radius=(0.06, 0.06), **knobs) for s in things(seg)]
    large = [s["area"] for _, seg in generate(tmp_path / "l", radius=(0.2, 0.2), **knobs) for s in things(seg)]
    assert len(small) >= 10 and len(large) >= 10
    assert np.median(large) > 5 * np.median(small)  # radius x 3.3: area x 11 before the border clips


def test_radius_window_slides_from_large_to_small_with_the_level():
    """Easy images (t = 0) take the upper half (log scale) of [SMALL, LARGE], hard ones the lower."""
    knobs = {**synthetic.KNOBS, "radius": (0.05, 0.45)}
    S = 100
    easy = synthetic.draw_knobs(np.random.default_rng(0), S, S, {**knobs, "difficulty": (0, 0)})
    hard = synthetic.draw_knobs(np.random.default_rng(0), S, S, {**knobs, "difficulty": (1, 1)})
    assert easy["radius"] == pytest.approx([15, 45]) and hard["radius"] == pytest.approx([5, 15])
    assert easy["objects"] <= 1 and hard["objects"] >= 11  # objects 0 -> 12, +-1


def test_occlusion_knob_hides_more_of_the_shapes(tmp_path):
    """Occlusion 0: things only touch; 0.7: placed against earlier ones, they hide more of them
    (about 0.13 of the drawn pixels here; 0.03 when placed at random, which happens as well)."""
    knobs = {"objects": (4, 4), "radius": (0.12, 0.2)}
    apart = generate(tmp_path / "a", n=12, occlusion=(0, 0), **knobs)
    piled = generate(tmp_path / "p", n=12, occlusion=(0.7, 0.7), **knobs)

    def hidden(images):  # of the pixels drawn for the things, the fraction later things cover
        drawn = sum(sum(im["difficulty"]["drawn_area"].values()) for im, _ in images)
        return 1 - sum(s["area"] for _, seg in images for s in things(seg)) / drawn

    assert hidden(apart) == 0
    assert hidden(piled) > 0.08
    for im, segments in piled:  # no thing loses more than the knob allows
        for s in things(segments):
            assert s["area"] >= (1 - 0.7) * im["difficulty"]["drawn_area"][str(s["id"])] - 1e-9


def test_thin_knob_makes_thin_rings_and_crosses(tmp_path):
    knobs = {"objects": (6, 6), "radius": (0.15, 0.15), "occlusion": (0, 0)}

    def widths(images):  # area / long side of the bbox: about the wall or arm width, times 2-3
        return [s["area"] / max(s["bbox"][2:]) for _, seg in images for s in things(seg) if s["category_id"] in (5, 7)]

    thick = generate(tmp_path / "thick", n=12, thin=(0, 0), **knobs)
    thin = generate(tmp_path / "thin", n=12, thin=(1, 1), **knobs)
    assert all(im["difficulty"]["thin_ids"] == [] for im, _ in thick)
    for im, seg in thin:  # every ring and cross
        assert sorted(im["difficulty"]["thin_ids"]) == sorted(s["id"] for s in things(seg) if s["category_id"] in (5, 7))
    assert len(widths(thin)) >= 5 and np.median(widths(thin)) < 0.6 * np.median(widths(thick))


def stuff_roughness(root, images):
    """Mean |horizontal difference| of the image between neighbouring pixels of one stuff segment."""
    total, count = 0.0, 0
    for im, _ in images:
        image = np.asarray(Image.open(root / "train/images" / im["file_name"])).astype(np.float64)  # (H, W, 3)
        rgb = np.asarray(Image.open(root / "train/panoptic" / im["file_name"])).astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]  # (H, W)
        same = (ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] >= 20000)  # (H, W-1) inside stuff
        total += np.abs(image[:, 1:] - image[:, :-1]).sum(-1)[same].sum()
        count += same.sum()
    return total / count


def test_clutter_knob_adds_distractors_and_texture(tmp_path):
    plain = generate(tmp_path / "plain", clutter=(0, 0))
    busy = generate(tmp_path / "busy", clutter=(1, 1))
    assert all(im["difficulty"]["distractors"] == im["difficulty"]["wires"] == 0 for im, _ in plain)
    assert np.mean([im["difficulty"]["distractors"] for im, _ in busy]) > 5
    assert stuff_roughness(tmp_path / "busy", busy) > 1.3 * stuff_roughness(tmp_path / "plain", plain)


def test_default_levels_spread_from_easy_to_hard(tmp_path):
    """With the default knobs, hard images (t > 2/3) have more, smaller, more hidden things than
    easy ones (t < 1/3)."""
    images = generate(tmp_path, n=40, size=96)
    levels = np.array([im["difficulty"]["level"] for im, _ in images])
    count = np.array([len(things(seg)) for _, seg in images])
    area = np.array([np.mean([s["area"] for s in things(seg)]) if things(seg) else np.nan for _, seg in images])
    hidden = np.array([im["difficulty"]["hidden"] for im, _ in images])
    easy, hard = levels < 1 / 3, levels > 2 / 3
    assert easy.sum() >= 5 and hard.sum() >= 5
    assert count[hard].mean() > count[easy].mean() + 4
    assert np.nanmean(area[hard]) < 0.5 * np.nanmean(area[easy])
    assert hidden[hard].mean() > hidden[easy].mean()


def tree_hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_knobs_same_bytes(tmp_path):
    knobs = {"objects": (2, 9), "clutter": (0.2, 0.8), "thin": (0.5, 0.5)}
    for name, extra in (("a", {}), ("b", {}), ("c", {"occlusion": (0.3, 0.3)})):
        synthetic.write_synthetic(tmp_path / name, train=3, val=1, size=48, seed=2, knobs={**knobs, **extra})
    a, b, c = (tree_hashes(tmp_path / name) for name in "abc")
    assert a == b and a.keys() == c.keys()
    assert a["train/panoptic.json"] != c["train/panoptic.json"]


def test_command_line_knobs_reach_the_generator(tmp_path):
    synthetic.main(["--out", str(tmp_path), "--train", "3", "--val", "1", "--size", "32", "--objects", "0", "0",
                    "--clutter", "0.5", "0.5"])
    panoptic = json.loads((tmp_path / "train/panoptic.json").read_text())
    assert panoptic["info"]["knobs"]["objects"] == [0, 0]
    assert all(im["difficulty"]["clutter"] == 0.5 and im["difficulty"]["things"] == 0 for im in panoptic["images"])
    assert not any(things(a["segments_info"]) for a in panoptic["annotations"])


@pytest.mark.parametrize("bad", [["--radius", "0.3", "0.1"], ["--occlusion", "0", "1.5"], ["--difficulty", "-1", "1"]])
def test_command_line_refuses_bad_knobs(tmp_path, bad, capsys):
    with pytest.raises(SystemExit) as e:
        synthetic.main(["--out", str(tmp_path), *bad])
    assert e.value.code == 2 and bad[0] in capsys.readouterr().err
    assert not (tmp_path / "train").exists()


def test_ids_encoding_is_data_s():
    import data

    ids = np.random.default_rng(0).integers(0, 2**24, size=(5, 7))
    assert np.array_equal(synthetic.ids_to_rgb(ids), data.ids_to_rgb(ids))


def test_help_does_not_import_torch():
    code = ("import runpy, sys\n"
            "sys.argv = ['synthetic.py', '--help']\n"
            "try:\n    runpy.run_path('synthetic.py', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--occlusion" in result.stdout and result.stdout.strip().splitlines()[-1] == "False"
