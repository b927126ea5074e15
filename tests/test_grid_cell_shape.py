"""Cells of several processes (executor.nodes x executor.tasks_per_node): a two-node SLURM cell
and a two-process local cell train exactly as the same commands under torchrun; the world size
is part of a cell's identity; the executor's shape is checked before anything is submitted."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from submitit.core.utils import JobPaths

from s3rec.distributed import detect_launcher, resolve
from s3rec.launch import grid_cli
from s3rec.launch.grid import Grid, GridError, load_grid
from s3rec.launch.job import task_env
from s3rec.launch.runner import launch_grid, resolve_commands
from tests.cluster_fixtures import TINY, cluster, final_metrics, run_json, tiny_data  # noqa: F401
from tests.train_helpers import clean_env, free_port


def shape_grid(out, data, name: str, **executor) -> dict:
    """One s3rec cell (seed 1, one fine-tune from final.pt), tiny and short."""
    return dict(name=name, data=[str(data)], variants=["s3rec"], seeds=[1], config=str(TINY),
                finetune_from=["final"],
                overrides={"pretrain.epochs": 1, "pretrain.save_epochs": [], "finetune.epochs": 2},
                executor={"timeout_min": 10, "array_parallelism": 1, **executor}, out=str(out))


def run_grid(spec: dict) -> Grid:
    grid = Grid(**spec)
    run = launch_grid(grid)
    assert run.to_run == [grid.cells()[0].key]
    states = run.wait(poll_s=1, timeout_s=600)
    assert all(s.state == "done" for s in states.values()), states
    return grid


def task_logs(grid: Grid) -> list[str]:
    """Each task's stdout (submitit's %j_%t_log.out), task 0 first."""
    entry = json.loads((grid.out_path / "_grid" / "jobs.json").read_text())[grid.cells()[0].key]
    return [JobPaths(entry["folder"], job_id=entry["job_id"], task_id=t).stdout.read_text()
            for t in range(entry["world_size"])]


def ranks_on_nodes(log: str) -> list[tuple[str, str]]:
    """(rank, node) of every stage the task started, from the line CellsJob prints."""
    return re.findall(r"\] rank (\d+) of 2 on node (\S+), rendezvous ", log)


@pytest.fixture(scope="module")
def torchrun_reference(tiny_data, tmp_path_factory):
    """The cell's own two commands (cell.commands()), run by torchrun with two processes on
    loopback, into folders outside the grid."""
    root = tmp_path_factory.mktemp("torchrun")
    cell = Grid(**shape_grid(root / "unused", tiny_data, "ref")).cells()[0]
    pre, (fine,) = cell.commands(*resolve_commands())
    dirs = {str(cell.pretrain_dir): root / "pretrain", str(cell.finetune_dir): root / "finetune",
            str(cell.finetunes[0].init): root / "pretrain" / "final.pt"}
    for cmd in (pre, fine):
        cmd = [str(dirs.get(a, a)) for a in cmd]
        full = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *cmd]
        res = subprocess.run(full, env=clean_env(), capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"{' '.join(full)}:\n{res.stderr[-3000:]}"
    assert run_json(root / "finetune")["world_size"] == 2
    return root


@pytest.fixture(scope="module")
def slurm_cell(cluster, tiny_data, tmp_path_factory) -> Grid:  # noqa: F811
    out = tmp_path_factory.mktemp("slurm") / "runs"
    return run_grid(shape_grid(out, tiny_data, "nodes2", kind="slurm", nodes=2, tasks_per_node=1))


@pytest.fixture(scope="module")
def local_cell(tiny_data, tmp_path_factory) -> Grid:  # noqa: F811
    out = tmp_path_factory.mktemp("local") / "runs"
    return run_grid(shape_grid(out, tiny_data, "tasks2", kind="local", tasks_per_node=2))


def assert_same_as(cell, ref) -> None:
    """World size 2 in both stages' run.json, bit-identical pretrained weights, and exactly the
    torchrun run's test metrics: the same global batches, split over two ranks the same way."""
    for stage, run_dir in cell.stage_dirs:
        info = run_json(run_dir)
        assert (info["status"], info["world_size"], info["launcher"]) == ("done", 2, "env"), stage
    a = torch.load(cell.pretrain_dir / "final.pt", map_location="cpu", weights_only=True)["model"]
    b = torch.load(ref / "pretrain" / "final.pt", map_location="cpu", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    mine, theirs = final_metrics(cell.finetune_dir), final_metrics(ref / "finetune")
    assert mine == theirs and set(mine) >= {"HR@10", "NDCG@10", "MRR"}


@pytest.mark.cluster
@pytest.mark.multiproc
@pytest.mark.slow
def test_two_node_slurm_cell_trains_as_torchrun(slurm_cell, torchrun_reference):
    cell = slurm_cell.cells()[0]
    assert_same_as(cell, torchrun_reference)
    script = next((slurm_cell.out_path / "_submitit").glob("*_submission.sh")).read_text()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script
    # one task on each node, in both stages (pretrain, finetune): rank 0 on node1, 1 on node2
    logs = task_logs(slurm_cell)
    assert [ranks_on_nodes(log) for log in logs] == [[("0", "node1")] * 2, [("1", "node2")] * 2]


@pytest.mark.multiproc
@pytest.mark.slow
def test_local_cell_of_two_processes_trains_as_torchrun(local_cell, torchrun_reference):
    cell = local_cell.cells()[0]
    assert_same_as(cell, torchrun_reference)
    logs = task_logs(local_cell)
    assert [[r for r, _ in ranks_on_nodes(log)] for log in logs] == [["0", "0"], ["1", "1"]]


def _submissions(grid: Grid) -> tuple[str, list[str]]:
    """What a launch records: the job registry and the submitit folder's files."""
    return ((grid.out_path / "_grid" / "jobs.json").read_text(),
            sorted(p.name for p in (grid.out_path / "_submitit").iterdir()))


def _relaunch_refused(spec: dict, run_json_path, before) -> None:
    with pytest.raises(GridError) as e:
        launch_grid(Grid(**spec))
    msg = str(e.value)
    assert msg.startswith(f"{run_json_path} (cell ")
    assert "ran as 2 processes, the grid now gives 1 (executor.nodes x " \
           "executor.tasks_per_node)" in msg, msg
    assert _submissions(Grid(**spec)) == before     # nothing submitted


@pytest.mark.multiproc
@pytest.mark.slow
def test_world_size_is_part_of_a_local_cells_identity(local_cell, tmp_path, capsys):
    """The finished cell and an unfinished copy (its pretraining preempted, no fine-tune yet)
    relaunched with tasks_per_node 1: refused, naming the run.json and both world sizes."""
    spec = shape_grid(local_cell.out, local_cell.data[0], "tasks2", kind="local", tasks_per_node=1)
    cell = local_cell.cells()[0]
    _relaunch_refused(spec, cell.pretrain_dir / "run.json", _submissions(local_cell))
    path = tmp_path / "grid.yaml"      # the CLI says the same, exit 2
    path.write_text(yaml.safe_dump(spec))
    capsys.readouterr()
    assert grid_cli.main([str(path)]) == 2
    assert "ran as 2 processes, the grid now gives 1" in capsys.readouterr().err

    copy = tmp_path / "runs"
    shutil.copytree(local_cell.out_path, copy)
    spec["out"] = str(copy)
    pre = Grid(**spec).cells()[0].pretrain_dir
    shutil.rmtree(pre.parent / "finetune")
    (pre / "final.pt").unlink()
    info = run_json(pre)
    (pre / "run.json").write_text(json.dumps(dict(info, status="preempted", finished=None)))
    _relaunch_refused(spec, pre / "run.json", _submissions(Grid(**spec)))


@pytest.mark.cluster
@pytest.mark.multiproc
@pytest.mark.slow
def test_world_size_is_part_of_a_slurm_cells_identity(slurm_cell, cluster):  # noqa: F811
    spec = shape_grid(slurm_cell.out, slurm_cell.data[0], "nodes2", kind="slurm", nodes=1,
                      tasks_per_node=1)
    queued = subprocess.run(["squeue", "-h", "-o", "%i"], env=cluster, capture_output=True,
                            text=True, check=True).stdout.split()
    _relaunch_refused(spec, slurm_cell.cells()[0].pretrain_dir / "run.json",
                      _submissions(slurm_cell))
    after = subprocess.run(["squeue", "-h", "-o", "%i"], env=cluster, capture_output=True,
                           text=True, check=True).stdout.split()
    assert set(after) <= set(queued)


# ---------------------------------------------------------------------- unit: checks and env

def _grid(tmp_path, **executor) -> Grid:
    return Grid(**shape_grid(tmp_path / "runs", tmp_path / "data", "check", **executor))


@pytest.mark.parametrize("executor, key, text", [
    (dict(kind="local", nodes=2), "executor.nodes", "runs on this machine only (nodes 1), got 2"),
    (dict(kind="local", tasks_per_node=2, cells_per_job=2), "executor.cells_per_job",
     "need cells of one process, but executor.nodes x executor.tasks_per_node is 1 x 2"),
    (dict(kind="slurm", nodes=2, cells_per_job=3), "executor.cells_per_job",
     "executor.tasks_per_node is 2 x 1"),
    (dict(kind="slurm", tasks_per_node=4, gpus_per_node=2), "executor.gpus_per_node",
     "2 GPUs for executor.tasks_per_node 4 processes (one each)"),
])
def test_cell_shape_errors_name_their_key(tmp_path, executor, key, text):
    with pytest.raises(GridError) as e:
        _grid(tmp_path, **executor)
    assert f"key '{key}'" in str(e.value) and text in str(e.value), str(e.value)


def test_cell_shapes_that_are_allowed(tmp_path):
    for executor, world in ((dict(kind="local", tasks_per_node=2), 2),
                            (dict(kind="slurm", nodes=2, tasks_per_node=2, gpus_per_node=2), 4),
                            (dict(kind="slurm", tasks_per_node=2), 2),     # CPU training
                            (dict(kind="local", cells_per_job=3), 1)):
        assert _grid(tmp_path, **executor).cells()[0].world_size == world


def test_executor_local_on_the_command_line_refuses_a_two_node_grid(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(shape_grid(tmp_path / "runs", tmp_path / "data", "cli",
                                              kind="slurm", nodes=2)))
    assert load_grid(path).cells()[0].world_size == 2
    with pytest.raises(GridError, match=rf"^{re.escape(str(path))}: key 'executor.nodes'"):
        load_grid(path, executor_kind="local")


def test_task_env_of_an_srun_task_on_another_node_slurm_variables_set_by_hand(monkeypatch):
    """What task_env gives the training in task 1 of a two-node job (the variables srun sets,
    written here; a shell that submitted with RANK, WORLD_SIZE and MASTER_ADDR exported): the
    `env` launcher with this task's rank and the first node as rendezvous, and no forced
    loopback interface (the nodes' ranks must reach each other)."""
    for k in ("GLOO_SOCKET_IFNAME", "S3REC_MASTER_ADDR", "LOCAL_WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    slurm = dict(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_NTASKS="2",
                 SLURM_JOB_NUM_NODES="2", SLURM_NODEID="1", SLURM_PROCID="1", SLURM_LOCALID="0",
                 SLURM_STEP_ID="0", SLURM_JOB_NODELIST="gpu[07-08]",
                 RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    env = task_env(2, 1)
    assert {k: env.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                    "MASTER_ADDR", "GLOO_SOCKET_IFNAME")} == dict(
        RANK="1", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="gpu07",
        GLOO_SOCKET_IFNAME=None)
    assert detect_launcher(env) == "env"
    assert resolve(dict(env)) == ("env", 1, 0, 2, False)   # not one host: gloo picks the route
    monkeypatch.setenv("SLURM_PROCID", "0")       # rank 0 of the same job and stage agrees
    monkeypatch.setenv("SLURM_NODEID", "0")
    rank0 = task_env(2, 1)
    assert (rank0["RANK"], rank0["MASTER_ADDR"], rank0["MASTER_PORT"]) == \
        ("0", "gpu07", env["MASTER_PORT"])
    assert task_env(2, 2)["MASTER_PORT"] != env["MASTER_PORT"]   # each stage its own port
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "ib0")             # the user's choice is kept
    assert task_env(2, 1)["GLOO_SOCKET_IFNAME"] == "ib0"


def test_rendezvous_ports_of_an_arrays_tasks_and_a_cells_stages_differ():
    """Two tasks of one array (`53_0`, `53_1`) may share a node: with many `finetune_from`
    entries their stages' ports must not meet, nor those of `5_30` and `53_0`."""
    from s3rec.launch.job import rendezvous_port
    ports = [rendezvous_port(j, s) for j in [f"53_{t}" for t in range(10)] + ["5_30", "530"]
             for s in range(12)]
    assert len(set(ports)) == len(ports) and all(20000 <= p < 40000 for p in ports)
    assert rendezvous_port("53_1", 3) == rendezvous_port("53_1", 3)
