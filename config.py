"""Configuration: dataclasses with the reference settings, read from YAML with `_base_` inheritance.

    cfg = load_config("configs/coco/m2f_r50.yaml", ["model.encoder.layers=3", "train.lr=2e-4"])

A YAML file may name `_base_: path` (or a list of paths), relative to itself; the file's own keys
are merged over its bases, dictionaries key by key. Command-line overrides `key.sub=value` come
last. Every key must exist in the dataclasses below and every value must have the field's type:
anything else is an error naming the key and the file. Every default below is the official
Mask2Former setting (COCO panoptic, ResNet-50) unless its comment says otherwise.

The classes (model.num_classes, model.thing_classes) default to None, "the dataset's": train.py
takes them from data.train.json before it builds the model (with_classes) and stores the resolved
config and the class names in its checkpoints; a script given --weights alone reads that config
back (load_run_config).
"""
import dataclasses
import glob
import math
import os
import pickle
import re
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class BackboneConfig:
    name: str = "resnet50"  # resnet18/34/50/101, swin_t/s/b/l (see model.build_backbone)
    norm: str = "frozen_bn"  # ResNet norm: frozen_bn (COCO), bn, syncbn (Cityscapes)
    drop_path: float = 0.3  # Swin stochastic depth rate (all Mask2Former Swin configs use 0.3)
    window_size: int = 7  # Swin window: 7 for T/S, 12 for the 384-pretrained B/L
    weights: str = ""  # a torchvision ImageNet state dict (.pth) to start from; "" = random init


@dataclass
class LiteConfig:
    """Lite-M2F (encoder name: lite), Lite-DETR's interleaved update. The encoder's `layers` split
    into `blocks` blocks of layers/blocks layers: high-only layers, then one full layer. The
    papers' "H3L1-(5+1)x1" is layers 6, blocks 1. Width, heads, points, FFN: the encoder's own."""

    high_levels: int = 2  # the high-level scales, lowest resolution first: 2 = 1/32 and 1/16 (1..3)
    blocks: int = 1  # Lite-DETR's num_expansion; must divide `layers`


@dataclass
class RTConfig:
    """RT-M2F (encoder name: rt), RT-DETR's hybrid encoder; the defaults are the authors'
    cfg.MODEL.RT_DETR_ENCODER. Hidden width, AIFI heads, FFN and dropout: the encoder's dim,
    heads, ffn_dim, dropout (256, 8, 1024, 0.0). Its mask features are at 1/8 (mask_branch: none)."""

    aifi_levels: list[str] = field(default_factory=lambda: ["res5"])  # AIFI maps (RT_DETR_USE_ENCODER_IDX [2])
    aifi_layers: int = 1  # transformer layers per AIFI map (RT_DETR_NUM_ENC_LAYERS)
    aifi_activation: str = "gelu"  # AIFI FFN activation (RT_DETR_ENC_ACT)
    temperature: float = 10000.0  # of the 2-D sin-cos position embedding (RT_DETR_PE_TEMP)
    pe_official_order: bool = False  # RT-DETR's flattening of the embedding (wrong on non-square maps)
    csp_blocks: int = 3  # RepVGG blocks per CSPRep block: round(3 x depth multiplier 1)
    expansion: float = 1.0  # CSPRep hidden width = int(dim x expansion) (RT_DETR_EXPANSION)
    activation: str = "silu"  # CCFM activation (RT_DETR_ACT): silu, relu, gelu, leaky_relu


@dataclass
class EncoderConfig:
    name: str = "m2f"  # see encoders.build_encoder
    dim: int = 256
    heads: int = 8
    points: int = 4
    ffn_dim: int = 1024
    layers: int = 6
    dropout: float = 0.0
    mask_branch: str = "conv"  # 1/4 branch: conv (3x3 conv), lpe_max / lpe_avg (PRO-SCALE LPE), none (C1)
    attention: str = "torch"  # deformable attention: torch (grid_sample) | native (csrc/ C++/CUDA op) | auto (msda.py)
    # PRO-SCALE (name: proscale)
    depths: list[int] = field(default_factory=lambda: [3, 3, 3])  # (p1, p2, p3) layers per stage
    trc: bool = True  # token re-calibration
    trc_epsilon: float = 0.1
    trc_official_layout: bool = False  # reproduce the official token-to-map reshape (no transpose)
    lite: LiteConfig = field(default_factory=LiteConfig)  # Lite-M2F (name: lite)
    rt: RTConfig = field(default_factory=RTConfig)  # RT-M2F (name: rt)


