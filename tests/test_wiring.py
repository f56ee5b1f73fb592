"""Wiring tests: which tensor feeds which step, the weights and signs inside a cost, exact thresholds.

A formula test passes as long as each piece computes the right thing; these tests check that the
right pieces are connected: TRC's guide is the projected 1/8 map, the configured ε reaches the
module, the gate sees the same z(s1) at inference and in Step C, the matcher's cost has its weights
on the right terms, every auxiliary prediction is matched on its own, the panoptic thresholds sit
exactly where the official code has them, the lr schedule reaches the optimizer, and heads/points
reach every attention layer. Every test names the one-line bug it is there to catch.
"""
import glob
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

import data
import encoders
import gate as gate_module
import msda
import train
from conftest import ROOT, TINY, tiny_run
from config import load_config
from model import HungarianMatcher, MultiheadAttention, SetCriterion, build_model
from postprocess import panoptic_inference

CHANNELS = {"res2": 16, "res3": 32, "res4": 48, "res5": 64}  # small backbone widths for encoder-only tests
DIM = 32  # GroupNorm(32) needs a multiple of 32


def backbone_features(batch=2, size=(64, 96), seed=0):
    """Random res2..res5 maps of a (64, 96) image: non-square, so a swapped (h, w) shows."""
    g = torch.Generator().manual_seed(seed)
    H, W = size
    return {f"res{i + 2}": torch.randn(batch, c, H // 2 ** (i + 2), W // 2 ** (i + 2), generator=g)
            for i, c in enumerate(CHANNELS.values())}


def tokens_of(x):
    """(B, C, h, w) -> (B, h*w, C), the encoders' token layout."""
    return x.flatten(2).transpose(1, 2)


def tiny_model(synthetic, **overrides):
    """The tiny demo model (configs/demo/m2f_tiny.yaml with tiny_run overrides), seeded, in eval mode."""
    torch.manual_seed(0)
    return build_model(load_config(TINY, tiny_run(synthetic, **overrides))).eval()


# ---- 1. TRC is guided by the projected 1/8 tokens ---------------------------------------------


def test_trc_is_guided_by_the_projected_eighth_tokens(monkeypatch):
    """Catches: TRC guided by the 1/16 (or raw backbone, or position-embedded) tokens; guide_shape
    of the wrong level or (w, h) swapped; the raw instead of the re-calibrated tokens fed to the
    stages; ε ignored (hard-coded) in TRC's forward."""
    calls = []
    original = encoders.TokenRecalibration.forward

    def spy(self, tokens, shape, guide, guide_shape):
        out = original(self, tokens, shape, guide, guide_shape)
        calls.append({"tokens": tokens.clone(), "shape": tuple(shape), "guide": guide.clone(),
                      "guide_shape": tuple(guide_shape), "out": out.clone()})
        return out

    monkeypatch.setattr(encoders.TokenRecalibration, "forward", spy)
    torch.manual_seed(0)
    enc = encoders.ProScaleEncoder(CHANNELS, depths=(1, 1, 1), dim=DIM, heads=2, points=2, ffn_dim=64,
                                   trc_epsilon=0.37).eval()  # a distinctive ε, to see it used
    nn.init.normal_(enc.trc.phi.weight)  # a larger φ, so a wrong guide changes the output clearly
    layer_inputs = []
    for layer in enc.layers:
        layer.register_forward_hook(lambda mod, args, out: layer_inputs.append(args[0].clone()))
    feats = backbone_features()
    with torch.no_grad():
        enc(feats)
        p32, p16, p8 = enc.input_proj([feats[k] for k in encoders.LEVELS])  # projected, no position

    assert len(calls) == 2, "TRC runs once for the 1/32 and once for the 1/16 tokens"
    for call, projected in zip(calls, (p32, p16)):
        torch.testing.assert_close(call["guide"], tokens_of(p8), rtol=0, atol=0)
        assert call["guide_shape"] == (8, 12)  # 1/8 of 64 x 96
        torch.testing.assert_close(call["tokens"], tokens_of(projected), rtol=0, atol=0)
        assert call["shape"] == tuple(projected.shape[-2:])
        # ŝ = s ⊙ sigmoid(ε · φ(resize(s2))), with the module's ε.
        resized = tokens_of(F.interpolate(p8, size=call["shape"], mode="bilinear", align_corners=False))
        expected = call["tokens"] * torch.sigmoid(0.37 * enc.trc.phi(resized))
        torch.testing.assert_close(call["out"], expected)
    # The re-calibrated tokens, not the raw ones, are what stages 1 and 2 take in.
    n16 = 4 * 6
    torch.testing.assert_close(layer_inputs[0], calls[0]["out"], rtol=0, atol=0)
    torch.testing.assert_close(layer_inputs[1][:, -n16:], calls[1]["out"], rtol=0, atol=0)


# ---- 2. the configured ε of every PRO-SCALE config ---------------------------------------------


PROSCALE_CONFIGS = sorted({*glob.glob(str(ROOT / "configs/*/proscale_*.yaml")),
                           *glob.glob(str(ROOT / "configs/cityscapes/ablation_*proscale*.yaml"))})


@pytest.mark.parametrize("path", PROSCALE_CONFIGS, ids=lambda p: "/".join(p.split("/")[-2:]))
def test_every_proscale_config_builds_trc_with_the_papers_epsilon(path):
    """Catches: a wrong trc_epsilon default or a config that sets another ε; build_encoder not
    passing cfg.trc (the no-TRC ablation silently with TRC) or cfg.trc_epsilon to the module."""
    cfg = load_config(path)
    with torch.device("meta"):  # shapes only: Swin-L in a blink
        model = build_model(cfg)
    assert model.encoder.name == "proscale"
    if not cfg.model.encoder.trc:  # ablation: PRO-SCALE without token re-calibration
        assert model.encoder.trc is None
        return
    assert model.encoder.trc.epsilon == 0.1  # PRO-SCALE's ε


def test_trc_epsilon_override_reaches_the_module():
    """Catches: build_encoder ignoring cfg.trc_epsilon (the module keeps its 0.1 default)."""
    path = ROOT / "configs/demo/proscale_tiny.yaml"
    with torch.device("meta"):
        model = build_model(load_config(path, ["model.encoder.trc_epsilon=0.3"]))
    assert model.encoder.trc.epsilon == 0.3


# ---- 3. the gate's input is the same at inference and in Step C ---------------------------------


class SpyGate(nn.Module):
    """A gate that records its input and returns fixed exits."""

    def __init__(self, exits):
        super().__init__()
        self.exits, self.seen = exits, []

    def forward(self, z):
        self.seen.append(z.clone())
        return self.exits


def random_images(seed=0, size=(64, 96), batch=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, *size), generator=g, dtype=torch.uint8) for _ in range(batch)]


