"""The run-folder contract (s3rec/run_folder.py): a folder holding a run but no readable `latest`
is refused, never started over; one writer per folder (a kernel lock, free once its holder is
killed); a full disk is one line naming the path and its free space, leaves no partial tag and
run.json says failed; the sbatch scripts read "done" through the same module."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from s3rec import run_folder as rf
from tests.train_helpers import (REPO, clean_env, command, read_json, run, shm_clean,  # noqa: F401
                                 tiny_data, train_args)

FAST = ("pretrain.epochs=1",)


def _pretrain(data: Path, out: Path, *overrides: str,
              expect: int = 0) -> subprocess.CompletedProcess:
    return run(command("single", "s3rec.pretrain", train_args(data, out, *FAST, *overrides)),
               expect=expect)


def _error_line(p: subprocess.CompletedProcess) -> str:
    lines = [l for l in p.stderr.splitlines() if l.startswith("s3rec-pretrain: error:")]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def done_run(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("done") / "run"
    _pretrain(tiny_data, out)
    return out


def _copy(src: Path, dst: Path) -> Path:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


# ------------------------------------------------------------------ item 2: missing latest

def test_missing_latest_refuses_to_restart_a_finished_run(tiny_data, done_run, tmp_path):
    out = _copy(done_run, tmp_path / "run")
    (out / "checkpoints" / rf.LATEST).unlink()
    final = (out / "final.pt").read_bytes()
    record = (out / "run.json").read_text()
    events = sorted(p.name for p in out.glob(rf.EVENTS_GLOB))
    line = _error_line(_pretrain(tiny_data, out, "seed=7", expect=2))   # a changed config
    assert "run.json (status 'done', last checkpoint step-" in line
    assert "final.pt" in line and "no " + str(out / "checkpoints" / "latest") in line
    assert "fresh --out" in line and "echo step-" in line
    # nothing of the finished run was touched
    assert (out / "final.pt").read_bytes() == final and (out / "run.json").read_text() == record
    assert sorted(p.name for p in out.glob(rf.EVENTS_GLOB)) == events


def test_latest_pointed_at_a_tag_again_resumes(tiny_data, done_run, tmp_path):
    out = _copy(done_run, tmp_path / "run")
    tag = read_json(out / "run.json")["checkpoint"]
    (out / "checkpoints" / rf.LATEST).unlink()
    (out / "checkpoints" / rf.LATEST).write_text(tag)          # the way out the refusal names
    p = _pretrain(tiny_data, out)
    assert f"resumed from {out / 'checkpoints' / tag}" in p.stdout + p.stderr


@pytest.mark.parametrize("bad", ["folder", "empty", "gone", "outside"])
def test_unreadable_latest_is_refused_naming_it(tmp_path, bad):
    """(8b) A folder where `latest` belongs, an empty one, one naming no tag: never 'no
    checkpoint'."""
    ck = tmp_path / "run" / rf.CHECKPOINTS
    (ck / "step-00000004").mkdir(parents=True)
    latest = ck / rf.LATEST
    if bad == "folder":
        latest.mkdir()
    else:
        latest.write_text({"empty": "  \n", "gone": "step-00000099", "outside": ".."}[bad])
    with pytest.raises(rf.RunFolderError) as e:
        rf.prepare_start(tmp_path / "run")
    assert str(latest) in str(e.value) and "fresh --out" in str(e.value)
    assert "echo step-00000004 >" in str(e.value)


def test_a_folder_as_latest_fails_the_training_with_one_line(tiny_data, done_run, tmp_path):
    out = _copy(done_run, tmp_path / "run")
    latest = out / "checkpoints" / rf.LATEST
    latest.unlink()
    latest.mkdir()
    line = _error_line(_pretrain(tiny_data, out, expect=2))
    assert f"{latest}: a folder" in line


def _run_json(run_dir: Path, **fields) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / rf.RUN_JSON).write_text(json.dumps({"stage": "pretrain", **fields}))


@pytest.mark.parametrize("status", ["done", "running", "failed", "preempted"])
def test_a_record_of_a_checkpointed_run_without_latest_is_refused(tmp_path, status):
    _run_json(tmp_path, status=status, checkpoint="step-00000010")
    with pytest.raises(rf.RunFolderError, match=f"status '{status}', last checkpoint step-0000001"):
        rf.prepare_start(tmp_path)


def test_a_record_without_the_checkpoint_key_is_refused(tmp_path):
    """A run.json that cannot say whether a checkpoint was completed could have had one."""
    _run_json(tmp_path, status="running")
    with pytest.raises(rf.RunFolderError, match="holds a run"):
        rf.prepare_start(tmp_path)


def test_tags_without_latest_and_without_a_record_are_refused(tmp_path):
    (tmp_path / rf.CHECKPOINTS / "step-00000003").mkdir(parents=True)
    with pytest.raises(rf.RunFolderError, match="checkpoints/ with tags step-00000003"):
        rf.prepare_start(tmp_path)


def test_a_damaged_record_alone_is_refused(tmp_path):
    (tmp_path / rf.RUN_JSON).write_text('{"stage": "pretr')
    with pytest.raises(rf.RunFolderError, match="not a readable run record"):
        rf.prepare_start(tmp_path)


def test_a_fresh_or_empty_out_starts(tmp_path):
    assert rf.prepare_start(tmp_path / "nothing") == "fresh"
    (tmp_path / "empty").mkdir()
    assert rf.prepare_start(tmp_path / "empty") == "fresh"
    (tmp_path / "empty" / rf.LOCK).write_text("")           # a lock left by a killed start
    assert rf.prepare_start(tmp_path / "empty") == "fresh"


