"""Raw Amazon 2014 dumps -> MemorySource, following S3Rec's data/data_process.py:

1. reviews (`reviews_<Cat>_5.json.gz`, one JSON object a line): keep (reviewerID, asin,
   unixReviewTime); like the original, drop reviews whose `overall` is <= 0 (rating_score = 0.0).
2. group by user in order of first appearance; sort each user's items by review time (stable, so
   ties keep file order).
3. user 5-core and item 5-core, repeated until a fixed point (the original's `filter_Kcore` loops
   until `check_Kcore` holds; removals only ever drop interactions outside the final k-core, so any
   removal order reaches the same, unique, maximal k-core - done here with counts per pass).
4. ids from 1: users in order of first appearance, items in order of first appearance walking the
   users' sorted sequences (the original `id_map`).
5. attributes (`meta_<Cat>.json.gz`, one Python literal a line): for each item in meta-file order,
   `brand` first (when the key exists, even if empty - as the original), then every category of
   every category path except the path's first (the top category); ids from 1 in order of first
   appearance; repeats kept (attribute_core = 0). That is `merge_fields` (--merge-fields): the
   paper's one vocabulary. By default the same names make two attribute fields, `categories`
   and `brand`, each with its own ids from 1 in order of first appearance (brand: the key's
   value, also when empty, as above).
"""
from __future__ import annotations

import ast
import gzip
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from s3rec.strict_load import DuplicateKey, unique_keys
from s3rec.data_prep.source import MemorySource
from s3rec.data.fields import DEFAULT_FIELD
from s3rec.data.format import DatasetError

USER_CORE = ITEM_CORE = 5


def gzip_lines(path: Path):
    """(line number, line) of a gzipped text file; DatasetError naming the file if it is not gzip,
    is cut short, or is not UTF-8 (these surface while reading, not at open)."""
    lineno = 0
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                yield lineno, line
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: unreadable at line {lineno + 1} (need gzip-compressed UTF-8 "
                           f"text, one record a line): {e}") from None


def read_reviews(path: Path) -> dict[str, list[tuple[str, int]]]:
    user_seq: dict[str, list[tuple[str, int]]] = {}
    for lineno, line in gzip_lines(path):
        if not line.strip():
            continue
        try:
            r = json.loads(line, object_pairs_hook=unique_keys)
            user, item, t = r["reviewerID"], r["asin"], int(r["unixReviewTime"])
            overall = float(r.get("overall", 1.0))
            if not isinstance(user, str) or not isinstance(item, str):
                raise TypeError(f"reviewerID and asin must be strings, got {user!r}, {item!r}")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DatasetError(f"{path}:{lineno}: malformed review (need JSON with string "
                               f"reviewerID and asin, integer unixReviewTime, numeric overall): "
                               f"{e!r}") from None
        if overall <= 0.0:
            continue
        user_seq.setdefault(user, []).append((item, t))
    for user, seq in user_seq.items():
        seq.sort(key=lambda x: x[1])
    return user_seq


def k_core(user_seq: dict[str, list[str]], user_core: int = USER_CORE,
           item_core: int = ITEM_CORE) -> dict[str, list[str]]:
    """Users with >= user_core items and items with >= item_core users, to the fixed point; the
    users keep their order (the generic source passes its own cores)."""
    while True:
        item_count: dict[str, int] = defaultdict(int)
        for items in user_seq.values():
            for i in items:
                item_count[i] += 1
        if all(len(s) >= user_core for s in user_seq.values()) and \
                all(c >= item_core for c in item_count.values()):
            return user_seq
        user_seq = {u: kept for u, s in user_seq.items() if len(s) >= user_core
                    for kept in [[i for i in s if item_count[i] >= item_core]]}


