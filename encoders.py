"""Transformer encoders ("pixel decoders") of Mask2Former and its efficient variants.

The encoder contract, which every encoder of `build_encoder` keeps and tests/test_encoders.py checks
for each of them (so that a new encoder gets the checks for free):

    forward(features, exit=None) -> (mask_features, multi_scale)
        features       {"res2": (B, C2, H/4, W/4), "res3": 1/8, "res4": 1/16, "res5": 1/32} from the
                       backbone, float32
        exit           None (every layer), an int k (stop after layer k) or a LongTensor (B,) of
                       per-image exits, checked by `check_exit`; only when num_exits > 0
        mask_features  (B, dim, H/s, W/s), s = mask_stride: the per-pixel embeddings the queries dot with
        multi_scale    [1/32, 1/16, 1/8] maps (B, dim, h, w), lowest resolution first, for the decoder
    dim                channels of everything it returns
    mask_stride        s above: 4, or 8 without a res2 branch (ablation C1)
    num_exits          how many layers can end the encoder (ECO-M2F); 0 = its layers cannot stop early
    gate_map(features) the projected 1/32 map (B, dim, h, w) before any layer: the gate's input
                       (ECO-M2F Eq. 6, pooled by Mask2Former.gate_features)
    forward_exits(features, exits)
                       {k: forward(features, exit=k)} for every k of `exits`, from one pass through
                       the layers; only when num_exits > 0

Whether a model has exits is asked of its encoder (`num_exits`), never of its name. The pieces the
encoders share come first in this file: the sine position embedding, the post-norm deformable
layer, the input projections with level embeddings, the 1/4-resolution mask branch, the exit check.
"""
import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from msda import MSDeformAttn

LEVELS = ("res5", "res4", "res3")  # encoder levels, lowest resolution first (official order)


@runtime_checkable
class Encoder(Protocol):
    """The contract of the module docstring, as a type (isinstance checks the names are there)."""

    name: str  # model.encoder.name, for messages
    dim: int
    mask_stride: int
    num_exits: int

    def forward(self, features: dict, exit=None) -> tuple: ...

    def gate_map(self, features: dict) -> torch.Tensor: ...


def sine_position_embedding(height, width, num_feats=128, temperature=10000, device=None):
    """DETR's normalised 2-D sine embedding of a (height, width) grid without padding.

    Returns (2·num_feats, height, width): the first num_feats channels encode y, the rest x,
    each as interleaved sin/cos of position·2π/extent at geometric frequencies.
    """
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device) / (height + eps) * scale  # (H,)
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device) / (width + eps) * scale  # (W,)
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)  # (F,)
    pos_y = y[:, None] / dim_t  # (H, F)
    pos_x = x[:, None] / dim_t  # (W, F)
    pos_y = torch.stack([pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()], dim=2).flatten(1)  # (H, F), sin/cos interleaved
    pos_x = torch.stack([pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()], dim=2).flatten(1)  # (W, F)
    return torch.cat([
        pos_y[:, None, :].expand(height, width, num_feats),
        pos_x[None, :, :].expand(height, width, num_feats),
    ], dim=2).permute(2, 0, 1)  # (2F, H, W)


def reference_points(spatial_shapes, device=None):
    """Pixel centres of every level, normalised to [0, 1]: (1, S, 2) as (x, y).

    Without a padding mask every level covers the same image area, so one normalised point
    serves as the reference on every level.
    """
    points = []
    for h, w in spatial_shapes:
        y, x = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device) / h,
            torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device) / w,
            indexing="ij",
        )
        points.append(torch.stack([x.flatten(), y.flatten()], -1))  # (h*w, 2)
    return torch.cat(points)[None]  # (1, S, 2)


def flatten_maps(maps):
    """[(B, C, h_l, w_l)] -> tokens (B, S, C) and the list of (h_l, w_l) ints."""
    shapes = [tuple(m.shape[-2:]) for m in maps]
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1), shapes


