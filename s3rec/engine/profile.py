"""torch.profiler over a window of training steps (logging.profile_steps=[START, STOP]).

Why: at this model's size a step is bound by the host (kernel launches, Python, DeepSpeed's
bookkeeping), and where that time goes differs between a CPU and a GPU. The window covers whole
loop iterations (sampling, host-side index, the copy, forward, backward, optimizer step, the
loop's own accumulators), so it shows what the loop adds beyond `benchmarks/train_speed.py`'s
bare steps.

Each rank writes into RUN/profile/:
  steps-START-STOP.rankR.pt.trace.json   Chrome/Perfetto trace (chrome://tracing, ui.perfetto.dev)
  steps-START-STOP.rankR.txt             operators by self host time (and device time on CUDA),
                                         with the window's wall ms per step in the first line
Both are written under a temporary name and renamed. Steps count optimizer steps, as
`logging.every_steps` does; a run resumed past START profiles nothing, and a window across an
epoch end includes that epoch's evaluation and checkpoint.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from s3rec.atomic_write import write_atomic


def count_ops(fn) -> int:
    """ATen operators dispatched by one call of `fn` (forward, backward, optimizer...): what the
    host pays for on a GPU, one launch or more each, whatever the tensor sizes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


class StepProfiler:
    """Call `before(step)` at the top of every loop iteration and `after(step)` at its end, with
    the global optimizer step count at that point (steps done so far)."""

    def __init__(self, window: list, run_dir: Path, rank: int, device: torch.device):
        self.start, self.stop = window if window else (-1, -1)   # validated by s3rec.config
        self.dir = Path(run_dir) / "profile"
        self.rank, self.device = rank, device
        self.prof = None
        self.t0 = 0.0

    def before(self, step: int) -> None:
        if step != self.start or self.prof is not None:
            return
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            acts.append(ProfilerActivity.CUDA)
        self._sync()
        self.prof = profile(activities=acts)
        self.prof.start()
        self.t0 = time.perf_counter()

    def after(self, step: int) -> None:
        """`step`: optimizer steps done, this iteration's included."""
        if self.prof is None or step < self.stop:
            return
        self._sync()
        ms = 1000 * (time.perf_counter() - self.t0) / (self.stop - self.start)
        prof, self.prof = self.prof, None
        prof.stop()
        self._write(prof, ms)

    def close(self) -> None:
        """A run that ends (or is preempted) inside the window: drop the partial profile."""
        if self.prof is not None:
            self.prof.stop()
            self.prof = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _write(self, prof, ms: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        stem = f"steps-{self.start}-{self.stop}.rank{self.rank}"
        trace = self.dir / f"{stem}.pt.trace.json"
        tmp = trace.with_name(f".{trace.name}.tmp-{os.getpid()}")   # the profiler writes a path
        prof.export_chrome_trace(str(tmp))
        os.replace(tmp, trace)
        ops = prof.key_averages()
        text = (f"steps {self.start}..{self.stop - 1} (optimizer steps), rank {self.rank}, "
                f"{self.device}: {ms:.2f} ms per step wall\n\nby self host time:\n"
                + ops.table(sort_by="self_cpu_time_total", row_limit=60) + "\n")
        if self.device.type == "cuda":
            text += ("\nby self device time:\n"
                     + ops.table(sort_by="self_device_time_total", row_limit=30) + "\n")
        write_atomic(self.dir / f"{stem}.txt", text)
