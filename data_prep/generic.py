"""Your own data -> MemorySource: interactions (user, item, timestamp) and, optionally, item
features with any number of fields (docs/data.md, "Your own data").

1. interactions, in file order; each user's items sorted by timestamp (stable: ties keep file
   order). Timestamps are numbers (integers or decimals) or ISO 8601 dates/times, one kind a
   file; an ISO time without a zone is read as UTC.
2. optional user / item k-core (`--user-core`, `--item-core`; amazon.k_core, to the fixed
   point); then every user needs release.MIN_LENGTH items (leave-one-out).
3. ids from 1: users in order of first appearance, items in order of first appearance walking
   the users' sorted sequences (as the Amazon route); seq/user_ids are these numbers.
4. item features: one vocabulary a field, ids from 1 in order of first appearance walking the
   feature file (only items of the dataset count); an item's values in a field are kept once
   each, in that order. Rows of the same item add up. `merge_fields`: one field `attributes`
   whose ids are the fields' ids stacked (field by field): the same value in two fields stays two
   ids.
5. the source's ids of users, items and attribute values go to id_maps.json (data_prep/id_maps.py).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from s3rec.config import FIELD_NAME
from s3rec.data_prep.amazon import k_core
from s3rec.data_prep.records import is_finite_number, read_table
from s3rec.data_prep.release import MIN_LENGTH
from s3rec.data_prep.source import MemorySource
from s3rec.data.fields import DEFAULT_FIELD
from s3rec.data.format import DatasetError

NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MICROSECOND = timedelta(microseconds=1)


@dataclass
class Columns:
    user: str = "user"
    item: str = "item"
    time: str = "timestamp"


def parse_id(value, path: Path, lineno: int, col: str) -> str:
    """A string (stripped) or a JSON integer, as a string: 7 and "7" are the same id."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DatasetError(f"{path}:{lineno}: {col!r}: expected a string or an integer id, got "
                           f"{json.dumps(value)[:40]}")
    value = value.strip()
    if not value:
        raise DatasetError(f"{path}:{lineno}: {col!r} is empty (every row needs an id there)")
    return value


def parse_time(value, path: Path, lineno: int, col: str) -> tuple[str, int | float]:
    """(kind, sortable value): ("number", the number) or ("date", microseconds since 1970 UTC)."""
    if is_finite_number(value):
        return "number", value
    if isinstance(value, str):
        s = value.strip()
        if NUMBER.fullmatch(s):
            v = int(s) if s.lstrip("+-").isdigit() else float(s)
            if is_finite_number(v):
                return "number", v
        else:
            try:
                t = datetime.fromisoformat(s)
            except ValueError:
                pass
            else:
                t = t if t.tzinfo else t.replace(tzinfo=timezone.utc)
                return "date", (t - EPOCH) // MICROSECOND
    raise DatasetError(f"{path}:{lineno}: {col!r} = {json.dumps(value)[:40]}: expected a number "
                       f"or an ISO 8601 date/time (e.g. 1700000000 or 2023-11-14T22:13:20)")


def read_interactions(path: Path, delimiter: str | None, cols: Columns):
    """{user: [item, ...] sorted by time}, {user: line of its first interaction}."""
    _, rows = read_table(path, delimiter, [cols.user, cols.item, cols.time])
    seqs: dict[str, list[tuple]] = {}
    first_line: dict[str, int] = {}
    kind_line = None
    for lineno, row in rows:
        for c in (cols.user, cols.item, cols.time):
            if c not in row:
                raise DatasetError(f"{path}:{lineno}: no key {c!r} (every line needs "
                                   f"{cols.user!r}, {cols.item!r} and {cols.time!r})")
        user = parse_id(row[cols.user], path, lineno, cols.user)
        item = parse_id(row[cols.item], path, lineno, cols.item)
        kind, t = parse_time(row[cols.time], path, lineno, cols.time)
        if kind_line is None:
            kind_line = (kind, lineno)
        elif kind != kind_line[0]:
            raise DatasetError(f"{path}:{lineno}: {cols.time!r} is a {kind}, but on line "
                               f"{kind_line[1]} a {kind_line[0]}; one kind of timestamp a file")
        seqs.setdefault(user, []).append((t, item))
        first_line.setdefault(user, lineno)
    for s in seqs.values():
        s.sort(key=lambda x: x[0])           # stable: ties keep file order
    return {u: [i for _, i in s] for u, s in seqs.items()}, first_line


