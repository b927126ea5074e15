"""Read a tree of run folders into tidy tables.

A stage folder is any folder holding a run.json (docs/architecture.md, "A run folder"). In a grid
it sits at `<RUNS>/<grid>/<dataset>/<variant>/r<rank>/[<key>=<value>/...]s<seed>/<stage>`
(full-rank variants use `rfull`; one `<key>=<value>` folder per entry of the grid's `axes`; stage
`pretrain`, `finetune` from the pretraining's final.pt, or `finetune-e<N>` from its epoch-N.pt);
the axes parsed from that path are cross-checked with run.json, and a disagreement is an error
naming the file. Folders outside that layout still count: their axes come from run.json.

Two tables:
- `runs`: one row per run and stage, with status done | unfinished | failed (unfinished = run.json
  says running or preempted, or a fine-tune without results.json: a killed run is never dropped),
  final test metrics, best epoch, where a fine-tune started (the --init file, its pretraining
  epochs, variant and rank), parameters, epochs reached, last losses, wall time.
- `scalars`: long form (run, stage, tag, step, value, wall_time), every scalar of every event file,
  read with TensorBoard's own EventAccumulator with no sampling limit. An event file cut off
  mid-record is a note while its run is running and an error once it has stopped (check_events).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

from s3rec.config import (HEAD_NAMES, OBJECTIVES, Config, ConfigError, config_from_dict,
                          NO_RESULT_KEYS, flat_keys)
from s3rec.runlog import TEST_RANKS

# The order metrics appear in tables; others follow alphabetically.
METRIC_ORDER = ("HR@1", "HR@5", "NDCG@5", "HR@10", "NDCG@10", "HR@20", "NDCG@20", "MRR")
STATUSES = ("done", "unfinished", "failed")
_RANK_RE = re.compile(r"^r(full|\d+)$")
_SEED_RE = re.compile(r"^s(-?\d+)$")
# A grid axis folder: a dotted config key, `=`, the value as launch/grid.py's axis_text writes it.
_AXIS_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)=([A-Za-z0-9_.+-]+)$")
_FROM_EPOCH_RE = re.compile(r"^finetune-e(\d+)$")
FINAL = "final"     # Run.pretrain_from of a fine-tune from the pretraining's final.pt
# A parameter-count module belongs to a pretraining head if one of the objective names is a
# token of its name (aap_norm, heads.map, sp_head ...).
_HEAD_RE = re.compile(r"(?:^|[._])(aap|mip|map|sp)(?:[._]|$)")


class RunFolderError(ValueError):
    """A run folder that does not follow the contract; the message names the file."""


@dataclass
class Run:
    """One stage of one grid cell, as read from disk."""
    path: Path                      # the stage folder
    cell: str                       # grid/dataset/variant/rRANK/[KEY=VALUE/...]sSEED (or the
                                    #   relative folder above the stage folder)
    grid: str
    dataset: str
    variant: str
    rank: str                       # "full" or the head rank as text
    seed: int
    stage: str                      # pretrain | finetune
    status: str                     # done | unfinished | failed
    run_json: dict
    results: dict | None            # results.json (finetune, when done)
    scalars: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict)
                                    # tag -> [(step, value, wall_time)] sorted by step
    notes: list[str] = field(default_factory=list)
    removed: tuple[str, ...] = ()   # objectives with weight 0 in this cell's pretraining
    arm_suffix: str = ""            # " [grid]" when the same arm ran with other settings elsewhere,
                                    #   " [grid key=value]" when also within its grid
    weights: dict[str, float] = field(default_factory=dict)
    pretrain_params: dict[str, int] = field(default_factory=dict)  # the cell's pretraining model
    init: dict = field(default_factory=dict)   # where a fine-tune started (init_source): init,
                                               #   init_epochs, init_variant, init_rank
    axes: dict[str, str] = field(default_factory=dict)  # the grid's `axes` of this cell: config
                                               #   key -> value as its folder writes it ({} off
                                               #   the layout or without axes)
    pretrain_from: int | str = ""   # a grid fine-tune's pretraining weights: FINAL (finetune/),
                                    #   epoch N (finetune-e<N>/); "" for a pretraining, a
                                    #   fine-tune from scratch, or a folder off the grid layout

    @property
    def arm(self) -> str:
        """What a figure line stands for: variant, rank, axis values, any removed objective, and
        the pretraining epoch it was fine-tuned from (not shown for the final weights)."""
        name = self.variant if self.rank == "full" else f"{self.variant} r={self.rank}"
        return name + self._objectives_and_suffix()

    @property
    def rank_line(self) -> str:
        """The arm without its rank: one line of a metric-against-rank figure."""
        return self.variant + self._objectives_and_suffix()

    @property
    def name(self) -> str:
        """The run in the report's lists: its cell, and the stage folder where the cell has
        several fine-tunes (a `finetune-e<N>` beside its `finetune`)."""
        return f"{self.cell}/{self.path.name}" if isinstance(self.pretrain_from, int) else self.cell

    def _objectives_and_suffix(self) -> str:
        axes = "".join(f" {k}={v}" for k, v in sorted(self.axes.items()))
        removed = " w/o " + "+".join(o.upper() for o in self.removed) if self.removed else ""
        source = f" @e{self.pretrain_from}" if isinstance(self.pretrain_from, int) else ""
        return axes + removed + source + self.arm_suffix

    def test_metrics(self) -> dict[str, float]:
        """Final test metrics: results.json, else the TensorBoard test/<metric> tags."""
        if self.results and isinstance(self.results.get("test"), dict):
            return {k: float(v) for k, v in self.results["test"].items()}
        return {t[5:]: v[-1][1] for t, v in self.scalars.items() if t.startswith("test/")}

    def best_epoch(self) -> int | None:
        if self.results and self.results.get("best_epoch") is not None:
            return int(self.results["best_epoch"])
        steps = [v[-1][0] for t, v in self.scalars.items() if t.startswith("test/")]
        return steps[0] if steps else None

    def curve(self, tag: str) -> tuple[list[int], list[float]]:
        pts = self.scalars.get(tag, [])
        return [p[0] for p in pts], [p[1] for p in pts]

    def test_ranks(self) -> np.ndarray | None:
        """Each user's 0-based test rank (RUN/test_ranks.npy, int64 [users]); None without the
        file. A file that is not a plain 1-d integer array is a RunFolderError."""
        path = self.path / TEST_RANKS
        if not path.is_file():
            return None
        try:
            ranks = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise RunFolderError(f"{path}: not a readable .npy of ranks ({e})") from None
        if ranks.ndim != 1 or ranks.dtype.kind not in "iu" or (ranks.size and ranks.min() < 0):
            raise RunFolderError(f"{path}: expected a 1-d array of ranks >= 0, got "
                                 f"{ranks.dtype} {list(ranks.shape)}")
        return ranks


# ---------------------------------------------------------------- reading one folder

def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunFolderError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


DAMAGED_DATA = "has a damaged record (its data fails its crc32c)"


def events_damage(path: Path) -> tuple[int, str] | None:
    """(offset, what) where the records of events file `path` break, or None if every record is
    whole and intact. TensorBoard's reader stops silently at the first short or damaged record
    (it logs at debug level only) and drops every record after it, so this is how a cut-off
    file, or a flipped bit in the middle of one, is noticed at all. Each record is its length,
    the length's masked crc32c, the data and the data's: checked with TensorBoard's own
    crc32c, the pass its reader makes anyway (about 4 MB/s; a 30-epoch Beauty pretraining
    writes 265 KB)."""
    size, pos = path.stat().st_size, 0
    with open(path, "rb") as f:
        while pos < size:
            head = f.read(12)
            if len(head) < 12:
                return pos, "ends inside a record header"
            (length,) = struct.unpack("<Q", head[:8])
            if struct.unpack("<I", head[8:])[0] != masked_crc32c(head[:8]):
                return pos, "has a damaged record header"
            if pos + 16 + length > size:
                return pos, "ends inside a record"
            data, crc = f.read(length), f.read(4)
            if struct.unpack("<I", crc)[0] != masked_crc32c(data):
                return pos, DAMAGED_DATA
            pos += 16 + length
    return None


def check_events(folder: Path, status: str) -> list[str]:
    """Notes on event files that end mid-record. While run.json says running, the writer may be
    in the middle of a record (TensorBoard flushes whole buffers, not whole records), so its
    complete records are read and the run gets a note. Once the run has stopped (done, failed,
    preempted: the writer was closed) a cut-off file means lost scalars, perhaps the last
    epoch's: it is refused, naming the file and the byte where its whole records end, rather
    than reported as a shorter run (figures and tables would silently show the wrong last
    epoch). A whole record whose data fails its crc32c is no write under way (writers append):
    it is refused whatever the status. The message says how to keep the records before the
    damage, so a report is one command away."""
    notes = []
    for path in sorted(folder.glob("events.out.tfevents*")):
        damage = events_damage(path)
        if damage is None:
            continue
        pos, what = damage
        if status != "running" or what == DAMAGED_DATA:
            raise RunFolderError(f"{path}: {what} at byte {pos} of {path.stat().st_size}, and "
                                 f"run.json says {status}: TensorBoard's reader stops there, "
                                 f"so the scalars after it are lost; `truncate -s {pos} {path}` "
                                 f"keeps the records before it (or restore the file)")
        notes.append(f"{path.name} {what} at byte {pos} (still being written?): its whole "
                     f"records are read")
    return notes


def _not_a_purge(record: logging.LogRecord) -> bool:
    """A resumed run's writer marks its restart (s3rec.runlog: purge_step), and the steps an
    earlier start logged past its last checkpoint are dropped, as designed; TensorBoard warns of
    each drop as "likely caused by a TensorFlow restart", which only misleads here."""
    return not record.getMessage().startswith("Detected out of order event.step")


def read_scalars(folder: Path) -> dict[str, list[tuple[int, float, float]]]:
    """Every scalar of the event files directly in `folder` (all files; resumed runs write
    several, and EventAccumulator drops the steps a restart purged)."""
    if not any(p.name.startswith("events.out.tfevents") for p in folder.iterdir()):
        return {}
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    event_accumulator.logger.addFilter(_not_a_purge)
    try:
        acc.Reload()
    finally:
        event_accumulator.logger.removeFilter(_not_a_purge)
    out = {}
    for tag in acc.Tags()["scalars"]:
        pts = sorted((int(e.step), float(e.value), float(e.wall_time)) for e in acc.Scalars(tag))
        out[tag] = pts
    return out


def _config_axes(cfg: Config) -> str:
    """The rank axis a config implies: 'full', or the rank shared by its low-rank heads."""
    ranks = sorted({cfg.head(h).rank for h in HEAD_NAMES if cfg.head(h).kind == "lowrank"})
    if not ranks:
        return "full"
    return "/".join(str(r) for r in ranks)


def _path_axes(rel: tuple[str, ...], root_name: str) -> dict | None:
    """Axes from `.../<dataset>/<variant>/r<rank>/[<key>=<value>/...]s<seed>/<stage>`, or None
    off that layout. `axes`: key -> value text of the axis folders; `stage`: `finetune` for a
    `finetune-e<N>` folder, whose N is `from_epoch` (else None); `cell`: the path without the
    stage folder. A key given by two axis folders is a ValueError."""
    if len(rel) < 5 or not _SEED_RE.match(rel[-2]):
        return None
    i = len(rel) - 3                    # walk back over the axis folders to r<rank>
    while i >= 0 and _AXIS_RE.match(rel[i]):
        i -= 1
    if i < 2 or not _RANK_RE.match(rel[i]):
        return None
    axes: dict[str, str] = {}
    for seg in rel[i + 1:-2]:
        key, text = _AXIS_RE.match(seg).groups()
        if key in axes:
            raise ValueError(f"the folders {key}={axes[key]} and {seg} both give axis {key}")
        axes[key] = text
    grid = rel[i - 3] if i >= 3 else root_name
    m = _FROM_EPOCH_RE.match(rel[-1])
    return {"grid": grid, "dataset": rel[i - 2], "variant": rel[i - 1],
            "rank": _RANK_RE.match(rel[i]).group(1), "seed": int(_SEED_RE.match(rel[-2]).group(1)),
            "stage": "finetune" if m else rel[-1], "axes": axes,
            "from_epoch": int(m.group(1)) if m else None, "cell": "/".join([grid, *rel[i - 2:-1]])}


def _axis_text(value) -> str:
    """A config value as a grid's axis folder writes it (launch/grid.py axis_text): strings as
    they are, numbers and booleans as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def _axis_agrees(text: str, value) -> bool:
    """Whether folder text `text` names config value `value`. A float key also takes the
    number the grid was given: `1` or `1e-3` name the 1.0 or 0.001 run.json records."""
    if _axis_text(value) == text:
        return True
    if isinstance(value, float):
        try:
            return float(text) == value
        except ValueError:
            return False
    return False


