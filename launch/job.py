"""The job of grid cells: each cell's `s3rec-pretrain`, then its `s3rec-finetune`s, as child
processes.

A job runs `executor.cells_per_job` cells side by side, each in its own child process and
folder; one that fails leaves the others to finish, and the job then fails naming it. A cell of
world size N (`executor.nodes` x `executor.tasks_per_node`) is one job of N tasks (srun under
SLURM, N local processes otherwise): every task runs the same commands, with its rank, and the
training's own rendezvous joins them.

Only strings and paths are pickled into a job (no model, no config object). On preemption or a
time-out submitit calls `checkpoint()` (SIGUSR2); the training child got the same signal from
SLURM, saves a checkpoint and exits; we wait for it, then submitit requeues a fresh copy of this
job, and the training resumes from RUN/checkpoints/latest on its own. A SLURM preemption that
sends SIGTERM instead (PreemptMode=REQUEUE, no user signal) reaches the child alone; it saves
and exits, and the job requeues itself (`requeue_slurm_job`).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import submitit

from s3rec.launch.grid import CHILD_SAVE_TIMEOUT_S, STAGE_PRODUCT, stage_done

CELL_FAILED = "StageFailed"    # a failed cell's own line: [KEY] StageFailed: ERROR


def free_port() -> int:
    """A free TCP port on loopback: several cells may share a machine (and its MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def task_env(world_size: int, stage_index: int) -> dict:
    """The environment of a training child: world size 1 trains alone; a larger cell takes its
    rank from the job's task (submitit's JobEnvironment: SLURM's srun task, or the local
    executor's process), its rendezvous host from the job's first node and its port from the
    job id, so that every task of the job agrees on both without talking."""
    if world_size == 1:
        return single_process_env()
    je = submitit.JobEnvironment()
    if je.num_tasks != world_size:
        raise StageFailed(f"job {je.job_id} has {je.num_tasks} tasks, the cell wants world size "
                          f"{world_size} (executor.nodes x executor.tasks_per_node)")
    env = dict(os.environ)
    hosts = je.hostnames
    master = "127.0.0.1" if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" else hosts[0]
    env.update(RANK=str(je.global_rank), WORLD_SIZE=str(world_size),
               LOCAL_RANK=str(je.local_rank), LOCAL_WORLD_SIZE=str(world_size // len(hosts)
                                                                   if hosts else world_size),
               MASTER_ADDR=os.environ.get("S3REC_MASTER_ADDR", master),
               MASTER_PORT=str(rendezvous_port(str(je.job_id), stage_index)))
    # GLOO_SOCKET_IFNAME is left to s3rec.distributed: loopback for one machine, the route to
    # MASTER_ADDR across nodes (a forced "lo" would strand the other nodes' ranks).
    return env


# Stages of one cell get consecutive ports: a cell has fewer than this many stages.
PORTS_PER_JOB = 64


def rendezvous_port(job_id: str, stage_index: int) -> int:
    """A port every task of a job derives alike from its id (`123`, or `123_4` in an array):
    the tasks of an array, which may share a node, and a cell's stages each get their own."""
    base, _, task = job_id.partition("_")
    n = int(re.sub(r"\D", "", base) or 0) * 1000 + int(re.sub(r"\D", "", task) or 0)
    return 20000 + (n * PORTS_PER_JOB + stage_index % PORTS_PER_JOB) % 20000


def single_process_env() -> dict:
    """The child trains alone (world size 1); explicit rank variables keep it from guessing a
    launcher from the SLURM variables it inherits from this job."""
    env = dict(os.environ)
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def was_cancelled(job_id: str, cancelled_file: str | None) -> bool:
    """Whether `s3rec-grid cancel` stopped this job (runner.cancelled_path lists it)."""
    if not cancelled_file:
        return False
    try:
        return job_id in json.loads(Path(cancelled_file).read_text())
    except (OSError, ValueError):
        return False


def requeue_slurm_job(key: str, cancelled_file: str | None = None) -> None:
    """The training saved a checkpoint on a signal that did not come through submitit: SLURM's
    own SIGTERM when it preempts the job (PreemptMode=REQUEUE with a GraceTime), which reaches
    every process of the step while submitit only logs it. SLURM does not requeue a job that
    ends by itself within the grace time, so the job requeues itself, as submitit does after
    its USR2, and leaves without a result: the fresh start resumes from latest."""
    job_id = submitit.JobEnvironment().job_id      # 123 or, in an array, 123_4
    if was_cancelled(job_id, cancelled_file):
        # scancel sends the same SIGTERM as a preemption, and SLURM shows both jobs as
        # COMPLETING: a requeue would bring back what `s3rec-grid cancel` was asked to stop
        print(f"[{key}] training saved a checkpoint on SLURM's signal; job {job_id} was "
              f"cancelled, so it is not requeued (launch the grid again to resume)", flush=True)
        raise SystemExit(-1)
    print(f"[{key}] training saved a checkpoint on SLURM's signal (preemption); requeueing job "
          f"{job_id}", flush=True)
    res = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True,
                         timeout=60)
    if res.returncode != 0:
        # Preempted without a grace time, SLURM requeues the job itself and refuses ours ("Job
        # is pending execution"). Any other refusal: the cell shows failed, the next launch
        # resumes it. Either way there is no result to write.
        print(f"[{key}] scontrol requeue {job_id}: {res.stderr.strip() or res.returncode} "
              f"(SLURM requeues a job it preempted without a grace time itself; otherwise "
              f"launch the grid again to resume this cell)", flush=True)
    raise SystemExit(-1)    # not an Exception: submitit writes no result (it does the same)


