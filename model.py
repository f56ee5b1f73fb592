"""Mask2Former (Cheng et al., 2022): backbone -> encoder -> masked-attention decoder -> masks.

Read top to bottom: backbones, the transformer decoder, the Hungarian matcher and set criterion,
the meta-architecture (with ECO-M2F's gate input and gated forward),
`build_model`. The encoders are in encoders.py, post-processing in postprocess.py, the gate in gate.py.

Parameter shapes and packing follow the official detectron2 models (for example the packed
q/k/v in-projection of the decoder's attention), so an official checkpoint needs only a name
mapping (config.convert_official_state_dict).
"""
import math
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F
import torchvision
from scipy.optimize import linear_sum_assignment
from torch import nn

from config import require_classes
from encoders import MultiheadAttention, build_encoder, check_exit, sine_position_embedding
from ops import Conv1x1, Linear, observed
from postprocess import (instance_inference, panoptic_inference, semantic_inference, semantic_labels,
                         upsample_predictions)


# ---- backbones: images -> {"res2": 1/4, "res3": 1/8, "res4": 1/16, "res5": 1/32} -----------


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters, all buffers (detectron2's FrozenBN);
    F.batch_norm like detectron2's, so the FLOP counter sees the same op."""

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features) - eps)

    def forward(self, x):
        """x (B, C, H, W) -> (B, C, H, W)."""
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # torchvision BN checkpoints carry it
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ResNet(nn.Module):
    """torchvision's ResNet (stride in the 3x3 conv, as Mask2Former's R50) without its head, its
    1x1 convs as ops.Conv1x1. Module names are torchvision's: its ImageNet state dicts load as they are."""

    DEPTHS = {"resnet18": torchvision.models.resnet18, "resnet34": torchvision.models.resnet34,
              "resnet50": torchvision.models.resnet50, "resnet101": torchvision.models.resnet101}
    NORMS = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d, "syncbn": nn.SyncBatchNorm}

    def __init__(self, name="resnet50", norm="frozen_bn"):
        super().__init__()
        if norm not in self.NORMS:
            raise ValueError(f"unknown ResNet norm {norm!r}; valid: {', '.join(self.NORMS)}")
        net = self.DEPTHS[name](weights=None, norm_layer=self.NORMS[norm])
        for parent in list(net.modules()):  # the stride-1 1x1 convs: bottlenecks and layer1's downsample
            for key, conv in parent.named_children():
                if isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1):
                    setattr(parent, key, Conv1x1.like(conv))
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        width = 1 if name in ("resnet18", "resnet34") else 4  # basic blocks vs bottlenecks
        self.channels = {"res2": 64 * width, "res3": 128 * width, "res4": 256 * width, "res5": 512 * width}

    def forward(self, x):
        """x (B, 3, H, W) -> res2..res5 (B, C_l, H/2^(l), W/2^(l)), strides 4..32; channels-last on the CPU."""
        if x.device.type == "cpu":  # oneDNN's layout for every conv here, and the encoder's token layout
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        res2 = self.layer1(x)
        res3 = self.layer2(res2)
        res4 = self.layer3(res3)
        return {"res2": res2, "res3": res3, "res4": res4, "res5": self.layer4(res4)}


class Swin(nn.Module):
    """torchvision's Swin Transformer with a LayerNorm on each of the four stage outputs, as
    Mask2Former's D2SwinTransformer.

    One difference to the official Swin, which only matters for tiny inputs: torchvision drops
    the cyclic shift when the window covers the whole (padded) map; the official code always
    shifts. At the papers' sizes every map is larger than the window.
    """

    SIZES = {  # embed dim, depths, heads (Swin paper)
        "swin_t": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
        "swin_s": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
        "swin_b": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
        "swin_l": (192, (2, 2, 18, 2), (6, 12, 24, 48)),
    }

    def __init__(self, name="swin_t", drop_path=0.3, window_size=7):
        super().__init__()
        dim, depths, heads = self.SIZES[name]
        net = torchvision.models.SwinTransformer(
            patch_size=[4, 4], embed_dim=dim, depths=list(depths), num_heads=list(heads),
            window_size=[window_size, window_size], stochastic_depth_prob=drop_path,
        )
        self.features = net.features  # [patch embed, stage 1, merge, stage 2, merge, stage 3, merge, stage 4]
        self.channels = {f"res{i + 2}": dim * 2 ** i for i in range(4)}
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in self.channels.values())

    def forward(self, x):
        """x (B, 3, H, W) -> res2..res5 (B, C_l, H/2^(l), W/2^(l)) for strides 4..32."""
        out = {}
        for i, stage in enumerate(self.features):
            x = stage(x)  # channels-last (B, h, w, C) after the patch embedding
            if i % 2 == 1:
                level = i // 2
                out[f"res{level + 2}"] = self.norms[level](x).permute(0, 3, 1, 2).contiguous()
        return out


