"""Train Mask2Former (with any of the encoders) on one process or many.

    python train.py --config configs/demo/m2f_tiny.yaml --out runs/demo [key=value ...]
    torchrun --nproc_per_node 8 train.py --config configs/coco/m2f_r50.yaml --out runs/r50
    python train.py --config ... --out runs/r50 --resume        # continue exactly where it stopped
    python train.py --config ... --out runs/eco --init m2f.pt   # start from weights only
    python train.py --config ... --out runs/r50 --overwrite     # replace the run already there

The recipe is the official one (config.TrainConfig): AdamW with the backbone at 0.1x lr and no
weight decay on norms, embeddings and Swin's relative position tables; the whole-model gradient
clipped at L2 norm 0.01; step or poly schedule by iteration; mixed precision with the encoder
kept in fp32. The run directory holds config.yaml (the resolved config), metrics.jsonl (one JSON
line per logged step and per evaluation), checkpoint.pt (everything needed to resume, written
atomically) and model_final.pt (weights and config). Both also store the dataset's classes
(names, isthing, colours). A config may leave model.num_classes / model.thing_classes unset: they
are then the categories of data.train.json, read before the model is built (set ones are checked
against it there).
"""
import argparse
import sys
from pathlib import Path

from config import load_config, load_run_config, run_command


def parse_args(argv=None):
    """The options and the config they name; needs no torch (see the __main__ line below it)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (with --resume --out DIR: by default the config that DIR's "
                                          "checkpoint stores)")
    parser.add_argument("--out", help="run directory (default runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in <out>")
    parser.add_argument("--init", help="initial weights (ours or an official .pkl); optimizer starts fresh")
    parser.add_argument("--debug", action="store_true", help="show the whole traceback of an error (or M2F_DEBUG=1)")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    args = parser.parse_args(argv)
    if args.resume and (args.init or args.overwrite):
        parser.error("--resume excludes --init and --overwrite")
    if args.config:
        args.cfg = load_config(args.config, args.overrides)
    elif args.resume and args.out:  # the run's own config, as its checkpoint stores it
        args.cfg = load_run_config(None, Path(args.out) / "checkpoint.pt", args.overrides, where="--resume")
    else:
        parser.error("--config is required (only --resume --out DIR can do without: its checkpoint stores the config)")
    return args


if __name__ == "__main__":  # answer --help, a bad option or config in a blink, before torch loads
    run_command(parse_args)

import json  # noqa: E402  (the heavy imports come after the early answers above)
import random  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data  # noqa: E402
from config import (atomic_save, config_from_dict, config_to_dict, load_weights, save_config,  # noqa: E402
                    with_classes)
from data import distributed, setup_distributed  # noqa: E402
from encoders import check_exit  # noqa: E402
from metrics import evaluate_dataset, evaluation_source  # noqa: E402
from model import AMP_DTYPES, autocast, build_model  # noqa: E402

NORMS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.GroupNorm, torch.nn.LayerNorm,
         torch.nn.modules.instancenorm._InstanceNorm, torch.nn.LocalResponseNorm)
RUN_FILES = ("checkpoint.pt", "model_final.pt", "metrics.jsonl", "config.yaml")  # what makes a folder a run


# ---- optimisation ----------------------------------------------------------------------------


def build_optimizer(model, cfg):
    """AdamW with the official parameter groups: backbone lr x backbone_lr_multiplier; weight
    decay 0 for norm layers, nn.Embedding and Swin's relative position tables."""
    groups = {}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            lr = cfg.lr * (cfg.backbone_lr_multiplier if module_name.startswith("backbone") else 1.0)
            no_decay = isinstance(module, (*NORMS, torch.nn.Embedding)) or "relative_position_bias_table" in name
            key = (lr, 0.0 if no_decay else cfg.weight_decay)
            groups.setdefault(key, []).append(param)
    param_groups = [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()]
    # torch's fused kernel, one pass over each tensor: 3.7x faster than the default per-op update on
    # the tiny demo model's CPU step (9 against 33 ms; results equal to ~3e-8)
    fused = all(p.device.type in ("cpu", "cuda") for group in param_groups for p in group["params"])
    return torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def lr_factor(step, cfg):
    """Multiplier of the base lr at iteration `step`: step decay at `steps`, or poly."""
    if cfg.schedule == "step":
        return cfg.gamma ** sum(step >= s for s in cfg.steps)
    if cfg.schedule == "poly":
        return (1 - step / cfg.iterations) ** cfg.poly_power
    raise ValueError(f"unknown schedule {cfg.schedule!r}; valid: step, poly")


