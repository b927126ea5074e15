"""A grid with `axes` and `finetune_from` on the real local two-node SLURM cluster: the folders it
makes, and what a relaunch submits after nothing, an axis value or a finetune_from entry changed."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

from s3rec.launch import grid_cli
from s3rec.launch.grid import load_grid
from s3rec.launch.runner import launch_grid, open_grid
from tests.cluster_fixtures import TINY, cluster, tiny_data  # noqa: F401

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

WAIT_S = 1200      # a guard against a stuck queue (the cluster is shared), not a speed test


def write(path: Path, spec: dict) -> str:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def run_folders(out: Path) -> set[str]:
    """Every folder holding a run.json, relative to `out`."""
    return {str(p.parent.relative_to(out)) for p in out.glob("*/**/run.json")
            if "_grid" not in p.parts and "_submitit" not in p.parts}


def snapshot(folder: Path) -> dict:
    """Every product of a cell (results.json, final.pt, epoch-N.pt): mtime and content hash."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.name in ("results.json", "final.pt") or re.fullmatch(r"epoch-\d+\.pt", p.name):
            out[str(p.relative_to(folder))] = (p.stat().st_mtime_ns,
                                               hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def submissions(out: Path) -> int:
    return len(list((out / "_submitit").glob("*_submission.sh")))


def launch_and_wait(path: str):
    run = launch_grid(load_grid(path))
    states = run.wait(poll_s=1, timeout_s=WAIT_S)
    assert all(s.state == "done" for s in states.values()), states
    return run


def test_axes_and_finetune_from_on_slurm_and_what_relaunches_submit(cluster, tiny_data, tmp_path,
                                                                    capsys):  # noqa: F811
    out = tmp_path / "runs"
    spec = {
        "name": "axes", "data": [str(tiny_data)], "variants": ["s3rec", "finetune-only"],
        "seeds": [1], "config": str(TINY),
        "axes": {"pretrain.lr": [0.001, 0.002]},
        "finetune_from": [1, "final"],
        # epoch 2 kept as well, so that a fine-tune from it can be added later; 3 is the last
        "overrides": {"pretrain.epochs": 3, "pretrain.save_epochs": [2], "finetune.epochs": 2},
        "executor": {"kind": "slurm", "array_parallelism": 2, "timeout_min": 10},
        "out": str(out),
    }
    path = write(tmp_path / "grid.yaml", spec)
    root = out / tiny_data.name
    s3rec = {lr: root / f"s3rec/rfull/pretrain.lr={lr}/s1" for lr in ("0.001", "0.002", "0.003")}
    only = root / "finetune-only/rfull/s1"

    # 1. every cell runs; the folders are exactly these
    run = launch_and_wait(path)
    assert sorted(run.submitted) == sorted(
        [f"{tiny_data.name}/s3rec/rfull/pretrain.lr={lr}/s1" for lr in ("0.001", "0.002")]
        + [f"{tiny_data.name}/finetune-only/rfull/s1"])
    cells = [f"{tiny_data.name}/s3rec/rfull/pretrain.lr={lr}/s1/{stage}"
             for lr in ("0.001", "0.002") for stage in ("pretrain", "finetune-e1", "finetune")]
    assert run_folders(out) == set(cells + [f"{tiny_data.name}/finetune-only/rfull/s1/finetune"])
    for lr in ("0.001", "0.002"):
        cell = s3rec[lr]
        assert sorted(p.name for p in (cell / "pretrain").glob("*.pt")) == \
            ["epoch-1.pt", "epoch-2.pt", "final.pt"]
        pre = json.loads((cell / "pretrain/run.json").read_text())
        assert pre["config"]["pretrain"]["lr"] == float(lr)
        assert pre["config"]["pretrain"]["save_epochs"] == [1, 2]
        assert json.loads((cell / "finetune-e1/run.json").read_text())["init"] == \
            str(cell / "pretrain/epoch-1.pt")
        assert json.loads((cell / "finetune/run.json").read_text())["init"] == \
            str(cell / "pretrain/final.pt")
        for ft in ("finetune-e1", "finetune"):
            assert 0 <= json.loads((cell / ft / "results.json").read_text())["test"]["HR@10"] <= 1
    assert json.loads((only / "finetune/run.json").read_text())["init"] is None
    assert submissions(out) == 1      # one sbatch, an array of the three cells

    # 2. launched again: nothing is submitted, jobs.json is untouched
    registry = out / "_grid/jobs.json"
    before = registry.read_bytes()
    capsys.readouterr()
    assert grid_cli.main([path]) == 0
    assert "0 cells submitted, 3 skipped" in capsys.readouterr().out
    assert registry.read_bytes() == before and submissions(out) == 1

    # 3. one axis value changed (0.002 -> 0.003): only the cell it names runs
    kept = {k: snapshot(d) for k, d in (("0.001", s3rec["0.001"]), ("only", only),
                                        ("0.002", s3rec["0.002"]))}
    jobs = json.loads(before)
    spec["axes"] = {"pretrain.lr": [0.001, 0.003]}
    path = write(tmp_path / "grid.yaml", spec)
    run = launch_and_wait(path)
    assert run.submitted == [f"{tiny_data.name}/s3rec/rfull/pretrain.lr=0.003/s1"]
    assert sorted(run.skipped) == sorted([f"{tiny_data.name}/s3rec/rfull/pretrain.lr=0.001/s1",
                                          f"{tiny_data.name}/finetune-only/rfull/s1"])
    after = json.loads(registry.read_text())
    assert {k: v for k, v in after.items() if k in jobs} == jobs   # the old cells' jobs kept
    assert set(after) - set(jobs) == set(run.submitted)
    assert snapshot(s3rec["0.001"]) == kept["0.001"] and snapshot(only) == kept["only"]
    assert snapshot(s3rec["0.002"]) == kept["0.002"]    # no longer in the grid: left alone
    assert (s3rec["0.003"] / "finetune/results.json").exists()
    assert json.loads((s3rec["0.003"] / "pretrain/run.json").read_text())["config"]["pretrain"][
        "lr"] == 0.003
    assert submissions(out) == 2

    # 4a. finetune_from gains 3, which no pretraining saved (3 is the last epoch, kept as
    # final.pt only; beside `final` it would be refused as the same weights twice): refused
    # before anything is submitted, naming the file and the ways out
    before = registry.read_bytes()
    spec["finetune_from"] = [1, 3]
    path = write(tmp_path / "grid.yaml", spec)
    capsys.readouterr()
    assert grid_cli.main([path]) == 2
    err = capsys.readouterr().err
    assert f"{s3rec['0.001']}/pretrain/epoch-3.pt (cell " in err and "missing" in err
    assert "drop 3 from finetune_from" in err
    assert registry.read_bytes() == before and submissions(out) == 2

    # 4b. finetune_from gains 2, which the pretrainings saved: only the new fine-tunes run
    # (launched a few seconds after 3's wait, the lr=0.003 cell's job may still be ending: its
    # cell is submitted all the same, and not reported failed by that job's result file)
    kept = {lr: snapshot(s3rec[lr]) for lr in ("0.001", "0.003")}
    spec["finetune_from"] = [1, 2, "final"]
    path = write(tmp_path / "grid.yaml", spec)
    run = launch_and_wait(path)
    assert sorted(run.submitted) == sorted(
        [f"{tiny_data.name}/s3rec/rfull/pretrain.lr={lr}/s1" for lr in ("0.001", "0.003")])
    for lr in ("0.001", "0.003"):
        cell = s3rec[lr]
        now = snapshot(cell)
        assert {k: v for k, v in now.items() if not k.startswith("finetune-e2/")} == kept[lr]
        assert "finetune-e2/results.json" in now
        assert json.loads((cell / "pretrain/run.json").read_text())["starts"] == 1
        assert json.loads((cell / "finetune-e2/run.json").read_text())["init"] == \
            str(cell / "pretrain/epoch-2.pt")
    assert run_folders(out) == set(
        cells + [f"{tiny_data.name}/finetune-only/rfull/s1/finetune"]
        + [f"{tiny_data.name}/s3rec/rfull/pretrain.lr={lr}/s1/{stage}" for lr in ("0.001", "0.003")
           for stage in ("pretrain", "finetune-e1", "finetune")]
        + [f"{tiny_data.name}/s3rec/rfull/pretrain.lr={lr}/s1/finetune-e2"
           for lr in ("0.001", "0.003")])

    # 5. status: every cell done
    capsys.readouterr()
    assert grid_cli.main(["status", path]) == 0
    status = capsys.readouterr().out
    assert "done=3" in status and "failed=0" in status
    for cell in open_grid(load_grid(path)).cells:
        line = next(ln for ln in status.splitlines() if ln.startswith(cell.key + " "))
        assert line.split()[1] == "done", line

    # 6. the report: one arm per (variant, axis value, pretraining epoch), each from its folder
    from s3rec.analysis.report import build_report
    report = build_report(out, tmp_path / "report", anatomy=False).read_text()
    arms = set(re.findall(r"^\| ours: ([^|]+?) \|", report, flags=re.M))
    assert arms == {f"s3rec pretrain.lr={lr}{e}" for lr in ("0.001", "0.002", "0.003")
                    for e in (" @e1", "")} | {f"s3rec pretrain.lr={lr} @e2"
                                             for lr in ("0.001", "0.003")} | {"finetune-only"}
    # 7. TensorBoard's HParams tab over the grid: the axis is an hparam of every session, and
    # every fine-tune session carries its test HR@10 and NDCG@10
    from tests.tensorboard_server import hparams_experiment, hparams_sessions, tensorboard
    with tensorboard(out) as url:
        names = {h["name"] for h in hparams_experiment(url)["hparamInfos"]}
        assert {"pretrain.lr", "variant", "seed", "init"} <= names, names
        finetunes = [x for x in hparams_sessions(url) if "/finetune" in x["name"]]
        assert len(finetunes) == 9, [x["name"] for x in finetunes]   # 3 + 2 + 3 + 1
        for x in finetunes:
            tags = {m["name"]["tag"] for m in x["metricValues"]}
            assert {"test/HR@10", "test/NDCG@10"} <= tags, (x["name"], tags)