def exited(pid: int, timeout_s: float) -> bool:
    """Whether the child `pid` has exited within `timeout_s`, without reaping it (WNOWAIT), so
    that its Popen still gets its exit status."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
        except ChildProcessError:    # reaped already
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


class StageFailed(RuntimeError):
    """A training command exited non-zero; the message carries its run.json error line."""


# How long a task of rank > 0 waits, after its training exited 0, for rank 0's to have written
# the stage's products (rank 0 alone writes them, and may exit a little later).
PRODUCT_WAIT_S = 120


def chain_spec(key: str, stages: list[tuple[str, list[str], str]]) -> dict:
    """A cell as a job carries it: its key and its (stage, command, run folder) in order."""
    return {"key": key, "stages": [{"stage": st, "cmd": list(cmd), "dir": str(d)}
                                   for st, cmd, d in stages]}


class _ChainRun:
    """One cell's progress inside a job: the stage running, and how it ended."""

    def __init__(self, spec: dict) -> None:
        self.key = spec["key"]
        self.stages = spec["stages"]
        self.next = 0                       # index of the next stage to consider
        self.proc: subprocess.Popen | None = None
        self.stage: dict | None = None      # the stage `proc` runs
        self.t0 = 0.0
        self.outcome: str | None = None     # done | failed | preempted
        self.error = ""
        self.readers: list[threading.Thread] = []   # a packed cell's output, prefixed