def _check_axes(rj_path: Path, axes: dict[str, str], config: dict) -> None:
    flat = flat_keys(config)
    for key, text in axes.items():
        if key not in flat:
            raise RunFolderError(f"{rj_path}: the folder {key}={text} names config key "
                                 f"{key!r}, which run.json's config does not have")
        if not _axis_agrees(text, flat[key]):
            raise RunFolderError(f"{rj_path}: the folder says {key}={text} but run.json says "
                                 f"{key}={_axis_text(flat[key])}")


def _check_pretrain_from(rj_path: Path, run: "Run", from_epoch: int | None) -> None:
    """A grid fine-tune's folder and its --init must name the same pretraining weights."""
    init, epochs = run.init["init"], run.init["init_epochs"]
    if from_epoch is not None:
        if epochs != from_epoch:
            raise RunFolderError(
                f"{rj_path}: the folder {run.path.name} says pretraining epoch {from_epoch} but "
                f"run.json's init is {init or 'not set'}"
                + (f" (epoch {epochs})" if epochs != "" else ""))
        run.pretrain_from = from_epoch
    elif init:
        m = _EPOCH_FILE_RE.match(Path(init).name)
        if m:
            raise RunFolderError(
                f"{rj_path}: the folder {run.path.name} holds the fine-tune from the "
                f"pretraining's final weights but run.json's init is {init} (epoch "
                f"{m.group(1)}: a finetune-e{m.group(1)} folder)")
        run.pretrain_from = FINAL


