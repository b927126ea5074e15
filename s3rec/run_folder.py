"""The run-folder contract: what a training run leaves in RUN (= its --out), what "done" means,
how files in it are written, and who may write it. Training, launch/, analysis/ and the sbatch
scripts (`python3 -m s3rec.run_folder status RUN`, `... done RUN PRODUCT`) all read it here.

    RUN/
      .lock              held (flock) by the run writing RUN, for its whole life; it names the
                         holder (host, pid, SLURM job, start time)
      run.json           the run's record; "checkpoint": the last tag `latest` was set to
      final.pt           pretraining's product; results.json: fine-tuning's (STAGE_PRODUCT)
      checkpoints/latest the tag a restart resumes from; checkpoints/<tag>/ the tags
      events.out.tfevents.*  TensorBoard

A run folder changes as transactions: every file is written under a temporary name and renamed
(readers see the old file or the whole new one), a checkpoint tag exists for a restart only once
`latest` names it, and a folder that holds a run but no readable `latest` is refused, never
started over (only a run that never completed a checkpoint starts again from the beginning).
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
from datetime import datetime, timezone
from pathlib import Path

# How files in a run folder are written: the project's one atomic writer, named here too for
# the run folder's writers and readers.
from s3rec.atomic_write import (WriteError, atomic_path, free_space, let_go,  # noqa: F401
                                write_atomic, write_error, write_json_atomic, write_npy_atomic,
                                writing)

RUN_JSON = "run.json"
RESULTS_JSON = "results.json"
FINAL_MODEL = "final.pt"
# each user's 0-based rank of the test answer under the run's protocol (int64 .npy, index = user
# row of the dataset), beside results.json: what the report's paired per-user test reads
TEST_RANKS = "test_ranks.npy"
# a fine-tune's best validation epoch's weights as a model file (like pretraining's final.pt):
# what s3rec-evaluate reads from a run folder
BEST_MODEL = "best.pt"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
LOCK = ".lock"
EVENTS_GLOB = "events.out.tfevents.*"
# What a finished stage leaves besides run.json's "done" (what the next stage or the report reads)
STAGE_PRODUCT = {"pretrain": FINAL_MODEL, "finetune": RESULTS_JSON}
STATUSES = ("running", "done", "failed", "preempted")


class RunFolderError(RuntimeError):
    """A run folder this run may not write (taken, or holding a run it cannot resume)."""


# ------------------------------------------------------------------ run.json and "done"

def read_run_json(run_dir: Path) -> dict | None:
    """run.json of a run folder, or None if missing, half-written or not a JSON object."""
    try:
        info = json.loads((Path(run_dir) / RUN_JSON).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def run_status(run_dir: Path) -> str:
    """run.json's status (running, done, failed, preempted), "" without a readable run.json."""
    info = read_run_json(run_dir) or {}
    status = info.get("status")
    return status if isinstance(status, str) else ""


def stage_done(run_dir: Path | None, product: str) -> bool:
    """A stage is done when run.json says so and its product (STAGE_PRODUCT[stage]: final.pt,
    results.json) exists. No folder (None: a stage the cell skips) counts as done."""
    if run_dir is None:
        return True
    return run_status(run_dir) == "done" and (Path(run_dir) / product).exists()


# ------------------------------------------------------------------ latest, and starting

def read_name(root: Path, name: str) -> str | None:
    """The tag that root/name (`latest`, `best`) names; None without that entry. An entry that
    is not a file, is empty, or names no tag folder is a RunFolderError naming it."""
    f = Path(root) / name
    if not f.exists() and not f.is_symlink():
        return None
    if not f.is_file():
        raise RunFolderError(f"{f}: a folder (or other non-file) where the file naming the tag "
                             f"to resume from belongs; {_ways_out(Path(root))}")
    try:
        tag = f.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise RunFolderError(f"{f}: unreadable ({e}); {_ways_out(Path(root))}") from None
    if not tag:
        raise RunFolderError(f"{f} is empty; {_ways_out(Path(root))}")
    if "/" in tag or tag in (".", "..") or not (Path(root) / tag).is_dir():
        raise RunFolderError(f"{f} names tag {tag!r}, which is not a folder in {root}; "
                             f"{_ways_out(Path(root))}")
    return tag


