"""CPU paths faster than torch's defaults, with their results: linear layers and 1x1 convs through
oneDNN, the post-processing's weighted argmax over queries; and the test for an observing mode.

torch sends a CPU float32 F.linear to MKL's sgemm, which on AMD CPUs runs a generic code path: on
the AMD EPYC (AVX-512) this repository is measured on it reaches ~90 GFLOP/s on one thread, where
oneDNN, the library torch already runs its convolutions with, reaches ~200 GFLOP/s on the same
product written as a 1x1 convolution over a channels-last view of the tokens (no copy). `linear`
(with `Linear`, an nn.Linear of the same parameters and state-dict names; `conv1x1` and `Conv1x1`
likewise for 1x1 convolutions) takes that route for CPU float32 products of at least MIN_MACS
multiply-adds, below which oneDNN's ~30 us per call loses; its backward is oneDNN convolutions too.
Everywhere else (CUDA, other dtypes, autocast, torch.compile and torch.export tracing, the FLOP
counter) it is F.linear. The results equal F.linear's to float32 rounding (~1e-6 relative; the
summation order differs), and `reference()` switches the route off, for bit-for-bit comparisons
with F.linear and F.conv2d and for benchmarking the MKL path.
"""
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

MIN_MACS = 1 << 22  # tokens·in·out. Measured break-even: 256 -> 256 at ~64 tokens, 64 -> 64 at ~600
_ONEDNN = {"on": True}


@contextmanager
def reference():
    """Within it `linear` is F.linear everywhere."""
    before = _ONEDNN["on"]
    _ONEDNN["on"] = False
    try:
        yield
    finally:
        _ONEDNN["on"] = before


def observed():
    """True under a TorchFunctionMode other than torch's device context: an observer of functional
    calls (flops.FlopCounter) that prices the reference ops (F.linear, F.grid_sample), so it gets them."""
    if torch.compiler.is_compiling() or not torch._C._is_torch_function_mode_enabled():
        return False
    from torch.utils._device import DeviceContext

    return any(not isinstance(mode, DeviceContext) for mode in torch.overrides._get_current_function_mode_stack())


def uses_onednn(x, weight):
    """Whether `linear(x, weight)` takes the oneDNN route."""
    return (_ONEDNN["on"] and x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.dim() >= 2 and x.numel() * weight.shape[0] >= MIN_MACS and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling() and not observed())


def flat_tokens(x):
    """x (..., C) -> (T, C), contiguous (a view when x already is)."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def tokens_conv(x, weight, bias=None):
    """x (T, C) @ weight (O, C)^T + bias, as oneDNN's 1x1 convolution of the channels-last view
    (1, C, T, 1) of x: (T, O)."""
    T, C = x.shape
    out = torch.mkldnn_convolution(x.view(1, T, 1, C).permute(0, 3, 1, 2), weight.reshape(-1, C, 1, 1), bias,
                                   (0, 0), (1, 1), (1, 1), 1)  # (1, O, T, 1), channels-last
    return out.permute(0, 2, 3, 1).reshape(T, -1)


def weight_grad(grad, x):
    """grad (T, O)^T @ x (T, C) -> (O, C), as a 1x1 convolution with the T tokens as its input
    channels: oneDNN again, where torch.mm would be MKL. The smaller operand is the one transposed."""
    (T, O), C = grad.shape, x.shape[1]
    if O <= C:  # input x as (1, T, C, 1), weight grad^T (O, T): out (1, O, C, 1)
        return torch.mkldnn_convolution(x.view(1, T, C, 1), grad.t().reshape(O, T, 1, 1), None,
                                        (0, 0), (1, 1), (1, 1), 1).reshape(O, C)
    out = torch.mkldnn_convolution(grad.view(1, T, O, 1), x.t().reshape(C, T, 1, 1), None,
                                   (0, 0), (1, 1), (1, 1), 1)  # (1, C, O, 1)
    return out.reshape(C, O).t().contiguous()


class OneDNNLinear(torch.autograd.Function):
    """tokens_conv over x (..., C) -> (..., O), with a backward of oneDNN products: dx = grad @ W,
    dW = grad^T @ x, db = Σ grad."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        flat = flat_tokens(x)  # (T, C)
        ctx.save_for_backward(flat, weight)
        ctx.shape = x.shape
        out = tokens_conv(flat, weight, bias)  # (T, O), a view of the convolution's output
        # The same memory as a tensor of its own, not a view: layers modify it in place (F.relu_)
        return out.new_empty(0).set_(out.untyped_storage(), out.storage_offset(), (*x.shape[:-1], out.shape[1]))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        flat, weight = ctx.saved_tensors
        grad = flat_tokens(grad)  # (T, O)
        dx = tokens_conv(grad, weight.t()).view(ctx.shape) if ctx.needs_input_grad[0] else None  # (..., C)
        dw = weight_grad(grad, flat) if ctx.needs_input_grad[1] else None  # (O, C)
        db = grad.sum(0) if ctx.needs_input_grad[2] else None  # (O,)
        return dx, dw, db


