"""What `s3rec-grid status`, a re-launch and `cancel` make of jobs recorded by another process.

No cluster and no training: SLURM's answers are patched in (or fake squeue scripts on PATH),
submitting goes to a fake executor, and a "local controller" is a sleeping Python process whose
command line looks like submitit's.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from s3rec.launch import grid_cli, job as job_mod, runner, slurm_state
from s3rec.launch.grid import GridError, grid_from_dict

BASE = {"name": "g", "variants": ["finetune-only"], "seeds": [1, 2],
        "overrides": {"finetune.epochs": 1}}


@pytest.fixture
def grid_file(tmp_path):
    """A one-dataset grid (2 cells) with a dataset folder that exists; returns a factory."""
    data = tmp_path / "beauty"
    data.mkdir()
    (data / "manifest.json").write_text("{}")

    def make(kind: str = "slurm"):
        d = dict(BASE, data=[str(data)], out=str(tmp_path / "runs"),
                 executor={"kind": kind, "array_parallelism": 1, "timeout_min": 30})
        path = tmp_path / f"grid-{kind}.yaml"
        path.write_text(json.dumps(d))
        return grid_from_dict(d, source=str(path)), path
    return make


def register(grid, key: str, executor: str, job_id: str, folder: str | None = None) -> None:
    """A jobs.json entry as an earlier launch (another process) wrote it."""
    reg = grid.out_path / "_grid" / "jobs.json"
    reg.parent.mkdir(parents=True, exist_ok=True)
    entries = json.loads(reg.read_text()) if reg.exists() else {}
    entries[key] = {"executor": executor, "job_id": job_id, "submitted": "then",
                    "folder": folder or str(grid.out_path / "_submitit")}
    reg.write_text(json.dumps(entries))


class FakeJob:
    def __init__(self, job_id: str, folder: Path) -> None:
        self.job_id = job_id
        self.paths = types.SimpleNamespace(folder=folder,
                                           stderr=Path(folder) / f"{job_id}_0_log.err")
        self.state = "RUNNING"


class FakeExecutor:
    """Records what would be submitted."""
    def __init__(self, folder: Path) -> None:
        self.folder, self.submitted = folder, []

    @contextlib.contextmanager
    def batch(self):
        yield

    def submit(self, fn) -> FakeJob:
        self.submitted.append(fn.keys)
        return FakeJob(str(1000 + len(self.submitted)), self.folder)


@pytest.fixture
def fake_submit(monkeypatch):
    execs = []

    def make_executor(grid):
        execs.append(FakeExecutor(grid.out_path / "_submitit"))
        return execs[-1]
    monkeypatch.setattr(runner, "resolve_commands", lambda: ("s3rec-pretrain", "s3rec-finetune"))
    monkeypatch.setattr(runner, "make_executor", make_executor)
    return execs


def slurm_answers(monkeypatch, queued, final=None) -> None:
    """squeue answers `queued` (a dict, a list of dicts in turn, or None: no answer)."""
    answers = list(queued) if isinstance(queued, list) else None
    monkeypatch.setattr(slurm_state, "queue_states",
                        lambda ids: answers.pop(0) if answers else queued if answers is None
                        else {})
    monkeypatch.setattr(slurm_state, "final_state", lambda jid: final)


# ---------------------------------------------------------------- 1. SLURM jobs gone from the queue

def test_fresh_status_reports_a_vanished_slurm_job_failed(grid_file, monkeypatch, capsys):
    grid, path = grid_file("slurm")
    key = grid.cells()[0].key
    register(grid, key, "slurm", "999")
    slurm_answers(monkeypatch, {}, final=None)     # neither squeue nor scontrol knows it
    st = runner.open_grid(grid).states()[key]
    assert st.state == "failed" and "999" in st.detail and "no longer queued" in st.detail
    assert grid_cli.main(["status", str(path)]) == 1
    assert "failed=1" in capsys.readouterr().out


def test_relaunch_resubmits_a_vanished_slurm_job(grid_file, monkeypatch, fake_submit):
    grid, _ = grid_file("slurm")
    key = grid.cells()[0].key
    register(grid, key, "slurm", "999")
    slurm_answers(monkeypatch, {}, final=None)
    run = runner.launch_grid(grid)
    assert key in run.submitted and key not in run.skipped
    assert fake_submit[0].submitted == [c.key for c in grid.cells()]
    run.release()


def test_a_job_preempted_for_good_is_failed_at_once_and_resubmitted(grid_file, monkeypatch,
                                                                    fake_submit):
    """PREEMPTED is where a PreemptMode=CANCEL job ends (a REQUEUE one goes back to PENDING):
    before, it counted as queued, and the cell waited until squeue forgot it (MinJobAge)."""
    grid, _ = grid_file("slurm")
    key = grid.cells()[0].key
    register(grid, key, "slurm", "999")
    slurm_answers(monkeypatch, {"999": "PREEMPTED"}, final="PREEMPTED")
    st = runner.open_grid(grid).states()[key]
    assert st.state == "failed" and "PREEMPTED" in st.detail and "launch again" in st.detail
    run = runner.launch_grid(grid)
    assert key in run.submitted
    run.release()


@pytest.mark.parametrize("text", ["{broken", '{"beauty/s3rec/rfull/s1": 7}'])
def test_a_damaged_job_registry_is_named(grid_file, capsys, text):
    """Before: a raw JSONDecodeError (or KeyError) from `s3rec-grid status` and a launch."""
    grid, path = grid_file("slurm")
    reg = grid.out_path / "_grid" / "jobs.json"
    reg.parent.mkdir(parents=True)
    reg.write_text(text)
    for args in (["status", str(path)], [str(path)]):
        assert grid_cli.main(args) == 2
        err = capsys.readouterr().err
        assert f"{reg}: not a job registry this launcher wrote" in err, err


def test_a_job_seen_queued_by_this_process_gets_the_grace_period(grid_file, monkeypatch):
    grid, _ = grid_file("slurm")
    key = grid.cells()[0].key
    register(grid, key, "slurm", "999")
    slurm_answers(monkeypatch, [{"999": "RUNNING"}, {}], final=None)
    run = runner.open_grid(grid)
    assert run.states()[key].state == "running"
    st = run.states()[key]       # just left the queue: its result file may still be coming
    assert st.state == "running" and "ending" in st.detail
    run._gone_since[key] -= runner.RESULT_GRACE_S + 1
    assert run.states()[key].state == "failed"


def test_unanswered_squeue_is_unknown_not_gone(grid_file, monkeypatch, fake_submit):
    grid, _ = grid_file("slurm")
    key = grid.cells()[0].key
    register(grid, key, "slurm", "999")
    slurm_answers(monkeypatch, None, final=None)
    st = runner.open_grid(grid).states()[key]
    assert st.state == "pending" and "unknown" in st.detail
    run = runner.launch_grid(grid)
    assert key in run.skipped and key not in run.submitted
    run.release()


def _fake_slurm_bin(tmp_path: Path, squeue: str) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "squeue").write_text("#!/bin/sh\n" + squeue)
    (bin_dir / "squeue").chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def test_queue_states_tells_an_unknown_id_from_a_dead_controller(tmp_path, monkeypatch):
    # squeue refuses an unknown id but answers a question without ids: the job is gone.
    monkeypatch.setenv("PATH", _fake_slurm_bin(tmp_path, 'case "$*" in *-j*) exit 1;; esac\n'))
    assert slurm_state.queue_states(["5"]) == {}
    # squeue answers nothing at all (slurmctld down): unknown.
    monkeypatch.setenv("PATH", _fake_slurm_bin(tmp_path, "exit 1\n"))
    assert slurm_state.queue_states(["5"]) is None


class _RunsOnLoad:
    """Unpickling this creates the file `path`: what a replaced result file could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_job_result_file_is_never_unpickled(grid_file, tmp_path):
    grid, _ = grid_file("local")
    key = grid.cells()[0].key
    folder = tmp_path / "submitit"
    folder.mkdir()
    register(grid, key, "local", "99999999", folder=str(folder))   # no such controller
    marker = tmp_path / "ran"
    with open(folder / "99999999_0_result.pkl", "wb") as f:
        pickle.dump(("error", _RunsOnLoad(str(marker))), f)
    (folder / "99999999_0_log.err").write_text(
        "Traceback (most recent call last):\n  File ...\n"
        "s3rec.launch.job.StageFailed: k: s3rec-finetune exited with 1: bad\n")
    st = runner.open_grid(grid).states()[key]
    assert not marker.exists()
    assert st.state == "failed"
    assert "StageFailed: k: s3rec-finetune exited with 1: bad" in st.detail, st.detail


