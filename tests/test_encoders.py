"""The encoder contract (encoders.py's docstring), checked for every encoder that build_encoder
can build: a new encoder added to encoders.ENCODERS gets these checks without writing any."""
import pytest
import torch

import encoders
from config import load_config
from conftest import TINY
from flops import model_flops
from model import build_model

# The tiny demo model with each encoder; an encoder needs an entry here only when its defaults
# are too large for a CPU test.
SETTINGS = {"proscale": ["model.encoder.depths=[1,1,1]", "model.encoder.mask_branch=lpe_max"],
            "rt": ["model.encoder.mask_branch=none"]}  # the papers' reading: mask features at 1/8


def tiny_model(name, *extra):
    torch.manual_seed(0)
    cfg = load_config(TINY, [f"model.encoder.name={name}", "model.loss.num_points=64", *SETTINGS.get(name, []),
                             *extra])
    return build_model(cfg)


def features(model, batch=3, size=(64, 96)):
    torch.manual_seed(1)
    images = torch.randn(batch, 3, *size)
    with torch.no_grad():
        return model.backbone_features(images)


@pytest.fixture(params=encoders.ENCODERS)
def name(request):
    return request.param


def test_every_known_name_builds_its_encoder(name):
    assert tiny_model(name).encoder.name == name


@torch.no_grad()
def test_forward_returns_the_documented_shapes(name):
    model = tiny_model(name).eval()
    encoder = model.encoder
    assert isinstance(encoder, encoders.Encoder)  # the Protocol's attributes and methods are there
    B, (H, W) = 3, (64, 96)
    mask_features, multi_scale = encoder(features(model, B, (H, W)))
    s = encoder.mask_stride
    assert mask_features.shape == (B, encoder.dim, H // s, W // s)
    assert [m.shape for m in multi_scale] == [(B, encoder.dim, H // 32, W // 32), (B, encoder.dim, H // 16, W // 16),
                                              (B, encoder.dim, H // 8, W // 8)]
    assert encoder.gate_map(features(model, B, (H, W))).shape == (B, encoder.dim, H // 32, W // 32)


@torch.no_grad()
def test_exits_equal_one_by_one_runs(name):
    """With exits: a batch with per-image exits equals each image alone at its exit, and
    forward_exits' single pass equals forward(exit=k). Without: every exit is refused."""
    model = tiny_model(name).eval()
    encoder, feats = model.encoder, features(model)
    if encoder.num_exits == 0:
        with pytest.raises(ValueError, match="has no exits"):
            encoder(feats, exit=1)
        return
    n = encoder.num_exits
    exits = torch.tensor([n, 1, max(1, n - 1)])
    mask, maps = encoder(feats, exit=exits)
    for b, k in enumerate(exits.tolist()):
        alone_mask, alone_maps = encoder({key: v[b: b + 1] for key, v in feats.items()}, exit=k)
        torch.testing.assert_close(mask[b: b + 1], alone_mask, rtol=0, atol=1e-5)
        for got, want in zip(maps, alone_maps):
            torch.testing.assert_close(got[b: b + 1], want, rtol=0, atol=1e-5)
    one_pass = encoder.forward_exits(feats, list(range(1, n + 1)))
    for k in range(1, n + 1):
        torch.testing.assert_close(one_pass[k][0], encoder(feats, exit=k)[0], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=f"must be in 1..{n}"):
        encoder(feats, exit=n + 1)


def test_a_few_training_steps_lower_the_loss(name, synthetic):
    """Every encoder trains: Adam on one fixed batch of the synthetic set lowers the loss."""
    import data
    import train

    settings = [f"data.root={synthetic}", "data.crop_size=[64,64]"]
    model = tiny_model(name, *settings).train()
    dataset = data.build_dataset(load_config(TINY, settings).data, split="train", train=True)
    samples = [dataset[(i, 0)] for i in range(2)]
    images, _ = model.preprocess([s["image"] for s in samples])
    targets = train.make_targets(samples, images.shape[-2:], "cpu")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        torch.manual_seed(0)  # the same matcher and loss points every step: only the weights change
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert model.cfg.encoder.name == name
    assert losses[-1] < 0.9 * losses[0], losses


def test_gflops_are_counted_from_shapes(name):
    with torch.device("meta"):
        model = tiny_model(name)
    gflops = model_flops(model, 64, 96)
    assert gflops["encoder"] > 0 and gflops["total"] > gflops["encoder"] + gflops["backbone"]
    if model.encoder.num_exits > 1:  # an earlier exit costs less
        assert model_flops(model, 64, 96, exit=1)["encoder"] < gflops["encoder"]
