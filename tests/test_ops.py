"""ops.py: linear layers and 1x1 convs through oneDNN on the CPU equal F.linear / F.conv2d (values
and gradients), and the route is taken exactly where it should be."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ops
from flops import FlopCounter

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def grads(fn, *tensors, grad):
    for t in tensors:
        t.grad = None
    out = fn()
    out.backward(grad)
    return [out.detach()] + [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("shape, out_features, bias", [
    ((2, 400, 128), 192, True),  # out > in: weight_grad transposes x
    ((1200, 256), 32, True),     # out < in: weight_grad transposes the gradient
    ((1, 500, 96), 96, False),   # no bias
])
def test_linear_equals_f_linear_values_and_gradients(shape, out_features, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = torch.randn(out_features, shape[-1], generator=g, requires_grad=True)
    b = torch.randn(out_features, generator=g, requires_grad=True) if bias else None
    assert ops.uses_onednn(x, w)  # else this test would compare F.linear with itself
    grad = torch.randn(*shape[:-1], out_features, generator=g)
    params = [t for t in (x, w, b) if t is not None]
    ours = grads(lambda: ops.linear(x, w, b), *params, grad=grad)
    ref = grads(lambda: F.linear(x, w, b), *params, grad=grad)
    for name, a, r in zip(("out", "dx", "dw", "db"), ours, ref):
        assert a.shape == r.shape and rel(a, r) < 1e-5, name


def test_weight_grad_both_layouts():
    g = torch.Generator().manual_seed(1)
    for T, O, C in [(257, 16, 48), (257, 48, 16)]:
        grad, x = torch.randn(T, O, generator=g), torch.randn(T, C, generator=g)
        assert rel(ops.weight_grad(grad, x), grad.t() @ x) < 1e-5


def test_linear_of_a_non_contiguous_input():
    x = torch.randn(64, 2, 300).transpose(0, 2)  # (300, 2, 64), not contiguous
    w = torch.randn(128, 64)
    assert ops.uses_onednn(x, w) and rel(ops.linear(x, w), F.linear(x, w)) < 1e-5


def test_where_the_route_is_not_taken_it_is_f_linear_bit_for_bit():
    g = torch.Generator().manual_seed(2)
    big_x, big_w = torch.randn(400, 256, generator=g), torch.randn(256, 256, generator=g)
    small_x = torch.randn(8, 64, generator=g)
    small_w = torch.randn(64, 64, generator=g)
    assert not ops.uses_onednn(small_x, small_w)  # 8·64·64 < MIN_MACS
    assert torch.equal(ops.linear(small_x, small_w), F.linear(small_x, small_w))
    assert not ops.uses_onednn(big_x.double(), big_w.double())
    with ops.reference():
        assert not ops.uses_onednn(big_x, big_w)
        assert torch.equal(ops.linear(big_x, big_w), F.linear(big_x, big_w))
    assert ops.uses_onednn(big_x, big_w)  # the context restores the route
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ops.uses_onednn(big_x, big_w) and ops.linear(big_x, big_w).dtype == torch.bfloat16
    with torch.device("meta"):
        assert ops.linear(torch.empty(400, 256), torch.empty(256, 256)).shape == (400, 256)


def test_the_flop_counter_sees_f_linear_and_f_conv2d():
    x, lin = torch.randn(1, 400, 256), ops.Linear(256, 256)
    maps, conv = torch.randn(1, 256, 20, 20), ops.Conv1x1(256, 128)
    with FlopCounter() as counter:
        assert not ops.uses_onednn(x, lin.weight)
        lin(x), conv(maps)
    assert sum(counter.counts.values()) == 400 * 256 * 256 + 400 * 256 * 128


def test_conv1x1_equals_f_conv2d_and_returns_the_token_layout():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 64, 24, 40, generator=g, requires_grad=True)
    conv = ops.Conv1x1(64, 96)
    reference = nn.Conv2d(64, 96, kernel_size=1)
    reference.load_state_dict(conv.state_dict())  # the same names and shapes as nn.Conv2d's
    grad = torch.randn(2, 96, 24, 40, generator=g)
    ours = grads(lambda: conv(x), x, conv.weight, conv.bias, grad=grad)
    ref = grads(lambda: reference(x), x, reference.weight, reference.bias, grad=grad)
    for name, a, r in zip(("out", "dx", "dw", "db"), ours, ref):
        assert rel(a, r) < 1e-5, name
    assert ours[0].is_contiguous(memory_format=torch.channels_last)


def test_linear_module_keeps_nn_linear_parameters():
    torch.manual_seed(0)
    a = ops.Linear(32, 16)
    torch.manual_seed(0)
    b = nn.Linear(32, 16)
    assert isinstance(a, nn.Linear) and a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in b.state_dict())  # the same init


def test_an_encoder_on_the_route_equals_the_reference_path():
    from encoders import M2FEncoder

    torch.manual_seed(0)
    encoder = M2FEncoder({"res2": 32, "res3": 64, "res4": 96, "res5": 128}, dim=64, heads=4, ffn_dim=128,
                         layers=2).eval()
    g = torch.Generator().manual_seed(4)
    features = {name: torch.randn(1, c, 256 // s, 384 // s, generator=g)
                for (name, c), s in zip({"res2": 32, "res3": 64, "res4": 96, "res5": 128}.items(), (4, 8, 16, 32))}
    with torch.no_grad():
        mask, maps = encoder(features)
        with ops.reference():
            ref_mask, ref_maps = encoder(features)
    assert not torch.equal(mask, ref_mask)  # the route was taken somewhere
    assert mask.is_contiguous(memory_format=torch.channels_last)  # the mask branch runs channels-last
    for a, r in zip([mask, *maps], [ref_mask, *ref_maps]):
        assert rel(a, r) < 1e-5


FAULTS = """
import resource, sys, torch
import config
kept = config.keep_freed_memory()
x = torch.ones(16 << 20)  # 64 MB: over glibc's largest default mmap threshold (32 MB)
faults = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = x.clone()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del y
print(kept, sorted(faults[4:])[6])  # the median after a warm-up: glibc may place a few blocks afresh
"""


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_keep_freed_memory_stops_the_page_faults_of_large_tensors():
    import os
    import subprocess
    import sys

    from conftest import ROOT

    def run(**env):
        out = subprocess.run([sys.executable, "-c", FAULTS], cwd=ROOT, capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT), **env}).stdout.split()
        return out[0] == "True", int(out[1])

    kept, faults = run()
    assert kept and faults < 1000  # a fresh 64 MB block is 16384 pages; reused ones fault no more
    kept, _ = run(M2F_MALLOC="default")
    assert not kept


def test_every_command_keeps_freed_memory(monkeypatch):
    import config

    calls = []
    monkeypatch.setattr(config, "keep_freed_memory", lambda: calls.append(1))
    assert config.run_command(lambda: 7) == 7 and calls == [1]


def test_an_in_place_op_on_the_output_keeps_the_gradients():
    """The encoder layer's F.relu_ on linear1's output: the route's output must not be a view."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 500, 128, generator=g, requires_grad=True)
    layer = ops.Linear(128, 256)
    assert ops.uses_onednn(x, layer.weight)
    ours = grads(lambda: F.relu_(layer(x)), x, layer.weight, grad=torch.ones(2, 500, 256))
    ref = grads(lambda: F.relu(F.linear(x, layer.weight, layer.bias)), x, layer.weight, grad=torch.ones(2, 500, 256))
    for a, r in zip(ours, ref):
        assert rel(a, r) < 1e-5


