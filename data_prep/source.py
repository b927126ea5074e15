"""What the writer consumes: a Source yields the users of one global block at a time.

A block is BLOCK consecutive global users (see negatives.py); the writer slices blocks into shards,
so a user's data never depends on the shard count or the MPI layout."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from s3rec.data_prep.negatives import BLOCK, block_negatives
from s3rec.data.format import NUM_NEGATIVES, DatasetError


@dataclass
class Block:
    items: np.ndarray      # int32 [sum(lengths)]
    lengths: np.ndarray    # int64 [n]
    user_ids: np.ndarray   # int64 [n]
    negatives: np.ndarray  # int32 [n, 99]

    def rows(self, lo: int, hi: int) -> "Block":
        offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        return Block(self.items[offsets[lo]:offsets[hi]], self.lengths[lo:hi],
                     self.user_ids[lo:hi], self.negatives[lo:hi])


class Source:
    """Interface: name, num_users, num_items, num_attributes, attr_values/attr_offsets (CSR over
    item ids 0..num_items+1), negatives_source (str), block(b) -> Block."""
    name: str
    num_users: int
    num_items: int
    num_attributes: int
    attr_values: np.ndarray
    attr_offsets: np.ndarray
    negatives_source: str
    # (name, count) of each attribute field, in the order of their ids in attr_values (field f's
    # id a is stored as a + the counts before it: s3rec.data.fields); () = one field `attributes`
    field_counts: tuple = ()
    # the source's own ids behind the numbers, when it numbers them itself (data_prep/id_maps.py)
    id_maps: dict | None = None

    def attribute_layout(self):
        """The fields (s3rec.data.fields.AttributeField) of attr_values' global ids."""
        from s3rec.data.fields import DEFAULT_FIELD, field_layout
        return field_layout(list(self.field_counts) or [(DEFAULT_FIELD, self.num_attributes)])

    def num_interactions_bound(self) -> int:
        """At least the number of interactions block() will yield (sizes the free-space check)."""
        raise NotImplementedError

    def num_blocks(self) -> int:
        return (self.num_users + BLOCK - 1) // BLOCK

    def block(self, b: int) -> Block:
        raise NotImplementedError


class MemorySource(Source):
    """All sequences in memory (release and Amazon data: a few hundred MB at most)."""

    def __init__(self, name: str, items: np.ndarray, lengths: np.ndarray, user_ids: np.ndarray,
                 item_attrs: list[list[int]], seed: int, negatives: np.ndarray | None = None,
                 negatives_source: str = ""):
        self.name = name
        self.items = items.astype(np.int32)
        self.lengths = lengths.astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.user_ids = user_ids.astype(np.int64)
        self.num_users = len(lengths)
        self.num_items = int(items.max())
        self.attr_values, self.attr_offsets = attributes_csr(item_attrs)
        self.num_attributes = int(self.attr_values.max()) if len(self.attr_values) else 0
        self.seed = seed
        self.imported = negatives
        if negatives is not None:
            self.negatives_source = negatives_source
        else:
            # Release rule: the pool is the items seen in the data.
            self.pool = np.unique(self.items)
            self.negatives_source = "generated: release rule (99 distinct items seen in the data, " \
                                    f"none in the user's sequence), seed {seed}"
            if len(self.pool) < NUM_NEGATIVES + 1:
                raise DatasetError(f"{name}: only {len(self.pool)} distinct items; sampled "
                                   f"evaluation needs more than {NUM_NEGATIVES}")

    def num_interactions_bound(self) -> int:
        return len(self.items)

    def block(self, b: int) -> Block:
        lo, hi = b * BLOCK, min((b + 1) * BLOCK, self.num_users)
        items = self.items[self.offsets[lo]:self.offsets[hi]]
        lengths = self.lengths[lo:hi]
        if self.imported is not None:
            negs = self.imported[lo:hi]
        else:
            negs = block_negatives(items, lengths, self.pool, self.seed, b)
        return Block(items, lengths, self.user_ids[lo:hi], negs)


def attributes_csr(item_attrs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """item_attrs[i] = attribute ids of item i for i in 0..num_items (entry 0 unused and empty);
    returns CSR (values int32, offsets int64 [num_items + 3]) with an empty mask row appended."""
    lengths = np.array([len(a) for a in item_attrs] + [0], dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter((v for a in item_attrs for v in a), dtype=np.int32, count=int(offsets[-1]))
    return values, offsets
