"""A grid of S3Rec runs: datasets x variants x ranks x any config axes x seeds. Each cell is one
pretraining and the fine-tunes from its saved epochs (`finetune_from`).

A grid is a YAML file (see configs/grids/demo.yaml, docs/grids.md) or built in code; everything is
checked here, before anything is submitted, and every error names the key. Cells map to fixed run
folders

    OUT/<dataset>/<variant>/r<rank>/[<key>=<value>/...]s<seed>/
        pretrain/                   (not for finetune-only)
        finetune/                   fine-tuned from pretrain/final.pt (`final` in finetune_from)
        finetune-e<N>/              fine-tuned from pretrain/epoch-N.pt

(rank `full` for full-rank variants; one `<key>=<value>` folder per entry of `axes`, in the
order of their keys), so a grid can be launched again: finished cells are recognised by their
folders alone, and a new axis value or `finetune_from` entry adds folders beside the done ones.
This module knows the training commands only by their command line (their `--help`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from s3rec.config import VARIANTS, ConfigError, load_config, read_yaml_file
# what a run folder holds and when a stage is done: the run-folder contract
from s3rec.run_folder import STAGE_PRODUCT, read_run_json, stage_done  # noqa: F401

LOWRANK_VARIANTS = ("s3rec-lowrank",)      # variants whose heads take the `ranks` axis
NO_PRETRAIN_VARIANTS = ("finetune-only",)  # variants that skip pretraining
FINAL = "final"                            # finetune_from entry: the pretraining's final.pt
# Keys the named axes set: an `axes` or `overrides` entry for one of them is an error.
NAMED_AXES = {"variant": "variants", "seed": "seeds", "model.head_rank": "ranks"}
# What an axis value may be written as in a folder name (values are scalars).
_FOLDER_TEXT = re.compile(r"[A-Za-z0-9_.+-]+")


class GridError(ValueError):
    """A bad grid; the message names the file and the key."""


# How long a cell's job waits, after the time-limit signal, for its training to save a
# checkpoint and exit (launch/job.py): a SLURM signal_delay_s must leave at least this much.
CHILD_SAVE_TIMEOUT_S = 45


@dataclass
class ExecutorConfig:
    kind: str = "local"               # (str) local: processes on this machine | slurm: sbatch arrays
    partition: str = ""               # (str) SLURM partition ("" = the cluster's default)
    account: str = ""                 # (str) SLURM account ("" = none)
    qos: str = ""                     # (str) SLURM QOS ("" = none)
    array_parallelism: int = 2        # (int) jobs running at once (SLURM array %N; local too):
                                      #   up to array_parallelism x cells_per_job cells
    timeout_min: int = 60             # (int) wall time of one cell's job, minutes
    cpus_per_task: int = 1            # (int) CPUs of one cell's job
    mem_gb: float = 0.0               # (float) memory of one cell's job (0 = cluster default)
    gpus_per_node: int = 0            # (int) GPUs per node of one job (0 = none: CPU training);
                                      #   tasks_per_node > 1 wants one per task
    nodes: int = 1                    # (int) nodes of one cell (SLURM; local: 1)
    tasks_per_node: int = 1           # (int) training processes per node: a cell's world size is
                                      #   nodes x tasks_per_node (srun under SLURM, local processes
                                      #   otherwise), recorded in its run.json and kept on resume
    cells_per_job: int = 1            # (int) cells packed into one job, sharing its GPU (or CPUs),
                                      #   each in its own process and folder (world size 1 only)
    signal_delay_s: int = 60          # (int) USR2 this long before the time limit: checkpoint + requeue
                                      #   (SLURM: >= CHILD_SAVE_TIMEOUT_S, under the time limit)
    max_num_timeout: int = 20         # (int) requeues allowed per job after time-outs/preemption
    additional: dict = field(default_factory=dict)  # (dict) extra sbatch options, e.g. {constraint: a100}


@dataclass
class Grid:
    name: str
    data: list                        # (list[str]) dataset folders (s3rec-prep output)
    variants: list                    # (list[str]) s3rec | s3rec-lowrank | finetune-only
    seeds: list                       # (list[int]) one cell per seed
    out: str                          # (str) root of the run folders, e.g. runs/demo
    ranks: list = field(default_factory=list)   # (list[int]) head ranks for low-rank variants
    overrides: dict = field(default_factory=dict)  # (dict) dotted config key -> value, all cells
    axes: dict = field(default_factory=dict)    # (dict) dotted config key -> list of values: one
                                                #   cell per combination, a folder per value
    finetune_from: list = field(default_factory=lambda: [FINAL])
                                                # (list) pretraining epochs each cell fine-tunes
                                                #   from: N (pretrain/epoch-N.pt) or `final`. An N
                                                #   added once a pretraining has passed epoch N
                                                #   has no weights (a launch refuses it): list it
                                                #   in pretrain.save_epochs from the start
    config: str = ""                  # (str) a base training YAML passed as --config ("" = none)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    source: str = "<code>"            # where the grid came from, for error messages (not a key)
    # model.head_rank of full-rank cells: None when the configured rank fits model.hidden_size,
    # else hidden_size (the default 16 must not fail a small model); set by `validate`
    full_head_rank: int | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.executor is None:   # `executor:` with nothing under it: all defaults
            self.executor = ExecutorConfig()
        if isinstance(self.executor, dict):
            self.executor = _executor_from_dict(self.executor, self.source)
        validate(self)

    # ------------------------------------------------------------------ cells
    def cells(self) -> list["Cell"]:
        """Every cell, in a fixed order (dataset, variant, rank, axes, seed)."""
        out = []
        for data in self.data:
            for variant in self.variants:
                ranks = self.ranks if variant in LOWRANK_VARIANTS else [None]
                for rank in ranks:
                    for values in self.axis_combinations(variant):
                        for seed in self.seeds:
                            out.append(Cell(grid=self, data=str(Path(data).resolve()),
                                            dataset=dataset_name(data), variant=variant,
                                            rank=rank, seed=int(seed), axis_values=values))
        return out

    def axis_combinations(self, variant: str | None = None) -> list[tuple]:
        """Every combination of the `axes` values: tuples of (key, value), keys sorted. A
        variant that does not pretrain has no `pretrain.*` axes: they would only repeat it."""
        combos: list[tuple] = [()]
        skip = "pretrain." if variant in NO_PRETRAIN_VARIANTS else None
        for key in sorted(k for k in self.axes if not (skip and k.startswith(skip))):
            combos = [c + ((key, v),) for c in combos for v in self.axes[key]]
        return combos

    def override_args(self) -> list[str]:
        """The grid's overrides as `key=value` arguments; values JSON-encoded (valid YAML), so a
        string like "1" stays a string and lists keep their shape."""
        return [f"{k}={json.dumps(v)}" for k, v in self.overrides.items()]

    @property
    def out_path(self) -> Path:
        return Path(self.out).resolve()

    def rank_args(self, rank: int | None) -> list[str]:
        """The head-rank override of a cell of rank `rank` (None: a full-rank variant)."""
        if rank is None:
            rank = self.full_head_rank
        return [] if rank is None else [f"model.head_rank={rank}"]

    @property
    def epochs_from(self) -> list[int]:
        """The pretraining epochs (not `final`) that cells fine-tune from."""
        return [e for e in self.finetune_from if e != FINAL]


def dataset_name(data: str) -> str:
    """The run tree's first level for a dataset folder: its name once `.` and `..` are
    resolved (lexically, so a symlinked dataset keeps the name it was given)."""
    return Path(os.path.abspath(data)).name if data else ""


def axis_text(value: Any) -> str:
    """An axis value as its folder shows it: JSON for numbers and booleans, strings as they are."""
    return value if isinstance(value, str) else json.dumps(value)


def finetune_folder_name(source: int | str) -> str:
    """`finetune` for the final pretraining weights, `finetune-e<N>` for epoch N's."""
    return "finetune" if source == FINAL else f"finetune-e{source}"


