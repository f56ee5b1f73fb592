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
from ops import Conv1x1, Linear, linear

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
    chunks = tokens.split([h * w for h, w in shapes], dim=1)
    # views in the channels-last layout (also for batch 1, whose batch stride reshape would leave
    # arbitrary): what torch's channels-last kernels (upsampling, pooling) and oneDNN expect
    return [t.unflatten(1, (h, w)).permute(0, 3, 1, 2) for t, (h, w) in zip(chunks, shapes)]


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention, then a ReLU feed-forward network.

    Parameter names follow the official layer so checkpoints map one to one.
    """

    def __init__(self, *, dim=256, levels=3, heads=8, points=4, ffn_dim=1024, dropout=0.0, attention="torch"):
        super().__init__()
        self.self_attn = MSDeformAttn(dim=dim, levels=levels, heads=heads, points=points, impl=attention)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = Linear(dim, ffn_dim)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = Linear(ffn_dim, dim)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src, pos, ref, spatial_shapes, value=None):
        """src (B, Lq, C) queries; pos (1 or B, Lq, C); ref (1 or B, Lq, 2) in [0, 1];
        value (B, S, C) over `spatial_shapes` (default: the queries themselves). Returns (B, Lq, C)."""
        value = src if value is None else value
        # The same normalised reference on every level: (·, Lq, 2) -> (B, Lq, L, 2).
        ref = ref[:, :, None].expand(src.shape[0], -1, len(spatial_shapes), -1)
        src = self.norm1(src + self.dropout1(self.self_attn(src + pos, ref, value, spatial_shapes)))
        # In-place ReLU: the linear's output is not needed by its backward (no extra (B, Lq, ffn) buffer).
        return self.norm2(src + self.dropout3(self.linear2(self.dropout2(F.relu_(self.linear1(src))))))


class InputProjection(nn.Module):
    """Per level a 1x1 conv (with bias) and GroupNorm(32) to the encoder width, plus a learned
    level embedding that tells the attention which scale a token comes from."""

    def __init__(self, in_channels, *, dim=256):
        super().__init__()
        self.proj = nn.ModuleList(
            nn.Sequential(Conv1x1(c, dim), nn.GroupNorm(32, dim)) for c in in_channels
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
        self.mask_features = Conv1x1(dim, dim)
        c2_xavier_fill(self.mask_features)
        self.stride = 8 if kind == "none" else 4  # resolution of the mask features
        if kind == "none":  # ablation C1: no res2 at all, mask features straight from the 1/8 map
            self.lateral = self.output = None
            return
        self.lateral = nn.Sequential(Conv1x1(in_channels, dim, bias=False), nn.GroupNorm(32, dim))
        c2_xavier_fill(self.lateral[0])
        if kind == "conv":
            smooth = nn.Conv2d(dim, dim, kernel_size=3, padding=1, bias=False)
            c2_xavier_fill(smooth)
        elif kind == "lpe_max":
            smooth = SeparableMaxPool3x3(kernel_size=3, stride=1, padding=1)
        else:
            smooth = nn.AvgPool2d(kernel_size=3, stride=1, padding=1)
        # In place: GroupNorm's backward needs its input, not its output.
        self.output = nn.Sequential(smooth, nn.GroupNorm(32, dim), nn.ReLU(inplace=True))

    def forward(self, res2, coarse):
        """res2 (B, C2, H/4, W/4); coarse (B, dim, H/8, W/8) -> mask features (B, dim, H/s, W/s)
        at s = self.stride."""
        if self.lateral is None:
            return self.mask_features(coarse)
        x = self.lateral(res2).add_(F.interpolate(coarse, size=res2.shape[-2:], mode="bilinear", align_corners=False))
        return self.mask_features(self.output(x))


class SeparableMaxPool3x3(nn.MaxPool2d):
    """MaxPool2d(3, stride 1, padding 1), the LPE's pool. torch's NCHW kernel, priced at 0 FLOPs,
    cost half of the 3x3 conv it replaces (256x128x176, 1 thread); its channels-last kernel takes
    1/16 of that, so a channels-last x (the mask branch's, from the oneDNN 1x1 conv) goes there.
    An NCHW x is pooled as a max over 3 columns then over 3 rows (the same values, ~1/12 of the
    time), or with autograd by torch's pool on a channels-last copy (torch's own gradient, which
    at ties the separable max would split)."""

    def forward(self, x):
        """x (B, C, H, W) -> (B, C, H, W), in x's memory format (channels-last or NCHW-contiguous)."""
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            return F.max_pool2d(x, 3, 1, 1)
        if torch.is_grad_enabled() and x.requires_grad:
            return F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 3, 1, 1).contiguous()
        cols = x.clone()  # max over x-1, x, x+1 (the border sees two: padding is -inf)
        cols[..., 1:] = torch.maximum(cols[..., 1:], x[..., :-1])
        cols[..., :-1] = torch.maximum(cols[..., :-1], x[..., 1:])
        out = cols.clone()  # then over y-1, y, y+1
        out[..., 1:, :] = torch.maximum(out[..., 1:, :], cols[..., :-1, :])
        out[..., :-1, :] = torch.maximum(out[..., :-1, :], cols[..., 1:, :])
        return out


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
                 mask_branch="conv", attention="torch"):
        """in_channels: dict of backbone channels for res2..res5."""
        super().__init__()
        if layers < 1:
            raise ValueError(f"the M2F encoder needs at least one layer, got layers={layers}")
        self.dim = dim
        self.input_proj = InputProjection([in_channels[name] for name in LEVELS], dim=dim)
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(dim=dim, levels=len(LEVELS), heads=heads, points=points, ffn_dim=ffn_dim,
                                   dropout=dropout, attention=attention)
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

    def __init__(self, in_channels, *, depths=(3, 3, 3), dim=256, heads=8, points=4, ffn_dim=1024, dropout=0.0,
                 mask_branch="lpe_max", trc=True, trc_epsilon=0.1, trc_official_layout=False, attention="torch"):
        super().__init__()
        if len(depths) != 3 or min(depths) < 0 or sum(depths) == 0:
            raise ValueError(f"PRO-SCALE depths must be three counts (p1, p2, p3), not all 0; got {depths}")
        self.dim, self.depths = dim, tuple(depths)
        self.input_proj = InputProjection([in_channels[name] for name in LEVELS], dim=dim)
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(dim=dim, levels=stage + 1, heads=heads, points=points, ffn_dim=ffn_dim,
                                   dropout=dropout, attention=attention)
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

    @property
    def num_exits(self):
        """Exits inside the last stage: exit k stops after its k-th layer (adaptive depth on top of
        token scaling, which neither paper has). Stages 1 and 2 always run: they see other token
        sets, and the decoder needs all three levels."""
        return self.depths[2]

    def gate_map(self, features):
        """The projected 1/32 map before any layer, (B, dim, h, w)."""
        return self.input_proj.proj[0](features[LEVELS[0]])

    def forward(self, features, exit=None):
        """features: res2..res5 maps (B, C_l, H_l, W_l); exit: None | int | LongTensor (B,), a layer
        of stage 3. Returns mask_features (B, dim, H/4, W/4) and [1/32, 1/16, 1/8] maps (B, dim, h, w)."""
        exit = check_exit(self, exit)
        x, shapes, pos, ref = self.first_stages(features)
        if torch.is_tensor(exit):
            exit = exit.to(device=x.device, dtype=torch.long).expand(x.shape[0])  # (B,)
        x = run_layers(self.layers[sum(self.depths[:2]):], x, exit, pos, ref, shapes)
        return self.finish(x, shapes, features)

    def forward_exits(self, features, exits):
        """One pass, read out after each stage-3 layer in `exits`: exit -> (mask_features, multi_scale)."""
        wanted = sorted(set(check_exit(self, list(exits), "exits")))
        x, shapes, pos, ref = self.first_stages(features)
        results = {}
        for depth, layer in enumerate(self.layers[sum(self.depths[:2]):][: wanted[-1]], start=1):
            x = layer(x, pos, ref, shapes)
            if depth in wanted:
                results[depth] = self.finish(x, shapes, features)
        return results

    def first_stages(self, features):
        """Stages 1 and 2 (PRO-SCALE Eqs. 1-2, with TRC) and the stage-3 input [stage-2 output, raw
        1/8 tokens] (Eq. 3): tokens (B, S, dim), level shapes, positions (1, S, dim), references (1, S, 2)."""
        maps = self.input_proj([features[name] for name in LEVELS])
        tokens, shapes = flatten_maps(maps)  # (B, S, dim)
        pos = self.input_proj.position(shapes, tokens.device)  # (1, S, dim)
        ref = reference_points(shapes, tokens.device)  # (1, S, 2)
        s32, s16, s8 = tokens.split([h * w for h, w in shapes], dim=1)
        if self.trc is not None:
            s32 = self.trc(s32, shapes[0], s8, shapes[2])
            s16 = self.trc(s16, shapes[1], s8, shapes[2])
        x, layers = s32, iter(self.layers)
        for stage, new_tokens in enumerate((None, s16)):
            if new_tokens is not None:
                x = torch.cat([x, new_tokens], dim=1)  # the sequence grows by the next level
            n = x.shape[1]
            for _ in range(self.depths[stage]):
                x = next(layers)(x, pos[:, :n], ref[:, :n], shapes[: stage + 1])
        return torch.cat([x, s8], dim=1), shapes, pos, ref

    def finish(self, x, shapes, features):
        """Stage-3 tokens -> (mask_features, [1/32, 1/16, 1/8] maps)."""
        multi_scale = unflatten_tokens(x, shapes)
        return self.mask_branch(features["res2"], multi_scale[-1]), multi_scale