@dataclass
class DecoderConfig:
    queries: int = 100
    layers: int = 9  # official DEC_LAYERS is 10: it counts the prediction from the initial queries
    dim: int = 256
    heads: int = 8
    ffn_dim: int = 2048
    dropout: float = 0.0


@dataclass
class LossConfig:
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    num_points: int = 12544  # 112 x 112 points per mask for matching and losses
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    deep_supervision: bool = True


@dataclass
class InferenceConfig:
    object_mask_threshold: float = 0.8
    overlap_threshold: float = 0.8
    topk_per_image: int = 100
    panoptic: bool = True
    instance: bool = True
    semantic: bool = True


@dataclass
class ModelConfig:
    # None (null in YAML) = the dataset's: the categories of data.train.json, which train.py reads
    # before building the model (COCO: 133, the 80 things first). A value set here wins, and must
    # agree with that JSON.
    num_classes: int | None = None
    # Contiguous ids (categories sorted by id) of the "thing" classes: instance output and panoptic
    # instances use them. None = the JSON's categories with isthing 1.
    thing_classes: list[int] | None = None
    size_divisibility: int = 32
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])  # RGB, 0-255
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)


@dataclass
class SplitConfig:
    """One split in COCO panoptic format; paths are relative to DataConfig.root."""

    images: str = ""  # image folder (Cityscapes: files may sit in per-city subfolders)
    panoptic: str = ""  # folder of RGB-encoded id PNGs
    json: str = ""  # panoptic JSON: images, annotations[].segments_info, categories
    instances: str = ""  # instance JSON for AP; "" = derived from the panoptic annotations


@dataclass
class DataConfig:
    # Dataset root; "" = $DETECTRON2_DATASETS, or ./datasets when that is unset.
    root: str = ""
    # The built-in synthetic set (`python synthetic.py --out datasets/synthetic`) unless a
    # config names another dataset.
    train: SplitConfig = field(default_factory=lambda: SplitConfig(
        "synthetic/train/images", "synthetic/train/panoptic", "synthetic/train/panoptic.json",
        "synthetic/train/instances.json"))
    val: SplitConfig = field(default_factory=lambda: SplitConfig(
        "synthetic/val/images", "synthetic/val/panoptic", "synthetic/val/panoptic.json",
        "synthetic/val/instances.json"))
    augment: str = "lsj"  # lsj (COCO), cityscapes, none
    crop_size: list[int] = field(default_factory=lambda: [1024, 1024])  # (H, W) of the training crop
    min_scale: float = 0.1  # LSJ: scale range of the crop size
    max_scale: float = 2.0
    short_side: list[int] = field(default_factory=lambda: [512, 2048])  # cityscapes: short side range
    max_size: int = 4096  # cityscapes: long side limit in training
    color_jitter: bool = False  # cityscapes: SSD-style photometric distortion
    test_short_side: int = 800  # test-time resize (Cityscapes: 1024 / 2048)
    test_max_size: int = 1333
    workers: int = 4  # data loader processes per rank


@dataclass
class TrainConfig:
    batch_size: int = 16  # global, over all ranks
    iterations: int = 368750  # 50 COCO epochs
    lr: float = 1e-4
    weight_decay: float = 0.05  # 0 for norms, embeddings and Swin relative position tables
    backbone_lr_multiplier: float = 0.1
    clip_grad_norm: float = 0.01  # full-model L2 norm
    schedule: str = "step"  # step (lr x gamma at each of `steps`), poly (Cityscapes)
    steps: list[int] = field(default_factory=lambda: [327778, 355092])
    gamma: float = 0.1
    poly_power: float = 0.9
    amp: str = "fp16"  # fp16 (with a grad scaler, as the official code), bf16, fp32 (no autocast)
    seed: int = 0
    checkpoint_every: int = 5000
    evaluate: bool = True  # evaluate on the val split at the end (and every eval_every iterations)
    eval_every: int = 0  # 0 = only at the end
    log_every: int = 20
    compile: bool = False  # torch.compile the model
    # ECO-M2F Step A, weighted stochastic depth: with `exits` set, every iteration samples one exit
    # k (the same on every rank) and scales the whole loss by α_k; mode "all" sums α_k·L_k over
    # every exit (ECO-M2F Eq. 3 literally). Start it from a trained M2F with --init.
    exits: list[int] = field(default_factory=list)  # [] = ordinary training
    exit_alpha: list[float] = field(default_factory=list)  # α_k in the order of `exits`; [] = α_k = k
    exit_mode: str = "sample"  # sample, all
    tensorboard: bool = False


