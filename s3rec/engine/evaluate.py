"""Sharded evaluation: each rank ranks its own users, metric sums are all-reduced, so the result
equals one process's exactly (sums of per-user values in float64; the per-user ranks do not
depend on the sharding)."""
from __future__ import annotations

import numpy as np
import torch

from s3rec import distributed as dist
from s3rec import metrics
from s3rec.data.eval_views import EvalView, user_share


def _ranks(model, batch, protocol: str) -> torch.Tensor:
    """Runs inside StageModule.forward (ZeRO-3 gathers the item table). -> int64 [U]."""
    last = model.encode(batch.items, batch.positions, causal=True)[:, -1]      # [U, d]
    if protocol == "sampled":
        cands = torch.cat([batch.answers[:, None], batch.negatives], dim=1)     # [U, 1 + K]
        return metrics.sampled_ranks(model.finetune_scores(last, cands).float())
    scores = model.full_scores(last).float()                                    # [U, item_size]
    history = torch.zeros_like(scores, dtype=torch.bool)
    h = batch.history_index
    history[h[:, 0], h[:, 1]] = True
    return metrics.full_ranks(scores, batch.answers, history)


def length_batches(view: EvalView, batch_size: int, rank: int, world: int) -> list[np.ndarray]:
    """This rank's users (the same share as eval_batches), in batches whose users all have the
    same input length. A batch is trimmed to its longest input, so this removes the padding
    (Beauty: mean length 9 of a 50-slot window, ~5x less work), and every user is computed at
    its own length whatever the world size or batch size, so no rank flips with the sharding."""
    if batch_size < 1:
        raise ValueError(f"finetune.eval_batch_size must be >= 1, got {batch_size}")
    start, end = user_share(view.num_users, rank, world)
    lengths = view.length[start:end]
    order = np.argsort(lengths, kind="stable")
    users = np.arange(start, end, dtype=np.int64)[order]
    cuts = np.flatnonzero(np.diff(lengths[order])) + 1          # where the length changes
    out = []
    for run in np.split(users, cuts):
        out.extend(run[i:i + batch_size] for i in range(0, len(run), batch_size))
    return out


def evaluate(engine, view: EvalView, protocol: str, batch_size: int, device,
             with_ranks: bool = False, ks: tuple[int, ...] | None = None,
             mrr: bool | None = None):
    """Metrics of `view` under `protocol` (sampled: against the view's negatives, whichever way
    they were drawn | full); every rank calls it. ks / mrr: the metrics (default: the
    protocol's, metrics.SAMPLED_KEYS or FULL_KEYS). With_ranks: (metrics, ranks), ranks int64
    [view.num_users] every user's 0-based rank of the answer, the same on every rank (each rank
    fills its own users, the rest are summed in)."""
    info = dist.info()
    rank, world = info.rank, info.world_size
    default_ks, default_mrr = ((metrics.SAMPLED_KS, True) if protocol == "sampled"
                               else (metrics.FULL_KS, False))
    ks = default_ks if ks is None else ks
    mrr = default_mrr if mrr is None else mrr
    batches = [view.make_batch(u) for u in length_batches(view, batch_size, rank, world)]
    # ZeRO-3 gathers parameters collectively in every forward: all ranks must run the same number
    # of them (every rank can count every rank's batches), so pad with repeats, results dropped.
    # A rank with no users at all (more ranks than users) repeats a stand-in batch of user 0.
    most = max(len(length_batches(view, batch_size, r, world)) for r in range(world))
    stand_in = batches[-1] if batches else None
    if stand_in is None and most > 0:
        stand_in = view.make_batch(np.zeros(1, dtype=np.int64))
    engine.eval()
    sums = None
    # rank + 1 of each of this rank's users, 0 elsewhere: one sum over ranks gathers them all
    all_ranks = torch.zeros(view.num_users, dtype=torch.int64) if with_ranks else None
    with torch.no_grad():
        for i in range(most):
            b = (batches[i] if i < len(batches) else stand_in).to(device)
            ranks = engine(_ranks, b, protocol)
            if i < len(batches):
                if all_ranks is not None:
                    all_ranks[b.users.cpu()] = ranks.cpu() + 1
                s = metrics.metric_sums(ranks, ks, mrr)
                sums = s if sums is None else metrics.add_sums(sums, s)
    engine.train()
    if sums is None:
        sums = {k: 0.0 for k in metrics.metric_sums(torch.zeros(0), ks, mrr)}
    keys = list(sums)
    total = dist.all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64))
    result = metrics.finalize(dict(zip(keys, total.tolist())))
    if all_ranks is None:
        return result
    all_ranks = dist.all_reduce_sum(all_ranks.to(device)).cpu() - 1
    return result, all_ranks
