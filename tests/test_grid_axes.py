"""Grid `axes` and `finetune_from`: folder names, validation naming the key, the commands, and a
relaunch after finetune_from gained an epoch the pretraining did not save."""
from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from submitit.core.utils import JobPaths

from s3rec.config import load_config
from s3rec.launch import grid_cli
from s3rec.launch.grid import GridError, grid_from_dict, load_grid
from s3rec.launch.runner import is_active, open_grid
from tests.cluster_fixtures import TINY, tiny_data  # noqa: F401
from tests.train_helpers import clean_env

BASE = {
    "name": "ax",
    "data": ["/d/syn"],
    "variants": ["s3rec", "finetune-only"],
    "seeds": [1],
    "overrides": {"model.hidden_size": 16, "pretrain.epochs": 2, "finetune.epochs": 2},
    "out": "runs/ax",
}


def spec(**changes) -> dict:
    data = json.loads(json.dumps(BASE))
    data.update(changes)
    return data


def write_grid(tmp_path: Path, data: dict, text: str | None = None) -> Path:
    p = tmp_path / "grid.yaml"
    p.write_text(text if text is not None else yaml.safe_dump(data, sort_keys=False))
    return p


def refused(tmp_path: Path, data: dict, capsys) -> str:
    """load_grid raises GridError and the CLI exits 2, writing nothing; the message."""
    path = write_grid(tmp_path, dict(data, out=str(tmp_path / "runs")))
    with pytest.raises(GridError) as e:
        load_grid(path)
    assert grid_cli.main([str(path)]) == 2
    assert not (tmp_path / "runs").exists()
    assert str(path) in capsys.readouterr().err
    return str(e.value)


def keys(grid) -> list[str]:
    return [c.key for c in grid.cells()]


# ------------------------------------------------------------------ folder names

def test_axis_folders_are_readable_and_sorted_whatever_the_yaml_order(tmp_path):
    axes = {"pretrain.lr": [0.001, 0.002], "model.heads.aap.init": ["orthogonal", "xavier"],
            "model.fast_dropout": [True, False]}
    grids = []
    for order in (list(axes), list(reversed(axes))):
        text = yaml.safe_dump(spec(variants=["s3rec"], axes={k: axes[k] for k in order}),
                              sort_keys=False)
        assert text.index(order[0]) < text.index(order[-1])     # the YAML really is in that order
        grids.append(load_grid(write_grid(tmp_path, {}, text)))
    assert keys(grids[0]) == keys(grids[1])
    assert keys(grids[0]) == [
        f"syn/s3rec/rfull/model.fast_dropout={b}/model.heads.aap.init={i}/pretrain.lr={lr}/s1"
        for b in ("true", "false") for i in ("orthogonal", "xavier") for lr in ("0.001", "0.002")]
    cell = grids[0].cells()[0]
    assert cell.axis_values == (("model.fast_dropout", True),
                                ("model.heads.aap.init", "orthogonal"), ("pretrain.lr", 0.001))
    # what the folder says is what the training gets
    cfg = load_config(None, cell.override_args())
    assert (cfg.model.fast_dropout, cfg.model.heads.aap.init, cfg.pretrain.lr) == \
        (True, "orthogonal", 0.001)


def test_yaml_exponent_is_a_string_named_as_written_and_read_as_a_number(tmp_path):
    """PyYAML reads `1e-3` (no dot) as a string: the folder keeps the spelling, the config the
    number."""
    text = yaml.safe_dump(spec(variants=["s3rec"])) + "axes:\n  pretrain.lr: [1e-3, 2.0e-3]\n"
    grid = load_grid(write_grid(tmp_path, {}, text))
    assert keys(grid) == ["syn/s3rec/rfull/pretrain.lr=1e-3/s1",
                          "syn/s3rec/rfull/pretrain.lr=0.002/s1"]
    lrs = [load_config(None, c.override_args()).pretrain.lr for c in grid.cells()]
    assert lrs == [0.001, 0.002]


