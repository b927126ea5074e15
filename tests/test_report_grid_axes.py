"""s3rec-report on a grid with `axes` and `finetune_from`: the folders
`<dataset>/<variant>/r<rank>/<key>=<value>/s<seed>/{pretrain,finetune,finetune-e<N>}` are parsed,
cross-checked with run.json, and every (variant, axis values, pretraining epoch) is its own arm.

The grid tests run one real tiny grid (s3rec-grid, local executor: 4 s3rec cells x 3 stages and
2 finetune-only cells); the _path_axes and label tests are unit tests on made-up paths."""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from s3rec.analysis.read_runs import (Run, RunFolderError, _axis_agrees, _path_axes, read_runs)
from s3rec.analysis.report import build_report
from tests.train_helpers import clean_env, make_dataset

LRS = ("0.001", "0.002")
SEEDS = (1, 2)


# ---------------------------------------------------------------- unit: paths and labels

def test_old_layout_paths_parse_as_before():
    got = _path_axes(("g", "Beauty", "s3rec", "rfull", "s1", "finetune"), "root")
    assert got == {"grid": "g", "dataset": "Beauty", "variant": "s3rec", "rank": "full",
                   "seed": 1, "stage": "finetune", "axes": {}, "from_epoch": None,
                   "cell": "g/Beauty/s3rec/rfull/s1"}
    # the grid folder is RUNS itself: its name is the grid
    got = _path_axes(("Beauty", "s3rec-lowrank", "r8", "s-3", "pretrain"), "root")
    assert (got["grid"], got["rank"], got["seed"], got["cell"]) == \
        ("root", "8", -3, "root/Beauty/s3rec-lowrank/r8/s-3")


def test_axis_folders_and_finetune_epoch_folders_parse():
    rel = ("runs", "g", "syn", "s3rec-lowrank", "r4", "model.dropout=0.1", "pretrain.lr=1e-3",
           "s2", "finetune-e10")
    got = _path_axes(rel, "top")
    assert got == {"grid": "g", "dataset": "syn", "variant": "s3rec-lowrank", "rank": "4",
                   "seed": 2, "stage": "finetune",
                   "axes": {"model.dropout": "0.1", "pretrain.lr": "1e-3"}, "from_epoch": 10,
                   "cell": "g/syn/s3rec-lowrank/r4/model.dropout=0.1/pretrain.lr=1e-3/s2"}
    # the cell's stages share its cell
    for stage in ("pretrain", "finetune"):
        other = _path_axes(rel[:-1] + (stage,), "top")
        assert (other["cell"], other["stage"], other["from_epoch"]) == (got["cell"], stage, None)
    # a string value and a boolean, as the grid writes them
    got = _path_axes(("syn", "s3rec", "rfull", "finetune.loss=bce", "model.flag=true", "s1",
                      "finetune"), "g")
    assert got["axes"] == {"finetune.loss": "bce", "model.flag": "true"}


def test_folders_off_the_layout_are_none_and_a_repeated_axis_is_an_error():
    assert _path_axes(("syn", "s3rec", "s1", "finetune"), "g") is None             # too short
    assert _path_axes(("g", "syn", "s3rec", "pretrain.lr=0.1", "s1", "finetune"), "g") is None
    assert _path_axes(("g", "syn", "s3rec", "r4", "lr=0.1", "seed1", "finetune"), "g") is None
    assert _path_axes(("syn", "r4", "lr=0.1", "s1", "finetune"), "g") is None       # no variant
    # not an axis folder (no key before `=`): off the layout, as any other folder
    assert _path_axes(("g", "syn", "s3rec", "r4", "=0.1", "s1", "finetune"), "g") is None
    # `finetune-e` without a number is no epoch folder: its name is the stage (run.json says no)
    assert _path_axes(("g", "syn", "s3rec", "r4", "s1", "finetune-eX"), "g")["stage"] == \
        "finetune-eX"
    with pytest.raises(ValueError, match=r"pretrain\.lr=0\.1 and pretrain\.lr=0\.2 both give "
                                         r"axis pretrain\.lr"):
        _path_axes(("g", "syn", "s3rec", "r4", "pretrain.lr=0.1", "pretrain.lr=0.2", "s1",
                    "pretrain"), "g")