def test_gate_features_are_the_mean_of_the_projected_thirty_second_map(synthetic):
    """Catches: z(s1) from another level (res3/res4, or proj[2]), without GroupNorm, with the
    position or level embedding added, after encoder layers, or max- instead of mean-pooled."""
    model = tiny_model(synthetic)
    conv, norm = model.encoder.input_proj.proj[0]
    with torch.no_grad():  # a non-trivial GroupNorm affine, so it cannot be skipped unnoticed
        norm.weight.normal_()
        norm.bias.normal_()
    images, _ = model.preprocess(random_images())
    with torch.no_grad():
        res5 = model.backbone(images)["res5"]
        by_hand = F.group_norm(F.conv2d(res5, conv.weight, conv.bias), 32, norm.weight, norm.bias, norm.eps)
        z = model.gate_features(images)
    assert z.shape == (2, model.encoder.dim)
    torch.testing.assert_close(z, by_hand.mean(dim=(2, 3)))


def test_forward_gated_feeds_gate_features_and_uses_the_chosen_exits(synthetic):
    """Catches: forward_gated giving the gate another tensor than gate_features (e.g. the encoder
    output, or res5 itself), or running the encoder to the end instead of to the gate's exits."""
    model = tiny_model(synthetic)
    images, _ = model.preprocess(random_images())
    exits = torch.tensor([1, 3])
    spy = SpyGate(exits)
    with torch.no_grad():
        out = model.forward_gated(images, spy)
        z = model.gate_features(images)
        per_exit = model(images, exit=exits)
        full = model(images)
    assert len(spy.seen) == 1
    torch.testing.assert_close(spy.seen[0], z, rtol=0, atol=0)
    assert out["exits"].tolist() == [1, 3]
    torch.testing.assert_close(out["pred_logits"], per_exit["pred_logits"])
    # Not vacuous: image 0 stops after layer 1, which differs from running all 3 layers.
    assert not torch.allclose(out["pred_logits"][0], full["pred_logits"][0])


