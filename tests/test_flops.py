"""FLOP counter: every expected number is written out from the formula it checks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flops import FlopCounter, model_flops
from msda import MSDeformAttn

BOTH = pytest.mark.parametrize("complete", [False, True])


def count(fn, complete=False):
    with FlopCounter(complete) as counter:
        fn()
    return sum(counter.counts.values())


@BOTH
@pytest.mark.parametrize("bias", [True, False])
def test_linear(complete, bias):
    layer = nn.Linear(16, 24, bias=bias)
    assert count(lambda: layer(torch.randn(2, 7, 16)), complete) == 2 * 7 * 16 * 24


@BOTH
@pytest.mark.parametrize("groups", [1, 4])
def test_conv2d(complete, groups):
    n, c_in, c_out, h, w, k = 2, 8, 12, 15, 10, 3
    conv = nn.Conv2d(c_in, c_out, k, stride=2, padding=1, groups=groups)
    h_out, w_out = (h + 2 - k) // 2 + 1, (w + 2 - k) // 2 + 1
    expected = n * c_out * (c_in // groups) * k * k * h_out * w_out
    assert count(lambda: conv(torch.randn(n, c_in, h, w)), complete) == expected


def test_conv_transpose2d():
    n, c_in, c_out, h, w, k = 2, 8, 6, 5, 4, 2
    conv = nn.ConvTranspose2d(c_in, c_out, k, stride=2)
    # Transposed: priced per input position.
    assert count(lambda: conv(torch.randn(n, c_in, h, w))) == n * c_in * c_out * k * k * h * w


def test_deformable_attention():
    C, M, P, shapes = 32, 4, 3, [(6, 8), (3, 4)]
    L, S = len(shapes), sum(h * w for h, w in shapes)
    Lq = S
    attn = MSDeformAttn(dim=C, levels=L, heads=M, points=P)
    query, value = torch.randn(1, Lq, C), torch.randn(1, S, C)
    reference_points = torch.rand(1, Lq, L, 2)
    run = lambda: attn(query, reference_points, value, shapes)  # noqa: E731
    linears = S * C * C + Lq * C * (M * L * P * 2) + Lq * C * (M * L * P) + Lq * C * C
    assert count(run) == linears
    # grid_sample returns (N·M, D, Lq, P) per level: 4 · M·D·Lq·P = 4 · Lq·C·P, L times.
    assert count(run, complete=True) == linears + 4 * Lq * C * P * L


@BOTH
def test_norms(complete):
    x = torch.randn(2, 8, 5, 6)
    numel = x.numel()
    assert count(lambda: nn.GroupNorm(4, 8)(x), complete) == 5 * numel
    assert count(lambda: nn.GroupNorm(4, 8, affine=False)(x), complete) == 4 * numel
    assert count(lambda: nn.LayerNorm(6)(x), complete) == 5 * numel
    assert count(lambda: nn.LayerNorm(6, elementwise_affine=False)(x), complete) == 4 * numel
    assert count(lambda: F.instance_norm(x), complete) == 4 * numel
    mean, var, weight, bias = torch.zeros(8), torch.ones(8), torch.ones(8), torch.zeros(8)
    assert count(lambda: F.batch_norm(x, mean, var, weight, bias, training=False), complete) == 2 * numel
    assert count(lambda: F.batch_norm(x, mean, var), complete) == 1 * numel
    assert count(lambda: F.batch_norm(x, mean, var, weight, bias, training=True), complete) == 5 * numel
    assert count(lambda: nn.BatchNorm2d(8).eval()(x), complete) == 2 * numel


@BOTH
def test_interpolate_and_pooling(complete):
    x = torch.randn(2, 3, 5, 7)
    # F.interpolate calls the upsample kernel inside; that nested call must not count again.
    bilinear = lambda: F.interpolate(x, size=(11, 13), mode="bilinear", align_corners=False)  # noqa: E731
    assert count(bilinear, complete) == 4 * 2 * 3 * 11 * 13
    assert count(lambda: F.interpolate(x, scale_factor=2, mode="nearest"), complete) == 1 * 2 * 3 * 10 * 14
    with pytest.raises(ValueError, match="bicubic"):
        count(lambda: F.interpolate(x, scale_factor=2, mode="bicubic"), complete)
    assert count(lambda: F.adaptive_avg_pool2d(x, 1), complete) == 2 * 3 * 5 * 7


@BOTH
def test_matmuls(complete):
    b, n, k, m = 3, 4, 5, 6
    a, c = torch.randn(b, n, k), torch.randn(b, k, m)
    macs = b * n * k * m
    assert count(lambda: a @ c, complete) == macs
    assert count(lambda: a.matmul(c), complete) == macs
    assert count(lambda: torch.bmm(a, c), complete) == macs
    assert count(lambda: torch.baddbmm(torch.randn(b, n, m), a, c), complete) == macs
    assert count(lambda: torch.addmm(torch.randn(m), a[0], c[0]), complete) == n * k * m
    # Broadcast: a batch that only the second operand has still multiplies the work.
    assert count(lambda: torch.matmul(a[0], c), complete) == macs
    assert count(lambda: torch.matmul(a[0, 0], c[0, :, 0]), complete) == k
    # __rmatmul__ calls torch.matmul inside: counted once, since nested calls are not seen.
    assert count(lambda: torch.Tensor.__rmatmul__(c, a), complete) == macs


@BOTH
def test_einsum(complete):
    b, q, c, h, w = 2, 3, 4, 5, 6
    mask_embed, features = torch.randn(b, q, c), torch.randn(b, c, h, w)
    macs = b * q * c * h * w
    assert count(lambda: torch.einsum("bqc,bchw->bqhw", mask_embed, features), complete) == macs
    assert count(lambda: torch.einsum("bqc,bchw->bqhw", [mask_embed, features]), complete) == macs
    assert count(lambda: torch.einsum("...qc,...chw", mask_embed, features), complete) == macs
    # No summed index: numpy's cost is size + 1, which fvcore halved and floored.
    assert count(lambda: torch.einsum("bq,bc->bqc", mask_embed[:, :, 0], features[:, :, 0, 0]), complete) \
        == (b * q * c + 1) // 2
    with pytest.raises(ValueError, match="3 operands"):
        count(lambda: torch.einsum("bq,bc,bh->bqch", mask_embed[..., 0], mask_embed[:, 0], features[:, 0, 0]))


def test_scaled_dot_product_attention():
    batch, heads, lq, lk, e, ev = 2, 4, 5, 7, 8, 6
    query, key = torch.randn(batch, heads, lq, e), torch.randn(batch, heads, lk, e)
    value = torch.randn(batch, heads, lk, ev)
    mask = torch.rand(lq, lk) > 0.3
    qk, av = batch * heads * lq * lk * e, batch * heads * lq * lk * ev
    plain = lambda: F.scaled_dot_product_attention(query, key, value)  # noqa: E731
    masked = lambda: F.scaled_dot_product_attention(query, key, value, attn_mask=mask)  # noqa: E731
    assert count(plain) == count(plain, complete=True) == qk + av
    assert count(masked) == av  # the papers' fvcore missed the masked QKᵀ (aten::baddbmm)
    assert count(masked, complete=True) == qk + av
    # Key and value broadcast over the batch, or shared by query heads (GQA): the query sets the work.
    shared = lambda: F.scaled_dot_product_attention(query, key[:1], value[:1], scale=0.5)  # noqa: E731
    assert count(shared) == qk + av
    gqa = lambda: F.scaled_dot_product_attention(  # noqa: E731
        query, key[:, :2], value[:, :2], enable_gqa=True)
    assert count(gqa) == qk + av


def test_multihead_attention_refuses():
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(1, 5, 8)
    with torch.no_grad(), pytest.raises(ValueError, match="multi_head_attention_forward"):
        count(lambda: mha(x, x, x))


@BOTH
def test_elementwise_ops_are_free(complete):
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)

    def ops():
        z = (x + y) * y - 1
        z = F.relu(z).sigmoid().softmax(-1)
        F.max_pool2d(z, 2)

    with FlopCounter(complete) as counter:
        ops()
    assert counter.counts == {}


def test_scopes_and_track():
    x = torch.randn(1, 3, 8)
    inner, outer = nn.Linear(8, 8), nn.Linear(8, 8)
    per_linear = 3 * 8 * 8
    counter = FlopCounter()
    counter.track(inner, "tracked")
    with counter:
        outer(x)
        with counter.scope("a"):
            outer(x)
            with counter.scope("b"):
                outer(x)
                inner(x)  # a tracked module inside a scope: innermost wins
            outer(x)
    expected = {"other": per_linear, "a": 2 * per_linear, "b": per_linear, "tracked": per_linear}
    assert counter.counts == expected
    assert not inner._forward_pre_hooks and not inner._forward_hooks  # hooks removed on exit


class FakeMask2Former(nn.Module):
    """Follows the model contract of model_flops, with layers whose FLOPs are easy to write down."""

    size_divisibility = 32

    def __init__(self, channels=8, queries=5):
        super().__init__()
        self.backbone = nn.Conv2d(3, channels, 3, stride=4, padding=1)
        self.encoder = nn.Sequential(nn.GroupNorm(2, channels), nn.Conv2d(channels, channels, 1))
        self.decoder = nn.Linear(channels, channels)
        self.queries = nn.Parameter(torch.randn(queries, channels))
        self.seen = None

    def forward(self, images, scale=1.0):
        self.seen = (images.shape, images.dtype, self.training, torch.is_grad_enabled())
        features = self.encoder(self.backbone(images)) * scale
        mask_embed = self.decoder(self.queries)[None]  # (1, Q, C)
        # Outside every part, so counted as "other":
        masks = torch.einsum("bqc,bchw->bqhw", mask_embed, features)
        logits = self.queries @ self.queries.T
        return {"masks": masks, "logits": logits}

    def inference(self, outputs, image_sizes):
        return F.interpolate(outputs["masks"], size=image_sizes[0], mode="bilinear", align_corners=False)


def test_model_flops():
    model = FakeMask2Former().double()
    model.train()
    model.encoder[0].eval()  # a mixed state that must come back as it was
    height, width = 50, 70
    padded_h, padded_w = 64, 96  # rounded up to multiples of 32
    h, w = (padded_h + 2 - 3) // 4 + 1, (padded_w + 2 - 3) // 4 + 1  # backbone output
    C, Q = 8, 5
    expected = {
        "backbone": C * 3 * 3 * 3 * h * w,
        "encoder": 5 * C * h * w + C * C * h * w,
        "decoder": Q * C * C,
        "postprocess": 4 * Q * height * width,
    }
    other = Q * C * h * w + Q * C * Q  # einsum and matmul in model.forward

    gflops = model_flops(model, height, width, scale=2.0)

    assert model.seen == (torch.Size([1, 3, padded_h, padded_w]), torch.float64, False, False)
    for part, count in expected.items():
        assert gflops[part] == pytest.approx(count / 1e9, rel=1e-12)
    assert gflops["total"] == pytest.approx((sum(expected.values()) + other) / 1e9, rel=1e-12)
    assert model.training and model.backbone.training and not model.encoder[0].training
    assert not model.backbone._forward_hooks  # tracking hooks are gone


# ---- the real models -------------------------------------------------------------------------

import json  # noqa: E402
from contextlib import redirect_stdout  # noqa: E402
from io import StringIO  # noqa: E402

import encoders  # noqa: E402
import evaluate
import flops  # noqa: E402
from config import load_config  # noqa: E402
from model import build_model  # noqa: E402

from conftest import ROOT  # noqa: E402
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.name != "base.yaml")


def layer_flops(tokens, C, levels, M, P, ffn):
    """By hand: value/offset/weight/output projections, the FFN, and two LayerNorms per token."""
    return tokens * (C * C + C * M * levels * P * 2 + C * M * levels * P + C * C + 2 * C * ffn + 2 * 5 * C)


def test_deformable_encoder_layer_by_hand():
    shapes = [(3, 5), (6, 10), (12, 20)]
    S, C, M, P, ffn = sum(h * w for h, w in shapes), 32, 4, 2, 64
    layer = encoders.DeformableEncoderLayer(dim=C, levels=len(shapes), heads=M, points=P, ffn_dim=ffn).eval()
    src = torch.randn(2, S, C)
    ref = encoders.reference_points(shapes)
    with FlopCounter() as counter, torch.no_grad():
        layer(src, torch.zeros(1, S, C), ref, shapes)
    assert sum(counter.counts.values()) == 2 * layer_flops(S, C, len(shapes), M, P, ffn)


def encoder_gflops(model, height, width, **kwargs):
    """GFLOPs of the encoder alone on random backbone features of an (height, width) image."""
    channels = model.backbone.channels
    feats = {name: torch.randn(1, c, height // 2 ** (i + 2), width // 2 ** (i + 2))
             for i, (name, c) in enumerate(channels.items())}
    with FlopCounter() as counter, torch.no_grad():
        model.encoder.eval()(feats, **kwargs)
    return sum(counter.counts.values()) / 1e9


def test_m2f_encoder_reproduces_the_paper():
    """Swin-T M2F encoder at 800x1088: the hand formula, and the papers' 117.00 GFLOPs (PRO-SCALE
    Table 1; theirs is an average over COCO images, so within 1%)."""
    model = build_model(load_config(ROOT / "configs/coco/m2f_swin_t.yaml"))
    gflops = encoder_gflops(model, 800, 1088)
    sizes = [(25, 34), (50, 68), (100, 136)]  # 1/32, 1/16, 1/8
    tokens, C, quarter = sum(h * w for h, w in sizes), 256, 200 * 272
    by_hand = (
        sum(h * w * c * C + 5 * h * w * C for (h, w), c in zip(sizes, (768, 384, 192)))  # input proj + GN
        + 6 * layer_flops(tokens, C, 3, 8, 4, 1024)
        + quarter * 96 * C + 5 * quarter * C  # lateral 1x1 conv + GN on res2
        + 4 * quarter * C  # bilinear upsampling of the 1/8 map
        + quarter * C * C * 9 + 5 * quarter * C  # 3x3 conv + GN
        + quarter * C * C  # mask_features
    )
    assert gflops == pytest.approx(by_hand / 1e9, rel=1e-9)
    assert gflops == pytest.approx(117.00, rel=0.01)


def test_exit_flops_drop_by_whole_layers():
    model = build_model(load_config(ROOT / "configs/demo/m2f_tiny.yaml"))
    full = encoder_gflops(model, 128, 192)
    tokens = sum((128 // s) * (192 // s) for s in (8, 16, 32))
    one_layer = layer_flops(tokens, 64, 3, 4, 4, 128) / 1e9
    for k in (1, 2):
        assert encoder_gflops(model, 128, 192, exit=k) == pytest.approx(full - (3 - k) * one_layer, rel=1e-9)


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_flops_command_for_every_config(path):
    out = StringIO()
    with redirect_stdout(out):
        evaluate.main(["flops", "--config", str(path), "--size", "64", "96", "--json"])
    result = json.loads(out.getvalue())
    assert result["size"] == [64, 96]
    parts = result["gflops"]
    assert set(parts) == {"backbone", "encoder", "decoder", "postprocess", "total", "encoder_papers"}
    assert all(parts[k] > 0 for k in parts)
    assert parts["total"] == pytest.approx(sum(parts[k] for k in ("backbone", "encoder", "decoder", "postprocess")))


def test_papers_encoder_column_leaves_out_the_mask_branch_upsampling():
    """The papers' encoder column misses the bilinear upsampling of the 1/8 map (4 per output
    value at 1/4 resolution); their totals include it. Also: the meta device counts the same."""
    cfg = load_config(ROOT / "configs/demo/m2f_tiny.yaml")
    gflops = flops.model_flops(build_model(cfg), 64, 96)
    assert gflops["encoder"] - gflops["encoder_papers"] == pytest.approx(4 * 64 * 16 * 24 / 1e9, rel=1e-9)
    with torch.device("meta"):
        shapes_only = build_model(cfg)
    assert flops.model_flops(shapes_only, 64, 96) == pytest.approx(gflops, rel=1e-12)


def test_flops_table_covers_every_row(capsys):
    """`evaluate.py flops --table`: M2F first in every group, then its other rows, each beside the
    papers' encoder and total ("-" where they give none)."""
    evaluate.main(["flops", "--table"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + len(evaluate.flops_configs())
    text = "\n".join(lines)
    assert ("| Cityscapes, Swin-L | PRO-SCALE (3,3,3) | 1024x2048 | 141.52 (-50.74%) | 141.39 | 1803.93 (-7.48%) "
            "| 141.00 | 1803.90 |") in text
    assert ("| Cityscapes, Swin-T | Lite-M2F | 1024x2048 | 172.13 (-38.80%) | 171.99 | 428.72 (-20.29%) "
            "| 172.00 | 428.70 |") in text
    assert ("| Cityscapes, Swin-T | M2F, no res2 | 1024x2048 | 193.82 (-31.09%) | 193.82 | 425.24 (-20.94%) "
            "| 132.00 | - |") in text  # the papers give C1's encoder only


@pytest.mark.parametrize("name, samplings",
                         [("proscale_333_r50", 3 * (1 + 2 + 3)), ("lite_m2f_r50", 1), ("rt_m2f_swin_t", 0)])
def test_meta_shortcuts_count_as_the_cpu_does(name, samplings, monkeypatch):
    """On the meta device the counter makes grid_sample's, interpolate's and the norms' outputs
    from their shapes. Catches: a wrong output shape (grid's last dim kept, size read as a scale),
    which changes the counts or raises later; and the shortcut never taken (the calls are counted)."""
    cfg = load_config(ROOT / "configs/coco" / f"{name}.yaml")
    torch.manual_seed(0)
    cpu = model_flops(build_model(cfg), 64, 96)
    with torch.device("meta"):
        shapes_only = build_model(cfg)
    taken = {}

    def counted(func, shape):
        def run(*args, **kwargs):
            taken[func.__name__] = taken.get(func.__name__, 0) + 1
            return shape(*args, **kwargs)
        return run
    monkeypatch.setattr(flops, "_META_SHAPES", {f: counted(f, shape) for f, shape in flops._META_SHAPES.items()})
    assert model_flops(shapes_only, 64, 96) == pytest.approx(cpu, rel=1e-12)
    assert taken.get("grid_sample", 0) >= samplings and taken["interpolate"] >= 2  # msda's levels; mask branch, post
    assert taken["layer_norm"] > 0 and (name.startswith("rt") or taken["group_norm"] > 0)  # RT-M2F: no GroupNorm
