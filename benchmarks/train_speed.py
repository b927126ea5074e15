"""Training speed on one process (any device): python benchmarks/train_speed.py --data DATASET --json FILE

Runs the real entries in this process (world size 1, DeepSpeed ZeRO 0, fp32 unless overridden):
  pretrain_epoch_s   one pretraining epoch, all four objectives, batch 100 (perf/epoch_s)
  finetune_epoch_s   one fine-tuning epoch from that model, batch 256 (perf/epoch_s, no eval)
  eval_sampled_s     one sampled pass (answer + 99 negatives) over every user's test item
  eval_full_s        one full-ranking pass over every user
  peak_rss_mb        peak resident memory of this process (all of the above)
and, to see what DeepSpeed costs per step, the same N pretraining batches through a plain
PyTorch loop (model + torch.optim.Adam, the engine's implementation) and through the engine:
  plain_step_ms, deepspeed_step_ms, deepspeed_overhead_ms, plain_ops_per_step,
  deepspeed_ops_per_step
  plain_syncs_per_step, deepspeed_syncs_per_step   (CUDA: host waits on the device per step)
--overhead-only runs just that comparison; with a tiny model (model.hidden_size=8
model.inner_size=16 model.num_heads=1 pretrain.batch_size=4) the step's compute vanishes and what
is left is the host's cost per step, which is what bounds this small model's step on a GPU.
Extra `key=value` arguments override the config of every stage (e.g. deepspeed.zero_stage=2).
"""
from __future__ import annotations

import itertools
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from bench_common import arguments, finish


def epoch_seconds(run_dir: Path) -> float:
    status = json.loads((run_dir / "run.json").read_text())["status"]
    if status != "done":
        raise SystemExit(f"{run_dir}: run status {status!r}, not done")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc.Scalars("perf/epoch_s")[-1].value