@dataclass(frozen=True)
class FineTune:
    """One fine-tune of a cell: from which pretraining weights, into which folder."""
    source: int | str   # a pretraining epoch, or FINAL; FINAL for finetune-only cells
    dir: Path
    init: Path | None   # the --init file (None: finetune-only, from scratch)


@dataclass(frozen=True)
class Cell:
    grid: Grid = field(repr=False, compare=False)
    data: str        # absolute dataset folder
    dataset: str     # its folder name: the first level of the run tree
    variant: str
    rank: int | None  # None for full-rank variants
    seed: int
    axis_values: tuple = ()   # ((config key, value), ...) of the grid's `axes`, keys sorted

    @property
    def key(self) -> str:
        """`dataset/variant/r<rank>/[key=value/...]s<seed>`: the cell's identity and folder."""
        r = "full" if self.rank is None else str(self.rank)
        axes = "".join(f"{k}={axis_text(v)}/" for k, v in self.axis_values)
        return f"{self.dataset}/{self.variant}/r{r}/{axes}s{self.seed}"

    @property
    def folder(self) -> Path:
        return self.grid.out_path / self.key

    @property
    def pretrain_dir(self) -> Path | None:
        return None if self.variant in NO_PRETRAIN_VARIANTS else self.folder / "pretrain"

    @property
    def finetunes(self) -> list[FineTune]:
        """The cell's fine-tunes, in `finetune_from` order (one, from scratch, for finetune-only)."""
        pre = self.pretrain_dir
        if pre is None:
            return [FineTune(FINAL, self.folder / "finetune", None)]
        return [FineTune(src, self.folder / finetune_folder_name(src),
                         pre / ("final.pt" if src == FINAL else f"epoch-{src}.pt"))
                for src in self.grid.finetune_from]

    @property
    def finetune_dir(self) -> Path:
        """The fine-tune from the final weights if the grid makes one, else its first."""
        fts = self.finetunes
        return next((f.dir for f in fts if f.source == FINAL), fts[0].dir)

    @property
    def stage_dirs(self) -> list[tuple[str, Path]]:
        """(stage, folder) of every run of the cell, pretraining first."""
        pre = [("pretrain", self.pretrain_dir)] if self.pretrain_dir is not None else []
        return pre + [("finetune", f.dir) for f in self.finetunes]

    @property
    def world_size(self) -> int:
        ex = self.grid.executor
        return ex.nodes * ex.tasks_per_node

    def axes(self) -> dict:
        return {"grid": self.grid.name, "dataset": self.dataset, "variant": self.variant,
                "rank": self.rank, **dict(self.axis_values), "seed": self.seed}

    def override_args(self) -> list[str]:
        axes = [f"{k}={json.dumps(v)}" for k, v in self.axis_values]
        return (self.grid.override_args() + axes + [f"variant={self.variant}", f"seed={self.seed}"]
                + self.grid.rank_args(self.rank))

    def save_epochs_args(self) -> list[str]:
        """pretrain.save_epochs with the epochs the cell fine-tunes from added (a setting that
        changes no result: the pretraining saves those weights, the fine-tunes read them)."""
        want = self.grid.epochs_from
        if not want:
            return []
        have = load_config(self.grid.config or None, self.override_args()).pretrain.save_epochs
        return [f"pretrain.save_epochs={json.dumps(sorted(set(have) | set(want)))}"]

    def commands(self, pretrain_exe: str = "s3rec-pretrain",
                 finetune_exe: str = "s3rec-finetune") -> tuple[list[str] | None, list[list[str]]]:
        """(pretrain command or None, the fine-tune commands in `finetunes` order): plain
        argument lists, no shell."""
        base = ["--config", self.grid.config] if self.grid.config else []
        pre = None
        if self.pretrain_dir is not None:
            pre = [pretrain_exe, "--data", self.data, "--out", str(self.pretrain_dir)] + base \
                + self.override_args() + self.save_epochs_args()
        fines = []
        for ft in self.finetunes:
            init = ["--init", str(ft.init)] if ft.init is not None else []
            fines.append([finetune_exe, "--data", self.data, "--out", str(ft.dir)] + base + init
                         + self.override_args())
        return pre, fines

    def is_done(self) -> bool:
        return all(stage_done(f.dir, STAGE_PRODUCT["finetune"]) for f in self.finetunes)


