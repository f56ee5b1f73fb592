"""The evaluation commands: a checkpoint on a split, ECO-M2F's sweep, GFLOPs, reports.

    python evaluate.py --config CFG --weights CKPT [--exit K | --gate gate.pt] [--out DIR] [--split val]
                       [--max-images N] [--batch-size B] [--device cpu|cuda] [key=value ...]

evaluates a checkpoint on a split (COCO panoptic format): panoptic predictions as PNGs + JSON,
PQ/SQ/RQ by panopticapi, mask AP by pycocotools, mIoU as detectron2's SemSegEvaluator, GFLOPs
and FPS; everything into DIR/metrics.json, with a few pictures in DIR/vis/. --exit K stops every
image's encoder after layer K; --gate lets an ECO-M2F gate (gate.py) pick each image's exit, and
GFLOPs become the mean of each image's own cost, with the histogram of the chosen exits.

    python evaluate.py sweep --config CFG --weights CKPT [--exits 1 2 3 ...] [--gates g1.pt ...]
                             --out DIR [--max-images N] [--split val] [--reuse] [key=value ...]

evaluates every fixed exit (default: all of them) and every gate into DIR/exit_<k>/ and
DIR/gate_<stem>/, then tabulates them (DIR/sweep.json, DIR/sweep.md, as ECO-M2F's Table 4) and
plots PQ against GFLOPs (DIR/sweep.png, as its Fig. 5).

    python evaluate.py flops --config CFG --size H W [--json] [--complete] [--exit K] [key=value ...]

prints the GFLOPs of one H x W image through the eval forward and post-processing, per part
(backbone, encoder, decoder, postprocess) and in total. No data and no weights are needed.

    python evaluate.py report NAME=DIR [NAME=DIR ...] [--out report.md]

tabulates the metrics.json of several evaluations. The measurements themselves are in
metrics.py (PQ, AP, mIoU, FPS, evaluate_dataset) and flops.py (the FLOP counter).

    python evaluate.py predict --weights CKPT --input a.jpg dir/ 'glob/*.png' --out DIR [--exit K | --gate G]
    python evaluate.py export --weights CKPT --size H W --format torch|onnx --out FILE

run a trained model on images without annotations (overlay pictures, COCO-panoptic PNGs and
JSON), and export its network; both are in predict.py. Every command that takes --weights reads
the config stored in them when --config is not given.
"""
import argparse
import json
import sys
from pathlib import Path

from config import atomic_write_text, load_config, load_run_config, run_command

COMMANDS = ("eval", "sweep", "flops", "report", "predict", "export")


# ---- the command line ---------------------------------------------------------------------------
#
# The parsers come first and import nothing heavy: `--help`, a wrong option and a config error
# answer before torch loads (which takes seconds, a minute on a busy machine).


def eval_parser():
    parser = argparse.ArgumentParser(
        prog="evaluate.py [eval]", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="`python evaluate.py flops -h` for the GFLOPs command, `python evaluate.py sweep -h` for ECO-M2F's "
               "exit and gate sweep.")
    add_weights_options(parser)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--exit", type=int, default=None, help="encoder exit k for every image (default: all layers)")
    which.add_argument("--gate", default=None,
                       help="ECO-M2F: a gate file from gate.py that picks each image's exit (not with --exit)")
    parser.add_argument("--out", default=None,
                        help="output folder (default, next to the weights: eval_<split>, eval_<split>_exit<k> "
                             "or eval_<split>_gate_<gate file stem>)")
    add_evaluation_options(parser, vis=4)
    parser.add_argument("--no-flops", action="store_true", help="do not count GFLOPs")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an evaluation of other weights or another config in --out")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return parser


def add_evaluation_options(parser, vis):
    """The options shared by the eval and sweep commands."""
    parser.add_argument("--split", default="val", choices=("train", "val"))
    parser.add_argument("--max-images", type=int, default=None, help="only the first N images")
    parser.add_argument("--batch-size", type=int, default=1)
    add_device_option(parser)
    parser.add_argument("--amp", default="fp32", choices=("fp32", "fp16", "bf16"), help="autocast for the forward")
    parser.add_argument("--workers", type=int, default=None, help="data loader processes (default: data.workers)")
    parser.add_argument("--vis", type=int, default=vis, help=f"pictures to draw per evaluation (default {vis})")
    parser.add_argument("--fps-images", type=int, default=10, help="images timed at batch 1 (0: no FPS)")


