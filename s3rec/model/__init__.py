"""The S3Rec model: encoder, heads (full, low-rank), the module, weight import/export.

Knows no ranks, loggers or launchers; the only files it touches are model weights
(checkpoint_io).
"""
from __future__ import annotations

from typing import Mapping

import torch

from s3rec.config import Config, ConfigError
from s3rec.data.fields import DEFAULT_FIELD, AttributeField, field_layout
from s3rec.model.checkpoint_io import (CheckpointError, adapt_state, dataset_info,
                                       export_original, import_original, load_model_file,
                                       read_state_dict, save_model_file)
from s3rec.model.field_heads import fields_of_state, head_configs
from s3rec.model.heads import FullHead, LowRankHead, make_head
from s3rec.model.optim import param_groups
from s3rec.model.s3rec import S3RecModel


def build_model(cfg: Config, item_size: int, attribute_size: int,
                init_state: Mapping[str, torch.Tensor] | None = None,
                fields: tuple[AttributeField, ...] | None = None) -> S3RecModel:
    """The model for `cfg` (variant applied to the heads), freshly initialised from torch's
    generator, then loaded from `init_state` if given (authors' or project layout; see
    checkpoint_io.adapt_state). `fields`: the dataset's attribute fields (`ds.attribute_fields`);
    None: those `init_state` was saved with, else one field of attribute_size - 1 ids.

    Low-rank heads with `init: svd` factorise a full matrix taken from `init_state` when it holds
    one for that head, otherwise from the file `cfg.model.svd_init_from` (not read when
    `init_state` already holds the head's factors)."""
    if fields is None and init_state is not None:
        fields = fields_of_state(init_state)
    fields = fields or field_layout([(DEFAULT_FIELD, attribute_size - 1)])
    try:
        heads = head_configs(cfg, fields)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    full: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    svd_file: dict | None = None
    for name, h in heads.items():
        if h.kind != "lowrank" or h.init != "svd":
            continue
        if init_state is not None and f"{name}_norm.U" in init_state:
            # trained factors: load_state_dict below sets them; their product stands in as the
            # matrix to factorise so that no file is read
            u, v = init_state[f"{name}_norm.U"], init_state[f"{name}_norm.V"]
            full[name] = (u @ v.T, init_state.get(f"{name}_norm.bias"))
            continue
        src = init_state
        if src is None or f"{name}_norm.weight" not in src:
            if not cfg.model.svd_init_from:
                raise CheckpointError(f"head '{name}': init svd needs model.svd_init_from or an "
                                      f"init state with {name}_norm.weight")
            if svd_file is None:
                svd_file = read_state_dict(cfg.model.svd_init_from)
            src = svd_file
            if f"{name}_norm.weight" not in src:
                raise CheckpointError(f"model.svd_init_from {cfg.model.svd_init_from}: no full "
                                      f"matrix '{name}_norm.weight' to factorise")
        full[name] = (src[f"{name}_norm.weight"], src.get(f"{name}_norm.bias"))
    model = S3RecModel(cfg.model, heads, item_size, attribute_size, full_heads=full,
                       fields=fields)
    if init_state is not None:
        model.load_state_dict(adapt_state(init_state, model))
    return model


__all__ = ["S3RecModel", "build_model", "FullHead", "LowRankHead", "make_head", "param_groups",
           "import_original", "export_original", "adapt_state", "save_model_file",
           "load_model_file", "read_state_dict", "dataset_info", "CheckpointError"]
