"""`s3rec-prep`: release | amazon | generic | synthetic | verify (input formats: docs/data.md).

Run under `mpirun -np K` to write shards on K ranks (shard i on rank i % K); the result is the
same, byte for byte, as a one-process run with the same arguments.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from s3rec.data_prep.mpi import world
from s3rec.data_prep.writer import check_out_folder, log, up_to_date, write_dataset
from s3rec.data.format import DatasetError, sha256_file

DEFAULT_SEED = 12345
PATH_OPTIONS = ("src", "out", "negatives", "reviews", "meta", "interactions", "item_features")


def non_negative(text: str) -> int:
    """--seed: numpy's seed sequences take integers >= 0 only."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{v} is negative; expected an integer >= 0")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="s3rec-prep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", required=True)

    def common(s):
        s.add_argument("--out", required=True, type=Path, help="dataset folder to write")
        s.add_argument("--shards", type=int, default=1, help="number of shards (default 1)")
        s.add_argument("--seed", type=non_negative, default=DEFAULT_SEED,
                       help=f"seed of generated negatives / data (default {DEFAULT_SEED})")

    s = sub.add_parser("release", help="S3Rec release files: NAME.txt, NAME_item2attributes.json")
    s.add_argument("--src", required=True, type=Path)
    s.add_argument("--name", required=True)
    s.add_argument("--negatives", type=Path, default=None,
                   help="a NAME_sample.txt to import (default: --src/NAME_sample.txt if present, "
                        "else generate with the release rule)")
    common(s)
    s = sub.add_parser("amazon", help="raw Amazon 2014 dumps, S3Rec preprocessing")
    s.add_argument("--reviews", required=True, type=Path)
    s.add_argument("--meta", required=True, type=Path)
    s.add_argument("--name", default=None, help="dataset name (default: from the reviews file)")
    s.add_argument("--merge-fields", action="store_true", default=None,   # None: not recorded
                   help="one attribute vocabulary, brand and categories together (the paper's); "
                        "default: two fields, categories and brand")
    common(s)
    s = sub.add_parser("generic", help="your own interactions (CSV, TSV, JSON lines) and item "
                                       "features with any number of fields")
    s.add_argument("--interactions", required=True, type=Path,
                   help="user, item, timestamp a row (.csv, .tsv, .jsonl; a header line names the "
                        "columns)")
    s.add_argument("--item-features", type=Path, default=None,
                   help="an item column and any number of field columns (.csv, .tsv, .jsonl)")
    s.add_argument("--name", default=None, help="dataset name (default: the interactions file's)")
    s.add_argument("--user-col", default="user", help="(default user)")
    s.add_argument("--item-col", default="item", help="in both files (default item)")
    s.add_argument("--time-col", default="timestamp", help="(default timestamp)")
    s.add_argument("--delimiter", default=None,
                   help="delimited text of any name, e.g. ';' or '\\t' (default: from .csv, .tsv)")
    s.add_argument("--fields", default=None,
                   help="comma-separated feature columns to use (default: all but the item)")
    s.add_argument("--multi-sep", default="|",
                   help="separates several values in one delimited cell (default |)")
    s.add_argument("--merge-fields", action="store_true", default=None,   # None: not recorded
                   help="one attribute vocabulary, the fields' ids stacked")
    s.add_argument("--user-core", type=non_negative, default=None,
                   help="keep users with >= N interactions, repeated with --item-core to the "
                        "fixed point (default: no filter)")
    s.add_argument("--item-core", type=non_negative, default=None,
                   help="keep items with >= N interactions (default: no filter)")
    common(s)
    s = sub.add_parser("synthetic", help="seeded data with planted cluster structure (streamed)")
    s.add_argument("--users", required=True, type=int)
    s.add_argument("--items", required=True, type=int)
    s.add_argument("--attributes", required=True, type=int)
    s.add_argument("--clusters", type=int, default=32, help="latent item clusters (default 32)")
    s.add_argument("--mean-length", type=float, default=10.0, help="mean sequence length (>= 5)")
    s.add_argument("--max-length", type=int, default=200, help="longest sequence")
    s.add_argument("--noise-attributes", type=int, default=None,   # None: not in the manifest
                   help="> 0: a second attribute field `noise` of this many uniform ids (the "
                        "first, tied to the clusters, is then named `cluster`)")
    common(s)
    s = sub.add_parser("verify", help="check every shard against the manifest")
    s.add_argument("dataset", type=Path)
    return p


