"""Pictures: segmentations drawn over their images, the PQ-vs-GFLOPs plot, exit histograms.

Only numpy and Pillow: `evaluate.py predict`, the evaluation pictures (metrics.py) and the demo's
report all draw with these functions, so a picture means the same wherever it appears.

    draw_segmentation(image, ids, segments, categories)  one segmentation over its image
    draw_panels([(title, image, ids, segments)], categories, title=...)  side by side + legend
    save_visualization(path, image, gt_ids, gt_segments, pred_ids, pred_segments, categories)
    save_prediction(path, image, ids, segments, categories)
    plot_sweep(rows, path), plot_exit_histograms({name: {exit: count}}, path)
"""
import colorsys
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


# ---- text ---------------------------------------------------------------------------------


_INK, _WHITE, _DARK = (0, 0, 0), (255, 255, 255), (25, 25, 25)


def _fonts(sizes):
    """Fonts at `sizes` px, and how to write β with them. A system font with Greek letters where
    there is one (DejaVu Sans on most Linux systems, Arial on macOS and Windows); else Pillow's
    bundled font, which has no β (so "beta"), or its fixed bitmap font where FreeType is missing."""
    from PIL import ImageFont  # only where text is drawn

    for name in ("DejaVuSans.ttf", "Arial.ttf"):
        try:
            return [ImageFont.truetype(name, size) for size in sizes], "β"
        except OSError:
            continue
    try:
        return [ImageFont.load_default(size=size) for size in sizes], "beta"
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
        return [ImageFont.load_default()] * len(sizes), "beta"


def _text_size(draw, text, font):
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _text(draw, xy, text, font, align="left-top", fill=_INK):
    """Draw text with its box placed at xy: align is "<left|center|right>-<top|middle|bottom>".
    Measured by hand rather than with Pillow's `anchor`, which bitmap fonts do not support."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    horizontal, vertical = align.split("-")
    x = xy[0] - {"left": 0, "center": (right - left) / 2, "right": right - left}[horizontal] - left
    y = xy[1] - {"top": 0, "middle": (bottom - top) / 2, "bottom": bottom - top}[vertical] - top
    draw.text((x, y), text, font=font, fill=fill)


# ---- colours --------------------------------------------------------------------------------
# `categories`: dataset category id -> {"name", "isthing", optional "color": [r, g, b]} (the
# COCO panoptic JSON's categories); its list form, or PanopticDataset.categories, works too.


def category_table(categories) -> dict:
    """categories as a dict id -> entry, from a dict, a list of entries with "id", or None."""
    if categories is None:
        return {}
    if isinstance(categories, dict):
        return {int(k): v for k, v in categories.items()}
    return {int(c["id"]): c for c in categories}


def category_name(category_id, categories=None) -> str:
    entry = category_table(categories).get(int(category_id))
    return entry["name"] if entry and "name" in entry else f"class {int(category_id)}"


def palette_color(category_id) -> np.ndarray:
    """A fixed colour per category id: 12 hues, consecutive ids 150 degrees apart, in 3 levels of
    saturation and brightness, so two ids share a colour only when 36 apart."""
    k = int(category_id)
    hue = ((5 * k) % 12) / 12 + 0.02
    saturation, value = ((0.75, 0.95), (0.95, 0.6), (0.4, 0.95))[(k // 12) % 3]
    return np.array([round(255 * c) for c in colorsys.hsv_to_rgb(hue, saturation, value)], dtype=np.uint8)


def category_color(category_id, categories=None) -> np.ndarray:
    """(3,) uint8: the dataset's colour of the category where it has one, else palette_color."""
    entry = category_table(categories).get(int(category_id))
    if entry is not None and entry.get("color") is not None:
        return np.array(entry["color"], dtype=np.uint8)
    return palette_color(category_id)


def luminance(rgb):
    rgb = np.asarray(rgb, dtype=np.float64)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def contrast_color(rgb):
    """White on dark colours, near-black on light ones."""
    return _WHITE if luminance(rgb) < 140 else _DARK


