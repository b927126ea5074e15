"""The S3Rec module: embeddings, the shared encoder and the four pretraining heads.

Names equal the authors' checkpoint keys (`item_embeddings`, `attribute_embeddings`,
`position_embeddings`, `LayerNorm`, `item_encoder`, `aap_norm`, `mip_norm`, `map_norm`, `sp_norm`),
so their state dicts load without renaming when all heads are full.
"""
from __future__ import annotations

import torch
from torch import nn

from s3rec.config import HEAD_NAMES, HeadConfig, ModelConfig
from s3rec.model.dropout import make_dropout
from s3rec.model.encoder import Encoder, attention_bias
from s3rec.model.heads import make_head


class S3RecModel(nn.Module):
    def __init__(self, model_cfg: ModelConfig, heads: dict[str, HeadConfig], item_size: int,
                 attribute_size: int,
                 full_heads: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        """heads: effective head configs by name (`cfg.head(name)`), all of aap/mip/map/sp.
        full_heads: {name: (weight [d, d], bias [d])} seeding `init: svd` low-rank heads."""
        super().__init__()
        missing = [n for n in HEAD_NAMES if n not in heads]
        if missing:
            raise ValueError(f"S3RecModel: no config for heads {missing}")
        d = model_cfg.hidden_size
        self.cfg = model_cfg
        self.item_size = item_size
        self.attribute_size = attribute_size
        self.item_embeddings = nn.Embedding(item_size, d, padding_idx=0)
        self.attribute_embeddings = nn.Embedding(attribute_size, d, padding_idx=0)
        self.position_embeddings = nn.Embedding(model_cfg.max_seq_length, d)
        self.item_encoder = Encoder(model_cfg)
        self.LayerNorm = nn.LayerNorm(d, eps=model_cfg.layer_norm_eps)
        self.dropout = make_dropout(model_cfg.hidden_dropout, model_cfg.fast_dropout)
        # The original re-initialises every Linear/Embedding (padding rows too) after construction:
        # padding rows are random and, padding_idx zeroing their gradient, stay frozen (a known
        # defect kept by default). Low-rank heads are not Linear and keep their own init.
        self.apply(self._init_weights)
        full_heads = full_heads or {}
        for name in HEAD_NAMES:
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