# ---- Lite-M2F: Lite-DETR's interleaved update (Li et al., 2023), key-aware attention off ----------
#
# The papers' GFLOPs pin it down ("H3L1-(5+1)x1"). At Cityscapes 1024x2048 (Swin-T) the 1/32, 1/16
# and 1/8 maps hold 2048, 8192 and 32768 tokens: S = 43008, of which 10240 are high-level. In the
# papers' convention a deformable layer costs 256·(192 + 96 + 256 + 2048) + 10·256 = 666112 FLOPs
# per query (offsets, weights, output projection, FFN, two LayerNorms) and 256·256 = 65536 per value
# token (the value projection). A high-only layer (queries: the 10240 high tokens; values: all S)
# costs 10240·666112 + 43008·65536 = 9.640 G, a full layer 43008·731648 = 31.467 G. M2F's six full
# layers leave 281.13 - 188.80 = 92.33 G for the input projections and the mask branch, so five
# high-only layers + one full layer give 92.33 + 48.20 + 31.47 = 171.99 (papers: 172.00; total
# 428.72 against 428.70, PRO-SCALE Table 2), and with LPE (no 3x3 conv at 1/4, 131072·256·256·9 =
# 77.31 G less) 94.68 and 351.41 (Table 4: 94.69, 351.40). Readings that miss: (6+1) 181.63, the
# value projection over the high tokens only 161.26, six high-only layers 150.17.


