"""What a resumed run must share with the run that saved its checkpoint.

Started again with the same --out, a run continues from RUN/checkpoints/latest. That continuation
is exact only if the stage, the world size, the dataset and every setting that decides the
samples, the model or the updates are those of the saved run; with any of them changed it would
silently continue a different training. So a difference stops the run (ResumeError, exit 2)
naming the key, both values and the file, before run.json is touched (a wrong --out must not
overwrite the record of the run that is there) and before any weights are loaded.

What may change: how long the run goes, and what it logs or keeps (MAY_CHANGE: the config's
NO_RESULT_KEYS and the epochs), and the other stage's settings, which this stage does not read.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from s3rec.config import NO_RESULT_KEYS, flat_keys
from s3rec.engine import checkpoint as ckpt

MAY_CHANGE = NO_RESULT_KEYS + ("pretrain.epochs", "finetune.epochs", "finetune.patience")
OTHER_STAGE = {"pretrain": "finetune.", "finetune": "pretrain."}
# A DeepSpeed JSON file may choose these; their effective values are known once the engine's
# config is built (s3rec.engine.deepspeed_setup.build_ds_config), so they are checked then.
ENGINE_KEYS = ("deepspeed.zero_stage", "deepspeed.precision")


def dataset_fingerprint(ds) -> dict:
    """What identifies a prepared dataset: its name, counts and the checksums of its shards
    (the same data prepared again, or moved, has the same fingerprint)."""
    m = ds.manifest
    shards = hashlib.sha256("".join(r["sha256"] for r in m["shards"]).encode()).hexdigest()
    return {"name": m["name"], "num_users": m["num_users"], "num_items": m["num_items"],
            "num_interactions": m["num_interactions"], "num_attributes": m["num_attributes"],
            "shards_sha256": shards}


def saved_state(ckpt_dir: Path) -> tuple[Path, dict] | None:
    """(trainer_state.json, its content) of the tag `latest` names; None without checkpoints."""
    ckpt_dir = Path(ckpt_dir)
    tag = ckpt.read_latest(ckpt_dir) if ckpt_dir.is_dir() else None
    return None if tag is None else ckpt.read_state(ckpt_dir, tag)


def check_before_start(ckpt_dir: Path, stage: str, config: dict, world_size: int,
                       dataset: dict) -> None:
    """Stage, world size, dataset and config (all but ENGINE_KEYS) against the saved run."""
    found = saved_state(ckpt_dir)
    if found is None:
        return
    f, state = found
    again = "use another --out for a new run, or start it as it was"
    if state.get("stage") != stage:
        raise ckpt.ResumeError(f"{f}: a {state.get('stage')} checkpoint; this is {stage}: use "
                               f"another --out")
    ckpt.check_world_size(f, state, world_size)
    saved_ds = state.get("dataset")
    if saved_ds is not None and saved_ds != dataset:
        key = next(k for k in sorted(set(saved_ds) | set(dataset))
                   if saved_ds.get(k) != dataset.get(k))
        raise ckpt.ResumeError(f"{f}: saved on another dataset ({key}: {saved_ds.get(key)!r} "
                               f"then, {dataset.get(key)!r} now); {again}")
    _compare(f, state, config, stage, lambda k: k not in ENGINE_KEYS, again)


def check_engine_keys(ckpt_dir: Path, stage: str, config: dict) -> None:
    """ENGINE_KEYS (effective, after the DeepSpeed config was built) against the saved run."""
    found = saved_state(ckpt_dir)
    if found is not None:
        _compare(*found, config, stage, lambda k: k in ENGINE_KEYS,
                 "a checkpoint is resumed with the ZeRO stage and precision it was saved with")


def _compare(f: Path, state: dict, config: dict, stage: str, which, again: str) -> None:
    saved = state.get("config")
    if saved is None:
        return
    old, new = flat_keys(saved), flat_keys(config)
    for key in sorted(set(old) & set(new)):    # a key of another version of this program: skipped
        if not which(key) or key.startswith(MAY_CHANGE) or key.startswith(OTHER_STAGE[stage]):
            continue
        if old.get(key) != new.get(key):
            raise ckpt.ResumeError(f"{f}: config key '{key}' was {old.get(key)!r} when the run "
                                   f"saved this checkpoint, now {new.get(key)!r}; {again}")
