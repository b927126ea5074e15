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
    /attr/offsets   int64 [num_items + 3]               item i's attributes: values[offsets[i]:offsets[i+1]]
                                                       for i in 0..mask_id (row 0 = padding and the
                                                       last row, mask_id, are empty)
    /negatives      int32 [num_users_in_shard, 99]      sampled-evaluation negatives per user

    attrs: format_version, num_users (whole dataset), num_items (= max item id),
           num_attributes (= max attribute id), user_start, user_end (global user index range,
           end exclusive), shard_index, num_shards, seed, negatives_source, command, sources (JSON)

Global user index = position in the source order (0-based); ids of items and attributes start at 1.
Id layout used by the model: 0 = padding, 1..num_items items, mask_id = num_items + 1,
item_size = num_items + 2, attribute_size = num_attributes + 1.

manifest.json: {"format_version", "name", "num_users", "num_items", "num_interactions",
  "num_attributes", "num_negatives", "seed", "negatives_source", "sources": {role: sha256}
  (roles: sequences, attributes, negatives | reviews, meta; synthetic data has none),
  "command", "args": {option: value} (the options that decide the content; paths left out, the
  sources' checksums stand for them), "shards": [{"file", "user_start", "user_end", "num_users",
  "num_interactions", "sha256", "bytes"}]}

Shards split the users evenly (`shard_bounds`). Files are written with deterministic HDF5
settings (no timestamps), so the same data gives the same bytes however many processes wrote it.
The helpers below (write, read, check) are the only code that knows these names.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

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


# ---------------------------------------------------------------- small shared helpers

def shard_bounds(num_users: int, num_shards: int) -> list[tuple[int, int]]:
    """Even contiguous split of global users [0, num_users) into num_shards ranges."""
    if num_shards < 1:
        raise DatasetError(f"--shards must be >= 1, got {num_shards}")
    if num_shards > max(num_users, 1):
        raise DatasetError(f"--shards {num_shards} is more than the {num_users} users")
    cuts = [num_users * i // num_shards for i in range(num_shards + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write to a temporary name in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a dataset folder; DatasetError if missing, unreadable or of another version."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DatasetError(f"{path}: no manifest; not a dataset folder, or its preparation did "
                           f"not finish (run `s3rec-prep ... --out {folder}`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable manifest: {e}") from None
    missing = [k for k in ("format_version", "name", "num_users", "num_items", "num_interactions",
                           "num_attributes", "shards") if k not in manifest]
    if missing:
        raise DatasetError(f"{path}: manifest lacks keys {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise DatasetError(f"{path}: format_version {manifest['format_version']}, this code reads "
                           f"version {FORMAT_VERSION}; prepare the dataset again")
    check_manifest_fields(manifest, path)
    return manifest


SHARD_RECORD = {"file": str, "user_start": int, "user_end": int, "num_users": int,
                "num_interactions": int, "sha256": str}


def check_manifest_fields(manifest: dict, path: Path) -> None:
    """Types of the manifest's counts and shard records (DatasetError naming the key): readers
    index with them, so a hand-edited or damaged manifest must not get that far."""
    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    for k in ("num_users", "num_items", "num_interactions", "num_attributes"):
        if not is_int(manifest[k]) or manifest[k] < 0:
            raise DatasetError(f"{path}: key {k!r} = {manifest[k]!r}, expected an integer >= 0")
    if manifest["num_users"] < 1:
        raise DatasetError(f"{path}: key 'num_users' = 0: a dataset has at least one user")
    shards = manifest["shards"]
    if not isinstance(shards, list) or not shards:
        raise DatasetError(f"{path}: key 'shards' = {shards!r:.60}, expected a non-empty list of "
                           f"shard records")
    for i, rec in enumerate(shards):
        if not isinstance(rec, dict):
            raise DatasetError(f"{path}: shards[{i}] = {rec!r:.60}, expected an object with keys "
                               f"{list(SHARD_RECORD)}")
        for k, t in SHARD_RECORD.items():
            if k not in rec:
                raise DatasetError(f"{path}: shards[{i}] lacks key {k!r}")
            if not (is_int(rec[k]) and rec[k] >= 0 if t is int else isinstance(rec[k], t)):
                raise DatasetError(f"{path}: shards[{i}].{k} = {rec[k]!r}, expected "
                                   f"{'an integer >= 0' if t is int else 'a string'}")


# ---------------------------------------------------------------- writing a shard