def test_finetune_only_cells_drop_pretrain_axes():
    grid = grid_from_dict(spec(axes={"pretrain.lr": [0.001, 0.002], "finetune.lr": [0.001, 0.01]}))
    assert keys(grid) == [
        "syn/s3rec/rfull/finetune.lr=0.001/pretrain.lr=0.001/s1",
        "syn/s3rec/rfull/finetune.lr=0.001/pretrain.lr=0.002/s1",
        "syn/s3rec/rfull/finetune.lr=0.01/pretrain.lr=0.001/s1",
        "syn/s3rec/rfull/finetune.lr=0.01/pretrain.lr=0.002/s1",
        "syn/finetune-only/rfull/finetune.lr=0.001/s1",
        "syn/finetune-only/rfull/finetune.lr=0.01/s1"]
    only = [c for c in grid.cells() if c.variant == "finetune-only"]
    pre, fines = only[0].commands()
    assert pre is None and len(fines) == 1 and "--init" not in fines[0]
    assert not any(a.startswith("pretrain.lr=") for a in fines[0])
    assert "finetune.lr=0.001" in fines[0]


# ------------------------------------------------------------------ bad axes

def test_axis_that_is_also_an_override_names_both_keys(tmp_path, capsys):
    msg = refused(tmp_path, spec(axes={"pretrain.epochs": [1, 2]}), capsys)
    assert "axes.pretrain.epochs" in msg and "overrides.pretrain.epochs" in msg


@pytest.mark.parametrize("override, value, axis", [
    ("model.heads", {"aap": {"init": "xavier"}}, "model.heads.aap.init"),
    ("model.heads.aap", {"init": "xavier"}, "model.heads.aap.init"),
])
def test_axis_inside_an_overridden_mapping_names_both_keys(tmp_path, capsys, override, value,
                                                           axis):
    data = spec(axes={axis: ["orthogonal", "svd"]})
    data["overrides"][override] = value
    msg = refused(tmp_path, data, capsys)
    assert f"axes.{axis}': conflicts with 'overrides.{override}', which sets all of it" in msg


@pytest.mark.parametrize("key, named", [("variant", "variants"), ("seed", "seeds"),
                                        ("model.head_rank", "ranks")])
def test_axis_on_a_named_axis_names_it(tmp_path, capsys, key, named):
    msg = refused(tmp_path, spec(axes={key: ["s3rec"] if key == "variant" else [1]}), capsys)
    assert f"axes.{key}" in msg and f"'{named}'" in msg


@pytest.mark.parametrize("values, where, why", [
    ([0.001, [1]], "axes.pretrain.lr[1]", "expected a number, string or boolean"),
    ([None], "axes.pretrain.lr[0]", "expected a number, string or boolean"),
    ([{"a": 1}], "axes.pretrain.lr[0]", "expected a number, string or boolean"),
    ([math.nan], "axes.pretrain.lr[0]", "finite"),
    ([0.001, math.inf], "axes.pretrain.lr[1]", "finite"),
    (["a/b"], "axes.pretrain.lr[0]", "cannot name a folder"),
    ([".."], "axes.pretrain.lr[0]", "cannot name a folder"),
    (["a b"], "axes.pretrain.lr[0]", "cannot name a folder"),
    ([1, "1"], "axes.pretrain.lr'", "two values name the same folder pretrain.lr=1"),
    ([], "axes.pretrain.lr'", "non-empty list"),
    (0.001, "axes.pretrain.lr'", "non-empty list"),
])
def test_bad_axis_values_are_named(tmp_path, capsys, values, where, why):
    msg = refused(tmp_path, spec(axes={"pretrain.lr": values}), capsys)
    assert where in msg and why in msg


def test_axis_values_the_config_reads_as_one_setting_are_refused(tmp_path, capsys):
    msg = refused(tmp_path, spec(axes={"pretrain.lr": ["1e-3", 0.001]}), capsys)
    assert "axes.pretrain.lr" in msg and "same setting (pretrain.lr = 0.001)" in msg
    msg = refused(tmp_path, spec(axes={"finetune.lr": [1, 1.0]}), capsys)
    assert "axes.finetune.lr" in msg and "1 and 1.0 are the same setting" in msg


