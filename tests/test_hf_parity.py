"""Parity of our encoder + masked-attention decoder with Hugging Face's Mask2Former.

A randomly initialised `transformers` Mask2Former (structurally the official R50 head: width 256,
8 heads, 4 deformable points on 3 levels, FFN 1024 in the encoder and 2048 in the decoder,
official DEC_LAYERS = 10, i.e. 9 rounds plus the prediction from the initial queries) gets its
weights perturbed, copied into `encoders.M2FEncoder` + `model.MaskedAttentionDecoder` through the
explicit name mapping below, and both run on the same random backbone features of a non-square
64x96 image (res2..res5 maps of 16x24, 8x12, 4x6, 2x3). Compared, in float32 to 1e-4 absolute:

    * the 1/4 mask features,
    * each of the three multi-scale encoder outputs (1/32, 1/16, 1/8),
    * the class logits and mask logits of every decoder prediction (initial + each round).

(Observed on CPU: max |ours - HF| about 7e-7 for the mask features, 2e-6 for the encoder outputs,
1e-6 for the class logits and 6e-6 for the mask logits, i.e. float32 rounding.)

The backbone is not part of the comparison: HF's pixel decoder and transformer module are fed
directly (its model needs some backbone config to be built; a tiny Swin is built and never run).

HF vs the official facebookresearch/Mask2Former code, as far as this test is concerned (checked
against mask2former/modeling/{pixel_decoder/msdeformattn.py, transformer_decoder/*.py}):

    * HF's `decoder_layers` counts like the official DEC_LAYERS: it builds `decoder_layers - 1`
      layers and makes `decoder_layers` predictions. Ours counts rounds, so ours = HF - 1.
    * Sine position embedding: both normalise y/(H + eps)·2π with positions 1..H, no -0.5 offset
      (that offset is Deformable DETR's, not Mask2Former's); HF computes it with `arange` where the
      official code uses `cumsum` of an all-valid mask, which is the same. No patching needed.
    * Decoder self-attention: HF uses separate q/k/v linears (DETR style), the official code an
      `nn.MultiheadAttention` with packed in-projection; the same function, so the mapping just
      concatenates [q; k; v] into our packed `in_proj_weight` / `in_proj_bias`.
    * Masked attention: HF blocks where sigmoid(mask) < 0.5 and lets a query whose mask is empty
      at that level attend everywhere, as the official code does (HF multiplies by a "not all
      blocked" factor instead of in-place indexing; same result).
    * Level order: HF's input projections, level embeddings and outputs go res5, res4, res3
      (lowest resolution first), like the official code and ours.
    * HF sets `layerdrop = config.dropout` in the decoder (a quirk; training only). With dropout 0
      and eval mode it never triggers.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig  # noqa: E402

import encoders  # noqa: E402
import model  # noqa: E402

ATOL = 1e-4
DIM = 256  # feature_size = hidden_dim = mask_feature_size (the official conv_dim / hidden_dim / mask_dim)
HEADS = 8
ENC_LAYERS = 3
ENC_FFN = 1024
DEC_ROUNDS = 9  # ours; HF decoder_layers = DEC_ROUNDS + 1 (the official DEC_LAYERS = 10)
DEC_FFN = 2048
QUERIES = 16
NUM_LABELS = 7
CHANNELS = {"res2": 32, "res3": 64, "res4": 128, "res5": 256}
IMAGE = (64, 96)  # non-square: strides 4..32 give 16x24, 8x12, 4x6, 2x3
BATCH = 2


# ----------------------------------------------------------------------------------------------
# the Hugging Face model


def build_hf():
    """A randomly initialised HF Mask2Former, eval mode, dropout 0, with perturbed weights."""
    # The backbone is only needed to build the model (it fixes the pixel decoder's input channels);
    # it is never run. Swin stage widths are embed_dim * 2^i = 32, 64, 128, 256 = CHANNELS.
    backbone = SwinConfig(embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(
        backbone_config=backbone, feature_size=DIM, mask_feature_size=DIM, hidden_dim=DIM,
        num_attention_heads=HEADS, encoder_layers=ENC_LAYERS, encoder_feedforward_dim=ENC_FFN,
        decoder_layers=DEC_ROUNDS + 1, dim_feedforward=DEC_FFN, num_queries=QUERIES, num_labels=NUM_LABELS,
        dropout=0.0, pre_norm=False, enforce_input_projection=False, common_stride=4,
        feature_strides=[4, 8, 16, 32],
    )
    hf = Mask2FormerForUniversalSegmentation(cfg).eval()
    assert hf.model.pixel_level_module.encoder.channels == list(CHANNELS.values())
    assert len(hf.model.transformer_module.decoder.layers) == DEC_ROUNDS

    # Perturb every parameter so that nothing is zero, one or uniform by construction: the official
    # init zeroes the deformable attention's offset and weight matrices (sampling around a fixed
    # star with uniform attention), every bias, and sets the norms to identity. Noise of 0.03 on
    # the offset matrix moves sampling points by about a pixel and lets some fall off the map;
    # on the attention-weight matrix it makes the softmax over levels x points clearly non-uniform.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module_name, module in hf.named_modules():
            if module_name.startswith("model.pixel_level_module.encoder"):
                continue  # backbone: never run
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g)
                if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) and name == "weight":
                    p.copy_(1 + 0.2 * noise)  # norm scales
                elif p.dim() == 1:
                    p.add_(0.1 * noise)  # biases and norm shifts
                else:
                    p.add_(0.03 * noise)  # matrices, convs, embeddings
    return hf


@torch.no_grad()
def run_hf(hf, features):
    """HF pixel decoder + transformer module + class head on backbone features (no backbone).

    Returns mask features, the three multi-scale maps, and per prediction (initial + each round)
    the class logits (B, Q, K+1) and mask logits (B, Q, H/4, W/4), mirroring
    `Mask2FormerForUniversalSegmentation.forward`.
    """
    pixel = hf.model.pixel_level_module.decoder([features[k] for k in ("res2", "res3", "res4", "res5")])
    decoder = hf.model.transformer_module(
        multi_scale_features=pixel.multi_scale_features, mask_features=pixel.mask_features,
        output_hidden_states=True,
    )
    logits = [hf.class_predictor(h.transpose(0, 1)) for h in decoder.intermediate_hidden_states]
    return pixel.mask_features, list(pixel.multi_scale_features), logits, list(decoder.masks_queries_logits)


# ----------------------------------------------------------------------------------------------
# the HF -> ours weight mapping


def hf_to_ours(hf):
    """Our encoder's and decoder's state dicts from the HF model's parameters.

    Every HF parameter outside the backbone must be used exactly once, every one of ours set.
    """
    src = {n: p.detach().clone() for n, p in hf.named_parameters() if not n.startswith("model.pixel_level_module.encoder.")}
    used = set()

    def take(name):
        used.add(name)
        return src[name]

    # -- pixel decoder -> encoders.M2FEncoder ------------------------------------------------
    pd = "model.pixel_level_module.decoder."
    enc = {}
    for level in range(3):  # both: res5, res4, res3 (lowest resolution first)
        for part in ("0.weight", "0.bias", "1.weight", "1.bias"):  # 1x1 conv with bias, GroupNorm
            enc[f"input_proj.proj.{level}.{part}"] = take(f"{pd}input_projections.{level}.{part}")
    enc["input_proj.level_embed"] = take(f"{pd}level_embed")
    layer_names = {  # HF -> ours, inside one deformable encoder layer
        "self_attn.sampling_offsets": "self_attn.sampling_offsets",
        "self_attn.attention_weights": "self_attn.attention_weights",
        "self_attn.value_proj": "self_attn.value_proj",
        "self_attn.output_proj": "self_attn.output_proj",
        "self_attn_layer_norm": "norm1",
        "fc1": "linear1",
        "fc2": "linear2",
        "final_layer_norm": "norm2",
    }
    for i in range(ENC_LAYERS):
        for theirs, ours in layer_names.items():
            for t in ("weight", "bias"):
                enc[f"layers.{i}.{ours}.{t}"] = take(f"{pd}encoder.layers.{i}.{theirs}.{t}")
    # The 1/4 branch: HF's adapter_1 / layer_1 are the official lateral / output convs for res2.
    enc["mask_branch.lateral.0.weight"] = take(f"{pd}adapter_1.0.weight")  # 1x1 conv, no bias
    enc["mask_branch.lateral.1.weight"] = take(f"{pd}adapter_1.1.weight")  # GroupNorm
    enc["mask_branch.lateral.1.bias"] = take(f"{pd}adapter_1.1.bias")
    enc["mask_branch.output.0.weight"] = take(f"{pd}layer_1.0.weight")  # 3x3 conv, no bias
    enc["mask_branch.output.1.weight"] = take(f"{pd}layer_1.1.weight")  # GroupNorm
    enc["mask_branch.output.1.bias"] = take(f"{pd}layer_1.1.bias")
    enc["mask_branch.mask_features.weight"] = take(f"{pd}mask_projection.weight")
    enc["mask_branch.mask_features.bias"] = take(f"{pd}mask_projection.bias")

    # -- transformer module -> model.MaskedAttentionDecoder ----------------------------------
    tm = "model.transformer_module."
    dec = {
        "query_feat.weight": take(f"{tm}queries_features.weight"),  # the queries' content
        "query_embed.weight": take(f"{tm}queries_embedder.weight"),  # the queries' positional part
        "level_embed.weight": take(f"{tm}level_embed.weight"),
        "decoder_norm.weight": take(f"{tm}decoder.layernorm.weight"),
        "decoder_norm.bias": take(f"{tm}decoder.layernorm.bias"),
        "class_embed.weight": take("class_predictor.weight"),
        "class_embed.bias": take("class_predictor.bias"),
    }
    for j in range(3):
        for t in ("weight", "bias"):
            dec[f"mask_embed.layers.{j}.{t}"] = take(f"{tm}decoder.mask_predictor.mask_embedder.{j}.0.{t}")
    for i in range(DEC_ROUNDS):
        hl = f"{tm}decoder.layers.{i}."
        # masked cross-attention: an nn.MultiheadAttention on both sides (packed q, k, v)
        dec[f"cross_attn.{i}.attn.in_proj_weight"] = take(f"{hl}cross_attn.in_proj_weight")
        dec[f"cross_attn.{i}.attn.in_proj_bias"] = take(f"{hl}cross_attn.in_proj_bias")
        # self-attention: HF's separate q/k/v linears -> our packed [q; k; v]
        dec[f"self_attn.{i}.attn.in_proj_weight"] = torch.cat(
            [take(f"{hl}self_attn.{x}_proj.weight") for x in "qkv"])
        dec[f"self_attn.{i}.attn.in_proj_bias"] = torch.cat(
            [take(f"{hl}self_attn.{x}_proj.bias") for x in "qkv"])
        for t in ("weight", "bias"):
            dec[f"cross_attn.{i}.attn.out_proj.{t}"] = take(f"{hl}cross_attn.out_proj.{t}")
            dec[f"cross_attn.{i}.norm.{t}"] = take(f"{hl}cross_attn_layer_norm.{t}")
            dec[f"self_attn.{i}.attn.out_proj.{t}"] = take(f"{hl}self_attn.out_proj.{t}")
            dec[f"self_attn.{i}.norm.{t}"] = take(f"{hl}self_attn_layer_norm.{t}")
            dec[f"ffn.{i}.linear1.{t}"] = take(f"{hl}fc1.{t}")
            dec[f"ffn.{i}.linear2.{t}"] = take(f"{hl}fc2.{t}")
            dec[f"ffn.{i}.norm.{t}"] = take(f"{hl}final_layer_norm.{t}")

    unused = sorted(set(src) - used)
    assert not unused, f"HF parameters not mapped: {unused}"
    return enc, dec


# ----------------------------------------------------------------------------------------------
# both models on the same features, once per module


@pytest.fixture(scope="module")
def outputs():
    # HF's own init draws from the global RNG; seed 3 gives partially blocked masks in every round,
    # some queries whose mask is empty at their level, and no logit near the threshold (see below).
    torch.manual_seed(3)
    hf = build_hf()
    enc_state, dec_state = hf_to_ours(hf)

    encoder = encoders.M2FEncoder(CHANNELS, dim=DIM, heads=HEADS, points=4, ffn_dim=ENC_FFN, layers=ENC_LAYERS,
                                  dropout=0.0, mask_branch="conv").eval()
    decoder = model.MaskedAttentionDecoder(num_classes=NUM_LABELS, in_dim=DIM, dim=DIM, queries=QUERIES, layers=DEC_ROUNDS,
                                           heads=HEADS, ffn_dim=DEC_FFN, mask_dim=DIM, dropout=0.0).eval()
    encoder.load_state_dict(enc_state, strict=True)  # strict: every one of our tensors comes from HF
    decoder.load_state_dict(dec_state, strict=True)

    g = torch.Generator().manual_seed(2)
    H, W = IMAGE
    features = {
        name: torch.randn(BATCH, c, H // s, W // s, generator=g)
        for (name, c), s in zip(CHANNELS.items(), (4, 8, 16, 32))
    }

    hf_mask, hf_multi, hf_logits, hf_masks = run_hf(hf, features)
    with torch.no_grad():
        mask_features, multi_scale = encoder(features)
        out = decoder(multi_scale, mask_features)
    predictions = [*out["aux_outputs"], {"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"]}]
    return {
        "hf": (hf_mask, hf_multi, hf_logits, hf_masks),
        "ours": (mask_features, multi_scale, [p["pred_logits"] for p in predictions],
                 [p["pred_masks"] for p in predictions]),
    }


def assert_close(ours, theirs, what):
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)} vs HF {tuple(theirs.shape)}"
    diff = (ours - theirs).abs().max().item()
    assert diff <= ATOL, f"{what}: max |ours - HF| = {diff:.3g} > {ATOL} (HF max |x| = {theirs.abs().max():.3g})"


def attention_masks(masks, shapes):
    """The blocked-positions masks the rounds use, from the HF mask logits: for round i the
    prediction before it, resized to level i mod 3, sigmoid < 0.5. Returns [(blocked, logits)]."""
    out = []
    for i in range(DEC_ROUNDS):
        small = F.interpolate(masks[i], size=shapes[i % 3], mode="bilinear", align_corners=False).flatten(2)
        out.append((small < 0, small))
    return out


# ----------------------------------------------------------------------------------------------
# the comparisons


def test_setup_is_not_trivial(outputs):
    """The random setup exercises what it should.

    * Every round's masked attention is partially blocked for some queries (so the masks matter)
      and somewhere a query's mask is empty at its level (the "attend everywhere" fallback).
    * No resized mask logit lies within ATOL of the threshold (logit 0), so any difference that
      passes the comparisons below cannot flip a mask between the two models; a failure here
      means the seed is unlucky, not that the code is wrong.
    """
    mask_features, multi_scale, logits, masks = outputs["hf"]
    assert len(logits) == len(masks) == DEC_ROUNDS + 1
    assert [tuple(m.shape[-2:]) for m in multi_scale] == [(2, 3), (4, 6), (8, 12)]
    assert mask_features.shape == (BATCH, DIM, 16, 24)
    shapes = [tuple(m.shape[-2:]) for m in multi_scale]
    empty = 0
    for i, (blocked, small) in enumerate(attention_masks(masks, shapes)):
        frac = blocked.float().mean(-1)  # (B, Q) blocked fraction per query
        assert ((frac > 0) & (frac < 1)).any(), f"round {i}: no partially blocked mask"
        empty += (frac == 1).sum().item()
        margin = small.abs().min().item()
        assert margin > ATOL, f"round {i}: a mask logit within {margin:.2g} of the threshold; change the seed"
    assert empty > 0, "no query with an empty mask: the fallback to unmasked attention is not exercised"
    # The rounds change the predictions (the decoder is doing something).
    assert (logits[-1] - logits[0]).abs().max() > 0.1
    assert (masks[-1] - masks[0]).abs().max() > 0.1


def test_mask_features(outputs):
    assert_close(outputs["ours"][0], outputs["hf"][0], "mask features (1/4)")


@pytest.mark.parametrize("level,name", [(0, "1/32"), (1, "1/16"), (2, "1/8")])
def test_multi_scale_features(outputs, level, name):
    assert_close(outputs["ours"][1][level], outputs["hf"][1][level], f"encoder output {name}")


@pytest.mark.parametrize("index", range(DEC_ROUNDS + 1))
def test_decoder_predictions(outputs, index):
    """Prediction `index`: 0 from the initial queries, k after round k."""
    _, _, logits, masks = outputs["ours"]
    _, _, hf_logits, hf_masks = outputs["hf"]
    assert len(logits) == len(hf_logits) == DEC_ROUNDS + 1
    assert_close(logits[index], hf_logits[index], f"class logits of prediction {index}")
    assert_close(masks[index], hf_masks[index], f"mask logits of prediction {index}")
