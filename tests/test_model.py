"""The Mask2Former stack: official architecture, checkpoint names, exits, config, and learning."""
from collections import Counter

import pytest
import torch

import config
import encoders
import model
from config import ConfigError, load_config
from conftest import ROOT


def official(official_keys, name):
    return official_keys(name)


@pytest.mark.parametrize("name, cfg_path", [
    ("m2f_r50_coco_panoptic", "configs/coco/m2f_r50.yaml"),
    ("m2f_swin_t_coco_panoptic", "configs/coco/m2f_swin_t.yaml"),
    ("m2f_r50_cityscapes_panoptic", "configs/cityscapes/m2f_r50.yaml"),
    *[(f"proscale_r50_{d}_coco", f"configs/coco/proscale_{d}_r50.yaml") for d in ("111", "222", "333")],
    *[(f"proscale_swin_t_{d}_coco", f"configs/coco/proscale_{d}_swin_t.yaml") for d in ("111", "113", "222", "333")],
])
def test_parameter_shapes_equal_official(official_keys, name, cfg_path):
    """The multiset of parameter shapes equals the official model's, and every official
    state-dict entry maps by name to one of ours with the same shape (PRO-SCALE included: its
    flat layer list of 1-, 2- and 3-level layers, TRC's φ, and LPE's GroupNorm)."""
    shapes, kinds = official(official_keys, name)
    with torch.device("meta"):  # shapes only
        net = model.build_model(load_config(config_path(cfg_path)))
    ours = Counter(tuple(p.shape) for p in net.parameters())
    theirs = Counter(tuple(s) for k, s in shapes.items() if kinds[k] == "parameter")
    assert ours == theirs

    state = net.state_dict()
    mapped = {}
    for key, shape in shapes.items():
        new = config.official_to_ours(key)
        if key.endswith(("relative_position_index", "num_batches_tracked")):
            continue  # buffers we rebuild ourselves
        assert new in state, f"{key} -> {new} is not one of our keys"
        assert tuple(state[new].shape) == tuple(shape), key
        mapped[new] = key
    unmapped = [k for k in state if k not in mapped and not k.endswith(("relative_position_index", "num_batches_tracked"))]
    assert unmapped == []


def config_path(relative):
    return str(ROOT / relative)


def test_convert_official_state_dict_roundtrip():
    """A state dict renamed to official names converts back to ours exactly."""
    net = model.build_model(load_config(config_path("configs/demo/m2f_tiny.yaml")))
    official_names = {
        "sem_seg_head.predictor.transformer_cross_attention_layers.1.multihead_attn.in_proj_weight":
            "decoder.cross_attn.1.attn.in_proj_weight",
        "sem_seg_head.pixel_decoder.adapter_1.norm.weight": "encoder.mask_branch.lateral.1.weight",
        "backbone.res3.0.shortcut.norm.running_var": "backbone.layer2.0.downsample.1.running_var",
        "backbone.res2.1.conv2.weight": "backbone.layer1.1.conv2.weight",
    }
    state = net.state_dict()
    fake = {k: state[v].clone() + 1 for k, v in official_names.items()}
    converted, unused = config.convert_official_state_dict(fake, net)
    assert unused == []
    for k, v in official_names.items():
        assert torch.equal(converted[v], state[v] + 1)


# ---- exits ------------------------------------------------------------------------------


def tiny_encoder(layers=3):
    torch.manual_seed(0)
    channels = {"res2": 16, "res3": 32, "res4": 48, "res5": 64}
    return encoders.M2FEncoder(channels, dim=32, heads=4, points=2, ffn_dim=64, layers=layers).eval(), channels


