"""The sbatch scripts as real jobs on the local cluster, with the real training commands.

Equality: a world-size-2 SLURM run (one node x 2 tasks, or 2 nodes x 1 task) is compared with a
world-size-2 torchrun run on this machine, same config and global batch: the test metrics must
be identical (within 1e-9). A run interrupted by its time limit (USR1, checkpoint, requeue,
resume) is compared with an uninterrupted single-process run: the pretrained weights must be
bit-identical and the fine-tuned test metrics equal.
"""
from __future__ import annotations

import re
import subprocess
import time

import pytest
import torch

from tests.cluster_fixtures import (FINETUNE_ARGS, PRETRAIN_ARGS, TINY, cluster,  # noqa: F401
                                    job_state, local_run, run_json, sbatch, final_metrics,
                                    tiny_data, wait_jobs)

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


def test_time_limit_requeues_and_resumes_to_same_result(cluster, tiny_data, tmp_path):
    """--time=1 with USR1 50 s before the end: the job checkpoints, requeues itself, resumes from
    checkpoints/latest (as often as needed) and ends where an uninterrupted run ends."""
    # Long enough (>= 40 s here) that the time-limit check (every 30 s in slurmctld) signals it
    # at least once; the reference runs at the same time, so both share the 2 cores.
    epochs = ["pretrain.epochs=100", "pretrain.save_epochs=[]"]
    out = tmp_path / "slurm"
    pre = sbatch(cluster, "pretrain.sbatch", *epochs, cwd=tmp_path,
                 options=["--time=1", "--signal=B:USR1@50"], DATA=tiny_data,
                 OUT=out / "pretrain", CONFIG=TINY)
    # Meanwhile, the same pretraining uninterrupted, as one plain process.
    ref = tmp_path / "ref"
    t0 = time.time()
    local_run(tiny_data, ref, pretrain_args=epochs)
    wait_jobs(cluster, [pre], timeout_s=400)
    elapsed = time.time() - t0
    log = (tmp_path / f"s3rec-pretrain-{pre}.out").read_text()
    assert job_state(cluster, pre) == "COMPLETED", log[-3000:]
    restarts = sorted(set(int(n) for n in re.findall(r"restart (\d+)", log)))
    assert len(restarts) >= 2 and "requeueing job" in log, log[-3000:]
    assert run_json(out / "pretrain")["status"] == "done"
    a = torch.load(out / "pretrain" / "final.pt", map_location="cpu", weights_only=False)["model"]
    b = torch.load(ref / "pretrain" / "final.pt", map_location="cpu", weights_only=False)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    fine = sbatch(cluster, "finetune.sbatch", *FINETUNE_ARGS, cwd=tmp_path, DATA=tiny_data,
                  OUT=out / "finetune", INIT=out / "pretrain" / "final.pt", CONFIG=TINY)
    wait_jobs(cluster, [fine], timeout_s=120)
    assert_same_metrics(final_metrics(out / "finetune"), final_metrics(ref / "finetune"))
    print(f"time-limit run: {len(restarts) - 1} requeues, {elapsed:.0f} s")


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


def test_sbatch_without_data_fails_with_message(cluster, tmp_path):
    job = sbatch(cluster, "pretrain.sbatch", cwd=tmp_path, OUT=tmp_path / "x")
    wait_jobs(cluster, [job], timeout_s=60)
    assert job_state(cluster, job) == "FAILED"
    assert "set DATA" in (tmp_path / f"s3rec-pretrain-{job}.out").read_text()
