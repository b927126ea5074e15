"""Reading a prepared dataset (format: s3rec/data/format.py).

`Dataset(path)` reads manifest.json and checks every shard's header against it (`check_headers`:
the file sizes, each shard's own attributes and dataset shapes, the user ranges; no data is read),
so a manifest edited by hand or a shard of another dataset stops here with a line naming the shard
and the key, not as a wrong run or an IndexError later. Shards are then opened on first use, once
per process:
h5py handles do not survive pickling or fork, so they are dropped in `__getstate__` and reopened
when the process id changes (DataLoader workers, spawned ranks).
Each shard's size and sha256 are checked against the manifest the first time this process opens
it (`verify=False` skips the sha256 for speed; the size is always checked).
"""
from __future__ import annotations

import bisect
import os
from pathlib import Path

import numpy as np

from s3rec.data.fields import AttributeField, attr_datasets, manifest_layout, stack_fields
from s3rec.data.format import (CHUNK, MANIFEST, NEGATIVES, NUM_NEGATIVES, SEQ_ITEMS, SEQ_OFFSETS,
                               SEQ_USER_IDS, DatasetError, check_headers, check_shard_file,
                               open_shard, read_id_maps, read_manifest)

_VERIFIED: set[tuple[str, int, int]] = set()   # (path, size, mtime_ns) checked in this process


