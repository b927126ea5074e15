"""Intervals over seeds and the paired per-user test between two arms.

Two questions a grid asks, answered separately because their noise differs:
- How far could an arm's mean over seeds move with other seeds? A Student-t 95% interval over the
  seeds' test metrics (each seed one draw of the whole training; 3 seeds give a wide interval,
  which is the honest answer).
- Is arm A better than the baseline arm on these test users? A paired bootstrap over users:
  each user's metric (HR@10 is 0/1, NDCG@10 in [0, 1]) is averaged over the arm's seeds, the
  per-user differences A - B are resampled with replacement, and the 2.5 / 97.5 percentiles of
  the resampled mean difference give its interval. Pairing by user removes the users' own
  difficulty, the largest source of variance, so it detects gaps the seed intervals cannot. It
  treats the models as fixed: it says whether these trained models differ on this population,
  not whether another training would; the seed interval covers that.
  p is the two-sided bootstrap p-value: twice the smaller share of resampled differences on
  either side of 0 (at most 1).

No SciPy: the t quantile comes from the regularised incomplete beta function below (continued
fraction, as in the standard numerical references), inverted by bisection.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def _betacf(a: float, b: float, x: float) -> float:
    """The incomplete beta function's continued fraction (modified Lentz), x < (a+1)/(a+b+2)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t value with P(T <= t) = p (0 < p < 1), by bisection on t_cdf."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > p:
        lo *= 2.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, abs(mid)):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float          # = mean with a single value: no spread can be estimated from one seed
    hi: float
    n: int

    def fmt(self, digits: int = 4) -> str:
        if self.n < 2:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


def mean_interval(values, level: float = 0.95) -> Interval:
    """Mean of `values` with its two-sided Student-t interval (sample sd, n - 1 df)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean_interval of no values")
    mean = float(v.mean())
    if v.size == 1:
        return Interval(mean, mean, mean, 1)
    half = t_quantile(0.5 + level / 2.0, v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return Interval(mean, mean - half, mean + half, int(v.size))


@dataclass(frozen=True)
class PairedTest:
    diff: float        # mean over users of (arm - baseline)
    lo: float          # percentile bootstrap interval of that mean
    hi: float
    p: float           # two-sided bootstrap p-value
    users: int
    resamples: int

    def fmt_p(self) -> str:
        """p as the resampling can resolve it: none on the other side reads as < 1/resamples."""
        return f"< {1.0 / self.resamples:.0e}" if self.p == 0 else f"{self.p:.4f}"


def paired_bootstrap(arm: np.ndarray, baseline: np.ndarray, level: float = 0.95,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                     chunk: int = 250) -> PairedTest:
    """Paired bootstrap of mean(arm - baseline) over users.

    arm, baseline: float [U], each user's metric (already averaged over the arm's seeds), the
    same users in the same order. Resampled in chunks of `chunk` resamples ([chunk, U] indices
    at a time), so memory stays bounded for large test sets; the draws depend only on `seed`."""
    a = np.asarray(arm, dtype=np.float64)
    b = np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_bootstrap needs two equal non-empty 1-d arrays, got "
                         f"{a.shape} and {b.shape}")
    d = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(resamples, dtype=np.float64)
    for start in range(0, resamples, chunk):
        n = min(chunk, resamples - start)
        idx = rng.integers(0, d.size, size=(n, d.size))
        means[start:start + n] = d[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    p = min(1.0, 2.0 * min(float((means <= 0).mean()), float((means >= 0).mean())))
    return PairedTest(float(d.mean()), float(lo), float(hi), p, int(d.size), resamples)
