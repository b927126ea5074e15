"""Sampled and full-ranking metrics: ranks (ties against the answer), values, shard sums."""
import math

import numpy as np
import pytest
import torch

from s3rec.metrics import (FULL_KEYS, FULL_KS, SAMPLED_KEYS, add_sums, finalize, full_ranks,
                           metric_sums, metrics_from_ranks, sampled_metrics, sampled_ranks)


def original_get_metric(pred_list, topk):
    """utils.get_metric of the authors' code (ranks already computed)."""
    NDCG = HIT = MRR = 0.0
    for rank in pred_list:
        MRR += 1.0 / (rank + 1.0)
        if rank < topk:
            NDCG += 1.0 / np.log2(rank + 2.0)
            HIT += 1.0
    return HIT / len(pred_list), NDCG / len(pred_list), MRR / len(pred_list)


def test_sampled_ranks_count_ties_against_the_answer():
    s = torch.tensor([[5.0, 1, 2, 3], [2.0, 2, 3, 1], [0.0, 0, 0, 0], [9.0, 10, 11, 12]])
    assert sampled_ranks(s).tolist() == [0, 2, 3, 3]


def test_metrics_match_the_original_formulas_on_distinct_scores():
    torch.manual_seed(0)
    scores = torch.randn(300, 100)
    ranks = sampled_ranks(scores)
    # without ties the original's double argsort gives the same ranks
    orig_ranks = (-scores.numpy()).argsort().argsort()[:, 0]
    assert ranks.tolist() == orig_ranks.tolist()
    m = sampled_metrics(scores)
    assert tuple(m) == SAMPLED_KEYS
    for k in (1, 5, 10):
        hit, ndcg, mrr = original_get_metric(orig_ranks, k)
        assert m[f"HR@{k}"] == pytest.approx(hit)
        if k > 1:
            assert m[f"NDCG@{k}"] == pytest.approx(ndcg)
        assert m["MRR"] == pytest.approx(mrr)


def test_full_keys_and_hand_values():
    m = metrics_from_ranks(torch.tensor([0, 6, 15, 40]), FULL_KS, mrr=False)
    assert tuple(m) == FULL_KEYS
    assert m["HR@5"] == 0.25 and m["HR@10"] == 0.5 and m["HR@20"] == 0.75
    assert m["NDCG@20"] == pytest.approx((1 + 1 / math.log2(8) + 1 / math.log2(17)) / 4)


def test_full_ranks_exclude_history_padding_and_mask_but_not_the_answer():
    # item_size 8: ids 1..6 real, 7 = mask_id
    scores = torch.tensor([[9.0, 1, 5, 4, 8, 3, 2, 9.5],
                           [9.0, 1, 5, 4, 8, 3, 2, 9.5]])
    answers = torch.tensor([3, 3])
    # user 0: history {4, 2}; user 1: history {3, 1} (the answer is also in its history)
    values, offsets = torch.tensor([4, 2, 3, 1]), torch.tensor([0, 2, 4])
    r = full_ranks(scores, answers, (values, offsets))
    assert r.tolist() == [0, 2]           # user 1: items 2 (5) and 4 (8) beat the answer (4)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, [4, 2]] = True
    mask[1, [3, 1]] = True
    assert full_ranks(scores, answers, mask).tolist() == [0, 2]
    assert full_ranks(scores, answers).tolist() == [2, 2]
    assert scores[0, 4] == 8                                      # input untouched
    # a CSR slice whose offsets do not start at 0
    r = full_ranks(scores[1:], answers[1:], (values, offsets[1:]))
    assert r.tolist() == [2]
    with pytest.raises(ValueError, match="answers"):
        full_ranks(scores, torch.tensor([7, 3]))


def test_full_ranks_ties_against_the_answer():
    scores = torch.tensor([[0.0, 1, 1, 1, 0.5, 0]])
    assert full_ranks(scores, torch.tensor([2])).tolist() == [2]


def test_shard_sums_are_exact():
    torch.manual_seed(1)
    ranks = torch.randint(0, 100, (1001,))
    whole = metrics_from_ranks(ranks)
    parts = [metric_sums(p) for p in ranks.split(333)]
    total = parts[0]
    for p in parts[1:]:
        total = add_sums(total, p)
    assert total["count"] == 1001
    got = finalize(total)
    assert all(got[k] == pytest.approx(whole[k], rel=1e-12) for k in SAMPLED_KEYS)
    with pytest.raises(ValueError):
        finalize({"HR@1": 0.0, "count": 0.0})
