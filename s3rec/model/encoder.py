"""The S3Rec transformer: 2 post-LN layers exactly as the authors' code (BERT style).

Module and parameter names follow the authors' checkpoint keys
(`item_encoder.layer.{i}.attention.{query,key,value,dense,LayerNorm}`,
`item_encoder.layer.{i}.intermediate.{dense_1,dense_2,LayerNorm}`) so their state dicts load as is.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from s3rec.config import ModelConfig
from s3rec.model.dropout import make_dropout

# Additive mask values of the original: pretraining adds -1e8 at padding keys, fine-tuning uses
# BERT's (1 - mask) * -10000. Both underflow to exactly 0 after softmax wherever a row has one
# visible key; they differ only on rows with no visible key (padding queries of fine-tuning),
# whose outputs never reach a non-padding position or a loss.
PRETRAIN_MASK_VALUE = -1e8
FINETUNE_MASK_VALUE = -10000.0


def attention_bias(items: torch.Tensor, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask from item ids (0 = padding).

    items: [B, L] -> [B, 1, 1, L] (bidirectional, padding keys masked) or
                     [B, 1, L, L] (causal: key j visible to query i iff j <= i and j not padding).
    """
    visible = (items > 0)[:, None, None, :]                          # [B, 1, 1, L]
    if causal:
        L = items.shape[1]
        lower = torch.ones(L, L, dtype=torch.bool, device=items.device).tril_()
        visible = visible & lower                                    # [B, 1, L, L]
        value = FINETUNE_MASK_VALUE
    else:
        value = PRETRAIN_MASK_VALUE
    value = max(value, torch.finfo(dtype).min)   # fp16 cannot hold -1e8
    return (~visible).to(dtype) * value


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.head_size = d // cfg.num_heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.attn_dropout = make_dropout(cfg.attention_dropout, cfg.fast_dropout)
        self.dense = nn.Linear(d, d)
        self.LayerNorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.out_dropout = make_dropout(cfg.hidden_dropout, cfg.fast_dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape                                            # [B, L, d]
        return x.view(B, L, self.num_heads, self.head_size).transpose(1, 2)  # [B, h, L, dh]

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_size)  # [B, h, L, L]
        probs = torch.softmax(scores + bias, dim=-1)
        probs = self.attn_dropout(probs)
        ctx = (probs @ v).transpose(1, 2).reshape(x.shape)           # [B, L, d]
        out = self.out_dropout(self.dense(ctx))
        return self.LayerNorm(out + x)


class Intermediate(nn.Module):
    """The FFN: Linear(d, inner), exact (erf) GELU, Linear(inner, d), dropout, LayerNorm(x + input)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden_size
        self.dense_1 = nn.Linear(d, cfg.inner_size)
        self.act = nn.GELU()                     # approximate='none': the erf form of the original
        self.dense_2 = nn.Linear(cfg.inner_size, d)
        self.LayerNorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.dropout = make_dropout(cfg.hidden_dropout, cfg.fast_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.dense_2(self.act(self.dense_1(x))))
        return self.LayerNorm(out + x)


class Layer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention = SelfAttention(cfg)
        self.intermediate = Intermediate(cfg)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.intermediate(self.attention(x, bias))


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x: [B, L, d] embedded input; bias: additive mask from `attention_bias`."""
        for layer in self.layer:
            x = layer(x, bias)
        return x