def test_panoptic_winners_equal_the_stacked_contest_ties_included():
    """Catches: ties given to the later query (>= for >), the winner index counted from the wrong
    query (k against q of kept), own areas or in_own read from another query's plane, a threshold
    of > 0.5 for >= 0.5."""
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(9, 30, 40, generator=g) * 3
    logits[4] = logits[2]  # exact ties: the earlier query must win, as argmax's first maximum
    logits[6, :10] = logits[3, :10]
    logits[7, :, :5] = 0.0  # probability exactly 0.5: inside the own mask
    kept = torch.tensor([0, 2, 3, 4, 6, 7, 8])
    scores = torch.rand(7, generator=g)
    scores[3], scores[4] = scores[1], scores[2]  # queries 4 and 6 tie with 2 and 3
    for n in (7, 1):
        probs = torch.stack([logits[q].sigmoid() for q in kept[:n]])  # (n, H, W), one plane at a time
        own = probs >= 0.5
        expected = (scores[:n, None, None] * probs).argmax(0)
        winner, in_own, own_area = ops.panoptic_winners(scores[:n], logits, kept[:n])
        assert winner.dtype == torch.int64 and torch.equal(winner, expected)
        assert torch.equal(in_own, own.gather(0, expected[None])[0])
        assert own_area.dtype == torch.int64 and own_area.tolist() == own.flatten(1).sum(1).tolist()
    probs = logits.sigmoid()  # shared with the semantic step: given as probabilities, read as they are
    own = probs[kept] >= 0.5
    expected = (scores[:, None, None] * probs[kept]).argmax(0)
    winner, in_own, own_area = ops.panoptic_winners(scores, probs, kept, probabilities=True)
    assert torch.equal(winner, expected) and torch.equal(in_own, own.gather(0, expected[None])[0])
    assert own_area.tolist() == own.flatten(1).sum(1).tolist()
    winner = ops.panoptic_winners(scores, logits, kept)[0]
    assert not (winner == 3).any() and (winner == 1).any()  # every tie with query 2 went to 2
    # low-resolution logits resized one kept plane at a time: as the contest on the resized stack
    resize = lambda x: F.interpolate(x[None], size=(70, 90), mode="bilinear", align_corners=False)[0]  # noqa: E731
    probs = resize(logits)[kept].sigmoid()  # (7, 70, 90)
    own = probs >= 0.5
    expected = (scores[:, None, None] * probs).argmax(0)
    winner, in_own, own_area = ops.panoptic_winners(scores, logits, kept, resize=resize)
    assert torch.equal(winner, expected) and torch.equal(in_own, own.gather(0, expected[None])[0])
    assert own_area.tolist() == own.flatten(1).sum(1).tolist() and (winner == 6).any() and in_own.any()
    assert ops.panoptic_winners(scores, logits, kept)[2][5] >= 30 * 5  # the 0.5 pixels counted


def test_resnet_bottlenecks_run_their_1x1_convs_on_the_route():
    import torchvision

    from model import ResNet

    torch.manual_seed(0)
    net = ResNet("resnet50", norm="frozen_bn").eval()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    assert sum(isinstance(m, ops.Conv1x1) for m in convs) == 16 * 2 + 1  # conv1, conv3 of each; one downsample
    assert all(m.stride == (2, 2) or isinstance(m, ops.Conv1x1) for m in convs)  # the strided downsamples stay
    names = {k for k in torchvision.models.resnet50().state_dict() if not k.startswith("fc.")}
    assert set(net.state_dict()) - {k for k in net.state_dict() if k.endswith("num_batches_tracked")} <= names
    x = torch.randn(1, 3, 128, 160, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ours = net(x)
        with ops.reference():  # F.conv2d everywhere, NCHW input
            h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            ref = {}
            for name, layer in zip(("res2", "res3", "res4", "res5"), (net.layer1, net.layer2, net.layer3, net.layer4)):
                h = ref[name] = layer(h)
    for name in ref:
        assert ours[name].is_contiguous(memory_format=torch.channels_last)
        assert rel(ours[name], ref[name]) < 1e-5, name
