"""Validation and test views (leave-one-out), sharded by user for distributed evaluation.

As the original (`SASRecDataset`, data_type "valid"/"test", and its rating matrices):
- valid: input = seq[:-2], answer = seq[-2]; test: input = seq[:-1], answer = seq[-1];
  the model sees the last max_len items of the input, left-padded, positions absolute.
- sampled protocol: candidates = answer + the user's 99 negatives (`negatives`, from the dataset).
- full ranking: `history_index` lists every distinct item of the WHOLE input (not only the last
  max_len; the original's valid/test rating matrices use seq[:-2] / seq[:-1]). With repeated
  consumption the answer itself can be in the history; excluding it is the metric's decision.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from s3rec.data.pretrain_samples import check_csr, left_padded
from s3rec.data.reader import user_share  # noqa: F401  (re-exported: the one definition)

SPLITS = {"valid": 2, "test": 1}     # how many items the input leaves off the end


@dataclass
class EvalBatch:
    """A batch of users, trimmed to its longest input L (at most max_len); positions absolute."""
    users: torch.Tensor            # int64 [B] user index (row of the sequence CSR)
    items: torch.Tensor            # int64 [B, L] input, left-padded with 0
    positions: torch.Tensor        # int64 [B, L] absolute positions max_len - L .. max_len - 1
    answers: torch.Tensor          # int64 [B] the held-out item
    negatives: torch.Tensor | None  # int64 [B, K] sampled-protocol negatives (None if not given)
    history_index: torch.Tensor    # int64 [P, 2] (row in batch, item): items of the whole input

    def to(self, device) -> "EvalBatch":
        return EvalBatch(**{f.name: None if getattr(self, f.name) is None else
                            getattr(self, f.name).to(device, non_blocking=True)
                            for f in dataclasses.fields(self)})


class EvalView:
    """items int32 [N], offsets int64 [U+1]: every user's full sequence; negatives int [U, K]."""

    def __init__(self, items: np.ndarray, offsets: np.ndarray, num_items: int, split: str,
                 negatives: np.ndarray | None = None, max_len: int = 50):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        items, offsets = np.asarray(items), np.asarray(offsets, dtype=np.int64)
        check_csr(items, offsets, num_items, f"{split} view sequences")
        drop = SPLITS[split]
        lens = np.diff(offsets)
        short = np.flatnonzero(lens < drop + 1)
        if len(short):
            raise ValueError(f"{split} view: user {short[0]} has {lens[short[0]]} items; every user "
                             f"needs at least {drop + 1} (a non-empty input and the answer)")
        if negatives is not None:
            negatives = np.asarray(negatives)
            if negatives.ndim != 2 or negatives.shape[0] != len(lens):
                raise ValueError(f"{split} view: negatives must be [num_users={len(lens)}, K], "
                                 f"got {negatives.shape}")
            negatives = negatives.astype(np.int64)
        self.split, self.num_items, self.max_len = split, num_items, max_len
        self.items, self.offsets, self.negatives = items.astype(np.int64), offsets, negatives
        self.input_end = offsets[1:] - drop                  # [U] flat index past the input
        self.answers = self.items[self.input_end]            # [U]
        self.length = np.minimum(lens - drop, max_len)       # [U] model input length

    @property
    def num_users(self) -> int:
        return len(self.answers)

    def make_batch(self, users: np.ndarray) -> EvalBatch:
        n = self.length[users]
        L = int(n.max())
        inp = left_padded(self.items, self.input_end[users] - n, n, L)     # [B, L]
        # history: every distinct item of seq[:-drop], as (row, item) pairs
        first, end = self.offsets[users], self.input_end[users]
        counts = end - first
        row = np.repeat(np.arange(len(users), dtype=np.int64), counts)
        src = np.repeat(first - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))
        key = np.unique(row * (self.num_items + 1) + self.items[src])
        history = np.stack([key // (self.num_items + 1), key % (self.num_items + 1)], axis=1)
        pos = np.tile(np.arange(self.max_len - L, self.max_len, dtype=np.int64), (len(inp), 1))
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
        return EvalBatch(users=t(users.astype(np.int64)), items=t(inp), positions=t(pos),
                         answers=t(self.answers[users]),
                         negatives=None if self.negatives is None else t(self.negatives[users]),
                         history_index=t(history))

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[EvalBatch]:
        return eval_batches(self, batch_size, rank, world_size)


def eval_batches(view: EvalView, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> Iterator[EvalBatch]:
    """Batches of consecutive users of this rank's share; the shares of all ranks are disjoint
    and cover every user once, so summing per-rank metric sums gives the whole-set metric."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    start, end = user_share(view.num_users, rank, world_size)
    for lo in range(start, end, batch_size):
        yield view.make_batch(np.arange(lo, min(lo + batch_size, end), dtype=np.int64))
