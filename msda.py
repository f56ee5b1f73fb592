"""Multi-scale deformable attention (Deformable DETR), as used by every encoder here.

Each query looks at a few sampled points on each feature level instead of at every token:

    out(q) = W_o · Σ_heads Σ_levels Σ_points  a(q, h, l, p) · V_l(h)[ ref(q) + Δ(q, h, l, p) ]

where V_l(h)[·] is bilinear sampling of head h's projected values on level l, Δ comes from a
linear layer on the query and a(·) is softmax-normalised jointly over levels × points per head.

The default `ms_deform_attn` is pure PyTorch on `F.grid_sample`: it runs on any device, in
fp32/fp16/bf16, and compiles with `torch.compile(fullgraph=True)` because the level shapes are
Python ints, never tensors.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights):
    """Sample every level bilinearly and take the attention-weighted sum of the samples.

    value:              (N, S, M, D), S = Σ H_l·W_l in level order, M heads of D channels
    spatial_shapes:     sequence of (H_l, W_l) Python ints
    sampling_locations: (N, Lq, M, L, P, 2), (x, y) normalised to [0, 1] (outside reads zeros)
    attention_weights:  (N, Lq, M, L, P), already normalised
    returns:            (N, Lq, M·D)
    """
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    if len(spatial_shapes) != L:
        raise ValueError(f"{len(spatial_shapes)} spatial shapes for {L} sampled levels")
    values = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    out = value.new_zeros(N * M, D, Lq)
    for level, (h, w) in enumerate(spatial_shapes):
        # (N, h*w, M, D) -> (N*M, D, h, w)
        v = values[level].permute(0, 2, 3, 1).reshape(N * M, D, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        g = grids[:, :, :, level].transpose(1, 2).reshape(N * M, Lq, P, 2)
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # (N*M, D, Lq, P)
        # (N, Lq, M, P) -> (N*M, 1, Lq, P)
        a = attention_weights[:, :, :, level].transpose(1, 2).reshape(N * M, 1, Lq, P)
        out = out + (sampled * a).sum(-1)  # accumulate per level: no (…, L·P) stack in memory
    # (N*M, D, Lq) -> (N, Lq, M*D)
    return out.view(N, M * D, Lq).transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Deformable attention over `n_levels` feature levels with the official initialisation.

    Parameter names and shapes are those of the official `MSDeformAttn` (Deformable DETR,
    Mask2Former), so official checkpoints load by name.
    """

    def __init__(self, *, dim=256, levels=4, heads=8, points=4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        # The official attribute names, which the official code's readers know.
        self.d_model, self.n_levels, self.n_heads, self.n_points = dim, levels, heads, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self):
        # Offsets start as 8 fixed directions (one per head), the i-th point i steps out, so the
        # heads look around the reference point in a star before any training.
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([theta.cos(), theta.sin()], -1)  # (M, 2)
        directions = directions / directions.abs().max(-1, keepdim=True).values  # on the unit square
        grid = directions.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        # Uniform attention over levels × points at the start.
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query, reference_points, value, spatial_shapes):
        """query (N, Lq, C); reference_points (N, Lq, L, 2) as (x, y) in [0, 1];
        value (N, S, C) with S = Σ H_l·W_l; spatial_shapes: L pairs (H_l, W_l) of ints.
        Returns (N, Lq, C)."""
        N, Lq, _ = query.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        v = self.value_proj(value).view(N, value.shape[1], M, self.d_model // M)  # (N, S, M, D)
        offsets = self.sampling_offsets(query).view(N, Lq, M, L, P, 2)
        weights = self.attention_weights(query).view(N, Lq, M, L * P).softmax(-1).view(N, Lq, M, L, P)
        # Offsets are in pixels of each level: divide by (W_l, H_l) to normalise.
        normaliser = query.new_tensor([[w, h] for h, w in spatial_shapes])  # (L, 2)
        locations = reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
        return self.output_proj(ms_deform_attn(v, spatial_shapes, locations, weights))