# ---------------------------------------------------------------- 2 and 9. local jobs by PID

def fake_controller(folder: Path) -> subprocess.Popen:
    """A process whose command line is that of submitit's local controller for `folder`."""
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                             "-m", "submitit.local._local", str(folder)])


def test_a_reused_pid_is_not_a_running_local_job(grid_file):
    grid, _ = grid_file("local")
    key = grid.cells()[0].key
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        register(grid, key, "local", str(other.pid))    # the PID now belongs to another process
        st = runner.open_grid(grid).states()[key]
        assert st.state == "failed" and "killed" in st.detail
    finally:
        other.kill()
        other.wait()


def test_a_live_controller_of_this_grid_is_running(grid_file, tmp_path):
    grid, _ = grid_file("local")
    key = grid.cells()[0].key
    folder = grid.out_path / "_submitit"
    ctl = fake_controller(folder)
    try:
        time.sleep(0.3)
        register(grid, key, "local", str(ctl.pid), str(folder))
        assert runner.open_grid(grid).states()[key].state == "running"
        # The same PID recorded for another grid's folder is not this grid's job.
        register(grid, key, "local", str(ctl.pid), str(tmp_path / "elsewhere"))
        assert runner.open_grid(grid).states()[key].state == "failed"
    finally:
        ctl.kill()
        ctl.wait()