@dataclass
class GateConfig:
    """ECO-M2F Step C (gate.py)."""

    exits: list[int] = field(default_factory=lambda: [2, 3, 4, 5, 6])  # the paper's 5 classes
    beta: float = 0.0005  # u(k) = q_k - β·k; the paper: 0.0005 for COCO, 0.003 for Cityscapes
    loss: str = "hard-ce"  # hard-ce, u-ce, soft-ce, soft-mse (ECO-M2F Table 5)
    epochs: int = 2  # the paper: 2 epochs on COCO, 20k iterations on Cityscapes
    lr: float = 1e-3  # Adam; the paper does not give it
    batch_size: int = 16


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    gate: GateConfig = field(default_factory=GateConfig)


# ---- loading ------------------------------------------------------------------------------


class ConfigError(ValueError):
    pass


def read_yaml(path, base=None, _chain=()):
    """The merged dictionary of a YAML file and its `_base_` chain. `base` replaces the file's own
    `_base_` (the `_base_=FILE` command-line override: an ECO-M2F config on another backbone)."""
    path = Path(path)
    if path.resolve() in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, path.resolve()))
        raise ConfigError(f"{path}: `_base_` files include each other ({cycle})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, not {type(data).__name__}")
    bases = data.pop("_base_", [])
    if base is not None:
        bases = base
    merged = {}
    for name in [bases] if isinstance(bases, str) else bases:
        if not isinstance(name, str):
            raise ConfigError(f"{path}: `_base_` must name YAML files, got {name!r}")
        merged = merge(merged, read_yaml(path.parent / name, _chain=(*_chain, path.resolve())))
    return merge(merged, data)


def merge(base, update):
    """`update` over `base`, dictionaries merged key by key, everything else replaced."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_overrides(data, overrides):
    """Set `a.b.c=value` strings into the nested dict; values are parsed as YAML scalars/lists."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(text) if text else ""
    return data


def from_dict(cls, data, where="config", prefix="", default=None):
    """Build dataclass `cls` from a nested dict, checking every key and type. Keys not in the
    dict keep their value in `default` (an instance of cls; the class defaults if None)."""
    default = cls() if default is None else default
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or 'config'}' must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{where}: unknown key '{name}' (valid keys here: {', '.join(fields)})")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = from_dict(kind, value, where, name + ".", getattr(default, key))
        else:
            kwargs[key] = check_type(value, kind, where, name)
    return dataclasses.replace(default, **kwargs)


def check_type(value, kind, where, name):
    options = typing.get_args(kind)
    if type(None) in options:  # `X | None`: null, or a value of X
        if value is None:
            return None
        (kind,) = [k for k in options if k is not type(None)]
    origin = typing.get_origin(kind)
    if origin is list:
        (item,) = typing.get_args(kind)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: '{name}' must be a list of {item.__name__}, got {value!r}")
        return [check_type(v, item, where, f"{name}[{i}]") for i, v in enumerate(value)]
    if kind is float and isinstance(value, str):
        try:  # YAML reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: '{name}' must be {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value


# ---- validation: every numeric and named setting, checked where the config is read -------------


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def _positive(x):
    return _finite(x) and x > 0


def _non_negative(x):
    return _finite(x) and x >= 0


def _fraction(x):
    return _finite(x) and 0 <= x <= 1


def _distinct_positive_ints(xs):
    return len(set(xs)) == len(xs) and all(k >= 1 for k in xs)


ACTIVATIONS = ("silu", "relu", "gelu", "leaky_relu", "none")  # encoders.activation_layer's names

