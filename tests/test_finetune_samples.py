"""Fine-tuning train view and valid/test views against the original's rules."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from s3rec.data.eval_views import EvalView, eval_batches, user_share
from s3rec.data.finetune_samples import FinetuneSampler

MAX_LEN = 50
FIELDS = ("users", "items", "positions", "target_pos", "target_neg")


def make_data(num_users=150, num_items=200, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 80, num_users)
    lengths[:4] = [2, 3, 4, 60]          # no train input, no train input, one position, truncated
    items = rng.integers(1, num_items + 1, int(lengths.sum())).astype(np.int32)
    offsets = np.zeros(num_users + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return items, offsets, num_items


def seqs_of(items, offsets):
    return [items[offsets[u]:offsets[u + 1]].tolist() for u in range(len(offsets) - 1)]


def without_first_user(items, offsets, n):
    """User 0 has 2 items: too short for a validation input."""
    return items[offsets[1]:], offsets[1:] - offsets[1], n


def unpad(row):
    return [x for x in row if x]


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture(scope="module")
def sampler(data):
    items, offsets, n = data
    return FinetuneSampler(items, offsets, n, MAX_LEN)


def epoch(s, seed=0, ep=0, bs=32, **kw):
    return list(s.batches(seed, ep, bs, **kw))


def test_train_view_is_the_originals(data, sampler):
    """input = seq[:-3], targets = seq[1:-2], last 50, left-padded; one sample per user."""
    items, offsets, n = data
    seqs = seqs_of(items, offsets)
    seen = set()
    for b in epoch(sampler, bs=32):
        B, L = b.items.shape
        assert torch.equal(b.positions, torch.arange(MAX_LEN - L, MAX_LEN).expand(B, L))
        assert (b.items > 0).sum(1).max() == L, "trimmed to the batch's longest input"
        for u, inp, tp, tn in zip(b.users.tolist(), b.items.tolist(), b.target_pos.tolist(),
                                  b.target_neg.tolist()):
            seq = seqs[u]
            assert u not in seen
            seen.add(u)
            assert unpad(inp) == seq[:-3][-MAX_LEN:] and inp[-1] != 0
            assert unpad(tp) == seq[1:-2][-MAX_LEN:]
            assert [x == 0 for x in tn] == [x == 0 for x in inp], "a negative per real position"
            assert not set(unpad(tn)) & set(seq), "negative in the user's full sequence"
            assert all(1 <= x <= n for x in unpad(tn))
    assert seen == {u for u, s in enumerate(seqs) if len(s) > 3}
    assert sampler.num_samples == len(seen) and sampler.num_batches(32) == -(-len(seen) // 32)


def test_negatives_uniform_over_allowed_items_and_fresh_each_epoch(sampler):
    counts = Counter()
    for ep in range(4):
        for b in epoch(sampler, ep=ep, bs=64):
            counts.update(b.target_neg[b.target_neg > 0].tolist())
    freq = np.array([counts[i] for i in range(1, sampler.num_items + 1)], dtype=float)
    # every item is drawn; spread close to uniform (the exclusions differ by user, so loosely)
    assert freq.min() > 0 and freq.std() / freq.mean() < 0.25
    a, b = epoch(sampler, ep=0), epoch(sampler, ep=1)
    a2 = epoch(sampler, ep=0)
    assert all(torch.equal(getattr(x, f), getattr(y, f)) for x, y in zip(a, a2) for f in FIELDS)
    tn = lambda bs: {u: t for x in bs for u, t in zip(x.users.tolist(), x.target_neg.tolist())}
    assert tn(a) != tn(b), "negatives resampled each epoch"


@pytest.mark.parametrize("world", [2, 4])
def test_rank_slices_concatenate_to_the_global_batch(sampler, world):
    full = epoch(sampler, 2, 3, bs=40)
    parts = [epoch(sampler, 2, 3, bs=40, rank=r, world_size=world) for r in range(world)]
    for k, g in enumerate(full):
        for f in FIELDS:
            assert torch.equal(torch.cat([getattr(p[k], f) for p in parts]), getattr(g, f))


def test_resume_mid_epoch_gives_the_tail(sampler):
    full = epoch(sampler, 5, 1, bs=16)
    tail = list(sampler.batches(5, 1, 16, start_batch=3))
    assert len(tail) == len(full) - 3
    assert all(torch.equal(getattr(x, f), getattr(y, f))
               for x, y in zip(full[3:], tail) for f in FIELDS)


def test_user_with_every_item_is_an_error():
    with pytest.raises(ValueError, match="all 3 items"):
        FinetuneSampler(np.array([1, 2, 3, 1, 2], np.int32), np.array([0, 5]), 3)


@pytest.mark.parametrize("split,drop", [("valid", 2), ("test", 1)])
def test_eval_views_are_the_originals(data, split, drop):
    items, offsets, n = without_first_user(*data)
    seqs = seqs_of(items, offsets)
    negs = np.random.default_rng(1).integers(1, n + 1, (len(seqs), 99))
    view = EvalView(items, offsets, n, split, negs)
    for b in view.batches(40):
        B, L = b.items.shape
        assert torch.equal(b.positions, torch.arange(MAX_LEN - L, MAX_LEN).expand(B, L))
        hist = {}
        for r, i in b.history_index.tolist():
            hist.setdefault(r, set()).add(i)
        assert len(b.history_index) == sum(len(h) for h in hist.values()), "no duplicates"
        for r, u in enumerate(b.users.tolist()):
            seq = seqs[u]
            assert unpad(b.items[r].tolist()) == seq[:-drop][-MAX_LEN:]
            assert b.answers[r] == seq[-drop]
            assert b.negatives[r].tolist() == negs[u].tolist()
            assert hist[r] == set(seq[:-drop]), "history = every item of the whole input"


def test_eval_shares_are_disjoint_and_complete(data):
    items, offsets, n = without_first_user(*data)
    view = EvalView(items, offsets, n, "test")
    for world in (1, 2, 3, 7):
        users = [u for r in range(world) for b in eval_batches(view, 16, r, world)
                 for u in b.users.tolist()]
        assert users == list(range(view.num_users))
        sizes = [user_share(view.num_users, r, world) for r in range(world)]
        assert max(e - s for s, e in sizes) - min(e - s for s, e in sizes) <= 1
    assert next(iter(view.batches(8))).negatives is None


def test_eval_view_errors_name_the_problem(data):
    items, offsets, n = data
    with pytest.raises(ValueError, match="user 0 has 2 items"):
        EvalView(items, offsets, n, "valid")
    with pytest.raises(ValueError, match="split"):
        EvalView(items, offsets, n, "train")
    with pytest.raises(ValueError, match="negatives must be"):
        EvalView(items, offsets, n, "test", np.zeros((3, 99)))


def test_engine_micro_batches_are_the_rank_slices(sampler):
    from s3rec.engine.loop import split_rows
    g = next(sampler.batches(1, 0, 40))
    shards = [next(sampler.batches(1, 0, 40, rank=r, world_size=2)) for r in range(2)]
    for m, s in zip(split_rows(g, 2), shards):
        assert all(torch.equal(getattr(m, f), getattr(s, f)) for f in FIELDS)
