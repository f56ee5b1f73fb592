"""The report of several evaluations (`evaluate.py report`): one table on one image list, speed as
ratios measured in one process, and what the papers claim beside what the run shows.

    python evaluate.py report NAME=DIR [NAME=DIR ...] [--out report.md] [--speed-images N] [--rounds R]
                              [--threads T] [--image PICTURE ...] [--derived derived.jsonl]

Each DIR is an evaluation folder (evaluate.py, a sweep row, train.py's eval/); the first row is
the reference of every ratio (Mask2Former in the demo). Every row must have been evaluated on the
same images (the report refuses otherwise: PQ over different images does not compare). With
--speed-images N > 0 each row's model is rebuilt from what its metrics.json records (weights,
config, exit, gate file) and timed on the first N of those images at batch 1, from the uint8 image
to the post-processed outputs, every row once per round in a rotated order (metrics.interleaved_times),
on process CPU time with T threads: the table shows time / the first row's time, median and range
over the rounds, and for fixed-depth rows the encoder's own time ratio. Absolute FPS, which
depends on the machine and its load, stays in each metrics.json (evaluate.py prints it).
"""
import json
import os
import platform
from pathlib import Path

import torch

from config import atomic_write_text, config_from_dict, load_weights
from data import build_dataset
from gate import exit_targets, load_gate, read_derived
from metrics import end_to_end, interleaved_times, ratio_summary
from model import build_model
from visualize import plot_exit_histograms

# What the papers report for the effect each part of the demo shows (COCO/Cityscapes val, R50).
PROSCALE_CLAIM = ("PRO-SCALE Table 1 (COCO, R50): (1,1,1) has 30.25 encoder GFLOPs against M2F's 135.00 "
                  "(ratio 0.22) at PQ 50.31 against 51.73 (-1.42)")
ECO_CLAIM = ("ECO-M2F Table 2 (Cityscapes, R50): the gate runs 220.59 encoder GFLOPs on average against "
             "M2F's 281.13 (ratio 0.78) at PQ 62.20 against 61.86 (+0.34); its Fig. 5: the gate's points lie "
             "above the line of the fixed exits")
FLAT_PQ = 0.5  # fixed exits within this many PQ points of each other leave a gate nothing to trade


# ---- the rows ---------------------------------------------------------------------------------------


def read_row(spec):
    """NAME=DIR -> {"name", "folder", "metrics", "image_ids"}; the image ids are those of the
    folder's predictions.json (the images the row was evaluated on)."""
    name, sep, folder = spec.rpartition("=")  # the last "=": a name may hold one (β=0.02)
    if not sep:
        raise ValueError(f"report: {spec!r} is not NAME=DIR")
    path = Path(folder) / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
        predictions = json.loads((Path(folder) / "predictions.json").read_text())
    except FileNotFoundError as e:
        raise ValueError(f"report: {e.filename} does not exist (run evaluate.py on {folder} first)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a metrics file ({e})") from None
    ids = [a["image_id"] for a in predictions.get("annotations", [])]
    return {"name": name, "folder": Path(folder), "metrics": metrics, "image_ids": ids}


def check_same_images(rows):
    """All rows were evaluated on one image list, or a ValueError naming the rows that differ."""
    reference = set(rows[0]["image_ids"])
    for row in rows[1:]:
        if set(row["image_ids"]) != reference:
            raise ValueError(f"report: {row['name']} ({row['folder']}) was evaluated on {len(row['image_ids'])} "
                             f"images, {rows[0]['name']} on {len(reference)}, not the same ones; evaluate every row "
                             "on the same split and --max-images")


def encoder_name(row):
    return ((row["metrics"].get("source") or {}).get("config") or {}).get("model", {}).get("encoder", {}).get("name")


def gflops(row, part="total"):
    m = row["metrics"]
    return m.get("GFLOPs") if part == "total" else (m.get("GFLOPs_parts") or {}).get(part)


# ---- speed: every row's model, timed interleaved in this process ---------------------------------


def row_model(row, cache):
    """(model, exit, gate) of a row, rebuilt from its metrics.json source; models are shared
    between rows of the same weights and config."""
    source = row["metrics"].get("source") or {}
    if not source.get("weights") or not source.get("config"):
        raise ValueError(f"report: {row['folder']}/metrics.json records no weights and config to time")
    key = (source["weights"], json.dumps(source["config"], sort_keys=True))
    if key not in cache:
        cfg = config_from_dict(source["config"], where=f"{row['folder']}/metrics.json")
        model = build_model(cfg)
        load_weights(model, source["weights"])
        cache[key] = (cfg, model.eval())
    cfg, model = cache[key]
    exit = row["metrics"].get("exit")
    gate = None
    if exit == "gate":
        if not source.get("gate_file"):
            raise ValueError(f"report: {row['folder']}/metrics.json records no gate file to time")
        gate, exit = load_gate(source["gate_file"], model), None
    return cfg, model, exit, gate


