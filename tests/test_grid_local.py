"""The README's main command, `s3rec-grid --demo`, end to end with the local executor."""
from __future__ import annotations

import json
import shutil

import pytest

from launch import grid_cli
from launch.demo import demo_grid
from launch.runner import launch_grid

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


def test_demo_end_to_end_and_rerun_is_a_no_op(tmp_path):
    out = tmp_path / "demo"
    assert grid_cli.main(["--demo", "--out", str(out)]) == 0
    grid = demo_grid(out, out / "data" / "synthetic")
    cells = grid.cells()
    assert [c.key for c in cells] == ["synthetic/s3rec/rfull/s1", "synthetic/s3rec-lowrank/r4/s1",
                                      "synthetic/s3rec-lowrank/r16/s1"]
    for c in cells:
        assert c.folder == out / "runs" / "demo" / c.key
        res = json.loads((c.finetune_dir / "results.json").read_text())
        assert res["protocol"] == "sampled-99" and 0 <= res["test"]["HR@10"] <= 1
        pre = json.loads((c.pretrain_dir / "run.json").read_text())
        assert pre["status"] == "done" and pre["config"]["variant"] == c.variant
        if c.rank is not None:
            assert pre["config"]["model"]["head_rank"] == c.rank
    if shutil.which("s3rec-report"):
        assert (out / "report" / "report.md").exists()
    # Launched again: nothing to run.
    again = launch_grid(grid)
    assert again.to_run == [] and len(again.skipped) == 3
    assert len(again.records()) == 3
