"""`s3rec-prep verify DATASET`: every shard against the manifest (size, sha256, attributes,
shapes, CSR offsets, id ranges), the shards' user ranges contiguous and complete, totals equal."""
from __future__ import annotations

from pathlib import Path

from s3rec.data.format import (DatasetError, check_shard_content, check_shard_file, read_manifest,
                               shard_name)


def verify(folder: str | Path) -> str:
    """The summary line if the dataset is sound; DatasetError naming the bad shard otherwise."""
    folder = Path(folder)
    m = read_manifest(folder)
    expect_start = 0
    for i, rec in enumerate(m["shards"]):
        if rec["file"] != shard_name(i):
            raise DatasetError(f"{folder}: manifest shard {i} is {rec['file']}, expected "
                               f"{shard_name(i)}")
        if rec["user_start"] != expect_start or rec["user_end"] < rec["user_start"]:
            raise DatasetError(f"{folder / rec['file']}: user range {rec['user_start']}.."
                               f"{rec['user_end']} does not continue from {expect_start}")
        expect_start = rec["user_end"]
        check_shard_file(folder, rec)
        check_shard_content(folder, m, i)
    if expect_start != m["num_users"]:
        raise DatasetError(f"{folder}: shards cover users 0..{expect_start}, manifest says "
                           f"{m['num_users']} users")
    total = sum(r["num_interactions"] for r in m["shards"])
    if total != m["num_interactions"]:
        raise DatasetError(f"{folder}: shards hold {total} interactions, manifest says "
                           f"{m['num_interactions']}")
    return (f"users={m['num_users']} items={m['num_items']} interactions={m['num_interactions']} "
            f"attributes={m['num_attributes']} shards={len(m['shards'])}")
