"""Fault injection: one pretraining run killed with kill -9 at 5 seeded random moments (some while
a checkpoint tag is being written, before `latest` names it; some possibly before the first
checkpoint), started again each time with the same command, ends with weights bit-identical to
an uninterrupted run's. A kill that left the folder un-resumable would fail the restart."""
from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from s3rec import run_folder as rf
from tests.train_helpers import (clean_env, command, read_json, run, tiny_data,  # noqa: F401
                                 train_args)

pytestmark = pytest.mark.multiproc

# 200 users / batch 16: 13 steps an epoch, 3 epochs; a tag every 2 steps, most of them mid-epoch
PRE = ("pretrain.epochs=3", "pretrain.batch_size=16", "checkpoint.every_steps=2",
       "pretrain.save_epochs=[]", "logging.every_steps=1")
KILLS = 5


def _saving(ck: Path) -> bool:
    """A tag folder is there that `latest` does not name yet: a save is under way."""
    try:
        latest = (ck / rf.LATEST).read_text().strip()
    except OSError:
        latest = None
    return any(t != latest for t in rf.tags(ck))


def _kill_once(cmd: list[str], out: Path, rng: random.Random) -> str:
    """Start `cmd`, kill -9 it at a random moment (during a save, or after a random delay)."""
    during_save = rng.random() < 0.6
    delay = rng.uniform(2.0, 9.0)
    proc = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    t0, ck = time.time(), out / rf.CHECKPOINTS
    while proc.poll() is None and time.time() - t0 < 120:
        if (during_save and _saving(ck)) or (not during_save and time.time() - t0 >= delay):
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            return "during a save" if during_save else f"after {delay:.1f} s"
        time.sleep(0.002)
    proc.wait(timeout=30)
    return "not killed: it ended first"


def _weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_five_kill9_and_restarts_end_bit_identical(tiny_data, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    run(command("single", "s3rec.pretrain", train_args(tiny_data, ref, *PRE)))
    cmd = command("single", "s3rec.pretrain", train_args(tiny_data, out, *PRE))
    rng = random.Random(20240917)
    moments = [_kill_once(cmd, out, rng) for _ in range(KILLS)]
    assert sum(m == "during a save" for m in moments) >= 2, moments
    run(cmd)                                           # the same command, to the end
    a, b = _weights(ref / rf.FINAL_MODEL), _weights(out / rf.FINAL_MODEL)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"weights differ after kills {moments}: {differ}"
    info = read_json(out / rf.RUN_JSON)
    assert info["status"] == "done" and info["starts"] >= 2