def _check(run_json_path: Path, axis: str, from_path, from_json) -> None:
    if from_path != from_json:
        raise RunFolderError(f"{run_json_path}: the folder says {axis}={from_path!r} but run.json "
                             f"says {axis}={from_json!r}")


def read_run(folder: Path, root: Path) -> Run:
    """Read one stage folder (run.json, results.json, events)."""
    rj_path = folder / "run.json"
    rj = _load_json(rj_path)
    for key in ("stage", "status", "config"):
        if key not in rj:
            raise RunFolderError(f"{rj_path}: missing key '{key}'")
    try:
        cfg = config_from_dict(rj["config"])
    except ConfigError as e:
        raise RunFolderError(f"{rj_path}: key 'config': {e}") from None
    ds = rj.get("dataset") or {}
    json_axes = {"dataset": ds.get("name") or "", "variant": cfg.variant,
                 "rank": _config_axes(cfg), "seed": int(rj.get("seed", cfg.seed)),
                 "stage": rj["stage"]}
    rel = folder.resolve().relative_to(root.resolve()).parts
    try:
        axes = _path_axes(rel, root.resolve().name)
    except ValueError as e:
        raise RunFolderError(f"{rj_path}: {e}") from None
    on_grid = axes is not None
    if not on_grid:  # not a grid folder: run.json is the only source
        axes = dict(json_axes, grid=root.resolve().name, axes={})
        cell = "/".join(rel[:-1]) or "."
    else:
        for a in ("variant", "rank", "seed", "stage"):
            _check(rj_path, a, axes[a], json_axes[a])
        # The launcher may name the dataset folder after the dataset path rather than its name.
        names = {json_axes["dataset"].lower(), Path(str(rj.get("data", ""))).name.lower()}
        if axes["dataset"].lower() not in names:
            raise RunFolderError(f"{rj_path}: the folder says dataset={axes['dataset']!r} but "
                                 f"run.json names {sorted(n for n in names if n)}")
        _check_axes(rj_path, axes["axes"], rj["config"])
        cell = axes["cell"]

    status = rj["status"]
    if status not in ("running", "done", "failed", "preempted"):
        raise RunFolderError(f"{rj_path}: key 'status': expected running|done|failed|preempted, "
                             f"got {status!r}")
    notes = []
    results = None
    res_path = folder / "results.json"
    if res_path.exists():
        results = _load_json(res_path)
        for key in ("test", "valid", "best_epoch"):
            if key not in results:
                raise RunFolderError(f"{res_path}: missing key '{key}'")
    if status == "failed":
        state = "failed"
    elif status == "running":
        state = "unfinished"
        notes.append("run.json still says running (killed, or still training)")
    elif status == "preempted":   # the engine saved a checkpoint on a signal and stopped
        state = "unfinished"
        notes.append("preempted after a checkpoint (start again with the same --out to resume)")
    elif rj["stage"] == "finetune" and results is None:
        state = "unfinished"
        notes.append("run.json says done but results.json is missing")
    else:
        state = "done"
    notes += check_events(folder, status)

    run = Run(path=folder, cell=cell, grid=axes["grid"], dataset=axes["dataset"],
              variant=axes["variant"], rank=axes["rank"], seed=axes["seed"], stage=axes["stage"],
              status=state, run_json=rj, results=results, scalars=read_scalars(folder),
              notes=notes, axes=axes["axes"])
    run.weights = {o: float(getattr(cfg.pretrain.weights, o)) for o in OBJECTIVES}
    run.removed = tuple(o for o in OBJECTIVES if run.weights[o] == 0)
    run.init = init_source(run)
    if on_grid and run.stage == "finetune":
        _check_pretrain_from(rj_path, run, axes["from_epoch"])
    if not run.scalars:
        run.notes.append("no TensorBoard scalars")
    _cross_check_test(run, res_path)
    return run


