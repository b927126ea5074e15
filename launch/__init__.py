"""Grids of S3Rec runs on this machine or on SLURM, through submitit.

    from s3rec.launch import Grid, load_grid, launch_grid, open_grid
    grid = load_grid("configs/grids/demo.yaml")      # checked before anything is submitted
    run = launch_grid(grid)                           # skips done cells, resumes unfinished ones
    run.wait(); run.records()                         # axes + test metrics of finished cells

Training is run by command (s3rec-pretrain, s3rec-finetune), never imported.
"""
import importlib

# Imported on first use: a job's start unpickles its CellsJob, importing this package, before
# submitit installs its USR2 handler; runner.py brings in torch (seconds on a busy machine), and
# a time-limit or preemption signal in that window would kill the job instead of requeueing it.
_EXPORTS = {"Cell": "grid", "ExecutorConfig": "grid", "Grid": "grid", "GridError": "grid",
            "grid_from_dict": "grid", "load_grid": "grid", "CellState": "runner",
            "GridRun": "runner", "launch_grid": "runner", "open_grid": "runner"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"s3rec.launch.{_EXPORTS[name]}"), name)
