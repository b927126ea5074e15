"""S3Rec pretraining samples (MIP, MAP, AAP, SP), generated a whole batch at a time.

The original builds each sample in Python (`PretrainDataset.__getitem__`, 0.26 s per batch of 100
on this machine). Here every random choice of a batch is one numpy call over [B, L] arrays, and the
sample list itself is two int arrays (the sample's first item in the flat item array, its length).

Distribution, per sample `s` = a prefix input[:n] of `input` = the last max_len items of seq[:-2]
(docs/reproduction.md, "Pretraining"), kept from the original:
- MIP/MAP: each item but the last is masked with p = mask_prob; the last is always masked.
  Each masked position gets one negative, uniform over the items not in the prefix.
- SP (n >= 2): segment length ~ U{1..n//2}, start ~ U{0..n-len}, both drawn on the UNMASKED prefix
  (the MIP masking is a separate sequence, as in the original); the negative segment is `len`
  consecutive items of the concatenation of all users' full sequences (it may cross users, as in
  the original). n == 1: the three SP sequences all equal the input.
- AAP/MAP targets: the attributes of the original (unmasked) item at each non-padding position.
Departures: negatives are drawn from 1..num_items (the original's range 1..item_size-1 includes
mask_id; the reference says not to); `sp_negatives="train"` (not the default) takes negative
segments from the concatenation of every user's seq[:-2] only, so no validation/test item leaks in.

Padding is on the left and each batch is trimmed to its longest prefix L; positions stay absolute
(the newest item is always position max_len - 1), so trimming changes no model output.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from s3rec.data.batch import PretrainBatch

# Tags that keep the random streams of different purposes apart (SeedSequence entropy words).
TAG_PRETRAIN = 1
TAG_FINETUNE = 2
_ORDER, _MASK, _MIP_NEG, _SP = 0, 1, 2, 3


# ------------------------------------------------------------------ shared batching primitives

def make_rng(seed: int, *words: int) -> np.random.Generator:
    """A generator determined by (seed, words...) alone: the same batch gets the same draws on
    every rank and after a resume, whatever was drawn before it."""
    if seed < 0 or any(w < 0 for w in words):
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, words={words}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *words])))


def epoch_order(lengths: np.ndarray, rng: np.random.Generator, batch_size: int,
                bucket_by_length: bool, bucket_size: int) -> tuple[np.ndarray, np.ndarray]:
    """An epoch's batches: (order, batch_ids). Batch k holds samples
    order[batch_ids[k] * batch_size : (batch_ids[k] + 1) * batch_size] (the last one may be short).

    Bucketing: shuffle, cut into chunks of bucket_size * batch_size samples, sort each chunk by
    length (stable, so ties keep the shuffled order), cut into batches, shuffle the batch order.
    Every sample appears exactly once either way; only the padding per batch differs."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(lengths)
    order = rng.permutation(n)
    if bucket_by_length:
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
        chunk = np.arange(n, dtype=np.int64) // (bucket_size * batch_size)
        key = chunk * (int(lengths.max(initial=0)) + 1) + lengths[order]
        order = order[np.argsort(key, kind="stable")]
    num_batches = -(-n // batch_size)
    batch_ids = rng.permutation(num_batches)
    return order, batch_ids


def rank_slice(b: int, rank: int, world_size: int) -> slice:
    """Rank `rank`'s rows of a global batch of b rows: contiguous, disjoint, complete, balanced.
    For a full batch this is exactly batch_size / world_size rows."""
    return slice(b * rank // world_size, b * (rank + 1) // world_size)



def iterate_batches(make_batch, order, batch_ids, seed, epoch, batch_size, rank, world_size,
                    start_batch):
    """Global batches `batch_ids[start_batch:]` of an epoch's `order`, each cut to this rank's
    rows by `make_batch(ids, seed, epoch, index, rows)` (shared by both samplers)."""
    for k in range(start_batch, len(batch_ids)):
        b = batch_ids[k]
        ids = order[b * batch_size:(b + 1) * batch_size]
        yield make_batch(ids, seed, epoch, k, rank_slice(len(ids), rank, world_size))

def check_rank(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in 0..world_size-1 (world_size={world_size})")
    if batch_size % world_size:
        raise ValueError(f"global batch_size {batch_size} is not divisible by world_size "
                         f"{world_size}: every rank must get the same micro-batch")


def left_padded(items: np.ndarray, start: np.ndarray, length: np.ndarray, width: int) -> np.ndarray:
    """[B, width] int64: row b = items[start[b] : start[b] + length[b]] right-aligned, 0 before."""
    col = np.arange(width, dtype=np.int64)
    idx = start[:, None] + length[:, None] - width + col                    # [B, W]
    valid = col >= width - length[:, None]                                  # [B, W]
    out = items[np.where(valid, idx, 0)].astype(np.int64)
    out[~valid] = 0
    return out


def draw_excluding(rng: np.random.Generator, num_items: int, size: int,
                   is_excluded) -> np.ndarray:
    """`size` items uniform over 1..num_items, each redrawn until `is_excluded(cand, which)` is
    False (`which` = indices of the candidates being checked). Vectorised rejection: only the
    rejected ones are redrawn. Callers guarantee every row has an allowed item."""
    cand = rng.integers(1, num_items + 1, size=size, dtype=np.int64)
    todo = np.arange(size)
    while todo.size:
        bad = is_excluded(cand[todo], todo)
        todo = todo[bad]
        cand[todo] = rng.integers(1, num_items + 1, size=todo.size, dtype=np.int64)
    return cand


def check_start(start_batch: int, num_batches: int) -> None:
    if not 0 <= start_batch <= num_batches:
        raise ValueError(f"start_batch {start_batch} not in 0..{num_batches} (batches per epoch)")


def check_csr(items: np.ndarray, offsets: np.ndarray, num_items: int, what: str) -> None:
    """Clear errors for malformed CSR input (named `what`)."""
    if items.ndim != 1 or offsets.ndim != 1 or len(offsets) < 1:
        raise ValueError(f"{what}: items and offsets must be 1-D (got {items.shape}, {offsets.shape})")
    if offsets[0] != 0 or offsets[-1] != len(items) or np.any(np.diff(offsets) < 0):
        raise ValueError(f"{what}: offsets must rise from 0 to len(items)={len(items)}")
    if len(items) and (items.min() < 1 or items.max() > num_items):
        raise ValueError(f"{what}: item ids must be in 1..num_items={num_items}, found "
                         f"{items.min()}..{items.max()}")


def dedup_attributes(attr_values: np.ndarray, attr_offsets: np.ndarray,
                     num_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Item attribute CSR over ids 0..num_items, each row sorted and without repeats (the
    original's multi-hot sets 1, so a repeated id counts once). Rows past num_items (mask_id) are
    dropped: only real items are ever looked up."""
    if len(attr_offsets) < num_items + 2:
        raise ValueError(f"attribute offsets: need a row for every item id 0..{num_items} "
                         f"({num_items + 2} offsets), got {len(attr_offsets)}")
    if attr_offsets[0] != 0 or np.any(np.diff(attr_offsets) < 0) \
            or attr_offsets[-1] != len(attr_values):
        raise ValueError("attribute offsets must rise from 0 to len(values)")
    end = int(attr_offsets[num_items + 1])
    vals = attr_values[:end].astype(np.int64)
    if len(vals) and vals.min() < 0:
        raise ValueError(f"attribute ids must be >= 0, found {vals.min()}")
    rows = np.repeat(np.arange(num_items + 1, dtype=np.int64), np.diff(attr_offsets[:num_items + 2]))
    width = int(vals.max(initial=0)) + 1
    key = np.unique(rows * width + vals)
    counts = np.bincount(key // width, minlength=num_items + 1)
    offs = np.zeros(num_items + 2, dtype=np.int64)
    np.cumsum(counts, out=offs[1:])
    return (key % width).astype(np.int64), offs


def csr_pairs(rows_of: np.ndarray, keys: np.ndarray, values: np.ndarray,
              offsets: np.ndarray) -> np.ndarray:
    """[P, 2] int64 pairs (rows_of[i], v) for every v in row keys[i] of the CSR (values, offsets)."""
    counts = offsets[keys + 1] - offsets[keys]
    total = int(counts.sum())
    first = np.cumsum(counts) - counts                   # where each key's run starts in the output
    src = np.repeat(offsets[keys] - first, counts) + np.arange(total, dtype=np.int64)
    return np.stack([np.repeat(rows_of, counts), values[src]], axis=1)


# ------------------------------------------------------------------ the pretraining sampler

class PretrainSampler:
    """Every prefix sample of every user, and an epoch's batches of them (see module docstring).

    items int32 [N] flat, offsets int64 [U+1] (user u = items[offsets[u]:offsets[u+1]],
    chronological); attr_values int32, attr_offsets int64 (CSR over item ids 0..item_size-1).
    """

    def __init__(self, items: np.ndarray, offsets: np.ndarray, attr_values: np.ndarray,
                 attr_offsets: np.ndarray, num_items: int, max_len: int = 50,
                 mask_prob: float = 0.2, sp_negatives: str = "full"):
        items, offsets = np.asarray(items), np.asarray(offsets, dtype=np.int64)
        check_csr(items, offsets, num_items, "pretraining sequences")
        if not 0.0 <= mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in 0..1, got {mask_prob}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.num_items, self.mask_id, self.max_len = num_items, num_items + 1, max_len
        self.mask_prob = mask_prob
        self.items = items.astype(np.int64)
        self.attr_values, self.attr_offsets = dedup_attributes(
            np.asarray(attr_values), np.asarray(attr_offsets, dtype=np.int64), num_items)

        # input = last max_len items of seq[:-2]; its prefixes are the samples, user-major.
        lens = np.diff(offsets)
        m = np.clip(lens - 2, 0, max_len)                  # prefixes per user
        first = offsets[1:] - 2 - m                         # flat index of input[0]
        self.sample_user = np.repeat(np.arange(len(lens), dtype=np.int64), m)
        self.sample_start = np.repeat(first, m)
        within = np.arange(int(m.sum()), dtype=np.int64) - np.repeat(np.cumsum(m) - m, m)
        self.sample_length = within + 1                     # prefix length n in 1..max_len
        if num_items <= max_len:
            # An input holding every item would leave its longest prefix no negative, and the
            # rejection sampling would never end. Only possible with tiny item sets.
            u = self.sample_user
            distinct = np.bincount(np.unique(u * (num_items + 1) + self.items[
                self.sample_start + self.sample_length - 1]) // (num_items + 1),
                minlength=len(lens))
            if np.any(distinct >= num_items):
                raise ValueError(f"user {int(np.argmax(distinct >= num_items))}: the pretraining "
                                 f"input contains all {num_items} items, no negative can be drawn")

        if sp_negatives == "full":
            self.segment_source = self.items                # all users' full sequences, concatenated
        elif sp_negatives == "train":
            # every user's seq[:-2]: no validation or test item can enter a negative segment
            within_user = np.arange(len(items)) - np.repeat(offsets[:-1], lens)
            self.segment_source = self.items[within_user < np.repeat(lens - 2, lens)]
        else:
            raise ValueError(f"sp_negatives must be 'full' or 'train', got {sp_negatives!r}")
        if len(self.segment_source) < max_len // 2:
            raise ValueError("too few items to draw negative segments from")

    @property
    def num_samples(self) -> int:
        return len(self.sample_length)

    def num_batches(self, batch_size: int) -> int:
        """Global batches per epoch (the last one may be short, as with drop_last=False)."""
        return -(-self.num_samples // batch_size)

    def batches(self, seed: int, epoch: int, batch_size: int, bucket_by_length: bool = True,
                bucket_size: int = 50, rank: int = 0, world_size: int = 1,
                start_batch: int = 0) -> Iterator[PretrainBatch]:
        """This rank's share of each global batch of the epoch, from global batch `start_batch`.

        The global batches (which samples, and every random draw in them) depend on (seed, epoch,
        batch index) only, so any world size and any resume point see the same ones."""
        check_rank(batch_size, rank, world_size)
        check_start(start_batch, self.num_batches(batch_size))
        order, batch_ids = epoch_order(self.sample_length, make_rng(seed, TAG_PRETRAIN, epoch, _ORDER),
                                       batch_size, bucket_by_length, bucket_size)
        return iterate_batches(self.make_batch, order, batch_ids, seed, epoch, batch_size, rank,
                               world_size, start_batch)


    def make_batch(self, ids: np.ndarray, seed: int, epoch: int, index: int,
                   rows: slice = slice(None)) -> PretrainBatch:
        """Global batch of samples `ids` (batch `index` of `epoch`); returns its rows `rows`."""
        n = self.sample_length[ids]                                        # [B]
        L = int(n.max())
        B = len(ids)
        orig = left_padded(self.items, self.sample_start[ids], n, L)       # [B, L]
        pad = orig == 0                                                     # [B, L]

        # MIP/MAP: mask each non-padding item with p = mask_prob, the last always.
        rng = make_rng(seed, TAG_PRETRAIN, epoch, index, _MASK)
        masked = (rng.random((B, L)) < self.mask_prob) & ~pad              # [B, L]
        masked[:, -1] = True
        masked_items = np.where(masked, self.mask_id, orig)
        r, c = np.nonzero(masked)
        rng = make_rng(seed, TAG_PRETRAIN, epoch, index, _MIP_NEG)
        neg = draw_excluding(rng, self.num_items, len(r),
                             lambda cand, w: (cand[:, None] == orig[r[w]]).any(axis=1))
        mip_neg = np.zeros((B, L), dtype=np.int64)
        mip_neg[r, c] = neg

        # SP: segment on the unmasked prefix; n == 1 rows keep the input in all three.
        rng = make_rng(seed, TAG_PRETRAIN, epoch, index, _SP)
        half = np.maximum(n // 2, 1)
        seg = rng.integers(1, half + 1)                                    # [B] in 1..n//2
        start = rng.integers(0, n - seg + 1)                               # [B] in 0..n-seg
        neg_start = rng.integers(0, len(self.segment_source) - seg + 1)    # [B]
        col = np.arange(L, dtype=np.int64)
        s0 = (L - n + start)[:, None]                                      # segment's first column
        in_seg = (col >= s0) & (col < s0 + seg[:, None]) & (n >= 2)[:, None]   # [B, L]
        out_seg = ~in_seg & ~pad & (n >= 2)[:, None]
        sp_masked = np.where(in_seg, self.mask_id, orig)
        sp_pos = np.where(out_seg, self.mask_id, orig)
        seg_items = self.segment_source[np.where(in_seg, neg_start[:, None] + col - s0, 0)]
        sp_neg = np.where(in_seg, seg_items, np.where(out_seg, self.mask_id, orig))

        # Attribute targets of the ORIGINAL item at every non-padding position, as flat pairs.
        o = orig[rows]
        flat = np.flatnonzero(o)
        attr_index = csr_pairs(flat, o.reshape(-1)[flat], self.attr_values, self.attr_offsets)
        pos = np.tile(np.arange(self.max_len - L, self.max_len, dtype=np.int64), (len(o), 1))
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
        return PretrainBatch(
            masked_items=t(masked_items[rows]), positions=t(pos), original_items=t(o),
            mip_neg=t(mip_neg[rows]), masked=t(masked[rows]), sp_masked=t(sp_masked[rows]),
            sp_pos=t(sp_pos[rows]), sp_neg=t(sp_neg[rows]), attr_index=t(attr_index))