class LiteLayer(DeformableEncoderLayer):
    """A Lite-DETR encoder layer. high_levels = 0: a full layer, every token a query. Otherwise a
    high-only layer: the queries are the tokens of the first `high_levels` levels (the lowest
    resolutions, which lead the sequence), the values are all tokens; the other tokens pass
    through unchanged. Parameters, names and shapes as DeformableEncoderLayer's (M2F's)."""

    def __init__(self, *, high_levels=0, **kwargs):
        super().__init__(**kwargs)
        self.high_levels = high_levels

    def forward(self, src, pos, ref, spatial_shapes, value=None):
        """As DeformableEncoderLayer.forward on all tokens src (B, S, C); returns (B, S, C)."""
        if not self.high_levels:
            return super().forward(src, pos, ref, spatial_shapes, value)
        n = sum(h * w for h, w in spatial_shapes[: self.high_levels])
        high = super().forward(src[:, :n], pos[:, :n], ref[:, :n], spatial_shapes, value=src)
        return torch.cat([high, src[:, n:]], dim=1)


class LiteEncoder(M2FEncoder):
    """Lite-M2F: M2F's encoder with Lite-DETR's interleaved update. `layers` split into `blocks`
    blocks, each of layers/blocks - 1 high-only layers (queries: the 1/32 and 1/16 tokens, for
    high_levels 2; values: all tokens) and one full layer. The papers': 6 layers, 1 block ((5+1)x1).

    Everything else is M2F's (input projections, positions, mask branch, parameter names), and so
    are the exits: every layer is one, `exit=k` stops after layer k (Lite-ECO-M2F)."""

    name = "lite"  # model.encoder.name

    def __init__(self, in_channels, *, dim=256, heads=8, points=4, ffn_dim=1024, layers=6, dropout=0.0,
                 mask_branch="conv", attention="torch", high_levels=2, blocks=1):
        super(M2FEncoder, self).__init__()
        if not 1 <= high_levels <= len(LEVELS):
            raise ValueError(f"Lite-M2F high_levels must be in 1..{len(LEVELS)}, got {high_levels}")
        if layers < 1 or blocks < 1 or layers % blocks:
            raise ValueError(f"Lite-M2F needs blocks >= 1 dividing layers >= 1, got layers={layers}, blocks={blocks}")
        self.dim = dim
        self.input_proj = InputProjection([in_channels[name] for name in LEVELS], dim=dim)
        per_block = layers // blocks
        self.layers = nn.ModuleList(
            LiteLayer(high_levels=0 if (i + 1) % per_block == 0 else high_levels, dim=dim, levels=len(LEVELS),
                      heads=heads, points=points, ffn_dim=ffn_dim, dropout=dropout, attention=attention)
            for i in range(layers)
        )
        for layer in self.layers:  # as M2F: xavier on every matrix, then MSDeformAttn's own init
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            layer.self_attn.reset_parameters()
        self.mask_branch = MaskBranch(in_channels["res2"], dim=dim, kind=mask_branch)


