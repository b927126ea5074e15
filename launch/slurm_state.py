"""What SLURM knows about a job, without an accounting database.

`sacct` needs slurmdbd; the local cluster has none (and submitit's own watcher relies on sacct,
so its `job.result()` waits forever for a cancelled job). Instead: `squeue` while the job is
queued or running, then `scontrol show job` for MinJobAge after it ended; beyond that, only
submitit's result file tells.
"""
from __future__ import annotations

import os
import subprocess
import time

# How long a cancel waits for what it stopped to end before it escalates or reports it.
STOP_WAIT_S = 10.0
# How long a SLURM cancel waits for its jobs to leave the queue: scancel's SIGTERM makes the
# training save, SLURM sends SIGKILL KillWait later (default 30 s) and runs the epilog; a job
# ending that way is cancelled, not left running.
SLURM_CANCEL_WAIT_S = 90.0

# squeue/scontrol states of a job that will still run (or is running). PREEMPTED is not one:
# a job preempted with PreemptMode=REQUEUE goes COMPLETING -> PENDING, and PREEMPTED is where a
# PreemptMode=CANCEL job ends that did not requeue itself (both seen on the local cluster,
# slurm 22.05).
ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                 "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT",
                 "RESV_DEL_HOLD", "STOPPED"}


def _run(cmd: list[str]) -> str | None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout if res.returncode == 0 else None


def queue_states(job_ids: list[str]) -> dict[str, str] | None:
    """job id ("123" or "123_4") -> state, for the jobs squeue still lists (one call for all);
    None when squeue cannot answer at all (not installed, controller down): a job missing
    from the answer has then not left the queue, it is only unknown."""
    if not job_ids:
        return {}
    out = _run(["squeue", "-h", "-r", "-t", "all", "-o", "%i %T", "-j", ",".join(job_ids)])
    if out is None:  # squeue refuses the whole list when one id is unknown: ask one by one
        states, answered = {}, False
        for jid in job_ids:
            one = _run(["squeue", "-h", "-r", "-t", "all", "-o", "%i %T", "-j", jid])
            answered = answered or one is not None
            for line in (one or "").splitlines():
                i, _, st = line.partition(" ")
                states[i] = st
        if not answered and not _controller_answers():
            return None
        return {j: s for j, s in states.items() if j in set(job_ids)}
    states = {}
    for line in out.splitlines():
        i, _, st = line.strip().partition(" ")
        states[i] = st
    return {j: states[j] for j in job_ids if j in states}


def _controller_answers() -> bool:
    """Whether squeue works at all (it fails on an unknown job id, and when it cannot reach
    slurmctld: only a question without job ids tells the two apart)."""
    return _run(["squeue", "-h", "-o", "%i", "-u", str(os.getuid())]) is not None


def final_state(job_id: str) -> str | None:
    """State of a job from `scontrol show job` (kept for MinJobAge after it ended), or None."""
    out = _run(["scontrol", "show", "job", "-o", job_id])
    if not out:
        return None
    for field in out.split():
        if field.startswith("JobState="):
            return field.split("=", 1)[1]
    return None


def cancel(job_ids: list[str], wait_s: float | None = None) -> list[str]:
    """scancel the jobs still queued, then wait up to `wait_s` (default SLURM_CANCEL_WAIT_S) for
    them to leave the queue (SLURM cancels asynchronously, and a job that traps the signal may
    stay). Returns one line per job still queued, or why that cannot be told: empty only when
    all have gone."""
    wait_s = SLURM_CANCEL_WAIT_S if wait_s is None else wait_s
    if not job_ids:
        return []
    queued = queue_states(job_ids)
    if queued is None:
        return [f"squeue does not answer: cannot tell whether SLURM jobs {', '.join(job_ids)} "
                f"are still queued; cancel them with scancel"]
    active = [j for j, st in queued.items() if st in ACTIVE_STATES]
    if not active:
        return []
    said = _scancel(active)
    deadline = time.monotonic() + wait_s
    while True:
        queued = queue_states(active)
        left = {j: st for j, st in (queued or {}).items() if st in ACTIVE_STATES}
        if queued is not None and not left:
            return []
        if time.monotonic() >= deadline:
            if queued is None:
                return [f"squeue stopped answering after scancel {' '.join(active)} ({said}): "
                        f"cannot tell whether they ended"]
            return [f"SLURM job {j}: still {st} {wait_s:.0f} s after scancel ({said})"
                    for j, st in left.items()]
        time.sleep(0.5)


def _scancel(job_ids: list[str]) -> str:
    """Run scancel; what it said, for the report of a job that stays."""
    try:
        res = subprocess.run(["scancel", *job_ids], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scancel failed: {e}"
    said = " / ".join(ln.strip() for ln in res.stderr.splitlines() if ln.strip())
    return f"scancel: {said or f'exit status {res.returncode}'}"
