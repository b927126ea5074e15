"""Pretraining sample generator: the reference's rules, determinism, ranks, resume, speed-free."""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from s3rec.data.pretrain_samples import PretrainSampler, epoch_order, make_rng

MAX_LEN = 50
FIELDS = ("masked_items", "positions", "original_items", "mip_neg", "masked", "sp_masked",
          "sp_pos", "sp_neg")


def make_data(num_users=120, num_items=300, num_attrs=20, seed=0, unique_items=False,
              lengths=None):
    """Random CSR sequences (some longer than max_len + 2, some too short for any sample) and an
    attribute CSR over ids 0..item_size-1 with repeated ids, as the release's JSON can have."""
    rng = np.random.default_rng(seed)
    if lengths is None:
        lengths = rng.integers(1, 75, num_users)
        lengths[:3] = [1, 2, 3]                      # no sample, no sample, one sample
        lengths[3] = 60                              # truncated to the last 50 of seq[:-2]
    lengths = np.asarray(lengths)
    if unique_items:                                 # item = flat index + 1: identifies a position
        items = np.arange(1, lengths.sum() + 1, dtype=np.int32)
        num_items = int(lengths.sum())
    else:
        items = rng.integers(1, num_items + 1, int(lengths.sum())).astype(np.int32)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    attrs = [[]] + [rng.integers(1, num_attrs + 1, rng.integers(0, 4)).tolist()
                    for _ in range(num_items)] + [[]]
    attrs = [a + a[:1] for a in attrs]               # repeat an id: must count once
    attr_offsets = np.zeros(num_items + 3, dtype=np.int64)
    np.cumsum([len(a) for a in attrs], out=attr_offsets[1:])
    attr_values = np.array([x for a in attrs for x in a], dtype=np.int32)
    return items, offsets, attr_values, attr_offsets, num_items, attrs


def seqs_of(items, offsets):
    return [items[offsets[u]:offsets[u + 1]].tolist() for u in range(len(offsets) - 1)]


def original_prefixes(seqs, max_len=MAX_LEN):
    """The original's split_sequence, transcribed."""
    out = []
    for seq in seqs:
        inp = seq[-(max_len + 2):-2]
        for i in range(len(inp)):
            out.append(inp[:i + 1])
    return out


def epoch(sampler, seed=0, ep=0, bs=32, **kw):
    return list(sampler.batches(seed, ep, bs, **kw))


def row_len(b):
    return (b.original_items > 0).sum(1)


@pytest.fixture(scope="module")
def data():
    return make_data()


@pytest.fixture(scope="module")
def sampler(data):
    items, offsets, av, ao, n, _ = data
    return PretrainSampler(items, offsets, av, ao, n, MAX_LEN, 0.2)