class CellsJob(submitit.helpers.Checkpointable):
    """Callable run by submitit for `chains` (chain_spec dicts), side by side; `world_size`: of
    each cell (more than 1 only for a job of one cell)."""

    def __init__(self, chains: list[dict], world_size: int = 1,
                 cancelled_file: str | None = None) -> None:
        self.chains = chains
        self.world_size = world_size
        self.cancelled_file = cancelled_file    # runner.cancelled_path: job ids cancel stopped
        self._runs: list[_ChainRun] = []

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_runs"] = []     # live process handles never travel
        return state

    @property
    def keys(self) -> str:
        return ", ".join(c["key"] for c in self.chains)

    def _rank(self) -> int:
        return 0 if self.world_size == 1 else submitit.JobEnvironment().global_rank

    def __call__(self) -> dict:
        self._runs = runs = [_ChainRun(c) for c in self.chains]
        try:
            # Poll rather than wait(): checkpoint() runs as a signal handler on this thread and
            # must be able to reap the children itself; a blocking wait() would hold Popen's lock.
            while any(r.outcome is None for r in runs):
                for r in runs:
                    if r.outcome is None and r.proc is None:
                        self._start_next(r)
                    elif r.proc is not None and r.proc.poll() is not None:
                        self._finish(r)
                time.sleep(0.5)
        finally:
            # Leaving early (the local controller's SIGINT at its time limit or on cancel, any
            # error): no training may outlive this job and train on unwatched.
            for r in runs:
                if r.proc is not None and r.proc.poll() is None:
                    r.proc.kill()
                    r.proc.wait()
        failed = [r for r in runs if r.outcome == "failed"]
        if any(r.outcome == "preempted" for r in runs) and \
                os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            if self._rank() != 0:
                # Rank 0 requeues the job, and with it every task: a second `scontrol
                # requeue` from here could land on the job's fresh start and stop it.
                print(f"[{self.keys}] training saved a checkpoint on SLURM's signal; rank 0 "
                      f"requeues the job", flush=True)
                raise SystemExit(-1)
            requeue_slurm_job(self.keys, self.cancelled_file)
        if failed:
            done = [r.key for r in runs if r.outcome == "done"]
            raise StageFailed("; ".join(r.error for r in failed)
                              + (f" (done in the same job: {', '.join(done)})" if done else ""))
        return {r.key: r.outcome for r in runs}

    def _start_next(self, r: _ChainRun) -> None:
        while r.next < len(r.stages):
            st = r.stages[r.next]
            r.next += 1
            if stage_done(Path(st["dir"]), STAGE_PRODUCT[st["stage"]]):
                continue
            self._start(r, st, r.next - 1)
            return
        r.outcome = "done"

    def _start(self, r: _ChainRun, st: dict, index: int) -> None:
        print(f"[{r.key}] $ {shlex.join(st['cmd'])}", flush=True)   # pasteable: values quoted
        r.stage, r.t0 = st, time.time()
        env = task_env(self.world_size, index)
        if self.world_size > 1:
            # Where each rank ran: submitit's own line names the machine (socket.gethostname()),
            # which is not the SLURM node where several nodes share one machine.
            node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
            print(f"[{r.key}] rank {env['RANK']} of {env['WORLD_SIZE']} on node {node}, "
                  f"rendezvous {env['MASTER_ADDR']}:{env['MASTER_PORT']}", flush=True)
        if len(self.chains) == 1:
            r.proc = subprocess.Popen(st["cmd"], env=env)
            return
        # Several cells share the job's log: each line of a cell's training carries its key.
        # stdout and stderr stay apart, as in a job of one cell: the log a status row names
        # (the job's stderr) holds the training's progress lines either way.
        r.proc = subprocess.Popen(st["cmd"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        r.readers = [threading.Thread(target=_prefix_lines, args=(pipe, r.key, out), daemon=True)
                     for pipe, out in ((r.proc.stdout, sys.stdout), (r.proc.stderr, sys.stderr))]
        for t in r.readers:
            t.start()

    def _finish(self, r: _ChainRun) -> None:
        code, st = r.proc.returncode, r.stage
        for t in r.readers:
            t.join(timeout=10)
        r.proc, r.readers = None, []
        run_dir, cmd = Path(st["dir"]), st["cmd"]
        print(f"[{r.key}] exit {code} after {time.time() - r.t0:.1f} s", flush=True)
        if code == 0 and self._rank() != 0:
            _wait_for_products(run_dir, st["stage"])
        info = {}
        try:
            info = json.loads((run_dir / "run.json").read_text())
        except (OSError, json.JSONDecodeError):
            pass
        name = Path(cmd[0]).name
        if code != 0:
            product = STAGE_PRODUCT.get(info.get("stage", ""))
            if product is not None and stage_done(run_dir, product):
                # A signal (a cancel, a preemption) that lands while the finished training
                # shuts down kills it: Python restores the default handlers as it exits.
                # Its products are whole, so the stage is done.
                print(f"[{r.key}] {name} was stopped (exit {code}) after it had finished: "
                      f"{run_dir.name} is done", flush=True)
                return
            self._fail(r, f"{r.key}: {name} exited with {code}: "
                          f"{info.get('error') or 'no error recorded in run.json'}")
            return
        if info.get("status") == "preempted" and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            r.outcome = "preempted"
            return
        if info.get("status") != "done":
            # Exit 0 after a preemption save (run.json "preempted"): the stage is unfinished,
            # so the next stage must not start; the next launch resumes it from latest.
            self._fail(r, f"{r.key}: {name} stopped with run.json status "
                          f"{info.get('status')!r} at epoch {info.get('epoch')}; launch again "
                          f"to resume")

    @staticmethod
    def _fail(r: _ChainRun, error: str) -> None:
        """The cell failed: on the job's stderr, one line of its own (runner.cell_error_line
        reads it for the cell's status; the job's StageFailed joins every failed cell's)."""
        r.outcome, r.error = "failed", error
        print(f"[{r.key}] {CELL_FAILED}: {error}", file=sys.stderr, flush=True)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called in the signal handler: let every child finish saving, then requeue a fresh job."""
        live = [r.proc for r in self._runs if r.proc is not None and r.proc.poll() is None]
        deadline = time.monotonic() + CHILD_SAVE_TIMEOUT_S
        for proc in live:
            # Under SLURM the signal reached every process of the step, the children included;
            # the local executor signals only us, so pass it on. Asked of submitit, not of
            # SLURM_JOB_ID: a local grid launched inside an salloc or sbatch job has that too.
            if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
                proc.send_signal(signal.SIGUSR2)
        for proc in live:
            # Not proc.wait(): the signal may have landed while the loop's poll() held Popen's
            # lock, which this handler (same thread) could then never take: wait(timeout)
            # would spin to its end and a kill()'s wait() would block for ever. The children
            # are reaped once this handler has returned.
            if not exited(proc.pid, max(0.0, deadline - time.monotonic())):
                print(f"[{self.keys}] training did not exit {CHILD_SAVE_TIMEOUT_S} s after the "
                      f"signal; killing it (it resumes from its last checkpoint)", file=sys.stderr)
                proc.kill()
                exited(proc.pid, 10)
        fresh = CellsJob(self.chains, self.world_size, self.cancelled_file)
        return submitit.helpers.DelayedSubmission(fresh)


def _prefix_lines(stream, key: str, out) -> None:
    for line in iter(stream.readline, b""):
        out.write(f"[{key}] {line.decode(errors='replace')}")
        out.flush()
    stream.close()


def _wait_for_products(run_dir: Path, stage: str) -> None:
    """Rank > 0: until rank 0 has written the stage's products, or its run.json says it
    stopped otherwise (preempted, failed)."""
    deadline = time.monotonic() + PRODUCT_WAIT_S
    while time.monotonic() < deadline:
        if stage_done(run_dir, STAGE_PRODUCT[stage]):
            return
        try:
            if json.loads((run_dir / "run.json").read_text()).get("status") in ("preempted",
                                                                                  "failed"):
                return
        except (OSError, json.JSONDecodeError):
            pass
        time.sleep(0.5)