def test_axis_text_agrees_with_the_config_value_as_the_grid_wrote_it():
    assert _axis_agrees("0.001", 0.001) and _axis_agrees("1e-3", 0.001)
    assert _axis_agrees("1", 1.0) and _axis_agrees("3", 3)
    assert _axis_agrees("true", True) and not _axis_agrees("1", True)
    assert _axis_agrees("bce", "bce") and not _axis_agrees("0.002", 0.001)
    assert not _axis_agrees("x", 0.5) and not _axis_agrees("3.0", 3)


def _run(rank: str, axes: dict, pretrain_from) -> Run:
    return Run(path=Path("/x/finetune"), cell="g/d/v", grid="g", dataset="d",
               variant="s3rec-lowrank", rank=rank, seed=1, stage="finetune", status="done",
               run_json={}, results=None, axes=axes, pretrain_from=pretrain_from)


def test_arm_labels_name_axis_values_and_the_pretraining_epoch():
    r = _run("4", {"pretrain.lr": "0.001", "model.dropout": "0.1"}, 10)
    assert r.arm == "s3rec-lowrank r=4 model.dropout=0.1 pretrain.lr=0.001 @e10"
    assert r.rank_line == "s3rec-lowrank model.dropout=0.1 pretrain.lr=0.001 @e10"
    r.removed = ("sp",)
    assert r.arm == "s3rec-lowrank r=4 model.dropout=0.1 pretrain.lr=0.001 w/o SP @e10"
    # the final weights keep the old grids' label
    assert _run("4", {}, "final").arm == _run("4", {}, "").arm == "s3rec-lowrank r=4"


# ---------------------------------------------------------------- one real grid

