"""Submitting a grid with submitit, and following its cells.

    run = launch_grid(grid)          # submits the unfinished cells (an array on SLURM)
    run.wait()                       # until every cell is done or failed; never hangs on a dead job
    run.states()                     # cell key -> CellState(state, detail)
    run.records()                    # finished cells: axes + test metrics
    run.cancel()

A launch records its jobs in OUT/_grid/jobs.json (cell key -> executor, job id, submitit folder),
so a later launch, or `s3rec-grid status`, in another process knows what is queued. Launching
again submits nothing for cells that are done or still queued, and resubmits the others (their
training resumes from checkpoints/latest). A launch holds OUT/_grid/launch.lock from submitting
until its wait ends, so a second launch of the same grid fails at once instead of training the
same cells twice. The local executor's cells waiting for a free slot are the launch's own to
start; it lists them in OUT/_grid/waiting.json while it holds the lock, so `status` in another
process shows them waiting rather than never submitted.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import re
import shutil
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import psutil
import submitit
from submitit.core.utils import FailedJobError, JobPaths

from s3rec.launch import slurm_state
from s3rec.launch.cell_check import check_cells
from s3rec.launch.grid import (STAGE_PRODUCT, Cell, Grid, GridError, check_data_exists,
                               read_run_json, stage_done)
from s3rec.launch.job import CELL_FAILED, CHILD_SAVE_TIMEOUT_S, CellsJob, chain_spec
from s3rec.atomic_write import write_atomic

STATES = ("pending", "running", "done", "failed")
# A job gone from squeue but without a result file yet: allow this long for the file to appear
# (only for jobs this process saw queued: a fresh process cannot tell when they ended).
RESULT_GRACE_S = 10.0
# The local executor's USR2 comes this long before the time limit at the least: CellJob then
# waits up to CHILD_SAVE_TIMEOUT_S for the training to save, and must finish before the kill.
LOCAL_SIGNAL_DELAY_S = CHILD_SAVE_TIMEOUT_S + 15
_ASK = object()   # state_of's default: ask squeue about this one job


@dataclass
class CellState:
    state: str    # pending | running | done | failed
    detail: str   # one line: the job and its state, or the error


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def local_controller_alive(pid: str, folder: str) -> bool:
    """Whether PID is still submitit's local controller of this job folder. A PID alone is not
    enough: once the job ended the number may belong to any process (or to a zombie)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return False
    return b"submitit.local._local" in argv and os.fsencode(str(folder)) in argv


def _ignore_signal(signum: int, frame: object) -> None:
    """A handler doing nothing: this process still ignores the signal, but exec resets a
    handled signal to its default in the child, where an ignored one stays ignored."""


@contextlib.contextmanager
def interruptible_children():
    """Processes started inside get SIGINT and SIGTERM at their default, whatever this process
    inherited. A launch under `nohup ... &`, as a background job of a script or from a service
    has SIGINT ignored, and so would every controller it starts: Python then never raises the
    KeyboardInterrupt on which submitit's controller stops, and a cancel could not stop it."""
    ignored = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) == signal.SIG_IGN]
    for s in ignored:
        signal.signal(s, _ignore_signal)
    try:
        yield
    finally:
        for s in ignored:
            signal.signal(s, signal.SIG_IGN)


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (a zombie has ended; is_running() tells a reused PID apart)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _grow(tree: list[psutil.Process]) -> list[psutil.Process]:
    """The tree with the children its live members started since it was taken."""
    seen = {p.pid for p in tree}
    for p in _alive(tree):
        try:
            kids = p.children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for k in kids:
            if k.pid not in seen:
                seen.add(k.pid)
                tree.append(k)
    return tree