# (key, test, what the value must be). Names an encoder or backbone knows are checked where they
# are built (model.build_backbone, encoders.build_encoder), which list the valid ones.
RULES = [
    ("model.num_classes", lambda v: v is None or _positive(v), "a positive number of classes (or null: the dataset's)"),
    ("model.thing_classes", lambda v, c: v is None or (len(set(v)) == len(v) and all(
        0 <= k < (c.model.num_classes or math.inf) for k in v)), "distinct class ids in 0..model.num_classes-1"),
    ("model.size_divisibility", _non_negative, ">= 0 (0: no padding)"),
    ("model.pixel_mean", lambda v: len(v) == 3 and all(map(_finite, v)), "three finite numbers (R, G, B)"),
    ("model.pixel_std", lambda v: len(v) == 3 and all(map(_positive, v)), "three positive numbers (R, G, B)"),
    ("model.backbone.drop_path", lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)"),
    ("model.backbone.window_size", _positive, "a positive window size"),
    ("model.encoder.dim", _positive, "a positive width"),
    ("model.encoder.heads", lambda v, c: _positive(v) and c.model.encoder.dim % v == 0,
     "a positive divisor of model.encoder.dim"),
    ("model.encoder.points", _positive, "a positive number of sampling points"),
    ("model.encoder.ffn_dim", _positive, "a positive width"),
    ("model.encoder.layers", _positive, "at least 1 layer"),
    ("model.encoder.dropout", lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)"),
    ("model.encoder.mask_branch", lambda v: v in ("conv", "lpe_max", "lpe_avg", "none"), "conv, lpe_max, lpe_avg or none"),
    ("model.encoder.depths", lambda v: len(v) == 3 and min(v) >= 0 and sum(v) > 0,
     "three layer counts (p1, p2, p3) >= 0, not all 0"),
    ("model.encoder.trc_epsilon", _finite, "a finite number"),
    ("model.encoder.attention", lambda v: v in ("torch", "native", "auto"), "torch, native or auto"),
    ("model.encoder.lite.high_levels", lambda v: v in (1, 2, 3), "1, 2 or 3 (the high-level scales, from 1/32)"),
    ("model.encoder.lite.blocks", lambda v, c: _positive(v) and c.model.encoder.layers % v == 0,
     "a positive divisor of model.encoder.layers"),
    ("model.encoder.rt.aifi_levels", lambda v: len(v) > 0 and len(set(v)) == len(v) and set(v) <= {"res3", "res4", "res5"},
     "distinct levels among res3, res4, res5"),
    ("model.encoder.rt.aifi_layers", _positive, "a positive number of layers"),
    ("model.encoder.rt.aifi_activation", lambda v: v in ACTIVATIONS, ", ".join(ACTIVATIONS)),
    ("model.encoder.rt.temperature", _positive, "a positive temperature"),
    ("model.encoder.rt.csp_blocks", _positive, "a positive number of blocks"),
    ("model.encoder.rt.expansion", _positive, "a positive factor"),
    ("model.encoder.rt.activation", lambda v: v in ACTIVATIONS, ", ".join(ACTIVATIONS)),
    ("model.decoder.queries", _positive, "a positive number of queries"),
    ("model.decoder.layers", _positive, "at least 1 round"),
    ("model.decoder.dim", _positive, "a positive width"),
    ("model.decoder.heads", lambda v, c: _positive(v) and c.model.decoder.dim % v == 0,
     "a positive divisor of model.decoder.dim"),
    ("model.decoder.ffn_dim", _positive, "a positive width"),
    ("model.decoder.dropout", lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)"),
    ("model.loss.class_weight", _non_negative, "a finite weight >= 0"),
    ("model.loss.mask_weight", _non_negative, "a finite weight >= 0"),
    ("model.loss.dice_weight", _non_negative, "a finite weight >= 0"),
    ("model.loss.no_object_weight", _non_negative, "a finite weight >= 0"),
    ("model.loss.num_points", _positive, "a positive number of points"),
    ("model.loss.oversample_ratio", lambda v: _finite(v) and v >= 1, ">= 1"),
    ("model.loss.importance_sample_ratio", _fraction, "in [0, 1]"),
    ("model.inference.object_mask_threshold", _fraction, "in [0, 1]"),
    ("model.inference.overlap_threshold", _fraction, "in [0, 1]"),
    ("model.inference.topk_per_image", _positive, "a positive number"),
    ("data.augment", lambda v: v in ("lsj", "cityscapes", "none"), "lsj, cityscapes or none"),
    ("data.crop_size", lambda v: len(v) == 2 and all(map(_positive, v)), "two positive sizes (H, W)"),
    ("data.min_scale", _positive, "a positive scale"),
    ("data.max_scale", lambda v, c: _finite(v) and v >= c.data.min_scale, ">= data.min_scale"),
    ("data.short_side", lambda v: len(v) == 2 and all(map(_positive, v)) and v[0] <= v[1],
     "two positive sizes (low, high), low <= high"),
    ("data.max_size", _positive, "a positive size"),
    ("data.test_short_side", _positive, "a positive size"),
    ("data.test_max_size", lambda v, c: _finite(v) and v >= c.data.test_short_side, ">= data.test_short_side"),
    ("data.workers", _non_negative, ">= 0 (0: load in the main process)"),
    ("train.batch_size", _positive, "a positive global batch size"),
    ("train.iterations", _positive, "a positive number of iterations"),
    ("train.lr", _positive, "a positive, finite learning rate"),
    ("train.weight_decay", _non_negative, "a finite weight decay >= 0"),
    ("train.backbone_lr_multiplier", _non_negative, "a finite multiplier >= 0 (0 freezes the backbone's updates)"),
    ("train.clip_grad_norm", _non_negative, "a finite norm >= 0 (0: no clipping)"),
    ("train.schedule", lambda v: v in ("step", "poly"), "step or poly"),
    ("train.steps", lambda v: list(v) == sorted(v) and all(s >= 0 for s in v), "iterations >= 0 in increasing order"),
    ("train.gamma", _positive, "a positive factor"),
    ("train.poly_power", _positive, "a positive power"),
    ("train.amp", lambda v: v in ("fp32", "fp16", "bf16"), "fp32, fp16 or bf16"),
    ("train.checkpoint_every", _positive, "a positive number of iterations"),
    ("train.eval_every", _non_negative, ">= 0 (0: only at the end)"),
    ("train.log_every", _positive, "a positive number of iterations"),
    ("train.exits", _distinct_positive_ints, "distinct encoder layers >= 1"),
    ("train.exit_alpha", lambda v, c: all(map(_positive, v)) and len(v) in (0, len(c.train.exits)),
     "one positive α per exit of train.exits (or [] for α_k = k)"),
    ("train.exit_mode", lambda v: v in ("sample", "all"), "sample or all"),
    ("gate.exits", lambda v: len(v) > 0 and _distinct_positive_ints(v), "distinct encoder layers >= 1"),
    ("gate.beta", _non_negative, "a finite β >= 0"),
    ("gate.loss", lambda v: v in ("hard-ce", "u-ce", "soft-ce", "soft-mse"), "hard-ce, u-ce, soft-ce or soft-mse"),
    ("gate.epochs", _positive, "a positive number of epochs"),
    ("gate.lr", _positive, "a positive, finite learning rate"),
    ("gate.batch_size", _positive, "a positive batch size"),
]


