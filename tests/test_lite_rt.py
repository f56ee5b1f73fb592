"""Lite-M2F, RT-M2F and Lite-ECO-M2F (encoders.LiteEncoder, encoders.RTEncoder). The encoder
contract (tests/test_encoders.py) already covers both encoders, a few training steps included;
these tests pin down what is particular to each. Every docstring names a one-line bug it catches."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import encoders
from config import load_config, official_to_ours
from conftest import ROOT
from flops import model_flops
from model import build_model

CHANNELS = {"res2": 16, "res3": 24, "res4": 32, "res5": 40}
DIM, HEADS = 32, 4


def backbone_features(batch=2, size=(64, 96), seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(batch, c, size[0] // s, size[1] // s, generator=g)
            for (name, c), s in zip(CHANNELS.items(), (4, 8, 16, 32))}


def lite(**kwargs):
    torch.manual_seed(0)
    return encoders.LiteEncoder(CHANNELS, dim=DIM, heads=HEADS, points=2, ffn_dim=64, **kwargs).eval()


def rt(**kwargs):
    torch.manual_seed(0)
    return encoders.RTEncoder(CHANNELS, dim=DIM, heads=HEADS, ffn_dim=64, **kwargs).eval()


# ---- Lite-M2F ------------------------------------------------------------------------------


@pytest.mark.parametrize("layers, blocks, kinds", [(6, 1, "HHHHHF"), (6, 3, "HFHFHF"), (3, 1, "HHF")])
@torch.no_grad()
def test_lite_token_sets_and_levels_per_layer(layers, blocks, kinds):
    """Per layer: a high-only layer's queries are the 1/32 + 1/16 tokens (with their positions),
    its values every token of all three levels, and the 1/8 tokens pass through untouched; a full
    layer queries every token. Catches e.g. `value=src[:, :n]` (values of the high tokens only),
    a full layer first in each block, or the queries taken from the end of the sequence (1/8)."""
    encoder = lite(layers=layers, blocks=blocks)
    feats = backbone_features()
    maps = encoder.input_proj([feats[name] for name in encoders.LEVELS])
    shapes = [tuple(m.shape[-2:]) for m in maps]
    S, n_high = sum(h * w for h, w in shapes), sum(h * w for h, w in shapes[:2])
    pos = encoder.input_proj.position(shapes, None)
    seen = []  # per layer: its input and output, and the query, value and levels its attention got

    def attn_hook(attn, args):
        query, _, value, spatial_shapes = args
        seen[-1].update(query=query, value=value, shapes=[tuple(s) for s in spatial_shapes])

    hooks = []
    for layer in encoder.layers:
        hooks.append(layer.register_forward_pre_hook(lambda m, a: seen.append({})))
        hooks.append(layer.self_attn.register_forward_pre_hook(attn_hook))
        hooks.append(layer.register_forward_hook(lambda m, a, out: seen[-1].update(input=a[0], output=out)))
    encoder(feats)
    for h in hooks:
        h.remove()
    assert "".join("F" if layer.high_levels == 0 else "H" for layer in encoder.layers) == kinds
    assert len(seen) == layers
    for kind, rec in zip(kinds, seen):
        assert rec["shapes"] == shapes  # every layer samples all three levels
        assert rec["value"].shape[1] == S
        torch.testing.assert_close(rec["value"], rec["input"], rtol=0, atol=0)  # the current tokens, all of them
        n = n_high if kind == "H" else S
        torch.testing.assert_close(rec["query"], (rec["input"] + pos)[:, :n], rtol=0, atol=0)
        if kind == "H":
            torch.testing.assert_close(rec["output"][:, n_high:], rec["input"][:, n_high:], rtol=0, atol=0)
            assert not torch.allclose(rec["output"][:, :n_high], rec["input"][:, :n_high])
        else:
            assert not torch.allclose(rec["output"][:, n_high:], rec["input"][:, n_high:])


@torch.no_grad()
def test_lite_with_every_level_high_is_m2f():
    """With all three levels "high" every layer queries every token: M2F, loaded by M2F's
    parameter names (so the official M2F mapping applies to Lite-M2F). Catches a Lite layer that
    re-adds the positions to its values, or any rename of a Lite parameter."""
    torch.manual_seed(0)
    m2f = encoders.M2FEncoder(CHANNELS, dim=DIM, heads=HEADS, points=2, ffn_dim=64, layers=3).eval()
    encoder = lite(layers=3, high_levels=3)
    encoder.load_state_dict(m2f.state_dict())  # strict: the same names and shapes
    feats = backbone_features()
    for got, want in zip(encoder(feats, exit=2)[1], m2f(feats, exit=2)[1]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    official = "sem_seg_head.pixel_decoder.transformer.encoder.layers.2.self_attn.value_proj.weight"
    assert official_to_ours(official) == "encoder.layers.2.self_attn.value_proj.weight"


def test_lite_settings_are_checked():
    """Catches a Lite-M2F that silently drops layers when blocks does not divide them."""
    with pytest.raises(ValueError, match="dividing"):
        lite(layers=6, blocks=4)
    with pytest.raises(ValueError, match="high_levels"):
        lite(high_levels=0)


# ---- RT-M2F --------------------------------------------------------------------------------


def sine_embedding_by_hand(h, w, dim, temperature=10000.0, order="rows"):
    """(h·w, dim) written out entry by entry: token t at (a, b) -> [sin(a·ω_k)]_k, [cos(a·ω_k)]_k,
    [sin(b·ω_k)]_k, [cos(b·ω_k)]_k, ω_k = T^(-k/(dim/4)). order "rows": token y·w + x at (y, x);
    "rt-detr": as RT-DETR's meshgrid(arange(w), arange(h), indexing="ij") flattened, token i at
    (i // h, i % h)."""
    quarter = dim // 4
    out = torch.zeros(h * w, dim, dtype=torch.float64)
    for t in range(h * w):
        a, b = divmod(t, w) if order == "rows" else divmod(t, h)
        for k in range(quarter):
            omega = 1.0 / temperature ** (k / quarter)
            out[t, k], out[t, quarter + k] = math.sin(a * omega), math.cos(a * omega)
            out[t, 2 * quarter + k], out[t, 3 * quarter + k] = math.sin(b * omega), math.cos(b * omega)
    return out.float()


@pytest.mark.parametrize("official", [False, True])
@torch.no_grad()
def test_aifi_only_on_1_32_and_equal_to_direct_attention(official):
    """AIFI runs on the 1/32 tokens only (the 1/16 and 1/8 maps reach CCFM as projected), and
    equals a post-norm layer written with torch's nn.MultiheadAttention (our parameters loaded into
    it by name) and the 2-D sin-cos embedding written out by hand, on a non-square 1/32 map (2x3),
    in both token orders. Catches sin and cos swapped, the embedding added to the values too,
    positions normalised as DETR's, or RT-DETR's order used by default."""
    encoder = rt(pe_official_order=official)
    layer = encoder.encoder[0].layers[0]
    for p in encoder.parameters():  # away from the init (zero biases) so that every term shows
        p.add_(0.1 * torch.randn_like(p))
    feats = backbone_features(size=(64, 96))
    captured, cross_scale = [], encoder.cross_scale

    def record(maps):  # what CCFM receives
        captured.append([m.clone() for m in maps])
        return cross_scale(maps)

    encoder.cross_scale = record
    encoder(feats)
    (maps,) = captured
    projected = [proj(feats[name]) for proj, name in zip(encoder.input_proj, ("res3", "res4", "res5"))]
    torch.testing.assert_close(maps[0], projected[0], rtol=0, atol=0)
    torch.testing.assert_close(maps[1], projected[1], rtol=0, atol=0)

    x = projected[2].flatten(2).transpose(1, 2)  # (B, 6, C)
    h, w = projected[2].shape[-2:]
    assert (h, w) == (2, 3)
    pos = sine_embedding_by_hand(h, w, DIM, order="rt-detr" if official else "rows")[None]
    mha = nn.MultiheadAttention(DIM, HEADS, batch_first=True).eval()
    mha.load_state_dict(layer.self_attn.state_dict())
    attended = mha(x + pos, x + pos, x, need_weights=False)[0]
    y = layer.norm1(x + attended)
    y = layer.norm2(y + layer.linear2(F.gelu(layer.linear1(y))))
    torch.testing.assert_close(maps[2], y.transpose(1, 2).reshape_as(projected[2]), rtol=1e-5, atol=1e-5)


def test_the_two_embedding_orders_agree_on_square_maps_only():
    """Catches a 'correct' order that is not RT-DETR's on square maps (checkpoints trained at
    640x640 would lose their positions), e.g. columns in the first half of the channels."""
    square = [encoders.sincos_position_2d(4, 4, 16, official_order=o) for o in (False, True)]
    torch.testing.assert_close(square[0], square[1], rtol=0, atol=0)
    wide = [encoders.sincos_position_2d(2, 3, 16, official_order=o) for o in (False, True)]
    assert not torch.allclose(wide[0], wide[1])
    torch.testing.assert_close(wide[0], sine_embedding_by_hand(2, 3, 16), rtol=1e-6, atol=1e-6)


PRESETS = {  # backbone channels res2..res5, hidden width, FFN, CSPRep expansion and blocks
    "Swin-T (the authors')": ({"res2": 96, "res3": 192, "res4": 384, "res5": 768}, 256, 1024, 1.0, 3),
    "R50 (RT-DETR r50vd)": ({"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}, 256, 1024, 1.0, 3),
    "R18 (RT-DETR r18vd)": ({"res2": 64, "res3": 128, "res4": 256, "res5": 512}, 256, 1024, 0.5, 3),
    "R101 (RT-DETR r101vd)": ({"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}, 384, 2048, 1.0, 3),
}


@pytest.mark.parametrize("preset", PRESETS)
def test_ccfm_shapes_and_channels_per_preset(preset):
    """CCFM's output shapes and every module's channels, and RT-DETR's HybridEncoder parameter
    names, per preset (on the meta device). Catches e.g. CSPRep's hidden width taken from its
    input (2·dim) instead of int(dim·expansion), or conv3 kept when hidden == dim."""
    channels, dim, ffn, expansion, blocks = PRESETS[preset]
    with torch.device("meta"):
        encoder = encoders.RTEncoder(channels, dim=dim, ffn_dim=ffn, expansion=expansion, csp_blocks=blocks).eval()
    feats = {name: torch.empty(2, c, 256 // s, 384 // s, device="meta")
             for (name, c), s in zip(channels.items(), (4, 8, 16, 32))}
    mask, multi_scale = encoder(feats)
    assert mask.shape == (2, dim, 32, 48) and encoder.mask_stride == 8
    assert [tuple(m.shape) for m in multi_scale] == [(2, dim, 8, 12), (2, dim, 16, 24), (2, dim, 32, 48)]
    hidden = int(dim * expansion)
    shapes = {name: tuple(p.shape) for name, p in encoder.state_dict().items()}
    for i, name in enumerate(("res3", "res4", "res5")):
        assert shapes[f"input_proj.{i}.0.weight"] == (dim, channels[name], 1, 1)
        assert shapes[f"input_proj.{i}.1.running_var"] == (dim,)
    assert shapes["encoder.0.layers.0.self_attn.in_proj_weight"] == (3 * dim, dim)
    assert shapes["encoder.0.layers.0.linear1.weight"] == (ffn, dim)
    for k in range(2):
        assert shapes[f"lateral_convs.{k}.conv.weight"] == (dim, dim, 1, 1)
        assert shapes[f"downsample_convs.{k}.conv.weight"] == (dim, dim, 3, 3)
        assert encoder.downsample_convs[k].conv.stride == (2, 2)
        for block in ("fpn_blocks", "pan_blocks"):
            assert shapes[f"{block}.{k}.conv1.conv.weight"] == shapes[f"{block}.{k}.conv2.conv.weight"] \
                == (hidden, 2 * dim, 1, 1)
            assert len(getattr(encoder, block)[k].bottlenecks) == blocks
            assert shapes[f"{block}.{k}.bottlenecks.{blocks - 1}.conv1.conv.weight"] == (hidden, hidden, 3, 3)
            assert shapes[f"{block}.{k}.bottlenecks.{blocks - 1}.conv2.norm.weight"] == (hidden,)
            assert (f"{block}.{k}.conv3.conv.weight" in shapes) == (hidden != dim)
    assert not any(name.startswith("mask_branch.lateral") for name in shapes)  # 1/8: no res2 branch


@torch.no_grad()
def test_ccfm_data_flow():
    """CCFM step by step as RT-DETR's HybridEncoder.forward runs it: the top-down path upsamples the
    lateral conv's output, and the bottom-up path fuses those lateral outputs (not the maps before
    them). Catches `high = self.lateral_convs[k](inner[0])` without storing it back in inner[0]."""
    encoder = rt()
    for p in encoder.parameters():
        p.add_(0.1 * torch.randn_like(p))
    p8, p16, p32 = (torch.randn(2, DIM, *size) for size in ((8, 12), (4, 6), (2, 3)))
    up = lambda x: F.interpolate(x, scale_factor=2.0, mode="nearest")  # noqa: E731
    l32 = encoder.lateral_convs[0](p32)
    f16 = encoder.fpn_blocks[0](torch.cat([up(l32), p16], 1))
    l16 = encoder.lateral_convs[1](f16)
    f8 = encoder.fpn_blocks[1](torch.cat([up(l16), p8], 1))
    o16 = encoder.pan_blocks[0](torch.cat([encoder.downsample_convs[0](f8), l16], 1))
    o32 = encoder.pan_blocks[1](torch.cat([encoder.downsample_convs[1](o16), l32], 1))
    for got, want in zip(encoder.cross_scale([p8, p16, p32]), (f8, o16, o32)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- the papers' GFLOPs ----------------------------------------------------------------------

# (config, the papers' encoder and total GFLOPs at 1024x2048): PRO-SCALE Tables 2 and 4, ECO-M2F Table 2.
CITYSCAPES = [("lite_m2f_swin_t", 172.00, 428.70), ("lite_m2f_lpe_swin_t", 94.69, 351.40),
              ("rt_m2f_swin_t", 130.00, 361.10)]


def cityscapes_gflops(name, *overrides):
    with torch.device("meta"):
        model = build_model(load_config(ROOT / f"configs/cityscapes/{name}.yaml", list(overrides)))
    return model_flops(model, 1024, 2048)


@pytest.mark.parametrize("name, encoder, total", CITYSCAPES, ids=[c[0] for c in CITYSCAPES])
def test_the_six_cityscapes_figures(name, encoder, total):
    """The papers' six Cityscapes Swin-T figures, within 1 % (Lite-M2F's to their rounding).
    Catches e.g. Lite-M2F's (6+1) (181.6), values of the high tokens only (161.3), or RT-M2F's
    mask features without their 1x1 conv (127.6, -1.8 %)."""
    gflops = cityscapes_gflops(name)
    assert gflops["encoder_papers"] == pytest.approx(encoder, rel=0.01)
    assert gflops["total"] == pytest.approx(total, rel=0.01)
    if name.startswith("lite"):
        assert gflops["encoder_papers"] == pytest.approx(encoder, abs=0.015)
        assert gflops["total"] == pytest.approx(total, abs=0.025)


def test_rt_m2f_mask_features_at_1_4_miss_the_papers():
    """The other reading of RT-M2F, M2F's 1/4 branch on res2: 217 / 474 GFLOPs, far from the
    papers' 130 / 361. Catches a default that would move RT-M2F's mask features back to 1/4."""
    gflops = cityscapes_gflops("rt_m2f_swin_t", "model.encoder.mask_branch=conv")
    assert gflops["encoder_papers"] > 1.5 * 130.00 and gflops["total"] > 1.25 * 361.10


# ---- Lite-ECO-M2F ----------------------------------------------------------------------------


@torch.no_grad()
def test_lite_eco_batched_exits_equal_one_by_one():
    """Lite-ECO-M2F (the (5+1)x1 layout at demo width): a batch with per-image exits, directly and
    through a gate, gives each image what it gets alone at its exit. Catches a high-only layer that
    reads the 1/8 tokens of another image (a batch-wide slice in run_layers)."""
    cfg = load_config(ROOT / "configs/demo/lite_tiny.yaml", ["model.encoder.layers=6"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert [layer.high_levels for layer in model.encoder.layers] == [2, 2, 2, 2, 2, 0]
    assert model.encoder.num_exits == 6
    images = torch.randn(4, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    exits = torch.tensor([6, 1, 5, 3])
    batched = model(images, exit=exits)
    gated = model.forward_gated(images, lambda z: exits)
    for b, k in enumerate(exits.tolist()):
        alone = model(images[b: b + 1], exit=k)
        for key in ("pred_logits", "pred_masks"):
            torch.testing.assert_close(batched[key][b: b + 1], alone[key], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(gated[key][b: b + 1], alone[key], rtol=1e-4, atol=1e-5)
    eco = load_config(ROOT / "configs/cityscapes/lite_eco_m2f_swin_t.yaml")
    assert eco.model.encoder.name == "lite" and eco.train.exits == [1, 2, 3, 4, 5, 6]