# ---- RT-M2F: RT-DETR's hybrid encoder (Lv et al., 2023) ---------------------------------------
#
# AIFI (one transformer layer) on the 1/32 map, then CCFM: a top-down and a bottom-up fusion of
# 1/8, 1/16, 1/32 with CSPRep blocks; settings of the authors' cfg.MODEL.RT_DETR_ENCODER. The
# papers' GFLOPs decide where the mask features come from. At Cityscapes 1024x2048 (Swin-T), in the
# papers' convention: input projections 2.84 G, AIFI over the 2048 tokens of 1/32 3.76 G, CCFM
# 121.02 G (its CSPRep blocks at 1/8 and 1/16: 73.15 + 2 x 18.29), 127.63 G in all. Reading A, the
# mask features a 1x1 conv (RT_DETR_MASK_DIM 256) on CCFM's 1/8 output (32768 tokens x 256 x 256 =
# 2.15 G; mask_branch "none", mask_stride 8): encoder 129.78, total 361.20, against the papers'
# 130.00 and 361.10 (-0.17 %, +0.03 %). Reading B, M2F's 1/4 branch on res2 and that 1/8 output
# (mask_branch "conv"): 217.09 and 473.81 (+67 %, +31 %). Without the 1x1 conv A gives 127.63 (-1.8 %).
# A also fits the rest: its non-encoder GFLOPs are 25.17 below M2F's (papers: 25.62), the decoder's
# mask products at 1/8 instead of 1/4.


def activation_layer(name):
    """RT-DETR's activations by name, as modules."""
    kinds = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "leaky_relu": nn.LeakyReLU, "none": nn.Identity}
    if name not in kinds:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(kinds)}")
    return kinds[name]()


