"""Writes a Source as a dataset folder: shards on all ranks, manifest last, all-or-nothing.

Layout of a run writing DATASET:
  DATASET.partial/            built here (rank 0 creates it fresh; every rank writes its shards,
                              shard i on rank i % K, each to a temporary name then renamed)
  DATASET.partial/manifest.json   written by rank 0 once every rank reported success
  DATASET                     the finished folder is renamed into place (an old dataset is moved
                              aside first, then deleted); on any failure the partial folder goes.

Space: rank 0 refuses to start when the file system of DATASET has less free space than
`needed_bytes` (an upper bound: every array at the bytes its largest value needs,
format.shard_bytes_bound). A disk that
fills up anyway (another process writing) fails the write of a shard or of the manifest with one
line naming the file and the free space left (format.write_error), and the partial folder goes.
"""
from __future__ import annotations

import json
import os
import shutil
import traceback
from pathlib import Path

from s3rec.atomic_write import write_atomic
from s3rec.data.format import check_id_maps
from s3rec.data_prep.id_maps import id_maps_text, write_id_maps
from s3rec.data_prep.mpi import Serial
from s3rec.data_prep.negatives import BLOCK
from s3rec.data_prep.source import Source
from s3rec.data.fields import split_global
from s3rec.data.format import (FORMAT_VERSION, MANIFEST, NUM_NEGATIVES, DatasetError, ShardWriter,
                               check_shard_file, free_bytes, read_manifest, sha256_file,
                               shard_bounds, shard_bytes_bound, shard_name, write_error)


def partial_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial")


def up_to_date(out: Path, args: dict, sources: dict) -> str | None:
    """None when `out` holds a complete dataset made from the same inputs and arguments (shards
    present with their recorded sizes and checksums), else the reason to (re)build."""
    if not (out / MANIFEST).exists():
        return "no dataset yet"
    try:
        m = read_manifest(out)
    except DatasetError as e:
        return str(e)
    if m["format_version"] != FORMAT_VERSION:
        # readable, but made by older code: e.g. Amazon's one merged vocabulary under the
        # arguments that now ask for two fields
        return f"format version {m['format_version']}, this code writes {FORMAT_VERSION}"
    if m.get("args") != args:
        return "arguments changed"
    if m.get("sources") != sources:
        return "source files changed"
    try:
        for rec in m["shards"]:
            check_shard_file(out, rec)
        check_id_maps(out, m)
    except DatasetError as e:
        return str(e)
    return None


