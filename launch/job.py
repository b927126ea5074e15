"""The job of one grid cell: `s3rec-pretrain`, then `s3rec-finetune`, as child processes.

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
import time
from pathlib import Path

import submitit

from s3rec.launch.grid import CHILD_SAVE_TIMEOUT_S, STAGE_PRODUCT, stage_done


def free_port() -> int:
    """A free TCP port on loopback: several cells may share a machine (and its MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class CellJob(submitit.helpers.Checkpointable):
    """Callable run by submitit for one cell. `pretrain_cmd` is None for finetune-only cells."""

    def __init__(self, key: str, pretrain_cmd: list[str] | None, pretrain_dir: str | None,
                 finetune_cmd: list[str], finetune_dir: str,
                 cancelled_file: str | None = None) -> None:
        self.key = key
        self.cancelled_file = cancelled_file    # runner.cancelled_path: job ids cancel stopped
        self.pretrain_cmd = pretrain_cmd
        self.pretrain_dir = pretrain_dir
        self.finetune_cmd = finetune_cmd
        self.finetune_dir = finetune_dir
        self._proc: subprocess.Popen | None = None

    def getattr_cancelled(self) -> str | None:
        return getattr(self, "cancelled_file", None)    # jobs pickled without it: None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_proc"] = None   # a live process handle never travels
        return state

    def __call__(self) -> dict:
        if self.pretrain_cmd is not None and not stage_done(Path(self.pretrain_dir),
                                                              STAGE_PRODUCT["pretrain"]):
            self._run(self.pretrain_cmd, Path(self.pretrain_dir))
        if not stage_done(Path(self.finetune_dir), STAGE_PRODUCT["finetune"]):
            self._run(self.finetune_cmd, Path(self.finetune_dir))
        return json.loads((Path(self.finetune_dir) / "results.json").read_text())

    def _run(self, cmd: list[str], run_dir: Path) -> None:
        print(f"[{self.key}] $ {shlex.join(cmd)}", flush=True)   # pasteable: values are quoted
        t0 = time.time()
        self._proc = proc = subprocess.Popen(cmd, env=single_process_env())
        try:
            # Poll rather than wait(): checkpoint() runs as a signal handler on this thread and
            # must be able to reap the child itself; a blocking wait() would hold Popen's lock.
            while (code := proc.poll()) is None:
                time.sleep(0.5)
        finally:
            # Leaving early (the local controller's SIGINT at its time limit or on cancel, any
            # error): the training must not outlive this job and train on unwatched.
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            self._proc = None
        print(f"[{self.key}] exit {code} after {time.time() - t0:.1f} s", flush=True)
        info = {}
        try:
            info = json.loads((run_dir / "run.json").read_text())
        except (OSError, json.JSONDecodeError):
            pass
        if code != 0:
            product = STAGE_PRODUCT.get(info.get("stage", ""))
            if product is not None and stage_done(run_dir, product):
                # A signal (a cancel, a preemption) that lands while the finished training
                # shuts down kills it: Python restores the default handlers as it exits.
                # Its products are whole, so the stage is done.
                print(f"[{self.key}] {Path(cmd[0]).name} was stopped (exit {code}) after it "
                      f"had finished: {run_dir.name} is done", flush=True)
                return
            raise StageFailed(f"{self.key}: {Path(cmd[0]).name} exited with {code}: "
                              f"{info.get('error') or 'no error recorded in run.json'}")
        if info.get("status") == "preempted" and os.environ.get("SUBMITIT_EXECUTOR") == "slurm":
            requeue_slurm_job(self.key, self.getattr_cancelled())
        if info.get("status") != "done":
            # Exit 0 after a preemption save (run.json "preempted"): the stage is unfinished,
            # so the next stage must not start; the next launch resumes it from latest.
            raise StageFailed(f"{self.key}: {Path(cmd[0]).name} stopped with run.json status "
                              f"{info.get('status')!r} at epoch {info.get('epoch')}; "
                              f"launch again to resume")

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called in the signal handler: let the child finish saving, then requeue a fresh job."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            # Under SLURM the signal reached every process of the step, the child included;
            # the local executor signals only us, so pass it on. Asked of submitit, not of
            # SLURM_JOB_ID: a local grid launched inside an salloc or sbatch job has that too.
            if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
                proc.send_signal(signal.SIGUSR2)
            # Not proc.wait(): the signal may have landed while _run's poll() held Popen's
            # lock, which this handler (same thread) could then never take: wait(timeout)
            # would spin to its end and a kill()'s wait() would block for ever. The child is
            # reaped by _run once this handler has returned.
            if not exited(proc.pid, CHILD_SAVE_TIMEOUT_S):
                print(f"[{self.key}] training did not exit {CHILD_SAVE_TIMEOUT_S} s after the "
                      f"signal; killing it (it resumes from its last checkpoint)", file=sys.stderr)
                proc.kill()
                exited(proc.pid, 10)
        fresh = CellJob(self.key, self.pretrain_cmd, self.pretrain_dir, self.finetune_cmd,
                        self.finetune_dir, self.getattr_cancelled())
        return submitit.helpers.DelayedSubmission(fresh)
