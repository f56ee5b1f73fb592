"""Tests for the native deformable attention (csrc/, `msda.ms_deform_attn_native`).

The torch reference `ms_deform_attn` (itself checked against plain loops in test_msda.py) is the
yardstick: forward and the three gradients on random non-square levels with points outside
[0, 1], gradcheck, a bit-identical backward, torch.compile(fullgraph=True), the fallback when
the build is impossible, the M2F encoder end to end, the FLOP counts. The CPU build is made once
per session (torch's extension cache makes later sessions fast); tests that need it skip where
there is no compiler. The CUDA build is compiled wherever nvcc is; its numerical tests need a GPU.
"""
import os
import shutil

import pytest
import torch

import msda
from encoders import DeformableEncoderLayer, M2FEncoder, build_encoder
from flops import FlopCounter
from msda import MSDeformAttn, NativeUnavailable, deform_attn, ms_deform_attn, ms_deform_attn_native


def missing_toolchain():
    """Why the CPU build cannot even start here (no compiler, no ninja), or None."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} not on PATH)"
    if shutil.which("ninja") is None:
        return "no ninja"
    return None


@pytest.fixture(scope="module")
def native():
    """The CPU build, once per session. With a toolchain a failed build fails the test, not skips it."""
    reason = missing_toolchain()
    if reason:
        pytest.skip(f"native build impossible here: {reason}")
    return msda.build_native("cpu")


def random_inputs(seed, N, Lq, M, D, shapes, P, dtype=torch.float64, lo=-0.2, hi=1.2, device="cpu"):
    """value, locations uniform in [lo, hi] (some outside the map), softmax-normalised weights."""
    g = torch.Generator().manual_seed(seed)
    L, S = len(shapes), sum(h * w for h, w in shapes)
    value = torch.randn(N, S, M, D, generator=g, dtype=dtype)
    locations = lo + (hi - lo) * torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=dtype)
    weights = torch.randn(N, Lq, M, L * P, generator=g, dtype=dtype).softmax(-1).view(N, Lq, M, L, P)
    return tuple(t.to(device) for t in (value, locations, weights))


CASES = [
    # seed, N, Lq, M, D, shapes (H, W), P
    (0, 2, 5, 2, 3, [(3, 5), (4, 2), (7, 6)], 3),
    (1, 1, 7, 3, 2, [(1, 1), (2, 9), (5, 3), (6, 6)], 2),
    (2, 3, 4, 4, 1, [(8, 3)], 4),
    (3, 2, 40, 8, 32, [(10, 13), (5, 7), (3, 4)], 4),  # the encoder's heads and channels
]


def forward_backward(fn, inputs, shapes, seed=0):
    """fn's output and the gradients of <output, random cotangent> w.r.t. value, locations, weights."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(leaves[0], shapes, leaves[1], leaves[2])
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    out.backward(cotangent.to(out.device))
    return [out.detach()] + [t.grad for t in leaves]


# --------------------------------------------------------------------------------------------
# The CPU build against the torch reference
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("seed,N,Lq,M,D,shapes,P", CASES)
def test_matches_torch_forward_and_gradients(native, dtype, tol, seed, N, Lq, M, D, shapes, P):
    """Output and the value / location / weight gradients equal the grid_sample path's."""
    inputs = random_inputs(seed, N, Lq, M, D, shapes, P, dtype)
    outside = ((inputs[1] < 0) | (inputs[1] > 1)).any(-1)
    assert outside.any() and (~outside).any()  # the zero-padding path is exercised
    expected = forward_backward(ms_deform_attn, inputs, shapes)
    got = forward_backward(ms_deform_attn_native, inputs, shapes)
    for name, a, b in zip(("output", "value grad", "location grad", "weight grad"), got, expected):
        assert a.dtype == dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def test_hand_values(native):
    """A 1x1 level: centre reads v, the border x = 0 reads v/2, a corner v/4, x = -0.5 reads 0."""
    value = torch.tensor([4.0], dtype=torch.float64).view(1, 1, 1, 1)
    locs = torch.tensor([[0.5, 0.5], [0.0, 0.5], [0.0, 0.0], [-0.5, 0.5]], dtype=torch.float64).view(1, 4, 1, 1, 1, 2)
    out = ms_deform_attn_native(value, [(1, 1)], locs, torch.ones(1, 4, 1, 1, 1, dtype=torch.float64))
    assert out.flatten().tolist() == [4.0, 2.0, 1.0, 0.0]


