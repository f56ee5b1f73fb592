"""The fast post-processing (postprocess.py) and the batched matcher (model.py) against the implementations they
replace, kept here as reference_* (model.py as of commit 7351679): the same panoptic ids and
segments, instances, semantic labels and matching assignments, bit for bit, on random and on
adversarial inputs (ties, nothing kept, all stuff, output size equal to and other than the input
size, images of different sizes in one padded batch), and the same FLOP count."""
import dataclasses
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

import model
from config import load_config
from conftest import ROOT
from flops import FlopCounter
from model import HungarianMatcher, point_sample
from postprocess import (
    instance_inference,
    mask_scores_of,
    kept_queries,
    panoptic_inference,
    semantic_inference,
    semantic_labels,
    upsample_predictions,
)

# ---- the reference implementations (before the fast path) -----------------------------------


def reference_upsample_predictions(mask_pred, padded_size, image_size, output_size):
    single = mask_pred.dim() == 3
    x = mask_pred[None] if single else mask_pred
    x = F.interpolate(x, size=tuple(padded_size), mode="bilinear", align_corners=False)
    x = x[:, :, : image_size[0], : image_size[1]]
    x = F.interpolate(x, size=tuple(output_size), mode="bilinear", align_corners=False)
    return x[0] if single else x


def reference_semantic_inference(mask_cls, mask_pred):
    probs = F.softmax(mask_cls, dim=-1)[..., :-1]
    return torch.einsum("qc,qhw->chw", probs, mask_pred.sigmoid())


def reference_panoptic_inference(mask_cls, mask_pred, is_thing, object_mask_threshold=0.8, overlap_threshold=0.8):
    K = mask_cls.shape[-1] - 1
    scores, labels = F.softmax(mask_cls, dim=-1).max(-1)
    probs = mask_pred.sigmoid()
    keep = labels.ne(K) & (scores > object_mask_threshold)
    scores, labels, probs = scores[keep], labels[keep], probs[keep]
    panoptic = torch.zeros(probs.shape[-2:], dtype=torch.int32, device=probs.device)
    segments = []
    if probs.shape[0] == 0:
        return panoptic, segments
    winner = (scores[:, None, None] * probs).argmax(0)
    stuff_ids = {}
    for k, label in enumerate(labels.tolist()):
        won = winner == k
        own = probs[k] >= 0.5
        won_area, own_area = won.sum().item(), own.sum().item()
        mask = won & own
        if won_area == 0 or own_area == 0 or not mask.any():
            continue
        if won_area / own_area < overlap_threshold:
            continue
        thing = bool(is_thing[label])
        if not thing and label in stuff_ids:
            panoptic[mask] = stuff_ids[label]
            continue
        segment_id = len(segments) + 1
        if not thing:
            stuff_ids[label] = segment_id
        panoptic[mask] = segment_id
        segments.append({"id": segment_id, "isthing": thing, "category_id": label})
    return panoptic, segments


def reference_instance_inference(mask_cls, mask_pred, is_thing, num_queries_topk=100, panoptic_on=True):
    Q, K = mask_cls.shape[0], mask_cls.shape[1] - 1
    probs = F.softmax(mask_cls, dim=-1)[:, :-1]
    scores, idx = probs.flatten().topk(min(num_queries_topk, Q * K), sorted=False)
    labels, queries = idx % K, idx // K
    if panoptic_on:
        thing = is_thing.to(labels.device)[labels]
        scores, labels, queries = scores[thing], labels[thing], queries[thing]
    logits = mask_pred[queries]
    masks = (logits > 0).float()
    mask_scores = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    return {"masks": masks, "scores": scores * mask_scores, "labels": labels}