def sweep_parser():
    parser = argparse.ArgumentParser(
        prog="evaluate.py sweep",
        description="ECO-M2F's accuracy-cost trade-off: evaluate every fixed exit and every gate on one split; "
                    "DIR/sweep.json, sweep.md (as the paper's Table 4) and sweep.png (PQ vs. GFLOPs, as its Fig. 5).",
        epilog="Put key=value overrides after the other arguments, not right after --exits or --gates "
               "(those take every following value).")
    add_weights_options(parser, what="checkpoint (Step A's, trained with exits)")
    parser.add_argument("--exits", type=int, nargs="*", default=None,
                        help="fixed exits to evaluate (default: every one, 1..model.encoder.layers; "
                             "--exits alone: none)")
    parser.add_argument("--gates", nargs="+", default=[], help="gate files from gate.py (one per β)")
    parser.add_argument("--out", required=True, help="output folder")
    add_evaluation_options(parser, vis=0)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace rows evaluated with other weights or another config in --out")
    parser.add_argument("--reuse", action="store_true",
                        help="keep a row whose folder already has a matching metrics.json instead of evaluating again")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return parser


def flops_parser():
    parser = argparse.ArgumentParser(prog="evaluate.py flops",
                                     description="GFLOPs of one image of a given size (no data, no weights).")
    parser.add_argument("--config", help="YAML config (not with --table)")
    parser.add_argument("--table", action="store_true",
                        help="every model config (M2F, PRO-SCALE, Lite-M2F, RT-M2F) at the papers' sizes, beside "
                             "the papers' figures")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=[800, 1088],
                        help="image height and width (default 800 1088, COCO's test size for 4:3 images)")
    parser.add_argument("--exit", type=int, default=None, help="encoder exit k (default: all layers)")
    parser.add_argument("--complete", action="store_true",
                        help="also count the deformable sampling and the masked attention's QK^T")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return parser


def report_parser():
    parser = argparse.ArgumentParser(
        prog="evaluate.py report",
        description="One table from the metrics.json of several evaluations (the same images), speed as ratios "
                    "to the first row, and the papers' claims beside the run's.")
    parser.add_argument("runs", nargs="+", metavar="NAME=DIR", help="a row name and its evaluation folder")
    parser.add_argument("--out", help="also write the table (Markdown, with the pictures) to this file")
    parser.add_argument("--image", action="append", default=[], help="another picture for the report (repeatable)")
    parser.add_argument("--speed-images", type=int, default=8,
                        help="time every row's model on the first N images, interleaved (0: no timing)")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (each times every row once)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while timing")
    parser.add_argument("--derived", help="ECO-M2F Step B's derived.jsonl: report its per-image best exits at β = 0")
    return parser


def add_weights_options(parser, what="checkpoint: train.py's, a state dict, or an official .pkl"):
    parser.add_argument("--weights", required=True, help=what)
    parser.add_argument("--config", default=None,
                        help="YAML config (default: the config stored in the weights by train.py)")


def add_device_option(parser):
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")


def predict_parser():
    parser = argparse.ArgumentParser(
        prog="evaluate.py predict",
        description="Run a trained model on images (no annotations needed): per image an overlay picture and the "
                    "COCO-panoptic PNG, for all a COCO-panoptic JSON with class names and scores.")
    add_weights_options(parser)
    parser.add_argument("--input", nargs="+", required=True,
                        help="image files, folders and glob patterns (quote them: 'photos/*.jpg')")
    parser.add_argument("--out", required=True, help="output folder")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--exit", type=int, default=None, help="encoder exit k for every image (default: all layers)")
    which.add_argument("--gate", default=None, help="ECO-M2F: a gate file from gate.py that picks each image's exit")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward (images of one size)")
    add_device_option(parser)
    parser.add_argument("--instances", action="store_true", help="also write instances.json (COCO results, RLE)")
    parser.add_argument("--semantic", action="store_true", help="also write semantic/<name>.png (category ids)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier prediction in --out")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return parser


