"""How fast would a pretraining step be if its kernel launches cost nothing?

    python benchmarks/graph_step.py --data DATASET --json FILE [--steps N] [key=value ...]

A probe for the H100 epoch target, not a training path. At this model's size a step is bound by
the host launching ~750 kernels (README, "Measured"), so the floor is the device's own time for
one step. This measures it: one real Beauty pretraining batch (`configs/beauty.yaml`, overrides
applied; the longest of the first 300 batches, index computed on the host as in training), plain
PyTorch forward through the four losses, backward and Adam, captured once in a CUDA graph and
replayed N times, against the same step run eagerly N times. Replaying one batch repeats its
data (and its dropout draws advance as in training); the timing is what counts:
  eager_step_ms, graph_step_ms       per step, device synchronised at both ends
  steps_per_epoch                    global batches of one pretraining epoch
  eager_epoch_s, graph_epoch_s       those steps x the per-step times (the graph one is the floor
                                     that one CUDA graph per bucket shape, or anything as
                                     launch-free, could reach)
  batch_rows, batch_length           the batch timed
Without CUDA only the eager step is timed (graph_* are null), which is what the tests run.
"""
from __future__ import annotations

import dataclasses
import itertools
import sys
import time

from bench_common import REPO, arguments, finish


def main(argv=None) -> int:
    p = arguments(__doc__)
    p.add_argument("--steps", type=int, default=300, help="timed steps of each kind")
    args = p.parse_args(argv)

    import torch

    from s3rec.config import load_config
    from s3rec.data.reader import Dataset
    from s3rec.model import build_model
    from s3rec.objectives import pretrain_index, pretrain_losses
    from s3rec.pretrain_step import pretrain_sampler

    cfg = load_config(REPO / "configs/beauty.yaml", args.overrides)
    pc = cfg.pretrain
    ds = Dataset(args.data)
    sampler = pretrain_sampler(cfg, ds)
    first = itertools.islice(sampler.batches(cfg.seed, 0, pc.batch_size,
                                             cfg.data.bucket_by_length, cfg.data.bucket_size), 300)
    batch = max(first, key=lambda b: b.masked_items.shape[1])
    batch = dataclasses.replace(batch, index=pretrain_index(batch))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    hb = batch.to(device)

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, ds.item_size, ds.attribute_size).to(device).train()
    # capturable: Adam keeps its step count on the device, as a graph replay needs
    opt = torch.optim.Adam(model.parameters(), lr=pc.lr, betas=(pc.adam_beta1, pc.adam_beta2),
                           weight_decay=pc.weight_decay, capturable=cuda)

    def step():
        loss = pretrain_losses(model, hb, pc.weights, pc.reduction, pc.pair_form)["total"]
        loss.backward()
        opt.step()
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(fn) -> float:
        sync()
        t = time.perf_counter()
        for _ in range(args.steps):
            fn()
        sync()
        return 1000 * (time.perf_counter() - t) / args.steps

    def eager():
        opt.zero_grad(set_to_none=True)
        step()

    if cuda:   # warm up on a side stream, as graph capture requires
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(5):
                eager()
        torch.cuda.current_stream().wait_stream(side)
    else:
        for _ in range(5):
            eager()
    eager_ms = timed(eager)

    graph_ms = None
    if cuda:
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            # gradients are written (not accumulated) by the first backward after set_to_none,
            # and the captured buffers stay the same on every replay
            step()
        graph_ms = timed(graph.replay)

    n = sampler.num_batches(pc.batch_size)
    figures = {"device": torch.cuda.get_device_name(0) if cuda else "cpu",
               "batch_rows": int(batch.masked_items.shape[0]),
               "batch_length": int(batch.masked_items.shape[1]), "steps": args.steps,
               "eager_step_ms": eager_ms, "graph_step_ms": graph_ms, "steps_per_epoch": n,
               "eager_epoch_s": n * eager_ms / 1000,
               "graph_epoch_s": n * graph_ms / 1000 if graph_ms is not None else None}
    finish(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