def validate(cfg, where):
    """Every rule of RULES on `cfg`; the first broken one is a ConfigError naming the key and `where`."""
    for key, test, requirement in RULES:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        takes_cfg = test.__code__.co_argcount == 2
        if not (test(value, cfg) if takes_cfg else test(value)):
            raise ConfigError(f"{where}: '{key}' must be {requirement}, got {value!r}")
    return cfg


def load_config(path=None, overrides=()):
    """Config from a YAML file (or the defaults when `path` is None) plus `key=value` overrides.
    An override `_base_=FILE` (relative to the config file) replaces the file's `_base_`."""
    base = [item.partition("=")[2] for item in overrides if item.startswith("_base_=")]
    overrides = [item for item in overrides if not item.startswith("_base_=")]
    if base and not path:
        raise ConfigError("_base_=... needs a config file to apply to")
    data = read_yaml(path, base[-1] if base else None) if path else {}
    where = str(path) if path else "defaults"
    if overrides or base:
        data = apply_overrides(data, overrides)
        where += " + command line"
    return validate(from_dict(Config, data, where), where)


def config_to_dict(cfg):
    return dataclasses.asdict(cfg)


def config_from_dict(data, where="checkpoint"):
    return validate(from_dict(Config, data, where), where)


def save_config(cfg, path):
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# ---- the classes: the dataset's unless the config sets them ---------------------------------------


