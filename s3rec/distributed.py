"""Distributed set-up: the ONLY module that reads launcher variables.

Recognised launchers (checked in this order):
  env        RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT already set: the
             `deepspeed` launcher (also passes --local_rank), `torchrun`, submitit's
             TorchDistributedEnvironment().export()
  slurm      an `srun` task: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_STEP_ID. MASTER_ADDR
             defaults to the first host of the step's node list (`scontrol show hostnames`),
             MASTER_PORT is derived from the job and step id so concurrent jobs do not collide.
  mpi        `mpirun` / `mpiexec` (Open MPI: OMPI_COMM_WORLD_*, MPICH/hydra: PMI_RANK/PMI_SIZE,
             PMIx: PMIX_RANK): ranks come from mpi4py; rank 0 picks the address and a free port
             and broadcasts them (single host: 127.0.0.1; DeepSpeed's own discovery would use
             `hostname -I`, which is not loopback here).
  single     none of the above: one process; RANK=0 WORLD_SIZE=1 are set here, since
             deepspeed.init_distributed() would otherwise try MPI discovery.

After `setup()` the usual variables are set for every launcher and the process group is up
(gloo on CPU, nccl on CUDA). Everything else asks this module for ranks.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    launcher: str          # env | slurm | mpi | single
    single_host: bool
    device: torch.device
    backend: str


_INFO: DistInfo | None = None


class LauncherError(RuntimeError):
    """The launcher variables are inconsistent; the message names the variable."""


def _int_env(env: dict, name: str) -> int:
    try:
        return int(env[name])
    except KeyError:
        raise LauncherError(f"launcher variable {name} is not set") from None
    except ValueError:
        raise LauncherError(f"launcher variable {name}={env[name]!r} is not an integer") from None


def detect_launcher(env: dict | None = None) -> str:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return "env"
    # SLURM_STEP_ID distinguishes an srun task from a batch script (which has SLURM_PROCID=0 and
    # SLURM_NTASKS of the whole allocation, and must not believe it is one of several ranks).
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and "SLURM_NTASKS" in env:
        return "slurm"
    if any(k in env for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK", "PMIX_RANK")):
        return "mpi"
    return "single"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def _slurm_hosts(env: dict) -> list[str]:
    """Host names of this srun step (of the job, outside a step), in SLURM's order."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise LauncherError("srun task without SLURM_STEP_NODELIST/SLURM_JOB_NODELIST: "
                            "cannot choose MASTER_ADDR (set it yourself)")
    try:
        return subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                              capture_output=True, text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as e:
        raise LauncherError(f"`scontrol show hostnames {nodelist}` failed ({e}); "
                            f"set MASTER_ADDR yourself") from None


def all_loopback(hosts: list[str]) -> bool:
    """Every host resolves to loopback here: the "nodes" are this one machine (the local test
    cluster). Asked of every host, not of MASTER_ADDR alone: where a node's own name resolves to
    127.0.1.1 (Debian's /etc/hosts), the master's ranks would otherwise bind to loopback while
    the other nodes' ranks try to reach them over the network."""
    return bool(hosts) and all(_is_loopback(h) for h in hosts)


def _from_slurm(env: dict) -> tuple[int, int, int, bool]:
    rank, world = _int_env(env, "SLURM_PROCID"), _int_env(env, "SLURM_NTASKS")
    local = _int_env(env, "SLURM_LOCALID")
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    hosts = _slurm_hosts(env) if nodes > 1 or "MASTER_ADDR" not in env else []
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = hosts[0]
    if "MASTER_PORT" not in env:
        job, step = _int_env(env, "SLURM_JOB_ID"), int(env.get("SLURM_STEP_ID", "0") or 0)
        env["MASTER_PORT"] = str(20000 + (job * 31 + step) % 20000)
    return rank, local, world, nodes == 1 or all_loopback(hosts)


def _from_mpi(env: dict) -> tuple[int, int, int, bool]:
    try:
        from mpi4py import MPI
    except ImportError:
        raise LauncherError("started by mpirun/mpiexec (PMI/OMPI variables set) but mpi4py is "
                            "not installed: pip install mpi4py") from None
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank).Get_rank()
    hosts = comm.allgather(socket.gethostname())
    single = len(set(hosts)) == 1
    chosen = None
    if rank == 0:
        try:
            addr = env.get("MASTER_ADDR") or ("127.0.0.1" if single else route_address(
                next(h for h in hosts if h != hosts[0])))
            chosen = (addr, env.get("MASTER_PORT") or str(free_port()), None)
        except OSError as e:
            chosen = (None, None, f"rank 0 on {hosts[0]} cannot tell its address towards the "
                                  f"other hosts ({e}); set MASTER_ADDR")
    addr, port, error = comm.bcast(chosen, root=0)     # every rank stops on rank 0's error
    if error:
        raise LauncherError(error)
    env["MASTER_ADDR"], env["MASTER_PORT"] = addr, port
    return rank, local, world, single