def sample_exit(exits, seed, step):
    """ECO-M2F Step A: the exit of iteration `step`, uniform over `exits`. A function of (seed,
    step) alone, so every rank draws the same exit without talking, and a resumed run the same
    exits as an uninterrupted one."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return exits[torch.randint(len(exits), (1,), generator=g).item()]


class EveryExit(torch.nn.Module):
    """Step A's "all" mode as a module whose forward returns the losses at every exit, so that
    DistributedDataParallel, which only sees forward, synchronises their gradients."""

    def __init__(self, model, exits):
        super().__init__()
        self.model, self.exits = model, list(exits)

    def forward(self, images, targets):
        """images (B, 3, H, W), targets -> {exit: weighted losses} (Mask2Former.forward_exits)."""
        return self.model.forward_exits(images, self.exits, targets)


def training_losses(model, images, targets, cfg, step):
    """The weighted losses of one iteration: plain Mask2Former, or ECO-M2F's weighted stochastic
    depth when cfg.exits is set: α_k·L_k for a sampled exit k ("sample"), or Σ_k α_k·L_k ("all",
    ECO-M2F Eq. 3; then `model` is an EveryExit). Returns (losses, the sampled exit or None)."""
    if not cfg.exits:
        return model(images, targets), None
    alpha = dict(zip(cfg.exits, cfg.exit_alpha or [float(k) for k in cfg.exits]))
    if cfg.exit_mode == "sample":
        k = sample_exit(cfg.exits, cfg.seed, step)
        return {name: alpha[k] * value for name, value in model(images, targets, exit=k).items()}, k
    if cfg.exit_mode == "all":
        per_exit = model(images, targets)
        return {name: sum(alpha[k] * per_exit[k][name] for k in cfg.exits) for name in per_exit[cfg.exits[0]]}, None
    raise ValueError(f"unknown train.exit_mode {cfg.exit_mode!r}; valid: sample, all")


def make_targets(batch, padded_size, device):
    """Per image {"labels", "masks"} with the masks zero-padded to the padded batch size."""
    H, W = padded_size
    targets = []
    for sample in batch:
        masks = sample["masks"]  # (n, h, w) bool
        padded = torch.zeros((masks.shape[0], H, W), dtype=torch.bool)
        padded[:, : masks.shape[1], : masks.shape[2]] = masks
        targets.append({"labels": sample["labels"].to(device), "masks": padded.to(device)})
    return targets


# ---- checkpoints -----------------------------------------------------------------------------


def rng_state():
    """Every RNG this process draws from, in types that torch.load(weights_only=True) accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path, model, optimizer, scaler, step, cfg, world_size, classes):
    """Everything to resume exactly: weights, optimizer, grad scaler, step and every rank's RNG;
    with the config and the dataset's classes. All ranks call it (to gather their RNG states);
    rank 0 writes."""
    states = [None] * world_size
    if distributed():
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    if not distributed() or dist.get_rank() == 0:
        atomic_save({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": scaler.state_dict(), "step": step, "rng": states, "config": config_to_dict(cfg),
                     "world_size": world_size, "classes": classes}, path)


def unwrap(model):
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


# ---- logging -------------------------------------------------------------------------------


class MetricsLog:
    """metrics.jsonl: one JSON object a line. On resume, lines past the resumed step are dropped
    so the file tells one consistent story."""

    def __init__(self, path, resume_step=None):
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            lines = [ln for ln in self.path.read_text().splitlines() if ln.strip()]
            kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        elif resume_step is None:
            self.path.write_text("")

    def write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


# ---- the loop ----------------------------------------------------------------------------------


def check_run_folder(out_dir, resume, overwrite):
    """Before anything is written: a folder that already holds a run is continued (--resume) or
    replaced (--overwrite), never overwritten silently."""
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    if existing and not (resume or overwrite):
        raise FileExistsError(f"{out_dir}: already holds a run ({', '.join(existing)}); pass --resume to continue "
                              "it, --overwrite to replace it, or choose another --out")