def reference_inference(net, outputs, image_sizes, output_sizes=None):
    cfg = net.cfg.inference
    output_sizes = output_sizes or image_sizes
    masks = outputs["pred_masks"]
    stride = net.encoder.mask_stride
    padded = (masks.shape[-2] * stride, masks.shape[-1] * stride)
    is_thing = torch.zeros(net.cfg.num_classes, dtype=torch.bool)
    is_thing[list(net.cfg.thing_classes)] = True
    results = []
    for logits, mask_pred, size, out_size in zip(outputs["pred_logits"], masks, image_sizes, output_sizes):
        mask_pred = reference_upsample_predictions(mask_pred.float(), padded, size, out_size)
        logits = logits.float()
        result = {}
        if cfg.semantic:
            result["sem_seg"] = reference_semantic_inference(logits, mask_pred)
        if cfg.panoptic:
            result["panoptic_seg"] = reference_panoptic_inference(logits, mask_pred, is_thing,
                                                                  cfg.object_mask_threshold, cfg.overlap_threshold)
        if cfg.instance:
            result["instances"] = reference_instance_inference(logits, mask_pred, is_thing, cfg.topk_per_image,
                                                               panoptic_on=cfg.panoptic)
        results.append(result)
    return results


def reference_cost_matrix(matcher, logits, masks, tgt_labels, tgt_masks, points):
    Q, n = logits.shape[0], tgt_labels.shape[0]
    prob = logits.float().softmax(-1)
    cost_class = -prob[:, tgt_labels]
    out_points = point_sample(masks[:, None].float(), points.repeat(Q, 1, 1))[:, 0]
    tgt_points = point_sample(tgt_masks[:, None].float(), points.repeat(n, 1, 1))[:, 0]
    return (matcher.cost_mask * model.pairwise_sigmoid_ce(out_points, tgt_points)
            + matcher.cost_class * cost_class
            + matcher.cost_dice * model.pairwise_dice(out_points, tgt_points))


def reference_match(matcher, outputs, targets):
    indices = []
    for b in range(outputs["pred_logits"].shape[0]):
        points = torch.rand(1, matcher.num_points, 2)
        if len(targets[b]["labels"]) == 0:
            indices.append((torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)))
            continue
        cost = reference_cost_matrix(matcher, outputs["pred_logits"][b], outputs["pred_masks"][b],
                                     targets[b]["labels"], targets[b]["masks"], points)
        rows, cols = linear_sum_assignment(cost.numpy())
        indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return indices


# ---- inputs ------------------------------------------------------------------------------------