# ---------------------------------------------------------------------- loading and checking

_GRID_KEYS = {f.name for f in dataclasses.fields(Grid) if f.init} - {"source"}
_EXECUTOR_KEYS = {f.name for f in dataclasses.fields(ExecutorConfig)}


def _executor_from_dict(data: Any, source: str) -> ExecutorConfig:
    if not isinstance(data, dict):
        raise GridError(f"{source}: key 'executor': expected a mapping, got {data!r}")
    unknown = sorted(set(data) - _EXECUTOR_KEYS)
    if unknown:
        raise GridError(f"{source}: unknown key 'executor.{unknown[0]}' "
                        f"(known: {', '.join(sorted(_EXECUTOR_KEYS))})")
    ex = ExecutorConfig()
    for k, v in data.items():
        default = getattr(ex, k)
        ok = isinstance(v, type(default)) or (isinstance(default, float) and isinstance(v, int))
        if not ok or (isinstance(v, bool) and not isinstance(default, bool)):
            raise GridError(f"{source}: key 'executor.{k}': expected {type(default).__name__}, "
                            f"got {v!r}")
        setattr(ex, k, v)
    return ex


def grid_from_dict(data: Any, source: str = "<dict>") -> Grid:
    if not isinstance(data, dict):
        raise GridError(f"{source}: expected a mapping of grid keys, got {data!r}")
    unknown = sorted(set(data) - _GRID_KEYS)
    if unknown:
        raise GridError(f"{source}: unknown key '{unknown[0]}' (known: {', '.join(sorted(_GRID_KEYS))})")
    missing = sorted(k for k in ("name", "data", "variants", "seeds", "out") if k not in data)
    if missing:
        raise GridError(f"{source}: missing key '{missing[0]}'")
    return Grid(source=source, **data)