class _Appender:
    """Appends to a 1-D/2-D resizable dataset in whole chunks, so the file layout depends only on
    the data (not on how the writer happened to batch it), and gzip never recompresses a chunk."""

    def __init__(self, group, name: str, dtype: str, row_shape: tuple = (), chunk_rows: int = CHUNK):
        import h5py  # noqa: F401  (h5py is only needed where shards are touched)
        self.chunk_rows = chunk_rows
        self.ds = group.create_dataset(
            name, shape=(0, *row_shape), maxshape=(None, *row_shape), dtype=dtype,
            chunks=(chunk_rows, *row_shape), compression=COMPRESSION,
            compression_opts=COMPRESSION_LEVEL, shuffle=True, track_times=False)
        self.pending: list[np.ndarray] = []
        self.num_pending = 0

    def append(self, rows: np.ndarray) -> None:
        if len(rows):
            self.pending.append(np.asarray(rows, dtype=self.ds.dtype))
            self.num_pending += len(rows)
        if self.num_pending >= self.chunk_rows:
            self._flush(whole_chunks=True)

    def _flush(self, whole_chunks: bool) -> None:
        if not self.num_pending:
            return
        data = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        n = (len(data) // self.chunk_rows) * self.chunk_rows if whole_chunks else len(data)
        if n:
            start = self.ds.shape[0]
            self.ds.resize((start + n, *self.ds.shape[1:]))
            self.ds[start:start + n] = data[:n]
        rest = data[n:]
        self.pending = [rest] if len(rest) else []
        self.num_pending = len(rest)

    def close(self) -> int:
        self._flush(whole_chunks=False)
        return self.ds.shape[0]


class ShardWriter:
    """Streams one shard: `add_users(items, lengths, user_ids, negatives)` any number of times,
    then `close()`. Writes to `path` directly: the caller writes into a temporary folder or name."""

    def __init__(self, path: str | os.PathLike, attrs: dict, attr_values: np.ndarray,
                 attr_offsets: np.ndarray):
        import h5py
        self.path = Path(path)
        self.file = h5py.File(self.path, "w")
        self.items = _Appender(self.file, SEQ_ITEMS, ITEM_DTYPE)
        self.offsets = _Appender(self.file, SEQ_OFFSETS, OFFSET_DTYPE)
        self.user_ids = _Appender(self.file, SEQ_USER_IDS, OFFSET_DTYPE)
        self.negatives = _Appender(self.file, NEGATIVES, ITEM_DTYPE, (NUM_NEGATIVES,),
                                   chunk_rows=max(1, CHUNK // NUM_NEGATIVES))
        # Item attributes are small and repeated in every shard, so any shard alone is usable.
        for name, arr, dt in ((ATTR_VALUES, attr_values, ITEM_DTYPE),
                              (ATTR_OFFSETS, attr_offsets, OFFSET_DTYPE)):
            if len(arr) == 0:     # no item has an attribute: HDF5 has no chunk of an empty shape
                self.file.create_dataset(name, data=np.asarray(arr, dtype=dt), track_times=False)
                continue
            self.file.create_dataset(name, data=np.asarray(arr, dtype=dt),
                                     chunks=(min(CHUNK, len(arr)),),
                                     compression=COMPRESSION, compression_opts=COMPRESSION_LEVEL,
                                     shuffle=True, track_times=False)
        for k in SHARD_ATTRS:
            v = attrs[k]
            self.file.attrs[k] = json.dumps(v, sort_keys=True) if isinstance(v, dict) else v
        self.num_interactions = 0
        self.num_users = 0
        self.offsets.append(np.zeros(1, dtype=OFFSET_DTYPE))

    def add_users(self, items: np.ndarray, lengths: np.ndarray, user_ids: np.ndarray,
                  negatives: np.ndarray) -> None:
        """items: int32 [sum(lengths)], lengths: [n], user_ids: [n], negatives: int32 [n, 99]."""
        n = len(lengths)
        if negatives.shape != (n, NUM_NEGATIVES) or len(user_ids) != n or len(items) != lengths.sum():
            raise ValueError("ShardWriter.add_users: inconsistent block shapes")
        self.items.append(items)
        self.offsets.append(self.num_interactions + np.cumsum(lengths, dtype=np.int64))
        self.user_ids.append(user_ids)
        self.negatives.append(negatives)
        self.num_interactions += int(lengths.sum())
        self.num_users += n

    def close(self) -> None:
        for a in (self.items, self.offsets, self.user_ids, self.negatives):
            a.close()
        self.file.close()

    def abort(self) -> None:
        try:
            self.file.close()
        finally:
            self.path.unlink(missing_ok=True)


# ---------------------------------------------------------------- reading and checking a shard

def open_shard(path: str | os.PathLike, cache_bytes: int = 16 << 20):
    """Open a shard read-only; DatasetError naming the file if it is not a readable HDF5 file."""
    import h5py
    try:
        return h5py.File(path, "r", rdcc_nbytes=cache_bytes)
    except OSError as e:
        raise DatasetError(f"{path}: cannot open shard (truncated or corrupt?): {e}") from None


def check_shard_file(folder: str | os.PathLike, record: dict, checksum: bool = True) -> None:
    """Size and sha256 of a shard file against its manifest record (DatasetError otherwise)."""
    path = Path(folder) / record["file"]
    if not path.is_file():
        raise DatasetError(f"{path}: shard file missing")
    size = path.stat().st_size
    if "bytes" in record and size != record["bytes"]:
        raise DatasetError(f"{path}: {size} bytes, manifest says {record['bytes']} "
                           f"(truncated or overwritten)")
    if checksum:
        digest = sha256_file(path)
        if digest != record["sha256"]:
            raise DatasetError(f"{path}: sha256 checksum mismatch: file {digest[:16]}..., "
                               f"manifest {record['sha256'][:16]}...")


def check_shard_content(folder: str | os.PathLike, manifest: dict, index: int) -> int:
    """Deep check of shard `index`: attributes, shapes, CSR offsets, id ranges. Returns the number
    of item-attribute pairs. Raises DatasetError naming the shard and what is wrong."""
    record = manifest["shards"][index]
    path = Path(folder) / record["file"]

    def bad(msg: str) -> DatasetError:
        return DatasetError(f"{path}: {msg}")

    with open_shard(path) as f:
        try:
            a = {k: f.attrs[k] for k in SHARD_ATTRS}
        except KeyError as e:
            raise bad(f"missing attribute {e}") from None
        expect = {"format_version": FORMAT_VERSION, "num_users": manifest["num_users"],
                  "num_items": manifest["num_items"], "num_attributes": manifest["num_attributes"],
                  "user_start": record["user_start"], "user_end": record["user_end"],
                  "shard_index": index, "num_shards": len(manifest["shards"])}
        for k, v in expect.items():
            if int(a[k]) != v:
                raise bad(f"attribute {k} = {a[k]}, manifest says {v}")
        # what the shard was made from, as the writer recorded it in both places
        for k in ("seed", "negatives_source", "sources"):
            if k not in manifest:
                continue
            v = a[k].item() if hasattr(a[k], "item") else a[k]
            if k == "sources":
                v = json.loads(v)
            if v != manifest[k]:
                raise bad(f"attribute {k} = {v!r}, manifest says {manifest[k]!r}")
        if manifest.get("num_negatives", NUM_NEGATIVES) != NUM_NEGATIVES:
            raise bad(f"manifest num_negatives = {manifest['num_negatives']}, this format has "
                      f"{NUM_NEGATIVES}")
        try:
            items = f[SEQ_ITEMS][:]
            offsets = f[SEQ_OFFSETS][:]
            user_ids = f[SEQ_USER_IDS][:]
            negs = f[NEGATIVES][:]
            attr_values = f[ATTR_VALUES][:]
            attr_offsets = f[ATTR_OFFSETS][:]
        except KeyError as e:
            raise bad(f"missing dataset {e}") from None
        except OSError as e:
            raise bad(f"unreadable data (corrupt?): {e}") from None
    n = record["user_end"] - record["user_start"]
    if record["num_users"] != n:
        raise bad(f"manifest num_users {record['num_users']} != user_end - user_start {n}")
    check_csr(offsets, len(items), n, "seq/offsets", bad)
    if len(items) != record["num_interactions"]:
        raise bad(f"{len(items)} interactions, manifest says {record['num_interactions']}")
    if len(items) and (items.min() < 1 or items.max() > manifest["num_items"]):
        raise bad(f"item ids outside 1..{manifest['num_items']}")
    if user_ids.shape != (n,):
        raise bad(f"seq/user_ids has shape {user_ids.shape}, expected ({n},)")
    if negs.shape != (n, NUM_NEGATIVES):
        raise bad(f"negatives have shape {negs.shape}, expected ({n}, {NUM_NEGATIVES})")
    if negs.size and (negs.min() < 1 or negs.max() > manifest["num_items"]):
        raise bad(f"negative ids outside 1..{manifest['num_items']}")
    num_rows = manifest["num_items"] + 2
    check_csr(attr_offsets, len(attr_values), num_rows, "attr/offsets", bad)
    if attr_offsets[1] != 0 or attr_offsets[-1] != attr_offsets[-2]:
        raise bad("attr/offsets: row 0 (padding) and the last row (mask) must be empty")
    if len(attr_values) and (attr_values.min() < 1 or attr_values.max() > manifest["num_attributes"]):
        raise bad(f"attribute ids outside 1..{manifest['num_attributes']}")
    return len(attr_values)


def check_csr(offsets: np.ndarray, num_values: int, num_rows: int, name: str, bad) -> None:
    if offsets.shape != (num_rows + 1,):
        raise bad(f"{name} has shape {offsets.shape}, expected ({num_rows + 1},)")
    if offsets[0] != 0 or offsets[-1] != num_values:
        raise bad(f"{name} must run from 0 to {num_values}, runs {offsets[0]}..{offsets[-1]}")
    if num_rows and np.any(np.diff(offsets) < 0):
        raise bad(f"{name} decreases")
