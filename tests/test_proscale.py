"""PRO-SCALE: stage structure, TRC, LPE, equivalence with M2F, and its GFLOPs."""
import pytest
import torch
import torch.nn.functional as F

import encoders
from flops import FlopCounter

CHANNELS = {"res2": 16, "res3": 32, "res4": 48, "res5": 64}
DIM, HEADS, POINTS, FFN = 32, 4, 2, 64


def features(batch=2, size=(64, 96), seed=0):
    g = torch.Generator().manual_seed(seed)
    H, W = size
    return {f"res{i + 2}": torch.randn(batch, c, H // 2 ** (i + 2), W // 2 ** (i + 2), generator=g)
            for i, c in enumerate(CHANNELS.values())}


def proscale(depths, **kwargs):
    torch.manual_seed(0)
    return encoders.ProScaleEncoder(CHANNELS, depths=depths, dim=DIM, heads=HEADS, points=POINTS, ffn_dim=FFN, **kwargs).eval()


@pytest.mark.parametrize("depths", [(1, 1, 1), (3, 1, 1), (1, 3, 1), (1, 1, 3), (2, 0, 1)])
def test_stage_structure(depths):
    """Layer l of stage s is built for s levels and sees exactly the tokens of levels 1..s;
    the 1/8 tokens are untouched before stage 3."""
    enc = proscale(depths, trc=False)
    assert len(enc.layers) == sum(depths)
    levels = [layer.self_attn.n_levels for layer in enc.layers]
    assert levels == [1] * depths[0] + [2] * depths[1] + [3] * depths[2]
    # Sampling-offset layers have heads·levels·points·2 outputs: parameters grow with the stage.
    for layer, n in zip(enc.layers, levels):
        assert layer.self_attn.sampling_offsets.out_features == HEADS * n * POINTS * 2

    feats = features()
    seen = []
    for layer in enc.layers:
        layer.register_forward_hook(lambda mod, args, out: seen.append((args[0].clone(), args[3])))
    with torch.no_grad():
        enc(feats)
    shapes = [(2, 3), (4, 6), (8, 12)]  # 1/32, 1/16, 1/8 of 64 x 96
    for (tokens, layer_shapes), n in zip(seen, levels):
        assert layer_shapes == shapes[:n]
        assert tokens.shape[1] == sum(h * w for h, w in shapes[:n])
    # The 1/8 tokens entering stage 3 are the projected features, untouched by stages 1 and 2.
    stage3 = [t for (t, _), n in zip(seen, levels) if n == 3]
    if stage3:
        projected = enc.input_proj([feats[k] for k in encoders.LEVELS])[2].flatten(2).transpose(1, 2)
        torch.testing.assert_close(stage3[0][:, -8 * 12:], projected, rtol=0, atol=0)


def test_parameters_per_configuration():
    """Each layer has its own weights; parameter counts add up stage by stage."""
    def layer_params(levels):
        return sum(p.numel() for p in encoders.DeformableEncoderLayer(dim=DIM, levels=levels, heads=HEADS, points=POINTS, ffn_dim=FFN).parameters())

    base = sum(p.numel() for p in proscale((1, 0, 0), trc=False).parameters()) - layer_params(1)
    for depths in [(1, 1, 1), (3, 3, 3), (3, 1, 1), (1, 3, 1), (1, 1, 3)]:
        total = sum(p.numel() for p in proscale(depths, trc=False).parameters())
        assert total == base + sum(d * layer_params(s + 1) for s, d in enumerate(depths))
    assert sum(p.numel() for p in proscale((1, 1, 1)).parameters()) == base + sum(
        layer_params(s + 1) for s in range(3)) + DIM + 1  # TRC's φ = Linear(dim, 1)
    assert len({id(p) for p in proscale((3, 3, 3)).parameters()}) == len(list(proscale((3, 3, 3)).parameters()))


@pytest.mark.parametrize("official", [False, True])
def test_token_recalibration_formula(official):
    """ŝ = s ⊙ sigmoid(ε·φ(resize(s2))), computed directly; the official layout reshapes tokens to
    maps without a transpose."""
    torch.manual_seed(1)
    trc = encoders.TokenRecalibration(dim=DIM, epsilon=0.1, official_layout=official)
    B, shape, guide_shape = 2, (3, 5), (12, 20)
    tokens = torch.randn(B, 15, DIM)
    guide = torch.randn(B, 240, DIM)
    if official:
        maps = guide.reshape(B, DIM, 12, 20)
        resized = F.interpolate(maps, size=shape, mode="bilinear", align_corners=False).reshape(B, 15, DIM)
    else:
        maps = guide.permute(0, 2, 1).reshape(B, DIM, 12, 20)
        resized = F.interpolate(maps, size=shape, mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(B, 15, DIM)
    phi = resized @ trc.phi.weight.T + trc.phi.bias  # (B, 15, 1)
    expected = tokens * torch.sigmoid(0.1 * phi)
    torch.testing.assert_close(trc(tokens, shape, guide, guide_shape), expected)


def test_official_layout_differs_from_the_transpose():
    torch.manual_seed(2)
    a = encoders.TokenRecalibration(dim=DIM, official_layout=False)
    b = encoders.TokenRecalibration(dim=DIM, official_layout=True)
    b.load_state_dict(a.state_dict())
    tokens, guide = torch.randn(1, 15, DIM), torch.randn(1, 240, DIM)
    assert not torch.allclose(a(tokens, (3, 5), guide, (12, 20)), b(tokens, (3, 5), guide, (12, 20)))


@pytest.mark.parametrize("kind, pool", [("lpe_max", torch.nn.MaxPool2d), ("lpe_avg", torch.nn.AvgPool2d)])
def test_light_pixel_embedding(kind, pool):
    branch = encoders.MaskBranch(16, dim=DIM, kind=kind)
    smooth = branch.output[0]
    assert isinstance(smooth, pool) and (smooth.kernel_size, smooth.stride, smooth.padding) in [(3, 1, 1), ((3, 3), (1, 1), (1, 1))]
    assert isinstance(branch.output[1], torch.nn.GroupNorm) and isinstance(branch.output[2], torch.nn.ReLU)
    convs = [m for m in branch.output.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == []  # no conv in the 1/4 branch's smoothing: only the lateral and mask_features stay
    out = branch(torch.randn(2, 16, 16, 24), torch.randn(2, DIM, 8, 12))
    assert out.shape == (2, DIM, 16, 24)


def test_no_res2_ablation_gives_eighth_resolution_masks():
    enc = proscale((1, 1, 1), mask_branch="none")
    mask_features, maps = enc(features())
    assert mask_features.shape[-2:] == maps[-1].shape[-2:] == (8, 12)
    assert enc.mask_branch.lateral is None and enc.mask_branch.stride == 8


@torch.no_grad()
def test_006_without_trc_is_the_m2f_encoder():
    """All six layers in stage 3 over all tokens, no TRC: exactly Mask2Former's encoder."""
    m2f = encoders.M2FEncoder(CHANNELS, dim=DIM, heads=HEADS, points=POINTS, ffn_dim=FFN, layers=6).eval()
    ps = proscale((0, 0, 6), trc=False, mask_branch="conv")
    ps.load_state_dict(m2f.state_dict())
    feats = features()
    a_mask, a_maps = m2f(feats)
    b_mask, b_maps = ps(feats)
    torch.testing.assert_close(b_mask, a_mask, rtol=0, atol=0)
    for a, b in zip(a_maps, b_maps):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def encoder_flops(enc, size=(128, 192)):
    with FlopCounter() as counter, torch.no_grad():
        enc(features(batch=1, size=size))
    return sum(counter.counts.values())


def layer_flops(tokens, levels):
    C = DIM
    return tokens * (2 * C * C + C * HEADS * levels * POINTS * 3 + 2 * C * FFN + 2 * 5 * C)


def test_flops_shrink_by_the_removed_layers_and_conv():
    """Encoder GFLOPs fall as p1, p2 or p3 shrink, by exactly the removed layers; LPE removes
    the 3x3 conv; TRC costs its two resizes and φ."""
    H, W = 128, 192
    n32, n16, n8 = (H // 32) * (W // 32), (H // 16) * (W // 16), (H // 8) * (W // 8)
    quarter = (H // 4) * (W // 4)
    stage_tokens = [n32, n32 + n16, n32 + n16 + n8]
    cost = {d: encoder_flops(proscale(d, trc=False)) for d in [(3, 3, 3), (1, 3, 3), (3, 1, 3), (3, 3, 1), (1, 1, 1)]}
    for d in [(1, 3, 3), (3, 1, 3), (3, 3, 1)]:
        stage = d.index(1)
        assert cost[(3, 3, 3)] - cost[d] == 2 * layer_flops(stage_tokens[stage], stage + 1)
    assert cost[(3, 3, 3)] > cost[(3, 3, 1)] > cost[(1, 1, 1)]
    # Against M2F with the same width: the removed layers, and the 3x3 conv (LPE keeps its GN).
    m2f = encoders.M2FEncoder(CHANNELS, dim=DIM, heads=HEADS, points=POINTS, ffn_dim=FFN, layers=6).eval()
    removed_layers = 6 * layer_flops(stage_tokens[2], 3) - sum(layer_flops(stage_tokens[s], s + 1) for s in range(3))
    removed_conv = quarter * DIM * DIM * 9
    assert encoder_flops(m2f) - cost[(1, 1, 1)] == removed_layers + removed_conv
    # TRC: a bilinear resize (4 per output value) and φ for the 1/32 and 1/16 tokens.
    trc_cost = 4 * (n32 + n16) * DIM + (n32 + n16) * DIM
    assert encoder_flops(proscale((1, 1, 1))) - cost[(1, 1, 1)] == trc_cost


@torch.no_grad()
def test_exits_lie_inside_the_last_stage():
    """Exit k stops after the k-th stage-3 layer; stages 1 and 2 always run. A bug that counted
    exits over all layers would make exit 2 of (1, 1, 3) stop inside stage 2 (and change the maps)."""
    enc, feats = proscale((1, 1, 3)), features()
    assert enc.num_exits == 3
    full = enc(feats)
    torch.testing.assert_close(enc(feats, exit=3)[0], full[0], rtol=0, atol=0)
    short = proscale((1, 1, 2))
    short.load_state_dict({k: v for k, v in enc.state_dict().items() if not k.startswith("layers.4.")})
    torch.testing.assert_close(enc(feats, exit=2)[0], short(feats)[0], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="must be in 1..3"):
        enc(feats, exit=4)
    with pytest.raises(ValueError, match="no early exits"):
        proscale((1, 1, 0))(feats, exit=1)


@torch.no_grad()
def test_a_batch_with_mixed_stage_3_exits_equals_one_image_at_a_time():
    """ECO-M2F on PRO-SCALE: per-image exits in one batch give each image what it gets alone, and
    forward_exits' single pass equals forward(exit=k)."""
    enc, feats = proscale((1, 1, 3)), features(batch=3)
    exits = torch.tensor([3, 1, 2])
    mask, _ = enc(feats, exit=exits)
    for b, k in enumerate(exits.tolist()):
        alone, _ = enc({n: v[b: b + 1] for n, v in feats.items()}, exit=k)
        torch.testing.assert_close(mask[b: b + 1], alone, rtol=0, atol=1e-5)
    one_pass = enc.forward_exits(feats, [1, 2, 3])
    for k in (1, 2, 3):
        torch.testing.assert_close(one_pass[k][0], enc(feats, exit=k)[0], rtol=0, atol=1e-6)
    assert not torch.allclose(one_pass[1][0], one_pass[3][0], atol=1e-4)