def load_grid(path: str | Path, executor_kind: str | None = None) -> Grid:
    """Read and check a grid file; `executor_kind` (from the command line) overrides executor.kind."""
    path = Path(path)
    try:
        data = read_yaml_file(path, "grid file")
    except ConfigError as e:
        raise GridError(str(e)) from None
    if executor_kind is not None and isinstance(data, dict):
        if data.get("executor") is None:   # an empty `executor:` key is all defaults
            data["executor"] = {}
        ex = data["executor"]
        if isinstance(ex, dict):
            ex["kind"] = executor_kind
    return grid_from_dict(data, source=str(path))


def _check_list(grid: Grid, key: str, item_type: type, allow_missing_empty: bool = False) -> None:
    value = getattr(grid, key)
    if not isinstance(value, list):
        raise GridError(f"{grid.source}: key '{key}': expected a list, got {value!r}")
    if not value and not allow_missing_empty:
        raise GridError(f"{grid.source}: key '{key}': empty axis (give at least one value)")
    for i, v in enumerate(value):
        if not isinstance(v, item_type) or isinstance(v, bool):
            raise GridError(f"{grid.source}: key '{key}[{i}]': expected {item_type.__name__}, "
                            f"got {v!r}")
    if len(set(map(str, value))) != len(value):
        raise GridError(f"{grid.source}: key '{key}': repeated value in {value}")


