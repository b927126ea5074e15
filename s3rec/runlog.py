"""What a run writes for people and tools (rank 0 only): TensorBoard events, run.json,
results.json. Formats: docs/architecture.md.

Events go straight into RUN/ (no subfolders: an EventAccumulator on RUN sees every tag).
A resumed run opens its writer with purge_step = the resumed global step, so the curves continue
without duplicates. HParams (exp, session start, session end) are written into the same event
file with the plugin's summary functions (add_hparams would make a subfolder).
"""
from __future__ import annotations

import subprocess
import traceback
from datetime import datetime, timezone
from pathlib import Path

# the run folder's names live in s3rec.run_folder (the contract), its writer in s3rec.atomic_write
from s3rec.run_folder import (BEST_MODEL, RESULTS_JSON, RUN_JSON, TEST_RANKS,  # noqa: F401
                              read_run_json, write_atomic, write_json_atomic, write_npy_atomic)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_revision() -> str | None:
    """The source checkout's commit (with '+dirty' if it has changes), None outside git."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        if rev.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


class RunJson:
    """RUN/run.json, rewritten atomically on every change. While open it is the record that
    note_checkpoint updates (s3rec.run_folder.prepare_start reads its "checkpoint")."""

    _open: dict[Path, "RunJson"] = {}

    def __init__(self, run_dir: Path, enabled: bool, start_over: bool = False, **fields):
        self.path = Path(run_dir) / RUN_JSON
        self.enabled = enabled
        old = (read_run_json(run_dir) or {}) if enabled else {}
        kept = {} if start_over else old
        self.data = {"stage": None, "status": "running", "error": None, "config": None,
                     "git": git_revision() if enabled else None, "data": None, "dataset": None,
                     "protocol": None, "seed": None, "world_size": None, "params": None,
                     "epoch": kept.get("epoch", 0), "started": kept.get("started", now_iso()),
                     "finished": None, "starts": old.get("starts", 0) + 1,
                     "checkpoint": kept.get("checkpoint")}
        self.data.update(fields)
        self.write()
        if enabled:
            RunJson._open[Path(run_dir).resolve()] = self

    def close(self) -> None:
        RunJson._open.pop(self.path.parent.resolve(), None)

    def update(self, **fields) -> None:
        self.data.update(fields)
        self.write()

    def finish(self, status: str, error: str | None = None) -> None:
        self.data.update(status=status, error=error,
                         finished=now_iso() if status in ("done", "failed") else None)
        self.write()

    def write(self) -> None:
        if self.enabled:
            write_json_atomic(self.path, self.data)


def note_checkpoint(run_dir: Path, tag: str) -> None:
    """run.json records that `latest` names `tag` (rank 0, the run holding RUN open): what tells
    a folder whose `latest` was lost from one whose run never completed a checkpoint."""
    rj = RunJson._open.get(Path(run_dir).resolve())
    if rj is not None:
        rj.update(checkpoint=tag)


def error_line(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {Path(last[0].filename).name}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"


class Events:
    """TensorBoard scalars in RUN/ (rank 0; a no-op elsewhere or when disabled)."""

    def __init__(self, run_dir: Path, enabled: bool, purge_step: int | None = None):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run_dir), purge_step=purge_step or None)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, float(value), step)

    def scalars(self, values: dict, step: int, prefix: str = "") -> None:
        for k, v in values.items():
            self.scalar(prefix + k, v, step)

    def hparams(self, hparams: dict) -> None:
        """This run's HParams session (its hyperparameters; start and end) in its own event file.

        No experiment summary: TensorBoard's HParams plugin takes the first one it finds as the
        whole experiment, so one run's (a pretraining's losses) hid every other run's metrics.
        Without one, the plugin gathers the experiment from the sessions under whatever folder it
        is opened on: the union of their hyperparameters, and every scalar they logged as a
        metric (pretraining losses, valid/ and test/ metrics, other protocols' test metrics)."""
        if self.writer is None:
            return
        from torch.utils.tensorboard.summary import hparams as hp_summary
        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                 for k, v in hparams.items()}
        _, ssi, sei = hp_summary(clean, {})
        fw = self.writer.file_writer
        for s in (ssi, sei):
            fw.add_summary(s)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