def test_unknown_axis_key_is_named(tmp_path, capsys):
    msg = refused(tmp_path, spec(axes={"pretrain.lrr": [0.001]}), capsys)
    assert "key 'axes.pretrain.lrr[0]'" in msg and "unknown config key 'pretrain.lrr'" in msg


def test_unknown_pretrain_axis_key_is_named_in_a_grid_of_finetune_only_cells(tmp_path, capsys):
    """Such cells drop pretrain.* axes; the key is still checked, not ignored."""
    msg = refused(tmp_path, spec(variants=["finetune-only"], axes={"pretrain.lrr": [0.001]}),
                  capsys)
    assert "axes.pretrain.lrr[0]" in msg and "unknown config key 'pretrain.lrr'" in msg


@pytest.mark.parametrize("key, values, where, why", [
    ("pretrain.lr", [0.001, -0.001], "axes.pretrain.lr[1]",
     "config key 'pretrain.lr': expected > 0"),
    ("model.heads.aap.init", ["orthogonal", "identity"], "axes.model.heads.aap.init[1]",
     "expected xavier|orthogonal|svd"),
    ("model.num_layers", [True], "axes.model.num_layers[0]", "expected int"),
])
def test_axis_value_the_config_refuses_is_named(tmp_path, capsys, key, values, where, why):
    msg = refused(tmp_path, spec(axes={key: values}), capsys)
    assert f"key '{where}'" in msg and why in msg


# ------------------------------------------------------------------ finetune_from

@pytest.mark.parametrize("entries, where, why", [
    ([0], "finetune_from[0]", "expected an epoch >= 1 or 'final'"),
    (["final", -1], "finetune_from[1]", "expected an epoch >= 1"),
    (["last"], "finetune_from[0]", "got 'last'"),
    ([True], "finetune_from[0]", "got True"),
    ([1.0], "finetune_from[0]", "got 1.0"),
    ([1, 1], "finetune_from'", "repeated entry"),
    (["final", "final"], "finetune_from'", "repeated entry"),
    ([1, 3], "finetune_from[1]", "epoch 3 is after the pretraining's last (pretrain.epochs = 2)"),
    (["final", 2], "finetune_from[1]", "epoch 2 is the pretraining's last (pretrain.epochs = 2), "
     "whose weights are also 'final's: the two fine-tunes would be the same; keep one"),
    ([], "finetune_from'", "non-empty list"),
    ("final", "finetune_from'", "non-empty list"),
])
def test_bad_finetune_from_entries_are_named(tmp_path, capsys, entries, where, why):
    msg = refused(tmp_path, spec(finetune_from=entries), capsys)
    assert f"key '{where}" in msg and why in msg


def test_finetune_from_past_an_axis_value_of_pretrain_epochs_is_named(tmp_path, capsys):
    overrides = {"model.hidden_size": 16, "finetune.epochs": 2}
    assert grid_from_dict(spec(overrides=overrides, axes={"pretrain.epochs": [3, 4]},
                               finetune_from=[2, "final"]))
    assert grid_from_dict(spec(overrides=overrides, axes={"pretrain.epochs": [3, 4]},
                               finetune_from=[3]))
    msg = refused(tmp_path, spec(overrides=overrides, axes={"pretrain.epochs": [4, 2]},
                                 finetune_from=[3, "final"]), capsys)
    assert "key 'finetune_from[0]'" in msg
    assert "(pretrain.epochs = 2, axes.pretrain.epochs[1])" in msg
    # the last epoch of one axis value, beside final: the same weights twice
    msg = refused(tmp_path, spec(overrides=overrides, axes={"pretrain.epochs": [4, 3]},
                                 finetune_from=[3, "final"]), capsys)
    assert "epoch 3 is the pretraining's last (pretrain.epochs = 3, axes.pretrain.epochs[1])" \
        in msg


