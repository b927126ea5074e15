"""The dataset format, defined once: imported by the writer (data_prep/) and the readers.

A dataset is a folder:

    DATASET/
      manifest.json            # written last (atomically): the dataset exists once this exists
      shard-00000.h5 ...       # NUM shards, each a contiguous range of users

Each shard (HDF5, datasets chunked and gzip-compressed):

    /seq/items      int32 [num_interactions_in_shard]   every user's items, chronological, flat
    /seq/offsets    int64 [num_users_in_shard + 1]      user u's items: items[offsets[u]:offsets[u+1]]
    /seq/user_ids   int64 [num_users_in_shard]          the user ids of the source (release: line's id)
    /attr/F/values  int32 [num_item_attribute_pairs]    attribute field F's ids (1..its count) as
                                                       CSR over item ids, one group per field
                                                       (format 1: /attr/values, /attr/offsets,
                                                       one field read as `attributes`)
    /attr/F/offsets int64 [num_items + 3]               item i's attributes: values[offsets[i]:offsets[i+1]]
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
  "num_attributes" (all fields together), "attribute_fields": [{"name", "num_attributes",
  "num_pairs"}] (format 2, in the order of the fields' global ids), "num_negatives", "seed", "negatives_source", "sources": {role: sha256}
  (roles: sequences, attributes, negatives | reviews, meta | interactions, item_features;
  synthetic data has none), "id_maps" (generic and amazon: data_prep/id_maps.py),
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
import shutil
from pathlib import Path

import numpy as np

from s3rec import strict_load
from s3rec.atomic_write import WriteError
from s3rec.data.fields import attr_datasets, manifest_layout

FORMAT_VERSION = 2
# 1: one attribute vocabulary (attr/values, attr/offsets), read as the one field `attributes`;
# 2: named attribute fields (attr/<field>/values, attr/<field>/offsets; s3rec/data/fields.py)
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
NUM_NEGATIVES = 99

SEQ_ITEMS = "seq/items"
SEQ_OFFSETS = "seq/offsets"
SEQ_USER_IDS = "seq/user_ids"
ATTR_VALUES = "attr/values"            # format 1; format 2: attr/<field>/values (attr_datasets)
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


def load_json(path: Path) -> object:
    """JSON of a UTF-8 file, refusing what `json` would accept silently: a key twice in one object
    (json keeps the last value, so a hand merge or a bad export would lose the first unseen).
    DatasetError naming the file, and the line or the key."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text (byte {e.start}): {e.reason}") from None

    try:
        return strict_load.load_json(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except strict_load.DuplicateKey as e:
        raise DatasetError(f"{path}: {e}") from None


ID_MAPS = "id_maps.json"    # the source's own ids behind the numbers (data_prep/id_maps.py)


def check_id_maps(folder: str | os.PathLike, manifest: dict) -> None:
    """The file a manifest's `id_maps` names, against its size and checksum (no key: nothing)."""
    rec = manifest.get("id_maps")
    if rec is None:
        return
    if not isinstance(rec, dict) or rec.get("file") != ID_MAPS or \
            not isinstance(rec.get("sha256"), str) or not isinstance(rec.get("bytes"), int):
        raise DatasetError(f"{Path(folder) / MANIFEST}: key 'id_maps' = {rec!r:.60}, expected "
                           f"{{\"file\": \"{ID_MAPS}\", \"sha256\", \"bytes\"}}")
    path = Path(folder) / ID_MAPS
    if not path.is_file():
        raise DatasetError(f"{path}: id map file missing")
    if path.stat().st_size != rec["bytes"] or sha256_file(path) != rec["sha256"]:
        raise DatasetError(f"{path}: size or sha256 differs from the manifest (overwritten?)")


def read_id_maps(folder: str | os.PathLike, manifest: dict) -> dict | None:
    """id_maps.json of a dataset folder, checked against its manifest; None where it has none."""
    if manifest.get("id_maps") is None:
        return None
    check_id_maps(folder, manifest)
    path = Path(folder) / ID_MAPS
    maps = load_json(path)
    if not isinstance(maps, dict) or not all(isinstance(maps.get(k), list)
                                             for k in ("users", "items")):
        raise DatasetError(f"{path}: expected an object with lists 'users' and 'items'")
    return maps


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system that holds `path` (its nearest existing folder)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def write_error(path: str | os.PathLike, e: OSError) -> DatasetError:
    """The one line for a failed write: the file, the reason, the free space left there (the
    atomic writer's own line when it was the one that failed)."""
    if isinstance(e, WriteError):
        return DatasetError(str(e))
    return DatasetError(f"{path}: cannot write ({e.strerror or e}); {free_bytes(path)} bytes "
                        f"free on its file system")


def shard_bytes_bound(num_users: int, num_interactions: int, num_items: int,
                      num_attributes: int, num_attr_pairs: int, num_attr_fields: int = 1) -> int:
    """An upper bound of one shard's file size. The shuffle filter stores each byte of a value in
    its own plane, and deflate never grows a plane by more than 0.1% (stored blocks), so every
    array takes at most the bytes its largest value needs, times its length (planes of zeros all
    but vanish). 1% covers deflate and the chunk indexes, 64 KiB the headers and attributes;
    each attribute field has its own offsets over all items.
    Synthetic data (500 items) comes out at 1.7x its real size; ids are then 2 bytes a value
    where gzip reaches 1.2."""
    item, pairs = value_bytes(num_items + 1), value_bytes(num_attr_pairs)
    raw = (item * (num_interactions + NUM_NEGATIVES * num_users)     # seq/items, negatives
           + value_bytes(num_interactions) * (num_users + 1)         # seq/offsets
           + 8 * num_users                                           # seq/user_ids: any int64
           + value_bytes(num_attributes) * num_attr_pairs            # attr/values
           + pairs * (num_items + 3) * num_attr_fields)              # attr/.../offsets
    return int(raw * 1.01) + (64 << 10)


def value_bytes(max_value: int) -> int:
    """Bytes that hold the integers 0..max_value."""
    return max(1, (int(max_value).bit_length() + 7) // 8)


def read_manifest(folder: str | os.PathLike) -> dict:
    """The manifest of a dataset folder; DatasetError if missing, unreadable or of another version."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DatasetError(f"{path}: no manifest; not a dataset folder, or its preparation did "
                           f"not finish (run `s3rec-prep ... --out {folder}`)")
    try:
        manifest = load_json(path)
    except OSError as e:
        raise DatasetError(f"{path}: unreadable manifest: {e}") from None
    if not isinstance(manifest, dict):
        raise DatasetError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
    missing = [k for k in ("format_version", "name", "num_users", "num_items", "num_interactions",
                           "num_attributes", "shards") if k not in manifest]
    if missing:
        raise DatasetError(f"{path}: manifest lacks keys {missing}")
    if manifest["format_version"] not in READABLE_VERSIONS:
        raise DatasetError(f"{path}: format_version {manifest['format_version']}, this code reads "
                           f"versions {', '.join(map(str, READABLE_VERSIONS))}; prepare the "
                           f"dataset again")
    check_manifest_fields(manifest, path)
    manifest_layout(manifest, path)
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
    then `close()`, which writes the file to `path` (the caller picks a temporary name).

    The shard is built in memory (HDF5's core driver, no backing store) and written by `close()`
    in one plain write: HDF5 (2.0, h5py 3.16) that meets ENOSPC while writing a file fails to
    close it, and freeing its dataset objects afterwards (when the exception is dropped, or at
    exit) crashes the process in H5D_close / H5FO_top_decr, SIGSEGV or SIGBUS, before any
    message. A plain write fails as an OSError, named by
    `write_error`, and the partial file is removed. The bytes are those the file driver would
    write (same allocation); the price is one shard's compressed size in memory."""

    def __init__(self, path: str | os.PathLike, attrs: dict,
                 attr_fields: list[tuple[str, np.ndarray, np.ndarray]]):
        """attr_fields: (name, values, offsets) of each attribute field, its own ids."""
        import h5py
        self.path = Path(path)
        self.file = h5py.File(self.path, "w", driver="core", backing_store=False)
        self.items = _Appender(self.file, SEQ_ITEMS, ITEM_DTYPE)
        self.offsets = _Appender(self.file, SEQ_OFFSETS, OFFSET_DTYPE)
        self.user_ids = _Appender(self.file, SEQ_USER_IDS, OFFSET_DTYPE)
        self.negatives = _Appender(self.file, NEGATIVES, ITEM_DTYPE, (NUM_NEGATIVES,),
                                   chunk_rows=max(1, CHUNK // NUM_NEGATIVES))
        # Item attributes are small and repeated in every shard, so any shard alone is usable.
        arrays = [(key, arr, dt) for field, values, offsets in attr_fields
                  for key, arr, dt in zip(attr_datasets(FORMAT_VERSION, field),
                                           (values, offsets), (ITEM_DTYPE, OFFSET_DTYPE))]
        for name, arr, dt in arrays:
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
        self.file.flush()
        image = self.file.id.get_file_image()
        self.file.close()
        try:
            with open(self.path, "wb") as f:
                f.write(image)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            err = write_error(self.path, e)    # the free space when it failed, not after cleanup
            self.path.unlink(missing_ok=True)
            raise err from None

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


def check_layout(folder: str | os.PathLike, manifest: dict) -> None:
    """The manifest's shard records against each other and its totals: files shard-00000.h5 ...
    in order, user ranges contiguous from 0 to num_users, each record's num_users its range's
    size, num_interactions their sum. DatasetError naming the shard and the key."""
    folder = Path(folder)
    expect_start = 0
    for i, rec in enumerate(manifest["shards"]):
        if rec["file"] != shard_name(i):
            raise DatasetError(f"{folder / MANIFEST}: shards[{i}].file = {rec['file']!r}, "
                               f"expected {shard_name(i)!r}")
        if rec["user_start"] != expect_start or rec["user_end"] < rec["user_start"]:
            raise DatasetError(f"{folder / MANIFEST}: {rec['file']}: user range shards[{i}]."
                               f"user_start..user_end = {rec['user_start']}..{rec['user_end']} does "
                               f"not continue from {expect_start}")
        if rec["num_users"] != rec["user_end"] - rec["user_start"]:
            raise DatasetError(f"{folder / MANIFEST}: {rec['file']}: key shards[{i}].num_users = "
                               f"{rec['num_users']}, but user_end - user_start = "
                               f"{rec['user_end'] - rec['user_start']}")
        expect_start = rec["user_end"]
    if expect_start != manifest["num_users"]:
        raise DatasetError(f"{folder / MANIFEST}: key 'num_users' = {manifest['num_users']}, but "
                           f"the shards cover users 0..{expect_start}")
    total = sum(r["num_interactions"] for r in manifest["shards"])
    if total != manifest["num_interactions"]:
        raise DatasetError(f"{folder / MANIFEST}: key 'num_interactions' = "
                           f"{manifest['num_interactions']}, but the shards hold {total}")


def check_shard_header(path: Path, f, manifest: dict, index: int) -> None:
    """Shard `index` (open h5py.File `f` at `path`) against the manifest from its attributes and
    its datasets' shapes alone (no data is read: milliseconds a shard). Every shard ever written
    carries all of SHARD_ATTRS, and the shapes carry the per-shard counts, so the format needs
    nothing new for this and old datasets are checked in full. DatasetError naming the shard file and the key, both values."""
    record = manifest["shards"][index]

    def bad(msg: str) -> DatasetError:
        return DatasetError(f"{path}: {msg}")

    try:
        a = {k: f.attrs[k] for k in SHARD_ATTRS}
    except KeyError as e:
        raise bad(f"missing attribute {e}") from None
    expect = {"format_version": manifest["format_version"], "num_users": manifest["num_users"],
              "num_items": manifest["num_items"], "num_attributes": manifest["num_attributes"],
              "user_start": record["user_start"], "user_end": record["user_end"],
              "shard_index": index, "num_shards": len(manifest["shards"])}
    for k, v in expect.items():
        if int(a[k]) != v:
            key = {"user_start": f"shards[{index}].user_start", "num_shards": "len(shards)",
                   "user_end": f"shards[{index}].user_end", "shard_index": "its place in shards"}
            raise bad(f"attribute {k} = {a[k]}, manifest says {v} (key {key.get(k, repr(k))})")
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
    n, at = record["num_users"], f"shards[{index}]"
    shapes = [(SEQ_ITEMS, "interactions", (record["num_interactions"],), f"{at}.num_interactions"),
              (SEQ_OFFSETS, "user offsets", (n + 1,), f"{at}.num_users + 1"),
              (SEQ_USER_IDS, "user ids", (n,), f"{at}.num_users"),
              (NEGATIVES, "negatives", (n, NUM_NEGATIVES), f"({at}.num_users, {NUM_NEGATIVES})"),
              *[(attr_datasets(manifest["format_version"], field.name)[1], "attribute offsets",
                 (manifest["num_items"] + 3,), "num_items + 3")
                for field in manifest_layout(manifest, path)]]
    for name, what, shape, key in shapes:
        try:
            found = f[name].shape
        except KeyError:
            raise bad(f"missing dataset {name!r}") from None
        if found != shape:
            raise bad(f"{_count(found)} {what}, manifest says {_count(shape)} (key {key}; "
                      f"dataset {name})")


def _count(shape: tuple) -> object:
    return shape[0] if len(shape) == 1 else shape


def check_headers(folder: str | os.PathLike, manifest: dict) -> None:
    """Every shard's size and header against the manifest (check_layout, check_shard_file without
    the sha256, check_shard_header): what opening a dataset costs, a few ms a shard."""
    check_layout(folder, manifest)
    for i, rec in enumerate(manifest["shards"]):
        check_shard_file(folder, rec, checksum=False)
        path = Path(folder) / rec["file"]
        with open_shard(path) as f:
            check_shard_header(path, f, manifest, i)


def check_shard_content(folder: str | os.PathLike, manifest: dict, index: int) -> int:
    """Deep check of shard `index`: its header (check_shard_header), then the data: CSR offsets,
    id ranges. Returns the number of item-attribute pairs. Raises DatasetError naming the shard
    and what is wrong."""
    record = manifest["shards"][index]
    path = Path(folder) / record["file"]

    def bad(msg: str) -> DatasetError:
        return DatasetError(f"{path}: {msg}")

    with open_shard(path) as f:
        check_shard_header(path, f, manifest, index)
        try:
            items = f[SEQ_ITEMS][:]
            offsets = f[SEQ_OFFSETS][:]
            negs = f[NEGATIVES][:]
            attrs = {field: tuple(f[k][:] for k in attr_datasets(manifest["format_version"],
                                                                  field.name))
                     for field in manifest_layout(manifest, path)}
        except KeyError as e:
            raise bad(f"missing dataset {e}") from None
        except OSError as e:
            raise bad(f"unreadable data (corrupt?): {e}") from None
    check_csr(offsets, len(items), record["num_users"], "seq/offsets", bad)
    if len(items) and (items.min() < 1 or items.max() > manifest["num_items"]):
        raise bad(f"item ids outside 1..{manifest['num_items']}")
    if negs.size and (negs.min() < 1 or negs.max() > manifest["num_items"]):
        raise bad(f"negative ids outside 1..{manifest['num_items']}")
    return sum(check_attribute_field(manifest, field, values, offsets, bad)
               for field, (values, offsets) in attrs.items())


def check_attribute_field(manifest: dict, field, values: np.ndarray, offsets: np.ndarray,
                          bad) -> int:
    """One attribute field's CSR (s3rec.data.fields.AttributeField `field`, its own ids);
    returns its number of pairs."""
    name = attr_datasets(manifest["format_version"], field.name)[1]
    check_csr(offsets, len(values), manifest["num_items"] + 2, name, bad)
    if offsets[1] != 0 or offsets[-1] != offsets[-2]:
        raise bad(f"{name}: row 0 (padding) and the last row (mask) must be empty")
    if len(values) and (values.min() < 1 or values.max() > field.num_attributes):
        raise bad(f"attribute ids of field {field.name!r} outside 1..{field.num_attributes}")
    recorded = {r["name"]: r["num_pairs"] for r in manifest.get("attribute_fields", [])}
    if field.name in recorded and recorded[field.name] != len(values):
        raise bad(f"field {field.name!r}: {len(values)} item-attribute pairs, manifest "
                  f"attribute_fields says {recorded[field.name]}")
    return len(values)


def check_csr(offsets: np.ndarray, num_values: int, num_rows: int, name: str, bad) -> None:
    if offsets.shape != (num_rows + 1,):
        raise bad(f"{name} has shape {offsets.shape}, expected ({num_rows + 1},)")
    if offsets[0] != 0 or offsets[-1] != num_values:
        raise bad(f"{name} must run from 0 to {num_values}, runs {offsets[0]}..{offsets[-1]}")
    if num_rows and np.any(np.diff(offsets) < 0):
        raise bad(f"{name} decreases")