def _send(pids: list[int], sig: int) -> str | None:
    """Signal each; the error of one that refuses (gone already is not an error)."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        except OSError as e:
            return f"{signal.Signals(sig).name} to PID {pid}: {e}"
    return None


def _kill_group(root: int) -> None:
    """SIGKILL to the process group `root` leads, never to one it only belongs to (a local
    controller shares its launch's group, and with it the launching shell's)."""
    try:
        if os.getpgid(root) == root != os.getpgrp():
            os.killpg(root, signal.SIGKILL)
    except OSError:
        pass


def stop_trees(roots: dict[str, int], wait_s: float) -> tuple[dict[str, str], dict[str, str]]:
    """Stop each root process and everything it started: SIGINT to the root (submitit's local
    controller stops on it and stops its tasks), then SIGTERM to whatever of the tree still runs
    (the training saves a checkpoint on it), then SIGKILL to the root's own process group and
    the rest; each after up to `wait_s` for the tree to end. Returns (key -> the signal it ended
    on, key -> why it is still running)."""
    trees = {k: _snapshot(pid) for k, pid in roots.items()}
    ended: dict[str, str] = {}
    failed: dict[str, str] = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        todo = [k for k in roots if k not in ended and k not in failed]
        for key in todo:
            if sig == signal.SIGKILL:
                _kill_group(roots[key])
            targets = [roots[key]] if sig == signal.SIGINT else \
                [p.pid for p in _alive(_grow(trees[key]))]
            err = _send(targets, sig)
            if err:
                failed[key] = err
        _wait_ended(trees, [k for k in todo if k not in failed], wait_s)
        for key in todo:
            if key not in failed and not _alive(_grow(trees[key])):
                ended[key] = signal.Signals(sig).name
    for key in roots:
        if key not in ended and key not in failed:
            pids = ", ".join(str(p.pid) for p in _alive(trees[key]))
            failed[key] = f"PIDs {pids} still running after SIGINT, SIGTERM and SIGKILL"
    return ended, failed


def _snapshot(pid: int) -> list[psutil.Process]:
    """The process and its descendants, taken before any signal: once a controller has ended
    its orphaned children are no longer found under it."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    return _grow([root])