def feature_values(value, path: Path, lineno: int, col: str, multi_sep: str | None) -> list[str]:
    """A cell's values: delimited text split at multi_sep (None: JSON, a list or one scalar;
    null is none)."""
    if multi_sep is not None:
        return [p.strip() for p in value.split(multi_sep) if p.strip()]
    items = value if isinstance(value, list) else [value]
    out = []
    for v in items:
        if isinstance(v, (list, dict)):
            raise DatasetError(f"{path}:{lineno}: {col!r}: expected a value or a list of values, "
                               f"got {json.dumps(value)[:40]}")
        if v is not None:
            s = v.strip() if isinstance(v, str) else json.dumps(v)
            if s:
                out.append(s)
    return out


def pick_fields(path: Path, header: list[str] | None, rows, item_col: str,
                fields: list[str] | None, merge: bool) -> list[str]:
    if header is None:                     # JSON lines: keys in order of first appearance
        seen: dict[str, None] = {}
        for _, row in rows:
            seen.update(dict.fromkeys(row))
        where, available = f"{path}", [k for k in seen if k != item_col]
    else:
        where, available = f"{path}:1", [c for c in header if c != item_col]
    if fields is None:
        fields = available
    for f in fields:
        if f == item_col:
            raise DatasetError(f"--fields names {f!r}, the item column (--item-col)")
        if f not in available:
            raise DatasetError(f"{where}: --fields names {f!r}, which is not a "
                               f"{'column' if header is not None else 'key of any line'} "
                               f"(fields there: {', '.join(map(repr, available)) or 'none'})")
    if not fields:
        raise DatasetError(f"{where}: no field besides the item column {item_col!r}")
    if not merge:
        for f in fields:
            if not re.fullmatch(FIELD_NAME, f):
                raise DatasetError(f"{where}: field {f!r} cannot name an attribute field (a "
                                   f"letter, then up to 63 letters, digits or _); "
                                   f"rename the column, leave it out with --fields, or use "
                                   f"--merge-fields")
    return fields


def read_features(path: Path, delimiter: str | None, item_col: str, fields: list[str] | None,
                  multi_sep: str, merge: bool, item_id: dict[str, int]):
    """(fields, {field: {value: id}}, table[item] = {field: [ids]}) for the dataset's items."""
    header, rows = read_table(path, delimiter, [item_col])
    fields = pick_fields(path, header, rows, item_col, fields, merge)
    vocab: dict[str, dict[str, int]] = {f: {} for f in fields}
    table: list[dict[str, list[int]]] = [{} for _ in range(len(item_id) + 1)]
    sep = multi_sep if header is not None else None
    for lineno, row in rows:
        if item_col not in row:
            raise DatasetError(f"{path}:{lineno}: no key {item_col!r} (every line names its item)")
        item = parse_id(row[item_col], path, lineno, item_col)
        values = {f: feature_values(row[f], path, lineno, f, sep) for f in fields if f in row}
        if item not in item_id:           # items outside the interactions are not in the dataset
            continue
        have = table[item_id[item]]
        for f, vs in values.items():
            ids = have.setdefault(f, [])
            for v in vs:
                a = vocab[f].setdefault(v, len(vocab[f]) + 1)
                if a not in ids:
                    ids.append(a)
    empty = [f for f in fields if not vocab[f]]
    if empty:
        raise DatasetError(f"{path}: field {empty[0]!r} has no value for any item of the dataset; "
                           f"leave it out with --fields")
    return fields, vocab, table


