"""`s3rec-grid --demo --out DIR`: the README's one command, end to end on this machine.

Makes a small synthetic dataset (DIR/data/synthetic), runs a small grid into DIR (s3rec and
s3rec-lowrank at ranks 4 and 16, tiny epochs: DIR/synthetic/<variant>/r<rank>/s1/...), then writes
the report (DIR/report) with `s3rec-report` when that command is installed. The layout is that of
configs/grids/demo.yaml (out: runs/demo, its data in runs/demo/data): after `make demo` (DIR =
runs/demo) that grid finds the seed-1 cells done and runs seed 2 only.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from s3rec.launch.grid import Grid, GridError
from s3rec.launch.runner import format_states, launch_grid

DEMO_OVERRIDES = {
    "model.hidden_size": 32, "model.inner_size": 64, "model.max_seq_length": 20,
    "pretrain.epochs": 2, "pretrain.batch_size": 64, "pretrain.save_epochs": [],
    "finetune.epochs": 3, "finetune.batch_size": 64, "finetune.patience": 3,
    "logging.every_steps": 5,
}


def _run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise GridError(f"demo: {' '.join(cmd)} failed")


def make_demo_data(out: Path) -> Path:
    data = out / "data" / "synthetic"
    if not (data / "manifest.json").exists():
        # two attribute fields (cluster, noise), so the demo runs the per-field heads
        _run(["s3rec-prep", "synthetic", "--users", "300", "--items", "120", "--attributes", "24",
              "--noise-attributes", "8", "--out", str(data), "--seed", "7"])
    return data


def demo_grid(out: Path, data: Path, executor: str = "local") -> Grid:
    return Grid(name="demo", data=[str(data)], variants=["s3rec", "s3rec-lowrank"],
                ranks=[4, 16], seeds=[1], overrides=dict(DEMO_OVERRIDES),
                executor={"kind": executor, "array_parallelism": 2, "timeout_min": 30},
                out=str(out), source="demo")


def run_demo(out: str | Path, executor: str = "local") -> int:
    out = Path(out).resolve()
    data = make_demo_data(out)
    grid = demo_grid(out, data, executor)
    run = launch_grid(grid)
    print(f"demo: {len(run.to_run)} cells to run, {len(run.skipped)} already done", flush=True)
    states = run.wait(on_change=lambda s: print(format_states(s), flush=True))
    failed = [k for k, s in states.items() if s.state == "failed"]
    for rec in run.records():
        metrics = {k: v for k, v in rec.items() if k.startswith(("HR@", "NDCG@", "MRR"))}
        rank = "full" if rec["rank"] is None else rec["rank"]      # full heads have no rank
        print(f"{rec['variant']:>14} r={rank} s={rec['seed']}: "
              + " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    if shutil.which("s3rec-report"):
        _run(["s3rec-report", str(out), "--out", str(out / "report")])   # the grid's runs only
    else:
        print("demo: s3rec-report is not installed; no report written")
    if failed:
        print(f"demo: {len(failed)} cells failed: {failed}")
        return 1
    return 0
