"""The shared body of `s3rec-pretrain` and `s3rec-finetune`: arguments, distributed set-up, the
dataset, the model on a DeepSpeed engine, run.json bookkeeping and error reporting.

Exit status: 0 done (or preempted after a checkpoint; run.json says which), 2 a user error
(config, dataset, --init, checkpoint; one line naming the key or file), 1 anything else."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from s3rec import distributed as dist
from s3rec.config import Config, ConfigError, flat_keys, load_config
from s3rec.data.format import DatasetError
from s3rec.engine import checkpoint as ckpt
from s3rec.engine import resume_check, signals
from s3rec.engine.deepspeed_setup import build_ds_config, initialize
from s3rec.runlog import RunJson, error_line

USER_ERRORS = (ConfigError, DatasetError, ckpt.ResumeError, dist.LauncherError)


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
    from s3rec.data.reader import Dataset
    ds = Dataset(args.data)
    run_dir = Path(args.out)
    fingerprint = resume_check.dataset_fingerprint(ds)
    # a run started again resumes: before run.json is rewritten, the checkpoint must be this run's
    resume_check.check_before_start(run_dir / ckpt.CHECKPOINTS, stage, cfg.to_dict(),
                                    info.world_size, fingerprint)
    err = None
    if dist.is_main():
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            why = "exists and is not a folder" if run_dir.exists() else \
                f"cannot be created ({e.strerror}: {e.filename})"
            err = f"--out {run_dir}: {why}; choose another --out"
    # Also the barrier: every rank waits for the folder, and hears of rank 0 failing to make it.
    err = dist.broadcast_object(err)
    if err:
        raise ConfigError(err)
    runjson = RunJson(run_dir, dist.is_main(), stage=stage, config=cfg.to_dict(),
                      data=str(Path(args.data).resolve()), dataset=dataset_info(ds),
                      dataset_fingerprint=fingerprint,
                      protocol=protocol, seed=cfg.seed, world_size=info.world_size,
                      launcher=info.launcher)
    return Setup(cfg, info, run_dir, ds, runjson, fingerprint)


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
        _fail(holder, e)
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:
        from s3rec.model import CheckpointError
        _fail(holder, e)
        if isinstance(e, CheckpointError):
            print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
            return 2
        raise
    finally:
        trainer = holder.get("trainer")
        if trainer is not None:
            trainer.close()


def _fail(holder: dict, e: BaseException) -> None:
    rj = holder.get("runjson")
    if rj is not None:
        rj.finish("failed", error_line(e))


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