def with_classes(cfg, classes, where, source):
    """`cfg` with model.num_classes and model.thing_classes taken from `classes` (a dataset's
    categories in contiguous order, each with "isthing": data.dataset_classes) where the config
    leaves them None. A value the config sets must agree: a ConfigError naming the config `where`
    and the file `source` otherwise (before any model is built)."""
    m = cfg.model
    things = [k for k, c in enumerate(classes) if c["isthing"]]
    if m.num_classes is not None and m.num_classes != len(classes):
        raise ConfigError(f"{where}: model.num_classes={m.num_classes}, but {source} has {len(classes)} categories; "
                          "set it to that or leave it unset (null) to take the dataset's")
    if m.thing_classes is not None and sorted(m.thing_classes) != things:
        raise ConfigError(f"{where}: model.thing_classes={m.thing_classes}, but the things of {source} are {things} "
                          "(contiguous ids: categories sorted by id); set that or leave it unset (null)")
    model = dataclasses.replace(m, num_classes=len(classes), thing_classes=list(m.thing_classes or things))
    return dataclasses.replace(cfg, model=model)


def require_classes(model_cfg):
    """A model needs its classes; None (the dataset's) must have been resolved before it is built."""
    if model_cfg.num_classes is None or model_cfg.thing_classes is None:
        raise ConfigError("model.num_classes / model.thing_classes are not set (null: the dataset's): set them in "
                          "the config, or take them from a dataset (train.py reads data.train.json) or from "
                          "--weights that store them (train.py's model_final.pt)")


# ---- commands --------------------------------------------------------------------------------

KEEP_FREED_MEMORY = 1 << 30  # glibc malloc's mmap and trim thresholds, bytes (keep_freed_memory)


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory in the process: mmap and trim thresholds of 1 GiB
    instead of a fresh mmap for every block over ~32 MB and returning the heap's top to the system.
    A tensor allocated where one of its size was freed then reuses pages already mapped, where by
    default each large tensor page-faults on its first touch: on the 2-core VM here ~1.7 us a 4 KiB
    page, so cloning a 100 MB tensor took 55 ms against 8 ms with this (tcmalloc and jemalloc, which
    torch's CPU tuning guide preloads, do the same). The resident size stays near its peak. Called
    by every command (run_command); M2F_MALLOC=default keeps glibc's defaults; a no-op elsewhere
    than glibc. Returns whether it took effect."""
    import ctypes
    import platform

    if os.environ.get("M2F_MALLOC") == "default" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
        return bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP_FREED_MEMORY)
                    and libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED_MEMORY))
    except (OSError, AttributeError):
        return False


def run_command(main):
    """Run a script's main() (or its argument parsing) and return what it returns. An error a user
    can act on (a bad config, data file, weights file or option: ValueError, OSError, among them
    ConfigError and DataError; a non-finite loss) prints as one line naming its cause and exits
    with status 2. M2F_DEBUG=1 in the environment, or --debug on the command line, shows the whole
    traceback instead (status 1). First it tunes malloc for large tensors (keep_freed_memory)."""
    import sys

    keep_freed_memory()
    try:
        return main()
    except (ValueError, OSError, FloatingPointError) as e:
        if os.environ.get("M2F_DEBUG") or "--debug" in sys.argv[1:]:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ---- files: atomic writes and checkpoints ---------------------------------------------------
#
# torch is imported inside the functions that need it, so that reading a config (and every
# script's --help and config errors) does not wait for torch.


def atomic_write(path, write, binary=False):
    """Call write(file) on a temporary file in the same folder, flush it to disk, then rename it
    over `path`: a write killed halfway (or a full disk) leaves the previous file intact. The
    temporary file is removed on any error, and one left by a killed earlier write is removed
    by the next write of the same file. A failed write is an OSError naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        stale.unlink(missing_ok=True)  # only this file's writes use the name; a killed one left it
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)  # mkstemp makes the file 0600; give it the usual mode (0644 under umask 022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, (OSError, RuntimeError)) and str(path) not in str(e):  # a full disk, say
            raise OSError(f"{path}: could not write it ({type(e).__name__}: {e}); the previous file, "
                          "if any, is intact") from e
        raise