@torch.no_grad()
def speed_ratios(rows, images=8, rounds=5, threads=1):
    """{name: {"model": (median, (min, max)), "encoder": ... or None}}: each row's time over the
    first `images` images of the shared list, as a ratio to the first row's, per round."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cache, whole, encoder, features = {}, {}, {}, {}
        cfg = row_model(rows[0], cache)[0]
        split = (rows[0]["metrics"].get("source") or {}).get("split") or "val"
        dataset = build_dataset(cfg.data, split=split, train=False)
        index = {img["id"]: k for k, img in enumerate(dataset.images)}
        wanted = [i for i in rows[0]["image_ids"] if i in index][:images]
        samples = [dataset[index[i]] for i in wanted]
        for row in rows:
            _, model, exit, gate = row_model(row, cache)
            whole[row["name"]] = lambda m=model, e=exit, g=gate: [end_to_end(m, s, e, g) for s in samples]
            if gate is None:  # the encoder alone, on backbone features computed once per model
                if id(model) not in features:
                    features[id(model)] = [model.backbone_features(model.preprocess([s["image"]])[0]) for s in samples]
                encoder[row["name"]] = lambda m=model, e=exit, f=features[id(model)]: [m.encoder(x, exit=e) for x in f]
        summary = ratio_summary(interleaved_times(whole, rounds=rounds), rows[0]["name"])
        base_encoder = rows[0]["name"] in encoder
        enc = ratio_summary(interleaved_times(encoder, rounds=rounds), rows[0]["name"]) if base_encoder else {}
        return {"images": len(samples), "rounds": rounds, "threads": threads, "split": split,
                "rows": {name: {"model": summary[name], "encoder": enc.get(name)} for name in whole}}
    finally:
        torch.set_num_threads(previous)


def machine() -> str:
    """The CPU this process runs on, for the speed figures' caption."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} logical CPUs"


# ---- the table and the findings -----------------------------------------------------------------------


def cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) and abs(value) >= 1 else f"{value:.3g}"


def ratio_cell(ratio) -> str:
    if ratio is None:
        return "-"
    median, (low, high) = ratio
    return f"{median:.2f} ({low:.2f}-{high:.2f})"


def histogram_cell(histogram) -> str:
    if not histogram:
        return "-"
    return " ".join(f"{k}:{n}" for k, n in sorted(histogram.items(), key=lambda kv: int(kv[0])))