def test_cancel_stops_local_jobs_started_by_another_process(grid_file, capsys):
    """The controllers started as a launch starts them: whatever this test runner inherited
    (SIGINT ignored under `nohup` or in a script's background job), SIGINT stops them."""
    grid, path = grid_file("local")
    folder = grid.out_path / "_submitit"
    with runner.interruptible_children():
        ctls = [fake_controller(folder) for _ in grid.cells()]
    try:
        time.sleep(0.3)
        for c, p in zip(grid.cells(), ctls):
            register(grid, c.key, "local", str(p.pid), str(folder))
        assert grid_cli.main(["cancel", str(path)]) == 0
        out, err = capsys.readouterr()
        assert "cancelled" in out and "ended on" not in err     # SIGINT was enough
        for p in ctls:
            assert p.poll() is not None and p.returncode != 0   # KeyboardInterrupt
    finally:
        for p in ctls:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_cancel_says_when_it_cannot_signal_a_local_job(grid_file, monkeypatch, capsys):
    grid, path = grid_file("local")
    key = grid.cells()[0].key
    register(grid, key, "local", "4242")
    monkeypatch.setattr(runner, "local_controller_alive", lambda pid, folder: True)

    def refuse(pid, sig):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(runner.os, "kill", refuse)
    assert grid_cli.main(["cancel", str(path)]) == 1
    err = capsys.readouterr().err
    assert key in err and "4242" in err and "not permitted" in err


# ---------------------------------------------------------------- 10. one launch at a time

def test_second_launch_of_a_grid_fails_at_once(grid_file, fake_submit, capsys):
    grid, path = grid_file("local")
    first = runner.launch_grid(grid)
    assert first.submitted == [grid.cells()[0].key] and len(first.waiting) == 1
    with pytest.raises(GridError, match=f"being launched by PID {os.getpid()}"):
        runner.launch_grid(grid)
    assert grid_cli.main([str(path)]) == 2
    assert f"PID {os.getpid()}" in capsys.readouterr().err
    assert len(fake_submit) == 1                 # the refused launches submitted nothing
    # cancel (from another process) names the launch that still holds cells in memory
    not_cancelled = runner.open_grid(grid).cancel()
    assert any(str(os.getpid()) in line for line in not_cancelled)
    first.release()
    again = runner.launch_grid(grid)           # the lock went with the first launch
    again.release()


def test_status_elsewhere_shows_the_launchs_waiting_cells_as_waiting(grid_file, fake_submit,
                                                                     capsys):
    grid, path = grid_file("local")
    first = runner.launch_grid(grid)
    waiting = first.waiting[0][0].key
    seen = runner.open_grid(grid).states()[waiting]     # as `s3rec-grid status` in a 2nd process
    assert seen.state == "pending" and seen.detail == \
        f"waiting for a free local slot in launch PID {os.getpid()}"
    assert runner.is_active(seen)             # so `status --watch` goes on while it waits
    grid_cli.main(["status", str(path)])   # the fake job it started has no live controller
    assert f"in launch PID {os.getpid()}" in capsys.readouterr().out
    first.release()
    assert not first.waiting_path.exists()
    assert runner.open_grid(grid).states()[waiting].detail == "not submitted"