def _cross_check_test(run: Run, res_path: Path) -> None:
    """results.json and the test/<metric> tags must agree; a difference is noted, not hidden."""
    if not run.results:
        return
    for tag, pts in run.scalars.items():
        if tag.startswith("test/") and tag[5:] in run.results["test"]:
            if abs(pts[-1][1] - float(run.results["test"][tag[5:]])) > 1e-6:
                run.notes.append(f"{tag}={pts[-1][1]:.6g} in events but "
                                 f"{run.results['test'][tag[5:]]} in {res_path.name}")


# ---------------------------------------------------------------- the whole tree

def find_stage_folders(root: Path) -> list[Path]:
    """Every folder under `root` (itself included) that holds a run.json, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"runs folder {root} does not exist")
    return sorted(p.parent for p in root.rglob("run.json"))


def read_runs(root: str | Path) -> list[Run]:
    """All stage folders under `root`; the cell's pretraining facts are copied to each stage."""
    root = Path(root)
    runs = [read_run(f, root) for f in find_stage_folders(root)]
    pretrain = {r.cell: r for r in runs if r.stage == "pretrain"}
    for r in runs:
        # A fine-tune inherits its cell's ablation and model size from the pretraining it
        # started from (its own config's weights are not used by fine-tuning).
        src = pretrain.get(r.cell, r)
        r.weights, r.removed = dict(src.weights), src.removed
        r.pretrain_params = dict(src.run_json.get("params") or {})
    _separate_differing_arms(runs)
    return runs


