"""The published low-rank study (docs/results/beauty-lowrank/) against the run folders it came
from: every number of its results table and of its conclusion recomputed here from the runs'
results.json, run.json and test_ranks.npy (SciPy's t quantiles, not the report's code), and the
command stated at its top run again, giving the same files byte for byte apart from the
`Generated` line.

The run folders are not in the repository (the grid's checkpoints are gigabytes): the test runs
where they are, from the folder the report's command was run in (S3REC_STUDY_ROOT, default the
repository root, where `runs/` may link to them), and skips elsewhere, saying so."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from tests.train_helpers import REPO, clean_env

# S3REC_STUDY_REPORT: another report of such a grid, to check this test itself on a small one
REPORT = Path(os.environ.get("S3REC_STUDY_REPORT", REPO / "docs" / "results" / "beauty-lowrank"))
ROOT = Path(os.environ.get("S3REC_STUDY_ROOT", REPO))

pytestmark = pytest.mark.slow


def _command() -> list[str]:
    text = (REPORT / "report.md").read_text()
    m = re.search(r"^Regenerate it with `(s3rec-report [^`]+)`\.$", text, re.M)
    assert m, "the report states no command that regenerates it"
    return shlex.split(m.group(1))


@pytest.fixture(scope="module")
def study() -> tuple[Path, list[str]]:
    """(the grid's run folders, the report's command)."""
    if not (REPORT / "report.md").is_file():
        pytest.skip(f"no published study at {REPORT}")
    cmd = _command()
    runs = ROOT / cmd[1]
    if not runs.is_dir():
        pytest.skip(f"the study's run folders are not here ({runs}); set S3REC_STUDY_ROOT to "
                    f"the folder its command ran in")
    return runs, cmd


def _finetunes(runs: Path) -> dict[str, dict[int, Path]]:
    """arm -> seed -> finished fine-tune folder, the arm named from the folder alone:
    <dataset>/<variant>/r<rank>/s<seed>/finetune[-e<N>]."""
    arms: dict[str, dict[int, Path]] = defaultdict(dict)
    for res in sorted(runs.glob("*/*/r*/s*/finetune*/results.json")):
        stage, seed, rank, variant = res.parent.name, res.parents[1].name, \
            res.parents[2].name[1:], res.parents[3].name
        if json.loads((res.parent / "run.json").read_text()).get("status") != "done":
            continue
        arm = variant if rank == "full" else f"{variant} r={rank}"
        arm += f" @e{stage.split('-e')[1]}" if "-e" in stage else ""
        arms[arm][int(seed[1:])] = res.parent
    return arms


def _half(v: np.ndarray) -> float:
    """Half the width of a 95% Student-t interval of the mean of v."""
    return stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)


def _interval(values) -> str:
    """mean [lo, hi] as the report prints it: a 95% Student-t interval over seeds."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return f"{v.mean():.4f}"
    half = _half(v)
    return f"{v.mean():.4f} [{v.mean() - half:.4f}, {v.mean() + half:.4f}]"


def _test(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())["test"]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_results_table_is_the_mean_and_interval_of_each_arms_results_json(study):
    runs, _ = study
    text = (REPORT / "report.md").read_text()
    section = text.split("## Results beside the paper")[1].split("\n## ")[0]
    header = next(ln for ln in section.splitlines() if ln.startswith("|  | seeds |"))
    metrics = _cells(header)[3:]
    arms = _finetunes(runs)
    rows = {(c := _cells(ln))[0][len("ours: "):]: c for ln in section.splitlines()
            if ln.startswith("| ours: ")}
    assert set(rows) == set(arms), (sorted(rows), sorted(arms))
    for arm, seeds in arms.items():
        row = rows[arm]
        assert row[1].startswith(f"{len(seeds)} ({','.join(map(str, sorted(seeds)))})"), row
        for m, cell in zip(metrics, row[3:]):
            values = [_test(seeds[s])[m] for s in sorted(seeds) if m in _test(seeds[s])]
            assert cell == (_interval(values) if values else ""), (arm, m, cell)


def _user_metric(ranks: np.ndarray, m: str) -> np.ndarray:
    """Each test user's HR@10 or NDCG@10 from the 0-based rank of the answer."""
    hit = ranks < 10
    return hit.astype(float) if m == "HR@10" else np.where(hit, 1 / np.log2(ranks + 2.0), 0.0)


