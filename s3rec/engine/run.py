"""The shared body of `s3rec-pretrain` and `s3rec-finetune`: arguments, distributed set-up, the
dataset, the model on a DeepSpeed engine, run.json bookkeeping and error reporting.

Exit status: 0 done (or preempted after a checkpoint; run.json says which), 2 a user error
(config, dataset, --init, checkpoint, a run folder taken or not resumable; one line naming the
key or file), 1 anything else (a failed write: one line naming the path and its free space).

Rank 0 holds RUN's lock (s3rec.run_folder.RunLock) from start-up to the end: the ranks of one
run never wait on each other for it, and a second run refused there stops on every rank (the
refusal is broadcast as any start-up error)."""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from s3rec import distributed as dist
from s3rec import run_folder
from s3rec.config import Config, ConfigError, flat_keys, load_config
from s3rec.data.format import DatasetError
from s3rec.engine import checkpoint as ckpt
from s3rec.engine import resume_check, signals
from s3rec.engine.deepspeed_setup import build_ds_config, initialize
from s3rec.runlog import RunJson, error_line

USER_ERRORS = (ConfigError, DatasetError, ckpt.ResumeError, dist.LauncherError,
               run_folder.RunFolderError)
# RUN's lock while this process runs a stage (rank 0), released when the stage ends
_locks: list[run_folder.RunLock] = []


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--data", required=True, help="dataset folder (s3rec-prep output)")
    p.add_argument("--out", required=True, help="run folder; started again, the run resumes")
    p.add_argument("--config", default=None, help="YAML config (defaults < file < key=value)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                   help="passed by the deepspeed launcher")
    p.add_argument("--deepspeed", action="store_true",
                   help="accepted for DeepSpeed compatibility (always on)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", default=None,
                   help="a DeepSpeed JSON; same as deepspeed.config_file=...")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides by dotted path, e.g. pretrain.epochs=2")
    return p


def load_cfg(args) -> Config:
    cfg = load_config(args.config, args.overrides)
    if args.deepspeed_config:
        cfg.deepspeed.config_file = args.deepspeed_config
    return cfg


def dataset_info(ds) -> dict:
    return {"name": ds.name, "num_users": ds.num_users, "num_items": ds.num_items,
            "num_attributes": ds.num_attributes}


@dataclass
class Setup:
    cfg: Config
    info: dist.DistInfo
    run_dir: Path
    ds: object
    runjson: RunJson
    fingerprint: dict          # resume_check.dataset_fingerprint(ds): kept in every checkpoint


def start(stage: str, args, protocol: str | None) -> Setup:
    """Config, process group, dataset, run.json. Raises USER_ERRORS for bad input."""
    signals.install()       # first: a preemption during start-up still gets its checkpoint
    cfg = load_cfg(args)
    info = dist.setup(args.local_rank)
    # The DeepSpeed config's rules (batch divisibility, the file's keys) before RUN is made, so
    # that a refused start leaves no folder; make_engine builds it again and keeps what a
    # config file chose (zero stage, precision) in cfg.
    build_ds_config(copy.deepcopy(cfg), stage, info.world_size, info.device.type)
    from s3rec.data.reader import Dataset
    ds = Dataset(args.data)
    run_dir = Path(args.out)
    fingerprint = resume_check.dataset_fingerprint(ds)
    # Also the barrier: every rank waits for the folder and the lock, and hears of rank 0
    # failing to take them.
    err, how = dist.broadcast_object(_claim(run_dir) if dist.is_main() else None)
    if err:
        raise run_folder.RunFolderError(err)
    if how == "over":
        dist.log_main(f"{run_dir}: its earlier start completed no checkpoint; starting from "
                      f"the beginning")
    # a run started again resumes: before run.json is rewritten, the checkpoint must be this run's
    resume_check.check_before_start(run_dir / ckpt.CHECKPOINTS, stage, cfg.to_dict(),
                                    info.world_size, fingerprint)
    runjson = RunJson(run_dir, dist.is_main(), start_over=how == "over", stage=stage,
                      config=cfg.to_dict(),
                      data=str(Path(args.data).resolve()), dataset=dataset_info(ds),
                      dataset_fingerprint=fingerprint,
                      protocol=protocol, seed=cfg.seed, world_size=info.world_size,
                      launcher=info.launcher)
    return Setup(cfg, info, run_dir, ds, runjson, fingerprint)


def _claim(run_dir: Path) -> tuple[str | None, str | None]:
    """Rank 0: (error, how the run starts: run_folder.prepare_start) after making RUN and taking
    its lock, which stays held (_locks) until the stage ends."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "exists and is not a folder" if run_dir.exists() else \
            f"cannot be created ({e.strerror}: {e.filename})"
        return f"--out {run_dir}: {why}; choose another --out", None
    try:
        lock = run_folder.RunLock(run_dir).acquire()
    except (run_folder.RunFolderError, run_folder.WriteError) as e:
        return str(e), None
    _locks.append(lock)
    try:
        return None, run_folder.prepare_start(run_dir)
    except (run_folder.RunFolderError, run_folder.WriteError) as e:
        return str(e), None


def make_engine(s: Setup, stage: str, model, groups):
    ds_config = build_ds_config(s.cfg, stage, s.info.world_size, s.info.device.type,
                                log=dist.log_main)
    model.to(s.info.device)
    engine = initialize(model, groups, ds_config)
    # the effective zero stage / precision (a config file may have chosen them)
    s.runjson.update(config=s.cfg.to_dict(), deepspeed_config=ds_config)
    return engine


def hparams(s: Setup, stage: str, overrides=(), init: str | None = None) -> dict:
    """The run's HParams: the grid's fixed axes and set-up, plus every key the command line
    overrode (a grid passes each of its axes as one, so any swept key is an hparam), with its
    effective value; fine-tunes name the file they started from (e.g. epoch-10.pt)."""
    cfg = s.cfg
    out = {"stage": stage, "variant": cfg.variant,
           "rank": cfg.model.head_rank if cfg.variant == "s3rec-lowrank" else 0,
           "seed": cfg.seed, "dataset": s.ds.name, "world_size": s.info.world_size,
           "zero_stage": cfg.deepspeed.zero_stage, "precision": cfg.deepspeed.precision}
    flat = flat_keys(cfg.to_dict())
    for text in overrides:
        key = text.split("=", 1)[0].strip()
        if key in flat and key not in out:
            value = flat[key]
            out[key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    if stage == "finetune":
        out["init"] = Path(init).name if init else "none"
    return out


def guarded(prog: str, body, argv) -> int:
    """Run `body(argv) -> status` with run.json/exit-status bookkeeping."""
    holder: dict = {}
    try:
        status = body(argv, holder)
        return 0 if status in ("done", "preempted") else 1
    except USER_ERRORS as e:
        _fail(prog, holder, error_line(e))
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:
        from s3rec.model import CheckpointError
        failed_write = _write_error(holder, e)
        _fail(prog, holder, str(failed_write) if failed_write else error_line(e))
        if failed_write is not None:
            print(f"{prog}: error: {failed_write}", file=sys.stderr, flush=True)
            return 1
        if isinstance(e, CheckpointError):
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
            return 2
        raise
    finally:
        _close(prog, holder)


def _write_error(holder: dict, e: BaseException) -> run_folder.WriteError | None:
    """`e` as the one line of a failed write (naming its file, else the run folder), or None."""
    if isinstance(e, run_folder.WriteError):
        return e
    rj = holder.get("runjson")
    where = getattr(e, "filename", None) or (rj.path.parent if rj is not None else Path("."))
    return run_folder.write_error(Path(where), e)


def _close(prog: str, holder: dict) -> None:
    """The trainer's files, run.json's registration, then RUN's lock."""
    try:
        trainer = holder.get("trainer")
        if trainer is not None:
            with run_folder.writing(trainer.run_dir):
                trainer.close()
    except run_folder.WriteError as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
    finally:
        if holder.get("runjson") is not None:
            holder["runjson"].close()
        while _locks:
            _locks.pop().release()


def _fail(prog: str, holder: dict, line: str) -> None:
    """run.json says failed, with `line`; where even that write fails, stderr says so."""
    rj = holder.get("runjson")
    if rj is None:
        return
    try:
        rj.finish("failed", line)
    except run_folder.WriteError as e:
        print(f"{prog}: error: could not record status 'failed' in {rj.path}: {e}",
              file=sys.stderr, flush=True)


def leave(code: int, argv) -> int:
    """The end of a program run (argv None: started from the command line). A multi-process run
    waits for every rank, then leaves with os._exit, its files closed: tearing down the process
    group or the interpreter, gloo/DeepSpeed threads have been seen to abort a finished rank
    ("terminate called without an active exception", SIGABRT), which launchers then report as a
    failed job. Called from Python (argv given) it only returns the code, and the process group
    stays up for the next call (DeepSpeed caches its groups; a destroyed group breaks it)."""
    if argv is None and dist.get_world_size() > 1:
        if code == 0:
            dist.barrier()
        mpi = sys.modules.get("mpi4py.MPI")       # started by mpirun: let MPI remove its
        if mpi is not None and not mpi.Is_finalized():   # shared-memory segments
            mpi.Finalize()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