def validate(grid: Grid) -> None:
    """Every check that can fail, before anything is submitted. Raises GridError naming the key."""
    src = grid.source
    if not isinstance(grid.name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", grid.name):
        raise GridError(f"{src}: key 'name': expected letters, digits, '_', '.', '-', got {grid.name!r}")
    if not isinstance(grid.out, str) or not grid.out:
        raise GridError(f"{src}: key 'out': expected a folder path, got {grid.out!r}")
    if not isinstance(grid.config, str):
        raise GridError(f"{src}: key 'config': expected a YAML path, got {grid.config!r}")
    if grid.config:
        _check_config_file(grid)
    _check_list(grid, "data", str)
    _check_list(grid, "variants", str)
    _check_list(grid, "seeds", int)
    _check_list(grid, "ranks", int, allow_missing_empty=True)
    names = [dataset_name(d) for d in grid.data]
    for i, n in enumerate(names):
        if n in ("", ".", ".."):
            raise GridError(f"{src}: key 'data[{i}]': {grid.data[i]!r} has no folder name to "
                            f"name its run folders after (give the dataset folder itself)")
    if len(set(names)) != len(names):
        raise GridError(f"{src}: key 'data': two datasets share a folder name ({names}); "
                        f"run folders are named after it")
    for i, v in enumerate(grid.variants):
        if v not in VARIANTS:
            raise GridError(f"{src}: key 'variants[{i}]': unknown variant {v!r} "
                            f"(expected one of {', '.join(VARIANTS)})")
    lowrank = [v for v in grid.variants if v in LOWRANK_VARIANTS]
    if lowrank and not grid.ranks:
        raise GridError(f"{src}: key 'ranks': empty axis, but variant {lowrank[0]} needs ranks")
    if not isinstance(grid.overrides, dict):
        raise GridError(f"{src}: key 'overrides': expected a mapping of dotted config keys, "
                        f"got {grid.overrides!r}")
    for k, v in grid.overrides.items():
        if k in NAMED_AXES:
            raise GridError(f"{src}: key 'overrides.{k}': set by the grid's axis "
                            f"'{NAMED_AXES[k]}', not an override")
        try:
            json.dumps(v)       # how override_args passes it to the training commands
        except (TypeError, ValueError) as e:
            raise GridError(f"{src}: key 'overrides.{k}': expected a number, string, boolean, "
                            f"null, or a list or mapping of them, got {type(v).__name__} {v!r} "
                            f"({e}; quote it to pass it as a string)") from None
    # The training config must accept the overrides, in every variant and at every rank.
    try:
        # head_rank=1: the default rank (16) must not fail a grid whose hidden size is small;
        # the grid's own ranks are checked next, by name.
        base = load_config(grid.config or None, grid.override_args() + ["model.head_rank=1"])
    except ConfigError as e:
        raise GridError(f"{src}: key 'overrides': {e}") from None
    hidden = base.model.hidden_size
    grid.full_head_rank = _full_rank_head_rank(grid, hidden)
    for i, r in enumerate(grid.ranks):
        if r < 1 or r > hidden:
            raise GridError(f"{src}: key 'ranks[{i}]': rank {r} must be in 1..{hidden} "
                            f"(model.hidden_size)")
    _check_axes(grid)
    _check_finetune_from(grid, None)        # its entries; each cell's pretrain.epochs below
    for v in grid.variants:
        for r in (grid.ranks if v in LOWRANK_VARIANTS else [None]):
            settings: dict[tuple, tuple] = {}
            # Every combination, also the pretrain.* values a finetune-only cell drops: in a
            # grid of finetune-only cells alone a misspelt key would otherwise pass unseen.
            for values in grid.axis_combinations():
                extra = [f"{k}={json.dumps(x)}" for k, x in values]
                extra += [f"variant={v}", *grid.rank_args(r)]
                try:
                    cfg = load_config(grid.config or None, grid.override_args() + extra)
                except ConfigError as e:
                    where = "".join(f", {k}={axis_text(x)}" for k, x in values)
                    key = _axis_value_key(grid, values, str(e)) if values else "overrides"
                    raise GridError(f"{src}: key '{key}' with "
                                    f"variant {v}{'' if r is None else f', rank {r}'}{where}: "
                                    f"{e}") from None
                _check_same_setting(grid, settings, values, cfg)
                if v not in NO_PRETRAIN_VARIANTS:
                    _check_finetune_from(grid, cfg.pretrain.epochs, values)
    ex = grid.executor
    if ex.kind not in ("local", "slurm"):
        raise GridError(f"{src}: key 'executor.kind': expected local|slurm, got {ex.kind!r}")
    for key in ("array_parallelism", "timeout_min", "cpus_per_task", "nodes", "tasks_per_node",
                "cells_per_job"):
        if getattr(ex, key) < 1:
            raise GridError(f"{src}: key 'executor.{key}': must be >= 1, got {getattr(ex, key)}")
    if ex.signal_delay_s < 0 or ex.max_num_timeout < 0 or ex.gpus_per_node < 0 or ex.mem_gb < 0:
        raise GridError(f"{src}: key 'executor': signal_delay_s, max_num_timeout, gpus_per_node "
                        f"and mem_gb must be >= 0")
    if ex.kind == "slurm" and not CHILD_SAVE_TIMEOUT_S <= ex.signal_delay_s < ex.timeout_min * 60:
        # Shorter, and SLURM kills the job while the cell still waits for its training to save:
        # the job ends TIMEOUT, not requeued, and the cell fails.
        raise GridError(f"{src}: key 'executor.signal_delay_s': expected at least "
                        f"{CHILD_SAVE_TIMEOUT_S} s (a cell waits that long for its training to "
                        f"save) and under timeout_min ({ex.timeout_min * 60} s), got "
                        f"{ex.signal_delay_s}")
    if ex.kind == "local" and ex.nodes != 1:
        raise GridError(f"{src}: key 'executor.nodes': the local executor runs on this machine "
                        f"only (nodes 1), got {ex.nodes}; use tasks_per_node, or kind slurm")
    if ex.cells_per_job > 1 and ex.nodes * ex.tasks_per_node > 1:
        raise GridError(f"{src}: key 'executor.cells_per_job': {ex.cells_per_job} cells per job "
                        f"need cells of one process, but executor.nodes x "
                        f"executor.tasks_per_node is {ex.nodes} x {ex.tasks_per_node}")
    if ex.tasks_per_node > 1 and ex.gpus_per_node and ex.gpus_per_node < ex.tasks_per_node:
        raise GridError(f"{src}: key 'executor.gpus_per_node': {ex.gpus_per_node} GPUs for "
                        f"executor.tasks_per_node {ex.tasks_per_node} processes (one each)")
    _check_script_values(grid)


def _check_axes(grid: Grid) -> None:
    """`axes`: dotted config keys (not a named axis's, not an override's) to lists of distinct
    scalar values that can name a folder."""
    src = grid.source
    if not isinstance(grid.axes, dict):
        raise GridError(f"{src}: key 'axes': expected a mapping of dotted config keys to lists "
                        f"of values, got {grid.axes!r}")
    for k, values in grid.axes.items():
        if not isinstance(k, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", k):
            raise GridError(f"{src}: key 'axes': expected dotted config keys, got {k!r}")
        if k in NAMED_AXES:
            raise GridError(f"{src}: key 'axes.{k}': conflicts with the grid's axis "
                            f"'{NAMED_AXES[k]}', which sets {k}; give its values there")
        if k in grid.overrides:
            raise GridError(f"{src}: key 'axes.{k}': conflicts with 'overrides.{k}' "
                            f"({grid.overrides[k]!r}); an axis sets it per cell, so drop one")
        # An override of a whole mapping (`model.heads: {...}`) also sets the axis's key, or
        # part of it: which of the two wins would depend on the order they are applied in.
        for o in grid.overrides:
            if k.startswith(o + ".") or o.startswith(k + "."):
                raise GridError(f"{src}: key 'axes.{k}': conflicts with 'overrides.{o}', which "
                                f"sets {'all of' if k.startswith(o + '.') else 'part of'} it; "
                                f"an axis sets {k} per cell, so take it out of the override or "
                                f"drop the axis")
        if not isinstance(values, list) or not values:
            raise GridError(f"{src}: key 'axes.{k}': expected a non-empty list of values, "
                            f"got {values!r}")
        texts = []
        for i, v in enumerate(values):
            if not isinstance(v, (str, int, float, bool)) or v is None:
                raise GridError(f"{src}: key 'axes.{k}[{i}]': expected a number, string or "
                                f"boolean (it names a folder), got {type(v).__name__} {v!r}")
            if isinstance(v, float) and not math.isfinite(v):
                raise GridError(f"{src}: key 'axes.{k}[{i}]': expected a finite number, got {v!r}")
            text = axis_text(v)
            if not _FOLDER_TEXT.fullmatch(text) or text in (".", ".."):
                raise GridError(f"{src}: key 'axes.{k}[{i}]': {v!r} cannot name a folder "
                                f"(letters, digits, '_', '.', '+', '-')")
            texts.append(text)
        if len(set(texts)) != len(texts):
            dup = next(t for t in texts if texts.count(t) > 1)
            raise GridError(f"{src}: key 'axes.{k}': two values name the same folder "
                            f"{k}={dup} ({values})")


def _axis_value_key(grid: Grid, values: tuple, message: str) -> str:
    """`axes.<key>[i]` of the value in `values` that a config error names, else `axes` (the
    combination as a whole, e.g. two settings that only together are refused)."""
    for k, x in values:
        if f"'{k}'" in message or f"'{k}." in message:
            i = next(i for i, y in enumerate(grid.axes[k]) if type(y) is type(x) and y == x)
            return f"axes.{k}[{i}]"
    return "axes"


def _setting(cfg: Any, key: str) -> str:
    """The value the config holds at a dotted key, as JSON (None where there is none)."""
    node = cfg.to_dict()
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return json.dumps(node, sort_keys=True)


def _check_same_setting(grid: Grid, settings: dict, values: tuple, cfg: Any) -> None:
    """Two axis values the config reads as one setting (YAML's 1e-3, a string, and 0.001; 1 and
    1.0 of a float key) would be two folders holding the same experiment."""
    if not values:
        return
    other = settings.setdefault(tuple(_setting(cfg, k) for k, _ in values), values)
    if other is values:     # (not ==: 1 == 1.0)
        return
    k, a, b = next((k, a, b) for (k, a), (_, b) in zip(other, values)
                   if (type(a), a) != (type(b), b))
    raise GridError(f"{grid.source}: key 'axes.{k}': {a!r} and {b!r} are the same setting "
                    f"({k} = {_setting(cfg, k)}), so two folders would hold one experiment; "
                    f"give it once")


def _check_finetune_from(grid: Grid, pretrain_epochs: int | None, values: tuple = ()) -> None:
    """`finetune_from`: distinct entries, each `final` or an epoch 1..pretrain.epochs (checked
    per cell config when `pretrain_epochs` is given; `values`: the cell's axis values)."""
    src, ff = grid.source, grid.finetune_from
    # where the cell's pretrain.epochs comes from an axis value, that value's place in the list
    axis = next((f", axes.pretrain.epochs[{grid.axes['pretrain.epochs'].index(x)}]"
                 for k, x in values if k == "pretrain.epochs"), "")
    if not isinstance(ff, list) or not ff:
        raise GridError(f"{src}: key 'finetune_from': expected a non-empty list of pretraining "
                        f"epochs and/or '{FINAL}', got {ff!r}")
    for i, e in enumerate(ff):
        if e == FINAL:
            continue
        if not isinstance(e, int) or isinstance(e, bool) or e < 1:
            raise GridError(f"{src}: key 'finetune_from[{i}]': expected an epoch >= 1 or "
                            f"'{FINAL}', got {e!r}")
        if pretrain_epochs is not None and e > pretrain_epochs:
            raise GridError(f"{src}: key 'finetune_from[{i}]': epoch {e} is after the "
                            f"pretraining's last (pretrain.epochs = {pretrain_epochs}{axis})")
        if e == pretrain_epochs and FINAL in ff:
            # epoch-N.pt and final.pt are saved from the same checkpoint: two identical
            # fine-tunes, twice the time
            raise GridError(f"{src}: key 'finetune_from[{i}]': epoch {e} is the pretraining's "
                            f"last (pretrain.epochs = {pretrain_epochs}{axis}), whose weights "
                            f"are also '{FINAL}'s: the two fine-tunes would be the same; keep one")
    if len(set(map(str, ff))) != len(ff):
        raise GridError(f"{src}: key 'finetune_from': repeated entry in {ff}")


# A control character (newline, carriage return, NUL, escape, ...) in a value that submitit
# writes into a `#SBATCH --key=value` line ends that line: what follows runs as a command of
# the job script. In a path or a logged command it forges log lines.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SBATCH_OPTION = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def _check_text(src: str, key: str, value: str) -> None:
    bad = _CONTROL.search(value)
    if bad:
        raise GridError(f"{src}: key '{key}': control character {bad.group()!r} in {value!r} "
                        f"(it would end a line of the job script: give the value on one line)")


def _check_script_values(grid: Grid) -> None:
    """Every string that reaches a job script or a logged command: no control characters, and
    `additional` holds sbatch options by name with plain values. (The job name is the grid's
    `name`, checked above; override values are JSON-encoded, which escapes control characters,
    and their keys must be config keys.)"""
    src, ex = grid.source, grid.executor
    # resolved, as the scripts get them: the working folder's name is part of a relative path
    _check_text(src, "out", str(grid.out_path))
    _check_text(src, "config", grid.config)
    for i, d in enumerate(grid.data):
        _check_text(src, f"data[{i}]", str(Path(d).resolve()))
    for key in ("partition", "account", "qos"):
        _check_text(src, f"executor.{key}", getattr(ex, key))
    if not isinstance(ex.additional, dict):
        raise GridError(f"{src}: key 'executor.additional': expected a mapping of sbatch "
                        f"options, got {ex.additional!r}")
    for k, v in ex.additional.items():
        if not isinstance(k, str) or not _SBATCH_OPTION.fullmatch(k):
            raise GridError(f"{src}: key 'executor.additional': expected sbatch option names "
                            f"(letters, digits, '_', '-'), got {k!r}")
        if not isinstance(v, (str, int, float)):
            raise GridError(f"{src}: key 'executor.additional.{k}': expected a string, number "
                            f"or boolean, got {type(v).__name__} {v!r}")
        _check_text(src, f"executor.additional.{k}", str(v))


def _check_config_file(grid: Grid) -> None:
    """The grid's `config` must be a readable YAML file: a GridError naming the key, not one
    naming 'overrides' when the training config's loader meets it later."""
    try:
        read_yaml_file(grid.config)
    except ConfigError as e:
        raise GridError(f"{grid.source}: key 'config': {e}") from None


def _full_rank_head_rank(grid: Grid, hidden: int) -> int | None:
    """None when the configured model.head_rank validates as it is; else hidden_size (the
    configured rank, 16 by default, is then above it), which full-rank cells pass instead."""
    try:
        load_config(grid.config or None, grid.override_args())
        return None
    except ConfigError:
        return hidden


def check_data_exists(grid: Grid) -> None:
    """Before submitting, and at --dry-run: every dataset folder holds a manifest."""
    for i, d in enumerate(grid.data):
        if not (Path(d) / "manifest.json").exists():
            raise GridError(f"{grid.source}: key 'data[{i}]': {d} is not a dataset folder "
                            f"(no manifest.json; make it with s3rec-prep)")
