"""Fine-tuning training view: one sample per user, negatives resampled every epoch, vectorised.

As the original (`SASRecDataset`, data_type="train"): input = seq[:-3], targets = seq[1:-2] (every
position predicts the next item), both the last max_len, left-padded; one negative per position,
uniform over the items not in the user's FULL sequence. Departures: negatives come from
1..num_items (the original's 1..item_size-1 includes mask_id); users with an empty input
(len(seq) <= 3; none in the release data, whose minimum length is 5) are left out, since all
their positions are padding and add nothing to the loss.

Losses other than the original one-negative BCE draw their own negatives here too
(finetune.loss, see s3rec.objectives.FinetuneObjective): sampled_softmax K items per global batch,
shared by every position, with replacement, in proportion to their count in the training part
(s3rec.data.popular_negatives.training_counts); gbce k items per position, uniform over
1..num_items with replacement and nothing excluded, as gSASRec (Petrov & Macdonald, RecSys 2023)
samples them.

Batches are global batches of users, the same on every rank; rank r takes its slice (see
pretrain_samples.rank_slice). Every random draw depends on (seed, epoch, batch index) only.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from s3rec.config import FINETUNE_LOSSES
from s3rec.data.batch import move_batch
from s3rec.data.popular_negatives import training_counts
from s3rec.data.pretrain_samples import (TAG_FINETUNE, check_csr, check_rank, check_start,
                                         draw_excluding, epoch_order, iterate_batches,
                                         left_padded, make_rng, rank_slice)

_ORDER, _NEG, _LOSS_NEG = 0, 1, 2


@dataclass
class SharedNegatives:
    """The negatives every position of a global batch shares (sampled_softmax). A dataclass, not
    a bare [K] tensor: cutting a batch into rank shares and micro-batches slices every tensor
    whose first dimension is the row count (engine.loop.split_rows), which K may equal."""
    items: torch.Tensor        # int64 [K] item ids, drawn with replacement by training popularity


@dataclass
class FinetuneBatch:
    """Left-padded with 0, trimmed to the longest input L of the global batch; positions absolute."""
    users: torch.Tensor        # int64 [B] user index (row of the sequence CSR)
    items: torch.Tensor        # int64 [B, L] input seq[:-3] (last max_len)
    positions: torch.Tensor    # int64 [B, L] absolute positions max_len - L .. max_len - 1
    target_pos: torch.Tensor   # int64 [B, L] the next item at each position (0 = padding)
    target_neg: torch.Tensor   # int64 [B, L] one negative per non-padding position (0 = padding)
    loss_negatives: torch.Tensor | None = None   # gbce: int64 [B, L, k] per non-padding position
                                                 #   (0 = padding); None for the other losses
    shared_negatives: SharedNegatives | None = None   # sampled_softmax: [K] for the whole batch
    plan: "FinetunePlan | None" = None   # its length groups, cut on the host by
                                         #   s3rec.objectives.finetune_plan (None: cut in the step)

    def to(self, device) -> "FinetuneBatch":
        return move_batch(self, device)


@dataclass
class FinetunePlan:
    """The length groups of a fine-tuning batch (see objectives.finetune_batch_loss_chunked),
    cut on the host before the copy: sorting rows by length and reading the group lengths, or
    selecting target positions by a boolean mask, on a GPU would wait for the device."""
    rows: list          # per group: int64 [B_g] rows of the batch (shortest rows first)
    keep: list          # per group: int, the group's longest row (columns kept from the right)
    targets: list       # per group: int64 [N_g] flat positions (into B_g x keep) with a target
    total: int          # positions with a target in the whole batch


class UserItemSet:
    """Membership of (user, item) in users' full sequences: one sorted int64 key array."""

    def __init__(self, items: np.ndarray, offsets: np.ndarray, num_items: int):
        lens = np.diff(offsets)
        self.width = num_items + 1
        user = np.repeat(np.arange(len(lens), dtype=np.int64), lens)
        self.keys = np.unique(user * self.width + items)                   # sorted, distinct
        self.distinct = np.bincount(self.keys // self.width, minlength=len(lens))

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        q = users * self.width + items
        i = np.minimum(np.searchsorted(self.keys, q), len(self.keys) - 1)
        return self.keys[i] == q


class FinetuneSampler:
    """items int32 [N], offsets int64 [U+1]: every user's full chronological sequence. `loss`
    (one of config.FINETUNE_LOSSES) decides which extra negatives the batches carry,
    `loss_negatives` of them (K per batch for sampled_softmax, k per position for gbce)."""

    def __init__(self, items: np.ndarray, offsets: np.ndarray, num_items: int, max_len: int = 50,
                 loss: str = "bce", loss_negatives: int = 256):
        items, offsets = np.asarray(items), np.asarray(offsets, dtype=np.int64)
        check_csr(items, offsets, num_items, "fine-tuning sequences")
        if loss not in FINETUNE_LOSSES:
            raise ValueError(f"loss must be one of {'|'.join(FINETUNE_LOSSES)}, got {loss!r}")
        if loss_negatives < 1:
            raise ValueError(f"loss_negatives must be >= 1, got {loss_negatives}")
        self.num_items, self.max_len = num_items, max_len
        self.loss, self.loss_negatives = loss, loss_negatives
        self.counts = training_counts(items, offsets, num_items)           # [num_items + 1]
        self.cum_counts = np.cumsum(self.counts[1:])      # [num_items]: a draw searches in it
        if loss == "sampled_softmax" and self.cum_counts[-1] == 0:
            raise ValueError("sampled_softmax: no item occurs in the training part of any "
                             "sequence (every sequence has <= 2 items)")
        self.items = items.astype(np.int64)
        self.seen = UserItemSet(self.items, offsets, num_items)
        full = np.flatnonzero(self.seen.distinct >= num_items)
        if len(full):
            raise ValueError(f"user {full[0]} has interacted with all {num_items} items: "
                             "no negative can be drawn")
        lens = np.diff(offsets)
        self.users = np.flatnonzero(lens > 3)                               # [S] users with input
        self.length = np.minimum(lens[self.users] - 3, max_len)             # [S] input length
        self.start = offsets[self.users + 1] - 3 - self.length              # [S] flat index of input[0]

    @property
    def num_samples(self) -> int:
        return len(self.users)

    def num_batches(self, batch_size: int) -> int:
        return -(-self.num_samples // batch_size)

    def batches(self, seed: int, epoch: int, batch_size: int, rank: int = 0, world_size: int = 1,
                start_batch: int = 0, bucket_by_length: bool = False,
                bucket_size: int = 50) -> Iterator[FinetuneBatch]:
        """This rank's share of each global batch of users, from global batch `start_batch`.
        Default: plain shuffled batches, as the original's RandomSampler."""
        check_rank(batch_size, rank, world_size)
        check_start(start_batch, self.num_batches(batch_size))
        order, batch_ids = epoch_order(self.length, make_rng(seed, TAG_FINETUNE, epoch, _ORDER),
                                       batch_size, bucket_by_length, bucket_size)
        return iterate_batches(self.make_batch, order, batch_ids, seed, epoch, batch_size, rank,
                               world_size, start_batch)


    def make_batch(self, ids: np.ndarray, seed: int, epoch: int, index: int,
                   rows: slice = slice(None)) -> FinetuneBatch:
        n, start = self.length[ids], self.start[ids]                        # [B]
        L = int(n.max())
        inp = left_padded(self.items, start, n, L)                          # [B, L]
        tgt = left_padded(self.items, start + 1, n, L)                      # [B, L] shifted by one
        r, c = np.nonzero(inp)
        users = self.users[ids]
        # Drawn for the whole global batch, then sliced: the same draws whatever the world size.
        rng = make_rng(seed, TAG_FINETUNE, epoch, index, _NEG)
        neg = draw_excluding(rng, self.num_items, len(r),
                             lambda cand, w: self.seen.contains(users[r[w]], cand))
        tneg = np.zeros_like(inp)
        tneg[r, c] = neg
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a[rows]))
        pos = np.tile(np.arange(self.max_len - L, self.max_len, dtype=np.int64), (len(inp), 1))
        rng = make_rng(seed, TAG_FINETUNE, epoch, index, _LOSS_NEG)
        per_pos, shared = self._loss_negatives(rng, inp.shape, r, c)
        return FinetuneBatch(users=t(users), items=t(inp), positions=t(pos), target_pos=t(tgt),
                             target_neg=t(tneg), loss_negatives=None if per_pos is None else
                             t(per_pos), shared_negatives=shared)

    def log_sampling_q(self) -> np.ndarray:
        """float64 [num_items + 1]: log(K Q(j)), Q(j) the probability that one sampled_softmax
        draw is item j (-inf at index 0 and at items absent from the training part)."""
        with np.errstate(divide="ignore"):
            return np.log(self.counts * (self.loss_negatives / self.cum_counts[-1]))

    def _loss_negatives(self, rng: np.random.Generator, shape: tuple[int, int], r: np.ndarray,
                        c: np.ndarray) -> tuple[np.ndarray | None, SharedNegatives | None]:
        """(gbce [B, L, k] or None, sampled_softmax's shared [K] or None) for a global batch
        whose non-padding positions are (r, c)."""
        k = self.loss_negatives
        if self.loss == "gbce":
            neg = np.zeros((*shape, k), dtype=np.int64)
            neg[r, c] = rng.integers(1, self.num_items + 1, size=(len(r), k), dtype=np.int64)
            return neg, None
        if self.loss == "sampled_softmax":
            total = int(self.cum_counts[-1])
            draw = np.searchsorted(self.cum_counts, rng.integers(0, total, size=k), side="right")
            return None, SharedNegatives(torch.from_numpy(draw.astype(np.int64) + 1))
        return None, None
