"""Grids on the real local SLURM cluster through submitit, with the real training commands."""
from __future__ import annotations

import shutil
import subprocess
import threading
import time

import pytest
import torch
import yaml
from submitit.core.utils import JobPaths

from s3rec.launch import grid_cli
from s3rec.launch.grid import Grid
from s3rec.launch.runner import launch_grid, open_grid
from tests.cluster_fixtures import (TINY, cluster, final_metrics, local_run,  # noqa: F401
                                    debug_grace_time, preempt_both_nodes, seconds_per_epoch,
                                    tiny_data, wait_for_text)

pytestmark = pytest.mark.cluster


def make_grid(tmp_path, data, **changes) -> dict:
    spec = dict(name="g6", data=[str(data)], variants=["s3rec", "s3rec-lowrank"], ranks=[4, 8],
                seeds=[1, 2], config=str(TINY),
                overrides={"pretrain.epochs": 1, "finetune.epochs": 2},
                executor={"kind": "slurm", "array_parallelism": 2, "timeout_min": 10},
                out=str(tmp_path / "runs"))
    spec.update(changes)
    return spec


def write_yaml(tmp_path, spec) -> str:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_grid_of_six_cells_runs_once_and_reruns_only_missing(cluster, tiny_data, tmp_path, capsys):
    spec = make_grid(tmp_path, tiny_data)
    grid = Grid(**spec)
    run = launch_grid(grid)
    assert len(run.submitted) == 6 and not run.skipped
    sub = list((tmp_path / "runs" / "_submitit").glob("*_submission.sh"))
    assert len(sub) == 1 and "#SBATCH --array=0-5%2" in sub[0].read_text()

    most_running = 0

    def watch(states):
        nonlocal most_running
        most_running = max(most_running, sum(s.state == "running" for s in states.values()))

    t0 = time.time()
    states = run.wait(poll_s=1, timeout_s=300, on_change=watch)
    first = time.time() - t0
    assert all(s.state == "done" for s in states.values()), states
    assert 1 <= most_running <= 2
    records = run.records()
    assert len(records) == 6
    assert {(r["variant"], r["rank"], r["seed"]) for r in records} == {
        ("s3rec", None, 1), ("s3rec", None, 2), ("s3rec-lowrank", 4, 1), ("s3rec-lowrank", 4, 2),
        ("s3rec-lowrank", 8, 1), ("s3rec-lowrank", 8, 2)}
    assert all(0 <= r["HR@10"] <= 1 and r["protocol"] == "sampled-99" for r in records)

    # Second launch: everything is done, nothing is submitted.
    again = launch_grid(Grid(**spec))
    assert again.submitted == [] and len(again.skipped) == 6
    assert len(list((tmp_path / "runs" / "_submitit").glob("*_submission.sh"))) == 1

    # One cell's folder deleted: the third launch (the CLI) reruns exactly that cell.
    gone = run.cells[3]
    shutil.rmtree(gone.folder)
    path = write_yaml(tmp_path, spec)
    before = dict(run.registry)
    capsys.readouterr()
    assert grid_cli.main([path]) == 0
    out = capsys.readouterr().out
    assert "1 cells submitted, 5 skipped" in out
    after = open_grid(Grid(**spec)).registry
    changed = [k for k in after if after[k]["job_id"] != before[k]["job_id"]]
    assert changed == [gone.key]
    assert gone.is_done()
    assert grid_cli.main(["status", path]) == 0
    assert "done=6" in capsys.readouterr().out
    print(f"6 cells, parallelism 2: {first:.0f} s")


def test_cancelled_job_is_reported_failed_quickly(cluster, tiny_data, tmp_path, capsys):
    spec = make_grid(tmp_path, tiny_data, name="cancel", variants=["s3rec"], ranks=[], seeds=[1],
                     overrides={"pretrain.epochs": 200, "finetune.epochs": 2})
    run = launch_grid(Grid(**spec))
    key = run.submitted[0]
    job_id = run.registry[key]["job_id"]
    t0 = time.time()
    while run.states()[key].state != "running":
        assert time.time() - t0 < 60, run.states()[key]
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], env=cluster, check=True)
    t1 = time.time()
    states = run.wait(poll_s=1, timeout_s=60)
    assert states[key].state == "failed", states[key]
    assert time.time() - t1 < 60
    assert job_id in states[key].detail
    # and a fresh process sees the same, through the CLI
    path = write_yaml(tmp_path, spec)
    capsys.readouterr()
    assert grid_cli.main(["status", path]) == 1
    assert "failed=1" in capsys.readouterr().out