def unflatten_tokens(tokens, shapes):
    """Tokens (B, S, C) -> [(B, C, h_l, w_l)], the inverse of `flatten_maps`."""
    B, _, C = tokens.shape
    chunks = tokens.split([h * w for h, w in shapes], dim=1)
    return [t.transpose(1, 2).reshape(B, C, h, w) for t, (h, w) in zip(chunks, shapes)]


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention, then a ReLU feed-forward network.

    Parameter names follow the official layer so checkpoints map one to one.
    """

    def __init__(self, *, dim=256, levels=3, heads=8, points=4, ffn_dim=1024, dropout=0.0):
        super().__init__()
        self.self_attn = MSDeformAttn(dim=dim, levels=levels, heads=heads, points=points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src, pos, ref, spatial_shapes, value=None):
        """src (B, Lq, C) queries; pos (1 or B, Lq, C); ref (1 or B, Lq, 2) in [0, 1];
        value (B, S, C) over `spatial_shapes` (default: the queries themselves). Returns (B, Lq, C)."""
        value = src if value is None else value
        # The same normalised reference on every level: (·, Lq, 2) -> (B, Lq, L, 2).
        ref = ref[:, :, None].expand(src.shape[0], -1, len(spatial_shapes), -1)
        src = self.norm1(src + self.dropout1(self.self_attn(src + pos, ref, value, spatial_shapes)))
        return self.norm2(src + self.dropout3(self.linear2(self.dropout2(F.relu(self.linear1(src))))))


class InputProjection(nn.Module):
    """Per level a 1x1 conv (with bias) and GroupNorm(32) to the encoder width, plus a learned
    level embedding that tells the attention which scale a token comes from."""

    def __init__(self, in_channels, *, dim=256):
        super().__init__()
        self.proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, dim, kernel_size=1), nn.GroupNorm(32, dim)) for c in in_channels
        )
        self.level_embed = nn.Parameter(torch.empty(len(in_channels), dim))
        for conv, _ in self.proj:
            nn.init.xavier_uniform_(conv.weight, gain=1)
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.level_embed)

    def forward(self, maps):
        """maps: [(B, C_l, h_l, w_l)] lowest resolution first -> [(B, dim, h_l, w_l)]."""
        return [proj(x) for proj, x in zip(self.proj, maps)]

    def position(self, shapes, device):
        """Sine position + level embedding of every token: (1, S, dim)."""
        dim = self.level_embed.shape[1]
        return torch.cat([
            sine_position_embedding(h, w, dim // 2, device=device).flatten(1).T + self.level_embed[level]
            for level, (h, w) in enumerate(shapes)
        ])[None]


def c2_xavier_fill(conv):
    """detectron2's init for the FPN-style convs: kaiming-uniform with a=1, zero bias."""
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class MaskBranch(nn.Module):
    """The 1/4-resolution pixel embedding: FPN-style fusion of res2 with the upsampled 1/8
    encoder output, then the 1x1 `mask_features` conv.

    kind = "conv": 3x3 conv + GN + ReLU after the fusion (Mask2Former);
           "lpe_max" / "lpe_avg": PRO-SCALE's light pixel embedding, a 3x3 stride-1 max (or
           average, PRO-SCALE Table 14) pool + GN + ReLU in place of the 3x3 conv;
           "none": no res2 branch at all, the mask features come from the 1/8 map (ablation C1).
    """

    KINDS = ("conv", "lpe_max", "lpe_avg", "none")

    def __init__(self, in_channels, *, dim=256, kind="conv"):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"unknown mask branch {kind!r}; valid: {', '.join(self.KINDS)}")
        self.mask_features = nn.Conv2d(dim, dim, kernel_size=1)
        c2_xavier_fill(self.mask_features)
        self.stride = 8 if kind == "none" else 4  # resolution of the mask features
        if kind == "none":  # ablation C1: no res2 at all, mask features straight from the 1/8 map
            self.lateral = self.output = None
            return
        self.lateral = nn.Sequential(nn.Conv2d(in_channels, dim, kernel_size=1, bias=False), nn.GroupNorm(32, dim))
        c2_xavier_fill(self.lateral[0])
        if kind == "conv":
            smooth = nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=False)
            c2_xavier_fill(smooth)
        elif kind == "lpe_max":
            smooth = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        else:
            smooth = nn.AvgPool2d(kernel_size=3, stride=1, padding=1)
        self.output = nn.Sequential(smooth, nn.GroupNorm(32, dim), nn.ReLU())

    def forward(self, res2, coarse):
        """res2 (B, C2, H/4, W/4); coarse (B, dim, H/8, W/8) -> mask features (B, dim, H/s, W/s)
        at s = self.stride."""
        if self.lateral is None:
            return self.mask_features(coarse)
        x = self.lateral(res2) + F.interpolate(coarse, size=res2.shape[-2:], mode="bilinear", align_corners=False)
        return self.mask_features(self.output(x))


