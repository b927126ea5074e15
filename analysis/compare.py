"""Each arm against the baseline arm on the same test users: the report's paired test.

For every (dataset, protocol) the finished fine-tunes are grouped by arm; each user's HR@10 and
NDCG@10 (from RUN/test_ranks.npy) are averaged over the arm's seeds, and the arm is compared with
the baseline arm by a paired bootstrap over users (s3rec.analysis.stats.paired_bootstrap). The
baseline is the arm the report is asked for (`s3rec-report --baseline ARM`), else `s3rec` (full
pretraining heads: what a low-rank or ablated arm has to keep up with) when the group has it.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from s3rec import metrics
from s3rec.analysis.read_runs import Run
from s3rec.analysis.stats import PairedTest, paired_bootstrap

DEFAULT_BASELINE = "s3rec"
PAIRED_METRICS = ("HR@10", "NDCG@10")


@dataclass
class ArmUsers:
    """One arm's finished fine-tunes in one (dataset, protocol), with the per-user metrics."""
    arm: str
    seeds: list[int]
    values: dict[str, np.ndarray]      # metric -> float64 [users], mean over the arm's seeds
    left_out: list[str]                # runs without usable per-user ranks, and why


def arm_users(arm: str, runs: list[Run]) -> ArmUsers:
    per_metric: dict[str, list[np.ndarray]] = defaultdict(list)
    seeds, left_out, size = [], [], None
    for r in sorted(runs, key=lambda r: r.seed):
        ranks = r.test_ranks()
        if ranks is None:
            left_out.append(f"{r.cell}: no test_ranks.npy")
            continue
        if size is not None and ranks.size != size:
            left_out.append(f"{r.cell}: {ranks.size} test users, the arm's others {size}")
            continue
        size = ranks.size
        seeds.append(r.seed)
        t = torch.from_numpy(ranks.astype(np.int64))
        for m in PAIRED_METRICS:
            per_metric[m].append(metrics.user_values(t, m).numpy())
    values = {m: np.mean(v, axis=0) for m, v in per_metric.items()}
    return ArmUsers(arm, seeds, values, left_out)


def pick_baseline(arms: dict[str, list[Run]], asked: str | None) -> str | None:
    if asked is not None:
        return asked if asked in arms else None
    return DEFAULT_BASELINE if DEFAULT_BASELINE in arms else None


def paired_rows(arms: dict[str, list[Run]], baseline: str
                ) -> tuple[list[list], list[str]]:
    """Table rows (arm, seeds, metric, arm mean, baseline mean, difference [95%], relative, p)
    and notes on runs left out."""
    base = arm_users(baseline, arms[baseline])
    notes = [f"{baseline}: {n}" for n in base.left_out]
    if not base.seeds:
        return [], notes + [f"baseline {baseline} has no run with per-user test ranks"]
    n_users = len(next(iter(base.values.values())))
    rows = []
    for arm in sorted(a for a in arms if a != baseline):
        other = arm_users(arm, arms[arm])
        notes += [f"{arm}: {n}" for n in other.left_out]
        if not other.seeds:
            continue
        if len(next(iter(other.values.values()))) != n_users:
            notes.append(f"{arm}: test users differ from the baseline's: not paired")
            continue
        for m in PAIRED_METRICS:
            t: PairedTest = paired_bootstrap(other.values[m], base.values[m])
            b_mean = float(base.values[m].mean())
            rel = f"{100 * t.diff / b_mean:+.2f}%" if b_mean else ""
            rows.append([arm, ",".join(map(str, other.seeds)), m, f"{other.values[m].mean():.4f}",
                         f"{b_mean:.4f}", f"{t.diff:+.4f} [{t.lo:+.4f}, {t.hi:+.4f}]", rel,
                         t.fmt_p()])
    return rows, notes
