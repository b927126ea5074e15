"""Grids of S3Rec runs on this machine or on SLURM, through submitit.

    from s3rec.launch import Grid, load_grid, launch_grid, open_grid
    grid = load_grid("configs/grids/demo.yaml")      # checked before anything is submitted
    run = launch_grid(grid)                           # skips done cells, resumes unfinished ones
    run.wait(); run.records()                         # axes + test metrics of finished cells

Training is run by command (s3rec-pretrain, s3rec-finetune), never imported.
"""
from s3rec.launch.grid import Cell, ExecutorConfig, Grid, GridError, grid_from_dict, load_grid
from s3rec.launch.runner import CellState, GridRun, launch_grid, open_grid

__all__ = ["Cell", "CellState", "ExecutorConfig", "Grid", "GridError", "GridRun", "grid_from_dict",
           "launch_grid", "load_grid", "open_grid"]
