"""Deformable attention benchmark: the native op (csrc/) against the torch path, in one process.

    .venv/bin/python bench/msda_bench.py                       # CPU, 1 thread, 512x512 and 800x1088
    .venv/bin/python bench/msda_bench.py --device cuda         # the same on the GPU (fp32 and bf16)

At the M2F encoder's shapes of an HxW image (levels H/32, H/16, H/8, 8 heads of 32 channels, 4
points, every token a query, batch 1) it times `ms_deform_attn` eager, the same compiled
(torch.compile, fullgraph) and `ms_deform_attn_native`, forward and forward + backward, in
interleaved rounds (each round runs every variant once, in a rotated order), and prints the
median and range of each and the native/eager and native/compiled ratios of time and of peak
memory. Then the whole M2F encoder forward (R50 channels, 6 layers) with impl="native" against
impl="torch". CPU: process CPU time (all threads), peak memory from the profiler's allocation
events; GPU: wall time with synchronisation, peak from torch.cuda.max_memory_allocated.
"""
import argparse
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from config import keep_freed_memory  # noqa: E402
from encoders import M2FEncoder, reference_points  # noqa: E402
from msda import build_native, ms_deform_attn, ms_deform_attn_native  # noqa: E402

HEADS, CHANNELS, POINTS = 8, 32, 4
R50 = {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}


def level_shapes(height, width):
    """The encoder's levels, lowest resolution first: 1/32, 1/16, 1/8."""
    return [(-(-height // s), -(-width // s)) for s in (32, 16, 8)]


def attention_inputs(shapes, device, dtype, seed=0):
    """value (1, S, 8, 32); locations = every token's reference point plus offsets of a few pixels
    per level (as a trained encoder has them), weights softmax-normalised."""
    g = torch.Generator().manual_seed(seed)
    S, L = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(1, S, HEADS, CHANNELS, generator=g)
    size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)  # (L, 2) as (x, y)
    offsets = 2.0 * torch.randn(1, S, HEADS, L, POINTS, 2, generator=g) / size[:, None, :]
    locations = reference_points(shapes)[:, :, None, None, None, :] + offsets
    weights = torch.randn(1, S, HEADS, L * POINTS, generator=g).softmax(-1).view(1, S, HEADS, L, POINTS)
    return [t.to(device=device, dtype=dtype) for t in (value, locations, weights)]


def device_name(device):
    """The device, in words, for every figure."""
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "CPU")
    return f"{model}, {torch.get_num_threads()} thread(s)"


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """Seconds of one call: process CPU time on the CPU, synchronised wall time on a GPU."""
    sync(device)
    clock = time.perf_counter if device == "cuda" else time.process_time
    start = clock()
    fn()
    sync(device)
    return clock() - start


def peak_bytes(fn, device):
    """Peak memory allocated during fn above what was allocated before."""
    if device == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak


@contextmanager
def silenced():
    """stdout and stderr to /dev/null at the file-descriptor level: the profiler's C++ side prints
    a start and a stop line per use."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def make_run(fn, inputs, shapes, backward):
    """A closure running fn forward (no autograd) or forward + backward on fresh leaf copies."""
    if not backward:
        def run():
            with torch.no_grad():
                fn(inputs[0], shapes, inputs[1], inputs[2])
        return run
    cotangent = torch.randn(inputs[0].shape[0], inputs[1].shape[1], HEADS * CHANNELS,
                            generator=torch.Generator().manual_seed(1)).to(inputs[0])

    def run():
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        fn(leaves[0], shapes, leaves[1], leaves[2]).backward(cotangent)
    return run


def interleaved(runs, rounds, device):
    """{name: [seconds per round]}, every round running every variant once, order rotated."""
    names = list(runs)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(timed(runs[name], device))
    return times


def fmt(seconds):
    return f"{statistics.median(seconds) * 1e3:8.1f} ms [{min(seconds) * 1e3:.1f}-{max(seconds) * 1e3:.1f}]"


def report(title, times, peaks, baselines):
    print(f"  {title}")
    for name, t in times.items():
        print(f"    {name:9s} {fmt(t):32s} peak {peaks[name] / 2**20:8.1f} MiB")
    native_t, native_m = statistics.median(times["native"]), peaks["native"]
    for base in baselines:
        print(f"    native/{base}: time {native_t / statistics.median(times[base]):.3f}x, "
              f"peak memory {native_m / max(peaks[base], 1):.3f}x")


def bench_attention(height, width, device, dtype, rounds):
    shapes = level_shapes(height, width)
    inputs = attention_inputs(shapes, device, dtype)
    print(f"\n{height}x{width}: levels {shapes}, {HEADS} heads x {CHANNELS} channels, {POINTS} points, "
          f"{inputs[0].shape[1]} queries, {str(dtype).removeprefix('torch.')}, on {device_name(device)}")
    compiled = torch.compile(ms_deform_attn, fullgraph=True)
    fns = {"eager": ms_deform_attn, "compiled": compiled, "native": ms_deform_attn_native}
    for backward in (False, True):
        runs = {name: make_run(fn, inputs, shapes, backward) for name, fn in fns.items()}
        for run in runs.values():  # warm up: compilation, the extension's loading, caches
            run()
            run()
        times = interleaved(runs, rounds, device)
        peaks = {name: peak_bytes(run, device) for name, run in runs.items()}
        report("forward + backward" if backward else "forward", times, peaks, ("eager", "compiled"))


def bench_encoder(height, width, device, rounds):
    torch.manual_seed(0)
    encoders = {impl: M2FEncoder(R50, attention=impl).to(device).eval() for impl in ("torch", "native")}
    encoders["native"].load_state_dict(encoders["torch"].state_dict())
    g = torch.Generator().manual_seed(0)
    features = {name: torch.randn(1, c, -(-height // s), -(-width // s), generator=g).to(device)
                for (name, c), s in zip(R50.items(), (4, 8, 16, 32))}

    def forward(encoder):
        def run():
            with torch.no_grad():
                encoder(features)
        return run
    runs = {"torch": forward(encoders["torch"]), "native": forward(encoders["native"])}
    for run in runs.values():
        run()
    times = interleaved(runs, rounds, device)
    print(f"\nM2F encoder forward (R50 channels, 6 layers, dim 256), {height}x{width}, float32, on {device_name(device)}")
    for name, t in times.items():
        print(f"    {name:9s} {fmt(t)}")
    print(f"    native/torch: time {statistics.median(times['native']) / statistics.median(times['torch']):.3f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (CPU)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", nargs="*", default=["512x512", "800x1088"], help="image sizes HxW")
    parser.add_argument("--encoder-sizes", nargs="*", default=["512x512"], help="sizes of the encoder benchmark")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as every command does (config.run_command)
    build_native(args.device)
    dtypes = (torch.float32, torch.bfloat16) if args.device == "cuda" else (torch.float32,)
    print(f"device {device_name(args.device)}, torch {torch.__version__}; {args.rounds} interleaved rounds; "
          "times: median [min-max]")
    for size in args.sizes:
        height, width = map(int, size.lower().split("x"))
        for dtype in dtypes:
            bench_attention(height, width, args.device, dtype, args.rounds)
    for size in args.encoder_sizes:
        height, width = map(int, size.lower().split("x"))
        bench_encoder(height, width, args.device, args.rounds)


if __name__ == "__main__":
    main()