def check_exit(encoder, exit, name="exit"):
    """The one exit check, used by the encoders, the model and every script: `exit` must be None,
    an int or per-image exits (a 1-D integer tensor, or a list of ints) in 1..encoder.num_exits.
    Returns `exit` unchanged; otherwise raises ValueError naming `name`, the encoder and the range."""
    if exit is None:
        return None
    what = f"encoder {encoder.name!r}"
    if encoder.num_exits == 0:
        raise ValueError(f"{name} {exit}: {what} has no exits (no early exits: its layers cannot stop early; "
                         "ECO-M2F needs an encoder with num_exits > 0)")
    if torch.is_tensor(exit):
        if exit.dim() > 1 or exit.is_floating_point() or exit.dtype == torch.bool:
            raise ValueError(f"{name}: per-image exits must be a 1-D integer tensor, got {exit.dtype} {tuple(exit.shape)}")
        if torch.compiler.is_compiling():  # a data-dependent check would break the graph
            return exit
        values = exit.flatten().tolist()
    elif isinstance(exit, (list, tuple)):
        values = list(exit)
    else:
        values = [exit]
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in values):
        raise ValueError(f"{name} {exit}: exits are whole layer numbers")
    wrong = [k for k in values if not 1 <= k <= encoder.num_exits]
    if wrong or not values:
        raise ValueError(f"{name} must be in 1..{encoder.num_exits}, got {exit} ({what} has exits "
                         f"1..{encoder.num_exits})")
    return exit


def run_layers(layers, src, exits, *args, **kwargs):
    """Run `layers` in order on tokens src (B, S, C): all of them (exits None), the first k (an int),
    or per image (a (B,) LongTensor): image b stops after layer exits[b].

    With per-image exits, layer l runs only on the images whose exit is >= l, so a batch gives each
    image what it would get alone, and compute falls with depth (ECO-M2F's adaptive inference).
    """
    if exits is None or isinstance(exits, int):
        for layer in layers[:exits]:
            src = layer(src, *args, **kwargs)
        return src
    for depth, layer in enumerate(layers, start=1):
        active = exits >= depth  # (B,)
        if not active.any():
            break
        if active.all():
            src = layer(src, *args, **kwargs)
        else:
            idx = active.nonzero()[:, 0]
            sub = {k: (v[idx] if torch.is_tensor(v) and v.shape[0] == src.shape[0] else v) for k, v in kwargs.items()}
            src = src.index_copy(0, idx, layer(src[idx], *args, **sub))
    return src


