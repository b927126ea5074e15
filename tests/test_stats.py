"""The report's statistics against independent computations: the t quantile against printed
t-table values (and SciPy where installed), the seed interval against its textbook formula, and
the paired bootstrap against a plain one-resample-at-a-time loop and against the normal
approximation, on made-up per-user ranks written as run folders."""
from __future__ import annotations

import math

import numpy as np
import pytest

from s3rec.analysis.compare import paired_rows
from s3rec.analysis.read_runs import Run, RunFolderError
from s3rec.analysis.stats import mean_interval, paired_bootstrap, t_cdf, t_quantile

# two-sided 95% critical values of Student's t, from a printed table
T_TABLE_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 30: 2.042, 120: 1.980}


@pytest.mark.parametrize("df,value", sorted(T_TABLE_975.items()))
def test_t_quantile_matches_the_printed_table(df, value):
    assert t_quantile(0.975, df) == pytest.approx(value, abs=5e-4)
    assert t_cdf(t_quantile(0.975, df), df) == pytest.approx(0.975, abs=1e-12)
    assert t_quantile(0.025, df) == pytest.approx(-value, abs=5e-4)


def test_t_quantile_matches_scipy():
    stats = pytest.importorskip("scipy.stats", reason="SciPy is not installed here")
    for df in (1, 2, 3, 5, 17, 200):
        for p in (0.6, 0.9, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


def test_mean_interval_is_the_textbook_t_interval():
    v = [0.5508, 0.5431, 0.5602]
    m = sum(v) / 3
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / 2)
    half = 4.302652729749 * sd / math.sqrt(3)
    iv = mean_interval(v)
    assert (iv.mean, iv.n) == (pytest.approx(m), 3)
    assert (iv.lo, iv.hi) == (pytest.approx(m - half, abs=1e-12), pytest.approx(m + half, abs=1e-12))
    assert iv.fmt() == f"{m:.4f} [{m - half:.4f}, {m + half:.4f}]"
    one = mean_interval([0.3])
    assert (one.lo, one.hi, one.fmt()) == (0.3, 0.3, "0.3000")
    with pytest.raises(ValueError):
        mean_interval([])


def _loop_bootstrap(d: np.ndarray, resamples: int, seed: int):
    """One resample at a time, percentiles and p by sorting: an independent transcription."""
    rng = np.random.default_rng(seed)
    means = sorted(float(d[rng.integers(0, d.size, size=d.size)].mean()) for _ in range(resamples))
    below = sum(m <= 0 for m in means) / resamples
    above = sum(m >= 0 for m in means) / resamples
    return means, min(1.0, 2 * min(below, above))


def test_paired_bootstrap_equals_a_plain_loop_and_the_normal_approximation():
    rng = np.random.default_rng(7)
    n = 3000
    base = (rng.random(n) < 0.50).astype(float)                # HR@10 of each user, 0/1
    arm = np.where(rng.random(n) < 0.1, 1 - base, base)        # flips 10% of the users
    t = paired_bootstrap(arm, base, resamples=2000, seed=3, chunk=300)
    means, p = _loop_bootstrap(arm - base, 2000, 3)
    assert t.diff == pytest.approx(float((arm - base).mean()), abs=1e-15)
    assert t.lo == pytest.approx(np.quantile(means, 0.025), abs=1e-15)
    assert t.hi == pytest.approx(np.quantile(means, 0.975), abs=1e-15)
    assert t.p == pytest.approx(p, abs=1e-15)
    # the normal approximation of the mean difference's interval (large n)
    d = arm - base
    half = 1.959964 * d.std(ddof=1) / math.sqrt(n)
    assert t.lo == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert t.hi == pytest.approx(d.mean() + half, abs=0.15 * half)
    same = paired_bootstrap(base, base, resamples=500)
    assert (same.diff, same.lo, same.hi, same.p) == (0.0, 0.0, 0.0, 1.0)


def _run(tmp_path, arm: str, seed: int, ranks: np.ndarray | None) -> Run:
    folder = tmp_path / f"{arm}-s{seed}" / "finetune"
    folder.mkdir(parents=True)
    if ranks is not None:
        np.save(folder / "test_ranks.npy", ranks)
    return Run(path=folder, cell=f"{arm}/s{seed}", grid="g", dataset="D", variant=arm,
               rank="full", seed=seed, stage="finetune", status="done",
               run_json={"protocol": "sampled-99"}, results=None)


def test_paired_rows_on_made_up_ranks(tmp_path):
    rng = np.random.default_rng(11)
    users = 4000
    base_ranks = [rng.integers(0, 30, users) for _ in range(3)]
    # the arm ranks every answer 2 places worse: it loses HR@10 for users at ranks 8 and 9
    arm_ranks = [r + 2 for r in base_ranks]
    arms = {"s3rec": [_run(tmp_path, "s3rec", s, r) for s, r in zip((1, 2, 3), base_ranks)],
            "low": [_run(tmp_path, "low", s, r) for s, r in zip((1, 2, 3), arm_ranks)]
            + [_run(tmp_path, "low", 4, None)]}
    rows, notes = paired_rows(arms, "s3rec")
    assert notes == ["low: low/s4: no test_ranks.npy"]
    hr = next(r for r in rows if r[2] == "HR@10")
    b = np.mean([(r < 10).astype(float) for r in base_ranks], axis=0)
    a = np.mean([(r < 10).astype(float) for r in arm_ranks], axis=0)
    assert hr[:5] == ["low", "1,2,3", "HR@10", f"{a.mean():.4f}", f"{b.mean():.4f}"]
    means, p = _loop_bootstrap(a - b, 10_000, 0)
    lo, hi = np.quantile(means, [0.025, 0.975])
    assert hr[5] == f"{(a - b).mean():+.4f} [{lo:+.4f}, {hi:+.4f}]"
    assert hr[6] == f"{100 * (a - b).mean() / b.mean():+.2f}%"
    assert hr[7] == ("< 1e-04" if p == 0 else f"{p:.4f}") and p < 0.001


def test_a_ranks_file_that_is_not_plain_ranks_is_named(tmp_path):
    run = _run(tmp_path, "x", 1, None)
    np.save(run.path / "test_ranks.npy", np.array([0.5, 1.5]))
    with pytest.raises(RunFolderError, match="test_ranks.npy: expected a 1-d array of ranks"):
        run.test_ranks()
    np.save(run.path / "test_ranks.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(RunFolderError, match="test_ranks.npy: not a readable .npy"):
        run.test_ranks()
