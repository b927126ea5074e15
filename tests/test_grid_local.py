"""The README's main command, `s3rec-grid --demo`, end to end with the local executor."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from s3rec.launch import grid_cli
from s3rec.launch.demo import demo_grid
from s3rec.launch.grid import GridError
from s3rec.launch.runner import launch_grid
from tests.tensorboard_server import hparams_experiment, hparams_sessions, tensorboard

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


def test_demo_end_to_end_and_rerun_is_a_no_op(tmp_path, capsys):
    out = tmp_path / "demo"
    assert grid_cli.main(["--demo", "--out", str(out)]) == 0
    grid = demo_grid(out, out / "data" / "synthetic")
    cells = grid.cells()
    assert [c.key for c in cells] == ["synthetic/s3rec/rfull/s1", "synthetic/s3rec-lowrank/r4/s1",
                                      "synthetic/s3rec-lowrank/r16/s1"]
    for c in cells:
        assert c.folder == out / c.key
        res = json.loads((c.finetune_dir / "results.json").read_text())
        assert res["protocol"] == "sampled-99" and 0 <= res["test"]["HR@10"] <= 1
        pre = json.loads((c.pretrain_dir / "run.json").read_text())
        assert pre["status"] == "done" and pre["config"]["variant"] == c.variant
        if c.rank is not None:
            assert pre["config"]["model"]["head_rank"] == c.rank
    if shutil.which("s3rec-report"):
        assert (out / "report" / "report.md").exists()
    # TensorBoard's HParams tab over the grid, and over one cell: every axis is an hparam, and
    # every fine-tune session carries its test metrics
    for logdir in (out, out / "synthetic" / "s3rec-lowrank"):
        with tensorboard(logdir) as url:
            names = {h["name"] for h in hparams_experiment(url)["hparamInfos"]}
            assert {"dataset", "variant", "rank", "seed", "stage", "init",
                    "model.hidden_size", "pretrain.epochs"} <= names, names
            sessions = hparams_sessions(url)
            finetunes = [x for x in sessions if x["name"].endswith("finetune")]
            assert len(finetunes) == (3 if logdir == out else 2)
            for x in finetunes:
                tags = {m["name"]["tag"] for m in x["metricValues"]}
                assert {"test/HR@10", "test/NDCG@10", "valid/HR@10"} <= tags, tags
    # Launched again: nothing to run.
    again = launch_grid(grid)
    assert again.to_run == [] and len(again.skipped) == 3
    assert len(again.records()) == 3
    # Settings that change no result may differ; one that does stops the launch, naming it.
    grid.overrides["logging.every_steps"] = 2
    assert launch_grid(grid).to_run == []
    for key, value in (("model.inner_size", 32), ("pretrain.epochs", 3)):
        changed = demo_grid(out, out / "data" / "synthetic")
        changed.overrides[key] = value
        with pytest.raises(GridError, match=rf"synthetic/s3rec/rfull/s1/pretrain/run.json .*"
                                            rf"the done pretrain ran with '{key}'="):
            launch_grid(changed)
    # --dry-run says so too, from the grid file, before any launch is tried
    from s3rec.launch.demo import DEMO_OVERRIDES
    grid_yaml = out / "changed.yaml"
    grid_yaml.write_text(json.dumps({
        "name": "demo", "data": [str(out / "data" / "synthetic")],
        "variants": ["s3rec", "s3rec-lowrank"], "ranks": [4, 16], "seeds": [1],
        "overrides": {**DEMO_OVERRIDES, "model.inner_size": 32},
        "executor": {"kind": "local"}, "out": str(out)}))
    assert grid_cli.main([str(grid_yaml), "--dry-run"]) == 2
    assert "ran with 'model.inner_size'=64, the grid now gives 32" in capsys.readouterr().err
    # An unfinished fine-tune (as if killed): its own section is checked, the pretraining's not.
    rj = out / "synthetic/s3rec/rfull/s1/finetune/run.json"
    rj.write_text(json.dumps({**json.loads(rj.read_text()), "status": "running"}))
    changed = demo_grid(out, out / "data" / "synthetic")
    changed.overrides["finetune.batch_size"] = 32
    with pytest.raises(GridError, match=r"s1/finetune/run.json .*the unfinished finetune ran with "
                                        r"'finetune.batch_size'=64, the grid now gives 32"):
        launch_grid(changed)
    # The dataset prepared again with another seed: the cells were trained on the old one.
    data = out / "data" / "synthetic"
    assert subprocess.run(["s3rec-prep", "synthetic", "--users", "300", "--items", "120",
                           "--attributes", "24", "--out", str(data), "--seed", "8"]).returncode == 0
    with pytest.raises(GridError, match=r"run on another version of .*synthetic \(name: .*; prepare it as it was"):
        launch_grid(demo_grid(out, data))
