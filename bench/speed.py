"""Speed against Mask2Former, measured with a clock, next to the FLOP ratios.

    .venv/bin/python bench/speed.py                          # CPU, 1 thread: about 10 minutes
    .venv/bin/python bench/speed.py --quick                  # a 1-2 minute smoke run (small sizes, 2 rounds)
    .venv/bin/python bench/speed.py --size 512 704 --size 800 1088 --rounds 5 --only encoders

Every figure is a ratio against a baseline run in the same process: each round runs every variant
once in a rotated order (metrics.interleaved_times) on process CPU time, with
torch.set_num_threads(1); printed as the median over rounds of the per-round ratio and its range.
Models are the R50 configs of configs/coco/ with random weights (seed 0), in eval mode, under
no_grad. Sections (--only picks some):

    encoders   PRO-SCALE (1,1,1), (2,2,2), (3,3,3), Lite-M2F and RT-M2F against M2F: the encoder
               (on the same backbone features) at every --size, and the whole forward (backbone,
               encoder, decoder) at the first; beside each its FLOP ratio (flops.model_flops); then
               M2F's and PRO-SCALE's encoder time by part and by op group (GEMMs, sampling, pool, norms)
    postprocess  model.inference / forward of M2F at 512x512: panoptic alone, and all three tasks
    hf         ours / Hugging Face's Mask2FormerForUniversalSegmentation, the same weights (the
               mapping of tests/test_hf_parity.py), encoder + decoder forward at 384x384 and 800x1088
    train      one step of the tiny demo model (configs/demo/m2f_tiny.yaml, synthetic data, loader
               in this process) split into data, forward, matcher, losses, backward, optimizer
"""
import argparse
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import data  # noqa: E402
import ops  # noqa: E402
import train  # noqa: E402  (a command; bench/ is outside the module tree)
from config import keep_freed_memory, load_config  # noqa: E402
from flops import model_flops  # noqa: E402
from metrics import interleaved_times, ratio_summary  # noqa: E402
from model import build_model  # noqa: E402

BASELINE = "M2F"
ATTENTION = "torch"  # model.encoder.attention of every model built here (--attention)
CONFIGS = {  # name -> R50 config of configs/coco/
    "M2F": "m2f_r50.yaml",
    "PRO-SCALE (1,1,1)": "proscale_111_r50.yaml",
    "PRO-SCALE (2,2,2)": "proscale_222_r50.yaml",
    "PRO-SCALE (3,3,3)": "proscale_333_r50.yaml",
    "Lite-M2F": "lite_m2f_r50.yaml",
    "RT-M2F": "rt_m2f_r50.yaml",
}


def machine():
    """The CPU in words, for every table."""
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "CPU")
    return f"{model}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), process CPU time"


def fmt(summary):
    median, (low, high) = summary
    return f"{median:6.3f} [{low:.3f}-{high:.3f}]"


def timed_table(fns, rounds, baseline):
    """Interleaved times of fns and their ratio summaries against `baseline`."""
    times = interleaved_times(fns, rounds=rounds, warmup=1)
    return times, ratio_summary(times, baseline)


def no_grad(fn, *args, **kwargs):
    def run():
        with torch.no_grad():
            fn(*args, **kwargs)
    return run


def build(config, overrides=(), device=None):
    torch.manual_seed(0)
    cfg = load_config(ROOT / "configs" / "coco" / config, [*overrides, f"model.encoder.attention={ATTENTION}"])
    if device is None:
        return build_model(cfg).eval()
    with torch.device(device):
        return build_model(cfg).eval()


def image(height, width, seed=0):
    return torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(seed))


# ---- encoders and whole models against M2F ---------------------------------------------------


