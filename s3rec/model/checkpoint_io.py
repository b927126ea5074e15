"""Model weights in and out: the authors' state dicts and this project's model files.

Authors' layout: a plain state dict whose keys equal this model's parameter names when every head is
full (`aap_norm.weight`, ...). A low-rank head stores `<head>_norm.{U,V,bias}` instead; importing a
full matrix into a low-rank head factorises it by SVD (`init: svd`) or keeps the fresh factors
(other inits); exporting writes the product U V^T.

Project model file (final.pt, epoch-N.pt):
    {"model": state_dict, "config": cfg.to_dict(), "dataset": {"name", "num_users", "num_items",
     "num_attributes"}}
"""
from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import torch

from s3rec.config import Config
from s3rec.model.heads import LowRankHead

DATASET_KEYS = ("name", "num_users", "num_items", "num_attributes")


class CheckpointError(ValueError):
    """A checkpoint that does not fit: the message names the file or key and what was expected."""


def dataset_info(ds) -> dict:
    """The "dataset" entry of a model file from a `s3rec.data.reader.Dataset` (or alike)."""
    return {"name": ds.name, "num_users": ds.num_users, "num_items": ds.num_items,
            "num_attributes": ds.num_attributes}


def _check_shape(key: str, found: torch.Tensor, expected: torch.Size, item_size: int,
                 attribute_size: int, src: Mapping[str, torch.Tensor]) -> None:
    if tuple(found.shape) == tuple(expected):
        return
    theirs = src.get("item_embeddings.weight"), src.get("attribute_embeddings.weight")
    made_for = ""
    if theirs[0] is not None and theirs[1] is not None:
        made_for = (f"; the checkpoint was made for item_size={theirs[0].shape[0]}, "
                    f"attribute_size={theirs[1].shape[0]}")
    raise CheckpointError(
        f"checkpoint key '{key}': expected shape {list(expected)}, found {list(found.shape)} "
        f"(this dataset: item_size={item_size}, attribute_size={attribute_size}{made_for})")


def adapt_state(src: Mapping[str, torch.Tensor], model) -> "OrderedDict[str, torch.Tensor]":
    """A state dict for `model` from `src` in the authors' or this project's layout (strict:
    missing or unused keys and wrong shapes raise CheckpointError naming them)."""
    target = model.state_dict()
    sizes = (model.item_size, model.attribute_size)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    used: set[str] = set()
    missing: list[str] = []
    head_prefixes = tuple(f"{n}_norm." for n in model.head_names())

    def take(key: str, expected: torch.Size) -> torch.Tensor:
        _check_shape(key, src[key], expected, *sizes, src)
        used.add(key)
        dtype = target[key].dtype if key in target else model.item_embeddings.weight.dtype
        return src[key].detach().to(dtype=dtype)

    for key, ref in target.items():
        if key.startswith(head_prefixes):
            continue
        if key in src:
            out[key] = take(key, ref.shape)
        else:
            missing.append(key)

    for name in model.head_names():
        head, p = model.head(name), f"{name}_norm."
        d = model.cfg.hidden_size
        has_full, has_factors = p + "weight" in src, p + "U" in src and p + "V" in src
        if isinstance(head, LowRankHead):
            if has_factors:
                out[p + "U"] = take(p + "U", head.U.shape)
                out[p + "V"] = take(p + "V", head.V.shape)
            elif has_full:
                w = take(p + "weight", torch.Size([d, d]))
                if head.init == "svd":
                    tmp = LowRankHead(d, head.rank, "svd", name)
                    tmp.init_from_full(w)
                    out[p + "U"], out[p + "V"] = tmp.U.detach(), tmp.V.detach()
                else:   # a fresh low-rank head: keep the model's own factors
                    out[p + "U"], out[p + "V"] = target[p + "U"], target[p + "V"]
            else:
                missing.append(p + "U/V or " + p + "weight")
        else:
            if has_full:
                out[p + "weight"] = take(p + "weight", head.weight.shape)
            elif has_factors:
                u, v = take(p + "U", torch.Size([d, src[p + "U"].shape[1]])), src[p + "V"]
                _check_shape(p + "V", v, u.shape, *sizes, src)
                used.add(p + "V")
                out[p + "weight"] = (u @ v.T).to(target[p + "weight"].dtype)
            else:
                missing.append(p + "weight")
        if p + "bias" in src:
            out[p + "bias"] = take(p + "bias", torch.Size([d]))
        else:
            missing.append(p + "bias")

    unused = sorted(set(src) - used)
    if missing or unused:
        raise CheckpointError(f"checkpoint does not match the model: missing keys {missing}, "
                              f"unexpected keys {unused}")
    return OrderedDict((k, out[k]) for k in target)   # the model's own key order


