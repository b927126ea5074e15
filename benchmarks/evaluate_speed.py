"""s3rec-evaluate's ranking pass against the one inside fine-tuning, on the same model and users.

    OMP_NUM_THREADS=1 python benchmarks/evaluate_speed.py --data DATA --model MODEL.pt --json F

Times, alternated `--repeats` times after one warm-up each (median reported):
  finetune_full_s    the fine-tune's full-ranking pass (a DeepSpeed engine, metrics only)
  evaluate_full_s    s3rec-evaluate's pass (the bare model, every user's rank gathered too)
  evaluate_popular_s s3rec-evaluate's popular-99 pass, and popular_draw_s, drawing its negatives
  command_full_s     the whole `s3rec-evaluate --protocol full` run (data, model, pass, files)
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

from bench_common import arguments, finish


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> int:
    p = arguments(__doc__)
    p.add_argument("--model", required=True, help="a model file (final.pt, best.pt)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    from s3rec import distributed as dist
    from s3rec import evaluate as evaluate_cli
    from s3rec.config import load_config
    from s3rec.data.eval_views import EvalView
    from s3rec.data.popular_negatives import popular_negatives
    from s3rec.data.reader import Dataset
    from s3rec.engine.deepspeed_setup import StageModule, build_ds_config, initialize
    from s3rec.engine.evaluate import evaluate
    from s3rec.model import build_model, load_model_file, param_groups

    info = dist.setup()
    cfg = load_config(None, args.overrides)
    ds = Dataset(args.data)
    items, offsets = ds.load_sequences()
    sd = load_model_file(args.model, cfg, {"name": ds.name, "num_users": ds.num_users,
                                           "num_items": ds.num_items,
                                           "num_attributes": ds.num_attributes})
    model = build_model(cfg, ds.item_size, ds.attribute_size, init_state=sd).to(info.device)
    engine = initialize(model, param_groups(model, cfg),
                        build_ds_config(cfg, "finetune", 1, info.device.type))
    bare = StageModule(build_model(cfg, ds.item_size, ds.attribute_size, init_state=sd)
                       ).to(info.device)
    bs = cfg.finetune.eval_batch_size
    full = EvalView(items, offsets, ds.num_items, "test", None, cfg.model.max_seq_length)
    t = time.perf_counter()
    pop = popular_negatives(items, offsets, ds.num_items, 99, seed=0)
    draw_s = time.perf_counter() - t
    popular = EvalView(items, offsets, ds.num_items, "test", pop, cfg.model.max_seq_length)

    cases = {
        "finetune_full_s": lambda: evaluate(engine, full, "full", bs, info.device),
        "evaluate_full_s": lambda: evaluate(bare, full, "full", bs, info.device, with_ranks=True),
        "evaluate_popular_s": lambda: evaluate(bare, popular, "sampled", bs, info.device,
                                               with_ranks=True),
    }
    for fn in cases.values():
        fn()                                                     # warm-up
    times = {k: [] for k in cases}
    out_dir = tempfile.mkdtemp(prefix="s3rec-eval-bench-")
    times["command_full_s"] = []
    for _ in range(args.repeats):
        for k, fn in cases.items():
            times[k].append(_timed(fn))
        times["command_full_s"].append(_timed(lambda: evaluate_cli.main(
            ["--data", args.data, "--model", args.model, "--protocol", "full",
             "--out", out_dir, f"--batch-size={bs}"])))
    figures = {k: statistics.median(v) for k, v in times.items()}
    figures["popular_draw_s"] = draw_s
    figures["runs"] = times
    figures["users"] = ds.num_users
    figures["items"] = ds.num_items
    figures["ratio_evaluate_to_finetune_full"] = (figures["evaluate_full_s"]
                                                  / figures["finetune_full_s"])
    return finish(figures, args.json)


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    sys.exit(main())
