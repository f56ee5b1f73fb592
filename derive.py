"""ECO-M2F Step B: the derived dataset, the panoptic quality of every image at every encoder exit.

    python derive.py --config CFG --weights CKPT --out derived.jsonl [--split train] [--exits 2 3 4 5 6]
                     [--max-images N] [--device cpu|cuda] [key=value ...]
    torchrun --nproc_per_node 8 derive.py ...   (the same arguments)

For each image of the split (test-time resize, no augmentation) one backbone and encoder pass reads
the decoder at every exit (Mask2Former.forward_exits); each exit's panoptic prediction, at the
original image size, is scored against the ground truth by evaluate.image_pq (panopticapi's rules,
[0, 1] scale; an image with nothing to evaluate scores 1.0 at every exit). The output holds one
JSON line per image, in dataset order, each image exactly once:

    {"image_id": 139, "file_name": "000000000139.jpg", "exits": [1, 2, 3, 4, 5, 6], "pq": [0.41, ...]}

Files. <out>.source.json records the weights file the set is derived from; a later run continues
<out> only with the same weights. Rank r (0 in a plain run) streams its lines into
<out>.rank<r>.jsonl, flushing each, so a kill loses at most the image in flight. A run first reads <out> and every shard file on disk
(whatever number of processes wrote them), skips the images they hold, and shares the rest out
over the ranks; a last line cut short by a kill is dropped. At the end rank 0 merges everything
into <out> (written atomically) and deletes the shards. Each rank only appends to its own shard.
--exits defaults to every encoder layer (Step C may then choose among any subset); --max-images N
derives the first N images, and a later run without it adds the rest.
"""
import argparse
import json
import os
import re
import sys
from pathlib import Path

from config import atomic_write_text, load_config, load_run_config, run_command


# ---- the command line (first, and light: --help and config errors answer before torch loads) -----


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="checkpoint: train.py's, a state dict, or an official .pkl")
    parser.add_argument("--config", help="YAML config of the (Step A) model (default: the one stored in the weights)")
    parser.add_argument("--out", required=True, help="output JSON-lines file, e.g. derived.jsonl")
    parser.add_argument("--split", default="train", choices=("train", "val"))
    parser.add_argument("--exits", nargs="+", help="encoder exits (default: every layer, 1..layers)")
    parser.add_argument("--max-images", type=int, default=None, help="only the first N images of the split")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available; "
                                                       "under torchrun each rank's own GPU)")
    parser.add_argument("--debug", action="store_true", help="show the whole traceback of an error")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    args = parser.parse_args(argv)
    if args.exits:  # nargs="+" also swallows the key=value overrides written after the exits
        args.overrides += [e for e in args.exits if "=" in e]
        args.exits = [e for e in args.exits if "=" not in e]
        if not all(e.isdigit() for e in args.exits):
            parser.error(f"--exits takes encoder layer numbers, got {' '.join(args.exits)}")
        args.exits = [int(e) for e in args.exits]
    if args.config:  # its errors come before torch loads
        load_config(args.config, args.overrides)
    return args


if __name__ == "__main__":  # answer --help, a bad option or config at once, before torch loads
    run_command(parse_args)

import torch  # noqa: E402  (after the command line)
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

from data import distributed, setup_distributed
from encoders import check_exit
from metrics import image_pq, load_evaluation


# ---- the output files -------------------------------------------------------------------------


def shard_path(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.name}.rank{rank}.jsonl")


def shard_files(out: Path) -> list[Path]:
    """Every shard of `out` on disk, whatever world size wrote it."""
    pattern = re.compile(re.escape(out.name) + r"\.rank\d+\.jsonl")
    return sorted(p for p in out.parent.iterdir() if pattern.fullmatch(p.name)) if out.parent.is_dir() else []