def test_sample_list_is_every_prefix_of_the_last_50_of_seq_minus_2(data, sampler):
    items, offsets, *_ = data
    expected = original_prefixes(seqs_of(items, offsets))
    assert sampler.num_samples == len(expected)
    got = [items[s:s + n].tolist() for s, n in zip(sampler.sample_start, sampler.sample_length)]
    assert got == expected
    assert sampler.num_batches(32) == -(-len(expected) // 32)


def test_every_sample_once_per_epoch_bucketed_and_not():
    items, offsets, av, ao, n, _ = make_data(unique_items=True, seed=3)
    s = PretrainSampler(items, offsets, av, ao, n)
    expected = Counter(tuple(p) for p in original_prefixes(seqs_of(items, offsets)))
    for bucket in (True, False):
        got = Counter()
        for b in epoch(s, bs=16, bucket_by_length=bucket, bucket_size=4):
            for row in b.original_items.tolist():
                got[tuple(x for x in row if x)] += 1
        assert got == expected


def test_batch_invariants(data, sampler):
    items, offsets, av, ao, n, attrs = data
    mask_id, flat = n + 1, items
    multi_hot = torch.zeros(n + 2, 32, dtype=torch.long)     # the original's dense targets
    for item in range(1, n + 1):
        for a in attrs[item]:
            multi_hot[item, a] = 1
    for b in epoch(sampler, bs=32, bucket_by_length=False):
        o, m = b.original_items, b.masked
        B, L = o.shape
        lens = row_len(b)
        assert lens.max() == L, "trimmed to the batch's longest prefix"
        assert torch.equal(b.positions, torch.arange(MAX_LEN - L, MAX_LEN).expand(B, L))
        pad = o == 0
        assert torch.equal(pad, torch.arange(L) < (L - lens)[:, None]), "left padding only"
        # MIP/MAP
        assert m[:, -1].all() and not (m & pad).any()
        assert torch.equal(b.masked_items, torch.where(m, mask_id, o))
        assert ((b.mip_neg > 0) == m).all() and (b.mip_neg <= n).all()
        assert not (b.mip_neg.unsqueeze(2) == o.unsqueeze(1)).any(2)[m].any(), "negative in prefix"
        for field in ("masked_items", "sp_masked", "sp_pos", "sp_neg"):
            assert (getattr(b, field)[pad] == 0).all(), f"{field} must keep padding 0"
        # SP
        seg = b.sp_masked == mask_id
        one = lens == 1
        for t in (b.sp_masked, b.sp_pos, b.sp_neg):
            assert torch.equal(t[one], o[one])
        for i in torch.nonzero(~one).flatten().tolist():
            cols = torch.nonzero(seg[i]).flatten()
            k = len(cols)
            assert 1 <= k <= lens[i] // 2 and cols[-1] - cols[0] == k - 1, "one contiguous segment"
            assert torch.equal(b.sp_pos[i][seg[i]], o[i][seg[i]])
            assert (b.sp_pos[i][~seg[i] & ~pad[i]] == mask_id).all()
            assert (b.sp_neg[i][~seg[i] & ~pad[i]] == mask_id).all()
            assert torch.equal(b.sp_masked[i][~seg[i]], o[i][~seg[i]])
            neg = b.sp_neg[i][seg[i]].numpy()
            starts = np.flatnonzero(flat[:len(flat) - k + 1] == neg[0])
            assert any((flat[j:j + k] == neg).all() for j in starts), \
                "negative segment = consecutive items of the concatenated sequences"
        # attributes: sparse multi-hot of the original item at each non-padding position
        dense = torch.zeros(B * L, 32, dtype=torch.long)
        dense.index_put_((b.attr_index[:, 0], b.attr_index[:, 1]), torch.ones(len(b.attr_index),
                         dtype=torch.long), accumulate=True)
        assert dense.max() == 1, "a repeated attribute id counts once"
        assert torch.equal(dense, multi_hot[o.flatten()])


def test_mask_rate_and_negative_range(sampler):
    masked = total = 0
    negs = []
    for b in epoch(sampler, seed=5, bs=64):
        nonlast = (b.original_items > 0).clone()
        nonlast[:, -1] = False
        masked += int(b.masked[nonlast].sum())
        total += int(nonlast.sum())
        negs.append(b.mip_neg[b.masked])
    rate = masked / total
    sd = (0.2 * 0.8 / total) ** 0.5
    assert abs(rate - 0.2) < 4 * sd, (rate, total)
    negs = torch.cat(negs)
    assert negs.min() >= 1 and negs.max() <= sampler.num_items      # never 0 or mask_id


def test_determinism_and_fresh_each_epoch(sampler):
    a, b = epoch(sampler, 7, 2), epoch(sampler, 7, 2)
    assert all(torch.equal(getattr(x, f), getattr(y, f)) for x, y in zip(a, b)
               for f in FIELDS + ("attr_index",))
    c = epoch(sampler, 7, 3)
    assert not all(torch.equal(x.masked, y.masked) for x, y in zip(a, c) if x.masked.shape == y.masked.shape)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("bucket", [True, False])
def test_rank_slices_concatenate_to_the_global_batch(sampler, world, bucket):
    full = epoch(sampler, 3, 1, bs=40, bucket_by_length=bucket, bucket_size=3)
    parts = [epoch(sampler, 3, 1, bs=40, bucket_by_length=bucket, bucket_size=3, rank=r,
                   world_size=world) for r in range(world)]
    for k, g in enumerate(full):
        shards = [p[k] for p in parts]
        if len(g.masked) == 40:
            assert all(len(s.masked) == 40 // world for s in shards)
        for f in FIELDS:
            assert torch.equal(torch.cat([getattr(s, f) for s in shards]), getattr(g, f)), f
        L, row0, pairs = g.masked.shape[1], 0, []
        for s in shards:                      # rank-local flat indices -> global ones
            pairs.append(s.attr_index + torch.tensor([row0 * L, 0]))
            row0 += len(s.masked)
        assert torch.equal(torch.cat(pairs), g.attr_index)


def test_resume_mid_epoch_gives_the_tail(sampler):
    full = epoch(sampler, 11, 4, bs=30)
    tail = list(sampler.batches(11, 4, 30, start_batch=5))
    assert len(tail) == len(full) - 5
    for x, y in zip(full[5:], tail):
        assert all(torch.equal(getattr(x, f), getattr(y, f)) for f in FIELDS + ("attr_index",))


def test_bucketing_cuts_padding_and_keeps_lengths(sampler):
    tokens = {bk: sum(b.masked.numel() for b in epoch(sampler, bs=16, bucket_by_length=bk))
              for bk in (True, False)}
    assert tokens[True] < 0.7 * tokens[False]
    order, ids = epoch_order(sampler.sample_length, make_rng(0, 9), 16, True, 4)
    assert sorted(order.tolist()) == list(range(sampler.num_samples))
    assert sorted(ids.tolist()) == list(range(sampler.num_batches(16)))


def test_sp_negatives_train_excludes_held_out_items():
    """Held-out (last two) items get ids no training prefix uses; 'train' never draws them."""
    items, offsets, av, ao, n, _ = make_data(num_users=60, seed=4)
    held = np.zeros(len(items), dtype=bool)
    held[offsets[1:] - 1] = held[np.maximum(offsets[1:] - 2, offsets[:-1])] = True
    items = items.copy()
    items[held] = np.arange(n + 1, n + 1 + held.sum())
    n2 = n + int(held.sum())
    ao2 = np.concatenate([ao[:n + 2], np.full(n2 - n + 1, ao[n + 1])])   # new ids: no attributes
    av2 = av[:ao[n + 1]]
    held_ids = set(items[held].tolist())
    seen = {}
    for mode in ("full", "train"):
        s = PretrainSampler(items, offsets, av2, ao2, n2, sp_negatives=mode)
        seen[mode] = set()
        for ep in range(3):
            for b in epoch(s, ep=ep, bs=64):
                seen[mode] |= set(b.sp_neg[b.sp_masked == n2 + 1].tolist())
    assert seen["full"] & held_ids, "the original's rule does draw held-out items"
    assert not seen["train"] & held_ids


def test_bad_input_is_named():
    items, offsets, av, ao, n, _ = make_data(num_users=10)
    with pytest.raises(ValueError, match="item ids must be in 1..num_items"):
        PretrainSampler(items, offsets, av, ao, int(items.max()) - 1)
    with pytest.raises(ValueError, match="offsets"):
        PretrainSampler(items, offsets[:-1], av, ao, n)
    with pytest.raises(ValueError, match="attribute offsets"):
        PretrainSampler(items, offsets, av, ao[:n], n)
    s = PretrainSampler(items, offsets, av, ao, n)
    with pytest.raises(ValueError, match="divisible"):
        s.batches(0, 0, 10, rank=0, world_size=3)
    with pytest.raises(ValueError, match="start_batch"):
        s.batches(0, 0, 10, start_batch=s.num_batches(10) + 1)
    with pytest.raises(ValueError, match="seed and epoch must be >= 0"):
        s.batches(-1, 0, 10)
    with pytest.raises(ValueError, match="contains all 3 items"):
        PretrainSampler(np.array([1, 2, 3, 1, 2], np.int32), np.array([0, 5]), av, ao, 3)


# ------------------------------------------------ the original's per-sample generator, transcribed

def original_generator(prefixes, long_sequence, num_items, mask_p, rnd):
    """The reference's rules one sample at a time with `random` (negatives exclude mask_id, as
    the reference asks). Yields (n, masked flags, negatives, seg_len, seg_start, neg_start)."""
    mask_id = num_items + 1
    for seq in prefixes:
        item_set = set(seq)
        flags, negs = [], []
        for _ in seq[:-1]:
            if rnd.random() < mask_p:
                flags.append(True)
                neg = rnd.randint(1, num_items)
                while neg in item_set:
                    neg = rnd.randint(1, num_items)
                negs.append(neg)
            else:
                flags.append(False)
        flags.append(True)
        neg = rnd.randint(1, num_items)
        while neg in item_set:
            neg = rnd.randint(1, num_items)
        negs.append(neg)
        if len(seq) < 2:
            yield len(seq), flags, negs, 0, 0, None
            continue
        seg = rnd.randint(1, len(seq) // 2)
        start = rnd.randint(0, len(seq) - seg)
        neg_start = rnd.randint(0, len(long_sequence) - seg)
        yield len(seq), flags, negs, seg, start, neg_start
    del mask_id


def stats_of(records):
    """Marginals: mask rate by position-from-end, (n, seg) and (n, start) frequencies, negatives."""
    by_pos, segs, starts, negs = Counter(), Counter(), Counter(), Counter()
    count_pos = Counter()
    for n, flags, ng, seg, start, _ in records:
        for j, f in enumerate(flags[::-1][:6]):
            by_pos[j] += f
            count_pos[j] += 1
        segs[(min(n, 12), seg)] += 1
        starts[(min(n, 12), start if n < 12 else min(start, 6))] += 1
        negs.update(v % 10 for v in ng)
    rate = {j: by_pos[j] / count_pos[j] for j in count_pos}
    return rate, segs, starts, negs


def tv(a: Counter, b: Counter) -> float:
    na, nb = sum(a.values()), sum(b.values())
    return 0.5 * sum(abs(a[k] / na - b[k] / nb) for k in set(a) | set(b))


def test_matches_the_original_per_sample_generator_in_distribution():
    items, offsets, av, ao, n, _ = make_data(num_users=150, num_items=80, seed=8)
    s = PretrainSampler(items, offsets, av, ao, n)
    prefixes = original_prefixes(seqs_of(items, offsets))
    rnd = random.Random(0)
    ref = [r for _ in range(3) for r in original_generator(prefixes, items.tolist(), n, 0.2, rnd)]
    ours = []
    for ep in range(3):
        for b in epoch(s, ep=ep, bs=50):
            lens = row_len(b).tolist()
            L = b.masked.shape[1]
            for i, ln in enumerate(lens):
                flags = b.masked[i, L - ln:].tolist()
                seg_cols = torch.nonzero(b.sp_masked[i] == n + 1).flatten().tolist()
                seg = len(seg_cols) if ln >= 2 else 0
                start = seg_cols[0] - (L - ln) if ln >= 2 else 0
                ours.append((ln, flags, b.mip_neg[i][b.masked[i]].tolist(), seg, start, None))
    assert len(ours) == len(ref)
    r_rate, r_segs, r_starts, r_negs = stats_of(ref)
    o_rate, o_segs, o_starts, o_negs = stats_of(ours)
    assert o_rate[0] == r_rate[0] == 1.0, "the last item is always masked"
    for j in range(1, 6):
        assert abs(o_rate[j] - r_rate[j]) < 0.02, (j, o_rate[j], r_rate[j])
    assert tv(o_segs, r_segs) < 0.04
    assert tv(o_starts, r_starts) < 0.05
    assert tv(o_negs, r_negs) < 0.03


def test_negative_segment_start_matches_the_original():
    """With item = flat index + 1, a negative segment's first item gives its start."""
    items, offsets, av, ao, n, _ = make_data(num_users=100, seed=9, unique_items=True)
    s = PretrainSampler(items, offsets, av, ao, n)
    prefixes = original_prefixes(seqs_of(items, offsets))
    rnd = random.Random(1)
    bins = lambda x: min(int(10 * x / len(items)), 9)
    ref = Counter(bins(r[5]) for _ in range(3)
                  for r in original_generator(prefixes, items.tolist(), n, 0.2, rnd) if r[0] >= 2)
    ours = Counter()
    for ep in range(3):
        for b in epoch(s, ep=ep, bs=50):
            seg = (b.sp_masked == n + 1) & (row_len(b) >= 2)[:, None]
            first = seg & ~torch.cat([torch.zeros(len(seg), 1, dtype=torch.bool), seg[:, :-1]], 1)
            ours.update(bins(v - 1) for v in b.sp_neg[first].tolist())
    assert sum(ours.values()) == sum(ref.values())
    assert tv(ours, ref) < 0.04, (ours, ref)


# ------------------------------------------------------------------ the real Beauty file

def release_sequences(name):
    """Parse <name>.txt of ../shared/data with numpy (the HDF5 reader is not needed here)."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data" / name / f"{name}.txt"
    if not path.exists():
        pytest.skip(f"{path} not present")
    lines = path.read_text().splitlines()
    lens = np.array([len(line.split()) - 1 for line in lines])
    items = np.concatenate([np.array(line.split()[1:], dtype=np.int32) for line in lines])
    offsets = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    return items, offsets


@pytest.mark.parametrize("name,users,samples", [("Beauty", 22363, 150258), ("LastFM", 1090, 25726)])
def test_release_sample_counts(name, users, samples):
    items, offsets = release_sequences(name)
    n = int(items.max())
    s = PretrainSampler(items, offsets, np.zeros(0, np.int32), np.zeros(n + 3, np.int64), n)
    assert len(offsets) - 1 == users and s.num_samples == samples
    assert s.num_batches(100) == -(-samples // 100)


def test_engine_micro_batches_are_the_rank_slices(sampler):
    """The engine's accumulation micro-batches (engine.loop.split_rows) of world 1 == the rank
    slices of world 2 (and 4): the same global batches whatever the world size x accumulation."""
    from s3rec.engine.loop import split_rows as split_batch
    g = next(sampler.batches(1, 0, 40))
    for parts in (2, 4):
        shards = [next(sampler.batches(1, 0, 40, rank=r, world_size=parts)) for r in range(parts)]
        for m, s in zip(split_batch(g, parts), shards):
            for f in FIELDS + ("attr_index",):
                assert torch.equal(getattr(m, f), getattr(s, f)), f