def test_gradcheck(native):
    """Analytic gradients of the CPU build = finite differences, float64."""
    shapes = [(2, 3), (3, 2)]
    inputs = [t.requires_grad_(True) for t in random_inputs(5, 2, 3, 2, 3, shapes, 2, lo=-0.1, hi=1.1)]
    assert torch.autograd.gradcheck(lambda v, s, a: ms_deform_attn_native(v, shapes, s, a), inputs,
                                    eps=1e-6, atol=1e-7, rtol=1e-6)


def test_backward_is_bit_identical(native):
    """The CPU backward is deterministic: thread (image, head) owns that head's value-gradient
    rows and walks its queries in order, so two runs, and runs at 1 and 2 threads, agree bit for
    bit. Many queries read the same few pixels here, where racy accumulation would show."""
    shapes = [(4, 5), (2, 3)]
    inputs = random_inputs(6, 2, 2000, 4, 8, shapes, 4, dtype=torch.float32)  # big enough for 2 threads
    threads = torch.get_num_threads()
    try:
        runs = [forward_backward(ms_deform_attn_native, inputs, shapes) for _ in range(2)]
        torch.set_num_threads(1)
        runs.append(forward_backward(ms_deform_attn_native, inputs, shapes))
    finally:
        torch.set_num_threads(threads)
    runs.append(forward_backward(lambda *a: ms_deform_attn_native(*a, deterministic=True), inputs, shapes))
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))


def test_custom_op_registration(native):
    """torch.library.opcheck: schema, fake implementation and autograd registration agree with
    the kernels; on the meta device only the fake implementation runs (no build needed)."""
    inputs = random_inputs(7, 1, 6, 2, 4, [(3, 4), (2, 2)], 2, dtype=torch.float32)
    args = (inputs[0].requires_grad_(True), [3, 4, 2, 2], inputs[1].requires_grad_(True),
            inputs[2].requires_grad_(True), False)
    torch.library.opcheck(torch.ops.msda.ms_deform_attn.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    meta = [t.detach().to("meta") for t in inputs]
    assert ms_deform_attn_native(meta[0], [(3, 4), (2, 2)], meta[1], meta[2]).shape == (1, 6, 8)


def test_dtypes(native):
    """float16 on the CPU: "native" refuses with the reason, "auto" quietly takes the torch path;
    mixed dtypes (autocast's half value, float32 locations) compute in the common dtype."""
    shapes = [(3, 4)]
    value, locations, weights = random_inputs(8, 1, 4, 2, 4, shapes, 2, dtype=torch.float32)
    with pytest.raises(NativeUnavailable, match="float16 on cpu"):
        ms_deform_attn_native(value.half(), shapes, locations.half(), weights.half())
    out = deform_attn(value.half(), shapes, locations.half(), weights.half(), impl="auto")
    assert out.dtype == torch.float16
    mixed = ms_deform_attn_native(value.double(), shapes, locations, weights)
    assert mixed.dtype == torch.float64
    torch.testing.assert_close(mixed, ms_deform_attn(value.double(), shapes, locations.double(), weights.double()))


# --------------------------------------------------------------------------------------------
# The module, the encoder, torch.compile, FLOPs
# --------------------------------------------------------------------------------------------

def make_layer(impl, seed=0, dim=32, levels=2, heads=4, points=2):
    torch.manual_seed(seed)
    layer = DeformableEncoderLayer(dim=dim, levels=levels, heads=heads, points=points, ffn_dim=64, attention=impl)
    with torch.no_grad():  # queries that move the samples, and a softmax that is not uniform
        layer.self_attn.sampling_offsets.weight.normal_(0, 0.3)
        layer.self_attn.attention_weights.weight.normal_(0, 0.5)
    return layer


LAYER_SHAPES = [(6, 5), (3, 2)]


def layer_inputs(dim=32, seed=1):
    from encoders import reference_points

    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in LAYER_SHAPES)
    return torch.randn(2, S, dim, generator=g), torch.randn(1, S, dim, generator=g), reference_points(LAYER_SHAPES)