def read_lines(path: Path) -> tuple[list[dict], int]:
    """The records of a JSON-lines file and the byte length of its complete lines. A last line
    without its newline is a write cut short by a kill: it is left out, and recomputed."""
    raw = path.read_bytes()
    end = raw.rfind(b"\n") + 1
    records = []
    for n, line in enumerate(raw[:end].decode().splitlines(), start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n} is not JSON ({e}); delete the file to start over") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}: line {n} is not a JSON object; delete the file to start over")
            records.append(record)
    return records, end


def read_done(out: Path, exits: list[int], file_names: dict) -> dict:
    """image_id -> record of every image already in `out` or its shards, each checked against
    this run (same exits, an image of this split, PQ values in [0, 1]). An image found in two
    files (killed between the merge and the removal of the shards) counts once: it was computed
    from the same weights; an image twice in one file is a damaged file, refused."""
    done = {}
    for path in ([out] if out.is_file() else []) + shard_files(out):
        seen = set()
        for record in read_lines(path)[0]:
            image_id = record.get("image_id")
            pq = record.get("pq")
            if record.get("exits") != exits or not isinstance(pq, list) or len(pq) != len(exits):
                raise ValueError(f"{path}: image {image_id} was derived at exits {record.get('exits')}, this run "
                                 f"asks for {exits}; pass --exits to match, or choose another --out")
            if file_names.get(image_id) != record.get("file_name"):
                raise ValueError(f"{path}: image {image_id} ({record.get('file_name')}) is not an image of this "
                                 "split; was the file derived from another split or dataset?")
            if not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in pq):  # NaN fails too
                raise ValueError(f"{path}: image {image_id} has PQ values {pq} outside [0, 1]; delete the file "
                                 "to start over")
            if image_id in seen:
                raise ValueError(f"{path}: image {image_id} is in the file twice; delete the file to start over")
            seen.add(image_id)
            done.setdefault(image_id, record)
    return done


def source_path(out: Path) -> Path:
    return out.with_name(f"{out.name}.source.json")


def check_source(out: Path, weights, rank: int) -> None:
    """<out>.source.json records the weights file (path, size, modification time) the derived set
    is computed from. A later run continues it only with the same weights: PQ values of two
    different models in one file would train the gate on nonsense."""
    stat = Path(weights).stat()
    source = {"weights": str(Path(weights).resolve()), "size": stat.st_size, "mtime": stat.st_mtime}
    path = source_path(out)
    if path.is_file():
        try:
            recorded = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: unreadable ({e}); delete it and {out} to start over") from None
        if recorded != source:
            raise ValueError(f"{out}: derived from {recorded.get('weights')} (size {recorded.get('size')}, "
                             f"mtime {recorded.get('mtime')}), not from {weights}; choose another --out, or delete "
                             f"{out}* to start over")
    elif rank == 0 and (out.is_file() or shard_files(out)):
        print(f"{out}: no record of its weights (written before {path.name} existed); continuing it with {weights}")
    if rank == 0 and not path.is_file():
        atomic_write_text(path, json.dumps(source))


# ---- one image --------------------------------------------------------------------------------


