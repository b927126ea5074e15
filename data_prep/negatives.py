"""The release rule for sampled-evaluation negatives, vectorised and seeded per block of users.

Rule (S3Rec's `<Name>_sample.txt`): for each user, 99 DISTINCT items drawn uniformly from a pool
(the items seen in the data), none of them in the user's full sequence.

Draws are made per fixed block of BLOCK global users with the stream
`SeedSequence(seed, spawn_key=(NEG_STREAM, block))`, so a user's negatives depend only on the seed
and the data, never on the shard count or on which MPI rank wrote them.
"""
from __future__ import annotations

import numpy as np

from s3rec.data.format import NUM_NEGATIVES, DatasetError

BLOCK = 4096          # users per RNG stream (part of the data definition: changing it changes data)
NEG_STREAM = 1        # spawn_key tag of negative-sampling streams


def block_rng(seed: int, stream: int, block: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream, block)))


def sample_negatives(items: np.ndarray, offsets: np.ndarray, pool: np.ndarray,
                     rng: np.random.Generator, first_user: int = 0) -> np.ndarray:
    """items/offsets: CSR sequences of n users; pool: sorted distinct candidate items.
    Returns int32 [n, 99]: per row, uniform draws with replacement, keeping the first occurrence
    of each allowed item, the first 99 of them (= a uniform random ordered 99-subset)."""
    n = len(offsets) - 1
    lengths = np.diff(offsets)
    width = int(pool.max()) + 1 if len(pool) else 1
    rows = np.repeat(np.arange(n, dtype=np.int64), lengths)
    seen = np.unique(rows * width + items)                         # (row, item) keys of the sequences
    out = np.zeros((n, NUM_NEGATIVES), dtype=np.int32)
    todo = np.arange(n)
    # Oversample so that nearly every row succeeds at the first try: expected loss is the share of
    # the pool inside the sequence plus the duplicates among the draws.
    max_len = int(lengths.max()) if n else 0
    k = NUM_NEGATIVES + 16 + int(np.ceil(2 * NUM_NEGATIVES * (max_len + NUM_NEGATIVES) / max(len(pool), 1)))
    for _attempt in range(4):
        if not len(todo):
            return out
        cand = pool[rng.integers(0, len(pool), size=(len(todo), k))]        # [t, k]
        keys = todo[:, None].astype(np.int64) * width + cand                 # [t, k]
        first = np.zeros(keys.size, dtype=bool)
        first[np.unique(keys.ravel(), return_index=True)[1]] = True           # first occurrence
        valid = first.reshape(keys.shape) & ~np.isin(keys, seen)
        rank = np.cumsum(valid, axis=1)
        ok = rank[:, -1] >= NUM_NEGATIVES
        take = valid & (rank <= NUM_NEGATIVES)
        out[todo[ok]] = cand[ok][take[ok]].reshape(-1, NUM_NEGATIVES)
        todo = todo[~ok]
        k *= 2
    for r in todo:   # rows whose sequence covers most of the pool: draw from the exact allowed set
        allowed = np.setdiff1d(pool, items[offsets[r]:offsets[r + 1]])
        if len(allowed) < NUM_NEGATIVES:
            raise DatasetError(f"user index {first_user + r}: only {len(allowed)} items outside "
                               f"its sequence, {NUM_NEGATIVES} distinct negatives needed")
        out[r] = rng.choice(allowed, NUM_NEGATIVES, replace=False)
    return out


def block_negatives(items: np.ndarray, lengths: np.ndarray, pool: np.ndarray, seed: int,
                    block: int) -> np.ndarray:
    """Negatives of global block `block` (its users' sequences as items + lengths)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return sample_negatives(items, offsets, pool, block_rng(seed, NEG_STREAM, block), block * BLOCK)
