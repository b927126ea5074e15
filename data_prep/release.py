"""Reads the S3Rec release format (`<Name>.txt`, `<Name>_item2attributes.json`, optional
`<Name>_sample.txt`) into a MemorySource, with errors that name the file and line or key."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from s3rec.data_prep.source import MemorySource
from s3rec.data.format import NUM_NEGATIVES, DatasetError, load_json

MIN_LENGTH = 3   # leave-one-out needs a train, a validation and a test item
MAX_ITEM_ID = 2**31 - 2   # int32 ids, and mask_id = num_items + 1 must fit too
MAX_USER_ID = 2**63 - 1   # int64


def is_decimal(token: str) -> bool:
    """ASCII digits only (str.isdigit also accepts '²' and other digits int() refuses)."""
    return token.isascii() and token.isdigit()


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text (byte {e.start}): {e.reason}") from None


def release_files(src: Path, name: str, negatives: Path | None) -> dict[str, Path]:
    files = {"sequences": src / f"{name}.txt", "attributes": src / f"{name}_item2attributes.json"}
    for f in files.values():
        if not f.is_file():
            raise DatasetError(f"{f}: not found (release format: {name}.txt and "
                               f"{name}_item2attributes.json in --src)")
    if negatives is not None:
        if not negatives.is_file():
            raise DatasetError(f"{negatives}: --negatives file not found")
        files["negatives"] = negatives
    elif (src / f"{name}_sample.txt").is_file():
        files["negatives"] = src / f"{name}_sample.txt"
    return files


def parse_id(token: str, path: Path, lineno: int, what: str) -> int:
    if is_decimal(token):
        return int(token)
    if token.startswith("-") and is_decimal(token[1:]):
        raise DatasetError(f"{path}:{lineno}: negative {what} id {token!r}")
    raise DatasetError(f"{path}:{lineno}: {what} id {token!r} is not a non-negative integer")


def read_id_lines(path: Path, min_tokens: int, what: str):
    """Yields (lineno, [ints]) for each line `id id id ...`; blank lines only at the end."""
    lines = read_text(path).split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    for lineno, line in enumerate(lines, 1):
        tokens = line.split()
        if len(tokens) < min_tokens:
            raise DatasetError(f"{path}:{lineno}: malformed line {line[:60]!r}: expected {what}")
        ids = [parse_id(t, path, lineno, "user" if i == 0 else "item") for i, t in enumerate(tokens)]
        yield lineno, ids


def read_sequences(path: Path):
    user_ids, lengths, flat = [], [], []
    line_of: dict[int, int] = {}
    for lineno, ids in read_id_lines(path, 1 + MIN_LENGTH, f"`user item item ...` with at least "
                                                           f"{MIN_LENGTH} items"):
        if line_of.setdefault(ids[0], lineno) != lineno:
            raise DatasetError(f"{path}:{lineno}: user {ids[0]} again (first on line "
                               f"{line_of[ids[0]]}); one line per user")
        if min(ids[1:]) < 1:
            raise DatasetError(f"{path}:{lineno}: item id 0; item ids start at 1 (0 is padding)")
        if max(ids[1:]) > MAX_ITEM_ID:
            raise DatasetError(f"{path}:{lineno}: item id {max(ids[1:])} above {MAX_ITEM_ID} "
                               f"(item ids are int32)")
        if ids[0] > MAX_USER_ID:
            raise DatasetError(f"{path}:{lineno}: user id {ids[0]} above {MAX_USER_ID} "
                               f"(user ids are int64)")
        user_ids.append(ids[0])
        lengths.append(len(ids) - 1)
        flat.extend(ids[1:])
    if not user_ids:
        raise DatasetError(f"{path}: no users")
    return np.array(user_ids), np.array(lengths), np.array(flat, dtype=np.int64)


def read_item_attributes(path: Path, num_items: int) -> list[list[int]]:
    raw = load_json(path)     # a key twice is refused, not "last value wins"
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: expected an object {{\"item\": [attribute, ...]}}")
    if len(raw) < num_items:   # checked before a table of num_items rows is made
        raise DatasetError(f"{path}: {len(raw)} item entries, but the sequences use item ids up "
                           f"to {num_items}; every item 1..{num_items} needs one (an empty list "
                           f"is allowed)")
    table: list[list[int] | None] = [None] * (num_items + 1)
    table[0] = []
    seen: dict[int, str] = {}
    for key, attrs in raw.items():
        if not is_decimal(key):
            raise DatasetError(f"{path}: key {key!r} is not an item id")
        if not isinstance(attrs, list):
            raise DatasetError(f"{path}: item {key}: expected a list of attribute ids, got {attrs!r}")
        for a in attrs:
            if not isinstance(a, int) or isinstance(a, bool) or not 1 <= a < 2**31:
                raise DatasetError(f"{path}: item {key}: attribute id {a!r} out of range "
                                   f"(positive integers; 0 is padding)")
        item = int(key)
        if item in seen:
            raise DatasetError(f"{path}: keys {seen[item]!r} and {key!r} are the same item {item}")
        seen[item] = key
        if 1 <= item <= num_items:   # items absent from the sequences are not part of the dataset
            table[item] = attrs
    missing = [i for i, a in enumerate(table) if a is None]
    if missing:
        raise DatasetError(f"{path}: item {missing[0]} has no attribute entry "
                           f"({len(missing)} items missing; every item 1..{num_items} needs one, "
                           f"an empty list is allowed)")
    return table  # type: ignore[return-value]


def read_negatives(path: Path, user_ids: np.ndarray, items: np.ndarray,
                   lengths: np.ndarray) -> np.ndarray:
    """The release rule: per line the user's 99 distinct items, seen in the data, none in the
    user's own sequence (an answer among its own negatives would make its rank ambiguous).
    The format is checked line by line, the rule over all lines at once."""
    num_items = int(items.max())
    rows = []
    for lineno, ids in read_id_lines(path, 1 + NUM_NEGATIVES, f"`user` and {NUM_NEGATIVES} items"):
        if lineno > len(user_ids):
            raise DatasetError(f"{path}:{lineno}: more lines than the {len(user_ids)} users")
        if len(ids) != 1 + NUM_NEGATIVES:
            raise DatasetError(f"{path}:{lineno}: {len(ids) - 1} negatives, expected {NUM_NEGATIVES}")
        if ids[0] != user_ids[lineno - 1]:
            raise DatasetError(f"{path}:{lineno}: user {ids[0]}, but line {lineno} of the sequences "
                               f"is user {user_ids[lineno - 1]} (same order expected)")
        bad = [i for i in ids[1:] if not 1 <= i <= num_items]
        if bad:
            raise DatasetError(f"{path}:{lineno}: negative item {bad[0]} outside 1..{num_items}")
        rows.append(ids[1:])
    if len(rows) != len(user_ids):
        raise DatasetError(f"{path}: {len(rows)} lines, expected one per user ({len(user_ids)})")
    negs = np.array(rows, dtype=np.int64)                              # [U, 99]

    def refuse(hit: np.ndarray, values: np.ndarray, what: str):        # hit, values [U, K]
        if hit.any():
            u, k = np.argwhere(hit)[0]
            raise DatasetError(f"{path}:{u + 1}: " + what.format(item=values[u, k],
                                                                  user=user_ids[u]))

    srt = np.sort(negs, axis=1)
    refuse(srt[:, 1:] == srt[:, :-1], srt[:, 1:],
           f"item {{item}} more than once among the negatives ({NUM_NEGATIVES} distinct items "
           f"expected)")
    seen = np.zeros(num_items + 1, dtype=bool)
    seen[items] = True
    refuse(~seen[negs], negs, "negative item {item} appears in no sequence (negatives are drawn "
                              "from the items of the data)")
    # (user row, item) pairs as one integer: a negative among the pairs of the user's own items
    width = num_items + 1
    own = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths) * width + items
    mine = np.isin(np.arange(len(negs), dtype=np.int64)[:, None] * width + negs, own)
    refuse(mine, negs, "negative item {item} is in user {user}'s own sequence (negatives are "
                       "items the user never interacted with)")
    return negs.astype(np.int32)


def load_release(files: dict[str, Path], name: str, seed: int) -> MemorySource:
    user_ids, lengths, items = read_sequences(files["sequences"])
    num_items = int(items.max())
    attrs = read_item_attributes(files["attributes"], num_items)
    negatives, how = None, ""
    if "negatives" in files:
        negatives = read_negatives(files["negatives"], user_ids, items, lengths)
        how = f"imported: {files['negatives'].name}"
    return MemorySource(name, items, lengths, user_ids, attrs, seed, negatives, how)