def route_address(peer: str) -> str:
    """This host's address on its route to `peer` (a UDP connect sends nothing; it only picks
    the route). Not gethostbyname(gethostname()): on Debian-style hosts that is 127.0.1.1, which
    the other hosts cannot reach."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((peer, 9))
        return s.getsockname()[0]


def interface_of(address: str, addrs: dict | None = None) -> str:
    """The name of the network interface that holds `address` (psutil.net_if_addrs() shape)."""
    if addrs is None:
        import psutil   # a DeepSpeed dependency
        addrs = psutil.net_if_addrs()
    for name, entries in addrs.items():
        if any(e.address == address for e in entries):
            return name
    raise LauncherError(f"no network interface holds {address}, this host's address towards "
                        f"MASTER_ADDR; set GLOO_SOCKET_IFNAME to the interface the hosts share")


def gloo_interface(env: dict, single: bool) -> str | None:
    """The GLOO_SOCKET_IFNAME to set, or None to leave gloo's choice. gloo binds the address its
    host name resolves to. One machine: loopback, whatever the name resolves to. Several hosts
    whose own name resolves to loopback (127.0.1.1 in Debian's /etc/hosts): that address, which
    the other hosts cannot reach, so the interface on the route to MASTER_ADDR instead. (The
    GPU path needs this too: its CPU-side group is gloo.)"""
    if "GLOO_SOCKET_IFNAME" in env:
        return None
    if single:
        return "lo"
    if _is_loopback(socket.gethostname()) and env.get("MASTER_ADDR"):
        return interface_of(route_address(env["MASTER_ADDR"]))
    return None


# Set by a launcher that starts the ranks itself (torchrun; the deepspeed launcher; this suite's
# grid jobs for their one-process child): RANK/WORLD_SIZE beside them are theirs.
OWN_RANK_MARKERS = ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "LOCAL_SIZE")


def _check_not_inherited(env: dict, rank: int, world: int) -> None:
    """An srun task whose RANK/WORLD_SIZE disagree with SLURM's and that no launcher set: sbatch
    and srun pass on the submitting shell's environment, so a `RANK=0 WORLD_SIZE=1` exported
    there would make every task a world of its own, all writing the same --out."""
    if "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return
    if any(k in env for k in OWN_RANK_MARKERS):
        return
    procid, ntasks = _int_env(env, "SLURM_PROCID"), _int_env(env, "SLURM_NTASKS")
    if (rank, world) != (procid, ntasks):
        raise LauncherError(
            f"RANK={rank} WORLD_SIZE={world} are set, but this is srun task {procid} of {ntasks} "
            f"(SLURM_PROCID, SLURM_NTASKS): they came from the environment the job was submitted "
            f"from; unset RANK and WORLD_SIZE there (or start torchrun/deepspeed inside srun)")


def resolve(env: dict | None = None, local_rank_arg: int | None = None) -> tuple[str, int, int, int, bool]:
    """Fill RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in `env` (default os.environ)
    from whichever launcher started us. Returns (launcher, rank, local_rank, world_size, single_host)."""
    env = os.environ if env is None else env
    launcher = detect_launcher(env)
    if launcher == "env":
        rank, world = _int_env(env, "RANK"), _int_env(env, "WORLD_SIZE")
        _check_not_inherited(env, rank, world)
        if "LOCAL_RANK" in env:
            local = _int_env(env, "LOCAL_RANK")
        elif local_rank_arg is not None and local_rank_arg >= 0:
            local = local_rank_arg
        else:
            if world > 1 and not _is_loopback(env.get("MASTER_ADDR", "127.0.0.1")):
                raise LauncherError(
                    f"RANK and WORLD_SIZE are set but LOCAL_RANK is not, and MASTER_ADDR "
                    f"{env['MASTER_ADDR']} is not loopback: with processes on several hosts the "
                    f"local rank (which GPU) cannot be told from the global one; set LOCAL_RANK "
                    f"(torchrun and the deepspeed launcher do)")
            local = 0 if world == 1 else rank     # one host: local = global rank
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in env:
            if world > 1:
                raise LauncherError("RANK/WORLD_SIZE set but MASTER_PORT is not")
            env["MASTER_PORT"] = str(free_port())
        local_world = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or 0)  # torchrun | deepspeed
        single = local_world == world or _is_loopback(env["MASTER_ADDR"])
    elif launcher == "slurm":
        rank, local, world, single = _from_slurm(env)
    elif launcher == "mpi":
        rank, local, world, single = _from_mpi(env)
    else:
        rank, local, world, single = 0, 0, 1, True
        env["MASTER_ADDR"] = env.get("MASTER_ADDR", "127.0.0.1")
        env["MASTER_PORT"] = env.get("MASTER_PORT") or str(free_port())
    if not 0 <= rank < world:
        raise LauncherError(f"rank {rank} is outside world size {world} (launcher {launcher})")
    env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"] = str(rank), str(local), str(world)
    return launcher, rank, local, world, single


def cuda_index(local_rank: int, visible: int) -> int:
    """The GPU of a process with this local rank when `visible` GPUs are visible to it: the one
    GPU a scheduler bound to the task (srun --gpus-per-task / --gpu-bind: every task sees its own
    as cuda:0), else the local rank's."""
    if visible == 1:
        return 0
    if not 0 <= local_rank < visible:
        raise LauncherError(f"local rank {local_rank} but {visible} GPUs are visible to it "
                            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): "
                            f"start at most one process per GPU on each node")
    return local_rank