def bench_encoders(sizes, rounds):
    models = {name: build(config) for name, config in CONFIGS.items()}
    for k, (height, width) in enumerate(sizes):
        flops = {name: model_flops(build(config, device="meta"), height, width) for name, config in CONFIGS.items()}
        images = image(height, width)
        with torch.no_grad():
            features = models[BASELINE].backbone_features(images)  # the same R50 for all: one set of features
        _, enc = timed_table({name: no_grad(m.encoder, features) for name, m in models.items()}, rounds, BASELINE)
        whole = None
        if k == 0:  # the whole forward at the first size only (it is the backbone's time mostly)
            times, whole = timed_table({name: no_grad(m, images) for name, m in models.items()}, rounds, BASELINE)
            base_ms = statistics.median(times[BASELINE]) * 1e3
        print(f"\n{height}x{width}, batch 1, eval, no_grad; ratio to M2F: median [min-max] over {rounds} rounds")
        print(f"  {'':20s} {'encoder time':>22s} {'FLOPs':>6s}" + (f" {'whole forward':>22s} {'FLOPs':>6s}" if whole else ""))
        for name in models:
            f, b = flops[name], flops[BASELINE]
            fwd = lambda g: g["backbone"] + g["encoder"] + g["decoder"]  # noqa: E731
            line = f"  {name:20s} {fmt(enc[name]):>22s} {f['encoder'] / b['encoder']:6.3f}"
            if whole:
                line += f" {fmt(whole[name]):>22s} {fwd(f) / fwd(b):6.3f}"
            print(line)
        if whole:
            print(f"  (M2F whole forward {base_ms:.0f} ms, encoder GFLOPs {flops[BASELINE]['encoder']:.1f})")
            conv_against_gemm(models[BASELINE].encoder.mask_branch.output[0], features["res2"].shape[-2:], rounds)
            proscale = {n: m for n, m in models.items() if n == BASELINE or n.startswith("PRO-SCALE")}
            encoder_parts(proscale, features)
            encoder_ops(proscale, features)


PARTS = {"input projection": "input_proj", "mask branch": "mask_branch"}  # the rest: the layers (+ TRC)


def encoder_parts(models, features, runs=3):
    """Where each encoder's time and FLOPs go: input projection, transformer layers, mask branch,
    in ms (median of `runs`, after one warm-up) and GFLOPs, each part beside M2F's."""
    from flops import FlopCounter

    table = {}
    for name, m in models.items():
        clocks = {part: PhaseClock(getattr(m.encoder, attr)) for part, attr in PARTS.items()}
        times = []
        with torch.no_grad():
            for run in range(runs + 1):
                for c in clocks.values():
                    c.total = 0.0
                start = time.process_time()
                m.encoder(features)
                whole = time.process_time() - start
                parts = {part: c.total for part, c in clocks.items()}
                if run:
                    times.append({**parts, "layers": whole - sum(parts.values())})
            with FlopCounter() as counter:
                for part, attr in PARTS.items():
                    counter.track(getattr(m.encoder, attr), part)
                with counter.scope("layers"):
                    m.encoder(features)
        for c in clocks.values():
            c.remove()
        table[name] = {part: (statistics.median(t[part] for t in times) * 1e3, counter.counts.get(part, 0) / 1e9)
                       for part in ("input projection", "layers", "mask branch")}
    print(f"  where the time goes (ms, median of {runs} runs) and the FLOPs (G), each part / M2F's part:")
    for name, parts in table.items():
        cells = [f"{part} {ms:6.0f} ms {g:5.1f} G ({ms / table[BASELINE][part][0]:.2f} / "
                 f"{g / max(table[BASELINE][part][1], 1e-9):.2f})" for part, (ms, g) in parts.items()]
        print(f"    {name:18s} " + "   ".join(cells))


OP_GROUPS = {  # aten op names (their overload packet) by what the FLOP convention prices them at
    "GEMMs": ("convolution", "mkldnn_convolution", "mm", "addmm", "bmm", "baddbmm", "linear"),  # counted FLOPs
    "sampling": ("grid_sampler_2d", "addcmul_", "addcmul"),  # deformable sampling: 0 FLOPs
    "pooling": ("max_pool2d", "max_pool2d_with_indices", "avg_pool2d"),  # the LPE: 0 FLOPs
    "norms": ("native_group_norm", "native_layer_norm"),
}