def linear(x, weight, bias=None):
    """F.linear(x, weight, bias): x (..., C), weight (O, C), bias (O,) or None -> (..., O)."""
    if not uses_onednn(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return OneDNNLinear.apply(x, weight, bias)
    return tokens_conv(flat_tokens(x), weight, bias).view(*x.shape[:-1], weight.shape[0])


def conv1x1(x, weight, bias=None):
    """F.conv2d(x, weight, bias) for a 1x1 weight (O, C, 1, 1): x (B, C, H, W) -> (B, O, H, W), on the
    oneDNN route `linear` over the pixels, its output channels-last (the token layout: flattening it to
    (B, HW, O) is a view)."""
    w = weight.flatten(1)  # (O, C)
    if not uses_onednn(x, w):
        return F.conv2d(x, weight, bias)
    pixels = x.permute(0, 2, 3, 1)  # (B, H, W, C): a view of channels-last x (else `linear` copies)
    return linear(pixels, w, bias).permute(0, 3, 1, 2)


class Linear(nn.Linear):
    """nn.Linear (parameters, init, state-dict names) computed by `linear`."""

    def forward(self, x):
        """x (..., in_features) -> (..., out_features)."""
        return linear(x, self.weight, self.bias)


class Conv1x1(nn.Conv2d):
    """nn.Conv2d(in_channels, out_channels, kernel_size=1) (parameters, init, state-dict names)
    computed by `conv1x1`."""

    def __init__(self, in_channels, out_channels, bias=True):
        super().__init__(in_channels, out_channels, kernel_size=1, bias=bias)

    @classmethod
    def like(cls, conv):
        """A Conv1x1 holding the parameters of `conv`, an nn.Conv2d with a 1x1 kernel, stride 1."""
        new = cls(conv.in_channels, conv.out_channels, bias=conv.bias is not None)
        new.weight, new.bias = conv.weight, conv.bias
        return new

    def forward(self, x):
        """x (B, in_channels, H, W) -> (B, out_channels, H, W)."""
        return conv1x1(x, self.weight, self.bias)


def panoptic_winners(scores, logits, kept, probabilities=False, resize=None):
    """The panoptic step's per-pixel contest among the kept queries, bit for bit as on the stacked
    probabilities P = sigmoid(resize(logits[kept])) (n, H, W):

        winner = (scores[:, None, None] * P).argmax(0)     (H, W) int64, an index into kept
        in_own = (P >= 0.5).gather(0, winner[None])[0]     (H, W) bool: inside the winner's own mask
        own_area = (P >= 0.5).flatten(1).sum(1)            (n,) int64

    scores (n,), logits (Q, h, w) mask logits (probabilities: already sigmoid(logits)), kept (n,)
    int64 indices into Q, n >= 1; resize maps (1, h, w) to (1, H, W) (None: logits are full size).
    On the CPU one (H, W) plane at a time, resized there, in buffers that stay in cache: never the
    (n, H, W) resize, gather, product or mask (a plane resized alone equals its plane of the
    stacked resize), and in float ops only: comparisons into a bool tensor and masked_fill_ run at
    a third of the speed of float ops here. A comparison into a float tensor gives exact 0/1s,
    whose sum is an exact count. The leader is one float code, 2k + own (own: the pixel lies in
    query k's own mask); codes grow with k, so "query k's code where its value > best, else keep"
    is max(code, (value > best) * (2k + own)). Strict > keeps the first of tied queries, as argmax
    does. One caveat is torch's own: sigmoid runs the last elements of a tensor (its length mod 32
    here, AVX-512) on a scalar path that can round up to 2 ulps away from the vector path, so a
    plane's sigmoid and its slice of the stack's can differ there (as the stack's own differs with
    its length); a winner can move only where two products tie within those ulps."""
    if logits.device.type != "cpu":
        probs = logits.index_select(0, kept)  # (n, h, w)
        probs = probs if resize is None else resize(probs)  # (n, H, W)
        probs = probs if probabilities else probs.sigmoid_()
        own = probs >= 0.5
        winner = (scores[:, None, None] * probs).argmax(0)
        return winner, own.gather(0, winner[None])[0], own.flatten(1).sum(1)
    own_area = torch.empty(len(kept), dtype=torch.float64)
    sigmoid = None  # (H, W) buffer: the sigmoid of a full-size logit plane
    for k, q in enumerate(kept.tolist()):
        if resize is not None:
            prob = resize(logits[q : q + 1])[0]  # (H, W), a fresh plane: its sigmoid in place
            prob = prob if probabilities else prob.sigmoid_()
        elif probabilities:
            prob = logits[q]
        else:
            sigmoid = torch.empty_like(logits[q]) if sigmoid is None else sigmoid
            prob = torch.sigmoid(logits[q], out=sigmoid)
        if k == 0:  # buffers of the plane's size; query 0 leads everywhere
            value, flag, own = (torch.empty_like(prob) for _ in range(3))
            exact = torch.float32 if prob.numel() < 2**24 else torch.float64  # integers below 2^24 are exact in float32
            code = torch.ge(prob, 0.5, out=torch.empty_like(prob))  # (H, W): 2*0 + own
            own_area[0] = code.sum(dtype=exact)  # 0/1s: an exact count
            best = scores[0] * prob  # (H, W) the running maximum
            continue
        own_area[k] = torch.ge(prob, 0.5, out=own).sum(dtype=exact)
        torch.mul(scores[k], prob, out=value)
        torch.gt(value, best, out=flag)
        torch.maximum(code, flag.mul_(own.add_(2 * k)), out=code)
        torch.maximum(best, value, out=best)
    winner = code.mul(0.5).floor_()  # (H, W): k, exact in float
    in_own = code.sub_(winner).sub_(winner).bool()  # (H, W): the own bit
    return winner.long(), in_own, own_area.long()