def test_a_killed_launchs_waiting_list_is_not_believed(grid_file, fake_submit):
    grid, _ = grid_file("local")
    key = grid.cells()[1].key
    stale = grid.out_path / "_grid" / "waiting.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"pid": 999999, "cells": [key]}))    # no launch holds the lock
    assert runner.open_grid(grid).states()[key].detail == "not submitted"
    first = runner.launch_grid(grid)           # a new launch replaces the list with its own
    assert json.loads(stale.read_text()) == {"pid": os.getpid(), "cells": [key]}
    first.release()


# ---------------------------------------------------------------- 11. local time limits

def test_local_signal_delay_leaves_time_for_the_child_to_save(grid_file):
    grid, _ = grid_file("local")
    ex = runner.make_executor(grid)
    delay = ex._executor.parameters["signal_delay_s"]
    assert job_mod.CHILD_SAVE_TIMEOUT_S < delay < grid.executor.timeout_min * 60


def test_cell_job_never_leaves_its_training_child_behind(tmp_path, monkeypatch):
    job = _one_stage_job([sys.executable, "-c", "import time; time.sleep(120)"], tmp_path)
    seen = []

    def interrupted(_s):    # the local controller's SIGINT while the child trains
        seen.append(job._runs[0].proc)
        raise KeyboardInterrupt
    monkeypatch.setattr(job_mod, "time", types.SimpleNamespace(time=time.time, sleep=interrupted,
                                                               monotonic=time.monotonic))
    with pytest.raises(KeyboardInterrupt):
        job()
    assert seen and seen[0] is not None and seen[0].poll() is not None


def _one_stage_job(cmd: list[str], run_dir) -> "job_mod.CellsJob":
    return job_mod.CellsJob([job_mod.chain_spec("k", [("finetune", cmd, run_dir)])])


def _started(job: "job_mod.CellsJob") -> subprocess.Popen:
    """The job's one stage started as its loop would, the process returned."""
    run = job_mod._ChainRun(job.chains[0])
    run.proc = subprocess.Popen(job.chains[0]["stages"][0]["cmd"])
    job._runs = [run]
    return run.proc


@pytest.mark.parametrize("executor,forwarded", [("local", True), ("slurm", False)])
def test_time_limit_signal_reaches_the_child_of_a_local_job_inside_an_allocation(
        tmp_path, monkeypatch, executor, forwarded):
    """A local grid launched inside salloc/sbatch: SLURM_JOB_ID is set, but the local controller
    signals only the job's own process, so the USR2 must still be passed to the training (under
    the slurm executor SLURM signals the whole step, the child included, and it is not)."""
    saved = tmp_path / "saved"
    child = ("import signal, sys, time, pathlib\n"
             f"signal.signal(signal.SIGUSR2, lambda *a: (pathlib.Path({str(saved)!r}).touch(), "
             "sys.exit(0)))\n"
             f"pathlib.Path({str(tmp_path / 'ready')!r}).touch()\ntime.sleep(60)\n")
    job = _one_stage_job([sys.executable, "-c", child], tmp_path)
    proc = _started(job)
    while not (tmp_path / "ready").exists():
        time.sleep(0.05)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", executor)
    monkeypatch.setattr(job_mod, "CHILD_SAVE_TIMEOUT_S", 5)
    job.checkpoint()
    assert proc.poll() is not None                  # never left behind
    assert saved.exists() == forwarded


def test_checkpoint_landing_while_poll_holds_popens_lock_does_not_hang(tmp_path, monkeypatch):
    """The signal handler runs on the thread whose proc.poll() it interrupted, maybe inside
    Popen's lock: before, wait(timeout) spun for the whole save wait and the kill's wait()
    then blocked for ever. (Held here by the test, as the interrupted poll() would hold it.)"""
    ready = tmp_path / "ready"
    child = ("import signal, sys, time, pathlib\n"
             "signal.signal(signal.SIGUSR2, lambda *a: sys.exit(0))\n"
             f"pathlib.Path({str(ready)!r}).touch()\ntime.sleep(60)\n")
    job = _one_stage_job([sys.executable, "-c", child], tmp_path)
    proc = _started(job)
    while not ready.exists():
        time.sleep(0.05)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")      # checkpoint() sends the USR2 itself
    done = threading.Event()
    with proc._waitpid_lock:
        t0 = time.monotonic()
        threading.Thread(target=lambda: (job.checkpoint(), done.set()), daemon=True).start()
        assert done.wait(timeout=20), "checkpoint() hung on Popen's lock"
        took = time.monotonic() - t0
    assert took < 10, f"checkpoint() waited {took:.1f} s for a child that exited at once"
    assert proc.wait(timeout=5) == 0                       # the exit status is still there