def _settings_key(r: Run) -> str:
    """The run's config without the seed, the head rank and what changes no result (logging,
    checkpointing: s3rec.config.NO_RESULT_KEYS): the runs of one figure line (its arms: one per
    rank) are pooled and joined only if this agrees."""
    flat = {k: v for k, v in flat_keys(r.run_json["config"]).items()
            if k not in ("seed", "model.head_rank") and not k.startswith(NO_RESULT_KEYS)}
    return json.dumps(flat, sort_keys=True)     # head_rank: the rank axis (unused by full heads)


def _separate_differing_arms(runs: list[Run]) -> None:
    """Two grids, or two cells of one grid, may run the same variant with different settings
    (epochs, say): pooling them as seeds of one arm, or joining their ranks into one line, would
    be wrong. So where a line (variant and removed objectives, every rank) was run with several
    settings, its runs get the grid's name, and where the grid ran several settings of it, what
    sets them apart. The suffix is decided per line, not per rank, so a grid's ranks stay one
    line even where only some of them were also run with other settings."""
    groups: dict[tuple, dict[str, dict[str, list[Run]]]] = {}   # line -> grid -> settings -> runs
    for r in runs:
        line = groups.setdefault((r.stage, r.dataset, r.rank_line), {})
        line.setdefault(r.grid, {}).setdefault(_settings_key(r), []).append(r)
    for by_grid in groups.values():
        if len({k for by_settings in by_grid.values() for k in by_settings}) < 2:
            continue    # one setting, in however many grids: seeds of one arm, ranks of one line
        for grid, by_settings in by_grid.items():
            labels = _settings_labels(list(by_settings)) if len(by_settings) > 1 else {}
            for key, rs in by_settings.items():
                for r in rs:
                    r.arm_suffix = f" [{grid} {labels[key]}]" if labels else f" [{grid}]"