def build_backbone(cfg):
    """The backbone named by `cfg.name` (a BackboneConfig), optionally with ImageNet weights."""
    if cfg.name in ResNet.DEPTHS:
        backbone = ResNet(cfg.name, cfg.norm)
    elif cfg.name in Swin.SIZES:
        backbone = Swin(cfg.name, cfg.drop_path, cfg.window_size)
    else:
        raise ValueError(f"unknown backbone {cfg.name!r}; valid: {', '.join([*ResNet.DEPTHS, *Swin.SIZES])}")
    if cfg.weights:
        load_backbone_weights(backbone, cfg.weights)
    return backbone


def load_backbone_weights(backbone, path):
    """Load a torchvision ImageNet state dict; the classifier head is not part of the backbone."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head.", "norm."))}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("norms.")]  # our per-stage output norms are new
    if missing or unexpected:
        raise ValueError(f"{path}: not a matching torchvision state dict (missing {missing[:5]}, unexpected {unexpected[:5]})")


# ---- the masked-attention transformer decoder ----------------------------------------------


class AttentionLayer(nn.Module):
    """Post-norm residual attention: x = norm(x + attn(x + query_pos, memory + pos, memory))."""

    def __init__(self, *, dim, heads, dropout=0.0):
        super().__init__()
        self.attn = MultiheadAttention(dim=dim, heads=heads, dropout=dropout)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, query_pos, memory=None, pos=None, allowed=None):
        """x (B, Q, C); memory (B, S, C) (None: self-attention over x); pos (1 or B, S, C)."""
        if memory is None:
            memory, pos = x, query_pos
        out = self.attn(x + query_pos, memory + pos, memory, allowed)
        return self.norm(x + self.dropout(out))


class FFNLayer(nn.Module):
    """Post-norm residual ReLU feed-forward network."""

    def __init__(self, *, dim, ffn_dim, dropout=0.0):
        super().__init__()
        self.linear1 = Linear(dim, ffn_dim)
        self.linear2 = Linear(ffn_dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        """x (B, Q, C) -> (B, Q, C)."""
        return self.norm(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class MLP(nn.Module):
    """Linear layers with ReLU between them."""

    def __init__(self, in_dim, hidden_dim, out_dim, num_layers):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        """x (..., in_dim) -> (..., out_dim)."""
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MaskedAttentionDecoder(nn.Module):
    """Learned queries refined by `layers` rounds of masked cross-attention -> self-attention ->
    FFN; round i attends to level i mod 3 of [1/32, 1/16, 1/8], only where the previous
    prediction's mask (resized to that level) has probability >= 0.5.

    Every round (and the initial queries) predicts class logits and masks: deep supervision.
    """

    def __init__(self, *, num_classes, in_dim=256, dim=256, queries=100, layers=9, heads=8, ffn_dim=2048,
                 mask_dim=256, dropout=0.0, levels=3):
        super().__init__()
        self.levels = levels
        self.input_proj = nn.ModuleList(  # identity at the reference width (encoder dim == decoder dim)
            nn.Identity() if in_dim == dim else Conv1x1(in_dim, dim) for _ in range(levels)
        )
        for proj in self.input_proj:
            if isinstance(proj, nn.Conv2d):
                nn.init.kaiming_uniform_(proj.weight, a=1)
                nn.init.zeros_(proj.bias)
        self.query_feat = nn.Embedding(queries, dim)  # the queries' content
        self.query_embed = nn.Embedding(queries, dim)  # the queries' positional part
        self.level_embed = nn.Embedding(levels, dim)
        self.cross_attn = nn.ModuleList(AttentionLayer(dim=dim, heads=heads, dropout=dropout) for _ in range(layers))
        self.self_attn = nn.ModuleList(AttentionLayer(dim=dim, heads=heads, dropout=dropout) for _ in range(layers))
        self.ffn = nn.ModuleList(FFNLayer(dim=dim, ffn_dim=ffn_dim, dropout=dropout) for _ in range(layers))
        for layer in [*self.cross_attn, *self.self_attn, *self.ffn]:  # official: xavier on every matrix
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        self.decoder_norm = nn.LayerNorm(dim)
        self.class_embed = Linear(dim, num_classes + 1)  # the last class is "no object"
        self.mask_embed = MLP(dim, dim, mask_dim, 3)

    def forward(self, multi_scale, mask_features):
        """multi_scale: [(B, C, h_l, w_l)] for 1/32, 1/16, 1/8; mask_features (B, C, H/4, W/4).

        Returns {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, H/4, W/4), "aux_outputs": the
        same for the 9 earlier predictions, first to last}.
        """
        memory, pos, shapes = [], [], []
        for level, x in enumerate(multi_scale):
            h, w = x.shape[-2:]
            shapes.append((h, w))
            pos.append(sine_embedding_tokens(h, w, x.shape[1], x.device).to(x.dtype))  # (1, h*w, C)
            memory.append(self.input_proj[level](x).flatten(2).transpose(1, 2) + self.level_embed.weight[level])
        B = mask_features.shape[0]
        query_pos = self.query_embed.weight[None].expand(B, -1, -1)  # (B, Q, C)
        x = self.query_feat.weight[None].expand(B, -1, -1)
        predictions = [self.predict(x, mask_features, shapes[0])]
        for i in range(len(self.cross_attn)):
            level = i % self.levels
            allowed = predictions[-1][2]
            x = self.cross_attn[i](x, query_pos, memory[level], pos[level], allowed)
            x = self.self_attn[i](x, query_pos)
            x = self.ffn[i](x)
            predictions.append(self.predict(x, mask_features, shapes[(i + 1) % self.levels]))
        outputs = [{"pred_logits": logits, "pred_masks": masks} for logits, masks, _ in predictions]
        return {**outputs[-1], "aux_outputs": outputs[:-1]}

    def predict(self, x, mask_features, attn_size):
        """Heads on the queries x (B, Q, C): class logits (B, Q, K+1), mask logits (B, Q, H/4, W/4)
        and the attention mask for the next round (B, Q, h*w) at size `attn_size`."""
        x = self.decoder_norm(x)
        logits = self.class_embed(x)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(x), mask_features)
        small = F.interpolate(masks, size=attn_size, mode="bilinear", align_corners=False)
        allowed = small.sigmoid().flatten(2) >= 0.5  # (B, Q, h*w)
        # A query whose mask is empty at this level may look everywhere (official behaviour).
        allowed = allowed | ~allowed.any(-1, keepdim=True)
        return logits, masks, allowed.detach()


def sine_embedding_tokens(h, w, dim, device):
    """The encoder's sine position embedding as tokens: (1, h*w, dim)."""
    return sine_position_embedding(h, w, dim // 2, device=device).flatten(1).T[None]


# ---- point sampling (PointRend): masks are compared at sampled points, never in full -------


def point_sample(input, point_coords):
    """Bilinearly read `input` at normalised points.

    input:        (N, C, H, W)
    point_coords: (N, P, 2), (x, y) in [0, 1] over the whole map (0 = left/top edge, 1 = right/
                  bottom edge, not pixel centres); a 4-d grid (N, Hg, Wg, 2) also works
    returns:      (N, C, P)  (or (N, C, Hg, Wg) for a 4-d grid)
    """
    flat = point_coords.dim() == 3
    grid = point_coords[:, :, None] if flat else point_coords  # (N, P, 1, 2)
    out = F.grid_sample(input, 2 * grid - 1, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[..., 0] if flat else out


def calculate_uncertainty(logits):
    """PointRend's uncertainty of a mask logit: highest (0) on the decision boundary."""
    return -logits.abs()


def sample_uncertain_points(logits, num_points, oversample_ratio, importance_sample_ratio):
    """PointRend's training points: oversample uniformly, keep the most uncertain ones, then
    top up with fresh uniform points so the loss still sees the whole mask.

    logits: (N, 1, h, w) -> (N, num_points, 2) as (x, y) in [0, 1]; the uncertain points first.
    """
    N = logits.shape[0]
    candidates = torch.rand(N, int(num_points * oversample_ratio), 2, device=logits.device)  # (N, S, 2)
    uncertainty = calculate_uncertainty(point_sample(logits, candidates))[:, 0]  # (N, S)
    num_uncertain = int(importance_sample_ratio * num_points)
    idx = uncertainty.topk(num_uncertain, dim=1).indices  # (N, U)
    points = candidates.gather(1, idx[..., None].expand(-1, -1, 2))  # (N, U, 2)
    num_random = num_points - num_uncertain
    if num_random > 0:
        points = torch.cat([points, torch.rand(N, num_random, 2, device=logits.device)], dim=1)
    return points


# ---- Hungarian matching ----------------------------------------------------------------------


def pairwise_sigmoid_ce(inputs, targets):
    """BCE-with-logits of every prediction against every target, averaged over points.

    inputs: (Q, P) logits; targets: (n, P) in [0, 1]; returns (Q, n)
    """
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")  # (Q, P)
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")  # (Q, P)
    loss = torch.einsum("qp,np->qn", pos, targets) + torch.einsum("qp,np->qn", neg, 1 - targets)
    return loss / inputs.shape[1]


def pairwise_dice(inputs, targets):
    """Dice loss (+1 smoothing) of every prediction against every target.

    inputs: (Q, P) logits; targets: (n, P) in [0, 1]; returns (Q, n)
    """
    inputs = inputs.sigmoid()
    numerator = 2 * torch.einsum("qp,np->qn", inputs, targets)  # (Q, n)
    denominator = inputs.sum(-1)[:, None] + targets.sum(-1)[None, :]  # (Q, n)
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to targets, image by image, minimising

        C = cost_class · (-p(target class)) + cost_mask · BCE + cost_dice · dice

    Unmatched queries are later trained towards "no object". The costs are normally the loss
    weights.

    Random points: exactly one `torch.rand(1, num_points, 2)` is drawn per image, in batch order,
    also for images without targets (as the official code does), so a batched call consumes the
    RNG like the matcher called image by image (one rand(B, P, 2) does on CPU, not on CUDA).
    """

    def __init__(self, *, cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=12544):
        super().__init__()
        if cost_class == cost_mask == cost_dice == 0:
            raise ValueError("all matching costs are 0")
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.num_points = num_points

    @torch.no_grad()
    def forward(self, outputs, targets):
        """Match every image of the batch.

        outputs: {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, h, w)} (extra keys ignored)
        targets: B dicts {"labels": (n,) int64, "masks": (n, H, W) bool/float} at the padded
                 image size ((H, W) may differ from (h, w): points are normalised)
        returns: B pairs (pred_idx, tgt_idx) of int64 CPU tensors of length min(Q, n)
        """
        masks, sizes = outputs["pred_masks"], [len(t["labels"]) for t in targets]
        points = torch.cat([torch.rand(1, self.num_points, 2, device=masks.device) for _ in targets])  # (B, P, 2)
        # The costs of all images at once, only the assignment image by image.
        cost = self.cost_matrix(outputs["pred_logits"], masks, [t["labels"] for t in targets],
                                [t["masks"] for t in targets], points).cpu()  # (B, Q, max n)
        if not all(torch.isfinite(cost[b, :, :n]).all() for b, n in enumerate(sizes)):
            raise FloatingPointError("non-finite matching cost: the predictions hold NaN or inf")
        return [tuple(torch.as_tensor(i, dtype=torch.int64) for i in linear_sum_assignment(cost[b, :, :n].numpy()))
                for b, n in enumerate(sizes)]

    def cost_matrix(self, logits, masks, tgt_labels, tgt_masks, points):
        """C (B, Q, N) of a batch: logits (B, Q, K+1), mask logits (B, Q, h, w), per image target
        labels (n_b,) and masks (n_b, H_b, W_b) (lists), compared at each image's normalised points
        (B, P, 2); N = max n_b, columns from n_b on are padding (0). One image without the batch
        dim (tensors; points (1, P, 2)) gives its (Q, n)."""
        if logits.dim() == 2:
            return self.cost_matrix(logits[None], masks[None], [tgt_labels], [tgt_masks], points)[0]
        B, Q, N = logits.shape[0], logits.shape[1], max(len(labels) for labels in tgt_labels)
        # fp32 even under mixed precision: sums over ~12k points, small differences matter.
        with torch.autocast(device_type=masks.device.type, enabled=False):
            prob = logits.float().softmax(-1)  # (B, Q, K+1)
            out_points = point_sample(masks.float(), points)  # (B, Q, P): every image in one call
            cost = prob.new_zeros(B, Q, N)
            for b, (labels, tgt) in enumerate(zip(tgt_labels, tgt_masks)):
                if len(labels) == 0:
                    continue
                # Per image from here: target sizes may differ, and einsums on (Q, P) x (n_b, P)
                # give the per-image costs bit for bit (one over targets padded to N rounds
                # otherwise in MKL, which could flip a near-tie in the assignment).
                tgt = tgt[None].to(device=masks.device, dtype=torch.float32)  # (1, n_b, H_b, W_b)
                tgt_points = point_sample(tgt, points[b : b + 1])[0]  # (n_b, P)
                cost_class = -prob[b][:, labels.to(prob.device)]  # (Q, n_b); the 1 of 1-p changes nothing
                cost[b, :, : len(labels)] = (self.cost_mask * pairwise_sigmoid_ce(out_points[b], tgt_points)
                                             + self.cost_class * cost_class
                                             + self.cost_dice * pairwise_dice(out_points[b], tgt_points))
            return cost


# ---- the set criterion ---------------------------------------------------------------------


def sigmoid_ce_loss(inputs, targets, num_masks):
    """Point-wise BCE, averaged over points, summed over masks, divided by num_masks.

    inputs: (N, P) logits; targets: (N, P) in [0, 1]; returns a scalar
    """
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")  # (N, P)
    return loss.mean(1).sum() / num_masks


def dice_loss(inputs, targets, num_masks):
    """Dice loss on sigmoid probabilities (+1 smoothing), summed over masks, divided by num_masks.

    inputs: (N, P) logits; targets: (N, P) in [0, 1]; returns a scalar
    """
    inputs = inputs.sigmoid()
    numerator = 2 * (inputs * targets).sum(-1)  # (N,)
    denominator = inputs.sum(-1) + targets.sum(-1)  # (N,)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


class SetCriterion(nn.Module):
    """Mask2Former's loss: match with `matcher`, then cross-entropy on all queries and point-sampled
    BCE + dice on the matched masks, for the final prediction and every auxiliary one.

    Returns the losses already multiplied by their weights (the official model multiplies by its
    `weight_dict` after the criterion; the numbers are the same).
    """

    def __init__(self, *, num_classes, matcher, class_weight=2.0, mask_weight=5.0, dice_weight=5.0,
                 no_object_weight=0.1, num_points=12544, oversample_ratio=3.0, importance_sample_ratio=0.75):
        super().__init__()
        self.num_classes, self.matcher = num_classes, matcher
        self.class_weight, self.mask_weight, self.dice_weight = class_weight, mask_weight, dice_weight
        self.num_points, self.oversample_ratio = num_points, oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        # Most queries are "no object": down-weight that class so it doesn't swamp the CE. A
        # persistent buffer of this name, because official checkpoints hold `criterion.empty_weight`.
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight)

    @staticmethod
    def matched_queries(indices):
        """(batch_idx, query_idx), each (N,), to index (B, Q, ...) outputs at the matched queries."""
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
        return batch_idx, torch.cat([src for src, _ in indices])

    def loss_labels(self, outputs, targets, indices):
        """Cross-entropy over all B·Q queries; unmatched ones target class K ("no object")."""
        logits = outputs["pred_logits"].float()  # (B, Q, K+1)
        batch_idx, query_idx = self.matched_queries(indices)
        matched = torch.cat([t["labels"][tgt.to(t["labels"].device)] for t, (_, tgt) in zip(targets, indices)])
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)  # (B, Q)
        classes[batch_idx.to(logits.device), query_idx.to(logits.device)] = matched.to(logits.device)
        return F.cross_entropy(logits.transpose(1, 2), classes, self.empty_weight)  # weighted mean

    def loss_masks(self, outputs, targets, indices, num_masks):
        """Point-sampled BCE and dice between matched predicted and target masks: (bce, dice)."""
        pred_masks = outputs["pred_masks"]
        batch_idx, query_idx = self.matched_queries(indices)
        src = pred_masks[batch_idx.to(pred_masks.device), query_idx.to(pred_masks.device)][:, None]  # (N, 1, h, w)
        # Pad the matched target masks to the batch's largest size (a no-op when all have it).
        H = max(t["masks"].shape[-2] for t in targets)
        W = max(t["masks"].shape[-1] for t in targets)
        tgt = []
        for t, (_, idx) in zip(targets, indices):
            m = t["masks"][idx.to(t["masks"].device)]  # (n_matched, H_b, W_b)
            padded = m.new_zeros((m.shape[0], H, W))
            padded[:, : m.shape[1], : m.shape[2]] = m
            tgt.append(padded)
        tgt = torch.cat(tgt).to(src)[:, None]  # (N, 1, H, W)
        # Normalised points read predictions at (h, w) and targets at (H, W) at the same places.
        with torch.no_grad():
            points = sample_uncertain_points(src, self.num_points, self.oversample_ratio,
                                             self.importance_sample_ratio)  # (N, P, 2)
            labels = point_sample(tgt, points)[:, 0]  # (N, P)
        logits = point_sample(src, points)[:, 0]  # (N, P)
        # With no targets in the whole batch (N = 0) both are empty sums that still depend on
        # pred_masks, so backward gives zero gradients rather than none.
        return sigmoid_ce_loss(logits, labels, num_masks), dice_loss(logits, labels, num_masks)

    @staticmethod
    def average_num_masks(targets, device):
        """Target masks per rank, averaged over ranks (DDP) and at least 1, as a float."""
        num_masks = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        world_size = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every rank divides by the same number, so gradients average correctly over ranks.
            torch.distributed.all_reduce(num_masks)
            world_size = torch.distributed.get_world_size()
        return torch.clamp(num_masks / world_size, min=1).item()

    def weighted_losses(self, outputs, targets, indices, num_masks, suffix):
        loss_mask, loss_dice = self.loss_masks(outputs, targets, indices, num_masks)
        return {
            "loss_ce" + suffix: self.class_weight * self.loss_labels(outputs, targets, indices),
            "loss_mask" + suffix: self.mask_weight * loss_mask,
            "loss_dice" + suffix: self.dice_weight * loss_dice,
        }

    def forward(self, outputs, targets):
        """outputs: {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, h, w), optional "aux_outputs"
        list of the same}; targets: B dicts {"labels": (n,), "masks": (n, H, W)}.

        Returns weighted scalars "loss_ce", "loss_mask", "loss_dice", and "loss_ce_i", ... for
        auxiliary output i.
        """
        # Call order (matcher, point sampling, then each aux output) is the official one, so a
        # seed draws the same points.
        indices = self.matcher(outputs, targets)
        num_masks = self.average_num_masks(targets, outputs["pred_logits"].device)
        losses = self.weighted_losses(outputs, targets, indices, num_masks, suffix="")
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            # Every round is matched on its own: early rounds may prefer other queries.
            losses.update(self.weighted_losses(aux, targets, self.matcher(aux, targets), num_masks, f"_{i}"))
        return losses


AMP_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(device_type, amp):
    """Mixed precision by name: "fp32" (none), "fp16" or "bf16"."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"unknown amp {amp!r}; valid: {', '.join(AMP_DTYPES)}")
    dtype = AMP_DTYPES[amp]
    return nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


