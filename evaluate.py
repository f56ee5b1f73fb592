"""Evaluation and cost: PQ / AP / mIoU over a dataset, per-image PQ, GFLOPs, FPS, pictures.

    python evaluate.py --config CFG --weights CKPT [--exit K | --gate gate.pt] [--out DIR] [--split val]
                       [--max-images N] [--batch-size B] [--device cpu|cuda] [key=value ...]

evaluates a checkpoint on a split (COCO panoptic format): panoptic predictions as PNGs + JSON,
PQ/SQ/RQ by panopticapi, mask AP by pycocotools, mIoU as detectron2's SemSegEvaluator, GFLOPs
and FPS; everything into DIR/metrics.json, with a few pictures in DIR/vis/. --exit K stops every
image's encoder after layer K; --gate lets an ECO-M2F gate (gate.py) pick each image's exit, and
GFLOPs become the mean of each image's own cost, with the histogram of the chosen exits.

    python evaluate.py sweep --config CFG --weights CKPT [--exits 1 2 3 ...] [--gates g1.pt ...]
                             --out DIR [--max-images N] [--split val] [--reuse] [key=value ...]

evaluates every fixed exit (default: all of them) and every gate into DIR/exit_<k>/ and
DIR/gate_<stem>/, then tabulates them (DIR/sweep.json, DIR/sweep.md, as ECO-M2F's Table 4) and
plots PQ against GFLOPs (DIR/sweep.png, as its Fig. 5).

    python evaluate.py flops --config CFG --size H W [--json] [--complete] [--exit K] [key=value ...]

prints the GFLOPs of one H x W image through the eval forward and post-processing, per part
(backbone, encoder, decoder, postprocess) and in total. No data and no weights are needed.

`image_pq` is the panoptic quality of one image in memory (panopticapi's rules, [0, 1] scale),
for ECO-M2F's Step B.
"""
import argparse
import io
import json
import math
import os
import pickle
import sys
import time
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from panopticapi.evaluation import pq_compute, pq_compute_multi_core
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.overrides import TorchFunctionMode
from tqdm import tqdm

from config import atomic_write_text, load_config
from data import collate, ids_to_rgb, read_panoptic_png
from model import autocast, build_model, load_weights


# ---- GFLOPs, counted as fvcore / detectron2 do ----
#
# PRO-SCALE and ECO-M2F measured Mask2Former with detectron2's FlopCountAnalysis (fvcore): a JIT
# trace whose aten ops are priced by a fixed table, every other op free. We price the same ops
# one level up, at the functional calls a TorchFunctionMode sees (F.linear is the trace's
# aten::linear, F.conv2d its aten::_convolution, F.group_norm its aten::group_norm, ...), so
# neither fvcore nor tracing is needed. One fused multiply-add counts as one FLOP.
#
#   call                                     FLOPs
#   F.linear                                 numel(input) · out_features   (bias free)
#   F.conv1d / conv2d / conv3d               batch · prod(weight.shape) · prod(output spatial)
#   F.conv_transpose1d / 2d / 3d             batch · prod(weight.shape) · prod(input spatial)
#   matmul, @, mm, bmm, addmm, baddbmm       broadcast batch · n · k · m   (added term free)
#   torch.einsum, 1 or 2 operands            prod(size of every index); (that + 1) // 2 when no
#                                            index is summed (numpy's einsum_path cost, halved)
#   F.layer_norm, group_norm, instance_norm  5 · numel(input) with a weight, else 4 · numel(input)
#   F.batch_norm                             eval: 2 · numel(input) with a weight, else numel(input);
#                                            training: as group_norm
#   F.interpolate                            bilinear: 4 · numel(output); nearest: numel(output);
#                                            any other mode, or antialias: error
#   F.adaptive_avg_pool2d                    numel(input)
#   F.scaled_dot_product_attention           QKᵀ batch·heads·Lq·Lk·E + AV batch·heads·Lq·Lk·Ev;
#                                            with an attn_mask, QKᵀ only if complete=True
#   F.grid_sample                            4 · numel(output), only if complete=True
#   everything else (elementwise, softmax, max/avg pooling, ...)     0
#
# complete=False (default) is the papers' convention. It misses two things their fvcore could
# not see: the deformable attention's sampling (a compiled CUDA op there, F.grid_sample here)
# and the QKᵀ of masked attention (torch ran it as aten::baddbmm, which fvcore does not price).
# complete=True counts both. (A torch.baddbmm called directly is priced in both conventions,
# unlike in fvcore.)
#
# Where we knowingly differ from fvcore, by a hair: its matmul formula, prod(A.shape) · B.shape[-1],
# misses the batch dims that only B has (we count them); and it read numpy's einsum cost from
# text printed with 4 significant digits (we keep it exact).
#
# Visibility: a TorchFunctionMode handler runs with the mode switched off, so only the outermost
# call that dispatches through __torch_function__ is seen. That is what prices F.interpolate once,
# not again for the upsample kernel it calls. The flip side: such a function that is not in the
# table hides every op it calls. In torch the one that matters is F.multi_head_attention_forward
# (nn.MultiheadAttention), which therefore raises rather than count its projections and attention
# as zero. Plain Python functions and nn.Module.forward do not dispatch, so ops inside them are seen.


def _matmul(out, a, b, *_, **__):
    # Each output element is a dot product over a's last dim (1-D operands included).
    return out.numel() * a.shape[-1]


def _matmul_plus(out, input, a, b, *_, **__):
    # addmm / baddbmm: input + a @ b; the addition is free.
    return _matmul(out, a, b)


def _rmatmul(out, self, other):
    # Tensor.__rmatmul__(self, other) computes other @ self.
    return _matmul(out, other, self)


def _linear(out, input, weight, bias=None):
    # = numel(input) · out_features; also right for a 1-D weight.
    return out.numel() * input.shape[-1]


def _conv(out, input, weight, *_, **__):
    spatial = weight.dim() - 2
    batch = input.shape[0] if input.dim() == weight.dim() else 1  # torch accepts unbatched input
    return batch * weight.numel() * math.prod(out.shape[-spatial:])


def _conv_transpose(out, input, weight, *_, **__):
    # fvcore's conv_flop_count with transposed=True: input positions, not output ones.
    spatial = weight.dim() - 2
    batch = input.shape[0] if input.dim() == weight.dim() else 1
    return batch * weight.numel() * math.prod(input.shape[-spatial:])


def _norm(input, weight):
    return (5 if weight is not None else 4) * input.numel()


def _layer_norm(out, input, normalized_shape, weight=None, *_, **__):
    return _norm(input, weight)


def _group_norm(out, input, num_groups, weight=None, *_, **__):
    return _norm(input, weight)


def _instance_norm(out, input, running_mean=None, running_var=None, weight=None, *_, **__):
    return _norm(input, weight)


def _batch_norm(out, input, running_mean, running_var, weight=None, bias=None, training=False, *_, **__):
    if training:
        return _norm(input, weight)
    return (2 if weight is not None else 1) * input.numel()


def _interpolate(out, input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                 recompute_scale_factor=None, antialias=False):
    if mode == "bilinear" and not antialias:
        return 4 * out.numel()
    if mode == "nearest":
        return out.numel()
    raise ValueError(
        f"FlopCounter: no fvcore formula for F.interpolate(mode={mode!r}, antialias={antialias}); "
        "only bilinear and nearest are priced")


def _adaptive_avg_pool2d(out, input, output_size):
    return input.numel()


def _grid_sample(out, input, grid, *_, **__):
    return 4 * out.numel()  # fvcore assumes bilinear: 4 taps per output element


def _attention_terms(out, query, key, value):
    # out is (..., Lq, Ev): its leading dims are batch · heads after broadcasting (and the query's
    # head count under enable_gqa), which is how many QKᵀ and AV products run.
    batch, lq, lk = math.prod(out.shape[:-2]), query.shape[-2], key.shape[-2]
    return batch * lq * lk * query.shape[-1], batch * lq * lk * value.shape[-1]


def _sdpa(out, query, key, value, *_, **__):
    qk, av = _attention_terms(out, query, key, value)
    return qk + av


def _sdpa_paper(out, query, key, value, attn_mask=None, *_, **__):
    qk, av = _attention_terms(out, query, key, value)
    return av if attn_mask is not None else qk + av


def _einsum(out, equation, *operands):
    """fvcore priced aten::einsum as numpy's optimal-path cost halved. For one contraction numpy
    charges size · (1 + [an index is summed]) + 1, size = product of the sizes of all indices;
    halved and floored that is the multiply-add count, or about half the size if nothing is summed."""
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):  # einsum(eq, [a, b])
        operands = operands[0]
    if len(operands) > 2:
        raise ValueError(
            f"FlopCounter: einsum with {len(operands)} operands would need numpy's optimal contraction "
            "path; write it as pairwise einsums")
    inputs, arrow, output = equation.replace(" ", "").partition("->")
    sizes, uses = {}, {}  # index -> size (broadcast: the largest), index -> occurrences
    for term, operand in zip(inputs.split(","), operands):
        head, _, tail = term.partition("...")
        # The ellipsis dims are named by their position from the right, so that they line up
        # across operands the way broadcasting does.
        n_ellipsis = operand.dim() - len(head) - len(tail)
        labels = [*head, *(f"...{i}" for i in range(n_ellipsis, 0, -1)), *tail]
        for label, size in zip(labels, operand.shape):
            sizes[label] = max(sizes.get(label, 1), size)
            uses[label] = uses.get(label, 0) + 1
    ellipsis = {label for label in sizes if label.startswith("...")}
    if arrow:
        kept = set(output) | (ellipsis if "..." in output else set())
    else:  # implicit output: the indices used once, plus the ellipsis
        kept = ellipsis | {label for label in sizes if uses[label] == 1}
    size = math.prod(sizes.values())
    return size if set(sizes) - kept else (size + 1) // 2