def test_conclusion_numbers_come_from_the_runs(study):
    from s3rec.analysis.stats import paired_bootstrap

    runs, _ = study
    text = (REPORT / "report.md").read_text()
    assert "## Conclusion: low-rank heads against full heads" in text, "no conclusion yet"
    conclusion = text.split("## Conclusion: low-rank heads against full heads")[1]
    arms = _finetunes(runs)
    rows = [_cells(ln) for ln in conclusion.splitlines()
            if re.match(r"^\| \d+ \| (epoch \d+|final) \|", ln)]
    assert rows
    for rank, epoch, m, seeds_text, full, low, diff, rel, boot, _ in rows:
        at = f" @e{epoch.split()[1]}" if epoch.startswith("epoch") else ""
        f_arm, l_arm = arms[f"s3rec{at}"], arms[f"s3rec-lowrank r={rank}{at}"]
        seeds = sorted(set(f_arm) & set(l_arm))
        assert seeds_text == ",".join(map(str, seeds))
        fv = np.array([_test(f_arm[s])[m] for s in seeds])
        lv = np.array([_test(l_arm[s])[m] for s in seeds])
        assert (full, low, diff) == (_interval(fv), _interval(lv), _interval(lv - fv))
        d, base = lv - fv, fv.mean()
        if d.size < 2:
            assert rel == f"{100 * d.mean() / base:+.2f}%"
        else:
            half = _half(d)
            assert rel == (f"{100 * d.mean() / base:+.2f}% [{100 * (d.mean() - half) / base:+.2f}"
                           f", {100 * (d.mean() + half) / base:+.2f}]")
        # the same relative mean wherever the short answer names this rank, metric and epoch
        for short in re.findall(rf"^- \*\*In short, r = {rank} .*$", conclusion, re.M):
            for said in re.findall(rf"{re.escape(m)} at {epoch} \(([-+]\d+\.\d+)%\)", short):
                assert said == f"{100 * d.mean() / base:+.2f}", (rank, m, epoch, short)
        users = [np.mean([_user_metric(np.load(a[s] / "test_ranks.npy"), m) for s in seeds], 0)
                 for a in (l_arm, f_arm)]
        p = paired_bootstrap(*users)
        assert boot == f"{p.diff:+.4f} [{p.lo:+.4f}, {p.hi:+.4f}], p {p.fmt_p()}"
    # the gap's move from the first pretraining epoch to the last, each seed's own change
    for rank in sorted({int(r[0]) for r in rows}):
        for m in ("HR@10", "NDCG@10"):
            epochs = sorted({int(r[1].split()[1]) for r in rows if r[0] == str(rank) and
                             r[2] == m and r[1].startswith("epoch")})
            if len(epochs) < 2:
                continue
            rel = {}
            for e in (epochs[0], epochs[-1]):
                f_arm, l_arm = arms[f"s3rec @e{e}"], arms[f"s3rec-lowrank r={rank} @e{e}"]
                seeds = sorted(set(f_arm) & set(l_arm))
                base = np.mean([_test(f_arm[s])[m] for s in seeds])
                rel[e] = {s: (_test(l_arm[s])[m] - _test(f_arm[s])[m]) / base for s in seeds}
            seeds = sorted(set(rel[epochs[0]]) & set(rel[epochs[-1]]))
            change = 100 * np.array([rel[epochs[-1]][s] - rel[epochs[0]][s] for s in seeds])
            said = re.search(rf"\*\*r = {rank}, {m}\*\* .*\n  From epoch {epochs[0]} to epoch "
                             rf"{epochs[-1]} the gap moves by (.*?) percentage points( \[.*?\])?",
                             conclusion)
            assert said, (rank, m)
            assert said.group(1) == f"{change.mean():+.2f}"
            if change.size >= 2:
                half = _half(change)
                assert said.group(2) == f" [{change.mean() - half:+.2f}, " \
                                        f"{change.mean() + half:+.2f}]"
    # parameters: the pretraining run.json of a cell of each arm
    def pretrain_params(arm: str) -> dict:
        # the arm fine-tuned from any pretraining epoch: one pretraining run.json per cell
        seeds = next(v for k, v in arms.items() if k.split(" @")[0] == arm)
        return json.loads((next(iter(seeds.values())).parent / "pretrain" /
                           "run.json").read_text())["params"]

    for rank in sorted({int(r[0]) for r in rows}):
        f_pre, l_pre = pretrain_params("s3rec"), pretrain_params(f"s3rec-lowrank r={rank}")
        f_total, l_total = int(f_pre["total"]), int(l_pre["total"])
        said = re.search(rf"\*\*r = {rank}, parameters:\*\* ([\d,]+) against ([\d,]+) for full "
                         rf"heads: ([\d,]+) fewer", conclusion)
        assert said and [int(g.replace(",", "")) for g in said.groups()] == \
            [l_total, f_total, f_total - l_total]
        # the four pretraining heads (AAP, MIP, MAP, SP), each named <objective>_norm
        f_heads, l_heads = (sum(int(p[f"{o}_norm"]) for o in ("aap", "mip", "map", "sp"))
                            for p in (f_pre, l_pre))
        assert f"r = {rank}, parameters:** {l_total:,} against {f_total:,} for full heads: " \
               f"{f_total - l_total:,} fewer ({100 * (f_total - l_total) / f_total:.2f}% of the " \
               f"model); in the heads {l_heads:,} against {f_heads:,} " \
               f"({100 * (f_heads - l_heads) / f_heads:.1f}% of the heads)." in conclusion


def test_the_stated_command_makes_the_same_report_again(study, tmp_path):
    runs, cmd = study
    out_at = cmd.index("--out") + 1
    again = tmp_path / "again"
    cmd = cmd[:out_at] + [str(again)] + cmd[out_at + 1:]
    p = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                       timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    published = sorted(f.relative_to(REPORT) for f in REPORT.rglob("*") if f.is_file())
    made = sorted(f.relative_to(again) for f in again.rglob("*") if f.is_file())
    assert published == made
    for f in published:
        a, b = (REPORT / f).read_bytes(), (again / f).read_bytes()
        if f.name == "report.md":
            # the time it was made, and the --out it was made into, are all that may differ
            a, b = (re.sub(rb"^(Generated|Regenerate it with) .*$", b"", x, flags=re.M)
                    for x in (a, b))
        assert a == b, f