@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """(root of the run folders, report folder) of a real tiny grid: variants s3rec and
    finetune-only, seeds 1 and 2, axes pretrain.lr 0.001 / 0.002, finetune_from [1, final]."""
    tmp = tmp_path_factory.mktemp("grid_axes")
    data = make_dataset(tmp, users=200, items=120, attributes=16, seed=7)
    runs = tmp / "runs"
    (tmp / "g.yaml").write_text(json.dumps({
        "name": "axes", "data": [str(data)], "variants": ["s3rec", "finetune-only"],
        "seeds": list(SEEDS), "axes": {"pretrain.lr": [float(x) for x in LRS]},
        "finetune_from": [1, "final"],
        "overrides": {"model.hidden_size": 16, "model.inner_size": 32,
                      "model.max_seq_length": 10, "pretrain.epochs": 2,
                      "pretrain.batch_size": 64, "pretrain.save_epochs": [],
                      "finetune.epochs": 2, "finetune.batch_size": 64},
        "executor": {"kind": "local", "array_parallelism": 2, "cells_per_job": 2,
                     "timeout_min": 20},
        "out": str(runs)}))
    p = subprocess.run(["s3rec-grid", str(tmp / "g.yaml")], cwd=tmp, env=clean_env(),
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, \
        f"s3rec-grid: exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    rep = tmp / "rep"
    p = subprocess.run(["s3rec-report", str(runs), "--out", str(rep), "--no-anatomy",
                        "--baseline", "s3rec pretrain.lr=0.001"], cwd=tmp, env=clean_env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"s3rec-report: exit {p.returncode}\n{p.stderr[-3000:]}"
    return runs, rep


def _dataset(runs: Path) -> str:
    """The grid's one dataset folder (beside _grid/ and _submitit/)."""
    (ds,) = [p.name for p in runs.iterdir() if not p.name.startswith("_")]
    return ds


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def _copy_cell(runs: Path, dst: Path, lr: str, seed: int) -> Path:
    """One s3rec cell of the grid copied under dst with its layout (RUNS/<grid>/<dataset>/...)."""
    rel = Path(_dataset(runs)) / "s3rec" / "rfull" / f"pretrain.lr={lr}" / f"s{seed}"
    shutil.copytree(runs / rel, dst / "g" / rel)
    return dst / "g" / rel


def _edit(rj_path: Path, edit) -> None:
    rj = json.loads(rj_path.read_text())
    edit(rj)
    rj_path.write_text(json.dumps(rj))


@pytest.mark.multiproc
@pytest.mark.slow
def test_runs_csv_has_the_axis_and_pretraining_epoch_of_every_run(grid):
    runs, rep = grid
    rows = _csv(rep / "runs.csv")
    cols = list(rows[0])
    assert cols[cols.index("rank") + 1] == "pretrain.lr"
    got = sorted((r["variant"], r["pretrain.lr"], int(r["seed"]), r["stage"], r["pretrain_from"],
                  Path(r["path"]).name) for r in rows)
    want = sorted([("s3rec", lr, s, "pretrain", "", "pretrain") for lr in LRS for s in SEEDS]
                  + [("s3rec", lr, s, "finetune", "final", "finetune") for lr in LRS for s in SEEDS]
                  + [("s3rec", lr, s, "finetune", "1", "finetune-e1") for lr in LRS for s in SEEDS]
                  + [("finetune-only", "", s, "finetune", "", "finetune") for s in SEEDS])
    assert got == want
    ds = rows[0]["dataset"]
    for r in rows:
        assert r["status"] == "done" and r["grid"] == "runs" and r["dataset"] == ds
        rj = json.loads((Path(r["path"]) / "run.json").read_text())
        if r["variant"] == "s3rec":
            assert float(r["pretrain.lr"]) == rj["config"]["pretrain"]["lr"]
        if r["pretrain_from"] == "1":
            assert r["init_epochs"] == "1" and r["init"].endswith("/pretrain/epoch-1.pt")
    # scalars.csv tells the runs apart by the same columns
    scal = _csv(rep / "scalars.csv")
    keys = {(r["variant"], r["pretrain.lr"], r["seed"], r["stage"], r["pretrain_from"])
            for r in scal}
    assert len(keys) == len(rows)


@pytest.mark.multiproc
@pytest.mark.slow
def test_both_finetunes_of_a_cell_inherit_its_pretraining(grid, tmp_path):
    runs, _ = grid
    every = read_runs(runs)
    for lr in LRS:
        for s in SEEDS:
            cell = f"{runs.name}/{_dataset(runs)}/s3rec/rfull/pretrain.lr={lr}/s{s}"
            stages = [r for r in every if r.cell == cell]
            assert sorted(r.path.name for r in stages) == ["finetune", "finetune-e1", "pretrain"]
            assert all(r.axes == {"pretrain.lr": lr} for r in stages)
    # A cell whose pretraining (only) left SP out and counted other parameters: both of its
    # fine-tunes are ablated arms of that pretraining, with its parameter count.
    cell = _copy_cell(runs, tmp_path, "0.002", 1)

    def ablate(rj):
        rj["config"]["pretrain"]["weights"]["sp"] = 0
        rj["params"]["total"] = 12345
    _edit(cell / "pretrain" / "run.json", ablate)
    got = {r.path.name: r for r in read_runs(tmp_path)}
    for name, arm in (("finetune", "s3rec pretrain.lr=0.002 w/o SP"),
                      ("finetune-e1", "s3rec pretrain.lr=0.002 w/o SP @e1"),
                      ("pretrain", "s3rec pretrain.lr=0.002 w/o SP")):
        assert (got[name].arm, got[name].pretrain_params["total"]) == (arm, 12345)


@pytest.mark.multiproc
@pytest.mark.slow
def test_results_table_has_one_row_per_arm_pooling_its_seeds(grid):
    runs, rep = grid
    text = (rep / "report.md").read_text()
    table = text.split("## Results beside the paper")[1].split("The paper reports")[0]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| ours: ([^|]+?) \| ([^|]+) \|",
                                                        table, re.M)}
    arms = {f"s3rec pretrain.lr={lr}{src}": (lr, folder)
            for lr in LRS for src, folder in (("", "finetune"), (" @e1", "finetune-e1"))}
    assert set(rows) == set(arms) | {"finetune-only"}
    assert set(rows.values()) == {"2 (1,2)"}
    # each row's mean is the mean of exactly its two fine-tunes
    for arm, (lr, folder) in arms.items():
        cells = runs / _dataset(runs) / "s3rec" / "rfull" / f"pretrain.lr={lr}"
        hr = [_results(cells / f"s{s}" / folder)["test"]["HR@10"] for s in SEEDS]
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| ours: {arm} |"))
        assert f"| {sum(hr) / 2:.4f} [" in line, (arm, hr, line)
    # the paired test is against the asked arm, with every other arm once per metric
    paired = text.split("## Arms against the baseline")[1].split("Paired bootstrap")[0]
    assert "against s3rec pretrain.lr=0.001" in paired
    tested = re.findall(r"^\| ([^|]+?) \| 1,2 \| HR@10 \|", paired, re.M)
    assert sorted(tested) == sorted((set(arms) | {"finetune-only"}) - {"s3rec pretrain.lr=0.001"})
    # figures are drawn per arm too: the learning curves of this dataset exist
    assert list((rep / "figures").glob("learning_curves_*.png"))


