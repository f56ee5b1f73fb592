"""visualize.py: segmentations drawn over their images (the evaluation's and `predict`'s pictures).
Small synthetic id maps, numpy and Pillow only, so each test runs in well under a second."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont, features

import visualize
from conftest import ROOT

CATEGORIES = {7: {"name": "boat", "isthing": 1, "color": [200, 10, 10]},
              8: {"name": "water", "isthing": 0},  # no colour: a palette one
              9: {"name": "rock", "isthing": 0, "color": [10, 10, 200]}}


def halves(h=128, w=128):
    """An id map: left half segment 1 (boat), right half segment 2 (water)."""
    ids = np.ones((h, w), dtype=np.int64)
    ids[:, w // 2:] = 2
    return ids, [{"id": 1, "category_id": 7}, {"id": 2, "category_id": 8}]


def grey(h=128, w=128, value=100):
    return np.full((h, w, 3), value, dtype=np.uint8)


def test_small_images_are_enlarged_by_an_integer_factor():
    # 128 px -> 3x (384 >= 320); ordinary photos as they are; huge ones reduced to 1024 px.
    assert visualize.display_scale(128, 128) == 3
    assert visualize.display_scale(427, 640) == 1
    assert visualize.display_scale(1024, 2048) == 0.5
    ids, segments = halves()
    out = visualize.draw_segmentation(grey(), ids, segments, CATEGORIES, scale=3, labels=False)
    assert out.shape == (384, 384, 3) and out.dtype == np.uint8
    # Nearest neighbour: each id pixel a 3x3 block, the border between x = 191 and 192 (63 | 64),
    # outlined there one display pixel per side; no mixed ids beside it.
    left, right = out[50, 0], out[50, -1]
    assert (out[1:-1, 1:191] == left).all() and (out[1:-1, 193:-1] == right).all()
    assert not (out[1:-1, 191] == left).all(axis=-1).any() and not (out[1:-1, 192] == right).all(axis=-1).any()


def test_panels_side_by_side_with_titles_and_legend():
    ids, segments = halves()
    panels = [("image", grey(), None, None), ("ground truth", grey(), ids, segments),
              ("prediction", grey(), ids, segments[:1])]
    canvas = visualize.draw_panels(panels, CATEGORIES, title="000001.png")
    without_legend = visualize.draw_panels([(t, im, None, None) for t, im, _, _ in panels], CATEGORIES,
                                           title="000001.png")
    assert canvas.shape[1] >= 3 * 384 + 2 * visualize.GAP  # three panels, each 3x enlarged
    assert canvas.shape[0] > 384 + 20  # titles above
    assert canvas.shape[0] > without_legend.shape[0]  # a legend below
    assert canvas.shape[1] == without_legend.shape[1]
    two = visualize.draw_panels(panels[:2], CATEGORIES)
    assert two.shape[1] < canvas.shape[1] - 384  # one panel fewer


def test_segment_interior_is_blended_with_its_category_color():
    ids, segments = halves()
    out = visualize.draw_segmentation(grey(value=100), ids, segments, CATEGORIES, alpha=0.25, labels=False)
    # boat: the dataset's colour honoured, 0.75 * 100 + 0.25 * [200, 10, 10], rounded.
    assert out[64, 10].tolist() == [125, 78, 78]
    # water: no colour in the dataset, the palette's, never another category's.
    water = visualize.palette_color(8).astype(int)
    assert out[64, 100].tolist() == [int(np.floor(0.75 * 100 + 0.25 * c + 0.5)) for c in water]
    assert not np.array_equal(water, [200, 10, 10])
    assert not np.array_equal(visualize.palette_color(8), visualize.palette_color(9))
    # Void (0) and ids without a segments_info entry keep the image.
    ids[:20, :20] = 0
    ids[100:, :20] = 5
    out = visualize.draw_segmentation(grey(value=100), ids, segments, CATEGORIES, labels=False)
    assert out[5, 5].tolist() == [100, 100, 100] and out[110, 5].tolist() == [100, 100, 100]


def test_outlines_on_both_sides_of_a_border_stand_out():
    """A white and a near-black segment: their shared border is drawn in the colour that
    contrasts with each side, and the outline is one display pixel per side, not more."""
    categories = {1: {"name": "snow", "isthing": 0, "color": [255, 255, 255]},
                  2: {"name": "coal", "isthing": 0, "color": [0, 0, 0]}}
    ids = np.ones((40, 40), dtype=np.int64)
    ids[:, 20:] = 2
    segments = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 2}]
    out = visualize.draw_segmentation(grey(40, 40, 128), ids, segments, categories, scale=2, labels=False)
    light, dark = out[30, 10].copy(), out[30, 70].copy()
    assert visualize.luminance(light) > visualize.luminance(dark)
    assert out[30, 39].tolist() == list(visualize._DARK)  # light side: a dark line
    assert out[30, 40].tolist() == list(visualize._WHITE)  # dark side: a white line
    assert out[30, 38].tolist() == light.tolist() and out[30, 41].tolist() == dark.tolist()
    assert visualize.boundaries(ids)[:, [19, 20]].all() and visualize.boundaries(ids).sum() == 80
    assert (visualize.boundaries(ids.T) == visualize.boundaries(ids).T).all()  # rows as columns


def test_instances_of_a_thing_class_get_shades_stuff_does_not():
    segments = [{"id": 1, "category_id": 7}, {"id": 2, "category_id": 7}, {"id": 3, "category_id": 7},
                {"id": 4, "category_id": 9}, {"id": 5, "category_id": 7, "isthing": False}]
    colors = visualize.segment_colors(segments, CATEGORIES)
    assert colors[1].tolist() == [200, 10, 10]  # the first instance in the dataset's colour
    assert len({tuple(colors[i].tolist()) for i in (1, 2, 3)}) == 3  # touching boats stay apart
    assert colors[4].tolist() == [10, 10, 200]
    assert colors[5].tolist() == [200, 10, 10]  # the segment's own "isthing" wins over the category's


def test_label_is_drawn_inside_a_large_segment_and_not_on_a_tiny_one():
    ids = np.zeros((128, 128), dtype=np.int64)
    ids[10:60, 50:120] = 1  # a large boat, off-centre and wider than tall
    ids[100:101, 10:13] = 2  # 3 pixels of rock
    segments = [{"id": 1, "category_id": 7}, {"id": 2, "category_id": 9}]
    plain = visualize.draw_segmentation(grey(), ids, segments, CATEGORIES, scale=3, labels=False)
    named = visualize.draw_segmentation(grey(), ids, segments, CATEGORIES, scale=3)
    changed = (plain != named).any(axis=-1)  # (384, 384): the label's pixels
    assert changed.sum() > 100
    ys, xs = np.nonzero(changed)
    big = visualize.resize_ids(ids, (384, 384)) == 1
    assert big[(ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2]  # the label's box sits inside the boat
    assert big[ys, xs].mean() > 0.95
    assert not changed[270:340, 0:70].any()  # nothing on or near the rock
    # Unknown names: "class <id>" on the same spot.
    numbered = visualize.draw_segmentation(grey(), ids, segments, None, scale=3)
    assert (numbered != plain).any(axis=-1)[big].sum() > 100


def test_a_long_name_is_shortened_to_fit_a_narrow_segment():
    categories = {3: {"name": "a-very-long-category-name", "isthing": 0, "color": [90, 90, 90]}}
    ids = np.zeros((100, 100), dtype=np.int64)
    ids[20:80, 40:60] = 1  # 60 display pixels wide at scale 3, the full name about 170
    segments = [{"id": 1, "category_id": 3}]
    plain = visualize.draw_segmentation(grey(100, 100), ids, segments, categories, scale=3, labels=False)
    named = visualize.draw_segmentation(grey(100, 100), ids, segments, categories, scale=3)
    xs = np.nonzero((plain != named).any(axis=-1))[1]
    assert xs.size and xs.max() - xs.min() <= 60 + 8


def test_interior_point_of_a_ring_lies_on_the_ring():
    y, x = np.mgrid[:61, :61]
    r = np.hypot(y - 30, x - 30)
    ids = np.where((r > 15) & (r < 25), 4, 1)  # a ring (4) around a disc of background (1)
    points = visualize.interior_points(ids)
    py, px, depth = points[4]
    assert ids[py, px] == 4 and depth >= 3  # a centroid would fall in the hole
    assert set(points) == {1, 4}


def test_legend_lists_exactly_the_categories_shown():
    ids, segments = halves()
    listed_not_shown = {"id": 3, "category_id": 9}  # in segments_info, but no pixel has id 3
    panels = [("image", grey(), None, None), ("ground truth", grey(), ids, segments + [listed_not_shown]),
              ("prediction", grey(), ids, segments[1:])]
    entries = visualize.legend_entries(panels, CATEGORIES)
    assert [(e["id"], e["name"], e["isthing"]) for e in entries] == [(7, "boat", True), (8, "water", False)]
    assert entries[0]["color"].tolist() == [200, 10, 10]
    assert [e["name"] for e in visualize.legend_entries(panels)] == ["class 7", "class 8"]
    as_list = [{"id": k, **v} for k, v in CATEGORIES.items()]  # PanopticDataset.categories' form
    assert [e["name"] for e in visualize.legend_entries(panels, as_list)] == ["boat", "water"]
    # Drawn: each entry's swatch appears below the panels.
    canvas = visualize.draw_panels(panels, CATEGORIES)
    legend = canvas[-40:].reshape(-1, 3)
    for e in entries:
        assert (legend == e["color"]).all(axis=1).any(), e["name"]


def test_save_visualization_without_categories_writes_a_png(tmp_path):
    ids, segments = halves(96, 128)
    image = torch.full((3, 48, 64), 100, dtype=torch.uint8)  # smaller than the ground truth: resized
    visualize.save_visualization(tmp_path / "vis" / "a.png", image, ids, segments, ids, segments[:1])
    with Image.open(tmp_path / "vis" / "a.png") as picture:
        assert picture.mode == "RGB"
        size = picture.size
    expected = visualize.draw_panels([("image", grey(96, 128), None, None), ("ground truth", grey(96, 128), ids, segments),
                                      ("prediction", grey(96, 128), ids, segments[:1])])
    assert size == (expected.shape[1], expected.shape[0])
    visualize.save_prediction(tmp_path / "p.png", grey(96, 128), ids, segments, CATEGORIES)
    with Image.open(tmp_path / "p.png") as picture:
        assert picture.size[0] < size[0]  # two panels
    visualize.save_prediction(tmp_path / "p.png", grey(96, 128), ids, segments, CATEGORIES, title="again")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["p.png", "vis"]  # replaced, no temporary left


def test_image_conversions():
    hwc = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert (visualize.as_rgb(hwc) == hwc).all()
    assert (visualize.as_rgb(hwc.transpose(2, 0, 1)) == hwc).all()
    assert (visualize.as_rgb(torch.from_numpy(hwc.transpose(2, 0, 1).copy())) == hwc).all()
    assert (visualize.as_rgb(hwc / 255.0) == hwc).all()
    assert visualize.as_rgb(hwc[..., 0]).shape == (5, 7, 3)
    assert visualize.as_ids(torch.ones(5, 7, dtype=torch.int32)).dtype == np.int64


def test_drawing_does_not_import_torch(tmp_path):
    code = ("import sys, numpy as np, visualize\n"
            "ids = np.ones((32, 32), dtype=np.int64)\n"
            "visualize.save_prediction(sys.argv[1], np.zeros((32, 32, 3), np.uint8), ids,"
            " [{'id': 1, 'category_id': 1}], None)\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "p.png")], cwd=ROOT, check=True)
    assert (tmp_path / "p.png").is_file()


@pytest.mark.parametrize("fallback", ["pillow default", "bitmap"])
def test_pictures_without_system_fonts(monkeypatch, fallback):
    """CI may lack DejaVu and Arial: Pillow's own font, or where FreeType is missing its bitmap font."""
    truetype = ImageFont.truetype

    def no_system_fonts(font, *args, **kwargs):
        if isinstance(font, str):  # a font looked up by name; Pillow's own comes as bytes
            raise OSError("cannot open resource")
        return truetype(font, *args, **kwargs)

    monkeypatch.setattr(ImageFont, "truetype", no_system_fonts)
    if fallback == "bitmap":
        bitmap = ImageFont.load_default_imagefont

        def no_sizes(size=None):
            if size is not None:
                raise TypeError("load_default() got an unexpected keyword argument 'size'")
            return bitmap()

        monkeypatch.setattr(ImageFont, "load_default", no_sizes)
    fonts, beta = visualize._fonts((13,))
    assert beta == "beta"
    bitmap_expected = fallback == "bitmap" or not features.check("freetype2")
    assert isinstance(fonts[0], ImageFont.ImageFont) == bitmap_expected
    ids = np.zeros((128, 128), dtype=np.int64)
    ids[10:90, 10:120] = 1
    segments = [{"id": 1, "category_id": 7}]
    plain = visualize.draw_segmentation(grey(), ids, segments, CATEGORIES, labels=False)
    named = visualize.draw_segmentation(grey(), ids, segments, CATEGORIES)
    assert (plain != named).any()  # the label is still written
    canvas = visualize.draw_panels([("prediction", grey(), ids, segments)], CATEGORIES, title="t")
    assert canvas.shape[0] > 384