def step_overhead(data: str, overrides: list[str], steps: int) -> dict:
    """ms per pretraining step, plain PyTorch vs the DeepSpeed engine, on the same batches, each
    taken from the host as the training loop does (index computed on the host, then `to`).
    On CUDA also the device syncs per step (torch.cuda.set_sync_debug_mode warnings): each one
    makes the host wait for the GPU to drain."""
    import warnings

    import torch

    from s3rec import distributed as dist
    from s3rec.config import load_config
    from s3rec.data.reader import Dataset
    from s3rec.engine.deepspeed_setup import ADAM_KERNEL_ARGS, build_ds_config, initialize
    from s3rec.engine.profile import count_ops
    from s3rec.model import build_model, param_groups
    from s3rec.pretrain_step import build_loss, pretrain_sampler

    cfg = load_config(None, overrides)
    ds = Dataset(data)
    sampler = pretrain_sampler(cfg, ds)
    device = dist.info().device
    # the entry's own step: index on the host, or padded to a fixed shape and compiled
    # (pretrain.static_shapes / pretrain.compile: the warm-up steps compile)
    prepare, losses = build_loss(cfg, sampler, ds.item_size, ds.attribute_size,
                                 cfg.pretrain.batch_size, device)
    warm = 20
    every_epoch = itertools.chain.from_iterable(     # as many epochs as a small dataset needs
        sampler.batches(cfg.seed, e, cfg.pretrain.batch_size, cfg.data.bucket_by_length,
                        cfg.data.bucket_size) for e in itertools.count())
    batches = [prepare(b) for b in itertools.islice(every_epoch, steps + warm)]
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(step) -> tuple[float, float | None]:
        """(ms per step, device syncs per step or None off CUDA)"""
        for b in batches[:warm]:
            step(b)
        sync()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            t = time.perf_counter()
            for b in batches[warm:]:
                step(b)
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
            sync()
            ms = 1000 * (time.perf_counter() - t) / steps
        syncs = sum("synchroniz" in str(c.message) for c in caught)
        return ms, (syncs / steps if cuda else None)

    torch.manual_seed(0)
    model = build_model(cfg, ds.item_size, ds.attribute_size).to(device)
    # the engine's Adam implementation (deepspeed.adam_kernel), so the difference is DeepSpeed's
    opt = torch.optim.Adam(model.parameters(), lr=cfg.pretrain.lr,
                           **ADAM_KERNEL_ARGS[cfg.deepspeed.adam_kernel])

    def plain_step(hb):
        loss = losses(model, hb.to(device))["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    plain, plain_syncs = timed(plain_step)
    # Operators are counted under a dispatch mode, in which compiled code does not run: a
    # compiled step (pretrain.compile) has no count (its launches: the profile table of gpu.sh)
    compiled = cfg.pretrain.compile != "none"
    ops = None if compiled else count_ops(lambda: plain_step(batches[0]))

    torch.manual_seed(0)
    model = build_model(cfg, ds.item_size, ds.attribute_size).to(device)
    engine = initialize(model, param_groups(model, cfg),
                        build_ds_config(cfg, "pretrain", 1, device.type))
    fn = lambda m, b: losses(m, b)["total"]

    def ds_step(hb):
        loss = engine(fn, hb.to(device))
        engine.backward(loss)
        engine.step()

    ds_ms, ds_syncs = timed(ds_step)
    ds_ops = None if compiled else count_ops(lambda: ds_step(batches[0]))
    return {"plain_step_ms": plain, "deepspeed_step_ms": ds_ms,
            "deepspeed_overhead_ms": ds_ms - plain, "overhead_steps": steps,
            "plain_ops_per_step": ops, "deepspeed_ops_per_step": ds_ops,
            "plain_syncs_per_step": plain_syncs,
            "deepspeed_syncs_per_step": ds_syncs}


def eval_seconds(data: str, init: Path, overrides: list[str]) -> dict:
    """One sampled and one full-ranking pass over every user (test split)."""
    import torch

    from s3rec import distributed as dist
    from s3rec.config import load_config
    from s3rec.data.eval_views import EvalView
    from s3rec.data.reader import Dataset
    from s3rec.engine.deepspeed_setup import build_ds_config, initialize
    from s3rec.engine.evaluate import evaluate
    from s3rec.model import build_model, load_model_file, param_groups

    cfg = load_config(None, overrides)
    ds = Dataset(data)
    info = {"name": ds.name, "num_users": ds.num_users, "num_items": ds.num_items,
            "num_attributes": ds.num_attributes}
    items, offsets = ds.load_sequences()
    neg = ds.load_negatives()
    L = cfg.model.max_seq_length
    model = build_model(cfg, ds.item_size, ds.attribute_size,
                        init_state=load_model_file(init, cfg, info))
    device = dist.info().device
    engine = initialize(model.to(device), param_groups(model, cfg),
                        build_ds_config(cfg, "finetune", 1, device.type))
    out = {}
    for protocol in ("sampled", "full"):
        view = EvalView(items, offsets, ds.num_items, "test", neg, L)
        evaluate(engine, view, protocol, cfg.finetune.eval_batch_size, device)   # warm-up
        t = time.perf_counter()
        m = evaluate(engine, view, protocol, cfg.finetune.eval_batch_size, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[f"eval_{protocol}_s"] = time.perf_counter() - t
        out[f"eval_{protocol}_metrics"] = m
    return out


def main(argv=None) -> int:
    p = arguments(__doc__)
    p.add_argument("--out", default=None, help="run folders (default: a temporary folder)")
    p.add_argument("--overhead-steps", type=int, default=200,
                   help="pretraining steps timed for the DeepSpeed overhead (0 = skip)")
    p.add_argument("--overhead-only", action="store_true",
                   help="only the step comparison (with tiny model.* / batch overrides it measures "
                        "the host's cost per step: what bounds a GPU step of this small model)")
    args = p.parse_args(argv)
    if args.overhead_only and not args.overhead_steps:
        raise SystemExit("--overhead-only needs --overhead-steps > 0")

    from s3rec import distributed as dist
    from s3rec import finetune, pretrain
    dist.setup()
    root = Path(args.out or tempfile.mkdtemp(prefix="s3rec-bench-"))
    if args.out and root.exists() and any(root.iterdir()):
        raise SystemExit(f"--out {root} is not empty: the entries would resume, not measure")
    common = ["logging.every_steps=50", "checkpoint.keep_last=1", *args.overrides]
    figures: dict = {"data": str(Path(args.data).resolve()), "threads": None}
    import torch
    figures["threads"] = torch.get_num_threads()

    if args.overhead_only:
        figures.update(step_overhead(args.data, args.overrides, args.overhead_steps))
        return _write(figures, args.json)
    t = time.perf_counter()
    rc = pretrain.main(["--data", args.data, "--out", str(root / "pretrain"), "pretrain.epochs=1",
                        "pretrain.save_epochs=[]", *common])
    if rc:
        raise SystemExit(f"pretraining failed (exit {rc})")
    figures["pretrain_epoch_s"] = epoch_seconds(root / "pretrain")
    figures["pretrain_wall_s"] = time.perf_counter() - t

    t = time.perf_counter()
    rc = finetune.main(["--data", args.data, "--out", str(root / "finetune"), "--init",
                        str(root / "pretrain" / "final.pt"), "finetune.epochs=1", *common])
    if rc:
        raise SystemExit(f"fine-tuning failed (exit {rc})")
    figures["finetune_epoch_s"] = epoch_seconds(root / "finetune")
    figures["finetune_wall_s"] = time.perf_counter() - t

    figures.update(eval_seconds(args.data, root / "pretrain" / "final.pt", args.overrides))
    if args.overhead_steps:
        figures.update(step_overhead(args.data, args.overrides, args.overhead_steps))
    return _write(figures, args.json)


def _write(figures: dict, path: str) -> int:
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return finish(figures, path)


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    sys.exit(main())
