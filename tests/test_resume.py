"""Resume: a run killed with kill -9 mid-epoch and started again with the same command ends with
exactly the metrics of an uninterrupted run (fp32, CPU, dropout on: the RNG states and the data
position come back too); a run sent SIGUSR1 saves a checkpoint, exits 0, and resumes from it."""
import signal
import subprocess
import time

import psutil
import pytest

from tests.train_helpers import (clean_env, command, read_json, run, scalars, shm_clean,  # noqa: F401
                                 tiny_data, train_args)

pytestmark = pytest.mark.multiproc

# 200 users / batch 4 = 50 steps an epoch; a checkpoint every 7 steps lands mid-epoch
FT = ("variant=finetune-only", "finetune.epochs=2", "finetune.batch_size=4",
      "checkpoint.every_steps=7", "logging.every_steps=5")


def _latest_step(out):
    f = out / "checkpoints" / "latest"
    try:
        return int(f.read_text().strip().split("-")[1])
    except (OSError, IndexError, ValueError):
        return None


def test_kill9_mid_epoch_then_resume_gives_identical_results(tiny_data, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    run(command("single", "s3rec.finetune", train_args(tiny_data, ref, *FT)))
    cmd = command("single", "s3rec.finetune", train_args(tiny_data, out, *FT))
    proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    killed_at = None
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        step = _latest_step(out)
        if step is not None and step >= 14 and step % 50:      # mid-epoch 1, after 2 saves
            proc.send_signal(signal.SIGKILL)
            killed_at = step
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert killed_at is not None, "the run ended before it could be killed mid-epoch"
    assert not (out / "results.json").exists()
    assert read_json(out / "run.json")["status"] == "running"   # what kill -9 leaves
    run(cmd)                                                     # the same command again
    a, b = read_json(ref / "results.json"), read_json(out / "results.json")
    assert b == a                                                # exactly equal
    info = read_json(out / "run.json")
    assert info["status"] == "done" and info["starts"] == 2
    # the curves continue without duplicates after the resumed step (purge_step)
    sa, sb = scalars(ref), scalars(out)
    assert [s for s, _ in sb["loss/finetune"]] == sorted({s for s, _ in sb["loss/finetune"]})
    late = [(s, v) for s, v in sa["loss/finetune"] if s > killed_at + 5]
    assert late and [(s, v) for s, v in sb["loss/finetune"] if s > killed_at + 5] == late
    assert sb["epoch/loss_finetune"] == pytest.approx(sa["epoch/loss_finetune"], rel=1e-9)


def test_sigusr1_to_one_rank_saves_a_checkpoint_and_exits_cleanly(tiny_data, tmp_path, shm_clean):
    out = tmp_path / "run"
    args = train_args(tiny_data, out, "variant=finetune-only", "finetune.epochs=4",
                      "finetune.batch_size=4", "checkpoint.every_steps=0")
    cmd = command("torchrun", "s3rec.finetune", args)
    err_path = tmp_path / "torchrun.err"          # a file, not a pipe nobody reads until the end
    with open(err_path, "w") as err_file:
        proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.DEVNULL, stderr=err_file)
    deadline = time.time() + 180
    target = None
    while time.time() < deadline and proc.poll() is None and target is None:
        if (out / "run.json").is_file():
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    if child.environ().get("RANK") == "1":
                        target = child
                except psutil.Error:
                    pass
        time.sleep(0.05)
    assert target is not None, "rank 1 was not found"
    time.sleep(1.0)
    target.send_signal(signal.SIGUSR1)           # one rank only: the flag is all-reduced
    proc.wait(timeout=120)
    err = err_path.read_text()
    assert proc.returncode == 0, err[-3000:]
    assert "preempted by a signal" in err
    info = read_json(out / "run.json")
    assert info["status"] == "preempted" and not (out / "results.json").exists()
    step = _latest_step(out)
    assert step is not None and step < 200                   # stopped well before the end
    tag = out / "checkpoints" / f"step-{step:08d}"
    assert (tag / "rng-rank00000.pt").is_file() and (tag / "rng-rank00001.pt").is_file()
    p = run(cmd)                                               # loadable: the run resumes
    assert f"step {step}" in p.stderr
    assert read_json(out / "run.json")["status"] == "done"
    assert read_json(out / "results.json")["best_epoch"] >= 1
