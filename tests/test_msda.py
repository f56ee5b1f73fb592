"""Tests for `msda`: multi-scale deformable attention and the `MSDeformAttn` module.

The core check is an independent, loop-based bilinear reference (float64, plain Python) that
the vectorised `ms_deform_attn` must match to ~1e-10; the module is then checked against the
same reference with hand-indexed parameter layouts, under gradcheck, torch.compile, fp16/bf16,
and for its official Deformable-DETR initialisation.
"""
import math

import pytest
import torch

from msda import MSDeformAttn, ms_deform_attn


# --------------------------------------------------------------------------------------------
# Independent reference
# --------------------------------------------------------------------------------------------

def bilinear_reference(level, x, y):
    """Sample one level `level` (nested lists [H][W][D]) at normalised (x, y), zero padding,
    align_corners=False: pixel (i, j) has its centre at ((j + .5)/W, (i + .5)/H)."""
    H, W, D = len(level), len(level[0]), len(level[0][0])
    px, py = x * W - 0.5, y * H - 0.5
    j0, i0 = math.floor(px), math.floor(py)
    fx, fy = px - j0, py - i0
    out = [0.0] * D
    for i, wy in ((i0, 1.0 - fy), (i0 + 1, fy)):
        for j, wx in ((j0, 1.0 - fx), (j0 + 1, fx)):
            if 0 <= i < H and 0 <= j < W:  # neighbours outside the map read zero
                for d in range(D):
                    out[d] += wy * wx * level[i][j][d]
    return out


def ms_deform_attn_reference(value, spatial_shapes, sampling_locations, attention_weights):
    """Pure-Python loops over batch, queries, heads, levels and points; returns float64 (N, Lq, M*D)."""
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    val, loc, att = value.tolist(), sampling_locations.tolist(), attention_weights.tolist()
    starts = [0]
    for h, w in spatial_shapes:
        starts.append(starts[-1] + h * w)
    assert starts[-1] == S
    out = torch.zeros(N, Lq, M * D, dtype=torch.float64)
    for n in range(N):
        for m in range(M):
            # level l of head m as [H][W][D]; token index start + i*W + j (row-major)
            levels = [[[val[n][starts[l] + i * w + j][m] for j in range(w)] for i in range(h)]
                      for l, (h, w) in enumerate(spatial_shapes)]
            for q in range(Lq):
                acc = [0.0] * D
                for l in range(L):
                    for p in range(P):
                        x, y = loc[n][q][m][l][p]
                        s = bilinear_reference(levels[l], x, y)
                        a = att[n][q][m][l][p]
                        for d in range(D):
                            acc[d] += a * s[d]
                out[n, q, m * D:(m + 1) * D] = torch.tensor(acc, dtype=torch.float64)
    return out


def random_inputs(seed, N, Lq, M, D, shapes, P, dtype=torch.float64, lo=-0.2, hi=1.2):
    """Random value, locations uniform in [lo, hi] (so some fall outside the map) and
    softmax-normalised attention weights."""
    g = torch.Generator().manual_seed(seed)
    L, S = len(shapes), sum(h * w for h, w in shapes)
    value = torch.randn(N, S, M, D, generator=g, dtype=dtype)
    locations = lo + (hi - lo) * torch.rand(N, Lq, M, L, P, 2, generator=g, dtype=dtype)
    weights = torch.randn(N, Lq, M, L * P, generator=g, dtype=dtype).softmax(-1).view(N, Lq, M, L, P)
    return value, locations, weights


CASES = [
    # seed, N, Lq, M, D, shapes, P
    (0, 2, 5, 2, 3, [(3, 5), (4, 2), (7, 6)], 3),
    (1, 1, 7, 3, 2, [(1, 1), (2, 9), (5, 3), (6, 6)], 2),
    (2, 3, 4, 4, 1, [(8, 3)], 4),
]


# --------------------------------------------------------------------------------------------
# 1. Forward against the reference
# --------------------------------------------------------------------------------------------

def test_reference_sanity_hand_values():
    """The reference itself follows the stated convention: on a 1x1 level a sample at the
    centre reads v, at the border x=0 (px=-0.5) reads v/2, at x=-0.5 reads 0 (all zero pad)."""
    level = [[[4.0]]]
    assert bilinear_reference(level, 0.5, 0.5) == [4.0]
    assert bilinear_reference(level, 0.0, 0.5) == [2.0]
    assert bilinear_reference(level, 0.0, 0.0) == [1.0]
    assert bilinear_reference(level, -0.5, 0.5) == [0.0]
    # 1x2 level [a, b]: x = 0.5 is halfway between the centres at 0.25 and 0.75
    assert bilinear_reference([[[1.0], [3.0]]], 0.5, 0.5) == [2.0]