def load_resume_checkpoint(path, cfg, world_size):
    """checkpoint.pt of the run to continue, checked against this run's model config and processes."""
    if not path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        saved = config_from_dict(checkpoint["config"], where=str(path))
    except (OSError, RuntimeError, EOFError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"--resume: {path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if saved.model != cfg.model:
        raise ValueError(f"--resume: the model config differs from the one in {path}")
    if checkpoint["world_size"] != world_size:
        raise ValueError(f"--resume: {path} was written by {checkpoint['world_size']} processes, "
                         f"this run has {world_size}; exact resumption needs the same number")
    return checkpoint


def setup_model(cfg, device, init, rank):
    """The model, the same on every rank (seeded), optionally from `init` weights, its exits checked."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    random.seed(tc.seed)
    model = build_model(cfg).to(device)
    check_exit(model.encoder, tc.exits or None, "train.exits")
    if tc.exit_alpha and len(tc.exit_alpha) != len(tc.exits):
        raise ValueError(f"train.exit_alpha has {len(tc.exit_alpha)} values for {len(tc.exits)} exits")
    if init:
        missing, unexpected = load_weights(model, init, strict=False)
        if rank == 0:
            print(f"--init {init}: {len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}")
    return model


def wrap_for_training(model, tc, world_size, device):
    """What the loop calls: the model, as EveryExit for Step A's "all" mode, in DDP on several
    processes, compiled if asked."""
    train_model = EveryExit(model, tc.exits) if tc.exits and tc.exit_mode == "all" else model
    if world_size > 1:
        # With sampled exits the layers past the exit take no part in an iteration.
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(tc.exits) and tc.exit_mode == "sample")
    return torch.compile(train_model) if tc.compile else train_model


def train_step(train_model, model, optimizer, scaler, batch, tc, step, device, checkpoint_path):
    """One iteration: forward under autocast, the losses, backward, clipping, the optimizer step.
    Returns (the total loss, the weighted losses, the sampled exit or None)."""
    images, _ = model.preprocess([s["image"].to(device) for s in batch])
    targets = make_targets(batch, images.shape[-2:], device)
    try:
        with autocast(device.type, tc.amp):
            losses, exit = training_losses(train_model, images, targets, tc, step)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()}")
    except FloatingPointError as e:  # from here or from the matcher
        raise FloatingPointError(f"{e} at iteration {step}; stopping. The last good checkpoint is "
                                 f"{checkpoint_path if checkpoint_path.exists() else 'none yet'}") from None
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if tc.clip_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    return loss, losses, exit


def log_step(log, writer, done, loss, losses, exit, lr, seconds):
    """One line of metrics.jsonl (and TensorBoard scalars); returns the record."""
    record = {"step": done, "loss": loss.item(), "lr": lr, "sec_per_iter": seconds,
              **{k: losses[k].item() for k in ("loss_ce", "loss_mask", "loss_dice")},
              **({"exit": exit} if exit is not None else {})}
    log.write(record)
    if writer:
        for k, v in record.items():
            writer.add_scalar(k, v, done)
    return record


def open_logs(cfg, out_dir, start, resumed):
    """Rank 0's config.yaml, metrics.jsonl (cut back to `start` on resume), TensorBoard writer, bar."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    log = MetricsLog(out_dir / "metrics.jsonl", start if resumed else None)
    writer = None
    if cfg.train.tensorboard:
        from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package

        writer = SummaryWriter(out_dir / "tensorboard")
    return log, writer, tqdm(total=cfg.train.iterations, initial=start, desc="train", dynamic_ncols=True)


def train(cfg, out_dir, resume=False, init=None, overwrite=False):
    """Train `cfg` into `out_dir` (see the module docstring); returns the trained model."""
    rank, world_size, device = setup_distributed()
    out_dir, tc = Path(out_dir), cfg.train
    if tc.batch_size % world_size:
        raise ValueError(f"train.batch_size {tc.batch_size} is not divisible by {world_size} processes")
    per_rank = tc.batch_size // world_size
    check_run_folder(out_dir, resume, overwrite)
    # The classes first, from the JSON, so that a wrong one fails in seconds, not after the model.
    dataset = data.build_dataset(cfg.data, split="train", train=True)
    classes = dataset.categories
    if rank == 0 and None in (cfg.model.num_classes, cfg.model.thing_classes):
        print(f"classes from {dataset.json_file}: {len(classes)}, {sum(c['isthing'] for c in classes)} of them things")
    cfg = with_classes(cfg, classes, "the config", dataset.json_file)
    checkpoint_path = out_dir / "checkpoint.pt"
    checkpoint = load_resume_checkpoint(checkpoint_path, cfg, world_size) if resume else None
    model = setup_model(cfg, device, init, rank)
    start = checkpoint["step"] if checkpoint else 0
    loader = data.build_train_loader(cfg.data, dataset, batch_size_per_rank=per_rank, seed=tc.seed, rank=rank,
                                     world_size=world_size, start=start * per_rank)
    batches = iter(loader)  # created before the RNG restore: making it draws from the global RNG
    optimizer = build_optimizer(model, tc)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    if tc.amp not in AMP_DTYPES:
        raise ValueError(f"unknown train.amp {tc.amp!r}; valid: {', '.join(AMP_DTYPES)}")
    scaler = torch.amp.GradScaler(device.type, enabled=tc.amp == "fp16")
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"][rank])
        if rank == 0:
            print(f"resuming {out_dir} from iteration {start} of {tc.iterations}")
    train_model = wrap_for_training(model, tc, world_size, device)
    log, writer, bar = open_logs(cfg, out_dir, start, checkpoint is not None) if rank == 0 else (None, None, None)

    model.train()
    tick = time.perf_counter()
    for step in range(start, tc.iterations):
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * lr_factor(step, tc)
        loss, losses, exit = train_step(train_model, model, optimizer, scaler, next(batches), tc, step, device,
                                        checkpoint_path)
        done = step + 1
        if rank == 0:
            bar.update(1)
            if done % tc.log_every == 0 or done == tc.iterations:
                seconds, tick = (time.perf_counter() - tick) / tc.log_every, time.perf_counter()
                lr = tc.lr * lr_factor(step, tc)  # the base lr (the backbone's group runs at its multiplier)
                record = log_step(log, writer, done, loss, losses, exit, lr, seconds)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
        if done % tc.checkpoint_every == 0 or done == tc.iterations:
            save_checkpoint(checkpoint_path, model, optimizer, scaler, done, cfg, world_size, classes)
        if tc.evaluate and tc.eval_every and done % tc.eval_every == 0 and done != tc.iterations:
            run_evaluation(model, cfg, out_dir / f"eval_{done:07d}", done, log, device, checkpoint_path)
    if rank == 0:
        bar.close()
        atomic_save({"model": model.state_dict(), "config": config_to_dict(cfg), "classes": classes},
                    out_dir / "model_final.pt")
    if tc.evaluate:
        run_evaluation(model, cfg, out_dir / "eval", tc.iterations, log, device, out_dir / "model_final.pt")
    if distributed():
        dist.destroy_process_group()
    return model


def run_evaluation(model, cfg, out_dir, step, log, device, weights):
    """Evaluate on the val split on rank 0 (the one with a log) while the other ranks wait;
    `weights`: the file holding these weights, recorded in metrics.json (the report times it)."""
    if log is not None:
        dataset = data.build_dataset(cfg.data, split="val", train=False)
        metrics = evaluate_dataset(model, dataset, out_dir, device=device,
                                   source=evaluation_source(cfg, weights, split="val"))
        model.train()
        log.write({"step": step, "eval": metrics})
        print(f"iteration {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float)))
    if distributed():
        dist.barrier()


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    try:
        train(args.cfg, out, resume=args.resume, init=args.init, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print_resume_hint(out, args)
        return 130


def print_resume_hint(out, args):
    """After Ctrl-C: the last checkpoint's iteration and the command that continues from it."""
    path = out / "checkpoint.pt"
    if not path.is_file():
        print(f"\ninterrupted before the first checkpoint of {out}: nothing to resume", file=sys.stderr)
        return
    step = torch.load(path, map_location="cpu", weights_only=True)["step"]
    command = " ".join(["python train.py", *(["--config", args.config] if args.config else []), "--out", str(out),
                        "--resume", *args.overrides])
    print(f"\ninterrupted; {path} holds iteration {step}. Continue with:\n  {command}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(run_command(main))
