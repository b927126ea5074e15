"""slurm/common.sh's run_stage at the moments a real cluster cannot be made to hit on cue: the
preemption warning (USR1) landing while srun is exiting, between two stages, or before tasks
that then fail. `srun`, `scancel` and `scontrol` are stand-ins (a fake srun that plays one
scenario, a scancel that signals it, a scontrol that records `requeue`); the real ones run in
tests/test_sbatch.py. The batch shell itself is real bash, sourcing the real common.sh."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.multiproc      # real bash processes and signals

FAKE_SRUN = r"""#!/usr/bin/env bash
# plays $FAKE_MODE for the run folder $FAKE_RUN_DIR; counts its starts
echo $$ > "$FAKE/srun.pid"; echo start >> "$FAKE/srun.starts"
status() { printf '{"status": "%s"}' "$1" > "$FAKE_RUN_DIR/run.json"; }
mkdir -p "$FAKE_RUN_DIR"; status running
leave() { kill "$nap" 2>/dev/null; exit "$1"; }
case "$FAKE_MODE" in
  fail_on_usr1)   trap 'leave 1' USR1 ;;                       # the save itself fails
  save_on_usr1)   trap 'status preempted; leave 0' USR1 ;;     # saves, leaves
  finish_on_usr1) trap 'status done; touch "$FAKE_RUN_DIR/final.pt"; leave 0' USR1 ;;
  finish)         status done; touch "$FAKE_RUN_DIR/final.pt"; exit 0 ;;
esac
sleep 60 & nap=$!
wait "$nap"
"""
FAKE_SCANCEL = r"""#!/usr/bin/env bash
kill -USR1 "$(cat "$FAKE/srun.pid")"
sleep "${FAKE_SCANCEL_SLOW:-0}"      # still in the batch shell's trap while srun exits
"""
FAKE_SCONTROL = r"""#!/usr/bin/env bash
case "$1" in
  show) echo node1 ;;
  requeue) echo "requeue $2" >> "$FAKE/scontrol.log" ;;
esac
"""
BATCH = r"""set -eo pipefail
source "$REPO/slurm/common.sh"
run_stage "$FAKE_RUN_DIR" final.pt fake-pretrain
FAKE_MODE=finish FAKE_RUN_DIR="$FAKE_RUN_DIR-2"
export FAKE_MODE FAKE_RUN_DIR
run_stage "$FAKE_RUN_DIR" final.pt fake-finetune
echo ALL-DONE
"""


def _tool(folder: Path, name: str, text: str) -> None:
    path = folder / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def run_batch(tmp_path: Path, mode: str, scancel_slow: float = 0) -> tuple[subprocess.CompletedProcess, Path]:
    """The batch script under `mode`; USR1 to the batch shell once the fake srun has started."""
    fake = tmp_path / "fake"
    fake.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL), ("scontrol", FAKE_SCONTROL)):
        _tool(fake, name, text)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "FAKE": str(fake),
           "FAKE_MODE": mode, "FAKE_RUN_DIR": str(tmp_path / "run"), "REPO": str(REPO),
           "FAKE_SCANCEL_SLOW": str(scancel_slow), "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "node1", "MASTER_ADDR": "127.0.0.1"}
    env.pop("SLURM_ARRAY_JOB_ID", None)
    proc = subprocess.Popen(["bash", "-c", BATCH], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not (fake / "srun.pid").exists():
        assert time.monotonic() < deadline, "fake srun never started"
        time.sleep(0.05)
    time.sleep(0.3)               # srun's trap is set
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), fake


def requeues(fake: Path) -> list[str]:
    log = fake / "scontrol.log"
    return log.read_text().split("\n")[:-1] if log.exists() else []


def starts(fake: Path) -> int:
    return len((fake / "srun.starts").read_text().split())


def test_saved_checkpoint_is_requeued(tmp_path):
    p, fake = run_batch(tmp_path, "save_on_usr1")
    assert p.returncode == 0, p.stderr
    assert requeues(fake) == ["requeue 7"] and "checkpoint saved" in p.stderr
    assert starts(fake) == 1 and "ALL-DONE" not in p.stdout


def test_tasks_that_fail_after_the_warning_are_not_requeued(tmp_path):
    """Before, the log said "checkpoint saved" and the job requeued itself: with a save that
    fails every time (full disk), for ever."""
    p, fake = run_batch(tmp_path, "fail_on_usr1")
    assert p.returncode == 1
    assert requeues(fake) == []
    assert "asked to checkpoint but failed (exit status 1" in p.stderr


def test_a_stage_finishing_while_the_trap_runs_keeps_its_exit_status(tmp_path):
    """srun exits 0 (stage done) while the trap is still busy: before, the interrupted wait's
    138 was taken as srun's status and a finished stage failed the job."""
    p, fake = run_batch(tmp_path, "finish_on_usr1", scancel_slow=1.5)
    assert "failed with exit status 138" not in p.stderr
    # ... and the warning still holds: the next stage is not started with the time nearly up
    assert p.returncode == 0, p.stderr
    assert requeues(fake) == ["requeue 7"] and "near before fake-finetune" in p.stderr
    assert starts(fake) == 1
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "done"


@pytest.mark.parametrize("slow", [0, 1.5])
def test_warning_in_a_finished_first_stage_requeues_before_the_second(tmp_path, slow):
    """Before, the second stage started with under two minutes left, and no second warning
    came: the job ended TIMEOUT, not requeued."""
    p, fake = run_batch(tmp_path, "finish_on_usr1", scancel_slow=slow)
    assert p.returncode == 0, p.stderr
    assert requeues(fake) == ["requeue 7"] and starts(fake) == 1
    assert "ALL-DONE" not in p.stdout


def test_master_addr_comes_from_the_allocation_not_the_submitting_shell(tmp_path):
    """sbatch exports the submitting shell's MASTER_ADDR (here 127.0.0.1): the allocation's
    first node wins, S3REC_MASTER_ADDR chooses on purpose."""
    fake = tmp_path / "fake"
    fake.mkdir()
    _tool(fake, "scontrol", FAKE_SCONTROL)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "FAKE": str(fake),
           "SLURM_JOB_ID": "41", "SLURM_JOB_NODELIST": "node[1-2]", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "1"}
    script = f'source "{REPO}/slurm/common.sh"; s3rec_master_env; echo "$MASTER_ADDR $MASTER_PORT"'
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True).stdout
    assert out.split() == ["node1", "20041"]
    env["S3REC_MASTER_ADDR"] = "node1-ib"
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True).stdout
    assert out.split() == ["node1-ib", "20041"]
