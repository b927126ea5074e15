"""Progress lines and run.json's progress record: the ETA arithmetic, the plain line a log file
gets, and a real tiny training whose stderr and run.json carry them."""
from __future__ import annotations

import io
import json
import time

import pytest

from s3rec.engine.progress import Progress, clock, estimate
from tests.train_helpers import command, run, shm_clean, tiny_data, train_args  # noqa: F401


def test_estimate_extrapolates_this_epochs_rate():
    # 30 of 100 batches of epoch 2 (0-based) of 5 took 60 s: 2 s a batch
    eta_epoch, eta_run = estimate(2, 5, 30, 100, 60.0)
    assert eta_epoch == pytest.approx(140.0)
    assert eta_run == pytest.approx(140.0 + 2 * 200.0)
    assert estimate(0, 5, 0, 100, 0.0) == (None, None)
    assert (clock(3725.4), clock(None), clock(-3)) == ("1:02:05", "?", "0:00:00")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_plain_lines_and_a_terminal_one_line_redrawn():
    log = io.StringIO()
    p = Progress("pretrain", 150, 1503, every_s=0.0, stream=log)
    rec = p.record(2, 420, 120.0, 2231.4, None)
    assert (rec["epoch"], rec["epochs"], rec["step"], rec["steps"]) == (3, 150, 420, 1503)
    p.show(rec)
    p.show(p.record(2, 840, 240.0, 2231.4, None))
    lines = log.getvalue().splitlines()
    assert lines[0] == ("[pretrain] epoch 3/150 step 420/1503 2,231 samples/s  eta epoch "
                        "0:05:09 run 17:37:15")   # 0.2857 s a batch: 1,083 + 147 x 1,503 batches
    assert len(lines) == 2 and "\r" not in log.getvalue()
    tty = _Tty()
    q = Progress("finetune", 10, 50, every_s=0.0, stream=tty)
    q.show(q.record(0, 5, 1.0, None, {"metric": "MRR", "value": 0.2, "epoch": 1}))
    q.end_line()
    assert tty.getvalue().startswith("\r\033[K[finetune] epoch 1/10 step 5/50  eta")
    assert tty.getvalue().endswith("\n")
    slow = Progress("pretrain", 1, 10, every_s=60.0, stream=io.StringIO())
    assert slow.due()
    slow.show(slow.record(0, 1, 1.0, None))
    assert not slow.due() and slow.due(now=time.monotonic() + 61)


@pytest.mark.multiproc
def test_a_training_prints_progress_lines_and_keeps_the_record_in_run_json(tiny_data, tmp_path):
    out = tmp_path / "ft"
    proc = run(command("single", "s3rec.finetune", train_args(
        tiny_data, out, "variant=finetune-only", "finetune.epochs=2", "logging.every_steps=2",
        "logging.progress_every_s=0")))
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("[finetune] epoch ")
             and " step " in ln]
    assert lines and all("samples/s  eta epoch " in ln and " run " in ln for ln in lines)
    assert lines[0].startswith("[finetune] epoch 1/2 step 2/")
    prog = json.loads((out / "run.json").read_text())["progress"]
    assert (prog["stage"], prog["epoch"], prog["epochs"]) == ("finetune", 2, 2)
    assert prog["step"] == prog["steps"] and prog["eta_run_s"] == 0.0
    assert prog["best_valid"]["metric"] == "MRR" and prog["best_valid"]["epoch"] in (1, 2)
