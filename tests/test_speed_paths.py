"""The encoders' fast paths give what the plain computation gives, and the timing helpers.

Fast paths (encoders.py, msda.py) against references written with torch.nn.functional on the same
parameters, on random inputs, in eval and train mode, gradients included where training runs them:

    * the LPE's max pool as a separable max (no grad), on a channels_last copy (grad), or by torch's
      channels-last kernel on a channels-last input,
    * the mask branch with its in-place sum and ReLU,
    * one GEMM for the deformable attention's offsets and attention logits,
    * the encoder layer's in-place ReLU,

and the parameter names, shapes and FLOP counts are unchanged. Then metrics.interleaved_times
and ratio_summary, with a fake clock (exact) and with real work of known relative cost.
"""
import time

import pytest
import torch
import torch.nn.functional as F

import encoders
import msda
from flops import FlopCounter
from metrics import interleaved_times, ratio_summary

ATOL = 1e-5
DIM = 32


def perturb(module, seed=0):
    """Every parameter noised, so zero-initialised ones (offsets, weights, biases) take part."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return module


def grads(module, *inputs):
    return [p.grad.clone() for p in module.parameters()] + [x.grad.clone() for x in inputs]


@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 3, 1, 4), (1, 2, 6, 1)])
def test_separable_max_pool_is_max_pool(shape):
    pool = encoders.SeparableMaxPool3x3(kernel_size=3, stride=1, padding=1)
    x = torch.randn(shape)
    with torch.no_grad():
        fast = pool(x)
    assert fast.is_contiguous() and torch.equal(fast, F.max_pool2d(x, 3, 1, 1))
    # With autograd (the channels_last path): the same values and torch's own gradient.
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = pool(a)
    assert out.is_contiguous() and torch.equal(out, F.max_pool2d(b, 3, 1, 1))
    cotangent = torch.randn(shape)
    out.backward(cotangent)
    F.max_pool2d(b, 3, 1, 1).backward(cotangent)
    assert torch.allclose(a.grad, b.grad, atol=ATOL)
    # A channels-last input (the mask branch's) stays channels-last, with the same values.
    cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        pooled = pool(cl)
    assert torch.equal(pooled, F.max_pool2d(x, 3, 1, 1))
    assert pooled.is_contiguous(memory_format=torch.channels_last) or cl.is_contiguous()


def mask_branch_reference(branch, res2, coarse, kind):
    """MaskBranch.forward written out with out-of-place functional ops."""
    conv, gn = branch.lateral
    x = F.group_norm(F.conv2d(res2, conv.weight), 32, gn.weight, gn.bias, gn.eps)
    x = x + F.interpolate(coarse, size=res2.shape[-2:], mode="bilinear", align_corners=False)
    smooth, gn2 = branch.output[0], branch.output[1]
    if kind == "conv":
        x = F.conv2d(x, smooth.weight, padding=1)
    elif kind == "lpe_max":
        x = F.max_pool2d(x, 3, 1, 1)
    else:
        x = F.avg_pool2d(x, 3, 1, 1)
    x = F.relu(F.group_norm(x, 32, gn2.weight, gn2.bias, gn2.eps))
    return F.conv2d(x, branch.mask_features.weight, branch.mask_features.bias)


@pytest.mark.parametrize("kind", ["conv", "lpe_max", "lpe_avg"])
@pytest.mark.parametrize("training", [False, True])
def test_mask_branch_matches_functional_reference(kind, training):
    branch = perturb(encoders.MaskBranch(16, dim=DIM, kind=kind)).train(training)
    g = torch.Generator().manual_seed(1)
    res2, coarse = torch.randn(2, 16, 10, 14, generator=g), torch.randn(2, DIM, 5, 7, generator=g)
    if not training:
        with torch.no_grad():
            assert torch.allclose(branch(res2, coarse), mask_branch_reference(branch, res2, coarse, kind), atol=ATOL)
        return
    cotangent = torch.randn(2, DIM, 10, 14, generator=g)
    results = []
    for fn in (branch, lambda r, c: mask_branch_reference(branch, r, c, kind)):
        branch.zero_grad()
        r, c = res2.clone().requires_grad_(), coarse.clone().requires_grad_()
        out = fn(r, c)
        out.backward(cotangent)
        results.append((out.detach(), grads(branch, r, c)))
    (fast, fast_grads), (ref, ref_grads) = results
    assert torch.allclose(fast, ref, atol=ATOL)
    for a, b in zip(fast_grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-4)


def attention_reference(attn, query, ref, value, shapes):
    """MSDeformAttn.forward with the two official linears applied separately."""
    N, Lq, _ = query.shape
    M, L, P = attn.n_heads, attn.n_levels, attn.n_points
    v = attn.value_proj(value).view(N, value.shape[1], M, attn.d_model // M)
    offsets = attn.sampling_offsets(query).view(N, Lq, M, L, P, 2)
    weights = attn.attention_weights(query).view(N, Lq, M, L * P).softmax(-1).view(N, Lq, M, L, P)
    scale = torch.tensor([[1.0 / w, 1.0 / h] for h, w in shapes])  # (L, 2) as (x, y), as the module
    locations = torch.addcmul(ref[:, :, None, :, None, :], offsets, scale[None, None, None, :, None, :])
    return attn.output_proj(msda.ms_deform_attn(v, shapes, locations, weights))


def attention_inputs(shapes, seed=2):
    g = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    return (torch.randn(2, S, DIM, generator=g), torch.rand(2, S, len(shapes), 2, generator=g),
            torch.randn(2, S, DIM, generator=g))


def test_fused_offsets_and_logits_are_the_two_linears():
    attn = perturb(msda.MSDeformAttn(dim=DIM, levels=3, heads=4, points=2))
    query = torch.randn(2, 11, DIM)
    offsets, logits = attn.offsets_and_logits(query)  # queries innermost: (N, O, Lq)
    assert torch.allclose(offsets, attn.sampling_offsets(query).transpose(1, 2), atol=ATOL)
    assert torch.allclose(logits, attn.attention_weights(query).transpose(1, 2), atol=ATOL)
    # The checkpoint still holds the two official linears, nothing else.
    assert sorted(attn.state_dict()) == sorted(f"{m}.{t}" for m in ("sampling_offsets", "attention_weights",
                                                                    "value_proj", "output_proj")
                                               for t in ("weight", "bias"))


@pytest.mark.parametrize("training", [False, True])
def test_deformable_attention_matches_separate_linears(training):
    shapes = [(2, 3), (4, 6), (8, 12)]
    attn = perturb(msda.MSDeformAttn(dim=DIM, levels=3, heads=4, points=2)).train(training)
    query, ref, value = attention_inputs(shapes)
    if not training:
        with torch.no_grad():
            assert torch.allclose(attn(query, ref, value, shapes), attention_reference(attn, query, ref, value, shapes),
                                  atol=ATOL)
        return
    cotangent = torch.randn(query.shape, generator=torch.Generator().manual_seed(4))
    results = []
    for fn in (attn, lambda q, v: attention_reference(attn, q, ref, v, shapes)):
        attn.zero_grad()
        q, v = query.clone().requires_grad_(), value.clone().requires_grad_()
        out = attn(q, ref, v, shapes) if fn is attn else fn(q, v)
        out.backward(cotangent)
        results.append((out.detach(), grads(attn, q, v)))
    (fast, fast_grads), (slow, slow_grads) = results
    assert torch.allclose(fast, slow, atol=ATOL)
    for a, b in zip(fast_grads, slow_grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_encoder_layer_in_place_relu_keeps_gradients():
    shapes = [(2, 3), (4, 6), (8, 12)]
    layer = perturb(encoders.DeformableEncoderLayer(dim=DIM, levels=3, heads=4, points=2, ffn_dim=48)).train()
    src, ref, pos = attention_inputs(shapes, seed=3)
    ref = ref[:, :, 0]  # (B, S, 2): the layer gives every level the same reference

    def reference(x):
        attended = layer.self_attn(x + pos, ref[:, :, None].expand(-1, -1, 3, -1), x, shapes)
        x = layer.norm1(x + attended)
        return layer.norm2(x + layer.linear2(F.relu(layer.linear1(x))))
    results = []
    for fn in (lambda x: layer(x, pos, ref, shapes), reference):
        layer.zero_grad()
        x = src.clone().requires_grad_()
        out = fn(x)
        out.square().sum().backward()
        results.append((out.detach(), grads(layer, x)))
    (fast, fast_grads), (slow, slow_grads) = results
    assert torch.allclose(fast, slow, atol=ATOL)
    for a, b in zip(fast_grads, slow_grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_flop_counts_unchanged_by_the_fused_gemm():
    """FLOPs of one deformable attention call, written out from the four linears (sampling free)."""
    shapes = [(2, 3), (4, 6)]
    M, L, P, S = 4, 2, 2, 6 + 24
    attn = msda.MSDeformAttn(dim=DIM, levels=L, heads=M, points=P)
    query, ref, value = attention_inputs(shapes)
    with torch.no_grad(), FlopCounter() as counter:
        attn(query, ref, value, shapes)
    per_query = DIM * (M * L * P * 2 + M * L * P + DIM)  # offsets, logits, output projection
    assert sum(counter.counts.values()) == 2 * S * per_query + 2 * S * DIM * DIM  # + value projection


# ---- metrics.interleaved_times / ratio_summary ------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_interleaved_times_with_a_fake_clock():
    clock, order = FakeClock(), []

    def work(name, seconds):
        def run():
            order.append(name)
            clock.now += seconds
        return run
    fns = {"base": work("base", 2.0), "half": work("half", 1.0), "triple": work("triple", 6.0)}
    times = interleaved_times(fns, rounds=3, warmup=1, clock=clock)
    assert times == {"base": [2.0] * 3, "half": [1.0] * 3, "triple": [6.0] * 3}
    # One warm-up call each, then each round in a rotated order.
    assert order == ["base", "half", "triple",
                     "base", "half", "triple", "half", "triple", "base", "triple", "base", "half"]
    summary = ratio_summary(times, "base")
    assert summary == {"base": (1.0, (1.0, 1.0)), "half": (0.5, (0.5, 0.5)), "triple": (3.0, (3.0, 3.0))}


def test_ratio_summary_is_per_round():
    times = {"a": [1.0, 2.0, 4.0], "b": [2.0, 2.0, 2.0]}  # ratios b/a per round: 2, 1, 0.5
    median, (low, high) = ratio_summary(times, "a")["b"]
    assert (median, low, high) == (1.0, 0.5, 2.0)


def test_interleaved_times_with_real_work():
    def workload():  # plain Python: no thread pool whose spinning would add CPU time to every call
        return sum(i * i for i in range(100_000))

    def three_times():
        for _ in range(3):
            workload()
    times = interleaved_times({"once": workload, "three": three_times}, rounds=5, warmup=1, clock=time.process_time)
    median, _ = ratio_summary(times, "once")["three"]
    assert 2 < median < 4.5