def _wait_ended(trees: dict[str, list[psutil.Process]], keys: list[str], wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while any(_alive(trees[k]) for k in keys) and time.monotonic() < deadline:
        time.sleep(0.1)


def resolve_commands() -> tuple[str, str]:
    """Absolute paths of the training commands, checked before anything is submitted."""
    exes = []
    for name in ("s3rec-pretrain", "s3rec-finetune"):
        path = shutil.which(name)
        if path is None:
            raise GridError(f"command {name} not found on PATH (pip install -e . in the repository)")
        exes.append(path)
    return exes[0], exes[1]


def cancelled_path(grid: Grid) -> Path:
    """The SLURM job ids `cancel` stopped: a job that saved on scancel's SIGTERM reads it so as
    not to requeue itself as after a preemption (SLURM shows both as COMPLETING)."""
    return grid.out_path / "_grid" / "cancelled.json"


def cell_chain(cell: Cell, exes: tuple[str, str]) -> dict:
    """The cell's stages as its job runs them: the pretraining, then each fine-tune."""
    pre, fines = cell.commands(*exes)
    stages = [("pretrain", pre, cell.pretrain_dir)] if pre is not None else []
    stages += [("finetune", cmd, ft.dir) for cmd, ft in zip(fines, cell.finetunes)]
    return chain_spec(cell.key, stages)


def make_job(cells: list[Cell], exes: tuple[str, str]) -> CellsJob:
    """One job for `cells` (executor.cells_per_job of them at most), side by side."""
    grid = cells[0].grid
    return CellsJob([cell_chain(c, exes) for c in cells], world_size=cells[0].world_size,
                    cancelled_file=str(cancelled_path(grid)))


def packs(cells: list[Cell], per_job: int) -> list[list[Cell]]:
    """The cells to run, `per_job` to a job, in grid order: a relaunch packs only what is left."""
    return [cells[i:i + per_job] for i in range(0, len(cells), per_job)]


def check_slurm_tools(grid: Grid) -> None:
    for tool in ("sbatch", "srun"):    # submitit's SlurmExecutor needs both
        if shutil.which(tool) is None:
            raise GridError(f"{grid.source}: key 'executor.kind': slurm, but {tool} is not "
                            f"on PATH (submit from a SLURM login node, or use --executor local)")


def make_executor(grid: Grid) -> submitit.AutoExecutor:
    ex = grid.executor
    if ex.kind == "slurm":
        check_slurm_tools(grid)
    folder = grid.out_path / "_submitit"
    # AutoExecutor picks SLURM whenever sbatch is on PATH: always name the cluster.
    executor = submitit.AutoExecutor(folder=folder, cluster=ex.kind,
                                     **{f"{ex.kind}_max_num_timeout": ex.max_num_timeout})
    params = dict(timeout_min=ex.timeout_min, name=f"s3rec-{grid.name}", nodes=ex.nodes,
                  tasks_per_node=ex.tasks_per_node, cpus_per_task=ex.cpus_per_task)
    if ex.gpus_per_node:
        params["gpus_per_node"] = ex.gpus_per_node
    if ex.kind == "slurm":
        extra = dict(ex.additional)
        if ex.account:
            extra["account"] = ex.account
        if ex.qos:
            extra["qos"] = ex.qos
        params.update(slurm_array_parallelism=ex.array_parallelism,
                      slurm_signal_delay_s=ex.signal_delay_s,
                      slurm_additional_parameters=extra)
        if ex.partition:
            params["slurm_partition"] = ex.partition
        if ex.mem_gb:
            params["mem_gb"] = ex.mem_gb
    executor.update_parameters(**params)
    if ex.kind == "local":
        # AutoExecutor refuses local_signal_delay_s, and the local default (USR2 30 s before
        # timeout_min) is shorter than CellJob's wait for the training to save: set it on the
        # LocalExecutor itself, keeping at least half the time limit for training.
        delay = min(max(ex.signal_delay_s, LOCAL_SIGNAL_DELAY_S), ex.timeout_min * 30)
        executor._executor.update_parameters(signal_delay_s=delay)
    return executor


class GridRun:
    """Handle on a grid's cells and jobs; built by `launch_grid` or `open_grid` (status only)."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.cells = grid.cells()
        self.registry_path = grid.out_path / "_grid" / "jobs.json"
        self.waiting_path = self.registry_path.with_name("waiting.json")
        self.registry: dict = self._read_registry()
        self.jobs: dict[str, submitit.Job] = {}     # jobs submitted by this process
        self.waiting: list[list[Cell]] = []           # local jobs (packs) not started yet (throttle)
        self.submitted: list[str] = []                # keys submitted by this launch
        self.skipped: dict[str, str] = {}             # key -> why not submitted
        self._gone_since: dict[str, float] = {}
        self._seen_queued: set[str] = set()          # keys whose SLURM job this process saw queued
        self._waiting_elsewhere: dict[str, str] = {}  # key -> PID of the launch it waits in
        self._lock = None                             # OUT/_grid/launch.lock while launching
        self._executor: submitit.AutoExecutor | None = None
        self._exes: tuple[str, str] | None = None
        self.stop_notes: list[str] = []               # set by cancel: jobs that needed force

    def _read_registry(self) -> dict:
        """OUT/_grid/jobs.json ({} before the first launch); a damaged one is named, not
        guessed at: it is what finds the cells' jobs."""
        path = self.registry_path
        if not path.exists():
            return {}
        try:
            registry = json.loads(path.read_text())
            if isinstance(registry, dict) and all(
                    isinstance(e, dict) and {"executor", "job_id", "folder"} <= set(e)
                    for e in registry.values()):
                return registry
            why = "expected {cell key: {executor, job_id, folder, ...}}"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            why = str(e)
        raise GridError(f"{path}: not a job registry this launcher wrote ({why}); restore it, or "
                        f"move it away to launch the grid's unfinished cells afresh")

    @property
    def to_run(self) -> list[str]:
        """Keys this launch runs: submitted, or (local executor) waiting for a free slot."""
        return self.submitted + [c.key for pack in self.waiting for c in pack]

    # ------------------------------------------------------------- submitting
    def check(self) -> None:
        """Every check a launch makes before it submits (--dry-run makes them too): the
        datasets, the runs already in the cells' folders, the commands, the executor's tools,
        and no other launch of this grid running."""
        check_data_exists(self.grid)
        check_cells(self.cells)        # what is in the cells' folders is what the grid asks for
        self._exes = resolve_commands()
        if self.grid.executor.kind == "slurm":
            check_slurm_tools(self.grid)
        holder = self.launch_holder()
        if holder is not None:
            raise GridError(self._locked_message(holder))

    def submit(self) -> "GridRun":
        self.check()
        self._take_lock()
        try:
            todo = self._cells_to_submit()
            if todo:
                self._submit(todo)
        except BaseException:
            self.release()
            raise
        if not self.jobs and not self.waiting:
            self.release()     # nothing of ours to wait for
        return self

    def _cells_to_submit(self) -> list[Cell]:
        # The registry may have changed since __init__ (a launch that ended while we waited).
        self.registry = self._read_registry()
        todo = []
        ids = [e["job_id"] for e in self.registry.values() if e["executor"] == "slurm"]
        queued = slurm_state.queue_states(ids) if ids else {}   # one squeue call for all cells
        for cell in self.cells:
            st = self.state_of(cell, queued)
            if st.state == "done":
                self.skipped[cell.key] = "done"
            elif st.state in ("pending", "running") and cell.key in self.registry \
                    and not ran_former_cell(cell, self.registry[cell.key]):
                self.skipped[cell.key] = f"still queued ({st.detail})"
            else:
                todo.append(cell)
        return todo

    def _submit(self, todo: list[Cell]) -> None:
        self._executor = make_executor(self.grid)
        if self.grid.executor.kind == "slurm":
            # Nothing is recorded before sbatch accepted the whole array: a refused submission
            # leaves jobs.json as it was.
            groups = packs(todo, self.grid.executor.cells_per_job)
            try:
                with self._executor.batch():     # one sbatch --array=0-N%parallelism
                    jobs = [self._executor.submit(make_job(g, self._exes)) for g in groups]
            except FailedJobError as e:     # sbatch ran and refused (partition, account, ...)
                raise GridError(self._sbatch_refused(len(todo), e)) from None
            except FileNotFoundError as e:
                if e.filename != "sbatch":
                    raise
                raise GridError(f"{self.grid.source}: key 'executor.kind': slurm, but sbatch "
                                f"could not be run ({e.strerror}); submit from a SLURM login "
                                f"node, or use --executor local") from None
            for group, job in zip(groups, jobs):
                self._record(group, job)
        else:
            self.waiting = packs(todo, self.grid.executor.cells_per_job)
            self._start_local()

    def _sbatch_refused(self, n: int, e: FailedJobError) -> str:
        """The error line of a submission sbatch refused, with sbatch's own message."""
        src, ex = self.grid.source, self.grid.executor
        msg = " / ".join(ln.strip() for ln in str(e).splitlines() if ln.strip()) or "no message"
        return (f"{src}: sbatch refused the grid's {n} cell{'s' * (n != 1)}, nothing submitted: "
                f"{msg}; check executor.partition ({ex.partition!r}), executor.account "
                f"({ex.account!r}) and executor.qos ({ex.qos!r})")

    @property
    def lock_path(self) -> Path:
        return self.registry_path.with_name("launch.lock")

    def _locked_message(self, holder: str) -> str:
        return (f"grid {self.grid.name} is being launched by PID {holder} (lock "
                f"{self.lock_path}); follow it with `s3rec-grid status`, or stop it first")

    def _take_lock(self) -> None:
        """OUT/_grid/launch.lock, held until the wait ends; another launch holding it is an
        error naming its PID (the lock goes with the process, so a crash never leaves it)."""
        path = self.lock_path
        path.parent.mkdir(parents=True, exist_ok=True)
        f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o666), "r+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = f.read().strip() or "unknown"
            f.close()
            raise GridError(self._locked_message(holder)) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock = f
        self.waiting_path.unlink(missing_ok=True)    # a killed launch's list: its cells are ours

    def release(self) -> None:
        """Let another launch of this grid start (called when the wait ends, and by cancel)."""
        if self._lock is not None:
            self.waiting_path.unlink(missing_ok=True)   # only this launch could start them
            self._lock.close()   # closing the file drops the flock
            self._lock = None

    def _record(self, group: list[Cell], job: submitit.Job) -> None:
        """The cells of one job: each key points at it (and names its partners)."""
        for cell in group:
            self.jobs[cell.key] = job
            self.submitted.append(cell.key)
            self.registry[cell.key] = {
                "executor": self.grid.executor.kind, "job_id": str(job.job_id),
                "folder": str(job.paths.folder), "log": str(job.paths.stderr),
                "submitted": _now(), "cells": [c.key for c in group],
                "world_size": cell.world_size,
                "stages": [[st, str(d)] for st, d in cell.stage_dirs]}
        _write_json(self.registry_path, self.registry)

    def _start_local(self) -> None:
        """The local executor has no array throttle: keep at most array_parallelism running."""
        running = len({str(j.job_id) for j in self.jobs.values() if j.state == "RUNNING"})
        started = not self.waiting_path.exists()     # the first call writes the list
        while self.waiting and running < self.grid.executor.array_parallelism:
            group = self.waiting.pop(0)
            with interruptible_children():
                job = self._executor.submit(make_job(group, self._exes))
            self._record(group, job)
            running += 1
            started = True
        if started:
            self._write_waiting()

    def _write_waiting(self) -> None:
        """OUT/_grid/waiting.json: this launch's PID and the cells it has yet to start."""
        _write_json(self.waiting_path, {"pid": os.getpid(),
                                        "cells": [c.key for pack in self.waiting for c in pack]})

    def read_waiting_elsewhere(self) -> dict[str, str]:
        """Cells waiting for a free slot in another live launch of this grid: key -> its PID.
        waiting.json counts only while the PID it names holds the launch lock; one left by a
        launch that was killed names a PID that no longer does."""
        holder = self.launch_holder()
        if holder is None:
            return {}
        try:
            rec = json.loads(self.waiting_path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(rec, dict) or str(rec.get("pid")) != holder or \
                not isinstance(rec.get("cells"), list):
            return {}
        return {k: holder for k in rec["cells"] if isinstance(k, str)}

    # ------------------------------------------------------------- states
    def state_of(self, cell: Cell, queued=_ASK) -> CellState:
        """`queued`: squeue's answer for the grid's jobs (None: squeue did not answer)."""
        if cell.is_done():
            return CellState("done", f"{cell.finetune_dir}/results.json")
        if any(c.key == cell.key for pack in self.waiting for c in pack):
            return CellState("pending", "waiting for a free local slot")
        if cell.key in self._waiting_elsewhere:
            return CellState("pending", f"waiting for a free local slot in launch PID "
                                        f"{self._waiting_elsewhere[cell.key]}")
        entry = self.registry.get(cell.key)
        if entry is not None and ran_former_cell(cell, entry):
            todo = [d.name for st, d in cell.stage_dirs if not stage_done(d, STAGE_PRODUCT[st])]
            return CellState("pending", f"unfinished: {', '.join(todo)} added to the grid after "
                                        f"{entry['executor']} job {entry['job_id']}, which ran "
                                        f"the rest; the next launch runs them")
        if entry is not None:
            st = self._job_state(cell, entry, queued)
            if st is not None:
                return st
        folders = [d for _, d in reversed(cell.stage_dirs)]    # the fine-tunes first
        for d in folders:
            info = read_run_json(d)
            if info and info.get("status") == "failed":
                return CellState("failed", f"{d.name}: {info.get('error') or 'failed'}")
        for d in folders:
            info = read_run_json(d)
            if info:
                return CellState("pending", f"unfinished {d.name} (epoch {info.get('epoch')}); "
                                            f"the next launch resumes it")
        return CellState("pending", "not submitted")

    def _job_state(self, cell: Cell, entry: dict, queued) -> CellState | None:
        """State from the cell's job; None when the job says nothing (fall back to run folders)."""
        jid = entry["job_id"]
        name = f"{entry['executor']} job {jid}"
        if entry["executor"] == "slurm":
            if queued is _ASK:
                queued = slurm_state.queue_states([jid])
            if queued is None:   # not "gone": unknown, so neither failed nor to resubmit
                return CellState("pending", f"{name}: squeue does not answer; state unknown")
            qs = queued.get(jid)
            if qs in slurm_state.ACTIVE_STATES:
                self._gone_since.pop(cell.key, None)
                self._seen_queued.add(cell.key)
                return CellState("running" if qs in ("RUNNING", "COMPLETING") else "pending",
                                 f"{name} {qs}")
        else:
            job = self.jobs.get(cell.key)
            alive = (job.state == "RUNNING") if job is not None else \
                local_controller_alive(jid, entry["folder"])
            if alive:
                return CellState("running", f"{name} running")
        # The job has ended. submitit's result file is a pickle anyone who can write the grid
        # folder could replace: it is never loaded. That it exists says the job ran to its end;
        # the cell is not done (checked first), so the job failed, and its log says why.
        paths = JobPaths(entry["folder"], job_id=jid, task_id=0)
        if paths.result_pickle.exists():
            packed = len(entry.get("cells") or ()) > 1
            why = (packed and cell_error_line(paths.stderr, cell.key)) or \
                last_error_line(paths.stderr)
            return CellState("failed", f"{name}: {why} (log {paths.stderr})")
        if entry["executor"] == "slurm":
            final = slurm_state.final_state(jid)
            if final == "PREEMPTED":    # PreemptMode=CANCEL; the training saved on SIGTERM
                return CellState("failed", f"{name} PREEMPTED (cancelled by SLURM) without a "
                                           f"result; launch again to resume it")
            if final and final != "COMPLETED":
                return CellState("failed", f"{name} {final} without a result")
            # A job that just ended may not have written its result file yet; only a job this
            # process saw queued (or submitted) just ended: any other may be long gone.
            if cell.key in self._seen_queued or cell.key in self.jobs:
                first = self._gone_since.setdefault(cell.key, time.time())
                if time.time() - first < RESULT_GRACE_S:
                    return CellState("running", f"{name} ending")
            return CellState("failed", f"{name} is no longer queued and left no result "
                                       f"({final or 'cancelled or killed'})")
        job = self.jobs.get(cell.key)
        if job is not None or entry["executor"] == "local":
            return CellState("failed", f"{name} ended without a result (killed)")
        return None

    def states(self) -> dict[str, CellState]:
        self.poll()
        ids = [e["job_id"] for e in self.registry.values() if e["executor"] == "slurm"]
        queued = slurm_state.queue_states(ids) if ids else {}
        self._waiting_elsewhere = self.read_waiting_elsewhere()
        return {c.key: self.state_of(c, queued) for c in self.cells}

    def poll(self) -> None:
        if self.waiting and self._executor is not None:
            self._start_local()

    def wait(self, poll_s: float = 2.0, timeout_s: float | None = None,
             on_change=None) -> dict[str, CellState]:
        """Until no cell is pending or running (cells never submitted do not count)."""
        t0 = time.time()
        last = None
        while True:
            states = self.states()
            summary = {k: s.state for k, s in states.items()}
            if on_change is not None and summary != last:
                on_change(states)
            last = summary
            active = [k for k, s in states.items() if is_active(s)]
            if not active:
                self.release()
                return states
            if timeout_s is not None and time.time() - t0 > timeout_s:
                raise TimeoutError(f"grid {self.grid.name}: {len(active)} cells still active "
                                   f"after {timeout_s:.0f} s: {active[:3]}")
            time.sleep(poll_s)

    def cancel(self) -> list[str]:
        """Cancel the grid's jobs, started by this process or another, and check they have
        ended: SLURM ones with scancel, local ones as `stop_trees` does (SIGINT to the
        controller, as submitit does, then SIGTERM, then SIGKILL). Returns one line per job
        still running (empty: all ended); `stop_notes` says which needed more than SIGINT."""
        self.waiting.clear()
        if self._lock is not None:
            self._write_waiting()
        slurm_ids = [e["job_id"] for k, e in self.registry.items() if e["executor"] == "slurm"]
        if slurm_ids:
            path = cancelled_path(self.grid)
            before = json.loads(path.read_text()) if path.is_file() else []
            _write_json(path, sorted(set(before) | set(slurm_ids)))
        not_cancelled = slurm_state.cancel(slurm_ids)
        roots = {}
        for key, entry in self.registry.items():
            job = self.jobs.get(key)
            if entry["executor"] != "local":
                continue
            if int(entry["job_id"]) in roots.values():
                continue    # packed: one job for several cells
            if (job.state == "RUNNING") if job is not None else \
                    local_controller_alive(entry["job_id"], entry["folder"]):
                roots[key] = int(entry["job_id"])
        ended, failed = stop_trees(roots, slurm_state.STOP_WAIT_S)
        self.stop_notes = [f"{k}: local job {roots[k]} ended on {sig} (it ignored the gentler "
                           f"signals)" for k, sig in ended.items() if sig != "SIGINT"]
        not_cancelled += [f"{k}: local job {roots[k]}: {why}" for k, why in failed.items()]
        holder = self.launch_holder()
        if holder is not None and self.grid.executor.kind == "local":
            # Its cells waiting for a free slot live in its memory: only it can drop them.
            not_cancelled.append(f"launch process PID {holder} is still running and starts the "
                                 f"cells waiting for a free slot: interrupt it too (Ctrl-C, or "
                                 f"`kill -INT {holder}`; `kill {holder}` if it was started "
                                 f"with SIGINT ignored), then cancel again")
        self.release()
        return not_cancelled

    def launch_holder(self) -> str | None:
        """PID of another process holding this grid's launch lock, or None."""
        if self._lock is not None:
            return None
        path = self.lock_path
        try:
            f = open(path)
        except FileNotFoundError:
            return None
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return f.read().strip() or "unknown"
            return None

    # ------------------------------------------------------------- results
    def records(self) -> list[dict]:
        """One dict per finished fine-tune: axes, the pretraining epoch it started from
        (`finetune_from`), protocol, best epoch and the test metrics."""
        out = []
        for cell in self.cells:
            for ft in cell.finetunes:
                if not stage_done(ft.dir, STAGE_PRODUCT["finetune"]):
                    continue
                res = json.loads((ft.dir / "results.json").read_text())
                out.append({**cell.axes(), "finetune_from": ft.source,
                            "protocol": res.get("protocol"), "best_epoch": res.get("best_epoch"),
                            **res.get("test", {}), "run": str(ft.dir)})
        return out


def ran_former_cell(cell: Cell, entry: dict) -> bool:
    """Whether the cell's job (its jobs.json entry) was given other stages than the cell has now
    (a `finetune_from` entry added since) and every stage it was given is done: it has nothing
    left to run, even while it is still ending, so it says nothing about the new stages (its
    result file does not mean they failed) and a launch may submit them at once."""
    try:
        given = sorted((str(st), str(d)) for st, d in entry.get("stages"))
    except (TypeError, ValueError):
        return False    # recorded by a launcher that did not record stages (or damaged)
    if given == sorted((st, str(d)) for st, d in cell.stage_dirs):
        return False
    return all(stage in STAGE_PRODUCT and stage_done(Path(d), STAGE_PRODUCT[stage])
               for stage, d in given)


def launch_grid(grid: Grid) -> GridRun:
    """Submit every unfinished cell not already queued; returns the handle."""
    return GridRun(grid).submit()


def open_grid(grid: Grid) -> GridRun:
    """A handle for looking at (or cancelling) a grid launched before, submitting nothing."""
    return GridRun(grid)


def cell_error_line(log: Path, key: str) -> str | None:
    """The failed cell's own line in the log of a job of several cells (CellsJob._fail), whole
    and without its key prefix; None where it has none (the job failed before or around it)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    prefix = f"[{key}] "
    mine = [ln[len(prefix):].strip() for ln in text.splitlines()
            if ln.startswith(f"{prefix}{CELL_FAILED}: ")]
    return mine[-1] if mine else None


def last_error_line(log: Path) -> str:
    """The last line of a job's log that names an error (the exception the cell raised), else
    its last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "error (no log)"
    errors = [ln for ln in lines if re.search(r"\w(Error|Failed|Exception)\b:", ln)]
    return (errors or lines or ["error"])[-1][:300]


def is_active(s: CellState) -> bool:
    """Running, or pending in a job (not merely never submitted, or left unfinished)."""
    return s.state == "running" or (s.state == "pending" and s.detail != "not submitted"
                                    and not s.detail.startswith("unfinished"))


def format_states(states: dict[str, CellState]) -> str:
    width = max((len(k) for k in states), default=10)
    lines = [f"{k:<{width}}  {s.state:<8} {s.detail}" for k, s in states.items()]
    counts = {st: sum(1 for s in states.values() if s.state == st) for st in STATES}
    lines.append("  ".join(f"{st}={n}" for st, n in counts.items()))
    return "\n".join(lines)


def error_line(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()