# Shades of the k-th instance of a thing class, + towards white, - towards black (the first as
# is): both ways for colours in the middle, away from the near end for light and dark ones.
INSTANCE_SHADES = {"middle": (0.0, 0.35, -0.35, 0.55, -0.55, 0.18, -0.18, 0.45, -0.45),
                   "light": (0.0, -0.25, -0.45, -0.6, -0.12, -0.35, -0.52),
                   "dark": (0.0, 0.25, 0.45, 0.6, 0.12, 0.35, 0.52)}


def shade(color, t) -> np.ndarray:
    color = np.asarray(color, dtype=np.float64)
    out = color + (255 - color) * t if t >= 0 else color * (1 + t)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def is_thing(segment, categories) -> bool:
    if "isthing" in segment:
        return bool(segment["isthing"])
    return bool(categories.get(int(segment["category_id"]), {}).get("isthing", False))


def segment_colors(segments, categories=None) -> dict:
    """Segment id -> (3,) uint8 colour: its category's colour; the instances of one thing class
    in shades of it (in segment order), so that touching instances stay apart."""
    categories = category_table(categories)
    colors, seen = {}, {}
    for s in segments:
        c = int(s["category_id"])
        k = seen.get(c, 0)
        seen[c] = k + 1
        color = category_color(c, categories)
        lum = luminance(color)
        shades = INSTANCE_SHADES["light" if lum > 170 else "dark" if lum < 60 else "middle"]
        t = shades[k % len(shades)] if is_thing(s, categories) else 0.0
        colors[int(s["id"])] = shade(color, t)
    return colors


# ---- arrays ---------------------------------------------------------------------------------


def as_rgb(image) -> np.ndarray:
    """(H, W, 3) uint8 from a (3, H, W) torch tensor (converted without importing torch), a
    (3, H, W) or (H, W, 3) or (H, W) array, or a PIL image; floats in [0, 1] are scaled."""
    is_tensor = hasattr(image, "detach")
    if is_tensor:
        image = image.detach().cpu().numpy()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    elif is_tensor or (image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3, 4)):
        image = image.transpose(1, 2, 0)  # channels first
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    image = image[..., :3]  # RGBA: alpha dropped
    if image.dtype != np.uint8:
        image = image.astype(np.float64)
        if image.size and image.max() <= 1.0:
            image = image * 255
        image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def as_ids(ids) -> np.ndarray:
    """(H, W) int64 segment ids from an array or a torch tensor."""
    if hasattr(ids, "detach"):
        ids = ids.detach().cpu().numpy()
    return np.asarray(ids).astype(np.int64)


def resize_ids(ids, size) -> np.ndarray:
    """(h, w) -> size (H, W) by nearest neighbour: ids are labels, never mixed."""
    (h, w), (H, W) = ids.shape, size
    rows = np.minimum((np.arange(H) + 0.5) * h / H, h - 1).astype(np.int64)
    cols = np.minimum((np.arange(W) + 0.5) * w / W, w - 1).astype(np.int64)
    return ids[rows][:, cols]