def _hides_its_ops(out, *_, **__):
    raise ValueError(
        "FlopCounter cannot see inside F.multi_head_attention_forward (nn.MultiheadAttention): a "
        "TorchFunctionMode sees only the outermost call, so its projections and attention would count "
        "as zero. Compute attention with F.linear and F.scaled_dot_product_attention instead.")


_PAPER_FORMULAS = {
    F.linear: _linear,
    F.conv1d: _conv, F.conv2d: _conv, F.conv3d: _conv,
    F.conv_transpose1d: _conv_transpose, F.conv_transpose2d: _conv_transpose,
    F.conv_transpose3d: _conv_transpose,
    # `a @ b` reaches the mode as Tensor.matmul; Tensor.__rmatmul__ dispatches itself first.
    torch.matmul: _matmul, torch.Tensor.matmul: _matmul, torch.Tensor.__rmatmul__: _rmatmul,
    torch.mm: _matmul, torch.Tensor.mm: _matmul, torch.bmm: _matmul, torch.Tensor.bmm: _matmul,
    torch.addmm: _matmul_plus, torch.Tensor.addmm: _matmul_plus,
    torch.baddbmm: _matmul_plus, torch.Tensor.baddbmm: _matmul_plus,
    torch.einsum: _einsum,
    F.layer_norm: _layer_norm, F.group_norm: _group_norm, F.instance_norm: _instance_norm,
    F.batch_norm: _batch_norm,
    F.interpolate: _interpolate,
    F.adaptive_avg_pool2d: _adaptive_avg_pool2d,
    F.scaled_dot_product_attention: _sdpa_paper,
    F.multi_head_attention_forward: _hides_its_ops,
}
_COMPLETE_FORMULAS = {**_PAPER_FORMULAS, F.grid_sample: _grid_sample, F.scaled_dot_product_attention: _sdpa}


class FlopCounter(TorchFunctionMode):
    """Counts the FLOPs of the calls made inside `with FlopCounter() as counter:`.

    counter.counts maps a scope name to its FLOPs: each op goes to the innermost active scope
    (opened by `scope` or by a module given to `track`), or to "other" outside every scope.
    """

    def __init__(self, complete: bool = False):
        super().__init__()
        self.formulas = _COMPLETE_FORMULAS if complete else _PAPER_FORMULAS
        self.counts: dict[str, int] = {}
        self._scopes: list[str] = []
        self._hooks = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)  # the mode is off in here: nested calls are not seen
        formula = self.formulas.get(func)
        if formula is not None:
            name = self._scopes[-1] if self._scopes else "other"
            self.counts[name] = self.counts.get(name, 0) + formula(out, *args, **kwargs)
        return out

    @contextmanager
    def scope(self, name: str):
        self._scopes.append(name)
        try:
            yield
        finally:
            self._scopes.pop()

    def track(self, module: nn.Module, name: str):
        """Attribute every op inside module.forward to `name`; the hooks go on __exit__."""
        def enter(*_):
            self._scopes.append(name)

        def leave(*_):
            self._scopes.pop()  # returns None: a forward hook's return value would replace the output

        self._hooks += [module.register_forward_pre_hook(enter),
                        module.register_forward_hook(leave, always_call=True)]  # pop even if forward raises

    def __exit__(self, exc_type, exc_val, exc_tb):
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        super().__exit__(exc_type, exc_val, exc_tb)


