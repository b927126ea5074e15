"""The local SLURM cluster itself: start, status, idempotence, a DOWN node put back."""
from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.cluster_fixtures import CLUSTER_SH, cluster, sbatch, wait_jobs  # noqa: F401

pytestmark = pytest.mark.cluster


def sh(*args, env=None):
    return subprocess.run([str(CLUSTER_SH), *args], capture_output=True, text=True, env=env)


def node_states(env) -> dict:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True,
                         text=True).stdout
    return dict(line.split() for line in out.splitlines())


def test_status_start_idempotent_and_nodes(cluster):
    assert sh("status").returncode == 0
    res = sh("start")
    assert res.returncode == 0 and "already running" in res.stdout
    assert set(node_states(cluster)) == {"node1", "node2"}
    # srun across both fake nodes: one task on each
    out = subprocess.run(["srun", "-N2", "-n2", "bash", "-c", "echo $SLURMD_NODENAME"],
                         env=cluster, capture_output=True, text=True, timeout=60)
    assert sorted(out.stdout.split()) == ["node1", "node2"], out.stderr


def test_drained_node_is_resumed_by_start(cluster):
    # (A DOWN node that still answers comes back by itself: ReturnToService=2. DRAIN stays.)
    subprocess.run(["scontrol", "update", "nodename=node2", "state=drain", "reason=test"],
                   env=cluster, check=True)
    assert node_states(cluster)["node2"].startswith("drain")
    assert sh("status").returncode != 0        # status: both nodes must answer
    assert sh("start").returncode == 0
    assert node_states(cluster)["node2"] in ("idle", "mix", "alloc")
    assert sh("status").returncode == 0


def cluster_steps(folder: str) -> list[str]:
    """The live slurmstepd processes working in `folder` (the cluster's)."""
    out = []
    for pid in subprocess.run(["pgrep", "-x", "slurmstepd"], capture_output=True,
                              text=True).stdout.split():
        try:
            if os.readlink(f"/proc/{pid}/cwd").startswith(folder):
                out.append(pid)
        except OSError:     # it ended meanwhile
            pass
    return out


def test_stop_leaves_no_job_running_on_unwatched(cluster, tmp_path):
    """Stopped while a job runs (a test failing mid-job, a user's `stop`), the cluster's step
    daemons would outlive slurmd, and the job's tasks with them, taking the cores. Started again
    afterwards, for the tests after this one."""
    marker = "6171.5"      # this test's own sleep, found by its argument
    res = subprocess.run(["sbatch", "--parsable", "--output=/dev/null", "--wrap",
                          f"srun sleep {marker}"], env=cluster, cwd=tmp_path,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    job = res.stdout.strip().split(";")[0]
    try:
        t0 = time.time()
        while subprocess.run(["pgrep", "-f", f"sleep {marker}"],
                             capture_output=True).returncode != 0:
            assert time.time() - t0 < 60, f"job {job}: its sleep never started"
            time.sleep(0.5)
        assert sh("stop").returncode == 0
        assert subprocess.run(["pgrep", "-f", f"sleep {marker}"],
                              capture_output=True).stdout == b""
        folder = os.path.dirname(cluster["SLURM_CONF"]) + "/"
        assert cluster_steps(folder) == [], "step daemons left running"
    finally:
        subprocess.run(["pkill", "-f", f"sleep {marker}"])
        assert sh("start").returncode == 0
        subprocess.run(["scancel", job], env=cluster)
