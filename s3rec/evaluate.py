"""s3rec-evaluate --data DATASET --model RUN_OR_FILE --protocol sampled|popular|full [options]

Evaluates a fine-tuned model without training, under any protocol:
- sampled: the answer against the dataset's stored uniform negatives (the paper's protocol; the
  first N of the 99 with --negatives N);
- popular: against N negatives drawn by item popularity at evaluation time
  (s3rec.data.popular_negatives: seeded by --seed, never in the user's sequence);
- full: against every item, the user's history excluded.
--model is a fine-tune's run folder (its best.pt, else the best checkpoint tag) or a model file.
Users are sharded over the ranks of any launcher (as in training); the results equal one
process's. Writes, in --out (default: the run folder):
  evaluation/<protocol>-<split>.json        metrics and what produced them
  evaluation/<protocol>-<split>-ranks.npy   int64 [users]: each user's 0-based rank of the answer
  evaluation/<protocol>-<split>-top<K>.npz  with --topk K: users int64 [U], items int64 [U, K],
                                            scores float32 [U, K]: each user's K best items over
                                            the whole catalogue, history excluded, best first;
                                            with the dataset's id_maps.json also user_ids [U]
                                            and item_ids [U, K], the source's own ids (str)
and, where --out holds a fine-tune's results.json, its "protocols"[<protocol>][<split>].
<protocol> is sampled-N, popular-N or full.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

from s3rec import distributed as dist
from s3rec.config import Config, ConfigError, config_from_dict
from s3rec.engine import checkpoint as ckpt
from s3rec.engine import run
from s3rec.engine.evaluate import evaluate, length_batches
from s3rec.run_folder import RunLock, read_run_json
from s3rec.runlog import (BEST_MODEL, RESULTS_JSON, Events, write_atomic, write_json_atomic,
                          write_npy_atomic)

PROG = "s3rec-evaluate"
PROTOCOLS = ("sampled", "popular", "full")
EVAL_DIR = "evaluation"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[1])
    p.add_argument("--data", required=True, help="dataset folder (s3rec-prep)")
    p.add_argument("--model", required=True, help="a fine-tune's run folder, or a model file")
    p.add_argument("--protocol", required=True, choices=PROTOCOLS)
    p.add_argument("--negatives", type=int, default=99, help="negatives per user (sampled, "
                   "popular; default 99)")
    p.add_argument("--ks", default=None, help="cut-offs, e.g. 1,5,10,20 (default: the "
                   "protocol's: 1,5,10 with MRR for sampled and popular, 5,10,20 for full)")
    p.add_argument("--split", default="test", choices=("valid", "test"))
    p.add_argument("--seed", type=int, default=0, help="seed of the popular negatives")
    p.add_argument("--topk", type=int, default=0, metavar="K", help="also write each user's K "
                   "best items with their scores")
    p.add_argument("--batch-size", type=int, default=512, help="users per batch")
    p.add_argument("--out", default=None, help="output folder (default: the --model run folder)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)
    return p


def parse_ks(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        ks = tuple(int(k) for k in text.split(","))
    except ValueError:
        raise ConfigError(f"--ks {text!r}: expected comma-separated integers, e.g. 1,5,10") from None
    if not ks or min(ks) < 1:
        raise ConfigError(f"--ks {text!r}: every cut-off must be >= 1")
    return ks


def load_model_state(model_arg: str, ds) -> tuple[dict, Config, str]:
    """(state dict, the model's config, what was read) for a run folder or a model file."""
    from s3rec.model import CheckpointError
    from s3rec.model.checkpoint_io import check_model_file, read_model_file
    p = Path(model_arg)
    info = run.dataset_info(ds)
    if p.is_dir() and (p / BEST_MODEL).is_file():
        p = p / BEST_MODEL
    if p.is_file():
        obj = read_model_file(p)
        sd = check_model_file(obj, p, None, info)
        return sd, config_from_dict(obj.get("config", {})), str(p)
    root = p / ckpt.CHECKPOINTS
    tag = ckpt.read_best(root) if root.is_dir() else None
    info = read_run_json(p)
    if tag is None or not info or not isinstance(info.get("config"), dict):
        raise CheckpointError(f"--model {p}: no {BEST_MODEL} and no best checkpoint tag with a "
                              f"readable run.json: not a finished fine-tune's run folder")
    cfg = config_from_dict(info["config"])
    return ckpt.consolidate_folder(root, tag), cfg, str(root / tag)


def protocol_key(protocol: str, negatives: int) -> str:
    return "full" if protocol == "full" else f"{protocol}-{negatives}"


def view_negatives(protocol: str, n: int, ds, items, offsets, seed: int) -> np.ndarray | None:
    from s3rec.data.popular_negatives import popular_negatives
    if protocol == "full":
        return None
    if protocol == "popular":
        return popular_negatives(items, offsets, ds.num_items, n, seed)
    stored = ds.load_negatives()
    if n > stored.shape[1]:
        raise ConfigError(f"--negatives {n}: the dataset stores {stored.shape[1]} per user")
    return stored[:, :n]


def top_items(module, view, k: int, batch_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every user's k best items over the catalogue (history, padding and mask excluded),
    gathered over ranks: (items int64 [U, k], scores float32 [U, k])."""
    info = dist.info()
    n_items = view.num_items
    items = torch.zeros(view.num_users, k, dtype=torch.int64)
    scores = torch.zeros(view.num_users, k, dtype=torch.float32)

    def best(model, b):
        last = model.encode(b.items, b.positions, causal=True)[:, -1]       # [B, d]
        s = model.full_scores(last).float()                                   # [B, item_size]
        s[:, 0] = s[:, n_items + 1] = -torch.inf
        h = b.history_index
        s[h[:, 0], h[:, 1]] = -torch.inf
        return s.topk(k, dim=1)

    module.eval()
    with torch.no_grad():
        for users in length_batches(view, batch_size, info.rank, info.world_size):
            vals, idx = module(best, view.make_batch(users).to(device))
            items[users] = idx.cpu()
            scores[users] = vals.cpu()
    return (dist.all_reduce_sum(items.to(device)).cpu(),
            dist.all_reduce_sum(scores.to(device)).cpu())


def _body(argv, holder) -> str:
    from s3rec.data.eval_views import EvalView
    from s3rec.data.reader import Dataset
    from s3rec.engine.deepspeed_setup import StageModule
    from s3rec.model import build_model

    args = get_args_parser().parse_args(argv)
    ks = parse_ks(args.ks)
    if args.negatives < 1 or args.topk < 0 or args.batch_size < 1:
        raise ConfigError("--negatives and --batch-size must be >= 1, --topk >= 0")
    if not Path(args.model).exists():
        raise ConfigError(f"--model {args.model}: does not exist")
    if args.out is None and not Path(args.model).is_dir():
        raise ConfigError("--out is needed when --model is a model file")
    out = Path(args.out or args.model)
    info = dist.setup(args.local_rank)
    ds = Dataset(args.data)
    sd, cfg, source = load_model_state(args.model, ds)
    if args.topk > ds.num_items:
        raise ConfigError(f"--topk {args.topk}: the dataset has {ds.num_items} items")
    items, offsets = ds.load_sequences()
    negatives = view_negatives(args.protocol, args.negatives, ds, items, offsets, args.seed)
    view = EvalView(items, offsets, ds.num_items, args.split, negatives, cfg.model.max_seq_length)
    model = build_model(cfg, ds.item_size, ds.attribute_size, init_state=sd)
    module = StageModule(model).to(info.device)
    ranking = "full" if args.protocol == "full" else "sampled"
    metrics, ranks = evaluate(module, view, ranking, args.batch_size, info.device,
                              with_ranks=True, ks=ks, mrr=None if ks is None else True)
    top = top_items(module, view, args.topk, args.batch_size, info.device) if args.topk else None
    key = protocol_key(args.protocol, args.negatives)
    if dist.is_main():
        maps = ds.id_maps() if top is not None else None
        named = source_ids(maps, ds.load_user_ids(), top[0]) if maps is not None else {}
        write_outputs(out, key, args, metrics, ranks, top, source, info.world_size, named)
    dist.log_main(f"[{key} {args.split}] " + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return "done"


def source_ids(maps: dict, user_numbers: np.ndarray, items: torch.Tensor) -> dict:
    """{"user_ids": str [U], "item_ids": str [U, K]}: the source's own ids (id_maps.json: entry k
    names number k + 1) of each user (by its number, seq/user_ids) and of its top-K items."""
    users, names = np.array(maps["users"], dtype=str), np.array(maps["items"], dtype=str)
    return {"user_ids": users[user_numbers - 1], "item_ids": names[items.numpy() - 1]}


def write_outputs(out: Path, key: str, args, metrics: dict, ranks: torch.Tensor, top,
                  source: str, world_size: int, named: dict) -> None:
    """`named`: the top-K's source ids (source_ids), or {} where the dataset has none."""
    folder = out / EVAL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{key}-{args.split}"
    write_npy_atomic(folder / f"{stem}-ranks.npy", ranks.numpy())
    if top is not None:
        buf = io.BytesIO()
        # `named` holds fixed-width unicode arrays, not objects: read with allow_pickle=False
        np.savez(buf, users=np.arange(len(ranks), dtype=np.int64), items=top[0].numpy(),
                 scores=top[1].numpy(), **named)
        write_atomic(folder / f"{stem}-top{args.topk}.npz", buf.getvalue())
    record = {"protocol": key, "split": args.split, "metrics": metrics, "model": source,
              "data": str(Path(args.data).resolve()), "negatives": {
                  "kind": args.protocol, "count": None if args.protocol == "full" else
                  args.negatives, "seed": args.seed if args.protocol == "popular" else None},
              "users": int(len(ranks)), "world_size": world_size}
    write_json_atomic(folder / f"{stem}.json", record)
    results = out / RESULTS_JSON
    if not results.is_file():
        return
    # read, add, write: under the run folder's lock, so that two evaluations of one run (or a
    # training started on it) cannot lose each other's protocols
    lock = RunLock(out).acquire()
    try:
        data = json.loads(results.read_text())
        data.setdefault("protocols", {}).setdefault(key, {})[args.split] = metrics
        write_json_atomic(results, data)
        if key != data.get("protocol"):
            # beside the run's own test/ tags, for the HParams tab: "<split>-<protocol>/<metric>"
            events = Events(out, enabled=True)
            events.scalars(metrics, int(data.get("best_epoch") or 0), prefix=f"{args.split}-{key}/")
            events.close()
    finally:
        lock.release()


def main(argv=None) -> int:
    return run.leave(run.guarded(PROG, _body, argv), argv)


if __name__ == "__main__":
    sys.exit(main())