def model_flops(model: nn.Module, height: int, width: int, complete: bool = False, output_size=None,
                **forward_kwargs) -> dict:
    """GFLOPs of one image of size (height, width) through the eval forward and post-processing.

    output_size: the (H, W) the post-processing resizes to, the original image size in an
    evaluation (default: height, width); its upsampling and per-pixel steps scale with it.

    Returns {"backbone", "encoder", "decoder", "postprocess", "total", "encoder_papers"} in GFLOPs
    (1e9); total is the sum of the first four plus anything counted outside them. "encoder" is
    everything between backbone and decoder. "encoder_papers" is the papers' encoder column: they
    summed fvcore's counts of the pixel decoder's submodules, which misses the one op in its own
    forward, the bilinear upsampling of the 1/8 map in the mask branch (their totals include it).

    A model built on the meta device (`with torch.device("meta"): build_model(cfg)`) is counted
    from shapes alone, in a second even for Swin-L at 1024x2048, with the same result (tested).
    """
    parameter = next(model.parameters())
    divisor = max(model.size_divisibility, 1)  # 0 means no padding, as in detectron2
    padded = (-(-height // divisor) * divisor, -(-width // divisor) * divisor)
    # A fixed random image rather than zeros, so data-dependent steps (which masks survive
    # post-processing) behave as on a real image and every call counts the same.
    images = torch.randn(1, 3, *padded, generator=torch.Generator().manual_seed(0)).to(parameter)
    training = {module: module.training for module in model.modules()}
    parts = ("backbone", "encoder", "decoder")
    counter = FlopCounter(complete)
    for part in parts:
        counter.track(getattr(model, part), part)
    branch = getattr(model.encoder, "mask_branch", None)
    if branch is not None:  # the mask branch's own ops (its upsampling) apart from its submodules'
        counter.track(branch, "mask_branch_fusion")
        for sub in (branch.lateral, branch.output, branch.mask_features):
            if sub is not None:
                counter.track(sub, "encoder")
    model.eval()
    try:
        with torch.no_grad(), counter:
            outputs = model(images, **forward_kwargs)
            with counter.scope("postprocess"):
                resize = {} if output_size is None else {"output_sizes": [tuple(output_size)]}
                model.inference(outputs, image_sizes=[(height, width)], **resize)
    finally:
        for module, flag in training.items():
            module.training = flag
    fusion = counter.counts.pop("mask_branch_fusion", 0)
    gflops = {part: counter.counts.get(part, 0) / 1e9 for part in (*parts, "postprocess")}
    gflops["encoder"] += fusion / 1e9
    gflops["total"] = (sum(counter.counts.values()) + fusion) / 1e9
    gflops["encoder_papers"] = gflops["encoder"] - fusion / 1e9
    return gflops


# ---- panoptic quality of one image, in memory (panopticapi semantics) ----------------------
#
# ECO-M2F's Step B needs the PQ of every training image at every exit: tens of thousands of
# single-image evaluations, where writing PNGs for panopticapi would dominate. `image_pq` is
# panopticapi's `pq_compute_single_core` followed by `PQStat.pq_average`, restricted to one image
# and working on id maps in memory; tests/test_evaluate.py checks it against `pq_compute` on files.
#
# The rules, as panopticapi has them:
#   - id 0 is VOID. Ground truth ids that no segment describes are not void: they are just pixels
#     that no ground-truth segment owns.
#   - a prediction and a non-crowd ground-truth segment of the same category match when
#     IoU > 0.5, where the prediction's void pixels are left out of the union (and so out of its
#     area); IoU > 0.5 makes every match unique, so no assignment step is needed.
#   - unmatched non-crowd ground truth: false negative. Crowd ground truth never matches.
#   - unmatched prediction: false positive, unless more than half of its area is void or lies in
#     the crowd region of its own category (panopticapi keeps one crowd segment per category,
#     the last one listed).
#   - per category PQ = Σ IoU / (TP + FP/2 + FN/2), SQ = Σ IoU / TP (0 without TP),
#     RQ = TP / (TP + FP/2 + FN/2); the image's values average the categories with TP+FP+FN > 0.
#
# One deliberate difference: panopticapi reads ground-truth areas from the JSON, we count them
# in the id map. For consistent annotations (COCO, Cityscapes: the JSON areas are the PNG pixel
# counts) the results are identical, and counting keeps them right when a map was resized.
#
# Nothing to evaluate (n == 0: no non-crowd ground truth and no prediction that counts) gives
# pq = sq = rq = 1.0, where panopticapi would divide by zero. Step B turns per-image PQ into a
# utility per exit: an empty image predicted empty is a perfect answer, and every exit should
# score the same on it (so the cheapest exit wins), which 1.0 does and nan would not.

VOID = 0
OFFSET = 256 * 256 * 256  # ids are 24-bit (RGB-encoded PNGs): gt · OFFSET + pred is a unique pair key


def _id_map(ids, name):
    """An (H, W) id map (numpy or torch, any integer dtype) as int64 numpy, checked."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name} must be an (H, W) integer id map, got shape {ids.shape} and dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= OFFSET):
        raise ValueError(f"{name}: segment ids must lie in [0, 2^24), got {ids.min()}..{ids.max()}")
    return ids


def pq_stats(gt_ids, gt_segments, pred_ids, pred_segments, categories) -> dict:
    """Per-category panoptic statistics of one image: {category_id: {"iou", "tp", "fp", "fn"}}.

    panopticapi's `pq_compute_single_core` for one image (see the section comment). gt_ids and
    pred_ids are (H, W) id maps; gt_segments are COCO segments_info dicts ("id", "category_id",
    "iscrowd"), pred_segments need "id" and "category_id"; both use the category ids of
    `categories` (category id -> dict with "isthing"). Like panopticapi, it raises if the
    prediction's map and segment list disagree or a prediction has an unknown category.
    """
    gt, pred = _id_map(gt_ids, "gt_ids"), _id_map(pred_ids, "pred_ids")
    if gt.shape != pred.shape:
        raise ValueError(f"gt_ids {gt.shape} and pred_ids {pred.shape} differ in size")
    gt_segms = {s["id"]: s for s in gt_segments}
    pred_segms = {s["id"]: s for s in pred_segments}

    # Areas of the predicted segments, and panopticapi's sanity checks.
    pred_area = {}
    for label, count in zip(*np.unique(pred, return_counts=True)):
        label = int(label)
        if label not in pred_segms:
            if label == VOID:
                continue
            raise KeyError(f"segment id {label} is in the predicted id map but not in pred_segments")
        if pred_segms[label]["category_id"] not in categories:
            raise KeyError(f"predicted segment {label} has unknown category_id {pred_segms[label]['category_id']}")
        pred_area[label] = int(count)
    if len(pred_area) != len(pred_segms):
        absent = sorted(set(pred_segms) - set(pred_area))
        raise KeyError(f"pred_segments lists ids {absent} that the predicted id map does not contain")
    gt_area = dict(zip(*(a.tolist() for a in np.unique(gt, return_counts=True))))

    # Intersections of every (gt id, pred id) pair present in the image.
    pairs, counts = np.unique(gt * OFFSET + pred, return_counts=True)
    intersection = {(int(p) // OFFSET, int(p) % OFFSET): int(n) for p, n in zip(pairs, counts)}

    stats = {}

    def stat(category):
        return stats.setdefault(category, {"iou": 0.0, "tp": 0, "fp": 0, "fn": 0})

    gt_matched, pred_matched = set(), set()
    for (gt_label, pred_label), inter in intersection.items():
        if gt_label not in gt_segms or pred_label not in pred_segms:
            continue
        g, p = gt_segms[gt_label], pred_segms[pred_label]
        if g.get("iscrowd", 0) == 1 or g["category_id"] != p["category_id"]:
            continue
        union = pred_area[pred_label] + gt_area.get(gt_label, 0) - inter - intersection.get((VOID, pred_label), 0)
        iou = inter / union
        if iou > 0.5:
            s = stat(g["category_id"])
            s["tp"] += 1
            s["iou"] += iou
            gt_matched.add(gt_label)
            pred_matched.add(pred_label)

    crowd = {}  # category -> id of its crowd segment (the last listed, as in panopticapi)
    for gt_label, g in gt_segms.items():
        if gt_label in gt_matched:
            continue
        if g.get("iscrowd", 0) == 1:
            crowd[g["category_id"]] = gt_label
            continue
        stat(g["category_id"])["fn"] += 1

    for pred_label, p in pred_segms.items():
        if pred_label in pred_matched:
            continue
        ignored = intersection.get((VOID, pred_label), 0)
        if p["category_id"] in crowd:
            ignored += intersection.get((crowd[p["category_id"]], pred_label), 0)
        if ignored / pred_area[pred_label] > 0.5:
            continue  # mostly void or crowd of its own category: neither right nor wrong
        stat(p["category_id"])["fp"] += 1
    return stats


def pq_average(stats, categories, isthing=None) -> dict:
    """panopticapi's `PQStat.pq_average`: {"pq", "sq", "rq", "n"} over the categories of
    `categories` (things only if isthing is True, stuff only if False) with TP+FP+FN > 0,
    on the [0, 1] scale; n == 0 gives 1.0 for all three (see the section comment)."""
    pq = sq = rq = 0.0
    n = 0
    for category, info in categories.items():
        if isthing is not None and (info["isthing"] == 1) != isthing:
            continue
        s = stats.get(category)
        if s is None or s["tp"] + s["fp"] + s["fn"] == 0:
            continue
        n += 1
        denominator = s["tp"] + 0.5 * s["fp"] + 0.5 * s["fn"]
        pq += s["iou"] / denominator
        sq += s["iou"] / s["tp"] if s["tp"] != 0 else 0
        rq += s["tp"] / denominator
    if n == 0:
        return {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 0}
    return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}


def image_pq(gt_ids, gt_segments, pred_ids, pred_segments, categories, isthing=None) -> dict:
    """Panoptic quality of one image: {"pq", "sq", "rq", "n"}, on the [0, 1] scale.

    gt_ids, pred_ids: (H, W) integer id maps (numpy or torch), 0 = void. gt_segments: COCO
    segments_info dicts with "id", "category_id", "iscrowd"; pred_segments: dicts with "id" and
    "category_id" (model.panoptic_inference's output, once its contiguous labels are mapped to
    the ids used here). categories: category id -> dict with "isthing" (1/0 or bool).
    isthing: None (all categories), True (things) or False (stuff).

    Exactly panopticapi's pq_compute restricted to this image (rules in the section comment);
    "n" is the number of categories averaged. When n == 0 (nothing in the ground truth and no
    prediction that counts) the image scores pq = sq = rq = 1.0: predicting nothing for an empty
    image is perfect, and ECO-M2F's Step B needs a finite utility for every exit.
    """
    return pq_average(pq_stats(gt_ids, gt_segments, pred_ids, pred_segments, categories), categories, isthing)


# ---- ground truth in other forms: instances for AP, semantic maps for mIoU -----------------


def encode_mask(mask) -> dict:
    """A binary (H, W) mask as COCO compressed RLE, JSON-ready (counts as str)."""
    rle = mask_util.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def panoptic_to_instances(panoptic, panoptic_folder, image_ids=None) -> dict:
    """COCO instance ground truth ("images", "annotations", "categories") from panoptic ground truth.

    panoptic: the panoptic JSON (a dict or a path); panoptic_folder: its PNG folder; image_ids:
    only these images (default all). Every thing segment becomes one instance with an RLE mask,
    its pixel area and its box; crowd segments keep iscrowd = 1, so COCOeval ignores the
    detections they absorb. Only thing categories are listed. Used for AP when a split has no
    instance JSON. (COCO's own instances_val2017.json is not exactly this: the panoptic masks
    had their overlaps resolved, so AP differs from the official figure by a little.)
    """
    if not isinstance(panoptic, dict):
        panoptic = json.loads(Path(panoptic).read_text())
    things = {c["id"]: c for c in panoptic["categories"] if c["isthing"] == 1}
    wanted = None if image_ids is None else set(image_ids)
    images = [im for im in panoptic["images"] if wanted is None or im["id"] in wanted]
    annotations = []
    for ann in panoptic["annotations"]:
        if wanted is not None and ann["image_id"] not in wanted:
            continue
        segments = [s for s in ann["segments_info"] if s["category_id"] in things]
        if not segments:
            continue
        ids = read_panoptic_png(Path(panoptic_folder) / ann["file_name"]).numpy()
        for s in segments:
            rle = encode_mask(ids == s["id"])
            area = int(mask_util.area(rle))
            if area == 0:
                continue  # a segment without pixels cannot be detected; COCO lists none
            annotations.append({"id": len(annotations) + 1, "image_id": ann["image_id"],
                                "category_id": s["category_id"], "segmentation": rle, "area": area,
                                "bbox": mask_util.toBbox(rle).tolist(), "iscrowd": int(s.get("iscrowd", 0))})
    return {"images": images, "annotations": annotations, "categories": list(things.values())}


def semantic_from_panoptic(ids, segments, contiguous, ignore) -> np.ndarray:
    """(H, W) semantic labels: the contiguous class of every segment's pixels, crowd segments
    included (a crowd of people is still person); void and undescribed ids -> `ignore`."""
    label_of = {s["id"]: contiguous[s["category_id"]] for s in segments}
    present, inverse = np.unique(ids, return_inverse=True)
    labels = np.array([label_of.get(int(i), ignore) for i in present], dtype=np.int64)
    return labels[inverse].reshape(ids.shape)


# ---- metrics over a dataset: PQ (panopticapi), AP (pycocotools), mIoU (detectron2's rule) ---


@contextmanager
def _quiet():
    """Silence panopticapi's and pycocotools' progress prints (forked pq_compute workers
    inherit the redirected sys.stdout too)."""
    with redirect_stdout(io.StringIO()):
        yield


def panoptic_metrics(gt_json, gt_folder, pred_json, pred_folder) -> dict:
    """PQ, SQ, RQ (0..100) for all categories, things (_th) and stuff (_st), by panopticapi's
    pq_compute on the files. A group with no category present (no things in the evaluated images,
    say) gets None, where pq_compute would divide by zero."""
    groups = {"": ("All", None), "_th": ("Things", True), "_st": ("Stuff", False)}
    with _quiet():
        try:
            results = pq_compute(str(gt_json), str(pred_json), str(gt_folder), str(pred_folder))
        except ZeroDivisionError:
            # Same statistics through pq_compute's own parts, averaging only the non-empty groups.
            gt, pred = json.loads(Path(gt_json).read_text()), json.loads(Path(pred_json).read_text())
            categories = {c["id"]: c for c in gt["categories"]}
            by_image = {a["image_id"]: a for a in pred["annotations"]}
            stat = pq_compute_multi_core([(a, by_image[a["image_id"]]) for a in gt["annotations"]],
                                         str(gt_folder), str(pred_folder), categories)
            results = {}
            for name, isthing in groups.values():
                present = [c for c, info in categories.items()
                           if (isthing is None or (info["isthing"] == 1) == isthing)
                           and stat[c].tp + stat[c].fp + stat[c].fn > 0]
                results[name] = stat.pq_average(categories, isthing)[0] if present else None
    metrics = {}
    for suffix, (name, _) in groups.items():
        for key in ("pq", "sq", "rq"):
            metrics[key.upper() + suffix] = None if results[name] is None else 100 * results[name][key]
    return metrics


def instance_metrics(gt: dict, detections: list, image_ids) -> dict:
    """COCO mask AP (0..100): AP, AP50, AP75, APs, APm, APl of `detections` (dicts with
    "image_id", "category_id", "segmentation" RLE, "score") against the COCO instance ground
    truth `gt` on `image_ids`. None where COCOeval has nothing to average (-1: no ground truth)."""
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    with _quiet():
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        wanted = set(image_ids)
        has_gt = any(a["image_id"] in wanted and not a.get("iscrowd", 0) for a in gt["annotations"])
        if not detections:
            # loadRes cannot take an empty list. No detections: AP 0 if there was anything to find.
            return {k: 0.0 if has_gt else None for k in keys}
        coco_dt = coco_gt.loadRes(detections)
        coco_eval = COCOeval(coco_gt, coco_dt, "segm")
        coco_eval.params.imgIds = list(image_ids)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return {k: (100 * float(v) if v >= 0 else None) for k, v in zip(keys, coco_eval.stats[:6])}


def confusion_matrix(pred, gt, num_classes) -> np.ndarray:
    """(K+1, K+1) int64 counts [predicted class, true class]; true class K means ignored."""
    index = (num_classes + 1) * np.asarray(pred, dtype=np.int64).ravel() + np.asarray(gt, dtype=np.int64).ravel()
    return np.bincount(index, minlength=(num_classes + 1) ** 2).reshape(num_classes + 1, num_classes + 1)


def semantic_metrics(confusion) -> dict:
    """mIoU, fwIoU, mACC, pACC (0..100) from a confusion_matrix sum, as detectron2's
    SemSegEvaluator: ignored pixels are left out, and a class without ground-truth pixels is
    left out of the means (its false positives still lower the IoU of the true classes)."""
    tp = np.diag(confusion)[:-1].astype(np.float64)
    gt_pixels = confusion[:-1, :-1].sum(0).astype(np.float64)
    pred_pixels = confusion[:-1, :-1].sum(1).astype(np.float64)
    valid = gt_pixels > 0
    if not valid.any():
        return {"mIoU": None, "fwIoU": None, "mACC": None, "pACC": None}
    iou = tp[valid] / (gt_pixels + pred_pixels - tp)[valid]
    weights = gt_pixels[valid] / gt_pixels.sum()
    return {"mIoU": 100 * iou.mean(), "fwIoU": 100 * float((iou * weights).sum()),
            "mACC": 100 * (tp[valid] / gt_pixels[valid]).mean(), "pACC": 100 * tp.sum() / gt_pixels.sum()}


# ---- cost: GFLOPs averaged over images, FPS --------------------------------------------------


def average_gflops(model, sizes, exit=None, complete=False) -> dict:
    """The mean over images of each image's own model_flops, given every image's (input size,
    original size) and encoder exit.

    exit: None (all layers) or one int for every image, or a sequence (list, 1-D tensor) with
    each image's exit, as ECO-M2F's gate chose them. Image i costs model_flops at its sizes with
    exit k_i, so a gated evaluation reports the mean of what each image really ran (DESIGN.md
    section 7), not the cost of some "average exit".

    Counting runs one forward per distinct (input size, original size, exit), not one per image:
    COCO's 5000 val images have a few hundred distinct size pairs, times at most the number of exits.
    """
    if not sizes:
        return {}
    if isinstance(exit, torch.Tensor):
        exit = exit.tolist()  # a 0-d tensor becomes an int, a 1-D one a list
    if isinstance(exit, (list, tuple)):
        if len(exit) != len(sizes):
            raise ValueError(f"average_gflops: {len(exit)} exits for {len(sizes)} images")
        exits = [None if k is None else int(k) for k in exit]
    else:
        exits = [None if exit is None else int(exit)] * len(sizes)
    keys = [(tuple(a), tuple(b), k) for (a, b), k in zip(sizes, exits)]
    cost = {}
    for key in dict.fromkeys(keys):
        (h, w), output_size, k = key
        kwargs = {} if k is None else {"exit": k}
        cost[key] = model_flops(model, h, w, complete=complete, output_size=output_size, **kwargs)
    parts = next(iter(cost.values())).keys()
    return {p: sum(cost[key][p] for key in keys) / len(keys) for p in parts}


@torch.no_grad()
def measure_fps(model, samples, device="cpu", exit=None, amp="fp32", warmup=2) -> float | None:
    """Images per second at batch 1: the median over `samples` (dataset samples with "image",
    "height", "width") of the time from the uint8 image on the host to the post-processed
    outputs (transfer, normalisation and padding, forward, inference), after `warmup` untimed
    runs, synchronised on CUDA. None if there are no samples.

    exit: as in evaluate_dataset, a gate included: the gate then runs inside every timed forward
    and picks each image's exit, so its (small) cost and its choices are both in the timing."""
    if not samples:
        return None
    device = torch.device(device)

    def run(sample):
        images, sizes = model.preprocess([sample["image"].to(device)])
        with autocast(torch.device(device).type, amp):
            outputs = model(images, exit=exit)
        model.inference(outputs, sizes, output_sizes=[(sample["height"], sample["width"])])

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        run(samples[0])
    times = []
    for sample in samples:
        sync()
        start = time.perf_counter()
        run(sample)
        sync()
        times.append(time.perf_counter() - start)
    return 1.0 / float(np.median(times))


# ---- pictures: image | ground truth | prediction --------------------------------------------


def category_color(category_id) -> np.ndarray:
    """A fixed, bright colour per category id (the same in every picture and run)."""
    return np.random.default_rng(9973 * int(category_id) + 1).integers(60, 256, size=3).astype(np.uint8)


def draw_panoptic(image, ids, segments) -> np.ndarray:
    """(H, W, 3) uint8: the image dimmed, segments painted in their category's colour, segment
    borders white (two instances of one class stay apart), void left dark."""
    out = (0.35 * image).astype(np.uint8)
    for s in segments:
        mask = ids == s["id"]
        out[mask] = (0.35 * image[mask] + 0.65 * category_color(s["category_id"])).astype(np.uint8)
    border = np.zeros(ids.shape, dtype=bool)
    border[:-1] |= ids[:-1] != ids[1:]
    border[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    out[border] = 255
    return out


def save_visualization(path, image, gt_ids, gt_segments, pred_ids, pred_segments, gap=4):
    """One PNG: image | ground truth | prediction, at the ground truth's size. image: (3, h, w)
    uint8 (resized back if needed); segments carry dataset category ids."""
    H, W = gt_ids.shape
    image = np.asarray(image.permute(1, 2, 0).cpu() if isinstance(image, torch.Tensor) else image, dtype=np.uint8)
    if image.shape[:2] != (H, W):
        image = np.asarray(Image.fromarray(image).resize((W, H), Image.BILINEAR))
    panels = [image, draw_panoptic(image, gt_ids, gt_segments), draw_panoptic(image, pred_ids, pred_segments)]
    canvas = np.full((H, 3 * W + 2 * gap, 3), 255, dtype=np.uint8)
    for k, panel in enumerate(panels):
        canvas[:, k * (W + gap): k * (W + gap) + W] = panel
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)


# ---- dataset evaluation ----------------------------------------------------------------------
#
# out_dir/
#   predictions/*.png    predicted panoptic ids, RGB-encoded (COCO panoptic format)
#   predictions.json     {"annotations": [{"image_id", "file_name", "segments_info"}]}, dataset category ids
#   gt_panoptic.json     the ground truth of the evaluated images, when that is not the whole split
#   vis/*.png            image | ground truth | prediction for the first few images
#   metrics.json         PQ/SQ/RQ (+_th, _st), AP..., mIoU..., GFLOPs, FPS; written last, atomically
#
# PQ, AP, mIoU and their variants are on the 0..100 scale; GFLOPs is the mean over the images of
# each one's cost (papers' convention, post-processing at the original size included); FPS is
# images per second at batch 1. A metric that is undefined (no thing in the ground truth for AP,
# FPS not measured, ...) is None, null in the JSON.
#
# ECO-M2F (exit=a gate): "exit" is "gate", "gate" describes it (its exits and training info: β,
# loss, ...), "exit_histogram" counts the images per chosen exit, and GFLOPs is the mean of each
# image's cost at its own exit. With a fixed exit k the histogram is {k: images}; with all layers
# it is None. Histogram keys are strings ("2": 130), as JSON has them, so metrics.json reads back
# equal to the returned dict.


METRIC_KEYS = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st",
               "AP", "AP50", "AP75", "APs", "APm", "APl", "mIoU", "fwIoU", "mACC", "pACC",
               "GFLOPs", "GFLOPs_parts", "FPS", "images", "exit", "exit_histogram", "gate",
               "batch_size", "device", "amp")


def is_gate(exit) -> bool:
    """A gate (gate.Gate, or any module that maps the projected 1/32 map to per-image exits) as
    opposed to None or an int; Mask2Former.forward tells them apart the same way."""
    return isinstance(exit, nn.Module)


def gate_description(gate) -> dict:
    """JSON-ready facts about a gate for metrics.json: its exits and its training info (gate.info:
    β, loss, ... as gate.py saved them; values JSON cannot hold are written as text)."""
    info = {"exits": [int(k) for k in gate.exits.tolist()]} if hasattr(gate, "exits") else {}
    for key, value in getattr(gate, "info", {}).items():
        try:
            json.dumps(value)
        except TypeError:
            value = str(value)
        info.setdefault(key, value)
    return info


def exit_histogram(exits) -> dict:
    """{"k": number of images that exited after layer k}, in increasing k."""
    counts = {}
    for k in sorted(int(k) for k in exits):
        counts[str(k)] = counts.get(str(k), 0) + 1
    return counts


@torch.no_grad()
def evaluate_dataset(model, dataset, out_dir, batch_size=1, exit=None, max_images=None, device="cpu",
                     amp="fp32", workers=0, vis_images=4, fps_images=10, flops=True, progress=True) -> dict:
    """Evaluate `model` on `dataset` (a test-time data.PanopticDataset); returns the metrics.

    model: a Mask2Former already on `device` (or anything with its preprocess / forward /
    inference). dataset: its samples carry the test-resized "image" and the original "height" /
    "width"; the ground truth is read from its files (json_file, panoptic_dir, instances_json)
    at the original size, as pq_compute reads it. exit: the encoder exit of every image (None =
    all layers), or an ECO-M2F gate (gate.Gate; moved to `device`) that picks each image's exit
    inside the forward (the model returns them as outputs["exits"]). max_images: only the first
    N images. amp: off, fp16 or bf16 autocast. workers: data loader processes. vis_images:
    pictures to draw. fps_images: images timed at batch 1 (0 = no FPS). flops: count GFLOPs (one
    forward per distinct image size and exit). Writes the files listed in the section comment
    into out_dir.

    Batching does not change the results: in a batch with per-image exits every encoder layer
    runs only on the images that still need it, so batch_size > 1 gives batch 1's predictions,
    exits and GFLOPs (up to float tolerance) when the images share a size. Images of different
    sizes are zero-padded to a common one in a batch, which changes what every model sees (the
    gate's mean over the 1/32 map included), as in any batched Mask2Former evaluation.
    """
    out_dir = Path(out_dir)
    pred_folder = out_dir / "predictions"
    pred_folder.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    model.eval()
    gated = is_gate(exit)
    if gated:
        exit = exit.to(device).eval()
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    if n == 0:
        raise ValueError("no images to evaluate")
    gt_json, gt_folder = Path(dataset.json_file), Path(dataset.panoptic_dir)
    instances_json = dataset.instances_json
    if instances_json is not None and not Path(instances_json).is_file():
        instances_json = None  # derived from the panoptic ground truth instead
    gt = json.loads(gt_json.read_text())
    gt_anns = {a["image_id"]: a for a in gt["annotations"]}
    contiguous = dataset.contiguous
    to_dataset = {c: d for d, c in contiguous.items()}  # contiguous class -> dataset category id
    K = dataset.num_classes

    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size,
                                         collate_fn=collate, num_workers=workers)
    annotations, detections, sizes, exits, image_ids, produced = [], [], [], [], [], set()
    confusion = np.zeros((K + 1, K + 1), dtype=np.int64)
    for batch in tqdm(loader, desc="evaluate", total=len(loader), disable=not progress):
        images, image_sizes = model.preprocess([s["image"].to(device, non_blocking=True) for s in batch])
        with autocast(torch.device(device).type, amp):
            outputs = model(images, exit=exit)
        if gated:
            if "exits" not in outputs:
                raise ValueError(f"exit={type(exit).__name__}: the model's forward returned no \"exits\"; "
                                 "a gated evaluation needs each image's exit (Mask2Former.forward with a gate)")
            exits += outputs["exits"].tolist()
        else:
            exits += [exit] * len(batch)
        results = model.inference(outputs, image_sizes,
                                  output_sizes=[(int(s["height"]), int(s["width"])) for s in batch])
        for sample, image_size, result in zip(batch, image_sizes, results):
            produced.update(result)
            image_id, H, W = sample["image_id"], int(sample["height"]), int(sample["width"])
            image_ids.append(image_id)
            sizes.append((tuple(image_size), (H, W)))
            # The ground truth at the original size, read as pq_compute reads it (the sample's
            # "ids" went through the test-time resize). An image without an annotation is all
            # void, and pq_compute, which follows the ground truth's annotations, skips it.
            gt_ann = gt_anns.get(image_id) or {"file_name": Path(sample["file_name"]).stem + ".png",
                                               "segments_info": []}
            if gt_ann["segments_info"]:
                gt_ids = read_panoptic_png(gt_folder / gt_ann["file_name"]).numpy()  # (H, W)
            else:
                gt_ids = np.zeros((H, W), dtype=np.int64)

            pred_ids, pred_segments = None, []
            if "panoptic_seg" in result:
                ids, segments = result["panoptic_seg"]
                pred_ids = ids.cpu().numpy().astype(np.int64)
                pred_segments = [{"id": int(s["id"]), "category_id": to_dataset[int(s["category_id"])],
                                  "isthing": bool(s["isthing"]), "iscrowd": 0} for s in segments]
                png = pred_folder / gt_ann["file_name"]
                png.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(ids_to_rgb(pred_ids)).save(png)
                annotations.append({"image_id": image_id, "file_name": gt_ann["file_name"],
                                    "segments_info": pred_segments})
            if "sem_seg" in result:
                if result["sem_seg"].shape[0] != K:
                    raise ValueError(f"the model predicts {result['sem_seg'].shape[0]} classes, the dataset has {K}")
                pred = result["sem_seg"].argmax(0).cpu().numpy()
                confusion += confusion_matrix(pred, semantic_from_panoptic(gt_ids, gt_ann["segments_info"],
                                                                           contiguous, K), K)
            if "instances" in result:
                inst = result["instances"]
                masks = inst["masks"].bool().cpu().numpy()
                for mask, score, label in zip(masks, inst["scores"].tolist(), inst["labels"].tolist()):
                    detections.append({"image_id": image_id, "category_id": to_dataset[int(label)],
                                       "segmentation": encode_mask(mask), "score": float(score)})
            if len(image_ids) <= vis_images and pred_ids is not None:
                save_visualization(out_dir / "vis" / f"{Path(gt_ann['file_name']).stem}.png", sample["image"],
                                   gt_ids, gt_ann["segments_info"], pred_ids, pred_segments)

    metrics = dict.fromkeys(METRIC_KEYS)
    metrics.update({"images": n, "exit": "gate" if gated else exit,
                    "exit_histogram": None if exit is None else exit_histogram(exits),
                    "gate": gate_description(exit) if gated else None,
                    "batch_size": batch_size, "device": str(device), "amp": amp})

    # PQ: panopticapi on the files, against the ground truth of exactly the evaluated images.
    if annotations:
        atomic_write_text(out_dir / "predictions.json", json.dumps({"annotations": annotations}))
        if set(image_ids) != set(gt_anns):
            wanted = set(image_ids)
            subset = {**gt, "images": [im for im in gt["images"] if im["id"] in wanted],
                      "annotations": [a for a in gt["annotations"] if a["image_id"] in wanted]}
            gt_json = out_dir / "gt_panoptic.json"
            atomic_write_text(gt_json, json.dumps(subset))
        metrics.update(panoptic_metrics(gt_json, gt_folder, out_dir / "predictions.json", pred_folder))

    # AP: pycocotools on the instance ground truth (the split's file, or derived from the panoptic one).
    if "instances" in produced:
        if instances_json is not None:
            instance_gt = json.loads(instances_json.read_text())
        else:
            instance_gt = panoptic_to_instances(gt, gt_folder, image_ids)
        metrics.update(instance_metrics(instance_gt, detections, image_ids))

    if confusion.any():
        metrics.update(semantic_metrics(confusion))

    if flops:
        # Each image at its own exit (all the same one without a gate). The gate itself is not
        # counted: its mean over the 1/32 tokens is free in the papers' convention and its
        # Linear(256, 5) is 1280 FLOPs, nothing next to a model's hundred-odd GFLOPs.
        gflops = average_gflops(model, sizes, exits)
        metrics["GFLOPs"] = gflops["total"]
        metrics["GFLOPs_parts"] = gflops
    if fps_images:
        samples = [dataset[i] for i in range(min(fps_images, n))]
        metrics["FPS"] = measure_fps(model, samples, device, exit, amp)  # a gate runs inside the forward

    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