def sincos_position_2d(height, width, dim=256, temperature=10000.0, official_order=False, device=None):
    """RT-DETR's 2-D sin-cos embedding of a (height, width) map flattened row by row: (height·width,
    dim), channels [sin(a·ω), cos(a·ω), sin(b·ω), cos(b·ω)] with ω_k = 1 / T^(k / (dim/4)), k < dim/4,
    at integer positions (a, b), unnormalised.

    By default token y·width + x gets (a, b) = (y, x). RT-DETR flattens meshgrid(arange(w),
    arange(h), indexing="ij"), which gives token i (a, b) = (i // height, i % height): the same on a
    square map, scrambled on any other (fixed upstream later). official_order=True reproduces that."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32, device=device) / (dim // 4))
    index = torch.arange(height * width, device=device)
    period = height if official_order else width
    a = torch.div(index, period, rounding_mode="floor").to(torch.float32)[:, None] * omega  # (h*w, dim/4)
    b = (index % period).to(torch.float32)[:, None] * omega
    return torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1)


class MultiheadAttention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's packed q/k/v parameters (in_proj_weight,
    in_proj_bias, out_proj) and init, computed with ops.linear (F.linear) and F.scaled_dot_product_attention
    (which the FLOP counter sees; nn.MultiheadAttention hides its ops from it). `allowed`
    (B, Lq, Lk) bool: True where a query may look. RT-M2F's AIFI and the decoder use it."""

    def __init__(self, *, dim, heads, dropout=0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query, key, value, allowed=None):
        """query (B, Lq, C), key and value (B, Lk, C) -> (B, Lq, C)."""
        B, Lq, C = query.shape
        q, k, v = (linear(x, w, b).view(B, x.shape[1], self.heads, -1).transpose(1, 2)  # (B, heads, L, C/heads)
                   for x, w, b in zip((query, key, value), self.in_proj_weight.chunk(3), self.in_proj_bias.chunk(3)))
        mask = None if allowed is None else allowed[:, None]  # the same mask for every head
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(B, Lq, C))


class AIFILayer(nn.Module):
    """RT-DETR's intra-scale layer: post-norm self-attention (q = k = x + pos, v = x), then an FFN."""

    def __init__(self, *, dim=256, heads=8, ffn_dim=1024, dropout=0.0, activation="gelu"):
        super().__init__()
        self.self_attn = MultiheadAttention(dim=dim, heads=heads, dropout=dropout)
        self.linear1 = Linear(dim, ffn_dim)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = activation_layer(activation)

    def forward(self, x, pos):
        """x (B, L, C), pos (1 or B, L, C) -> (B, L, C)."""
        q = x + pos
        x = self.norm1(x + self.dropout1(self.self_attn(q, q, x)))
        return self.norm2(x + self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x))))))


class AIFI(nn.Module):
    """A stack of AIFI layers over one map (RT-DETR's TransformerEncoder, no final norm)."""

    def __init__(self, layers=1, **kwargs):
        super().__init__()
        self.layers = nn.ModuleList(AIFILayer(**kwargs) for _ in range(layers))

    def forward(self, x, pos):
        for layer in self.layers:
            x = layer(x, pos)
        return x


class ConvNorm(nn.Module):
    """Conv (no bias, 'same' padding) + BatchNorm + activation: RT-DETR's ConvNormLayer."""

    def __init__(self, c_in, c_out, kernel, stride=1, act="none"):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding=(kernel - 1) // 2, bias=False)
        self.norm = nn.BatchNorm2d(c_out)
        self.act = activation_layer(act)

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class RepVGGBlock(nn.Module):
    """act(ConvNorm 3x3 (x) + ConvNorm 1x1 (x)), channels kept (training form, no re-parametrisation)."""

    def __init__(self, channels, act="silu"):
        super().__init__()
        self.conv1 = ConvNorm(channels, channels, 3)
        self.conv2 = ConvNorm(channels, channels, 1)
        self.act = activation_layer(act)

    def forward(self, x):
        return self.act(self.conv1(x) + self.conv2(x))