def test_a_run_killed_before_its_first_checkpoint_starts_over(tmp_path):
    """What kill -9 leaves before `latest` was ever set: the partial tag and the curves go."""
    _run_json(tmp_path, status="running", checkpoint=None)
    (tmp_path / rf.CHECKPOINTS / "step-00000005").mkdir(parents=True)
    (tmp_path / "events.out.tfevents.1.host.1.0").write_bytes(b"x")
    assert rf.prepare_start(tmp_path) == "over"
    assert rf.tags(tmp_path / rf.CHECKPOINTS) == [] and not list(tmp_path.glob(rf.EVENTS_GLOB))


# ------------------------------------------------------------------ item 3: one writer

def test_a_second_start_fails_at_once_naming_the_holder(tiny_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    lock = rf.RunLock(out).acquire()
    try:
        line = _error_line(_pretrain(tiny_data, out, expect=2))
    finally:
        lock.release()
    assert f"{out} is in use by another run (host " in line and f"pid {os.getpid()}" in line
    assert not (out / rf.RUN_JSON).exists() and not (out / rf.CHECKPOINTS).exists()


def test_a_refused_deepspeed_config_leaves_no_run_folder(tiny_data, tmp_path):
    """The batch checks need the world size, known only once the process group is up; they
    still come before --out is made."""
    out = tmp_path / "new" / "run"
    line = _error_line(_pretrain(tiny_data, out, "pretrain.batch_size=15",
                                 "deepspeed.grad_accum=2", expect=2))
    assert "config key 'pretrain.batch_size': global batch 15 is not divisible" in line
    assert not (tmp_path / "new").exists()


def test_the_holder_names_its_slurm_job(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lock = rf.RunLock(tmp_path).acquire()
    try:
        with pytest.raises(rf.RunFolderError, match="SLURM job 4242"):
            rf.RunLock(tmp_path).acquire()
    finally:
        lock.release()


_HOLD = ("import sys, time; from s3rec.run_folder import RunLock; RunLock(sys.argv[1]).acquire();"
         " print('held', flush=True); time.sleep(600)")


def test_a_holder_killed_with_sigkill_leaves_the_folder_free(tmp_path):
    """A SLURM requeue (or a lost node): the old job's processes are dead, the kernel lock with
    them; the lock file that stays behind blocks nothing."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True, env=clean_env(), cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(rf.RunFolderError, match=f"pid {proc.pid}"):
            rf.RunLock(tmp_path).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert (tmp_path / rf.LOCK).exists()
    rf.RunLock(tmp_path).acquire().release()


@pytest.mark.multiproc
def test_a_second_run_of_two_ranks_fails_on_every_rank(tiny_data, tmp_path, shm_clean):
    out = tmp_path / "run"
    out.mkdir()
    lock = rf.RunLock(out).acquire()
    try:
        p = run(command("torchrun", "s3rec.pretrain", train_args(tiny_data, out, *FAST)),
                timeout=120, expect=1)
    finally:
        lock.release()
    refusals = [l for l in p.stderr.splitlines() if "is in use by another run" in l]
    assert len(refusals) == 2, p.stderr[-3000:]         # rank 0's refusal reached rank 1


# ------------------------------------------------------------------ item 5: a full disk

@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {p.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_during_training_is_one_line_and_run_json_says_failed(tiny_data, small_disk):
    out = small_disk / "run"
    p = _pretrain(tiny_data, out, "checkpoint.every_steps=5", expect=1)
    line = _error_line(p)
    assert f"{out / 'checkpoints'}/step-" in line and "cannot write" in line
    assert "MiB free of 0.2 MiB there" in line
    latest = (out / "checkpoints" / rf.LATEST).read_text()
    assert rf.tags(out / "checkpoints") == [latest]           # the partial tag is gone
    info = read_json(out / rf.RUN_JSON)
    assert info["status"] == "failed" and info["error"] in line
    assert not [f for f in out.rglob("*") if f.name.endswith(".tmp")]


def test_a_full_disk_in_an_atomic_write_names_the_file_and_leaves_nothing(small_disk):
    target = small_disk / "report.md"
    with pytest.raises(rf.WriteError) as e:
        rf.write_atomic(target, b"x" * 400_000)
    assert str(e.value).startswith(f"{target}: cannot write: No space left on device; ")
    assert "MiB free of 0.2 MiB there" in str(e.value)
    assert list(small_disk.iterdir()) == []


# ------------------------------------------------------------------ one contract for all readers

def test_the_sbatch_helpers_ask_the_run_folder_module(done_run, tmp_path):
    script = (f"source {REPO / 'slurm' / 'common.sh'}; s3rec_run_status {done_run}; "
              f"s3rec_stage_done {done_run} final.pt && echo pretrain-done; "
              f"s3rec_stage_done {done_run} results.json || echo no-results; "
              f"s3rec_run_status {tmp_path / 'none'}; echo end")
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=clean_env())
    assert p.stdout.split("\n") == ["done", "pretrain-done", "no-results", "", "end", ""], p.stderr


def test_grid_and_analysis_use_the_contract():
    from s3rec.analysis import atomic
    from s3rec.launch import grid
    assert grid.stage_done is rf.stage_done and grid.read_run_json is rf.read_run_json
    assert atomic.atomic_path is rf.atomic_path
