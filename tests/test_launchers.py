"""Both entries run unchanged under the deepspeed launcher, torchrun and mpirun, 2 processes,
at every ZeRO stage: each run trains (fine-tuning from scratch, one short epoch), saves DeepSpeed
checkpoints, loads the best one back and evaluates it sharded over the two ranks."""
import pytest

from tests.train_helpers import (REPO, command, read_json, run, scalars, shm_clean,  # noqa: F401
                                 tiny_data, train_args)

pytestmark = pytest.mark.multiproc


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
@pytest.mark.parametrize("launcher", ["torchrun", "mpirun", "deepspeed"])
def test_two_processes_train_save_and_load(launcher, zero, tiny_data, tmp_path, shm_clean):
    out = tmp_path / "run"
    # the deepspeed launcher's users pass a DeepSpeed JSON; the others the typed key
    stage = ["--deepspeed", "--deepspeed_config", str(REPO / f"configs/deepspeed/zero{zero}.json")] \
        if launcher == "deepspeed" else [f"deepspeed.zero_stage={zero}"]
    run(command(launcher, "s3rec.finetune", train_args(
        tiny_data, out, "variant=finetune-only", "finetune.epochs=1", "finetune.batch_size=64",
        "logging.every_steps=1", *stage)))
    info = read_json(out / "run.json")
    assert info["status"] == "done" and info["world_size"] == 2
    assert info["launcher"] == {"torchrun": "env", "deepspeed": "env", "mpirun": "mpi"}[launcher]
    assert info["config"]["deepspeed"]["zero_stage"] == zero
    assert info["deepspeed_config"]["train_micro_batch_size_per_gpu"] == 32
    res = read_json(out / "results.json")
    assert res["best_epoch"] == 1 and 0 <= res["test"]["MRR"] <= 1
    tag = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert (tag / "rng-rank00000.pt").is_file() and (tag / "rng-rank00001.pt").is_file()
    zero_files = list(tag.glob("*zero_pp_rank_*optim_states.pt"))
    assert len(zero_files) == (2 if zero else 0)      # optimizer states partitioned over ranks
    losses = [v for _, v in scalars(out)["loss/finetune"]]
    assert len(losses) == 4 and all(0 < v < 10 for v in losses)   # 200 users / 64 = 4 steps


def _cluster_up() -> bool:
    import shutil
    import subprocess
    if not shutil.which("srun"):
        return False
    return subprocess.run(["bash", "slurm/local-cluster.sh", "status"], capture_output=True,
                          cwd=REPO).returncode == 0


@pytest.mark.cluster
def test_srun_two_tasks_on_two_nodes(tiny_data, tmp_path):
    """`srun -N2 -n2` on the local two-node cluster: ranks from SLURM_PROCID, MASTER_ADDR from
    `scontrol show hostnames` (node1), the port from the job id."""
    import sys
    if not _cluster_up():
        pytest.skip("local SLURM cluster not running (slurm/local-cluster.sh start)")
    out = tmp_path / "run"
    run(["srun", "-N2", "-n2", "--kill-on-bad-exit=1", sys.executable, "-m", "s3rec.finetune",
         *train_args(tiny_data, out, "variant=finetune-only", "finetune.epochs=1",
                     "finetune.batch_size=64", "deepspeed.zero_stage=2")], timeout=300)
    info = read_json(out / "run.json")
    assert info["status"] == "done" and info["world_size"] == 2 and info["launcher"] == "slurm"
    assert read_json(out / "results.json")["best_epoch"] == 1


@pytest.mark.cluster
def test_deepspeed_launcher_with_a_two_node_hostfile(tiny_data, tmp_path):
    """The `deepspeed` launcher given a hostfile of two nodes (node1, node2 of the local cluster)
    and its slurm backend, inside a 2-node allocation: it starts the ranks with srun, one a node.
    (Its default backend, pdsh, needs passwordless ssh between hosts: not available here.)"""
    import shutil
    if not _cluster_up():
        pytest.skip("local SLURM cluster not running (slurm/local-cluster.sh start)")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    out = tmp_path / "run"
    p = run(["salloc", "-N2", "-n2", shutil.which("deepspeed"), "--hostfile", str(hostfile),
             "--launcher", "slurm", "--launcher_args", "--ntasks-per-node=1 --kill-on-bad-exit=1",
             "--master_addr", "node1", "--no_ssh_check", "s3rec/finetune.py",
             *train_args(tiny_data, out, "variant=finetune-only", "finetune.epochs=1",
                         "finetune.batch_size=64", "deepspeed.zero_stage=1")], timeout=300)
    assert "cmd = srun -n 2" in p.stdout + p.stderr
    info = read_json(out / "run.json")
    assert info["status"] == "done" and info["world_size"] == 2 and info["launcher"] == "slurm"
    assert read_json(out / "results.json")["best_epoch"] == 1