def test_finetune_from_epochs_join_save_epochs_of_the_pretraining_only():
    grid = grid_from_dict(spec(overrides={**BASE["overrides"], "pretrain.epochs": 5,
                                          "pretrain.save_epochs": [5]},
                               finetune_from=[3, 1, "final"]))
    cell = grid.cells()[0]
    pre, fines = cell.commands()
    assert pre[-1] == "pretrain.save_epochs=[1, 3, 5]"
    assert load_config(None, pre[pre.index("--out") + 2:]).pretrain.save_epochs == [1, 3, 5]
    root = cell.folder
    assert [(f[f.index("--out") + 1], f[f.index("--init") + 1]) for f in fines] == [
        (str(root / "finetune-e3"), str(root / "pretrain/epoch-3.pt")),
        (str(root / "finetune-e1"), str(root / "pretrain/epoch-1.pt")),
        (str(root / "finetune"), str(root / "pretrain/final.pt"))]
    assert not any(a.startswith("pretrain.save_epochs=[1") for f in fines for a in f)
    plain = grid_from_dict(spec()).cells()[0]
    assert not any(a.startswith("pretrain.save_epochs") for a in plain.commands()[0])


def test_dry_run_lists_every_finetune_command(tmp_path, capsys):
    data = tmp_path / "d" / "syn"
    data.mkdir(parents=True)
    (data / "manifest.json").write_text("{}")     # a dry run checks the dataset exists
    path = write_grid(tmp_path, spec(data=[str(data)], out=str(tmp_path / "runs"),
                                     axes={"pretrain.lr": [0.001, 0.002]},
                                     finetune_from=[1, "final"]))
    assert grid_cli.main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for lr in ("0.001", "0.002"):
        cell = tmp_path / f"runs/syn/s3rec/rfull/pretrain.lr={lr}/s1"
        assert f"s3rec-pretrain --data {data} --out {cell}/pretrain " in out
        assert f"--out {cell}/finetune-e1 --init {cell}/pretrain/epoch-1.pt " in out
        assert f"--out {cell}/finetune --init {cell}/pretrain/final.pt " in out
    assert f"--out {tmp_path}/runs/syn/finetune-only/rfull/s1/finetune model." in out
    assert out.count("s3rec-finetune ") == 5 and out.count("s3rec-pretrain ") == 2
    assert "3 cells, executor local" in out and "3 jobs to submit" in out
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ a relaunch, real runs