class M2FEncoder(nn.Module):
    """Mask2Former's encoder: `layers` deformable layers over all tokens of 1/32, 1/16 and 1/8,
    then the mask branch at 1/4. Every layer is an exit: `exit=k` stops after layer k (ECO-M2F)."""

    name = "m2f"  # model.encoder.name

    def __init__(self, in_channels, *, dim=256, heads=8, points=4, ffn_dim=1024, layers=6, dropout=0.0,
                 mask_branch="conv"):
        """in_channels: dict of backbone channels for res2..res5."""
        super().__init__()
        if layers < 1:
            raise ValueError(f"the M2F encoder needs at least one layer, got layers={layers}")
        self.dim = dim
        self.input_proj = InputProjection([in_channels[name] for name in LEVELS], dim=dim)
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(dim=dim, levels=len(LEVELS), heads=heads, points=points, ffn_dim=ffn_dim,
                                   dropout=dropout)
            for _ in range(layers)
        )
        for layer in self.layers:  # official: xavier on every matrix, then MSDeformAttn's own init
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            layer.self_attn.reset_parameters()
        self.mask_branch = MaskBranch(in_channels["res2"], dim=dim, kind=mask_branch)

    @property
    def num_exits(self):
        return len(self.layers)

    @property
    def mask_stride(self):
        return self.mask_branch.stride

    def forward(self, features, exit=None):
        """features: res2..res5 maps (B, C_l, H_l, W_l); exit: None | int | LongTensor (B,).
        Returns mask_features (B, dim, H/4, W/4) and [1/32, 1/16, 1/8] maps (B, dim, h, w)."""
        exit = check_exit(self, exit)
        src, shapes, pos, ref = self.tokens(self.input_proj([features[name] for name in LEVELS]))
        if torch.is_tensor(exit):
            exit = exit.to(device=src.device, dtype=torch.long).expand(src.shape[0])  # (B,)
        src = run_layers(self.layers, src, exit, pos, ref, shapes)
        return self.finish(src, shapes, features)

    def gate_map(self, features):
        """The projected 1/32 map before any layer, (B, dim, h, w): what ECO-M2F's gate looks at."""
        return self.input_proj.proj[0](features[LEVELS[0]])

    def forward_exits(self, features, exits):
        """One pass through the layers, read out after each layer in `exits`: a dict exit ->
        (mask_features, multi_scale), as `forward(features, exit=k)` would give for each k."""
        wanted = sorted(set(check_exit(self, list(exits), "exits")))
        src, shapes, pos, ref = self.tokens(self.input_proj([features[name] for name in LEVELS]))
        results = {}
        for depth, layer in enumerate(self.layers[: wanted[-1]], start=1):
            src = layer(src, pos, ref, shapes)
            if depth in wanted:
                results[depth] = self.finish(src, shapes, features)
        return results

    def tokens(self, maps):
        """Flattened tokens (B, S, dim), level shapes, positions (1, S, dim), references (1, S, 2)."""
        src, shapes = flatten_maps(maps)
        return src, shapes, self.input_proj.position(shapes, src.device), reference_points(shapes, src.device)

    def finish(self, src, shapes, features):
        """Encoder tokens -> (mask_features, [1/32, 1/16, 1/8] maps)."""
        multi_scale = unflatten_tokens(src, shapes)
        return self.mask_branch(features["res2"], multi_scale[-1]), multi_scale


