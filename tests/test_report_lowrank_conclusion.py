"""The report's low-rank conclusion (analysis/lowrank_study.py) against an independent
computation on made-up runs: per-seed metrics from made-up per-user ranks, Student-t intervals
from scipy, the verdict on the 1% line, and the report made again being the same bytes."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from s3rec.analysis import lowrank_study
from s3rec.analysis.read_runs import Run
from s3rec.analysis.report import build_report

USERS = 400
PARAMS = {"full": {"item_embeddings": 1000, "aap_norm": 4160, "map_norm": 4160,
                   "mip_norm": 4160, "sp_norm": 4160, "total": 17640},
          "4": {"item_embeddings": 1000, "aap_norm": 520, "map_norm": 520,
                "mip_norm": 4160, "sp_norm": 4160, "total": 10360}}


def _ranks(seed: int, shift: int) -> np.ndarray:
    """Made-up 0-based test ranks among 100 candidates; a larger shift ranks worse."""
    rng = np.random.default_rng(seed)
    return np.minimum(99, rng.integers(0, 30, size=USERS) + shift).astype(np.int64)


def _hr10(ranks: np.ndarray) -> float:
    return float((ranks < 10).mean())


def _ndcg10(ranks: np.ndarray) -> float:
    return float(np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0).mean())


def _run(tmp: Path, variant: str, rank: str, seed: int, epoch, shift: int) -> Run:
    folder = tmp / f"{variant}-r{rank}-s{seed}-e{epoch}"
    folder.mkdir(parents=True)
    ranks = _ranks(100 * seed + (0 if variant == "s3rec" else 7), shift)
    np.save(folder / "test_ranks.npy", ranks)
    test = {"HR@10": _hr10(ranks), "NDCG@10": _ndcg10(ranks)}
    return Run(path=folder, cell=f"g/d/{variant}/r{rank}/s{seed}", grid="g", dataset="D",
               variant=variant, rank=rank, seed=seed, stage="finetune", status="done",
               run_json={"protocol": "sampled-99"}, results={"test": test, "valid": {},
                                                              "best_epoch": 1},
               pretrain_params=PARAMS[rank], pretrain_from=epoch)


@pytest.fixture
def runs(tmp_path):
    out = []
    for epoch, low_shift in ((10, 3), (30, 0)):
        for seed in (1, 2, 3):
            out.append(_run(tmp_path, "s3rec", "full", seed, epoch, 0))
            out.append(_run(tmp_path, "s3rec-lowrank", "4", seed, epoch, low_shift))
    return out


def _t_interval(x: np.ndarray) -> tuple[float, float, float]:
    m = float(np.mean(x))
    half = sps.t.ppf(0.975, len(x) - 1) * np.std(x, ddof=1) / np.sqrt(len(x))
    return m, m - half, m + half


def test_comparisons_equal_an_independent_computation(runs):
    rows = lowrank_study.comparisons(runs)
    assert [(r["epoch"], r["rank"], r["metric"]) for r in rows] == [
        (10, 4, "HR@10"), (10, 4, "NDCG@10"), (30, 4, "HR@10"), (30, 4, "NDCG@10")]
    for row in rows:
        fn = _hr10 if row["metric"] == "HR@10" else _ndcg10
        full = np.array([fn(np.load(r.path / "test_ranks.npy")) for r in runs
                         if r.variant == "s3rec" and r.pretrain_from == row["epoch"]])
        low = np.array([fn(np.load(r.path / "test_ranks.npy")) for r in runs
                        if r.variant != "s3rec" and r.pretrain_from == row["epoch"]])
        for got, want in ((row["full"], _t_interval(full)), (row["low"], _t_interval(low)),
                          (row["diff"], _t_interval(low - full))):
            assert (got.mean, got.lo, got.hi) == pytest.approx(want, abs=1e-9)
        m, lo, hi = _t_interval(low - full)
        assert (row["rel"].mean, row["rel"].lo, row["rel"].hi) == pytest.approx(
            (m / full.mean(), lo / full.mean(), hi / full.mean()), abs=1e-9)
        assert row["paired"].diff == pytest.approx(float((low - full).mean()), abs=1e-12)
        assert row["params"] == ((17640, 16640), (10360, 9360))


def test_verdict_on_the_one_percent_line():
    from s3rec.analysis.stats import Interval
    assert lowrank_study._verdict(Interval(-0.002, -0.008, 0.004, 3)).startswith("yes")
    assert lowrank_study._verdict(Interval(-0.005, -0.02, 0.01, 3)).startswith("not shown")
    assert lowrank_study._verdict(Interval(-0.005, -0.005, -0.005, 1)).startswith("not shown")
    assert lowrank_study._verdict(Interval(-0.03, -0.05, -0.011, 3)) == \
        "no (-3.00%; the whole interval is below -1%)"
    # a mean outside the line, an interval reaching over it: not a settled "no"
    assert lowrank_study._verdict(Interval(-0.03, -0.08, 0.02, 3)) == \
        "no by the mean (-3.00%), but the interval reaches +2.00%: a gap within 1% is not " \
        "ruled out"
    assert lowrank_study._verdict(Interval(-0.03, -0.03, -0.03, 1)) == \
        "no (-3.00%; one seed: no interval)"


def test_conclusion_states_parameters_verdicts_and_the_gap_over_epochs(runs):
    text = lowrank_study.conclusion_section(runs)
    # parameters: 17,640 - 10,360 = 7,280 fewer (41.27%); heads 16,640 -> 9,360 (43.8%)
    assert "10,360 against 17,640 for full heads: 7,280 fewer (41.27% of the model)" in text
    assert "in the heads 9,360 against 16,640 (43.8% of the heads)" in text
    # epoch 30: identical shift, so the low-rank arm differs only by its seeds' draws
    assert re.search(r"r = 4, HR@10\*\* relative to full heads: epoch 10: [-+]\d", text)
    assert "From epoch 10 to epoch 30 the gap moves by" in text
    # epoch 10's low-rank arm ranks every user 3 places worse: a "no" by the mean, whose
    # three-seed interval still just reaches the 1% line
    row10 = next(r for r in lowrank_study.comparisons(runs)
                 if r["epoch"] == 10 and r["metric"] == "HR@10")
    assert row10["rel"].mean < -0.1
    assert lowrank_study._verdict(row10["rel"]).startswith("no by the mean (-26.79%)")


def test_report_made_again_is_the_same_bytes_apart_from_its_time(tmp_path):
    """On a real tiny grid's folders the test suite already makes (the fabricated grid of
    tests/test_analysis_fixtures.py): everything the report writes is the same bytes twice."""
    from tests.test_analysis_fixtures import fabricate_grid
    root = tmp_path / "runs"
    fabricate_grid(root)
    a, b = tmp_path / "a", tmp_path / "b"
    cmd = "s3rec-report runs --out OUT"
    build_report(root, a, anatomy=False, command=cmd)
    build_report(root, b, anatomy=False, command=cmd)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert any(str(f).endswith(".svg") for f in files_a) and any(str(f).endswith(".png")
                                                                 for f in files_a)
    for f in files_a:
        x, y = (a / f).read_bytes(), (b / f).read_bytes()
        if f.name == "report.md":
            x, y = (re.sub(rb"Generated \S+", b"Generated T", v) for v in (x, y))
            assert f"Regenerate it with `{cmd}`.".encode() in x
        assert x == y, f"{f} differs between two reports of the same runs"


def test_a_consistent_move_of_the_gap_is_shown_though_the_epochs_intervals_overlap(tmp_path):
    """Seeds far apart (each low-rank seed a different distance behind), each moving the same
    way by a little from epoch 10 to 30: the two epochs' intervals overlap widely, yet every
    seed lost ground. The change is paired by seed (both fine-tunes of a seed start from one
    pretraining run), its t-interval from scipy here."""
    runs = []
    for epoch, extra in ((10, 0), (30, 1)):
        for seed, shift in ((1, 0), (2, 4), (3, 8)):
            runs.append(_run(tmp_path, "s3rec", "full", seed, epoch, 0))
            runs.append(_run(tmp_path, "s3rec-lowrank", "4", seed, epoch, shift + extra))
    rows = [r for r in lowrank_study.comparisons(runs) if r["metric"] == "HR@10"]
    a, b = sorted(rows, key=lambda r: r["epoch"])
    assert a["rel"].lo <= b["rel"].hi and b["rel"].lo <= a["rel"].hi      # they overlap
    rel = {}
    for epoch in (10, 30):
        full = {r.seed: _hr10(np.load(r.path / "test_ranks.npy")) for r in runs
                if r.variant == "s3rec" and r.pretrain_from == epoch}
        low = {r.seed: _hr10(np.load(r.path / "test_ranks.npy")) for r in runs
               if r.variant != "s3rec" and r.pretrain_from == epoch}
        base = np.mean(list(full.values()))
        rel[epoch] = np.array([(low[s] - full[s]) / base for s in (1, 2, 3)])
    m, lo, hi = (100 * v for v in _t_interval(rel[30] - rel[10]))
    assert hi < 0
    text = lowrank_study.conclusion_section(runs)
    said = re.search(r"r = 4, HR@10\*\* .*\n  (From epoch 10 to epoch 30 .*)", text).group(1)
    assert said == (f"From epoch 10 to epoch 30 the gap moves by {m:+.2f} percentage points "
                    f"[{lo:+.2f}, {hi:+.2f}], paired by seed (1,2,3): the whole interval is "
                    f"below 0, so the low-rank heads lose ground with longer pretraining.")


def _row(epoch, metric, mean, lo, hi, n=3) -> dict:
    from s3rec.analysis.stats import Interval
    return {"epoch": epoch, "metric": metric, "rel": Interval(mean, lo, hi, n)}


def test_in_short_answers_yes_only_when_every_interval_clears_the_line():
    rows = [_row(10, "HR@10", -0.002, -0.008, 0.004), _row(10, "NDCG@10", 0.001, -0.005, 0.007)]
    assert lowrank_study._in_short(16, rows) == (
        "- **In short, r = 16 keeps the full heads' accuracy:** within 1% on HR@10 at epoch 10 "
        "(-0.20%), NDCG@10 at epoch 10 (+0.10%), each seed interval above the line.")
    # one interval reaching below the line: no longer a yes, not a no either
    rows[1] = _row(10, "NDCG@10", -0.004, -0.02, 0.012)
    assert lowrank_study._in_short(16, rows) == (
        "- **In short, r = 16 is not shown to keep the full heads' accuracy:** within 1%, the "
        "whole interval too, on HR@10 at epoch 10 (-0.20%); within 1% by the mean on NDCG@10 at "
        "epoch 10 (-0.40%), but not by the whole interval; more seeds would settle it.")


def test_in_short_says_no_where_a_whole_interval_is_beyond_the_line_and_names_the_rest():
    rows = [_row(10, "HR@10", -0.0345, -0.0616, -0.0073),
            _row(10, "NDCG@10", -0.025, -0.035, -0.016),
            _row(30, "HR@10", -0.05, -0.067, -0.034), _row(30, "NDCG@10", 0.0, -0.004, 0.004)]
    assert lowrank_study._in_short(4, rows) == (
        "- **In short, r = 4 does not keep the full heads' accuracy:** more than 1% behind, the "
        "whole seed interval too, on NDCG@10 at epoch 10 (-2.50%), HR@10 at epoch 30 (-5.00%); "
        "within 1% on NDCG@10 at epoch 30 (+0.00%); not settled (the interval reaches across "
        "the line) on HR@10 at epoch 10 (-3.45%).")


def test_in_short_with_one_seed_settles_nothing():
    rows = [_row(10, "HR@10", -0.004, -0.004, -0.004, 1), _row(30, "HR@10", -0.03, -0.03, -0.03, 1)]
    assert lowrank_study._in_short(16, rows) == (
        "- **In short, r = 16 is not shown to keep the full heads' accuracy:** within 1% by the "
        "mean on HR@10 at epoch 10 (-0.40%), with one seed, no interval; more than 1% behind by "
        "the mean on HR@10 at epoch 30 (-3.00%), with one seed, no interval; more seeds would "
        "settle it.")