class OpClock(TorchDispatchMode):
    """Process CPU time per aten op (by name) of everything run under it; ops an op calls inside
    are its own time."""

    def __init__(self):
        super().__init__()
        self.ms = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.process_time()
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ms[name] = self.ms.get(name, 0.0) + (time.process_time() - start) * 1e3
        return out


def encoder_ops(models, features):
    """The encoders' time by op group (OP_GROUPS, the rest as "other"), one forward each after a
    warm-up, each group / M2F's: which of the ops priced at 0 FLOPs keep a ratio above the FLOPs'."""
    table = {}
    for name, m in models.items():
        with torch.no_grad():
            m.encoder(features)
            with OpClock() as clock:
                m.encoder(features)
        groups = {group: sum(clock.ms.get(op, 0.0) for op in names) for group, names in OP_GROUPS.items()}
        total = sum(clock.ms.values())
        table[name] = {**groups, "other": total - sum(groups.values()), "total": total}
    print("  by op (ms, one forward, op by op; each group / M2F's):")
    for name, groups in table.items():
        cells = [f"{g} {ms:5.0f} ({ms / table[BASELINE][g]:.2f})" if table[BASELINE][g] else f"{g} {ms:5.0f} (-)"
                 for g, ms in groups.items()]
        print(f"    {name:18s} " + "   ".join(cells))


def conv_against_gemm(conv, size, rounds):
    """M2F's 3x3 conv at 1/4 (the op PRO-SCALE's LPE removes; on the mask branch's channels-last
    input) against a GEMM of the same FLOPs as the encoder layers run it (ops.linear): where the
    conv is cheaper per FLOP, removing it saves less time than FLOPs."""
    x = torch.randn(1, conv.in_channels, *size).contiguous(memory_format=torch.channels_last)
    tokens = torch.randn(size[0] * size[1], conv.in_channels)
    matrix = torch.randn(conv.weight[0].numel(), conv.in_channels)  # (C·9, C): the conv's FLOPs
    _, summary = timed_table({"gemm": no_grad(ops.linear, tokens, matrix), "conv": no_grad(conv, x)}, rounds, "gemm")
    print(f"  M2F's 3x3 conv at 1/4 / a GEMM of the same FLOPs: time {fmt(summary['conv'])}")


# ---- post-processing against the forward ---------------------------------------------------


def confident(outputs, num_classes, seed=0):
    """The forward's outputs with the class logits of a trained model: one class per query at
    logit +12 (probability > 0.8). A random-init model keeps no query at the 0.8 threshold, and
    the panoptic step would then skip its per-segment work."""
    logits = outputs["pred_logits"]
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes + 1, logits.shape[:2], generator=g)  # some "no object"
    boosted = torch.zeros_like(logits).scatter_(-1, labels[..., None], 12.0)
    return {**outputs, "pred_logits": boosted}


def bench_postprocess(height, width, rounds):
    model = build(CONFIGS[BASELINE])
    images = image(height, width)
    with torch.no_grad():
        outputs = confident(model(images), model.cfg.num_classes)
    inference = model.cfg.inference
    everything = dict(panoptic=True, instance=True, semantic=True)
    tasks = {"panoptic": (dict(panoptic=True, instance=False, semantic=False), "scores"),  # (flags, semantic=)
             "all three": (everything, "scores"), "all three, semantic labels": (everything, "labels")}

    def post(flags, semantic):
        def run():
            for key, value in flags.items():
                setattr(inference, key, value)
            model.inference(outputs, [(height, width)], semantic=semantic)
        return run
    fns = {"forward": no_grad(model, images), **{f"post-process ({t})": post(*task) for t, task in tasks.items()}}
    times, summary = timed_table(fns, rounds, "forward")
    print(f"\nM2F R50 post-processing / forward, {height}x{width}, batch 1 (confident class scores, see confident())")
    for name in fns:
        print(f"  {name:42s} {statistics.median(times[name]) * 1e3:8.1f} ms   / forward {fmt(summary[name])}")