def canonical(ns: argparse.Namespace) -> tuple[dict, str]:
    """(args that decide the content, the command line recorded). Paths are left out of `args`
    (the sources' checksums stand for them) and --out is not recorded, so the same data written to
    two folders is the same bytes."""
    opts = {k: v for k, v in vars(ns).items() if v is not None}
    args = {k: v for k, v in opts.items() if k not in PATH_OPTIONS}
    parts = ["s3rec-prep", ns.verb]
    for k, v in opts.items():
        if k not in ("verb", "out"):
            parts += [f"--{k.replace('_', '-')}", str(Path(v).resolve()) if k in PATH_OPTIONS else str(v)]
    return args, " ".join(parts + ["--out", "DATASET"])


def input_files(ns) -> dict[str, Path]:
    if ns.verb == "release":
        from s3rec.data_prep.release import release_files
        return release_files(ns.src, ns.name, ns.negatives)
    if ns.verb == "amazon":
        for f in (ns.reviews, ns.meta):
            if not f.is_file():
                raise DatasetError(f"{f}: not found")
        return {"reviews": ns.reviews, "meta": ns.meta}
    if ns.verb == "generic":
        from s3rec.data_prep.generic import generic_files
        return generic_files(ns.interactions, ns.item_features)
    return {}


def make_source(ns, files: dict[str, Path]):
    if ns.verb == "release":
        from s3rec.data_prep.release import load_release
        return load_release(files, ns.name, ns.seed)
    if ns.verb == "amazon":
        from s3rec.data_prep.amazon import load_amazon
        name = ns.name or ns.reviews.name.split(".")[0].removeprefix("reviews_").removesuffix("_5")
        return load_amazon(ns.reviews, ns.meta, name, ns.seed, bool(ns.merge_fields))
    if ns.verb == "generic":
        from s3rec.data_prep.generic import source_from_args
        return source_from_args(ns, files)
    from s3rec.data_prep.synthetic import SyntheticSource
    return SyntheticSource(ns.users, ns.items, ns.attributes, ns.seed, ns.clusters,
                           ns.mean_length, ns.max_length, ns.noise_attributes or 0)


def prepare(ns) -> None:
    comm = world()
    args, command = canonical(ns)
    files = input_files(ns)
    # Checksums of the inputs decide "up to date" together with the arguments; rank 0 decides.
    # keyed by role: two inputs may share a file name (reviews/Beauty.json.gz, meta/Beauty.json.gz)
    sources = {role: sha256_file(f) for role, f in files.items()} if comm.rank == 0 else None
    sources = comm.bcast(sources)
    reason = up_to_date(ns.out, args, sources) if comm.rank == 0 else None
    reason = comm.bcast(reason)
    if reason is None:
        log(comm, f"up to date: {ns.out}")
        return
    check_out_folder(ns.out)
    source = make_source(ns, files)   # parse errors happen here, before anything is written
    m = write_dataset(source, ns.out, ns.shards, ns.seed, args, sources, command, comm)
    log(comm, f"wrote {ns.out}: users={m['num_users']} items={m['num_items']} "
              f"interactions={m['num_interactions']} attributes={m['num_attributes']} "
              f"shards={len(m['shards'])} (ranks={comm.size}; {reason})")


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        if ns.verb == "verify":
            from s3rec.data_prep.verify import verify
            print(verify(ns.dataset))
        else:
            prepare(ns)
    except (DatasetError, OSError) as e:
        print(f"s3rec-prep {ns.verb}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
