"""Ranking metrics, sampled and full; defined once here.

Ranks are 0-based and ties count against the answer (pessimistic): rank = number of other
candidates scoring >= the answer. The original's unstable sort broke ties at random.
HR@k = [rank < k]; NDCG@k = 1/log2(rank + 2) if rank < k (one relevant item); MRR = 1/(rank + 1),
untruncated.

Full ranking: every real item (1..item_size-2) is a candidate; padding (0) and mask_id
(item_size-1) are excluded, and so is the user's history (items before the target) with -inf
(the original set history scores to 0, a bug). The answer itself is never excluded, even when it
also occurs in the history: the task is to rank it, and excluding it would make it unrankable.

Sharded evaluation: `metric_sums` per shard, add the sums (and counts) across shards, `finalize`.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch

SAMPLED_KEYS = ("HR@1", "HR@5", "NDCG@5", "HR@10", "NDCG@10", "MRR")
FULL_KEYS = ("HR@5", "NDCG@5", "HR@10", "NDCG@10", "HR@20", "NDCG@20")
SAMPLED_KS = (1, 5, 10)
FULL_KS = (5, 10, 20)


def sampled_ranks(scores: torch.Tensor) -> torch.Tensor:
    """scores [U, C] with the answer in column 0 -> int64 [U] 0-based ranks (ties against it)."""
    return (scores[:, 1:] >= scores[:, :1]).sum(dim=1)


def full_ranks(scores: torch.Tensor, answers: torch.Tensor, history=None) -> torch.Tensor:
    """Rank of each answer among all real items.

    scores [U, item_size] (columns = item ids; 0 and item_size-1 = mask_id are excluded);
    answers int64 [U] in 1..item_size-2; history: None, a bool mask [U, item_size]
    (True = excluded), or a CSR pair (values, offsets) with user u's history items
    values[offsets[u]:offsets[u+1]] (offsets may start above 0). Returns int64 [U];
    `scores` is not modified."""
    U, n = scores.shape
    answers = answers.to(device=scores.device, dtype=torch.int64).reshape(U)
    if U and (int(answers.min()) < 1 or int(answers.max()) > n - 2):
        raise ValueError(f"answers must be item ids in 1..{n - 2}, got "
                         f"{int(answers.min())}..{int(answers.max())}")
    answer_score = scores.gather(1, answers[:, None])                  # [U, 1]
    scores = scores.clone()
    scores[:, 0] = -math.inf
    scores[:, n - 1] = -math.inf
    if history is not None:
        if isinstance(history, torch.Tensor):
            if history.shape != scores.shape:
                raise ValueError(f"history mask must be {list(scores.shape)}, got "
                                 f"{list(history.shape)}")
            scores.masked_fill_(history.to(device=scores.device, dtype=torch.bool), -math.inf)
        else:
            values, offsets = (torch.as_tensor(a) for a in history)
            offsets = offsets.to(torch.int64).cpu()
            if offsets.numel() != U + 1:
                raise ValueError(f"history offsets must have {U + 1} entries, got "
                                 f"{offsets.numel()}")
            rows = torch.repeat_interleave(torch.arange(U), offsets[1:] - offsets[:-1])
            cols = values[int(offsets[0]):int(offsets[-1])].to(torch.int64)
            scores[rows.to(scores.device), cols.to(scores.device)] = -math.inf
    # the answer keeps its own score even when it also occurs in the history
    scores.scatter_(1, answers[:, None], answer_score)
    return (scores >= answer_score).sum(dim=1) - 1


def user_values(ranks: torch.Tensor, key: str) -> torch.Tensor:
    """Each user's value of one metric (HR@k, NDCG@k, MRR) from 0-based ranks -> float64 [U];
    a metric is the mean of these over users."""
    r = ranks.detach().to(torch.float64).reshape(-1).cpu()
    name, _, k = key.partition("@")
    if name == "MRR" and not k:
        return 1.0 / (r + 1.0)
    if name in ("HR", "NDCG") and k.isdigit() and int(k) >= 1:
        hit = r < int(k)
        if name == "HR":
            return hit.to(torch.float64)
        return torch.where(hit, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r))
    raise ValueError(f"unknown metric {key!r}: expected HR@k, NDCG@k or MRR")


def metric_keys(ks: Iterable[int] = SAMPLED_KS, mrr: bool = True) -> list[str]:
    """HR@k and NDCG@k for each k (HR@1 without NDCG@1, as reported), then MRR."""
    keys = []
    for k in ks:
        keys += [f"HR@{k}"] + ([f"NDCG@{k}"] if k > 1 else [])
    return keys + (["MRR"] if mrr else [])


def metric_sums(ranks: torch.Tensor, ks: Iterable[int] = SAMPLED_KS, mrr: bool = True
                ) -> dict[str, float]:
    """Per-shard sums of every metric (float64) plus "count": add these across shards, then
    `finalize`. Keys: metric_keys(ks, mrr)."""
    out = {key: float(user_values(ranks, key).sum()) for key in metric_keys(ks, mrr)}
    out["count"] = float(ranks.numel())
    return out


def add_sums(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    if set(a) != set(b):
        raise ValueError(f"metric sums with different keys: {sorted(a)} vs {sorted(b)}")
    return {k: a[k] + b[k] for k in a}


def finalize(sums: Mapping[str, float]) -> dict[str, float]:
    """Means from summed metrics (the "count" entry divides)."""
    count = sums["count"]
    if count <= 0:
        raise ValueError("finalize: no users were evaluated (count 0)")
    return {k: v / count for k, v in sums.items() if k != "count"}


def metrics_from_ranks(ranks: torch.Tensor, ks: Iterable[int] = SAMPLED_KS,
                       mrr: bool = True) -> dict[str, float]:
    """Means over users. Sampled: ks=(1, 5, 10), mrr=True -> SAMPLED_KEYS; full:
    ks=(5, 10, 20), mrr=False -> FULL_KEYS (in that order)."""
    return finalize(metric_sums(ranks, ks, mrr))


def sampled_metrics(scores: torch.Tensor) -> dict[str, float]:
    return metrics_from_ranks(sampled_ranks(scores), SAMPLED_KS, mrr=True)