# ---------------------------------------------------------------- bad input on (re)launch

def test_relaunch_names_a_damaged_dataset_by_its_key(grid_file, fake_submit, capsys):
    """A cell's run.json records the dataset's fingerprint; the dataset (its manifest "{}")
    is damaged since: the launch says which data[i] and why, not a DatasetError traceback."""
    grid, path = grid_file("local")
    run_dir = grid.cells()[0].finetune_dir
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps(
        {"stage": "finetune", "status": "running", "config": {},
         "dataset_fingerprint": {"name": "beauty"}}))
    with pytest.raises(GridError, match=r"key 'data\[0\]'.*manifest"):
        runner.launch_grid(grid)
    for argv in ([str(path)], [str(path), "--dry-run"]):
        assert grid_cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"s3rec-grid: {path}: key 'data[0]'") and "manifest" in err
    assert fake_submit == []            # nothing submitted


def _fake_bin(tmp_path: Path, **scripts: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_slurm_launch_without_sbatch_is_a_grid_error(grid_file, tmp_path, monkeypatch, capsys):
    grid, path = grid_file("slurm")
    monkeypatch.setattr(runner, "resolve_commands", lambda: ("s3rec-pretrain", "s3rec-finetune"))
    monkeypatch.setenv("PATH", str(_fake_bin(tmp_path)))     # a folder without sbatch
    assert grid_cli.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"s3rec-grid: {path}: key 'executor.kind'") and "sbatch" in err
    assert not (grid.out_path / "_grid" / "jobs.json").exists()
    with pytest.raises(GridError, match="sbatch"):     # the lock went with the failed launch
        runner.launch_grid(grid)
    # sbatch found by the check but gone when submitit runs it: the same error, not a traceback
    monkeypatch.setattr(runner.shutil, "which", lambda name: f"/nowhere/{name}")
    with pytest.raises(GridError, match="key 'executor.kind': slurm, but sbatch could not be run"):
        runner.launch_grid(grid)
    assert not (grid.out_path / "_grid" / "jobs.json").exists()


def test_slurm_submission_refused_by_sbatch_records_nothing(grid_file, tmp_path, monkeypatch,
                                                            capsys):
    grid, path = grid_file("slurm")
    text = json.loads(path.read_text())
    text["executor"]["partition"] = "nope"
    path.write_text(json.dumps(text))
    key = grid.cells()[0].key
    register(grid, key, "slurm", "999")          # an earlier job, gone: both cells resubmitted
    registry = grid.out_path / "_grid" / "jobs.json"
    before = registry.read_text()
    slurm_answers(monkeypatch, {}, final=None)
    monkeypatch.setattr(runner, "resolve_commands", lambda: ("s3rec-pretrain", "s3rec-finetune"))
    called = tmp_path / "sbatch-called"
    bin_dir = _fake_bin(tmp_path, srun="exit 1\n", sbatch=(
        f"touch {called}\n"
        "echo 'sbatch: error: invalid partition specified: nope' >&2\n"
        "echo 'sbatch: error: Batch job submission failed: Invalid partition name specified' >&2\n"
        "exit 1\n"))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert grid_cli.main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert called.exists()
    assert err.startswith(f"s3rec-grid: {path}: sbatch refused")
    assert "invalid partition specified: nope" in err and "Invalid partition name" in err
    assert "executor.partition ('nope')" in err and "executor.account" in err \
        and "executor.qos" in err
    assert registry.read_text() == before        # nothing recorded as submitted
    assert runner.open_grid(grid).launch_holder() is None    # the lock was released


def test_registry_write_that_fails_leaves_no_temp_file(tmp_path):
    registry = tmp_path / "_grid" / "jobs.json"
    registry.mkdir(parents=True)          # the rename onto it fails after the temp file is written
    with pytest.raises(OSError):
        runner._write_json(registry, {"k": {"job_id": "1"}})
    assert sorted(p.name for p in registry.parent.iterdir()) == ["jobs.json"]
