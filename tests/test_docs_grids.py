"""docs/grids.md and configs/grids/cluster-example.yaml cannot fall behind the grid's keys: the
example sets every key of Grid and ExecutorConfig and loads (SLURM executor: loaded, never
submitted), the key table names exactly those keys with their real defaults, and every YAML
block of the page parses and shows a part of the example as it is."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import yaml

from s3rec.launch.grid import ExecutorConfig, Grid, load_grid

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "grids.md"
EXAMPLE = REPO / "configs" / "grids" / "cluster-example.yaml"
GRID_KEYS = [f.name for f in dataclasses.fields(Grid) if f.init and f.name != "source"]
EXECUTOR_KEYS = [f.name for f in dataclasses.fields(ExecutorConfig)]
YAML_BLOCK = re.compile(r"^```ya?ml\n(.*?)^```", re.M | re.S)
TABLE_ROW = re.compile(r"^\| `([^`]+)` \| (.+?) \| .+ \|$", re.M)


def default_of(cls, name: str):
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "required"


def key_table() -> dict[str, str]:
    """Key table rows of docs/grids.md: `key` -> its default cell."""
    return dict(TABLE_ROW.findall(DOC.read_text()))


def test_cluster_example_loads_as_a_slurm_grid(monkeypatch):
    # its `config` is relative to the folder a grid is launched from: the repository root
    monkeypatch.chdir(REPO)
    grid = load_grid(EXAMPLE)
    assert grid.executor.kind == "slurm"
    assert grid.executor.cells_per_job > 1 and grid.cells()[0].world_size == 1
    assert len(grid.axes) == 2 and all(len(v) > 1 for v in grid.axes.values())
    assert "final" in grid.finetune_from and grid.epochs_from
    cells = grid.cells()
    assert len(cells) == 42
    # finetune-only cells take no pretrain.* axis; the others fine-tune once per entry
    assert {len(c.finetunes) for c in cells if c.pretrain_dir is not None} == {3}
    assert all("pretrain." not in c.key for c in cells if c.variant == "finetune-only")


def test_cluster_example_sets_every_grid_and_executor_key():
    data = yaml.safe_load(EXAMPLE.read_text())
    assert sorted(set(GRID_KEYS) - set(data)) == []
    assert sorted(set(EXECUTOR_KEYS) - set(data["executor"])) == []


def test_key_table_names_every_key_with_its_default():
    table = key_table()
    # `executor` itself is the section: the table names its keys
    expected = [k for k in GRID_KEYS if k != "executor"] + [f"executor.{k}" for k in EXECUTOR_KEYS]
    assert sorted(table) == sorted(expected), "docs/grids.md key table"
    for key, cell in table.items():
        cls, name = (ExecutorConfig, key[9:]) if key.startswith("executor.") else (Grid, key)
        want = default_of(cls, name)
        shown = "required" if cell == "required" else yaml.safe_load(cell.strip("`"))
        assert shown == want, f"docs/grids.md: default of {key}: {cell} (the code: {want!r})"


def test_every_yaml_block_parses_and_is_a_part_of_the_example():
    blocks = YAML_BLOCK.findall(DOC.read_text())
    assert len(blocks) >= 3, "docs/grids.md: the axes, finetune_from and executor blocks"
    example = yaml.safe_load(EXAMPLE.read_text())
    for text in blocks:
        data = yaml.safe_load(text)
        assert isinstance(data, dict) and data, text
        for key, value in data.items():
            assert example.get(key) == value, f"docs/grids.md block {key}: not the example's"


def test_readme_points_at_the_grid_page_with_its_commands():
    readme = (REPO / "README.md").read_text()
    assert "(docs/grids.md)" in readme
    for command in ("s3rec-grid configs/grids/", "s3rec-grid status", "s3rec-report"):
        assert command in readme, command