# ---- the meta-architecture -----------------------------------------------------------------


class Mask2Former(nn.Module):
    """backbone -> encoder -> decoder of a ModelConfig; the criterion in training, post-processing in inference."""

    def __init__(self, cfg):
        super().__init__()
        require_classes(cfg)  # None (the dataset's) is resolved before a model is built: one clear line
        if any(not 0 <= k < cfg.num_classes for k in cfg.thing_classes):
            raise ValueError(f"thing_classes must lie in 0..{cfg.num_classes - 1}")
        self.cfg = cfg
        self.size_divisibility = cfg.size_divisibility
        self.backbone = build_backbone(cfg.backbone)
        self.encoder = build_encoder(cfg=cfg.encoder, in_channels=self.backbone.channels)
        d, loss = cfg.decoder, cfg.loss
        self.decoder = MaskedAttentionDecoder(
            num_classes=cfg.num_classes, in_dim=self.encoder.dim, dim=d.dim, queries=d.queries, layers=d.layers,
            heads=d.heads, ffn_dim=d.ffn_dim, mask_dim=self.encoder.dim, dropout=d.dropout)
        matcher = HungarianMatcher(cost_class=loss.class_weight, cost_mask=loss.mask_weight,
                                   cost_dice=loss.dice_weight, num_points=loss.num_points)
        self.criterion = SetCriterion(
            num_classes=cfg.num_classes, matcher=matcher, class_weight=loss.class_weight,
            mask_weight=loss.mask_weight, dice_weight=loss.dice_weight, no_object_weight=loss.no_object_weight,
            num_points=loss.num_points, oversample_ratio=loss.oversample_ratio,
            importance_sample_ratio=loss.importance_sample_ratio)
        self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(3, 1, 1), persistent=False)

    def preprocess(self, images):
        """A list of (3, H_i, W_i) RGB images in 0-255 -> a normalised batch (B, 3, H, W), zero-padded
        at the bottom/right to a multiple of `size_divisibility`, and the list of (H_i, W_i)."""
        sizes = [tuple(img.shape[-2:]) for img in images]
        d = self.size_divisibility
        H = math.ceil(max(h for h, _ in sizes) / d) * d
        W = math.ceil(max(w for _, w in sizes) / d) * d
        batch = self.pixel_mean.new_zeros(len(images), 3, H, W)
        for b, img in enumerate(images):
            batch[b, :, : img.shape[1], : img.shape[2]] = (img.to(batch) - self.pixel_mean) / self.pixel_std
        return batch, sizes

    def forward(self, images, targets=None, exit=None):
        """images (B, 3, H, W) from `preprocess`; targets: None, or per image {"labels": (n,) long,
        "masks": (n, H, W)} at the padded size; exit: the encoder exit, None (all layers), an int, or
        a LongTensor (B,) of per-image exits (see `forward_gated` for ECO-M2F's gate).

        Returns the weighted losses (a dict of scalars) when targets are given, else the decoder's
        predictions {"pred_logits": (B, Q, K+1), "pred_masks": (B, Q, H/s, W/s), "aux_outputs"}.
        """
        outputs = self.predict(self.backbone_features(images), exit, targets)
        if targets is None and torch.is_tensor(exit) and exit.dim() == 1:
            outputs["exits"] = exit
        return outputs

    def backbone_features(self, images):
        """images (B, 3, H, W) -> res2..res5 maps in float32 (the backbone itself may run under autocast)."""
        features = self.backbone(images)
        return {k: v.float() for k, v in features.items()}

    def predict(self, features, exit=None, targets=None):
        """Encoder (up to `exit`) and decoder on backbone features; losses when targets are given."""
        with self.fp32(features["res5"]):
            mask_features, multi_scale = self.encoder(features, exit=exit)
        outputs = self.decoder(multi_scale, mask_features)
        return outputs if targets is None else self.loss(outputs, targets)

    def gate_features(self, images, features=None):
        """z(s₁) of ECO-M2F Eq. 6: the mean over tokens of the projected 1/32 map (after the input
        projection and GroupNorm, before any encoder layer, without position embedding), (B, dim).
        The one place that computes it: gated inference and Step C's training both call it.
        features: backbone_features(images), when the caller has them already."""
        features = self.backbone_features(images) if features is None else features
        with self.fp32(features["res5"]):
            return self.encoder.gate_map(features).mean(dim=(2, 3))  # (B, dim, h, w) -> (B, dim)

    def forward_gated(self, images, gate):
        """ECO-M2F inference: `gate` picks each image's exit from gate_features, then the encoder
        runs each image up to its exit (in a batch, layer l only on the images that still need it).
        Returns forward's predictions plus "exits" (B,)."""
        features = self.backbone_features(images)
        exits = check_exit(self.encoder, gate(self.gate_features(images, features)), "the gate's exits")
        return {**self.predict(features, exits), "exits": exits}

    def forward_exits(self, images, exits, targets=None):
        """One backbone and encoder pass, the decoder at every exit in `exits`: a dict exit ->
        predictions (or weighted losses when targets are given), each as forward(exit=k) gives."""
        features = self.backbone_features(images)
        with self.fp32(images):
            encoded = self.encoder.forward_exits(features, exits)
        results = {}
        for k, (mask_features, multi_scale) in encoded.items():
            outputs = self.decoder(multi_scale, mask_features)
            results[k] = outputs if targets is None else self.loss(outputs, targets)
        return results

    def loss(self, outputs, targets):
        if not self.cfg.loss.deep_supervision:
            outputs = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        return self.criterion(outputs, targets)

    @staticmethod
    def fp32(tensor):
        """The official encoder runs in fp32 even under mixed precision. (The meta device, used to
        count FLOPs on shapes alone, has no autocast.)"""
        return torch.autocast(tensor.device.type, enabled=False) if tensor.device.type != "meta" else nullcontext()

    @torch.no_grad()
    def inference(self, outputs, image_sizes, output_sizes=None, semantic="scores"):
        """Post-process the final predictions of `forward` for every image.

        image_sizes: (H_i, W_i) of each image inside the padded batch; output_sizes: the sizes to
        resize to (the original image sizes; default image_sizes). Returns per image a dict with
        "sem_seg" (K, H, W) (semantic="labels": "sem_seg_labels", the (H, W) int64 argmax
        instead), "panoptic_seg" ((H, W) int32 ids, segments_info) and "instances" {"masks",
        "scores", "labels"}, as enabled in the InferenceConfig.
        """
        if semantic not in ("scores", "labels"):
            raise ValueError(f"semantic={semantic!r}: 'scores' or 'labels'")
        cfg = self.cfg.inference
        output_sizes = output_sizes or image_sizes
        masks = outputs["pred_masks"]  # (B, Q, H/s, W/s) of the padded batch
        stride = self.encoder.mask_stride
        padded = (masks.shape[-2] * stride, masks.shape[-1] * stride)
        is_thing = torch.zeros(self.cfg.num_classes, dtype=torch.bool, device=masks.device)
        is_thing[list(self.cfg.thing_classes)] = True
        results = []
        for logits, mask_pred, size, out_size in zip(outputs["pred_logits"], masks, image_sizes, output_sizes):
            # On the meta device (FLOP counting from shapes) the panoptic and instance steps are
            # skipped: they look at values, and hold no counted op.
            values, logits = not mask_pred.is_meta, logits.float()
            if values and cfg.panoptic and not (cfg.instance or cfg.semantic or observed()):
                # panoptic alone: each kept plane is resized where the contest reads it, never the stack
                resize = partial(upsample_predictions, padded_size=padded, image_size=size, output_size=out_size)
                results.append({"panoptic_seg": panoptic_inference(logits, mask_pred.float(), is_thing,
                                                                   cfg.object_mask_threshold, cfg.overlap_threshold,
                                                                   resize=resize)})
                continue
            mask_pred = upsample_predictions(mask_pred.float(), padded, size, out_size)  # (Q, H_out, W_out)
            result = {}
            if cfg.instance and values:  # first: it needs the logits' signs
                result["instances"] = instance_inference(logits, mask_pred, is_thing, cfg.topk_per_image,
                                                         panoptic_on=cfg.panoptic)
            if cfg.semantic:  # the masks become probabilities in place, once for the semantic and panoptic steps
                mask_pred = mask_pred.sigmoid_()
                if semantic == "labels":
                    result["sem_seg_labels"] = semantic_labels(logits, mask_pred)
                else:
                    result["sem_seg"] = semantic_inference(logits, mask_pred, probabilities=True)
            if cfg.panoptic and values:
                result["panoptic_seg"] = panoptic_inference(logits, mask_pred, is_thing, cfg.object_mask_threshold,
                                                            cfg.overlap_threshold, probabilities=cfg.semantic)
            results.append({key: result[key] for key in ("panoptic_seg", "instances", "sem_seg", "sem_seg_labels")
                            if key in result})
        return results


def build_model(cfg):
    """Mask2Former for a Config (or its ModelConfig)."""
    return Mask2Former(getattr(cfg, "model", cfg))