def write_shard(source: Source, folder: Path, index: int, num_shards: int, start: int, end: int,
                attrs: dict) -> dict:
    name = shard_name(index)
    tmp = folder / f".{name}.tmp"
    shard_attrs = dict(attrs, user_start=start, user_end=end, shard_index=index,
                       num_shards=num_shards)
    layout = source.attribute_layout()
    w = ShardWriter(tmp, shard_attrs,
                    [(f.name, *csr) for f, csr in zip(layout, split_global(
                        source.attr_values, source.attr_offsets, layout))])
    try:
        for b in range(start // BLOCK, (end - 1) // BLOCK + 1):
            lo, hi = max(start, b * BLOCK) - b * BLOCK, min(end, (b + 1) * BLOCK) - b * BLOCK
            blk = source.block(b).rows(lo, hi)
            w.add_users(blk.items, blk.lengths, blk.user_ids, blk.negatives)
        w.close()
    except BaseException:
        w.abort()
        raise
    os.replace(tmp, folder / name)
    return {"file": name, "user_start": start, "user_end": end, "num_users": end - start,
            "num_interactions": w.num_interactions, "sha256": sha256_file(folder / name),
            "bytes": (folder / name).stat().st_size}


def needed_bytes(source: Source, num_shards: int) -> int:
    """Upper bound of the bytes the dataset will take: its shards (shard_bytes_bound is affine in
    the counts, so how the interactions fall among the shards does not change the sum) and the
    manifest (under 1 KiB a shard)."""
    total = source.num_interactions_bound()
    shards = sum(shard_bytes_bound(end - start, -(-total * (end - start) // source.num_users),
                                   source.num_items, source.num_attributes,
                                   len(source.attr_values), len(source.attribute_layout()))
                 for start, end in shard_bounds(source.num_users, num_shards))
    return shards + (num_shards + 4) * 1024


def check_free_space(out: Path, source: Source, num_shards: int, extra: int = 0) -> None:
    """Refuse before writing when the file system of `out` cannot hold the dataset (and `extra`
    bytes of other files)."""
    need, free = needed_bytes(source, num_shards) + extra, free_bytes(out)
    if need > free:
        raise DatasetError(f"{out}: not enough free space: the dataset needs up to {need} bytes "
                           f"({need / 2**20:.1f} MiB), {free} bytes ({free / 2**20:.1f} MiB) are "
                           f"free there")


def write_dataset(source: Source, out: Path, num_shards: int, seed: int, args: dict,
                  sources: dict, command: str, comm=None) -> dict:
    comm = comm or Serial()
    out = Path(out)
    tmp_dir = partial_dir(out)
    bounds = shard_bounds(source.num_users, num_shards)
    attrs = {"format_version": FORMAT_VERSION, "num_users": source.num_users,
             "num_items": source.num_items, "num_attributes": source.num_attributes,
             "seed": seed, "negatives_source": source.negatives_source, "command": command,
             "sources": sources}
    setup_err, maps_text = "", ""
    if comm.rank == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)   # leftovers of a killed run
        maps_text = id_maps_text(source.id_maps) if source.id_maps else ""
        try:
            check_free_space(out, source, num_shards, len(maps_text))
            tmp_dir.mkdir(parents=True)
        except DatasetError as e:
            setup_err = str(e)
        except OSError as e:   # e.g. a parent of --out is a file
            setup_err = f"{out}: cannot create {tmp_dir} ({e.strerror}); choose another --out"
    # Also the barrier: no rank writes before the folder exists, and none waits on a failed rank 0.
    setup_err = comm.bcast(setup_err)
    if setup_err:
        raise DatasetError(setup_err)
    records, err = [], ""
    try:
        for i in range(comm.rank, num_shards, comm.size):
            records.append(write_shard(source, tmp_dir, i, num_shards, *bounds[i], attrs))
    except Exception as e:  # reported to every rank below, then raised
        err = str(e) if isinstance(e, DatasetError) else traceback.format_exc()
    reports = comm.allgather((not err, err, records))
    errors = [f"rank {r}: {e}" if comm.size > 1 else e for r, (ok, e, _) in enumerate(reports) if not ok]
    manifest, final_err = None, ""
    if comm.rank == 0:
        try:
            if not errors:
                manifest = _finish(source, tmp_dir, out, seed, args, sources, command,
                                   [rec for _, _, recs in reports for rec in recs], maps_text)
        except DatasetError as e:
            final_err = str(e)
        except Exception as e:   # the other ranks must hear of it, not wait forever
            final_err = f"rank 0 finishing {out}: {e}"
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)   # gone after success (renamed) or failure
    manifest, final_err = comm.bcast((manifest, final_err))
    if errors or final_err:
        raise DatasetError("; ".join(errors + ([final_err] if final_err else [])))
    return manifest


def field_records(source: Source) -> list[dict]:
    """The manifest's attribute_fields: name, count and item-attribute pairs of each field."""
    layout = source.attribute_layout()
    csrs = split_global(source.attr_values, source.attr_offsets, layout)
    return [{"name": f.name, "num_attributes": f.num_attributes, "num_pairs": len(values)}
            for f, (values, _) in zip(layout, csrs)]


def _finish(source: Source, tmp_dir: Path, out: Path, seed: int, args: dict, sources: dict,
            command: str, records: list[dict], maps_text: str = "") -> dict:
    """Rank 0, once every shard is written: the id maps if any, the manifest (last file), then
    the folder swap."""
    shards = sorted(records, key=lambda r: r["file"])
    manifest = {"format_version": FORMAT_VERSION, "name": source.name,
                "num_users": source.num_users, "num_items": source.num_items,
                "num_interactions": sum(s["num_interactions"] for s in shards),
                "num_attributes": source.num_attributes,
                "attribute_fields": field_records(source),
                "num_negatives": NUM_NEGATIVES,
                "seed": seed, "negatives_source": source.negatives_source,
                "sources": sources, "command": command, "args": args, "shards": shards}
    if maps_text:
        manifest["id_maps"] = write_id_maps(tmp_dir, maps_text)
    try:
        write_atomic(tmp_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    except OSError as e:
        raise write_error(tmp_dir / MANIFEST, e) from None
    _swap_into_place(tmp_dir, out)
    return manifest


def _swap_into_place(tmp_dir: Path, out: Path) -> None:
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            os.replace(out, old)
    os.replace(tmp_dir, out)
    shutil.rmtree(old, ignore_errors=True)


def check_out_folder(out: Path) -> None:
    """Refuse to replace a folder that is not a dataset (it could be anything of the user's)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).exists())):
        raise DatasetError(f"{out}: exists and is not a dataset folder; choose another --out")


def log(comm, msg: str) -> None:
    if comm.rank == 0:
        print(msg, flush=True)