def resize_image(image, size) -> np.ndarray:
    """(h, w, 3) -> size (H, W): integer enlargements by nearest neighbour (the pixels stay
    aligned with the id map's), anything else by Pillow's bilinear / box filter."""
    (h, w), (H, W) = image.shape[:2], size
    if (H, W) == (h, w):
        return image
    if H % h == 0 and W % w == 0 and H // h == W // w:
        return np.repeat(np.repeat(image, H // h, axis=0), W // w, axis=1)
    return np.asarray(Image.fromarray(image).resize((W, H), Image.BILINEAR if H > h else Image.BOX))


MIN_SHORT_SIDE = 320  # px of a panel's short side: small images are enlarged to reach it
MAX_LONG_SIDE = 1024  # px of a panel's long side: large ones are reduced to it


def display_scale(h, w) -> float:
    """The factor a panel of h x w pixels is drawn at: the smallest integer bringing the short
    side to MIN_SHORT_SIDE (a 128 x 128 image: 3), 1 for ordinary sizes, a reduction for huge ones."""
    short, long = min(h, w), max(h, w)
    if short < MIN_SHORT_SIDE:
        return max(1, min(math.ceil(MIN_SHORT_SIDE / short), MAX_LONG_SIDE // long))
    return min(1.0, MAX_LONG_SIDE / long)


def boundaries(ids) -> np.ndarray:
    """(H, W) bool: pixels with a 4-neighbour of another id, on both sides of every edge."""
    edge = np.zeros(ids.shape, dtype=bool)
    vertical, horizontal = ids[:-1] != ids[1:], ids[:, :-1] != ids[:, 1:]
    edge[:-1] |= vertical
    edge[1:] |= vertical
    edge[:, :-1] |= horizontal
    edge[:, 1:] |= horizontal
    return edge


def interior_points(ids) -> dict:
    """Segment id -> (y, x, depth): a pixel farthest from the segment's border and the image's
    edge (city-block distance, `depth` pixels), a place for its label. Found by eroding all
    segments at once, so a ring's point lies on the ring, not in its hole as a centroid would."""
    alive = np.zeros(ids.shape, dtype=bool)  # pixels whose 4 neighbours are inside and alike
    alive[1:-1, 1:-1] = ((ids[1:-1, 1:-1] == ids[:-2, 1:-1]) & (ids[1:-1, 1:-1] == ids[2:, 1:-1])
                         & (ids[1:-1, 1:-1] == ids[1:-1, :-2]) & (ids[1:-1, 1:-1] == ids[1:-1, 2:]))
    depth = np.zeros(ids.shape, dtype=np.int32)
    while alive.any():
        depth += alive
        inner = np.zeros_like(alive)
        inner[1:-1, 1:-1] = (alive[1:-1, 1:-1] & alive[:-2, 1:-1] & alive[2:, 1:-1]
                             & alive[1:-1, :-2] & alive[1:-1, 2:])
        alive = inner
    order = np.lexsort((depth.ravel(), ids.ravel()))  # by id, then depth: the last of each id is deepest
    flat_ids = ids.ravel()[order]
    last = np.flatnonzero(np.r_[flat_ids[1:] != flat_ids[:-1], True])
    ys, xs = np.divmod(order[last], ids.shape[1])
    return {int(i): (int(y), int(x), int(d)) for i, y, x, d in
            zip(flat_ids[last], ys, xs, depth.ravel()[order[last]])}


# ---- one segmentation -------------------------------------------------------------------------


def blend(image, color, alpha):
    """What draw_segmentation paints inside a segment: (1 - alpha) image + alpha colour, rounded."""
    return np.floor(np.asarray(image, dtype=np.float64) * (1 - alpha)
                    + np.asarray(color, dtype=np.float64) * alpha + 0.5).astype(np.uint8)


def segment_labels(segment, categories) -> list:
    """What may be written on a segment, longest first: its category's name (less COCO's
    "-merged"; the legend keeps it) with its score where it has one, the name alone, shortened
    (a numbered "class k" to k)."""
    name = category_name(segment["category_id"], categories).removesuffix("-merged")
    labels = [f"{name} {segment['score']:.0%}"] if segment.get("score") is not None else []
    labels.append(name)
    if name == f"class {int(segment['category_id'])}":  # a numbered class: its number
        return labels + [str(int(segment["category_id"]))]
    return labels + [name[:n] + "." for n in (7, 3) if len(name) > n + 1]


def draw_segmentation(image, ids, segments, categories=None, *, scale=1, alpha=0.55,
                      labels=True, font_size=13) -> np.ndarray:
    """The image with its segments painted in, drawn `scale` times its size: (round(h scale),
    round(w scale), 3) uint8.

    image: (h, w, 3) array or (3, h, w) tensor (resized to the id map if it differs); ids: (h, w)
    segment ids, 0 void; segments: COCO panoptic segments_info entries ({"id", "category_id"},
    optional "isthing", "score"), ids not among them left unpainted. Each segment is blended with
    its colour (segment_colors), every segment border outlined in white or near-black, whichever
    stands out on that side of it, and each segment large enough named on a filled box at its
    interior point; a name that does not fit is shortened, then left out, as is one that would
    cover a label already placed (larger segments are labelled first)."""
    ids = as_ids(ids)
    image = as_rgb(image)
    h, w = ids.shape
    if image.shape[:2] != (h, w):
        image = resize_image(image, (h, w))
    H, W = max(1, round(h * scale)), max(1, round(w * scale))
    big_ids = resize_ids(ids, (H, W))  # (H, W)
    out = resize_image(image, (H, W)).copy()  # (H, W, 3)

    categories = category_table(categories)
    present = set(np.unique(ids).tolist())
    segments = [s for s in segments if int(s["id"]) in present and int(s["id"]) != 0]
    colors = segment_colors(segments, categories)
    values, index = np.unique(big_ids, return_inverse=True)  # paint through a table: one pass
    painted = np.array([int(v) in colors for v in values])
    lut = np.array([colors.get(int(v), (0, 0, 0)) for v in values], dtype=np.uint8).reshape(-1, 3)
    index = index.reshape(H, W)
    inside = painted[index]
    out[inside] = blend(out[inside], lut[index[inside]], alpha)

    edge = boundaries(big_ids)
    light = luminance(out) >= 140
    out[edge & light] = _DARK
    out[edge & ~light] = _WHITE

    if labels and segments:
        out = _draw_labels(out, ids, segments, colors, categories, scale, font_size)
    return out


def _draw_labels(out, ids, segments, colors, categories, scale, font_size):
    """Names on filled boxes at the segments' interior points (see draw_segmentation)."""
    h, w = ids.shape
    stride = max(1, math.ceil(max(h, w) / 400))  # the interior search on a reduced map: fast on big images
    points = interior_points(ids[::stride, ::stride])
    pixel = stride * scale  # display pixels per pixel of the reduced map
    canvas = Image.fromarray(out)
    draw = ImageDraw.Draw(canvas)
    (font,), _ = _fonts((font_size,))
    areas = {int(s["id"]): 0 for s in segments}
    values, counts = np.unique(ids, return_counts=True)
    for v, c in zip(values.tolist(), counts.tolist()):
        if v in areas:
            areas[v] = c
    placed = []
    for s in sorted(segments, key=lambda s: -areas[int(s["id"])]):
        sid = int(s["id"])
        if sid not in points:
            continue  # too thin to survive the reduction
        y, x, depth = points[sid]
        cy, cx = (y + 0.5) * pixel, (x + 0.5) * pixel
        radius = (depth + 0.5) * pixel  # display pixels from the point to the segment's border
        run = _run_length(ids[y * stride], x * stride, sid) * scale  # the segment's width at the point
        for text in segment_labels(s, categories):
            tw, th = _text_size(draw, text, font)
            bw, bh = tw + 6, th + 4
            if bh <= 2 * radius + 2 and bw <= 1.5 * run + 8 and bw * bh <= areas[sid] * scale * scale:
                break
        else:
            continue  # nothing fits: a tiny segment keeps no label
        x0 = max(0, min(round(cx - bw / 2), out.shape[1] - bw))  # inside the picture where it can be
        y0 = max(0, min(round(cy - bh / 2), out.shape[0] - bh))
        box = (x0, y0, x0 + bw, y0 + bh)
        if any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
            continue
        placed.append(box)
        color = tuple(int(c) for c in colors[sid])
        draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=color, outline=contrast_color(color))
        _text(draw, ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), text, font, "center-middle",
              contrast_color(color))
    return np.asarray(canvas)


def _run_length(row, x, sid) -> int:
    """Length of the run of `sid` through position x of a row of ids."""
    other = np.flatnonzero(row != sid)
    left = other[other < x]
    right = other[other > x]
    return int((right[0] if right.size else row.size) - (left[-1] + 1 if left.size else 0))


# ---- panels side by side, titles and a legend -------------------------------------------------


def legend_entries(panels, categories=None) -> list:
    """The categories the panels show (segments whose id is in their map), things first, each
    {"id", "name", "isthing", "color"}, sorted by id within each kind."""
    table = category_table(categories)
    found = {}
    for _, _, ids, segments in panels:
        if ids is None or segments is None:
            continue
        present = set(np.unique(as_ids(ids)).tolist())
        for s in segments:
            if int(s["id"]) in present and int(s["id"]) != 0:
                c = int(s["category_id"])
                found[c] = found.get(c, False) or is_thing(s, table)
    return [{"id": c, "name": category_name(c, table), "isthing": thing, "color": category_color(c, table)}
            for c, thing in sorted(found.items(), key=lambda item: (not item[1], item[0]))]


MARGIN, GAP = 10, 8  # px around the canvas and between panels


def draw_panels(panels, categories=None, *, title=None, scale=None, font_size=13) -> np.ndarray:
    """(H, W, 3) uint8: panels side by side under their titles, a legend of the categories shown
    below them, the whole under `title` if given.

    panels: [(title, image, ids or None, segments or None)]: with ids, draw_segmentation of the
    image; without, the image alone. Each is drawn at display_scale of its size (or `scale`)."""
    (small, normal, large), _ = _fonts((font_size, font_size + 2, font_size + 4))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pictures = []
    for name, image, ids, segments in panels:
        image = as_rgb(image)
        size = as_ids(ids).shape if ids is not None else image.shape[:2]
        k = scale if scale is not None else display_scale(*size)
        if ids is not None:
            pictures.append(draw_segmentation(image, ids, segments or [], categories, scale=k, font_size=font_size))
        else:
            pictures.append(resize_image(image, (max(1, round(size[0] * k)), max(1, round(size[1] * k)))))

    line = _text_size(measure, "Ag", normal)[1] + 8  # height of a title row
    panels_width = sum(p.shape[1] for p in pictures) + GAP * (len(pictures) - 1)
    title_height = _text_size(measure, "Ag", large)[1] + 10 if title else 0
    width = 2 * MARGIN + max(panels_width, _text_size(measure, title, large)[0] if title else 0)
    entries = legend_entries(panels, categories)
    rows = _legend_rows(measure, entries, small, width - 2 * MARGIN)
    row_height = max(16, _text_size(measure, "Ag", small)[1] + 6)
    legend_height = len(rows) * row_height + (8 if rows else 0)
    top = MARGIN + title_height + line
    height = top + max(p.shape[0] for p in pictures) + legend_height + MARGIN

    canvas = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(canvas)
    if title:
        _text(draw, (width / 2, MARGIN), title, large, "center-top")
    x = MARGIN + (width - 2 * MARGIN - panels_width) // 2
    for (name, *_), picture in zip(panels, pictures):
        _text(draw, (x + picture.shape[1] / 2, MARGIN + title_height + line / 2), name or "", normal, "center-middle")
        canvas.paste(Image.fromarray(picture), (x, top))
        x += picture.shape[1] + GAP
    y = top + max(p.shape[0] for p in pictures) + 8
    for row in rows:
        for x, entry, text in row:
            swatch = 12
            y0 = y + (row_height - swatch) // 2
            draw.rectangle([MARGIN + x, y0, MARGIN + x + swatch - 1, y0 + swatch - 1],
                           fill=tuple(int(c) for c in entry["color"]), outline=_DARK)
            _text(draw, (MARGIN + x + swatch + 5, y + row_height / 2), text, small, "left-middle")
        y += row_height
    return np.asarray(canvas)


def _legend_rows(draw, entries, font, width):
    """Legend entries laid out in rows of at most `width` px: [[(x, entry, text)]]; things and
    stuff start rows of their own, stuff names marked "(stuff)" once both kinds are shown."""
    both = len({e["isthing"] for e in entries}) > 1
    rows, x, kind = [], width, None
    for entry in entries:
        text = entry["name"] + (" (stuff)" if both and not entry["isthing"] else "")
        w = 12 + 5 + _text_size(draw, text, font)[0] + 16
        if x + w > width or entry["isthing"] != kind:
            rows.append([])
            x = 0
        rows[-1].append((x, entry, text))
        x += w
        kind = entry["isthing"]
    return rows


def save_picture(path, picture):
    """Write a PNG (an array or a PIL image) whole or not at all: a temporary file, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(picture) if isinstance(picture, np.ndarray) else picture
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        picture.save(temporary, format="PNG")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_visualization(path, image, gt_ids, gt_segments, pred_ids, pred_segments, categories=None,
                       title=None):
    """One PNG: image | ground truth | prediction, with a legend (the evaluation's pictures).
    image: (3, h, w) tensor or (h, w, 3) array, resized to the ground truth's size; segments carry
    dataset category ids; categories None: names "class <id>" and palette colours."""
    gt_ids = as_ids(gt_ids)
    image = as_rgb(image)
    if image.shape[:2] != gt_ids.shape:
        image = resize_image(image, gt_ids.shape)
    panels = [("image", image, None, None), ("ground truth", image, gt_ids, gt_segments),
              ("prediction", image, pred_ids, pred_segments)]
    save_picture(path, draw_panels(panels, categories, title=title))


def save_prediction(path, image, ids, segments, categories=None, title=None):
    """One PNG: image | prediction, with a legend (`evaluate.py predict`)."""
    ids = as_ids(ids)
    image = as_rgb(image)
    if image.shape[:2] != ids.shape:
        image = resize_image(image, ids.shape)
    save_picture(path, draw_panels([("image", image, None, None), ("prediction", image, ids, segments)],
                                   categories, title=title))


# ---- the PQ-vs-GFLOPs plot (ECO-M2F Fig. 5) ---------------------------------------------------


# Drawn with Pillow alone (no plotting library in requirements.txt).
SWEEP_PLOT_SIZE = (800, 560)  # width, height in pixels


def beta_text(beta) -> str:
    """β as the papers print it: 0.003, 0.0005, 0.01 (no trailing zeros)."""
    return f"{beta:g}" if isinstance(beta, (int, float)) else str(beta)


_BLUE, _RED, _GRID = (31, 119, 180), (214, 39, 40), (225, 225, 225)


def nice_axis(values, ticks=5, minimum=None):
    """(low, high, step) of an axis showing `values`: step is 1, 2 or 5 times a power of ten,
    giving about `ticks` intervals, and low/high are multiples of it with a margin around the data;
    low stays >= minimum (PQ and GFLOPs are never negative)."""
    low, high = min(values), max(values)
    span = high - low
    if span == 0:  # one point, or all equal (an untrained model's PQ of 0): a small window around it
        span = abs(high) * 0.1 or 1.0
        low, high = low - span / 2, high + span / 2
    low, high = low - 0.08 * span, high + 0.08 * span
    if minimum is not None:
        low = max(low, minimum)
    raw = (high - low) / ticks
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))
    return math.floor(low / step) * step, math.ceil(high / step) * step, step


def _tick_labels(low, high, step):
    """(value, label) of every tick, with as many decimals as the step needs."""
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    count = round((high - low) / step)
    return [(low + i * step, f"{low + i * step:.{decimals}f}") for i in range(count + 1)]


def _dot(draw, xy, r=5):
    draw.ellipse([xy[0] - r, xy[1] - r, xy[0] + r, xy[1] + r], fill=_BLUE)


def _cross(draw, xy, r=6):
    draw.line([(xy[0] - r, xy[1] - r), (xy[0] + r, xy[1] + r)], fill=_RED, width=3)
    draw.line([(xy[0] - r, xy[1] + r), (xy[0] + r, xy[1] - r)], fill=_RED, width=3)


def _axes(image, draw, box, x_axis, y_axis, fonts, title, x_label="total GFLOPs (mean per image)",
          y_label="PQ", x_ticks=None):
    """Grid, ticks and their labels (x_ticks: [(value, label)] instead of nice ones), the frame
    over them, the title and the axis labels."""
    (left, top, right, bottom), (small, normal, large) = box, fonts
    width, height = image.size

    def at(x, y):
        return (left + (x - x_axis[0]) / (x_axis[1] - x_axis[0]) * (right - left),
                bottom - (y - y_axis[0]) / (y_axis[1] - y_axis[0]) * (bottom - top))

    for value, label in _tick_labels(*x_axis) if x_ticks is None else x_ticks:
        x = at(value, y_axis[0])[0]
        draw.line([(x, top), (x, bottom)], fill=_GRID)
        draw.line([(x, bottom), (x, bottom + 5)], fill=_INK)
        _text(draw, (x, bottom + 8), label, small, "center-top")
    for value, label in _tick_labels(*y_axis):
        y = at(x_axis[0], value)[1]
        draw.line([(left, y), (right, y)], fill=_GRID)
        draw.line([(left - 5, y), (left, y)], fill=_INK)
        _text(draw, (left - 8, y), label, small, "right-middle")
    draw.rectangle([left, top, right, bottom], outline=_INK)
    _text(draw, ((left + right) / 2, 18), title, large, "center-top")
    _text(draw, ((left + right) / 2, height - 22), x_label, normal, "center-bottom")
    label = Image.new("RGB", (160, 24), "white")  # the y label, drawn level and turned upright
    _text(ImageDraw.Draw(label), (80, 12), y_label, normal, "center-middle")
    image.paste(label.rotate(90, expand=True), (12, int((top + bottom) / 2 - 80)))
    return at


def plot_sweep(rows, path, title="PQ vs. GFLOPs"):
    """PQ against mean total GFLOPs, as ECO-M2F's Fig. 5: the fixed exits as blue dots joined by a
    line (in exit order) and labelled with k, the gates as red crosses labelled with β (or their
    name), with axes, ticks, grid, title and legend. Rows without PQ or GFLOPs are left out.
    Writes an RGB PNG of SWEEP_PLOT_SIZE."""
    width, height = SWEEP_PLOT_SIZE
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    (small, normal, large), beta = _fonts((13, 15, 18))
    box = left, top, right, bottom = 90, 55, width - 200, height - 75  # the plot area; the legend goes right of it
    points = [r for r in rows if r["PQ"] is not None and r["total_GFLOPs"] is not None]
    x_axis = nice_axis([r["total_GFLOPs"] for r in points] or [0.0, 1.0], minimum=0)
    y_axis = nice_axis([r["PQ"] for r in points] or [0.0, 1.0], minimum=0)
    at = _axes(image, draw, box, x_axis, y_axis, (small, normal, large), title)

    fixed = sorted((r for r in points if r["kind"] == "exit"), key=lambda r: r["exit"])
    if len(fixed) > 1:
        draw.line([at(r["total_GFLOPs"], r["PQ"]) for r in fixed], fill=_BLUE, width=2)
    for r in fixed:
        xy = at(r["total_GFLOPs"], r["PQ"])
        _dot(draw, xy)
        _text(draw, (xy[0] - 6, xy[1] - 6), str(r["exit"]), small, "right-bottom", _BLUE)  # clear of the line
    for r in points:
        if r["kind"] == "gate":
            xy = at(r["total_GFLOPs"], r["PQ"])
            _cross(draw, xy)
            text = r["name"] if r["beta"] is None else f"{beta}={beta_text(r['beta'])}"
            _text(draw, (xy[0] + 9, xy[1] - 4), text, small, "left-bottom", _RED)  # gates tend to sit above the curve
    if not points:
        _text(draw, ((left + right) / 2, (top + bottom) / 2), "no rows with PQ and GFLOPs", normal, "center-middle")

    # Legend, right of the plot area.
    x0, y0 = right + 20, top + 10
    draw.rectangle([x0, y0, width - 15, y0 + 62], outline=_INK)
    draw.line([(x0 + 10, y0 + 18), (x0 + 40, y0 + 18)], fill=_BLUE, width=2)
    _dot(draw, (x0 + 25, y0 + 18))
    _text(draw, (x0 + 50, y0 + 18), "fixed exit k", normal, "left-middle")
    _cross(draw, (x0 + 25, y0 + 44))
    _text(draw, (x0 + 50, y0 + 44), f"gate ({beta})", normal, "left-middle")
    save_picture(path, image)


# ---- ECO-M2F's exit histograms ----------------------------------------------------------------


HISTOGRAM_PLOT_SIZE = (900, 440)  # width, height in pixels
_SERIES = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75))


def series_color(k):
    return _SERIES[k] if k < len(_SERIES) else tuple(int(c) for c in palette_color(k))


def plot_exit_histograms(histograms, path, exits=None, title="Exits chosen by the gate"):
    """A grouped bar chart of where each gate sends the images: histograms is {name: {exit:
    count}} (exits as ints or, read back from JSON, strings); per exit one bar per gate, its
    height the gate's share of images (%), its count written above. exits: the exits on the x
    axis (e.g. all the model's, so that unused ones show); default those in the histograms.
    Writes an RGB PNG of HISTOGRAM_PLOT_SIZE."""
    width, height = HISTOGRAM_PLOT_SIZE
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    (small, normal, large), _ = _fonts((13, 15, 18))
    box = left, top, right, bottom = 90, 55, width - 300, height - 75  # the legend's names on the right
    exits = sorted({int(k) for h in histograms.values() for k in h} | {int(e) for e in exits or ()})
    shares = {name: {int(k): 100.0 * v / max(1, sum(h.values())) for k, v in h.items()} for name, h in histograms.items()}
    counts = {name: {int(k): int(v) for k, v in h.items()} for name, h in histograms.items()}
    x_axis = (0.5, max(1, len(exits)) + 0.5, 1)
    y_axis = (0.0, 120.0, 20.0)  # shares of images, room above a full bar for its count
    at = _axes(image, draw, box, x_axis, y_axis, (small, normal, large), title, "exit k",
               "images (%)", [(i + 1, str(e)) for i, e in enumerate(exits)])
    bar = 0.8 / max(1, len(histograms))  # of one exit's slot
    for g, name in enumerate(histograms):
        for i, e in enumerate(exits):
            if counts[name].get(e, 0) == 0:
                continue
            x0 = at(i + 0.6 + g * bar, 0)[0]
            x1, y1 = at(i + 0.6 + (g + 1) * bar, shares[name][e])
            draw.rectangle([x0 + 1, y1, x1 - 1, bottom - 1], fill=series_color(g))
            if x1 - x0 >= 14:
                _text(draw, ((x0 + x1) / 2, y1 - 2), str(counts[name][e]), small, "center-bottom")
    if not exits:
        _text(draw, ((left + right) / 2, (top + bottom) / 2), "no images", normal, "center-middle")

    x0, y0 = right + 20, top + 10  # legend, right of the plot area
    for g, name in enumerate(histograms):
        y = y0 + 10 + 24 * g
        draw.rectangle([x0, y - 6, x0 + 12, y + 6], fill=series_color(g))
        _text(draw, (x0 + 20, y), str(name), normal, "left-middle")
    save_picture(path, image)