# ---- command line --------------------------------------------------------------------------


def print_flops(cfg_path, size, flops, complete):
    convention = "complete (every op)" if complete else "papers' convention (fvcore)"
    print(f"GFLOPs of {cfg_path} at {size[0]}x{size[1]}, {convention}:")
    for part, value in flops.items():
        print(f"  {part:<12} {value:9.2f}")


def beta_text(beta) -> str:
    """β as the papers print it: 0.003, 0.0005, 0.01 (no trailing zeros)."""
    return f"{beta:g}" if isinstance(beta, (int, float)) else str(beta)


def describe_exit(metrics) -> str:
    """"all layers", "exit 3" or "gate (β=0.01)" for a metrics dict."""
    if metrics["exit"] == "gate":
        beta = (metrics.get("gate") or {}).get("beta")
        return "gate" if beta is None else f"gate (β={beta_text(beta)})"
    return "all layers" if metrics["exit"] is None else f"exit {metrics['exit']}"


def histogram_text(histogram) -> str:
    """{"1": 2, "3": 5} -> "1:2 3:5" (exit:images); "-" for None."""
    return "-" if not histogram else " ".join(f"{k}:{n}" for k, n in histogram.items())


def print_metrics(metrics, out_dir):
    def fmt(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    print(f"{metrics['images']} images, {describe_exit(metrics)}, {metrics['device']}:")
    print(f"  PQ {fmt(metrics['PQ'])}  PQ_th {fmt(metrics['PQ_th'])}  PQ_st {fmt(metrics['PQ_st'])}  "
          f"AP {fmt(metrics['AP'])}  mIoU {fmt(metrics['mIoU'])}  "
          f"GFLOPs {fmt(metrics['GFLOPs'])}  FPS {fmt(metrics['FPS'], 1)}")
    if metrics["exit"] == "gate":
        counts = metrics["exit_histogram"]
        print("  exits chosen by the gate: " + ", ".join(
            f"{k}: {n} ({100 * n / metrics['images']:.0f}%)" for k, n in counts.items()))
    print(f"  written to {out_dir}/metrics.json")


# The GFLOPs columns of PRO-SCALE's Tables 1, 2, 3, 6 and 7: each group's first row is the reference
# for the reductions. COCO images are resized to short side 800 (long side <= 1333); the papers'
# figures are those of a 4:3 image, 800x1067, padded to 800x1088. Cityscapes runs at 1024x2048.
FLOPS_TABLE = [
    ("COCO, Swin-T", (800, 1088), [("M2F", "coco/m2f_swin_t"), *[
        (f"PRO-SCALE ({d[0]},{d[1]},{d[2]})", f"coco/proscale_{d}_swin_t") for d in ("111", "222", "333", "311", "131", "113")]]),
    ("COCO, R50", (800, 1088), [("M2F", "coco/m2f_r50"), *[
        (f"PRO-SCALE ({d[0]},{d[1]},{d[2]})", f"coco/proscale_{d}_r50") for d in ("111", "222", "333", "113")]]),
    ("Cityscapes, Swin-T", (1024, 2048), [("M2F", "cityscapes/m2f_swin_t"), *[
        (f"PRO-SCALE ({d[0]},{d[1]},{d[2]})", f"cityscapes/proscale_{d}_swin_t") for d in ("111", "222", "333", "311", "131", "113")],
        ("C1: M2F without res2", "cityscapes/ablation_c1_m2f_no_res2_swin_t"),
        ("C2: PRO-SCALE (1,1,1) + conv", "cityscapes/ablation_c2_proscale_111_conv_swin_t"),
        ("C3: PRO-SCALE (1,1,1) + LPE", "cityscapes/ablation_c3_proscale_111_lpe_swin_t")]),
    ("Cityscapes, R50", (1024, 2048), [("M2F", "cityscapes/m2f_r50"), *[
        (f"PRO-SCALE ({d[0]},{d[1]},{d[2]})", f"cityscapes/proscale_{d}_r50") for d in ("111", "222", "333")]]),
    *[(f"Cityscapes, {name}", (1024, 2048), [("M2F", f"cityscapes/m2f_{b}"), ("PRO-SCALE (3,3,3)", f"cityscapes/proscale_333_{b}")])
      for name, b in (("Swin-S", "swin_s"), ("Swin-B", "swin_b"), ("Swin-L", "swin_l"), ("R101", "r101"))],
]


def flops_table(complete=False, root=Path(__file__).resolve().parent / "configs"):
    """Rows (group, model, size, gflops dict) of FLOPS_TABLE, counted on the meta device."""
    rows = []
    for group, size, entries in FLOPS_TABLE:
        for name, config in entries:
            with torch.device("meta"):
                model = build_model(load_config(root / f"{config}.yaml"))
            rows.append((group, name, size, model_flops(model, *size, complete=complete)))
    return rows


def print_flops_table(rows):
    """Markdown: encoder and total GFLOPs with the change against each group's first row."""
    print("| dataset, backbone | model | size | encoder GFLOPs | encoder, papers' column | total GFLOPs |")
    print("|---|---|---|---|---|---|")
    reference = {}
    for group, name, size, g in rows:
        ref = reference.setdefault(group, g)
        change = lambda part: "" if g is ref else f" ({100 * (g[part] / ref[part] - 1):+.2f}%)"  # noqa: E731
        print(f"| {group} | {name} | {size[0]}x{size[1]} | {g['encoder']:.2f}{change('encoder')} | "
              f"{g['encoder_papers']:.2f} | {g['total']:.2f}{change('total')} |")


def flops_parser():
    parser = argparse.ArgumentParser(prog="evaluate.py flops",
                                     description="GFLOPs of one image of a given size (no data, no weights).")
    parser.add_argument("--config", help="YAML config (not with --table)")
    parser.add_argument("--table", action="store_true",
                        help="M2F and every PRO-SCALE configuration at the papers' sizes, side by side")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=[800, 1088],
                        help="image height and width (default 800 1088, COCO's test size for 4:3 images)")
    parser.add_argument("--exit", type=int, default=None, help="encoder exit k (default: all layers)")
    parser.add_argument("--complete", action="store_true",
                        help="also count the deformable sampling and the masked attention's QK^T")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return parser