def atomic_write_text(path, text):
    atomic_write(path, lambda f: f.write(text))


def atomic_save(obj, path):
    """torch.save(obj) to `path`, atomically."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


# ---- checkpoints: ours and the official detectron2 ones ---------------------------------------------------------------------------


# Official (detectron2) parameter names -> ours, applied in order; `\1`... keep indices.
OFFICIAL_NAMES = [
    # ResNet (detectron2 -> torchvision layout)
    (r"^backbone\.stem\.conv1\.norm\.", "backbone.bn1."),
    (r"^backbone\.stem\.conv1\.", "backbone.conv1."),
    (r"^backbone\.res(\d)\.", lambda m: f"backbone.layer{int(m[1]) - 1}."),
    (r"(backbone\.layer\d\.\d+)\.shortcut\.norm\.", r"\1.downsample.1."),
    (r"(backbone\.layer\d\.\d+)\.shortcut\.", r"\1.downsample.0."),
    (r"(backbone\.layer\d\.\d+)\.conv(\d)\.norm\.", r"\1.bn\2."),
    # Swin (Microsoft layout -> torchvision layout)
    (r"^backbone\.patch_embed\.proj\.", "backbone.features.0.0."),
    (r"^backbone\.patch_embed\.norm\.", "backbone.features.0.2."),
    (r"^backbone\.layers\.(\d)\.blocks\.", lambda m: f"backbone.features.{2 * int(m[1]) + 1}."),
    (r"^backbone\.layers\.(\d)\.downsample\.", lambda m: f"backbone.features.{2 * int(m[1]) + 2}."),
    (r"\.mlp\.fc1\.", ".mlp.0."),
    (r"\.mlp\.fc2\.", ".mlp.3."),
    (r"^backbone\.norm(\d)\.", r"backbone.norms.\1."),
    # pixel decoder -> encoder
    (r"^sem_seg_head\.pixel_decoder\.input_proj\.", "encoder.input_proj.proj."),
    (r"^sem_seg_head\.pixel_decoder\.transformer\.level_embed$", "encoder.input_proj.level_embed"),
    (r"^sem_seg_head\.pixel_decoder\.transformer\.encoder\.layers\.", "encoder.layers."),
    (r"^sem_seg_head\.pixel_decoder\.transformer\.encoder\.token_excite\.ops\.", "encoder.trc.phi."),  # PRO-SCALE
    (r"^sem_seg_head\.pixel_decoder\.mask_features\.", "encoder.mask_branch.mask_features."),
    (r"^sem_seg_head\.pixel_decoder\.adapter_1\.norm\.", "encoder.mask_branch.lateral.1."),
    (r"^sem_seg_head\.pixel_decoder\.adapter_1\.", "encoder.mask_branch.lateral.0."),
    (r"^sem_seg_head\.pixel_decoder\.layer_1\.norm\.", "encoder.mask_branch.output.1."),
    (r"^sem_seg_head\.pixel_decoder\.layer_1\.", "encoder.mask_branch.output.0."),
    # transformer decoder
    (r"^sem_seg_head\.predictor\.transformer_self_attention_layers\.(\d+)\.self_attn\.", r"decoder.self_attn.\1.attn."),
    (r"^sem_seg_head\.predictor\.transformer_self_attention_layers\.", "decoder.self_attn."),
    (r"^sem_seg_head\.predictor\.transformer_cross_attention_layers\.(\d+)\.multihead_attn\.", r"decoder.cross_attn.\1.attn."),
    (r"^sem_seg_head\.predictor\.transformer_cross_attention_layers\.", "decoder.cross_attn."),
    (r"^sem_seg_head\.predictor\.transformer_ffn_layers\.", "decoder.ffn."),
    (r"^sem_seg_head\.predictor\.", "decoder."),
]


def official_to_ours(name):
    """Our parameter name for an official detectron2 Mask2Former name."""
    for pattern, repl in OFFICIAL_NAMES:
        name = re.sub(pattern, repl, name)
    return name


def convert_official_state_dict(state, model):
    """Rename an official state dict to ours; buffers we compute ourselves are dropped.

    Returns (state dict for `model.load_state_dict`, list of official keys that were not used).
    """
    ours = model.state_dict()
    converted, unused = {}, []
    for name, value in state.items():
        new = official_to_ours(name)
        if new in ours and ours[new].shape == value.shape:
            converted[new] = value
        else:
            unused.append(name)
    return converted, unused


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles detectron2 model-zoo .pkl files: numpy arrays and plain containers, nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        return super().find_class(module, name)


def load_checkpoint_file(path):
    """The state dict of a checkpoint: ours (.pt/.pth, weights only) or an official .pkl. Every
    problem (missing, truncated, not a checkpoint, refused pickle) is a ValueError naming the file."""
    import torch

    path = str(path)
    try:
        if path.endswith(".pkl"):
            with open(path, "rb") as f:
                data = _RestrictedUnpickler(f, encoding="latin1").load()
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: weights file not found") from None
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], dict):
        data = data["model"]
    if not isinstance(data, dict):
        raise ValueError(f"{path}: no state dict inside")
    try:
        return {k: torch.as_tensor(v) for k, v in data.items()}
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: a value of the state dict is not a tensor ({e})") from None


def load_weights(model, path, strict=True):
    """Load our checkpoint (train.py's, or a bare state dict) or an official detectron2 one into
    `model`. Returns (missing, unexpected) key lists; strict=True (the default, for evaluation and
    Step B/C) raises if either is non-empty. Every error is a ValueError naming the file."""
    state = load_checkpoint_file(path)
    unexpected = []
    if any(k.startswith("sem_seg_head.") for k in state):  # official naming
        state, unexpected = convert_official_state_dict(state, model)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that differ: weights of another model
        raise ValueError(f"{path}: does not fit this model ({e})") from None
    missing, unexpected = list(result.missing_keys), unexpected + list(result.unexpected_keys)
    if strict and (missing or unexpected):
        raise ValueError(f"{path}: does not fit this model: {len(missing)} missing keys {missing[:8]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:8]}")
    return missing, unexpected


def read_checkpoint_extras(path):
    """What a checkpoint of ours stores besides weights ("config", "classes", "step", ...), or {}
    for an official .pkl or a bare state dict. Errors name the file, as load_checkpoint_file's."""
    import torch

    path = str(path)
    if path.endswith(".pkl"):
        return {}
    try:
        try:  # mmap: the tensors stay on disk, only the small entries are read
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a file of the old (non-zip) format cannot be mapped
            data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: weights file not found") from None
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        return {}
    return {k: v for k, v in data.items() if k != "model"}


def load_classes(weights):
    """The classes train.py stored in `weights` (a list of {"id", "name", "isthing", "color"} in
    contiguous order), or None for weights without them (official .pkl, older or bare files)."""
    classes = read_checkpoint_extras(weights).get("classes")
    return classes if isinstance(classes, list) else None


def load_run_config(config=None, weights=None, overrides=(), where="--weights"):
    """The config of a script given --config and/or --weights: the YAML file `config` when given
    (its unset classes taken from the ones `weights` store), else the config stored in `weights`
    (train.py's model_final.pt and checkpoint.pt). `overrides` apply to either and are validated
    as usual. A ConfigError when there is neither (`where` names the weights option)."""
    if config:
        cfg = load_config(config, overrides)
        classes = load_classes(weights) if weights else None
        if classes and (cfg.model.num_classes is None or cfg.model.thing_classes is None):
            cfg = with_classes(cfg, classes, str(config), weights)
        return cfg
    if not weights:
        raise ConfigError("give --config (or weights of ours, which store their config)")
    stored = read_checkpoint_extras(weights).get("config")
    if not isinstance(stored, dict):
        raise ConfigError(f"{where} {weights}: stores no config (official or older weights); give --config")
    if any(item.startswith("_base_=") for item in overrides):
        raise ConfigError(f"_base_=... needs a config file; {weights} stores a resolved config")
    source = f"{weights} (its stored config)" + (" + command line" if overrides else "")
    return validate(from_dict(Config, apply_overrides(stored, overrides), source), source)