def test_step_c_gate_inputs_are_gate_features_of_the_test_resized_images(synthetic):
    """Catches: gate_inputs indexing the dataset by image id instead of position, skipping the
    test-time resize or the normalisation (preprocess), or running the backbone in train mode."""
    # test_short_side 96 on the 64x64 images: the test-time resize really changes the input.
    cfg = load_config(TINY, tiny_run(synthetic, **{"data.test_short_side": 96, "data.test_max_size": 192}))
    torch.manual_seed(0)
    model = build_model(cfg)
    dataset = data.build_dataset(cfg.data, split="val", train=False)
    ids = [2, 1]  # reversed: image id i sits at index i - 1
    model.train()  # gate_inputs must switch to eval itself (BatchNorm in the tiny backbone)
    z = gate_module.gate_inputs(model, dataset, ids)
    assert not model.training
    expected = []
    for image_id in ids:
        raw = dataset.load(image_id - 1)["image"]
        assert raw.shape[-2:] == (64, 64)
        resized = F.interpolate(raw[None].float(), size=(96, 96), mode="bilinear", align_corners=False,
                                antialias=True)[0].round().clamp(0, 255).to(torch.uint8)
        images, _ = model.preprocess([resized])
        with torch.no_grad():
            expected.append(model.gate_features(images))
    torch.testing.assert_close(z, torch.cat(expected))


# ---- 4. the matcher's cost matrix, written out by hand ------------------------------------------


def bilinear(image, x, y):
    """Read a (H, W) numpy map at normalised (x, y) in [0, 1] (0 and 1 are the outer edges, not
    pixel centres), bilinearly with zeros outside: grid_sample with align_corners=False."""
    H, W = image.shape
    px, py = x * W - 0.5, y * H - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    value = 0.0
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < H and 0 <= xx < W:
                value += wy * wx * image[yy, xx]
    return value


def cost_by_hand(logits, masks, labels, tgt_masks, points, w_class, w_mask, w_dice):
    """C[q, j] = w_class·(-p_q(label_j)) + w_mask·mean BCE + w_dice·dice(+1), in float64 loops."""
    logits, masks = logits.double().numpy(), masks.double().numpy()
    tgt_masks = tgt_masks.double().numpy()
    pts = points[0].double().numpy()  # (P, 2) as (x, y)
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    Q, n = logits.shape[0], len(labels)
    C = np.zeros((Q, n))
    for q in range(Q):
        x = np.array([bilinear(masks[q], px, py) for px, py in pts])  # logits at the points
        s = 1 / (1 + np.exp(-x))
        for j in range(n):
            t = np.array([bilinear(tgt_masks[j], px, py) for px, py in pts])
            bce = np.mean(-(t * np.log(s) + (1 - t) * np.log(1 - s)))
            dice = 1 - (2 * (s * t).sum() + 1) / (s.sum() + t.sum() + 1)
            C[q, j] = w_class * -prob[q, labels[j]] + w_mask * bce + w_dice * dice
    return C


def matcher_inputs(seed, Q=5, K=4, n=3, h=6, w=8):
    """Random logits and mask logits (Q, h, w) against n targets at twice that size: the target
    masks are at another resolution than the predictions, and non-square."""
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(Q, K + 1, generator=g)
    masks = 3 * torch.randn(Q, h, w, generator=g)
    labels = torch.randperm(K, generator=g)[:n]
    tgt_masks = torch.rand(n, 2 * h, 2 * w, generator=g) > 0.5
    return logits, masks, labels, tgt_masks