def export_original(model) -> "OrderedDict[str, torch.Tensor]":
    """The model's weights in the authors' keys (low-rank heads as their product U V^T)."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in model.state_dict().items():
        if key.startswith(tuple(f"{n}_norm." for n in model.head_names())):
            continue
        out[key] = value.detach().cpu().clone()
    for name in model.head_names():
        head = model.head(name)
        out[f"{name}_norm.weight"] = head.matrix().detach().cpu().clone()
        out[f"{name}_norm.bias"] = head.bias.detach().cpu().clone()
    return out


def import_original(state_dict: Mapping[str, torch.Tensor], cfg: Config, item_size: int,
                    attribute_size: int) -> "OrderedDict[str, torch.Tensor]":
    """The authors' state dict -> this project's model state dict for `cfg` (low-rank heads with
    `init: svd` factorise the imported full matrices)."""
    from s3rec.model import build_model   # late: build_model uses this module
    return build_model(cfg, item_size, attribute_size, init_state=state_dict).state_dict()


def read_state_dict(path: str | Path) -> dict:
    """A state dict from an authors' file (plain state dict) or a project model file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # a truncated or foreign file: say which
        raise CheckpointError(f"checkpoint {path}: {unreadable_reason(e)}") from None
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path}: expected a state dict (name -> tensor) or a "
                              f"project model file with a 'model' key")
    return dict(obj)


def save_model_file(path: str | Path, model, cfg: Config, dataset_info: Mapping) -> Path:
    """Write a project model file atomically (s3rec.run_folder.atomic_path: a failed write is one
    WriteError line naming the file and the free space, and leaves no temporary file)."""
    path = Path(path)
    missing = [k for k in DATASET_KEYS if k not in dataset_info]
    if missing:
        raise CheckpointError(f"save_model_file({path}): dataset_info lacks {missing}")
    state = model.state_dict() if hasattr(model, "state_dict") else model
    payload = {"model": {k: v.detach().cpu() for k, v in state.items()},
               "config": cfg.to_dict(),
               "dataset": {k: dataset_info[k] for k in DATASET_KEYS}}
    from s3rec.atomic_write import atomic_path
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_model_file(path: str | Path, cfg: Config | None, dataset_info: Mapping) -> dict:
    """The state dict of a project model file, refusing a file made for other dataset sizes.
    Pass the result to `build_model(cfg, ..., init_state=...)` (which adapts head layouts)."""
    return check_model_file(read_model_file(path), path, cfg, dataset_info)


def read_model_file(path: str | Path):
    """What torch.load reads from `path`; CheckpointError if it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"model file {path}: {unreadable_reason(e)}") from None


def unreadable_reason(e: Exception) -> str:
    """torch.load(weights_only=True)'s error in one line: the function a file names (refused,
    never called), or the reader's first line. torch's own text suggests weights_only=False,
    which would run that function."""
    found = re.search(r"GLOBAL (\S+)", str(e))
    if isinstance(e, pickle.UnpicklingError) and found:
        return (f"refused, nothing loaded: it names {found.group(1)}, which loading would call; "
                f"files written by s3rec hold only tensors and plain data")
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return f"damaged or truncated, cannot be read by torch.load ({first})"


def check_model_file(obj, path: str | Path, cfg: Config | None, dataset_info: Mapping) -> dict:
    """load_model_file on a file already read (read_model_file)."""
    if not isinstance(obj, Mapping) or not {"model", "dataset"} <= set(obj):
        raise CheckpointError(f"model file {path}: not a project model file (needs 'model' and "
                              f"'dataset'); convert the authors' checkpoints with "
                              f"s3rec-import-original")
    theirs = obj["dataset"]
    for key in ("num_users", "num_items", "num_attributes"):
        if theirs.get(key) != dataset_info.get(key):
            raise CheckpointError(
                f"model file {path}: made for dataset '{theirs.get('name')}' with {key}="
                f"{theirs.get(key)}, but this dataset '{dataset_info.get('name')}' has "
                f"{key}={dataset_info.get(key)}")
    if cfg is not None and obj.get("config", {}).get("model", {}).get("hidden_size",
                                                                     cfg.model.hidden_size) \
            != cfg.model.hidden_size:
        raise CheckpointError(f"model file {path}: hidden_size "
                              f"{obj['config']['model']['hidden_size']} differs from the config's "
                              f"model.hidden_size {cfg.model.hidden_size}")
    return dict(obj["model"])
