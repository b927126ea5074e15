"""Launcher detection and variable resolution (no processes started; mpirun is covered by the
multi-process tests in test_launchers.py)."""
import pytest

from s3rec import distributed as dist


def test_plain_process_gets_rank_zero_and_a_port():
    env = {}
    launcher, rank, local, world, single = dist.resolve(env)
    assert (launcher, rank, local, world, single) == ("single", 0, 0, 1, True)
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and env["LOCAL_RANK"] == "0"
    assert env["MASTER_ADDR"] == "127.0.0.1" and 0 < int(env["MASTER_PORT"]) < 65536


def test_torchrun_and_deepspeed_variables():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert dist.resolve(env) == ("env", 1, 1, 2, True)


def test_deepspeed_local_rank_argument_when_env_lacks_it():
    env = {"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29500"}
    launcher, rank, local, world, single = dist.resolve(env, local_rank_arg=1)
    assert (rank, local, world) == (3, 1, 4)
    assert env["LOCAL_RANK"] == "1"
    assert not single        # 10.1.2.3 is not loopback and LOCAL_WORLD_SIZE is unknown


def test_multi_rank_without_port_is_an_error():
    with pytest.raises(dist.LauncherError, match="MASTER_PORT"):
        dist.resolve({"RANK": "0", "WORLD_SIZE": "2"})


def test_srun_task_with_master_addr_and_port_from_job_id():
    task = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
            "SLURM_JOB_ID": "1234", "SLURM_STEP_NUM_NODES": "1", "MASTER_ADDR": "127.0.0.1"}
    env = dict(task)
    launcher, rank, local, world, single = dist.resolve(env)
    assert (launcher, rank, local, world, single) == ("slurm", 1, 1, 2, True)
    port = int(env["MASTER_PORT"])
    assert 20000 <= port < 40000
    env2 = dict(task, SLURM_JOB_ID="1235")
    dist.resolve(env2)
    assert env2["MASTER_PORT"] != env["MASTER_PORT"]      # concurrent jobs get different ports


def test_batch_script_is_not_mistaken_for_a_rank():
    # sbatch's shell has SLURM_PROCID=0 and SLURM_NTASKS of the allocation but no step id
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}
    assert dist.detect_launcher(env) == "single"


def test_mpi_variables_are_recognised():
    for key in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"):
        assert dist.detect_launcher({key: "2"}) == "mpi"
    # RANK from a launcher wins over leftover PMI variables
    assert dist.detect_launcher({"PMI_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}) == "env"


def test_bad_values_name_the_variable():
    with pytest.raises(dist.LauncherError, match="SLURM_NTASKS"):
        dist.resolve({"SLURM_PROCID": "0", "SLURM_NTASKS": "two", "SLURM_LOCALID": "0",
                      "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "1", "MASTER_ADDR": "127.0.0.1"})
    with pytest.raises(dist.LauncherError, match="outside world size"):
        dist.resolve({"RANK": "2", "WORLD_SIZE": "2", "MASTER_PORT": "1"})


def test_env_without_local_rank_across_hosts_is_refused():
    """Without LOCAL_RANK the local rank is the global one on one host only; with a remote
    MASTER_ADDR it would pick a GPU that the second node does not have."""
    one_host = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    assert dist.resolve(dict(one_host))[2] == 1
    with pytest.raises(dist.LauncherError, match="set LOCAL_RANK"):
        dist.resolve({**one_host, "MASTER_ADDR": "10.1.2.3"})


def test_rank_variables_inherited_into_srun_tasks_are_refused():
    """`export RANK=0 WORLD_SIZE=1`, then sbatch/srun with 4 tasks: every task would be a world
    of one, all writing the same --out. Set by torchrun (or matching SLURM's), they are used."""
    task = {"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0",
            "SLURM_JOB_ID": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    with pytest.raises(dist.LauncherError, match=r"RANK=0 WORLD_SIZE=1 are set, but this is srun "
                                                 r"task 2 of 4"):
        dist.resolve({**task, "RANK": "0", "WORLD_SIZE": "1"})
    assert dist.resolve({**task, "RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "0"})[1:4] == (2, 0, 4)
    torchrun = {**task, "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                "TORCHELASTIC_RUN_ID": "x"}
    assert dist.resolve(torchrun)[1:4] == (5, 1, 8)


def test_one_machine_means_every_host_is_loopback():
    """The local cluster's node1 and node2 both resolve to 127.0.0.1: one machine. A real node
    whose own name resolves to 127.0.1.1 beside another at a network address is not."""
    assert dist.all_loopback(["localhost", "127.0.0.1", "127.0.1.1"])
    assert not dist.all_loopback(["127.0.1.1", "10.255.255.1"])
    assert not dist.all_loopback([])


def test_route_address_is_the_local_end_of_the_route():
    """What mpirun's rank 0 gives the other hosts as MASTER_ADDR (several hosts): its own address
    on the way to them, never a loopback alias unless the peer is itself."""
    assert dist.route_address("127.0.0.1") == "127.0.0.1"
    import socket
    with pytest.raises(OSError):
        dist.route_address("no-such-host.invalid")
    assert socket.inet_aton(dist.route_address("localhost"))


def test_gloo_interface_on_hosts_whose_name_resolves_to_loopback(monkeypatch):
    """Several hosts, this one named as 127.0.1.1 in /etc/hosts (Debian): gloo would bind that,
    unreachable from the others; the interface on the route to MASTER_ADDR is chosen instead.
    Real routes and interfaces of this machine; its host name is the part played."""
    import socket
    import psutil
    mine = [(name, a.address) for name, entries in psutil.net_if_addrs().items()
            for a in entries if a.family == socket.AF_INET
            and not a.address.startswith("127.")]
    if not mine:
        pytest.skip("this machine has no network interface besides loopback")
    ifname, address = mine[0]
    env = {"MASTER_ADDR": address}
    assert dist.gloo_interface({**env, "GLOO_SOCKET_IFNAME": "ib0"}, single=False) is None
    assert dist.gloo_interface(env, single=True) == "lo"          # one machine
    monkeypatch.setattr(dist.socket, "gethostname", lambda: "localhost")
    assert dist.gloo_interface(env, single=False) == ifname
    assert dist.gloo_interface({"MASTER_ADDR": "127.0.0.1"}, single=False) == "lo"
    monkeypatch.setattr(dist.socket, "gethostname", lambda: address)   # a name gloo can use
    assert dist.gloo_interface(env, single=False) is None
    with pytest.raises(dist.LauncherError, match="GLOO_SOCKET_IFNAME"):
        dist.interface_of("10.255.255.1", {"lo": []})


def test_gpu_of_a_local_rank_mock_device_counts():
    """(No GPU here: device counts are given.) srun --gpus-per-task binds one GPU to each task,
    which sees it as cuda:0; with all of a node's GPUs visible, the local rank picks."""
    assert dist.cuda_index(3, 1) == 0
    assert dist.cuda_index(3, 4) == 3
    with pytest.raises(dist.LauncherError, match="local rank 4 but 4 GPUs are visible"):
        dist.cuda_index(4, 4)