class CSPRepBlock(nn.Module):
    """RT-DETR's CSPRepLayer: conv3(RepVGG blocks(conv1(x)) + conv2(x)); conv1, conv2 1x1 to
    hidden = int(c_out·expansion) channels, conv3 1x1 to c_out (absent when hidden == c_out)."""

    def __init__(self, c_in, c_out, *, blocks=3, expansion=1.0, act="silu"):
        super().__init__()
        hidden = int(c_out * expansion)
        self.conv1 = ConvNorm(c_in, hidden, 1, act=act)
        self.conv2 = ConvNorm(c_in, hidden, 1, act=act)
        self.bottlenecks = nn.Sequential(*(RepVGGBlock(hidden, act=act) for _ in range(blocks)))
        self.conv3 = ConvNorm(hidden, c_out, 1, act=act) if hidden != c_out else nn.Identity()

    def forward(self, x):
        return self.conv3(self.bottlenecks(self.conv1(x)) + self.conv2(x))


class RTEncoder(nn.Module):
    """RT-M2F: RT-DETR's hybrid encoder in Mask2Former. 1x1 conv + BN projections of res3..res5,
    AIFI on `aifi_levels` (the 1/32 map), CCFM (top-down: lateral 1x1 ConvNorm, nearest 2x
    upsampling, concatenation, CSPRep block; bottom-up: 3x3 stride-2 ConvNorm, concatenation,
    CSPRep block), then the mask branch on CCFM's 1/8 output: "none" (a 1x1 conv, mask features at
    1/8: the papers' reading, see above) or M2F's 1/4 branch ("conv", "lpe_*").

    Parameter names are RT-DETR's HybridEncoder's (input_proj, encoder, lateral_convs, fpn_blocks,
    downsample_convs, pan_blocks; levels highest resolution first), plus mask_branch."""

    name = "rt"  # model.encoder.name
    num_exits = 0  # one AIFI layer, then a CNN: no stack of layers to stop early in

    def __init__(self, in_channels, *, dim=256, heads=8, ffn_dim=1024, dropout=0.0, mask_branch="none",
                 aifi_levels=("res5",), aifi_layers=1, aifi_activation="gelu", temperature=10000.0,
                 pe_official_order=False, csp_blocks=3, expansion=1.0, activation="silu"):
        super().__init__()
        levels = LEVELS[::-1]  # res3, res4, res5: RT-DETR's order
        if not set(aifi_levels) <= set(levels) or len(set(aifi_levels)) != len(aifi_levels):
            raise ValueError(f"RT-M2F aifi_levels must be distinct names of {', '.join(levels)}, got {aifi_levels}")
        if aifi_layers < 0 or csp_blocks < 0 or not expansion > 0:
            raise ValueError(f"RT-M2F needs aifi_layers >= 0, csp_blocks >= 0, expansion > 0; got {aifi_layers}, "
                             f"{csp_blocks}, {expansion}")
        if dim % 4:
            raise ValueError(f"RT-M2F's position embedding needs dim divisible by 4, got {dim}")
        self.dim, self.temperature, self.pe_official_order = dim, temperature, pe_official_order
        self.input_proj = nn.ModuleList(
            nn.Sequential(Conv1x1(in_channels[name], dim, bias=False), nn.BatchNorm2d(dim))
            for name in levels
        )
        self.aifi_levels = [levels.index(name) for name in aifi_levels]
        self.encoder = nn.ModuleList(
            AIFI(aifi_layers, dim=dim, heads=heads, ffn_dim=ffn_dim, dropout=dropout, activation=aifi_activation)
            for _ in aifi_levels
        )
        csp = dict(blocks=csp_blocks, expansion=expansion, act=activation)
        self.lateral_convs = nn.ModuleList(ConvNorm(dim, dim, 1, act=activation) for _ in levels[1:])
        self.fpn_blocks = nn.ModuleList(CSPRepBlock(2 * dim, dim, **csp) for _ in levels[1:])
        self.downsample_convs = nn.ModuleList(ConvNorm(dim, dim, 3, stride=2, act=activation) for _ in levels[1:])
        self.pan_blocks = nn.ModuleList(CSPRepBlock(2 * dim, dim, **csp) for _ in levels[1:])
        self.mask_branch = MaskBranch(in_channels["res2"], dim=dim, kind=mask_branch)

    @property
    def mask_stride(self):
        return self.mask_branch.stride

    def gate_map(self, features):
        """The projected 1/32 map before AIFI, (B, dim, h, w)."""
        return self.input_proj[-1](features["res5"])

    def forward(self, features, exit=None):
        """features: res2..res5 maps (B, C_l, H_l, W_l). Returns mask_features (B, dim, H/s, W/s)
        and [1/32, 1/16, 1/8] maps (B, dim, h, w)."""
        check_exit(self, exit)  # refuses any exit
        maps = [proj(features[name]) for proj, name in zip(self.input_proj, LEVELS[::-1])]  # 1/8, 1/16, 1/32
        for level, aifi in zip(self.aifi_levels, self.encoder):
            maps[level] = self.intra_scale(aifi, maps[level])
        outs = self.cross_scale(maps)  # 1/8, 1/16, 1/32
        return self.mask_branch(features["res2"], outs[0]), outs[::-1]

    def intra_scale(self, aifi, x):
        """AIFI over the tokens of one map (B, C, h, w), with the 2-D sin-cos embedding."""
        B, C, h, w = x.shape
        pos = sincos_position_2d(h, w, C, self.temperature, self.pe_official_order, x.device)[None]
        return aifi(x.flatten(2).transpose(1, 2), pos).transpose(1, 2).reshape(B, C, h, w)

    def cross_scale(self, maps):
        """CCFM on maps [1/8, 1/16, 1/32] (B, dim, ·): RT-DETR's top-down then bottom-up fusion.
        The bottom-up path fuses the top-down path's lateral outputs, as RT-DETR's does."""
        n = len(maps)
        inner = [maps[-1]]  # the top-down maps, highest resolution first
        for k, idx in enumerate(range(n - 1, 0, -1)):
            high = inner[0] = self.lateral_convs[k](inner[0])
            up = F.interpolate(high, size=maps[idx - 1].shape[-2:], mode="nearest")  # = scale 2 on these maps
            inner.insert(0, self.fpn_blocks[k](torch.cat([up, maps[idx - 1]], dim=1)))
        outs = [inner[0]]
        for k in range(n - 1):
            down = self.downsample_convs[k](outs[-1])
            outs.append(self.pan_blocks[k](torch.cat([down, inner[k + 1]], dim=1)))
        return outs


