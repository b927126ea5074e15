"""The sbatch scripts as real jobs on the local cluster, with the real training commands.

Equality: a world-size-2 SLURM run (one node x 2 tasks, or 2 nodes x 1 task) is compared with a
world-size-2 torchrun run on this machine, same config and global batch: the test metrics must
be identical (within 1e-9). A run interrupted by its time limit (USR1, checkpoint, requeue,
resume) is compared with an uninterrupted single-process run: the pretrained weights must be
bit-identical and the fine-tuned test metrics equal.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.cluster_fixtures import (FINETUNE_ARGS, PRETRAIN_ARGS, TINY, cluster,  # noqa: F401
                                    debug_grace_time, job_state, local_run,
                                    preempt_both_nodes, run_json, sbatch,
                                    final_metrics, seconds_per_epoch, tiny_data, wait_for_text,
                                    wait_jobs)

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def torchrun_reference(tiny_data, tmp_path_factory):
    """Pretrain + fine-tune with torchrun, 2 processes, on this machine (no SLURM)."""
    return local_run(tiny_data, tmp_path_factory.mktemp("torchrun"), nproc=2)


def submit_pair(env, data, out, options, cwd):
    pre = sbatch(env, "pretrain.sbatch", *PRETRAIN_ARGS, cwd=cwd, options=options,
                 DATA=data, OUT=out / "pretrain", CONFIG=TINY)
    fine = sbatch(env, "finetune.sbatch", *FINETUNE_ARGS, cwd=cwd,
                  options=[*options, f"--dependency=afterok:{pre}"], DATA=data,
                  OUT=out / "finetune", INIT=out / "pretrain" / "final.pt", CONFIG=TINY)
    return pre, fine


def assert_same_metrics(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], abs=1e-9), (k, a[k], b[k])


@pytest.mark.parametrize("layout, options, nodes", [
    ("one-node-2-tasks", ["--nodes=1", "--ntasks-per-node=2"], "node1"),
    ("two-nodes-1-task", ["--nodes=2", "--ntasks-per-node=1"], "node[1-2]"),
])
def test_sbatch_matches_torchrun(cluster, tiny_data, tmp_path, torchrun_reference, layout,
                                 options, nodes):
    out = tmp_path / layout
    pre, fine = submit_pair(cluster, tiny_data, out, options, cwd=tmp_path)
    wait_jobs(cluster, [pre, fine], timeout_s=240)
    assert job_state(cluster, pre) == "COMPLETED" and job_state(cluster, fine) == "COMPLETED"
    log = (tmp_path / f"s3rec-pretrain-{pre}.out").read_text()
    assert f"nodes {nodes} tasks 2" in log     # --output=%x-%j.out, and the layout asked for
    for stage in ("pretrain", "finetune"):
        info = run_json(out / stage)
        assert info["status"] == "done" and info["world_size"] == 2
    assert_same_metrics(final_metrics(out / "finetune"), final_metrics(torchrun_reference))


def long_pretraining(data, tmp_path, seconds) -> tuple[list[str], subprocess.Popen]:
    """Override arguments for a pretraining of ~`seconds` here and now, and the same pretraining
    started uninterrupted as one plain process (into ref/pretrain)."""
    per_epoch = seconds_per_epoch(data, tmp_path)
    # The cap only bounds a pathological calibration; it must stay above 60 s of epochs on an idle
    # machine (a cap of 250 let the job finish before its limit there).
    epochs = min(3000, max(40, int(seconds / per_epoch) + 1))
    args = [f"pretrain.epochs={epochs}", "pretrain.save_epochs=[]"]
    ref = tmp_path / "ref"
    ref.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    # Its log goes to a file, not a pipe: ~90 bytes an epoch fill a 64 KB pipe nobody reads
    # after ~700 epochs, and the run then blocks on write (it did on a fast CI machine).
    with open(ref / "pretrain.log", "w") as log_file:
        reference = subprocess.Popen([shutil.which("s3rec-pretrain"), "--data", str(data),
                                      "--out", str(ref / "pretrain"), "--config", str(TINY),
                                      *args], env=env, stdout=subprocess.DEVNULL,
                                     stderr=log_file)
    return args, reference


def assert_same_weights(a_run: Path, b_run: Path) -> None:
    a = torch.load(a_run / "final.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(b_run / "final.pt", map_location="cpu", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_time_limit_requeues_and_resumes_to_same_result(cluster, tiny_data, tmp_path):
    """--time=1 with USR1 50 s before the end: the job checkpoints, requeues itself, resumes from
    checkpoints/latest and ends exactly where an uninterrupted run ends.

    slurmctld checks time limits every 30 s, so the signal comes 10-40 s into the job: the
    training is sized to need ~60 s here and now. After the first requeue the test lifts the
    time limit, so the rest runs through (one interruption is the point, not ten)."""
    args, reference = long_pretraining(tiny_data, tmp_path, 60)
    ref, out = tmp_path / "ref", tmp_path / "slurm"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    t0 = time.time()
    pre = sbatch(cluster, "pretrain.sbatch", *args, cwd=tmp_path,
                 options=["--time=1", "--signal=B:USR1@50"], DATA=tiny_data,
                 OUT=out / "pretrain", CONFIG=TINY)
    log_path = tmp_path / f"s3rec-pretrain-{pre}.out"
    try:
        # Lift the limit once a checkpoint was saved on the signal and the job requeued.
        while not re.search(r"checkpoint saved at step .*\n(.*\n)*.*requeueing job",
                            log_path.read_text() if log_path.exists() else ""):
            assert time.time() - t0 < 150, f"no time-limit signal; job {job_state(cluster, pre)}"
            assert job_state(cluster, pre) != "COMPLETED", "finished before its time limit"
            time.sleep(1)
        subprocess.run(["scontrol", "update", f"JobId={pre}", "TimeLimit=30"], env=cluster,
                       check=True)
        wait_jobs(cluster, [pre], timeout_s=600)
        assert reference.wait(timeout=600) == 0, (ref / "pretrain.log").read_text()[-2000:]
    finally:
        subprocess.run(["scancel", pre], env=cluster)
        if reference.poll() is None:
            reference.kill()
    elapsed = time.time() - t0
    log = log_path.read_text()
    assert job_state(cluster, pre) == "COMPLETED", log[-3000:]
    assert "restart 1 " in log and "resumed from" in log, log[-3000:]
    assert run_json(out / "pretrain")["status"] == "done"
    assert_same_weights(out / "pretrain", ref / "pretrain")
    # Fine-tuned from each: the same test metrics.
    fine = sbatch(cluster, "finetune.sbatch", *FINETUNE_ARGS, cwd=tmp_path, DATA=tiny_data,
                  OUT=out / "finetune", INIT=out / "pretrain" / "final.pt", CONFIG=TINY)
    res = subprocess.run([shutil.which("s3rec-finetune"), "--data", str(tiny_data), "--out",
                          str(ref / "finetune"), "--init", str(ref / "pretrain" / "final.pt"),
                          "--config", str(TINY), *FINETUNE_ARGS], env=env, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    wait_jobs(cluster, [fine], timeout_s=120)
    assert_same_metrics(final_metrics(out / "finetune"), final_metrics(ref / "finetune"))
    print(f"time-limit run: {args[0]}, {elapsed:.0f} s in all")


@pytest.mark.slow
@pytest.mark.parametrize("grace_s", [60, 0])
def test_preemption_by_slurm_requeues_and_resumes_to_same_result(cluster, tiny_data, tmp_path,
                                                                 grace_s):
    """SLURM's own preemption, as most clusters have it (PreemptMode=REQUEUE, no user signal): a
    job of the higher-tier partition takes both nodes and the tasks get SIGTERM, save a
    checkpoint and exit 0. With a GraceTime, only the tasks are signalled, and SLURM does not
    requeue a job whose batch shell ended within it (before, the job ended FAILED: "exited 0
    but ... is not done"), so the script requeues it. Without one (SLURM's default), the whole
    job is killed and SLURM requeues it; the tasks save within KillWait. Either way it resumes
    from latest and ends bit-identical to an uninterrupted run."""
    args, reference = long_pretraining(tiny_data, tmp_path, 30)  # preempted well before its end
    out = tmp_path / "slurm"
    before = debug_grace_time(cluster)
    pre = None
    try:
        assert debug_grace_time(cluster, grace_s) == grace_s
        pre = sbatch(cluster, "pretrain.sbatch", *args, cwd=tmp_path, DATA=tiny_data,
                     OUT=out / "pretrain", CONFIG=TINY)
        log_path = tmp_path / f"s3rec-pretrain-{pre}.out"
        wait_for_text(log_path, r"\[pretrain\] epoch 3/", 120, f"job {pre}")
        urgent = preempt_both_nodes(cluster, tmp_path)
        wait_jobs(cluster, [pre, urgent], timeout_s=600)
        assert reference.wait(timeout=600) == 0, (tmp_path / "ref/pretrain.log").read_text()[-2000:]
    finally:
        debug_grace_time(cluster, before)
        if pre:
            subprocess.run(["scancel", pre], env=cluster)
        if reference.poll() is None:
            reference.kill()
    log = log_path.read_text()
    assert job_state(cluster, pre) == "COMPLETED", log[-3000:]
    assert "preempted by a signal (received here: SIGTERM" in log, log[-3000:]
    if grace_s:
        assert "checkpoint saved on a signal from SLURM (preemption)" in log
    else:
        assert f"JOB {pre} ON node1 CANCELLED" in log and "DUE TO PREEMPTION" in log
    assert "restart 1 " in log and "resumed from" in log, log[-3000:]
    assert_same_weights(out / "pretrain", tmp_path / "ref" / "pretrain")


def test_seed_array(cluster, tiny_data, tmp_path):
    job = sbatch(cluster, "seeds.sbatch", *PRETRAIN_ARGS, *FINETUNE_ARGS, cwd=tmp_path,
                 options=["--array=0-1%2"], DATA=tiny_data, OUT=tmp_path / "runs",
                 SEEDS="3 5", CONFIG=TINY)
    wait_jobs(cluster, [job], timeout_s=240)
    for seed in (3, 5):
        for stage in ("pretrain", "finetune"):
            info = run_json(tmp_path / "runs" / f"s{seed}" / stage)
            assert info["status"] == "done" and info["seed"] == seed
        assert (tmp_path / f"s3rec-seeds-{job}_{seed == 5:d}.out").exists()
    m3 = final_metrics(tmp_path / "runs/s3/finetune")
    m5 = final_metrics(tmp_path / "runs/s5/finetune")
    assert m3 != m5      # the seed reached the training


def test_from_scratch_without_init_and_with_finetune_only(cluster, tiny_data, tmp_path):
    """finetune.sbatch without INIT and seeds.sbatch with FINETUNE_ONLY=1 train from scratch:
    the finetune-only variant is theirs to set (before, the run stopped on a config error)."""
    alone = sbatch(cluster, "finetune.sbatch", "finetune.epochs=1", cwd=tmp_path,
                   DATA=tiny_data, OUT=tmp_path / "scratch", CONFIG=TINY)
    seeds = sbatch(cluster, "seeds.sbatch", "finetune.epochs=1", cwd=tmp_path,
                   options=["--array=0-0"], DATA=tiny_data, OUT=tmp_path / "runs", SEEDS="4",
                   CONFIG=TINY, FINETUNE_ONLY=1)
    wait_jobs(cluster, [alone, seeds], timeout_s=240)
    for run in (tmp_path / "scratch", tmp_path / "runs" / "s4" / "finetune"):
        info = run_json(run)
        assert info["status"] == "done" and info["config"]["variant"] == "finetune-only"
    assert not (tmp_path / "runs" / "s4" / "pretrain").exists()


def test_sbatch_without_data_fails_with_message(cluster, tmp_path):
    job = sbatch(cluster, "pretrain.sbatch", cwd=tmp_path, OUT=tmp_path / "x")
    wait_jobs(cluster, [job], timeout_s=60)
    assert job_state(cluster, job) == "FAILED"
    assert "set DATA" in (tmp_path / f"s3rec-pretrain-{job}.out").read_text()
