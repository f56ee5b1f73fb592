"""GFLOPs in the papers' convention: fvcore's per-op prices, counted without fvcore or tracing.

    counter = FlopCounter(); with counter: model(images)      # counts per scope
    model_flops(model, 800, 1088)                             # one image: backbone / encoder / decoder / postprocess
    average_gflops(model, sizes, exits)                       # the mean over images, each at its own exit

A model built on the meta device is counted from shapes alone (no weights, no data, seconds).
"""
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

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


def _kept_format(input):
    """The memory format torch's CPU kernels give the output of `input` (its suggested format)."""
    channels_last = input.dim() == 4 and not input.is_contiguous() and input.is_contiguous(
        memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def _grid_sample_shape(input, grid, *_, **__):
    """grid_sample's output on the meta device: (N, C, *grid's spatial dims), contiguous."""
    return input.new_empty((*input.shape[:2], *grid.shape[1:-1]))


def _interpolate_shape(input, size=None, *_, **__):
    """interpolate's output on the meta device when `size` is given (None: let torch work it
    out), in the input's memory format."""
    if size is None:
        return None
    size = (size,) * (input.dim() - 2) if isinstance(size, int) else tuple(size)
    return input.new_empty((*input.shape[:2], *size)).contiguous(memory_format=_kept_format(input))


def _layer_norm_shape(input, *_, **__):
    """layer_norm's output on the meta device: the input's shape, contiguous (as on the CPU)."""
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def _group_norm_shape(input, *_, **__):
    """group_norm's output on the meta device: the input's shape, in the input's memory format."""
    return torch.empty_like(input, memory_format=_kept_format(input))


# On the meta device torch computes these outputs through their Python decompositions, ~50 ms a
# grid_sample, ~25 ms an interpolate and ~6 ms a norm whatever the size (most of a model's count);
# their shapes are simple, and nothing else of them is read.
_META_SHAPES = {F.grid_sample: _grid_sample_shape, F.interpolate: _interpolate_shape,
                F.layer_norm: _layer_norm_shape, F.group_norm: _group_norm_shape}


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
        shape = _META_SHAPES.get(func)
        on_meta = bool(args) and isinstance(args[0], torch.Tensor) and args[0].is_meta  # input given by position
        out = shape(*args, **kwargs) if shape is not None and on_meta else None
        if out is None:
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

    forward_kwargs go to the model's forward (Mask2Former: exit=k, the encoder exit).

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


def average_gflops(model, sizes, exit=None, complete=False) -> dict:
    """The mean over images of each image's own model_flops, given every image's (input size,
    original size) and encoder exit.

    exit: None (all layers) or one int for every image, or a sequence (list, 1-D tensor) with
    each image's exit, as ECO-M2F's gate chose them. Image i costs model_flops at its sizes with
    exit k_i, so a gated evaluation reports the mean of what each image really ran, not the cost
    of some "average exit".

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