class ImagesWithGroundTruth(torch.utils.data.Dataset):
    """(the test-resized sample, the stored sample with the ground truth at the original size) of
    the chosen dataset indices; each file is read once (the test transform is deterministic)."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        raw = self.dataset.load(self.indices[j])  # "ids" (H, W) and "segments" as stored: the ground truth
        transform = self.dataset.transform
        return transform(raw, torch.Generator()) if transform else raw, raw


def as_is(item):
    return item  # the loader's collate_fn: samples differ in size and the model pads them itself


@torch.no_grad()
def derive_image(model, sample, gt, exits, categories, to_dataset) -> list[float]:
    """PQ of one image at every exit: one backbone + encoder pass, the decoder read at each exit."""
    images, sizes = model.preprocess([sample["image"].to(model.pixel_mean.device)])  # (1, 3, H, W)
    outputs = model.forward_exits(images, exits)  # exit -> decoder predictions
    original = [(int(sample["height"]), int(sample["width"]))]
    pq = []
    for k in exits:
        ids, segments = model.inference(outputs[k], sizes, output_sizes=original)[0]["panoptic_seg"]
        segments = [{"id": int(s["id"]), "category_id": to_dataset[int(s["category_id"])]} for s in segments]
        pq.append(image_pq(gt["ids"], gt["segments"], ids, segments, categories)["pq"])
    return pq


# ---- the run ----------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    cfg = load_run_config(args.config, args.weights, args.overrides)
    # Step B scores the panoptic output only; instance and semantic post-processing are wasted work.
    cfg.model.inference.panoptic, cfg.model.inference.instance, cfg.model.inference.semantic = True, False, False
    rank, world_size, device = setup_distributed()
    dataset, model = load_evaluation(cfg, args.config or args.weights, args.weights, args.split, args.device or device)
    model.eval()
    file_names = {img["id"]: img["file_name"] for img in dataset.images}
    if len(file_names) != len(dataset):
        raise ValueError(f"{dataset.json_file}: image ids are not unique; derive.py identifies images by id")
    check_exit(model.encoder, args.exits or list(range(1, model.encoder.num_exits + 1)), "--exits")
    exits = sorted(set(args.exits or range(1, model.encoder.num_exits + 1)))
    if args.exits and len(exits) != len(args.exits):
        raise ValueError(f"--exits {args.exits}: each exit once")

    n = len(dataset) if args.max_images is None else min(args.max_images, len(dataset))
    check_source(out, args.weights, rank)
    done = read_done(out, exits, file_names)
    todo = [i for i in range(n) if dataset.images[i]["id"] not in done]
    if not todo and not shard_files(out):
        if rank == 0:
            print(f"{out}: all {n} images done")
        return finish()
    if distributed():
        dist.barrier()  # every rank has read the files before any rank writes to them

    mine = todo[rank::world_size]
    if mine:
        categories = {c["id"]: c for c in dataset.categories}
        to_dataset = {k: c["id"] for k, c in enumerate(dataset.categories)}  # contiguous -> dataset id
        loader = torch.utils.data.DataLoader(ImagesWithGroundTruth(dataset, mine), batch_size=None,
                                             collate_fn=as_is, num_workers=cfg.data.workers)
        shard = shard_path(out, rank)
        if shard.is_file():  # drop a line cut short by a kill before appending after it
            os.truncate(shard, read_lines(shard)[1])
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(shard, "a") as f:
            for sample, gt in tqdm(loader, desc=f"derive [rank {rank}]", position=rank, dynamic_ncols=True):
                pq = derive_image(model, sample, gt, exits, categories, to_dataset)
                record = {"image_id": sample["image_id"], "file_name": sample["file_name"], "exits": exits, "pq": pq}
                try:
                    f.write(json.dumps(record) + "\n")
                    f.flush()
                except OSError as e:  # a full disk: the lines before are safe, and a rerun continues
                    raise OSError(f"{shard}: could not append ({e}); run again to continue") from e

    if distributed():
        dist.barrier()  # every shard is complete
    if rank == 0:
        merge(out, dataset, n, exits, file_names, computed=len(todo))
    return finish()


def merge(out, dataset, n, exits, file_names, computed):
    """<out> := every record of <out> and its shards, in dataset order, each image once; then the
    shards go. Prints the summary."""
    shards = shard_files(out)
    done = read_done(out, exits, file_names)
    missing = [dataset.images[i]["id"] for i in range(n) if dataset.images[i]["id"] not in done]
    if missing:
        raise RuntimeError(f"{out}: images {missing[:10]} were not derived (a rank failed?); run again to finish")
    records = [done[img["id"]] for img in dataset.images if img["id"] in done]
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in records))
    for path in shards:
        path.unlink()
    means = "  ".join(f"exit {k} {sum(r['pq'][j] for r in records) / max(len(records), 1):.4f}"
                      for j, k in enumerate(exits))
    print(f"{out}: {len(records)} images ({computed} computed now), mean PQ  {means}")


def finish():
    if distributed():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run_command(main))
