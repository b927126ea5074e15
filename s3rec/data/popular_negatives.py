"""Popularity-sampled evaluation negatives, drawn reproducibly at evaluation time.

The `popular` protocol ranks each user's answer against N negatives drawn in proportion to item
popularity: harder than uniform ones (popular items score high), which is how several later
papers evaluate. They are drawn when evaluating, not stored by s3rec-prep: they depend on N and
a seed chosen then, and the draw is cheap (a Beauty draw of 99 per user takes seconds).

Rule, for every user u:
- popularity: how often each item occurs in the training part of all users' sequences (every
  item but the last two of each sequence: never a validation or test answer);
- the N negatives are N distinct items, drawn without replacement with probability in proportion
  to popularity (items never in the training part are never drawn), none of them in u's full
  sequence (so never the answer and never the history);
- the draw for users [b * BLOCK, (b + 1) * BLOCK) comes from the stream
  SeedSequence(seed, spawn_key=(POPULAR_STREAM, b)): a user's negatives depend on the data, N
  and the seed only, never on the world size.
Weighted draws without replacement are made as draws with replacement that keep each item's
first occurrence (the same law), with an exact Gumbel-top-k for users left short.
"""
from __future__ import annotations

import numpy as np

from s3rec.data.format import DatasetError

BLOCK = 1024            # users per random stream (part of the rule: changing it changes draws)
POPULAR_STREAM = 2      # spawn_key tag; the release rule's uniform negatives use 1


def training_counts(items: np.ndarray, offsets: np.ndarray, num_items: int) -> np.ndarray:
    """int64 [num_items + 1]: occurrences of each item id in every sequence without its last two
    items (index 0 unused)."""
    items = np.asarray(items, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    lens = np.diff(offsets)
    keep = np.ones(items.size, dtype=bool)
    keep[offsets[1:][lens >= 1] - 1] = False                  # the test answer
    keep[offsets[1:][lens >= 2] - 2] = False                  # the validation answer
    return np.bincount(items[keep], minlength=num_items + 1)[: num_items + 1]


def popular_negatives(items: np.ndarray, offsets: np.ndarray, num_items: int, n: int,
                      seed: int) -> np.ndarray:
    """int64 [num_users, n] popularity-sampled negatives for every user (module rule)."""
    if n < 1:
        raise ValueError(f"--negatives must be >= 1, got {n}")
    items = np.asarray(items, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    counts = training_counts(items, offsets, num_items)[1:].astype(np.float64)   # [I]
    cdf = np.cumsum(counts)
    num_users = len(offsets) - 1
    out = np.empty((num_users, n), dtype=np.int64)
    for b, start in enumerate(range(0, num_users, BLOCK)):
        end = min(start + BLOCK, num_users)
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(POPULAR_STREAM, b)))
        out[start:end] = _draw_block(items[offsets[start]:offsets[end]],
                                     offsets[start:end + 1] - offsets[start], counts, cdf, n,
                                     rng, start)
    return out


def _draw_block(items: np.ndarray, offsets: np.ndarray, counts: np.ndarray, cdf: np.ndarray,
                n: int, rng: np.random.Generator, first_user: int) -> np.ndarray:
    """Draws by popularity with replacement, keeping each row's first occurrence of every item
    outside its sequence, the first n of them: the same law as drawing without replacement
    among the allowed items (each new item comes in proportion to the weight of those not yet
    drawn). Rows short of n are drawn again with more; a row whose allowed items are few gets
    the exact Gumbel-top-n over them."""
    users = len(offsets) - 1
    width = len(counts) + 1
    seen = np.unique(np.repeat(np.arange(users), np.diff(offsets)) * width + items)
    out = np.zeros((users, n), dtype=np.int64)
    todo = np.arange(users)
    k = 2 * n + 32
    for _ in range(4):
        if not len(todo):
            return out
        cand = np.searchsorted(cdf, rng.random((len(todo), k)) * cdf[-1], side="right") + 1
        keys = todo[:, None] * width + cand                                   # [t, k]
        first = np.zeros(keys.size, dtype=bool)
        first[np.unique(keys.ravel(), return_index=True)[1]] = True
        valid = first.reshape(keys.shape) & ~np.isin(keys, seen)
        rank = np.cumsum(valid, axis=1)
        ok = rank[:, -1] >= n
        out[todo[ok]] = cand[ok][(valid & (rank <= n))[ok]].reshape(-1, n)
        todo = todo[~ok]
        k *= 4
    for r in todo:
        own = items[offsets[r]:offsets[r + 1]] - 1
        with np.errstate(divide="ignore"):
            keys = np.log(counts) + rng.gumbel(size=len(counts))
        keys[own] = -np.inf
        free = int(np.isfinite(keys).sum())
        if free < n:
            raise DatasetError(f"user index {first_user + r}: only {free} of the "
                               f"{int((counts > 0).sum())} items seen in training are outside "
                               f"its sequence; {n} popularity negatives asked for (--negatives)")
        out[r] = np.argsort(-keys, kind="stable")[:n] + 1
    return out
