"""Preemption: SIGTERM, SIGUSR1 and SIGUSR2 ask for a checkpoint and a clean exit.

The handler only sets a flag. The loop asks `should_stop()` at step boundaries every
`CHECK_EVERY` optimizer steps (and at epoch ends); the flag is all-reduced (max) so every rank
agrees on the same step, saves the same checkpoint and exits together. SLURM (`--signal`),
submitit (USR2 before the time limit) and `scancel --signal` all end up here.

Exit status after a preemption save: 0, with run.json status "preempted" and a line on stderr;
the same command resumes from `latest`. (0, so that launchers do not tear down peers or restart
on their own; a requeue script can tell "preempted" from "done" by run.json.)
"""
from __future__ import annotations

import signal

import torch

from s3rec import distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
CHECK_EVERY = 10      # steps between flag all-reduces: one tiny collective per 10 steps

_received: list[int] = []


def _handler(signum, frame) -> None:
    _received.append(signum)


def install() -> None:
    _received.clear()
    for s in SIGNALS:
        signal.signal(s, _handler)


def received() -> list[int]:
    return list(_received)


def should_stop() -> bool:
    """Collective (host side, no accelerator sync): True on every rank if any rank received a
    signal."""
    flag = torch.tensor([1.0 if _received else 0.0])
    return bool(dist.all_reduce_cpu(flag, op="max").item() > 0)


def names() -> str:
    return ",".join(signal.Signals(s).name for s in _received) or "none"