def table(rows, speed=None) -> str:
    """The Markdown table: one row per evaluation, its image count, metrics, GFLOPs, time ratios."""
    header = ["model", "images", "PQ", "PQ_th", "PQ_st", "AP", "mIoU", "encoder GFLOPs", "total GFLOPs"]
    if speed:
        header += [f"time / {rows[0]['name']}", f"encoder time / {rows[0]['name']}"]
    header += ["exits (exit:images)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        m = row["metrics"]
        cells = [row["name"], str(len(row["image_ids"]))]
        cells += [cell(m.get(k)) for k in ("PQ", "PQ_th", "PQ_st", "AP", "mIoU")]
        cells += [cell(gflops(row, "encoder")), cell(gflops(row))]
        if speed:
            r = speed["rows"][row["name"]]
            cells += [ratio_cell(r["model"]), ratio_cell(r["encoder"])]
        cells.append(histogram_cell(m.get("exit_histogram")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def interpolate(points, x):
    """The piecewise-linear y at x through (x, y) points sorted by x (the end values outside)."""
    points = sorted(points)
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else max(y0, y1)
    return points[-1][1]


def proscale_findings(rows, speed):
    base, lines = rows[0], []
    for row in rows[1:]:
        if encoder_name(row) != "proscale":
            continue
        e0, e1, pq0, pq1 = gflops(base, "encoder"), gflops(row, "encoder"), base["metrics"]["PQ"], row["metrics"]["PQ"]
        measured = speed["rows"][row["name"]]["encoder"] if speed else None
        time_text = (f"its encoder takes {ratio_cell(measured)} of {base['name']}'s time (median, range over "
                     f"{speed['rounds']} rounds)") if measured else "its time was not measured (--speed-images 0)"
        cheaper = measured is not None and measured[0] < 1
        verdict = ("The run shows the effect: a cheaper encoder by FLOPs and by the clock, "
                   f"at a PQ change of {pq1 - pq0:+.2f}." if cheaper else
                   "The run does not show the speed effect on this machine.")
        lines.append(f"- **{row['name']}** against **{base['name']}**. Paper: {PROSCALE_CLAIM}. Here: encoder "
                     f"GFLOPs ratio {e1 / e0:.2f} ({e1:.3g} / {e0:.3g}), {time_text}, PQ {pq1:.2f} against "
                     f"{pq0:.2f} ({pq1 - pq0:+.2f}). {verdict}")
    return lines


def eco_findings(rows):
    """The ECO-M2F rows (fixed exits and gates of one set of weights): their points, the gates'
    histograms, and whether each gate lies above the fixed exits' PQ-vs-GFLOPs line."""
    by_weights = {}
    for row in rows:
        exit = row["metrics"].get("exit")
        if exit is not None:
            by_weights.setdefault((row["metrics"].get("source") or {}).get("weights"), []).append(row)
    lines = []
    for group in by_weights.values():
        fixed = [r for r in group if r["metrics"]["exit"] != "gate"]
        gates = [r for r in group if r["metrics"]["exit"] == "gate"]
        if not fixed:
            continue
        points = [(gflops(r), r["metrics"]["PQ"]) for r in fixed]
        listed = "; ".join(f"{r['name']}: {gflops(r):.3g} GFLOPs, PQ {r['metrics']['PQ']:.2f}" for r in fixed)
        lines.append(f"- **ECO-M2F**. Paper: {ECO_CLAIM}. Here, the fixed exits: {listed}.")
        spread = max(p for _, p in points) - min(p for _, p in points)
        if spread < FLAT_PQ:
            lines.append(f"  The fixed exits lie within {spread:.2f} PQ of each other: on this toy run depth "
                         "barely matters, so a gate has little to trade and the run does not show ECO-M2F's effect.")
        for g in gates:
            expected = interpolate(points, gflops(g))
            gain = g["metrics"]["PQ"] - expected
            verdict = "above" if gain > 0 else "not above"
            lines.append(f"  {g['name']}: {gflops(g):.3g} GFLOPs, PQ {g['metrics']['PQ']:.2f}, exits "
                         f"{histogram_cell(g['metrics'].get('exit_histogram'))}; the fixed exits' line gives PQ "
                         f"{expected:.2f} at that cost, so the gate is {verdict} it ({gain:+.2f}).")
    return lines


def best_exits(path):
    """Step B's per-image best exit at β = 0 (ties to the smallest exit), counted: {exit: images}."""
    _, exits, q = read_derived(path)
    best = exit_targets(q, exits, 0.0).tolist()
    return {k: best.count(i) for i, k in enumerate(exits)}


def derived_findings(path):
    """Step B's best exits at β = 0: how much depth the images of the derived set need, the
    spread a gate can exploit."""
    counts = best_exits(path)
    spread = sum(1 for n in counts.values() if n) > 1
    text = " ".join(f"{k}: {n}" for k, n in counts.items())
    return [f"- **Step B** ({sum(counts.values())} training images): the exit with the best PQ per image at β = 0 is "
            f"{text} (exit: images). " + ("The images differ in the depth they need." if spread else
                                          "Every image is best at one exit: the run shows no per-image difference.")]


def write_report(specs, out=None, speed_images=8, rounds=5, threads=1, pictures=(), derived=None):
    """The report of the evaluations `specs` (NAME=DIR): printed, and written to `out` (Markdown);
    `derived`: Step B's file, for its exit histogram."""
    rows = [read_row(spec) for spec in specs]
    check_same_images(rows)
    speed = speed_ratios(rows, speed_images, rounds, threads) if speed_images > 0 else None
    text = [table(rows, speed), ""]
    caption = f"All rows: the same {len(rows[0]['image_ids'])} images."
    if speed:
        caption += (f" Time: process CPU time of {speed['images']} {speed['split']} images at batch 1 "
                    f"(image to post-processed outputs), {speed['threads']} thread(s), {speed['rounds']} "
                    f"interleaved rounds, median (range) of the per-round ratio; on {machine()}.")
    text += [caption, ""]
    findings = proscale_findings(rows, speed) + (derived_findings(derived) if derived else []) + eco_findings(rows)
    if findings:
        text += ["What the papers claim and what this run shows:", "", *findings, ""]
    figures = [(row["name"], p) for row in rows for p in sorted((row["folder"] / "vis").glob("*.png"))[:1]]
    histograms = {r["name"]: r["metrics"]["exit_histogram"] for r in rows
                  if r["metrics"].get("exit") == "gate" and r["metrics"].get("exit_histogram")}
    if derived:
        histograms = {"Step B: best exit, β=0": best_exits(derived), **histograms}
    if out and histograms:  # where each gate sends the images, beside what Step B found they need
        exits = sorted({int(k) for h in histograms.values() for k in h})
        plot_exit_histograms(histograms, Path(out).with_name("exit_histograms.png"), exits=range(1, max(exits) + 1),
                             title="Exits: per-image best (Step B) and the gates' choices")
        figures.append(("exit histograms", Path(out).with_name("exit_histograms.png")))
    figures += [(Path(p).stem, Path(p)) for p in pictures]
    base = Path(out).resolve().parent if out else Path.cwd()  # links relative to the report: the folder can move
    text += [f"![{name}]({os.path.relpath(Path(p).resolve(), base)})" for name, p in figures]
    report = "\n".join(text).rstrip() + "\n"
    print(report)
    if out:
        atomic_write_text(out, report)
    return rows, speed
