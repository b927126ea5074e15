"""Pretraining heads: a d x d affine map `W h + b`, full or low-rank (W = U V^T).

A full head is `nn.Linear(d, d)` (parameters `weight`, `bias`, so the authors' `aap_norm.weight`
loads directly). A low-rank head keeps U, V in R^{d x r} and applies (h V) U^T + b: O(d r) per row
instead of O(d^2).
"""
from __future__ import annotations

import torch
from torch import nn

from s3rec.config import HeadConfig


class FullHead(nn.Linear):
    """W h + b with W [d, d] (the original `*_norm` layers)."""

    def __init__(self, d: int):
        super().__init__(d, d)

    def matrix(self) -> torch.Tensor:
        return self.weight                                      # [d, d]

    def matrix_params(self) -> list[nn.Parameter]:
        return [self.weight]


class LowRankHead(nn.Module):
    """(h V) U^T + b, i.e. W = U V^T of rank <= r."""

    def __init__(self, d: int, rank: int, init: str = "xavier", name: str = "head"):
        super().__init__()
        if not 1 <= rank <= d:
            raise ValueError(f"head '{name}': rank {rank} must be in 1..hidden_size ({d})")
        self.U = nn.Parameter(torch.empty(d, rank))             # [d, r]
        self.V = nn.Parameter(torch.empty(d, rank))             # [d, r]
        self.bias = nn.Parameter(torch.zeros(d))                # [d]
        self.init = init
        self.name = name
        self.reset_factors()

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def reset_factors(self) -> None:
        """xavier / orthogonal init of U and V; `svd` heads start at 0 until `init_from_full`
        (no random draw, so building them leaves torch's generator where it was)."""
        with torch.no_grad():
            if self.init == "svd":
                self.U.zero_()
                self.V.zero_()
            elif self.init == "orthogonal":
                nn.init.orthogonal_(self.U)
                nn.init.orthogonal_(self.V)
            else:
                nn.init.xavier_uniform_(self.U)
                nn.init.xavier_uniform_(self.V)
            self.bias.zero_()

    @torch.no_grad()
    def init_from_full(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Truncated SVD of a full W [d, d]: U = U_r sqrt(S_r), V = V_r sqrt(S_r) (the best rank-r
        approximation of W, split evenly); bias copied."""
        d, r = self.U.shape
        if tuple(weight.shape) != (d, d):
            raise ValueError(f"head '{self.name}': SVD source must be [{d}, {d}], "
                             f"got {list(weight.shape)}")
        u, s, vh = torch.linalg.svd(weight.detach().double().cpu())
        root = s[:r].sqrt()
        self.U.copy_((u[:, :r] * root).to(self.U))
        self.V.copy_((vh[:r].T * root).to(self.V))
        if bias is not None:
            self.bias.copy_(bias.detach().to(self.bias))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (h @ self.V) @ self.U.T + self.bias                # [..., d]

    def matrix(self) -> torch.Tensor:
        return self.U @ self.V.T                                   # [d, d]

    def matrix_params(self) -> list[nn.Parameter]:
        return [self.U, self.V]

    def extra_repr(self) -> str:
        return f"d={self.U.shape[0]}, rank={self.rank}, init={self.init}"


def make_head(head_cfg: HeadConfig, d: int, full_weight: torch.Tensor | None = None,
              full_bias: torch.Tensor | None = None, name: str = "head") -> nn.Module:
    """A head from its effective config (`cfg.head(name)`: variant applied, rank resolved).

    `full_weight`/`full_bias` seed an `init: svd` low-rank head; a full head ignores init."""
    if head_cfg.kind == "full":
        return FullHead(d)
    if head_cfg.kind != "lowrank":
        raise ValueError(f"head '{name}': kind must be full|lowrank, got {head_cfg.kind!r}")
    if head_cfg.rank > d:
        raise ValueError(f"head '{name}': rank {head_cfg.rank} is larger than the hidden size {d}")
    head = LowRankHead(d, head_cfg.rank, head_cfg.init, name)
    if head_cfg.init == "svd":
        if full_weight is None:
            raise ValueError(f"head '{name}': init 'svd' needs a full matrix to factorise "
                             f"(model.svd_init_from or an imported checkpoint)")
        head.init_from_full(full_weight, full_bias)
    return head