# ---- ours against Hugging Face's Mask2Former ------------------------------------------------


def hf_pair():
    """HF's Mask2Former (R50 head: width 256, 6 encoder layers, 9 decoder rounds, 100 queries, 133
    classes) and ours with the same weights, mapped by tests/test_hf_parity.py's hf_to_ours."""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_hf_parity as parity
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    import encoders
    import model as model_module

    channels = {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}
    parity.ENC_LAYERS, parity.DEC_ROUNDS = 6, 9  # hf_to_ours reads these; R50's head has 6 and 9
    backbone = SwinConfig(embed_dim=256, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2,
                          out_features=["stage1", "stage2", "stage3", "stage4"])  # sets the channels; never run
    cfg = Mask2FormerConfig(backbone_config=backbone, feature_size=256, mask_feature_size=256, hidden_dim=256,
                            num_attention_heads=8, encoder_layers=6, encoder_feedforward_dim=1024, decoder_layers=10,
                            dim_feedforward=2048, num_queries=100, num_labels=133, dropout=0.0, pre_norm=False,
                            enforce_input_projection=False, common_stride=4, feature_strides=[4, 8, 16, 32])
    torch.manual_seed(0)
    hf = Mask2FormerForUniversalSegmentation(cfg).eval()
    enc_state, dec_state = parity.hf_to_ours(hf)
    encoder = encoders.M2FEncoder(channels, layers=6, mask_branch="conv", attention=ATTENTION).eval()
    decoder = model_module.MaskedAttentionDecoder(num_classes=133, in_dim=256, dim=256, queries=100, layers=9,
                                                  heads=8, ffn_dim=2048, mask_dim=256).eval()
    encoder.load_state_dict(enc_state, strict=True)
    decoder.load_state_dict(dec_state, strict=True)
    return hf, parity.run_hf, encoder, decoder, channels