def eval_parser():
    parser = argparse.ArgumentParser(
        prog="evaluate.py [eval]", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="`python evaluate.py flops -h` for the GFLOPs command, `python evaluate.py sweep -h` for ECO-M2F's "
               "exit and gate sweep.")
    parser.add_argument("--config", required=True, help="YAML config")
    parser.add_argument("--weights", required=True, help="checkpoint: train.py's, a state dict, or an official .pkl")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--exit", type=int, default=None, help="encoder exit k for every image (default: all layers)")
    which.add_argument("--gate", default=None,
                       help="ECO-M2F: a gate file from gate.py that picks each image's exit (not with --exit)")
    parser.add_argument("--out", default=None,
                        help="output folder (default, next to the weights: eval_<split>, eval_<split>_exit<k> "
                             "or eval_<split>_gate_<gate file stem>)")
    add_evaluation_options(parser, vis=4)
    parser.add_argument("--no-flops", action="store_true", help="do not count GFLOPs")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return parser


def add_evaluation_options(parser, vis):
    """The options shared by the eval and sweep commands."""
    parser.add_argument("--split", default="val", choices=("train", "val"))
    parser.add_argument("--max-images", type=int, default=None, help="only the first N images")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--amp", default="fp32", choices=("fp32", "fp16", "bf16"), help="autocast for the forward")
    parser.add_argument("--workers", type=int, default=None, help="data loader processes (default: data.workers)")
    parser.add_argument("--vis", type=int, default=vis, help=f"pictures to draw per evaluation (default {vis})")
    parser.add_argument("--fps-images", type=int, default=10, help="images timed at batch 1 (0: no FPS)")