def build_encoder(*, cfg, in_channels):
    """The encoder named by `cfg.name` (an EncoderConfig) for backbone channels `in_channels`
    (a dict res2..res5 -> channels)."""
    common = dict(dim=cfg.dim, heads=cfg.heads, points=cfg.points, ffn_dim=cfg.ffn_dim, dropout=cfg.dropout,
                  mask_branch=cfg.mask_branch, attention=cfg.attention)
    if cfg.name == "m2f":
        return M2FEncoder(in_channels, layers=cfg.layers, **common)
    if cfg.name == "proscale":
        return ProScaleEncoder(in_channels, depths=cfg.depths, trc=cfg.trc, trc_epsilon=cfg.trc_epsilon,
                               trc_official_layout=cfg.trc_official_layout, **common)
    if cfg.name == "lite":
        return LiteEncoder(in_channels, layers=cfg.layers, **common, **vars(cfg.lite))
    if cfg.name == "rt":  # no deformable attention: points and attention do not apply
        return RTEncoder(in_channels, dim=cfg.dim, heads=cfg.heads, ffn_dim=cfg.ffn_dim, dropout=cfg.dropout,
                         mask_branch=cfg.mask_branch, **vars(cfg.rt))
    raise ValueError(f"unknown encoder {cfg.name!r}; valid: {', '.join(ENCODERS)}")


ENCODERS = ("m2f", "proscale", "lite", "rt")  # the names build_encoder knows