def bench_hf(sizes, rounds):
    hf, run_hf, encoder, decoder, channels = hf_pair()
    print("\nours / HF transformers Mask2Former, the same weights, encoder + decoder forward (no backbone), batch 1")
    for height, width in sizes:
        g = torch.Generator().manual_seed(0)
        features = {name: torch.randn(1, c, height // s, width // s, generator=g)
                    for (name, c), s in zip(channels.items(), (4, 8, 16, 32))}

        def ours(gemms=nullcontext):
            with torch.no_grad(), gemms():
                decoder(*reversed(encoder(features)))  # encoder -> (mask features, maps)
        times, summary = timed_table({"HF": lambda: run_hf(hf, features), "ours": ours,
                                      "ours, F.linear": lambda: ours(ops.reference)}, rounds, "HF")
        print(f"  {height}x{width}: ours {statistics.median(times['ours']) * 1e3:.0f} ms, "
              f"HF {statistics.median(times['HF']) * 1e3:.0f} ms, ours / HF {fmt(summary['ours'])}; "
              f"with F.linear (MKL) for every linear (ops.reference) {fmt(summary['ours, F.linear'])}")


# ---- the tiny demo training step, per phase -------------------------------------------------


class PhaseClock:
    """Accumulates the CPU time spent inside a module's forward (hooks), e.g. the matcher."""

    def __init__(self, module):
        self.total, self.start = 0.0, None
        self.hooks = [module.register_forward_pre_hook(lambda *_: setattr(self, "start", time.process_time())),
                      module.register_forward_hook(lambda *_: self.add())]

    def add(self):
        self.total += time.process_time() - self.start

    def remove(self):
        for hook in self.hooks:
            hook.remove()


def bench_train(steps):
    with tempfile.TemporaryDirectory() as tmp:
        root = ROOT / "datasets"
        if not (root / "synthetic" / "train" / "panoptic.json").exists():  # generate a small set
            import synthetic

            root = Path(tmp)
            synthetic.write_synthetic(root / "synthetic", train=64, val=2, size=128, seed=0)
        cfg = load_config(ROOT / "configs" / "demo" / "m2f_tiny.yaml", [f"data.root={root}", "data.workers=0"])
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg).train()
        dataset = data.build_dataset(cfg.data, split="train", train=True)
        batches = iter(data.build_train_loader(cfg.data, dataset, batch_size_per_rank=cfg.train.batch_size, seed=0,
                                               rank=0, world_size=1, start=0))
        optimizer = train.build_optimizer(model, cfg.train)
        criterion, matcher = PhaseClock(model.criterion), PhaseClock(model.criterion.matcher)
        phases = {k: [] for k in ("data", "forward", "matcher", "losses", "backward", "optimizer", "step")}
        for step in range(steps + 2):  # the first two warm up
            criterion.total = matcher.total = 0.0
            t0 = time.process_time()
            batch = next(batches)
            images, _ = model.preprocess([s["image"] for s in batch])
            targets = train.make_targets(batch, images.shape[-2:], images.device)
            t1 = time.process_time()
            loss = sum(model(images, targets).values())
            t2 = time.process_time()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            t3 = time.process_time()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
            optimizer.step()
            t4 = time.process_time()
            if step >= 2:
                for name, value in [("data", t1 - t0), ("forward", t2 - t1 - criterion.total),
                                    ("matcher", matcher.total), ("losses", criterion.total - matcher.total),
                                    ("backward", t3 - t2), ("optimizer", t4 - t3), ("step", t4 - t0)]:
                    phases[name].append(value)
    step_ms = statistics.median(phases["step"]) * 1e3
    print(f"\ntiny demo training step (configs/demo/m2f_tiny.yaml: batch {cfg.train.batch_size}, "
          f"{cfg.data.crop_size[0]}x{cfg.data.crop_size[1]}), {steps} steps: median {step_ms:.0f} ms "
          f"[{min(phases['step']) * 1e3:.0f}-{max(phases['step']) * 1e3:.0f}]")
    for name, values in phases.items():
        if name != "step":
            shares = [v / s for v, s in zip(values, phases["step"])]
            print(f"  {name:10s} {statistics.median(values) * 1e3:7.1f} ms   share {statistics.median(shares):5.1%} "
                  f"[{min(shares):.1%}-{max(shares):.1%}]")


SECTIONS = ("encoders", "postprocess", "hf", "train")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", nargs=2, type=int, action="append", metavar=("H", "W"),
                        help="encoder sizes (repeat; default 512 704 and 800 1088)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (after one warm-up)")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--attention", default="torch", choices=("torch", "native", "auto"),
                        help="model.encoder.attention: the deformable sampling (configs' default: torch)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 256x352, 2 rounds, 3 steps, HF at 384x384")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    kept = keep_freed_memory()  # as every command does (config.run_command)
    global ATTENTION
    ATTENTION = args.attention
    sizes = args.size or ([(256, 352)] if args.quick else [(512, 704), (800, 1088)])
    rounds, steps = (2, 3) if args.quick else (args.rounds, args.steps)
    print(f"bench/speed.py on {machine()}; deformable attention: {ATTENTION}; "
          f"malloc keeps freed memory: {'yes' if kept else 'no (M2F_MALLOC=default or not glibc)'}")
    if "encoders" in args.only:
        bench_encoders(sizes, rounds)
    if "postprocess" in args.only:
        bench_postprocess(256 if args.quick else 512, 256 if args.quick else 512, rounds)
    if "hf" in args.only:
        bench_hf([(384, 384)] if args.quick else [(384, 384), (800, 1088)], rounds)
    if "train" in args.only:
        bench_train(steps)


if __name__ == "__main__":
    main()