def tags(root: Path) -> list[str]:
    """The tag folders in a checkpoints folder, by name."""
    root = Path(root)
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def _ways_out(root: Path) -> str:
    found = tags(root)
    point = (f"point {root / LATEST} at a tag (echo {found[-1]} > {root / LATEST})" if found
             else f"write the name of a tag into {root / LATEST}")
    return f"start a new run with a fresh --out, or {point}"


def prepare_start(run_dir: Path) -> str:
    """Rank 0, holding the lock, before anything is written: what starting in `run_dir` does.
    "resume" (latest names a tag), "fresh" (nothing of a run there), or "over" (a run that never
    completed a checkpoint: its partial tags and events are removed, it starts from the
    beginning). A run that cannot be resumed is a RunFolderError naming what was found."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / CHECKPOINTS
    if read_name(ckpt_dir, LATEST) is not None:
        return "resume"
    info = read_run_json(run_dir)
    found_tags = tags(ckpt_dir)
    products = [p for p in STAGE_PRODUCT.values() if (run_dir / p).exists()]
    if info is None and not found_tags and not products:
        if (run_dir / RUN_JSON).exists():
            raise RunFolderError(f"{run_dir / RUN_JSON}: not a readable run record, and no "
                                 f"{ckpt_dir / LATEST}; start a new run with a fresh --out")
        return "fresh"
    # "checkpoint": null is this program's record of a run that never set `latest` (a record
    # without the key could have had one)
    never_saved = (info is not None and info.get("status") in ("running", "failed")
                   and "checkpoint" in info and info["checkpoint"] is None and not products)
    if never_saved:
        for tag in found_tags:                # partial: no `latest` ever named one
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        for f in run_dir.glob(EVENTS_GLOB):   # the curves start again from step 0
            f.unlink(missing_ok=True)
        return "over"
    what = [f"{RUN_JSON} (status {info.get('status')!r}"
            + (f", last checkpoint {info['checkpoint']}" if info.get("checkpoint") else "") + ")"
            if info is not None else None,
            f"{CHECKPOINTS}/ with tags {', '.join(found_tags)}" if found_tags else None,
            *products]
    raise RunFolderError(f"{run_dir} holds a run ({'; '.join(w for w in what if w)}) but no "
                         f"{ckpt_dir / LATEST}: refusing to start it over; "
                         f"{_ways_out(ckpt_dir)}")


# ------------------------------------------------------------------ the lock

class RunLock:
    """An exclusive kernel lock (flock) on RUN/.lock, held until release() or the process ends:
    a killed holder (kill -9, a node lost, a SLURM requeue) leaves it free, never stale."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        with writing(self.path):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WriteError(f"{self.path}: cannot lock: {e.strerror}") from None
            raise RunFolderError(f"{self.path.parent} is in use by another run "
                                 f"({_holder(self.path)}); wait for it to end, or choose "
                                 f"another --out") from None
        self.fd = fd
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "slurm_job": os.environ.get("SLURM_JOB_ID"),
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        except OSError:
            pass        # the lock holds without its note; a refusal then says "holder unknown"
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        job = f", SLURM job {h['slurm_job']}" if h.get("slurm_job") else ""
        return f"host {h['host']}, pid {h['pid']}{job}, since {h['started']}; {path}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"holder unknown; {path}"


# ------------------------------------------------------------------ command line

def main(argv: list[str] | None = None) -> int:
    """`status RUN`: prints run.json's status (an empty line without one); `done RUN PRODUCT`
    (final.pt, results.json): exit 0 if the stage making it is done. What slurm/common.sh asks."""
    p = argparse.ArgumentParser(prog="python3 -m s3rec.run_folder")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("status").add_argument("run_dir")
    d = sub.add_parser("done")
    d.add_argument("run_dir")
    d.add_argument("product", choices=sorted(STAGE_PRODUCT.values()))
    args = p.parse_args(argv)
    if args.cmd == "status":
        print(run_status(Path(args.run_dir)))
        return 0
    return 0 if stage_done(Path(args.run_dir), args.product) else 1


if __name__ == "__main__":
    sys.exit(main())
