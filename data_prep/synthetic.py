"""A seeded synthetic dataset with planted structure, generated block by block (streaming).

Structure, so that pretraining has something to find:
- items are split into `clusters` latent clusters (a seeded permutation, sizes equal +-1);
  within a cluster, popularity is skewed (index = floor(size * u^2));
- attributes are tied to clusters: cluster c owns attributes {c+1, c+1+C, ...}; each item carries
  one or two of its cluster's attributes, plus a random attribute with probability 0.2 (noise);
- with `noise_attributes` > 0 the data has two attribute fields: `cluster` (the attributes above,
  tied to the clusters) and `noise` (one or two ids of 1..noise_attributes a item, uniform, from
  a stream of their own: nothing else changes), one informative field and one pure noise;
- a user's sequence walks a Markov chain over clusters: stay with p 0.2, move to one of the
  cluster's 3 preferred successors with p 0.7, anywhere with p 0.1; each step emits an item of the
  current cluster. Lengths are 5 + Poisson(mean_length - 5), at most max_length and at most
  num_items - 99 (so that 99 negatives outside the sequence always exist).
Each block of users has its own RNG stream (seed, block), so the data does not depend on the shard
count or on which rank writes it, and only one block's interactions are ever in memory.
Negatives follow the release rule with the pool = all items 1..M (the items "seen" are not known
before the end of a streamed generation).
"""
from __future__ import annotations

import numpy as np

from s3rec.data_prep.negatives import BLOCK, block_negatives, block_rng
from s3rec.data_prep.source import Block, Source
from s3rec.data.fields import stack_fields
from s3rec.data.format import NUM_NEGATIVES, DatasetError

STRUCTURE_STREAM, SEQUENCE_STREAM, NOISE_FIELD_STREAM = 2, 3, 4
MIN_LENGTH = 5
P_STAY, P_PREFERRED, NUM_PREFERRED = 0.2, 0.7, 3