def test_hand_values_through_ms_deform_attn():
    """ms_deform_attn gives the same hand-computed values (centre, border half, outside zero)."""
    value = torch.tensor([4.0], dtype=torch.float64).view(1, 1, 1, 1)
    locs = torch.tensor([[0.5, 0.5], [0.0, 0.5], [0.0, 0.0], [-0.5, 0.5]], dtype=torch.float64)
    locs = locs.view(1, 4, 1, 1, 1, 2)
    weights = torch.ones(1, 4, 1, 1, 1, dtype=torch.float64)
    out = ms_deform_attn(value, [(1, 1)], locs, weights)
    torch.testing.assert_close(out.flatten(), torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("seed,N,Lq,M,D,shapes,P", CASES)
def test_forward_matches_loop_reference(seed, N, Lq, M, D, shapes, P):
    """Vectorised grid_sample implementation == hand-written bilinear loops in float64, on
    non-square levels with locations in [-0.2, 1.2] (zero-padding path included)."""
    value, locations, weights = random_inputs(seed, N, Lq, M, D, shapes, P)
    outside = ((locations < 0) | (locations > 1)).any(-1)
    assert outside.any() and (~outside).any()  # both paths really are exercised
    got = ms_deform_attn(value, shapes, locations, weights)
    expected = ms_deform_attn_reference(value, shapes, locations, weights)
    assert got.shape == (N, Lq, M * D) and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_far_outside_reads_zero():
    """Locations entirely off every level (beyond one pixel of the border) give exactly zero."""
    shapes = [(3, 5), (4, 2)]
    value, locations, weights = random_inputs(3, 1, 4, 2, 3, shapes, 2)
    locations = torch.where(torch.rand_like(locations) < 0.5, locations - 3.0, locations + 3.0)
    out = ms_deform_attn(value, shapes, locations, weights)
    assert torch.equal(out, torch.zeros_like(out))


def test_level_count_mismatch_raises():
    """A spatial_shapes list of the wrong length is rejected instead of silently mis-split."""
    value, locations, weights = random_inputs(4, 1, 2, 1, 2, [(2, 2), (1, 3)], 1)
    with pytest.raises(ValueError):
        ms_deform_attn(value, [(2, 2)], locations, weights)


# --------------------------------------------------------------------------------------------
# 2. Gradients
# --------------------------------------------------------------------------------------------

def test_gradcheck():
    """Analytic gradients w.r.t. value, sampling locations and attention weights match finite
    differences in float64 (random locations avoid the pixel-centre kinks)."""
    shapes = [(2, 3), (3, 2)]
    value, locations, weights = random_inputs(5, 1, 3, 2, 2, shapes, 2, lo=-0.1, hi=1.1)
    inputs = tuple(t.clone().requires_grad_(True) for t in (value, locations, weights))
    assert torch.autograd.gradcheck(
        lambda v, s, a: ms_deform_attn(v, shapes, s, a), inputs, eps=1e-6, atol=1e-6, rtol=1e-5
    )


# --------------------------------------------------------------------------------------------
# Module helpers
# --------------------------------------------------------------------------------------------

SHAPES = [(4, 6), (3, 2)]  # (H, W) per level: non-square, W != H


def make_module(d_model=16, n_levels=2, n_heads=4, n_points=3, seed=0, perturb=True):
    """An MSDeformAttn; with `perturb`, offset/attention weights are made non-zero so the
    query actually moves the samples and the softmax is not uniform."""
    torch.manual_seed(seed)
    module = MSDeformAttn(dim=d_model, levels=n_levels, heads=n_heads, points=n_points)
    if perturb:
        with torch.no_grad():
            module.sampling_offsets.weight.normal_(0, 0.3)
            module.attention_weights.weight.normal_(0, 0.5)
            module.attention_weights.bias.normal_(0, 0.5)
            module.value_proj.bias.normal_(0, 0.1)
            module.output_proj.bias.normal_(0, 0.1)
    return module


def module_inputs(module, N=2, Lq=5, shapes=SHAPES, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    C, L, S = module.d_model, len(shapes), sum(h * w for h, w in shapes)
    query = torch.randn(N, Lq, C, generator=g).to(dtype)
    reference = (0.1 + 0.8 * torch.rand(N, Lq, L, 2, generator=g)).to(dtype)
    value = torch.randn(N, S, C, generator=g).to(dtype)
    return query, reference, value


def module_reference(module, query, reference_points, value, shapes):
    """MSDeformAttn forward rebuilt with explicit per-element indexing of the official layouts:
    sampling_offsets output index ((h*L + l)*P + p)*2 + c with c = 0 for x, 1 for y;
    attention_weights output index (h*L + l)*P + p, softmax over (l, p) per head;
    value channels of head h are h*D ... h*D + D - 1; location = ref + offset / (W_l, H_l)."""
    N, Lq, C = query.shape
    M, L, P = module.n_heads, module.n_levels, module.n_points
    D = C // M
    off = module.sampling_offsets(query)      # (N, Lq, M*L*P*2)
    logits = module.attention_weights(query)  # (N, Lq, M*L*P)
    v = module.value_proj(value)              # (N, S, C)
    locations = torch.empty(N, Lq, M, L, P, 2, dtype=query.dtype)
    weights = torch.empty(N, Lq, M, L, P, dtype=query.dtype)
    for h in range(M):
        block = logits[..., h * L * P:(h + 1) * L * P]
        block = block.exp() / block.exp().sum(-1, keepdim=True)  # softmax written out
        for l, (H, W) in enumerate(shapes):
            for p in range(P):
                k = (h * L + l) * P + p
                weights[:, :, h, l, p] = block[..., l * P + p]
                locations[:, :, h, l, p, 0] = reference_points[:, :, l, 0] + off[..., 2 * k] / W
                locations[:, :, h, l, p, 1] = reference_points[:, :, l, 1] + off[..., 2 * k + 1] / H
    v_heads = torch.stack([v[..., h * D:(h + 1) * D] for h in range(M)], dim=2)  # (N, S, M, D)
    sampled = ms_deform_attn_reference(v_heads, shapes, locations, weights)
    return module.output_proj(sampled.to(query.dtype))


# --------------------------------------------------------------------------------------------
# 5. Initialisation and end-to-end module consistency
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_heads,n_levels,n_points", [(8, 4, 4), (3, 2, 2), (6, 1, 3)])
def test_official_initialisation(n_heads, n_levels, n_points):
    """sampling_offsets bias = head direction (cos, sin)(2πh/M) / max-abs component × (p+1),
    same on every level, in (heads, levels, points, 2) layout; every other weight/bias that the
    official init zeroes is exactly zero."""
    m = MSDeformAttn(dim=8 * 3, levels=n_levels, heads=n_heads, points=n_points)  # 24 is divisible by 8, 3 and 6
    expected = []
    for h in range(n_heads):
        theta = 2 * math.pi * h / n_heads
        cx, cy = math.cos(theta), math.sin(theta)
        scale = max(abs(cx), abs(cy))
        for _l in range(n_levels):
            for p in range(n_points):
                expected += [cx / scale * (p + 1), cy / scale * (p + 1)]
    expected = torch.tensor(expected, dtype=torch.float64)
    bias = m.sampling_offsets.bias.detach().double()
    torch.testing.assert_close(bias, expected, rtol=1e-6, atol=1e-6)  # float32 cos/sin ulps
    for t in (m.sampling_offsets.weight, m.attention_weights.weight, m.attention_weights.bias,
              m.value_proj.bias, m.output_proj.bias):
        assert torch.equal(t, torch.zeros_like(t))
    for lin in (m.value_proj, m.output_proj):  # xavier uniform bound sqrt(6 / (fan_in + fan_out))
        bound = math.sqrt(6.0 / (lin.in_features + lin.out_features))
        assert lin.weight.abs().max() <= bound and lin.weight.std() > bound / 4


def test_initial_offsets_are_the_eight_direction_star():
    """With 8 heads the first point of each head lies on the unit square in the 8 compass
    directions (1,0), (1,1), (0,1), (-1,1), (-1,0), (-1,-1), (0,-1), (1,-1)."""
    m = MSDeformAttn(dim=16, levels=2, heads=8, points=3)
    bias = m.sampling_offsets.bias.detach().view(8, 2, 3, 2)
    star = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]],
                        dtype=torch.float32)
    for l in range(2):
        for p in range(3):
            torch.testing.assert_close(bias[:, l, p], star * (p + 1), rtol=1e-6, atol=1e-6)