def export_parser():
    parser = argparse.ArgumentParser(
        prog="evaluate.py export",
        description="Export the network (image batch in, class and mask logits out) at a fixed size; "
                    "post-processing stays in Python (Mask2Former.inference).")
    add_weights_options(parser)
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), required=True,
                        help="the input size, multiples of model.size_divisibility (32)")
    parser.add_argument("--format", choices=("torch", "onnx"), default="torch",
                        help="torch: torch.export's .pt2; onnx: opset 18 (needs onnx, onnxscript)")
    parser.add_argument("--out", required=True, help="output file")
    parser.add_argument("--exit", type=int, default=None, help="encoder exit k (default: all layers)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return parser


PARSERS = {"eval": eval_parser, "sweep": sweep_parser, "flops": flops_parser, "report": report_parser,
           "predict": predict_parser, "export": export_parser}


def parse_args(argv=None):
    """(command, arguments) of `evaluate.py [command] ...` (the command defaults to eval). A
    --config is read and checked here too, so that its errors come before torch loads."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "eval"
    parser = PARSERS[command]()
    parser.add_argument("--debug", action="store_true", help="show the whole traceback of an error")
    args = parser.parse_args(argv)
    if getattr(args, "config", None) and command != "report":
        load_config(args.config, getattr(args, "overrides", []))
    return command, args


if __name__ == "__main__":  # answer --help, a bad option or config at once, before torch loads
    run_command(parse_args)

import torch  # noqa: E402  (after the command line, see above)


from encoders import check_exit
from config import load_weights
from data import check_device, with_dataset_classes
from flops import model_flops
from gate import load_gate
from metrics import evaluate_dataset, evaluation_source, gate_description, load_evaluation
from model import build_model
from predict import export_network, run_predict
from report import write_report
from visualize import beta_text, plot_sweep


# ---- command line --------------------------------------------------------------------------


def print_flops(cfg_path, size, flops, complete):
    convention = "complete (every op)" if complete else "papers' convention (fvcore)"
    print(f"GFLOPs of {cfg_path} at {size[0]}x{size[1]}, {convention}:")
    for part, value in flops.items():
        print(f"  {part:<12} {value:9.2f}")


def describe_exit(metrics) -> str:
    """"all layers", "exit 3" or "gate (β=0.01)" for a metrics dict."""
    if metrics["exit"] == "gate":
        beta = (metrics.get("gate") or {}).get("beta")
        return "gate" if beta is None else f"gate (β={beta_text(beta)})"
    return "all layers" if metrics["exit"] is None else f"exit {metrics['exit']}"


def histogram_text(histogram) -> str:
    """{"1": 2, "3": 5} -> "1:2 3:5" (exit:images); "-" for None."""
    return "-" if not histogram else " ".join(f"{k}:{n}" for k, n in histogram.items())


def print_metrics(metrics, out_dir):
    def fmt(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    print(f"{metrics['images']} images, {describe_exit(metrics)}, {metrics['device']}:")
    print(f"  PQ {fmt(metrics['PQ'])}  PQ_th {fmt(metrics['PQ_th'])}  PQ_st {fmt(metrics['PQ_st'])}  "
          f"AP {fmt(metrics['AP'])}  mIoU {fmt(metrics['mIoU'])}  "
          f"GFLOPs {fmt(metrics['GFLOPs'])}  FPS {fmt(metrics['FPS'], 1)}")
    if metrics["exit"] == "gate":
        counts = metrics["exit_histogram"]
        print("  exits chosen by the gate: " + ", ".join(
            f"{k}: {n} ({100 * n / metrics['images']:.0f}%)" for k, n in counts.items()))
    print(f"  written to {out_dir}/metrics.json")


# The GFLOPs table is built from the configs that exist: every model of configs/coco and
# configs/cityscapes at its dataset's test size, grouped by backbone, each group's Mask2Former
# first (the reference of the reductions). COCO images are resized to short side 800 (long side
# <= 1333): the papers' COCO figures are those of a 4:3 image, 800x1067, padded to 800x1088.
# Cityscapes runs at 1024x2048. An ECO-M2F config is its Mask2Former with exits (the same
# network at full depth): `flops --config ... --exit K` counts it per exit.
FLOPS_SIZES = {"coco": (800, 1088), "cityscapes": (1024, 2048)}
BACKBONE_TITLES = {"resnet18": "R18", "resnet34": "R34", "resnet50": "R50", "resnet101": "R101",
                   "swin_t": "Swin-T", "swin_s": "Swin-S", "swin_b": "Swin-B", "swin_l": "Swin-L"}


def model_title(cfg) -> str:
    """A table row's name, from the config alone: "M2F", "PRO-SCALE (1,1,1)", "... no TRC", ..."""
    e = cfg.model.encoder
    branch = {"conv": "3x3 conv", "lpe_max": "LPE", "lpe_avg": "LPE (avg)", "none": "no res2"}[e.mask_branch]
    if e.name == "proscale":
        title = f"PRO-SCALE ({','.join(map(str, e.depths))})" + ("" if e.trc else ", no TRC")
        return title + ("" if e.mask_branch == "lpe_max" else f", {branch}")
    if e.name == "lite":  # the papers' (5+1)x1 is plain "Lite-M2F"
        per_block = e.layers // max(e.lite.blocks, 1)
        title = "Lite-M2F" + ("" if (e.layers, e.lite.blocks) == (6, 1) else f" ({per_block - 1}+1)x{e.lite.blocks}")
        return title + ("" if e.mask_branch == "conv" else f" + {branch}")
    if e.name == "rt":  # its mask features are at 1/8 ("none") unless a 1/4 branch is asked for
        return "RT-M2F" + ("" if e.mask_branch == "none" else f", 1/4 branch with {branch}")
    return e.name.upper() + ("" if e.mask_branch == "conv" else f", {branch}")


# The papers' (encoder, total) GFLOPs of each config's model, for the table: PRO-SCALE Tables 1, 2,
# 3 (C1, C2; encoder only), 4, 5, 6, 7 and ECO-M2F Tables 1, 2 (which repeat the Lite-M2F and RT-M2F
# figures; ECO-M2F prints Cityscapes M2F as 281.13 / 537.85 and Lite-M2F's total as 428.71).
# COCO figures are averages over the val images; Cityscapes images all have the table's size.
PAPER_GFLOPS = {
    "coco/m2f_swin_t.yaml": (117.00, 234.50), "coco/m2f_r50.yaml": (135.00, 229.10),
    "coco/proscale_111_swin_t.yaml": (22.89, 137.10), "coco/proscale_222_swin_t.yaml": (39.53, 154.40),
    "coco/proscale_333_swin_t.yaml": (56.18, 171.70), "coco/proscale_311_swin_t.yaml": (26.87, 138.70),
    "coco/proscale_131_swin_t.yaml": (32.29, 143.80), "coco/proscale_113_swin_t.yaml": (54.77, 164.70),
    "coco/proscale_111_r50.yaml": (30.25, 131.40), "coco/proscale_222_r50.yaml": (48.85, 148.80),
    "coco/proscale_333_r50.yaml": (67.45, 166.10), "coco/proscale_113_r50.yaml": (59.44, 158.60),
    "coco/lite_m2f_swin_t.yaml": (79.78, 188.00), "coco/lite_m2f_lpe_swin_t.yaml": (43.92, 154.60),
    "coco/rt_m2f_swin_t.yaml": (59.66, 158.30),
    "cityscapes/m2f_swin_t.yaml": (281.00, 537.80), "cityscapes/m2f_r50.yaml": (291.00, 524.10),
    "cityscapes/m2f_swin_s.yaml": (281.00, 724.30), "cityscapes/m2f_swin_b.yaml": (283.00, 1051.20),
    "cityscapes/m2f_swin_l.yaml": (287.00, 1949.70), "cityscapes/m2f_r101.yaml": (291.00, 679.70),
    "cityscapes/proscale_111_swin_t.yaml": (55.14, 311.90), "cityscapes/proscale_222_swin_t.yaml": (95.24, 352.00),
    "cityscapes/proscale_333_swin_t.yaml": (135.00, 392.10), "cityscapes/proscale_311_swin_t.yaml": (57.93, 314.70),
    "cityscapes/proscale_131_swin_t.yaml": (69.62, 326.30), "cityscapes/proscale_113_swin_t.yaml": (118.00, 374.80),
    "cityscapes/proscale_111_r50.yaml": (65.21, 298.10), "cityscapes/proscale_222_r50.yaml": (105.00, 338.20),
    "cityscapes/proscale_333_r50.yaml": (145.00, 378.30), "cityscapes/proscale_333_swin_s.yaml": (135.00, 578.50),
    "cityscapes/proscale_333_swin_b.yaml": (137.00, 905.40), "cityscapes/proscale_333_swin_l.yaml": (141.00, 1803.90),
    "cityscapes/proscale_333_r101.yaml": (145.00, 533.90),
    "cityscapes/ablation_c1_m2f_no_res2_swin_t.yaml": (132.00, None),
    "cityscapes/ablation_c2_proscale_111_conv_swin_t.yaml": (73.49, None),
    "cityscapes/lite_m2f_swin_t.yaml": (172.00, 428.70), "cityscapes/lite_m2f_lpe_swin_t.yaml": (94.69, 351.40),
    "cityscapes/rt_m2f_swin_t.yaml": (130.00, 361.10),
}


def paper_gflops(path):
    """{"encoder", "total"} the papers give for the model of config `path` (None where they give
    no figure), or None for a model they do not report."""
    figures = PAPER_GFLOPS.get(f"{Path(path).parent.name}/{Path(path).name}")
    return None if figures is None else dict(zip(("encoder", "total"), figures))


def flops_configs(root=Path(__file__).resolve().parent / "configs"):
    """(group, model title, size, config path) of every table row, each group's M2F first."""
    rows = []
    for dataset, size in FLOPS_SIZES.items():
        for path in sorted((root / dataset).glob("*.yaml")):
            cfg = load_config(path)
            if path.stem == "base" or cfg.train.exits:
                continue
            group = f"{'COCO' if dataset == 'coco' else 'Cityscapes'}, {BACKBONE_TITLES[cfg.model.backbone.name]}"
            reference = cfg.model.encoder.name == "m2f" and cfg.model.encoder.mask_branch == "conv"
            rows.append((group, not reference, model_title(cfg), size, path))
    order = list(dict.fromkeys(group for group, *_ in rows))  # groups in the order met
    rows.sort(key=lambda r: (order.index(r[0]), r[1], r[4].stem.startswith("ablation"), r[4].stem))  # ablations last
    return [(group, title, size, path) for group, _, title, size, path in rows]


def flops_table(complete=False):
    """Rows (group, model, size, gflops dict, the papers' figures or None) of every config, counted
    on the meta device."""
    rows = []
    for group, title, size, path in flops_configs():
        with torch.device("meta"):
            model = build_model(load_config(path))
        rows.append((group, title, size, model_flops(model, *size, complete=complete), paper_gflops(path)))
    return rows


def print_flops_table(rows):
    """Markdown: encoder and total GFLOPs with the change against each group's first row, then
    the papers' encoder and total figures ("-" where they give none)."""
    print("| dataset, backbone | model | size | encoder GFLOPs | encoder, papers' column | total GFLOPs "
          "| paper: encoder | paper: total |")
    print("|---|---|---|---|---|---|---|---|")
    reference = {}
    for group, name, size, g, paper in rows:
        ref = reference.setdefault(group, g)
        change = lambda part: "" if g is ref else f" ({100 * (g[part] / ref[part] - 1):+.2f}%)"  # noqa: E731
        figure = lambda part: "-" if paper is None or paper[part] is None else f"{paper[part]:.2f}"  # noqa: E731
        print(f"| {group} | {name} | {size[0]}x{size[1]} | {g['encoder']:.2f}{change('encoder')} | "
              f"{g['encoder_papers']:.2f} | {g['total']:.2f}{change('total')} | {figure('encoder')} | "
              f"{figure('total')} |")


def run_flops(args):
    if args.table:
        rows = flops_table(args.complete)
        if args.json:
            print(json.dumps([{"group": g, "model": n, "size": list(s), "gflops": f, "paper": p}
                              for g, n, s, f, p in rows]))
        else:
            print_flops_table(rows)
        return
    if not args.config:
        raise SystemExit("evaluate.py flops: --config is required (or --table)")
    cfg = load_config(args.config, args.overrides)
    if None in (cfg.model.num_classes, cfg.model.thing_classes):  # left to the dataset: read its JSON
        cfg = with_dataset_classes(cfg)
    with torch.device("meta"):  # shapes alone: no weights needed, any model counts in a second
        model = build_model(cfg)
    check_exit(model.encoder, args.exit, "--exit")
    result = model_flops(model, *args.size, complete=args.complete, **({} if args.exit is None else {"exit": args.exit}))
    if args.json:
        print(json.dumps({"size": list(args.size), "gflops": result}))
    else:
        print_flops(args.config, args.size, result, args.complete)


def load_model_and_gate(cfg, args, gate_paths=()):
    """The dataset and the model (weights loaded, strict) of an evaluation, and the gates of
    `gate_paths`, each checked against the model (its channels, its exits). Everything is
    checked before any image is read."""
    dataset, model = load_evaluation(cfg, args.config or args.weights, args.weights, args.split, args.device)
    return dataset, model, [load_gate(path, model) for path in gate_paths]


def run_eval(args):
    cfg = load_run_config(args.config, args.weights, args.overrides)
    with torch.device("meta"):  # shapes only, in a moment: refuse a wrong --exit before any loading
        check_exit(build_model(cfg).encoder, args.exit, "--exit")
    dataset, model, gates = load_model_and_gate(cfg, args, [args.gate] if args.gate else [])
    gate = gates[0] if gates else None
    if gate is not None:
        suffix = f"_gate_{Path(args.gate).stem}"
    else:
        suffix = "" if args.exit is None else f"_exit{args.exit}"
    out = args.out or Path(args.weights).parent / f"eval_{args.split}{suffix}"
    source = evaluation_source(cfg, args.weights, args.split, args.gate)
    check_evaluation_folder(out, source, args.overwrite)
    metrics = evaluate_dataset(model, dataset, out, batch_size=args.batch_size, exit=args.exit, gate=gate,
                               max_images=args.max_images, device=args.device, amp=args.amp,
                               workers=cfg.data.workers if args.workers is None else args.workers,
                               vis_images=args.vis, fps_images=args.fps_images, flops=not args.no_flops,
                               source=source)
    print_metrics(metrics, out)
    return metrics


def run_report(args):
    return write_report(args.runs, args.out, args.speed_images, args.rounds, args.threads, args.image, args.derived)


# ---- ECO-M2F's trade-off: every fixed exit and every gate on one split ----------------------
#
# `evaluate.py sweep` evaluates the model at each fixed exit k (the paper's "M2F w/ WSD exits always
# at the k-th layer", Fig. 5's blue dots) and with each gate (one per β, its red crosses) into
#   DIR/exit_<k>/, DIR/gate_<stem>/   evaluate_dataset's folders (metrics.json, predictions, ...)
#   DIR/sweep.json                    one row per evaluation (SWEEP_ROW_KEYS)
#   DIR/sweep.md                      the rows as a Markdown table, like the paper's Table 4
#   DIR/sweep.png                     PQ against mean total GFLOPs, like the paper's Fig. 5
# One model and one dataset serve every row; --reuse keeps rows whose metrics.json is already there.

SWEEP_ROW_KEYS = ("name", "kind", "exit", "beta", "gate", "dir", "images", "PQ", "AP", "mIoU",
                  "encoder_GFLOPs", "total_GFLOPs", "FPS", "exit_histogram")


def sweep_row(name, kind, metrics, folder, exit=None, gate_path=None) -> dict:
    """One sweep.json row from an evaluation's metrics. kind: "exit" (exit = k) or "gate" (beta
    from the gate's training info, None if it has none). GFLOPs are means over the images."""
    parts = metrics.get("GFLOPs_parts") or {}
    return {"name": name, "kind": kind, "exit": exit if kind == "exit" else None,
            "beta": (metrics.get("gate") or {}).get("beta") if kind == "gate" else None,
            "gate": None if gate_path is None else str(gate_path), "dir": str(folder),
            "images": metrics.get("images"), "PQ": metrics.get("PQ"), "AP": metrics.get("AP"),
            "mIoU": metrics.get("mIoU"), "encoder_GFLOPs": parts.get("encoder"),
            "total_GFLOPs": metrics.get("GFLOPs"), "FPS": metrics.get("FPS"),
            "exit_histogram": metrics.get("exit_histogram")}


def _cell(value) -> str:
    """Two decimals as in the papers' tables, but 3 significant digits below 1, so that the GFLOPs
    of a tiny model (0.0156 vs 0.0199) stay apart."""
    if value is None:
        return "-"
    return f"{value:.2f}" if value == 0 or abs(value) >= 1 else f"{value:.3g}"


def sweep_table(rows) -> str:
    """The rows as Markdown: PQ, AP, mIoU, encoder and total GFLOPs, FPS (the paper's Table 4),
    and how many images took each exit."""
    lines = ["| model | PQ | AP | mIoU | encoder GFLOPs | total GFLOPs | FPS | exits (exit:images) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [row[k] for k in ("PQ", "AP", "mIoU", "encoder_GFLOPs", "total_GFLOPs", "FPS")]
        lines.append(f"| {row['name']} | " + " | ".join(_cell(v) for v in cells)
                     + f" | {histogram_text(row['exit_histogram'])} |")
    return "\n".join(lines)


def stored_metrics(folder):
    """folder/metrics.json as a dict; None when it is missing or broken (then never trusted)."""
    try:
        metrics = json.loads((Path(folder) / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return metrics if isinstance(metrics, dict) else None


def check_evaluation_folder(folder, source, overwrite):
    """An evaluation folder already holding the results of other weights or another config is
    replaced only with --overwrite (the same source may be evaluated again: same results)."""
    path = Path(folder) / "metrics.json"
    if overwrite or not path.is_file():
        return
    if (stored_metrics(folder) or {}).get("source") != source:
        raise FileExistsError(f"{path}: holds an evaluation of other weights or another config; pass --overwrite "
                              "to replace it, or choose another --out")


def _reusable(folder, images, exit, gate, source):
    """The metrics in folder/metrics.json if they are those of this row (same source, number of
    images, exit or gate description, GFLOPs counted), else None."""
    metrics = stored_metrics(folder)
    same = (metrics is not None and metrics.get("source") == source and metrics.get("images") == images
            and metrics.get("GFLOPs") is not None
            and metrics.get("exit") == ("gate" if gate is not None else exit)
            and (gate is None or metrics.get("gate") == gate_description(gate)))
    return metrics if same else None


def sweep_runs(args, model, gates, out):
    """(name, exit, gate, folder, gate path) of every row: the fixed exits, then the gates."""
    exits = list(range(1, model.encoder.num_exits + 1)) if args.exits is None else list(dict.fromkeys(args.exits))
    check_exit(model.encoder, exits or None, "--exits")
    runs = [(f"exit {k}", k, None, out / f"exit_{k}", None) for k in exits]
    for path, gate in zip(args.gates, gates):
        folder = out / f"gate_{Path(path).stem}"
        clash = next((r[4] for r in runs if r[3] == folder), None)
        if clash is not None:
            raise ValueError(f"--gates: {clash} and {path} would both be evaluated into {folder}; rename one")
        beta = gate.info.get("beta")
        runs.append((Path(path).stem if beta is None else f"β={beta_text(beta)}", None, gate, folder, path))
    if not runs:
        raise ValueError("sweep: nothing to evaluate (no --exits and no --gates)")
    return runs


def run_sweep(args):
    """Evaluate the fixed exits and the gates with one model, then write the table and the plot."""
    cfg = load_run_config(args.config, args.weights, args.overrides)
    for path in args.gates:
        if "=" in Path(path).name and not Path(path).exists():
            raise ValueError(f"--gates {path}: no such gate file (a key=value override right after "
                             "--gates is taken for a gate; put overrides last)")
    dataset, model, gates = load_model_and_gate(cfg, args, args.gates)
    out = Path(args.out)
    runs = sweep_runs(args, model, gates, out)
    sources = [evaluation_source(cfg, args.weights, args.split, run[4]) for run in runs]
    for run, source in zip(runs, sources):  # before anything is evaluated
        check_evaluation_folder(run[3], source, args.overwrite)
    images = len(dataset) if args.max_images is None else min(args.max_images, len(dataset))
    rows = []
    for (name, exit, gate, folder, gate_path), source in zip(runs, sources):
        metrics = _reusable(folder, images, exit, gate, source) if args.reuse else None
        if metrics is not None:
            print(f"sweep: {name}: reusing {folder}/metrics.json")
        else:
            print(f"sweep: {name} -> {folder}")
            metrics = evaluate_dataset(model, dataset, folder, batch_size=args.batch_size, exit=exit, gate=gate,
                                       max_images=args.max_images, device=args.device, amp=args.amp,
                                       workers=cfg.data.workers if args.workers is None else args.workers,
                                       vis_images=args.vis, fps_images=args.fps_images, flops=True, source=source)
        rows.append(sweep_row(name, "exit" if gate is None else "gate", metrics, folder.name, exit=exit,
                              gate_path=gate_path))
    table = sweep_table(rows)
    summary = {"config": str(args.config), "weights": str(args.weights), "split": args.split,
               "images": images, "device": str(args.device), "rows": rows}
    atomic_write_text(out / "sweep.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "sweep.md", table + "\n")
    plot_sweep(rows, out / "sweep.png", f"PQ vs. GFLOPs: {Path(args.config or args.weights).stem}, {args.split}, "
                                        f"{images} images")
    print(table)
    print(f"written to {out}/sweep.json, sweep.md, sweep.png")
    return rows


# ---- predict and export (predict.py) -------------------------------------------------------------


def load_trained(args):
    """The config (--config, or the one stored in --weights) and the model with the weights
    (strict), in eval mode on args.device."""
    cfg = load_run_config(args.config, args.weights, args.overrides)
    model = build_model(cfg)
    load_weights(model, args.weights)
    return cfg, model.to(check_device(getattr(args, "device", "cpu"))).eval()


def run_predict_command(args):
    cfg, model = load_trained(args)
    gate = load_gate(args.gate, model).to(args.device) if args.gate else None
    return run_predict(model, cfg, args, gate=gate)


def run_export(args):
    if Path(args.out).exists() and not args.overwrite:
        raise ValueError(f"{args.out}: exists; pass --overwrite to replace it")
    cfg, model = load_trained(args)
    check_exit(model.encoder, args.exit, "--exit")
    export_network(model.cpu(), size=args.size, fmt=args.format, out=args.out, exit=args.exit)
    print(f"exported {Path(args.weights).name} at {args.size[0]}x{args.size[1]} ({args.format}) to {args.out}")


RUN = {"eval": run_eval, "sweep": run_sweep, "flops": run_flops, "report": run_report,
       "predict": run_predict_command, "export": run_export}


def main(argv=None):
    """`evaluate.py [eval] ...` evaluates a checkpoint; `sweep` every exit and gate; `flops` counts
    GFLOPs; `report` tabulates evaluations; `predict` runs a model on images; `export` exports it."""
    command, args = parse_args(argv)
    if getattr(args, "device", "cpu") is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    RUN[command](args)


if __name__ == "__main__":
    sys.exit(run_command(main))
