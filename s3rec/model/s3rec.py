"""The S3Rec module: embeddings, the shared encoder and the pretraining heads.

With one attribute field, names equal the authors' checkpoint keys (`item_embeddings`,
`attribute_embeddings`, `position_embeddings`, `LayerNorm`, `item_encoder`, `aap_norm`, `mip_norm`,
`map_norm`, `sp_norm`), so their state dicts load without renaming when all heads are full. With
several, each field has its own table and AAP / MAP heads (s3rec.model.field_heads names them).
"""
from __future__ import annotations

import torch
from torch import nn

from s3rec.config import HeadConfig, ModelConfig
from s3rec.data.fields import DEFAULT_FIELD, AttributeField, field_layout, total_attributes
from s3rec.model.dropout import make_dropout
from s3rec.model.encoder import Encoder, attention_bias
from s3rec.model.field_heads import field_head_name, head_names, table_name
from s3rec.model.heads import make_head


class S3RecModel(nn.Module):
    def __init__(self, model_cfg: ModelConfig, heads: dict[str, HeadConfig], item_size: int,
                 attribute_size: int,
                 full_heads: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                 fields: tuple[AttributeField, ...] | None = None):
        """heads: effective head configs by head name (`head_names(fields)`: aap/mip/map/sp for
        one field; `cfg.head(name)` / `cfg.field_head(...)`, as build_model makes them).
        full_heads: {name: (weight [d, d], bias [d])} seeding `init: svd` low-rank heads.
        fields: the dataset's attribute fields (None: one field of attribute_size - 1 ids);
        attribute_size is 1 + the ids of all fields together."""
        super().__init__()
        fields = fields or field_layout([(DEFAULT_FIELD, attribute_size - 1)])
        if 1 + total_attributes(fields) != attribute_size:
            raise ValueError(f"S3RecModel: attribute_size {attribute_size} != 1 + the fields' "
                             f"{total_attributes(fields)} attributes")
        missing = [n for n in head_names(fields) if n not in heads]
        if missing:
            raise ValueError(f"S3RecModel: no config for heads {missing}")
        d = model_cfg.hidden_size
        self.cfg = model_cfg
        self.item_size = item_size
        self.attribute_size = attribute_size
        self.attribute_fields = fields
        self.head_cfgs = {n: heads[n] for n in head_names(fields)}
        self.item_embeddings = nn.Embedding(item_size, d, padding_idx=0)
        for f in fields:
            self.add_module(table_name(fields, f.name), nn.Embedding(f.size, d, padding_idx=0))
        self.position_embeddings = nn.Embedding(model_cfg.max_seq_length, d)
        self.item_encoder = Encoder(model_cfg)
        self.LayerNorm = nn.LayerNorm(d, eps=model_cfg.layer_norm_eps)
        self.dropout = make_dropout(model_cfg.hidden_dropout, model_cfg.fast_dropout)
        # The original re-initialises every Linear/Embedding (padding rows too) after construction:
        # padding rows are random and, padding_idx zeroing their gradient, stay frozen (a known
        # defect kept by default). Low-rank heads are not Linear and keep their own init.
        self.apply(self._init_weights)
        full_heads = full_heads or {}
        for name in head_names(fields):
            w, b = full_heads.get(name, (None, None))
            head = make_head(heads[name], d, w, b, name=name)
            if isinstance(head, nn.Linear):
                self._init_weights(head)
            self.add_module(f"{name}_norm", head)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.cfg.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    # ------------------------------------------------------------------ encoder

    def embed(self, items: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """items, positions: [B, L] -> dropout(LayerNorm(item + position)) [B, L, d]."""
        x = self.item_embeddings(items) + self.position_embeddings(positions)
        return self.dropout(self.LayerNorm(x))

    def encode(self, items: torch.Tensor, positions: torch.Tensor, causal: bool) -> torch.Tensor:
        """items [B, L] (0 = padding), positions [B, L] absolute in the max_seq_length window
        -> [B, L, d]. causal=False: pretraining (padding keys masked); True: fine-tuning."""
        x = self.embed(items, positions)
        return self.item_encoder(x, attention_bias(items, causal, x.dtype))

    # ------------------------------------------------------------------ heads and scores

    def head(self, name: str) -> nn.Module:
        return getattr(self, f"{name}_norm")

    def head_names(self) -> tuple[str, ...]:
        return head_names(self.attribute_fields)

    def attribute_table(self, field_name: str) -> nn.Embedding:
        """The embedding table of attribute field `field_name` ([its size, d])."""
        return getattr(self, table_name(self.attribute_fields, field_name))

    def field_head(self, field_name: str, objective: str) -> nn.Module:
        """Field `field_name`'s aap or map head."""
        return self.head(field_head_name(self.attribute_fields, field_name, objective))

    def field_weight(self, field_name: str, objective: str) -> float:
        """The factor of pretrain.weights.<objective> for this field (its head's `weight`)."""
        cfg = self.head_cfgs[field_head_name(self.attribute_fields, field_name, objective)]
        return float(getattr(cfg, "weight", 1.0))

    def finetune_scores(self, last: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """last [U, d] (the last position's output), candidates [U, C] item ids -> [U, C] dot
        products with the item embeddings (the original's scores)."""
        emb = self.item_embeddings(candidates)                      # [U, C, d]
        return torch.einsum("ucd,ud->uc", emb, last)

    def full_scores(self, last: torch.Tensor) -> torch.Tensor:
        """last [U, d] -> [U, item_size] scores against every item row (0 and mask_id included;
        the metrics exclude them)."""
        return last @ self.item_embeddings.weight.T

    def param_counts(self) -> dict[str, int]:
        """Parameters by top-level module, plus "total"."""
        out: dict[str, int] = {}
        for name, p in self.named_parameters():
            top = name.split(".")[0]
            out[top] = out.get(top, 0) + p.numel()
        out["total"] = sum(out.values())
        return out
