"""Grid files: validation before anything is submitted, cell enumeration, run folders, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from s3rec.launch import grid_cli
from s3rec.launch.grid import Grid, GridError, grid_from_dict, load_grid

BASE = {
    "name": "t",
    "data": ["/d/beauty", "/d/sports"],
    "variants": ["s3rec", "s3rec-lowrank", "finetune-only"],
    "ranks": [4, 16],
    "seeds": [1, 2],
    "overrides": {"pretrain.epochs": 2, "finetune.epochs": 3},
    "executor": {"kind": "local", "array_parallelism": 2, "timeout_min": 30},
    "out": "runs/t",
}


def grid_with(**changes) -> dict:
    data = json.loads(json.dumps(BASE))
    for k, v in changes.items():
        if v is None:
            data.pop(k)
        else:
            data[k] = v
    return data


def write_grid(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "grid.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def refused(tmp_path: Path, data: dict, capsys) -> str:
    """The CLI refuses the grid (exit 2) and submits nothing; returns its message."""
    path = write_grid(tmp_path, data)
    with pytest.raises(GridError) as e:
        load_grid(path)
    assert grid_cli.main([str(path), "--out", str(tmp_path)]) == 2
    assert not (tmp_path / "runs").exists() and not list(tmp_path.rglob("_submitit"))
    err = capsys.readouterr().err
    assert str(path) in err
    return str(e.value)


def test_cells_and_folders(tmp_path):
    g = grid_from_dict(grid_with(out=str(tmp_path / "runs/t")))
    cells = g.cells()
    # per dataset: s3rec 1 + lowrank 2 ranks + finetune-only 1 = 4 heads, x 2 seeds; x 2 datasets
    assert len(cells) == 16
    keys = [c.key for c in cells]
    assert len(set(keys)) == 16
    assert keys[:4] == ["beauty/s3rec/rfull/s1", "beauty/s3rec/rfull/s2",
                        "beauty/s3rec-lowrank/r4/s1", "beauty/s3rec-lowrank/r4/s2"]
    c = cells[2]
    assert c.folder == tmp_path / "runs/t/beauty/s3rec-lowrank/r4/s1"
    assert c.pretrain_dir == c.folder / "pretrain" and c.finetune_dir == c.folder / "finetune"
    pre, (fine,) = c.commands("PRE", "FINE")
    assert pre[:5] == ["PRE", "--data", "/d/beauty", "--out", str(c.pretrain_dir)]
    assert "model.head_rank=4" in pre and "variant=s3rec-lowrank" in pre and "seed=1" in pre
    assert "pretrain.epochs=2" in pre and "pretrain.epochs=2" in fine
    assert fine[fine.index("--init") + 1] == str(c.pretrain_dir / "final.pt")
    ft = [c for c in cells if c.variant == "finetune-only"][0]
    pre, (fine,) = ft.commands()
    assert pre is None and ft.pretrain_dir is None and "--init" not in fine
    assert ft.key == "beauty/finetune-only/rfull/s1"


def test_same_grid_same_folders(tmp_path):
    a = [c.folder for c in grid_from_dict(grid_with(out=str(tmp_path))).cells()]
    b = [c.folder for c in grid_from_dict(grid_with(out=str(tmp_path))).cells()]
    assert a == b


def test_override_values_keep_their_type():
    g = grid_from_dict(grid_with(overrides={"pretrain.save_epochs": [1, 2], "model.svd_init_from": "1",
                                            "pretrain.lr": 0.002, "data.bucket_by_length": False}))
    args = g.override_args()
    assert "pretrain.save_epochs=[1, 2]" in args and 'model.svd_init_from="1"' in args
    assert "pretrain.lr=0.002" in args and "data.bucket_by_length=false" in args
    # The training side parses them back to the same values.
    from s3rec.config import load_config
    cfg = load_config(None, args)
    assert cfg.pretrain.save_epochs == [1, 2] and cfg.model.svd_init_from == "1"
    assert cfg.data.bucket_by_length is False


def test_unknown_top_level_key_refused(tmp_path, capsys):
    msg = refused(tmp_path, grid_with(sedes=[1]), capsys)
    assert "unknown key 'sedes'" in msg


def test_unknown_executor_key_refused(tmp_path, capsys):
    msg = refused(tmp_path, grid_with(executor={"kind": "slurm", "paralelism": 2}), capsys)
    assert "executor.paralelism" in msg


def test_unknown_override_key_refused(tmp_path, capsys):
    msg = refused(tmp_path, grid_with(overrides={"pretrain.epoch": 2}), capsys)
    assert "overrides" in msg and "pretrain.epoch" in msg


def test_rank_above_hidden_size_refused(tmp_path, capsys):
    msg = refused(tmp_path, grid_with(ranks=[4, 65]), capsys)
    assert "ranks[1]" in msg and "65" in msg and "64" in msg
    # the hidden size comes from the overrides when given
    msg = refused(tmp_path, grid_with(ranks=[16], overrides={"model.hidden_size": 8,
                                                            "model.num_heads": 2}), capsys)
    assert "ranks[0]" in msg and "1..8" in msg


@pytest.mark.parametrize("key", ["data", "variants", "seeds", "ranks"])
def test_empty_axis_refused(tmp_path, capsys, key):
    msg = refused(tmp_path, grid_with(**{key: []}), capsys)
    assert f"'{key}'" in msg and "empty" in msg


def test_full_rank_grid_needs_no_ranks():
    g = grid_from_dict(grid_with(variants=["s3rec"], ranks=None))
    assert [c.key for c in g.cells()][:1] == ["beauty/s3rec/rfull/s1"]


@pytest.mark.parametrize("change, key", [
    ({"variants": ["s3rec", "s3rec-tiny"]}, "variants[1]"),
    ({"seeds": [1, "two"]}, "seeds[1]"),
    ({"executor": {"kind": "cloud"}}, "executor.kind"),
    ({"executor": {"timeout_min": "1h"}}, "executor.timeout_min"),
    # SLURM would kill the job while the cell still waits for its training to save
    ({"executor": {"kind": "slurm", "signal_delay_s": 10}}, "executor.signal_delay_s"),
    ({"executor": {"kind": "slurm", "timeout_min": 1, "signal_delay_s": 60}},
     "executor.signal_delay_s"),
    ({"name": "a b"}, "name"),
    ({"out": None}, "out"),
    ({"data": ["/a/x", "/b/x"]}, "data"),
    ({"overrides": {"seed": 3}}, "overrides.seed"),
    ({"overrides": {"pretrain.epochs": "two"}}, "pretrain.epochs"),
])
def test_bad_values_name_the_key(tmp_path, capsys, change, key):
    msg = refused(tmp_path, grid_with(**change), capsys)
    assert key in msg


def test_missing_grid_file(tmp_path, capsys):
    assert grid_cli.main([str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_missing_data_refused_before_submitting(tmp_path, capsys):
    path = write_grid(tmp_path, grid_with(out=str(tmp_path / "runs")))
    assert grid_cli.main([str(path)]) == 2
    assert "data[0]" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_dry_run_lists_cells(tmp_path, capsys):
    data = [str(tmp_path / "d" / name) for name in ("beauty", "sports")]
    for d in data:     # dataset folders, which a dry run checks as a launch does
        Path(d).mkdir(parents=True)
        (Path(d) / "manifest.json").write_text("{}")
    path = write_grid(tmp_path, grid_with(out=str(tmp_path / "runs"), data=data))
    assert grid_cli.main([str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "16 cells" in out and "sports/finetune-only/rfull/s2  [to run]" in out
    assert not (tmp_path / "runs").exists()


def test_status_of_unsubmitted_grid(tmp_path, capsys):
    path = write_grid(tmp_path, grid_with(out=str(tmp_path / "runs")))
    assert grid_cli.main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "pending=16" in out and "not submitted" in out


def test_demo_yaml_is_valid():
    g = load_grid(Path(__file__).resolve().parents[1] / "configs/grids/demo.yaml")
    assert len(g.cells()) == 6 and g.executor.array_parallelism == 2


def test_built_in_code_is_validated():
    with pytest.raises(GridError, match="'ranks'"):
        Grid(name="x", data=["/d/a"], variants=["s3rec-lowrank"], seeds=[1], out="o", ranks=[])


def test_empty_executor_key_means_defaults(tmp_path, monkeypatch):
    """`executor:` with nothing under it is YAML null: the defaults, not an AttributeError."""
    path = tmp_path / "grid.yaml"
    text = yaml.safe_dump(grid_with(executor=None)) + "executor:\n"
    path.write_text(text)
    assert yaml.safe_load(text)["executor"] is None
    assert load_grid(path).executor.kind == "local"
    assert load_grid(path, executor_kind="slurm").executor.kind == "slurm"
    assert grid_from_dict(dict(grid_with(), executor=None)).executor.array_parallelism == 2


@pytest.mark.parametrize("data", [".", ".."])
def test_dot_dataset_is_named_after_the_resolved_folder(tmp_path, monkeypatch, data):
    ds = tmp_path / "beauty" / "sub"
    ds.mkdir(parents=True)
    monkeypatch.chdir(ds)
    g = grid_from_dict(grid_with(data=[data], out=str(tmp_path / "runs")))
    want = "sub" if data == "." else "beauty"
    assert {c.dataset for c in g.cells()} == {want}
    assert all(c.folder.is_relative_to(tmp_path / "runs" / want) for c in g.cells())


def test_dataset_without_a_folder_name_refused(tmp_path, capsys):
    msg = refused(tmp_path, grid_with(data=["/d/beauty", "/"]), capsys)
    assert "data[1]" in msg
    msg = refused(tmp_path, grid_with(data=[""]), capsys)
    assert "data[0]" in msg


def test_small_hidden_size_allows_full_rank_variants():
    """hidden_size 8 < the default head_rank 16: full-rank cells get a head_rank that fits."""
    from s3rec.config import load_config
    g = grid_from_dict(grid_with(ranks=[4], overrides={"model.hidden_size": 8,
                                                       "model.num_heads": 2}))
    for c in g.cells():
        pre, (fine,) = c.commands()
        for cmd in (pre, fine):
            if cmd is None:
                continue
            args = [a for a in cmd if "=" in a and not a.startswith("-")]
            load_config(None, args)      # what the training command will accept
        rank_args = [a for a in fine if a.startswith("model.head_rank=")]
        assert rank_args == (["model.head_rank=4"] if c.rank == 4 else ["model.head_rank=8"])
    # A grid whose hidden size fits the default rank passes no head_rank to full-rank cells.
    g = grid_from_dict(grid_with())
    full = [c for c in g.cells() if c.rank is None]
    assert not any(a.startswith("model.head_rank") for c in full for a in c.commands()[1][0])


def test_head_rank_override_still_refused(tmp_path, capsys):
    msg = refused(tmp_path, grid_with(overrides={"model.head_rank": 8}), capsys)
    assert "overrides.model.head_rank" in msg


def unreadable(path, kind: str, yaml_text: str) -> str:
    """`path` made a folder, or YAML text with a latin-1 byte; the words its error must hold."""
    if kind == "folder":
        path.mkdir()
        return "is a folder"
    path.write_bytes(yaml_text.encode() + "# caf\xe9\n".encode("latin-1"))
    return "UTF-8"


@pytest.mark.parametrize("kind", ["folder", "latin-1"])
def test_unreadable_grid_file_names_it(tmp_path, capsys, kind):
    path = tmp_path / "grid.yaml"
    words = unreadable(path, kind, yaml.safe_dump(grid_with()))
    with pytest.raises(GridError, match=f"grid file {path}"):
        load_grid(path)
    assert grid_cli.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"s3rec-grid: grid file {path}") and words in err


@pytest.mark.parametrize("kind", ["folder", "latin-1"])
def test_unreadable_config_file_names_the_key(tmp_path, capsys, kind):
    config = tmp_path / "train.yaml"
    words = unreadable(config, kind, "model:\n  hidden_size: 8\n")
    msg = refused(tmp_path, grid_with(config=str(config)), capsys)
    assert "key 'config'" in msg and str(config) in msg and words in msg


def test_override_value_json_cannot_write_names_the_key(tmp_path, capsys):
    """YAML reads an unquoted 2020-01-01 as a date, which the override arguments cannot carry."""
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid_with(overrides=None))
                    + "overrides:\n  pretrain.lr: 2020-01-01\n")
    msg = refused(tmp_path, yaml.safe_load(path.read_text()), capsys)
    assert "key 'overrides.pretrain.lr'" in msg and "date" in msg
    with pytest.raises(GridError, match=r"overrides\.pretrain\.save_epochs.*type set"):
        grid_from_dict({**grid_with(), "overrides": {"pretrain.save_epochs": [1, {2, 3}]}})
