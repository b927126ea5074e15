"""Host-side pieces of a training step, each alone: python benchmarks/micro.py --data DATASET --json FILE

  adam_step_ms.{fused,foreach,loop}  one Adam step over the model's tensors (default config,
                                      the dataset's sizes), by torch's kernel choice
                                      (deepspeed.adam_kernel)
  sample_epoch_s                      drawing every pretraining batch of one epoch (masks,
                                      negatives, segments), as the loop's sampler does
  batch_ms                            one pretraining batch drawn plus its host-side index
                                      (s3rec.objectives.pretrain_index): the host's work per step
                                      before the copy
  dropout_ms.{bernoulli,packed}       one dropout call on a [batch, max_seq_length, hidden]
                                      activation: torch's bernoulli_ against model.fast_dropout
Extra `key=value` arguments override the config (e.g. model.hidden_size=128).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

from bench_common import arguments, config_and_data, finish


def per_call_ms(fn, calls: int, warm: int = 5) -> float:
    for _ in range(warm):
        fn()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1000 * (time.perf_counter() - t) / calls


def main(argv=None) -> int:
    p = arguments(__doc__)
    p.add_argument("--steps", type=int, default=200, help="Adam steps and dropout calls timed")
    args = p.parse_args(argv)
    cfg, ds = config_and_data(args)
    import torch
    import torch.nn.functional as F

    from s3rec.engine.deepspeed_setup import ADAM_KERNEL_ARGS
    from s3rec.model import build_model
    from s3rec.model.dropout import fast_dropout
    from s3rec.objectives import pretrain_index
    from s3rec.pretrain_step import pretrain_sampler
    figures: dict = {"data": os.path.abspath(args.data), "threads": torch.get_num_threads()}

    torch.manual_seed(0)
    model = build_model(cfg, ds.item_size, ds.attribute_size)
    params = [q for q in model.parameters() if q.requires_grad]
    for q in params:
        q.grad = torch.randn_like(q) * 1e-3
    figures["tensors"] = len(params)
    figures["adam_step_ms"] = {}
    for kernel, kwargs in ADAM_KERNEL_ARGS.items():
        opt = torch.optim.Adam(params, lr=cfg.pretrain.lr, **kwargs)
        figures["adam_step_ms"][kernel] = per_call_ms(opt.step, args.steps)

    sampler = pretrain_sampler(cfg, ds)
    pc = cfg.pretrain

    def epoch(prepare):
        t = time.perf_counter()
        n = 0
        for b in sampler.batches(cfg.seed, 0, pc.batch_size, cfg.data.bucket_by_length,
                                 cfg.data.bucket_size):
            prepare(b)
            n += 1
        return time.perf_counter() - t, n

    figures["sample_epoch_s"], n = epoch(lambda b: None)
    with_index, _ = epoch(lambda b: dataclasses.replace(b, index=pretrain_index(b)))
    figures["batches_per_epoch"] = n
    figures["batch_ms"] = 1000 * with_index / n

    x = torch.randn(pc.batch_size, cfg.model.max_seq_length, cfg.model.hidden_size)
    rate = cfg.model.hidden_dropout
    figures["dropout_ms"] = {
        "bernoulli": per_call_ms(lambda: F.dropout(x, rate, True), args.steps),
        "packed": per_call_ms(lambda: fast_dropout(x, rate, True), args.steps)}
    figures["dropout_speedup"] = figures["dropout_ms"]["bernoulli"] / figures["dropout_ms"]["packed"]
    return finish(figures, args.json)


if __name__ == "__main__":
    sys.exit(main())