@pytest.mark.parametrize("weights", [(2.0, 5.0, 5.0), (1.0, 3.0, 7.0)])
def test_matcher_cost_matrix_by_hand(weights):
    """Catches: the class/mask/dice weights swapped (the (1, 3, 7) case), the class term's sign
    flipped (+p), dice without the +1 smoothing or on logits, BCE summed instead of averaged,
    targets read at other points than the predictions, x/y swapped in the point convention."""
    w_class, w_mask, w_dice = weights
    logits, masks, labels, tgt_masks = matcher_inputs(seed=0)
    points = torch.rand(1, 40, 2, generator=torch.Generator().manual_seed(1))
    matcher = HungarianMatcher(cost_class=w_class, cost_mask=w_mask, cost_dice=w_dice, num_points=40)
    C = matcher.cost_matrix(logits, masks, labels, tgt_masks, points)
    expected = cost_by_hand(logits, masks, labels.tolist(), tgt_masks, points, w_class, w_mask, w_dice)
    np.testing.assert_allclose(C.double().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_matcher_assignment_is_the_hungarian_optimum_of_the_hand_cost():
    """Catches: linear_sum_assignment on the transposed cost (indices swapped), on a maximised
    cost, or points drawn once for the batch instead of once per image (other RNG stream)."""
    P = 40
    batch = [matcher_inputs(seed) for seed in (3, 4)]
    outputs = {"pred_logits": torch.stack([b[0] for b in batch]), "pred_masks": torch.stack([b[1] for b in batch])}
    targets = [{"labels": b[2], "masks": b[3]} for b in batch]
    matcher = HungarianMatcher(cost_class=1.0, cost_mask=3.0, cost_dice=7.0, num_points=P)
    torch.manual_seed(5)
    indices = matcher(outputs, targets)
    torch.manual_seed(5)  # the matcher draws one (1, P, 2) per image, in batch order
    points = [torch.rand(1, P, 2) for _ in batch]
    for (logits, masks, labels, tgt_masks), pts, (pred_idx, tgt_idx) in zip(batch, points, indices):
        rows, cols = linear_sum_assignment(cost_by_hand(logits, masks, labels.tolist(), tgt_masks, pts, 1.0, 3.0, 7.0))
        assert pred_idx.tolist() == rows.tolist() and tgt_idx.tolist() == cols.tolist()


# ---- 5. every auxiliary prediction is matched on its own ------------------------------------------


class RecordingMatcher(nn.Module):
    """Wraps a matcher, recording the outputs it was called with and the indices it returned."""

    def __init__(self, matcher):
        super().__init__()
        self.matcher, self.calls = matcher, []

    def forward(self, outputs, targets):
        indices = self.matcher(outputs, targets)
        self.calls.append((outputs, indices))
        return indices


def criterion_case(K=3, Q=5):
    """Two images, two targets each; the final prediction has one clear query per target (strong
    class logit, mask logits +6 inside / -6 outside), every other query says "no object"."""
    g = torch.Generator().manual_seed(0)
    boxes = [[(0, 8, 0, 8), (8, 16, 4, 16)], [(2, 10, 2, 14), (10, 16, 0, 6)]]  # (y0, y1, x0, x1) at 16x16
    labels = [torch.tensor([0, 2]), torch.tensor([1, 1])]
    owners = [(1, 3), (4, 0)]  # query predicting each target
    logits = torch.randn(2, Q, K + 1, generator=g)
    logits[..., K] += 6  # "no object" by default
    masks = torch.randn(2, Q, 8, 8, generator=g) - 6
    targets = []
    for b in range(2):
        tgt = torch.zeros(2, 16, 16, dtype=torch.bool)
        for j, (y0, y1, x0, x1) in enumerate(boxes[b]):
            tgt[j, y0:y1, x0:x1] = True
            q = owners[b][j]
            logits[b, q, K] -= 12
            logits[b, q, labels[b][j]] += 8
            masks[b, q] = 12 * F.avg_pool2d(tgt[j][None, None].float(), 2)[0, 0] - 6
        targets.append({"labels": labels[b], "masks": tgt})
    return {"pred_logits": logits, "pred_masks": masks}, targets


def test_auxiliary_predictions_are_matched_on_their_own():
    """Catches: the criterion reusing the final layer's indices for the auxiliary outputs (or
    matching the final outputs again instead of the aux ones)."""
    final, targets = criterion_case()
    perm = torch.tensor([3, 0, 4, 1, 2])  # aux query i is final query perm[i]
    aux = {"pred_logits": final["pred_logits"][:, perm], "pred_masks": final["pred_masks"][:, perm]}

    def criterion():
        return SetCriterion(num_classes=3, matcher=RecordingMatcher(HungarianMatcher(num_points=64)), num_points=64)

    crit = criterion()
    torch.manual_seed(0)
    losses = crit({**final, "aux_outputs": [aux]}, targets)

    # The matcher saw the aux outputs themselves, and matched each target to the same prediction.
    (seen_final, idx_final), (seen_aux, idx_aux) = crit.matcher.calls
    assert seen_final["pred_logits"] is final["pred_logits"] and seen_aux["pred_logits"] is aux["pred_logits"]
    for (src_f, tgt_f), (src_a, tgt_a) in zip(idx_final, idx_aux):
        assert sorted(zip(src_f.tolist(), tgt_f.tolist())) == sorted(zip(perm[src_a].tolist(), tgt_a.tolist()))
    # The CE runs over all queries, so a permutation with its own matching leaves it unchanged.
    torch.testing.assert_close(losses["loss_ce_0"], losses["loss_ce"])
    # Mask losses: the same RNG stream as the combined call (final matching and points, then the
    # aux ones), with the aux outputs matched alone, gives the same numbers.
    torch.manual_seed(0)
    crit = criterion()
    crit(final, targets)
    alone = crit(aux, targets)
    for name in ("loss_ce", "loss_mask", "loss_dice"):
        torch.testing.assert_close(losses[f"{name}_0"], alone[name])


# ---- 6. the panoptic thresholds, exactly at their values ------------------------------------------


def two_queries(own0, own1, class0, class1):
    """Two thing queries on a 1 x 10 image: query k has mask logit +5 on the pixels own_k and -10
    elsewhere, and class logits class_k over (class 0, class 1, no object)."""
    mask_pred = torch.full((2, 1, 10), -10.0)
    mask_pred[0, 0, list(own0)] = 5.0
    mask_pred[1, 0, list(own1)] = 5.0
    return torch.tensor([class0, class1]), mask_pred


IS_THING = torch.tensor([True, True])


@pytest.mark.parametrize("own1_start, kept", [(4, True), (2, False)])
def test_panoptic_overlap_ratio_exactly_at_the_threshold_is_kept(own1_start, kept):
    """Catches: `<=` instead of `<` in the overlap rule (a 4/5 = 0.8 segment dropped), or the own
    mask taken as probability > 0.5 instead of >= 0.5 (pixel 0 has probability exactly 0.5)."""
    # Query 0 owns pixels 0..4 (5 pixels); query 1 owns own1_start..9 with the higher score, so
    # query 0 keeps 4 of its 5 pixels (ratio exactly 0.8) or 2 of 5 (0.4).
    mask_cls, mask_pred = two_queries(range(0, 5), range(own1_start, 10), (0.0, -3.0, -30.0), (-3.5, 0.0, -30.0))
    mask_pred[0, 0, 0] = 0.0  # sigmoid(0) = 0.5 exactly: on the own mask's edge
    scores = mask_cls.softmax(-1).max(-1).values
    assert scores[1] > scores[0] > 0.8  # both pass the score threshold; query 1 wins the overlap
    panoptic, segments = panoptic_inference(mask_cls, mask_pred, IS_THING, 0.8, 0.8)
    ids = panoptic[0].tolist()
    assert [s["category_id"] for s in segments] == ([0, 1] if kept else [1])
    if kept:
        assert ids == [1, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    else:  # query 0 dropped: its remaining pixels are void
        assert ids == [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]


def test_panoptic_object_mask_threshold_is_strict():
    """Catches: `>=` instead of `>` in the score rule (a score of exactly 0.8 kept), or the score
    taken from another class than the best one."""
    exactly = -1.3862944841384888  # softmax([0, this, -inf])[0] is float32(0.8) exactly
    mask_cls = torch.tensor([[0.0, exactly, -math.inf], [0.0, exactly + 1e-3, -math.inf],
                             [0.0, exactly - 1e-3, -math.inf]])
    scores = mask_cls.softmax(-1).max(-1).values
    assert scores[0] == torch.tensor(0.8) and scores[1] < 0.8 < scores[2]  # at, below, above
    for q, keep in [(0, False), (1, False), (2, True)]:
        _, segments = panoptic_inference(mask_cls[q:q + 1], torch.full((1, 1, 4), 5.0), IS_THING, 0.8, 0.8)
        assert len(segments) == int(keep), f"score {scores[q].item()!r}"


# ---- 7. the lr actually applied at every iteration ---------------------------------------------


def test_step_schedule_lr_reaches_every_param_group_at_each_iteration(synthetic, tmp_path, monkeypatch):
    """Catches: the decay applied one iteration late or early (step > s, or factor of step + 1),
    the schedule computed but not written into the groups, the backbone multiplier dropped by
    the schedule update (backbone back at the base lr) or applied to the wrong modules."""
    applied = []
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        applied.append([(g["lr"], {id(p) for p in g["params"]}) for g in self.param_groups])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    cfg = load_config(TINY, tiny_run(synthetic, **{"train.iterations": 4, "train.steps": "[2]", "train.gamma": 0.1,
                                                   "train.backbone_lr_multiplier": 0.5, "train.checkpoint_every": 4}))
    model = train.train(cfg, tmp_path / "run")
    backbone = {id(p) for p in model.backbone.parameters()}
    everything = {id(p) for p in model.parameters()}
    base = cfg.train.lr
    assert len(applied) == 4
    for step, (groups, factor) in enumerate(zip(applied, [1.0, 1.0, 0.1, 0.1])):
        assert set().union(*(params for _, params in groups)) == everything
        for lr, params in groups:
            in_backbone = params <= backbone
            assert in_backbone or not params & backbone, "a group mixes backbone and other parameters"
            expected = base * factor * (0.5 if in_backbone else 1.0)
            assert lr == pytest.approx(expected, rel=1e-12), f"iteration {step}"


# ---- 8. heads and points of every built attention layer ------------------------------------------


@pytest.mark.parametrize("encoder", ["m2f", "proscale"])
def test_heads_and_points_reach_every_attention_layer(synthetic, monkeypatch, encoder):
    """Catches: heads and points swapped in a builder (a shape check passes: their product is the
    same), the decoder built with the encoder's heads or vice versa, a layer left at the default
    8 heads / 4 points, or a PRO-SCALE stage built for the wrong number of levels."""
    extra = {"model.encoder.heads": 2, "model.encoder.points": 3, "model.decoder.heads": 8}
    if encoder == "proscale":
        extra.update({"model.encoder.name": "proscale", "model.encoder.depths": "[1,1,1]",
                      "model.encoder.mask_branch": "lpe_max"})
    model = tiny_model(synthetic, **extra)
    deform = [m for m in model.modules() if isinstance(m, msda.MSDeformAttn)]
    expected_levels = [3, 3, 3] if encoder == "m2f" else [1, 2, 3]
    assert [m.n_levels for m in deform] == expected_levels
    for m in deform:
        assert (m.n_heads, m.n_points) == (2, 3)
        assert m.sampling_offsets.out_features == 2 * m.n_levels * 3 * 2
    attention = [m for m in model.modules() if isinstance(m, MultiheadAttention)]
    assert len(attention) == 2 * model.cfg.decoder.layers  # cross- and self-attention per round
    assert all(m.heads == 8 for m in attention)

    # At run time the sampling grids have the built heads, levels and points: (N, M, L, P, 2, Lq).
    seen = []
    original = msda.sample_levels

    def spy(value, shapes, grids, weights):
        seen.append(tuple(grids.shape[1:4]))
        assert weights.shape == grids.shape[:4] + grids.shape[5:]
        return original(value, shapes, grids, weights)

    monkeypatch.setattr(msda, "sample_levels", spy)
    images, _ = model.preprocess(random_images(size=(64, 64), batch=1))
    with torch.no_grad():
        model(images)
    assert seen == [(2, levels, 3) for levels in expected_levels]
