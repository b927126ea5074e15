"""`s3rec-prep verify DATASET`: every shard against the manifest (size, sha256, attributes,
shapes, CSR offsets, id ranges), the shards' user ranges contiguous and complete, totals equal."""
from __future__ import annotations

from pathlib import Path

from s3rec.data.format import (check_id_maps, check_layout, check_shard_content, check_shard_file,
                               read_manifest)


def verify(folder: str | Path) -> str:
    """The summary line if the dataset is sound; DatasetError naming the bad shard otherwise."""
    folder = Path(folder)
    m = read_manifest(folder)
    check_layout(folder, m)
    for i, rec in enumerate(m["shards"]):
        check_shard_file(folder, rec)
        check_shard_content(folder, m, i)
    check_id_maps(folder, m)
    return (f"users={m['num_users']} items={m['num_items']} interactions={m['num_interactions']} "
            f"attributes={m['num_attributes']} shards={len(m['shards'])}")