def test_torch_compile_fullgraph_layer(native):
    """An encoder layer with impl="native" compiles without a graph break (fullgraph=True raises
    otherwise); output and every gradient match the eager torch path."""
    torch._dynamo.reset()
    src, pos, ref = layer_inputs()
    results = []
    for impl, compiled in (("torch", False), ("native", True)):
        layer = make_layer(impl)
        fn = torch.compile(layer, fullgraph=True) if compiled else layer
        x = src.clone().requires_grad_(True)
        out = fn(x, pos, ref, LAYER_SHAPES)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append([out.detach(), x.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert results[1][1].abs().sum() > 0


def test_m2f_encoder_native_equals_torch(native):
    """The M2F encoder (built from its config, attention="native") agrees with the torch path to
    1e-4 on every output; the choice reaches every layer, PRO-SCALE's too."""
    from config import EncoderConfig

    channels = {"res2": 32, "res3": 64, "res4": 64, "res5": 64}
    outputs = []
    for impl in ("torch", "native"):
        torch.manual_seed(0)
        encoder = build_encoder(cfg=EncoderConfig(dim=64, heads=8, ffn_dim=128, layers=2, attention=impl),
                                in_channels=channels).eval()
        assert isinstance(encoder, M2FEncoder) and all(l.self_attn.impl == impl for l in encoder.layers)
        g = torch.Generator().manual_seed(1)
        features = {name: torch.randn(2, channels[name], 40 // s, 56 // s, generator=g)
                    for name, s in (("res2", 1), ("res3", 2), ("res4", 4), ("res5", 8))}
        with torch.no_grad():
            mask_features, multi_scale = encoder(features)
        outputs.append([mask_features, *multi_scale])
    for a, b in zip(*outputs):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    proscale = build_encoder(cfg=EncoderConfig(name="proscale", dim=64, depths=[1, 1, 1], attention="auto"),
                             in_channels=channels)
    assert all(layer.self_attn.impl == "auto" for layer in proscale.layers)


@pytest.mark.parametrize("complete", [False, True])
def test_flops_count_native_as_torch(native, complete):
    """The FLOP counter prices the native op as the grid_sample path (4 taps per sampled value
    with complete=True, nothing in the papers' convention), on CPU tensors and on meta ones."""
    src, pos, ref = layer_inputs()
    counts = {}
    for device in ("cpu", "meta"):
        for impl in ("torch", "native", "auto"):
            layer = make_layer(impl).to(device)
            with torch.no_grad(), FlopCounter(complete) as counter:
                out = layer(src.to(device), pos.to(device), ref.to(device), LAYER_SHAPES)
            counts[device, impl] = sum(counter.counts.values())
            if device == "cpu":  # under the counter, still the right numbers
                torch.testing.assert_close(out, make_layer("torch")(src, pos, ref, LAYER_SHAPES))
    assert len(set(counts.values())) == 1, counts
    sampling = 4 * 2 * sum(h * w for h, w in LAYER_SHAPES) * 32 * 2 * 2  # 4 · N · Lq · C · P · L
    linears = FlopCounter()
    with torch.no_grad(), linears:
        make_layer("torch")(src, pos, ref, LAYER_SHAPES)
    assert counts["cpu", "native"] == sum(linears.counts.values()) + (sampling if complete else 0)


def test_invalid_impl():
    with pytest.raises(ValueError, match="impl"):
        MSDeformAttn(dim=8, levels=1, heads=2, points=1, impl="cuda")


# --------------------------------------------------------------------------------------------
# When the build is impossible
# --------------------------------------------------------------------------------------------

def test_fallback_without_compiler(monkeypatch, capsys):
    """No compiler (CXX names none): "auto" prints why, in one line and only once, and computes the
    torch path's result; "native" raises that reason. Nothing is built or loaded here."""
    monkeypatch.setattr(msda, "_BUILDS", {})
    monkeypatch.setattr(msda, "_FALLBACK_SAID", set())
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    shapes = [(3, 5), (2, 2)]
    value, locations, weights = random_inputs(9, 1, 6, 2, 4, shapes, 2, dtype=torch.float32)
    out = deform_attn(value, shapes, locations, weights, impl="auto")
    again = deform_attn(value, shapes, locations, weights, impl="auto")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "torch path" in lines[0] and "no C++ compiler" in lines[0], lines
    assert torch.equal(out, ms_deform_attn(value, shapes, locations, weights)) and torch.equal(again, out)
    with pytest.raises(NativeUnavailable, match=r"no C\+\+ compiler"):
        deform_attn(value, shapes, locations, weights, impl="native")
    torch.manual_seed(0)
    module = MSDeformAttn(dim=8, levels=2, heads=2, points=2, impl="auto")  # the module falls back too
    query, reference, tokens = torch.randn(1, 6, 8), torch.rand(1, 6, 2, 2), torch.randn(1, 19, 8)
    got = module(query, reference, tokens, shapes)
    module.impl = "torch"
    assert torch.equal(got, module(query, reference, tokens, shapes))
    assert capsys.readouterr().out == ""  # said once per process and device type


# --------------------------------------------------------------------------------------------
# The CUDA build: compiled wherever nvcc is, run where a GPU is
# --------------------------------------------------------------------------------------------

def cuda_toolchain():
    if torch.version.cuda is None:
        return "this torch has no CUDA"
    if missing_toolchain():
        return missing_toolchain()
    from torch.utils.cpp_extension import CUDA_HOME

    if not CUDA_HOME or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return "no nvcc"
    return None


@pytest.fixture(scope="module")
def cuda_native():
    reason = cuda_toolchain()
    if reason:
        pytest.skip(f"CUDA build impossible here: {reason}")
    return msda.build_native("cuda")


def test_cuda_build_compiles(cuda_native):
    """nvcc compiles csrc/msda_cuda.cu and the library loads (without a GPU too)."""
    assert hasattr(cuda_native, "forward") and hasattr(cuda_native, "backward")


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the CUDA kernels cannot run here")


@needs_gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("seed,N,Lq,M,D,shapes,P", CASES)
def test_cuda_equals_cpu(native, cuda_native, dtype, tol, deterministic, seed, N, Lq, M, D, shapes, P):
    """CUDA build = CPU build (forward and the three gradients), fast and deterministic backward."""
    inputs = random_inputs(seed, N, Lq, M, D, shapes, P, dtype)
    fn = lambda *a: ms_deform_attn_native(*a, deterministic=deterministic)  # noqa: E731
    expected = forward_backward(fn, inputs, shapes)
    got = forward_backward(fn, [t.cuda() for t in inputs], shapes)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.cpu(), b, rtol=tol, atol=tol)


@needs_gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_cuda_half_precision(native, cuda_native, dtype, tol):
    """float16 / bfloat16 on the GPU (accumulating in float32) stay within the dtype's rounding of
    the float64 CPU result on the same rounded inputs; gradients keep the dtype."""
    shapes = [(10, 13), (5, 7), (3, 4)]
    low = [t.to(dtype) for t in random_inputs(10, 2, 50, 8, 32, shapes, 4, dtype=torch.float32)]
    got = forward_backward(ms_deform_attn_native, [t.cuda() for t in low], shapes)
    exact = forward_backward(ms_deform_attn_native, [t.double() for t in low], shapes)
    for a, b in zip(got, exact):
        assert a.dtype == dtype
        scale = b.abs().max()
        assert (a.cpu().double() - b).abs().max() <= tol * scale


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_deterministic_backward_bit_identical(native, cuda_native, dtype):
    """deterministic=True (no float atomics): two backward runs give the same bits; the fast
    atomic backward agrees with it to rounding."""
    shapes = [(16, 20), (8, 10), (4, 5)]
    inputs = [t.to(dtype).cuda() for t in random_inputs(11, 2, 2000, 8, 32, shapes, 4, dtype=torch.float32)]
    det = lambda *a: ms_deform_attn_native(*a, deterministic=True)  # noqa: E731
    first, second = (forward_backward(det, inputs, shapes) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    fast = forward_backward(lambda *a: ms_deform_attn_native(*a, deterministic=False), inputs, shapes)
    for a, b in zip(fast, first):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-2 if dtype == torch.bfloat16 else 1e-5)