def user_share(num_users: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, disjoint, complete split of users [0, num_users): sizes differ by at most 1."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    return num_users * rank // world_size, num_users * (rank + 1) // world_size


class Dataset:
    def __init__(self, path: str | os.PathLike, verify: bool = True):
        self.path = Path(path)
        self.verify = verify
        self.manifest = read_manifest(self.path)
        check_headers(self.path, self.manifest)
        self.shards = self.manifest["shards"]
        self._starts = [s["user_start"] for s in self.shards]
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    # ---------------------------------------------------------------- sizes and id layout
    name = property(lambda self: self.manifest["name"])
    num_users = property(lambda self: self.manifest["num_users"])
    num_items = property(lambda self: self.manifest["num_items"])
    num_attributes = property(lambda self: self.manifest["num_attributes"])
    num_interactions = property(lambda self: self.manifest["num_interactions"])
    item_size = property(lambda self: self.num_items + 2)        # 0 = padding, +1 = mask
    mask_id = property(lambda self: self.num_items + 1)
    attribute_size = property(lambda self: self.num_attributes + 1)

    # ---------------------------------------------------------------- handles
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"] = {}
        return state

    def close(self) -> None:
        if self._pid == os.getpid():
            for f in self._files.values():
                f.close()
        self._files = {}

    def shard(self, index: int):
        """The open h5py.File of shard `index` (opened, and checked, on first use here)."""
        if self._pid != os.getpid():    # forked: the parent's handles are not ours to use
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(index)
        if f is None:
            rec = self.shards[index]
            path = self.path / rec["file"]
            key = (str(path), *(_stat(path)))
            if key not in _VERIFIED:
                check_shard_file(self.path, rec, checksum=self.verify)
                if self.verify:
                    _VERIFIED.add((str(path), *_stat(path)))
            f = self._files[index] = open_shard(path)
        return f

    def _read(self, index: int, name: str, sl=slice(None)) -> np.ndarray:
        try:
            return self.shard(index)[name][sl]
        except (OSError, KeyError) as e:
            raise DatasetError(f"{self.path / self.shards[index]['file']}: cannot read {name} "
                               f"(corrupt?): {e}") from None

    def _shards_for(self, start: int, end: int):
        """(shard index, local lo, local hi) covering global users [start, end)."""
        if not 0 <= start <= end <= self.num_users:
            raise ValueError(f"user range [{start}, {end}) outside [0, {self.num_users})")
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        while start < end:
            s = self.shards[i]
            hi = min(end, s["user_end"])
            if hi > start:
                yield i, start - s["user_start"], hi - s["user_start"]
            start = max(start, hi)
            i += 1

    # ---------------------------------------------------------------- data
    def load_sequences(self, start: int = 0, end: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """CSR over global users [start, end): items int32 [X], offsets int64 [n + 1] from 0."""
        end = self.num_users if end is None else end
        items, offsets, base = [], [np.zeros(1, np.int64)], 0
        for i, lo, hi in self._shards_for(start, end):
            off = self._read(i, SEQ_OFFSETS, slice(lo, hi + 1))
            items.append(self._read(i, SEQ_ITEMS, slice(int(off[0]), int(off[-1]))))
            offsets.append(off[1:] - off[0] + base)
            base += int(off[-1] - off[0])
        return (np.concatenate(items) if items else np.zeros(0, np.int32)).astype(np.int32, copy=False), \
            np.concatenate(offsets)

    def load_negatives(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """int32 [end - start, 99]: the sampled-evaluation negatives of global users [start, end)."""
        end = self.num_users if end is None else end
        parts = [self._read(i, NEGATIVES, slice(lo, hi)) for i, lo, hi in self._shards_for(start, end)]
        return np.concatenate(parts) if parts else np.zeros((0, NUM_NEGATIVES), np.int32)

    def id_maps(self) -> dict | None:
        """The source's own ids behind the numbers (id_maps.json), None where it has none."""
        return read_id_maps(self.path, self.manifest)

    def load_user_ids(self, start: int = 0, end: int | None = None) -> np.ndarray:
        """int64 [end - start]: the user numbers (seq/user_ids) of global users [start, end)."""
        end = self.num_users if end is None else end
        parts = [self._read(i, SEQ_USER_IDS, slice(lo, hi))
                 for i, lo, hi in self._shards_for(start, end)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    @property
    def attribute_fields(self) -> tuple[AttributeField, ...]:
        """The named attribute fields (format 1: one, `attributes`), in global id order."""
        return manifest_layout(self.manifest, self.path / MANIFEST)

    def field_attributes(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Field `name`'s own CSR (ids 1..its count) over item ids 0..item_size-1."""
        values, offsets = attr_datasets(self.manifest["format_version"], name)
        return self._read(0, values), self._read(0, offsets)

    def item_attributes(self) -> tuple[np.ndarray, np.ndarray]:
        """CSR over item ids 0..item_size-1 (rows 0 and mask_id empty) of every field's
        attributes in one id space (s3rec.data.fields.stack_fields: one field's own ids):
        values int32, offsets int64."""
        layout = self.attribute_fields
        return stack_fields([self.field_attributes(f.name) for f in layout], layout)


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DatasetError(f"{path}: shard file missing") from None
    return st.st_size, st.st_mtime_ns


class UserSequences:
    """Map-style (torch DataLoader-ready) view of global users [start, end): item k is
    (user index, items int32 array). Shards open lazily in whichever process reads (each DataLoader
    worker opens its own). A shard's offsets and items are read whole on first touch and kept in
    an LRU cache of `cache_bytes` (shuffled access then costs no HDF5 read per user); a shard larger
    than the cache is read in chunk-aligned windows of `window` items instead."""

    def __init__(self, ds: Dataset, start: int = 0, end: int | None = None,
                 cache_bytes: int = 256 << 20, window: int = 2 * CHUNK):
        self.ds = ds
        self.start, self.end = start, ds.num_users if end is None else end
        if not 0 <= self.start <= self.end <= ds.num_users:
            raise ValueError(f"user range [{start}, {end}) outside [0, {ds.num_users})")
        self.cache_bytes, self.window = cache_bytes, window
        self._cache: dict[int, list] = {}      # shard -> [offsets, items_lo, items]; insertion = LRU

    def __len__(self) -> int:
        return self.end - self.start

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_cache"] = {}
        return state

    def __getitem__(self, k: int) -> tuple[int, np.ndarray]:
        if not 0 <= k < len(self):
            raise IndexError(k)
        u = self.start + k
        i = bisect.bisect_right(self.ds._starts, u) - 1
        local = u - self.ds.shards[i]["user_start"]
        entry = self._cache.pop(i, None)
        if entry is None:
            entry = [self.ds._read(i, SEQ_OFFSETS), 0, None]
        offsets, win_lo, win = entry
        lo, hi = int(offsets[local]), int(offsets[local + 1])
        if win is None or lo < win_lo or hi > win_lo + len(win):
            total = int(offsets[-1])
            if total * 4 <= self.cache_bytes:
                win_lo, win = 0, self.ds._read(i, SEQ_ITEMS)
            else:
                win_lo = lo - lo % CHUNK
                win = self.ds._read(i, SEQ_ITEMS, slice(win_lo, max(hi, win_lo + self.window)))
            entry = [offsets, win_lo, win]
        self._cache[i] = entry
        self._evict()
        return u, win[lo - win_lo:hi - win_lo]

    def _evict(self) -> None:
        used = sum(e[0].nbytes + (e[2].nbytes if e[2] is not None else 0) for e in self._cache.values())
        while used > self.cache_bytes and len(self._cache) > 1:
            e = self._cache.pop(next(iter(self._cache)))
            used -= e[0].nbytes + (e[2].nbytes if e[2] is not None else 0)


def collate_users(batch: list[tuple[int, np.ndarray]]) -> tuple[np.ndarray, list[np.ndarray]]:
    """DataLoader collate for UserSequences: (user indices [B], list of item arrays)."""
    return np.array([u for u, _ in batch], dtype=np.int64), [s for _, s in batch]