class TokenRecalibration(nn.Module):
    """PRO-SCALE's TRC: re-weight the tokens of a coarse level by a gate computed from the
    projected 1/8 tokens s2 (before any encoder layer), resized to that level:

        ŝ = s ⊙ sigmoid(ε · φ(resize(s2))),   φ = Linear(dim, 1), one φ for the 1/32 and 1/16 calls.

    The official code turns token sequences (B, L, C) into maps with a plain reshape to (B, C, H, W)
    and back, without the transpose, which mixes channels and positions. `official_layout=True`
    reproduces that (for official checkpoints); the default is the correct transpose.
    """

    def __init__(self, *, dim=256, epsilon=0.1, official_layout=False):
        super().__init__()
        self.phi = nn.Linear(dim, 1)
        self.epsilon, self.official_layout = epsilon, official_layout

    def forward(self, tokens, shape, guide, guide_shape):
        """tokens (B, h*w, C) of a level of size `shape`; guide (B, H*W, C) of size `guide_shape`.
        Returns the re-calibrated tokens (B, h*w, C)."""
        B, L, C = tokens.shape
        if self.official_layout:
            maps = guide.reshape(B, C, *guide_shape)  # no transpose: as the official code
            resized = F.interpolate(maps, size=shape, mode="bilinear", align_corners=False).reshape(B, L, C)
        else:
            maps = guide.transpose(1, 2).reshape(B, C, *guide_shape)  # (B, C, H, W)
            resized = F.interpolate(maps, size=shape, mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
        return tokens * torch.sigmoid(self.epsilon * self.phi(resized))  # (B, h*w, C) * (B, h*w, 1)


class ProScaleEncoder(nn.Module):
    """PRO-SCALE: the token sequence grows over three stages.

        stage 1: p1 layers over the 1/32 tokens only (queries and values; 1 level)
        stage 2: p2 layers over [stage-1 output, TRC(1/16 tokens)] (2 levels)
        stage 3: p3 layers over [stage-2 output, raw 1/8 tokens] (3 levels)

    Every layer has its own weights, built for its stage's number of levels; only the stage-3
    output goes to the decoder. Position and level embeddings and reference points are those of
    the full token set, sliced per stage. With depths (0, 0, 6) and no TRC this is M2FEncoder.
    """

    name = "proscale"  # model.encoder.name
    num_exits = 0  # its stages see different token sets: no early exits (yet)

    def __init__(self, in_channels, *, depths=(3, 3, 3), dim=256, heads=8, points=4, ffn_dim=1024, dropout=0.0,
                 mask_branch="lpe_max", trc=True, trc_epsilon=0.1, trc_official_layout=False):
        super().__init__()
        if len(depths) != 3 or min(depths) < 0 or sum(depths) == 0:
            raise ValueError(f"PRO-SCALE depths must be three counts (p1, p2, p3), not all 0; got {depths}")
        self.dim, self.depths = dim, tuple(depths)
        self.input_proj = InputProjection([in_channels[name] for name in LEVELS], dim=dim)
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(dim=dim, levels=stage + 1, heads=heads, points=points, ffn_dim=ffn_dim,
                                   dropout=dropout)
            for stage, depth in enumerate(self.depths) for _ in range(depth)
        )
        self.trc = TokenRecalibration(dim=dim, epsilon=trc_epsilon, official_layout=trc_official_layout) if trc else None
        for p in [*self.layers.parameters(), *(self.trc.parameters() if trc else [])]:
            if p.dim() > 1:  # official: xavier on every matrix, then MSDeformAttn's own init
                nn.init.xavier_uniform_(p)
        for layer in self.layers:
            layer.self_attn.reset_parameters()
        self.mask_branch = MaskBranch(in_channels["res2"], dim=dim, kind=mask_branch)

    @property
    def mask_stride(self):
        return self.mask_branch.stride

    def gate_map(self, features):
        """The projected 1/32 map before any layer, (B, dim, h, w)."""
        return self.input_proj.proj[0](features[LEVELS[0]])

    def forward(self, features, exit=None):
        """features: res2..res5 maps (B, C_l, H_l, W_l). Returns mask_features (B, dim, H/4, W/4)
        and [1/32, 1/16, 1/8] maps (B, dim, h, w)."""
        check_exit(self, exit)  # refuses any exit
        maps = self.input_proj([features[name] for name in LEVELS])
        tokens, shapes = flatten_maps(maps)  # (B, S, dim)
        pos = self.input_proj.position(shapes, tokens.device)  # (1, S, dim)
        ref = reference_points(shapes, tokens.device)  # (1, S, 2)
        s32, s16, s8 = tokens.split([h * w for h, w in shapes], dim=1)
        if self.trc is not None:
            s32 = self.trc(s32, shapes[0], s8, shapes[2])
            s16 = self.trc(s16, shapes[1], s8, shapes[2])
        x, layers = s32, iter(self.layers)
        for stage, (depth, new_tokens) in enumerate(zip(self.depths, (None, s16, s8))):
            if new_tokens is not None:
                x = torch.cat([x, new_tokens], dim=1)  # the sequence grows by the next level
            n = x.shape[1]
            for _ in range(depth):
                x = next(layers)(x, pos[:, :n], ref[:, :n], shapes[: stage + 1])
        multi_scale = unflatten_tokens(x, shapes)
        return self.mask_branch(features["res2"], multi_scale[-1]), multi_scale


def build_encoder(*, cfg, in_channels):
    """The encoder named by `cfg.name` (an EncoderConfig) for backbone channels `in_channels`
    (a dict res2..res5 -> channels)."""
    common = dict(dim=cfg.dim, heads=cfg.heads, points=cfg.points, ffn_dim=cfg.ffn_dim, dropout=cfg.dropout,
                  mask_branch=cfg.mask_branch)
    if cfg.name == "m2f":
        return M2FEncoder(in_channels, layers=cfg.layers, **common)
    if cfg.name == "proscale":
        return ProScaleEncoder(in_channels, depths=cfg.depths, trc=cfg.trc, trc_epsilon=cfg.trc_epsilon,
                               trc_official_layout=cfg.trc_official_layout, **common)
    raise ValueError(f"unknown encoder {cfg.name!r}; valid: {', '.join(ENCODERS)}")


ENCODERS = ("m2f", "proscale")  # the names build_encoder knows