def _settings_labels(keys: list[str], max_keys: int = 3) -> dict[str, str]:
    """settings key -> a short label that tells it from the others: the config keys that differ
    (`pretrain.epochs=2`), or a hash of the settings when more than `max_keys` differ."""
    flats = [{n: json.dumps(v, sort_keys=True) for n, v in flat_keys(json.loads(k)).items()}
             for k in keys]
    names = sorted({n for f in flats for n in f if len({g.get(n) for g in flats}) > 1})
    if len(names) > max_keys:
        return {k: "settings " + hashlib.sha1(k.encode()).hexdigest()[:8] for k in keys}
    return {k: ", ".join(f"{n}={f.get(n, '-')}" for n in names) for k, f in zip(keys, flats)}


# ---------------------------------------------------------------- tables

def _iso(text) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None


def wall_seconds(run: Run) -> tuple[float | None, str]:
    """(seconds, source): run.json started..finished, else the span of the event wall times."""
    start, end = _iso(run.run_json.get("started")), _iso(run.run_json.get("finished"))
    if start and end:
        return (end - start).total_seconds(), "run.json"
    walls = [p[2] for pts in run.scalars.values() for p in pts]
    if walls:
        first = start.timestamp() if start else min(walls)
        return max(walls) - first, "events"
    return None, ""


def head_params(params: dict) -> int | None:
    if not params:
        return None
    return sum(int(v) for k, v in params.items() if k != "total" and _HEAD_RE.search(k))


def sort_metrics(names) -> list[str]:
    names = set(names)
    return [m for m in METRIC_ORDER if m in names] + sorted(names - set(METRIC_ORDER))


def runs_table(runs: list[Run]) -> tuple[list[dict], list[str]]:
    """(rows, columns) of the one-row-per-run-and-stage table."""
    metrics = sort_metrics({m for r in runs for m in r.test_metrics()})
    valid_metrics = sort_metrics({m for r in runs if r.results for m in r.results["valid"]})
    losses = sorted({t[5:] for r in runs for t in r.scalars if t.startswith("loss/")})
    modules = sorted({m for r in runs for m in (r.run_json.get("params") or {}) if m != "total"})
    cols = (["grid", "dataset", "variant", "rank", *axis_keys(runs), "seed", "stage",
             "pretrain_from", "status", "arm", "removed",
             *[f"w_{o}" for o in OBJECTIVES], "protocol", "world_size", "epochs_reached",
             "best_epoch", "init", "init_epochs", "init_variant", "init_rank",
             *[f"test_{m}" for m in metrics], *[f"valid_{m}" for m in valid_metrics],
             "params_total", *[f"params_{m}" for m in modules], "pretrain_params_total",
             "pretrain_head_params", *[f"last_loss_{n}" for n in losses], "wall_s", "wall_source",
             "error", "notes", "path"])
    rows = []
    for r in runs:
        rj = r.run_json
        params = rj.get("params") or {}
        row = {"grid": r.grid, "dataset": r.dataset, "variant": r.variant, "rank": r.rank,
               "seed": r.seed, "stage": r.stage, "pretrain_from": r.pretrain_from,
               "status": r.status, "arm": r.arm, "removed": "+".join(r.removed),
               "protocol": rj.get("protocol", ""), "world_size": rj.get("world_size", ""),
               "epochs_reached": _epochs_reached(r), "best_epoch": _blank(r.best_epoch()),
               "params_total": params.get("total", ""),
               "pretrain_params_total": r.pretrain_params.get("total", ""),
               "pretrain_head_params": _blank(head_params(r.pretrain_params)),
               "error": rj.get("error") or "", "notes": "; ".join(r.notes), "path": str(r.path)}
        row.update({f"w_{o}": r.weights[o] for o in OBJECTIVES})
        row.update(r.axes)
        row.update(r.init)
        row.update({f"test_{m}": v for m, v in r.test_metrics().items()})
        if r.results:
            row.update({f"valid_{m}": float(v) for m, v in r.results["valid"].items()})
        row.update({f"params_{m}": v for m, v in params.items() if m != "total"})
        for t, pts in r.scalars.items():
            if t.startswith("loss/"):
                row[f"last_loss_{t[5:]}"] = pts[-1][1]
        wall, src = wall_seconds(r)
        row["wall_s"], row["wall_source"] = _blank(wall), src
        rows.append(row)
    return rows, cols


