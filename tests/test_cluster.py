"""The local SLURM cluster itself: start, status, idempotence, a DOWN node put back."""
from __future__ import annotations

import subprocess

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