def load_weights_checked(model, path, cfg_path):
    """load_weights(strict=True), with errors that name the file."""
    try:
        load_weights(model, path, strict=True)
    except (RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as e:
        # load_state_dict reports shape mismatches without the file; torch.load's errors vary.
        message = str(e) if str(path) in str(e) else f"{path}: {e}"
        raise ValueError(f"{message}\n(do these weights belong to the model of {cfg_path}?)") from None


def run_flops(args):
    if args.table:
        rows = flops_table(args.complete)
        if args.json:
            print(json.dumps([{"group": g, "model": n, "size": list(s), "gflops": f} for g, n, s, f in rows]))
        else:
            print_flops_table(rows)
        return
    if not args.config:
        raise SystemExit("evaluate.py flops: --config is required (or --table)")
    cfg = load_config(args.config, args.overrides)
    with torch.device("meta"):  # shapes alone: no weights needed, any model counts in a second
        model = build_model(cfg)
    forward_kwargs = {}
    if args.exit is not None:
        layers = encoder_exits(cfg, args.config)
        if not 1 <= args.exit <= layers:
            raise ValueError(f"--exit {args.exit}: the encoder of {args.config} has exits 1..{layers}")
        forward_kwargs["exit"] = args.exit
    result = model_flops(model, *args.size, complete=args.complete, **forward_kwargs)
    if args.json:
        print(json.dumps({"size": list(args.size), "gflops": result}))
    else:
        print_flops(args.config, args.size, result, args.complete)


def encoder_exits(cfg, cfg_path) -> int:
    """The number of exits of the model's encoder (its layers), or an error naming the config
    when the encoder has none (PRO-SCALE's stages see different token sets)."""
    encoder = cfg.model.encoder
    if encoder.name != "m2f":
        raise ValueError(f"{cfg_path}: the {encoder.name!r} encoder has no early exits; ECO-M2F's exits and gate "
                         "need the M2F encoder (model.encoder.name: m2f)")
    return encoder.layers


def load_gate_checked(path, cfg, cfg_path):
    """gate.load_gate, with errors that name the file, and the gate checked against the model of
    `cfg`: it must read the encoder's `dim` channels and choose exits the encoder has."""
    from gate import load_gate  # only gated evaluations need gate.py

    path = Path(path)
    if not path.is_file():  # before minutes of loading data
        raise FileNotFoundError(f"{path}: gate file not found")
    try:
        gate = load_gate(path)
    except (ValueError, RuntimeError, KeyError, TypeError, AttributeError, EOFError, pickle.UnpicklingError) as e:
        # load_gate names the file for what it expects to fail; torch.load on garbage raises its own.
        message = str(e) if str(path) in str(e) else f"{path}: not a gate file written by gate.py ({e})"
        raise ValueError(message) from None
    layers = encoder_exits(cfg, cfg_path)
    exits = [int(k) for k in gate.exits.tolist()]
    if gate.head.in_features != cfg.model.encoder.dim:
        raise ValueError(f"{path}: the gate reads {gate.head.in_features} channels, but the encoder of {cfg_path} "
                         f"has dim {cfg.model.encoder.dim} (was the gate trained for another model?)")
    if min(exits) < 1 or max(exits) > layers:
        raise ValueError(f"{path}: the gate chooses among exits {exits}, but the encoder of {cfg_path} "
                         f"has exits 1..{layers}")
    return gate


def load_split_and_model(cfg, args):
    """The test-time dataset of args.split and the model of cfg with args.weights, on args.device,
    checked against each other (classes) and against the config (weights)."""
    import data

    dataset = data.build_dataset(cfg.data, args.split, train=False)
    things = sorted(dataset.thing_classes)
    if dataset.num_classes != cfg.model.num_classes or things != sorted(cfg.model.thing_classes):
        raise ValueError(
            f"{args.config}: model.num_classes={cfg.model.num_classes}, model.thing_classes="
            f"{cfg.model.thing_classes}, but {dataset.json_file} has {dataset.num_classes} classes, things {things} "
            "(contiguous ids: categories sorted by id)")
    model = build_model(cfg)
    load_weights_checked(model, args.weights, args.config)
    return dataset, model.to(args.device)


def run_eval(args):
    cfg = load_config(args.config, args.overrides)
    if not Path(args.weights).is_file():  # before minutes of loading data
        raise FileNotFoundError(f"{args.weights}: weights file not found")
    gate = None if args.gate is None else load_gate_checked(args.gate, cfg, args.config)
    dataset, model = load_split_and_model(cfg, args)
    if gate is not None:
        suffix = f"_gate_{Path(args.gate).stem}"
    else:
        suffix = "" if args.exit is None else f"_exit{args.exit}"
    out = args.out or Path(args.weights).parent / f"eval_{args.split}{suffix}"
    metrics = evaluate_dataset(model, dataset, out, batch_size=args.batch_size,
                               exit=args.exit if gate is None else gate,
                               max_images=args.max_images, device=args.device, amp=args.amp,
                               workers=cfg.data.workers if args.workers is None else args.workers,
                               vis_images=args.vis, fps_images=args.fps_images, flops=not args.no_flops)
    print_metrics(metrics, out)
    return metrics


def report_parser():
    parser = argparse.ArgumentParser(prog="evaluate.py report",
                                     description="One table from the metrics.json of several evaluations.")
    parser.add_argument("runs", nargs="+", metavar="NAME=DIR", help="a row name and its evaluation folder")
    parser.add_argument("--out", help="also write the table (Markdown, with the pictures) to this file")
    parser.add_argument("--image", action="append", default=[], help="another picture for the report (repeatable)")
    return parser


def run_report(args):
    """Print (and optionally save) PQ, AP, mIoU, GFLOPs and FPS of several evaluations side by side."""
    header = "| model | PQ | PQ_th | PQ_st | AP | mIoU | encoder GFLOPs | total GFLOPs | FPS |"
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    pictures = []
    for item in args.runs:
        name, sep, folder = item.rpartition("=")  # the last "=": a name may hold one (β=0.02)
        if not sep:
            raise SystemExit(f"report: {item!r} is not NAME=DIR")
        path = Path(folder) / "metrics.json"
        if not path.exists():
            raise SystemExit(f"report: {path} does not exist (run evaluate.py first)")
        m = json.loads(path.read_text())
        encoder = (m.get("GFLOPs_parts") or {}).get("encoder")
        cells = [m.get(k) for k in ("PQ", "PQ_th", "PQ_st", "AP", "mIoU")] + [encoder, m.get("GFLOPs"), m.get("FPS")]
        lines.append(f"| {name} | " + " | ".join(_cell(v) for v in cells) + " |")
        pictures += [(name, p) for p in sorted((Path(folder) / "vis").glob("*.png"))[:1]]
    pictures += [(Path(p).stem, Path(p)) for p in args.image]
    # Links relative to the report, so that the run folder can move.
    base = Path(args.out).resolve().parent if args.out else Path.cwd()
    pictures = [f"![{name}]({os.path.relpath(Path(p).resolve(), base)})" for name, p in pictures]
    table = "\n".join(lines)
    print(table)
    if args.out:
        atomic_write_text(args.out, table + "\n\n" + "\n".join(pictures) + "\n")
        print(f"report written to {args.out}")


# ---- ECO-M2F's trade-off: every fixed exit and every gate on one split ----------------------
#
# `evaluate.py sweep` evaluates the model at each fixed exit k (the paper's "M2F w/ WSD exits always
# at the k-th layer", Fig. 5's blue dots) and with each gate (one per β, its red crosses) into
#   DIR/exit_<k>/, DIR/gate_<stem>/   evaluate_dataset's folders (metrics.json, predictions, ...)
#   DIR/sweep.json                    one row per evaluation (SWEEP_ROW_KEYS)
#   DIR/sweep.md                      the rows as a Markdown table, like the paper's Table 4
#   DIR/sweep.png                     PQ against mean total GFLOPs, like the paper's Fig. 5
# One model and one dataset serve every row; --reuse keeps rows whose metrics.json is already there.

SWEEP_ROW_KEYS = ("name", "kind", "exit", "beta", "gate", "dir", "images", "PQ", "AP", "mIoU",
                  "encoder_GFLOPs", "total_GFLOPs", "FPS", "exit_histogram")


def sweep_row(name, kind, metrics, folder, exit=None, gate_path=None) -> dict:
    """One sweep.json row from an evaluation's metrics. kind: "exit" (exit = k) or "gate" (beta
    from the gate's training info, None if it has none). GFLOPs are means over the images."""
    parts = metrics.get("GFLOPs_parts") or {}
    return {"name": name, "kind": kind, "exit": exit if kind == "exit" else None,
            "beta": (metrics.get("gate") or {}).get("beta") if kind == "gate" else None,
            "gate": None if gate_path is None else str(gate_path), "dir": str(folder),
            "images": metrics.get("images"), "PQ": metrics.get("PQ"), "AP": metrics.get("AP"),
            "mIoU": metrics.get("mIoU"), "encoder_GFLOPs": parts.get("encoder"),
            "total_GFLOPs": metrics.get("GFLOPs"), "FPS": metrics.get("FPS"),
            "exit_histogram": metrics.get("exit_histogram")}


def _cell(value) -> str:
    """Two decimals as in the papers' tables, but 3 significant digits below 1, so that the GFLOPs
    of a tiny model (0.0156 vs 0.0199) stay apart."""
    if value is None:
        return "-"
    return f"{value:.2f}" if value == 0 or abs(value) >= 1 else f"{value:.3g}"


def sweep_table(rows) -> str:
    """The rows as Markdown: PQ, AP, mIoU, encoder and total GFLOPs, FPS (the paper's Table 4),
    and how many images took each exit."""
    lines = ["| model | PQ | AP | mIoU | encoder GFLOPs | total GFLOPs | FPS | exits (exit:images) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [row[k] for k in ("PQ", "AP", "mIoU", "encoder_GFLOPs", "total_GFLOPs", "FPS")]
        lines.append(f"| {row['name']} | " + " | ".join(_cell(v) for v in cells)
                     + f" | {histogram_text(row['exit_histogram'])} |")
    return "\n".join(lines)


# The plot, drawn with PIL alone (no plotting library in requirements.txt).
SWEEP_PLOT_SIZE = (800, 560)  # width, height in pixels
_BLUE, _RED, _GRID, _INK = (31, 119, 180), (214, 39, 40), (225, 225, 225), (0, 0, 0)


def _fonts(sizes):
    """Fonts at `sizes` px, and how to write β with them. A system font with Greek letters where
    there is one (DejaVu Sans on most Linux systems, Arial on macOS and Windows); else Pillow's
    bundled font, which has no β (so "beta"), or its fixed bitmap font where FreeType is missing."""
    from PIL import ImageFont

    for name in ("DejaVuSans.ttf", "Arial.ttf"):
        try:
            return [ImageFont.truetype(name, size) for size in sizes], "β"
        except OSError:
            continue
    try:
        return [ImageFont.load_default(size=size) for size in sizes], "beta"
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
        return [ImageFont.load_default()] * len(sizes), "beta"


def _text(draw, xy, text, font, align="left-top", fill=_INK):
    """Draw text with its box placed at xy: align is "<left|center|right>-<top|middle|bottom>".
    Measured by hand rather than with Pillow's `anchor`, which bitmap fonts do not support."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    horizontal, vertical = align.split("-")
    x = xy[0] - {"left": 0, "center": (right - left) / 2, "right": right - left}[horizontal] - left
    y = xy[1] - {"top": 0, "middle": (bottom - top) / 2, "bottom": bottom - top}[vertical] - top
    draw.text((x, y), text, font=font, fill=fill)


def nice_axis(values, ticks=5, minimum=None):
    """(low, high, step) of an axis showing `values`: step is 1, 2 or 5 times a power of ten,
    giving about `ticks` intervals, and low/high are multiples of it with a margin around the data;
    low stays >= minimum (PQ and GFLOPs are never negative)."""
    low, high = min(values), max(values)
    span = high - low
    if span == 0:  # one point, or all equal (an untrained model's PQ of 0): a small window around it
        span = abs(high) * 0.1 or 1.0
        low, high = low - span / 2, high + span / 2
    low, high = low - 0.08 * span, high + 0.08 * span
    if minimum is not None:
        low = max(low, minimum)
    raw = (high - low) / ticks
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))
    return math.floor(low / step) * step, math.ceil(high / step) * step, step


def _tick_labels(low, high, step):
    """(value, label) of every tick, with as many decimals as the step needs."""
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    count = round((high - low) / step)
    return [(low + i * step, f"{low + i * step:.{decimals}f}") for i in range(count + 1)]


def plot_sweep(rows, path, title="PQ vs. GFLOPs"):
    """PQ against mean total GFLOPs, as ECO-M2F's Fig. 5: the fixed exits as blue dots joined by a
    line (in exit order) and labelled with k, the gates as red crosses labelled with β (or their
    name), with axes, ticks, grid, title and legend. Rows without PQ or GFLOPs are left out.
    Writes an RGB PNG of SWEEP_PLOT_SIZE."""
    from PIL import ImageDraw

    width, height = SWEEP_PLOT_SIZE
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    (small, normal, large), beta = _fonts((13, 15, 18))
    left, top, right, bottom = 90, 55, width - 200, height - 75  # the plot area; the legend goes right of it

    points = [r for r in rows if r["PQ"] is not None and r["total_GFLOPs"] is not None]
    xs = [r["total_GFLOPs"] for r in points] or [0.0, 1.0]
    ys = [r["PQ"] for r in points] or [0.0, 1.0]
    x_low, x_high, x_step = nice_axis(xs, minimum=0)
    y_low, y_high, y_step = nice_axis(ys, minimum=0)

    def at(x, y):
        return (left + (x - x_low) / (x_high - x_low) * (right - left),
                bottom - (y - y_low) / (y_high - y_low) * (bottom - top))

    # Grid, ticks and their labels, then the frame over them.
    for value, label in _tick_labels(x_low, x_high, x_step):
        x = at(value, y_low)[0]
        draw.line([(x, top), (x, bottom)], fill=_GRID)
        draw.line([(x, bottom), (x, bottom + 5)], fill=_INK)
        _text(draw, (x, bottom + 8), label, small, "center-top")
    for value, label in _tick_labels(y_low, y_high, y_step):
        y = at(x_low, value)[1]
        draw.line([(left, y), (right, y)], fill=_GRID)
        draw.line([(left - 5, y), (left, y)], fill=_INK)
        _text(draw, (left - 8, y), label, small, "right-middle")
    draw.rectangle([left, top, right, bottom], outline=_INK)
    _text(draw, ((left + right) / 2, 18), title, large, "center-top")
    _text(draw, ((left + right) / 2, height - 22), "total GFLOPs (mean per image)", normal, "center-bottom")
    label = Image.new("RGB", (160, 24), "white")  # the y label, drawn level and turned upright
    _text(ImageDraw.Draw(label), (80, 12), "PQ", normal, "center-middle")
    image.paste(label.rotate(90, expand=True), (12, int((top + bottom) / 2 - 80)))

    def dot(xy, r=5):
        draw.ellipse([xy[0] - r, xy[1] - r, xy[0] + r, xy[1] + r], fill=_BLUE)

    def cross(xy, r=6):
        draw.line([(xy[0] - r, xy[1] - r), (xy[0] + r, xy[1] + r)], fill=_RED, width=3)
        draw.line([(xy[0] - r, xy[1] + r), (xy[0] + r, xy[1] - r)], fill=_RED, width=3)

    fixed = sorted((r for r in points if r["kind"] == "exit"), key=lambda r: r["exit"])
    if len(fixed) > 1:
        draw.line([at(r["total_GFLOPs"], r["PQ"]) for r in fixed], fill=_BLUE, width=2)
    for r in fixed:
        xy = at(r["total_GFLOPs"], r["PQ"])
        dot(xy)
        _text(draw, (xy[0] - 6, xy[1] - 6), str(r["exit"]), small, "right-bottom", _BLUE)  # clear of the line
    for r in points:
        if r["kind"] == "gate":
            xy = at(r["total_GFLOPs"], r["PQ"])
            cross(xy)
            text = r["name"] if r["beta"] is None else f"{beta}={beta_text(r['beta'])}"
            _text(draw, (xy[0] + 9, xy[1] - 4), text, small, "left-bottom", _RED)  # gates tend to sit above the curve
    if not points:
        _text(draw, ((left + right) / 2, (top + bottom) / 2), "no rows with PQ and GFLOPs", normal, "center-middle")

    # Legend, right of the plot area.
    x0, y0 = right + 20, top + 10
    draw.rectangle([x0, y0, width - 15, y0 + 62], outline=_INK)
    draw.line([(x0 + 10, y0 + 18), (x0 + 40, y0 + 18)], fill=_BLUE, width=2)
    dot((x0 + 25, y0 + 18))
    _text(draw, (x0 + 50, y0 + 18), "fixed exit k", normal, "left-middle")
    cross((x0 + 25, y0 + 44))
    _text(draw, (x0 + 50, y0 + 44), f"gate ({beta})", normal, "left-middle")

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def sweep_parser():
    parser = argparse.ArgumentParser(
        prog="evaluate.py sweep",
        description="ECO-M2F's accuracy-cost trade-off: evaluate every fixed exit and every gate on one split; "
                    "DIR/sweep.json, sweep.md (as the paper's Table 4) and sweep.png (PQ vs. GFLOPs, as its Fig. 5).",
        epilog="Put key=value overrides after the other arguments, not right after --exits or --gates "
               "(those take every following value).")
    parser.add_argument("--config", required=True, help="YAML config")
    parser.add_argument("--weights", required=True, help="checkpoint (Step A's, trained with exits)")
    parser.add_argument("--exits", type=int, nargs="*", default=None,
                        help="fixed exits to evaluate (default: every one, 1..model.encoder.layers; "
                             "--exits alone: none)")
    parser.add_argument("--gates", nargs="+", default=[], help="gate files from gate.py (one per β)")
    parser.add_argument("--out", required=True, help="output folder")
    add_evaluation_options(parser, vis=0)
    parser.add_argument("--reuse", action="store_true",
                        help="keep a row whose folder already has a matching metrics.json instead of evaluating again")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return parser


def _reusable(folder, images, exit, gate=None):
    """The metrics in folder/metrics.json if they are those of this row (same number of images,
    same exit, same gate description, GFLOPs counted), else None."""
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    same = (metrics.get("images") == images and metrics.get("GFLOPs") is not None
            and metrics.get("exit") == ("gate" if gate is not None else exit)
            and (gate is None or metrics.get("gate") == gate_description(gate)))
    return metrics if same else None


def run_sweep(args):
    """Evaluate the fixed exits and the gates with one model, then write the table and the plot."""
    cfg = load_config(args.config, args.overrides)
    layers = encoder_exits(cfg, args.config)
    exits = list(range(1, layers + 1)) if args.exits is None else list(dict.fromkeys(args.exits))
    wrong = [k for k in exits if not 1 <= k <= layers]
    if wrong:
        raise ValueError(f"--exits {wrong}: the encoder of {args.config} has exits 1..{layers}")
    if not Path(args.weights).is_file():  # before minutes of loading data
        raise FileNotFoundError(f"{args.weights}: weights file not found")
    out = Path(args.out)
    runs = [(f"exit {k}", "exit", k, out / f"exit_{k}", None) for k in exits]
    for path in args.gates:  # every gate checked before anything is evaluated
        if "=" in Path(path).name and not Path(path).exists():
            raise FileNotFoundError(f"--gates {path}: no such gate file (a key=value override right after "
                                    "--gates is taken for a gate; put overrides last)")
        gate = load_gate_checked(path, cfg, args.config)
        folder = out / f"gate_{Path(path).stem}"
        clash = next((r[4] for r in runs if r[3] == folder), None)
        if clash is not None:
            raise ValueError(f"--gates: {clash} and {path} would both be evaluated into {folder}; rename one")
        beta = gate.info.get("beta")
        runs.append((Path(path).stem if beta is None else f"β={beta_text(beta)}", "gate", gate, folder, path))
    if not runs:
        raise ValueError("sweep: nothing to evaluate (no --exits and no --gates)")

    dataset, model = load_split_and_model(cfg, args)
    images = len(dataset) if args.max_images is None else min(args.max_images, len(dataset))
    rows = []
    for name, kind, exit, folder, gate_path in runs:
        metrics = _reusable(folder, images, exit if kind == "exit" else None,
                            exit if kind == "gate" else None) if args.reuse else None
        if metrics is not None:
            print(f"sweep: {name}: reusing {folder}/metrics.json")
        else:
            print(f"sweep: {name} -> {folder}")
            metrics = evaluate_dataset(model, dataset, folder, batch_size=args.batch_size, exit=exit,
                                       max_images=args.max_images, device=args.device, amp=args.amp,
                                       workers=cfg.data.workers if args.workers is None else args.workers,
                                       vis_images=args.vis, fps_images=args.fps_images, flops=True)
        rows.append(sweep_row(name, kind, metrics, folder.name, exit=exit if kind == "exit" else None,
                              gate_path=gate_path))

    table = sweep_table(rows)
    summary = {"config": str(args.config), "weights": str(args.weights), "split": args.split,
               "images": images, "device": str(args.device), "rows": rows}
    atomic_write_text(out / "sweep.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "sweep.md", table + "\n")
    plot_sweep(rows, out / "sweep.png", f"PQ vs. GFLOPs: {Path(args.config).stem}, {args.split}, {images} images")
    print(table)
    print(f"written to {out}/sweep.json, sweep.md, sweep.png")
    return rows


def main(argv=None):
    """`evaluate.py flops ...` counts GFLOPs; `evaluate.py report ...` tabulates evaluations;
    `evaluate.py sweep ...` evaluates every exit and gate; `evaluate.py [eval] ...` evaluates a checkpoint."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("flops", "eval", "report", "sweep") else "eval"
    if command == "flops":
        run_flops(flops_parser().parse_args(argv))
    elif command == "report":
        run_report(report_parser().parse_args(argv))
    elif command == "sweep":
        run_sweep(sweep_parser().parse_args(argv))
    else:
        run_eval(eval_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