def predictions(Q, K, h, w, seed, confident=0.6, stuff_twins=False):
    """Class logits where about `confident` of the queries are sure of one class (so panoptic
    keeps them) and mask logits that are smooth blobs (so queries overlap and compete)."""
    g = torch.Generator().manual_seed(seed)
    mask_cls = torch.randn(Q, K + 1, generator=g)
    sure = torch.rand(Q, generator=g) < confident
    mask_cls[sure, torch.randint(0, K + 1, (int(sure.sum()),), generator=g)] += 9.0
    coarse = 6 * torch.randn(Q, 1, max(h // 4, 1), max(w // 4, 1), generator=g)
    mask_pred = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    if stuff_twins:  # exact ties: query 1 is query 0 (class, score and mask)
        mask_cls[1], mask_pred[1] = mask_cls[0], mask_pred[0]
    return mask_cls, mask_pred


def panoptic_equal(a, b):
    """a: today's panoptic_inference, b: the reference (which had no segment scores)."""
    unscored = [{k: v for k, v in s.items() if k != "score"} for s in a[1]]
    return torch.equal(a[0], b[0]) and a[0].dtype == b[0].dtype and unscored == b[1]


def test_a_segment_scores_its_query_class_probability():
    mask_cls = torch.tensor([[4.0, 0.0, -2.0], [0.0, 5.0, -2.0], [0.0, 0.0, 6.0]])  # (Q, K+1): q2 is "no object"
    mask_pred = torch.full((3, 4, 4), -9.0)
    mask_pred[0, :2], mask_pred[1, 2:] = 9.0, 9.0  # q0 the top half, q1 the bottom half
    ids, segments = panoptic_inference(mask_cls, mask_pred, torch.tensor([True, False]))
    probs = F.softmax(mask_cls, dim=-1)
    assert [(s["category_id"], s["score"]) for s in segments] == [(0, probs[0, 0].item()), (1, probs[1, 1].item())]


def instances_equal(a, b):
    order_a, order_b = torch.argsort(a["scores"], stable=True), torch.argsort(b["scores"], stable=True)
    return (torch.equal(a["labels"], b["labels"]) and torch.equal(a["masks"], b["masks"])
            and a["masks"].dtype == b["masks"].dtype and torch.equal(order_a, order_b)
            and torch.allclose(a["scores"], b["scores"], rtol=1e-6, atol=0))


# ---- post-processing -------------------------------------------------------------------------


@pytest.mark.parametrize("image, output", [((64, 80), (64, 80)), ((50, 70), (50, 70)), ((50, 70), (97, 41)),
                                           ((64, 80), (128, 160)), ((50, 70), (64, 80))])
def test_upsample_equals_reference_and_skips_only_the_identity(image, output):
    """Catches: the identity test on the padded instead of the cropped size (the crop then
    skipped), skipping a resize that is not the identity, a non-contiguous result."""
    x = 3 * torch.randn(2, 5, 16, 20)
    out = upsample_predictions(x, (64, 80), image, output)
    assert torch.equal(out, reference_upsample_predictions(x, (64, 80), image, output))
    assert out.is_contiguous() and out.shape == (2, 5, *output)
    assert torch.equal(upsample_predictions(x[1], (64, 80), image, output), out[1])


def test_skipped_identity_resize_is_still_counted():
    """The papers' count (fvcore on detectron2) holds both resizes; so must ours."""
    x = torch.randn(5, 16, 20)
    for image, output in [((64, 80), (64, 80)), ((50, 70), (50, 70)), ((50, 70), (60, 90))]:
        with FlopCounter() as new:
            upsample_predictions(x, (64, 80), image, output)
        with FlopCounter() as ref:
            reference_upsample_predictions(x, (64, 80), image, output)
        assert new.counts == ref.counts == {"other": 4 * 5 * (64 * 80 + output[0] * output[1])}


@pytest.mark.parametrize("seed", range(6))
def test_panoptic_equals_reference(seed):
    K = 6
    is_thing = torch.tensor([True, True, True, False, False, False])
    mask_cls, mask_pred = predictions(Q=12, K=K, h=24 + seed, w=31, seed=seed, stuff_twins=seed % 2 == 1)
    for thresholds in [(0.8, 0.8), (0.5, 0.3), (0.9, 0.95)]:
        assert panoptic_equal(panoptic_inference(mask_cls, mask_pred, is_thing, *thresholds),
                              reference_panoptic_inference(mask_cls, mask_pred, is_thing, *thresholds))


def test_panoptic_adversarial_cases_equal_reference():
    """Nothing kept, only stuff (every query of a class merged), only things, exact ties between
    identical queries, a query covered by others (dropped), constant masks (every pixel a tie)."""
    K = 4
    mask_cls, mask_pred = predictions(Q=10, K=K, h=20, w=20, seed=7, confident=1.0)
    # q0 wins cols 0-4 (prob 0.40 there) and owns only cols 8-9 (0.60), which q1 wins: won/own
    # passes, but won & own is empty, so q0 paints nothing and gets no segment.
    outside = torch.full((2, 2, 10), -10.0)
    outside[0, :, :5], outside[0, :, 8:], outside[1, :, 5:] = -0.4, 0.4, 10.0
    cases = {
        "wins only outside its mask": (torch.tensor([[3.0, 0, 0, 0, 0], [0, 3.2, 0, 0, 0]]) * 3, outside),
        "nothing kept": (torch.zeros(10, K + 1), mask_pred),
        "all no-object": (F.one_hot(torch.full((10,), K), K + 1).float() * 20, mask_pred),
        "tied copies": (mask_cls[:2].repeat(5, 1), mask_pred[:2].repeat(5, 1, 1)),
        "constant masks": (mask_cls, torch.full_like(mask_pred, 2.0)),
        "zero masks": (mask_cls, torch.zeros_like(mask_pred)),
    }
    for is_thing in (torch.zeros(K, dtype=torch.bool), torch.ones(K, dtype=torch.bool),
                     torch.tensor([True, False, True, False])):
        for name, (cls, masks) in cases.items():
            new = panoptic_inference(cls, masks, is_thing)
            assert panoptic_equal(new, reference_panoptic_inference(cls, masks, is_thing)), name
    ids, segments = panoptic_inference(*cases["nothing kept"], is_thing)
    assert torch.equal(ids, torch.zeros(20, 20, dtype=torch.int32)) and segments == []
    ids, segments = panoptic_inference(*cases["tied copies"], is_thing)
    assert len(segments) >= 1 and ids.unique().numel() == len(segments) + (ids == 0).any()


@pytest.mark.parametrize("seed", range(4))
def test_instance_equals_reference(seed):
    """Catches: a query in several top-k pairs given another pair's mask or score (the
    de-duplication), stuff kept under panoptic_on, masks no longer 0/1 float."""
    K = 6
    is_thing = torch.tensor([True, False, True, True, False, True])
    mask_cls, mask_pred = predictions(Q=9, K=K, h=21, w=18 + seed, seed=seed, confident=0.3)
    mask_cls[2, :K] = mask_cls[2, :K].max() + 3  # one query high for every class: in many pairs
    for panoptic_on in (True, False):
        for k in (5, 20, 100):
            new = instance_inference(mask_cls, mask_pred, is_thing, k, panoptic_on)
            assert instances_equal(new, reference_instance_inference(mask_cls, mask_pred, is_thing, k, panoptic_on))
    # Every query sure of one class, k below Q: each query in one pair (the path without a second
    # gather), the masks in top-k order, not in query order.
    sure = mask_cls.clone()
    sure[torch.arange(9), torch.randperm(9, generator=torch.Generator().manual_seed(seed)) % K] += 20.0
    for k in (3, 9):
        new = instance_inference(sure, mask_pred, torch.ones(K, dtype=torch.bool), k, True)
        assert new["labels"].numel() == k
        assert instances_equal(new, reference_instance_inference(sure, mask_pred, torch.ones(K, dtype=torch.bool), k, True))
    none = instance_inference(mask_cls, mask_pred, torch.zeros(K, dtype=torch.bool), 10, True)
    assert none["masks"].shape == (0, 21, 18 + seed) and none["scores"].numel() == 0


def test_mask_scores_of_equals_the_stacked_sums():
    """The per-plane CPU loop against the stacked formulas, bit for bit. Catches: >= for > (some
    logits are exactly 0), the sigmoid summed outside the mask too, plane i read for query q (the
    queries skip and are out of order), a sum over the wrong plane."""
    g = torch.Generator().manual_seed(0)
    mask_pred = torch.randn(7, 33, 29, generator=g) * 3
    mask_pred[:, ::5, ::3] = 0.0
    queries = torch.tensor([5, 0, 3])
    logits = mask_pred[queries]  # (3, H, W)
    masks = (logits > 0).float()
    expected = (masks, (logits.sigmoid() * masks).flatten(1).sum(1), masks.flatten(1).sum(1))
    got = mask_scores_of(mask_pred, queries)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert torch.equal(mask_pred[queries], logits)  # the logits are left as they were


@pytest.mark.parametrize("pixels", [1, 7, 64, 4096])
def test_semantic_labels_are_the_argmax_of_the_scores(pixels):
    """Bands of one row, of several rows, of more than the image, a band that leaves a remainder;
    tied classes (two equal columns) take the first, as argmax does. Catches a band skipped or
    written twice, and the classes and pixels transposed."""
    mask_cls, mask_pred = predictions(Q=11, K=7, h=23, w=29, seed=3)
    mask_cls[:3, 2] += 9.0  # class 2 wins somewhere
    mask_cls = torch.cat([mask_cls[:, :3], mask_cls[:, 2:]], 1)  # classes 2 and 3 tie everywhere
    ref = reference_semantic_inference(mask_cls, mask_pred)  # (8, H, W)
    labels = semantic_labels(mask_cls, mask_pred.sigmoid(), pixels=pixels)
    assert labels.dtype == torch.int64 and torch.equal(labels, ref.argmax(0))
    assert (labels == 2).any() and not (labels == 3).any()
    assert torch.equal(semantic_inference(mask_cls, mask_pred), ref)


TINY = load_config(ROOT / "configs/demo/m2f_tiny.yaml").model


def tiny_inference_setup(seed, stride=4):
    """A stand-in for the model (inference reads only cfg and encoder.mask_stride) and the raw
    predictions of a padded batch of two images of different sizes."""
    net = SimpleNamespace(cfg=TINY, encoder=SimpleNamespace(mask_stride=stride))
    g = torch.Generator().manual_seed(seed)
    Q, K = 20, TINY.num_classes
    logits = torch.randn(2, Q, K + 1, generator=g)
    logits[:, ::2, :K] += 9 * F.one_hot(torch.randint(0, K, (2, Q // 2), generator=g), K)
    coarse = torch.randn(2, Q, 4, 5, generator=g) - 4
    for j, q in enumerate(range(0, Q, 2)):  # the confident queries own distinct cells (and some win)
        coarse[:, q, (j // 5) % 4, j % 5] += 12
    masks = F.interpolate(coarse, size=(16, 20), mode="bilinear", align_corners=False)
    return net, {"pred_logits": logits, "pred_masks": masks}


@pytest.mark.parametrize("output_sizes", [None, [(64, 80), (43, 71)], [(90, 100), (30, 33)]])
def test_inference_equals_reference(output_sizes):
    """Mask2Former.inference end to end, image sizes 64x80 (no padding) and 43x71 (padded), output
    sizes equal to and other than those; "sem_seg" as before, "sem_seg_labels" its argmax."""
    net, outputs = tiny_inference_setup(seed=1)
    sizes = [(64, 80), (43, 71)]
    ref = reference_inference(net, outputs, sizes, output_sizes)
    new = model.Mask2Former.inference(net, outputs, sizes, output_sizes)
    labels = model.Mask2Former.inference(net, outputs, sizes, output_sizes, semantic="labels")
    assert any(len(r["panoptic_seg"][1]) for r in ref)  # something survives, so the steps are exercised
    for r, n, lab in zip(ref, new, labels):
        assert set(n) == set(r) and set(lab) == {"sem_seg_labels", "panoptic_seg", "instances"}
        assert torch.equal(n["sem_seg"], r["sem_seg"])
        assert torch.equal(lab["sem_seg_labels"], r["sem_seg"].argmax(0))
        for out in (n, lab):
            assert panoptic_equal(out["panoptic_seg"], r["panoptic_seg"])
            assert instances_equal(out["instances"], r["instances"])
    with pytest.raises(ValueError, match="semantic"):
        model.Mask2Former.inference(net, outputs, sizes, semantic="argmax")


def test_panoptic_alone_resizes_only_the_kept_queries_with_the_same_result():
    """Panoptic inference alone resizes the kept queries only, one plane at a time where the
    contest reads it: the same ids and segments as the reference, which resizes all at once; under
    the FLOP counter all are resized, as the papers count."""
    net, outputs = tiny_inference_setup(seed=1)
    only = dataclasses.replace(TINY.inference, panoptic=True, instance=False, semantic=False)
    net.cfg = dataclasses.replace(TINY, inference=only)
    sizes, resized = [(64, 80), (43, 71)], []
    real = F.interpolate
    with mock.patch.object(F, "interpolate", lambda x, **kw: resized.append(x.shape[-3]) or real(x, **kw)):
        new = model.Mask2Former.inference(net, outputs, sizes, [(70, 90), (43, 71)])
    ref = reference_inference(net, outputs, sizes, [(70, 90), (43, 71)])
    assert all(panoptic_equal(n["panoptic_seg"], r["panoptic_seg"]) for n, r in zip(new, ref))
    assert any(len(r["panoptic_seg"][1]) for r in ref) and set(new[0]) == {"panoptic_seg"}
    kept = [len(kept_queries(logits)[2]) for logits in outputs["pred_logits"]]
    # each kept plane alone: image 1's twice (to the padded size, then to the output size), image
    # 2's once (its output is its own size: no second resize, no meta stand-in outside a counter)
    assert 0 < kept[0] < 20 and set(resized) == {1} and len(resized) == 2 * kept[0] + kept[1]
    with FlopCounter() as counted:
        model.Mask2Former.inference(net, outputs, sizes)
    with FlopCounter() as everything:
        reference_inference(net, outputs, sizes)
    assert counted.counts == everything.counts
    unsure = {**outputs, "pred_logits": torch.zeros_like(outputs["pred_logits"])}  # nothing kept: nothing resized
    for result in model.Mask2Former.inference(net, unsure, sizes, [(70, 90), (43, 71)]):
        assert result["panoptic_seg"][1] == [] and not result["panoptic_seg"][0].any()
    assert result["panoptic_seg"][0].shape == (43, 71)


@pytest.mark.parametrize("semantic", ["scores", "labels"])
def test_inference_counts_what_the_papers_count(semantic):
    """The FLOPs of post-processing (two full resizes of every mask, the semantic einsum) are
    unchanged by the skipped identity resize and the banded semantic labels."""
    net, outputs = tiny_inference_setup(seed=2)
    for output_sizes in (None, [(50, 60), (43, 71)]):
        with FlopCounter() as ref:
            reference_inference(net, outputs, [(64, 80), (43, 71)], output_sizes)
        with FlopCounter() as new:
            model.Mask2Former.inference(net, outputs, [(64, 80), (43, 71)], output_sizes, semantic=semantic)
        assert new.counts == ref.counts and ref.counts["other"] > 0


# ---- the batched matcher ---------------------------------------------------------------------


def matcher_batch(n_per_image, seed, Q=9, K=5, h=12, w=10, sizes=None):
    g = torch.Generator().manual_seed(seed)
    B = len(n_per_image)
    outputs = {"pred_logits": torch.randn(B, Q, K + 1, generator=g), "pred_masks": 3 * torch.randn(B, Q, h, w, generator=g)}
    sizes = sizes or [(48, 40)] * B
    targets = [{"labels": torch.randint(0, K, (n,), generator=g), "masks": torch.rand(n, *size, generator=g) > 0.6}
               for n, size in zip(n_per_image, sizes)]
    return outputs, targets


@pytest.mark.parametrize("n_per_image, sizes", [
    ((3, 0, 7, 1), None),  # padding to 7 targets, an image without any
    ((4, 4), None),
    ((2, 5, 3), [(48, 40), (36, 44), (48, 40)]),  # targets of different sizes (points normalised per image)
    ((12, 2), None),  # more targets than queries
])
def test_batched_cost_equals_per_image_cost(n_per_image, sizes):
    """Catches: targets read at another image's points, padded columns inside an image's block,
    the class cost of another image, targets sampled at the padded batch size."""
    outputs, targets = matcher_batch(n_per_image, seed=len(n_per_image), sizes=sizes)
    matcher = HungarianMatcher(cost_class=1.0, cost_mask=3.0, cost_dice=7.0, num_points=50)
    points = torch.rand(len(targets), 50, 2, generator=torch.Generator().manual_seed(9))
    cost = matcher.cost_matrix(outputs["pred_logits"], outputs["pred_masks"], [t["labels"] for t in targets],
                               [t["masks"] for t in targets], points)
    assert cost.shape == (len(targets), 9, max(n_per_image))
    for b, t in enumerate(targets):
        n = len(t["labels"])
        if n:
            ref = reference_cost_matrix(matcher, outputs["pred_logits"][b], outputs["pred_masks"][b], t["labels"],
                                        t["masks"], points[b : b + 1])
            assert torch.equal(cost[b, :, :n], ref)
            one = matcher.cost_matrix(outputs["pred_logits"][b], outputs["pred_masks"][b], t["labels"], t["masks"],
                                      points[b : b + 1])  # one image, no batch dim
            assert torch.equal(one, ref)


@pytest.mark.parametrize("n_per_image", [(3, 0, 7, 1), (0, 0), (9, 9, 9), (5,)])
def test_batched_matcher_equals_the_per_image_loop(n_per_image):
    """Same assignments from the same seed, and the RNG left where the per-image loop leaves it
    (one rand(1, P, 2) per image, empty images included), so later draws (the criterion's
    points, the next iteration) are unchanged too."""
    outputs, targets = matcher_batch(n_per_image, seed=sum(n_per_image))
    matcher = HungarianMatcher(num_points=64)
    torch.manual_seed(11)
    new = matcher(outputs, targets)
    after_new = torch.rand(3)
    torch.manual_seed(11)
    ref = reference_match(matcher, outputs, targets)
    after_ref = torch.rand(3)
    assert torch.equal(after_new, after_ref)
    assert len(new) == len(ref)
    for (i, j), (ri, rj) in zip(new, ref):
        assert i.dtype == j.dtype == torch.int64
        assert torch.equal(i, ri) and torch.equal(j, rj)


def test_batched_matcher_refuses_non_finite_costs_only_where_they_count():
    """A NaN in the predictions of an image with targets stops; one in an image without targets
    (its columns are all padding) does not, as image by image."""
    outputs, targets = matcher_batch((3, 0), seed=0)
    outputs["pred_masks"][1, 0, 0, 0] = float("nan")
    HungarianMatcher(num_points=64)(outputs, targets)
    outputs["pred_masks"][0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        HungarianMatcher(num_points=64)(outputs, targets)


# ---- the evaluation reads either semantic output -----------------------------------------------


def test_evaluation_scores_labels_like_their_scores(tmp_path):
    """metrics.Evaluation.add: "sem_seg_labels" (what inference(semantic="labels") returns) gives
    the confusion matrix of "sem_seg"'s argmax; a label past the dataset's classes is refused."""
    import data
    import synthetic
    from config import DataConfig, SplitConfig
    from metrics import Evaluation

    synthetic.write_synthetic(tmp_path / "synth", train=0, val=2, size=32, seed=1)
    cfg = DataConfig(root=str(tmp_path / "synth"), val=SplitConfig("val/images", "val/panoptic", "val/panoptic.json"),
                     test_short_side=32, test_max_size=64)
    dataset = data.build_dataset(cfg, split="val", train=False)
    by_scores, by_labels = Evaluation(dataset, tmp_path / "a", 0), Evaluation(dataset, tmp_path / "b", 0)
    g = torch.Generator().manual_seed(0)
    for i in range(len(dataset)):
        sample = dataset[i]
        scores = torch.rand(dataset.num_classes, int(sample["height"]), int(sample["width"]), generator=g)
        by_scores.add(sample, {"sem_seg": scores})
        by_labels.add(sample, {"sem_seg_labels": scores.argmax(0)})
    assert by_scores.confusion.sum() > 0 and (by_scores.confusion == by_labels.confusion).all()
    with pytest.raises(ValueError, match="classes"):
        by_labels.add(sample, {"sem_seg_labels": torch.full(scores.shape[1:], dataset.num_classes)})
