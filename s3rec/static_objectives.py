"""The pretraining losses at fixed shapes, for torch.compile and CUDA graphs (pretrain.static_shapes).

Why: this 0.9M-parameter model's step is bound by the host launching ~740 small kernels, not by
arithmetic (an H100 step: ~12 ms of launches for far less device work). A compiled step captured
in a CUDA graph is launched once, but a graph fixes every shape; the default path's shapes change
every batch (length-bucketed L, the counts of masked and unmasked positions, the attribute
targets). Here every micro-batch has the same shape:
  - the batch is padded on the host to [micro batch, max_seq_length] (s3rec.data.batch.
    pad_pretrain_batch); rows added to fill a short last batch copy row 0 and carry weight 0;
  - each objective is computed at EVERY position and weighted by 0/1 (`masked`, "neither masked
    nor padding", real rows) instead of gathering the positions that count;
  - the AAP/MAP targets are rows of a dense item x attribute table kept on the device
    (`attribute_table`), looked up by the original item, instead of per-batch target pairs.
The losses are the same sums as s3rec.objectives.pretrain_losses (equal up to float summation
order: tests/test_static_objectives.py) at more device work (every position of a 50-wide window
instead of the batch's longest prefix), which a GPU absorbs and a CPU does not: off by default.
Dropout draws differ from the default path (other shapes), with the same distribution.
"""
from __future__ import annotations

import numpy as np
import torch

from s3rec.data.batch import PretrainBatch
from s3rec.objectives import (_BCE_EPS, OBJECTIVES, _reduce, _weight, loss_precision,
                              pair_loss, stacked_encoding, zero_losses)


def attribute_table(attr_values: np.ndarray, attr_offsets: np.ndarray, item_size: int,
                    attribute_size: int) -> torch.Tensor:
    """bool [item_size, attribute_size]: row i is the multi-hot of item i's attributes (a set:
    repeats count once). attr_values / attr_offsets: the CSR over item ids 0..n (n < item_size;
    rows past it, e.g. mask_id, stay empty) that PretrainSampler has checked already
    (`sampler.attr_values`, `sampler.attr_offsets`). An attribute id outside
    0..attribute_size-1 is an error."""
    offsets = np.asarray(attr_offsets, dtype=np.int64)
    values = np.asarray(attr_values, dtype=np.int64)
    n = len(offsets) - 1
    if len(values) and (values.min() < 0 or values.max() >= attribute_size):
        raise ValueError(f"attribute ids {values.min()}..{values.max()} outside the model's "
                         f"attribute table 0..{attribute_size - 1}")
    table = torch.zeros(item_size, attribute_size, dtype=torch.bool)
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
    table[torch.from_numpy(rows), torch.from_numpy(values)] = True
    return table


class _DenseSigmoidBCE(torch.autograd.Function):
    """sum_r row_w[r] * sum_a BCELoss(sigmoid(x[r, a]), y[r, a]); x [R, A], y bool [R, A],
    row_w [R] (0/1). The forward and the gradient are BCELoss's on sigmoid outputs exactly as
    s3rec.objectives._SparseSigmoidBCE (log terms from p, clamped at -100; the gradient vanishes
    where p saturates), written densely so that a compiler fuses it into a few kernels."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, row_w: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(x)                                                # [R, A]
        log_p = torch.log(p).clamp(min=-100.0)
        log_not = torch.log1p(-p).clamp(min=-100.0)
        per_row = -torch.where(y, log_p, log_not).sum(1)                    # [R]
        ctx.save_for_backward(p, y, row_w)
        return (per_row * row_w).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        p, y, row_w = ctx.saved_tensors
        pq = p * (1.0 - p)
        w = pq / pq.clamp(min=_BCE_EPS)                 # 1 unless sigmoid saturates
        g = (p - y.to(p.dtype)) * w * row_w[:, None]
        return g * grad, None, None


def dense_sigmoid_bce(logits: torch.Tensor, targets: torch.Tensor,
                      row_weight: torch.Tensor) -> torch.Tensor:
    """BCELoss(sigmoid(logits), targets, reduction='sum') over the rows of weight 1 (see
    _DenseSigmoidBCE). logits [R, A], targets bool [R, A], row_weight [R] in the logits' dtype."""
    return _DenseSigmoidBCE.apply(loss_precision(logits), targets, loss_precision(row_weight))


def pretrain_losses_static(model, batch: PretrainBatch, attr_table: torch.Tensor, weights,
                           reduction: str = "sum", pair_form: str = "original"
                           ) -> dict[str, torch.Tensor]:
    """The four losses of a padded batch (`pad_pretrain_batch`: rows_real set) and their
    weighted total: the same values as s3rec.objectives.pretrain_losses on the unpadded batch.
    attr_table: bool [item_size, attribute_size] on the batch's device (`attribute_table`).
    No operation here depends on the data's values for its shape, and nothing is read back."""
    if batch.rows_real is None:
        raise ValueError("pretrain_losses_static needs a padded batch (pad_pretrain_batch sets "
                         "rows_real); use s3rec.objectives.pretrain_losses for an unpadded one")
    w = {name: _weight(weights, name) for name in OBJECTIVES}
    B, L = batch.masked_items.shape
    out = zero_losses(model)
    hidden, need_main, need_sp = stacked_encoding(model, batch, w)     # [kB, L, d]
    if hidden is None:
        return out
    d = hidden.shape[-1]
    real = batch.rows_real                                              # [B] bool

    if need_main:
        flat = hidden[:B].reshape(B * L, d)                             # [B*L, d]
        orig = batch.original_items.reshape(-1)                         # [B*L]
        at_real = real[:, None].expand(B, L).reshape(-1)                # [B*L]
        masked = batch.masked.reshape(-1) & at_real                     # [B*L] MIP, MAP
        unmasked = (orig != 0) & ~batch.masked.reshape(-1) & at_real    # [B*L] AAP
        if w["aap"] > 0 or w["map"] > 0:
            # late: the field objectives build on this module's dense_sigmoid_bce
            from s3rec.field_objectives import field_attribute_losses_static
            targets = attr_table.index_select(0, orig)                  # [B*L, A] bool
        for name, rows in (("aap", unmasked), ("map", masked)):
            if w[name] > 0:
                field_attribute_losses_static(model, name, flat, targets, rows, reduction, out)
        if w["mip"] > 0:
            emb = model.item_embeddings
            z = model.mip_norm(flat)                                    # [B*L, d]
            per = pair_loss((z * emb(orig)).sum(-1),
                            (z * emb(batch.mip_neg.reshape(-1))).sum(-1), pair_form)   # [B*L]
            out["mip"] = _reduce((per * masked.to(per.dtype)).sum(), masked.sum(), reduction)
    if need_sp:
        last = hidden[-3 * B:, -1]                                      # [3B, d]
        z = model.sp_norm(last[:B])                                     # [B, d]
        per = pair_loss((z * last[B:2 * B]).sum(-1), (z * last[2 * B:]).sum(-1), pair_form)
        out["sp"] = _reduce((per * real.to(per.dtype)).sum(), real.sum(), reduction)
    out["total"] = sum(w[name] * out[name] for name in OBJECTIVES if w[name] > 0)
    return out
