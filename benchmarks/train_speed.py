"""Training speed on one process (any device): python benchmarks/train_speed.py --data DATASET --json FILE

Runs the real entries in this process (world size 1, DeepSpeed ZeRO 0, fp32 unless overridden):
  pretrain_epoch_s   one pretraining epoch, all four objectives, batch 100 (perf/epoch_s)
  finetune_epoch_s   one fine-tuning epoch from that model, batch 256 (perf/epoch_s, no eval)
  eval_sampled_s     one sampled pass (answer + 99 negatives) over every user's test item
  eval_full_s        one full-ranking pass over every user
  peak_rss_mb        peak resident memory of this process (all of the above)
and, to see what DeepSpeed costs per step, the same N pretraining batches through a plain
PyTorch loop (model + torch.optim.Adam) and through the engine:
  plain_step_ms, deepspeed_step_ms, deepspeed_overhead_ms
Extra `key=value` arguments override the config of every stage (e.g. deepspeed.zero_stage=2).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def epoch_seconds(run_dir: Path) -> float:
    status = json.loads((run_dir / "run.json").read_text())["status"]
    if status != "done":
        raise SystemExit(f"{run_dir}: run status {status!r}, not done")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc.Scalars("perf/epoch_s")[-1].value


def step_overhead(data: str, overrides: list[str], steps: int) -> dict:
    """ms per pretraining step, plain PyTorch vs the DeepSpeed engine, on the same batches."""
    import torch

    from s3rec import distributed as dist
    from s3rec.config import load_config
    from s3rec.data.pretrain_samples import PretrainSampler
    from s3rec.data.reader import Dataset
    from s3rec.engine.deepspeed_setup import build_ds_config, initialize
    from s3rec.model import build_model, param_groups
    from s3rec.objectives import pretrain_losses

    cfg = load_config(None, overrides)
    ds = Dataset(data)
    items, offsets = ds.load_sequences()
    av, ao = ds.item_attributes()
    sampler = PretrainSampler(items, offsets, av, ao, ds.num_items, cfg.model.max_seq_length,
                              cfg.pretrain.mask_prob)
    warm = 20
    batches = list(itertools.islice(sampler.batches(cfg.seed, 0, cfg.pretrain.batch_size),
                                    steps + warm))
    device = dist.info().device
    batches = [b.to(device) for b in batches]
    w = cfg.pretrain.weights

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    torch.manual_seed(0)
    model = build_model(cfg, ds.item_size, ds.attribute_size).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.pretrain.lr)
    for i, b in enumerate(batches):
        if i == warm:
            sync()
            t = time.perf_counter()
        loss = pretrain_losses(model, b, w)["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    plain = (time.perf_counter() - t) / steps

    torch.manual_seed(0)
    model = build_model(cfg, ds.item_size, ds.attribute_size).to(device)
    engine = initialize(model, param_groups(model, cfg),
                        build_ds_config(cfg, "pretrain", 1, device.type))
    fn = lambda m, b: pretrain_losses(m, b, w)["total"]
    for i, b in enumerate(batches):
        if i == warm:
            sync()
            t = time.perf_counter()
        loss = engine(fn, b)
        engine.backward(loss)
        engine.step()
    sync()
    ds_step = (time.perf_counter() - t) / steps
    return {"plain_step_ms": 1000 * plain, "deepspeed_step_ms": 1000 * ds_step,
            "deepspeed_overhead_ms": 1000 * (ds_step - plain), "overhead_steps": steps}


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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="prepared dataset folder (s3rec-prep)")
    p.add_argument("--json", required=True, help="where to write the figures")
    p.add_argument("--out", default=None, help="run folders (default: a temporary folder)")
    p.add_argument("--overhead-steps", type=int, default=200,
                   help="pretraining steps timed for the DeepSpeed overhead (0 = skip)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)

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
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    text = json.dumps(figures, indent=2)
    Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    sys.exit(main())
