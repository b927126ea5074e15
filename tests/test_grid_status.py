"""`s3rec-grid status`: per cell the stage, epoch, ETA, best validation so far, job and log,
from a real fine-tune running under SLURM on the local cluster, whose job log carries the
training's progress lines; `cancel` then stops that job for good."""
from __future__ import annotations

import json
import re
import time

import pytest
import yaml

from s3rec.launch import grid_cli
from s3rec.launch.grid import grid_from_dict
from s3rec.launch.runner import CellState, launch_grid, open_grid
from s3rec.launch.status import format_status
from tests.cluster_fixtures import TINY, cluster, tiny_data  # noqa: F401


def test_status_of_a_cell_from_its_progress_record(tmp_path, tiny_data):  # noqa: F811
    grid = grid_from_dict({"name": "st", "data": [str(tiny_data)], "variants": ["s3rec"],
                           "seeds": [1], "out": str(tmp_path / "runs"), "config": str(TINY)})
    cell = grid.cells()[0]
    cell.pretrain_dir.mkdir(parents=True)
    (cell.pretrain_dir / "run.json").write_text(json.dumps({"status": "done", "epoch": 2}))
    cell.finetune_dir.mkdir(parents=True)
    (cell.finetune_dir / "run.json").write_text(json.dumps({"status": "running", "epoch": 3,
        "progress": {"stage": "finetune", "epoch": 4, "epochs": 200, "step": 2, "steps": 7,
                     "eta_run_s": 3725.0, "best_valid": {"metric": "MRR", "value": 0.31234,
                                                         "epoch": 3}}}))
    registry = {cell.key: {"executor": "slurm", "job_id": "77", "log": "/x/77_0_log.err"}}
    text = format_status([cell], {cell.key: CellState("running", "slurm job 77 RUNNING")},
                         registry)
    header, row = text.splitlines()[:2]
    assert header.split()[:4] == ["cell", "state", "stage", "epoch"]
    # a fine-tune's ETA is to its last epoch: at most, since early stopping may end it sooner
    assert re.search(r"running\s+finetune\s+4/200\s+<=1:02:05\s+MRR 0.3123 \(e3\)\s+slurm 77  "
                     r"/x/77_0_log.err$", row), row
    assert text.splitlines()[-1] == "pending=0  running=1  done=0  failed=0"


@pytest.mark.cluster
def test_status_of_a_running_slurm_cell_its_progress_lines_and_cancel_for_good(
        cluster, tiny_data, tmp_path, capsys):  # noqa: F811
    spec = {"name": "status", "data": [str(tiny_data)], "variants": ["finetune-only"],
            "seeds": [1], "config": str(TINY), "out": str(tmp_path / "runs"),
            "overrides": {"finetune.epochs": 400, "finetune.patience": 400,
                          "logging.every_steps": 1, "logging.progress_every_s": 0},
            "executor": {"kind": "slurm", "timeout_min": 10}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    run = launch_grid(grid_from_dict(spec, source=str(path)))
    try:
        deadline, row = time.time() + 240, ""
        while time.time() < deadline:
            capsys.readouterr()
            grid_cli.main(["status", str(path)])
            lines = capsys.readouterr().out.splitlines()
            row = next((ln for ln in lines if ln.startswith("synthetic")), "")
            if re.search(r"running\s+finetune\s+\d+/400\s+<=\d+:\d\d:\d\d\s+MRR 0\.\d{4} \(e\d+\)",
                         row):
                break
            time.sleep(1)
        else:
            pytest.fail(f"no running fine-tune with an ETA and a best validation in: {row!r}")
        log = re.search(r"(\S+_log\.err)$", row).group(1)
        text = open(log).read()
        assert re.search(r"^\[finetune\] epoch \d+/400 step \d+/\d+ [\d,]+ samples/s  eta epoch "
                         r"\d+:\d\d:\d\d run \d+:\d\d:\d\d$", text, re.M), text[-2000:]
        # cancel stops it for good: scancel's SIGTERM makes the training save, and the job
        # must not requeue itself as after a preemption (SLURM shows both as COMPLETING)
        assert open_grid(run.grid).cancel() == []
        out = open(log.replace("_log.err", "_log.out")).read()
        assert "was cancelled, so it is not requeued" in out, out[-2000:]
        assert "requeueing job" not in out
    finally:
        open_grid(run.grid).cancel()
