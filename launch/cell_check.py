"""Before a grid is launched again: the runs already in its cells' folders must be the runs the
grid now asks for.

A launch skips done cells and resumes unfinished ones. That is right only while the grid still
describes them. After an override, the config file or a dataset changed, a done cell would be
reported (and pooled) under settings it was not trained with, and an unfinished one would stop at
its start on the resume check (s3rec/engine/resume_check.py), visible only in that job's log. So
the launch compares each stage folder's run.json with the config the grid gives the cell, and
stops before submitting anything, naming the cell, the key and both values.

What may differ: logging and checkpointing, evaluation batch size and compilation (they change
no result), and the other stage's section, which a stage does not read. For a stage that is not
done, also what a resume may change (its epochs and patience: resume_check.MAY_CHANGE).
"""
from __future__ import annotations

from pathlib import Path

from s3rec.launch.grid import (FINAL, STAGE_PRODUCT, Cell, GridError, dataset_name,
                               read_run_json, stage_done)
from s3rec.config import NO_RESULT_KEYS, Config, flat_keys, load_config
from s3rec.engine.checkpoint import ResumeError
from s3rec.engine.resume_check import (ENGINE_KEYS, MAY_CHANGE, OTHER_STAGE, dataset_fingerprint,
                                       saved_state)
from s3rec.run_folder import RunFolderError


def check_cells(cells: list[Cell]) -> None:
    """GridError for the first stage folder whose run.json disagrees with its cell's config."""
    fingerprints: dict[str, dict] = {}
    for cell in cells:
        expected = None                 # the cell's config, made once a stage has a record
        for stage, run_dir in cell.stage_dirs:
            info = read_run_json(run_dir)
            if info is None or "config" not in info:
                continue            # never started, or started by a version without a record
            where = f"{Path(run_dir) / 'run.json'} (cell {cell.key})"
            if info.get("stage") != stage:
                raise GridError(f"{where}: a {info.get('stage')} run in the {stage} folder")
            expected = expected or load_config(cell.grid.config or None, cell.override_args())
            _check_config(where, expected, stage, info,
                          stage_done(run_dir, STAGE_PRODUCT[stage]))
            if info.get("world_size", cell.world_size) != cell.world_size:
                # The run's batches, and its checkpoint's shards, are those of its world size.
                raise GridError(f"{where}: ran as {info['world_size']} process"
                                f"{'es' * (info['world_size'] != 1)}, the grid now gives "
                                f"{cell.world_size} (executor.nodes x executor.tasks_per_node); "
                                f"restore them, {_ELSE}")
            if stage == "pretrain":
                _check_finetune_inputs(cell, info)
            saved = info.get("dataset_fingerprint")
            # (a dataset folder that is gone: check_data_exists, run before this, says so)
            if saved is not None and (Path(cell.data) / "manifest.json").exists():
                if cell.data not in fingerprints:
                    fingerprints[cell.data] = _fingerprint(cell)
                now = fingerprints[cell.data]
                if saved != now:
                    key = next(k for k in sorted(set(saved) | set(now))
                               if saved.get(k) != now.get(k))
                    raise GridError(f"{where}: run on another version of {cell.data} ({key}: "
                                    f"{saved.get(key)!r} then, {now.get(key)!r} now); prepare it as it "
                                    f"was, {_ELSE}")


def _fingerprint(cell: Cell) -> dict:
    """The fingerprint of a cell's dataset; a damaged one is a GridError naming its data[i]."""
    from s3rec.data.format import DatasetError
    from s3rec.data.reader import Dataset
    try:
        return dataset_fingerprint(Dataset(cell.data))
    except DatasetError as e:
        grid = cell.grid
        i = [dataset_name(d) for d in grid.data].index(cell.dataset)   # names are unique
        raise GridError(f"{grid.source}: key 'data[{i}]': {e}") from None


_ELSE = "or give the grid another 'out' (or remove this cell's folder to run it again)"


def _check_finetune_inputs(cell: Cell, info: dict) -> None:
    """Every `finetune_from` epoch still to fine-tune from has its pretrain/epoch-N.pt, or will
    have it. A pretraining saves epoch-N.pt as it ends epoch N, for the N in its save_epochs
    then; one that has passed epoch N without (N added to finetune_from since) never will, and
    that fine-tune would fail in its job on the missing --init file."""
    done = stage_done(cell.pretrain_dir, STAGE_PRODUCT["pretrain"])
    for ft in cell.finetunes:
        if ft.source == FINAL or ft.init.exists() or stage_done(ft.dir, STAGE_PRODUCT["finetune"]):
            continue
        if not done:
            try:
                found = saved_state(cell.pretrain_dir / "checkpoints")
            except (ResumeError, RunFolderError):
                continue    # the pretraining's own start names a damaged checkpoint
            reached = (found[1].get("trainer") or {}).get("epoch", 0) if found else 0
            if reached < ft.source:
                continue    # it saves epoch-N.pt when it gets there (save_epochs has N now)
        n = ft.source
        saved = (info.get("config") or {}).get("pretrain", {}).get("save_epochs")
        passed = "finished" if done else f"is past epoch {n}"
        raise GridError(f"{ft.init} (cell {cell.key}): missing, but finetune_from asks for "
                        f"epoch {n}: the pretraining {passed} with pretrain.save_epochs {saved}, "
                        f"and epoch-N.pt is written only as epoch N ends, for the N listed then; "
                        f"drop {n} from finetune_from, or remove {cell.folder} to run the cell "
                        f"again (its pretraining then saves epoch {n})")


def _check_config(where: str, expected: Config, stage: str, info: dict, done: bool) -> None:
    old, new = flat_keys(info["config"]), flat_keys(expected.to_dict())
    skip = NO_RESULT_KEYS + (OTHER_STAGE[stage],) + (() if done else MAY_CHANGE)
    if expected.deepspeed.config_file:
        skip += ENGINE_KEYS     # the file may choose them: run.json holds the effective values
    for key in sorted(set(old) & set(new)):    # a key of another version of this program: skipped
        if key.startswith(skip) or old[key] == new[key]:
            continue
        state = "done" if done else "unfinished"
        raise GridError(f"{where}: the {state} {stage} ran with '{key}'={old[key]!r}, the grid "
                        f"now gives {new[key]!r}; restore the grid's setting, {_ELSE}")
