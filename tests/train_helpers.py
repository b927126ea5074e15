"""Shared pieces of the training tests that start real processes (launchers, resume, e2e)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                 "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")
LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "MPI_LOCAL")


def clean_env(**extra) -> dict:
    """This environment without any launcher's variables; one thread a process (2 cores)."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARS and (k == "SLURM_CONF" or not k.startswith(LAUNCHER_PREFIXES))}
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(launcher: str, module: str, args: list[str], nproc: int = 2) -> list[str]:
    """The same entry under each launcher (module form: pyenv's shims are shell scripts)."""
    port = str(free_port())
    if launcher == "single":
        return [sys.executable, "-m", module, *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", port, "-m", module, *args]
    if launcher == "deepspeed":
        # on CPU the launcher starts one process unless told --num_gpus
        return [shutil.which("deepspeed"), "--num_gpus", str(nproc), "--master_port", port,
                "--module", module, *args]
    if launcher in ("mpirun", "mpiexec"):      # MPICH's hydra answers to both names
        return [shutil.which(launcher), "-n", str(nproc), sys.executable, "-m", module, *args]
    raise ValueError(launcher)


def run(cmd: list[str], timeout: int = 240, expect: int = 0, **env) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=clean_env(**env), capture_output=True, text=True,
                       timeout=timeout, cwd=REPO)
    if p.returncode != expect:
        raise AssertionError(f"exit {p.returncode} (expected {expect}) from {' '.join(cmd)}\n"
                             f"--- stderr (tail) ---\n{p.stderr[-4000:]}")
    return p


def train_args(data: Path, out: Path, *overrides: str) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--config", str(TINY), *overrides]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def make_dataset(root: Path, users=200, items=150, attributes=20, seed=12345) -> Path:
    out = root / f"synthetic-u{users}-i{items}-a{attributes}-s{seed}"
    if not (out / "manifest.json").is_file():       # shared by the modules of one session
        subprocess.run([sys.executable, "-m", "s3rec.data_prep.cli", "synthetic", "--users", str(users),
                        "--items", str(items), "--attributes", str(attributes), "--seed",
                        str(seed), "--out", str(out)], check=True, capture_output=True,
                       cwd=REPO, env=clean_env())
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """`s3rec-prep synthetic --users 200 --items 150 --attributes 20` (99 negatives need > 104
    items), made once per session."""
    return make_dataset(tmp_path_factory.getbasetemp())


@pytest.fixture
def shm_clean():
    """The deepspeed launcher's shared-memory all-reduce leaves 66 MB buffers in /dev/shm.
    (MPICH's segments are removed by the runs themselves: they finalize MPI before leaving.)"""
    shm = Path("/dev/shm")
    before = set(shm.glob("deepspeed_allreduce_buffer_*")) if shm.is_dir() else set()
    yield
    if shm.is_dir():
        for f in set(shm.glob("deepspeed_allreduce_buffer_*")) - before:
            f.unlink(missing_ok=True)