def features(channels, batch=3, size=(64, 96)):
    g = torch.Generator().manual_seed(1)
    H, W = size
    return {f"res{i + 2}": torch.randn(batch, c, H // 2 ** (i + 2), W // 2 ** (i + 2), generator=g)
            for i, c in enumerate(channels.values())}


@torch.no_grad()
def test_exit_k_equals_first_k_layers():
    enc, channels = tiny_encoder(layers=3)
    feats = features(channels)
    for k in (1, 2, 3):
        short = encoders.M2FEncoder(channels, dim=32, heads=4, points=2, ffn_dim=64, layers=k).eval()
        state = {n: p for n, p in enc.state_dict().items() if not n.startswith("layers.") or int(n.split(".")[1]) < k}
        short.load_state_dict(state)
        a_mask, a_maps = enc(feats, exit=k)
        b_mask, b_maps = short(feats)
        torch.testing.assert_close(a_mask, b_mask, rtol=0, atol=0)
        for a, b in zip(a_maps, b_maps):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # exit = number of layers is the full encoder
    torch.testing.assert_close(enc(feats, exit=3)[0], enc(feats)[0], rtol=0, atol=0)


@torch.no_grad()
def test_per_image_exits_equal_one_by_one():
    enc, channels = tiny_encoder(layers=3)
    feats = features(channels, batch=3)
    exits = torch.tensor([2, 1, 3])
    mask, maps = enc(feats, exit=exits)
    for b in range(3):
        one = {k: v[b : b + 1] for k, v in feats.items()}
        m1, maps1 = enc(one, exit=int(exits[b]))
        torch.testing.assert_close(mask[b : b + 1], m1, rtol=1e-5, atol=1e-5)
        for a, c in zip(maps, maps1):
            torch.testing.assert_close(a[b : b + 1], c, rtol=1e-5, atol=1e-5)
    # the exits really differ: image 1 stopped earlier than image 2 would have
    assert not torch.allclose(enc({k: v[1:2] for k, v in feats.items()}, exit=3)[0], mask[1:2])


def test_bad_exit_is_an_error():
    enc, channels = tiny_encoder(layers=3)
    with pytest.raises(ValueError, match="exit must be in 1..3"):
        enc(features(channels), exit=4)


# ---- configuration ------------------------------------------------------------------------


def test_config_inheritance_and_overrides(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model:\n  num_classes: 7\n  thing_classes: [0, 1]\n  encoder: {layers: 2, dim: 64}\n")
    child = tmp_path / "sub" / "child.yaml"
    child.parent.mkdir()
    child.write_text("_base_: ../base.yaml\nmodel:\n  encoder: {layers: 4}\n")
    cfg = load_config(child, ["model.decoder.queries=5", "model.loss.mask_weight=1e-4"])
    assert cfg.model.num_classes == 7
    assert (cfg.model.encoder.layers, cfg.model.encoder.dim) == (4, 64)  # merged, not replaced
    assert cfg.model.decoder.queries == 5
    assert cfg.model.loss.mask_weight == 1e-4  # "1e-4" is a string to YAML; the float field takes it
    again = config.config_from_dict(config.config_to_dict(cfg))
    assert again == cfg
    # a partial override of a nested section keeps the section's other defaults
    cfg = load_config(child, ["data.val.images=elsewhere"])
    assert cfg.data.val.images == "elsewhere"
    assert cfg.data.val.json == config.DataConfig().val.json != ""


@pytest.mark.parametrize("text, override, message", [
    ("model:\n  encoder: {layerz: 2}\n", None, "unknown key 'model.encoder.layerz'"),
    ("model:\n  num_classes: many\n", None, "'model.num_classes' must be int"),
    ("model:\n  loss: {deep_supervision: 3}\n", None, "'model.loss.deep_supervision' must be bool"),
    ("model: {}\n", "model.decoder.heads=2.5", "'model.decoder.heads' must be int"),
    ("model: {}\n", "model.nope=1", "unknown key 'model.nope'"),
    ("model: [1, 2]\n", None, "'model' must be a mapping"),
])
def test_config_errors_name_the_key_and_file(tmp_path, text, override, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, [override] if override else [])
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_config_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("model: {num_classes: [1,\n")
    with pytest.raises(ConfigError, match="broken.yaml: invalid YAML"):
        load_config(bad)


def test_unknown_names_list_the_valid_ones():
    cfg = load_config(config_path("configs/demo/m2f_tiny.yaml"), ["model.backbone.name=resnet7"])
    with pytest.raises(ValueError, match="valid: resnet18"):
        model.build_model(cfg)
    cfg = load_config(config_path("configs/demo/m2f_tiny.yaml"), ["model.encoder.name=fast"])
    with pytest.raises(ValueError, match="valid: m2f"):
        model.build_model(cfg)


# ---- the whole stack learns ----------------------------------------------------------------


def toy_scene(seed, size=64):
    """An image with a coloured square (thing class 1) on a two-tone background (stuff 5 and 6)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.zeros(3, size, size)
    masks, labels = [], []
    top = torch.zeros(size, size, dtype=torch.bool)
    top[: size // 2] = True
    for mask, label, colour in ((top, 5, (40, 160, 40)), (~top, 6, (40, 40, 160))):
        masks.append(mask.clone())
        labels.append(label)
        image[:, mask] = torch.tensor(colour, dtype=torch.float)[:, None]
    y, x = torch.randint(4, size - 28, (2,), generator=g).tolist()
    box = torch.zeros(size, size, dtype=torch.bool)
    box[y : y + 24, x : x + 24] = True
    for m in masks:
        m &= ~box
    masks.append(box)
    labels.append(1)
    image[:, box] = torch.tensor([220.0, 60, 60])[:, None]
    return image, {"labels": torch.tensor(labels), "masks": torch.stack(masks)}


def test_tiny_model_overfits_two_images():
    """A real signal that the stack learns: the total loss on two images falls by a large factor."""
    torch.manual_seed(0)
    cfg = load_config(config_path("configs/demo/m2f_tiny.yaml"), ["model.loss.num_points=1024"])
    net = model.build_model(cfg)
    images, targets = zip(*(toy_scene(s) for s in (0, 1)))
    batch, _ = net.preprocess(list(images))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(60):
        loss = sum(net(batch, list(targets)).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 4, losses[::10]
