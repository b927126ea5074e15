"""Dataset preparation and reading speed: `python benchmarks/prep.py --json FILE [--data DIR]`.

DIR (or $S3REC_RELEASE_DATA) is a folder holding the S3Rec release of Beauty
(`Beauty/Beauty.txt`, `Beauty/Beauty_item2attributes.json`); without it the Beauty case is
skipped and only the synthetic sets are timed.

Each preparation runs in its own child process (`s3rec-prep ...`); its wall time and peak RSS
(from os.wait4, which covers the child and everything it waited for, so mpiexec's ranks too) are
recorded. Reading is measured in this process, per process: whole-dataset passes of
`Dataset.load_sequences` in batches, and of `UserSequences` item by item.
Targets on a 2-core machine: 10M interactions in <= 180 s with peak < 2 GB; >= 200k sequences/s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RELEASE_DATA_ENV = "S3REC_RELEASE_DATA"
sys.path.insert(0, str(REPO))

from s3rec.data.reader import Dataset, UserSequences  # noqa: E402
from s3rec.atomic_write import write_json_atomic  # noqa: E402


def timed_child(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out}")
    return {"prep_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2)}


def read_speed(path: Path, batch: int = 4096) -> dict:
    ds = Dataset(path)
    ds.load_sequences(0, 1)                        # open + checksum outside the timing
    t0 = time.perf_counter()
    n = 0
    for s in range(0, ds.num_users, batch):
        items, offsets = ds.load_sequences(s, min(s + batch, ds.num_users))
        n += len(offsets) - 1
    batched = n / (time.perf_counter() - t0)
    view = UserSequences(ds)
    m = min(len(view), 300_000)
    t0 = time.perf_counter()
    for k in range(m):
        view[k]
    single = m / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    subprocess.run(["s3rec-prep", "verify", str(path)], check=True, capture_output=True)
    return {"read_batched_seq_per_s": round(batched), "read_user_sequences_seq_per_s": round(single),
            "verify_s": round(time.perf_counter() - t0, 2), "users": ds.num_users,
            "interactions": ds.num_interactions,
            "bytes": sum(s["bytes"] for s in ds.manifest["shards"])}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, type=Path)
    p.add_argument("--data", type=Path, default=os.environ.get(RELEASE_DATA_ENV) or None,
                   help=f"folder holding Beauty/ in the release format (default: "
                        f"${RELEASE_DATA_ENV}; neither: the Beauty case is skipped)")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    p.add_argument("--mpi-ranks", type=int, default=2, help="also time the 10M set under mpiexec "
                                                             "-n N (0: skip)")
    p.add_argument("--sizes", default="1M,10M", help="synthetic sizes (interactions): 1M,10M")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="prep-bench-", dir=args.work))
    cases = []
    if args.data is None:
        print(f"skipping Beauty: no --data and no ${RELEASE_DATA_ENV}")
    elif (args.data / "Beauty" / "Beauty.txt").is_file():
        cases.append(("Beauty", ["release", "--src", str(args.data / "Beauty"), "--name", "Beauty",
                                 "--shards", "4"], 1))
    else:
        print(f"skipping Beauty: {args.data / 'Beauty'} not found")
    for size in args.sizes.split(","):
        users = {"1M": 100_000, "10M": 1_000_000}[size]   # mean length 10
        syn = ["synthetic", "--users", str(users), "--items", "100000", "--attributes", "1000",
               "--shards", "8", "--seed", "1"]
        cases.append((f"synthetic-{size}", syn, 1))
        if size == "10M" and args.mpi_ranks > 1 and shutil.which("mpiexec"):
            cases.append((f"synthetic-{size}-mpi{args.mpi_ranks}", syn, args.mpi_ranks))
    rows = []
    try:
        for name, cmd, ranks in cases:
            out = work / name
            launcher = ["mpiexec", "-n", str(ranks)] if ranks > 1 else []
            row = {"case": name, "ranks": ranks,
                   **timed_child([*launcher, "s3rec-prep", *cmd, "--out", str(out)])}
            row.update(read_speed(out))
            rows.append(row)
            print(f"{name}: {row}", flush=True)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cols = ["case", "ranks", "interactions", "prep_s", "peak_rss_mb", "cpu_s", "bytes", "verify_s",
            "read_batched_seq_per_s", "read_user_sequences_seq_per_s"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    load = os.getloadavg()
    result = {"rows": rows, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                        "loadavg_at_end": [round(x, 2) for x in load]},
              "targets": {"10M_prep_s": 180, "10M_peak_rss_mb": 2048, "read_seq_per_s": 200_000}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.json, result)
    print(f"load average at end: {load}; wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