def unique_dict_keys(tree: ast.Expression) -> ast.Expression:
    """`tree` if no dict literal in it has a key twice (which literal_eval would let the last
    win, silently); parsed once, then evaluated from the tree."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            seen = set()
            for k in node.keys:
                if isinstance(k, ast.Constant):
                    if k.value in seen:
                        raise DuplicateKey(k.value)
                    seen.add(k.value)
    return tree


def read_meta(path: Path, wanted: set[str]) -> dict[str, dict]:
    meta: dict[str, dict] = {}
    for lineno, line in gzip_lines(path):
        if not line.strip():
            continue
        try:
            info = ast.literal_eval(unique_dict_keys(ast.parse(line.strip(), mode="eval")))
            asin = info["asin"]
            if not isinstance(asin, str):
                raise TypeError(f"asin must be a string, got {asin!r}")
        except (ValueError, SyntaxError, KeyError, TypeError, MemoryError, RecursionError) as e:
            raise DatasetError(f"{path}:{lineno}: malformed meta record (need a Python dict "
                               f"literal with a string 'asin'): {e!r}") from None
        if asin in wanted:
            cats = info.get("categories", [])
            if not isinstance(cats, list) or not all(
                    isinstance(c, list) and all(isinstance(x, str) for x in c) for c in cats):
                raise DatasetError(f"{path}:{lineno}: item {asin}: 'categories' must be a list "
                                   f"of lists of strings")
            if "brand" in info and not isinstance(info["brand"], str):
                raise DatasetError(f"{path}:{lineno}: item {asin}: 'brand' must be a string, got "
                                   f"{info['brand']!r}")
            meta[asin] = info
    return meta


def load_amazon(reviews: Path, meta_path: Path, name: str, seed: int,
                merge_fields: bool = False) -> MemorySource:
    user_seq = {u: [i for i, _ in s] for u, s in read_reviews(reviews).items()}
    user_seq = k_core(user_seq)
    if not user_seq:
        raise DatasetError(f"{reviews}: no users left after the {USER_CORE}-core filter")
    item_id: dict[str, int] = {}
    flat, lengths = [], []
    for s in user_seq.values():
        for i in s:
            flat.append(item_id.setdefault(i, len(item_id) + 1))
        lengths.append(len(s))
    meta = read_meta(meta_path, set(item_id))
    missing = [a for a in item_id if a not in meta]
    if missing:
        raise DatasetError(f"{meta_path}: item {missing[0]} has no meta record ({len(missing)} "
                           f"items missing)")
    maps = {"users": list(user_seq), "items": list(item_id)}
    if merge_fields:
        table, names = merged_table(meta, item_id)
        source = MemorySource(name, np.array(flat), np.array(lengths),
                              np.arange(1, len(lengths) + 1), table, seed)
        source.id_maps = {**maps, "attribute_fields": {DEFAULT_FIELD: names}}
        return source
    table, counts, vocab = field_table(meta, item_id)
    source = MemorySource(name, np.array(flat), np.array(lengths),
                          np.arange(1, len(lengths) + 1), table, seed)
    source.field_counts = counts
    source.num_attributes = sum(n for _, n in counts)
    source.id_maps = {**maps, "attribute_fields": vocab}
    return source


def merged_table(meta: dict, item_id: dict[str, int]) -> tuple[list[list[int]], list[str]]:
    """Each item's attribute ids in the paper's one vocabulary (brand, then categories), and
    the vocabulary (entry k: the name of id k + 1; a brand and a category of one name share it)."""
    attr_id: dict[str, int] = {}
    table: list[list[int]] = [[] for _ in range(len(item_id) + 1)]
    for asin, info in meta.items():   # meta-file order decides attribute ids, as in the original
        names = [info["brand"]] if "brand" in info else []
        names += [c for path in info.get("categories", []) for c in path[1:]]
        table[item_id[asin]] = [attr_id.setdefault(a, len(attr_id) + 1) for a in names]
    return table, list(attr_id)


def field_table(meta: dict, item_id: dict[str, int]) -> tuple[list[list[int]], tuple, dict]:
    """Each item's ids in the fields `categories` and `brand` (own ids from 1, in meta-file
    order of first appearance), as global ids (brand's shifted by the count of categories:
    s3rec.data.fields); the fields' (name, count); each field's names by own id (entry k:
    id k + 1)."""
    cat_id: dict[str, int] = {}
    brand_id: dict[str, int] = {}
    cats: list[list[int]] = [[] for _ in range(len(item_id) + 1)]
    brands: list[list[int]] = [[] for _ in range(len(item_id) + 1)]
    for asin, info in meta.items():
        i = item_id[asin]
        cats[i] = [cat_id.setdefault(c, len(cat_id) + 1)
                   for path in info.get("categories", []) for c in path[1:]]
        if "brand" in info:
            brands[i] = [brand_id.setdefault(info["brand"], len(brand_id) + 1)]
    table = [c + [b + len(cat_id) for b in br] for c, br in zip(cats, brands)]
    return (table, (("categories", len(cat_id)), ("brand", len(brand_id))),
            {"categories": list(cat_id), "brand": list(brand_id)})
