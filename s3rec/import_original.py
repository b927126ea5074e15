"""`s3rec-import-original`: the authors' checkpoints to this project's model files, and back.

    s3rec-import-original CHECKPOINT.pt --data DATASET --out MODEL.pt [--config YAML] [key=value ...]
    s3rec-import-original MODEL.pt --export --out AUTHORS.pt [--data DATASET]

Import: reads an authors' state dict, checks every shape against DATASET's sizes, maps it onto the
model the config describes (low-rank heads with `init: svd` factorise the imported matrices) and
writes a project model file that `s3rec-finetune --init` accepts. Export: writes a project model
file's weights in the authors' keys (low-rank heads as U V^T), e.g. for their code.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from s3rec.config import ConfigError, config_from_dict, load_config
from s3rec.model import build_model, export_original, import_original
from s3rec.model.checkpoint_io import (CheckpointError, check_model_file, dataset_info,
                                       read_model_file, read_state_dict, save_model_file)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="s3rec-import-original", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint",
                   help="authors' state dict (import) or project model file (--export)")
    p.add_argument("--data", help="dataset folder (its sizes must match the checkpoint)")
    p.add_argument("--out", required=True, help="file to write")
    p.add_argument("--config", help="YAML config (import: the model to build)")
    p.add_argument("--export", action="store_true", help="project model file -> authors' keys")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p


def run_import(checkpoint: str, data: str, out: str, config: str | None,
               overrides: list[str]) -> Path:
    from s3rec.data.reader import Dataset   # the dataset reader is only needed here
    cfg = load_config(config, overrides)
    ds = Dataset(data)
    state = import_original(read_state_dict(checkpoint), cfg, ds.item_size, ds.attribute_size)
    return save_model_file(out, state, cfg, dataset_info(ds))


def run_export(model_file: str, out: str, data: str | None) -> Path:
    obj = read_model_file(model_file)       # its stored config and dataset are used below
    if not isinstance(obj, dict) or "config" not in obj or "dataset" not in obj:
        raise CheckpointError(f"{model_file}: not a project model file (needs 'model', 'config', "
                              f"'dataset')")
    info = obj["dataset"]
    if data is not None:
        from s3rec.data.reader import Dataset
        info = dataset_info(Dataset(data))
    state = check_model_file(obj, model_file, None, info)    # refuses other dataset sizes
    cfg = config_from_dict(obj["config"])
    item_size = int(state["item_embeddings.weight"].shape[0])
    attribute_size = int(state["attribute_embeddings.weight"].shape[0])
    if item_size != info["num_items"] + 2 or attribute_size != info["num_attributes"] + 1:
        raise CheckpointError(f"{model_file}: item_embeddings/attribute_embeddings rows "
                              f"{item_size}/{attribute_size} do not fit num_items "
                              f"{info['num_items']}, num_attributes {info['num_attributes']}")
    model = build_model(cfg, item_size, attribute_size, init_state=state)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        torch.save(export_original(model), tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    try:
        if args.export:
            if args.config or args.overrides:
                raise ConfigError("--export takes the config stored in the model file; "
                                  "drop --config and key=value overrides")
            path = run_export(args.checkpoint, args.out, args.data)
        else:
            if not args.data:
                raise ConfigError("import needs --data DATASET (its sizes are checked)")
            path = run_import(args.checkpoint, args.data, args.out, args.config, args.overrides)
    except (CheckpointError, ConfigError, ValueError, OSError) as e:
        print(f"s3rec-import-original: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