def test_init_zero_query_samples_at_reference_plus_bias():
    """Fresh module, zero query: offsets are the bias and attention is uniform 1/(L*P), so the
    output equals output_proj(ms_deform_attn(values, ref + bias/(W_l, H_l), uniform))."""
    torch.manual_seed(0)
    M, L, P, C = 4, 2, 3, 16
    m = MSDeformAttn(dim=C, levels=L, heads=M, points=P).double()
    N, Lq = 2, 5
    _, reference, value = module_inputs(m, N, Lq, dtype=torch.float64)
    query = torch.zeros(N, Lq, C, dtype=torch.float64)
    bias = m.sampling_offsets.bias.detach().view(M, L, P, 2)
    scale = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float64)  # (L, 2) as (W, H)
    locations = reference[:, :, None, :, None, :] + (bias / scale[None, :, None, :])[None, None]
    weights = torch.full((N, Lq, M, L, P), 1.0 / (L * P), dtype=torch.float64)
    v = m.value_proj(value).view(N, -1, M, C // M)
    expected = m.output_proj(ms_deform_attn_reference(v, SHAPES, locations, weights))
    with torch.no_grad():
        got = m(query, reference, value, SHAPES)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
def test_module_matches_explicit_reference(seed):
    """With perturbed (non-trivial) parameters and random queries, the module's reshapes,
    softmax and offset normalisation agree with an element-by-element rebuild in float64."""
    m = make_module(seed=seed).double()
    query, reference, value = module_inputs(m, seed=seed + 10, dtype=torch.float64)
    with torch.no_grad():
        got = m(query, reference, value, SHAPES)
        expected = module_reference(m, query, reference, value, SHAPES)
    assert got.shape == query.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_module_rejects_indivisible_heads():
    """d_model must split evenly over the heads."""
    with pytest.raises(ValueError):
        MSDeformAttn(dim=10, levels=2, heads=4, points=2)


# --------------------------------------------------------------------------------------------
# 3. torch.compile
# --------------------------------------------------------------------------------------------

def test_torch_compile_fullgraph_forward_backward():
    """torch.compile(fullgraph=True) traces the whole module without a graph break (it would
    raise otherwise); outputs and all gradients match eager to ~1e-5."""
    torch._dynamo.reset()
    eager = make_module(d_model=8, n_levels=2, n_heads=2, n_points=2, seed=3)
    compiled_module = make_module(d_model=8, n_levels=2, n_heads=2, n_points=2, seed=3)
    query, reference, value = module_inputs(eager, N=1, Lq=4, seed=4)

    def run(module, fn):
        q, r, v = (t.clone().requires_grad_(True) for t in (query, reference, value))
        out = fn(q, r, v, SHAPES)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), [q.grad, r.grad, v.grad] + [p.grad for p in module.parameters()]

    out_e, grads_e = run(eager, eager)
    out_c, grads_c = run(compiled_module, torch.compile(compiled_module, fullgraph=True))
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    for gc, ge in zip(grads_c, grads_e):
        assert gc is not None and ge is not None
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-5)
    assert grads_e[1].abs().sum() > 0  # gradient really flows into the sampling locations