@pytest.mark.multiproc
@pytest.mark.slow
def test_run_json_disagreeing_with_its_axis_folder_is_an_error_naming_it(grid, tmp_path):
    runs, _ = grid
    cell = _copy_cell(runs, tmp_path / "a", "0.001", 1)
    assert {r.path.name for r in read_runs(tmp_path / "a")} == {"pretrain", "finetune",
                                                                  "finetune-e1"}
    rj = cell / "finetune-e1" / "run.json"
    _edit(rj, lambda d: d["config"]["pretrain"].update(lr=0.003))
    with pytest.raises(RunFolderError, match=re.escape(f"{rj}: the folder says pretrain.lr=0.001 "
                                                       f"but run.json says pretrain.lr=0.003")):
        read_runs(tmp_path / "a")
    # a fine-tune folder whose --init is another epoch's weights
    cell = _copy_cell(runs, tmp_path / "b", "0.002", 2)
    (cell / "finetune-e1").rename(cell / "finetune-e2")
    with pytest.raises(RunFolderError, match=re.escape(
            f"{cell / 'finetune-e2' / 'run.json'}: the folder finetune-e2 says pretraining "
            f"epoch 2 but run.json's init is ") + r"/.*/pretrain/epoch-1\.pt \(epoch 1\)"):
        read_runs(tmp_path / "b")
    cell = _copy_cell(runs, tmp_path / "c", "0.002", 2)
    shutil.rmtree(cell / "finetune")
    (cell / "finetune-e1").rename(cell / "finetune")
    with pytest.raises(RunFolderError, match=re.escape(
            f"{cell / 'finetune' / 'run.json'}: the folder finetune holds the fine-tune from the "
            f"pretraining's final weights but run.json's init is ") + r".*epoch-1\.pt"):
        read_runs(tmp_path / "c")


@pytest.mark.multiproc
@pytest.mark.slow
def test_unfinished_finetune_of_an_epoch_is_listed_by_its_folder(grid, tmp_path):
    runs, _ = grid
    cell = _copy_cell(runs, tmp_path / "runs", "0.001", 1)
    _edit(cell / "finetune-e1" / "run.json", lambda d: d.update(status="running"))
    text = build_report(tmp_path / "runs", tmp_path / "rep", anatomy=False).read_text()
    bad = text.split("**Unfinished and failed runs**")[1].split("##")[0]
    rel = cell.relative_to(tmp_path / "runs").as_posix()
    assert f"| {rel}/finetune-e1 | finetune | unfinished |" in bad
    assert f"| {rel} | finetune |" not in bad and f"| {rel}/finetune |" not in bad
    # one seed each: the finished fine-tune from the final weights, none from epoch 1
    assert "| ours: s3rec pretrain.lr=0.001 | 1 (1) |" in text
    assert "| ours: s3rec pretrain.lr=0.001 @e1 |" not in text


@pytest.mark.multiproc
@pytest.mark.slow
def test_a_baseline_naming_no_arm_and_a_missing_default_are_said(grid, tmp_path):
    """Every s3rec arm here carries an axis value, so none is named `s3rec`: the default
    baseline is absent. A --baseline naming no arm (a typo, or an arm whose fine-tunes have not
    started) is not an error, since a grid under way has no such fine-tune yet: both are said
    in the report, with the arms to choose from, and the asked one on stderr too."""
    runs, _ = grid
    p = subprocess.run(["s3rec-report", str(runs), "--out", str(tmp_path / "typo"),
                        "--no-anatomy", "--baseline", "s3rec @e2"], env=clean_env(),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "s3rec-report: warning: --baseline 's3rec @e2': no fine-tune of that arm" in p.stderr
    assert "'s3rec pretrain.lr=0.001 @e1'" in p.stderr and "'finetune-only'" in p.stderr
    for folder, said in (("typo", "the baseline `s3rec @e2` has no finished fine-tune here"),
                         ("default", "no arm named `s3rec`")):
        if folder == "default":
            build_report(runs, tmp_path / folder, anatomy=False)
        text = (tmp_path / folder / "report.md").read_text()
        paired = text.split("## Arms against the baseline, paired by test user")[1]
        paired = paired.split("\n## ")[0]
        assert f"{said}; choose the baseline with `--baseline ARM`, one of: " in paired
        assert "`s3rec pretrain.lr=0.002 @e1`" in paired and "`finetune-only`" in paired
