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
Sampling without replacement by weights uses the Gumbel-top-k identity: the N largest of
log(w_i) + Gumbel noise are a weighted draw without replacement (Efraimidis & Spirakis).
"""
from __future__ import annotations

import numpy as np

from s3rec.data.format import DatasetError

BLOCK = 256             # users per random stream (part of the rule: changing it changes draws);
                        #   memory: BLOCK x num_items float64 keys at a time
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
    counts = training_counts(items, offsets, num_items).astype(np.float64)
    with np.errstate(divide="ignore"):
        log_w = np.log(counts[1:])                                # [I]; -inf: never drawn
    drawable = int(np.isfinite(log_w).sum())
    num_users = len(offsets) - 1
    out = np.empty((num_users, n), dtype=np.int64)
    for b, start in enumerate(range(0, num_users, BLOCK)):
        end = min(start + BLOCK, num_users)
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(POPULAR_STREAM, b)))
        keys = log_w[None, :] + rng.gumbel(size=(end - start, num_items))     # [u, I]
        lens = np.diff(offsets[start:end + 1])
        rows = np.repeat(np.arange(end - start), lens)
        keys[rows, items[offsets[start]:offsets[end]] - 1] = -np.inf          # the user's items
        free = np.isfinite(keys).sum(axis=1)
        if (free < n).any():
            u = start + int(np.flatnonzero(free < n)[0])
            raise DatasetError(f"user index {u}: only {int(free.min())} of the {drawable} items "
                               f"seen in training are outside its sequence; {n} popularity "
                               f"negatives asked for (--negatives)")
        top = np.argpartition(-keys, n - 1, axis=1)[:, :n]                   # [u, n] unordered
        order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1, kind="stable")
        out[start:end] = np.take_along_axis(top, order, axis=1) + 1           # item ids
    return out