def load_generic(files: dict[str, Path], name: str, seed: int, cols: Columns,
                 delimiter: str | None = None, fields: list[str] | None = None,
                 multi_sep: str = "|", merge_fields: bool = False, user_core: int = 0,
                 item_core: int = 0) -> MemorySource:
    path = files["interactions"]
    user_seq, first_line = read_interactions(path, delimiter, cols)
    user_seq = k_core(user_seq, user_core, item_core)
    if not user_seq:
        raise DatasetError(f"{path}: no users left after the {user_core}-core / {item_core}-core "
                           f"filter")
    short = [u for u, s in user_seq.items() if len(s) < MIN_LENGTH]
    if short:
        u = short[0]
        raise DatasetError(f"{path}:{first_line[u]}: user {u!r} (first on this line) has "
                           f"{len(user_seq[u])} interactions after filtering, and every user needs "
                           f"{MIN_LENGTH} (train, validation, test); {len(short)} of the "
                           f"{len(user_seq)} users have fewer: drop them with --user-core "
                           f"{MIN_LENGTH}")
    item_id: dict[str, int] = {}
    flat, lengths = [], []
    for s in user_seq.values():
        flat.extend(item_id.setdefault(i, len(item_id) + 1) for i in s)
        lengths.append(len(s))
    maps = {"users": list(user_seq), "items": list(item_id), "attribute_fields": {}}
    table: list[list[int]] = [[] for _ in range(len(item_id) + 1)]
    counts: tuple = ()
    if "item_features" in files:
        names, vocab, per_item = read_features(files["item_features"], delimiter, cols.item,
                                               fields, multi_sep, merge_fields, item_id)
        offsets = np.cumsum([0] + [len(vocab[f]) for f in names])
        table = [[int(offsets[k]) + a for k, f in enumerate(names) for a in row.get(f, [])]
                 for row in per_item]
        if merge_fields:
            counts = ((DEFAULT_FIELD, int(offsets[-1])),)
            maps["attribute_fields"] = {DEFAULT_FIELD: [[f, v] for f in names for v in vocab[f]]}
        else:
            counts = tuple((f, len(vocab[f])) for f in names)
            maps["attribute_fields"] = {f: list(vocab[f]) for f in names}
    source = MemorySource(name, np.array(flat), np.array(lengths),
                          np.arange(1, len(lengths) + 1), table, seed)
    if counts:
        source.field_counts = counts
        source.num_attributes = sum(n for _, n in counts)
    source.id_maps = maps
    return source


def generic_files(interactions: Path, item_features: Path | None) -> dict[str, Path]:
    files = {"interactions": interactions}
    if item_features is not None:
        files["item_features"] = item_features
    for role, f in files.items():
        if not f.is_file():
            raise DatasetError(f"{f}: not found (--{role.replace('_', '-')})")
    return files


def source_from_args(ns, files: dict[str, Path]) -> MemorySource:
    """load_generic with the options of `s3rec-prep generic` (data_prep/cli.py)."""
    fields = None
    if ns.fields is not None:
        fields = [f.strip() for f in ns.fields.split(",")]
        if not all(fields) or len(set(fields)) != len(fields):
            raise DatasetError(f"--fields {ns.fields!r}: expected distinct column names separated "
                               f"by commas")
    if not ns.multi_sep:
        raise DatasetError("--multi-sep '': expected a separator, e.g. '|'")
    name = ns.name or ns.interactions.name.split(".")[0]
    return load_generic(files, name, ns.seed, Columns(ns.user_col, ns.item_col, ns.time_col),
                        ns.delimiter, fields, ns.multi_sep, bool(ns.merge_fields),
                        ns.user_core or 0, ns.item_core or 0)
