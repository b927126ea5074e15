"""Where a run is, as one line a log file can hold and a record run.json can carry.

A Beauty pretraining epoch runs for a minute or two on a CPU, a large dataset's for hours: a
SLURM log must say how far the run is without TensorBoard. At a logging step (rank 0 only) and
at most every `logging.progress_every_s` seconds, the loop prints

    [pretrain] epoch 3/150 step 420/1503 2,231 samples/s  eta epoch 0:00:29 run 2:31:02

(a plain line where stderr is not a terminal: SLURM and grid logs; the same text redrawn in place
where it is). The ETAs extrapolate this epoch's training rate so far (validation time is not in
it, and early stopping can end a fine-tune sooner: its run ETA is an upper bound). The same
record goes to run.json's "progress", which `s3rec-grid status` shows per cell.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from s3rec.runlog import now_iso


def clock(seconds: float | None) -> str:
    """h:mm:ss; '?' when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def estimate(epoch: int, epochs: int, batch: int, num_batches: int, epoch_seconds: float
             ) -> tuple[float | None, float | None]:
    """(eta of this epoch, eta of the run) in seconds at this epoch's rate so far: `batch` of
    `num_batches` global batches of epoch `epoch` (0-based) took `epoch_seconds`."""
    if batch <= 0 or epoch_seconds <= 0:
        return None, None
    per_batch = epoch_seconds / batch
    eta_epoch = (num_batches - batch) * per_batch
    return eta_epoch, eta_epoch + max(epochs - epoch - 1, 0) * num_batches * per_batch


@dataclass
class Progress:
    stage: str
    epochs: int
    num_batches: int
    every_s: float                     # at most one line per this many seconds (0: every call)
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    _last: float = -math.inf
    _drawn: bool = False               # a terminal line is open (no newline yet)

    def due(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) - self._last >= self.every_s

    def record(self, epoch: int, batch: int, epoch_seconds: float, samples_per_s: float | None,
               best: dict | None = None) -> dict:
        """What run.json's "progress" holds: epoch (1-based, the one under way), step within it,
        rate, both ETAs in seconds, the best validation so far, and when."""
        eta_epoch, eta_run = estimate(epoch, self.epochs, batch, self.num_batches, epoch_seconds)
        rec = {"stage": self.stage, "epoch": epoch + 1, "epochs": self.epochs, "step": batch,
               "steps": self.num_batches, "samples_per_s": samples_per_s,
               "eta_epoch_s": eta_epoch, "eta_run_s": eta_run, "at": now_iso()}
        if best:
            rec["best_valid"] = best
        return rec

    def line(self, rec: dict) -> str:
        rate = "" if rec["samples_per_s"] is None else f" {rec['samples_per_s']:,.0f} samples/s"
        return (f"[{rec['stage']}] epoch {rec['epoch']}/{rec['epochs']} step "
                f"{rec['step']}/{rec['steps']}{rate}  eta epoch {clock(rec['eta_epoch_s'])} "
                f"run {clock(rec['eta_run_s'])}")

    def show(self, rec: dict) -> None:
        self._last = time.monotonic()
        text = self.line(rec)
        if self.stream.isatty():
            self.stream.write("\r\033[K" + text)
            self._drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def end_line(self) -> None:
        """Before other output on a terminal: close the line being redrawn."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