def one_long_cell(tmp_path, data, name, seconds, **executor):
    """A grid of one cell whose pretraining takes ~`seconds` here and now, launched on SLURM;
    the same cell runs uninterrupted meanwhile as plain processes (`reference`, into ref/)."""
    per_epoch = seconds_per_epoch(data, tmp_path)
    epochs = min(3000, max(40, int(seconds / per_epoch) + 1))   # capped: see test_sbatch
    spec = make_grid(tmp_path, data, name=name, variants=["s3rec"], ranks=[], seeds=[1],
                     overrides={"pretrain.epochs": epochs, "pretrain.save_epochs": [],
                                "finetune.epochs": 2},
                     executor={"kind": "slurm", "array_parallelism": 1, "timeout_min": 10,
                               **executor})
    run = launch_grid(Grid(**spec))
    cell = run.cells[0]
    entry = run.registry[cell.key]
    paths = JobPaths(entry["folder"], job_id=entry["job_id"], task_id=0)
    reference = threading.Thread(target=local_run, args=(data, tmp_path / "ref"), daemon=True,
                                 kwargs=dict(pretrain_args=cell.override_args(),
                                             finetune_args=cell.override_args()))
    reference.start()
    return run, cell, entry["job_id"], paths, reference


def assert_same_as_reference(cell, ref) -> None:
    """Bit-identical pretrained weights, equal fine-tuned test metrics."""
    a = torch.load(cell.pretrain_dir / "final.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(ref / "pretrain" / "final.pt", map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    mine, theirs = final_metrics(cell.finetune_dir), final_metrics(ref / "finetune")
    assert mine == pytest.approx(theirs, abs=1e-9)


@pytest.mark.slow
def test_grid_cell_past_its_time_limit_requeues_and_resumes(cluster, tiny_data, tmp_path):
    """submitit's USR2 (signal_delay_s before timeout_min) reaches the training, which saves;
    CellJob.checkpoint requeues the cell, whose training resumes from latest and ends exactly as
    an uninterrupted run of the same cell. (As in test_sbatch: sized to need >= 42 s, and the time
    limit is lifted after the first requeue.)"""
    run, cell, job_id, paths, reference = one_long_cell(tmp_path, tiny_data, "timeout", 60,
                                                        timeout_min=1, signal_delay_s=50)
    t0 = time.time()
    log = paths.stdout          # submitit's INFO lines ("Requeued job ...") go to stdout
    try:
        # Lift the limit once the training saved a checkpoint on the signal and the job requeued.
        while not ("Requeued job" in (log.read_text() if log.exists() else "")
                   and "checkpoint saved at step" in
                   (paths.stderr.read_text() if paths.stderr.exists() else "")):
            st = run.states()[cell.key]
            assert st.state != "done" and time.time() - t0 < 150, f"no time-limit requeue: {st}"
            time.sleep(1)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=30"],
                       env=cluster, check=True)
        states = run.wait(poll_s=1, timeout_s=600)
        reference.join(timeout=600)
    finally:
        run.cancel()
    assert states[cell.key].state == "done", states[cell.key]
    text = log.read_text() + paths.stderr.read_text()
    assert "Caught signal SIGUSR2" in text and "resumed from" in text
    assert_same_as_reference(cell, tmp_path / "ref")
    print(f"grid time-limit cell: {time.time() - t0:.0f} s")


@pytest.mark.slow
@pytest.mark.parametrize("grace_s", [60, 0])
def test_grid_cell_preempted_by_slurm_requeues_and_resumes(cluster, tiny_data, tmp_path, grace_s):
    """SLURM's own preemption (PreemptMode=REQUEUE, no user signal): SIGTERM reaches the training
    child, which saves and exits, while submitit only logs it. With a GraceTime the cell's job
    requeues itself (before, the cell failed: "stopped with run.json status 'preempted'");
    without one SLURM requeues it and refuses the job's own requeue, which then leaves without
    a result (before the refusal was handled: a traceback and an error result). The training
    resumes from latest and ends exactly as an uninterrupted run of the same cell."""
    before = debug_grace_time(cluster)
    try:
        debug_grace_time(cluster, grace_s)
        run, cell, job_id, paths, reference = one_long_cell(tmp_path, tiny_data, "preempt", 30)
        try:
            wait_for_text(paths.stderr, r"\[pretrain\] epoch 3/", 120, f"job {job_id}")
            preempt_both_nodes(cluster, tmp_path)
            states = run.wait(poll_s=1, timeout_s=600)
            reference.join(timeout=600)
        finally:
            run.cancel()
    finally:
        debug_grace_time(cluster, before)
    assert states[cell.key].state == "done", states[cell.key]
    text = paths.stdout.read_text() + paths.stderr.read_text()
    assert "Bypassing signal SIGTERM" in text and "received here: SIGTERM" in text, text[-3000:]
    assert "requeueing job" in text and "resumed from" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    if grace_s == 0:
        assert "Job is pending execution" in text, text[-3000:]
    assert_same_as_reference(cell, tmp_path / "ref")