def setup(local_rank_arg: int | None = None, timeout_s: int = 1800) -> DistInfo:
    """Resolve the launcher, then start the process group through DeepSpeed. Idempotent."""
    global _INFO
    if _INFO is not None:
        return _INFO
    launcher, rank, local, world, single = resolve(None, local_rank_arg)
    ifname = gloo_interface(os.environ, single)
    if ifname:
        os.environ["GLOO_SOCKET_IFNAME"] = ifname
    if device_type() == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # ranks on one host share its cores (torchrun sets OMP_NUM_THREADS=1; others do not)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // _local_world(launcher, world)))
    if torch.cuda.is_available():
        device = torch.device("cuda", cuda_index(local, torch.cuda.device_count()))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if world == 1:
        _init_alone(backend, timedelta(seconds=timeout_s))
    import deepspeed  # late: importing it costs ~1 s and prints accelerator warnings
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(seconds=timeout_s))
    if world > 1:
        _cpu_group()     # collective: every rank creates it now, in the same order
    _INFO = DistInfo(rank, local, world, launcher, single, device, backend)
    return _INFO


def _init_alone(backend: str, timeout: timedelta) -> None:
    """The process group of a one-process run, on an in-process store: torch's TCPStore (the
    env:// rendezvous) listens on every interface, whatever MASTER_ADDR says, so a lone run
    would take connections from the network. gloo still opens a socket of its own, on the
    interface GLOO_SOCKET_IFNAME names: loopback, since a lone process has no peer elsewhere.
    DeepSpeed then adopts the group as it is."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            timeout=timeout)


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _local_world(launcher: str, world: int) -> int:
    env = os.environ
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        if env.get(key, "").isdigit():
            return int(env[key])
    if launcher == "slurm":
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE", "").split("(")[0].split(",")[0]
        if per_node.isdigit():
            return int(per_node)
    if launcher == "mpi":
        from mpi4py import MPI
        return MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED).Get_size()
    return world if world > 1 else 1


def info() -> DistInfo:
    if _INFO is None:
        raise RuntimeError("s3rec.distributed.setup() has not been called")
    return _INFO


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op at world size 1); returns the tensor."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


_CPU_GROUP = None


def _cpu_group():
    """A gloo group for small host-side reductions (counts, flags): with NCCL these would need a
    GPU tensor, a copy, and a host sync behind the queued kernels."""
    global _CPU_GROUP
    if _CPU_GROUP is None:
        _CPU_GROUP = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else \
            dist.group.WORLD
    return _CPU_GROUP


def all_reduce_cpu(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place sum or max of a CPU tensor over ranks, without touching the accelerator."""
    if get_world_size() > 1:
        red = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        dist.all_reduce(tensor, op=red, group=_cpu_group())
    return tensor


def broadcast_object(obj, src: int = 0):
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def log_main(msg: str) -> None:
    if is_main():
        print(msg, file=sys.stderr, flush=True)


def cleanup() -> None:
    """Destroy the process group (and the host-side group). setup() may be called again."""
    global _INFO, _CPU_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _INFO, _CPU_GROUP = None, None
