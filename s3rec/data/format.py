"""The dataset format, defined once: imported by the writer (data_prep/) and the readers.

A dataset is a folder:

    DATASET/
      manifest.json            # written last (atomically): the dataset exists once this exists
      shard-00000.h5 ...       # NUM shards, each a contiguous range of users

Each shard (HDF5, datasets chunked and gzip-compressed):

    /seq/items      int32 [num_interactions_in_shard]   every user's items, chronological, flat
    /seq/offsets    int64 [num_users_in_shard + 1]      user u's items: items[offsets[u]:offsets[u+1]]
    /seq/user_ids   int64 [num_users_in_shard]          the user ids of the source (release: line's id)
    /attr/values    int32 [num_item_attribute_pairs]    item attributes as CSR over item ids
    /attr/offsets   int64 [num_items + 2]               item i's attributes: values[offsets[i]:offsets[i+1]]
                                                       (row 0 = padding, empty; the last row, mask_id, empty)
    /negatives      int32 [num_users_in_shard, 99]      sampled-evaluation negatives per user

    attrs: format_version, num_users (whole dataset), num_items (= max item id),
           num_attributes (= max attribute id), user_start, user_end (global user index range,
           end exclusive), shard_index, num_shards, seed, negatives_source, command, sources (JSON)

Global user index = position in the source order (0-based); ids of items and attributes start at 1.
Id layout used by the model: 0 = padding, 1..num_items items, mask_id = num_items + 1,
item_size = num_items + 2, attribute_size = num_attributes + 1.

manifest.json: {"format_version", "name", "num_users", "num_items", "num_interactions",
  "num_attributes", "num_negatives", "seed", "negatives_source", "sources": {file: sha256},
  "command", "shards": [{"file", "user_start", "user_end", "num_users", "num_interactions",
  "sha256"}]}
"""
from __future__ import annotations

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
NUM_NEGATIVES = 99

SEQ_ITEMS = "seq/items"
SEQ_OFFSETS = "seq/offsets"
SEQ_USER_IDS = "seq/user_ids"
ATTR_VALUES = "attr/values"
ATTR_OFFSETS = "attr/offsets"
NEGATIVES = "negatives"

ITEM_DTYPE = "int32"
OFFSET_DTYPE = "int64"

SHARD_ATTRS = ("format_version", "num_users", "num_items", "num_attributes", "user_start",
               "user_end", "shard_index", "num_shards", "seed", "negatives_source", "command",
               "sources")

CHUNK = 1 << 16          # elements per HDF5 chunk of the flat arrays
COMPRESSION = "gzip"
COMPRESSION_LEVEL = 4


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


class DatasetError(ValueError):
    """Bad input or a damaged dataset; the message names the file and line, key or shard."""