def _blank(v):
    return "" if v is None else v


def axis_keys(runs: list[Run]) -> list[str]:
    """The grid axes (dotted config keys) any run has: one column each, blank where a run has
    none (a finetune-only cell has no `pretrain.*` axes)."""
    return sorted({k for r in runs for k in r.axes})


_EPOCH_FILE_RE = re.compile(r"^epoch-(\d+)\.pt$")


def init_source(run: Run) -> dict:
    """Where a fine-tune started: init (the --init path), init_epochs (N of an `epoch-N.pt`,
    or the pretraining run's last epoch for any other file of a run folder), init_variant and
    init_rank (from that run folder's run.json). Blank where unknown: a file outside a run
    folder, or a run folder that is gone."""
    out = {"init": "", "init_epochs": "", "init_variant": "", "init_rank": ""}
    init = run.run_json.get("init")
    if run.stage != "finetune" or not init:
        return out
    out["init"] = str(init)
    path = Path(str(init))
    m = _EPOCH_FILE_RE.match(path.name)
    folder = path.parent if path.suffix == ".pt" else path.parent.parent   # DeepSpeed tag folder
    rj_path = folder / "run.json"
    pre = None
    if rj_path.is_file():
        try:
            pre = json.loads(rj_path.read_text())
        except json.JSONDecodeError:
            pre = None
    if m:
        out["init_epochs"] = int(m.group(1))
    elif pre and pre.get("stage") == "pretrain" and pre.get("epoch") is not None:
        out["init_epochs"] = int(pre["epoch"])
    if pre and pre.get("stage") == "pretrain" and "config" in pre:
        try:
            cfg = config_from_dict(pre["config"])
        except ConfigError:
            return out
        out["init_variant"], out["init_rank"] = cfg.variant, _config_axes(cfg)
    return out


def _epochs_reached(r: Run):
    if r.run_json.get("epoch") is not None:
        return int(r.run_json["epoch"])
    steps = [p[0] for t, pts in r.scalars.items() if t.startswith(("epoch/", "valid/"))
             for p in pts]
    return max(steps) if steps else ""


SCALAR_COLUMNS = ["grid", "dataset", "variant", "rank", "seed", "stage", "tag", "step", "value",
                  "wall_time"]


def scalar_columns(runs: list[Run]) -> list[str]:
    """SCALAR_COLUMNS, with the axis columns and `pretrain_from` where the runs need them to
    tell their runs apart (cells differing by an axis value; a cell's several fine-tunes)."""
    cols = list(SCALAR_COLUMNS)
    at = cols.index("seed")
    cols[at:at] = axis_keys(runs)
    if any(isinstance(r.pretrain_from, int) for r in runs):
        cols.insert(cols.index("stage") + 1, "pretrain_from")
    return cols


def scalars_table(runs: list[Run]) -> list[dict]:
    """Long form: one row per (run, stage, tag, step), with the keys of scalar_columns."""
    rows = []
    extra = "pretrain_from" in scalar_columns(runs)
    for r in runs:
        run = {"grid": r.grid, "dataset": r.dataset, "variant": r.variant, "rank": r.rank,
               **r.axes, "seed": r.seed, "stage": r.stage}
        if extra:
            run["pretrain_from"] = r.pretrain_from
        for tag in sorted(r.scalars):
            for step, value, wall in r.scalars[tag]:
                rows.append({**run, "tag": tag, "step": step, "value": value, "wall_time": wall})
    return rows
