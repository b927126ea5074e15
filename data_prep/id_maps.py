"""`id_maps.json`: the source's own ids behind a dataset's numbers, for a source that numbers them
itself (generic; amazon: reviewer ids, ASINs, category and brand names), so results can be
translated back.

    {"users": [...], "items": [...], "attribute_fields": {field: [...]}}

Entry k of a list is the source's id of number k + 1 (users: seq/user_ids; items: item ids;
attribute_fields: the field's own attribute ids; a merged field's entries are [field, value],
but amazon's merged vocabulary, the paper's, holds plain names: a brand and a category of one
name are one attribute there).
ASCII JSON, so the same data gives the same bytes. The manifest records it as
`"id_maps": {"file", "sha256", "bytes"}`; `s3rec-prep verify` checks it like a shard, and
`s3rec-evaluate --topk` reads it (s3rec.data.format: check_id_maps, read_id_maps).
"""
from __future__ import annotations

import json
from pathlib import Path

from s3rec.atomic_write import write_atomic
from s3rec.data.format import ID_MAPS, sha256_file, write_error


def id_maps_text(maps: dict) -> str:
    return json.dumps(maps, ensure_ascii=True, separators=(",", ":")) + "\n"


def write_id_maps(folder: Path, text: str) -> dict:
    """Writes the file into `folder`; its manifest record."""
    path = folder / ID_MAPS
    try:
        write_atomic(path, text)
    except OSError as e:
        raise write_error(path, e) from None
    return {"file": ID_MAPS, "sha256": sha256_file(path), "bytes": path.stat().st_size}