def start_pretraining(cell) -> subprocess.Popen:
    pre, _ = cell.commands()
    return subprocess.Popen(pre, env=clean_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.multiproc
def test_new_finetune_from_epoch_the_done_pretraining_did_not_save_is_refused(
        tiny_data, tmp_path, capsys):  # noqa: F811
    """The pretraining finished saving epoch 1 only; finetune_from gains 2: the launch stops
    before submitting, naming the missing epoch-2.pt and both ways out."""
    first = dict(spec(data=[str(tiny_data)], variants=["s3rec"], config=str(TINY),
                      out=str(tmp_path / "runs"), finetune_from=[1, "final"]),
                 overrides={"pretrain.epochs": 3, "pretrain.save_epochs": []})
    cell = grid_from_dict(first).cells()[0]
    proc = start_pretraining(cell)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    assert sorted(p.name for p in cell.pretrain_dir.glob("*.pt")) == ["epoch-1.pt", "final.pt"]
    path = write_grid(tmp_path, dict(first, finetune_from=[1, 2, "final"]))
    assert grid_cli.main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{cell.pretrain_dir}/epoch-2.pt (cell {cell.key}): missing" in err
    assert "the pretraining finished with pretrain.save_epochs [1]" in err
    assert "drop 2 from finetune_from" in err and f"remove {cell.folder} " in err
    assert grid_cli.main([str(path)]) == 2
    assert not (tmp_path / "runs" / "_submitit").exists()
    # the epochs it did save stay usable
    assert grid_cli.main([str(write_grid(tmp_path, first)), "--dry-run"]) == 0


@pytest.mark.multiproc
def test_unfinished_pretraining_is_refused_only_for_epochs_it_has_passed(
        tiny_data, tmp_path, capsys):  # noqa: F811
    """Stopped (SIGTERM: saved, status preempted) after epoch 2 or later: finetune_from 2 can
    never be saved; 99 still can, since the resumed pretraining saves it (save_epochs has it)."""
    first = dict(spec(data=[str(tiny_data)], variants=["s3rec"], config=str(TINY),
                      out=str(tmp_path / "runs"), finetune_from=["final"]),
                 overrides={"pretrain.epochs": 100, "pretrain.save_epochs": []})
    cell = grid_from_dict(first).cells()[0]
    proc = start_pretraining(cell)
    run_json = cell.pretrain_dir / "run.json"
    deadline = time.monotonic() + 300     # a guard against a hang, not a speed test
    while proc.poll() is None and time.monotonic() < deadline:
        if run_json.exists() and (json.loads(run_json.read_text()).get("epoch") or 0) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
    info = json.loads(run_json.read_text())
    assert info["status"] == "preempted" and 3 <= info["epoch"] < 100, info
    assert not list(cell.pretrain_dir.glob("epoch-*.pt"))
    path = write_grid(tmp_path, dict(first, finetune_from=[2, 99, "final"]))
    assert grid_cli.main([str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{cell.pretrain_dir}/epoch-2.pt (cell {cell.key}): missing" in err
    assert "the pretraining is past epoch 2 with pretrain.save_epochs []" in err
    path = write_grid(tmp_path, dict(first, finetune_from=[99, "final"]))
    assert grid_cli.main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "'pretrain.save_epochs=[99]'" in out and f"--init {cell.pretrain_dir}/epoch-99.pt" in out


def test_a_job_that_ran_every_stage_it_was_given_is_not_failed_by_a_new_finetune_from_entry(
        tmp_path):
    """Run folders and a job record written here, as a launch and its job leave them: the job
    ran the cell's three stages and ended (its result file is there). finetune_from then gains
    2. The cell is not failed (it used to be: a result file and an unfinished cell), and a launch
    submits it at once, also while that job is still ending."""
    first = spec(variants=["s3rec"], out=str(tmp_path / "runs"), finetune_from=[1, "final"])
    first["overrides"]["pretrain.epochs"] = 3     # epoch 2, added below, is not the last
    cell = grid_from_dict(first).cells()[0]
    for stage, d in cell.stage_dirs:
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({"stage": stage, "status": "done"}))
        (d / ("final.pt" if stage == "pretrain" else "results.json")).write_text("{}")
    jobs = tmp_path / "submitit"
    JobPaths(jobs, job_id="999999", task_id=0).result_pickle.parent.mkdir(parents=True)
    JobPaths(jobs, job_id="999999", task_id=0).result_pickle.write_bytes(b"")
    entry = {"executor": "local", "job_id": "999999", "folder": str(jobs), "log": "",
             "submitted": "", "cells": [cell.key], "world_size": 1,
             "stages": [[st, str(d)] for st, d in cell.stage_dirs]}
    registry = tmp_path / "runs/_grid/jobs.json"
    registry.parent.mkdir(parents=True)
    registry.write_text(json.dumps({cell.key: entry}))
    assert open_grid(grid_from_dict(first)).state_of(cell).state == "done"

    run = open_grid(grid_from_dict(dict(first, finetune_from=[1, 2, "final"])))
    st = run.state_of(run.cells[0])
    assert st.state == "pending" and not is_active(st)
    assert "finetune-e2 added to the grid after local job 999999" in st.detail
    assert [c.key for c in run._cells_to_submit()] == [cell.key]

    # a job with a stage of its own still to run is that job's business, as before
    (cell.finetune_dir / "results.json").unlink()
    st = run.state_of(run.cells[0])
    assert st.state == "failed" and "local job 999999" in st.detail