class SyntheticSource(Source):
    def __init__(self, num_users: int, num_items: int, num_attributes: int, seed: int,
                 clusters: int = 32, mean_length: float = 10.0, max_length: int = 200,
                 noise_attributes: int = 0):
        if num_users < 1 or num_attributes < 1:
            raise DatasetError("synthetic: --users and --attributes must be >= 1")
        if noise_attributes < 0:
            raise DatasetError(f"synthetic: --noise-attributes must be >= 0, got "
                               f"{noise_attributes}")
        if num_items <= NUM_NEGATIVES + MIN_LENGTH:
            raise DatasetError(f"synthetic: --items must be > {NUM_NEGATIVES + MIN_LENGTH} "
                               f"(99 negatives outside a sequence are needed)")
        if max_length < MIN_LENGTH:
            raise DatasetError(f"synthetic: --max-length {max_length} is below the shortest "
                               f"sequence, {MIN_LENGTH}")
        # A sequence holds at most num_items - 99 items, so 99 negatives outside it always exist.
        max_length = min(max_length, num_items - NUM_NEGATIVES)
        if not MIN_LENGTH <= mean_length <= max_length:
            raise DatasetError(f"synthetic: --mean-length must be in [{MIN_LENGTH}, {max_length}] "
                               f"(--max-length, and --items - {NUM_NEGATIVES})")
        self.name = f"synthetic-u{num_users}-i{num_items}-a{num_attributes}-s{seed}"
        self.num_users, self.num_items, self.num_attributes = num_users, num_items, num_attributes
        self.seed, self.mean_length, self.max_length = seed, mean_length, max_length
        self.num_clusters = C = max(1, min(clusters, num_items))
        rng = block_rng(seed, STRUCTURE_STREAM, 0)
        # item -> cluster, and the items of each cluster (CSR), most popular first
        perm = rng.permutation(num_items) + 1
        self.cluster_items = perm[np.argsort(np.arange(num_items) % C, kind="stable")]
        self.cluster_offsets = np.searchsorted(np.sort(np.arange(num_items) % C), np.arange(C + 1))
        item_cluster = np.empty(num_items + 1, dtype=np.int64)
        item_cluster[0] = -1
        item_cluster[perm] = np.arange(num_items) % C
        # cluster transitions
        trans = np.full((C, C), (1 - P_STAY - P_PREFERRED) / C)
        trans[np.arange(C), np.arange(C)] += P_STAY
        for c in range(C):
            succ = rng.choice(C, size=min(NUM_PREFERRED, C), replace=False)
            trans[c, succ] += P_PREFERRED / len(succ)
        self.cum_trans = np.cumsum(trans / trans.sum(1, keepdims=True), axis=1)
        self.attr_values, self.attr_offsets = self._attributes(item_cluster[1:], rng)
        if noise_attributes:
            self._add_noise_field(noise_attributes)
        self.pool = np.arange(1, num_items + 1)
        self.negatives_source = ("generated: release rule (99 distinct items of 1..num_items, none "
                                 f"in the user's sequence), seed {seed}")

    def _attributes(self, cluster: np.ndarray, rng: np.random.Generator):
        """One or two attributes of the item's cluster, and a random one with p 0.2."""
        C, K, M = self.num_clusters, self.num_attributes, self.num_items
        if K >= C:
            base = cluster + 1                                   # cluster c owns c+1, c+1+C, ...
            size = (K - base) // C + 1
        else:
            base, size = cluster % K + 1, np.ones(M, dtype=np.int64)
        j = rng.integers(0, size)
        first = base + C * j
        second = base + C * ((j + 1) % size)
        has_second = (rng.random(M) < 0.5) & (size > 1)
        has_noise = rng.random(M) < 0.2
        noise = rng.integers(1, K + 1, size=M)
        table = np.stack([first, np.where(has_second, second, 0), np.where(has_noise, noise, 0)], 1)
        counts = (table > 0).sum(1)
        offsets = np.zeros(M + 3, dtype=np.int64)
        np.cumsum(counts, out=offsets[2:M + 2])
        offsets[M + 2] = offsets[M + 1]                       # empty mask row
        return table[table > 0].astype(np.int32), offsets

    def _add_noise_field(self, k: int) -> None:
        """A second field `noise`: one or two uniform ids of 1..k an item (repeats allowed)."""
        rng = block_rng(self.seed, NOISE_FIELD_STREAM, 0)
        M = self.num_items
        table = rng.integers(1, k + 1, size=(M, 2)) * np.stack(
            [np.ones(M, dtype=np.int64), rng.random(M) < 0.5], 1)          # [M, 2], 0 = none
        offsets = np.zeros(M + 3, dtype=np.int64)
        np.cumsum((table > 0).sum(1), out=offsets[2:M + 2])
        offsets[M + 2] = offsets[M + 1]
        self.field_counts = (("cluster", self.num_attributes), ("noise", k))
        layout = self.attribute_layout()
        self.attr_values, self.attr_offsets = stack_fields(
            [(self.attr_values, self.attr_offsets), (table[table > 0].astype(np.int32), offsets)],
            layout)
        self.num_attributes += k
        self.name += f"-n{k}"

    def num_interactions_bound(self) -> int:
        """The expected total (lengths average at most mean_length) with 5% and one longest
        sequence to spare: a sum of many Poisson lengths strays from its mean by ~ its root."""
        return int(self.num_users * self.mean_length * 1.05) + self.max_length

    def block(self, b: int) -> Block:
        lo, hi = b * BLOCK, min((b + 1) * BLOCK, self.num_users)
        n = hi - lo
        rng = block_rng(self.seed, SEQUENCE_STREAM, b)
        lengths = np.minimum(MIN_LENGTH + rng.poisson(self.mean_length - MIN_LENGTH, n),
                             self.max_length).astype(np.int64)
        width = int(lengths.max())
        seq = np.zeros((n, width), dtype=np.int32)                   # [n, L] padded
        cur = rng.integers(0, self.num_clusters, n)
        sizes = np.diff(self.cluster_offsets)
        for t in range(width):
            if t:
                u = rng.random(n)
                cur = np.minimum((self.cum_trans[cur] < u[:, None]).sum(1), self.num_clusters - 1)
            pick = (sizes[cur] * rng.random(n) ** 2).astype(np.int64)   # popularity skew
            seq[:, t] = self.cluster_items[self.cluster_offsets[cur] + pick]
        items = seq[np.arange(width) < lengths[:, None]]                 # row-major: per user
        negs = block_negatives(items, lengths, self.pool, self.seed, b)
        return Block(items, lengths, np.arange(lo, hi, dtype=np.int64) + 1, negs)
