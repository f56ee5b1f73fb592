"""Tests for the matcher, the criterion (model.py) and the inference post-processing (postprocess.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import HungarianMatcher, SetCriterion, point_sample, sample_uncertain_points
from postprocess import instance_inference, panoptic_inference, semantic_inference, upsample_predictions


def class_logits(probs):
    """Logits whose softmax is exactly `probs` (rows sum to 1)."""
    return torch.tensor(probs, dtype=torch.float64).log().float()


def one_hot_probs(label, p, num_columns):
    """Probability row with `p` on `label` and the rest spread evenly."""
    row = [(1 - p) / (num_columns - 1)] * num_columns
    row[label] = p
    return row


def blocky_masks(n, H, W, block=4, generator=None):
    """Random binary masks made of block×block squares, so downsampling by `block` is exact."""
    coarse = torch.rand(n, H // block, W // block, generator=generator) > 0.5
    return coarse.repeat_interleave(block, 1).repeat_interleave(block, 2)  # (n, H, W) bool


# ----------------------------------------------------------------------------------------------
# point sampling


def test_point_sample_reads_pixel_centres():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    ii, jj = torch.tensor([0, 3, 2]), torch.tensor([0, 4, 1])
    coords = torch.stack([(jj + 0.5) / 5, (ii + 0.5) / 4], -1)  # (3, 2) as (x, y)
    out = point_sample(x, coords[None].repeat(2, 1, 1))  # (2, 3, 3)
    assert out.shape == (2, 3, 3)
    torch.testing.assert_close(out, x[:, :, ii, jj])


def test_sample_uncertain_points_prefers_uncertain_region():
    torch.manual_seed(0)
    W = 16
    logits = torch.full((3, 1, 8, W), 20.0)
    logits[..., : W // 2] = 0.0  # left half maximally uncertain
    pts = sample_uncertain_points(logits, num_points=100, oversample_ratio=3, importance_sample_ratio=0.75)
    assert pts.shape == (3, 100, 2)
    assert ((pts >= 0) & (pts <= 1)).all()
    # the 75 importance points come first and all lie in (or within a pixel of) the left half
    assert (pts[:, :75, 0] <= 0.5 + 1 / W).all()
    # the 25 random points are uniform: with 3×25 draws some land on the right
    assert (pts[:, 75:, 0] > 0.5 + 1 / W).any()


# ----------------------------------------------------------------------------------------------
# matcher


def random_batch(B=3, Q=7, K=5, h=8, w=8, H=32, W=32, n_per_image=(3, 0, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(B, Q, K + 1, generator=g),
        "pred_masks": 3 * torch.randn(B, Q, h, w, generator=g),
    }
    targets = [
        {"labels": torch.randint(0, K, (n,), generator=g), "masks": blocky_masks(n, H, W, generator=g)}
        for n in n_per_image
    ]
    return outputs, targets


def test_matcher_batched_equals_per_image():
    outputs, targets = random_batch()
    matcher = HungarianMatcher(num_points=256)
    torch.manual_seed(123)
    batched = matcher(outputs, targets)
    # One rand(1, P, 2) per image in batch order (also for the empty image): restarting from the
    # same seed and matching image by image in order draws exactly the same points.
    torch.manual_seed(123)
    per_image = [matcher({k: v[b : b + 1] for k, v in outputs.items()}, [targets[b]])[0] for b in range(3)]
    assert len(batched) == 3
    for (bi, bj), (pi, pj), t in zip(batched, per_image, targets):
        assert bi.dtype == bj.dtype == torch.int64
        assert len(bi) == len(bj) == min(7, len(t["labels"]))
        assert torch.equal(bi, pi) and torch.equal(bj, pj)
    assert batched[1][0].numel() == 0 and batched[1][1].numel() == 0


def planted_batch(perms, K=4, Q=6, H=32, W=32, seed=0):
    """Targets plus predictions where query perm[j] confidently predicts target j; the other
    queries predict "no object" with an all-background mask. Predictions are 2× coarser."""
    g = torch.Generator().manual_seed(seed)
    B = len(perms)
    pred_logits = torch.zeros(B, Q, K + 1)
    pred_logits[:, :, K] = 10.0
    pred_masks = torch.full((B, Q, H // 2, W // 2), -10.0)
    targets = []
    for b, perm in enumerate(perms):
        n = len(perm)
        labels = torch.randint(0, K, (n,), generator=g)
        masks = blocky_masks(n, H, W, block=4, generator=g)
        for j, q in enumerate(perm):
            pred_logits[b, q] = 0.0
            pred_logits[b, q, labels[j]] = 10.0
            pred_masks[b, q] = torch.where(masks[j, ::2, ::2], 10.0, -10.0)
        targets.append({"labels": labels, "masks": masks})
    return {"pred_logits": pred_logits, "pred_masks": pred_masks}, targets


def test_matcher_recovers_planted_assignment():
    perms = [[4, 0, 2], [5, 3, 1, 0, 2]]
    outputs, targets = planted_batch(perms)
    torch.manual_seed(0)
    indices = HungarianMatcher(num_points=512)(outputs, targets)
    for (pred_idx, tgt_idx), perm in zip(indices, perms):
        assert sorted(pred_idx.tolist()) == pred_idx.tolist()  # scipy returns rows in order
        assert {int(i): int(j) for i, j in zip(pred_idx, tgt_idx)} == {q: j for j, q in enumerate(perm)}


# ----------------------------------------------------------------------------------------------
# criterion


class TinyHead(nn.Module):
    """Queries -> class logits and masks = query embedding · pixel features, with aux outputs
    from intermediate query states, like the real decoder."""

    def __init__(self, Q=5, K=3, C=8, h=8, w=8, layers=3):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(Q, C))
        self.pixel = nn.Parameter(torch.randn(C, h, w))
        self.layers = nn.ModuleList(nn.Linear(C, C) for _ in range(layers))
        self.cls = nn.Linear(C, K + 1)
        self.mask_embed = nn.Linear(C, C)

    def predict(self, x, B):
        logits = self.cls(x)  # (Q, K+1)
        masks = torch.einsum("qc,chw->qhw", self.mask_embed(x), self.pixel)  # (Q, h, w)
        return {"pred_logits": logits.expand(B, -1, -1), "pred_masks": masks.expand(B, -1, -1, -1)}

    def forward(self, B):
        x = self.queries
        preds = [self.predict(x, B)]
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
            preds.append(self.predict(x, B))
        out = dict(preds[-1])
        out["aux_outputs"] = preds[:-1]
        return out


def make_criterion(**kw):
    matcher = HungarianMatcher(num_points=64)
    return SetCriterion(num_classes=3, matcher=matcher, num_points=64, **kw)


@pytest.mark.parametrize("n_per_image", [(2, 0, 3), (0, 0)])
def test_criterion_finite_and_every_parameter_gets_a_gradient(n_per_image):
    torch.manual_seed(0)
    head = TinyHead()
    B = len(n_per_image)
    targets = [{"labels": torch.randint(0, 3, (n,)), "masks": blocky_masks(n, 32, 32)} for n in n_per_image]
    outputs = head(B)
    losses = make_criterion()(outputs, targets)
    expected_keys = {f"loss_{name}{s}" for name in ("ce", "mask", "dice") for s in ["", "_0", "_1", "_2"]}
    assert set(losses) == expected_keys
    for k, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), k
    if sum(n_per_image) == 0:
        assert losses["loss_mask"].item() == 0 and losses["loss_dice"].item() == 0
    sum(losses.values()).backward()
    for name, p in head.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    if sum(n_per_image):
        for name, p in head.named_parameters():
            assert p.grad.abs().sum() > 0, name


def test_empty_weight_buffer():
    crit = SetCriterion(num_classes=4, matcher=HungarianMatcher(), no_object_weight=0.1)
    torch.testing.assert_close(crit.empty_weight, torch.tensor([1.0, 1.0, 1.0, 1.0, 0.1]))
    assert "empty_weight" in crit.state_dict()


def test_loss_weights_scale_losses():
    outputs, targets = random_batch(K=3, n_per_image=(2, 0, 3))
    torch.manual_seed(5)
    base = make_criterion()(outputs, targets)
    torch.manual_seed(5)  # same points, same matching (the matcher costs don't change)
    doubled = make_criterion(mask_weight=10.0)(outputs, targets)
    torch.testing.assert_close(doubled["loss_mask"], 2 * base["loss_mask"])
    torch.testing.assert_close(doubled["loss_ce"], base["loss_ce"])
    torch.testing.assert_close(doubled["loss_dice"], base["loss_dice"])


def test_criterion_matches_direct_computation():
    """Recompute the final-layer losses by hand from the same RNG stream."""
    outputs, targets = random_batch(K=3, n_per_image=(2, 0, 3))
    crit = make_criterion()
    torch.manual_seed(7)
    losses = crit(outputs, targets)

    torch.manual_seed(7)
    indices = crit.matcher(outputs, targets)  # draws the matcher points first, like the criterion
    num_masks = 5.0
    target_classes = torch.full((3, 7), 3, dtype=torch.int64)
    src, tgt_masks = [], []
    for b, (i, j) in enumerate(indices):
        target_classes[b, i] = targets[b]["labels"][j]
        src.append(outputs["pred_masks"][b, i])
        tgt_masks.append(targets[b]["masks"][j].float())
    weight = torch.tensor([1.0, 1.0, 1.0, 0.1])
    ce = F.cross_entropy(outputs["pred_logits"].reshape(-1, 4), target_classes.reshape(-1), weight)
    src = torch.cat(src)[:, None]
    tgt_masks = torch.cat(tgt_masks)[:, None]
    pts = sample_uncertain_points(src, 64, 3.0, 0.75)
    logit_pts = point_sample(src, pts)[:, 0]
    label_pts = point_sample(tgt_masks, pts)[:, 0]
    bce = F.binary_cross_entropy_with_logits(logit_pts, label_pts, reduction="none").mean(1).sum() / num_masks
    prob = logit_pts.sigmoid()
    dice = (1 - (2 * (prob * label_pts).sum(1) + 1) / (prob.sum(1) + label_pts.sum(1) + 1)).sum() / num_masks

    torch.testing.assert_close(losses["loss_ce"], 2.0 * ce)
    torch.testing.assert_close(losses["loss_mask"], 5.0 * bce)
    torch.testing.assert_close(losses["loss_dice"], 5.0 * dice)


def test_criterion_perfect_predictions_score_better():
    perms = [[4, 0, 2], [5, 3, 1, 0, 2]]
    outputs, targets = planted_batch(perms)
    crit = SetCriterion(num_classes=4, matcher=HungarianMatcher(num_points=512), num_points=512)
    torch.manual_seed(0)
    good = crit(outputs, targets)
    # same predictions, complemented target masks (a shuffle would just be re-matched)
    bad_targets = [{"labels": t["labels"], "masks": ~t["masks"]} for t in targets]
    torch.manual_seed(0)
    bad = crit(outputs, bad_targets)
    assert good["loss_ce"] < 0.01
    # Not near 0 even when perfect: 75% of the points sit on mask boundaries, where the
    # bilinearly read logits and targets are both soft (~0.5).
    assert bad["loss_mask"] > 3 * good["loss_mask"]
    assert bad["loss_dice"] > 2 * good["loss_dice"]


# ----------------------------------------------------------------------------------------------
# inference


def test_upsample_predictions():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 10)
    out = upsample_predictions(x, (32, 40), (30, 35), (60, 70))
    assert out.shape == (2, 3, 60, 70)
    ref = F.interpolate(x, size=(32, 40), mode="bilinear", align_corners=False)[:, :, :30, :35]
    ref = F.interpolate(ref, size=(60, 70), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(upsample_predictions(x[1], (32, 40), (30, 35), (60, 70)), ref[1])


def test_semantic_inference():
    torch.manual_seed(0)
    mask_cls, mask_pred = torch.randn(5, 4), torch.randn(5, 6, 7)
    out = semantic_inference(mask_cls, mask_pred)
    probs = mask_cls.softmax(-1)
    ref = sum(probs[q, :3, None, None] * mask_pred[q].sigmoid()[None] for q in range(5))
    assert out.shape == (3, 6, 7)
    torch.testing.assert_close(out, ref)


def build_panoptic_case():
    """10×10 image, K = 3 (0, 1 things, 2 stuff). Masks are ±10 logits on hand-placed regions.

    q0 thing 0  p=.95  rows 0-1 cols 0-4                  -> id 1
    q1 thing 0  p=.93  rows 0-1 cols 5-9                  -> id 2 (same class, separate)
    q2 stuff 2  p=.90  rows 2-3                           -> id 3
    q3 stuff 2  p=.88  rows 4-5 cols 0-4                  -> merged into id 3
    q4 thing 1  p=.79  rows 4-5 cols 5-9                  -> below score threshold, void
    q5 thing 1  p=.81  row 6 cols 0-4                     -> id 4
    q6 thing 1  p=.82  row 7 cols 0-3, (7,0) taken by q8  -> visible 3/4 = .75 < .8, dropped
    q7 thing 1  p=.83  rows 8-9, 3 pixels taken by q8     -> visible 17/20 = .85, id 5
    q8 thing 0  p=.97  (7,0), (8,0), (8,1), (8,2)         -> id 6
    q9 no-object p=.99 rows 4-5 cols 5-9                  -> ignored
    """
    K = 3
    regions = {
        0: (0.95, 0, [(r, c) for r in (0, 1) for c in range(5)]),
        1: (0.93, 0, [(r, c) for r in (0, 1) for c in range(5, 10)]),
        2: (0.90, 2, [(r, c) for r in (2, 3) for c in range(10)]),
        3: (0.88, 2, [(r, c) for r in (4, 5) for c in range(5)]),
        4: (0.79, 1, [(r, c) for r in (4, 5) for c in range(5, 10)]),
        5: (0.81, 1, [(6, c) for c in range(5)]),
        6: (0.82, 1, [(7, c) for c in range(4)]),
        7: (0.83, 1, [(r, c) for r in (8, 9) for c in range(10)]),
        8: (0.97, 0, [(7, 0), (8, 0), (8, 1), (8, 2)]),
        9: (0.99, K, [(r, c) for r in (4, 5) for c in range(5, 10)]),
    }
    mask_cls = class_logits([one_hot_probs(label, p, K + 1) for p, label, _ in regions.values()])
    mask_pred = torch.full((10, 10, 10), -10.0)
    for q, (_, _, pixels) in regions.items():
        for r, c in pixels:
            mask_pred[q, r, c] = 10.0
    expected = torch.zeros(10, 10, dtype=torch.int32)
    expected[0:2, 0:5] = 1
    expected[0:2, 5:10] = 2
    expected[2:4] = 3
    expected[4:6, 0:5] = 3
    expected[6, 0:5] = 4
    expected[8:10] = 5
    expected[7, 0] = expected[8, 0] = expected[8, 1] = expected[8, 2] = 6
    expected_info = [
        {"id": 1, "isthing": True, "category_id": 0},
        {"id": 2, "isthing": True, "category_id": 0},
        {"id": 3, "isthing": False, "category_id": 2},
        {"id": 4, "isthing": True, "category_id": 1},
        {"id": 5, "isthing": True, "category_id": 1},
        {"id": 6, "isthing": True, "category_id": 0},
    ]
    return mask_cls, mask_pred, expected, expected_info


def test_panoptic_inference_hand_made():
    mask_cls, mask_pred, expected, expected_info = build_panoptic_case()
    is_thing = torch.tensor([True, True, False])
    seg, info = panoptic_inference(mask_cls, mask_pred, is_thing)
    assert seg.dtype == torch.int32
    assert torch.equal(seg, expected), f"\n{seg}\n{expected}"
    assert [{k: v for k, v in s.items() if k != "score"} for s in info] == expected_info
    assert all(0.8 < s["score"] <= 1 for s in info)  # a kept query's class probability
    # the occluded q6 is kept once the overlap threshold allows 0.75
    seg2, info2 = panoptic_inference(mask_cls, mask_pred, is_thing, overlap_threshold=0.7)
    assert (seg2[7, 1:4] > 0).all() and len(info2) == 7


def test_panoptic_inference_nothing_kept():
    mask_cls = class_logits([one_hot_probs(0, 0.5, 4), one_hot_probs(3, 0.99, 4)])
    seg, info = panoptic_inference(mask_cls, torch.randn(2, 5, 6), torch.tensor([True, True, False]))
    assert torch.equal(seg, torch.zeros(5, 6, dtype=torch.int32)) and info == []


def test_instance_inference():
    torch.manual_seed(0)
    Q, K, H, W = 6, 4, 5, 7
    mask_cls, mask_pred = torch.randn(Q, K + 1), 2 * torch.randn(Q, H, W)
    is_thing = torch.tensor([True, False, True, False])
    k = 10
    probs = mask_cls.softmax(-1)[:, :K]
    top = sorted(((probs[q, c].item(), q, c) for q in range(Q) for c in range(K)), reverse=True)[:k]

    def expected_for(entries):
        rows = []
        for p, q, c in entries:
            binary = (mask_pred[q] > 0).float()
            mask_score = (mask_pred[q].sigmoid() * binary).sum() / (binary.sum() + 1e-6)
            rows.append((p * mask_score.item(), c, binary))
        return sorted(rows, key=lambda r: -r[0])

    for panoptic_on in (True, False):
        out = instance_inference(mask_cls, mask_pred, is_thing, num_queries_topk=k, panoptic_on=panoptic_on)
        entries = [e for e in top if (bool(is_thing[e[2]]) or not panoptic_on)]
        exp = expected_for(entries)
        order = torch.argsort(out["scores"], descending=True)
        assert out["masks"].shape == (len(exp), H, W)
        torch.testing.assert_close(out["scores"][order], torch.tensor([r[0] for r in exp]))
        assert out["labels"][order].tolist() == [r[1] for r in exp]
        for got, (_, _, binary) in zip(out["masks"][order], exp):
            assert torch.equal(got, binary)
        if panoptic_on:
            assert is_thing[out["labels"]].all()
        else:
            assert not is_thing[out["labels"]].all()  # stuff survives without panoptic