# --------------------------------------------------------------------------------------------
# 4. Half precision
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_low_precision(dtype, tol):
    """The module runs end to end in fp16/bf16 (forward and backward), keeps the dtype, and
    stays within a dtype-appropriate relative error of the float32 result."""
    m32 = make_module(seed=5)
    query, reference, value = module_inputs(m32, seed=6)
    with torch.no_grad():
        ref = m32(query, reference, value, SHAPES)
    m_low = make_module(seed=5).to(dtype)
    q, r, v = (t.to(dtype) for t in (query, reference, value))
    v.requires_grad_(True)
    out = m_low(q, r, v, SHAPES)
    assert out.dtype == dtype and out.shape == ref.shape
    rel = (out.float() - ref).abs().max() / ref.abs().max()
    assert rel < tol, f"relative error {rel:.3g} for {dtype}"
    out.float().sum().backward()
    assert v.grad.dtype == dtype and torch.isfinite(v.grad.float()).all()


def test_low_precision_functional():
    """ms_deform_attn alone in fp16/bf16 keeps the dtype and is close to float64 on the same
    (rounded) inputs."""
    shapes = [(3, 5), (4, 2)]
    value, locations, weights = random_inputs(7, 2, 6, 2, 4, shapes, 3)
    for dtype, tol in ((torch.float16, 1e-2), (torch.bfloat16, 5e-2)):
        args = [t.to(dtype) for t in (value, locations, weights)]
        out = ms_deform_attn(args[0], shapes, args[1], args[2])
        v64, s64, a64 = (a.double() for a in args)
        exact = ms_deform_attn(v64, shapes, s64, a64)
        assert out.dtype == dtype
        rel = (out.double() - exact).abs().max() / exact.abs().max()
        assert rel < tol, f"relative error {rel:.3g} for {dtype}"