def test_exit_histograms_bars_are_the_gates_shares(tmp_path):
    # Gate "a": 1 image at exit 1, 3 at exit 2 (25 % and 75 %); gate "b" read back from JSON
    # (string keys), 100 images all at exit 3; exit 6 unused but asked for.
    visualize.plot_exit_histograms({"a": {1: 1, 2: 3}, "b": {"3": 100}}, tmp_path / "h.png", exits=[1, 2, 3, 6])
    with Image.open(tmp_path / "h.png") as picture:
        assert picture.size == visualize.HISTOGRAM_PLOT_SIZE and picture.mode == "RGB"
        pixels = np.asarray(picture)
    plot = pixels[:, :visualize.HISTOGRAM_PLOT_SIZE[0] - 300]  # left of the legend

    def bar_heights(color):
        mask = (plot == color).all(axis=-1)  # (H, W)
        columns = mask.sum(axis=0)  # height of the colour per x
        xs = np.flatnonzero(columns)
        runs = np.split(xs, np.flatnonzero(np.diff(xs) > 1) + 1)  # one run of x per bar
        return [int(columns[run].max()) for run in runs if run.size > 3]

    a, b = bar_heights(visualize.series_color(0)), bar_heights(visualize.series_color(1))
    assert len(a) == 2 and len(b) == 1
    assert abs(a[1] / a[0] - 3) < 0.15  # 75 % against 25 %
    assert abs(b[0] / a[1] - 100 / 75) < 0.05
    visualize.plot_exit_histograms({}, tmp_path / "empty.png")  # nothing to show: still a picture
    with Image.open(tmp_path / "empty.png") as picture:
        assert picture.size == visualize.HISTOGRAM_PLOT_SIZE


def test_labels_carry_the_score_and_shorten_the_name_not_the_score():
    segment = {"id": 1, "category_id": 5, "score": 0.873}
    categories = {5: {"name": "sky-other-merged", "isthing": 0}}
    assert visualize.segment_labels(segment, categories) == ["sky-other 87%", "sky-other", "sky-oth.", "sky."]
    assert visualize.segment_labels({"id": 1, "category_id": 5}, None) == ["class 5", "5"]
