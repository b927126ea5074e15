"""Fixtures and helpers for tests against the real local SLURM cluster (slurm/local-cluster.sh).

Import the fixtures into a test module with
    from tests.cluster_fixtures import cluster, tiny_data, submitit_dir  # noqa: F401
(a tests/conftest.py could do the same for every module).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "slurm" / "local-cluster.sh"
TINY = REPO / "configs" / "tiny.yaml"

# Tiny runs: a few seconds a stage on 2 cores.
PRETRAIN_ARGS = ["pretrain.epochs=1"]
FINETUNE_ARGS = ["finetune.epochs=2"]


def cluster_env() -> dict:
    env = dict(os.environ)
    conf = os.environ.get("S3REC_CLUSTER_DIR", str(REPO / ".cluster")) + "/slurm.conf"
    env["SLURM_CONF"] = conf
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


@pytest.fixture(scope="session")
def cluster():
    """The local two-node cluster, started if it is not running (and stopped again if we
    started it). Yields the environment for client commands (SLURM_CONF set)."""
    if shutil.which("slurmctld") is None:
        pytest.skip("SLURM is not installed (tools/setup.sh installs slurm-wlm)")
    env = cluster_env()
    started = False
    if subprocess.run([str(CLUSTER_SH), "status"], capture_output=True).returncode != 0:
        res = subprocess.run([str(CLUSTER_SH), "start"], capture_output=True, text=True)
        assert res.returncode == 0, f"local-cluster.sh start failed:\n{res.stdout}\n{res.stderr}"
        started = True
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = env["SLURM_CONF"]   # submitit calls sbatch from this process
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    yield env
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
    if started:
        subprocess.run([str(CLUSTER_SH), "stop"], capture_output=True)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small synthetic dataset made by the real s3rec-prep."""
    out = tmp_path_factory.mktemp("data") / "synthetic"
    res = subprocess.run(["s3rec-prep", "synthetic", "--users", "100", "--items", "110",
                          "--attributes", "8", "--out", str(out), "--seed", "7"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture
def submitit_dir(tmp_path) -> Path:
    """Each test its own folder: job ids restart when the cluster state is wiped."""
    d = tmp_path / "submitit"
    d.mkdir()
    return d


def sbatch(env: dict, script: str, *args: str, cwd: Path, options: list[str] = (),
           **variables: str) -> str:
    """Submit slurm/<script> with extra sbatch `options` and environment `variables`; job id."""
    full = dict(env, **{k: str(v) for k, v in variables.items()})
    res = subprocess.run(["sbatch", "--parsable", *options, str(REPO / "slurm" / script), *args],
                         env=full, cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, f"sbatch failed: {res.stderr}"
    return res.stdout.strip().split(";")[0]


def wait_jobs(env: dict, job_ids: list[str], timeout_s: float) -> None:
    """Until squeue lists none of `job_ids` (any state)."""
    t0 = time.time()
    while True:
        res = subprocess.run(["squeue", "-h", "-o", "%i %T %r", "-j", ",".join(job_ids)],
                             env=env, capture_output=True, text=True)
        if res.returncode != 0 or not res.stdout.strip():
            return
        if "DependencyNeverSatisfied" in res.stdout:   # its prerequisite failed
            subprocess.run(["scancel", *job_ids], env=env)
            raise AssertionError(f"a prerequisite job failed:\n{res.stdout}")
        if time.time() - t0 > timeout_s:
            subprocess.run(["scancel", *job_ids], env=env)
            raise TimeoutError(f"jobs {job_ids} still queued after {timeout_s} s:\n{res.stdout}")
        time.sleep(1)


def job_state(env: dict, job_id: str) -> str:
    res = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True,
                         text=True)
    for f in res.stdout.split():
        if f.startswith("JobState="):
            return f.split("=", 1)[1]
    return "?"


def final_metrics(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())["test"]


def run_json(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "run.json").read_text())


def local_run(data: Path, out: Path, nproc: int = 1, pretrain_args=PRETRAIN_ARGS,
              finetune_args=FINETUNE_ARGS, env: dict | None = None) -> Path:
    """Pretrain then fine-tune on this machine (torchrun with `nproc` processes); finetune dir."""
    env = dict(env or os.environ)
    for k in list(env):
        if k.startswith("SLURM_"):
            env.pop(k)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    launch = ["torchrun", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []

    def entry(name):
        return [shutil.which(name)] if not launch else launch + [shutil.which(name)]

    pre, fine = out / "pretrain", out / "finetune"
    for cmd in (entry("s3rec-pretrain") + ["--data", str(data), "--out", str(pre),
                                           "--config", str(TINY), *pretrain_args],
                entry("s3rec-finetune") + ["--data", str(data), "--out", str(fine), "--init",
                                           str(pre / "final.pt"), "--config", str(TINY),
                                           *finetune_args]):
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}"
    return fine


def seconds_per_epoch(data, tmp_path) -> float:
    """Pretraining speed here and now (other work shares these 2 cores): 10 epochs, timed."""
    res = subprocess.run([shutil.which("s3rec-pretrain"), "--data", str(data), "--out",
                          str(tmp_path / "calibrate"), "--config", str(TINY), "pretrain.epochs=10",
                          "pretrain.save_epochs=[]"], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if not k.startswith("SLURM_")})
    assert res.returncode == 0, res.stderr[-2000:]
    # perf/epoch_s at full precision: the log line rounds to 0.1 s, and an epoch of this tiny
    # run can take less than 0.05 s on a fast machine (it then read as 0)
    from tests.train_helpers import scalars
    times = [v for _, v in scalars(tmp_path / "calibrate")["perf/epoch_s"]]
    assert len(times) == 10 and min(times) > 0, times
    return sum(times[1:]) / len(times[1:])


def preempt_both_nodes(env: dict, cwd: Path) -> str:
    """Submit a job of the higher tier (partition `urgent`) that needs both nodes whole: SLURM
    preempts the debug jobs there (PreemptMode=REQUEUE: SIGTERM to their tasks at once, the
    rest of the job killed and requeued after GraceTime). Its job id."""
    res = subprocess.run(["sbatch", "--parsable", "--partition=urgent", "--nodes=2",
                          "--exclusive", "--output=/dev/null", "--wrap", "sleep 2"],
                         env=env, cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, f"sbatch of the preempting job failed: {res.stderr}"
    return res.stdout.strip().split(";")[0]


def wait_for_text(path: Path, pattern: str, timeout_s: float, what: str) -> None:
    """Until the file at `path` matches the regular expression `pattern`."""
    t0 = time.time()
    while not re.search(pattern, path.read_text() if path.exists() else ""):
        assert time.time() - t0 < timeout_s, f"{what}: no {pattern!r} in {path} after {timeout_s} s"
        time.sleep(0.5)


def debug_grace_time(env: dict, seconds: int | None = None) -> int:
    """The debug partition's GraceTime in seconds; set to `seconds` first when given."""
    if seconds is not None:
        subprocess.run(["scontrol", "update", "PartitionName=debug", f"GraceTime={seconds}"],
                       env=env, check=True)
    out = subprocess.run(["scontrol", "show", "partition", "-o", "debug"], env=env, check=True,
                         capture_output=True, text=True).stdout
    return int(re.search(r"GraceTime=(\d+)", out).group(1))
